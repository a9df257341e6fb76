"""The firmware (firmware/boot32.asm, firmware/boot64.asm) booted on plain Unicorn with its own
MMU (UC_TLB_CPU): the start state of docs/ARCHITECTURE.md "Boot contract", a tiny main that
records its environment and writes a marker into every large page, then checks of the final CPU
state, the GDT/TSS/IDT and the page tables. (The real machine is x86shadow/machine.py; this
harness only tests the firmware.)"""
import struct

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_MODE_32, UC_MODE_64, \
    UC_TLB_CPU, Uc
from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_CS,
                               UC_X86_REG_DS, UC_X86_REG_EIP, UC_X86_REG_ES, UC_X86_REG_ESP,
                               UC_X86_REG_FS, UC_X86_REG_GDTR, UC_X86_REG_GS, UC_X86_REG_IDTR,
                               UC_X86_REG_RIP, UC_X86_REG_RSP, UC_X86_REG_SS, UC_X86_REG_TR)

from x86shadow import layout as L
from x86shadow.asm import assemble_firmware, assemble_program

MiB, GiB = 1 << 20, 1 << 30
EFER = 0xC0000080
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
MARK = 0x600DC0DE
AD = 0x60                       # accessed | dirty: set by the CPU as it walks, not by the firmware

# main: record CS, ESP/RSP at entry, EFLAGS, CR0, then write (index, 0xfeedf00d) into the last
# 8 bytes of every large page of RAM through the firmware's identity map, and return.
MAIN = r"""
main:
.if BITS == 64
    mov rax, rsp
    mov qword ptr [FREE_BASE + 8], rax
    pushfq
    pop rax
    mov qword ptr [FREE_BASE + 16], rax
    mov rax, cr0
    mov qword ptr [FREE_BASE + 24], rax
.else
    mov dword ptr [FREE_BASE + 8], esp
    pushfd
    pop eax
    mov dword ptr [FREE_BASE + 16], eax
    mov eax, cr0
    mov dword ptr [FREE_BASE + 24], eax
.endif
    mov eax, cs
    mov dword ptr [FREE_BASE + 4], eax
    xor ebx, ebx
    mov ecx, RAM_SIZE / LARGE
    xor edx, edx
fill:
.if BITS == 64
    mov dword ptr [rbx + LARGE - 8], edx
    mov dword ptr [rbx + LARGE - 4], 0xfeedf00d
    add rbx, LARGE
.else
    mov dword ptr [ebx + LARGE - 8], edx
    mov dword ptr [ebx + LARGE - 4], 0xfeedf00d
    add ebx, LARGE
.endif
    inc edx
    dec ecx
    jnz fill
    mov dword ptr [FREE_BASE], 0x600dc0de
    ret
"""


def large_page(mode):
    return 4 * MiB if mode == "32" else 2 * MiB


class Booted:
    def __init__(self, mode, ram, tmp_path):
        self.mode, self.ram, self.large = mode, ram, large_page(mode)
        self.fw = assemble_firmware(mode, ram)
        src = tmp_path / f"main_{mode}_{ram >> 20}.asm"
        src.write_text(f"# x86shadow: modes=32,pae,64\n.set LARGE, {self.large}\n" + MAIN)
        prog = assemble_program(src, mode, ram)
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64 if mode == "64" else UC_MODE_32)
        uc.ctl_set_tlb_mode(UC_TLB_CPU)
        uc.mem_map(0, ram)
        uc.mem_write(L.FW_BASE, self.fw)
        uc.mem_write(prog.base, prog.code)
        self.events = []
        uc.hook_add(UC_HOOK_INTR, self._intr)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._invalid)
        if mode == "64":
            # Unicorn's own initial long-mode state: EFER.LME|LMA, CR0 = PE|ET, paging off
            assert uc.reg_read(UC_X86_REG_CR0) & (CR0_PE | CR0_PG) == CR0_PE
            assert uc.msr_read(EFER) & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
            uc.reg_write(UC_X86_REG_RSP, L.STACK_TOP)
        else:
            # 32-bit protected mode, paging off, CR0 = PE|ET, flat boot GDT at FW_GDT
            gdt = struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
            uc.mem_write(L.FW_GDT, gdt)
            uc.reg_write(UC_X86_REG_GDTR, (0, L.FW_GDT, len(gdt) - 1, 0))
            uc.reg_write(UC_X86_REG_CR0, 0x11)
            uc.reg_write(UC_X86_REG_CS, L.SEL_KCODE)
            for r in (UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_SS, UC_X86_REG_FS, UC_X86_REG_GS):
                uc.reg_write(r, L.SEL_KDATA)
            uc.reg_write(UC_X86_REG_ESP, L.STACK_TOP)
        uc.emu_start(L.FW_BASE, 0, count=5_000_000)
        self.pc = uc.reg_read(UC_X86_REG_RIP if mode == "64" else UC_X86_REG_EIP)

    def _intr(self, uc, intno, _ud):
        self.events.append(("intr", intno))
        uc.emu_stop()

    def _invalid(self, uc, _ud):
        self.events.append(("invalid",))
        uc.emu_stop()
        return False

    def u32(self, addr):
        return struct.unpack("<I", self.uc.mem_read(addr, 4))[0]

    def u64(self, addr):
        return struct.unpack("<Q", self.uc.mem_read(addr, 8))[0]

    def reg(self, r):
        return self.uc.reg_read(r)


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fw")
    cache = {}

    def get(mode, ram=128 * MiB):
        if (mode, ram) not in cache:
            cache[(mode, ram)] = Booted(mode, ram, tmp)
        return cache[(mode, ram)]
    yield get
    cache.clear()


