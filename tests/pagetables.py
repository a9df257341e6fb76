"""Guest page-table builder shared by the paging and MMU tests (plain memory, no CPU)."""
from __future__ import annotations

import struct

from x86shadow.paging import (PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W, Mode,
                              PagingContext, entry_frame, index_bits, pte_size)
from x86shadow.physmem import PhysMem

P, W, U, A, D, PS, NX = PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_PS, PTE_NX
PWU = P | W | U

# ---------------------------------------------------------------------------------------------
# guest RAM layout shared by unit and differential tests
RAM = 8 << 20
DATA_END = 0x400000          # 0..4 MiB: data frames, every dword = (frame number:16, 0xF4F4)
TABLES = 0x400000            # 4..6 MiB: page tables built by the tests
HARN_PA = 0x600000           # 6 MiB..: the unicorn harness (code, GDT, stack, its own tables)

_TAGGED = bytearray(DATA_END)
for _pa in range(0, DATA_END, 4):
    struct.pack_into("<HH", _TAGGED, _pa, _pa >> 12, 0xF4F4)
_TAGGED = bytes(_TAGGED)


def fresh_ram() -> bytearray:
    b = bytearray(RAM)
    b[:DATA_END] = _TAGGED
    return b


class Tables:
    """Builds guest page tables in ``buf`` from TABLES upwards."""

    def __init__(self, mode: Mode, buf: bytearray | None = None):
        self.mode = mode
        self.buf = buf if buf is not None else fresh_ram()
        self.mem = PhysMem(self.buf)
        self.next = TABLES
        self.shadow = None          # walker-side copy of buf (differential tests)
        self.cr3 = self.alloc()
        self.esz = pte_size(mode)

    def alloc(self) -> int:
        pa = self.next
        self.next += 0x1000
        assert self.next <= HARN_PA
        self.buf[pa:pa + 0x1000] = bytes(0x1000)
        return pa

    def rd(self, pa):
        return self.mem.read32(pa) if self.esz == 4 else self.mem.read64(pa)

    def wr(self, pa, v):
        self.shadow = None
        (self.mem.write32 if self.esz == 4 else self.mem.write64)(pa, v)

    def slot(self, va: int, level: int) -> int:
        """Address of the entry for va at level (the tables above must exist)."""
        table = self.cr3 & ~0xFFF
        for lv in range(int(self.mode), level, -1):
            e = self.rd(table + self._idx(va, lv))
            assert e & P, "no table at level %d for %#x" % (lv - 1, va)
            table = entry_frame(self.mode, lv, e & ~PS)
        return table + self._idx(va, level)

    def _idx(self, va, level):
        shift, mask = index_bits(self.mode, level)
        return ((va >> shift) & mask) * self.esz

    def map(self, va: int, pa: int, leaf: int = PWU, level: int = 1, upper: int = PWU, pdpte: int = P):
        """Map va -> pa with a leaf at ``level`` (PS added above level 1); missing tables get
        ``upper`` flags (``pdpte`` for a PAE PDPTE).  Returns the leaf's address."""
        table = self.cr3 & ~0xFFF
        for lv in range(int(self.mode), level, -1):
            slot = table + self._idx(va, lv)
            e = self.rd(slot)
            if not e & P or (e & PS and lv <= 3):
                t = self.alloc()
                e = t | (pdpte if (self.mode == Mode.PAE and lv == 3) else upper)
                self.wr(slot, e)
            table = entry_frame(self.mode, lv, e)
        slot = table + self._idx(va, level)
        self.wr(slot, pa | leaf | (PS if level > 1 else 0))
        return slot

    def set(self, va, level, value):
        self.wr(self.slot(va, level), value)

    def get(self, va, level):
        return self.rd(self.slot(va, level))

    def ctx(self, **kw) -> PagingContext:
        if self.mode == Mode.LEGACY:
            kw.setdefault("pse", True)
        return PagingContext(self.mode, self.cr3, **kw)


