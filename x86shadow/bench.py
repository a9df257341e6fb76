"""``x86shadow bench``: the shadow MMU against Unicorn's own MMU, measured side by side.

Every workload is a guest program in ``guestcode/bench/`` (self-checking: it prints PASS) whose size
is the assembler symbol ``N``. For each workload and mode the bench

1. assembles it with ``N`` (full size, or the small ``--quick`` size),
2. counts its guest instructions in one untimed ``--mmu native`` run with Unicorn's instruction
   counter (``Machine.run(max_insns)``: exact, a few times slower than an uncounted run),
3. makes one untimed, instrumented ``--mmu shadow`` run (warm-up; it also counts the TLB fills and
   the CR3 loads, which have no counter of their own),
4. times ``Machine.run()`` alone (not assembly, not machine creation) under ``--mmu shadow`` and
   ``--mmu native`` alternately -- A B A B, ``rounds`` times -- and keeps the medians.

Per-event costs come from differential measurements, never from timers inside the run: a workload
that repeats one kind of event is compared with a baseline that does the same minus that event (the
``idle`` workload, or a variant with the event switched off), and

    shadow us/event = (shadow_s(workload) - shadow_s(baseline)) / (events(workload) - events(baseline))

(likewise on native; the difference of the two is the shadow MMU's overhead per event). The events
are counted by the shadow run's counters (docs/COUNTERS.md) or by the instrumented run.

With ``--unsync both`` (policies with out-of-sync pages) every workload has two shadow
configurations, out-of-sync pages on and off, timed in the same rounds as one native run (on, off,
native, on, off, native ...); a side-by-side table shows, for each, the ratio to native, the exits,
the trapped and emulated page-table writes and the time per guest pte written. Ptes written per run
come from each workload's definition (``Workload.ptes``); a workload that counts them itself
(``fork``) reports its total through the marker port and must agree.

The JSON (``--json``) is docs/JSON_RECORDS.md: ``{"workloads": [row, ...]}`` with ``name``, ``guest_insns``,
``shadow_s``, ``native_s``, ``ratio``, ``exits``, ``us_per_exit``, ``unsync``, ``ptes_written``,
``us_per_pte`` per row, plus ``exit_costs``, ``meta`` and, with ``--unsync both``,
``unsync_compare``.

The host-memory part (x86shadow/bench_host.py: ``--host``, and after the workloads when none is
named) adds the key ``host``: the cost of a notifier invalidation per page, of a fault that races
one, and of aging per page, in both notifier eras.

``growth()`` is the growth sweep (``x86shadow bench --growth``, ``tools/growth.py``): cost and
shadow-MMU memory against the working set, the number of shadow pages and the guest RAM size.
``profile()`` runs cProfile over shadow runs (``x86shadow bench --profile``,
``tools/profile_bench.py``).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import resources

BENCH_DIR = resources.guestcode_dir() / "bench"
MODES = ("32", "pae", "64")


class BenchError(Exception):
    """Bad option or a workload that did not PASS: reported as 'x86shadow: error: ...'."""


# ---------------------------------------------------------------------------------------------
# exit kinds: how their events are counted, and the targets of issue 5

@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    target_us: float | None = None


KINDS = {
    "pf_fixed": Kind("pf_fixed", "shadow page fault (pf_fixed)", 15.0),
    "pf_guest": Kind("pf_guest", "guest #PF round trip (pf_guest)", 40.0),
    "pt_write": Kind("pt_write", "emulated pt write (insn_emulation)", 10.0),
    "cr3_switch": Kind("cr3_switch", "CR3 switch to a cached root", 10.0),
    "io": Kind("io", "I/O exit (io_exits)"),
    "tlb_fill": Kind("tlb_fill", "TLB refill, no exit (fill hook)"),
}
# the columns of the exit mix, in order
MIX = (("pf_fixed", "pf"), ("pf_guest", "#PF"), ("pt_write", "ptw"), ("cr3_switch", "cr3"),
       ("io", "io"), ("tlb_fill", "fills"))


def event_counts(counters: dict, fills, cr3) -> dict:
    """Events per exit kind of one shadow run (None: not counted)."""
    return {"pf_fixed": counters.get("pf_fixed", 0), "pf_guest": counters.get("pf_guest", 0),
            "pt_write": counters.get("insn_emulation", 0), "cr3_switch": cr3,
            "io": counters.get("io_exits", 0), "tlb_fill": fills}


# ---------------------------------------------------------------------------------------------
# workloads

@dataclass(frozen=True)
class Workload:
    name: str
    file: str
    n_full: int               # N for a full run: a shadow run takes ~0.5-2 s (mode 64, this machine)
    n_quick: int              # N for --quick
    what: str                 # what it stresses (one line)
    group: str = "main"       # main | micro (one exit kind) | baseline
    event: str | None = None  # the exit kind whose per-event cost it measures
    baseline: str | None = None
    symbols: dict = field(default_factory=dict)
    # the speed goal of issue 16 for this workload: shadow_s / native_s at most this, measured in
    # one run at full size (None: no goal); ``goal_unsync``: the goal is set for out-of-sync
    # pages on only (rows with them off show no goal)
    target_ratio: float | None = None
    goal_unsync: bool = False
    # leaf (4 KiB) guest ptes the program's own code writes in one run at size n: every set_pte,
    # pte_clear and locked read-modify-write of one pte counts once (a PAE entry's two halves are
    # one), upper-level and large-page entries are not counted. Read off the program's loops.
    ptes: Callable[[int], int] = lambda n: 0
    reports_ptes: bool = False  # the guest also reports its own count through MARKER_PORT

    @property
    def path(self) -> Path:
        return BENCH_DIR / self.file


WORKLOADS = (
    Workload("compute-tlb-friendly", "compute_tlb_friendly.asm", 4000, 10,
             "loads/stores + ALU over 4 pages: TLB hits only", target_ratio=0.3),
    Workload("store-heavy", "store_heavy.asm", 150, 2,
             "8 stores/iteration over 128 pages (fit in the TLB)", target_ratio=0.3),
    Workload("tlb-miss-heavy", "tlb_miss_heavy.asm", 500, 4,
             "512 pages 1 MiB apart: every access a TLB refill", event="tlb_fill", baseline="idle",
             ptes=lambda n: 512, target_ratio=2.0),
    Workload("demand-paging", "demand_paging.asm", 6000, 200,
             "guest #PF -> own handler maps the page -> iret -> retry", event="pf_guest",
             baseline="idle", ptes=lambda n: n, target_ratio=1.2),
    # 1024 parent ptes mapped, then per fork 1024 each: W cleared, child pte, child pte cleared,
    # W set again
    Workload("pt-writes-fork", "pt_writes_fork.asm", 40, 1,
             "fork: copy 1024 ptes (write-protect parent), child runs, teardown",
             ptes=lambda n: 1024 + 4 * 1024 * n, target_ratio=2.0, goal_unsync=True),
    # the formula is fork.asm's header's (M = 1024); the guest checks it and reports its count
    Workload("fork", "fork.asm", 8, 1,
             "fork + copy-on-write faults (guest #PF handler) + child exit, 1024 pages",
             ptes=lambda n: 1024 + n * 1024 * 17 // 4, reports_ptes=True),
    Workload("cr3-switch", "cr3_switch.asm", 3000, 40,
             "8 processes, CR3 load + 1 page touched per switch", event="cr3_switch",
             baseline="cr3-switch-base", symbols={"SWITCH": 1}, ptes=lambda n: 8,
             target_ratio=3.0),
    Workload("fault-in", "fault_in.asm", 131072, 1024,
             "each of N pre-mapped pages touched once: shadow faults", group="micro",
             event="pf_fixed", baseline="idle", ptes=lambda n: n, target_ratio=4.0),
    Workload("pte-write", "pte_write.asm", 20000, 200,
             "re-point a shadowed pte, invlpg, read through it", group="micro",
             event="pt_write", baseline="pte-write-base", symbols={"WRITE": 1},
             ptes=lambda n: 1 + n, target_ratio=20.0),
    Workload("io-loop", "io_loop.asm", 1000000, 2000,
             "out to an unused port in a loop", group="micro", event="io", baseline="idle"),
    Workload("cr3-switch-base", "cr3_switch.asm", 3000, 40,
             "cr3-switch without the CR3 loads", group="baseline", symbols={"SWITCH": 0},
             ptes=lambda n: 8),
    Workload("pte-write-base", "pte_write.asm", 20000, 200,
             "pte-write without the pte store (invlpg + read)", group="baseline",
             symbols={"WRITE": 0}, ptes=lambda n: 1),
    Workload("idle", "idle.asm", 1, 1, "boot and print PASS", group="baseline"),
)
BY_NAME = {w.name: w for w in WORKLOADS}


def select(names) -> list:
    """The workloads named (all when none), plus the baselines they are measured against."""
    if not names:
        return list(WORKLOADS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise BenchError(f"unknown workload {', '.join(map(repr, unknown))} (choose from "
                         f"{', '.join(w.name for w in WORKLOADS)})")
    want = set(names)
    for n in names:
        b = BY_NAME[n].baseline
        if b:
            want.add(b)
    return [w for w in WORKLOADS if w.name in want]


# ---------------------------------------------------------------------------------------------
# running one program

_asm_cache: dict = {}


def assemble(w: Workload, mode: str, n: int, ram_mib: int, extra: dict | None = None):
    from .asm import AsmError, assemble_firmware, assemble_program
    symbols = {"N": n, **w.symbols, **(extra or {})}
    key = (w.file, mode, ram_mib, tuple(sorted(symbols.items())))
    if key not in _asm_cache:
        try:
            prog = assemble_program(str(w.path), mode, ram_mib << 20, symbols=symbols)
            fw = assemble_firmware(mode, ram_mib << 20)
        except AsmError as e:
            raise BenchError(f"workload {w.name}: {e}") from None
        except OSError as e:
            raise BenchError(f"workload {w.name}: cannot read {e.filename}: {e.strerror}") from None
        _asm_cache[key] = (prog, fw)
    return _asm_cache[key]


@dataclass
class Run:
    seconds: float
    counters: dict
    fills: int | None = None         # instrumented runs only
    cr3: int | None = None
    machine: object = None           # kept only when asked (memory accounting)
    markers: list = field(default_factory=list)     # values the guest wrote to MARKER_PORT


def run_once(w: Workload, mode: str, mmu: str, prog_fw, *, ram_mib=128, policy="kvm",
             unsync=None,
             instrument=False, max_insns=0, keep=False, profiler=None, tlb="virtual") -> Run:
    """One fresh machine, one run; only ``Machine.run()`` is timed. Raises BenchError unless the
    guest ends with status 0 and PASS."""
    from .machine import Machine
    prog, fw = prog_fw
    try:
        m = Machine(mode, mmu=mmu, policy=policy, ram_mib=ram_mib, unsync=unsync,
                    tlb=tlb if mmu == "shadow" else "virtual")
    except ValueError as e:
        raise BenchError(str(e)) from None
    m.load(prog, fw)
    fills = [0]
    cr3 = [0]
    if instrument and m.vm_mmu is not None:
        # count TLB fills and CR3 loads from their events (untimed runs only: observing costs)
        from .events import CR3_LOAD, TLB_FILL

        def count_fill(_kind, _fields):
            fills[0] += 1

        def count_cr3(_kind, _fields):
            cr3[0] += 1
        m.events.subscribe(count_fill, (TLB_FILL,))
        m.events.subscribe(count_cr3, (CR3_LOAD,))
    gc.collect()
    if profiler is not None:
        profiler.enable()
    t0 = time.perf_counter()
    res = m.run(max_insns) if max_insns else m.run()
    t = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
    out = bytes(m.output)
    if res.status != 0 or not out.endswith(b"PASS\n"):
        tail = out[-300:].decode("latin-1").strip()
        raise BenchError(f"workload {w.name} (mode {mode}, --mmu {mmu}) failed: exit status "
                         f"{res.status}" + (f"; output: {tail!r}" if tail else "")
                         + (f"\n{res.report}" if res.report else ""))
    r = Run(t, dict(res.counters), markers=[v for v, _ in m.markers])
    if instrument and m.vm_mmu is not None:
        r.fills = fills[0] if fills[0] else None
        r.cr3 = cr3[0] if (cr3[0] or not r.counters.get("exits")) else None
    if keep:
        r.machine = m
    else:
        del m
    return r


def check_reported_ptes(w: Workload, n: int, r: Run, mode: str, what: str) -> None:
    """A workload that counts its own pte writes reports the total as its last marker: it must be
    what the workload's definition says for size n (else the definition is wrong)."""
    if not w.reports_ptes:
        return
    got = r.markers[-1] if r.markers else None
    if got != w.ptes(n):
        raise BenchError(f"workload {w.name} (mode {mode}, {what}): the guest reports "
                         f"{'no count' if got is None else f'{got} leaf pte writes'}, its "
                         f"definition says {w.ptes(n)}")


