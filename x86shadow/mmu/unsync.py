"""Out-of-sync (unsync) shadow pages, KVM's way: a leaf guest page table whose frame the guest
writes natively; its shadow catches up when the guest flushes its TLB.

This is KVM's design as merged in 2.6.28 (commit 4731d4c7a077 "KVM: MMU: out of sync shadow core",
Avi Kivity's bitmap scheme): an ``unsync`` flag per shadow page and, in every parent, an
``unsync_child_bitmap`` (one bit per spte) with an ``unsync_children`` count. Marking climbs
through every parent pte, and only when a parent's count goes 0 -> 1. A stale bit is harmless:
the walk clears it. The shape of the walk and the sync is modern KVM's (arch/x86/kvm/mmu/mmu.c,
Linux 6.18: ``mark_unsync``, ``__mmu_unsync_walk``, ``mmu_pages_add``, ``mmu_sync_children``,
``mmu_pages_clear_parents``, ``kvm_sync_page``, ``FNAME(sync_spte)``); the same structure is in
2.6.29 (``KVM_PAGE_ARRAY_NR`` 16). (2.6.28 itself walked with a callback and write-protected
page by page; the pages synced and the sptes they end with are the same.)

Which pages may go out of sync, and when they sync, is the rule set of the policy
(``Policy.unsync``: an ``UnsyncRules`` object, or None with out-of-sync pages off; docs/UNSYNC.md).
The MMU asks the rule set at each decision point; ``ModernRules`` (policy ``kvm``) and
``Kvm2628Rules`` (``kvm-2008-oos``) are here, ``oos_xen.Xen33Rules`` (``xen-oos``) has Xen 3.3's
own mechanism.
"""
from __future__ import annotations

from .. import events as ev
from .. import paging as pg
from .pages import ENTRIES, ShadowPage, prefetch_invalid_gpte
from .requests import REQ_MMU_SYNC
from .shadow_walk import shadow_leaf
from .spte import SPTE_P, SPTE_W

# KVM_PAGE_ARRAY_NR (2.6.29 mmu.c, modern mmu.c): entries (parents included) per sync batch
PAGE_ARRAY_NR = 16


# ---------------------------------------------------------------------- marking
def mark_unsync(parent, idx) -> None:
    """mark_unsync (modern mmu.c): parent[idx] leads to an unsync page. Climbs to the parent's
    own parents only when its count goes 0 -> 1. The PAE root is not a shadow page (KVM's
    pae_root): marking stops below it."""
    if not isinstance(parent, ShadowPage):
        return
    bit = 1 << idx
    if parent.unsync_child_bitmap & bit:
        return
    parent.unsync_child_bitmap |= bit
    parent.unsync_children += 1
    if parent.unsync_children == 1:
        mark_parents_unsync(parent)


def mark_parents_unsync(sp) -> None:
    """kvm_mmu_mark_parents_unsync: mark sp in every parent pte that points at it."""
    for parent, idx in list(sp.parents):
        mark_unsync(parent, idx)


def clear_unsync_child_bit(sp, idx) -> None:
    bit = 1 << idx
    if sp.unsync_child_bitmap & bit:
        sp.unsync_child_bitmap &= ~bit
        sp.unsync_children -= 1


def unsync_page(vm, sp) -> None:
    """kvm_unsync_page: sp goes out of sync (++mmu_unsync, parents marked)."""
    c = vm.counters
    c["mmu_unsync"] += 1
    c["mmu_unsync_events"] += 1
    sp.unsync = True
    mark_parents_unsync(sp)
    if vm.events.tracing:
        vm.events.emit(ev.UNSYNC_PAGE, sp=sp.id, gfn=sp.gfn, level=sp.role.level,
                       quadrant=sp.role.quadrant)


def unlink_unsync_page(vm, sp) -> None:
    """kvm_unlink_unsync_page: sp is in sync again (--mmu_unsync)."""
    if sp.unsync:
        sp.unsync = False
        vm.counters["mmu_unsync"] -= 1


