"""Xen 3.3's out-of-sync guest page tables ("OOS", policy ``xen-oos``).

Source: Xen 3.3.1 xen/arch/x86/mm/shadow/common.c (``sh_unsync``, ``oos_hash_add``,
``oos_fixup_add``, ``_sh_resync``, ``sh_resync``, ``sh_resync_all``, ``shadow_promote``,
``shadow_demote``) and multi.c (``sh_page_fault``, ``_sh_propagate``, ``shadow_set_l1e``,
``shadow_set_l2e``, ``shadow_get_and_create_l1e``, ``sh_resync_l1``, ``sh_safe_not_to_sync``,
``sh_invlpg``, ``sh_update_cr3``), tumf/xen-3.3.1 at 4de6d963; xen/include/asm-x86/mm.h for the
table sizes. docs/UNSYNC.md has the rules in a table.

Unlike KVM, Xen keeps no marks in the parents: each vCPU has a table of 3 out-of-sync frames
(slot ``mfn % 3``, the next slot as second choice), with a copy of the whole guest page taken
when it went out of sync (the snapshot) and up to 2 remembered writable mappings (fixups). A
resync write-protects the frame and re-propagates only the entries whose guest value differs from
the snapshot.

Mapping onto x86shadow's KVM-shaped shadow pages: Xen has one shadow per (frame, shadow type);
here a frame's leaf shadows may be several pages (the two quadrants of a 2-level guest table,
pages for different rights granted above). Xen's "L1 shadow of frame F" is every leaf page of F;
while F is out of sync all of them are ``unsync``. A "shadow type" is the level and the guest pte
size (Xen also tells PAE from 64-bit L1s apart; our roles cannot -- not modelled).
"""
from __future__ import annotations

from .. import events as ev
from .. import paging as pg
from .pages import PaeRoot, ShadowPage, prefetch_invalid_gpte
from .spte import SPTE_P, SPTE_W
from .unsync import UnsyncRules, unlink_unsync_page

SHADOW_OOS_PAGES = 3        # xen/include/asm-x86/mm.h: out-of-sync frames per vCPU
SHADOW_OOS_FIXUPS = 2       # ... writable mappings remembered per out-of-sync frame


class OosSlot:
    """One entry of a vCPU's out-of-sync table (Xen's oos[], oos_snapshot[], oos_fixup[])."""

    __slots__ = ("gfn", "snapshot", "fixups", "next")

    def __init__(self, gfn):
        self.gfn = gfn
        self.snapshot = b""                        # the guest page when it went out of sync
        self.fixups = [None] * SHADOW_OOS_FIXUPS   # (shadow page, index) of writable sptes
        self.next = 0                              # round-robin position in fixups

    def __repr__(self):
        return f"<oos gfn={self.gfn:#x}>"


def _slots(mmu) -> list:
    if mmu.oos is None:
        mmu.oos = [None] * SHADOW_OOS_PAGES
    return mmu.oos


def find_slot(vm, gfn):
    """(vCPU, index) of gfn in some vCPU's out-of-sync table, or None (the lookup of
    oos_hash_remove / sh_resync: the home slot, then the next)."""
    for v in vm.vcpus:
        slots = v.oos
        if slots is None:
            continue
        idx = gfn % SHADOW_OOS_PAGES
        s = slots[idx]
        if s is None or s.gfn != gfn:
            idx = (idx + 1) % SHADOW_OOS_PAGES
            s = slots[idx]
        if s is not None and s.gfn == gfn:
            return v, idx
    return None


def is_oos(vm, gfn) -> bool:
    sps = vm.sps_by_gfn.get(gfn)
    return bool(sps) and next(iter(sps)).unsync


def _propagate(mmu, sp, idx, gpte) -> None:
    """l1e_propagate_from_guest(ft_prefetch) + shadow_set_l1e: rebuild sp[idx] from gpte --
    nothing if it is not present, not accessed (or has reserved bits); read-only if it is clean
    or maps a guest page table (a prefetch never makes one writable); else the guest's rights.
    Unlike KVM's resync, a pte now pointing at another frame is followed there."""
    vm = mmu.vm
    fmt = mmu.fmt
    if fmt is None or prefetch_invalid_gpte(mmu.ctx, gpte):
        vm.drop_spte(sp, idx)
        return
    gfn = fmt.leaf_frame(gpte) >> 12
    if vm.gfn_to_pfn(gfn, atomic=True) is None:
        vm.drop_spte(sp, idx)
        return
    access = sp.role.access & fmt.entry_access(gpte, mmu.ctx.nxe)
    vm.set_spte(mmu, sp, idx, gfn, access, bool(gpte & pg.PTE_D), False, False,
                speculative=True, synchronizing=True, gpte=gpte)