def count_insns(w: Workload, mode: str, n: int, ram_mib: int, policy: str, unsync=None):
    """Guest instructions of a native run at size n (Unicorn's counter)."""
    r = run_once(w, mode, "native", assemble(w, mode, n, ram_mib), ram_mib=ram_mib, policy=policy,
                 unsync=unsync,
                 max_insns=1 << 60)
    check_reported_ptes(w, n, r, mode, "--mmu native")
    return r.counters.get("guest_insns", 0)


# ---------------------------------------------------------------------------------------------
# the bench

def _median(xs):
    return statistics.median(xs) if xs else None


def _per_pte(seconds, ptes):
    return seconds / ptes * 1e6 if ptes and seconds is not None else None


PTES_METHOD = ("workload definition (x86shadow/bench.py: the leaf pte writes of the program's "
               "loops at size N)")
PTES_METHOD_REPORTED = PTES_METHOD + (", equal to the count the guest reports through the marker "
                                      "port (checked on every untimed run)")


@dataclass
class Result:
    w: Workload
    mode: str
    n: int
    guest_insns: int
    insns_method: str
    shadow: list
    native: list
    counters: dict           # of the last timed shadow run
    native_counters: dict
    fills: int | None
    cr3: int | None
    unsync: bool = False     # out-of-sync pages on in the shadow runs
    tlb: str = "virtual"     # how the shadow runs' translations reach the CPU (--tlb)
    us: dict = field(default_factory=dict)            # kind -> shadow us/event
    us_native: dict = field(default_factory=dict)     # kind -> native us/event
    us_overhead: dict = field(default_factory=dict)   # kind -> shadow - native us/event

    @property
    def shadow_s(self):
        return _median(self.shadow)

    @property
    def native_s(self):
        return _median(self.native)

    @property
    def ratio(self):
        return self.shadow_s / self.native_s if self.native_s else None

    @property
    def exits(self):
        return self.counters.get("exits", 0)

    @property
    def ptes(self) -> int:
        """Leaf guest ptes the workload writes in one run (its definition)."""
        return self.w.ptes(self.n)

    @property
    def us_per_pte(self):
        return _per_pte(self.shadow_s, self.ptes)

    @property
    def native_us_per_pte(self):
        return _per_pte(self.native_s, self.ptes)

    def events(self):
        return event_counts(self.counters, self.fills, self.cr3)


