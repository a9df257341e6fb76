"""``x86shadow scenario aging``: the host's LRU ageing a guest through KVM's aging variants
(docs/AGING.md; seed: Houghton / Christopherson 2024 on lockless aging through the rmap).

The guest (guestcode/aging/aging.asm) has a hot set (touched in every pass), a cold set (touched
in the warm-up only) and a stream of new pages (NSTREAM per pass, touched once). In the ``multi``
layout every data page is touched through the kernel's direct map and through the process's
mapping, so its frame has two sptes, as legacy shadow paging maps most pages; in ``tdp`` only
through the process's mapping: one spte per frame, as the shadow MMU has under nested TDP.

Ground truth: the guest counts its touches in a frame the host reads (USTAT) and the order of the
touches is fixed (the guest's header says it), so at any moment the host knows which pages were
touched since it last asked about each: an aging answer "old" for a page touched since the
previous clearing query of it is a **false old**; "young" for one not touched, a false young.

The host reclaim (memory/reclaim.py) keeps the data pages under ``limit`` resident pages and runs
"on another CPU": a virtual-time model (``TimeModel``; docs/AGING.md says exactly how) lays the
vCPU's work and the reclaim's steps on one timeline. The vCPU's clock advances by fixed costs
per touch, TLB fill, exit and swap-in (``Costs``); the reclaim's by fixed costs per step and
what the step did (rmaps and sptes read, mmu_lock sections, flushes, writebacks). A reclaim step
is executed when the vCPU's clock has reached its start (checked at every TLB fill and marker),
so its answers see exactly the guest's touches before that point. A vCPU fault that needs
mmu_lock while the reclaim holds it (in the timeline) waits until the reclaim's section ends;
a reclaim section that would start while the vCPU holds mmu_lock waits for it. A reclaim pass is
started at each pass marker of the guest when the previous one has finished (kswapd woken).
"""
from __future__ import annotations

import bisect
import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass, field

from . import events as ev
from . import layout, resources
from .scenario import ScenarioError, _fmt, check_plot, peak_rss_mb, scenario_images
from .scenario import write_json as _write_json

MiB = 1 << 20
PROGRAM = resources.guestcode_dir() / "aging" / "aging.asm"
MODES = ("32", "pae")
LAYOUTS = {"multi": 0, "tdp": 1}
TLBS = {"switch": 1, "keep": 0}
VARIANTS = ("2008", "6.14", "6.15", "single-rmap-skip", "single-rmap-fallback")
ACTIVE_OPS = ("clear_young", "test_young")
DATA_PA = 0x0200_0000              # guestcode/aging/aging.asm
USTAT = layout.FREE_END - 0x1000
UVARS = 0x0800_0000 + 0x20_0000    # the process's view of USTAT
ST_TOUCHES, ST_MAGIC = 0x00, 0x08
MAGIC = 0x61676521
PH_PASS, PH_KERNEL, PH_DONE = 1, 2, 3
MAX_DATA = (USTAT - DATA_PA) >> 12


def era_of(variant: str) -> str:
    """Each variant runs with the notifiers of its kernel: 2.6.27's for 2008, 6.x's else."""
    return "2008" if variant.split(":")[0] == "2008" else "modern"


@dataclass(frozen=True)
class Costs:
    """Virtual-time costs in ns (docs/AGING.md: orders of magnitude, not measurements)."""
    touch: int = 1000           # the guest's work on a page it touches (a TLB hit)
    fill: int = 100             # a TLB miss walked through the shadow tables
    exit: int = 1500            # a VM exit and its handling outside mmu_lock
    fault_locked: int = 500     # a shadow fault's section under mmu_lock (fetch, set_spte)
    swapin: int = 5000          # swapping a page back in (the vCPU waits for it)
    primary: int = 200          # the host mm's own part of aging a page (rmap, pte young)
    call: int = 100             # one notifier call: SRCU, memslot lookup
    lock: int = 50              # taking and dropping mmu_lock, uncontended
    rmap: int = 20              # reading one rmap head (6.15: its lock bit too)
    spte: int = 10              # reading one spte (and clearing its A bit)
    flush: int = 2000           # a remote TLB flush (IPIs and the wait for them)
    unmap: int = 300            # try_to_unmap's primary part of an eviction
    writeback: int = 4000       # writing an evicted page to swap (zram-like)


