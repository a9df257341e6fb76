"""Lockless shadow-page-table walks and the freeing of zapped shadow pages (docs/EXPLORE.md).

A lockless walker reads sptes without ``kvm->mmu_lock``, so a shadow page it is reading may be
zapped under it; what keeps the page's memory alive until the walker is done is the *freeing
scheme* of ``kvm_mmu_commit_zap_page``. The schemes KVM had or discussed, selectable per VM
(``VmMmu(lockless=SCHEME)``):

* ``irq`` -- Linux 3.5+ (c142786c6291 "KVM: MMU: Don't use RCU for lockless shadow walking";
  read in the 3.6 tree, arch/x86/kvm/mmu.c ``walk_shadow_page_lockless_begin/end``, and 6.18
  mmu.c l.560 and ``kvm_mmu_commit_zap_page`` l.2754): the walker disables interrupts and sets
  ``vcpu->mode = READING_SHADOW_PAGE_TABLES``; ``kvm_flush_remote_tlbs`` sends its IPI to every
  vCPU whose mode is not OUTSIDE_GUEST_MODE (``kvm_request_needs_ipi``, KVM_REQ_TLB_FLUSH has
  KVM_REQUEST_WAIT) and waits for it, which a walker acknowledges only when it re-enables
  interrupts; then the pages are freed at once. Bounded: nothing is ever deferred. Only vCPUs
  can be waited for, so a walker outside vCPU context is not protected.
* ``rcu-readers`` -- Linux 3.1-3.4 (c2a2ac2b563c "KVM: MMU: lockless walking shadow page table";
  read in the 3.4 tree): begin = ``rcu_read_lock`` + ``atomic_inc(&kvm->arch.reader_counter)``;
  commit_zap flushes, then frees at once if ``reader_counter`` is 0, else hands the pages to
  ``call_rcu`` (freed after a grace period). Unbounded while readers keep coming.
* ``rcu-always`` -- Xiao Guangrong's 2013 "[PATCH v2 12/15] KVM: MMU: allow locklessly access
  shadow page table out of vcpu thread" (never merged): vCPU walkers stay ``irq``; a walker
  outside vCPU context (the lockless write protection of KVM_GET_DIRTY_LOG) takes the RCU read
  side and sets ``kvm->arch.rcu_free_shadow_page``, and while it is set *every* free goes to
  ``call_rcu``. Marcelo Tosatti's objection (2013-10-07): "This is unbounded" (RCU's
  checklist: call_rcu users must limit their update rate).
* ``rcu-rate-limit`` -- his first alternative: at most ``limit`` pages handed to call_rcu per
  grace period; past it the freer waits for the next grace period to start (backlog <= 2 *
  limit: the pages of the grace period in progress and of the one waiting to start).
* ``rcu-sync`` -- his second: ``synchronize_rcu`` when the backlog would pass ``bound`` (the
  freer waits until a grace period that started after it has ended, which frees everything
  queued before). Caveat: KVM frees under mmu_lock, a spinlock, where synchronize_rcu may not
  sleep; the model lets the freer wait with the lock held (its walkers take no lock).

RCU is modelled by ``Rcu``: read-side sections, ``call_rcu`` callbacks and grace periods that
end only when every reader present at their start has left (a long reader delays them).

Entry points are stepped (x86shadow/steps.py) so the explorer can interleave them with the
real zap path: ``VmMmu.commit_zap_steps`` calls ``Lockless.commit_steps``; the walkers are
``spte_walk_steps`` (the lockless spte read of fast_page_fault / get_mmio_spte on a vCPU) and
``dirty_log_steps`` (write protection for dirty logging, outside any vCPU). Every lockless
read or write of a shadow page goes through ``read_spte`` / ``write_spte``, which raise
``FreedShadowPageAccess`` on a freed page.

``breaks`` (explorer and tests only; each read in one place): ``free-before-flush`` (commit
frees, then flushes), ``ipi-in-guest-only`` (the flush IPIs only IN_GUEST_MODE vCPUs, as for a
request without KVM_REQUEST_WAIT: a walker in READING_SHADOW_PAGE_TABLES is not waited for),
``free-ignoring-readers`` (rcu-readers frees at once even with readers).
"""
from __future__ import annotations

