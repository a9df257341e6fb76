"""Aging, sans CPU: KVM's aging variants (mmu/aging.py) against model checklist D (D1-D3) and B
rule 8 (B3), the per-rmap lock bit with a stepped ager and stepped rmap writers, and the host's
LRU reclaim driver (memory/reclaim.py) with the host schedule's ``lru`` operation. Each rule
test asserts what the rule says and would fail if the variant did it another way (took
mmu_lock, flushed, skipped, walked on, did not wait)."""
import pytest

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.counters import new_counters
from x86shadow.memory.host import HostMM, HostPages
from x86shadow.memory.ram import PhysMem
from x86shadow.memory.reclaim import LruReclaim, lru_for
from x86shadow.memory.schedule import HostSchedule, parse_schedule
from x86shadow.mmu import aging as ag
from x86shadow.mmu.audit import audit
from x86shadow.mmu.requests import REQ_TLB_FLUSH
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import SPTE_A, SPTE_P
from x86shadow.mmu.vcpu_mmu import FILL_OK
from x86shadow.mmu.vm_mmu import VmMmu

from pagetables import PWU, RAM, Tables, fresh_ram

R = 0
SPARE = 64
FRAMES = RAM >> 12
VA = 0x0040_0000
DATA = 0x0030_0000
GFN = DATA >> 12


class Rig:
    """A VM over host pages (PAE), one vCPU, the aging variant ``aging``."""

    def __init__(self, aging=None, era="modern"):
        buf = fresh_ram() + bytearray(SPARE << 12)
        self.t = Tables(pg.Mode.PAE, buf)
        self.counters = new_counters()
        self.host = HostMM(HostPages(PhysMem(buf), FRAMES), FRAMES, era, self.counters)
        self.vm = VmMmu(None, self.counters, host=self.host, notifiers=era, aging=aging)
        self.vm.events.subscribe(lambda _k, _f: audit(self.vm), (ev.EXIT,))
        self.mmu = self.vm.add_vcpu()
        self.flushes = 0
        flush = self.mmu.flush_hw_tlb

        def counting_flush():
            self.flushes += 1
            flush()
        self.mmu.flush_hw_tlb = counting_flush
        self.notifier = self.vm.notifier
        self.aging = self.notifier.aging

    def start(self):
        t = self.t
        self.mmu.set_context(pg.PagingContext(t.mode, t.cr3, pdptes=pg.load_pdptes(t.mem, t.cr3)))
        self.mmu.take_requests()

    def fill(self, va, access=R):
        r = self.mmu.hw_fill(va, access)
        assert r.kind == FILL_OK, r
        if self.mmu.requests & REQ_TLB_FLUSH:
            self.mmu.requests &= ~REQ_TLB_FLUSH
            self.mmu.flush_hw_tlb()
        return r

    def sptes(self, gfn=GFN):
        return [sp.spt[idx] for sp, idx in self.vm.rmap.get(gfn, ())]

    def hva(self, gfn=GFN):
        return self.host.hva(gfn)

    def clear_young(self, gfn=GFN):
        return self.notifier.clear_young(self.hva(gfn), self.hva(gfn) + 4096)

    def clear_flush_young(self, gfn=GFN):
        return self.notifier.clear_flush_young(self.hva(gfn), self.hva(gfn) + 4096)

    def test_young(self, gfn=GFN):
        return self.notifier.test_young(self.hva(gfn), self.hva(gfn) + 4096)


def mapped(aging=None, n=1, era="modern", frame=DATA):
    """A rig whose frame is mapped by n sptes (n guest ptes of one table), all accessed."""
    r = Rig(aging, era)
    for i in range(n):
        r.t.map(VA + i * 0x1000, frame, PWU)
    r.start()
    for i in range(n):
        r.fill(VA + i * 0x1000)
    assert len(r.vm.rmap[frame >> 12]) == n
    assert all(s & SPTE_P and s & SPTE_A for s in r.sptes(frame >> 12))
    return r