@dataclass(frozen=True)
class AgingParams:
    mode: str = "pae"
    layout: str = "multi"
    hot: int = 64
    cold: int = 64
    stream: int = 8
    passes: int = 12
    tlb: str = "switch"
    limit: int | None = None          # resident data pages (None: hot + cold / 2)
    batch: int = 16                   # pages shrink_active_list ages at once
    active_op: str = "clear_young"
    ram_mib: int = 64
    costs: Costs = field(default_factory=Costs)

    def check(self) -> "AgingParams":
        if self.mode not in MODES:
            raise ScenarioError(f"mode {self.mode!r}: the aging guest is a 32-bit kernel "
                                f"(choose from {', '.join(MODES)})")
        if self.layout not in LAYOUTS:
            raise ScenarioError(f"unknown layout {self.layout!r} (choose from {', '.join(LAYOUTS)})")
        if self.tlb not in TLBS:
            raise ScenarioError(f"unknown --tlb {self.tlb!r} (choose from {', '.join(TLBS)})")
        if self.active_op not in ACTIVE_OPS:
            raise ScenarioError(f"unknown --active-op {self.active_op!r} (choose from "
                                f"{', '.join(ACTIVE_OPS)})")
        if self.hot < 1:
            raise ScenarioError(f"--hot {self.hot}: must be at least 1")
        if self.cold < 0 or self.stream < 0:
            raise ScenarioError("--cold and --stream must be at least 0")
        if self.passes < 1:
            raise ScenarioError(f"--passes {self.passes}: must be at least 1")
        if self.ndata > MAX_DATA:
            raise ScenarioError(f"{self.ndata} data pages (hot + cold + stream x passes) do not "
                                f"fit: at most {MAX_DATA}")
        if self.batch < 1:
            raise ScenarioError(f"--batch {self.batch}: must be at least 1")
        if self.limit is not None and not 0 <= self.limit:
            raise ScenarioError(f"--limit {self.limit}: must be at least 0")
        if not 64 <= self.ram_mib <= 4096:
            raise ScenarioError(f"--ram {self.ram_mib}: must be 64..4096 MiB (a 32-bit guest "
                                "whose data pages lie at 32 MiB)")
        return self

    @property
    def ndata(self) -> int:
        return self.hot + self.cold + self.stream * self.passes

    @property
    def resident_limit(self) -> int:
        return self.limit if self.limit is not None else self.hot + self.cold // 2

    def symbols(self) -> dict:
        return {"NHOT": self.hot, "NCOLD": self.cold, "NSTREAM": self.stream,
                "NPASSES": self.passes, "LAYOUT": LAYOUTS[self.layout],
                "FLUSH": TLBS[self.tlb], "USTAT": USTAT}

    def touch_order(self) -> list:
        """Data page of every touch, in the guest's order (guestcode/aging/aging.asm)."""
        mappings = 2 if self.layout == "multi" else 1
        seq = []
        for p in range(self.passes + 1):
            if p == 0:
                part = list(range(self.hot + self.cold))
            else:
                s0 = self.hot + self.cold + (p - 1) * self.stream
                part = list(range(self.hot)) + list(range(s0, s0 + self.stream))
            seq.extend(part * mappings)
        return seq


def _images(p: AgingParams):
    return scenario_images(PROGRAM, p.mode, p.ram_mib, p.symbols(), "the aging guest")


