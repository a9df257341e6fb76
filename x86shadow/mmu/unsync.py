"""Out-of-sync (unsync) shadow pages: a leaf guest page table whose frame the guest writes
natively; its shadow catches up when the guest flushes its TLB.

This is KVM's design as merged in 2.6.28 (commit 4731d4c7a077 "KVM: MMU: out of sync shadow core",
Avi Kivity's bitmap scheme): an ``unsync`` flag per shadow page and, in every parent, an
``unsync_child_bitmap`` (one bit per spte) with an ``unsync_children`` count. Marking climbs
through every parent pte, and only when a parent's count goes 0 -> 1. A stale bit is harmless:
the walk clears it. The shape of the walk and the sync is modern KVM's (arch/x86/kvm/mmu/mmu.c,
Linux 6.18: ``mark_unsync``, ``__mmu_unsync_walk``, ``mmu_pages_add``, ``mmu_sync_children``,
``mmu_pages_clear_parents``, ``kvm_sync_page``, ``FNAME(sync_spte)``); the same structure is in
2.6.29 (``KVM_PAGE_ARRAY_NR`` 16).

Which pages may go out of sync, and when they sync, is the rule set of the policy
(``Policy.unsync``, docs/UNSYNC.md); this module is the mechanism, for every rule set.
"""
from __future__ import annotations

from .. import events as ev
from .. import paging as pg
from .pages import ENTRIES, ShadowPage, prefetch_invalid_gpte
from .spte import SPTE_P

# KVM_PAGE_ARRAY_NR (2.6.29 mmu.c, modern mmu.c): entries (parents included) per sync batch
PAGE_ARRAY_NR = 16

# the rule sets (Policy.unsync)
MODERN = "modern"          # Linux >= 3.x / 6.18: policy kvm


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


def try_to_unsync(vm, gfn, synchronizing: bool, prefetch: bool) -> bool:
    """mmu_try_to_unsync_pages (modern mmu.c): may a writable spte to gfn exist? True: every
    shadow of gfn is (now) unsync. False: the spte must stay read-only (KVM's -EPERM/-EEXIST).

    * gfn write-tracked (an upper-level shadow of it, or a PAE PDPT in use): no;
    * ``synchronizing`` (the sync itself builds the spte): no -- writability is never created
      while emulating a TLB flush;
    * ``prefetch`` (a speculative spte, no guest access behind it): no -- it never unsyncs;
    * otherwise every shadow of gfn that is still in sync goes out of sync."""
    if gfn in vm.write_track:
        return False
    sps = vm.sps_by_gfn.get(gfn)
    if not sps:
        return True
    for sp in sps:
        if sp.unsync:
            continue
        if synchronizing or prefetch:
            return False
    for sp in list(sps):
        if not sp.unsync:
            unsync_page(vm, sp)
    return True


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
    while True:
        pages = unsync_walk(parent)
        if not pages:
            break
        leaves = list(_leaves_with_parents(pages))
        for sp, _ in leaves:
            vm.write_protect(sp.gfn)     # (requests the flush: one per batch, at the next entry)
        for sp, chain in leaves:
            unlink_unsync_page(vm, sp)
            sync_page(mmu, sp, reason)
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


def sync_page(mmu, sp, reason: str) -> bool:
    """kvm_sync_page: resync every populated spte of sp from the guest pte it shadows; a page
    that cannot be synced (another paging mode, an unreadable guest table) is zapped. False if
    it was zapped."""
    vm = mmu.vm
    c = vm.counters
    ok = _sync_page_check(mmu, sp)
    changed = 0
    if ok:
        for idx in range(ENTRIES):
            r = sync_spte(mmu, sp, idx)
            if r < 0:
                ok = False
                break
            changed += r
    if vm.events.tracing:
        vm.events.emit(ev.SYNC_PAGE, sp=sp.id, gfn=sp.gfn, reason=reason, changed=changed,
                       zapped=not ok)
    if not ok:
        c["mmu_sync_zapped"] += 1
        vm.prepare_zap_page(sp, reason=f"sync failed ({reason})")
        return False
    c["mmu_sync_pages"] += 1
    return True


def _sync_page_check(mmu, sp) -> bool:
    """kvm_sync_page_check: the page must have the role the current context would give it
    (besides level, access and quadrant)."""
    ctx = mmu.ctx
    if mmu.fmt is None:
        return False
    r = sp.role
    return (r.gpte_size == (4 if ctx.mode == pg.Mode.LEGACY else 8) and r.cr0_wp == ctx.wp
            and r.smep == ctx.smep and r.nxe == ctx.nxe)


def sync_spte(mmu, sp, idx) -> int:
    """FNAME(sync_spte): -1 the guest pte cannot be read; 1 the spte was dropped or rebuilt;
    0 nothing to do (never populated, or the rights are the same)."""
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
    if gfn != sp.gfns[idx] or vm.memslots.gfn_to_pfn(gfn) is None:
        vm.drop_spte(sp, idx)
        return 1
    access = sp.role.access & fmt.entry_access(gpte, ctx.nxe)
    dirty = bool(gpte & pg.PTE_D)
    old_gpte = sp.gptes[idx]
    if old_gpte is not None and (_protected(sp.role.access & fmt.entry_access(old_gpte, ctx.nxe),
                                            old_gpte & pg.PTE_D) == _protected(access, dirty)):
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


def invlpg(mmu, va) -> None:
    """__kvm_mmu_invalidate_addr (modern): walk the current root to va; in each unsync page on
    the way resync the one spte that maps va. The page stays unsync. The descent stops where no
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
