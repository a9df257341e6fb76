"""Out-of-sync shadow pages (mmu/unsync.py, docs/UNSYNC.md): the model checklist's scenarios A1-A3
through the sans-CPU core (a bytearray of guest RAM, ``hw_fill`` where the hardware would walk,
plain memory writes where the guest stores natively), then the guest-visible part through
Unicorn. The audit runs after every step.

Guest layout (every mode): X and OTHER are data pages mapped by one leaf table PT; WIN maps PT
itself, writable, through another table, so a store through WIN is a store to X's (or OTHER's)
pte.
"""
import pytest

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.faultlab import FaultLab
from x86shadow.guesttables import GuestTables
from x86shadow.memory.ram import PhysMem
from x86shadow.mmu import unsync
from x86shadow.mmu.audit import audit
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import PERM_W, SPTE_W
from x86shadow.mmu.vcpu_mmu import FILL_OK, FILL_TRACKED
from x86shadow.mmu.vm_mmu import VmMmu
from x86shadow.policies import make_policy

LEGACY, PAE, LONG = pg.Mode.LEGACY, pg.Mode.PAE, pg.Mode.LONG
MODES = [LEGACY, PAE, LONG]
MODE_IDS = ["legacy", "pae", "long"]
R, W = 0, pg.PFERR_W
PWU = pg.PTE_P | pg.PTE_W | pg.PTE_U
A, D = pg.PTE_A, pg.PTE_D
RAM = 8 << 20

X = 0x0040_0000
OTHER = X + 0x3000
DATA = 0x0030_0000          # X's frame; OTHER's is DATA + 0x3000
NEW = 0x0050_0000           # the frame the guest remaps X (and OTHER) to
WIN = 0x0080_0000


class Guest:
    """One VM and vCPU over a bytearray, X's table shadowed (read once through X and WIN), under
    ``policy``: ``make_policy(policy, unsync_on)`` (xen-oos takes unsync_on None or True only).
    ``setup(guest)``, if given, adds guest mappings after the base ones, before the VM exists
    (so no shadowed table is edited behind the MMU's back).

    Trace records: ``synced`` (the reason of each kvm_mmu_sync_page), ``syncs`` (its fields),
    ``unsynced`` (the gfn of each kvm_mmu_unsync_page)."""

    def __init__(self, mode, unsync_on=True, policy="kvm", setup=None):
        self.mode = mode
        self.policy = policy
        self.t = t = GuestTables(mode, PhysMem(bytearray(RAM)), 0x0060_0000, 0x0080_0000)
        self.mem = t.mem
        self.pte_x = t.map(X, DATA, PWU | A | D)
        self.pte_other = t.map(OTHER, DATA + 0x3000, PWU | A | D)
        self.pt = self.pte_x & ~0xFFF
        # the window's pte is clean: a read through it builds a read-only spte (a dirty one
        # would make the spte writable and unsync PT at once: test_a_writable_spte_...)
        t.map(WIN, self.pt, PWU | A)
        if setup is not None:
            setup(self)
        self.vm = VmMmu(self.mem, policy=make_policy(policy, unsync_on))
        self.c = self.vm.counters
        self.mmu = self.vm.add_vcpu()
        self.mmu.set_context(self.ctx())
        self.synced, self.syncs, self.unsynced = [], [], []
        self.vm.events.subscribe(lambda _k, f: (self.synced.append(f["reason"]),
                                                self.syncs.append(dict(f))), (ev.SYNC_PAGE,))
        self.vm.events.subscribe(lambda _k, f: self.unsynced.append(f["gfn"]), (ev.UNSYNC_PAGE,))
        assert self.fill(X) == DATA and self.fill(OTHER) == DATA + 0x3000
        r = self.mmu.hw_fill(WIN, R)
        assert r.kind == FILL_OK and not r.perms & PERM_W        # PT is shadowed: read-only
        self.leaf = self.leaf_page()
        audit(self.vm)

    def ctx(self):
        t = self.t
        if self.mode == PAE:
            return pg.PagingContext(PAE, t.cr3, pdptes=pg.load_pdptes(t.mem, t.cr3))
        return t.ctx()

    def fill(self, va, access=R):
        r = self.mmu.hw_fill(va, access)
        assert r.kind == FILL_OK, r
        audit(self.vm)
        return r.addr

    def leaf_page(self):
        (sp,) = [sp for sp in self.vm.shadow_pages_of(self.pt >> 12) if sp.role.level == 1]
        return sp

    def native_store(self, slot, value):
        """The guest stores natively through WIN (its spte is writable): RAM changes, no exit."""
        r = self.mmu.hw_fill(WIN + (slot & 0xFFF), W)
        assert r.kind == FILL_OK and r.perms & PERM_W, r
        (self.mem.write32 if self.t.esz == 4 else self.mem.write64)(slot, value)
        audit(self.vm)

    def reload_cr3(self):
        self.mmu.set_context(self.ctx())
        audit(self.vm)


