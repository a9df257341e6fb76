"""The shadow MMU core driven with plain memory (no CPU): fills, faults, write protection,
the pte-write path, quadrants, large pages, invlpg, roots — with the audit after every step."""
import pytest

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.mmu.audit import AuditError, audit
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import PERM_R, PERM_W, PERM_X, SPTE_W
from x86shadow.mmu.vcpu_mmu import FILL_GUEST_FAULT, FILL_OK, FILL_TRACKED
from x86shadow.mmu.vm_mmu import REQ_TLB_FLUSH, VmMmu

from pagetables import PWU, P, Tables

R, W, X, U = 0, pg.PFERR_W, pg.PFERR_FETCH, pg.PFERR_U
MODES = [pg.Mode.LEGACY, pg.Mode.PAE, pg.Mode.LONG]


def make(mode, **ctxkw):
    t = Tables(mode)
    vm = VmMmu(t.mem)
    vm.events.subscribe(lambda _kind, _fields: audit(vm), (ev.EXIT,))
    return t, vm.add_vcpu()


def fill(mmu, va, access):
    r = mmu.hw_fill(va, access)
    return r.addr, r.perms, r.kind


def take_flush(mmu):
    return bool(mmu.take_requests() & REQ_TLB_FLUSH)


def start(t, mmu, **kw):
    ctx = t.ctx(**kw)
    if t.mode == pg.Mode.PAE:
        ctx = pg.PagingContext(t.mode, t.cr3, pdptes=pg.load_pdptes(t.mem, t.cr3), **kw)
    mmu.set_context(ctx)


DATA = 0x0030_0000


@pytest.mark.parametrize("mode", MODES)
def test_read_then_write_sets_guest_ad_and_spte_rights(mode):
    t, mmu = make(mode)
    leaf = t.map(0x0040_0000, DATA, PWU)
    start(t, mmu)
    gpa, perms, kind = fill(mmu, 0x0040_0000, R)
    assert (gpa, kind) == (DATA, FILL_OK)
    assert perms == PERM_R | PERM_X                 # clean pte: read-only until the first write
    assert t.rd(leaf) & pg.PTE_A and not t.rd(leaf) & pg.PTE_D
    gpa, perms, kind = fill(mmu, 0x0040_0000, W)
    assert kind == FILL_OK and perms & PERM_W
    assert t.rd(leaf) & pg.PTE_D
    assert mmu.counters["pf_fixed"] == 2 and mmu.counters["exits"] == 2
    # a second read finds the spte: no exit
    fill(mmu, 0x0040_0000, R)
    assert mmu.counters["exits"] == 2


@pytest.mark.parametrize("mode", MODES)
def test_page_tables_are_write_protected_and_writes_to_them_trapped(mode):
    t, mmu = make(mode)
    leaf = t.map(0x0040_0000, DATA, PWU)
    pt_frame = leaf & ~0xFFF
    t.map(0x0050_0000, pt_frame, PWU | pg.PTE_D)    # a window onto the page table itself
    start(t, mmu)
    fill(mmu, 0x0040_0000, R)
    assert mmu.vm.is_tracked(pt_frame >> 12)
    gpa, perms, kind = fill(mmu, 0x0050_0000, W)
    assert kind == FILL_TRACKED and gpa == pt_frame
    # the write-protect fault is counted by the trapped store that follows, not here
    assert mmu.counters["exits"] == 1 and mmu.counters["pf_emulate"] == 0
    # reads of the page table are not trapped, and the spte stays read-only
    gpa, perms, kind = fill(mmu, 0x0050_0000, R)
    assert kind == FILL_OK and not perms & PERM_W
    # the guest rewrites the pte (emulated store) -> the stale spte is dropped
    t.wr(leaf, 0x0031_0000 | PWU)
    mmu.pte_write(leaf, t.esz)
    gpa, _, kind = fill(mmu, 0x0040_0000, R)
    assert (gpa, kind) == (0x0031_0000, FILL_OK)


@pytest.mark.parametrize("mode", MODES)
def test_existing_writable_mapping_is_downgraded_when_frame_becomes_a_page_table(mode):
    t, mmu = make(mode)
    t.map(0x0060_0000, 0x0070_0000, PWU | pg.PTE_D)          # a plain data page, written first
    start(t, mmu)
    _, perms, _ = fill(mmu, 0x0060_0000, W)
    assert perms & PERM_W
    take_flush(mmu)
    # now the guest links that frame as a page table and touches an address through it
    slot = t.slot(0x0080_0000, 2) if mode != pg.Mode.LEGACY else t.slot(0x0080_0000, 2)
    t.buf[0x0070_0000:0x0070_1000] = bytes(4096)
    t.wr(slot, 0x0070_0000 | PWU)
    t.wr(0x0070_0000, DATA | PWU)
    gpa, _, kind = fill(mmu, 0x0080_0000, R)
    assert (gpa, kind) == (DATA, FILL_OK)
    assert take_flush(mmu), "write-protecting an already mapped frame must flush the TLB"
    _, _, kind = fill(mmu, 0x0060_0000, W)
    assert kind == FILL_TRACKED


