"""Tests for x86shadow.paging: the guest page-table walker.

Three kinds of tests:
- unit tests with hand-built tables and exact expectations (error codes, A/D bits, large pages ...);
- differential tests: the same tables and accesses run on unicorn 2.1.4 with its own MMU
  (UC_TLB_CPU, QEMU's walker) and on our walker; #PF vector, error code, CR2, the value read and
  every byte of guest RAM afterwards (A/D bits, the data written) must agree.  Fixed scenarios
  mirroring the unit tests plus seeded random page tables, for LEGACY, PAE and LONG;
- hypothesis properties of the pure walker.
"""
from __future__ import annotations

import ctypes
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_MODE_32, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn import x86_const as X

from x86shadow.paging import (
    ACC_U, ACC_W, ACC_X, MAXPHYADDR, PFERR_FETCH, PFERR_P, PFERR_RSVD, PFERR_U, PFERR_W, PTE_A, PTE_D,
    PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W, Mode, PagingContext, PdpteError, entry_frame, index_bits,
    load_pdptes, pte_size, rsvd_mask, walk,
)
from x86shadow.memory.ram import PhysMem

P, W, U, A, D, PS, NX = PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_PS, PTE_NX
PWU = P | W | U
R_, W_, X_ = 0, PFERR_W, PFERR_FETCH            # access kinds

from pagetables import DATA_END, HARN_PA, RAM, Tables  # noqa: E402

# =============================================================================================
# unit tests: LEGACY
def test_legacy_translate_and_ad_bits():
    t = Tables(Mode.LEGACY)
    pte = t.map(0x12345000, 0x7000)
    pde = t.slot(0x12345000, 2)
    ctx = t.ctx(wp=True)
    w = walk(t.mem, ctx, 0x12345678, R_)
    assert w.ok and w.gpa == 0x7678 and w.level == 1 and w.page_size == 4096 and w.root_level == 2
    assert w.writable and w.user and not w.nx and not w.dirty
    assert w.pte_access == ACC_X | ACC_W | ACC_U and w.pt_access == ACC_X | ACC_W | ACC_U
    assert t.mem.read32(pde) == t.mem.read32(pde) | A and t.mem.read32(pte) == 0x7000 | PWU | A
    assert w.pte_gpa == [None, pte, pde] and w.ptes[1] == 0x7000 | PWU | A
    assert w.table_gfn == [None, pte >> 12, t.cr3 >> 12]
    w = walk(t.mem, ctx, 0x12345678, W_ | PFERR_U)
    assert w.ok and w.dirty and t.mem.read32(pte) == 0x7000 | PWU | A | D


def test_legacy_not_present_error_codes_and_upper_a_bit():
    t = Tables(Mode.LEGACY)
    ctx = t.ctx(wp=True)
    for acc, err in ((R_, 0), (W_, 2), (R_ | PFERR_U, 4), (W_ | PFERR_U, 6), (X_, 0)):
        w = walk(t.mem, ctx, 0x00400000, acc)
        assert not w.ok and w.vector == 14 and w.error_code == err and w.level == 2 and w.gpa is None
    pte = t.map(0x00400000, 0x5000, leaf=0)          # PT present, pte not present
    w = walk(t.mem, ctx, 0x00400123, W_)
    assert (w.ok, w.error_code, w.level, w.va) == (False, 2, 1, 0x00400123)
    assert t.mem.read32(t.slot(0x00400000, 2)) & A      # QEMU: non-leaf A even though the walk faults
    assert t.mem.read32(pte) == 0x5000


def test_legacy_protection_faults():
    t = Tables(Mode.LEGACY)
    ro_user = t.map(0x1000, 0x5000, leaf=P | U)
    sup = t.map(0x2000, 0x6000, leaf=P | W)
    wp1, wp0 = t.ctx(wp=True), t.ctx(wp=False)
    assert walk(t.mem, wp1, 0x1000, W_).error_code == PFERR_P | PFERR_W
    assert t.mem.read32(ro_user) == 0x5000 | P | U       # leaf untouched on a protection fault
    assert walk(t.mem, wp1, 0x1000, W_ | PFERR_U).error_code == PFERR_P | PFERR_W | PFERR_U
    w = walk(t.mem, wp0, 0x1000, W_)                     # CR0.WP=0: supervisor write ignores R/W
    assert w.ok and w.dirty and not w.writable and t.mem.read32(ro_user) == 0x5000 | P | U | A | D
    assert walk(t.mem, wp0, 0x1000, W_ | PFERR_U).error_code == 7
    assert walk(t.mem, wp1, 0x2000, R_ | PFERR_U).error_code == PFERR_P | PFERR_U
    assert walk(t.mem, wp1, 0x2000, X_ | PFERR_U).error_code == PFERR_P | PFERR_U   # no I/D: no PAE/SMEP
    assert t.mem.read32(sup) == 0x6000 | P | W          # faulting user accesses set no A bit
    # U/S and R/W combine over levels: PDE without U makes every page below supervisor
    t.set(0x2000, 2, t.get(0x2000, 2) & ~U)
    w = walk(t.mem, wp1, 0x1000, R_ | PFERR_U)
    assert w.error_code == PFERR_P | PFERR_U and w.level == 1 and not w.user


def test_legacy_smep():
    t = Tables(Mode.LEGACY)
    t.map(0x1000, 0x5000, leaf=PWU)
    t.map(0x2000, 0x6000, leaf=P | W)
    ctx = t.ctx(wp=True, smep=True)
    assert walk(t.mem, ctx, 0x1000, X_).error_code == PFERR_P | PFERR_FETCH     # SMEP -> I/D set
    assert walk(t.mem, ctx, 0x2000, X_).ok
    assert walk(t.mem, ctx, 0x1000, R_).ok and walk(t.mem, ctx, 0x1000, X_ | PFERR_U).ok
    assert walk(t.mem, ctx, 0x3000, X_).error_code == PFERR_FETCH               # not present + I/D
    assert walk(t.mem, t.ctx(smap=True), 0x1000, R_).error_code == PFERR_P        # SMAP rule (AC=0)
    assert walk(t.mem, t.ctx(smap=True), 0x1000, X_).ok