def parents_mark(sp):
    return [(parent, idx) for parent, idx in sp.parents
            if getattr(parent, "unsync_child_bitmap", 0) >> idx & 1]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a1_first_write_unsyncs_instead_of_emulating_and_the_cr3_reload_resyncs(mode):
    g = Guest(mode)
    c = g.c
    before = dict(c)
    # first write: a write fault on PT's read-only spte; the page goes out of sync, the spte
    # becomes writable, nothing is emulated (the store re-executes natively)
    g.native_store(g.pte_x, NEW | PWU | A | D)
    assert c["mmu_unsync"] == 1 and c["mmu_unsync_events"] == 1
    assert c["pf_fixed"] == before["pf_fixed"] + 1
    assert c["insn_emulation"] == 0 and c["pf_emulate"] == 0 and c["mmu_pte_write"] == 0
    assert g.leaf.unsync and parents_mark(g.leaf)
    assert g.unsynced == [g.pt >> 12]                  # the kvm_mmu_unsync_page event
    # second write: the spte is writable already, no fault at all
    faults = c["pf_fixed"]
    g.native_store(g.pte_other, (NEW + 0x3000) | PWU)            # no A: dropped at the sync
    assert c["pf_fixed"] == faults and c["mmu_unsync_events"] == 1
    # until the guest flushes, the stale translations are legal (and are what x86 allows)
    assert g.fill(X) == DATA and g.fill(OTHER) == DATA + 0x3000
    # the reload write-protects PT again and resyncs both sptes from the new guest ptes
    g.reload_cr3()
    assert c["mmu_unsync"] == 0 and not g.leaf.unsync and c["mmu_sync_pages"] == 1
    assert g.synced == ["new root"]
    assert parents_mark(g.leaf) == []                  # the walk cleared the marks on its path
    assert g.fill(X) == NEW
    assert g.mmu.hw_fill(WIN, W).kind == FILL_OK and c["mmu_unsync_events"] == 2   # re-unsyncs
    assert parents_mark(g.leaf)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a1_sync_drops_a_spte_whose_guest_pte_is_not_accessed(mode):
    g = Guest(mode)
    g.native_store(g.pte_other, (NEW + 0x3000) | PWU)            # A clear
    g.reload_cr3()
    # FNAME(prefetch_invalid_gpte): the spte is gone; the next access faults and walks the guest
    # tables (which sets A)
    faults = g.c["pf_fixed"]
    assert g.fill(OTHER) == NEW + 0x3000
    assert g.c["pf_fixed"] == faults + 1
    assert g.mem.read64(g.pte_other) & A if g.t.esz == 8 else g.mem.read32(g.pte_other) & A


def test_a_writable_spte_to_a_table_unsyncs_it_even_on_a_read_fault():
    """make_spte (Linux 6.18 spte.c) calls mmu_try_to_unsync_pages for every new writable spte,
    whatever the fault: a read through a dirty, writable mapping of PT unsyncs PT."""
    g = Guest(LONG)
    g.t.map(WIN + 0x1000, g.pt, PWU | A | D)
    assert g.mmu.hw_fill(WIN + 0x1000, R).kind == FILL_OK
    sp, idx = shadow_leaf(g.mmu.root, g.mmu.root_level, WIN + 0x1000)
    assert sp.spt[idx] & SPTE_W          # (no D yet: the first store sets it, without an exit)
    assert g.leaf.unsync and g.c["mmu_unsync_events"] == 1
    audit(g.vm)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_unsync_off_keeps_the_table_write_tracked(mode):
    """--unsync off (KVM's oos_shadow=0): the same write traps for the write-protect path."""
    g = Guest(mode, unsync_on=False)
    assert g.vm.is_tracked(g.pt >> 12)
    assert g.mmu.hw_fill(WIN, W).kind == FILL_TRACKED
    assert g.c["mmu_unsync"] == 0 and g.c["mmu_unsync_events"] == 0