from ..steps import Step
# vcpu->mode values are the vCPUs' own (mmu/requests.py)
from .requests import IN_GUEST_MODE, OUTSIDE_GUEST_MODE, READING_SHADOW_PAGE_TABLES, REQ_TLB_FLUSH
from .spte import SPTE_P, SPTE_W

SCHEMES = {
    "irq": "3.5+: walkers disable IRQs and set READING_SHADOW_PAGE_TABLES; the zap's flush "
           "waits for them, then frees at once",
    "rcu-readers": "3.1-3.4: RCU read side + reader_counter; call_rcu only while a reader is "
                   "active",
    "rcu-always": "2013 unmerged patch: call_rcu for every free while a walker outside vCPU "
                  "context may run",
    "rcu-rate-limit": "at most LIMIT pages to call_rcu per grace period, then wait for one",
    "rcu-sync": "synchronize_rcu when the backlog would pass BOUND",
}
BREAKS = ("free-before-flush", "ipi-in-guest-only", "free-ignoring-readers")
DEFAULT_LIMIT = 4              # rcu-rate-limit: pages per grace period
DEFAULT_BOUND = 8              # rcu-sync: pages



class FreedShadowPageAccess(Exception):
    """A lockless walker read or wrote a shadow page after it was freed."""


class Rcu:
    """The grace-period model: read-side sections, call_rcu callbacks, grace periods.

    A grace period starts (``advance``) when callbacks are queued or a synchronize_rcu waits;
    it takes the callbacks queued so far and the set of readers present; it ends (the next
    ``advance`` that finds all of those readers gone) by running its callbacks. Readers that
    arrive later do not delay it; a reader present at its start delays it as long as it
    stays."""

    def __init__(self, counters=None):
        self.counters = counters if counters is not None else {"rcu_grace_periods": 0}
        self.readers: dict = {}         # who -> grace periods completed when it entered
        self.queued: list = []          # callbacks no grace period has taken yet
        self.gp_callbacks = None        # callbacks of the grace period in progress (None: none)
        self.gp_waits_for = frozenset()  # readers the grace period in progress waits for
        self.started = 0
        self.completed = 0
        self.sync_wanted = 0            # synchronize_rcu callers waiting for a grace period

    def read_lock(self, who) -> None:
        if who in self.readers:
            raise RuntimeError(f"{who} entered an RCU read-side section twice")
        self.readers[who] = self.completed

    def read_unlock(self, who) -> None:
        del self.readers[who]

    def call_rcu(self, fn) -> None:
        self.queued.append(fn)

    def can_advance(self) -> bool:
        if self.gp_callbacks is not None:
            return not any(r in self.readers for r in self.gp_waits_for)
        return bool(self.queued or self.sync_wanted)

    def advance(self):
        """One step of the grace-period machinery: "start", "end" or None (nothing to do)."""
        if self.gp_callbacks is not None:
            if any(r in self.readers for r in self.gp_waits_for):
                return None
            callbacks, self.gp_callbacks = self.gp_callbacks, None
            self.gp_waits_for = frozenset()
            self.completed += 1
            self.counters["rcu_grace_periods"] += 1
            for fn in callbacks:
                fn()
            return "end"
        if self.queued or self.sync_wanted:
            self.gp_callbacks, self.queued = self.queued, []
            self.gp_waits_for = frozenset(self.readers)
            self.started += 1
            self.sync_wanted = 0
            return "start"
        return None

    def synchronize_steps(self, who: str):
        """synchronize_rcu: wait until a grace period that starts after this call has ended."""
        target = self.started + 1
        self.sync_wanted += 1
        yield Step(f"{who}: synchronize_rcu returns (grace period {target} ended)",
                   ready=lambda: self.completed >= target)

    def steps(self):
        """The grace-period machinery as an actor that never ends (the explorer runs it as a
        daemon): each step starts or ends one grace period."""
        while True:
            yield Step("grace period: " + ("end" if self.gp_callbacks is not None else "start"),
                       ready=self.can_advance)
            self.advance()