# ---------------------------------------------------------------------------------- time
class TimeModel:
    """The reclaim "on another CPU" against the vCPU, in virtual ns (docs/AGING.md).

    The reclaim's clock runs through its steps back to back; each step is a list of segments
    (ns, section) where section is None (no mmu_lock) or "aging" / "evict" (mmu_lock held).
    ``advance(t)`` executes the reclaim's steps whose start is at or before the vCPU time t.
    ``vcpu_lock(t)``: the vCPU asks for mmu_lock at t; it waits until the reclaim's section
    holding it at t ends; it then holds the lock ``fault_locked`` ns, and a reclaim section
    placed to start inside that window is pushed after it (the reclaim waits)."""

    def __init__(self, costs: Costs, era: str):
        self.c = costs
        self.era = era
        self.clock = 0.0                 # the reclaim's clock
        self.gen = None                  # the reclaim pass running (a generator of Steps)
        self.sections = []               # [start, end, kind] mmu_lock sections not yet passed
        self.vcpu_lock_until = 0.0
        self.vcpu_wait = 0.0             # total ns the vCPU waited for mmu_lock
        self.vcpu_waits = 0
        self.wait_by = {"aging": 0.0, "evict": 0.0}
        self.ager_wait = 0.0             # ns the reclaim waited for the vCPU's sections
        self.busy = 0.0                  # ns the reclaim worked
        self.held = {"aging": 0.0, "evict": 0.0}    # ns the reclaim held mmu_lock
        self.aging_ns = 0.0              # ns of the aging steps (age, ref)
        self.passes = self.skipped_kicks = 0
        self.vcpu_locks = 0

    def kick(self, t: float, steps) -> bool:
        if self.gen is not None:
            self.skipped_kicks += 1
            return False
        self.gen = steps
        self.passes += 1
        self.clock = max(self.clock, t)
        return True

    def advance(self, t: float) -> None:
        while self.gen is not None and self.clock <= t:
            try:
                step = next(self.gen)
            except StopIteration:
                self.gen = None
                break
            self._place(step)

    def stop(self) -> bool:
        """The guest is done: a reclaim pass still running is abandoned (True if there was
        one); what it did so far stays counted."""
        if self.gen is None:
            return False
        self.gen.close()
        self.gen = None
        return True

    def segments(self, step):
        c = self.c
        if step.kind == "evict":
            seg = [(c.unmap, None)]
            if step.locks:
                locked = c.lock * step.locks + c.rmap + c.spte * step.zapped
                if step.flushes and self.era == "modern":
                    locked += c.flush * step.flushes       # flush_on_ret: before the unlock
                seg.append((locked, "evict"))
            if step.flushes and self.era == "2008":
                seg.append((c.flush * step.flushes, None)) # after the unlock
            seg.append((c.writeback, None))
            return seg
        rec = step.record
        seg = [(c.primary, None)]
        if rec is None:
            return seg + [(c.call, None)]
        seg.append((c.call + c.rmap * (rec.rmaps - rec.locked_rmaps)
                    + c.spte * (rec.sptes - rec.locked_sptes + rec.tdp), None))
        if rec.mmu_lock:
            seg.append((c.lock * rec.mmu_lock + c.rmap * rec.locked_rmaps
                        + c.spte * rec.locked_sptes, "aging"))
        if step.flushes:
            seg.append((c.flush * step.flushes, None))
        return seg

    def _place(self, step) -> None:
        start0 = self.clock
        for ns, section in self.segments(step):
            if section is not None:
                start = max(self.clock, self.vcpu_lock_until)
                self.ager_wait += start - self.clock
                self.sections.append([start, start + ns, section])
                self.held[section] += ns
                self.clock = start + ns
            else:
                self.clock += ns
            self.busy += ns
        if step.kind != "evict":
            self.aging_ns += self.clock - start0

    def vcpu_lock(self, t: float) -> float:
        """The vCPU's fault takes mmu_lock at t: the wait (ns)."""
        self.vcpu_locks += 1
        secs = self.sections
        while secs and secs[0][1] <= t:
            secs.pop(0)
        wait = 0.0
        for s, e, kind in secs:
            if s <= t < e:
                wait = e - t
                self.wait_by[kind] += wait
                break
        if wait:
            self.vcpu_wait += wait
            self.vcpu_waits += 1
        hold_end = t + wait + self.c.fault_locked
        # a section of the reclaim placed to start while the vCPU holds the lock goes after it
        shift = 0.0
        for sec in secs:
            if sec[0] > t + wait or shift:
                if not shift:
                    if sec[0] >= hold_end:
                        break
                    shift = hold_end - sec[0]
                sec[0] += shift
                sec[1] += shift
        if shift:
            self.ager_wait += shift
            self.clock += shift
        self.vcpu_lock_until = hold_end
        return wait


# ---------------------------------------------------------------------------------- a run
class _Truth:
    """Which data pages the guest touched when (the guest's fixed order), against the answers."""

    def __init__(self, p: AgingParams):
        self.order = p.touch_order()
        self.pos = {}
        for k, page in enumerate(self.order, 1):    # the count after touch k is k
            self.pos.setdefault(page, []).append(k)
        self.last_clear = {}                          # page -> touch count at its last clear

    def touched_since_clear(self, page: int, now: int) -> bool:
        positions = self.pos.get(page, ())
        i = bisect.bisect_right(positions, self.last_clear.get(page, 0))
        return i < len(positions) and positions[i] <= now


