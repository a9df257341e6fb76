"""The host-memory part of ``x86shadow bench`` (``--host``): what the host's memory management costs
the shadow MMU and the guest (issue 12).

Every run is a guest under ``--mmu shadow`` with host memory (``HostConfig``), in each notifier
era (``notifiers="2008"`` and ``"modern"``), alternating variant by variant within a round (A B C
... A B C ...), medians over the rounds. Three measurements:

1. **A notifier invalidation, per invalidated page.** The guest ``host-pages``
   (``guestcode/bench/host_pages.asm``) maps a working set of pages, faults each in once, then
   reads them pass after pass, with an I/O exit after each page. The host schedule
   (``memory/schedule.py``) swaps out or migrates one page every ``every`` exits (rules
   ``swap:E`` / ``migrate:E``); the bench narrows the schedule's candidates to the working-set
   pages the shadow MMU maps (the schedule still draws them from its seed). The host's side is
   timed inside the run with ``perf_counter`` around each call: the host operation
   (``HostMM.swap_out`` / ``migrate``) and, inside it, the notifier calls
   (``KvmNotifier.invalidate_page`` / ``invalidate_range_start`` / ``_end``: the zap through the
   rmap and the TLB flush); host part = operation - notifier (the page-table change, the
   writeback or copy, the free with its poison). What the guest pays afterwards (the refault, the
   swap-in, the TLB refills after the flush) is differential: the run's time minus everything the
   schedule spent inside it, minus the same guest without host operations (same round), per
   invalidated page. ``munmap`` (a range invalidation: one ``invalidate_range_start`` / ``_end``
   for the whole working set) would kill the guest if it touched the pages again, so it runs on
   the machine the operation-free run leaves, after ``Machine.run()`` returns, timed the same way.
   With ``ALIAS=1`` every page has two sptes. The notifier / host / total split is that of the
   round whose operation time is the median (so the parts add up); differences between variants
   are taken within a round, then the median. The host's detectors stay on in every run (the
   owner check at each free, the poison check of the pages freed last after each operation and
   at each reuse): they are part of what an operation costs here. The host times its own calls
   (observer events ``HOST_TIMING``); the operations pick the bench's pages through the
   schedule's ``pick`` hook.
2. **A fault that races an invalidation.** The same guest with one pass (each page faulted in
   once, no I/O exits: exits are faults) under ``migrate@after_seq_snapshot:K`` (the host migrates
   the page between the fault's sequence snapshot and gfn_to_pfn) and ``swap@after_gfn_to_pfn:K``
   (it swaps the page out after gfn_to_pfn); the fault finds the sequence moved, installs nothing
   (``pf_retry``) and faults again. The operation takes the page the guest is faulting in (the
   first working-set page not mapped yet: the guest goes in order), so it zaps nothing and
   flushes nothing. The same operation on the same page not racing is ``migrate:1`` /
   ``swap:1``: at the fill just before the fault. Per retried fault:

       retried = ((racing - its schedule time) - free - ops_racing * aftermath) / pf_retry
       aftermath = ((not racing - its schedule time) - free) / ops_not_racing

   (``free``: the run without operations; the aftermath of an operation -- the swap-in the fault
   makes, the copy's effect on the caches -- is the same whether or not it raced the fault). A
   normal shadow fault: (free - idle) / (pf_fixed(free) - pf_fixed(idle)), the main bench's
   pf_fixed method, with host memory on.
3. **Aging.** On the machine the operation-free run leaves, ``KvmNotifier.test_young`` and
   ``clear_young`` on every working-set page, one call per page, young pages (the A bits the run
   left) then old ones (after the clear), with one and two sptes per page. Each call is timed
   alone: us per page is the median call of the round (a loop of a millisecond is easily hit by
   another process's time slice; the mean is in the JSON too), then the median over the rounds.

The JSON (``bench --json``) gets this under the key ``host`` (README, the bench section).
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field

from . import events as ev
from .bench import BY_NAME, BenchError, Workload, _console, _fmt_count, _fmt_us, _r, assemble

ERAS = ("2008", "modern")
PAGE = 0x1000
WS_BASE = 0x2800000              # the working set's first frame (host_pages.asm's WS_BASE)

HOST_PAGES = Workload("host-pages", "host_pages.asm", 16, 2,
                      "a working set read pass after pass, an I/O exit per page (host memory)",
                      group="host")


@dataclass(frozen=True)
class Sizes:
    pages: int          # working-set pages of the invalidation and aging runs
    passes: int         # passes over them after the first touch
    every: int          # one host operation every `every` exits
    fault_pages: int    # pages of the retried-fault runs (one fault each)
    race_every: int     # K: one operation every Kth time a fault passes the point (racing);
                        # the same operation not racing runs at every exit (OP:1)


# 256 pages (and their aliases) fit in the CPU's TLB: without host operations the passes refill
# nothing, so the refills after each notifier flush show
FULL = Sizes(pages=256, passes=32, every=8, fault_pages=4096, race_every=2)
QUICK = Sizes(pages=64, passes=2, every=8, fault_pages=256, race_every=2)


@dataclass(frozen=True)
class Variant:
    key: str
    guest: str              # "ws" (working set, passes), "fault" (one pass), "idle"
    alias: int = 0          # 1: every working-set page mapped twice (two sptes)
    schedule: str = ""      # the --host rules
    post: bool = False      # aging and munmap after the run
    pick: str = "mapped"    # the page an operation takes: a mapped working-set page drawn by the
                            # schedule's seed, or "next": the working-set page the guest faults
                            # in next (the first one not mapped: the guest goes in order)

    def symbols(self, s: Sizes) -> dict:
        if self.guest == "ws":
            return {"PAGES": s.pages, "ALIAS": self.alias, "IO": 1, "WS_BASE": WS_BASE}
        return {"PAGES": s.fault_pages, "ALIAS": 0, "IO": 0, "WS_BASE": WS_BASE}

    def n(self, s: Sizes) -> int:
        return s.passes if self.guest == "ws" else 0

    def pages(self, s: Sizes) -> int:
        return s.pages if self.guest == "ws" else s.fault_pages


def variants(s: Sizes) -> list:
    e, k = s.every, s.race_every
    return [
        Variant("free", "ws", post=True),
        Variant("swap", "ws", schedule=f"swap:{e}"),
        Variant("migrate", "ws", schedule=f"migrate:{e}"),
        Variant("free-2", "ws", alias=1, post=True),
        Variant("swap-2", "ws", alias=1, schedule=f"swap:{e}"),
        Variant("fault", "fault"),
        Variant("fault-migrate", "fault", schedule="migrate:1", pick="next"),
        Variant("fault-migrate-race", "fault", schedule=f"migrate@after_seq_snapshot:{k}",
                pick="next"),
        Variant("fault-swap", "fault", schedule="swap:1", pick="next"),
        Variant("fault-swap-race", "fault", schedule=f"swap@after_gfn_to_pfn:{k}", pick="next"),
        Variant("idle", "idle"),
    ]


# (invalidation row, its variant, the operation-free variant, the operation's counter)
INVALIDATIONS = (("swap", "swap", "free", "host_swap_out"),
                 ("migrate", "migrate", "free", "host_migrate"),
                 ("swap", "swap-2", "free-2", "host_swap_out"))
# (rule row: racing variant, the same operation not racing, operation counter)
RETRIES = (("fault-migrate-race", "fault-migrate", "host_migrate"),
           ("fault-swap-race", "fault-swap", "host_swap_out"))
AGING = (("test_young", "young"), ("clear_young", "young"), ("test_young", "old"),
         ("clear_young", "old"))
NOTIFIER_CALLS = ("invalidate_page", "invalidate_range_start", "invalidate_range_end")
TIMED = ("schedule", "op", "notifier", "flush", "swap_in")


# ---------------------------------------------------------------------------------------------
# timing the host's calls inside a run

class HostClock:
    """The host's calls of one machine, timed by the host itself (observer events
    ``events.HOST_TIMING``): a scheduled operation whole (its choice of page and the check of the
    pages freed last included), the host operations (swap_out, migrate, munmap), the notifier
    invalidations inside them and the TLB flush inside those, and the swap-in a refault makes.
    Operations pick their page through the schedule's ``pick`` hook."""

    def __init__(self, m, ws_gfns, pick="mapped"):
        self.s = dict.fromkeys(TIMED, 0.0)
        s = self.s

        def add(_kind, f):
            s[f["part"]] += f["seconds"]
        m.events.subscribe(add, (ev.HOST_TIMING,))
        sched = m.host_schedule
        rmap = m.vm_mmu.rmap
        if pick == "mapped":
            # the working-set pages the shadow MMU maps (the schedule's target "mapped", narrowed
            # to the working set; its seed still draws the page)
            sched.pick = lambda: list(filter(rmap.__contains__, ws_gfns))
        else:
            # the page the guest faults in next: the first working-set page not mapped yet
            at = [0]

            def next_page():
                i = at[0]
                while i < len(ws_gfns) and ws_gfns[i] in rmap:
                    i += 1
                at[0] = i
                return [ws_gfns[i]] if i < len(ws_gfns) else []
            sched.pick = next_page


