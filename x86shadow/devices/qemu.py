"""The devices of QEMU's PC that multiboot test kernels touch (docs/KERNELS.md, "Devices"), each
modelled on the QEMU source named in its docstring (QEMU 7.2 unless said otherwise):

* ``Uart16550`` (0x3f8-0x3ff): the serial console, registers kept;
* ``DebugExit`` (0xf4, devices/pc.py) and ``BochsShutdown`` (0x8900): the ways a kernel ends a run;
* ``FwCfg`` (0x510 selector / 0x511 data): signature, RAM size, CPU count;
* ``Pic8259`` (0x20/0x21, 0xa0/0xa1): masks kept, the initialisation sequence accepted;
* ``LocalApic``: the xAPIC page at 0xfee00000 (MMIO) and ``IA32_APIC_BASE`` (MSR 0x1b).

Ports nobody claims read as all ones (QEMU's unassigned I/O: ``unassigned_io_read`` returns
~0... on the ISA bus each byte 0xff) and ignore writes; the vCPU counts them as I/O exits.
"""
from __future__ import annotations

import struct

from .bus import Device, StopRequest
from .pc import SerialConsole


class Uart16550(SerialConsole):
    """QEMU hw/char/serial.c: THR writes go to the sink; IER, LCR, MCR, SCR and the divisor
    latch (DLL/DLM, reached with LCR.DLAB = 1) keep what is written and read it back; LSR reads
    0x60 (THR and transmitter empty: UART_LSR_THRE | UART_LSR_TEMT, nothing received); IIR reads
    0x01 (no interrupt pending); RBR reads 0 (nothing received); MSR reads 0 (no modem lines)."""

    name = "serial-16550"
    THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
    DLAB = 0x80

    def __init__(self, base: int, sink):
        super().__init__(base, sink)
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.divider = 0x0C                 # QEMU's reset value (9600 baud at 1.8432 MHz / 16)

    def read(self, addr, size):
        r = addr - self.base
        if r == self.THR:
            return self.divider & 0xFF if self.lcr & self.DLAB else 0
        if r == self.IER:
            return self.divider >> 8 if self.lcr & self.DLAB else self.ier
        if r == self.IIR:
            return 0x01
        if r == self.LCR:
            return self.lcr
        if r == self.MCR:
            return self.mcr
        if r == self.LSR:
            return 0x60
        if r == self.MSR:
            return 0
        return self.scr

    def write(self, addr, size, value):
        r = addr - self.base
        value &= 0xFF
        if r == self.THR:
            if self.lcr & self.DLAB:
                self.divider = (self.divider & 0xFF00) | value
            else:
                self.sink(bytes([value]))
        elif r == self.IER:
            if self.lcr & self.DLAB:
                self.divider = (self.divider & 0xFF) | value << 8
            else:
                self.ier = value & 0x0F     # QEMU keeps the low 4 bits (serial_ioport_write)
        elif r == self.LCR:
            self.lcr = value
        elif r == self.MCR:
            self.mcr = value & 0x1F
        elif r == self.SCR:
            self.scr = value
        return None


class BochsShutdown(Device):
    """Port 0x8900, Bochs' "Shutdown" port, which kvm-unit-tests writes after isa-debug-exit
    (lib/x86/io.c exit()): the 8 bytes "Shutdown" written in order power the machine off (QEMU
    1.x hw/pc.c bochs_bios_write, case 0x8900; status 0 here). Any other byte restarts the match."""

    name = "bochs-shutdown"
    WORD = b"Shutdown"

    def __init__(self):
        self.matched = 0

    def write(self, addr, size, value):
        b = value & 0xFF
        if b == self.WORD[self.matched]:
            self.matched += 1
            if self.matched == len(self.WORD):
                self.matched = 0
                return StopRequest(0)
        else:
            self.matched = 1 if b == self.WORD[0] else 0
        return None


# QEMU include/standard-headers/linux/qemu_fw_cfg.h
FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_RAM_SIZE, FW_CFG_NB_CPUS, FW_CFG_MAX_CPUS = 0x00, 0x01, 0x03, 0x05, 0x0F