def run_aging(params: AgingParams, variant: str, *, progress=None) -> dict:
    """Run the aging scenario under one aging variant; its run record (docs/AGING.md)."""
    from .machine import HostConfig, Machine
    from .memory.reclaim import LruReclaim
    from .mmu.aging import parse_aging

    p = params.check()
    era = era_of(variant)
    try:
        parse_aging(variant, era)
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    t0 = time.perf_counter()
    program, firmware = _images(p)
    m = Machine(p.mode, policy="kvm", ram_mib=p.ram_mib,
                host=HostConfig(notifiers=era, aging=variant))
    m.load(program, firmware)
    vm = m.vm_mmu
    host = m.host
    counters = m.counters
    aging = vm.notifier.aging
    base = DATA_PA >> 12
    data = [vm.memslots.gfn_to_index(base + i) for i in range(p.ndata)]
    page_of = {index: i for i, index in enumerate(data)}
    hot = set(range(p.hot))
    ustat_index = vm.memslots.gfn_to_index(USTAT >> 12)
    phys = host.pages.phys
    truth = _Truth(p)
    model = TimeModel(p.costs, era)
    costs = p.costs
    state = {"fills": 0, "pass": 0, "cut": False}
    per_pass = [dict(pass_=k, queries=0, false_old=0, evicted=0, hot_evicted=0,
                     lock_wait_ns=0.0) for k in range(p.passes + 1)]
    fig = {k: 0 for k in ("queries", "queries_age", "queries_ref", "young", "false_old",
                          "false_old_age", "false_old_ref", "false_old_hot", "false_young",
                          "evicted", "hot_evicted", "hot_refaults", "refaults")}
    sptes_per_frame = {}

    def touches() -> int:
        pfn = host.current(ustat_index)
        return phys.read32(pfn << 12) if pfn is not None else 0

    def now() -> float:
        return (costs.touch * touches() + costs.fill * state["fills"]
                + costs.exit * counters["exits"] + costs.swapin * counters["host_swap_in"]
                + model.vcpu_wait)

    def observe(step):
        page = page_of[step.index]
        cur = per_pass[state["pass"]]
        if step.kind == "evict":
            if step.result:
                fig["evicted"] += 1
                cur["evicted"] += 1
                if page in hot:
                    fig["hot_evicted"] += 1
                    cur["hot_evicted"] += 1
            return
        n = touches()
        used = truth.touched_since_clear(page, n)
        fig["queries"] += 1
        fig["queries_" + step.kind] += 1
        cur["queries"] += 1
        fig["young"] += step.result
        if used and not step.result:
            fig["false_old"] += 1
            fig["false_old_" + step.kind] += 1
            cur["false_old"] += 1
            if page in hot:
                fig["false_old_hot"] += 1
        elif step.result and not used:
            fig["false_young"] += 1
        if step.op != "test_young":
            truth.last_clear[page] = n

    rmap = vm.rmap

    def candidates():
        # the data pages the VM has faulted in (an anonymous page is resident from its first
        # touch; the host's identity mapping of untouched RAM is not memory the VM uses)
        return [index for i, index in enumerate(data) if base + i in rmap]

    driver = LruReclaim(host, vm, candidates=candidates, limit=p.resident_limit,
                        batch=p.batch,
                        active_op=None if era == "2008" else p.active_op, observer=observe)
    counter_pages = {UVARS, USTAT}

    def on_fill(_kind, f):
        state["fills"] += 1
        if model.gen is not None and f["va"] & ~0xFFF not in counter_pages:
            model.advance(now())

    def on_lock(who):
        if who == "fault":
            w = model.vcpu_lock(now())
            per_pass[state["pass"]]["lock_wait_ns"] += w

    def on_marker(_kind, f):
        value = f["value"]
        phase, k = value >> 24, value & 0xFFFFFF
        model.advance(now())
        if phase == PH_PASS:
            state["pass"] = min(k, p.passes)
            if k == 1:
                for i in range(p.ndata):
                    n = len(vm.rmap.get(base + i, ()))
                    sptes_per_frame[n] = sptes_per_frame.get(n, 0) + 1
            if progress is not None:
                progress(k)
        if phase == PH_DONE:
            state["cut"] = model.stop()
        elif k >= 1:
            model.kick(now(), driver.steps())       # kswapd woken (if it is idle)

    m.events.subscribe(on_fill, (ev.TLB_FILL,))
    m.events.subscribe(on_marker, (ev.MARKER,))
    vm.mmu_lock.observer = on_lock
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()                 # no collector pauses inside the measured aging calls
    try:
        result = m.run()
    finally:
        vm.mmu_lock.observer = None
        if gc_was:
            gc.enable()
    wall = time.perf_counter() - t0
    out = bytes(m.output).decode("latin-1")
    if result.status != 0 or not out.endswith("PASS\n"):
        why = result.report or out.strip() or f"exit status {result.status}"
        raise ScenarioError(f"the aging guest failed under aging {variant}: {why}", 4)
    if touches() != len(truth.order) or phys.read32((host.current(ustat_index) << 12)
                                                    + ST_MAGIC) != MAGIC:
        raise ScenarioError("the aging guest's touch count is not the expected one", 4)
    want = 2 if p.layout == "multi" else 1
    if sptes_per_frame.get(want) != p.hot + p.cold:
        raise ScenarioError(f"after the warm-up the data frames have {sptes_per_frame} sptes, "
                            f"not {want} each (layout {p.layout})", 70)
    resident_end = sum(1 for i in candidates() if host.current(i) is not None)
    fig["hot_refaults"] = sum(1 for i in driver.refaulted if page_of[i] in hot)
    fig["refaults"] = len(driver.refaulted)
    st = aging.stats
    queries = fig["queries"]
    by = dict(vm.mmu_lock.by)
    run = {
        "variant": variant, "notifiers": era, "mode": p.mode, "layout": p.layout, "tlb": p.tlb,
        "hot": p.hot, "cold": p.cold, "stream": p.stream, "passes": p.passes,
        "limit": p.resident_limit, "batch": p.batch, "resident_end": resident_end,
        "costs_ns": dataclasses.asdict(p.costs),
        "active_op": "clear_flush_young" if era == "2008" else p.active_op,
        **fig,
        "mmu_lock_acquired": by.get("aging", 0),
        "mmu_lock_by": by,
        "lock_wait_us": round(model.vcpu_wait / 1000, 3),
        "lock_waits": model.vcpu_waits,
        "lock_wait_behind_aging_us": round(model.wait_by["aging"] / 1000, 3),
        "lock_wait_behind_evict_us": round(model.wait_by["evict"] / 1000, 3),
        "vcpu_lock_requests": model.vcpu_locks,
        "reclaim_wait_us": round(model.ager_wait / 1000, 3),
        "mmu_lock_held_aging_us": round(model.held["aging"] / 1000, 3),
        "mmu_lock_held_evict_us": round(model.held["evict"] / 1000, 3),
        "us_per_aged_page": round(1e6 * driver.wall_aging / queries, 3) if queries else 0.0,
        "us_per_aged_page_median": round(1e6 * statistics.median(driver.aging_walls), 3)
        if driver.aging_walls else 0.0,
        "model_ns_per_aged_page": round(model.aging_ns / queries, 1) if queries else 0.0,
        "aging_wall_s": round(driver.wall_aging, 4),
        "aging": st.as_dict(),
        "reclaim": dict(driver.stats),
        "reclaim_passes": model.passes,
        "reclaim_kicks_skipped": model.skipped_kicks,
        "reclaim_pass_cut": state["cut"],
        "sptes_per_frame": {str(k): v for k, v in sorted(sptes_per_frame.items())},
        "tlb_flushes": counters["tlb_flush"],
        "remote_flushes": counters["mmu_notifier_flush"],
        "tlb_fills": state["fills"],
        "exits": counters["exits"],
        "pf_fixed": counters["pf_fixed"],
        "pf_retry": counters["pf_retry"],
        "swap_in": counters["host_swap_in"],
        "vcpu_time_us": round(now() / 1000, 3),
        "reclaim_busy_us": round(model.busy / 1000, 3),
        "per_pass": [{"pass": d["pass_"], "queries": d["queries"], "false_old": d["false_old"],
                      "evicted": d["evicted"], "hot_evicted": d["hot_evicted"],
                      "lock_wait_us": round(d["lock_wait_ns"] / 1000, 3)} for d in per_pass],
        "wall_s": round(wall, 4),
        "peak_rss_mb": peak_rss_mb(),
    }
    return run