# ------------------------------------------------------------------ the variant of a VM
def test_each_era_ages_with_its_own_variant_and_hostconfig_chooses_another():
    assert Rig(era="2008").aging.variant == "2008"
    assert Rig(era="modern").aging.variant == "6.15"
    assert Rig("6.14").aging.variant == "6.14"
    from x86shadow.machine import HostConfig, Machine
    m = Machine("pae", host=HostConfig(aging="single-rmap-skip"))
    assert m.vm_mmu.notifier.aging.variant == "single-rmap-skip"
    assert Machine("pae", host=HostConfig(notifiers="2008")).vm_mmu.notifier.aging.variant == "2008"


@pytest.mark.parametrize("spec", ["6.16", "6.15:zap", "2008:bogus", "6.15:access-track"])
def test_bad_aging_specs_are_refused(spec):
    with pytest.raises(ValueError):
        ag.parse_aging(spec)


# ------------------------------------------------------------------ D1: 6.15 lockless aging
@pytest.mark.parametrize("n", [1, 3])
def test_d1_lockless_clear_young_clears_every_a_bit_without_lock_or_flush(n):
    """Model checklist D1 (6.18 kvm_age_gfn -> kvm_rmap_age_gfn_range, kvm_age_hva_range
    .lockless): young, every A bit of the rmap cleared -- one entry or three (no skipping of
    multi-entry rmaps) --, no TLB flush, no mmu_lock; a second clear_young answers old."""
    r = mapped("6.15", n)
    lock0 = r.vm.mmu_lock.acquired
    tlb0 = dict(r.mmu.tlb_pfns)
    assert r.clear_young() is True
    assert all(s & SPTE_P and not s & SPTE_A for s in r.sptes())
    assert r.vm.mmu_lock.acquired == lock0 and "aging" not in r.vm.mmu_lock.by
    assert r.flushes == 0 and r.mmu.tlb_pfns == tlb0 and not r.mmu.requests & REQ_TLB_FLUSH
    assert r.counters["mmu_notifier_flush"] == 0
    assert r.aging.last.rmaps == 1 and r.aging.last.sptes == n
    assert r.vm.mmu_lock.rmap.taken == 1 and not r.vm.mmu_lock.rmap.holders
    assert r.clear_young() is False


def test_d1_clear_flush_young_does_not_flush_on_x86_since_6_13():
    r = mapped("6.15", 2)
    assert r.clear_flush_young() is True
    assert r.flushes == 0 and r.counters["mmu_notifier_flush"] == 0


def test_lockless_test_young_stops_at_the_first_accessed_spte_and_clears_nothing():
    """6.18 kvm_rmap_age_gfn_range(test_only): return at the first accessed spte."""
    r = mapped("6.15", 3)
    assert r.test_young() is True
    assert r.aging.last.sptes == 1
    assert all(s & SPTE_A for s in r.sptes())


def test_an_unaccessed_spte_is_old_and_the_empty_rmap_is_not_locked():
    r = mapped("6.15", 1)
    r.clear_young()
    taken = r.vm.mmu_lock.rmap.taken
    assert r.clear_young(GFN + 1) is False          # no spte at all
    assert r.vm.mmu_lock.rmap.taken == taken         # __kvm_rmap_lock: empty -> no lock
    r.fill(VA)                                       # (cached: the fill is the TLB miss)
    assert r.sptes()[0] & SPTE_A and r.clear_young() is True


# ------------------------------------------------------------------ D2: the rmap lock bit
def _aged_rmap_with(r):
    """The ager at the point where it holds the rmap's lock bit."""
    gen = r.aging.steps([GFN], "clear")
    assert next(gen) == ("rmap", GFN)
    assert r.vm.mmu_lock.rmap.holder(GFN) == "aging"
    return gen