class FwCfg(Device):
    """QEMU hw/nvram/fw_cfg.c, the I/O-port interface: a 16-bit write to 0x510 selects an item
    and rewinds it; each byte read from 0x511 returns the item's next byte, 0 past its end or
    for an item that does not exist (fw_cfg_data_read). Items: signature "QEMU", ID 1 (the
    traditional interface only, no DMA), RAM_SIZE (8 bytes, little endian: pc_memory_init),
    NB_CPUS and MAX_CPUS (2 bytes: the vCPUs, never 0)."""

    name = "fw_cfg"
    SELECTOR, DATA = 0x510, 0x511

    def __init__(self, ram_size: int, vcpus: int = 1):
        if vcpus < 1:
            raise ValueError("fw_cfg: a machine has at least one vCPU")
        self.items = {FW_CFG_SIGNATURE: b"QEMU", FW_CFG_ID: struct.pack("<I", 1),
                      FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
                      FW_CFG_NB_CPUS: struct.pack("<H", vcpus),
                      FW_CFG_MAX_CPUS: struct.pack("<H", vcpus)}
        self.key = 0
        self.offset = 0

    def read(self, addr, size):
        if addr != self.DATA:
            return 0                        # the selector register reads 0 (QEMU: write-only)
        item = self.items.get(self.key, b"")
        value = 0
        for i in range(size):               # a wider read returns that many bytes of the item
            if self.offset < len(item):
                value |= item[self.offset] << (8 * i)
                self.offset += 1
        return value

    def write(self, addr, size, value):
        if addr == self.SELECTOR:
            self.key = value & 0xFFFF
            self.offset = 0
        return None                         # data writes are ignored (QEMU 2.4+)


class Pic8259(Device):
    """One 8259A (QEMU hw/intc/i8259.c, pic_ioport_write/read): a write to the command port with
    bit 4 set is ICW1 and starts the initialisation sequence (ICW2, ICW3 if ICW1 says
    cascade, ICW4 if ICW1 asks for it, on the data port); afterwards a data-port write sets the
    interrupt mask (OCW1), which the data port reads back. Command-port OCW2/OCW3 (EOI, read
    IRR/ISR) are accepted; the command port reads 0 (IRR/ISR: nothing ever pending)."""

    name = "i8259"

    def __init__(self, base: int):
        self.base = base
        self.imr = 0
        self.init_state = 0                 # 0: ready; 1..3: waiting for ICW2..ICW4
        self.needs_icw4 = False
        self.single = False
        self.vector_base = 0

    def read(self, addr, size):
        if addr == self.base + 1:
            return self.imr
        return 0

    def write(self, addr, size, value):
        value &= 0xFF
        if addr == self.base:
            if value & 0x10:                # ICW1
                self.imr = 0
                self.init_state = 1
                self.needs_icw4 = bool(value & 1)
                self.single = bool(value & 2)
            return None                     # OCW2 / OCW3
        if self.init_state == 0:
            self.imr = value                # OCW1
        elif self.init_state == 1:
            self.vector_base = value & 0xF8
            self.init_state = 3 if self.single else 2
            if self.single and not self.needs_icw4:
                self.init_state = 0
        elif self.init_state == 2:
            self.init_state = 3 if self.needs_icw4 else 0
        else:
            self.init_state = 0             # ICW4
        return None


APIC_DEFAULT_BASE = 0xFEE00000
MSR_IA32_APICBASE = 0x1B
APICBASE_BSP, APICBASE_EXTD, APICBASE_ENABLE = 1 << 8, 1 << 10, 1 << 11