def test_legacy_4m_pages_pse36():
    t = Tables(Mode.LEGACY)
    pde = t.map(0x00C00000, 0x00400000 | (0x12 << 13), leaf=PWU, level=2)   # PA bits 39:32 = 0x12
    w = walk(t.mem, t.ctx(), 0x00C12345, W_)
    assert w.ok and w.level == 2 and w.page_size == 4 << 20
    assert w.gpa == (0x12 << 32) | 0x00412345
    assert t.mem.read32(pde) == 0x00400000 | (0x12 << 13) | PWU | PS | A | D
    assert entry_frame(Mode.LEGACY, 2, t.mem.read32(pde)) == (0x12 << 32) | 0x400000
    t.mem.write32(pde, 0x00400000 | (1 << 21) | PWU | PS)            # bit 21: reserved
    w = walk(t.mem, t.ctx(), 0x00C00000, R_ | PFERR_U)
    assert w.error_code == PFERR_RSVD | PFERR_P | PFERR_U and w.level == 2
    assert t.mem.read32(pde) & A == 0
    # CR4.PSE=0: PS ignored, the PDE points to a page table
    t.mem.write32(pde, 0x00401000 | PWU | PS)
    t.mem.write32(0x00401000 + 4 * 0x12, 0x9000 | PWU)
    w = walk(t.mem, t.ctx(pse=False), 0x00C12345, R_)
    assert w.ok and w.level == 1 and w.gpa == 0x9345


def test_legacy_va_wraps_at_4g():
    t = Tables(Mode.LEGACY)
    t.map(0x1000, 0x5000)
    w = walk(t.mem, t.ctx(), 0x1_0000_1004, R_)
    assert w.ok and w.gpa == 0x5004 and w.va == 0x1004


# =============================================================================================
# unit tests: PAE
def test_pae_translate_2m_and_pdpte():
    t = Tables(Mode.PAE)
    pte = t.map(0x40001000, 0x5000, leaf=PWU)
    pde = t.slot(0x40001000, 2)
    pdpte = t.slot(0x40001000, 3)
    ctx = t.ctx(nxe=True)
    w = walk(t.mem, ctx, 0x40001010, W_)
    assert w.ok and w.gpa == 0x5010 and w.root_level == 3 and w.pte_access == ACC_X | ACC_W | ACC_U
    assert t.mem.read64(pdpte) == (pde & ~0xFFF) | P          # PDPTE never gets A
    assert t.mem.read64(pde) & A and t.mem.read64(pte) & (A | D) == A | D
    assert w.table_gfn[3] == t.cr3 >> 12 and w.pte_gpa[3] == pdpte
    big = t.map(0x80200000, 0x00200000 | (1 << 12), leaf=PWU, level=2)    # bit 12 = PAT, not address
    w = walk(t.mem, ctx, 0x80212345, R_)
    assert w.ok and w.level == 2 and w.page_size == 2 << 20 and w.gpa == 0x212345
    t.mem.write64(big, 0x00200000 | (1 << 13) | PWU | PS)
    assert walk(t.mem, ctx, 0x80200000, R_).error_code == PFERR_RSVD | PFERR_P


def test_pae_reserved_bits_and_nx():
    t = Tables(Mode.PAE)
    leaf = t.map(0x1000, 0x5000)
    nxe, nonx = t.ctx(nxe=True), t.ctx(nxe=False)
    for bit in (MAXPHYADDR, 51, 52, 62):                 # PAE: bits 62:MAXPHYADDR reserved
        t.mem.write64(leaf, 0x5000 | PWU | (1 << bit))
        assert walk(t.mem, nxe, 0x1000, W_).error_code == PFERR_RSVD | PFERR_P | PFERR_W, bit
    t.mem.write64(leaf, 0x5000 | PWU | (1 << (MAXPHYADDR - 1)))
    w = walk(t.mem, nxe, 0x1000, R_)
    assert w.ok and w.gpa == (1 << (MAXPHYADDR - 1)) | 0x5000
    t.mem.write64(leaf, 0x5000 | PWU | NX)
    w = walk(t.mem, nxe, 0x1000, R_)
    assert w.ok and w.nx and w.pte_access == ACC_W | ACC_U
    assert walk(t.mem, nxe, 0x1000, X_).error_code == PFERR_P | PFERR_FETCH
    assert walk(t.mem, nonx, 0x1000, R_).error_code == PFERR_RSVD | PFERR_P    # NX reserved w/o NXE
    assert walk(t.mem, nonx, 0x1000, X_).error_code == PFERR_RSVD | PFERR_P    # and no I/D bit
    t.mem.write64(leaf, 0x5000 | PWU)
    assert walk(t.mem, nxe, 0x2000, X_ | PFERR_U).error_code == PFERR_FETCH | PFERR_U


def test_pae_pdptes():
    t = Tables(Mode.PAE)
    t.map(0x1000, 0x5000)
    slot = t.slot(0x1000, 3)
    pd = t.mem.read64(slot) & ~0xFFF
    assert walk(t.mem, t.ctx(), 0x40000000, W_).error_code == PFERR_W and \
        walk(t.mem, t.ctx(), 0x40000000, W_).level == 3
    # QEMU ignores the PDPTE's R/W, U/S (and the other bits Intel reserves)
    t.mem.write64(slot, pd | P | 0x1E6)
    w = walk(t.mem, t.ctx(wp=True), 0x1000, W_ | PFERR_U)
    assert w.ok and t.mem.read64(slot) == pd | P | 0x1E6
    with pytest.raises(PdpteError) as ei:
        load_pdptes(t.mem, t.cr3)
    assert ei.value.index == 0
    assert load_pdptes(t.mem, t.cr3, strict=False)[0] == pd | P | 0x1E6
    for bit in (63, 52, MAXPHYADDR):
        t.mem.write64(slot, pd | P | (1 << bit))
        w = walk(t.mem, t.ctx(nxe=True), 0x1000, R_)
        assert w.error_code == PFERR_RSVD | PFERR_P and w.level == 3
    # cached PDPTEs (hardware semantics) win over memory
    t.mem.write64(slot, pd | P)
    pd_list = load_pdptes(t.mem, t.cr3)
    t.mem.write64(slot, 0)
    assert walk(t.mem, t.ctx(pdptes=pd_list), 0x1000, R_).ok
    assert not walk(t.mem, t.ctx(), 0x1000, R_).ok
    # CR3[31:5] addresses the PDPT
    t.mem.write64(t.cr3 + 0x20, pd | P)
    assert walk(t.mem, PagingContext(Mode.PAE, t.cr3 + 0x20), 0x1000, R_).ok


def test_pae_va_wraps_at_4g():
    t = Tables(Mode.PAE)
    t.map(0x1000, 0x5000)
    w = walk(t.mem, t.ctx(), (1 << 32) | 0x1004, R_)
    assert w.ok and w.gpa == 0x5004