def test_d2_zap_waits_for_the_ager_which_sees_the_spte_non_present():
    """Model checklist D2: the ager holds rmap R (6.18 kvm_rmap_lock_readonly); an mmu_lock
    holder zaps one spte of R (mmu_spte_clear_track_bits: allowed, sptes are not under the bit)
    and must then spin in pte_list_remove until the ager unlocks. The ager skips the
    non-present spte; it was the only accessed one, so the answer is old (accepted)."""
    r = mapped("6.15", 2)
    (sp0, i0), (sp1, i1) = list(r.vm.rmap[GFN])
    sp1.spt[i1] &= ~SPTE_A                           # only the first spte is young
    gen = _aged_rmap_with(r)
    zap = ag.zap_spte_steps(r.vm, sp0, i0)
    assert next(zap) == ("cleared", GFN)             # under mmu_lock, spte cleared
    assert r.vm.mmu_lock.holder == "zapper"
    for _ in range(3):
        assert next(zap)[0] == "spin"                # pte_list_remove waits for the bit
    assert (sp0, i0) in r.vm.rmap[GFN]               # the chain is untouched meanwhile
    young = ag.run_steps(gen)
    assert young is False
    assert r.aging.last.nonpresent == 1 and r.aging.last.sptes == 2
    assert r.vm.mmu_lock.rmap.holder(GFN) is None
    ag.run_steps(zap)                                # now the writer gets the bit
    assert list(r.vm.rmap[GFN]) == [(sp1, i1)]
    assert r.vm.mmu_lock.holder is None and r.mmu.requests & REQ_TLB_FLUSH


def test_d2_rmap_add_waits_for_the_ager_too():
    r = mapped("6.15", 1)
    gen = _aged_rmap_with(r)
    sp, idx = next(iter(r.vm.rmap[GFN]))
    add = ag.rmap_add_steps(r.vm, sp, (idx + 1) % 512, GFN, sp.spt[idx])
    assert next(add)[0] == "spin"
    assert len(r.vm.rmap[GFN]) == 1
    assert ag.run_steps(gen) is True
    ag.run_steps(add)
    assert len(r.vm.rmap[GFN]) == 2


def test_d2_a_writer_that_ignores_the_bit_is_caught():
    """The detector behind D2: the chain changed while the ager held its bit."""
    r = mapped("6.15", 2)
    gen = _aged_rmap_with(r)
    sp, idx = next(iter(r.vm.rmap[GFN]))
    r.vm.drop_spte(sp, idx)                          # pte_list_remove without kvm_rmap_lock
    with pytest.raises(ag.RmapRace):
        ag.run_steps(gen)


def test_d2_the_ager_spins_while_a_writer_holds_the_bit():
    """__kvm_rmap_lock: cpu_relax while KVM_RMAP_LOCKED, then take it."""
    r = mapped("6.15", 1)
    assert r.vm.mmu_lock.rmap.try_lock(GFN, "fault")
    gen = r.aging.steps([GFN], "clear")
    assert next(gen) == ("spin", f"rmap {GFN:#x}")
    with pytest.raises(RuntimeError, match="spin forever"):
        r.clear_young()                              # nothing else can run: a deadlock
    r.vm.mmu_lock.rmap.unlock(GFN, "fault")
    assert ag.run_steps(gen) is True


def test_locked_variants_make_the_writer_wait_for_mmu_lock_instead():
    """6.14 (and 2008): the whole walk under mmu_lock; a zapper cannot even start."""
    r = mapped("6.14", 2)
    gen = r.aging.steps([GFN], "clear")
    assert next(gen) == ("rmap", GFN)
    assert r.vm.mmu_lock.holder == "aging"
    sp, idx = next(iter(r.vm.rmap[GFN]))
    zap = ag.zap_spte_steps(r.vm, sp, idx)
    assert next(zap) == ("spin", "mmu_lock")
    assert r.vm.mmu_lock.rmap.taken == 0             # no rmap bit in 6.14
    assert ag.run_steps(gen) is True
    ag.run_steps(zap)
    assert len(r.vm.rmap[GFN]) == 1


