"""Host memory under the guest, sans CPU: host pages, the host's operations, KVM's MMU notifiers
of both eras, the fault's sequence guard, and the flush-before-free rule with its detectors
(docs/HOST_MEMORY.md). The model checklist B scenarios B1 (a fault racing an invalidation) and B2
(a drop whose flush is still pending when the notifier runs; the broken flush) are here; the
audit runs after every exit."""
import pytest

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.counters import new_counters
from x86shadow.memory.host import HostFault, HostMM, HostPages, HostViolation, PAGE_POISON
from x86shadow.memory.ram import PhysMem
from x86shadow.mmu.audit import audit
from x86shadow.mmu.requests import REQ_TLB_FLUSH
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import SPTE_P, SPTE_W, spte_pfn
from x86shadow.mmu.vcpu_mmu import FILL_OK
from x86shadow.mmu.vm_mmu import VmMmu
from x86shadow.policies import make_policy

from pagetables import PWU, RAM, Tables, fresh_ram

R, W = 0, pg.PFERR_W
SPARE = 64
FRAMES = RAM >> 12
VA = 0x0040_0000
DATA = 0x0030_0000               # tagged: every dword holds (frame number, 0xF4F4)
ERAS = ("2008", "modern")


class Rig:
    def __init__(self, mode=pg.Mode.PAE, era="modern", break_flush=False, policy=None,
                 tlb_check=True):
        buf = fresh_ram() + bytearray(SPARE << 12)
        self.t = Tables(mode, buf)
        self.counters = new_counters()
        self.host = HostMM(HostPages(PhysMem(buf), FRAMES), FRAMES, era, self.counters)
        self.vm = VmMmu(None, self.counters, policy=make_policy(policy) if policy else None,
                        host=self.host, notifiers=era, break_flush=break_flush)
        self.vm.events.subscribe(lambda _k, _f: audit(self.vm), (ev.EXIT,))
        self.mmu = self.vm.add_vcpu()
        if tlb_check:
            self.host.pages.on_free = self._on_free

    def _on_free(self, pfn, tag):
        if pfn in self.mmu.tlb_pfns:
            raise HostViolation("freed while a TLB may map it", f"host page {pfn:#x}", "test")

    def start(self):
        t = self.t
        ctx = t.ctx()
        if t.mode == pg.Mode.PAE:
            ctx = pg.PagingContext(t.mode, t.cr3, pdptes=pg.load_pdptes(t.mem, t.cr3))
        self.mmu.set_context(ctx)
        self.mmu.take_requests()

    def fill(self, va, access=R):
        r = self.mmu.hw_fill(va, access)
        assert r.kind == FILL_OK, r
        if self.mmu.requests & REQ_TLB_FLUSH:        # the CPU services its requests
            self.mmu.requests &= ~REQ_TLB_FLUSH
            self.mmu.flush_hw_tlb()
        return r

    def leaf(self, va):
        """The leaf spte of va (0 if the walk finds none present)."""
        hit = shadow_leaf(self.mmu.root, self.mmu.root_level, va)
        return 0 if hit is None else hit[0].spt[hit[1]]


def tag(gfn):
    return gfn | 0xF4F4 << 16                       # the dword fresh_ram() puts everywhere


# ------------------------------------------------------------------ the host's operations
@pytest.mark.parametrize("era", ERAS)
def test_swap_out_zaps_and_flushes_and_the_next_access_swaps_in(era):
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    gfn = DATA >> 12
    assert r.fill(VA).addr == DATA                  # identity until the host acts
    assert gfn in r.mmu.tlb_pfns
    assert r.host.swap_out(gfn)
    assert not r.leaf(VA) & SPTE_P                  # zapped through the rmap
    assert not r.mmu.tlb_pfns                       # and flushed before the page was freed
    assert r.counters["mmu_notifier_zapped"] == 1 and r.counters["mmu_notifier_flush"] == 1
    assert r.host.current(gfn) is None
    got = r.fill(VA)                                # the fault swaps the page back in, into
    assert got.addr >> 12 == gfn                    # the page freed last (LIFO, as Linux)
    assert r.host.pages.phys.read32(got.addr + 8) == tag(gfn)
    assert r.counters["host_swap_in"] == 1
    assert r.vm.peek_mem.read32(DATA + 8) == tag(gfn)


