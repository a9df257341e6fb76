"""The walk over shadow page tables, from a root to the leaf spte for a virtual address.

``shadow_leaf`` is the walk the "hardware" does on a TLB fill; translate and decode use it too.
The fault path (``VcpuMmu._fetch``) does the same index arithmetic while it creates the missing
tables (written out there: a generator-based iterator measured 2.5 us more per shadow fault).
Index at ``level`` (1 = page table): ``(va >> (12 + 9 * (level - 1))) & 511``; a PAE root (root
level 3) is KVM's 4-entry pae_root, indexed with va[31:30].
"""
from __future__ import annotations

from .spte import SPTE_P


def shadow_leaf(root, root_level: int, va: int):
    """(leaf table, index) of the present leaf spte for va, or None."""
    node = root
    if node is None:
        return None
    level = root_level
    if level == 3:
        node = node.children[(va >> 30) & 3]
        if node is None:
            return None
        level = 2
    while level > 1:
        node = node.children[(va >> (12 + 9 * (level - 1))) & 511]
        if node is None:
            return None
        level -= 1
    idx = (va >> 12) & 511
    if node.spt[idx] & SPTE_P:
        return node, idx
    return None