# ------------------------------------------------------------------ D3: test_young and the TDP MMU
def test_d3_tdp_young_short_circuits_the_shadow_walk_in_6_15():
    """6.18 kvm_test_age_gfn: TDP MMU young -> return without reading the rmaps."""
    r = mapped("6.15", 1)
    r.aging.tdp = ag.TdpMmu()
    r.aging.tdp.accessed[GFN] = True
    assert r.test_young() is True
    assert r.aging.last.rmaps == 0 and r.aging.last.tdp == 1
    assert r.sptes()[0] & SPTE_A                     # the shadow spte's A bit untouched
    assert r.vm.mmu_lock.acquired == 1               # (the fault's only)


def test_d3_6_14_takes_mmu_lock_and_walks_the_rmaps_first():
    """6.14 kvm_test_age_gfn: rmap pass (under kvm_handle_hva_range's mmu_lock) before the TDP
    MMU's, whatever the TDP MMU would say."""
    r = mapped("6.14", 1)
    r.aging.tdp = ag.TdpMmu()
    r.aging.tdp.accessed[GFN] = True
    lock0 = r.vm.mmu_lock.acquired
    assert r.test_young() is True
    assert r.vm.mmu_lock.acquired == lock0 + 1 and r.vm.mmu_lock.by["aging"] == 1
    assert r.aging.last.rmaps == 1 and r.aging.last.sptes == 1
    assert r.aging.last.tdp == 0                     # the rmaps answered young first


def test_d3_no_indirect_shadow_pages_means_no_rmap_walk(monkeypatch):
    """kvm_may_have_shadow_mmu_sptes: TDP MMU on and indirect_shadow_pages == 0 -> the rmaps
    are not looked at (even though they hold an accessed spte here)."""
    r = mapped("6.15", 1)
    r.aging.tdp = ag.TdpMmu()
    assert ag.indirect_shadow_pages(r.vm) > 0
    monkeypatch.setattr(ag, "indirect_shadow_pages", lambda vm: 0)
    assert r.clear_young() is False
    assert r.aging.last.rmaps == 0 and r.sptes()[0] & SPTE_A
    monkeypatch.undo()
    assert r.clear_young() is True                   # with indirect shadow pages: read


# ------------------------------------------------------------------ Sean's single-rmap sketch
def test_single_rmap_skip_reports_a_multi_mapped_young_page_old():
    """James Houghton's objection: skipping multi-entry rmaps answers "old" for a hot page."""
    r = mapped("single-rmap-skip", 2)
    assert r.clear_young() is False
    assert r.aging.last.skipped == 1
    assert all(s & SPTE_A for s in r.sptes())        # nothing was read, nothing cleared
    assert "aging" not in r.vm.mmu_lock.by


def test_single_rmap_fallback_takes_mmu_lock_for_a_multi_mapped_page():
    r = mapped("single-rmap-fallback", 2)
    assert r.clear_young() is True
    assert r.vm.mmu_lock.by["aging"] == 1 and r.aging.last.fallback == 1
    assert not any(s & SPTE_A for s in r.sptes())


@pytest.mark.parametrize("variant", ["single-rmap-skip", "single-rmap-fallback"])
def test_single_rmap_reads_a_single_entry_without_any_lock(variant):
    r = mapped(variant, 1)
    assert r.clear_young() is True
    assert "aging" not in r.vm.mmu_lock.by and r.vm.mmu_lock.rmap.taken == 0
    assert not r.sptes()[0] & SPTE_A
    assert r.clear_young() is False


# ------------------------------------------------------------------ 2008: under mmu_lock, flush if young
def test_2008_clear_flush_young_takes_mmu_lock_and_flushes_when_young():
    """2.6.27 kvm_mmu_notifier_clear_flush_young: kvm_age_hva under spin_lock(mmu_lock), then
    kvm_flush_remote_tlbs if young (after the unlock)."""
    r = mapped("2008", 2, era="2008")
    seen = []
    flush = r.mmu.flush_hw_tlb

    def recording():
        seen.append(r.vm.mmu_lock.holder)
        flush()
    r.mmu.flush_hw_tlb = recording
    assert r.clear_flush_young() is True
    assert r.vm.mmu_lock.by["aging"] == 1
    assert seen == [None] and r.counters["mmu_notifier_flush"] == 1 and not r.mmu.tlb_pfns
    assert not any(s & SPTE_A for s in r.sptes())
    assert r.clear_flush_young() is False            # old: no flush
    assert r.counters["mmu_notifier_flush"] == 1 and r.vm.mmu_lock.by["aging"] == 2