class Lockless:
    """The lockless walks and the freeing scheme of one VM (``VmMmu.lockless``)."""

    def __init__(self, vm, scheme: str, limit: int = DEFAULT_LIMIT, bound: int = DEFAULT_BOUND,
                 breaks=()):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown lockless scheme {scheme!r} (choose from "
                             f"{', '.join(SCHEMES)})")
        for b in breaks:
            if b not in BREAKS:
                raise ValueError(f"unknown break {b!r} (choose from {', '.join(BREAKS)})")
        if limit < 1 or bound < 1:
            raise ValueError("the rate limit and the backlog bound must be at least 1")
        self.vm = vm
        self.scheme = scheme
        self.limit = limit
        self.bound = bound
        self.breaks = frozenset(breaks)
        self.rcu = Rcu(vm.counters)
        self.mode: dict = {}            # vCPU id -> vcpu->mode (absent: OUTSIDE_GUEST_MODE)
        self.walks_ended: dict = {}     # vCPU id -> lockless walks it ended (IPI acks)
        self.reader_counter = 0         # 3.1-3.4 kvm->arch.reader_counter
        self.rcu_free_shadow_page = 0   # 2013: walkers outside vCPU context (a flag in KVM)
        self.deferred: list = []        # zapped, flushed, waiting for a grace period
        self.peak_backlog = 0
        self.window_queued = 0          # rcu-rate-limit: pages queued since the last GP start
        self.window_gp = 0

    # ------------------------------------------------------------------ the bound
    def backlog_bound(self):
        """The most pages the scheme ever leaves waiting for a grace period (None: no bound)."""
        if self.scheme == "irq":
            return 0
        if self.scheme == "rcu-rate-limit":
            return 2 * self.limit
        if self.scheme == "rcu-sync":
            return self.bound
        return None

    @property
    def backlog(self) -> int:
        return len(self.deferred)

    # ------------------------------------------------------------------ walkers
    def vcpu_mode(self, vcpu) -> str:
        return self.mode.get(vcpu.id, OUTSIDE_GUEST_MODE)

    def walk_begin(self, vcpu) -> None:
        """walk_shadow_page_lockless_begin on a vCPU: 3.5+ (and the vCPU walkers of the RCU
        alternatives) local_irq_disable + smp_store_mb(vcpu->mode, READING_SHADOW_PAGE_TABLES);
        3.1-3.4 rcu_read_lock + atomic_inc(reader_counter)."""
        if self.scheme == "rcu-readers":
            self.rcu.read_lock(f"vcpu{vcpu.id}")
            self.reader_counter += 1
        else:
            self.mode[vcpu.id] = READING_SHADOW_PAGE_TABLES

    def walk_end(self, vcpu) -> None:
        """walk_shadow_page_lockless_end: smp_store_release(vcpu->mode, OUTSIDE_GUEST_MODE) +
        local_irq_enable (the pending flush IPI is acknowledged now); 3.1-3.4 atomic_dec +
        rcu_read_unlock."""
        if self.scheme == "rcu-readers":
            self.reader_counter -= 1
            self.rcu.read_unlock(f"vcpu{vcpu.id}")
        else:
            self.mode.pop(vcpu.id, None)
            self.walks_ended[vcpu.id] = self.walks_ended.get(vcpu.id, 0) + 1

    def outside_begin(self, who: str) -> None:
        """A walker outside vCPU context. rcu-* schemes: kvm_mmu_rcu_free_page_begin of the 2013
        patch (rcu_read_lock, rcu_free_shadow_page = true; rcu-readers counts it as a reader).
        irq: nothing can protect it -- kvm_flush_remote_tlbs only waits for vCPUs (which is why
        3.5+ KVM walks shadow pages outside a vCPU only under mmu_lock)."""
        if self.scheme == "irq":
            return
        self.rcu.read_lock(who)
        if self.scheme == "rcu-readers":
            self.reader_counter += 1
        else:
            self.rcu_free_shadow_page += 1

    def outside_end(self, who: str) -> None:
        if self.scheme == "irq":
            return
        if self.scheme == "rcu-readers":
            self.reader_counter -= 1
        else:
            self.rcu_free_shadow_page -= 1
        self.rcu.read_unlock(who)

    @staticmethod
    def read_spte(sp, idx: int, who: str) -> int:
        """mmu_spte_get_lockless: the walker reads sp's memory."""
        if sp.freed:
            raise FreedShadowPageAccess(f"{who} read {sp}[{idx}] after the page was freed")
        return sp.spt[idx]

    @staticmethod
    def write_spte(sp, idx: int, value: int, who: str) -> None:
        if sp.freed:
            raise FreedShadowPageAccess(f"{who} wrote {sp}[{idx}] after the page was freed")
        sp.spt[idx] = value

    # ------------------------------------------------------------------ freeing
    def _ipi_targets(self):
        """kvm_request_needs_ipi for KVM_REQ_TLB_FLUSH (6.18 kvm_main.c l.186): with
        KVM_REQUEST_WAIT every vCPU not OUTSIDE_GUEST_MODE; without it (break
        ``ipi-in-guest-only``) only IN_GUEST_MODE ones. Returns {vcpu id: walks ended}."""
        in_guest_only = "ipi-in-guest-only" in self.breaks
        out = {}
        for v in self.vm.vcpus:
            mode = self.vcpu_mode(v)
            if mode == IN_GUEST_MODE or (mode != OUTSIDE_GUEST_MODE and not in_guest_only):
                out[v.id] = self.walks_ended.get(v.id, 0)
        return out

    def flush_remote_tlbs_steps(self, who: str):
        """kvm_flush_remote_tlbs as the zap uses it: request a TLB flush on every vCPU, IPI the
        vCPUs that need it and wait until each acknowledged (a vCPU in
        READING_SHADOW_PAGE_TABLES acknowledges when its walk ends, with interrupts back on).
        The 3.1-3.4 scheme sets no READING mode: its flush waits for nobody."""
        self.vm.request_all(REQ_TLB_FLUSH)
        targets = self._ipi_targets()
        if not targets:
            return
        vcpus = ", ".join(f"vcpu{i}" for i in targets)

        def acked():
            # an IN_GUEST_MODE vCPU exits at once; a walker acknowledges when its walk ends
            return all(self.mode.get(i) != READING_SHADOW_PAGE_TABLES
                       or self.walks_ended.get(i, 0) != n for i, n in targets.items())
        yield Step(f"{who}: remote flush: IPIs acknowledged by {vcpus}", ready=acked)

    def _free_now(self, pages) -> None:
        for sp in pages:
            sp.freed = True

    def _free_deferred(self, pages) -> None:
        """The call_rcu callback (free_pages_rcu in 3.1-3.4)."""
        for sp in pages:
            sp.freed = True
            self.deferred.remove(sp)

    def _call_rcu(self, pages) -> None:
        pages = list(pages)
        self.deferred.extend(pages)
        self.vm.counters["mmu_deferred_free"] += len(pages)
        if len(self.deferred) > self.peak_backlog:
            self.peak_backlog = len(self.deferred)
            self.vm.counters["mmu_deferred_peak"] = self.peak_backlog
        self.rcu.call_rcu(lambda: self._free_deferred(pages))

    def commit_steps(self, pages, who: str = "zapper"):
        """kvm_mmu_commit_zap_page for ``pages`` (already unlinked by prepare_zap_page): the
        flush, then the free the scheme chooses (each decision its own step)."""
        n = f"{len(pages)} page(s)"
        if "free-before-flush" in self.breaks:
            yield Step(f"{who}: free {n} at once (before the flush)")
            self._free_now(pages)
            yield Step(f"{who}: remote flush (after the free)")
            yield from self.flush_remote_tlbs_steps(who)
            return
        yield from self.flush_remote_tlbs_steps(who)
        scheme = self.scheme
        if scheme == "irq":
            yield Step(f"{who}: free {n} at once")
            self._free_now(pages)
            return
        if scheme == "rcu-readers":
            yield Step(f"{who}: read reader_counter: non-zero -> call_rcu, else free {n}"
                       + (" (broken: free whatever it says)"
                          if "free-ignoring-readers" in self.breaks else ""))
            if self.reader_counter and "free-ignoring-readers" not in self.breaks:
                self._call_rcu(pages)          # 3.4: kvm_mmu_isolate_pages + call_rcu
            else:
                self._free_now(pages)
            return
        yield Step(f"{who}: read rcu_free_shadow_page: set -> call_rcu, else free {n}")
        if not self.rcu_free_shadow_page:
            self._free_now(pages)
            return
        if scheme == "rcu-always":
            self._call_rcu(pages)              # every free while the flag is set
            return
        # the bounded schemes hand the pages over in chunks of at most LIMIT / BOUND, so that a
        # large batch (a root zapped with its children) keeps the bound too
        rcu = self.rcu
        size = self.limit if scheme == "rcu-rate-limit" else self.bound
        for at in range(0, len(pages), size):
            chunk = pages[at:at + size]
            if scheme == "rcu-rate-limit":
                if rcu.started != self.window_gp:
                    self.window_gp, self.window_queued = rcu.started, 0
                if self.window_queued and self.window_queued + len(chunk) > self.limit:
                    target = rcu.started + 1
                    rcu.sync_wanted += 1
                    yield Step(f"{who}: rate limit ({self.limit} per grace period) reached: "
                               "wait until the next grace period starts",
                               ready=lambda: rcu.started >= target)
                    self.window_gp, self.window_queued = rcu.started, 0
                self.window_queued += len(chunk)
            elif self.backlog + len(chunk) > self.bound:
                yield from rcu.synchronize_steps(who)
                if not self.rcu_free_shadow_page:
                    self._free_now(pages[at:])
                    return
            self._call_rcu(chunk)