def test_a2_a_frame_shadowed_as_an_upper_level_table_never_goes_out_of_sync():
    """PT is also used as a page directory (for Z): it is write-tracked; a write through WIN
    takes the write-protect path, mmu_unsync stays 0."""
    g = Guest(LONG)
    z = 0x4000_0000                      # PDPT index 1 -> PT used as a page directory
    g.t.set(z, 3, g.pt | PWU | A)
    # PT[0] (X's pte, frame DATA) is then Z's PDE: DATA is the page table for Z
    g.mem.write64(DATA, NEW | PWU | A | D)
    assert g.fill(z) == NEW
    assert g.vm.is_tracked(g.pt >> 12)
    assert g.mmu.hw_fill(WIN, W).kind == FILL_TRACKED
    assert g.c["mmu_unsync"] == 0 and not g.leaf.unsync


def test_a2_variant_an_unsync_leaf_is_zapped_when_its_frame_becomes_an_upper_level_table():
    g = Guest(LONG)
    g.native_store(g.pte_other, (DATA + 0x3000) | PWU | A | D)
    assert g.leaf.unsync
    z = 0x4000_0000
    g.t.set(z, 3, g.pt | PWU | A)        # not present -> present: no flush needed
    g.mem.write64(DATA, NEW | PWU | A | D)
    assert g.fill(z) == NEW
    # modern kvm_mmu_find_shadow_page: the unsync leaf of that frame is zapped
    assert g.leaf.zapped and g.c["mmu_unsync"] == 0
    assert g.vm.is_tracked(g.pt >> 12)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a3_invlpg_resyncs_one_spte_and_the_page_stays_unsync(mode):
    g = Guest(mode)
    g.native_store(g.pte_x, NEW | PWU | A | D)
    g.native_store(g.pte_other, (NEW + 0x3000) | PWU | A | D)
    g.mmu.invlpg(X)
    audit(g.vm)
    assert g.fill(X) == NEW                                     # i refreshed
    assert g.fill(OTHER) == DATA + 0x3000                       # j still stale
    assert g.leaf.unsync and g.c["mmu_unsync"] == 1             # and the page stays unsync
    g.reload_cr3()                                              # a flushing CR3 write
    assert g.fill(OTHER) == NEW + 0x3000 and g.c["mmu_unsync"] == 0


def test_try_to_unsync_refuses_while_synchronizing_for_prefetches_and_when_tracked():
    g = Guest(LONG)
    gfn = g.pt >> 12
    rules = g.vm.policy.unsync

    def may(synchronizing, prefetch):
        return rules.may_unsync(g.vm, g.mmu, None, 0, gfn, True, False, prefetch, synchronizing)

    assert not may(synchronizing=True, prefetch=False)
    assert not may(synchronizing=False, prefetch=True)
    assert g.c["mmu_unsync"] == 0
    assert may(synchronizing=False, prefetch=False)
    assert g.c["mmu_unsync"] == 1
    # an already-unsync page: a prefetch may map it writable, a resync never
    assert may(synchronizing=False, prefetch=True)
    assert not may(synchronizing=True, prefetch=False)
    g.vm.track_add(gfn)
    assert not may(synchronizing=False, prefetch=False)
    g.vm.track_remove(gfn)


def test_a_page_that_does_not_fit_the_context_is_zapped_instead_of_synced():
    """kvm_sync_page_check: a page whose role differs from what the current context gives it
    (here CR0.WP) cannot be synced; it is zapped (mmu_sync_zapped)."""
    import dataclasses
    g = Guest(LONG)
    g.native_store(g.pte_x, NEW | PWU | A | D)
    g.mmu.ctx = dataclasses.replace(g.mmu.ctx, wp=not g.mmu.ctx.wp)
    assert not g.vm.policy.unsync.sync_page(g.mmu, g.leaf, "test")
    g.vm.commit_zap()
    assert g.leaf.zapped and g.c["mmu_sync_zapped"] == 1 and g.c["mmu_sync_pages"] == 0
    assert g.c["mmu_unsync"] == 0


