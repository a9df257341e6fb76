"""Several vCPUs on one host thread (docs/SMP.md): a deterministic scheduler that runs each vCPU
(its own Unicorn instance over the VM's guest RAM) for a slice of guest instructions, then
another.

A slice is one ``VCPU.run_once(insns + Q)``: Unicorn's ``emu_start(..., count=Q)`` stops the vCPU
after Q guest instructions (the run loop counts them: cpu/vcpu.py), so a vCPU spinning on shared
memory -- with or without ``pause`` -- gives the others their turn after at most Q instructions.
A slice also ends when the vCPU stops (hlt, return from main) and, with ``:exits``, at every exit
the shadow MMU handles (the ``exit`` event) as the vCPU goes on from it: after a page fault, an
exception or port I/O. Exits taken before their instruction runs (the privileged-instruction
hook: mov to CR0/CR3/CR4, invlpg, wrmsr EFER) do not end a slice: Unicorn stops there before the
instruction, which would be intercepted again on resuming, for ever. Nor do the exits of a
trapped page-table write (emulated or unprotected): stopping inside the write-trap hook lets the
store through and re-executes the instruction, which would store twice.

Schedules (``--schedule``):

* ``rr[:Q]``: round robin over the vCPUs still running, Q instructions each (default
  ``DEFAULT_QUANTUM``);
* ``random:SEED[:Q]``: each slice a vCPU drawn from the running ones and a length drawn from
  1..Q, from ``random.Random(SEED)`` -- the same seed gives the same interleaving;
* either with ``:exits`` appended.

vCPU modes (``vcpu->mode``, mmu/requests.py): every vCPU that may still run is IN_GUEST_MODE --
it is modelled as running on its own physical CPU, the host thread only interleaves them -- and a
stopped vCPU is OUTSIDE_GUEST_MODE; so ``kvm_flush_remote_tlbs`` on one vCPU "interrupts" the
others (``remote_tlb_flush``), whose TLBs are flushed before their next slice (KVM_REQ_TLB_FLUSH,
served here through ``VcpuMmu.enter_guest`` and ``VCPU.service_requests``).

The run ends when vCPU 0 ends (hlt with IF=0, return from main), when any vCPU writes the exit
port or crashes, or at ``--max-insns`` (counted over all vCPUs). Another vCPU that halts or
returns from main just stops.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from . import events as ev
from . import stopping
from .exits import Exit, ExitKind
from .faults import GuestCrash
from .mmu.requests import IN_GUEST_MODE, OUTSIDE_GUEST_MODE

DEFAULT_QUANTUM = 1000
MAX_QUANTUM = 1 << 32


@dataclass(frozen=True)
class Schedule:
    kind: str                  # "rr" | "random"
    quantum: int = DEFAULT_QUANTUM
    seed: int = 0
    exits: bool = False        # also switch at every exit the shadow MMU handles

    def __str__(self) -> str:
        body = f"rr:{self.quantum}" if self.kind == "rr" else f"random:{self.seed}:{self.quantum}"
        return body + (":exits" if self.exits else "")


_FORMS = "rr[:Q] or random:SEED[:Q], optionally followed by :exits"


def parse_schedule(text: str) -> Schedule:
    """``--schedule`` text -> Schedule; ValueError with what is wrong."""
    parts = text.strip().split(":")
    exits = parts[-1] == "exits" and len(parts) > 1
    if exits:
        parts = parts[:-1]
    kind, args = parts[0], parts[1:]

    def number(s, what, low):
        try:
            n = int(s, 0)
        except ValueError:
            raise ValueError(f"--schedule {text!r}: {what} {s!r} is not a number "
                             f"(expected {_FORMS})") from None
        if not low <= n <= MAX_QUANTUM:
            raise ValueError(f"--schedule {text!r}: {what} must be {low}..{MAX_QUANTUM}")
        return n
    if kind == "rr" and len(args) <= 1:
        q = number(args[0], "quantum", 1) if args else DEFAULT_QUANTUM
        return Schedule("rr", q, exits=exits)
    if kind == "random" and 1 <= len(args) <= 2:
        seed = number(args[0], "seed", 0)
        q = number(args[1], "quantum", 1) if len(args) > 1 else DEFAULT_QUANTUM
        return Schedule("random", q, seed, exits)
    raise ValueError(f"--schedule {text!r}: expected {_FORMS}")


@dataclass
class Slice:
    """One slice: which vCPU, from which of its instructions, how many ran, how it ended."""
    vcpu: int
    start: int
    insns: int
    end: str                   # "quantum" | "exit" | an ExitKind value


class VmScheduler:
    """Runs ``machine.vcpus`` by ``schedule``. ``record``: keep every slice in ``slices`` (the
    tests compare interleavings); the counts are always kept."""

    def __init__(self, machine, schedule: Schedule, record: bool = False):
        self.machine = machine
        self.schedule = schedule
        self.record = record
        self.slices: list[Slice] = []
        self.n_slices = 0
        self.current = None
        self._yielding = False
        self._rng = random.Random(schedule.seed)
        if schedule.exits:
            machine.events.subscribe(self._on_exit, (ev.EXIT,))

    def _on_exit(self, _kind, _fields) -> None:
        v = self.current
        # Not inside the privileged-instruction hook (before_insn: the instruction would be
        # intercepted again) nor inside the write-trap hook: an emu_stop there lets the trapped
        # store through and then re-executes the instruction (measured, cpu/vcpu.py _write_trap)
        # -- a store done twice: the kmap guest's `lock btr` found the accessed bit it had just
        # cleared itself, and an emulated `mov` to a page table was trapped, emulated and
        # re-executed for ever (tests/test_kmap_smp.py).
        if v is not None and not self._yielding and not v.before_insn \
                and not getattr(v, "_in_write_hook", False):
            self._yielding = True
            v.request_stop("preempted at an exit")

    def _set_mode(self, v, mode) -> None:
        if v.mmu is not None:
            v.mmu.mode = mode

    def stats(self) -> dict:
        """Per vCPU: instructions retired and whether it is still running; the slice count."""
        m = self.machine
        return {"schedule": str(self.schedule), "slices": self.n_slices,
                "vcpus": [{"vcpu": v.index, "insns": v.insns, "running": v in self._runnable}
                          for v in m.vcpus]}

    def run(self, max_insns: int = 0):
        """Run until the VM's run ends; returns (Exit, the vCPU it came from)."""
        m = self.machine
        vcpus = m.vcpus
        self._runnable = runnable = list(vcpus)
        for v in runnable:
            self._set_mode(v, IN_GUEST_MODE)
        sched = self.schedule
        rng = self._rng
        vm = m.vm_mmu
        total = sum(v.insns for v in vcpus)
        nxt = 0                                   # rr: index into runnable
        try:
            while True:
                if sched.kind == "rr":
                    nxt %= len(runnable)
                    v = runnable[nxt]
                    q = sched.quantum
                else:
                    v = runnable[rng.randrange(len(runnable))]
                    q = rng.randint(1, sched.quantum)
                if max_insns:
                    left = max_insns - total
                    if left <= 0:
                        return Exit(ExitKind.RUNAWAY, crash=GuestCrash(
                            f"runaway: still running after --max-insns {max_insns} instructions "
                            f"(over {len(vcpus)} vCPUs)", rip=v.pc)), v
                    q = min(q, left)
                if vm is not None:
                    vm.running = v.mmu
                    v.mmu.enter_guest()           # KVM_REQ_MMU_RELOAD / KVM_REQ_MMU_SYNC
                    v.service_requests()          # KVM_REQ_TLB_FLUSH: a remote flush lands here
                m.current_vcpu = v
                before = v.insns
                self.current = v
                try:
                    ex = v.run_once(before + q)
                finally:
                    self.current = None
                ran = v.insns - before
                total += ran
                m.counters["guest_insns"] = total
                self.n_slices += 1
                kind = ex.kind
                if kind == ExitKind.RUNAWAY:
                    end = "quantum"
                elif kind == ExitKind.INTERRUPTED and self._yielding \
                        and stopping.pending() is None:
                    end = "exit"
                else:
                    end = kind.value
                self._yielding = False
                if self.record:
                    self.slices.append(Slice(v.index, before, ran, end))
                if end in ("quantum", "exit"):
                    if sched.kind == "rr":
                        nxt = runnable.index(v) + 1
                    continue
                if kind == ExitKind.HLT and v is not vcpus[0]:
                    # another vCPU halted or returned from main: it just stops
                    i = runnable.index(v)
                    runnable.remove(v)
                    self._set_mode(v, OUTSIDE_GUEST_MODE)
                    nxt = i
                    continue
                return ex, v
        finally:
            for v in vcpus:
                self._set_mode(v, OUTSIDE_GUEST_MODE)
            if vm is not None:
                vm.running = None
