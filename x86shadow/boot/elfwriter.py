"""A small ELF32 writer for the repository's own test kernels (guestcode/kernels/, docs/KERNELS.md):
an ``ET_EXEC`` file for ``EM_386`` with one ``PT_LOAD`` program header per segment and a
multiboot v1 header in its first 8 KiB, the layout QEMU's ``-kernel`` and boot/multiboot.py
load. pyelftools (the loader's reader) cannot write ELF files; this writes only what a loader
reads: the ELF header (System V ABI, "ELF Header"), program headers, no sections.

The multiboot header (magic, flags, checksum) sits right after the program headers, outside
every segment (the loader scans the file's first 8 KiB); ``flags`` and ``checksum`` can be
given to make a kernel the loader must refuse.
"""
from __future__ import annotations

import struct

from .multiboot import MB_HEADER_MAGIC

_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")        # Elf32_Ehdr, 52 bytes
_PHDR = struct.Struct("<IIIIIIII")                # Elf32_Phdr, 32 bytes
ET_EXEC, EM_386, EV_CURRENT, PT_LOAD = 2, 3, 1, 1
PF_X, PF_W, PF_R = 1, 2, 4
ALIGN = 0x1000


def multiboot_elf32(segments, entry: int, *, mb_flags: int = 0, mb_checksum: int | None = None,
                    bss: int = 0) -> bytes:
    """An ELF32 multiboot kernel: ``segments`` = ((physical = virtual address, bytes), ...),
    each loaded read/write/execute; ``bss`` zero bytes after the last segment (memsz > filesz);
    entered at ``entry``."""
    segments = list(segments)
    if not segments:
        raise ValueError("a kernel needs at least one segment")
    n = len(segments)
    header_at = _EHDR.size + n * _PHDR.size
    if mb_checksum is None:
        mb_checksum = -(MB_HEADER_MAGIC + mb_flags) & 0xFFFFFFFF
    mb = struct.pack("<III", MB_HEADER_MAGIC, mb_flags & 0xFFFFFFFF, mb_checksum & 0xFFFFFFFF)
    offset = (header_at + len(mb) + ALIGN - 1) & ~(ALIGN - 1)
    phdrs, bodies = [], []
    for i, (addr, data) in enumerate(segments):
        if addr % ALIGN:
            raise ValueError(f"segment at {addr:#x}: not page-aligned")
        memsz = len(data) + (bss if i == n - 1 else 0)
        phdrs.append(_PHDR.pack(PT_LOAD, offset, addr, addr, len(data), memsz, PF_R | PF_W | PF_X,
                                ALIGN))
        padded = data + bytes(-len(data) % ALIGN)
        bodies.append(padded)
        offset += len(padded)
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)      # ELFCLASS32, little endian, version 1
    ehdr = _EHDR.pack(ident, ET_EXEC, EM_386, EV_CURRENT, entry, _EHDR.size, 0, 0, _EHDR.size,
                      _PHDR.size, n, 40, 0, 0)
    head = ehdr + b"".join(phdrs) + mb
    head += bytes(-len(head) % ALIGN)
    return head + b"".join(bodies)