@pytest.mark.parametrize("era", ERAS)
def test_migrate_moves_the_contents_and_the_next_fault_maps_the_new_page(era):
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU | pg.PTE_D)
    r.start()
    gfn = DATA >> 12
    r.fill(VA, W)
    r.host.pages.phys.write32(DATA + 4, 0x1234)     # the guest's store through its TLB
    assert r.host.migrate(gfn)
    new = r.host.current(gfn)
    assert new != gfn and r.host.pages.phys.read32(new * 4096 + 4) == 0x1234
    assert r.host.pages.owner_of(gfn) is None       # the old page is free and poisoned
    assert r.host.pages.phys.read(gfn * 4096, 8) == bytes([PAGE_POISON]) * 8
    assert spte_pfn(r.leaf(VA)) == 0 and not r.leaf(VA) & SPTE_P
    assert r.fill(VA, W).addr == new << 12


@pytest.mark.parametrize("era", ERAS)
def test_ksm_merges_identical_pages_read_only_and_a_write_breaks_the_sharing(era):
    r = Rig(era=era)
    a, b = 0x0031_0000, 0x0032_0000
    for pa in (a, b):
        r.t.mem.write(pa, bytes(4096))              # two identical (zero) pages
    r.t.map(VA, a, PWU | pg.PTE_D)
    r.t.map(VA + 0x1000, b, PWU | pg.PTE_D)
    r.start()
    r.fill(VA, W)
    r.fill(VA + 0x1000, W)
    assert r.host.ksm_merge([a >> 12, b >> 12]) == 1    # one page freed
    assert r.counters["host_ksm_merge"] == 1               # one group merged
    kpfn = r.host.current(a >> 12)
    assert r.host.current(b >> 12) == kpfn
    # a read maps the shared page without W (the host maps it read-only)
    got = r.fill(VA)
    assert got.addr == kpfn << 12 and not r.leaf(VA) & SPTE_W
    # a write faults, breaks the copy-on-write sharing first, then maps a private copy
    got = r.fill(VA, W)
    assert got.addr >> 12 not in (kpfn, a >> 12) and r.leaf(VA) & SPTE_W
    assert r.counters["host_cow_break"] == 1
    assert r.host.current(b >> 12) == kpfn          # the other page still shares it
    # a fault's own COW break bumps the sequence it snapshotted: KVM retries that fault too
    assert r.counters["pf_retry"] == 1


@pytest.mark.parametrize("era", ERAS)
def test_reclaim_keeps_a_young_page_and_takes_it_once_it_is_old(era):
    """2.6.27 try_to_unmap_one: ptep_clear_flush_young_notify first -- a page whose spte has its
    A bit (set by the fill, as hardware does) is young and kept; that call cleared the bit, so
    the next attempt takes the page."""
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    r.fill(VA)
    gfn = DATA >> 12
    assert not r.host.swap_out(gfn, honour_young=True)
    assert r.counters["host_swap_young"] == 1 and r.host.current(gfn) == gfn
    assert r.host.swap_out(gfn, honour_young=True)
    assert r.counters["host_swap_out"] == 1


def test_kvm_writes_to_a_ksm_page_break_the_sharing_too():
    """kvm_write_guest (an emulated pte write, an exception frame) goes through copy_to_user:
    the same copy-on-write break as a guest write."""
    r = Rig()
    a, b = 0x0031_0000, 0x0032_0000
    for pa in (a, b):
        r.t.mem.write(pa, bytes(4096))
    r.host.ksm_merge([a >> 12, b >> 12])
    r.vm.mem.write32(a + 16, 7)
    assert r.vm.peek_mem.read32(a + 16) == 7 and r.vm.peek_mem.read32(b + 16) == 0
    assert r.counters["host_cow_break"] == 1


def test_munmap_zaps_and_a_later_access_fails_with_efault():
    r = Rig()
    r.t.map(VA, DATA, PWU)
    r.start()
    r.fill(VA)
    gfn = DATA >> 12
    r.host.munmap(gfn, gfn + 4)
    assert not r.leaf(VA) & SPTE_P and r.counters["host_munmap"] == 1
    with pytest.raises(HostFault, match="not mapped"):
        r.mmu.hw_fill(VA, R)


@pytest.mark.parametrize("era", ERAS)
def test_release_zaps_every_shadow_page_only_in_the_modern_era(era):
    """2.6.29 added kvm_mmu_notifier_release (kvm_arch_flush_shadow); 2.6.27 had none, so there
    exit_mmap's unmap zaps the leaf sptes and the shadow pages stay until the VM goes."""
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    r.fill(VA)
    pages = len(r.vm.hash)
    r.host.release()
    assert (len(r.vm.hash) == 0) == (era == "modern")
    assert pages and not r.vm.rmap


# ------------------------------------------------------------------ the flush rule and its detectors
def test_a_write_into_a_freed_page_is_caught_when_it_is_reused_and_by_the_free_check():
    r = Rig()
    gfn = DATA >> 12
    r.host.swap_out(gfn)
    pages = r.host.pages
    freed = pages.free[-1]                          # the page just freed (LIFO: reused next)
    assert freed == gfn
    pages.phys.write32(freed * 4096 + 0x40, 0x5a5a5a5a)   # a store through a stale TLB entry
    with pytest.raises(HostViolation, match="written after it was freed") as e:
        pages.check_free_pages()
    assert "byte 0x40" in str(e.value)
    with pytest.raises(HostViolation, match="written after it was freed"):
        r.vm.mem.read32(DATA)                       # the swap-in reuses the poisoned page


