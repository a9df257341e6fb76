"""Shadow pages and their role, shaped like KVM's ``struct kvm_mmu_page`` / ``union kvm_mmu_page_role``.

Shadow page tables always use the 64-bit (8-byte) entry format with 512 entries, whatever the guest
uses; a 2-level guest table (1024 4-byte entries) is therefore shadowed by two (page table) or four
(page directory) shadow pages, told apart by ``role.quadrant`` — as in KVM.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import paging as pg
from .spte import make_nonleaf


ENTRIES = 512


class Role(NamedTuple):
    """The part of a shadow page's identity besides its gfn (KVM's kvm_mmu_page_role)."""
    level: int          # 1 = page table .. 4 = PML4
    direct: bool        # maps a guest large page (or guest-physical memory), not a guest table
    access: int         # ACC_* rights granted by the guest entries above this table
    gpte_size: int      # 4 (2-level guest) or 8 (PAE / 4-level guest)
    quadrant: int       # which part of a 2-level guest table this page shadows
    cr0_wp: bool
    smep: bool
    nxe: bool


class ShadowPage:
    """One shadow page table: 512 sptes, children for non-leaf entries, parent back links."""

    __slots__ = ("id", "gfn", "role", "spt", "gfns", "gptes", "children", "parents",
                 "root_count", "write_flooding_count", "unsync", "unsync_children",
                 "unsync_child_bitmap", "write_tracked", "zapped", "freed", "nonleaf_spte")

    def __init__(self, sp_id: int, gfn: int, role: Role):
        self.id = sp_id
        self.nonleaf_spte = make_nonleaf(sp_id)   # what a parent's spte pointing here holds
        self.gfn = gfn
        self.role = role
        self.spt = [0] * ENTRIES
        # leaf pages: the gfn each present spte translates (sptes hold host pfns; KVM's sp->gfns)
        self.gfns = [None] * ENTRIES if role.level == 1 else None
        # leaf pages: the guest pte each present spte was built from (the audit's reference for
        # an out-of-sync page, whose sptes may lag behind the guest's edits)
        self.gptes = [None] * ENTRIES if role.level == 1 else None
        self.children = [None] * ENTRIES if role.level > 1 else None
        self.parents: set = set()          # {(parent ShadowPage or PaeRoot, index)}
        self.root_count = 0
        self.write_flooding_count = 0      # for the modern-KVM flood rule (docs/POLICY_SOURCES.md)
        # out-of-sync pages (mmu/unsync.py), as KVM's struct kvm_mmu_page since 2.6.28/2.6.29:
        self.unsync = False                # this leaf page is out of sync with the guest table
        self.unsync_children = 0           # set bits in unsync_child_bitmap
        self.unsync_child_bitmap = 0       # bit i: spt[i] leads to an unsync page (may be stale)
        self.write_tracked = False         # this page counts in VmMmu.write_track
        self.zapped = False                # prepared for zapping: unlinked, on the invalid list
        self.freed = False                 # committed: the TLB was flushed, then it was freed

    def gpte_index(self, idx: int) -> int:
        """Index in the whole guest table of the guest pte that spt[idx] of this non-direct
        page shadows (a 2-level guest table is split into quadrants)."""
        return idx + (self.role.quadrant << 9 if self.role.gpte_size == 4 else 0)

    def gpte_gpa(self, idx: int) -> int:
        """Guest-physical address of the guest pte that spt[idx] shadows
        (FNAME(get_level1_sp_gpa))."""
        return (self.gfn << 12) + self.gpte_index(idx) * self.role.gpte_size

    def __repr__(self):
        r = self.role
        return (f"<sp#{self.id} gfn={self.gfn:#x} L{r.level}{' direct' if r.direct else ''}"
                f" q{r.quadrant} acc={r.access}{' unsync' if self.unsync else ''}>")


class PaeRoot:
    """The 4-entry top level used to shadow 2-level and PAE guests (KVM's ``mmu->pae_root``).

    It is not a shadow page (there is no guest table behind it for a 2-level guest, and a PAE
    guest's PDPT is not a page), so it lives outside the hash.
    """

    __slots__ = ("spt", "children", "id", "gfn", "role")
    is_pae_root = True

    def __init__(self):
        self.spt = [0] * 4
        self.children = [None] * 4
        self.id = -1
        self.gfn = None
        self.role = None

    def __repr__(self):
        return "<pae_root>"


def prefetch_invalid_gpte(ctx, gpte: int) -> bool:
    """FNAME(prefetch_invalid_gpte) (arch/x86/kvm/mmu/paging_tmpl.h, v6.x): a guest pte a spte
    must not be built from without a guest access -- not present, not accessed, or with
    reserved bits (FNAME(is_rsvd_bits_set)). ``ctx``: a paging context with paging on."""
    return (not gpte & pg.PTE_P or not gpte & pg.PTE_A
            or bool(gpte & ctx.pte_rsvd))