def _timed(fn, acc, key):
    """fn with its time added to acc[key] (for timer_overhead_us: what one timed call costs)."""
    pc = time.perf_counter

    def timed(*a, **k):
        t0 = pc()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += pc() - t0
    return timed


def timer_overhead_us() -> float:
    """What one wrapped call adds (two perf_counter reads, the wrapper's frame), measured."""
    acc = {"x": 0.0}

    def f():
        return None
    w = _timed(f, acc, "x")
    n = 20000
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        t1 = time.perf_counter()
        for _ in range(n):
            w()
        t2 = time.perf_counter()
        d = ((t2 - t1) - (t1 - t0)) / n * 1e6
        best = d if best is None else min(best, d)
    return best


# ---------------------------------------------------------------------------------------------
# one run

@dataclass
class HostRun:
    seconds: float
    counters: dict
    clock: dict                      # TIMED key -> seconds inside the run
    fills: int | None = None         # instrumented (untimed) runs only
    post: dict = field(default_factory=dict)


def _guest(v: Variant):
    return BY_NAME["idle"] if v.guest == "idle" else HOST_PAGES


def run_variant(v: Variant, s: Sizes, mode: str, era: str, prog_fw, *, ram_mib=128,
                policy="kvm", unsync=None, instrument=False) -> HostRun:
    from .machine import HostConfig, Machine
    prog, fw = prog_fw
    try:
        m = Machine(mode, mmu="shadow", policy=policy, ram_mib=ram_mib, unsync=unsync,
                    host=HostConfig(schedule=v.schedule, notifiers=era))
    except ValueError as e:
        raise BenchError(str(e)) from None
    m.load(prog, fw)
    g0 = WS_BASE >> 12
    ws = range(g0, g0 + v.pages(s)) if v.guest != "idle" else range(0)
    clock = HostClock(m, ws, pick=v.pick)
    fills = [0]
    if instrument:
        from .events import TLB_FILL

        def count_fill(_kind, _fields):
            fills[0] += 1
        m.events.subscribe(count_fill, (TLB_FILL,))
    gc.collect()
    t0 = time.perf_counter()
    res = m.run()
    t = time.perf_counter() - t0
    out = bytes(m.output)
    if res.status != 0 or not out.endswith(b"PASS\n"):
        tail = out[-300:].decode("latin-1").strip()
        raise BenchError(f"host bench {v.key} (mode {mode}, notifiers {era}) failed: exit status "
                         f"{res.status}" + (f"; output: {tail!r}" if tail else "")
                         + (f"\n{res.report}" if res.report else ""))
    r = HostRun(t, dict(res.counters), dict(clock.s), fills=fills[0] if instrument else None)
    if v.post and not instrument:
        gc.collect()
        r.post = after_run(m, clock, ws)
    return r