def unsync_variants(policy, unsync) -> tuple:
    """The shadow configurations to run: (None,) for the policy's default, (True,) / (False,) for
    --unsync on / off, (True, False) for --unsync both (policies with out-of-sync pages only)."""
    from .policies import UNSYNC_POLICIES
    if unsync == "both":
        if policy not in UNSYNC_POLICIES:
            raise BenchError(f"--unsync both compares out-of-sync pages on and off; policy "
                             f"{policy!r} has none (--unsync both is for "
                             f"{', '.join(UNSYNC_POLICIES)})")
        return (True, False)
    return (unsync,)


def run_bench(*, modes=("64",), names=(), rounds=3, quick=False, ram_mib=128, policy="kvm",
              unsync=None,
              log=None, tlb="virtual") -> list:
    """Run the selected workloads; returns a list of Result (one per workload, mode and shadow
    configuration: two with ``unsync="both"``, whose shadow runs with out-of-sync pages on and off
    alternate with one native run per round, A B C A B C ...)."""
    log = log or (lambda msg: None)
    if rounds < 1:
        raise BenchError("--rounds must be at least 1")
    tlbs = tlb_variants(tlb)
    if len(tlbs) > 1 and unsync == "both":
        raise BenchError("give --tlb both or --unsync both, not both at once")
    # the shadow configurations, each run once per round: (unsync, tlb)
    variants = tuple((u, t) for u in unsync_variants(policy, unsync) for t in tlbs)
    both = unsync == "both"
    wls = select(names)
    results = []
    for mode in modes:
        for w in wls:
            n = w.n_quick if quick else w.n_full
            log(f"[{mode}] {w.name} (N={n}): counting")
            prog_fw = assemble(w, mode, n, ram_mib)
            insns = count_insns(w, mode, n, ram_mib, policy, None if both else unsync)
            method = "Unicorn's instruction counter, one --mmu native run at N"
            warm = {}
            for v in variants:
                warm[v] = run_once(w, mode, "shadow", prog_fw, ram_mib=ram_mib, policy=policy,
                                   unsync=v[0], instrument=True, tlb=v[1])
                check_reported_ptes(w, n, warm[v], mode, "--mmu shadow" + _unsync_label(v[0])
                                    + ("" if v[1] == "virtual" else f" --tlb {v[1]}"))
            shadow = {v: [] for v in variants}
            last_s = {}
            native = []
            last_n = None
            for r in range(rounds):
                log(f"[{mode}] {w.name}: round {r + 1}/{rounds}")
                for v in variants:
                    last_s[v] = run_once(w, mode, "shadow", prog_fw, ram_mib=ram_mib,
                                         policy=policy, unsync=v[0], tlb=v[1])
                    shadow[v].append(last_s[v].seconds)
                last_n = run_once(w, mode, "native", prog_fw, ram_mib=ram_mib, policy=policy)
                native.append(last_n.seconds)
            for v in variants:
                results.append(Result(w, mode, n, insns, method, shadow[v], native,
                                      last_s[v].counters, last_n.counters, warm[v].fills,
                                      warm[v].cr3, unsync=_unsync_on(policy, v[0]), tlb=v[1]))
    derive_costs(results)
    return results