# =============================================================================================
# unit tests: LONG
def test_long_translate_ad_all_levels():
    t = Tables(Mode.LONG)
    va = 0x00007F12_3456_7000
    leaf = t.map(va, 0x5000, leaf=PWU)
    slots = [None, leaf] + [t.slot(va, lv) for lv in (2, 3, 4)]
    w = walk(t.mem, t.ctx(nxe=True), va + 0x10, W_ | PFERR_U)
    assert w.ok and w.gpa == 0x5010 and w.root_level == 4 and w.pte_gpa[1:] == slots[1:]
    for lv in (1, 2, 3, 4):
        assert t.mem.read64(slots[lv]) & A
    assert t.mem.read64(leaf) & D and not any(t.mem.read64(slots[lv]) & D for lv in (2, 3, 4))


def test_long_reserved_bits():
    t = Tables(Mode.LONG)
    leaf = t.map(0x1000, 0x5000)
    pml4e = t.slot(0x1000, 4)
    ctx = t.ctx(nxe=True)
    t.mem.write64(leaf, 0x5000 | PWU | (0x7FF << 52))          # bits 62:52 ignored in 4-level
    assert walk(t.mem, ctx, 0x1000, R_).ok
    t.mem.write64(leaf, 0x5000 | PWU | (1 << MAXPHYADDR))
    assert walk(t.mem, ctx, 0x1000, R_).error_code == PFERR_RSVD | PFERR_P
    t.mem.write64(leaf, 0x5000 | PWU)
    e = t.mem.read64(pml4e)
    t.mem.write64(pml4e, e | PS)                                 # PS in a PML4E: reserved
    w = walk(t.mem, ctx, 0x1000, W_)
    assert w.error_code == PFERR_RSVD | PFERR_P | PFERR_W and w.level == 4
    assert t.mem.read64(pml4e) == e | PS                          # no A on a reserved-bit fault


def test_long_1g_pages_and_a_quirk():
    t = Tables(Mode.LONG)
    pdpte = t.map(0x40000000, 0x40000000 | (1 << 12), leaf=P | U, level=3)   # bit 12 = PAT
    ctx = t.ctx(wp=True, nxe=True)
    w = walk(t.mem, ctx, 0x7FFFFFFF, R_)
    assert w.ok and w.level == 3 and w.page_size == 1 << 30 and w.gpa == 0x7FFFFFFF
    t.mem.write64(pdpte, 0x40000000 | P | U | PS)
    w = walk(t.mem, ctx, 0x40000000, W_)                       # protection fault on a 1 GiB leaf ...
    assert w.error_code == PFERR_P | PFERR_W and w.level == 3
    assert t.mem.read64(pdpte) == 0x40000000 | P | U | PS | A   # ... still sets its A bit (QEMU quirk)
    t.mem.write64(pdpte, 0x40000000 | (1 << 13) | PWU | PS)
    w = walk(t.mem, ctx, 0x40000000, R_)
    assert w.error_code == PFERR_RSVD | PFERR_P and t.mem.read64(pdpte) & A


def test_long_non_canonical_is_gp():
    t = Tables(Mode.LONG)
    w = walk(t.mem, t.ctx(), 0x0000800000000000, R_)
    assert not w.ok and w.vector == 13 and w.error_code == 0
    w = walk(t.mem, t.ctx(), 0xFFFF800000000000, R_)
    assert w.vector == 14


def test_long_access_combination():
    t = Tables(Mode.LONG)
    va = 0x1000
    t.map(va, 0x5000, leaf=PWU | NX, upper=P | W | U)
    t.set(va, 3, t.get(va, 3) & ~W)          # one non-leaf level read-only
    w = walk(t.mem, t.ctx(nxe=True), va, R_)
    assert w.ok and not w.writable and w.nx and w.user
    assert w.pte_access == ACC_U and w.pt_access == ACC_U | ACC_X
    t.set(va, 2, t.get(va, 2) | NX)
    w = walk(t.mem, t.ctx(nxe=True), va, R_)
    assert w.pt_access == ACC_U


# =============================================================================================
# general
def test_from_regs_and_helpers():
    c = PagingContext.from_regs(0x80010011, 0x1000, 0x20 | (1 << 20), 0xD00, pdptes=(1, 2, 3, 4))
    assert (c.mode, c.wp, c.smep, c.nxe, c.pdptes) == (Mode.LONG, True, True, True, ())
    c = PagingContext.from_regs(0x80000011, 0x1000, 0x30, 0x800, pdptes=(1, 2, 3, 4))
    assert (c.mode, c.wp, c.pse, c.nxe, c.pdptes) == (Mode.PAE, False, True, True, (1, 2, 3, 4))
    assert PagingContext.from_regs(0x80000011, 0, 0x10, 0).mode == Mode.LEGACY
    assert PagingContext.from_regs(0x11, 0, 0x20, 0x500).mode == Mode.OFF
    assert hash(c) == hash(PagingContext.from_regs(0x80000011, 0x1000, 0x30, 0x800, pdptes=(1, 2, 3, 4)))
    assert MAXPHYADDR == 40
    assert (pte_size(Mode.LEGACY), pte_size(Mode.PAE), pte_size(Mode.LONG)) == (4, 8, 8)
    assert index_bits(Mode.LEGACY, 2) == (22, 0x3FF) and index_bits(Mode.PAE, 3) == (30, 3)
    assert index_bits(Mode.LONG, 4) == (39, 0x1FF) and index_bits(Mode.PAE, 1) == (12, 0x1FF)
    with pytest.raises(ValueError):
        index_bits(Mode.PAE, 4)
    assert entry_frame(Mode.LONG, 3, 0xC0000000 | (1 << 13) | PS | P) == 0xC0000000
    assert entry_frame(Mode.PAE, 2, 0x00203000 | PS | P | NX) == 0x00200000
    assert entry_frame(Mode.PAE, 1, 0x00203000 | PS | P | NX) == 0x00203000
    assert entry_frame(Mode.LEGACY, 2, 0x00403000 | PS | P, pse=False) == 0x00403000
    w = walk(None, PagingContext(Mode.OFF, 0), 0x1_2345_6789, W_ | PFERR_U)
    assert w.ok and w.gpa == 0x23456789 and w.pte_access == ACC_X | ACC_W | ACC_U
    assert walk(None, PagingContext(Mode.OFF, 0, lma=True), 0x1_2345_6789, R_).gpa == 0x1_2345_6789


