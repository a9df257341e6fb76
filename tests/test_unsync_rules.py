"""The out-of-sync rules of ``kvm-2008-oos`` (KVM 2.6.28: mmu/unsync.Kvm2628Rules, the INVLPG of
policies/kvm2008.Kvm2008Oos) and ``xen-oos`` (Xen 3.3.1: mmu/oos_xen.Xen33Rules), each test
against ``kvm`` (modern KVM: mmu/unsync.ModernRules) where the rule differs, so that swapping a
rule for another policy's fails a test.

Sans-CPU, with the Guest harness of tests/test_unsync.py (a bytearray of guest RAM, ``hw_fill``
where the hardware walks, native stores through WIN, which maps X's page table PT, the audit
after every step). "Emulated store" below is what the write-fault path does after a trapped
store: the bytes land in guest RAM, then ``VcpuMmu.pte_write``.
"""
import pytest

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.emulate.decode import decode
from x86shadow.guesttables import GuestTables
from x86shadow.mmu import oos_xen
from x86shadow.mmu.audit import audit
from x86shadow.mmu.requests import REQ_MMU_SYNC, REQ_TLB_FLUSH
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import PERM_W, SPTE_A, SPTE_P, SPTE_U, SPTE_W
from x86shadow.mmu.vcpu_mmu import FILL_OK, FILL_TRACKED
from x86shadow.mmu.write_fault import COMPLETE, REEXECUTE, TrappedWrite, handle_trapped_write

from test_unsync import (DATA, LEGACY, LONG, MODE_IDS, MODES, NEW, OTHER, PAE, PWU, WIN, A, D,
                         Guest, R, W, X)

U = pg.PFERR_U
P, RW, US = pg.PTE_P, pg.PTE_W, pg.PTE_U
K2008, XEN = "kvm-2008-oos", "xen-oos"
RIP = 0x0010_0000            # unmapped: the trapped store's instruction need not be in memory
Y = 0x0100_0000              # a page mapped by another leaf table (B) in every mode
DATA_Y = DATA + 0x6000


# ------------------------------------------------------------------------------ helpers
def spte(g, va):
    """The present leaf spte for va in the current root, or None."""
    leaf = shadow_leaf(g.mmu.root, g.mmu.root_level, va)
    return None if leaf is None else leaf[0].spt[leaf[1]]


def writable_mappings(vm, gfn):
    return [(sp, i) for sp, i in vm.rmap.get(gfn, ()) if sp.spt[i] & SPTE_W]


def leaf_pages(g, pa):
    return [sp for sp in g.vm.shadow_pages_of(pa >> 12) if sp.role.level == 1]


def gwrite(g, gpa, value):
    g.t.wr(gpa, value)


def emulated_store(g, gpa, value):
    """An emulated store to a guest page table: the bytes, then the pte-write path."""
    gwrite(g, gpa, value)
    g.mmu.pte_write(gpa, g.t.esz)
    audit(g.vm)


def trapped_store(g, via, gpa, value, cpl=0):
    """A guest store to gpa through virtual address via that takes the write trap: the fill
    reports FILL_TRACKED, the CPU hands the store (a decoded ``mov [reg], reg``) to the
    write-fault path."""
    r = g.mmu.hw_fill(via, W | (U if cpl == 3 else 0))
    assert r.kind == FILL_TRACKED, r
    audit(g.vm)
    bits = 64 if g.mode == LONG else 32
    insn = decode(b"\x48\x89\x03" if g.t.esz == 8 else b"\x89\x03", RIP, bits)
    assert insn is not None
    out = handle_trapped_write(g.mmu, TrappedWrite(gpa, g.t.esz, value, RIP, cpl, insn, True,
                                                   exits=g.c["exits"]))
    audit(g.vm)
    return out


def win(g, gpa):
    """WIN's address of a slot of PT."""
    assert gpa & ~0xFFF == g.pt
    return WIN + (gpa & 0xFFF)


def unsync_pt(g, value=None):
    """The first kernel store through WIN (X's pte; value: NEW unless given)."""
    g.native_store(g.pte_x, NEW | PWU | A | D if value is None else value)
    assert g.leaf.unsync


def oos_slot(g, pa):
    """Xen: (slot index, OosSlot) of pa's frame in the vCPU's out-of-sync table, or None."""
    found = oos_xen.find_slot(g.vm, pa >> 12)
    if found is None:
        return None
    v, i = found
    assert v is g.mmu
    return i, v.oos[i]


def reasons_for(g, pa):
    return [f["reason"] for f in g.syncs if f["gfn"] == pa >> 12]


