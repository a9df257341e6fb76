"""KVM's side of the MMU notifiers (virt/kvm/kvm_main.c ``kvm_mmu_notifier_*``), two eras:

* ``2008`` -- Linux 2.6.27 / 2.6.28 (read in the 2.6.28 tree, virt/kvm/kvm_main.c and
  arch/x86/kvm/mmu.c): ``mmu_notifier_seq`` / ``mmu_notifier_count``; ``invalidate_page``
  (under mmu_lock seq++ and unmap the hva, flush after the unlock); ``invalidate_range_start``
  (count++ and unmap every page, flush after the unlock); ``invalidate_range_end`` (seq++ then
  count--); ``clear_flush_young`` (age under mmu_lock, flush after the unlock if young); no
  ``release`` (it arrived in 2.6.29). ``mmu_notifier_retry``: count != 0 or seq changed.
* ``modern`` -- Linux 6.18 (kvm_main.c ``kvm_handle_hva_range``, ``kvm_mmu_invalidate_begin`` /
  ``_range_add`` / ``_end``): ``mmu_invalidate_seq`` / ``mmu_invalidate_in_progress`` and the union
  range [range_start, range_end) of the invalidations in progress (reset when in_progress goes
  0 -> 1); the flush happens before mmu_lock is dropped (``flush_on_ret``); ``clear_young`` does
  not flush; ``release`` zaps every shadow page (kvm_arch_flush_shadow_all).
  ``mmu_invalidate_retry_gfn``: retry while an invalidation is in progress only for a gfn inside
  the range, and whenever the sequence changed.

Both zap through the rmap (kvm_unmap_rmapp / kvm_zap_rmap): every leaf spte that maps a gfn of the
range is cleared and leaves the rmap. The flush rule (seed: Andrea Arcangeli's mmu-notifier v14 ->
v15 review, 2008): every TLB entry for the page is gone before the notifier returns, because the
host frees the page right after. ``break_flush`` (``--break flush-before-free``, a teaching and
testing switch) defers the flush past the return, as the ``tlbs_dirty`` bug did (fixed by commit
a4ee1ca4a36e "KVM: MMU: delay flush all tlbs on sync_page path"): the flush then happens at the
vCPU's next exit, after the host has freed or reused the page.

x86shadow defers the TLB flushes of other spte downgrades to the vCPU's next fill or exit
(Unicorn cannot flush inside a write hook), where KVM 2.6.27 flushed them inside mmu_lock. So
that this deferral cannot leak through a notifier, every notifier call also carries out flushes
still pending on any vCPU -- what ``kvm->tlbs_dirty`` does since a4ee1ca4a36e -- and flushes a
vCPU with paging off (KVM maps it through a direct shadow table, nonpaging_map, whose sptes the
notifier would have zapped; x86shadow maps it without one).
"""
from __future__ import annotations

from .. import events as ev
from .requests import REQ_ANY_TLB_FLUSH

ERAS = ("2008", "modern")
_INVALID_GFN = -1