class Xen33Rules(UnsyncRules):
    """Xen 3.3.1's out-of-sync rules, on x86shadow's shadow pages."""

    name = "xen-3.3"
    marks_parents = False

    # ------------------------------------------------------------------ going out of sync
    def may_unsync(self, vm, vcpu, sp, idx, gfn, write_fault, user_fault, prefetch,
                   synchronizing) -> bool:
        """sh_page_fault "always unsync when writing to L1 page tables" + _sh_propagate: a
        writable mapping of a guest page table exists only for a demand write to a frame that
        may be written (SHF_oos_may_write). Read faults, prefetches and resyncs map it read-only;
        a user-mode write is emulated, which unshadows the frame (the xen policy's CPL3 rule:
        here it is not unsynced first). sh_unsync refuses a frame shadowed at a higher level
        (write-tracked here), with more than one shadow type, or while some vCPU has paging
        off (oos_active)."""
        if gfn in vm.write_track:
            return False
        sps = vm.sps_by_gfn.get(gfn)
        if not sps:
            return True
        if not write_fault or user_fault or prefetch or synchronizing:
            return False
        if next(iter(sps)).unsync:
            self._fixup_add(vm, gfn, sp, idx)
            return True
        if _unsync_refused(vm, sps):
            return False
        self._hash_add(vcpu, gfn)
        vm.counters["shadow_unsync"] += 1
        for s in list(sps):
            self._mark(vm, s)
        self._fixup_add(vm, gfn, sp, idx)
        return True

    def write_must_trap(self, vm, gfn, user) -> bool:
        sps = vm.sps_by_gfn.get(gfn)
        if not sps:
            return False
        if user:
            return True
        if next(iter(sps)).unsync:
            return False
        return _unsync_refused(vm, sps)

    @staticmethod
    def _mark(vm, sp) -> None:
        sp.unsync = True
        vm.counters["mmu_unsync"] += 1
        if vm.events.tracing:
            vm.events.emit(ev.UNSYNC_PAGE, sp=sp.id, gfn=sp.gfn, level=sp.role.level,
                           quadrant=sp.role.quadrant)

    def _hash_add(self, mmu, gfn) -> None:
        """oos_hash_add: gfn takes its home slot; an occupant that belongs there is pushed to
        the next slot; whatever is left in the slot taken is resynced (an eviction). The
        snapshot is a copy of the whole guest page."""
        slots = _slots(mmu)
        home = idx = gfn % SHADOW_OOS_PAGES
        new = OosSlot(gfn)
        cur = slots[idx]
        if cur is not None and cur.gfn % SHADOW_OOS_PAGES == idx:
            slots[idx], new = new, cur
            idx = (idx + 1) % SHADOW_OOS_PAGES
        if slots[idx] is not None:
            evicted = slots[idx]
            slots[idx] = None
            self._resync(mmu, evicted, "eviction")
            mmu.counters["shadow_unsync_evict"] += 1
        slots[idx] = new
        slots[home].snapshot = bytes(mmu.mem.read(gfn << 12, 4096))

    def _fixup_add(self, vm, gfn, sp, idx) -> None:
        """oos_fixup_add: remember the writable mapping; the oldest of 2 loses its W (without a
        flush: the frame is out of sync anyway, and every resync flushes)."""
        found = find_slot(vm, gfn)
        if found is None:
            return
        v, i = found
        slot = v.oos[i]
        if (sp, idx) in slot.fixups:
            return
        vm.counters["shadow_oos_fixup_add"] += 1
        old = slot.fixups[slot.next]
        if old is not None:
            _remove_write(old, gfn)
            vm.counters["shadow_oos_fixup_evict"] += 1
        slot.fixups[slot.next] = (sp, idx)
        slot.next = (slot.next + 1) % SHADOW_OOS_FIXUPS

    def page_created(self, vm, mmu, sp) -> bool:
        # a new leaf page of an out-of-sync frame is part of the frame's one Xen shadow: it is
        # out of sync too, and the frame's writable mappings stay
        for s in vm.sps_by_gfn.get(sp.gfn, ()):
            if s is not sp:
                if s.unsync:
                    self._mark(vm, sp)
                    return True
                return False
        return False

    # ------------------------------------------------------------------ resyncing
    def _resync(self, mmu, slot, reason) -> None:
        """_sh_resync: take write access away (the fixups, then every mapping), flush, then
        re-propagate the entries that differ from the snapshot (sh_resync_l1); the frame is
        in sync and write-protected again."""
        vm = mmu.vm
        gfn = slot.gfn
        for f in slot.fixups:
            if f is not None:
                _remove_write(f, gfn)
        vm.write_protect(gfn)
        vm.note_write_removed()      # (the fixups lost W above, write_protect the rest)
        # "always flush the TLBs on resync" (_sh_resync -> flush_tlb_mask(d->domain_dirty_cpumask))
        vm.flush_remote_tlbs()
        self._refresh(mmu, slot, reason)
        for sp in list(vm.sps_by_gfn.get(gfn, ())):
            unlink_unsync_page(vm, sp)
        vm.counters["shadow_resync"] += 1

    def _refresh(self, mmu, slot, reason) -> None:
        """sh_resync_l1: every present spte whose guest entry differs from the snapshot is
        re-propagated (as a prefetch); the snapshot takes the guest's values."""
        vm = mmu.vm
        gfn = slot.gfn
        sps = list(vm.sps_by_gfn.get(gfn, ()))
        cur = bytes(vm.mem.read(gfn << 12, 4096))
        snap = slot.snapshot
        for sp in sps:
            changed = 0
            if cur != snap:
                gsize = sp.role.gpte_size
                spt = sp.spt
                for idx in range(512):
                    if not spt[idx] & SPTE_P:
                        continue
                    o = sp.gpte_index(idx) * gsize
                    if cur[o:o + gsize] != snap[o:o + gsize]:
                        _propagate(mmu, sp, idx, int.from_bytes(cur[o:o + gsize], "little"))
                        changed += 1
            if vm.events.tracing:
                vm.events.emit(ev.SYNC_PAGE, sp=sp.id, gfn=gfn, reason=reason, changed=changed,
                               zapped=False)
            vm.counters["mmu_sync_pages"] += 1
        slot.snapshot = cur

    def _resync_gfn(self, vm, gfn, reason) -> None:
        """sh_resync: bring one frame back in sync, on the vCPU whose table holds it."""
        found = find_slot(vm, gfn)
        if found is None:
            return
        v, i = found
        slot = v.oos[i]
        v.oos[i] = None
        self._resync(v, slot, reason)

    def resync_all(self, mmu, reason, this=True, others=True, skip=False) -> None:
        """sh_resync_all: this vCPU's frames are resynced; the other vCPUs' are resynced too
        (skip false) or only refreshed from their snapshots and left out of sync (skip true),
        not even that when sh_safe_not_to_sync says their only top-level shadow is not this
        vCPU's."""
        vm = mmu.vm
        for v in vm.vcpus:
            if v.oos is None or (v is mmu and not this) or (v is not mmu and not others):
                continue
            for i, slot in enumerate(v.oos):
                if slot is None:
                    continue
                if v is not mmu and skip:
                    if not _safe_not_to_sync(vm, mmu, slot.gfn):
                        self._refresh(v, slot, reason)
                    continue
                v.oos[i] = None
                self._resync(v, slot, reason)

    # ------------------------------------------------------------------ the MMU's calls
    def before_get_page(self, vm, mmu, gfn, role, direct) -> None:
        # shadow_promote: a frame that gets another shadow type is resynced first
        if direct or not is_oos(vm, gfn):
            return
        first = next(iter(vm.sps_by_gfn[gfn]))
        if role.level > 1 or role.gpte_size != first.role.gpte_size:
            self._resync_gfn(vm, gfn, "promote")

    def linking(self, mmu, child, level) -> None:
        if child.role.level == 1 and child.unsync:
            # shadow_set_l2e: "about to install a new reference" to an out-of-sync L1
            self._resync_gfn(mmu.vm, child.gfn, "link")
        elif mmu.ctx.mode == pg.Mode.LONG and level >= 3:
            # shadow_get_and_create_l1e: a new l4e or l3e was installed on the way ("all pages
            # walked are now pagetables"): every out-of-sync frame is resynced
            self.resync_all(mmu, "new upper-level entry")

    def leaf_installed(self, mmu, sp, idx, gpte) -> None:
        """sh_page_fault on an out-of-sync L1: the fault updated one entry without a resync
        and records the guest value in the snapshot. The frame's other leaf pages (Xen has one
        shadow) get the same entry now, so that no stale copy hides behind the snapshot."""
        vm = mmu.vm
        found = find_slot(vm, sp.gfn)
        if found is None:
            return
        v, i = found
        slot = v.oos[i]
        gsize = sp.role.gpte_size
        gi = sp.gpte_index(idx)
        raw = gpte.to_bytes(gsize, "little")
        o = gi * gsize
        if slot.snapshot[o:o + gsize] != raw:
            for other in list(vm.sps_by_gfn.get(sp.gfn, ())):
                if other is sp or other.role.gpte_size != gsize:
                    continue
                j = gi - other.gpte_index(0)
                if 0 <= j < 512 and other.spt[j] & SPTE_P:
                    _propagate(mmu, other, j, gpte)
            slot.snapshot = slot.snapshot[:o] + raw + slot.snapshot[o + gsize:]

    def before_root_switch(self, mmu) -> None:
        # sh_update_cr3 -> shadow_resync_current_vcpu: this vCPU's frames, before the switch
        self.resync_all(mmu, "cr3", this=True, others=False)

    def root_loaded(self, mmu, reason) -> None:
        if reason == "new root":
            # sh_update_cr3 -> shadow_sync_other_vcpus: the others' frames are refreshed
            self.resync_all(mmu, "cr3", this=False, others=True, skip=True)

    def invlpg(self, mmu, va) -> None:
        """sh_invlpg: if the L1 shadow that maps va is out of sync, the entry for va is
        emptied (the frame stays out of sync); the next access faults it in from the guest."""
        node = mmu.root
        if node is None:
            return
        level = mmu.root_level
        if level == 3:
            node = node.children[(va >> 30) & 3]
            level = 2
        while node is not None and level > 1:
            node = node.children[(va >> (12 + 9 * (level - 1))) & 511]
            level -= 1
        if node is not None and node.unsync:
            mmu.vm.drop_spte(node, (va >> 12) & 511)

    def gfn_unshadowed(self, vm, gfn) -> None:
        # shadow_demote -> oos_hash_remove: the frame leaves the table without a resync
        found = find_slot(vm, gfn)
        if found is not None:
            v, i = found
            v.oos[i] = None

    def audit(self, vm, p) -> None:
        """Every out-of-sync frame is in exactly one vCPU's table, in its home slot or the
        next; every frame in a table is shadowed, only as leaf pages of one guest pte size,
        all of them unsync."""
        seen = {}
        for v in vm.vcpus:
            for i, slot in enumerate(v.oos or ()):
                if slot is None:
                    continue
                if slot.gfn in seen:
                    p(f"oos gfn {slot.gfn:#x} in two slots")
                seen[slot.gfn] = True
                if i not in (slot.gfn % SHADOW_OOS_PAGES, (slot.gfn + 1) % SHADOW_OOS_PAGES):
                    p(f"oos gfn {slot.gfn:#x} in slot {i}")
                if len(slot.snapshot) != 4096:
                    p(f"oos gfn {slot.gfn:#x} without a snapshot")
                sps = vm.sps_by_gfn.get(slot.gfn, ())
                if not sps:
                    p(f"oos gfn {slot.gfn:#x} has no shadow")
                if len({s.role.gpte_size for s in sps}) > 1:
                    p(f"oos gfn {slot.gfn:#x} has several shadow types")
                for s in sps:
                    if not s.unsync:
                        p(f"{s} of oos gfn {slot.gfn:#x} is in sync")
        for sp in vm.hash.values():
            if sp.unsync and sp.gfn not in seen:
                p(f"{sp} is unsync but its frame is in no out-of-sync table")