@pytest.mark.parametrize("mode", MODES)
def test_guest_fault_reports_error_code(mode):
    t, mmu = make(mode)
    t.map(0x0040_0000, DATA, P | pg.PTE_U)                    # read-only user page
    start(t, mmu, wp=True)
    r = mmu.hw_fill(0x0090_0000, R)
    assert r.kind == FILL_GUEST_FAULT and (r.vector, r.error_code) == (14, 0)
    r = mmu.hw_fill(0x0040_0000, W | U)
    assert r.kind == FILL_GUEST_FAULT and r.error_code == pg.PFERR_P | pg.PFERR_W | pg.PFERR_U
    assert mmu.counters["pf_guest"] == 2


def test_legacy_quadrants_one_guest_table_two_shadow_pages():
    t, mmu = make(pg.Mode.LEGACY)
    leaf_lo = t.map(0x0040_0000, DATA, PWU)                    # guest pte index 0
    leaf_hi = t.map(0x0060_0000, DATA + 0x1000, PWU)          # same 4 MiB region, pte index 512
    assert leaf_lo & ~0xFFF == leaf_hi & ~0xFFF
    start(t, mmu)
    fill(mmu, 0x0040_0000, R)
    fill(mmu, 0x0060_0000, R)
    sps = mmu.vm.shadow_pages_of(leaf_lo >> 12)
    assert sorted(sp.role.quadrant for sp in sps) == [0, 1]
    # a write to the upper half touches only quadrant 1
    t.wr(leaf_hi, DATA + 0x2000 | PWU)
    mmu.pte_write(leaf_hi, 4)
    assert fill(mmu, 0x0040_0000, R)[0] == DATA
    assert fill(mmu, 0x0060_0000, R)[0] == DATA + 0x2000
    # the directory is shadowed by four pages (one per GiB), created on demand at CR3 load
    pd = [sp for sp in mmu.vm.pages() if sp.gfn == t.cr3 >> 12]
    assert sorted(sp.role.quadrant for sp in pd) == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", MODES)
def test_large_guest_page_is_shadowed_by_a_direct_page(mode):
    t, mmu = make(mode)
    big = 0x0040_0000 if mode == pg.Mode.LEGACY else 0x0020_0000
    t.map(0x0080_0000, 0x0040_0000, PWU | pg.PTE_D, level=2)
    start(t, mmu, **({"pse": True} if mode == pg.Mode.LEGACY else {}))
    va = 0x0080_0000 + big - 0x1000                            # last 4 KiB page of the large page
    gpa, perms, kind = fill(mmu, va, W)
    assert (gpa, kind) == (0x0040_0000 + big - 0x1000, FILL_OK)
    direct = [sp for sp in mmu.vm.pages() if sp.role.direct]
    assert len(direct) == 1 and direct[0].role.level == 1


@pytest.mark.parametrize("mode", [pg.Mode.PAE, pg.Mode.LONG])
def test_two_clean_large_ptes_of_one_frame_each_get_their_dirty_bit_with_wp_off(mode):
    # kvm-unit-tests access.c check_large_pte_dirty_for_nowp: read through pde 2, write
    # through pde 1, write through pde 2 -- with CR0.WP=0 and both pdes read-only and clean,
    # the last write must fault and set pde 2's D bit (KVM: the WP=0 write access is folded
    # into the walk's pte_access before FNAME(fetch), so it is part of the direct page's role)
    t, mmu = make(mode)
    frame = 0x0020_0000
    pde1 = t.map(0x4000_0000, frame, P, level=2)
    pde2 = t.map(0x8000_0000, frame, P, level=2)
    start(t, mmu, wp=False)
    assert fill(mmu, 0x8000_0000, R)[2] == FILL_OK
    assert fill(mmu, 0x4000_0000, W)[2] == FILL_OK and t.rd(pde1) & pg.PTE_D
    assert not t.rd(pde2) & pg.PTE_D
    exits = mmu.counters["exits"]
    gpa, perms, kind = fill(mmu, 0x8000_0000, W)
    assert (gpa, kind) == (frame, FILL_OK) and perms & PERM_W
    assert t.rd(pde2) & pg.PTE_D and mmu.counters["exits"] == exits + 1
    # the WP=0 spte is supervisor-only: the direct pages of the two accesses differ
    assert len({sp.role.access for sp in mmu.vm.pages() if sp.role.direct}) == 2