# ---------------------------------------------------------------------- the walk
def unsync_walk(sp):
    """mmu_unsync_walk: one batch of the unsync pages below sp, as KVM's ``kvm_mmu_pages``
    array: (page, index in its parent) in walk order, parents before their children, at most
    PAGE_ARRAY_NR entries. Empty when nothing below sp is unsync. Stale bits met on the way are
    cleared."""
    pages = []
    if not sp.unsync_children:
        return pages
    _pages_add(pages, sp, None)
    return pages if _walk(sp, pages) else []


def _pages_add(pages, sp, idx) -> bool:
    """mmu_pages_add: True when the batch is full."""
    if sp.unsync:
        for p, _ in pages:
            if p is sp:
                return False
    pages.append((sp, idx))
    return len(pages) == PAGE_ARRAY_NR


def _walk(sp, pages) -> int:
    """__mmu_unsync_walk: unsync leaves found below sp; -1 when the batch filled up."""
    found = 0
    bits = sp.unsync_child_bitmap
    while bits:
        low = bits & -bits
        i = low.bit_length() - 1
        bits ^= low
        child = sp.children[i]
        if child is None:                # the spte was dropped since: a stale bit
            clear_unsync_child_bit(sp, i)
            continue
        if child.unsync_children:
            if _pages_add(pages, child, i):
                return -1
            r = _walk(child, pages)
            if r == 0:
                clear_unsync_child_bit(sp, i)
            elif r > 0:
                found += r
            else:
                return r
        elif child.unsync:
            found += 1
            if _pages_add(pages, child, i):
                return -1
        else:
            clear_unsync_child_bit(sp, i)
    return found


def _leaves_with_parents(pages):
    """for_each_sp / mmu_pages_next: each unsync leaf of the batch with its parent path
    [(parent, index of the child in it), ...] from the leaf's parent upwards."""
    path = {}                           # level -> (sp, index in its parent)
    for sp, idx in pages:
        level = sp.role.level
        path[level] = (sp, idx)
        if level != 1:
            continue
        chain = []
        child_idx = idx
        lvl = 2
        while child_idx is not None and lvl in path:
            parent, parent_idx = path[lvl]
            chain.append((parent, child_idx))
            child_idx = parent_idx
            lvl += 1
        yield sp, chain


def _clear_parents(chain) -> None:
    """mmu_pages_clear_parents: clear the synced page's bit in its parent, and climb while the
    parent's count reached 0."""
    for parent, idx in chain:
        clear_unsync_child_bit(parent, idx)
        if parent.unsync_children:
            return


# ---------------------------------------------------------------------- syncing
def sync_children(mmu, parent, reason: str) -> None:
    """mmu_sync_children: sync every unsync page below parent, a batch at a time: write-protect
    every frame of the batch, one TLB flush if that changed anything, then resync each page."""
    vm = mmu.vm
    rules = vm.policy.unsync
    while True:
        pages = unsync_walk(parent)
        if not pages:
            break
        leaves = list(_leaves_with_parents(pages))
        for sp, _ in leaves:
            vm.write_protect(sp.gfn)     # (requests the flush: one per batch, at the next entry)
        for sp, chain in leaves:
            unlink_unsync_page(vm, sp)
            rules.sync_page(mmu, sp, reason)
            _clear_parents(chain)
    if vm.invalid_list:
        vm.commit_zap()


def sync_roots(mmu, reason: str) -> None:
    """kvm_mmu_sync_roots: sync what the current root reaches (the 4 PAE roots for a PAE or
    2-level guest)."""
    root = mmu.root
    if root is None:
        return
    if isinstance(root, ShadowPage):
        if root.unsync or root.unsync_children:      # is_unsync_root
            sync_children(mmu, root, reason)
        return
    for child in root.children:
        if child is not None and child.unsync_children:
            sync_children(mmu, child, reason)


