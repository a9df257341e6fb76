"""The multiboot (v1) loader: what QEMU's ``-kernel`` does with a multiboot ELF (docs/KERNELS.md).

A kernel is an ELF (ELF32, or ELF64) whose first 8 KiB hold a multiboot header (magic
0x1BADB002, flags, checksum: magic + flags + checksum = 0 mod 2^32). With header flags bit 16
clear (the only kind supported, as kvm-unit-tests builds them) the ELF program headers say
where it goes: every PT_LOAD segment is copied to its physical address (``p_paddr``; ``filesz``
bytes from the file, the rest up to ``memsz`` zeroed) and the kernel is entered at ``e_entry``.

The multiboot information is placed where QEMU 2.x-9.x places it (hw/i386/multiboot.c,
``load_multiboot``; the option ROM pc-bios/optionrom/multiboot.S fills the memory fields):

* the e820 memory map at ``MULTIBOOT_STRUCT_ADDR`` = 0x9000 (``ADDR_E820_MAP``), each entry
  ``size`` (20) then base, length (64-bit) and type; ``mmap_addr`` points at the first ``size``;
* the information structure at 0x9500 (``ADDR_MBI`` = ``ADDR_E820_MAP + 0x500``), 88 bytes,
  flags 0x24f (MEMORY | BOOT_DEVICE | CMDLINE | MODULES | MMAP | BOOTLOADER), boot_device
  0x8000ffff, mem_lower 639 (KiB below the EBDA at 0x9fc00), mem_upper = (RAM - 1 MiB) / 1 KiB;
* right after the kernel's last byte, page-aligned (``mb_buf_size = TARGET_PAGE_ALIGN(
  mb_kernel_size)``): the module list (16 bytes per module), the command lines (each module's,
  then the kernel's: ``"KERNEL ARGS"``, the kernel's file name, a space and ``-append``), the
  boot loader's name; then, page-aligned, each module's contents (``--initrd``).

Header flags this loader cannot honour are refused (ValueError): bit 2 (a video mode) and bit 16
(load addresses from the header instead of the ELF program headers).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

MB_HEADER_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002           # EAX at the kernel's entry
MB_SEARCH = 8192                     # the header lies in the first 8 KiB ...
MB_HEADER_SIZE = 12                  # ... 32-bit aligned (magic, flags, checksum)
HDR_PAGE_ALIGN = 1 << 0              # align modules on page boundaries (QEMU always does)
HDR_MEMORY_INFO = 1 << 1             # pass mem_* (QEMU always does)
HDR_VIDEO_MODE = 1 << 2              # a video mode table: not supported
HDR_AOUT_KLUDGE = 1 << 16            # load addresses in the header: not supported
_HDR_KNOWN = HDR_PAGE_ALIGN | HDR_MEMORY_INFO

# QEMU hw/i386/multiboot.c
MULTIBOOT_STRUCT_ADDR = 0x9000
ADDR_E820_MAP = MULTIBOOT_STRUCT_ADDR
ADDR_MBI = ADDR_E820_MAP + 0x500
MBI_SIZE = 88
MB_MOD_SIZE = 16
INFO_FLAGS = 0x24F                   # MEMORY | BOOT_DEVICE | CMDLINE | MODULES | MMAP | BOOTLOADER
BOOT_DEVICE = 0x8000FFFF             # QEMU: "XXX: use the -boot switch?"
MEM_LOWER_KIB = 639                  # conventional memory below the EBDA (0x9fc00)
BOOTLOADER_NAME = "x86shadow"
E820_RAM, E820_RESERVED = 1, 2

# The loader's own areas in low memory (never a kernel's): the leave-long-mode stub
# (firmware/multiboot_leave64.asm) with its stack, identity-map tables and code, and the
# information block of QEMU's addresses. A PT_LOAD segment overlapping them is refused.
LEAVE64_STACK_TOP = 0x5000           # stack page 0x4000..0x4fff
LEAVE64_PML4 = 0x5000
LEAVE64_PDPT = 0x6000
LEAVE64_PD = 0x7000
LEAVE64_BASE = 0x8000                # the stub's 64-bit part; its 32-bit part at LEAVE64_BASE + 0x800
LEAVE64_CODE32 = LEAVE64_BASE + 0x800
LEAVE64_GDT = LEAVE64_BASE + 0xF00   # the boot GDT the machine writes (BootState.gdt_base)
LOADER_AREA = (0x4000, 0xA000)       # [first, end): stub, tables, e820 map, information
LOADER_TABLES = (LEAVE64_PML4 >> 12, LEAVE64_PDPT >> 12, LEAVE64_PD >> 12)
# the stub's GDT, QEMU's multiboot.S selectors for the kernel: 0x08 flat 32-bit code, 0x10 flat
# data; 0x18 is the stub's own 64-bit code segment
SEL_CODE32, SEL_DATA, SEL_CODE64 = 0x08, 0x10, 0x18
PAGE = 0x1000


def page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class MultibootHeader:
    offset: int                      # in the file
    flags: int


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes                      # filesz bytes
    memsz: int


@dataclass(frozen=True)
class MultibootKernel:
    """A loaded kernel: what goes into guest RAM and where the CPU enters it."""
    path: str
    entry: int
    elf_class: int                   # 32 or 64
    segments: tuple                  # Segment, ...
    info_addr: int                   # EBX at entry
    images: tuple                    # ((guest-physical address, bytes), ...), segments included
    zero: tuple                      # ((guest-physical address, length), ...): bss parts
    cmdline: str
    modules: tuple                   # ((start, end, name), ...)
    ram_size: int

    @property
    def end(self) -> int:
        """The first byte after the kernel image (bss included)."""
        return max(s.paddr + s.memsz for s in self.segments)


def find_header(head: bytes) -> MultibootHeader | None:
    """The multiboot header in the first 8 KiB (None if there is none). A magic whose checksum
    does not match is not a header (QEMU's rule); ``bad_checksum`` tells them apart."""
    for off in range(0, min(len(head), MB_SEARCH) - MB_HEADER_SIZE + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, off)
        if magic == MB_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return MultibootHeader(off, flags)
    return None


def _bad_checksum(head: bytes) -> int | None:
    for off in range(0, min(len(head), MB_SEARCH) - MB_HEADER_SIZE + 1, 4):
        if struct.unpack_from("<I", head, off)[0] == MB_HEADER_MAGIC:
            return off
    return None


def is_multiboot(data: bytes) -> bool:
    """An ELF file with a multiboot magic in its first 8 KiB (checksum right or not: a bad one
    is then reported by the loader, not taken for an assembly source)."""
    return data[:4] == b"\x7fELF" and _bad_checksum(data[:MB_SEARCH]) is not None


def e820_map(ram_size: int) -> list:
    """The BIOS memory map QEMU's SeaBIOS reports for a PC of ``ram_size`` below 4 GiB:
    conventional memory to the EBDA, the EBDA, the BIOS ROM, RAM from 1 MiB, the flash."""
    return [(0, 0x9FC00, E820_RAM), (0x9FC00, 0xA0000 - 0x9FC00, E820_RESERVED),
            (0xF0000, 0x10000, E820_RESERVED), (0x100000, ram_size - 0x100000, E820_RAM),
            (0xFFFC0000, 0x40000, E820_RESERVED)]


def _read_elf(path: str, data: bytes):
    """(elf class, entry, segments) through pyelftools."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_386", "EM_X86_64"):
            raise ValueError(f"{path}: an ELF for {elf['e_machine']}, not x86")
        segs = []
        for ph in elf.iter_segments():
            if ph["p_type"] != "PT_LOAD" or ph["p_memsz"] == 0:
                continue
            if ph["p_filesz"] > ph["p_memsz"]:
                raise ValueError(f"{path}: a PT_LOAD segment with filesz {ph['p_filesz']:#x} > "
                                 f"memsz {ph['p_memsz']:#x}")
            body = ph.data()
            if len(body) != ph["p_filesz"]:
                raise ValueError(f"{path}: a PT_LOAD segment runs past the end of the file")
            segs.append(Segment(ph["p_paddr"], bytes(body), ph["p_memsz"]))
        return elf.elfclass, elf["e_entry"], segs
    except ELFError as e:
        raise ValueError(f"{path}: not a readable ELF file: {e}") from None
    except (struct.error, EOFError) as e:        # truncated headers
        raise ValueError(f"{path}: truncated ELF file ({e})") from None


def load_multiboot(path: str, ram_size: int, append: str = "", initrd: str | None = None,
                   data: bytes | None = None) -> MultibootKernel:
    """Load the multiboot kernel at ``path`` for a guest of ``ram_size`` bytes (ValueError with
    a message naming the problem for anything QEMU would refuse or that does not fit)."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path}: not an ELF file, so not a multiboot kernel")
    hdr = find_header(data[:MB_SEARCH])
    if hdr is None:
        off = _bad_checksum(data[:MB_SEARCH])
        if off is not None:
            raise ValueError(f"{path}: multiboot header at offset {off:#x} has a bad checksum "
                             "(magic + flags + checksum must be 0 mod 2^32)")
        raise ValueError(f"{path}: not a multiboot kernel (no multiboot header magic "
                         f"{MB_HEADER_MAGIC:#x} in the first 8 KiB)")
    if hdr.flags & HDR_VIDEO_MODE:
        raise ValueError(f"{path}: the multiboot header asks for a video mode (flags "
                         f"{hdr.flags:#x}, bit 2): there is no display")
    if hdr.flags & HDR_AOUT_KLUDGE:
        raise ValueError(f"{path}: the multiboot header gives load addresses (flags "
                         f"{hdr.flags:#x}, bit 16): only ELF program headers are supported")
    if hdr.flags & 0xFFFF & ~_HDR_KNOWN:
        raise ValueError(f"{path}: the multiboot header requires features this loader lacks "
                         f"(flags {hdr.flags:#x})")
    elf_class, entry, segs = _read_elf(path, data)
    if not segs:
        raise ValueError(f"{path}: no PT_LOAD segment to load")
    for s in segs:
        end = s.paddr + s.memsz
        if end > ram_size:
            raise ValueError(f"{path}: a segment at {s.paddr:#x}..{end:#x} lies outside guest "
                             f"RAM ({ram_size >> 20} MiB): use a larger --ram")
        if s.paddr < LOADER_AREA[1] and LOADER_AREA[0] < end:
            raise ValueError(f"{path}: a segment at {s.paddr:#x}..{end:#x} overlaps the loader's "
                             f"own area {LOADER_AREA[0]:#x}..{LOADER_AREA[1]:#x} (boot stub, "
                             "memory map, multiboot information)")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segs):
        raise ValueError(f"{path}: entry point {entry:#x} is in no loaded segment")
    if entry >= 1 << 32:
        raise ValueError(f"{path}: entry point {entry:#x} is above 4 GiB (a multiboot kernel "
                         "starts in 32-bit protected mode)")
    kernel_end = max(s.paddr + s.memsz for s in segs)
    # QEMU: the module list, command lines and the loader's name after the page-aligned kernel
    mods_addr = page_align(kernel_end)
    cmdline = f"{path} {append}"
    mod_blobs = []
    if initrd is not None:
        try:
            with open(initrd, "rb") as f:
                mod_blobs.append((initrd, f.read()))
        except OSError as e:
            raise ValueError(f"--initrd {initrd!r}: cannot read it: {e.strerror}") from None
    strings = bytearray()
    mod_cmdline_addrs = []
    strings_base = mods_addr + MB_MOD_SIZE * len(mod_blobs)
    for name, _ in mod_blobs:
        mod_cmdline_addrs.append(strings_base + len(strings))
        strings += name.encode() + b"\0"
    cmdline_addr = strings_base + len(strings)
    strings += cmdline.encode() + b"\0"
    loader_addr = strings_base + len(strings)
    strings += BOOTLOADER_NAME.encode() + b"\0"
    pos = page_align(strings_base + len(strings))
    modules, mod_list, images = [], bytearray(), []
    for (name, body), c in zip(mod_blobs, mod_cmdline_addrs):
        modules.append((pos, pos + len(body), name))
        mod_list += struct.pack("<IIII", pos, pos + len(body), c, 0)
        images.append((pos, body))
        pos = page_align(pos + len(body))
    if pos > ram_size:
        raise ValueError(f"{path}: the kernel, its command line and modules need "
                         f"{pos >> 10} KiB, more than the {ram_size >> 20} MiB of guest RAM: "
                         "use a larger --ram")
    if pos >= 1 << 32:
        raise ValueError(f"{path}: the multiboot information would lie above 4 GiB")
    images.insert(0, (mods_addr, bytes(mod_list) + bytes(strings)))
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind)
                    for base, length, kind in e820_map(ram_size))
    info = bytearray(MBI_SIZE)
    struct.pack_into("<IIIIIII", info, 0, INFO_FLAGS, MEM_LOWER_KIB,
                     (ram_size - 0x100000) >> 10, BOOT_DEVICE, cmdline_addr, len(modules),
                     mods_addr)
    struct.pack_into("<II", info, 44, len(mmap), ADDR_E820_MAP)
    struct.pack_into("<I", info, 64, loader_addr)
    images[:0] = [(s.paddr, s.data) for s in segs if s.data]
    images += [(ADDR_E820_MAP, mmap), (ADDR_MBI, bytes(info))]
    zero = tuple((s.paddr + len(s.data), s.memsz - len(s.data)) for s in segs
                 if s.memsz > len(s.data))
    return MultibootKernel(path=path, entry=entry, elf_class=elf_class, segments=tuple(segs),
                           info_addr=ADDR_MBI, images=tuple(images), zero=zero,
                           cmdline=cmdline, modules=tuple(modules), ram_size=ram_size)


def kernel_file_kind(path: str) -> str:
    """"kernel" for a multiboot ELF, "elf" for another ELF, "source" otherwise (read error:
    OSError)."""
    with open(path, "rb") as f:
        head = f.read(MB_SEARCH)
    if head[:4] != b"\x7fELF":
        return "source"
    return "kernel" if is_multiboot(head) else "elf"

