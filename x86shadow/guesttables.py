"""Building guest page tables from the host side (tests, the fault lab, scenarios): the guest
paging formats of x86shadow.paging, written into guest RAM."""
from __future__ import annotations

from .paging import PTE_P, PTE_PS, PTE_U, PTE_W, Mode, PagingContext, entry_frame, index_bits, pte_size

PWU = PTE_P | PTE_W | PTE_U


class GuestTables:
    """Page tables for one guest address space, allocated page by page from [next, end)."""

    def __init__(self, mode: Mode, mem, alloc_base: int, alloc_end: int):
        self.mode = Mode(mode)
        self.mem = mem
        self.next = alloc_base
        self.end = alloc_end
        self.esz = pte_size(self.mode)
        self.cr3 = self.alloc()

    def alloc(self) -> int:
        pa = self.next
        if pa + 0x1000 > self.end:
            raise MemoryError(f"guest page-table area exhausted at {pa:#x}")
        self.next += 0x1000
        self.mem.write(pa, bytes(0x1000))
        return pa

    def rd(self, pa):
        return self.mem.read32(pa) if self.esz == 4 else self.mem.read64(pa)

    def wr(self, pa, v):
        (self.mem.write32 if self.esz == 4 else self.mem.write64)(pa, v)

    def _idx(self, va, level):
        shift, mask = index_bits(self.mode, level)
        return ((va >> shift) & mask) * self.esz

    def slot(self, va: int, level: int) -> int:
        """Address of the entry for va at level (the tables above must exist)."""
        table = self.cr3 & ~0xFFF
        for lv in range(int(self.mode), level, -1):
            e = self.rd(table + self._idx(va, lv))
            if not e & PTE_P:
                raise KeyError(f"no table at level {lv - 1} for {va:#x}")
            table = entry_frame(self.mode, lv, e & ~PTE_PS)
        return table + self._idx(va, level)

    def table_of(self, va: int, level: int = 1) -> int:
        """Guest-physical address of the table holding va's entry at level."""
        return self.slot(va, level) & ~0xFFF

    def map(self, va: int, pa: int, leaf: int = PWU, level: int = 1, upper: int = PWU,
            pdpte: int = PTE_P) -> int:
        """Map va -> pa with a leaf at ``level`` (PS added above level 1); missing tables get
        ``upper`` flags (``pdpte`` for a PAE PDPTE). Returns the leaf's address."""
        table = self.cr3 & ~0xFFF
        for lv in range(int(self.mode), level, -1):
            slot = table + self._idx(va, lv)
            e = self.rd(slot)
            if not e & PTE_P or (e & PTE_PS and lv <= 3):
                t = self.alloc()
                e = t | (pdpte if (self.mode == Mode.PAE and lv == 3) else upper)
                self.wr(slot, e)
            table = entry_frame(self.mode, lv, e)
        slot = table + self._idx(va, level)
        self.wr(slot, pa | leaf | (PTE_PS if level > 1 else 0))
        return slot

    def set(self, va, level, value):
        self.wr(self.slot(va, level), value)

    def get(self, va, level):
        return self.rd(self.slot(va, level))

    def ctx(self, **kw) -> PagingContext:
        if self.mode == Mode.LEGACY:
            kw.setdefault("pse", True)
        return PagingContext(self.mode, self.cr3, **kw)
