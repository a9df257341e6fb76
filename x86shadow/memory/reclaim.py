"""An LRU-like host reclaim over guest RAM: the "kswapd" of the model (docs/AGING.md).

Two lists of the VMM's guest RAM pages, active and inactive, as Linux keeps them (mm/vmscan.c):
a page that becomes resident (first touched, or swapped back in) goes to the head of the
inactive list (Linux since 5.9 starts anonymous pages there; 2.6.27 put them on the active
list); one pass reclaims down to ``limit`` resident pages (or ``nr_to_reclaim`` pages,
SWAP_CLUSTER_MAX, without a limit):

* while the inactive list is shorter than the active one (inactive_is_low with a ratio of 1),
  ``shrink_active_list`` ages a batch from the active tail: young -> back to the active head
  (2.6.27 shrink_active_list with reclaim_mapped keeps referenced mapped pages active),
  old -> the inactive head;
* then ``shrink_inactive_list`` / ``shrink_page_list`` takes a batch from the inactive tail:
  the reference check (folio_referenced / 2.6.27 page_referenced -> ``clear_flush_young``) --
  young -> activated; old -> evicted with ``HostMM.swap_out`` (try_to_unmap_one's unmap under
  the notifiers, the writeback, the free);
* and so on until enough pages went or twice the resident pages were checked.

The aging calls go through the MMU notifiers: ``clear_flush_young`` for the reference check;
for the active list ``clear_young`` (MGLRU's ptep_clear_young_notify, mm/vmscan.c of 6.18) in
the modern era and ``clear_flush_young`` in the 2008 one (2.6.27 had nothing else), or
``test_young`` when asked (``active_op``). What KVM answers is the aging variant's business
(mmu/aging.py).

Each operation is one step of the generator ``steps()`` (a ``Step`` record: what was done, the
answer, what the KVM notifier's aging did, mmu_lock acquisitions, zapped sptes, flushes, the
measured time of the notifier calls), so a time model can run the driver "on another CPU",
interleaved with the vCPU (x86shadow/aging_scenario.py); ``run_pass()`` runs one pass at once
(the host schedule's ``lru`` operation, memory/schedule.py).
"""
from __future__ import annotations

import time
import weakref
from collections import deque
from typing import NamedTuple

from .host import PAGE

SWAP_CLUSTER_MAX = 32                 # include/linux/swap.h
AGING_OPS = ("clear_young", "test_young", "clear_flush_young")


class Step(NamedTuple):
    kind: str            # "age" (active list), "ref" (reference check), "evict"
    index: int           # page of the guest RAM mapping
    result: bool         # young (age, ref) / swapped out (evict)
    op: str              # the notifier operation (age, ref) or "swap_out"
    record: object       # the KVM notifier's aging CallRecord (age, ref), else None
    locks: int           # mmu_lock acquisitions during the step (every taker)
    zapped: int          # sptes the notifiers zapped
    flushes: int         # remote TLB flushes the notifiers made
    wall: float          # seconds the notifier calls took