def test_marking_climbs_only_when_a_count_goes_from_zero():
    g = Guest(LONG)
    g.native_store(g.pte_x, NEW | PWU | A | D)
    (parent, idx), = g.leaf.parents
    assert parent.unsync_children == 1
    grand = [p for p, i in parent.parents if p.unsync_child_bitmap >> i & 1]
    assert grand                                       # marked up to the root
    # a second unsync page under the same parent: the parent's count goes 1 -> 2, nothing above
    # changes
    other_pt_va = X + 0x20_0000                        # the next 2 MiB: another leaf table, same PD
    g.t.map(other_pt_va, DATA, PWU | A | D)
    g.t.map(WIN + 0x1000, g.t.table_of(other_pt_va), PWU | A)
    g.fill(other_pt_va)
    above = [(p.unsync_children, p.unsync_child_bitmap) for p, _ in parent.parents]
    slot = g.t.slot(other_pt_va, 1)
    r = g.mmu.hw_fill(WIN + 0x1000 + (slot & 0xFFF), W)
    assert r.kind == FILL_OK and r.perms & PERM_W
    assert parent.unsync_children == 2
    assert [(p.unsync_children, p.unsync_child_bitmap) for p, _ in parent.parents] == above
    audit(g.vm)


def test_sync_walks_in_batches_of_sixteen():
    """mmu_sync_children: one batch is at most 16 entries, parents included; every unsync page is
    synced in the end."""
    g = Guest(LONG)
    n = 20
    for k in range(n):
        va = 0x1000_0000 + (k << 21)                   # one leaf table per 2 MiB
        g.t.map(va, DATA, PWU | A | D)
        g.t.map(WIN + 0x10_0000 + (k << 12), g.t.table_of(va), PWU | A)
        g.fill(va)
        slot = g.t.slot(va, 1)
        assert g.mmu.hw_fill(WIN + 0x10_0000 + (k << 12) + (slot & 0xFFF), W).perms & PERM_W
    assert g.c["mmu_unsync"] == n
    batch = unsync.unsync_walk(g.mmu.root)
    assert len(batch) == unsync.PAGE_ARRAY_NR
    assert sum(1 for sp, _ in batch if sp.unsync) < n
    g.reload_cr3()
    assert g.c["mmu_unsync"] == 0 and g.c["mmu_sync_pages"] == n


# ---------------------------------------------------------------------------------- through Unicorn
WIN_U = 0x4080_0000
X_U = 0x4000_0000
DATA_U = 0x0200_0000


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
@pytest.mark.parametrize("policy,unsync_on", [
    ("kvm", True), ("kvm", False), ("kvm-2008-oos", True), ("kvm-2008-oos", False),
    ("xen-oos", None)],
    ids=["kvm-unsync-on", "kvm-unsync-off", "kvm-2008-oos-unsync-on", "kvm-2008-oos-unsync-off",
         "xen-oos"])
def test_guest_sees_the_remap_after_invlpg_under_both_mmus(mode, policy, unsync_on):
    """A guest remaps X by a store through the window, invlpg's it and reads it: the value of
    the new frame, under Unicorn's own MMU and under the shadow MMU with and without out-of-sync
    pages; with them on, nothing is emulated. The invlpg is each policy's: kvm resyncs the one
    spte (__kvm_mmu_invalidate_addr), kvm-2008-oos drops the leaf spte (2.6.28 FNAME(invlpg)),
    xen-oos empties it because the table is out of sync (sh_invlpg)."""
    results = {}
    for mmu in ("native", "shadow"):
        lab = FaultLab(mode, policy=policy, ram_mib=64, unsync=unsync_on)
        lab.map(X_U, DATA_U)
        lab.map(X_U + 0x1000, DATA_U + 0x1000)
        lab.map_table_window(WIN_U, X_U)
        lab.poke(DATA_U, (0x11111111).to_bytes(4, "little"))
        lab.poke(DATA_U + 0x1000, (0x22222222).to_bytes(4, "little"))
        slot = WIN_U + (lab.pte_addr(X_U) & 0xFFF)
        code = (f" mov eax, dword ptr [{X_U:#x}]\n"                  # shadows X's table
                f" mov dword ptr [{slot:#x}], {DATA_U + 0x1000 | 0x67:#x}\n"
                f" invlpg [{X_U:#x}]\n"
                f" mov eax, dword ptr [{X_U:#x}]\n"
                f" mov dword ptr [0x3000000], eax\n")
        r = lab.run(code, shadow=[X_U] if mmu == "shadow" else (), mmu=mmu)
        results[mmu] = r.read(0x3000000, 4)
        if mmu == "shadow":
            c = r.counters
            if policy == "xen-oos":
                assert c["shadow_unsync"] >= 1 and c["insn_emulation"] == 0
            elif unsync_on:
                assert c["mmu_unsync_events"] >= 1 and c["insn_emulation"] == 0
            else:
                assert c["mmu_unsync_events"] == 0 and c["insn_emulation"] == 1
    assert results["native"] == results["shadow"] == (0x22222222).to_bytes(4, "little")