def run_many(params: AgingParams, variants, progress=None, executor=None) -> list:
    """Run the scenario under each variant; results in order. ``executor`` (x86shadow/
    executor.py, ``fresh_process=True``): every run a job in a process of its own; None: one
    after the other here."""
    params.check()
    if executor is not None:
        from .executor import map_in_order
        from .scenario import job_result
        results = map_in_order(executor, _aging_job, [(params, v) for v in variants],
                               done=(lambda job, _r: progress(job[1], "done"))
                               if progress else None)
        return [job_result(r) for r in results]
    runs = []
    for v in variants:
        if progress:
            progress(v, "start")
        runs.append(run_aging(params, v, progress=(lambda k, v=v: progress(v, f"pass {k}"))
                              if progress else None))
        if progress:
            progress(v, "done")
    return runs


def _aging_job(job):
    """One aging run in an executor's worker -> ("ok", record) or ("error", (message, status))."""
    params, variant = job
    try:
        return "ok", run_aging(params, variant)
    except ScenarioError as e:
        return "error", (str(e), e.status)
    except Exception as e:                         # noqa: BLE001 - reported by the parent
        return "error", (f"internal error in the run of variant {variant}: "
                         f"{type(e).__name__}: {e}", 70)


# ---------------------------------------------------------------------------------- output
SHOWN = (
    ("notifiers", "notifiers (era)"),
    ("queries", "aging queries"),
    ("young", "  answered young"),
    ("false_old", "false old (used, answered old)"),
    ("false_old_hot", "  of hot pages"),
    ("false_young", "false young"),
    ("evicted", "pages evicted"),
    ("hot_evicted", "hot pages evicted"),
    ("hot_refaults", "hot pages faulted back"),
    ("mmu_lock_acquired", "mmu_lock taken by aging"),
    ("lock_waits", "vCPU faults that waited"),
    ("lock_wait_us", "vCPU wait for mmu_lock (us)"),
    ("lock_wait_behind_aging_us", "  behind aging (us)"),
    ("lock_wait_behind_evict_us", "  behind evictions (us)"),
    ("remote_flushes", "remote TLB flushes"),
    ("model_ns_per_aged_page", "model ns / aged page"),
    ("us_per_aged_page", "measured us / aged page"),
    ("us_per_aged_page_median", "  median of the calls (us)"),
)


