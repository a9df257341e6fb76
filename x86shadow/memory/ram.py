"""Guest physical memory: one host buffer, addressed by guest-physical address.

The same object serves the Unicorn adapter (which maps the buffer into the CPU with
``mem_map_ptr``) and the sans-CPU MMU core and its tests (which use a plain bytearray).
"""
from __future__ import annotations

import ctypes
import struct

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class PhysMem:
    """Little-endian accessors over a writable buffer.

    ``PhysMem(size)`` allocates a zeroed ctypes buffer (so it can be handed to Unicorn);
    ``PhysMem(bytearray(...))`` wraps an existing buffer (handy in tests).
    """

    __slots__ = ("buf", "mv", "size", "address")

    def __init__(self, size_or_buffer):
        if isinstance(size_or_buffer, int):
            self.buf = ctypes.create_string_buffer(size_or_buffer)
            self.address = ctypes.addressof(self.buf)
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