def test_the_check_after_each_host_event_looks_at_the_pages_freed_last():
    """The cheap check (after every host event) covers the RECENT_FREES pages freed last; a
    page freed long before is checked at the end of the run and when it is reused."""
    from x86shadow.memory.host import RECENT_FREES
    r = Rig()
    pages = r.host.pages
    first = DATA >> 12
    for g in range(first, first + RECENT_FREES + 1):
        r.host.swap_out(g)
    pages.phys.write32(first * 4096, 0x77)          # the oldest freed page
    pages.check_free_pages(recent_only=True)        # not among the last RECENT_FREES
    with pytest.raises(HostViolation):
        pages.check_free_pages()
    pages.phys.write32(first * 4096, 0xAAAAAAAA)
    pages.phys.write32((first + RECENT_FREES) * 4096, 0x77)   # the newest one
    with pytest.raises(HostViolation):
        pages.check_free_pages(recent_only=True)


@pytest.mark.parametrize("era", ERAS)
def test_notifier_carries_out_a_flush_still_pending_from_another_drop(era):
    """Model checklist B2. An spte was dropped outside the notifier and its flush is still
    pending (x86shadow defers it to the vCPU's next entry; a4ee1ca4a36e's FNAME(sync_page)
    deferred it in KVM); the notifier then finds the rmap empty. It must flush anyway
    (``tlbs_dirty``), or the host frees a page the TLB still maps."""
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    r.fill(VA)
    sp, idx = shadow_leaf(r.mmu.root, r.mmu.root_level, VA)
    r.vm.drop_spte(sp, idx)                         # flush requested, not yet carried out
    assert r.mmu.requests & REQ_TLB_FLUSH and r.mmu.tlb_pfns
    r.host.swap_out(DATA >> 12)                     # no spte left to zap; no violation
    assert r.counters["mmu_notifier_zapped"] == 0 and r.counters["mmu_notifier_flush"] == 1
    assert not r.mmu.tlb_pfns and not r.mmu.requests & REQ_TLB_FLUSH


@pytest.mark.parametrize("era", ERAS)
def test_broken_flush_frees_a_page_the_tlb_still_maps_and_is_caught(era):
    """--break flush-before-free: the notifier's flush is owed, not done, when the host frees
    the page. The owner check refuses the free; the correct variant passes the same steps."""
    for broken in (False, True):
        r = Rig(era=era, break_flush=broken)
        r.t.map(VA, DATA, PWU)
        r.start()
        r.fill(VA)
        if not broken:
            assert r.host.swap_out(DATA >> 12)
            continue
        with pytest.raises(HostViolation, match="freed while a TLB may map it"):
            r.host.swap_out(DATA >> 12)
        assert r.counters["mmu_notifier_flush_deferred"] == 1


def test_broken_flush_without_the_owner_check_is_caught_by_the_poison():
    r = Rig(break_flush=True, tlb_check=False)
    r.t.map(VA, DATA, PWU | pg.PTE_D)
    r.start()
    hpa = r.fill(VA, W).addr
    r.host.swap_out(DATA >> 12)
    assert hpa >> 12 in r.mmu.tlb_pfns              # the owed flush has not happened
    r.host.pages.phys.write32(hpa, 0x11)            # the guest's store through the stale entry
    with pytest.raises(HostViolation, match="written after it was freed"):
        r.host.pages.check_free_pages()


@pytest.mark.parametrize("era", ERAS)
def test_flush_before_unlock_modern_after_unlock_2008(era):
    """6.18 kvm_handle_hva_range flushes before dropping mmu_lock (flush_on_ret); 2.6.27's
    notifiers flush after spin_unlock, before returning."""
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    r.fill(VA)
    seen = []
    flush = r.mmu.flush_hw_tlb

    def recording_flush():
        seen.append(r.vm.mmu_lock.holder)
        flush()
    r.mmu.flush_hw_tlb = recording_flush
    r.host.migrate(DATA >> 12)
    assert seen == (["notifier"] if era == "modern" else [None])