# ================================================================================ kvm-2008-oos
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_k2008_a1_first_store_unsyncs_stale_until_cr3_reload_which_resyncs(mode):
    """kvm-2008-oos A1: set_spte -> mmu_need_write_protect -> kvm_unsync_page (2.6.28 mmu.c) unsyncs, no emulation; kvm_set_cr3 -> kvm_mmu_sync_roots resyncs."""
    g = Guest(mode, policy=K2008)
    c = g.c
    before = dict(c)
    unsync_pt(g)
    assert c["mmu_unsync"] == 1 and c["mmu_unsync_events"] == 1
    assert g.unsynced == [g.pt >> 12]
    assert c["insn_emulation"] == 0 and c["pf_emulate"] == 0
    assert c["pf_fixed"] == before["pf_fixed"] + 1
    # the second store: WIN's spte is writable already
    faults = c["pf_fixed"]
    g.native_store(g.pte_other, (DATA + 0x3000) | P | US | A)          # OTHER now read-only
    assert c["pf_fixed"] == faults and c["mmu_unsync_events"] == 1
    # stale until the flush: X still maps DATA, OTHER is still writable
    assert g.fill(X) == DATA
    r = g.mmu.hw_fill(OTHER, W)
    assert r.kind == FILL_OK and r.perms & PERM_W
    g.reload_cr3()
    assert g.synced == ["new root"]
    assert c["mmu_unsync"] == 0 and not g.leaf.unsync and not g.leaf.zapped
    assert c["mmu_sync_pages"] == 1 and c["mmu_sync_zapped"] == 0
    assert writable_mappings(g.vm, g.pt >> 12) == []          # PT write-protected again
    assert spte(g, X) is None                                 # another frame: dropped
    s = spte(g, OTHER)
    assert s is not None and not s & SPTE_W                   # rebuilt read-only
    faults = c["pf_fixed"]
    assert g.fill(X) == NEW and c["pf_fixed"] == faults + 1


def _two_roles(g):
    """PT gets a second shadow page: LEGACY -- its other quadrant (X2 in PT's upper 2 MiB);
    LONG -- a second PDE to PT without U (another role.access)."""
    g.x2 = X + 0x20_0000
    if g.mode == LEGACY:
        g.t.map(g.x2, DATA + 0x5000, PWU | A | D)
        assert g.t.table_of(g.x2) == g.pt
    else:
        g.t.set(g.x2, 2, g.pt | P | RW | A)            # the next PDE, pointing at PT too


@pytest.mark.parametrize("mode", [LEGACY, LONG], ids=["legacy-quadrants", "long-rights"])
@pytest.mark.parametrize("policy", ["kvm", K2008, XEN])
def test_k2008_a_frame_shadowed_with_two_roles_does_not_go_out_of_sync(mode, policy):
    """kvm_unsync_page (2.6.28 mmu.c): "don't unsync if pagetable is shadowed with multiple roles" -- the store traps and is emulated; kvm (mmu_try_to_unsync_pages) and xen-oos (one shadow per type: sh_unsync) unsync every shadow."""
    g = Guest(mode, policy=policy, setup=_two_roles)
    g.fill(g.x2)
    sps = leaf_pages(g, g.pt)
    assert len(sps) == 2 and sps[0].role != sps[1].role
    if policy == K2008:
        out = trapped_store(g, win(g, g.pte_x), g.pte_x, NEW | PWU | A | D)
        assert out == COMPLETE and g.c["insn_emulation"] == 1
        assert g.c["mmu_unsync"] == 0 and not any(sp.unsync for sp in sps)
        assert g.vm.is_shadowed(g.pt >> 12) and writable_mappings(g.vm, g.pt >> 12) == []
        # the emulated store went down 2.6.28's pte-write path (update_pte): X maps NEW at once
        s = spte(g, X)
        assert s is not None and s >> 12 == NEW >> 12
    else:
        r = g.mmu.hw_fill(win(g, g.pte_x), W)
        assert r.kind == FILL_OK and r.perms & PERM_W
        assert all(sp.unsync for sp in sps) and g.c["mmu_unsync"] == len(sps)
        assert g.c["insn_emulation"] == 0
    audit(g.vm)


def _reuse_as_directory(g, keep_ptes):
    """(LONG) PT out of sync; then (optionally) its ptes cleared; then PT used as the page
    directory of Z (a new PDPT entry), PT[5] being Z's PDE."""
    z = 0x4000_0000 + (5 << 21)
    unsync_pt(g, g.t.rd(g.pte_x))                 # the same value: nothing to drop at a sync
    ztable = DATA + 0x8000                         # Z's page table (a data frame so far)
    g.native_store(g.pt + 5 * 8, ztable | PWU | A)
    if not keep_ptes:
        g.native_store(g.pte_x, 0)
        g.native_store(g.pte_other, 0)
    g.t.wr(ztable, NEW | PWU | A | D)             # Z's pte (ztable is no page table yet)
    emulated_store(g, g.t.slot(z, 3), g.pt | PWU | A)   # not present -> present in the PDPT
    assert g.fill(z) == NEW
    return z


@pytest.mark.parametrize("keep_ptes", [True, False], ids=["ptes-present", "ptes-cleared"])
@pytest.mark.parametrize("policy", ["kvm", K2008])
def test_k2008_get_page_syncs_an_unsync_leaf_whose_frame_becomes_a_directory(policy, keep_ptes):
    """kvm_mmu_get_page (2.6.28 mmu.c): every unsync page of the gfn is kvm_sync_page'd (write-protected, resynced; zapped if none of its sptes stays present) whatever its role; kvm (kvm_mmu_find_shadow_page) zaps it."""
    g = Guest(LONG, policy=policy)
    _reuse_as_directory(g, keep_ptes)
    assert g.vm.is_tracked(g.pt >> 12) and writable_mappings(g.vm, g.pt >> 12) == []
    assert g.c["mmu_unsync"] == 0 and not g.leaf.unsync
    if policy == "kvm":
        assert g.leaf.zapped and reasons_for(g, g.pt) == []
    elif keep_ptes:
        assert not g.leaf.zapped and reasons_for(g, g.pt) == ["get_page"]
        assert g.leaf in g.vm.shadow_pages_of(g.pt >> 12)
        assert spte(g, X) is not None and spte(g, OTHER) is not None
        assert g.c["mmu_sync_zapped"] == 0
    else:
        assert g.leaf.zapped and g.c["mmu_sync_zapped"] == 1
        assert reasons_for(g, g.pt) == ["get_page: no present spte left"]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", ["kvm", K2008])