def sync_spte(mmu, sp, idx, rebuild_same: bool = False) -> int:
    """FNAME(sync_spte): -1 the guest pte cannot be read; 1 the spte was dropped or rebuilt;
    0 nothing to do (never populated, or -- unless ``rebuild_same`` -- the rights are the
    same)."""
    spte = sp.spt[idx]
    if not spte & SPTE_P:
        return 0
    vm = mmu.vm
    gpa = sp.gpte_gpa(idx)
    if not vm.mem.contains(gpa):
        return -1
    fmt = mmu.fmt
    gpte = fmt.read_pte(vm.mem, gpa)
    ctx = mmu.ctx
    if prefetch_invalid_gpte(ctx, gpte):
        vm.drop_spte(sp, idx)
        return 1
    gfn = fmt.leaf_frame(gpte) >> 12
    if gfn != sp.gfns[idx] or vm.gfn_to_pfn(gfn, atomic=True) is None:
        vm.drop_spte(sp, idx)
        return 1
    access = sp.role.access & fmt.entry_access(gpte, ctx.nxe)
    dirty = bool(gpte & pg.PTE_D)
    old_gpte = sp.gptes[idx]
    if (not rebuild_same and old_gpte is not None
            and _recorded_access(sp, spte, old_gpte, fmt, ctx.nxe) == _protected(access, dirty)):
        sp.gptes[idx] = gpte             # the same rights: the spte stands for this gpte too
        return 0
    # rebuilt as a prefetch while synchronizing: never more writable than a fault would make it
    vm.set_spte(mmu, sp, idx, gfn, access, dirty, False, False, speculative=True,
                synchronizing=True, gpte=gpte)
    return 1


def _protected(access, dirty):
    """The rights KVM records for a spte (kvm_mmu_page_get_access): FNAME(protect_clean_gpte)
    takes W away from a clean guest pte."""
    return access if dirty else access & ~pg.ACC_W


def _recorded_access(sp, spte, old_gpte, fmt, nxe):
    """kvm_mmu_page_get_access (Linux 6.18) for a spte of sp built from old_gpte: the protected
    guest rights or, when the spte is writable although they lack W, what FNAME(page_fault)
    (paging_tmpl.h) records for a supervisor write with CR0.WP=0: W granted, U taken away.
    (Comparing without the override, a resync kept such a spte writable for a guest pte that
    had become W but clean, and the guest's next write through it did not set D.)"""
    acc = _protected(sp.role.access & fmt.entry_access(old_gpte, nxe), old_gpte & pg.PTE_D)
    if spte & SPTE_W and not acc & pg.ACC_W:
        acc = (acc | pg.ACC_W) & ~pg.ACC_U
    return acc


def zap_unsync_children(vm, parent) -> int:
    """mmu_zap_unsync_children: zapping a non-leaf page zaps every unsync page below it."""
    zapped = 0
    while True:
        pages = unsync_walk(parent)
        if not pages:
            return zapped
        for sp, chain in list(_leaves_with_parents(pages)):
            vm.prepare_zap_page(sp, reason="unsync child of a zapped page")
            _clear_parents(chain)
            zapped += 1


def _emit_sync(vm, sp, reason, changed, ok) -> None:
    c = vm.counters
    if vm.events.tracing:
        vm.events.emit(ev.SYNC_PAGE, sp=sp.id, gfn=sp.gfn, reason=reason, changed=changed,
                       zapped=not ok)
    if ok:
        c["mmu_sync_pages"] += 1
    else:
        c["mmu_sync_zapped"] += 1


