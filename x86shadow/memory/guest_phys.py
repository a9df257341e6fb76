"""Guest-physical memory as KVM sees it when the host manages the pages: every access goes
gfn -> hva (memslots) -> host pfn (host.HostMM: a swapped-out page is faulted back in, a write to
a KSM page breaks its copy-on-write sharing, as KVM's kvm_read_guest / kvm_write_guest through
copy_from_user / copy_to_user would). The same accessors as memory.ram.PhysMem, so the guest
walker, the pte-write path and the policies use either. Without a host memory manager the VM
uses the RAM buffer itself (pfn == gfn) and this class is not involved.
"""
from __future__ import annotations

import struct

from .host import PAGE, HostFault

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestPhys:
    """``peek``: a view for looking only (the audit, reports): a swapped-out page is read from
    the swap store instead of being faulted in; writes are refused."""
    __slots__ = ("host", "memslots", "hmv", "size", "peek")

    def __init__(self, host, memslots, ram_size: int, peek: bool = False):
        self.host = host                    # HostMM
        self.memslots = memslots
        self.hmv = host.pages.phys.mv       # the host pages' buffer
        self.size = ram_size
        self.peek = peek

    def contains(self, pa: int, n: int = 1) -> bool:
        return 0 <= pa and pa + n <= self.size

    def hpa(self, pa: int, write: bool = False) -> int:
        """Host address of guest-physical pa (faulting the host page in as KVM's access would)."""
        index = self.memslots.gfn_to_index(pa >> 12)
        if index is None:
            raise HostFault(f"guest-physical address {pa:#x} is in no memslot")
        return self.host.hva_to_pfn(index, write).pfn * PAGE + (pa & 0xFFF)

    def read(self, pa: int, n: int) -> bytes:
        out = b""
        while n:
            chunk = min(n, PAGE - (pa & 0xFFF))
            if self.peek:
                index = self.memslots.gfn_to_index(pa >> 12)
                if index is None:
                    raise HostFault(f"guest-physical address {pa:#x} is in no memslot")
                off = pa & 0xFFF
                out += self.host.peek_page(index)[off:off + chunk]
            else:
                h = self.hpa(pa)
                out += bytes(self.hmv[h:h + chunk])
            pa, n = pa + chunk, n - chunk
        return out

    def write(self, pa: int, data) -> None:
        if self.peek:
            raise HostFault("a write through the look-only view of guest memory")
        data = bytes(data)
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, PAGE - ((pa + pos) & 0xFFF))
            h = self.hpa(pa + pos, True)
            self.hmv[h:h + chunk] = data[pos:pos + chunk]
            pos += chunk

    def read32(self, pa: int) -> int:
        if pa & 0xFFF > PAGE - 4 or self.peek:
            return int.from_bytes(self.read(pa, 4), "little")
        return _U32.unpack_from(self.hmv, self.hpa(pa))[0]

    def read64(self, pa: int) -> int:
        if pa & 0xFFF > PAGE - 8 or self.peek:
            return int.from_bytes(self.read(pa, 8), "little")
        return _U64.unpack_from(self.hmv, self.hpa(pa))[0]

    def write32(self, pa: int, value: int) -> None:
        self.write(pa, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def write64(self, pa: int, value: int) -> None:
        self.write(pa, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def read_uint(self, pa: int, size: int) -> int:
        return int.from_bytes(self.read(pa, size), "little")

    def write_uint(self, pa: int, size: int, value: int) -> None:
        self.write(pa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