def test_tables_outside_ram_read_as_zero():
    t = Tables(Mode.LEGACY)
    t.mem.write32(t.cr3, 0x10000000 | PWU)
    w = walk(t.mem, t.ctx(), 0x1000, R_)
    assert (w.ok, w.error_code, w.level) == (False, 0, 1)


def test_set_ad_false_leaves_memory_alone():
    for mode in (Mode.LEGACY, Mode.PAE, Mode.LONG):
        t = Tables(mode)
        t.map(0x1000, 0x5000)
        before = bytes(t.buf)
        w = walk(t.mem, t.ctx(), 0x1000, W_, set_ad=False)
        assert w.ok and not w.dirty and bytes(t.buf) == before


# =============================================================================================
# unicorn harness: runs one access on unicorn's own MMU (UC_TLB_CPU)
HARN_VA = {Mode.LEGACY: 0xFFE00000, Mode.PAE: 0xFFE00000, Mode.LONG: 0xFFFFFFFFFFE00000}
HARN_PT = HARN_PA + 0x10000
CR0_PE, CR0_ET, CR0_WP, CR0_PG = 1, 0x10, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_SMEP = 0x10, 0x20, 1 << 20
EFER_LME, EFER_LMA, EFER_NXE = 0x100, 0x400, 0x800
OFF_READ, OFF_WRITE, OFF_FETCH = 0x100, 0x200, 0x300


def _seg(base, limit, access, flags):
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((access & 0xFF) << 40)
            | (((limit >> 16) & 0xF) << 48) | ((flags & 0xF) << 52) | (((base >> 24) & 0xFF) << 56))


# machine code of the harness stubs (fixed addresses, so assembled once, here by hand):
#   +0x000 (kernel page) enter CPL3 at rSI: push ss/sp/flags/cs/ip; iret
#   +0x100 read: mov eax/rax, [ebx/rbx]; hlt      +0x200 write: mov [ebx/rbx], ecx/rcx; hlt
#   +0x300 fetch: jmp ebx/rbx
_ENTER32 = bytes.fromhex("6a23") + b"\x68" + struct.pack("<I", 0xFFE03800) + bytes.fromhex("9c6a1b56cf")
_ENTER64 = (bytes.fromhex("6a23") + b"\x48\xb8" + struct.pack("<Q", 0xFFFFFFFFFFE03800)
            + bytes.fromhex("509c6a1b5648cf"))
_ACC32 = {OFF_READ: bytes.fromhex("8b03f4"), OFF_WRITE: bytes.fromhex("890bf4"), OFF_FETCH: bytes.fromhex("ffe3")}
_ACC64 = {OFF_READ: bytes.fromhex("488b03f4"), OFF_WRITE: bytes.fromhex("48890bf4"), OFF_FETCH: bytes.fromhex("ffe3")}


def install_harness(t: Tables):
    """Harness pages at HARN_VA (PDE 1023 / PDPTE 3 / PML4E 511 of the tables under test):
    +0 kernel code (supervisor), +0x1000 user code, +0x2000 GDT, +0x3000 kernel stack.
    Entries have A (and D) preset so the harness's own accesses change no byte of the tables."""
    mem, mode, cr3 = t.mem, t.mode, t.cr3
    t.shadow = None
    up = PWU | A | D
    pages = [(HARN_PA, P | W | A | D), (HARN_PA + 0x1000, up), (HARN_PA + 0x2000, P | W | A | D),
             (HARN_PA + 0x3000, P | W | A | D)]
    if mode == Mode.LEGACY:
        mem.write32(cr3 + 4 * 1023, HARN_PT | up)
        for i, (pa, fl) in enumerate(pages):
            mem.write32(HARN_PT + 4 * (512 + i), pa | fl)
    elif mode == Mode.PAE:
        mem.write64(cr3 + 8 * 3, HARN_PT | P)
        mem.write64(HARN_PT + 8 * 511, (HARN_PT + 0x1000) | up)
        for i, (pa, fl) in enumerate(pages):
            mem.write64(HARN_PT + 0x1000 + 8 * i, pa | fl)
    else:
        mem.write64(cr3 + 8 * 511, HARN_PT | up)
        mem.write64(HARN_PT + 8 * 511, (HARN_PT + 0x1000) | up)
        mem.write64(HARN_PT + 0x1000 + 8 * 511, (HARN_PT + 0x2000) | up)
        for i, (pa, fl) in enumerate(pages):
            mem.write64(HARN_PT + 0x2000 + 8 * i, pa | fl)
    if mode == Mode.LONG:
        gdt = [0, _seg(0, 0xFFFFF, 0x9B, 0xA), _seg(0, 0xFFFFF, 0x93, 0xC),
               _seg(0, 0xFFFFF, 0xFB, 0xA), _seg(0, 0xFFFFF, 0xF3, 0xC)]
        enter, acc = _ENTER64, _ACC64
    else:
        gdt = [0, _seg(0, 0xFFFFF, 0x9B, 0xC), _seg(0, 0xFFFFF, 0x93, 0xC),
               _seg(0, 0xFFFFF, 0xFB, 0xC), _seg(0, 0xFFFFF, 0xF3, 0xC)]
        enter, acc = _ENTER32, _ACC32
    for i, d in enumerate(gdt):
        mem.write64(HARN_PA + 0x2000 + 8 * i, d)
    mem.write(HARN_PA, enter)
    for off, code in acc.items():
        mem.write(HARN_PA + off, code)
        mem.write(HARN_PA + 0x1000 + off, code)


_CTX_HDR = 40          # sizeof(struct uc_context) header before the CPUX86State copy
_err_off = []


def _error_code_offset():
    """offsetof(CPUX86State, error_code) in a saved context, found empirically from two #GPs with
    known selector error codes (as a probe of Unicorn measured them)."""
    if _err_off:
        return _err_off[0]
    cands = None
    for sel in (0x48, 0x50, 0x58):
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        uc.mem_map(0, 0x10000)
        uc.mem_write(0x1000, bytes.fromhex("66b8") + struct.pack("<H", sel) + bytes.fromhex("8ed890"))
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x2000, 0x17, 0))
        uc.reg_write(X.UC_X86_REG_CR0, 0x11)
        got = []
        uc.hook_add(UC_HOOK_INTR, lambda uc, n, ud: (got.append(bytes(uc.context_save())), uc.emu_stop()))
        uc.emu_start(0x1000, 0)
        raw = got[0][_CTX_HDR:]
        offs = {o for o in range(256, len(raw) - 4, 4) if struct.unpack_from("<I", raw, o)[0] == sel}
        cands = offs if cands is None else cands & offs
    assert len(cands) == 1, cands
    _err_off.append(_CTX_HDR + cands.pop())
    return _err_off[0]