def test_k2008_a_page_left_without_a_present_spte_is_zapped_at_the_sync(mode, policy):
    """FNAME(sync_page) (2.6.28 paging_tmpl.h) returns !nr_present, and kvm_sync_page zaps such a page; kvm's FNAME(sync_spte) keeps it, in sync and empty."""
    g = Guest(mode, policy=policy)
    unsync_pt(g, 0)                              # X's pte not present
    g.native_store(g.pte_other, 0)               # ... nor OTHER's: no present spte can stay
    g.reload_cr3()
    assert g.c["mmu_unsync"] == 0 and not g.leaf.unsync
    if policy == K2008:
        assert g.leaf.zapped and g.c["mmu_sync_zapped"] == 1 and g.c["mmu_sync_pages"] == 0
        assert not g.vm.is_shadowed(g.pt >> 12)
    else:
        assert not g.leaf.zapped and g.c["mmu_sync_zapped"] == 0 and g.c["mmu_sync_pages"] == 1
        assert g.leaf_page() is g.leaf and not any(s & SPTE_P for s in g.leaf.spt)
        assert writable_mappings(g.vm, g.pt >> 12) == []


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", ["kvm", K2008])
def test_k2008_invlpg_drops_the_leaf_spte_of_an_unsync_page(mode, policy):
    """FNAME(invlpg) (2.6.28 paging_tmpl.h, shadow_invlpg_entry): the leaf spte is dropped, not re-read; the page stays unsync and the next access faults; kvm (__kvm_mmu_invalidate_addr) resyncs that spte."""
    g = Guest(mode, policy=policy)
    unsync_pt(g, DATA | P | US | A | D)                # X becomes read-only
    assert spte(g, X) & SPTE_W                          # (stale)
    other = spte(g, OTHER)
    g.mmu.invlpg(X)
    audit(g.vm)
    assert g.leaf.unsync and g.c["mmu_unsync"] == 1
    assert spte(g, OTHER) == other                      # only va's spte
    faults = g.c["pf_fixed"]
    if policy == K2008:
        assert spte(g, X) is None
        assert g.fill(X) == DATA and g.c["pf_fixed"] == faults + 1
    else:
        s = spte(g, X)
        assert s is not None and not s & SPTE_W         # rebuilt from the guest pte
        assert g.fill(X) == DATA and g.c["pf_fixed"] == faults
    assert g.leaf.unsync


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", ["kvm", K2008])
def test_k2008_invlpg_drops_the_leaf_spte_of_a_synced_page_too(mode, policy):
    """FNAME(invlpg) (2.6.28 paging_tmpl.h) drops the leaf spte in any page, without reading the guest pte; kvm leaves a synced page's spte alone (only unsync pages are resynced)."""
    g = Guest(mode, policy=policy)
    before = spte(g, OTHER)
    g.mmu.invlpg(OTHER)
    audit(g.vm)
    assert not g.leaf.unsync and g.c["mmu_unsync"] == 0
    faults = g.c["pf_fixed"]
    if policy == K2008:
        assert spte(g, OTHER) is None               # the guest pte is valid: not re-read
        assert g.fill(OTHER) == DATA + 0x3000 and g.c["pf_fixed"] == faults + 1
    else:
        assert spte(g, OTHER) == before
        assert g.fill(OTHER) == DATA + 0x3000 and g.c["pf_fixed"] == faults


def _second_pdpte(g):
    """PDPT[1] points at X's page directory too: X + 1 GiB is an alias of X."""
    g.t.set(X + (1 << 30), 3, g.t.get(X, 3))


@pytest.mark.parametrize("policy", ["kvm", K2008])
def test_k2008_reused_directory_with_unsync_children_requests_a_sync_of_the_root(policy):
    """kvm_mmu_get_page (2.6.28 mmu.c): a found page with unsync_children sets KVM_REQ_MMU_SYNC; vcpu_enter_guest syncs the roots (reason "request"); kvm syncs the reused page in FNAME(fetch) (reason "fetch")."""
    g = Guest(LONG, policy=policy, setup=_second_pdpte)
    unsync_pt(g)
    alias = X + (1 << 30)
    at_sync = []            # the alias's leaf spte when the sync runs
    g.vm.events.subscribe(lambda _k, f: at_sync.append(spte(g, alias)), (ev.SYNC_PAGE,))
    assert g.fill(alias) == NEW
    assert not g.leaf.unsync and g.c["mmu_unsync"] == 0
    assert not g.mmu.requests & REQ_MMU_SYNC                      # serviced by the fault
    (s,) = at_sync
    if policy == K2008:
        # at the end of the fault: the leaf spte was installed already
        assert reasons_for(g, g.pt) == ["request"] and s is not None and s >> 12 == NEW >> 12
    else:
        # on the way down, before the leaf spte
        assert reasons_for(g, g.pt) == ["fetch"] and s is None
    assert g.fill(X) == NEW                                      # the whole PT is in sync