def tlb_variants(tlb) -> tuple:
    """The --tlb values the shadow runs use: "both" is the fill hook and the walker side by
    side (each run once per round, alternating with the native run)."""
    from .machine import TLBS
    if tlb == "both":
        return TLBS
    if tlb not in TLBS:
        raise BenchError(f"unknown --tlb {tlb!r} ({', '.join(TLBS)} or both)")
    return (tlb,)


def _unsync_label(v) -> str:
    return "" if v is None else f" --unsync {'on' if v else 'off'}"


def derive_costs(results) -> None:
    """Per-event costs by differential measurement against each workload's baseline (measured in
    the same mode and shadow configuration)."""
    by = {(r.w.name, r.mode, r.unsync, r.tlb): r for r in results}
    for r in results:
        if not r.w.event or not r.w.baseline:
            continue
        b = by.get((r.w.baseline, r.mode, r.unsync, r.tlb))
        if b is None:
            continue
        k = r.w.event
        ea, eb = r.events()[k], b.events()[k]
        if ea is None or eb is None or ea - eb <= 0:
            continue
        d = ea - eb
        s = (r.shadow_s - b.shadow_s) / d * 1e6
        nat = (r.native_s - b.native_s) / d * 1e6
        r.us[k], r.us_native[k], r.us_overhead[k] = s, nat, s - nat


def exit_costs(results) -> list:
    """One entry per measured exit kind, mode and shadow configuration, plus the ratio targets."""
    out = []
    for r in results:
        for k, us in r.us.items():
            kind = KINDS[k]
            b = r.w.baseline
            out.append({"kind": k, "label": kind.label, "mode": r.mode, "measured_by": r.w.name,
                        "baseline": b, "events": r.events()[k],
                        "shadow_us": round(us, 3), "native_us": round(r.us_native[k], 3),
                        "overhead_us": round(r.us_overhead[k], 3), "target_us": kind.target_us,
                        "met": None if kind.target_us is None else us <= kind.target_us,
                        "unsync": r.unsync, "tlb": r.tlb})
    for r in results:
        goal = ratio_goal(r)
        if goal is not None:
            out.append({"kind": "ratio", "label": f"{r.w.name} shadow/native", "mode": r.mode,
                        "measured_by": r.w.name, "ratio": round(r.ratio, 3),
                        "target_ratio": goal, "met": r.ratio <= goal, "unsync": r.unsync,
                        "tlb": r.tlb})
    return out


def ratio_goal(r):
    """The ratio goal that applies to result row r (None: none; a goal set for out-of-sync pages
    on does not apply to a row with them off)."""
    w = r.w
    if w.target_ratio is None or (w.goal_unsync and not r.unsync):
        return None
    return w.target_ratio


# what the on/off comparison shows of each shadow configuration's counters
COMPARE_COUNTERS = ("wp_faults", "insn_emulation", "mmu_unprotect", "mmu_flooded",
                    "mmu_unsync_events", "mmu_sync_pages", "pf_fixed", "pf_guest", "invlpg")


def unsync_pairs(results) -> list:
    """(on, off) Result pairs of the same workload and mode, in run order (--unsync both)."""
    on = {}
    pairs = []
    for r in results:
        key = (r.w.name, r.mode)
        if r.unsync:
            on[key] = r
        elif key in on:
            pairs.append((on.pop(key), r))
    return pairs


def _side(r) -> dict:
    return {"shadow_s": _r(r.shadow_s), "ratio": _r(r.ratio, 3), "exits": r.exits,
            "us_per_pte": _r(r.us_per_pte, 3),
            "counters": {k: r.counters.get(k, 0) for k in COMPARE_COUNTERS}}


def unsync_compare(results) -> list:
    """The side-by-side record of --unsync both (docs/JSON_RECORDS.md)."""
    out = []
    for on, off in unsync_pairs(results):
        out.append({"name": on.w.name, "mode": on.mode, "n": on.n, "ptes_written": on.ptes,
                    "ptes_written_method": PTES_METHOD_REPORTED if on.w.reports_ptes
                    else PTES_METHOD,
                    "native_s": _r(on.native_s), "native_us_per_pte": _r(on.native_us_per_pte, 3),
                    "on": _side(on), "off": _side(off),
                    "off_over_on": _r(off.shadow_s / on.shadow_s, 3) if on.shadow_s else None})
    return out


def _unsync_on(policy, unsync) -> bool:
    """Whether the shadow runs had out-of-sync pages (the policy's default when not chosen)."""
    from .policies import make_policy
    return bool(make_policy(policy, unsync).unsync)


def _r(x, nd=6):
    return None if x is None else round(x, nd)


def to_json(results, *, rounds, quick, policy, ram_mib, unsync=None) -> dict:
    rows = []
    for r in results:
        goal = ratio_goal(r)
        us = {k: _r(v, 3) for k, v in r.us.items()}
        n_exits = r.exits
        # mean overhead per exit over the whole run (meaningless with few exits: left out)
        us["all"] = (_r((r.shadow_s - r.native_s) / n_exits * 1e6, 3) if n_exits >= 1000 else None)
        rows.append({
            "name": r.w.name, "mode": r.mode, "group": r.w.group, "stresses": r.w.what, "n": r.n,
            "guest_insns": r.guest_insns, "guest_insns_method": r.insns_method,
            "shadow_s": _r(r.shadow_s), "native_s": _r(r.native_s), "ratio": _r(r.ratio, 3),
            "exits": n_exits, "native_exits": r.native_counters.get("exits", 0),
            "us_per_exit": us,
            "us_per_exit_native": {k: _r(v, 3) for k, v in r.us_native.items()},
            "us_per_exit_overhead": {k: _r(v, 3) for k, v in r.us_overhead.items()},
            "events": r.events(), "baseline": r.w.baseline,
            "shadow_runs_s": [_r(x) for x in r.shadow], "native_runs_s": [_r(x) for x in r.native],
            "counters": r.counters,
            "unsync": r.unsync,
            "tlb": r.tlb,
            "ptes_written": r.ptes,
            "ptes_written_method": PTES_METHOD_REPORTED if r.w.reports_ptes else PTES_METHOD,
            "us_per_pte": _r(r.us_per_pte, 3), "native_us_per_pte": _r(r.native_us_per_pte, 3),
            "goal_ratio": goal,
            "goal_met": None if goal is None else r.ratio <= goal,
        })
    doc = {
        "workloads": rows,
        "exit_costs": exit_costs(results),
        "meta": {
            "rounds": rounds, "quick": quick, "policy": policy, "ram_mib": ram_mib,
            "unsync": "both" if unsync == "both" else _unsync_on(policy, unsync),
            "tlb": "both" if len({r.tlb for r in results}) > 1 else
                   (results[0].tlb if results else "virtual"),
            "timing": "wall time of Machine.run() only (no assembly, no machine creation); "
                      "medians of the rounds, shadow and native runs alternating",
            "us_per_exit": "shadow us per event = (shadow_s - shadow_s(baseline)) / "
                           "(events - events(baseline)); 'all' = (shadow_s - native_s) / exits",
            "us_per_pte": "shadow_s (native_s) / ptes_written x 1e6: the whole run's time per leaf "
                          "guest pte the workload writes",
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(),
            # other load on the machine inflates every time (2 shared cores here): keep it in view
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
            else None,
        },
    }
    if unsync == "both":
        doc["unsync_compare"] = unsync_compare(results)
    if doc["meta"]["tlb"] == "both":
        doc["tlb_compare"] = tlb_compare(results)
    return doc