class UcResult:
    __slots__ = ("kind", "err", "cr2", "value", "vector")

    def __init__(self, kind, err=0, cr2=0, value=None, vector=0):
        self.kind, self.err, self.cr2, self.value, self.vector = kind, err, cr2, value, vector

    def __repr__(self):
        return "UcResult(%s err=%#x cr2=%#x value=%s vector=%d)" % (
            self.kind, self.err, self.cr2, None if self.value is None else hex(self.value), self.vector)


def uc_access(buf: bytearray, mode: Mode, cr3: int, va: int, access: int, *, wp=False, pse=False, smep=False,
              nxe=False) -> UcResult:
    """One access on unicorn, CPU state from scratch (fresh Uc, empty TLB), RAM = buf (shared, so
    the A/D bits and the data unicorn writes land in buf).  kind: 'pf' | 'gp' | 'ok' | 'unmapped'."""
    long = mode == Mode.LONG
    uc = Uc(UC_ARCH_X86, UC_MODE_64 if long else UC_MODE_32)
    cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
    uc.mem_map_ptr(0, len(buf), UC_PROT_ALL, ctypes.addressof(cbuf))
    hva = HARN_VA[mode]
    efer = EFER_NXE if nxe else 0
    cr4 = (CR4_PSE if pse else 0) | (CR4_SMEP if smep else 0) | (CR4_PAE if mode != Mode.LEGACY else 0)
    uc.msr_write(0xC0000080, efer | (EFER_LME | EFER_LMA if long else 0))
    uc.reg_write(X.UC_X86_REG_CR4, cr4)
    uc.reg_write(X.UC_X86_REG_CR3, cr3)
    uc.reg_write(X.UC_X86_REG_CR0, CR0_PG | CR0_PE | CR0_ET | (CR0_WP if wp else 0))
    uc.reg_write(X.UC_X86_REG_GDTR, (0, hva + 0x2000, 5 * 8 - 1, 0))
    if long:
        rip, rbx, rcx, rsi, rax, rsp = (X.UC_X86_REG_RIP, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RSI,
                                        X.UC_X86_REG_RAX, X.UC_X86_REG_RSP)
        store = 0xF4F4F4F4F4F4F4F4
    else:
        uc.reg_write(X.UC_X86_REG_CS, 0x08)
        for rg in (X.UC_X86_REG_SS, X.UC_X86_REG_DS, X.UC_X86_REG_ES):
            uc.reg_write(rg, 0x10)
        rip, rbx, rcx, rsi, rax, rsp = (X.UC_X86_REG_EIP, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_ESI,
                                        X.UC_X86_REG_EAX, X.UC_X86_REG_ESP)
        store = 0xF4F4F4F4
    uc.reg_write(rsp, hva + 0x3F00)
    off = OFF_WRITE if access & PFERR_W else OFF_FETCH if access & PFERR_FETCH else OFF_READ
    user = bool(access & PFERR_U)
    insn = hva + (0x1000 if user else 0) + off
    uc.reg_write(rbx, va)
    uc.reg_write(rcx, store)
    uc.reg_write(rsi, insn)
    seen = []
    err_off = _error_code_offset()

    def intr(uc, n, ud):
        seen.append((n, uc.reg_read(rip), uc.reg_read(X.UC_X86_REG_CR2),
                     struct.unpack_from("<I", bytes(uc.context_save()), err_off)[0]))
        uc.emu_stop()
    uc.hook_add(UC_HOOK_INTR, intr)
    fetched = []
    if off == OFF_FETCH:
        # the fetch translated: stop before executing whatever is there
        uc.hook_add(UC_HOOK_CODE, lambda uc, a, n, ud: (fetched.append(a), uc.emu_stop()), begin=va, end=va)
    try:
        uc.emu_start(hva if user else insn, 0, count=50)
    except UcError:
        return UcResult("unmapped")
    if fetched:
        return UcResult("ok")
    if seen:
        n, pc, cr2, err = seen[0]
        if n == 14:
            return UcResult("pf", err, cr2, vector=14)
        # #GP: from the access itself (non-canonical) or from the hlt/target reached at CPL3
        if n == 13 and pc == insn and not access & PFERR_FETCH:
            return UcResult("gp", err, vector=13)
        assert n == 13 and user, seen
    return UcResult("ok", value=uc.reg_read(rax) if off == OFF_READ else None)


def check_same(t: Tables, ctx: PagingContext, va: int, access: int, label=""):
    """Run the access on unicorn (on t.buf) and on our walker (on t.shadow, a copy of t.buf made
    after the last change to the tables), then compare the outcome and all of RAM below the
    harness.  Accesses chain: A/D bits accumulate.  Returns the walk."""
    if t.shadow is None:
        t.shadow = PhysMem(bytearray(t.buf))
    mine = t.shadow
    if access & PFERR_FETCH:
        # QEMU decodes a whole block at translation time: a fetch landing on non-code bytes (page
        # tables) may fault on a *later* page before the first instruction runs.  Such targets are
        # read instead (the walk is the same except for the I/D and NX/SMEP rules).
        dry = walk(mine, ctx, va, access, set_ad=False)
        if dry.ok and DATA_END <= dry.gpa < RAM:
            access &= ~PFERR_FETCH
    uc = uc_access(t.buf, t.mode, ctx.cr3, va, access, wp=ctx.wp, pse=ctx.pse, smep=ctx.smep, nxe=ctx.nxe)
    w = walk(mine, ctx, va, access)
    what = "%s %s va=%#x acc=%#x uc=%r ours=%r" % (label, t.mode.name, va, access, uc, w)
    if uc.kind == "pf":
        assert not w.ok and w.vector == 14, what
        assert w.error_code == uc.err and w.va == uc.cr2, what
    elif uc.kind == "gp":
        assert not w.ok and w.vector == 13, what
    else:
        assert w.ok, what
        esz = 8 if t.mode == Mode.LONG else 4
        if uc.kind == "unmapped":
            assert w.gpa + esz > RAM, what
        else:
            assert w.gpa + esz <= RAM, what
            if access & PFERR_W:
                mine.write_uint(w.gpa, esz, 0xF4F4F4F4F4F4F4F4)
            elif not access & PFERR_FETCH:
                assert uc.value == mine.read_uint(w.gpa, esz), what
    stack = slice(HARN_PA + 0x3000, HARN_PA + 0x4000)      # the only harness page unicorn writes
    mine.buf[stack] = t.buf[stack]
    if mine.buf != t.buf:
        diff = [hex(a) for a in range(0, RAM, 4) if mine.mv[a:a + 4] != t.buf[a:a + 4]][:8]
        t.shadow = None
        raise AssertionError("RAM differs at %s: %s" % (diff, what))
    return w