MODES = ["32", "pae", "64"]


@pytest.mark.parametrize("mode", MODES)
def test_ends_at_hlt_after_main_returns(booted, mode):
    b = booted(mode)
    assert b.events == []
    # stopped right after the 'cli; hlt' that follows 'call MAIN'
    assert bytes(b.uc.mem_read(b.pc - 2, 2)) == b"\xfa\xf4"
    assert L.FW_BASE < b.pc < L.FW_BASE + len(b.fw)
    call = bytes(b.uc.mem_read(b.pc - 7, 5))
    assert call[0] == 0xE8 and b.pc - 2 + struct.unpack("<i", call[1:])[0] == L.PROG_BASE
    assert b.reg(UC_X86_REG_RSP if mode == "64" else UC_X86_REG_ESP) == L.STACK_TOP


@pytest.mark.parametrize("mode", MODES)
def test_main_ran_at_cpl0_with_paging_and_interrupts_off(booted, mode):
    b = booted(mode)
    assert b.u32(L.FREE_BASE) == MARK
    assert b.u32(L.FREE_BASE + 4) == L.SEL_KCODE                  # CS at main: CPL0
    word = 8 if mode == "64" else 4
    read = b.u64 if mode == "64" else b.u32
    assert read(L.FREE_BASE + 8) == L.STACK_TOP - word           # stack: STACK_TOP, 'call MAIN'
    eflags = read(L.FREE_BASE + 16)
    assert eflags & (1 << 9) == 0 and eflags & (1 << 10) == 0     # IF = DF = 0
    assert (eflags >> 12) & 3 == 0                                # IOPL 0
    assert read(L.FREE_BASE + 24) & (CR0_PG | CR0_WP | CR0_PE) == CR0_PG | CR0_WP | CR0_PE


@pytest.mark.parametrize("mode", MODES)
def test_control_registers(booted, mode):
    b = booted(mode)
    cr0, cr4, efer = b.reg(UC_X86_REG_CR0), b.reg(UC_X86_REG_CR4), b.uc.msr_read(EFER)
    assert cr0 & (CR0_PG | CR0_WP | CR0_PE) == CR0_PG | CR0_WP | CR0_PE
    assert b.reg(UC_X86_REG_CR3) == L.FW_PT_BASE
    if mode == "32":
        assert cr4 & (CR4_PSE | CR4_PAE) == CR4_PSE
        assert efer & (EFER_LME | EFER_LMA) == 0
    else:
        assert cr4 & CR4_PAE
    if mode == "pae":
        assert efer & (EFER_LME | EFER_LMA) == 0
    if mode == "64":
        assert efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert efer & EFER_NXE == 0


@pytest.mark.parametrize("mode", MODES)
def test_segments_and_descriptor_tables(booted, mode):
    b = booted(mode)
    assert b.reg(UC_X86_REG_CS) == L.SEL_KCODE
    for r in (UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_SS, UC_X86_REG_FS, UC_X86_REG_GS):
        assert b.reg(r) == L.SEL_KDATA
    _, gbase, glimit, _ = b.reg(UC_X86_REG_GDTR)
    assert (gbase, glimit) == (L.FW_GDT, 16 * 8 - 1)
    _, ibase, ilimit, _ = b.reg(UC_X86_REG_IDTR)
    gate = 16 if mode == "64" else 8
    assert (ibase, ilimit) == (L.FW_IDT, 256 * gate - 1)
    tsel, tbase, tlimit, _ = b.reg(UC_X86_REG_TR)
    assert (tsel, tbase, tlimit) == (L.SEL_TSS, L.FW_TSS, 0x67)


def desc(b, sel):
    lo, hi = b.u32(L.FW_GDT + sel), b.u32(L.FW_GDT + sel + 4)
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    access = (hi >> 8) & 0xFF
    if access & 0x10:                             # code/data: ignore the CPU-set accessed bit
        access &= ~1
    flags = (hi >> 20) & 0xF                      # G D/B L AVL
    return base, limit, access, flags