# ---------------------------------------------------------------------------------------------
# printing

def _fmt_count(v):
    if v is None:
        return "n/a"
    v = float(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{int(v)}"


def _fmt_us(v):
    return "-" if v is None else (f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}")


def _console(file=None):
    from rich.console import Console
    f = file or sys.stdout
    width = None
    if not f.isatty():
        width = 200
    return Console(file=f, width=width, highlight=False, soft_wrap=False)


def _on_off(v) -> str:
    return "on" if v else "off"


def print_results(results, *, rounds, quick, file=None) -> None:
    from rich.table import Table
    con = _console(file)
    pairs = unsync_pairs(results)
    both = bool(pairs)
    t = Table(title=f"x86shadow bench: shadow MMU vs Unicorn's own MMU (medians of {rounds} "
                    f"round{'s' if rounds != 1 else ''}{', --quick' if quick else ''})",
              title_justify="left")
    cols = [("workload", "left"), ("mode", "left"), ("N", "right"), ("guest insns", "right"),
            ("shadow s", "right"), ("native s", "right"), ("ratio", "right"), ("goal", "left"),
            ("exits", "right"), ("exit mix (shadow)", "left"), ("us/exit by kind", "left")]
    if both:
        cols.insert(2, ("unsync", "left"))
    tlb_col = any(r.tlb != "virtual" for r in results)
    if tlb_col:
        cols.insert(2, ("tlb", "left"))
    for col, j in cols:
        t.add_column(col, justify=j, no_wrap=True)
    for r in results:
        ev = r.events()
        mix = " ".join(f"{lab} {_fmt_count(ev[k])}" for k, lab in MIX if ev[k])
        if r.us:
            usk = " ".join(f"{k} {_fmt_us(v)}" for k, v in r.us.items())
        elif r.exits >= 1000:
            usk = f"all {_fmt_us((r.shadow_s - r.native_s) / r.exits * 1e6)}"
        else:
            usk = "-"
        name = r.w.name if r.w.group == "main" else f"{r.w.name} ({r.w.group})"
        goal = ratio_goal(r)
        goal_cell = "-" if goal is None else f"<= {goal:g} {'met' if r.ratio <= goal else 'NOT met'}"
        cells = [name, r.mode, _fmt_count(r.n), _fmt_count(r.guest_insns), f"{r.shadow_s:.3f}",
                 f"{r.native_s:.3f}", f"{r.ratio:.2f}", goal_cell, _fmt_count(r.exits),
                 mix or "-", usk]
        if both:
            cells.insert(2, _on_off(r.unsync))
        if tlb_col:
            cells.insert(2, r.tlb)
        t.add_row(*cells)
    con.print(t)
    if both:
        print_unsync_compare(pairs, con)
    tlb_pairs = tlb_compare(results)
    if tlb_pairs:
        print_tlb_compare(tlb_pairs, con)
    # the per-event costs (the ratio goals are the first table's goal column)
    costs = [c for c in exit_costs(results) if c["kind"] != "ratio"]
    if costs:
        t2 = Table(title="Exit costs and targets (us per event, differential: workload - baseline)",
                   title_justify="left")
        cols = [("what", "left"), ("mode", "left"), ("measured by", "left"), ("events", "right"),
                ("shadow", "right"), ("native", "right"), ("shadow-native", "right"),
                ("target", "right"), ("met", "left")]
        if both:
            cols.insert(2, ("unsync", "left"))
        if tlb_col:
            cols.insert(2, ("tlb", "left"))
        for col, j in cols:
            t2.add_column(col, justify=j, no_wrap=True)
        for c in costs:
            cells = [c["label"], c["mode"], f"{c['measured_by']} - {c['baseline']}",
                     _fmt_count(c["events"]), _fmt_us(c["shadow_us"]),
                     _fmt_us(c["native_us"]), _fmt_us(c["overhead_us"]),
                     "-" if c["target_us"] is None else f"<= {c['target_us']:g}",
                     "-" if c["met"] is None else ("yes" if c["met"] else "NO")]
            if both:
                cells.insert(2, _on_off(c["unsync"]))
            if tlb_col:
                cells.insert(2, c["tlb"])
            t2.add_row(*cells)
        con.print(t2)
    if hasattr(os, "getloadavg"):
        con.print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
                  "(other load inflates the times; per-event costs most)")
    con.print("guest insns: Unicorn's instruction counter (Machine.run(max_insns)), one untimed "
              "--mmu native run per workload at N.  Timing: Machine.run() only.  us/exit: "
              "shadow-side cost per event of the kind the row measures, from the difference to "
              "its baseline (table below); 'all' = (shadow_s - native_s) / exits.  goal: "
              "the speed goal of issue 16 (shadow/native at full size; a --quick run means "
              "little).")


