"""The firmware boot (docs/ARCHITECTURE.md, "Boot contract"): where the firmware image and the
program go, the CPU state the firmware starts in, and the firmware's crash gate.

The CPU state is data (``BootState``); the vCPU loads it with ``load_boot_state``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout


def seg_desc(base, limit, access, flags) -> int:
    """An 8-byte segment descriptor."""
    d = limit & 0xFFFF
    d |= (base & 0xFFFFFF) << 16
    d |= (access & 0xFF) << 40
    d |= ((limit >> 16) & 0xF) << 48
    d |= (flags & 0xF) << 52
    d |= ((base >> 24) & 0xFF) << 56
    return d


@dataclass(frozen=True)
class BootState:
    entry: int                  # RIP
    gdt_base: int
    gdt: tuple                  # descriptors (written to gdt_base)
    cr0: int | None             # None: leave the CPU's reset value (mode 64, see the contract)
    code_sel: int
    data_sel: int
    sp: int

    def gdt_bytes(self) -> bytes:
        return b"".join(struct.pack("<Q", d) for d in self.gdt)


@dataclass(frozen=True)
class FirmwareBoot:
    """Everything the machine needs to start a program behind the firmware."""
    images: tuple               # ((guest-physical address, bytes), ...)
    state: BootState
    crash_gates: frozenset      # IDT gate targets that mean "unhandled exception": crash report


def firmware_boot(mode: str, program, firmware: bytes) -> FirmwareBoot:
    """Firmware at FW_BASE, the program at its base; the CPU in 32-bit protected mode with paging
    off and a flat boot GDT (mode 64: Unicorn's long-mode reset state, which cannot start in
    legacy protected mode; the firmware sets CR4, CR3, EFER, CR0.PG itself)."""
    if program.base + len(program.code) > layout.PROG_LIMIT:
        raise ValueError(f"program is {len(program.code)} bytes: it must end below 16 MiB")
    if mode == "64":
        gdt = (0, seg_desc(0, 0xFFFFF, 0x9A, 0xA), seg_desc(0, 0xFFFFF, 0x92, 0xC))
        cr0 = None
    else:
        gdt = (0, seg_desc(0, 0xFFFFF, 0x9A, 0xC), seg_desc(0, 0xFFFFF, 0x92, 0xC))
        cr0 = 0x11                      # PE | ET, paging off
    state = BootState(entry=layout.FW_BASE, gdt_base=layout.FW_GDT, gdt=gdt, cr0=cr0,
                      code_sel=layout.SEL_KCODE, data_sel=layout.SEL_KDATA, sp=layout.STACK_TOP)
    return FirmwareBoot(images=((layout.FW_BASE, firmware), (program.base, program.code)),
                        state=state, crash_gates=frozenset({layout.FW_UNHANDLED}))


def kernel_boot(kernel, stub: bytes) -> FirmwareBoot:
    """A multiboot kernel (boot/multiboot.py) behind the leave-long-mode stub
    (firmware/multiboot_leave64.asm): the CPU starts at the stub in Unicorn's UC_MODE_64 reset
    state with the stub's GDT (0x08 flat 32-bit code and 0x10 flat data, QEMU multiboot.S's
    selectors, which the kernel is entered with; 0x18 the stub's 64-bit code) and its stack.
    No crash gate: the kernel's IDT is its own."""
    from . import multiboot as mb
    gdt = (0, seg_desc(0, 0xFFFFF, 0x9A, 0xC), seg_desc(0, 0xFFFFF, 0x92, 0xC),
           seg_desc(0, 0xFFFFF, 0x9A, 0xA))
    state = BootState(entry=mb.LEAVE64_BASE, gdt_base=mb.LEAVE64_GDT, gdt=gdt, cr0=None,
                      code_sel=mb.SEL_CODE64, data_sel=mb.SEL_DATA, sp=mb.LEAVE64_STACK_TOP)
    return FirmwareBoot(images=tuple(kernel.images) + ((mb.LEAVE64_BASE, stub),), state=state,
                        crash_gates=frozenset())