ACCESSES = [R_, W_, X_, R_ | PFERR_U, W_ | PFERR_U, X_ | PFERR_U]


def _run_all(t, ctx, vas, label):
    """Every access kind on every va, chained (A/D bits accumulate), compared with unicorn."""
    install_harness(t)
    for va in vas:
        for acc in ACCESSES:
            check_same(t, ctx, va | (2 if acc & PFERR_FETCH else 0), acc, label)


# ---- fixed differential scenarios, one per mode, covering the unit tests' rules
def test_differential_legacy_fixed():
    for wp, smep, pse in ((True, False, True), (False, True, True), (True, True, False)):
        t = Tables(Mode.LEGACY)
        t.map(0x00001000, 0x5000, leaf=PWU)
        t.map(0x00002000, 0x6000, leaf=P | U)
        t.map(0x00003000, 0x7000, leaf=P | W)
        t.map(0x00004000, 0x8000, leaf=0)
        t.map(0x00005000, 0x9000 | 0x180, leaf=PWU)              # PAT + G bits: no effect
        t.map(0x00C00000, 0x00000000, leaf=PWU, level=2)       # 4 MiB page
        t.map(0x01000000, 0x00400000 | (1 << 21), leaf=PWU, level=2)   # reserved bit 21
        t.map(0x01400000, 0x00400000 | (3 << 13), leaf=PWU, level=2)   # PSE-36: beyond RAM
        t.map(0x01800000, 0x0A000, leaf=P | W, upper=P | W)     # supervisor PDE
        t.map(0x01C00000, 0x0B000, leaf=PWU, upper=P | U)       # read-only PDE
        vas = [0x1000, 0x2004, 0x3008, 0x4000, 0x5000, 0x00C12344, 0x01000000, 0x01412340, 0x01800000,
               0x01C00010, 0x02000000]
        _run_all(t, t.ctx(wp=wp, smep=smep, pse=pse), vas, "wp=%d smep=%d pse=%d" % (wp, smep, pse))


def test_differential_pae_fixed():
    for wp, smep, nxe in ((True, False, True), (False, True, False), (True, True, True)):
        t = Tables(Mode.PAE)
        t.map(0x00001000, 0x5000, leaf=PWU)
        t.map(0x00002000, 0x6000, leaf=P | U | NX)
        t.map(0x00003000, 0x7000, leaf=P | W)
        t.map(0x00004000, 0x8000 | (1 << 52), leaf=PWU)              # bits 62:52 reserved in PAE
        t.map(0x00005000, 0x9000 | (1 << MAXPHYADDR), leaf=PWU)
        t.map(0x00006000, (1 << (MAXPHYADDR - 1)) | 0x9000, leaf=PWU)  # beyond RAM, not reserved
        t.map(0x00200000, 0x00200000 | (1 << 12), leaf=PWU, level=2)   # 2 MiB page, PAT bit
        t.map(0x00400000, 0x00200000 | (1 << 13), leaf=PWU, level=2)   # reserved bit 13
        t.map(0x00600000, 0x00200000, leaf=PWU | NX, level=2)
        t.map(0x40001000, 0xA000, leaf=PWU)
        t.set(0x40001000, 3, t.get(0x40001000, 3) | 0x1E6)              # PDPTE bits QEMU ignores
        t.map(0x80001000, 0xB000, leaf=PWU)
        t.set(0x80001000, 3, t.get(0x80001000, 3) | (1 << 63))          # PDPTE NX: reserved
        vas = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x00212344, 0x00400000, 0x00600000,
               0x40001000, 0x80001000, 0x00800000]
        _run_all(t, t.ctx(wp=wp, smep=smep, nxe=nxe), vas, "wp=%d smep=%d nxe=%d" % (wp, smep, nxe))


def test_differential_long_fixed():
    for wp, smep, nxe in ((True, False, True), (False, True, False), (True, True, True)):
        t = Tables(Mode.LONG)
        t.map(0x00001000, 0x5000, leaf=PWU)
        t.map(0x00002000, 0x6000, leaf=P | U | NX)
        t.map(0x00003000, 0x7000, leaf=P | W)
        t.map(0x00004000, 0x8000 | (0x7FF << 52), leaf=PWU)          # ignored in 4-level
        t.map(0x00005000, 0x9000 | (1 << 51), leaf=PWU)
        t.map(0x00200000, 0x00200000, leaf=PWU, level=2)
        t.map(0x00400000, 0x00200000 | (1 << 20), leaf=PWU, level=2)
        t.map(0x40000000, 0x00000000 | (1 << 12), leaf=PWU, level=3)   # 1 GiB page
        t.map(0x80000000, 0x00000000, leaf=P | U, level=3)             # 1 GiB read-only
        t.map(0xC0000000, 0x00000000 | (1 << 29), leaf=PWU, level=3)   # reserved bit 29
        t.map(0x0000_0080_0000_1000, 0xA000, leaf=PWU)
        t.set(0x0000_0080_0000_1000, 4, t.get(0x0000_0080_0000_1000, 4) | PS)    # PS in a PML4E
        t.map(0xFFFF_8000_0000_1000, 0xB000, leaf=PWU, upper=P | W)
        vas = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x00212344, 0x00400000, 0x40012344, 0x80000000,
               0xC0000000, 0x0000_0080_0000_1000, 0xFFFF_8000_0000_1000, 0x0000_7FFF_FFFF_F000]
        _run_all(t, t.ctx(wp=wp, smep=smep, nxe=nxe), vas, "wp=%d smep=%d nxe=%d" % (wp, smep, nxe))
        check_same(t, t.ctx(nxe=nxe), 0x0000_8000_0000_0000, R_, "non-canonical")
        check_same(t, t.ctx(nxe=nxe), 0x0000_8000_0000_0000, W_ | PFERR_U, "non-canonical")