# ---------------------------------------------------------------------- the rule sets
class UnsyncRules:
    """What a rule set decides, asked by the MMU at each point where out-of-sync pages matter.
    The defaults do nothing; ``Policy.unsync`` is None when out-of-sync pages are off."""

    name = "base"
    marks_parents = True       # KVM's unsync_child_bitmap marks lead from the roots to the pages

    def may_unsync(self, vm, vcpu, sp, idx, gfn, write_fault, user_fault, prefetch,
                   synchronizing) -> bool:
        """set_spte is about to make sp[idx] a writable spte to gfn, a shadowed guest table
        that is not write-tracked: may it (are all gfn's shadows now out of sync)?"""
        return False

    def write_must_trap(self, vm, gfn, user) -> bool:
        """Would a write fault now to gfn (shadowed, not write-tracked) be refused a writable
        spte? (The question may_unsync answers, without its side effects: a store that reached
        the write trap for such a frame is a real trap, not a stale mapping.)"""
        return False

    def before_get_page(self, vm, mmu, gfn, role, direct) -> None:
        """get_page for (gfn, role) is about to look the page up."""

    def page_created(self, vm, mmu, sp) -> bool:
        """A new leaf shadow page of a guest table: True if it joined its frame's out-of-sync
        state (so the frame's sptes must not be write-protected now)."""
        return False

    def linking(self, mmu, child, level) -> None:
        """The fault path is about to link child (a non-direct shadow page found or created by
        get_page) under a page of ``level``."""

    def leaf_installed(self, mmu, sp, idx, gpte) -> None:
        """The fault path built sp[idx] from gpte, sp being out of sync."""

    def fault_done(self, mmu) -> None:
        """A shadow page fault was fixed: the guest runs next."""

    def before_root_switch(self, mmu) -> None:
        """CR0/CR3/CR4/EFER changed: the old root is about to be dropped."""

    def root_loaded(self, mmu, reason) -> None:
        """The new root (or a reloaded one) is in place."""

    def invlpg(self, mmu, va) -> None:
        """The guest invalidated va."""

    def gfn_unshadowed(self, vm, gfn) -> None:
        """The last shadow page of gfn was zapped."""

    def audit(self, vm, p) -> None:
        """The rule set's own invariants (mmu/audit.py): report each broken one with p(msg)."""


def _sync_check_modern(mmu, sp) -> bool:
    """kvm_sync_page_check (Linux 6.18 mmu.c): the page must have the role the current context
    would give it (besides level, access and quadrant)."""
    ctx = mmu.ctx
    if mmu.fmt is None:
        return False
    r = sp.role
    return (r.gpte_size == (4 if ctx.mode == pg.Mode.LEGACY else 8) and r.cr0_wp == ctx.wp
            and r.smep == ctx.smep and r.nxe == ctx.nxe)