class LocalApic(Device):
    """The xAPIC (QEMU hw/intc/apic.c, apic_mem_read/apic_mem_write; Intel SDM vol. 3A 11.4):
    the 4 KiB page at 0xfee00000, 32-bit registers every 16 bytes. ID (0x20) = APIC ID << 24
    (0 for the BSP), version (0x30) = 0x50014 (QEMU: version 0x14, 6 LVT entries: max LVT 5),
    TPR (0x80), LDR (0xd0), DFR (0xe0, reset 0xffffffff), SVR (0xf0, reset 0xff), ICR (0x300,
    0x310) and the LVT (0x320-0x370, reset masked 0x10000) and timer registers keep what is
    written; writing EOI (0xb0) is accepted; PPR follows TPR; the ICR's delivery-status bit 12
    always reads 0 (an IPI is sent at once). With one vCPU, IPIs have nobody to go to (INIT and
    SIPI start APs once several vCPUs exist). ``IA32_APIC_BASE`` (MSR 0x1b) reads 0xfee00900
    (base, BSP, enabled) and keeps its enable bits (``msr()``: the handler the vCPU's
    ``msr_handlers[0x1b]`` takes)."""

    name = "xapic"
    ID, VERSION, TPR, PPR, EOI, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0
    ICR_LO, ICR_HI = 0x300, 0x310
    VERSION_VALUE = 0x00050014
    ICR_BUSY = 1 << 12
    READ_ONLY = frozenset((ID, VERSION, PPR))

    def __init__(self, apic_id: int = 0, base: int = APIC_DEFAULT_BASE):
        self.apic_id = apic_id
        self.base = base
        self.regs = {self.DFR: 0xFFFFFFFF, self.SVR: 0xFF}
        for lvt in range(0x320, 0x380, 0x10):
            self.regs[lvt] = 0x10000        # masked
        self.apic_base = base | APICBASE_ENABLE | (APICBASE_BSP if apic_id == 0 else 0)
        self.eois = 0
        self.ipis = []                      # (icr_lo, icr_hi) of every IPI sent

    def read(self, addr, size):
        off = (addr - self.base) & 0xFF0
        if off == self.ID:
            value = self.apic_id << 24
        elif off == self.VERSION:
            value = self.VERSION_VALUE
        elif off == self.PPR:
            value = self.regs.get(self.TPR, 0) & 0xF0
        elif off == self.ICR_LO:
            value = self.regs.get(off, 0) & ~self.ICR_BUSY
        else:
            value = self.regs.get(off, 0)
        shift = 8 * ((addr - self.base) & 3)
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, addr, size, value):
        off = (addr - self.base) & 0xFF0
        if off in self.READ_ONLY:
            return None
        if off == self.EOI:
            self.eois += 1
            return None
        value &= 0xFFFFFFFF
        if off == self.ICR_LO:
            self.ipis.append((value, self.regs.get(self.ICR_HI, 0)))
            value &= ~self.ICR_BUSY
        self.regs[off] = value
        return None

    # ---- IA32_APIC_BASE (the vCPU's msr_handlers[0x1b])
    def msr(self):
        apic = self

        class ApicBaseMsr:
            @staticmethod
            def read():
                return apic.apic_base

            @staticmethod
            def write(value):
                # the base stays where the MMIO page is; BSP is read-only; EN and EXTD kept
                apic.apic_base = (apic.base | (apic.apic_base & APICBASE_BSP)
                                  | (value & (APICBASE_ENABLE | APICBASE_EXTD)))
        return ApicBaseMsr()


def attach_qemu_devices(ports, mmio, serial_sink, ram_size: int, vcpus: int = 1):
    """The QEMU devices a kernel machine has besides devices/pc.py's (whose serial console this
    16550 replaces). Returns the local APIC (its MSR goes to the vCPU)."""
    from .. import layout
    from .pc import DebugExit
    ports.attach(Uart16550(layout.SERIAL_PORT, serial_sink), layout.SERIAL_PORT,
                 layout.SERIAL_PORT + 7)
    ports.attach(DebugExit(), layout.EXIT_PORT, layout.EXIT_PORT + 3)
    ports.attach(BochsShutdown(), 0x8900)
    ports.attach(FwCfg(ram_size, vcpus), FwCfg.SELECTOR, FwCfg.DATA)
    ports.attach(Pic8259(0x20), 0x20, 0x21)
    ports.attach(Pic8259(0xA0), 0xA0, 0xA1)
    apic = LocalApic()
    mmio.attach(apic, APIC_DEFAULT_BASE, APIC_DEFAULT_BASE + 0xFFF)
    return apic