def _two_quadrants_and_window_table(g):
    g.x2 = X + 0x20_0000                          # PT's other quadrant (LEGACY)
    g.t.map(g.x2, DATA + 0x5000, PWU | A | D)
    g.wt = g.t.table_of(WIN)                       # WIN's leaf table: shadowed by the setup
    assert g.wt != g.pt


@pytest.mark.parametrize("policy", ["kvm", K2008])
def test_k2008_a_speculative_install_by_update_pte_may_unsync(policy):
    """2.6.28 FNAME(update_pte) -> mmu_set_spte -> set_spte(can_unsync true): an emulated pte write that maps another leaf table P|W|A|D installs it writable and that table goes out of sync; kvm's pte write installs nothing (and a prefetch never unsyncs: mmu_try_to_unsync_pages)."""
    g = Guest(LEGACY, policy=policy, setup=_two_quadrants_and_window_table)
    g.fill(g.x2)
    assert len(leaf_pages(g, g.pt)) == 2            # PT itself cannot go out of sync (2008)
    (wt_sp,) = leaf_pages(g, g.wt)
    va = X + 0x5000
    emulated_store(g, g.t.slot(va, 1), g.wt | P | RW | A | D)
    if policy == K2008:
        s = spte(g, va)
        assert s is not None and s & SPTE_W and not s & SPTE_A      # speculative, writable
        assert wt_sp.unsync and g.c["mmu_unsync"] == 1
        assert not any(sp.unsync for sp in leaf_pages(g, g.pt))
    else:
        assert spte(g, va) is None
        assert not wt_sp.unsync and g.c["mmu_unsync"] == 0
    g.reload_cr3()
    assert writable_mappings(g.vm, g.wt >> 12) == [] and not wt_sp.unsync


# ============================================================================ every policy
def _cross_mapped(g):
    """Two leaf tables, A (= PT) and B (Y's table), each mapping the other writable and dirty:
    A's entry for X + 0x5000 maps B, B's entry for Y + 0x5000 maps A."""
    g.t.map(Y, DATA_Y, PWU | A | D)
    g.b = g.t.table_of(Y)
    assert g.b != g.pt
    g.t.map(X + 0x5000, g.b, PWU | A | D)
    g.t.map(Y + 0x5000, g.pt, PWU | A | D)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", ["kvm", K2008, XEN])
def test_a_resync_never_leaves_a_writable_spte_to_a_shadowed_frame(mode, policy):
    """Every policy: a resync never makes a spte writable to a frame that has a shadow (kvm: mmu_sync_children write-protects the batch; 2.6.28: kvm_sync_page's rmap_write_protect page by page; Xen: _sh_resync's oos_remove_write_access) -- two leaf tables mapped writable through each other."""
    g = Guest(mode, policy=policy, setup=_cross_mapped)
    a, b = g.pt, g.b
    g.fill(Y)                                           # B is shadowed
    r = g.mmu.hw_fill(X + 0x5000, W)                    # a writable spte to B: B unsyncs
    assert r.kind == FILL_OK and r.perms & PERM_W
    r = g.mmu.hw_fill(Y + 0x5000, W)                    # ... to A: A unsyncs
    assert r.kind == FILL_OK and r.perms & PERM_W
    audit(g.vm)
    assert all(sp.unsync for sp in leaf_pages(g, a) + leaf_pages(g, b))
    assert writable_mappings(g.vm, a >> 12) and writable_mappings(g.vm, b >> 12)
    # each table's entry for the other changes rights (U goes), written natively through the
    # other's writable mapping: both are re-propagated at the sync
    assert g.t.slot(Y + 0x5000, 1) & ~0xFFF == b
    gwrite(g, g.t.slot(Y + 0x5000, 1), a | P | RW | A | D)
    gwrite(g, g.t.slot(X + 0x5000, 1), b | P | RW | A | D)
    audit(g.vm)
    g.reload_cr3()
    assert writable_mappings(g.vm, a >> 12) == [] and writable_mappings(g.vm, b >> 12) == []
    assert not any(sp.unsync for sp in leaf_pages(g, a) + leaf_pages(g, b))
    assert g.c["mmu_unsync"] == 0
    for va in (X + 0x5000, Y + 0x5000):
        s = spte(g, va)
        assert s is not None and not s & SPTE_W and not s & SPTE_U     # re-propagated
    # the next write fault makes either writable again, the table going out of sync
    for va, table in ((X + 0x5000, b), (Y + 0x5000, a)):
        r = g.mmu.hw_fill(va, W)
        assert r.kind == FILL_OK and r.perms & PERM_W
        assert all(sp.unsync for sp in leaf_pages(g, table))
        audit(g.vm)