def test_differential_quirks():
    """The QEMU rules the walker reproduces, each checked on a fresh table against unicorn."""
    def fresh(mode, va, pa, leaf, level=1, **kw):
        t = Tables(mode)
        t.map(va, pa, leaf=leaf, level=level, **kw)
        install_harness(t)
        return t
    # upper-level A is set although the walk faults (leaf not present / protection / reserved bit)
    for mode in (Mode.LEGACY, Mode.PAE, Mode.LONG):
        for leaf, acc in ((0, R_), (P | U, W_), (P | W, R_ | PFERR_U)):
            t = fresh(mode, 0x1000, 0x5000, leaf)
            w = check_same(t, t.ctx(wp=True), 0x1000, acc, "upper A")
            assert not w.ok and t.get(0x1000, 2) & A and not t.get(0x1000, 1) & A
    t = fresh(Mode.LONG, 0x1000, 0x5000 | (1 << MAXPHYADDR), PWU)
    assert check_same(t, t.ctx(), 0x1000, R_).error_code == PFERR_RSVD | PFERR_P and t.get(0x1000, 2) & A
    # 2 MiB leaf: no A on a protection fault; 1 GiB leaf: A set anyway (protection and reserved bit)
    t = fresh(Mode.LONG, 0x00200000, 0x00200000, P | U, level=2)
    check_same(t, t.ctx(wp=True), 0x00200000, W_)
    assert not t.get(0x00200000, 2) & A
    t = fresh(Mode.LONG, 0x40000000, 0, P | U, level=3)
    assert check_same(t, t.ctx(wp=True), 0x40000000, W_).error_code == PFERR_P | PFERR_W
    assert t.get(0x40000000, 3) & A
    t = fresh(Mode.LONG, 0x40000000, 1 << 13, PWU, level=3)
    assert check_same(t, t.ctx(), 0x40000000, R_).error_code == PFERR_RSVD | PFERR_P
    assert t.get(0x40000000, 3) & A
    # I/D bit: only with (NXE and PAE paging) or SMEP
    for mode, nxe, smep, err in ((Mode.LEGACY, True, False, 0), (Mode.LEGACY, False, True, PFERR_FETCH),
                                 (Mode.PAE, False, False, 0), (Mode.PAE, True, False, PFERR_FETCH),
                                 (Mode.LONG, False, False, 0), (Mode.LONG, True, False, PFERR_FETCH),
                                 (Mode.LONG, False, True, PFERR_FETCH)):
        t = fresh(mode, 0x1000, 0x5000, 0)
        assert check_same(t, t.ctx(nxe=nxe, smep=smep), 0x1002, X_).error_code == err
    # PAE PDPTE: bits Intel reserves are ignored, never an A bit, bit 63 -> RSVD
    t = fresh(Mode.PAE, 0x1000, 0x5000, PWU)
    t.set(0x1000, 3, t.get(0x1000, 3) | 0x1E6)
    install_harness(t)
    assert check_same(t, t.ctx(wp=True), 0x1000, W_ | PFERR_U).ok and t.get(0x1000, 3) & 0xFFF == 0x1E7
    t.set(0x1000, 3, t.get(0x1000, 3) | (1 << 63))
    install_harness(t)
    assert check_same(t, t.ctx(nxe=True), 0x1000, R_).error_code == PFERR_RSVD | PFERR_P


# ---- random differential scenarios (seeded, deterministic)
_LEAF_FRAMES = [0x5000, 0x6000, 0x0, 0x200000, 0x3FF000, 0x7000_0000, 0xFF_FFFF_F000]
_EXTRA = {Mode.LEGACY: [0x100, 0x80, 0x18, 1 << 21, 1 << 13, 1 << 20, 0x800],
          Mode.PAE: [NX, 1 << 52, 1 << 62, 1 << MAXPHYADDR, 1 << 13, 1 << 12, 0x100, 1 << 20, 0x800],
          Mode.LONG: [NX, 1 << 52, 1 << 62, 1 << MAXPHYADDR, 1 << 51, 1 << 13, 1 << 12, 1 << 29, 0x100]}


def _random_entry(rng, mode, low):
    e = low
    e |= P if rng.random() < 0.9 else 0
    for bit in (W, U, A, D):
        if rng.random() < 0.7:
            e |= bit
    if rng.random() < 0.15:
        e |= rng.choice(_EXTRA[mode])
    if mode == Mode.LEGACY:
        e &= 0xFFFFFFFF
    return e


def _random_scenario(rng, mode):
    t = Tables(mode)
    root = int(mode)
    # va pieces from small pools so that paths share tables
    if mode == Mode.LEGACY:
        idx = {2: [0, 1, 3, 1022], 1: [0, 1, 1023]}
    elif mode == Mode.PAE:
        idx = {3: [0, 1, 2], 2: [0, 5, 511], 1: [0, 1, 511]}
    else:
        idx = {4: [0, 1, 256, 510], 3: [0, 1, 511], 2: [0, 7], 1: [0, 1, 511]}
    vas, slots = [], {}
    for _ in range(rng.randint(3, 6)):
        va = 0
        for lv in range(root, 0, -1):
            shift, _ = index_bits(mode, lv)
            va |= rng.choice(idx[lv]) << shift
        if mode == Mode.LONG and va >> 47:
            va |= 0xFFFF << 48
        leaf_level = 1
        r = rng.random()
        if r < 0.2:
            leaf_level = 2
        elif r < 0.3 and mode == Mode.LONG:
            leaf_level = 3
        frame = rng.choice(_LEAF_FRAMES)
        if leaf_level > 1:
            frame &= ~((1 << (22 if mode == Mode.LEGACY else 21 if leaf_level == 2 else 30)) - 1)
        if mode == Mode.LEGACY:
            frame &= 0xFFFFFFFF
        t.map(va, frame, leaf=0, level=leaf_level)
        for lv in range(root, leaf_level - 1, -1):
            slots[t.slot(va, lv)] = lv
        vas.append(va)
    # then give every entry on the paths random flags (address bits kept, a few extra bits)
    for slot, lv in slots.items():
        old = t.rd(slot)
        if old & PS or lv == 1:                        # a leaf
            t.wr(slot, _random_entry(rng, mode, old & ~0xFFF | (old & PS)))
        elif mode == Mode.PAE and lv == 3:
            if rng.random() < 0.2:
                t.wr(slot, old | rng.choice([2, 4, 0x20, 0x100, 1 << 63, 1 << 45]))
            elif rng.random() < 0.05:
                t.wr(slot, old & ~P)
        else:
            e = _random_entry(rng, mode, old & ~0xFFF)
            if lv in (2, 3) and rng.random() < 0.05:
                e |= PS
            t.wr(slot, e)
    ctx = t.ctx(wp=rng.random() < 0.6, smep=rng.random() < 0.4, nxe=rng.random() < 0.7,
                **({"pse": rng.random() < 0.8} if mode == Mode.LEGACY else {}))
    return t, ctx, vas