def tlb_compare(results) -> list:
    """--tlb both: per workload and mode, the fill hook's and the walker's ratio side by side
    (each against the native runs of the same rounds) and the goal."""
    virt = {(r.w.name, r.mode): r for r in results if r.tlb == "virtual"}
    out = []
    for r in results:
        v = virt.get((r.w.name, r.mode)) if r.tlb == "walker" else None
        if v is None:
            continue
        goal = ratio_goal(v)
        out.append({"name": r.w.name, "mode": r.mode, "goal_ratio": goal,
                    "virtual_ratio": _r(v.ratio, 3), "walker_ratio": _r(r.ratio, 3),
                    "virtual_met": None if goal is None else v.ratio <= goal,
                    "walker_met": None if goal is None else r.ratio <= goal,
                    "walker_over_virtual": _r(r.shadow_s / v.shadow_s, 3) if v.shadow_s else None,
                    "virtual_exits": v.exits, "walker_exits": r.exits})
    return out


def print_tlb_compare(rows, con) -> None:
    from rich.table import Table
    t = Table(title="--tlb both: the fill hook (virtual) and Unicorn's walker over the shadow "
                    "tables (walker), same rounds, same native runs", title_justify="left")
    for col, j in (("workload", "left"), ("mode", "left"), ("goal", "left"),
                   ("virtual: ratio", "right"), ("walker: ratio", "right"),
                   ("walker s / virtual s", "right"), ("exits virtual / walker", "right")):
        t.add_column(col, justify=j, no_wrap=True)

    def cell(ratio, met):
        return f"{ratio:.2f}" + ("" if met is None else (" met" if met else " NOT met"))
    for c in rows:
        t.add_row(c["name"], c["mode"], "-" if c["goal_ratio"] is None else f"<= {c['goal_ratio']:g}",
                  cell(c["virtual_ratio"], c["virtual_met"]), cell(c["walker_ratio"], c["walker_met"]),
                  "-" if c["walker_over_virtual"] is None else f"{c['walker_over_virtual']:.2f}",
                  f"{_fmt_count(c['virtual_exits'])} / {_fmt_count(c['walker_exits'])}")
    con.print(t)


def print_unsync_compare(pairs, con) -> None:
    """--unsync both: one row per workload and mode, out-of-sync pages on and off side by side."""
    from rich.table import Table
    t = Table(title="Out-of-sync pages on vs off (same guest, same run; native measured once)",
              title_justify="left")
    cols = [("workload", "left"), ("mode", "left"), ("ptes written", "right"),
            ("native s", "right"), ("native us/pte", "right")]
    for side in ("on", "off"):
        cols += [(f"{side}: ratio", "right"), (f"{side}: exits", "right"),
                 (f"{side}: trapped/emulated", "right"), (f"{side}: us/pte", "right")]
    cols.append(("off/on", "right"))
    for col, j in cols:
        t.add_column(col, justify=j, no_wrap=True)
    for on, off in pairs:
        cells = [on.w.name, on.mode, _fmt_count(on.ptes) if on.ptes else "-",
                 f"{on.native_s:.3f}", _fmt_us(on.native_us_per_pte)]
        for r in (on, off):
            cells += [f"{r.ratio:.2f}", _fmt_count(r.exits),
                      f"{_fmt_count(r.counters.get('wp_faults', 0))}/"
                      f"{_fmt_count(r.counters.get('insn_emulation', 0))}",
                      _fmt_us(r.us_per_pte)]
        cells.append(f"{off.shadow_s / on.shadow_s:.2f}" if on.shadow_s else "-")
        t.add_row(*cells)
    con.print(t)
    con.print("ptes written: leaf guest ptes the workload writes per run (its definition in "
              "x86shadow/bench.py; fork also reports its own count, which must agree).  us/pte: "
              "the run's median time / ptes written.  trapped/emulated: stores to write-protected "
              "page tables (wp_faults) / emulated (insn_emulation).  off/on: shadow time with "
              "out-of-sync pages off over on.")


# ---------------------------------------------------------------------------------------------
# shadow-MMU memory accounting

def _deep_size(roots) -> int:
    """Bytes of the objects reachable from roots through containers and the shadow MMU's own
    __slots__ objects (x86shadow.mmu classes), each counted once. Small ints are shared by the
    interpreter and left out; anything else (the MMU object, guest RAM, callables) is not entered."""
    seen = set()
    total = 0
    stack = list(roots)
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (bool, str, float)):
            continue
        if type(o) is int and -5 <= o <= 256:
            continue
        i = id(o)
        if i in seen:
            continue
        if isinstance(o, (int, dict, list, tuple, set, frozenset)):
            seen.add(i)
            total += sys.getsizeof(o)
            if isinstance(o, dict):
                stack.extend(o.keys())
                stack.extend(o.values())
            elif not isinstance(o, int):
                stack.extend(o)
        elif type(o).__module__.startswith("x86shadow.mmu") and hasattr(type(o), "__slots__"):
            seen.add(i)
            total += sys.getsizeof(o)
            for cls in type(o).__mro__:
                for s in getattr(cls, "__slots__", ()):
                    v = getattr(o, s, None)
                    if v is not None:
                        stack.append(v)
    return total


def mmu_memory(mmu) -> dict:
    """Bytes held by the shadow MMU's structures: shadow pages (sptes, children, parent links,
    roles), the (gfn, role) hash, the rmap and the per-gfn indexes."""
    pages = list(mmu.hash.values())
    sp_bytes = _deep_size(pages)
    roots = [v.root for v in mmu.vcpus]
    total = _deep_size([mmu.hash, mmu.rmap, mmu.write_track, mmu.sps_by_gfn, roots])
    rmap_bytes = total - _deep_size([mmu.hash, mmu.write_track, mmu.sps_by_gfn, roots])
    leaf = sum(1 for sp in pages if sp.role.level == 1 for e in sp.spt if e & 1)
    return {"shadow_pages": len(pages), "leaf_sptes": leaf, "bytes": total,
            "shadow_page_bytes": sp_bytes, "rmap_bytes": rmap_bytes,
            "bytes_per_shadow_page": total / len(pages) if pages else None,
            "bytes_per_leaf_spte": total / leaf if leaf else None}


# ---------------------------------------------------------------------------------------------
# growth sweep