class ModernRules(UnsyncRules):
    """Modern KVM (Linux 6.18 arch/x86/kvm/mmu/mmu.c, spte.c, paging_tmpl.h): policy ``kvm``."""

    name = "modern"

    def may_unsync(self, vm, vcpu, sp, idx, gfn, write_fault, user_fault, prefetch,
                   synchronizing) -> bool:
        """mmu_try_to_unsync_pages: a write-tracked gfn (an upper-level shadow of it, or a PAE
        PDPT in use) never; ``synchronizing`` (the sync itself builds the spte: writability is
        never created while emulating a TLB flush) and ``prefetch`` (a speculative spte, no guest
        access behind it) refuse while any shadow of gfn is still in sync; otherwise every
        shadow of gfn that is in sync goes out of sync."""
        if gfn in vm.write_track:
            return False
        sps = vm.sps_by_gfn.get(gfn)
        if not sps:
            return True
        for s in sps:
            if synchronizing:
                return False
            if not s.unsync and prefetch:
                return False
        for s in list(sps):
            if not s.unsync:
                unsync_page(vm, s)
        return True

    def before_get_page(self, vm, mmu, gfn, role, direct) -> None:
        """kvm_mmu_find_shadow_page: an unsync page of gfn with the role asked for is refreshed
        from the guest table and stays unsync (kvm_sync_page without write-protecting; a failed
        sync zaps it); when gfn is now wanted as an upper-level table, its unsync pages of
        another role are zapped (the new page write-tracks the frame)."""
        if direct or gfn not in vm.sps_by_gfn:
            return
        for sp in list(vm.sps_by_gfn.get(gfn, ())):
            if not sp.unsync:
                continue
            if sp.role != role:
                if role.level > 1:
                    vm.prepare_zap_page(sp, reason="unsync leaf of a frame now used as an "
                                                   "upper-level table")
            elif mmu is not None:
                self.sync_page(mmu, sp, "get_page")
        if vm.invalid_list:
            vm.commit_zap()

    def linking(self, mmu, child, level) -> None:
        if child.unsync_children:
            # FNAME(fetch): a reused upper-level page is synced before it is linked (a
            # not-present -> present change needs no guest flush)
            sync_children(mmu, child, "fetch")

    def root_loaded(self, mmu, reason) -> None:
        # kvm_mmu_load -> kvm_mmu_sync_roots; a CR3 write without PCID NOFLUSH also asks for
        # KVM_REQ_MMU_SYNC (kvm_set_cr3 -> kvm_invalidate_pcid, x86.c). x86shadow models no
        # PCIDs, so every CR3 write is a flushing one
        sync_roots(mmu, reason)

    def sync_page(self, mmu, sp, reason) -> bool:
        """kvm_sync_page: resync every populated spte of sp from the guest pte it shadows; a
        page that cannot be synced (another paging mode, an unreadable guest table) is zapped.
        False if it was zapped."""
        vm = mmu.vm
        ok = _sync_check_modern(mmu, sp)
        changed = 0
        if ok:
            for idx in range(ENTRIES):
                r = sync_spte(mmu, sp, idx)
                if r < 0:
                    ok = False
                    break
                changed += r
        _emit_sync(vm, sp, reason, changed, ok)
        if not ok:
            vm.prepare_zap_page(sp, reason=f"sync failed ({reason})")
        return ok

    def invlpg(self, mmu, va) -> None:
        """__kvm_mmu_invalidate_addr: walk the current root to va; in each unsync page on the
        way resync the one spte that maps va. The page stays unsync. The descent stops where no
        unsync page lies below."""
        root = mmu.root
        if root is None:
            return
        vm = mmu.vm
        level = mmu.root_level
        node = root
        if not isinstance(node, ShadowPage):
            node = node.children[(va >> 30) & 3]
            level = 2
        while node is not None:
            idx = (va >> (12 + 9 * (level - 1))) & 511
            if node.unsync:
                if sync_spte(mmu, node, idx) < 0:
                    vm.drop_spte(node, idx)
                break
            if level == 1 or not node.unsync_children:
                break
            node = node.children[idx]
            level -= 1
        if vm.invalid_list:
            vm.commit_zap()