def _read_only_q(g):
    g.q = X + 0x5000
    g.pte_q = g.t.map(g.q, DATA + 0x5000, P | A | D)          # read-only, supervisor


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", ["kvm", K2008, XEN])
def test_a_resync_takes_away_the_w_a_cr0_wp0_supervisor_write_granted(mode, policy):
    """FNAME(sync_spte) (Linux 6.18 paging_tmpl.h) keeps a spte only if kvm_mmu_page_get_access -- which holds the CR0.WP=0 override of FNAME(page_fault) (W granted, U taken) -- equals the new gpte's rights; a now clean gpte must not stay mapped writable (2.6.28 and Xen rebuild it anyway)."""
    g = Guest(mode, policy=policy, setup=_read_only_q)
    assert not g.mmu.ctx.wp
    r = g.mmu.hw_fill(g.q, W)                 # a supervisor write to a read-only page: allowed
    assert r.kind == FILL_OK and r.perms & PERM_W
    audit(g.vm)
    # the guest makes Q's pte writable, but clean (no D), and flushes
    unsync_pt(g, g.t.rd(g.pte_x))
    g.native_store(g.pte_q, (DATA + 0x5000) | P | RW | A)
    g.reload_cr3()
    s = spte(g, g.q)
    assert s is None or not s & SPTE_W                     # the first write must set D
    g.fill(g.q, W)
    assert g.t.rd(g.pte_q) & D


# ================================================================================ xen-oos
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_xen_a1_first_kernel_store_unsyncs_with_a_snapshot_and_cr3_resyncs(mode):
    """sh_page_fault "always unsync when writing to L1 page tables" -> sh_unsync -> oos_hash_add (snapshot = the whole guest page); sh_update_cr3 -> shadow_resync_current_vcpu -> _sh_resync."""
    g = Guest(mode, policy=XEN)
    c = g.c
    page = bytes(g.mem.read(g.pt, 4096))
    r = g.mmu.hw_fill(win(g, g.pte_x), W)            # the store's fault
    assert r.kind == FILL_OK and r.perms & PERM_W
    audit(g.vm)
    assert c["shadow_unsync"] == 1 and c["mmu_unsync"] == 1 and g.leaf.unsync
    assert c["insn_emulation"] == 0 and c["pf_emulate"] == 0
    i, slot = oos_slot(g, g.pt)
    assert i == (g.pt >> 12) % oos_xen.SHADOW_OOS_PAGES
    assert slot.snapshot == page                     # the page when it went out of sync
    gwrite(g, g.pte_x, NEW | PWU | A | D)            # the store, natively
    assert slot.snapshot == page
    faults = c["pf_fixed"]
    g.native_store(g.pte_other, (NEW + 0x3000) | PWU | A | D)     # no fault: W already
    assert c["pf_fixed"] == faults and c["shadow_unsync"] == 1
    assert g.fill(X) == DATA                         # stale until the flush
    g.reload_cr3()
    assert c["shadow_resync"] == 1 and c["mmu_unsync"] == 0 and not g.leaf.unsync
    assert oos_slot(g, g.pt) is None and writable_mappings(g.vm, g.pt >> 12) == []
    assert g.synced == ["cr3"]
    assert g.fill(X) == NEW and g.fill(OTHER) == NEW + 0x3000


def _dirty_window(g):
    # outside WIN's block of 8 ptes, so that the fault through WIN does not prefetch it (kvm's
    # FNAME(pte_prefetch): a prefetched spte is read-only and unsyncs nothing, and the read
    # below would then take no fault)
    g.win2 = WIN + 0x8000
    g.t.map(g.win2, g.pt, PWU | A | D)               # PT mapped writable and dirty


@pytest.mark.parametrize("policy", ["kvm", K2008, XEN])
def test_xen_only_a_demand_write_unsyncs(policy):
    """_sh_propagate (Xen 3.3.1 multi.c): a page table is mapped writable only for ft_demand_write to an out-of-sync frame -- a read through a dirty writable pte gives a read-only spte; kvm (make_spte) and 2.6.28 (set_spte) unsync on that read."""
    g = Guest(LONG, policy=policy, setup=_dirty_window)
    r = g.mmu.hw_fill(g.win2, R)
    assert r.kind == FILL_OK
    s = spte(g, g.win2)
    if policy == XEN:
        assert not s & SPTE_W and not g.leaf.unsync
        assert g.c["shadow_unsync"] == 0 and g.c["mmu_unsync"] == 0
        r = g.mmu.hw_fill(g.win2, W)                 # the demand write does
        assert r.kind == FILL_OK and r.perms & PERM_W and g.leaf.unsync
    else:
        assert s & SPTE_W and g.leaf.unsync and g.c["mmu_unsync_events"] == 1
    audit(g.vm)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", ["kvm", K2008, XEN])
def test_xen_a_user_mode_write_to_a_leaf_table_traps_and_unshadows(mode, policy):
    """sh_page_fault (Xen 3.3.1): a write with PFEC_user_mode to a page table is emulated -- not unsynced -- and the xen policy's CPL3 rule unshadows it (sh_remove_shadows); kvm and 2.6.28 unsync on a user write as on any other."""
    g = Guest(mode, policy=policy)
    if policy == XEN:
        out = trapped_store(g, win(g, g.pte_x), g.pte_x, NEW | PWU | A | D, cpl=3)
        assert out == REEXECUTE
        assert g.c["shadow_unsync"] == 0 and g.c["mmu_unsync"] == 0
        assert not g.vm.is_shadowed(g.pt >> 12) and g.leaf.zapped
        g.native_store(g.pte_x, NEW | PWU | A | D)      # the re-execution: natively
    else:
        r = g.mmu.hw_fill(win(g, g.pte_x), W | U)
        assert r.kind == FILL_OK and r.perms & PERM_W
        assert g.leaf.unsync and g.c["mmu_unsync"] == 1
    audit(g.vm)