def growth(*, mode="64", quick=False, rounds=1, policy="kvm", unsync=None, log=None,
           tracemalloc_check=False):
    """Cost and shadow-MMU memory against working set, shadow pages and guest RAM (fault-in)."""
    log = log or (lambda msg: None)
    w = BY_NAME["fault-in"]
    idle = BY_NAME["idle"]
    if quick:
        plan = [("working set", 128, n, 0x1000) for n in (1024, 4096)] + \
               [("shadow pages", 128, n, 0x200000) for n in (64, 256)] + \
               [("guest RAM", ram, 1024, 0x1000) for ram in (64, 256)]
    else:
        plan = [("working set", 128, n, 0x1000) for n in (1024, 4096, 16384, 65536, 262144)] + \
               [("shadow pages", 1024, n, 0x200000) for n in (64, 256, 1024, 4096)] + \
               [("guest RAM", ram, 16384, 0x1000) for ram in (64, 256, 1024, 4096)]
    if mode != "64":
        # 2 MiB apart in 32-bit address spaces: at most ~1.5k pages above BENCH_WIN
        plan = [p for p in plan if p[0] != "shadow pages" or p[2] <= 1024]
    idle_cache = {}
    rows = []
    for sweep, ram, n, stride in plan:
        log(f"[growth {mode}] {sweep}: N={n} stride={stride:#x} RAM={ram} MiB")
        if ram not in idle_cache:
            pf = assemble(idle, mode, 1, ram)
            idle_cache[ram] = (_median([run_once(idle, mode, "shadow", pf, ram_mib=ram,
                                                 policy=policy, unsync=unsync).seconds
                                        for _ in range(3)]),
                               _median([run_once(idle, mode, "native", pf, ram_mib=ram,
                                                 policy=policy, unsync=unsync).seconds for _ in range(3)]))
        s0, n0 = idle_cache[ram]
        pf = assemble(w, mode, n, ram, {"STRIDE": stride})
        shadow, native = [], []
        mem = None
        counters = None
        create = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            r = run_once(w, mode, "shadow", pf, ram_mib=ram, policy=policy, unsync=unsync, keep=True)
            create.append(time.perf_counter() - t0 - r.seconds)
            shadow.append(r.seconds)
            if mem is None:
                mem = mmu_memory(r.machine.vm_mmu)
                mem["max_pages"] = r.machine.vm_mmu.max_pages
            counters = r.counters
            r.machine = None
            native.append(run_once(w, mode, "native", pf, ram_mib=ram, policy=policy).seconds)
        row = {"sweep": sweep, "mode": mode, "ram_mib": ram, "pages": n, "stride": stride,
               "shadow_s": _median(shadow), "native_s": _median(native),
               "machine_create_s": _median(create),
               "pf_fixed": counters["pf_fixed"], "mmu_recycled": counters["mmu_recycled"],
               "mmu_cache_miss": counters["mmu_cache_miss"], **mem}
        pfx = counters["pf_fixed"]
        row["us_per_fault"] = (row["shadow_s"] - s0) / pfx * 1e6 if pfx else None
        # the shadow MMU's own share: minus what the same guest work costs on native
        row["overhead_us_per_fault"] = (((row["shadow_s"] - s0) - (row["native_s"] - n0)) / pfx * 1e6
                                        if pfx else None)
        row["native_us_per_page"] = (row["native_s"] - n0) / n * 1e6
        if tracemalloc_check:
            row["tracemalloc_bytes"] = _tracemalloc_run(w, mode, pf, ram, policy, unsync)
        rows.append(row)
    return rows


def _tracemalloc_run(w, mode, pf, ram, policy, unsync):
    """Python memory still held after a shadow run by everything the machine allocated, guest RAM
    left out (tracemalloc): a cross-check of the getsizeof accounting, which it should slightly
    exceed (it also counts the vCPU's code-page scans, decode caches and the like)."""
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        r = run_once(w, mode, "shadow", pf, ram_mib=ram, policy=policy, unsync=unsync, keep=True)
        gc.collect()
        # the guest RAM buffer (ctypes) is traced too: leave it out
        held = tracemalloc.get_traced_memory()[0] - base - r.machine.mem.size
        r.machine = None
    finally:
        tracemalloc.stop()
    return held


def print_growth(rows, file=None) -> None:
    from rich.table import Table
    con = _console(file)
    t = Table(title="Growth: fault-in (each page touched once) -- cost and shadow-MMU memory",
              title_justify="left")
    cols = ("sweep", "mode", "RAM MiB", "pages", "stride", "shadow pages", "max pages", "recycled",
            "shadow s", "native s", "us/fault", "minus native", "create s", "MMU MiB",
            "B/shadow page", "B/leaf spte")
    for c in cols:
        t.add_column(c, justify="left" if c in ("sweep", "mode") else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["sweep"], r["mode"], str(r["ram_mib"]), _fmt_count(r["pages"]),
                  "4K" if r["stride"] == 0x1000 else f"{r['stride'] >> 20}M",
                  str(r["shadow_pages"]), str(r["max_pages"]), str(r["mmu_recycled"]),
                  f"{r['shadow_s']:.3f}", f"{r['native_s']:.3f}", _fmt_us(r["us_per_fault"]),
                  _fmt_us(r["overhead_us_per_fault"]), f"{r['machine_create_s']:.3f}", f"{r['bytes'] / 2**20:.2f}",
                  f"{r['bytes_per_shadow_page']:.0f}" if r["bytes_per_shadow_page"] else "-",
                  f"{r['bytes_per_leaf_spte']:.0f}" if r["bytes_per_leaf_spte"] else "-")
    con.print(t)
    con.print("us/fault = (shadow_s - shadow_s(idle)) / pf_fixed; minus native = the same minus "
              "(native_s - native_s(idle)) / pf_fixed (the guest's own work taken out).  Memory: "
              "sys.getsizeof over every object the shadow MMU holds after the run (shadow pages "
              "with sptes, children, parent links and roles; the (gfn, role) hash; the rmap).")
    if any("tracemalloc_bytes" in r for r in rows):
        con.print("tracemalloc (MiB still held after the run, guest RAM left out): " + ", ".join(
            f"{_fmt_count(r['pages'])} pages/{r['ram_mib']} MiB: {r['tracemalloc_bytes'] / 2**20:.2f}"
            for r in rows if "tracemalloc_bytes" in r))


# ---------------------------------------------------------------------------------------------
# profile

PROFILE_DEFAULT = ("tlb-miss-heavy", "demand-paging", "cr3-switch", "pte-write", "fault-in",
                   "pt-writes-fork")