def parse_costs(items) -> Costs:
    """``--cost NAME=NS`` (repeatable) -> Costs; ScenarioError naming what is wrong."""
    import dataclasses
    names = [f.name for f in dataclasses.fields(Costs)]
    changes = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise ScenarioError(f"--cost {item!r}: write NAME=NS with NAME one of "
                                f"{', '.join(names)}")
        try:
            ns = int(value, 0)
        except ValueError:
            raise ScenarioError(f"--cost {item!r}: {value!r} is not a number of ns") from None
        if ns < 0:
            raise ScenarioError(f"--cost {item!r}: a cost cannot be negative")
        changes[name] = ns
    return dataclasses.replace(Costs(), **changes)


def describe(p: AgingParams) -> str:
    return (f"aging scenario: mode {p.mode}, layout {p.layout}, {p.hot} hot + {p.cold} cold "
            f"pages, {p.stream} new pages a pass, {p.passes} passes, TLB {p.tlb}, resident "
            f"limit {p.resident_limit}, active list aged with {p.active_op}")


def table(runs: list):
    from rich.table import Table
    t = Table(title="per aging variant", title_justify="left")
    t.add_column("figure")
    for r in runs:
        t.add_column(r["variant"], justify="right")
    for key, head in SHOWN:
        t.add_row(head, *[_fmt(r[key]) for r in runs])
    t.add_section()
    t.add_row("reclaim passes (kicks while busy)",
              *[f"{r['reclaim_passes']} ({r['reclaim_kicks_skipped']})" for r in runs])
    t.add_row("resident data pages at the end / limit",
              *[f"{r['resident_end']} / {r['limit']}" for r in runs])
    t.add_row("skipped multi-entry rmaps", *[_fmt(r["aging"]["skipped"]) for r in runs])
    t.add_row("rmaps read under mmu_lock (fallback)",
              *[_fmt(r["aging"]["fallback"]) for r in runs])
    t.add_row("sptes per data frame (warm-up)",
              *[", ".join(f"{k}: {v}" for k, v in r["sptes_per_frame"].items()) for r in runs])
    t.add_row("wall time (s)", *[_fmt(r["wall_s"]) for r in runs])
    return t