class Kvm2628Rules(UnsyncRules):
    """KVM 2.6.28 (arch/x86/kvm/mmu.c, paging_tmpl.h at sensysnetworks/linux-2.6.28-at91, the
    2.6.28 baseline; same rules in 2.6.29): policy ``kvm-2008-oos``."""

    name = "2.6.28"

    def may_unsync(self, vm, vcpu, sp, idx, gfn, write_fault, user_fault, prefetch,
                   synchronizing) -> bool:
        """mmu_need_write_protect + kvm_unsync_page: an upper-level shadow of gfn (here: gfn
        write-tracked) protects; a shadow already unsync allows; ``can_unsync`` is false only in
        FNAME(sync_page) (speculative installs -- update_pte -- may unsync, unlike modern
        KVM); and kvm_unsync_page refuses when the frame is shadowed with more than one role
        ("don't unsync if pagetable is shadowed with multiple roles"): the page that goes out of
        sync is the frame's only shadow. (A 2-level guest's leaf table shadowed in both its
        halves -- two quadrants -- never goes out of sync.)"""
        if gfn in vm.write_track:
            return False
        sps = vm.sps_by_gfn.get(gfn)
        if not sps:
            return True
        first = next(iter(sps))
        if first.unsync:
            return True
        if synchronizing or len(sps) > 1:
            return False
        unsync_page(vm, first)
        return True

    def write_must_trap(self, vm, gfn, user) -> bool:
        sps = vm.sps_by_gfn.get(gfn)
        return bool(sps) and not next(iter(sps)).unsync and len(sps) > 1

    def before_get_page(self, vm, mmu, gfn, role, direct) -> None:
        """kvm_mmu_get_page: every unsync shadow of gfn is synced (write-protected, resynced;
        zapped if that fails) before the lookup, whatever its role -- so using a frame in any
        new way, or linking its shadow from another parent, brings it back in sync."""
        sps = vm.sps_by_gfn.get(gfn)
        if not sps or mmu is None:
            return
        for sp in list(sps):
            if sp.unsync and not sp.zapped:
                self.sync_page(mmu, sp, "get_page")
        if vm.invalid_list:
            vm.commit_zap()

    def linking(self, mmu, child, level) -> None:
        if child.unsync_children:
            # kvm_mmu_get_page found a page with unsync children: KVM_REQ_MMU_SYNC (the whole
            # root is synced before the guest runs again) and its parents are marked (link())
            mmu.request(REQ_MMU_SYNC)

    def fault_done(self, mmu) -> None:
        if mmu.requests & REQ_MMU_SYNC:
            mmu.requests &= ~REQ_MMU_SYNC
            sync_roots(mmu, "request")            # vcpu_enter_guest: KVM_REQ_MMU_SYNC

    def root_loaded(self, mmu, reason) -> None:
        # kvm_set_cr3: the same CR3 -> kvm_mmu_sync_roots; a new one -> kvm_mmu_load ->
        # mmu_sync_roots; CR0/CR4 -> kvm_mmu_reset_context -> reload -> sync. Every case syncs.
        mmu.requests &= ~REQ_MMU_SYNC
        sync_roots(mmu, reason)

    def sync_page(self, mmu, sp, reason) -> bool:
        """kvm_sync_page + FNAME(sync_page) (2.6.28): a page of another guest paging mode
        (role.glevels; here the guest pte size) is zapped; otherwise every present spte is
        rebuilt from its guest pte (dropped if not present, not accessed or another frame) with
        can_unsync false, and **a page left with no present spte is zapped**
        (``return !nr_present``). False if it was zapped."""
        vm = mmu.vm
        ok = mmu.fmt is not None and sp.role.gpte_size == (4 if mmu.ctx.mode == pg.Mode.LEGACY
                                                            else 8)
        if ok:
            # kvm_sync_page write-protects the frame itself, page by page: a spte the resync of
            # another page rebuilt writable while this page was still unsync loses W here
            vm.write_protect(sp.gfn)
            unlink_unsync_page(vm, sp)
        changed = present = 0
        if ok:
            for idx in range(ENTRIES):
                r = sync_spte(mmu, sp, idx, rebuild_same=True)
                if r < 0:
                    ok = False
                    break
                changed += r
                if sp.spt[idx] & SPTE_P:
                    present += 1
        if ok and not present:
            ok = False
            reason = f"{reason}: no present spte left"
        _emit_sync(vm, sp, reason, changed, ok)
        if not ok:
            vm.prepare_zap_page(sp, reason=f"sync zapped ({reason})")
        return ok


    def audit(self, vm, p) -> None:
        # kvm_unsync_page refuses a frame with more than one shadow, and kvm_mmu_get_page syncs
        # an unsync page before another shadow of its frame appears
        for sp in vm.hash.values():
            if sp.unsync and len(vm.sps_by_gfn.get(sp.gfn, ())) != 1:
                p(f"{sp} is unsync but not its frame's only shadow")


def invlpg_drop_leaf(mmu, va) -> None:
    """FNAME(invlpg) of 2.6.28 (paging_tmpl.h, FNAME(shadow_invlpg_entry)): walk the shadow
    tables of the current root to va and drop the level-1 spte there (rmap_remove), synced page
    or not, without re-reading the guest pte; the walk stops at a non-present entry. (2.6.29
    re-reads the guest pte afterwards and re-instantiates it through kvm_mmu_pte_write: not
    modelled -- the next access faults it in.)"""
    root = mmu.root
    if root is None:
        return
    leaf = shadow_leaf(root, mmu.root_level, va)
    if leaf is not None:
        mmu.vm.drop_spte(*leaf)