def test_2008_clear_young_and_test_young_do_not_flush():
    r = mapped("2008", 2, era="2008")
    assert r.test_young() is True and r.aging.last.sptes == 1
    assert r.clear_young() is True and r.counters["mmu_notifier_flush"] == 0


def test_6_14_takes_mmu_lock_for_every_call_but_never_flushes():
    r = mapped("6.14", 3)
    assert r.clear_flush_young() is True
    assert r.vm.mmu_lock.by["aging"] == 1 and r.counters["mmu_notifier_flush"] == 0
    assert r.clear_young(GFN + 5) is False           # no spte: the lock is still taken
    assert r.vm.mmu_lock.by["aging"] == 2


# ------------------------------------------------------------------ B3: no hardware A bits
def test_b3_2_6_27_without_a_bits_always_answers_old_and_keeps_the_spte():
    r = mapped("2008:always-old", 1, era="2008")
    before = r.sptes()
    assert r.clear_flush_young() is False
    assert r.sptes() == before and r.counters["mmu_notifier_flush"] == 0


@pytest.mark.parametrize("mode,bump", [("zap", 0), ("zap-seq", 1)])
def test_b3_zapping_emulates_the_a_bit_and_the_next_access_faults(mode, bump):
    """~2.6.36 kvm_age_rmapp without shadow_accessed_mask: kvm_unmap_rmapp, young if mapped;
    57128468080a adds mmu_notifier_seq++ first. The next access faults the spte back."""
    r = mapped(f"2008:{mode}", 1, era="2008")
    seq = r.notifier.seq
    assert r.clear_flush_young() is True
    assert GFN not in r.vm.rmap and r.aging.last.zapped == 1
    assert r.notifier.seq == seq + bump
    assert r.counters["mmu_notifier_flush"] == 1 and not r.mmu.tlb_pfns
    assert r.clear_flush_young() is False            # nothing mapped any more: old
    fixed = r.counters["pf_fixed"]
    r.fill(VA)
    assert r.counters["pf_fixed"] == fixed + 1 and len(r.vm.rmap[GFN]) == 1
    assert r.test_young() is False                   # kvm_test_age_rmapp: no A bit -> old


# ------------------------------------------------------------------ mmu_lock and its observer
def test_mmu_lock_try_acquire_release_and_observer():
    from x86shadow.mmu.mmu_lock import MmuLock
    lock = MmuLock()
    seen = []
    lock.observer = seen.append
    assert lock.try_acquire("aging") and not lock.try_acquire("fault")
    with pytest.raises(RuntimeError, match="while aging holds it"):
        with lock.held("fault"):
            pass
    with pytest.raises(RuntimeError):
        lock.release("fault")
    lock.release("aging")
    with lock.held("fault"):
        assert lock.holder == "fault"
    assert lock.holder is None and seen == ["aging", "fault", "fault"]
    assert lock.by == {"aging": 1, "fault": 1} and lock.acquired == 2


# ------------------------------------------------------------------ the reclaim driver
def _reclaim_rig(aging="6.15"):
    """Four frames mapped once each, all accessed once."""
    r = Rig(aging)
    frames = [DATA + i * 0x1000 for i in range(4)]
    for i, f in enumerate(frames):
        r.t.map(VA + i * 0x1000, f, PWU)
    r.start()
    for i in range(4):
        r.fill(VA + i * 0x1000)
    return r, [f >> 12 for f in frames]