def write_json(path, runs: list) -> None:
    """``--json``: ``{"scenario": "aging", "runs": [...]}`` (docs/AGING.md)."""
    _write_json(path, runs, "aging")


def plot(path, runs: list, params: AgingParams) -> None:
    """Hot pages evicted (cumulative) pass by pass, one line per variant; and the vCPU's wait
    for mmu_lock per variant."""
    check_plot(path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    styles = ["-", "--", "-.", ":"]
    n = len(runs)
    for i, r in enumerate(runs):
        width = 1.2 + (3.0 * (n - 1 - i) / (n - 1) if n > 1 else 0)
        acc, ys = 0, []
        for d in r["per_pass"]:
            acc += d["hot_evicted"]
            ys.append(acc)
        ax.plot([d["pass"] for d in r["per_pass"]], ys, marker="o", markersize=3 + width,
                linewidth=width, linestyle=styles[i % len(styles)], label=r["variant"], alpha=0.8)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("pass (0 = warm-up)")
    ax.set_ylabel("hot pages evicted (cumulative)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    names = [r["variant"] for r in runs]
    behind_aging = [r["lock_wait_behind_aging_us"] for r in runs]
    bx.bar(names, behind_aging, color="tab:red", alpha=0.8, label="behind aging")
    bx.bar(names, [r["lock_wait_behind_evict_us"] for r in runs], bottom=behind_aging,
           color="tab:orange", alpha=0.6, label="behind evictions")
    bx.set_ylabel("vCPU wait for mmu_lock (virtual us)")
    bx.legend(fontsize=8)
    bx.tick_params(axis="x", labelrotation=30, labelsize=8)
    bx.grid(True, axis="y", alpha=0.3)
    fig.suptitle(describe(params).replace("aging scenario: ", ""), fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise ScenarioError(f"cannot write plot {path!r}: {e.strerror}") from None
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------- the command
def cli_main(args) -> int:
    """``x86shadow scenario aging``; ScenarioError for bad input (cli.py prints it)."""
    import sys

    from rich.console import Console

    from .outputs import OutputError, check_writable
    params = AgingParams(mode=args.mode, layout=args.layout, hot=args.hot, cold=args.cold,
                         stream=args.stream, passes=args.passes, tlb=args.tlb,
                         limit=args.limit, batch=args.batch, active_op=args.active_op,
                         ram_mib=args.ram, costs=parse_costs(args.cost))
    params.check()
    variants = list(VARIANTS) if args.compare else [args.variant]
    if args.plot:
        check_plot(args.plot)
    try:
        for path, what in ((args.json, "JSON"), (args.plot, "plot")):
            if path:
                check_writable(path, what)
    except OutputError as e:
        raise ScenarioError(str(e)) from None
    con = Console(width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True)
    from .executor import ExecutorError, compare_executor
    from .progress import progress as show_progress
    try:
        ex = compare_executor(args)
    except ExecutorError as e:
        raise ScenarioError(str(e)) from None
    with show_progress(len(variants), "aging", args.quiet) as bar, ex:
        def progress(name, what):
            if what == "done":
                bar.advance()
            bar.describe(f"{name}: {what}")
        runs = run_many(params, variants, progress=progress,
                        executor=ex if args.compare else None)
    con.print(describe(params))
    con.print(table(runs))
    if args.json:
        try:
            write_json(args.json, runs)
        except OSError as e:
            raise ScenarioError(f"cannot write {args.json!r}: {e.strerror}") from None
        err.print(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, runs, params)
        err.print(f"wrote {args.plot}")
    return 0


__all__ = ["AgingParams", "Costs", "TimeModel", "run_aging", "run_many", "table", "write_json",
           "plot", "describe", "cli_main", "VARIANTS", "LAYOUTS"]