def after_run(m, clock: HostClock, ws) -> dict:
    """On the machine a run left: aging calls on every working-set page, then munmap of the whole
    working set in one range; seconds and answers."""
    host, notifier, counters = m.host, m.vm_mmu.notifier, m.counters
    hvas = [host.hva(m.vm_mmu.memslots.gfn_to_index(g)) for g in ws]
    sptes = sum(len(m.vm_mmu.rmap.get(g, ())) for g in ws)
    out = {"pages": len(hvas), "sptes": sptes}
    pc = time.perf_counter
    if hvas:
        notifier.test_young(hvas[0], hvas[0] + PAGE)     # warm (first-call imports): no change
    for call, state in AGING:
        f = getattr(notifier, call)
        young = 0
        times = []
        for h in hvas:
            t0 = pc()
            y = f(h, h + PAGE)
            times.append(pc() - t0)
            if y:
                young += 1
        out[f"{call}_{state}_s"] = sum(times)
        out[f"{call}_{state}_call_s"] = _median(times)
        out[f"{call}_{state}_young"] = young
    before = {k: counters[k] for k in ("mmu_notifier_zapped", "mmu_notifier_flush",
                                        "mmu_notifier_invalidate")}
    n0, f0 = clock.s["notifier"], clock.s["flush"]
    i0 = m.vm_mmu.memslots.gfn_to_index(ws[0])
    t0 = pc()
    host.munmap(i0, i0 + len(ws))
    out["munmap_s"] = pc() - t0
    out["munmap_notifier_s"] = clock.s["notifier"] - n0
    out["munmap_flush_s"] = clock.s["flush"] - f0
    for k, v in before.items():
        out[f"munmap_{k}"] = counters[k] - v
    return out