def _unsync_refused(vm, sps) -> bool:
    """sh_unsync's refusals for a frame shadowed only as leaf pages: more than one shadow type
    (sh_page_has_multiple_shadows; here two guest pte sizes), or a vCPU with paging off
    (oos_active)."""
    return (len({s.role.gpte_size for s in sps}) > 1
            or any(v.ctx.mode == pg.Mode.OFF for v in vm.vcpus))


def _remove_write(fixup, gfn) -> None:
    """sh_remove_write_access_from_sl1p: the remembered spte loses W if it still maps gfn."""
    sp, idx = fixup
    spte = sp.spt[idx]
    if not sp.zapped and spte & SPTE_P and spte & SPTE_W and sp.gfns[idx] == gfn:
        sp.spt[idx] = spte & ~SPTE_W


def _safe_not_to_sync(vm, mmu, gfn) -> bool:
    """sh_safe_not_to_sync: each shadow of gfn has one parent, and so on up to a top-level
    shadow that is not one of mmu's current roots."""
    roots = ()
    if isinstance(mmu.root, PaeRoot):
        roots = tuple(c for c in mmu.root.children if c is not None)
    elif mmu.root is not None:
        roots = (mmu.root,)
    for sp in vm.sps_by_gfn.get(gfn, ()):
        node = sp
        while True:
            if not node.parents:
                if node.role.level != 4:        # unlinked (Xen: no up pointer)
                    return False
                break                           # a 4-level root
            if len(node.parents) != 1:
                return False
            parent = next(iter(node.parents))[0]
            if not isinstance(parent, ShadowPage):
                break                           # below a PAE root: node is top-level
            node = parent
        if any(node is r for r in roots):
            return False
    return True
