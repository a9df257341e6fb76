"""The spte encoding, in one place: bits, rights, frame, and how a leaf spte is made.

Shadow page tables always use the 64-bit entry format. A leaf spte holds a *host* pfn (memslots:
gfn -> pfn), never a gfn, as in KVM; a non-leaf spte's frame field holds the child shadow page's
id (the child object is kept beside it).
"""
from __future__ import annotations

SPTE_P = 1 << 0
SPTE_W = 1 << 1
SPTE_U = 1 << 2
SPTE_A = 1 << 5
SPTE_D = 1 << 6
SPTE_NX = 1 << 63
SPTE_FRAME = 0x000F_FFFF_FFFF_F000
SPTE_NONLEAF = SPTE_P | SPTE_W | SPTE_U | SPTE_A   # non-leaf sptes are fully permissive (KVM)

PERM_R, PERM_W, PERM_X = 1, 2, 4     # TLB rights; same values as Unicorn's UC_PROT_*


def make_spte(pfn: int, writable: bool, user: bool, exec_: bool, dirty: bool = False) -> int:
    """A present leaf spte for host pfn. No A bit: the "hardware" (the fill) sets it when an
    access through the spte succeeds (K25 mmu_set_spte never sets it either)."""
    spte = SPTE_P | (pfn << 12)
    if user:
        spte |= SPTE_U
    if not exec_:
        spte |= SPTE_NX
    if writable:
        spte |= SPTE_W
        if dirty:
            spte |= SPTE_D
    return spte


def make_nonleaf(child_id: int) -> int:
    return SPTE_NONLEAF | (child_id << 12)


def spte_pfn(spte: int) -> int:
    return (spte & SPTE_FRAME) >> 12