class LruReclaim:
    """The reclaim of ``host`` (memory.host.HostMM) under ``vm`` (the shadow MMU: its rmap names
    the candidate pages when ``candidates`` is None, and its mmu_lock is counted).

    ``candidates()``: the page indexes the host may reclaim (default: the pages the shadow MMU
    maps now, and those on the lists). ``limit``: resident candidate pages to reclaim down to
    (None: ``nr_to_reclaim`` pages a pass). ``batch``: pages shrink_active_list ages at once.
    ``observer(step)``: told of every step."""

    def __init__(self, host, vm=None, *, candidates=None, limit=None,
                 nr_to_reclaim: int = SWAP_CLUSTER_MAX, batch: int = SWAP_CLUSTER_MAX,
                 active_op: str | None = None, observer=None):
        if limit is not None and limit < 0:
            raise ValueError(f"reclaim limit {limit}: must be at least 0")
        if batch < 1 or nr_to_reclaim < 1:
            raise ValueError("reclaim batch and nr_to_reclaim must be at least 1")
        if host.era == "2008":
            if active_op not in (None, "clear_flush_young"):
                raise ValueError("the 2008 mm (2.6.27) ages with clear_flush_young only")
            active_op = "clear_flush_young"
        active_op = active_op or "clear_young"
        if active_op not in AGING_OPS:
            raise ValueError(f"unknown aging operation {active_op!r} (choose from "
                             f"{', '.join(AGING_OPS)})")
        self.host = host
        self.vm = vm
        self.candidates = candidates or self._mapped_pages
        self.limit = limit
        self.nr_to_reclaim = nr_to_reclaim
        self.batch = batch
        self.active_op = active_op
        self.ref_op = "clear_flush_young"
        self.observer = observer
        self.active = deque()              # head = left
        self.inactive = deque()
        self.where = {}                    # index -> "a" / "i"
        self.evicted = set()               # swapped out by this driver, not back yet
        self.stats = {k: 0 for k in (
            "passes", "queries", "young", "aged_active", "rotated", "deactivated",
            "ref_checks", "activated", "evicted", "evict_failed", "refaults", "kept")}
        self.wall_aging = 0.0              # seconds spent in the aging calls
        self.aging_walls = []              # ... each of them
        self.refaulted = []                # indexes swapped back in, in order (refill)
        self.keep = ()                     # the current pass's pages in use (run_pass)

    # ------------------------------------------------------------------ the lists
    def _mapped_pages(self):
        vm = self.vm
        out = set(self.where)
        if vm is not None:
            to_index = vm.memslots.gfn_to_index
            for gfn in vm.rmap:
                i = to_index(gfn)
                if i is not None:
                    out.add(i)
        return sorted(out)

    def resident(self) -> int:
        return len(self.active) + len(self.inactive)

    def refill(self) -> None:
        """New resident pages to the inactive head (lru_cache_add); pages that left (swapped
        out by someone else, unmapped) off the lists."""
        host = self.host
        where = self.where
        for lst in (self.active, self.inactive):
            gone = [i for i in lst if host.current(i) is None]
            for i in gone:
                lst.remove(i)
                del where[i]
        for index in self.candidates():
            if index in where or host.current(index) is None:
                continue
            self.inactive.appendleft(index)
            where[index] = "i"
            if index in self.evicted:
                self.evicted.discard(index)
                self.stats["refaults"] += 1
                self.refaulted.append(index)

    # ------------------------------------------------------------------ one pass
    def run_pass(self, keep=()) -> int:
        """One reclaim pass at once; the number of pages evicted. ``keep``: page indexes the
        guest is using right now (in a vCPU's TLB), treated as referenced without asking."""
        before = self.stats["evicted"]
        for _ in self.steps(keep):
            pass
        return self.stats["evicted"] - before

    def steps(self, keep=()):
        """One reclaim pass as a generator of Steps (each operation done when it is yielded);
        pages in ``keep`` are neither aged nor evicted in this pass (see run_pass)."""
        self.keep = keep
        self.refill()
        self.stats["passes"] += 1
        resident = self.resident()
        need = resident - self.limit if self.limit is not None else min(self.nr_to_reclaim,
                                                                         resident)
        scanned = 0
        while need > 0 and scanned < 2 * resident:
            if not self.inactive or len(self.inactive) < len(self.active):
                yield from self._shrink_active()
                if not self.inactive:
                    break
            # shrink_inactive_list: a batch from the inactive tail
            for _ in range(min(self.batch, len(self.inactive))):
                if need <= 0:
                    break
                index = self.inactive.pop()
                if index in keep:
                    self.active.appendleft(index)
                    self.where[index] = "a"
                    self.stats["kept"] += 1
                    scanned += 1
                    continue
                step = self._query("ref", index, self.ref_op)
                scanned += 1
                self.stats["ref_checks"] += 1
                if step.result:
                    self.active.appendleft(index)
                    self.where[index] = "a"
                    self.stats["activated"] += 1
                    yield self._told(step)
                    continue
                del self.where[index]
                yield self._told(step)
                step = self._evict(index)
                if step.result:
                    need -= 1
                yield self._told(step)

    def _shrink_active(self):
        for _ in range(min(self.batch, len(self.active))):
            index = self.active.pop()
            if index in self.keep:
                self.active.appendleft(index)
                self.stats["kept"] += 1
                continue
            step = self._query("age", index, self.active_op)
            self.stats["aged_active"] += 1
            if step.result:
                self.active.appendleft(index)
                self.stats["rotated"] += 1
            else:
                self.inactive.appendleft(index)
                self.where[index] = "i"
                self.stats["deactivated"] += 1
            yield self._told(step)

    def _told(self, step: Step) -> Step:
        if self.observer is not None:
            self.observer(step)
        return step

    # ------------------------------------------------------------------ the operations
    def _counts(self):
        c = self.host.counters
        lock = self.vm.mmu_lock.acquired if self.vm is not None else 0
        return lock, c.get("mmu_notifier_zapped", 0), c.get("mmu_notifier_flush", 0)

    def _record(self):
        for n in self.host.notifiers:
            aging = getattr(n, "aging", None)
            if aging is not None:
                return aging.last
        return None

    def _query(self, kind: str, index: int, op: str) -> Step:
        host = self.host
        lock0, zap0, flush0 = self._counts()
        t0 = time.perf_counter()
        if op == "clear_flush_young":
            young = host.clear_flush_young(index)
        else:
            hva = host.hva(index)
            young = False
            for n in host.notifiers:
                young |= bool(getattr(n, op)(hva, hva + PAGE))
        wall = time.perf_counter() - t0
        self.wall_aging += wall
        self.aging_walls.append(wall)
        lock1, zap1, flush1 = self._counts()
        self.stats["queries"] += 1
        self.stats["young"] += young
        return Step(kind, index, bool(young), op, self._record(), lock1 - lock0, zap1 - zap0,
                    flush1 - flush0, wall)

    def _evict(self, index: int) -> Step:
        lock0, zap0, flush0 = self._counts()
        t0 = time.perf_counter()
        ok = self.host.swap_out(index)        # the answer was asked already (page_referenced)
        wall = time.perf_counter() - t0
        lock1, zap1, flush1 = self._counts()
        if ok:
            self.evicted.add(index)
            self.stats["evicted"] += 1
        else:
            self.stats["evict_failed"] += 1
        return Step("evict", index, ok, "swap_out", None, lock1 - lock0, zap1 - zap0,
                    flush1 - flush0, wall)


_DRIVERS = weakref.WeakKeyDictionary()


def lru_for(host, vm=None) -> LruReclaim:
    """The reclaim driver of ``host`` (one per host, kept across passes: the host schedule's
    ``lru`` operation)."""
    d = _DRIVERS.get(host)
    if d is None:
        d = _DRIVERS[host] = LruReclaim(host, vm)
    return d