# ---------------------------------------------------------------------------------------------
# the bench

def _median(xs):
    return statistics.median(xs) if xs else None


@dataclass
class VariantResult:
    v: Variant
    mode: str
    era: str
    runs: list              # [HostRun] timed
    warm: HostRun           # the instrumented run

    @property
    def counters(self):
        return self.runs[-1].counters

    def med(self, what):
        if what == "shadow":
            return _median([r.seconds for r in self.runs])
        return _median([r.clock[what] for r in self.runs])

    def median_round(self, seconds) -> HostRun:
        """The run whose ``seconds(run)`` is the median (the lower one of an even count): its
        parts are reported together, so they add up."""
        runs = sorted(self.runs, key=seconds)
        return runs[(len(runs) - 1) // 2]

    def post_med(self, key):
        return _median([r.post[key] for r in self.runs])


def _guest_s(run: HostRun) -> float:
    """A run's time minus everything the host schedule spent inside it."""
    return run.seconds - run.clock["schedule"]


def paired(f, *results):
    """The median over the rounds of f(run of each result in that round): differences between
    variants are taken within a round (runs next to each other in time), then the median."""
    return _median([f(*runs) for runs in zip(*(r.runs for r in results))])


def run_host_bench(*, modes=("64",), rounds=3, quick=False, ram_mib=128, policy="kvm",
                   unsync=None, eras=ERAS, log=None, sizes: Sizes | None = None) -> dict:
    """Run every variant in every era and mode: one instrumented warm-up run each, then the
    rounds. Returns {"results": {(mode, era, variant key): VariantResult}, "sizes", "modes",
    "eras", "rounds", "quick"} for the row builders and ``to_json``. The counters of a variant are
    the same in every round (the guest is deterministic, the schedule seeded); the last round's
    are reported."""
    log = log or (lambda msg: None)
    if rounds < 1:
        raise BenchError("--rounds must be at least 1")
    s = sizes or (QUICK if quick else FULL)
    vs = variants(s)
    out = {}
    for mode in modes:
        progs = {v.key: assemble(_guest(v), mode, v.n(s) if v.guest != "idle" else 1, ram_mib,
                                 v.symbols(s) if v.guest != "idle" else None) for v in vs}
        warm = {}
        for era in eras:
            for v in vs:
                rule = f", {v.schedule}" if v.schedule else ""
                log(f"[{mode}] host {v.key} (notifiers {era}{rule}): warm-up")
                warm[era, v.key] = run_variant(v, s, mode, era, progs[v.key], ram_mib=ram_mib,
                                               policy=policy, unsync=unsync, instrument=True)
        runs = {(era, v.key): [] for era in eras for v in vs}
        for r in range(rounds):
            log(f"[{mode}] host: round {r + 1}/{rounds}")
            for era in eras:
                for v in vs:
                    runs[era, v.key].append(run_variant(v, s, mode, era, progs[v.key],
                                                        ram_mib=ram_mib, policy=policy,
                                                        unsync=unsync))
        for era in eras:
            for v in vs:
                out[mode, era, v.key] = VariantResult(v, mode, era, runs[era, v.key],
                                                      warm[era, v.key])
    return {"sizes": s, "results": out, "modes": modes, "eras": eras, "rounds": rounds,
            "quick": quick}


def _per(x, n, scale=1e6):
    return x / n * scale if x is not None and n else None


def invalidation_rows(hb) -> list:
    s = hb["sizes"]
    res = hb["results"]
    rows = []
    for mode in hb["modes"]:
        for era in hb["eras"]:
            for op, key, free_key, counter in INVALIDATIONS:
                r, f = res[mode, era, key], res[mode, era, free_key]
                c, fc = r.counters, f.counters
                pages = c.get(counter, 0)
                guest_s = paired(lambda a, b: _guest_s(a) - b.seconds, r, f)
                m = r.median_round(lambda x: x.clock["op"])
                fills = (r.warm.fills - f.warm.fills
                         if r.warm.fills is not None and f.warm.fills is not None else None)
                rows.append({
                    "op": op, "mode": mode, "notifiers": era, "schedule": r.v.schedule,
                    "measured": "inside the run, from the host schedule",
                    "mappings": r.v.alias + 1,
                    "sptes_per_page": _r(_per(c.get("mmu_notifier_zapped", 0), pages, 1), 3),
                    "ws_pages": s.pages, "passes": s.passes,
                    "pages": pages, "zapped": c.get("mmu_notifier_zapped", 0),
                    "flushes": c.get("mmu_notifier_flush", 0),
                    "notifier_calls": c.get("mmu_notifier_invalidate", 0),
                    "notifier_us": _r(_per(m.clock["notifier"], pages), 3),
                    "flush_us": _r(_per(m.clock["flush"], pages), 3),
                    "host_us": _r(_per(m.clock["op"] - m.clock["notifier"], pages), 3),
                    "total_us": _r(_per(m.clock["op"], pages), 3),
                    "schedule_us": _r(_per(m.clock["schedule"] - m.clock["op"], pages), 3),
                    "guest_us": _r(_per(guest_s, pages), 3),
                    "swap_in_us": _r(_per(r.med("swap_in"), pages), 3),
                    "swap_ins": c.get("host_swap_in", 0),
                    "refaults": c.get("pf_fixed", 0) - fc.get("pf_fixed", 0),
                    "extra_fills": fills,
                    "shadow_s": _r(r.med("shadow")), "free_s": _r(f.med("shadow")),
                    "schedule_s": _r(r.med("schedule")),
                })
            for free_key in ("free", "free-2"):
                f = res[mode, era, free_key]
                pages = f.runs[-1].post["pages"]
                zapped = f.runs[-1].post["munmap_mmu_notifier_zapped"]
                m = f.median_round(lambda x: x.post["munmap_s"])
                tot, notif = m.post["munmap_s"], m.post["munmap_notifier_s"]
                rows.append({
                    "op": "munmap", "mode": mode, "notifiers": era, "schedule": None,
                    "measured": "after the run, one range over the working set",
                    "mappings": f.v.alias + 1, "sptes_per_page": _r(_per(zapped, pages, 1), 3),
                    "ws_pages": s.pages, "passes": s.passes,
                    "pages": pages, "zapped": zapped,
                    "flushes": f.runs[-1].post["munmap_mmu_notifier_flush"],
                    "notifier_calls": f.runs[-1].post["munmap_mmu_notifier_invalidate"],
                    "notifier_us": _r(_per(notif, pages), 3),
                    "flush_us": _r(_per(m.post["munmap_flush_s"], pages), 3),
                    "host_us": _r(_per(tot - notif, pages), 3),
                    "total_us": _r(_per(tot, pages), 3),
                    "schedule_us": None, "guest_us": None, "swap_in_us": None, "swap_ins": 0,
                    "refaults": None, "extra_fills": None,
                    "shadow_s": None, "free_s": _r(f.med("shadow")), "schedule_s": None,
                })
    return rows


def retry_rows(hb) -> list:
    s = hb["sizes"]
    res = hb["results"]
    rows = []
    for mode in hb["modes"]:
        for era in hb["eras"]:
            free, idle = res[mode, era, "fault"], res[mode, era, "idle"]
            dfix = free.counters.get("pf_fixed", 0) - idle.counters.get("pf_fixed", 0)
            normal = paired(lambda a, i: _per(a.seconds - i.seconds, dfix), free, idle)
            for race_key, calm_key, counter in RETRIES:
                c, b = res[mode, era, race_key], res[mode, era, calm_key]
                retried = c.counters.get("pf_retry", 0)
                ops_c, ops_b = c.counters.get(counter, 0), b.counters.get(counter, 0)
                if not (retried and ops_b):
                    own = all_in = per_op = None
                else:
                    def own_f(cr, br, fr):
                        per = (_guest_s(br) - fr.seconds) / ops_b
                        return ((_guest_s(cr) - fr.seconds) - ops_c * per) / retried * 1e6
                    own = paired(own_f, c, b, free)
                    all_in = paired(lambda cr, fr: (_guest_s(cr) - fr.seconds) / retried * 1e6,
                                    c, free)
                    per_op = paired(lambda br, fr: (_guest_s(br) - fr.seconds) / ops_b * 1e6,
                                    b, free)
                rows.append({
                    "rule": c.v.schedule, "not_racing": b.v.schedule, "mode": mode,
                    "notifiers": era, "pages": s.fault_pages,
                    "pf_retry": retried, "pf_fixed": c.counters.get("pf_fixed", 0),
                    "ops": ops_c, "ops_not_racing": ops_b,
                    "retry_us": _r(own, 3),
                    "all_in_us": _r(all_in, 3),
                    "aftermath_us_per_op": _r(per_op, 3),
                    "op_us": _r(_per(c.med("op"), ops_c), 3),
                    "normal_fault_us": _r(normal, 3),
                    "normal_faults": dfix,
                    "retry_over_normal": _r(own / normal, 3) if own is not None and normal
                    else None,
                    "racing_s": _r(c.med("shadow")), "not_racing_s": _r(b.med("shadow")),
                    "free_s": _r(free.med("shadow")), "idle_s": _r(idle.med("shadow")),
                    "racing_schedule_s": _r(c.med("schedule")),
                    "not_racing_schedule_s": _r(b.med("schedule")),
                })
    return rows


def aging_rows(hb) -> list:
    res = hb["results"]
    rows = []
    for mode in hb["modes"]:
        for era in hb["eras"]:
            for call, state in AGING:
                row = {"call": call, "pages_were": state, "mode": mode, "notifiers": era}
                for key, label in (("free", "1"), ("free-2", "2")):
                    f = res[mode, era, key]
                    post = f.runs[-1].post
                    row[f"sptes_{label}"] = {
                        "pages": post["pages"], "sptes": post["sptes"],
                        "us_per_page": _r(_per(f.post_med(f"{call}_{state}_call_s"), 1), 3),
                        "mean_us_per_page": _r(_per(f.post_med(f"{call}_{state}_s"),
                                                    post["pages"]), 3),
                        "young": post[f"{call}_{state}_young"]}
                rows.append(row)
    return rows


def variant_records(hb) -> list:
    out = []
    s = hb["sizes"]
    for (mode, era, key), r in hb["results"].items():
        out.append({"variant": key, "mode": mode, "notifiers": era, "guest": r.v.guest,
                    "schedule": r.v.schedule, "symbols": r.v.symbols(s) if r.v.guest != "idle"
                    else {}, "n": r.v.n(s),
                    "shadow_runs_s": [_r(x.seconds) for x in r.runs],
                    **{f"{k}_runs_s": [_r(x.clock[k]) for x in r.runs] for k in TIMED},
                    "fills": r.warm.fills, "counters": r.counters,
                    "after_runs": [{k: (_r(x) if isinstance(x, float) else x)
                                    for k, x in run.post.items()} for run in r.runs]
                    if r.v.post else None})
    return out


def to_json(hb, *, policy, unsync, ram_mib) -> dict:
    s = hb["sizes"]
    return {
        "invalidation": invalidation_rows(hb),
        "retried_faults": retry_rows(hb),
        "aging": aging_rows(hb),
        "variants": variant_records(hb),
        "meta": {
            "rounds": hb["rounds"], "quick": hb["quick"], "policy": policy, "unsync": unsync,
            "ram_mib": ram_mib, "modes": list(hb["modes"]), "notifiers": list(hb["eras"]),
            "sizes": {"pages": s.pages, "passes": s.passes, "every": s.every,
                      "fault_pages": s.fault_pages, "race_every": s.race_every},
            "timer_overhead_us": _r(timer_overhead_us(), 3),
            "timing": "host side: perf_counter around each call inside the run (schedule run, "
                      "host operation, notifier invalidations, swap-in), medians of the rounds; "
                      "guest side: Machine.run() minus the schedule's time, minus the same guest "
                      "without host operations in the same round; munmap and aging: on the "
                      "machine the operation-free run leaves, after Machine.run()",
        },
    }


# ---------------------------------------------------------------------------------------------
# printing

def print_host(doc, file=None) -> None:
    from rich.table import Table
    con = _console(file)
    meta = doc["meta"]
    rounds = meta["rounds"]
    sz = meta["sizes"]
    rs = (f"medians of {rounds} round{'s' if rounds != 1 else ''}"
          f"{', --quick' if meta['quick'] else ''}")
    t = Table(title=f"Host memory: a notifier invalidation, per invalidated page (us; {rs})",
              title_justify="left")
    cols = [("op", "left"), ("mode", "left"), ("notifiers", "left"), ("mappings", "right"),
            ("pages", "right"), ("sptes/page", "right"), ("flushes", "right"),
            ("notifier", "right"), ("of it flush", "right"), ("host", "right"),
            ("total", "right"), ("guest after", "right"), ("of it swap-in", "right"),
            ("refaults", "right"),
            ("swap-ins", "right"), ("fills after", "right")]
    for c, j in cols:
        t.add_column(c, justify=j, no_wrap=True)
    for r in doc["invalidation"]:
        op = f"{r['op']} ({r['schedule']})" if r["schedule"] else f"{r['op']} (one range, after)"
        t.add_row(op, r["mode"], r["notifiers"], str(r["mappings"]), _fmt_count(r["pages"]),
                  "-" if r["sptes_per_page"] is None else f"{r['sptes_per_page']:.2f}",
                  _fmt_count(r["flushes"]), _fmt_us(r["notifier_us"]), _fmt_us(r["flush_us"]),
                  _fmt_us(r["host_us"]),
                  _fmt_us(r["total_us"]), _fmt_us(r["guest_us"]),
                  _fmt_us(r["swap_in_us"]) if r["swap_ins"] else "-",
                  "-" if r["refaults"] is None else _fmt_count(r["refaults"]),
                  _fmt_count(r["swap_ins"]) if r["swap_ins"] else "-",
                  "-" if r["extra_fills"] is None else _fmt_count(r["extra_fills"]))
    con.print(t)
    con.print(f"Guest host-pages: {sz['pages']} pages, each faulted in once, then {sz['passes']} "
              "passes reading every page with an I/O exit after each; one host operation every "
              f"{sz['every']} exits on a mapped working-set page.  notifier: the notifier's "
              "invalidations (zap through the rmap + TLB flush; of it flush: the CPU's TLB flush "
              "alone), host: the rest of the operation (page table, writeback or copy, free with "
              "poison); timed inside the run, the split of the median round.  "
              "guest after: the run's time minus the schedule's, minus the same guest without "
              "host operations (refaults, swap-ins, TLB refills after each flush).  refaults: "
              "pf_fixed more than without; fills after: TLB fills more (instrumented run).  "
              "munmap: after the run, one invalidate_range over the working set.")
    t = Table(title=f"Host memory: faults that race an invalidation (us per fault; {rs})",
              title_justify="left")
    cols = [("rule", "left"), ("mode", "left"), ("notifiers", "left"), ("retried", "right"),
            ("ops", "right"), ("fixed", "right"), ("retried fault", "right"),
            ("all in", "right"), ("op aftermath", "right"), ("normal fault", "right"),
            ("retried/normal", "right")]
    for c, j in cols:
        t.add_column(c, justify=j, no_wrap=True)
    for r in doc["retried_faults"]:
        t.add_row(r["rule"], r["mode"], r["notifiers"], _fmt_count(r["pf_retry"]),
                  _fmt_count(r["ops"]), _fmt_count(r["pf_fixed"]), _fmt_us(r["retry_us"]),
                  _fmt_us(r["all_in_us"]), _fmt_us(r["aftermath_us_per_op"]),
                  _fmt_us(r["normal_fault_us"]),
                  "-" if r["retry_over_normal"] is None else f"{r['retry_over_normal']:.2f}")
    con.print(t)
    con.print(f"Guest host-pages, one pass: {sz['fault_pages']} pages faulted in once (exits are "
              "faults); the operation takes the page being faulted in (nothing to zap or flush): "
              "racing, inside its fault at the rule's point; not racing (OP:1), at the fill just "
              "before.  retried: pf_retry; fixed: pf_fixed.  all in: (run - schedule time - the "
              "run without operations) / retried; op aftermath: the same per operation of the "
              "rule not racing (the swap-in, ...); retried fault: all in minus the aftermath of "
              "the operations.  normal fault: (run without operations - idle) / pf_fixed more "
              "than idle.")
    t = Table(title=f"Host memory: aging through the notifier, per page (us; {rs})",
              title_justify="left")
    cols = [("call", "left"), ("pages were", "left"), ("mode", "left"), ("notifiers", "left"),
            ("pages", "right"), ("1 spte/page", "right"), ("young", "right"),
            ("2 sptes/page", "right"), ("young ", "right")]
    for c, j in cols:
        t.add_column(c, justify=j, no_wrap=True)
    for r in doc["aging"]:
        a, b = r["sptes_1"], r["sptes_2"]
        t.add_row(r["call"], r["pages_were"], r["mode"], r["notifiers"], _fmt_count(a["pages"]),
                  _fmt_us(a["us_per_page"]), _fmt_count(a["young"]), _fmt_us(b["us_per_page"]),
                  _fmt_count(b["young"]))
    con.print(t)
    con.print("On the machine the operation-free run leaves: one call per working-set page, "
              "young pages (A bits the run set) then old ones (after clear_young); each call "
              "timed, us per page = the median call (the mean is in the JSON).  young: pages "
              "answered young.  Timer overhead per timed call: "
              f"{meta['timer_overhead_us']:.2f} us (included).")
    if hasattr(os, "getloadavg"):
        con.print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
