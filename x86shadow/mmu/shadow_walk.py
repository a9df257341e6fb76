"""The one walk over shadow page tables.

``shadow_walk`` yields every step (level, table, index) from the root down to the leaf table (the
shape of KVM's ``for_each_shadow_entry``); fault, audit, decode and policies use it.
``shadow_leaf`` is the same walk unrolled for the fill hook, the hottest path of the MMU.
"""
from __future__ import annotations

from .spte import SPTE_P


def shadow_walk(root, root_level: int, va: int):
    """Yield (level, table, index) for va from the root down, while the tables exist. A PAE root
    (root_level 3) is KVM's 4-entry pae_root: the step at level 3 indexes it with va[31:30]."""
    node, level = root, root_level
    if node is None:
        return
    if level == 3:
        idx = (va >> 30) & 3
        yield 3, node, idx
        node = node.children[idx]
        level = 2
    while node is not None:
        idx = (va >> (12 + 9 * (level - 1))) & 511
        yield level, node, idx
        if level == 1:
            return
        node = node.children[idx]
        level -= 1


def shadow_leaf(root, root_level: int, va: int):
    """(leaf table, index) of the present leaf spte for va, or None (``shadow_walk`` unrolled)."""
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