def test_reclaim_evicts_old_pages_and_keeps_the_young_one():
    """One pass under pressure (limit 1): the four pages, just used, are activated by their
    reference check; the guest then uses one of them again; the active scan finds the other
    three old (deactivated), their second reference check too (evicted)."""
    r, gfns = _reclaim_rig()
    seen = []
    d = LruReclaim(r.host, r.vm, candidates=lambda: gfns, limit=1, batch=4, observer=seen.append)
    steps = d.steps()
    for _ in range(4):
        step = next(steps)
        assert (step.kind, step.result, step.op) == ("ref", True, "clear_flush_young")
    assert len(d.active) == 4 and not d.inactive
    # the guest uses page 0 again; 6.15 did not flush, so the CPU walks again (setting A) only
    # after a flush of its own -- here the test's
    r.mmu.flush_hw_tlb()
    r.fill(VA)
    rest = list(steps)
    assert d.stats["evicted"] == 3 and d.stats["rotated"] == 1
    assert [r.host.current(g) is None for g in gfns] == [False, True, True, True]
    assert [s.kind for s in rest].count("evict") == 3
    assert {s.op for s in rest if s.kind == "age"} == {"clear_young"}
    assert all(s.record is not None for s in seen if s.kind != "evict")
    assert all(s.locks for s in rest if s.kind == "evict")     # the notifier's mmu_lock
    assert not any(s.locks for s in seen if s.kind != "evict")  # 6.15 ages without it
    # an evicted page the guest touches again comes back and is counted as a refault
    r.fill(VA + 0x1000)
    d.refill()
    assert d.stats["refaults"] == 1 and d.refaulted == [gfns[1]]


def test_reclaim_in_the_2008_era_ages_with_clear_flush_young_only():
    r = Rig(era="2008")
    d = LruReclaim(r.host, r.vm)
    assert d.active_op == "clear_flush_young"
    with pytest.raises(ValueError):
        LruReclaim(r.host, r.vm, active_op="clear_young")


def test_schedule_lru_runs_one_reclaim_pass():
    """``--host lru:N``: one pass of SWAP_CLUSTER_MAX pages. The four pages mapped are in the
    vCPU's TLB (just filled): the pass keeps them without asking (memory/schedule.py, as the
    other operations never pick them), on the active list. Once the TLB was flushed, the next
    pass finds them young (their A bits from the fills: rotated, the A bits cleared), the one
    after that old (deactivated), old again at their reference check, and evicts them."""
    r, gfns = _reclaim_rig()
    assert "lru" in [rule.op for rule in parse_schedule("lru:10")]
    s = HostSchedule(r.host, r.vm, parse_schedule("lru:10"))
    s.run("lru", "test")
    d = lru_for(r.host)
    assert s.log[-1][1:] == ["lru", None, 0] and d.stats["kept"] >= 4
    assert d.stats["ref_checks"] == 0 and all(r.host.current(g) is not None for g in gfns)
    for v in r.vm.vcpus:
        v.tlb_pfns.clear()                            # a TLB flush: nothing in use any more
    s.run("lru", "test")
    assert s.log[-1][1:] == ["lru", None, 0] and d.stats["rotated"] == 4
    s.run("lru", "test")
    assert d is lru_for(r.host, r.vm) and d.stats["passes"] == 3
    assert s.log[-1][1:] == ["lru", None, 4]
    assert d.stats["deactivated"] == 4 and d.stats["evicted"] == 4
    assert all(r.host.current(g) is None for g in gfns)
    audit(r.vm)
    s.run("lru", "test")                              # nothing mapped is left to reclaim
    assert s.log[-1][3] == 0 and d.stats["passes"] == 4


def test_reclaim_rejects_bad_parameters():
    r = Rig()
    with pytest.raises(ValueError):
        LruReclaim(r.host, r.vm, limit=-1)
    with pytest.raises(ValueError):
        LruReclaim(r.host, r.vm, batch=0)
    with pytest.raises(ValueError):
        LruReclaim(r.host, r.vm, active_op="clear_everything")


def test_shadow_leaf_of_the_rig_is_what_the_rmap_holds():
    r = mapped("6.15", 1)
    sp, idx = shadow_leaf(r.mmu.root, r.mmu.root_level, VA)
    assert (sp, idx) in r.vm.rmap[GFN]
