"""Run one guest program under ``--mmu native`` and under the shadow MMU with each policy (audit
on), and report every run whose serial output, exit status or final memory differs from the
native run's."""
from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass

from ..asm import AsmError, assemble_firmware, assemble_program
from ..exits import ExitKind
from ..machine import Machine
from ..policies import comparison_configs, config_label, policy_of_label

# every policy, and kvm with out-of-sync pages off (docs/UNSYNC.md)
CONFIGS = [config_label(n, u is not False) for n, u in comparison_configs()]

# The instruction limit of every run. Counting puts a code hook over every instruction, and on
# Unicorn 2.1.4 an instruction restarted after a refused TLB fill under a code hook sees wrong
# arithmetic flags (AF of a preceding sub lost: measured, tests/test_pitfalls.py). Only the
# shadow MMU refuses fills, so every such restart made a false divergence in the printed flags
# (found by x86shadow fuzz: native 0x91, shadow 0x81, and 0x890 / 0x80 before). So a shadow run
# that differs from the native one without having reached the limit is run again without
# one (the watchdog ends a livelock), and that run is what counts; one that reached the limit
# (a loop where the native run ended) is a divergence as it is. A program that does not end
# within the limit natively is not compared at all (there is nothing to compare it with).
DEFAULT_MAX_INSNS = 2_000_000
DEFAULT_TIMEOUT_S = 30.0          # wall clock per run: a livelock executes no instructions


class Watchdog:
    """Stops a vCPU's run after ``timeout`` seconds of wall-clock time (a livelock that keeps
    re-executing one instruction never reaches --max-insns). Re-issues the stop until the run
    returns, so a stop that lands between two emu_start calls is not lost."""

    def __init__(self, vcpu, timeout):
        self.vcpu, self.timeout = vcpu, timeout
        self._done = threading.Event()
        self._thread = None

    def _watch(self):
        if self._done.wait(self.timeout):
            return
        while not self._done.wait(0.2):
            self.vcpu.request_stop(f"watchdog: still running after {self.timeout:g} s "
                                   "(a livelock?)")

    def __enter__(self):
        if self.timeout:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Outcome:
    mmu: str                     # "native" or the policy name
    status: int
    output: bytes
    report: str
    memory: dict                 # frame -> bytes
    runaway: bool = False        # stopped at max_insns


@dataclass
class Divergence:
    policy: str
    what: str                    # "output", "status", "memory"
    detail: str

    def __str__(self):
        return f"{self.policy}: {self.what} differs from --mmu native: {self.detail}"


def run_source(source: str, mode: str, frames, *, policies=CONFIGS,
               max_insns=DEFAULT_MAX_INSNS, ram_mib=128, timeout=DEFAULT_TIMEOUT_S,
               host=None, planted_bug=None, shadow_counted=False):
    """Assemble ``source`` and run it natively and under each policy (a config_label: a policy
    name, or "kvm --unsync off"); returns (native Outcome, [shadow Outcome]). ``host``: a
    machine.HostConfig for the shadow runs (host events under the guest; the native run has
    none); ``planted_bug``: test-only (mmu/vm_mmu.py PLANTED_BUGS). ``max_insns``: see
    DEFAULT_MAX_INSNS (a native run that reaches it: no shadow runs); ``shadow_counted``: keep
    the counted shadow runs even when they differ (a test of the Unicorn pitfall)."""
    fd, path = tempfile.mkstemp(suffix=".asm", prefix="x86shadow-fuzz-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        program = assemble_program(path, mode, ram_mib << 20)
    finally:
        os.unlink(path)
    firmware = assemble_firmware(mode, ram_mib << 20)
    native = _run(program, firmware, mode, "native", None, frames, max_insns, ram_mib, timeout)
    if native.runaway:
        return native, []
    pte = 4 if mode == "32" else 8
    shadows = []
    for p in policies:
        run = _run(program, firmware, mode, "shadow", p, frames, max_insns, ram_mib, timeout,
                   host, planted_bug)
        if compare(native, run, pte) and not run.runaway and not shadow_counted:
            run = _run(program, firmware, mode, "shadow", p, frames, 0, ram_mib, timeout,
                       host, planted_bug)
        shadows.append(run)
    return native, shadows


def _run(program, firmware, mode, mmu, policy, frames, max_insns, ram_mib, timeout, host=None,
         planted_bug=None) -> Outcome:
    m = Machine(mode, mmu=mmu, policy=policy_of_label(policy) if policy else None,
                ram_mib=ram_mib, audit=(mmu == "shadow"), host=host, planted_bug=planted_bug)
    m.load(program, firmware)
    with Watchdog(m.vcpu, timeout):
        r = m.run(max_insns)
    memory = {f: m.read_phys(f, 0x1000) for f in frames}
    return Outcome(policy or "native", r.status, bytes(m.output), r.report, memory,
                   r.exit_kind is ExitKind.RUNAWAY)


def compare(native: Outcome, shadow: Outcome, pte_size: int = 4) -> list:
    """The differences of one shadow run from the native run (empty: identical)."""
    out = []
    if shadow.output != native.output:
        a, b = native.output.splitlines(), shadow.output.splitlines()
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        line = lambda v, i: v[i].decode(errors="replace") if i < len(v) else "<no line>"  # noqa: E731
        out.append(Divergence(shadow.mmu, "output",
                              f"line {i + 1}: native {line(a, i)!r}, shadow {line(b, i)!r}"))
    if shadow.status != native.status:
        out.append(Divergence(shadow.mmu, "status",
                              f"native {native.status}, shadow {shadow.status}"
                              + (f" ({shadow.report.splitlines()[0]})" if shadow.report else "")))
    for frame, data in native.memory.items():
        other = shadow.memory[frame]
        if other != data:
            off = next(i for i in range(0, 0x1000, pte_size)
                       if other[i:i + pte_size] != data[i:i + pte_size])
            n = int.from_bytes(data[off:off + pte_size], "little")
            s = int.from_bytes(other[off:off + pte_size], "little")
            out.append(Divergence(shadow.mmu, "memory",
                                  f"{frame + off:#x}: native {n:#0{2 + 2 * pte_size}x}, "
                                  f"shadow {s:#0{2 + 2 * pte_size}x}"))
    return out


def check_source(source: str, mode: str, frames, **kw) -> list:
    """All divergences of ``source`` (assembled for ``mode``) from the native run."""
    native, shadows = run_source(source, mode, frames, **kw)
    pte = 4 if mode == "32" else 8
    return [d for s in shadows for d in compare(native, s, pte)]


__all__ = ["AsmError", "Divergence", "Outcome", "check_source", "compare", "run_source"]