@pytest.mark.parametrize("mode", MODES)
def test_gdt_contents(booted, mode):
    b = booted(mode)
    assert b.u64(L.FW_GDT) == 0
    code_flags = 0xA if mode == "64" else 0xC     # 64-bit: G|L ; 32-bit: G|D
    assert desc(b, L.SEL_KCODE) == (0, 0xFFFFF, 0x9A, code_flags)
    assert desc(b, L.SEL_KDATA) == (0, 0xFFFFF, 0x92, 0xC)
    assert desc(b, L.SEL_UCODE & ~3) == (0, 0xFFFFF, 0xFA, code_flags)
    assert desc(b, L.SEL_UDATA & ~3) == (0, 0xFFFFF, 0xF2, 0xC)
    # the TSS descriptor: present, DPL0, busy after 'ltr' (type 0xB)
    assert desc(b, L.SEL_TSS) == (L.FW_TSS, 0x67, 0x8B, 0)
    first_free = L.SEL_TSS + (16 if mode == "64" else 8)
    if mode == "64":
        assert b.u64(L.FW_GDT + L.SEL_TSS + 8) == 0               # base[63:32], reserved
    assert bytes(b.uc.mem_read(L.FW_GDT + first_free, 16 * 8 - first_free)) == \
        bytes(16 * 8 - first_free)


@pytest.mark.parametrize("mode", MODES)
def test_tss(booted, mode):
    b = booted(mode)
    if mode == "64":
        assert b.u64(L.FW_TSS + 4) == L.TSS_STACK_TOP              # RSP0
    else:
        assert b.u32(L.FW_TSS + 4) == L.TSS_STACK_TOP              # ESP0
        assert b.u32(L.FW_TSS + 8) == L.SEL_KDATA                  # SS0
    assert struct.unpack("<H", b.uc.mem_read(L.FW_TSS + 102, 2))[0] == 0x68   # no I/O bitmap


@pytest.mark.parametrize("mode", MODES)
def test_idt_gates_all_point_to_fw_unhandled(booted, mode):
    b = booted(mode)
    size = 16 if mode == "64" else 8
    raw = bytes(b.uc.mem_read(L.FW_IDT, 256 * size))
    for v in range(256):
        g = raw[v * size:(v + 1) * size]
        off_lo, sel, ist, attr, off_mid = struct.unpack("<HHBBH", g[:8])
        offset = off_lo | (off_mid << 16)
        if mode == "64":
            off_hi, reserved = struct.unpack("<II", g[8:])
            offset |= off_hi << 32
            assert reserved == 0
        assert (offset, sel, ist, attr) == (L.FW_UNHANDLED, L.SEL_KCODE, 0, 0x8E), v


def check_page_tables(b):
    n = -(-b.ram // b.large)
    if b.mode == "32":
        pd = [b.u32(L.FW_PT_BASE + 4 * i) for i in range(1024)]
        leaves = pd
    elif b.mode == "pae":
        pdpt = [b.u64(L.FW_PT_BASE + 8 * i) for i in range(4)]
        assert pdpt == [(L.FW_PT_BASE + 0x1000 * (i + 1)) | 1 for i in range(4)]
        leaves = [b.u64(L.FW_PT_BASE + 0x1000 + 8 * i) for i in range(2048)]
    else:
        pml4 = [b.u64(L.FW_PT_BASE + 8 * i) for i in range(512)]
        pdpt_base = L.FW_PT_BASE + 0x1000
        assert pml4[0] & ~AD == pdpt_base | 7 and not any(pml4[1:])
        npd = -(-n // 512)
        pdpt = [b.u64(pdpt_base + 8 * i) for i in range(512)]
        assert [e & ~AD for e in pdpt[:npd]] == \
            [(L.FW_PT_BASE + 0x2000 + 0x1000 * i) | 7 for i in range(npd)]
        assert not any(pdpt[npd:])
        leaves = [b.u64(L.FW_PT_BASE + 0x2000 + 8 * i) for i in range(npd * 512)]
    # every large page of RAM identity-mapped: present, writable, supervisor, page size
    assert [e & ~AD for e in leaves[:n]] == [(i * b.large) | 0x83 for i in range(n)]
    assert not any(leaves[n:])
    # and the guest's writes through the map landed in the same physical frames
    for k in range(b.ram // b.large):
        end = (k + 1) * b.large
        assert (b.u32(end - 8), b.u32(end - 4)) == (k, 0xFEEDF00D), k


@pytest.mark.parametrize("mode", MODES)
def test_identity_map_128m(booted, mode):
    check_page_tables(booted(mode))


@pytest.mark.parametrize("mode,ram", [("32", 4 * GiB), ("pae", 4 * GiB), ("32", 130 * MiB),
                                      ("pae", 1 * GiB + 6 * MiB), ("64", 6 * GiB)])
def test_identity_map_large_and_odd_sizes(booted, mode, ram):
    b = booted(mode, ram)
    assert b.events == [] and b.u32(L.FREE_BASE) == MARK
    check_page_tables(b)


def test_firmware_image_layout():
    for mode in MODES:
        fw = assemble_firmware(mode, 128 * MiB)
        assert fw[0] == 0xE9 and fw[5:16] == b"\x90" * 11          # jmp rel32, nop padding
        start = L.FW_BASE + 5 + struct.unpack("<i", fw[1:5])[0]
        assert start >= L.FW_BASE + 0x14
        assert L.FW_UNHANDLED == L.FW_BASE + 0x10
        assert fw[0x10:0x14] == b"\xfa\xf4\xeb\xfc"                 # cli; hlt; jmp fw_unhandled