def profile(*, mode="64", names=PROFILE_DEFAULT, quick=False, policy="kvm", unsync=None, top=20,
            log=None) -> dict:
    """cProfile over one shadow run of each workload; returns {name: [(function, tottime %,
    cumtime %, calls), ...]} sorted by own time."""
    import cProfile
    import pstats
    log = log or (lambda msg: None)
    out = {}
    for name in names:
        if name not in BY_NAME:
            raise BenchError(f"unknown workload {name!r}")
        w = BY_NAME[name]
        n = w.n_quick if quick else w.n_full
        pf = assemble(w, mode, n, 128)
        run_once(w, mode, "shadow", pf, policy=policy, unsync=unsync)  # warm-up
        log(f"[profile {mode}] {name} (N={n})")
        prof = cProfile.Profile()
        r = run_once(w, mode, "shadow", pf, policy=policy, unsync=unsync, profiler=prof)
        st = pstats.Stats(prof)
        total = sum(v[2] for v in st.stats.values()) or 1.0     # sum of own times
        rows = []
        for (fn, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
            where = f"{os.path.basename(fn)}:{line}" if fn != "~" else "(builtin)"
            rows.append((f"{func} [{where}]", 100 * tt / total, 100 * ct / total, nc))
        rows.sort(key=lambda x: -x[1])
        out[name] = {"wall_s": r.seconds, "top": rows[:top]}
    return out


def print_profile(prof, file=None) -> None:
    from rich.markup import escape
    from rich.table import Table
    con = _console(file)
    for name, p in prof.items():
        t = Table(title=f"{name}: shadow run under cProfile ({p['wall_s']:.2f} s with the profiler "
                        f"on; % of profiled time)", title_justify="left")
        for c in ("function", "own %", "cum %", "calls"):
            t.add_column(c, justify="left" if c == "function" else "right", no_wrap=True)
        for fn, own, cum, calls in p["top"]:
            t.add_row(escape(fn), f"{own:.1f}", f"{cum:.1f}", _fmt_count(calls))
        con.print(t)


# ---------------------------------------------------------------------------------------------
# command line (called from x86shadow.cli)

def parse_modes(modes) -> tuple:
    out = []
    for m in modes or ["64"]:
        for x in (MODES if m == "all" else (m,)):
            if x not in MODES:
                raise BenchError(f"unknown mode {x!r} (choose from 32, pae, 64, all)")
            if x not in out:
                out.append(x)
    return tuple(out)


def parts(args) -> tuple:
    """(run the workloads, run the host-memory part) for these options: ``--host`` alone is the
    host part only, with ``--workload`` those workloads too; neither: every workload, then the host
    part (left out with ``--unsync both``, which compares the workloads' two configurations)."""
    host = getattr(args, "host", False)
    if host and (args.growth or args.profile):
        raise BenchError("--host is a part of the bench, not of --growth or --profile")
    if host and args.unsync == "both":
        raise BenchError("--host runs one shadow configuration: give --unsync on or off, not "
                         "both")
    return (not host or bool(args.workload),
            host or (not args.workload and args.unsync != "both"))


def main(args) -> int:
    modes = parse_modes(args.mode)
    tlb = getattr(args, "tlb", "virtual")
    if tlb != "virtual" and (args.growth or args.profile or args.host):
        raise BenchError(f"--tlb {tlb} times the workloads only (not --growth, --profile, "
                         "--host)")
    if args.ram < 64:
        raise BenchError("--ram must be at least 64 (MiB)")
    if args.unsync == "both":
        if args.growth or args.profile:
            raise BenchError("--unsync both is for the side-by-side bench, not --growth or "
                             "--profile (give --unsync on or off)")
        unsync_variants(args.policy, "both")    # a policy with out-of-sync pages
    run_workloads, run_host = parts(args)
    if tlb != "virtual":
        run_host = False                        # (the host part needs a host memory manager)
    from .progress import progress
    with progress(None, "bench", args.quiet) as bar:
        def log(msg):
            bar.log(msg)
            bar.describe(msg)
        return _main(args, modes, run_workloads, run_host, log)


def _main(args, modes, run_workloads, run_host, log) -> int:
    tlb = getattr(args, "tlb", "virtual")
    if args.json:
        from .outputs import OutputError, check_writable
        try:
            check_writable(args.json, "JSON")
        except OutputError as e:
            raise BenchError(str(e)) from None
    if args.growth:
        rows = []
        for mode in modes:
            rows += growth(mode=mode, quick=args.quick, rounds=args.rounds if args.rounds else 1,
                           policy=args.policy, unsync=args.unsync, log=log,
                           tracemalloc_check=args.tracemalloc)
        print_growth(rows)
        doc = {"growth": rows}
    elif args.profile:
        prof = {}
        for mode in modes:
            p = profile(mode=mode, names=args.workload or PROFILE_DEFAULT, quick=args.quick,
                        policy=args.policy, unsync=args.unsync, log=log, top=args.top)
            prof.update({f"{k} ({mode})": v for k, v in p.items()})
        print_profile(prof)
        doc = {"profile": {k: {"wall_s": v["wall_s"],
                               "top": [{"function": f, "own_pct": round(o, 2), "cum_pct": round(c, 2),
                                        "calls": n} for f, o, c, n in v["top"]]}
                           for k, v in prof.items()}}
    else:
        rounds = args.rounds if args.rounds else (1 if args.quick else 3)
        doc = {}
        if run_workloads:
            results = run_bench(modes=modes, names=args.workload or (), rounds=rounds,
                                quick=args.quick, ram_mib=args.ram, policy=args.policy,
                                unsync=args.unsync, log=log, tlb=tlb)
            print_results(results, rounds=rounds, quick=args.quick)
            doc = to_json(results, rounds=rounds, quick=args.quick, policy=args.policy,
                          ram_mib=args.ram, unsync=args.unsync)
        if run_host:
            from . import bench_host
            hb = bench_host.run_host_bench(modes=modes, rounds=rounds, quick=args.quick,
                                           ram_mib=args.ram, policy=args.policy,
                                           unsync=args.unsync, log=log)
            doc["host"] = bench_host.to_json(hb, policy=args.policy,
                                             unsync=_unsync_on(args.policy, args.unsync),
                                             ram_mib=args.ram)
            bench_host.print_host(doc["host"])
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
        except OSError as e:
            raise BenchError(f"cannot write {args.json!r}: {e.strerror}") from None
    return 0
