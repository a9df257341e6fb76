"""Guest page-table builder shared by the paging and MMU tests (plain memory, no CPU)."""
from __future__ import annotations

import struct

from x86shadow.guesttables import GuestTables
from x86shadow.paging import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W, Mode
from x86shadow.memory.ram import PhysMem

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


class Tables(GuestTables):
    """Page tables in ``buf`` (tagged test RAM by default) from TABLES up to HARN_PA."""

    def __init__(self, mode: Mode, buf: bytearray | None = None):
        self.buf = buf if buf is not None else fresh_ram()
        self.shadow = None          # walker-side copy of buf (differential tests)
        super().__init__(mode, PhysMem(self.buf), TABLES, HARN_PA)

    def wr(self, pa, v):
        self.shadow = None
        super().wr(pa, v)
