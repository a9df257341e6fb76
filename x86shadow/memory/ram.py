"""Guest physical memory: one host buffer, addressed by guest-physical address.

The same object serves the Unicorn adapter (which maps the buffer into the CPU with
``mem_map_ptr``) and the sans-CPU MMU core and its tests (which use a plain bytearray).
"""
from __future__ import annotations

import ctypes
import mmap
import struct
import sys

# Python's mmap module does not export MAP_NORESERVE before 3.12; its value on Linux
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class PhysMem:
    """Little-endian accessors over a writable buffer.

    ``PhysMem(size)`` reserves an anonymous private mapping (so it can be handed to Unicorn): the
    host zero-fills each page on first touch, so a large guest RAM costs nothing until used
    (``MAP_NORESERVE``: no swap is reserved up front either). ``PhysMem(bytearray(...))`` wraps
    an existing buffer (handy in tests). A mapping the host refuses raises MemoryError naming the
    size.
    """

    __slots__ = ("buf", "mv", "size", "address", "_cbuf")

    def __init__(self, size_or_buffer):
        self._cbuf = None
        if isinstance(size_or_buffer, int):
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
            try:
                self.buf = mmap.mmap(-1, size_or_buffer, flags=flags)
            except OSError as e:
                raise MemoryError(f"cannot reserve {size_or_buffer >> 20} MiB of guest RAM: "
                                  f"{e.strerror}") from None
            self._cbuf = ctypes.c_char.from_buffer(self.buf)
            self.address = ctypes.addressof(self._cbuf)
        else:
            self.buf = size_or_buffer
            self.address = None
        self.mv = memoryview(self.buf).cast("B")
        self.size = len(self.mv)

    def contains(self, pa: int, n: int = 1) -> bool:
        return 0 <= pa and pa + n <= self.size

    def read(self, pa: int, n: int) -> bytes:
        return bytes(self.mv[pa:pa + n])

    def write(self, pa: int, data) -> None:
        self.mv[pa:pa + len(data)] = data

    def read32(self, pa: int) -> int:
        return _U32.unpack_from(self.mv, pa)[0]

    def read64(self, pa: int) -> int:
        return _U64.unpack_from(self.mv, pa)[0]

    def write32(self, pa: int, value: int) -> None:
        _U32.pack_into(self.mv, pa, value & 0xFFFFFFFF)

    def write64(self, pa: int, value: int) -> None:
        _U64.pack_into(self.mv, pa, value & 0xFFFFFFFFFFFFFFFF)

    def read_uint(self, pa: int, size: int) -> int:
        return int.from_bytes(self.mv[pa:pa + size], "little")

    def write_uint(self, pa: int, size: int, value: int) -> None:
        self.mv[pa:pa + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