def spte_walk_steps(vcpu, va: int, who: str | None = None):
    """A fast-page-fault-style lockless spte read on a vCPU (6.18 get_sptes_lockless /
    fast_page_fault's walk; 3.x walk_shadow_page_get_mmio_spte): begin, one step per shadow
    level (the spte and, with it, the child it points to), end. Returns the leaf spte (0 if the
    walk stopped at a non-present entry)."""
    lk = vcpu.vm.lockless
    who = who or f"vcpu{vcpu.id} lockless walk"
    yield Step(f"{who}: walk_shadow_page_lockless_begin")
    lk.walk_begin(vcpu)
    node, level = vcpu.root, vcpu.root_level
    spte = 0
    if node is not None and level == 3:
        node, level = node.children[(va >> 30) & 3], 2   # the PAE root is never freed
    while node is not None:
        idx = (va >> (12 + 9 * (level - 1))) & 511
        yield Step(f"{who}: read {node}[{idx}] (level {level})")
        spte = lk.read_spte(node, idx, who)
        if level == 1 or not spte & SPTE_P:
            break
        node, level = node.children[idx], level - 1
    yield Step(f"{who}: walk_shadow_page_lockless_end")
    lk.walk_end(vcpu)
    return spte


def dirty_log_steps(vm, gfns, who: str = "dirty-log"):
    """Write protection for dirty logging from outside any vCPU (KVM_GET_DIRTY_LOG without
    mmu_lock, as Xiao's 2013 series did it): for each gfn, read its rmap (the lockless rmap
    walk), then clear W in each spte found, one step each; finally request the TLB flush.
    Returns the sptes write-protected."""
    lk = vm.lockless
    yield Step(f"{who}: begin (outside vCPU context)")
    lk.outside_begin(who)
    protected = 0
    for gfn in gfns:
        yield Step(f"{who}: read rmap of gfn {gfn:#x}")
        entries = tuple(vm.rmap.get(gfn, ()))
        for sp, idx in entries:
            yield Step(f"{who}: write-protect {sp}[{idx}]")
            spte = lk.read_spte(sp, idx, who)
            if spte & SPTE_W:
                lk.write_spte(sp, idx, spte & ~SPTE_W, who)
                protected += 1
    yield Step(f"{who}: end, flush")
    lk.outside_end(who)
    if protected:
        vm.request_all(REQ_TLB_FLUSH)
    return protected
