"""Memslots: guest frame numbers (gfns) -> host page frame numbers (pfns).

KVM keeps sptes and the TLB in host pfns and the rmap per gfn (``__gfn_to_pfn_memslot``); so do
we, so that host pages can later move under the guest (MMU notifiers, reclaim, migration). Today
there is one slot covering all of guest RAM, backed 1:1 by the RAM buffer: pfn == gfn.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Memslot:
    base_gfn: int
    npages: int
    base_pfn: int          # host pfn of base_gfn (the slot's userspace_addr in KVM terms)

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


class Memslots:
    """The VM's memslots; ``gfn_to_pfn`` returns None for a gfn outside every slot."""

    def __init__(self, ram_frames: int):
        self.slots = [Memslot(0, ram_frames, 0)]
        self.ram_frames = ram_frames
        self.identity = True           # one slot, pfn == gfn: the fast path below

    def gfn_to_pfn(self, gfn: int):
        if self.identity:
            return gfn if 0 <= gfn < self.ram_frames else None
        for s in self.slots:
            if s.contains(gfn):
                return s.base_pfn + (gfn - s.base_gfn)
        return None