def _four_tables(g):
    """Four more leaf tables T0..T3 at chosen frames: gfns 0, 0, 0, 1 (mod 3); each mapped at
    its own window page, clean (a read builds a read-only spte)."""
    g.tables, g.vas = [], []
    base = 0x0070_0000                             # (above the tables GuestTables allocated)
    assert g.t.next <= base
    frames = []
    gfn = base >> 12
    for want in (0, 0, 0, 1):
        while gfn % 3 != want or gfn in frames:
            gfn += 1
        frames.append(gfn)
    for k, gfn in enumerate(frames):
        va = 0x1000_0000 + (k << 22) + (k << 12)   # its own leaf table, entry k
        g.t.next = gfn << 12
        g.t.map(va, DATA + 0x9000, PWU | A | D)
        assert g.t.table_of(va) == gfn << 12
        g.t.map(WIN + 0x10_0000 + (k << 12), gfn << 12, PWU | A)
        g.tables.append(gfn << 12)
        g.vas.append(va)
    g.t.next = 0x0078_0000


def test_xen_oos_table_slots_and_eviction():
    """oos_hash_add (Xen 3.3.1 common.c): a frame takes slot gfn % 3; an occupant at home there is pushed to the next slot; what that slot held is resynced (shadow_unsync_evict)."""
    g = Guest(LONG, policy=XEN, setup=_four_tables)
    t0, t1, t2, t3 = g.tables
    evicted = []
    g.vm.events.subscribe(lambda _k, f: f["reason"] == "eviction" and evicted.append(f["gfn"]),
                          ("kvm_mmu_sync_page",))
    for va in g.vas:
        g.fill(va)

    def unsync(k):
        slot = g.t.slot(g.vas[k], 1)
        r = g.mmu.hw_fill(WIN + 0x10_0000 + (k << 12) + (slot & 0xFFF), W)
        assert r.kind == FILL_OK and r.perms & PERM_W
        audit(g.vm)

    def table():
        return [None if s is None else s.gfn << 12 for s in g.mmu.oos]

    unsync(0)
    assert table() == [t0, None, None]
    unsync(1)                                   # t0 is at home in slot 0: pushed to slot 1
    assert table() == [t1, t0, None] and evicted == []
    assert g.c["shadow_unsync_evict"] == 0
    # each snapshot is its frame's page (the pushed occupant keeps its own)
    assert [s.snapshot for s in g.mmu.oos[:2]] == [bytes(g.mem.read(pa, 4096)) for pa in (t1, t0)]
    assert g.mmu.oos[0].snapshot != g.mmu.oos[1].snapshot
    unsync(2)                                   # t1 pushed to slot 1, whose t0 is resynced
    assert table() == [t2, t1, None] and evicted == [t0 >> 12]
    assert g.c["shadow_unsync_evict"] == 1
    unsync(3)                                   # slot 1's t1 is not at home: resynced
    assert table() == [t2, t3, None] and evicted == [t0 >> 12, t1 >> 12]
    assert g.c["shadow_unsync_evict"] == 2
    for pa, oos in ((t0, False), (t1, False), (t2, True), (t3, True)):
        assert all(sp.unsync == oos for sp in leaf_pages(g, pa))
        assert bool(writable_mappings(g.vm, pa >> 12)) == oos
    assert [s.snapshot for s in g.mmu.oos[:2]] == [bytes(g.mem.read(pa, 4096)) for pa in (t2, t3)]


def _three_windows(g):
    g.wins = [WIN, WIN + 0x1000, WIN + 0x2000]
    for w in g.wins[1:]:
        g.t.map(w, g.pt, PWU | A)                   # clean: write faults make them writable


@pytest.mark.parametrize("policy", ["kvm", XEN])
def test_xen_a_third_writable_mapping_evicts_the_oldest_fixup(policy):
    """oos_fixup_add (Xen 3.3.1 common.c): SHADOW_OOS_FIXUPS (2) writable mappings per out-of-sync frame; the oldest loses W (shadow_oos_fixup_evict) without a TLB flush, and the frame stays out of sync; kvm keeps every writable mapping."""
    g = Guest(LONG, policy=policy, setup=_three_windows)
    for w in g.wins[1:]:
        g.fill(w)
    for w in g.wins[:2]:
        r = g.mmu.hw_fill(w, W)
        assert r.kind == FILL_OK and r.perms & PERM_W
        audit(g.vm)
    g.mmu.take_requests()                           # (serviced at the entry)
    r = g.mmu.hw_fill(g.wins[2], W)
    assert r.kind == FILL_OK and r.perms & PERM_W
    audit(g.vm)
    writable = [bool(spte(g, w) & SPTE_W) for w in g.wins]
    assert g.leaf.unsync
    if policy == XEN:
        assert writable == [False, True, True]
        assert g.c["shadow_oos_fixup_add"] == 3 and g.c["shadow_oos_fixup_evict"] == 1
        assert not g.mmu.requests & REQ_TLB_FLUSH
        assert oos_slot(g, g.pt) is not None
    else:
        assert writable == [True, True, True]