# ------------------------------------------------------------------ B1: a fault racing an invalidation
@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("point", ["after_seq_snapshot", "after_gfn_to_pfn"])
def test_fault_racing_an_invalidation_retries_and_then_maps_the_new_page(era, point):
    """Model checklist B1: the fault snapshotted the sequence; the host migrates the page before
    mmu_lock is taken. The fault installs nothing (pf_retry) -- after gfn_to_pfn it holds the old
    pfn, which the host has freed -- and the guest's next fault maps the new page."""
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    gfn = DATA >> 12
    done = []

    def at(name, _vcpu):
        if name == point and not done:
            done.append(r.host.migrate(gfn))
    r.vm.point = at
    got = r.fill(VA)
    assert done == [True]
    assert r.counters["pf_retry"] == 1
    assert got.addr == r.host.current(gfn) << 12 != gfn << 12


@pytest.mark.parametrize("era", ERAS)
def test_fault_while_an_invalidation_is_in_progress_retries(era):
    """count != 0 (in progress, same gfn): retry even though the sequence has not moved yet."""
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    hva = r.host.hva(DATA >> 12)
    n = r.vm.notifier
    calls = []

    def at(name, _vcpu):
        if name != "after_gfn_to_pfn":
            return
        calls.append(n.seq)
        if len(calls) == 1:
            n.invalidate_range_start(hva, hva + 4096)
        elif len(calls) == 2:
            n.invalidate_range_end(hva, hva + 4096)
    r.vm.point = at
    r.fill(VA)
    assert r.counters["pf_retry"] == 2 and len(calls) == 3


@pytest.mark.parametrize("era", ERAS)
def test_invalidation_of_another_range_retries_only_in_2008(era):
    """Model checklist B1, modern variant: mmu_invalidate_retry_gfn retries while an
    invalidation is in progress only for a gfn inside its range; 2.6.27's mmu_notifier_retry
    retries for any gfn."""
    r = Rig(era=era)
    r.t.map(VA, DATA, PWU)
    r.start()
    other = r.host.hva(0x100)
    n = r.vm.notifier
    state = []

    def at(name, _vcpu):
        if name == "after_gfn_to_pfn" and not state:
            state.append(1)
            n.invalidate_range_start(other, other + 4096)
    r.vm.point = at
    if era == "2008":
        with pytest.raises(Exception, match="retried 64 times"):
            r.mmu.hw_fill(VA, R)
    else:
        r.fill(VA)
        assert r.counters["pf_retry"] == 0
    n.invalidate_range_end(other, other + 4096)


def test_modern_range_is_the_union_of_the_invalidations_in_progress():
    """kvm_mmu_invalidate_range_add: min start / max end; reset when in_progress goes 0 -> 1."""
    r = Rig()
    n = r.vm.notifier
    h = r.host.hva
    n.invalidate_range_start(h(0x10), h(0x12))
    n.invalidate_range_start(h(0x40), h(0x41))
    assert (n.range_start, n.range_end, n.count) == (0x10, 0x41, 2)
    seq = n.seq
    assert n.retry(seq, 0x20) and not n.retry(seq, 0x41)
    n.invalidate_range_end(h(0x10), h(0x12))
    n.invalidate_range_end(h(0x40), h(0x41))
    assert n.count == 0 and n.seq == seq + 2
    n.invalidate_range_start(h(0x80), h(0x81))
    assert (n.range_start, n.range_end) == (0x80, 0x81)


def test_pte_write_prefetch_has_the_same_guard():
    """T2628 mmu_guess_page_from_pte_write records mmu_seq before gfn_to_pfn and
    FNAME(update_pte) installs nothing when mmu_notifier_retry says so (kvm-2008 policies)."""
    r = Rig(era="2008", policy="kvm-2008")
    leaf = r.t.map(VA, DATA, PWU | pg.PTE_A)
    r.start()
    r.fill(VA)
    target = 0x0033_0000
    n_retry = []

    def at(name, _vcpu):
        if name == "pte_prefetch_after_gfn_to_pfn":
            n_retry.append(r.host.migrate(target >> 12))
    r.vm.point = at
    r.t.mem.write64(leaf, target | PWU | pg.PTE_A)   # the guest's store, completed in RAM
    r.mmu.pte_write(leaf, 8)
    assert n_retry == [True] and r.counters["pte_prefetch_retry"] == 1
    assert not r.leaf(VA) & SPTE_P                   # nothing installed for the stale pfn
    r.vm.point = None
    r.mmu.pte_write(leaf, 8)                          # without the race: prefetched
    assert spte_pfn(r.leaf(VA)) == r.host.current(target >> 12)


def test_audit_catches_an_spte_left_on_a_page_the_host_moved():
    r = Rig()
    r.t.map(VA, DATA, PWU)
    r.start()
    r.fill(VA)
    gfn = DATA >> 12
    r.host.notifiers.clear()                          # a host that forgets to notify
    r.host.pages.on_free = None
    r.host.migrate(gfn)
    with pytest.raises(AssertionError, match="no invalidation of it is in progress"):
        audit(r.vm)