class KvmNotifier:
    """The notifier KVM registers on the VMM's mm (kvm_init_mmu_notifier)."""

    def __init__(self, vm, era: str = "modern", break_flush: bool = False, aging=None):
        if era not in ERAS:
            raise ValueError(f"unknown notifier era {era!r} (choose from {', '.join(ERAS)})")
        from .aging import Aging
        self.vm = vm
        self.era = era
        self.aging = Aging(vm, aging, era)   # the aging variant (mmu/aging.py); None: the era's
        self.break_flush = break_flush
        # explorer and tests only: the fault installs its pfn without the sequence re-check
        # (the broken variant of x86shadow explore's seq-recheck scenario; read in retry())
        self.break_retry = False
        self.seq = 0                    # mmu_notifier_seq (2008) / mmu_invalidate_seq (modern)
        self.count = 0                  # mmu_notifier_count / mmu_invalidate_in_progress
        self.range_start = _INVALID_GFN  # modern: the union range of invalidations in progress
        self.range_end = _INVALID_GFN
        self.owed_flush = False          # break_flush: a flush deferred past the free
        self.owed_at = 0                 # ... owed since this exit
        self.owed_tick = 0               # ... and this point of the host schedule
        self.ticks = 0                   # points the host schedule has passed (its tick())

    # ------------------------------------------------------------------ the fault's guard
    def retry(self, seq: int, gfn: int) -> bool:
        """Must a fault that snapshotted ``seq`` before gfn -> pfn install nothing for gfn?
        2008 mmu_notifier_retry: an invalidation in progress, or the sequence moved. Modern
        mmu_invalidate_retry_gfn: in progress *and* gfn inside the union range, or moved."""
        if self.break_retry:
            return False
        if self.era == "2008":
            return self.count != 0 or self.seq != seq
        if self.count and self.range_start <= gfn < self.range_end:
            return True
        return self.seq != seq

    # ------------------------------------------------------------------ helpers
    def _gfns(self, start: int, end: int):
        return self.vm.memslots.hva_range_gfns(start, end)

    def _unmap(self, gfns) -> bool:
        """kvm_unmap_rmapp for each gfn: True if an spte was zapped (a flush is needed)."""
        vm = self.vm
        zapped = 0
        for gfn in gfns:
            zapped += vm.zap_gfn_sptes(gfn)
        if zapped:
            vm.counters["mmu_notifier_zapped"] += zapped
        return bool(zapped)

    def _needs_flush(self, zapped: bool) -> bool:
        if zapped:
            return True
        # flushes x86shadow deferred (see the module docstring), and vCPUs with paging off
        return any(v.requests & REQ_ANY_TLB_FLUSH or v.root is None for v in self.vm.vcpus)

    def _flush(self, zapped: bool) -> None:
        """kvm_flush_remote_tlbs from the notifier, or (break_flush) the flush owed for later."""
        if not self._needs_flush(zapped):
            return
        vm = self.vm
        if self.break_flush:
            self.owed_flush = True
            self.owed_at = vm.counters["exits"]
            self.owed_tick = self.ticks
            vm.counters["mmu_notifier_flush_deferred"] += 1
            return
        vm.counters["mmu_notifier_flush"] += 1
        vm.flush_remote_tlbs_now()

    def pay_owed_flush(self) -> None:
        """break_flush: the next fill or exit after the one where the flush was owed carries it
        out (too late: the host freed the page in between)."""
        if self.owed_flush:
            self.owed_flush = False
            self.vm.flush_remote_tlbs()

    def _trace(self, kind, **fields):
        events = self.vm.events
        if events.tracing:
            events.emit(kind, **fields)

    # ------------------------------------------------------------------ the notifier ops
    def invalidate_page(self, hva: int) -> None:
        """2.6.27 kvm_mmu_notifier_invalidate_page: under mmu_lock seq++ and unmap the hva (the
        bump must be visible at unlock, or a fault could install an spte nobody removes); flush
        after the unlock."""
        vm = self.vm
        vm.counters["mmu_notifier_invalidate"] += 1
        with vm.mmu_lock.held("notifier"):
            self.seq += 1
            gfns = self._gfns(hva, hva + 0x1000)
            zapped = self._unmap(gfns)
        self._trace(ev.HOST_UNMAP_HVA, start=hva, end=hva + 0x1000, gfns=len(gfns),
                    zapped=zapped)
        self._flush(zapped)

    def invalidate_range_start(self, start: int, end: int) -> None:
        vm = self.vm
        vm.counters["mmu_notifier_invalidate"] += 1
        gfns = self._gfns(start, end)
        with vm.mmu_lock.held("notifier"):
            self.count += 1
            if self.era == "modern":
                # kvm_mmu_invalidate_begin + kvm_mmu_invalidate_range_add
                if self.count == 1:
                    self.range_start = self.range_end = _INVALID_GFN
                if gfns:
                    lo, hi = gfns[0], gfns[-1] + 1
                    if self.range_start == _INVALID_GFN:
                        self.range_start, self.range_end = lo, hi
                    else:
                        self.range_start = min(self.range_start, lo)
                        self.range_end = max(self.range_end, hi)
            zapped = self._unmap(gfns)
            self._trace(ev.HOST_UNMAP_HVA, start=start, end=end, gfns=len(gfns), zapped=zapped)
            if self.era == "modern":
                self._flush(zapped)          # flush_on_ret: before the unlock
        if self.era == "2008":
            self._flush(zapped)              # after the unlock, before returning

    def invalidate_range_end(self, start: int, end: int) -> None:
        vm = self.vm
        with vm.mmu_lock.held("notifier"):
            self.seq += 1                    # first seq++, then count-- (both under mmu_lock)
            self.count -= 1
            if self.count < 0:
                raise RuntimeError("invalidate_range_end without a start")
        events = vm.events
        if events.tracing:
            events.emit(ev.MMU_NOTIFIER, notifier="invalidate_range_end done", mmu_seq=self.seq,
                        in_progress=self.count)

    def clear_flush_young(self, start: int, end: int) -> bool:
        """clear_flush_young: the A bits of the sptes of the range, as the aging variant reads
        them (mmu/aging.py); 2.6.27 flushes after the unlock if young; modern x86 elides the
        flush (6.13+, CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG)."""
        vm = self.vm
        young = self.aging.clear_flush_young(self._gfns(start, end))
        self._trace(ev.HOST_AGE_HVA, start=start, end=end, young=young, op="clear_flush_young")
        if young and self.aging.flushes_young:
            vm.counters["mmu_notifier_flush"] += 1
            vm.flush_remote_tlbs_now()
        return young

    def clear_young(self, start: int, end: int) -> bool:
        young = self.aging.clear_young(self._gfns(start, end))
        self._trace(ev.HOST_AGE_HVA, start=start, end=end, young=young, op="clear_young")
        return young

    def test_young(self, start: int, end: int) -> bool:
        young = self.aging.test_young(self._gfns(start, end))
        self._trace(ev.HOST_AGE_HVA, start=start, end=end, young=young, op="test_young")
        return young

    def release(self) -> None:
        """Modern kvm_mmu_notifier_release -> kvm_arch_flush_shadow_all: zap every shadow page.
        2.6.27 KVM registered no release (it arrived in 2.6.29): nothing."""
        if self.era == "2008":
            return
        vm = self.vm
        with vm.mmu_lock.held("notifier"):
            for sp in list(vm.hash.values()):
                vm.prepare_zap_page(sp, reason="mmu notifier release")
            vm.commit_zap()
            self._flush(True)