def _random_campaign(mode, seed, scenarios, accesses):
    rng = random.Random(seed)
    n = 0
    for scenario in range(scenarios):
        t, ctx, vas = _random_scenario(rng, mode)
        install_harness(t)
        for _ in range(accesses):
            va = rng.choice(vas)
            acc = rng.choice(ACCESSES)
            off = rng.randrange(0, 0xFF8, 4) | (2 if acc & PFERR_FETCH else 0)     # no page crossing
            check_same(t, ctx, va | off, acc, "seed %#x scenario %d" % (seed, scenario))
            n += 1
    return n


@pytest.mark.parametrize("mode", [Mode.LEGACY, Mode.PAE, Mode.LONG])
def test_differential_random(mode):
    assert _random_campaign(mode, 0x5EED + int(mode), 30, 20) == 30 * 20


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.LEGACY, Mode.PAE, Mode.LONG])
def test_differential_random_sweep(mode):
    """20k more accesses per mode (about 30 s each): pytest -m slow tests/test_paging.py"""
    for seed in range(1, 5):
        _random_campaign(mode, seed * 1000 + int(mode), 250, 20)


# =============================================================================================
# hypothesis: properties of the pure walker over random tables
_entry = st.builds(lambda p, w, u, a, d, ps, extra: p | w | u | a | d | ps | extra,
                   st.sampled_from([0, P, P, P]), st.sampled_from([0, W]), st.sampled_from([0, U]),
                   st.sampled_from([0, A]), st.sampled_from([0, D]), st.sampled_from([0, 0, 0, PS]),
                   st.sampled_from([0, 0, 0, NX, 1 << 52, 1 << MAXPHYADDR, 1 << 13, 1 << 21]))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from([Mode.LEGACY, Mode.PAE, Mode.LONG]), flags=st.lists(_entry, min_size=4, max_size=4),
       access=st.sampled_from(ACCESSES), wp=st.booleans(), nxe=st.booleans(), smep=st.booleans(),
       off=st.integers(0, 0xFFF))
def test_walker_properties(mode, flags, access, wp, nxe, smep, off):
    base = 0x1000                # tables at 0x1000.. (one per level), leaves point to 0x5000 / 0x200000
    buf = bytearray(0x8000)
    mem = PhysMem(buf)
    esz = pte_size(mode)
    cr3 = base
    va = 0x00403000 | off        # indices: LEGACY 1/3, 8-byte 2/3
    table = cr3
    root = int(mode)
    for i, lv in enumerate(range(root, 0, -1)):
        shift, mask = index_bits(mode, lv)
        slot = table + ((va >> shift) & mask) * esz
        nxt = base + 0x1000 * (i + 1)
        e = flags[i]
        if mode == Mode.PAE and lv == 3:
            e &= ~(W | U | A | D | PS)
        low = nxt if lv > 1 else 0x5000
        if e & PS and lv in (2, 3) and not (mode == Mode.PAE and lv == 3):
            low = 0x200000 if lv == 2 else 0
        e |= low
        if esz == 4:
            e &= 0xFFFFFFFF
            mem.write32(slot, e)
        else:
            mem.write64(slot, e)
        table = nxt
    ctx = PagingContext(mode, cr3, wp=wp, pse=True, smep=smep, nxe=nxe)
    before = bytes(buf)
    dry = walk(mem, ctx, va, access, set_ad=False)
    assert bytes(buf) == before
    w = walk(mem, ctx, va, access)
    assert (w.ok, w.error_code, w.vector, w.gpa, w.level) == (dry.ok, dry.error_code, dry.vector, dry.gpa,
                                                                 dry.level)
    # the walk changed nothing but A bits, plus D in the leaf of a successful write
    after = bytes(buf)
    for a in (a for a in range(0, len(buf), 4) if before[a:a + 4] != after[a:a + 4]):
        o, n = struct.unpack_from("<I", before, a)[0], struct.unpack_from("<I", after, a)[0]
        assert n == o | (n ^ o) and (n ^ o) & ~(A | D) == 0, hex(a)
        if (n ^ o) & D:
            assert w.ok and access & PFERR_W and a == w.pte_gpa[w.level]
    if not w.ok:
        assert w.error_code & (PFERR_W | PFERR_U) == access & (PFERR_W | PFERR_U)
        assert bool(w.error_code & PFERR_FETCH) == bool(access & PFERR_FETCH and (smep or (nxe and mode >= Mode.PAE)))
        if w.error_code & PFERR_RSVD:
            assert w.error_code & PFERR_P
    else:
        assert w.gpa & 0xFFF == off and w.ptes[w.level] & A
        assert w.dirty == bool(access & PFERR_W or w.ptes[w.level] & D)
        assert bool(w.pte_access & ACC_X) == (not w.nx)
        if access & PFERR_U:
            assert w.user
        if access & PFERR_W and (wp or access & PFERR_U):
            assert w.writable
        # every non-leaf entry walked has A now
        for lv in range(w.level + 1, root + 1):
            if not (mode == Mode.PAE and lv == 3):
                assert w.ptes[lv] & A
        # a second walk finds nothing left to update
        w2 = walk(mem, ctx, va, access)
        assert w2.ok and w2.gpa == w.gpa and bytes(buf) == after


@pytest.mark.parametrize("mode", [Mode.LEGACY, Mode.PAE, Mode.LONG])
@pytest.mark.parametrize("nxe", [False, True])
@pytest.mark.parametrize("maxphyaddr", [36, 40, 46, 52])
def test_context_pte_rsvd_is_the_4k_pte_mask(mode, nxe, maxphyaddr):
    # PagingContext.pte_rsvd (what FNAME(prefetch_invalid_gpte) checks, precomputed once per
    # context) must be rsvd_mask(mode, 1, nxe): 0 for 2-level ptes, NX without EFER.NXE, the
    # address bits above MAXPHYADDR
    pdptes = (1, 1, 1, 1) if mode == Mode.PAE else ()
    ctx = PagingContext(mode, 0x1000, nxe=nxe, maxphyaddr=maxphyaddr, pdptes=pdptes)
    assert ctx.pte_rsvd == rsvd_mask(mode, 1, nxe, maxphyaddr=maxphyaddr)
    if mode == Mode.LEGACY:
        assert ctx.pte_rsvd == 0
    else:
        assert bool(ctx.pte_rsvd & PTE_NX) == (not nxe)