@pytest.mark.parametrize("mode", MODES)
def test_cr0_wp0_write_through_a_second_large_mapping_sets_its_dirty_bit(mode):
    """kvm-unit-tests' check_large_pte_dirty_for_nowp: two clean, read-only, supervisor large
    ptes map the same frame; CR0.WP=0. A read through the second, a write through the first,
    then a write through the second must set the second pte's D bit: the supervisor write is
    folded into the access before the direct page is chosen (FNAME(page_fault), Linux 3.8+),
    so the first write's writable direct page is not the second mapping's read-only one."""
    t, mmu = make(mode)
    frame = 0 if mode == pg.Mode.LEGACY else 0x0020_0000     # data frames, below the tables
    va1, va2 = 0x0080_0000, 0x00C0_0000
    leaf1 = t.map(va1, frame, P, level=2)
    leaf2 = t.map(va2, frame, P, level=2)
    start(t, mmu, wp=False, **({"pse": True} if mode == pg.Mode.LEGACY else {}))
    assert fill(mmu, va2, R)[2] == FILL_OK
    assert t.rd(leaf2) & pg.PTE_A and not t.rd(leaf2) & pg.PTE_D
    gpa, perms, kind = fill(mmu, va1, W)
    assert kind == FILL_OK and perms & PERM_W and t.rd(leaf1) & pg.PTE_D
    gpa, perms, kind = fill(mmu, va2, W)
    assert kind == FILL_OK and perms & PERM_W
    assert t.rd(leaf2) & pg.PTE_D, "the second mapping's first write did not set its D bit"
    # the two writable mappings now share one direct page (same frame, same folded access)
    direct = {sp for sp in mmu.vm.pages() if sp.role.direct and sp.role.access & pg.ACC_W}
    assert len(direct) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("large", [False, True])
def test_cr0_wp0_supervisor_write_to_a_user_page_under_smep_leaves_it_not_executable(mode, large):
    """CR0.WP=0 and CR4.SMEP=1: a supervisor write to a read-only user page is shadowed as a
    writable supervisor page, so it must also lose X: a supervisor fetch from it is still the
    guest's SMEP #PF (FNAME(page_fault) / 3.0+ set_spte: "If we converted a user page to a
    kernel page ... prevent the kernel from executing it if SMEP is enabled"; kvm-unit-tests'
    check_smep_andnot_wp)."""
    t, mmu = make(mode)
    va = 0x0080_0000
    if large:
        t.map(va, 0 if mode == pg.Mode.LEGACY else 0x0020_0000, P | U, level=2)
    else:
        t.map(va, DATA, P | U)
    start(t, mmu, wp=False, smep=True, **({"pse": True} if mode == pg.Mode.LEGACY else {}))
    gpa, perms, kind = fill(mmu, va, W)
    assert kind == FILL_OK and perms & PERM_W and not perms & PERM_X
    assert fill(mmu, va, X)[2] == FILL_GUEST_FAULT


@pytest.mark.parametrize("mode", MODES)
def test_invlpg_keeps_synced_sptes(mode):
    # writes to shadowed tables are applied at once, so invlpg has nothing to resync
    t, mmu = make(mode)
    t.map(0x0040_0000, DATA, PWU)
    start(t, mmu)
    fill(mmu, 0x0040_0000, R)
    mmu.invlpg(0x0040_0000)
    assert shadow_leaf(mmu.root, mmu.root_level, 0x0040_0000) is not None and mmu.counters["invlpg"] == 1


def test_cr3_switch_reuses_cached_root():
    t, mmu = make(pg.Mode.LONG)
    t.map(0x0040_0000, DATA, PWU)
    start(t, mmu)
    root = mmu.root
    fill(mmu, 0x0040_0000, R)
    other = Tables(pg.Mode.LONG, t.buf)
    other.next = t.next + 0x10000
    other.cr3 = other.alloc()
    mmu.set_context(pg.PagingContext(pg.Mode.LONG, other.cr3))
    assert root.root_count == 0 and mmu.root is not root
    misses = mmu.counters["mmu_cache_miss"]
    start(t, mmu)
    assert mmu.root is root and mmu.counters["mmu_cache_miss"] == misses


def test_unprotect_zaps_all_shadows_of_the_frame():
    t, mmu = make(pg.Mode.PAE)
    leaf = t.map(0x0040_0000, DATA, PWU)
    start(t, mmu)
    fill(mmu, 0x0040_0000, R)
    assert mmu.vm.unprotect(leaf >> 12)
    assert not mmu.vm.is_tracked(leaf >> 12) and mmu.counters["mmu_unprotect"] == 1
    assert mmu.counters["mmu_shadow_zapped"] == 1
    audit(mmu.vm)
    # the next access re-shadows it
    fill(mmu, 0x0040_0000, R)
    assert mmu.vm.is_tracked(leaf >> 12)


def test_audit_catches_a_writable_spte_on_a_shadowed_frame():
    t, mmu = make(pg.Mode.PAE)
    leaf = t.map(0x0040_0000, DATA, PWU | pg.PTE_D)
    t.map(0x0050_0000, leaf & ~0xFFF, PWU | pg.PTE_D)
    start(t, mmu)
    fill(mmu, 0x0040_0000, R)
    fill(mmu, 0x0050_0000, R)
    sp, idx = shadow_leaf(mmu.root, mmu.root_level, 0x0050_0000)
    sp.spt[idx] |= SPTE_W                                      # corrupt it on purpose
    with pytest.raises(AuditError, match="writable"):
        audit(mmu.vm)