@pytest.mark.parametrize("policy", ["kvm", XEN])
def test_xen_resync_repropagates_only_entries_that_differ_from_the_snapshot(policy):
    """sh_resync_l1 (Xen 3.3.1 multi.c): only entries that differ from the snapshot are re-propagated (l1e_propagate_from_guest, which follows a new frame); kvm's FNAME(sync_spte) re-reads every entry and drops one that maps another frame."""
    g = Guest(LONG, policy=policy)
    unsync_pt(g, g.t.rd(g.pte_x))                       # the unsyncing store changes nothing
    other = g.t.rd(g.pte_other)
    g.native_store(g.pte_other, (NEW + 0x3000) | PWU | A | D)
    g.native_store(g.pte_other, other)                  # ... and back to the snapshot's value
    g.native_store(g.pte_x, NEW | PWU | A | D)          # another frame
    s_other = spte(g, OTHER)
    assert s_other & SPTE_A                              # (the fill set A: a rebuild clears it)
    g.reload_cr3()
    (f,) = [f for f in g.syncs if f["gfn"] == g.pt >> 12]
    assert f["changed"] == 1
    assert spte(g, OTHER) == s_other                     # untouched
    faults = g.c["pf_fixed"]
    if policy == XEN:
        s = spte(g, X)
        assert s is not None and s >> 12 == NEW >> 12    # followed to the new frame
        assert g.fill(X) == NEW and g.c["pf_fixed"] == faults
    else:
        assert spte(g, X) is None                        # dropped: the next access faults
        assert g.fill(X) == NEW and g.c["pf_fixed"] == faults + 1


@pytest.mark.parametrize("policy", ["kvm", XEN])
def test_xen_invlpg_empties_the_spte_of_an_out_of_sync_page_only(policy):
    """sh_invlpg (Xen 3.3.1 multi.c): if the L1 shadow mapping va is out of sync, its entry for va is emptied (the frame stays out of sync); a synced L1's entry is kept; kvm resyncs the spte (__kvm_mmu_invalidate_addr)."""
    g = Guest(LONG, policy=policy)
    before = spte(g, X)
    g.mmu.invlpg(X)                                   # PT in sync: kept
    audit(g.vm)
    assert spte(g, X) == before
    unsync_pt(g, DATA | P | US | A | D)               # X becomes read-only
    g.mmu.invlpg(X)
    audit(g.vm)
    assert g.leaf.unsync
    faults = g.c["pf_fixed"]
    if policy == XEN:
        assert spte(g, X) is None and oos_slot(g, g.pt) is not None
        assert g.fill(X) == DATA and g.c["pf_fixed"] == faults + 1
        # the fault rebuilt the entry and recorded it in the snapshot (sh_page_fault)
        _, slot = oos_slot(g, g.pt)
        assert slot.snapshot[:8] == g.mem.read(g.pte_x, 8)
    else:
        s = spte(g, X)
        assert s is not None and not s & SPTE_W           # rebuilt from the guest pte
        assert g.fill(X) == DATA and g.c["pf_fixed"] == faults
    assert g.leaf.unsync and not spte(g, X) & SPTE_W


@pytest.mark.parametrize("policy", ["kvm", XEN])
def test_xen_promote_resyncs_an_out_of_sync_frame_used_as_a_directory(policy):
    """shadow_promote (Xen 3.3.1 common.c): a frame out of sync that gets another shadow type is sh_resync'ed first (reason "promote"), its L1 shadow stays; kvm (kvm_mmu_find_shadow_page) zaps the unsync leaf."""
    g = Guest(LONG, policy=policy)
    _reuse_as_directory(g, keep_ptes=True)
    assert g.vm.is_tracked(g.pt >> 12) and writable_mappings(g.vm, g.pt >> 12) == []
    assert g.c["mmu_unsync"] == 0
    if policy == XEN:
        assert reasons_for(g, g.pt) == ["promote"] and g.c["shadow_resync"] == 1
        assert not g.leaf.zapped and not g.leaf.unsync and oos_slot(g, g.pt) is None
        assert spte(g, X) is not None and spte(g, OTHER) is not None
    else:
        assert g.leaf.zapped


def _second_pde(g):
    g.x2 = X + 0x20_0000                            # PD[3] -> PT too, same rights
    g.t.set(g.x2, 2, g.t.get(X, 2))


@pytest.mark.parametrize("policy", ["kvm", K2008, XEN])
def test_xen_linking_an_out_of_sync_l1_under_a_new_entry_resyncs_it(policy):
    """shadow_set_l2e (Xen 3.3.1 multi.c): "about to install a new reference" to an out-of-sync L1 -> sh_resync (reason "link"); 2.6.28's kvm_mmu_get_page syncs it too ("get_page"); kvm refreshes it and it stays unsync (kvm_mmu_find_shadow_page)."""
    g = Guest(LONG, policy=policy, setup=_second_pde)
    unsync_pt(g)
    assert g.fill(g.x2) == NEW                      # PT[0] through the second PDE
    assert leaf_pages(g, g.pt) == [g.leaf]          # the same shadow page, linked twice
    assert len(g.leaf.parents) == 2
    if policy == XEN:
        assert reasons_for(g, g.pt) == ["link"] and not g.leaf.unsync
        assert oos_slot(g, g.pt) is None and writable_mappings(g.vm, g.pt >> 12) == []
    elif policy == K2008:
        assert reasons_for(g, g.pt) == ["get_page"] and not g.leaf.unsync
        assert writable_mappings(g.vm, g.pt >> 12) == []
    else:
        assert reasons_for(g, g.pt) == ["get_page"] and g.leaf.unsync
        assert writable_mappings(g.vm, g.pt >> 12)


