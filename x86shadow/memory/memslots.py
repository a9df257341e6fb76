"""Memslots: guest frame numbers (gfns) -> host virtual addresses -> host page frame numbers.

KVM keeps sptes and the TLB in host pfns and the rmap per gfn (``__gfn_to_pfn_memslot``); so do
we, so that host pages can move under the guest (memory/host.py: MMU notifiers, reclaim,
migration, KSM). There is one slot covering all of guest RAM, at the VMM's guest RAM mapping
(``host.HVA_BASE``). Without a host memory manager (the default) the slot is backed 1:1 by the
RAM buffer: pfn == gfn (the fast path of VmMmu.gfn_to_pfn and of the shadow page fault).
"""
from __future__ import annotations

from dataclasses import dataclass

from .host import HVA_BASE, PAGE


@dataclass(frozen=True)
class Memslot:
    base_gfn: int
    npages: int
    userspace_addr: int     # hva of base_gfn (KVM's memslot->userspace_addr)

    def hva_range_gfns(self, start: int, end: int):
        """The gfns of this slot whose hva lies in [start, end) (kvm_handle_hva_range)."""
        lo = max(start, self.userspace_addr)
        hi = min(end, self.userspace_addr + self.npages * PAGE)
        if lo >= hi:
            return range(0)
        first = self.base_gfn + (lo - self.userspace_addr) // PAGE
        last = self.base_gfn + (hi - self.userspace_addr + PAGE - 1) // PAGE
        return range(first, last)


class Memslots:
    """The VM's memslots. ``gfn_to_index`` gives the page of the VMM's guest RAM mapping that
    backs gfn (None outside every slot); without a host memory manager that page is host pfn gfn
    (VmMmu.gfn_to_pfn)."""

    def __init__(self, ram_frames: int):
        self.slots = [Memslot(0, ram_frames, HVA_BASE)]
        self.ram_frames = ram_frames

    def gfn_to_index(self, gfn: int):
        if 0 <= gfn < self.ram_frames:
            return gfn
        return None

    def index_to_gfn(self, index: int):
        """The gfn backed by page ``index`` of the guest RAM mapping."""
        return index if 0 <= index < self.ram_frames else None

    def hva_range_gfns(self, start: int, end: int):
        """Every gfn whose hva is in [start, end), slot by slot (kvm_handle_hva_range)."""
        out = []
        for s in self.slots:
            out.extend(s.hva_range_gfns(start, end))
        return out