def _new_upper_entries(g):
    g.far_pd = 0x4000_0000          # a new PDPT entry (LONG: a new l3e; PAE: PDPTE 1)
    g.far_pt = X + 0x60_0000        # only a new PDE under X's directory
    g.far_l4 = 1 << 39              # LONG: a new PML4 entry
    g.t.map(g.far_pd, DATA + 0xA000, PWU | A | D)
    g.t.map(g.far_pt, DATA + 0xB000, PWU | A | D)
    if g.mode == LONG:
        g.t.map(g.far_l4, DATA + 0xC000, PWU | A | D)


@pytest.mark.parametrize("mode,va,resync", [
    (LONG, "far_l4", True), (LONG, "far_pd", True), (LONG, "far_pt", False),
    (PAE, "far_pd", False), (PAE, "far_pt", False)],
    ids=["long-new-l4e", "long-new-l3e", "long-new-l2e", "pae-pdpte", "pae-new-l2e"])
def test_xen_a_fault_that_installs_a_new_l4e_or_l3e_resyncs_everything(mode, va, resync):
    """shadow_get_and_create_l1e (Xen 3.3.1 multi.c, 64-bit guests): a fault that installed a new l4e or l3e calls shadow_resync_all ("new upper-level entry"); a new l2e does not, nor any fault of a PAE guest (its l3es come from sh_update_cr3)."""
    g = Guest(mode, policy=XEN, setup=_new_upper_entries)
    unsync_pt(g)
    resyncs = g.c["shadow_resync"]
    g.fill(getattr(g, va))
    if resync:
        assert reasons_for(g, g.pt) == ["new upper-level entry"]
        assert g.c["shadow_resync"] == resyncs + 1
        assert not g.leaf.unsync and oos_slot(g, g.pt) is None
        assert writable_mappings(g.vm, g.pt >> 12) == []
    else:
        assert reasons_for(g, g.pt) == [] and g.leaf.unsync and oos_slot(g, g.pt) is not None


def _pae_tables_too(g):
    """A PAE address space over the same RAM whose page directory entry for X points at PT
    (a 2-level guest table, read as PAE entries: PT[0..1] are one 8-byte pte mapping DATA), and
    a PAE window WIN onto PT."""
    g.pae = pae = GuestTables(PAE, g.mem, 0x0078_0000, 0x0080_0000)
    pae.map(X, DATA + 0x7000, PWU | A | D)         # (builds the directory; its PT is replaced)
    pae.set(X, 2, g.pt | PWU | A)
    pae.map(WIN, g.pt, PWU | A)
    assert pae.get(X, 1) == g.t.rd(g.pte_x)        # (PT[1] is 0: the high half)


@pytest.mark.parametrize("policy", ["kvm", K2008, XEN])
def test_xen_a_frame_shadowed_as_two_l1_types_does_not_go_out_of_sync(policy):
    """sh_unsync (Xen 3.3.1 common.c): sh_page_has_multiple_shadows -- a frame shadowed both as a 2-level and as a PAE L1 stays in sync and its write traps; 2.6.28 refuses too (another role.glevels: kvm_unsync_page); kvm (mmu_try_to_unsync_pages) unsyncs both."""
    g = Guest(LEGACY, policy=policy, setup=_pae_tables_too)
    pae = g.pae
    g.mmu.set_context(pg.PagingContext(PAE, pae.cr3, pdptes=pg.load_pdptes(g.mem, pae.cr3)))
    audit(g.vm)
    assert g.fill(X) == DATA
    sps = leaf_pages(g, g.pt)
    assert sorted(sp.role.gpte_size for sp in sps) == [4, 8]
    if policy == "kvm":
        r = g.mmu.hw_fill(WIN, W)
        assert r.kind == FILL_OK and r.perms & PERM_W
        assert all(sp.unsync for sp in sps)
    else:
        out = trapped_store(g, WIN, g.pt, NEW | PWU | A | D)
        assert out == COMPLETE and g.c["insn_emulation"] == 1
        assert not any(sp.unsync for sp in sps) and g.c["mmu_unsync"] == 0
        assert writable_mappings(g.vm, g.pt >> 12) == []
        s = spte(g, X)                 # the pte-write path: xen drops, 2.6.28 re-installs
        assert s is None if policy == XEN else s >> 12 == NEW >> 12
    audit(g.vm)


@pytest.mark.parametrize("policy", ["kvm", XEN])
def test_xen_no_unsync_while_a_vcpu_has_paging_off(policy):
    """sh_unsync (Xen 3.3.1 common.c): nothing goes out of sync while oos_active is off (some vCPU runs with paging disabled) -- the store traps and is emulated; kvm has no such rule."""
    g = Guest(LONG, policy=policy)
    other = g.vm.add_vcpu()                          # paging off (never given a context)
    assert other.ctx.mode == pg.Mode.OFF
    if policy == XEN:
        out = trapped_store(g, win(g, g.pte_x), g.pte_x, NEW | PWU | A | D)
        assert out == COMPLETE and g.c["insn_emulation"] == 1
        assert g.c["shadow_unsync"] == 0 and not g.leaf.unsync and g.vm.is_shadowed(g.pt >> 12)
    else:
        unsync_pt(g)
    audit(g.vm)
