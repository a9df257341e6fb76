"""x86shadow.emulate.decode: instruction classes, sizes, addresses and the KVM/Xen alignment rules.

Instructions are assembled with keystone (32- and 64-bit).  Where an expected encoding is given
the test also checks keystone produced exactly that encoding (keystone has mis-encodings, and
the KVM set is defined per opcode), and a few encodings keystone cannot produce are given as
raw bytes (``bytes.fromhex``).
"""

from __future__ import annotations

import keystone
import pytest

from x86shadow.emulate import (
    MemOperand,
    decode,
    decode_cache_info,
    is_zero_write,
    misaligned_kvm,
    misaligned_kvm2008,
    unaligned_xen,
)

_KS = {
    32: keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32),
    64: keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64),
}
ADDR = 0x0040_1000


def asm(src: str | bytes, bits: int, addr: int = ADDR) -> bytes:
    if isinstance(src, bytes):
        return src
    enc, _ = _KS[bits].asm(src, addr)
    return bytes(enc)


def dec(src: str | bytes, bits: int = 32, addr: int = ADDR, expect_hex: str | None = None):
    code = asm(src, bits, addr)
    if expect_hex is not None:
        assert code.hex() == expect_hex, f"keystone encoded {src!r} as {code.hex()}"
    d = decode(code + b"\x90" * 4, addr, bits)   # trailing bytes must not matter
    assert d is not None, src
    assert d.bytes == code and d.size == len(code)
    return d


def raw(h: str) -> bytes:
    return bytes.fromhex(h)


# ---------------------------------------------------------------------------------------------
# KVM PageTable set: every encoding form of every member (emulate.c opcode tables)

KVM_MEMBERS = [
    # (source, bits, expected encoding, kvm_class)
    ("or byte ptr [eax], cl", 32, "0808", "or"),
    ("or dword ptr [eax], ecx", 32, "0908", "or"),
    ("or byte ptr [eax], 1", 32, "800801", "or"),                       # group1 80 /1
    ("or dword ptr [eax], 0x100", 32, "810800010000", "or"),            # group1 81 /1
    ("or dword ptr [eax], 1", 32, "830801", "or"),                      # group1 83 /1
    (raw("820801"), 32, "820801", "or"),                                # group1 82 /1 (No64)
    ("lock or dword ptr [eax], 0x20", 32, "f0830820", "or"),
    ("lock or qword ptr [rax], rcx", 64, "f0480908", "or"),
    ("and byte ptr [eax], cl", 32, "2008", "and"),
    ("and dword ptr [eax], ecx", 32, "2108", "and"),
    ("and byte ptr [eax], 0xdf", 32, "8020df", "and"),                  # group1 80 /4
    ("and dword ptr [eax], 0x7fffffff", 32, "8120ffffff7f", "and"),     # group1 81 /4
    ("and dword ptr [eax], 0xffffffdf", 32, "8320df", "and"),           # group1 83 /4
    (raw("8220df"), 32, "8220df", "and"),                               # group1 82 /4
    ("and qword ptr [rax], -0x21", 64, "488320df", "and"),
    ("xchg byte ptr [eax], cl", 32, "8608", "xchg"),
    ("xchg dword ptr [eax], ecx", 32, "8708", "xchg"),
    ("xchg ecx, dword ptr [eax]", 32, "8708", "xchg"),
    ("xchg qword ptr [rax], rcx", 64, "488708", "xchg"),
    ("mov byte ptr [eax], cl", 32, "8808", "mov"),                      # r/m <- reg
    ("mov dword ptr [eax], ecx", 32, "8908", "mov"),
    ("mov qword ptr [rax], rcx", 64, "488908", "mov"),
    (raw("8c18"), 32, "8c18", "mov"),                                   # r/m <- Sreg
    ("mov word ptr [eax], ds", 32, "668c18", "mov"),
    ("mov word ptr [rax], ds", 64, "668c18", "mov"),
    ("mov byte ptr [0x1234], al", 32, "a234120000", "mov"),             # moffs <- A
    ("mov dword ptr [0x1234], eax", 32, "a334120000", "mov"),
    ("movabs byte ptr [0x1122334455], al", 64, "a25544332211000000", "mov"),
    ("movabs qword ptr [0x1122334455], rax", 64, "48a35544332211000000", "mov"),
    ("mov byte ptr [eax], 1", 32, "c60001", "mov"),                     # r/m <- imm (group11 /0)
    ("mov dword ptr [eax], 1", 32, "c70001000000", "mov"),
    ("mov qword ptr [rax], -0x21", 64, "48c700dfffffff", "mov"),
    ("bts dword ptr [eax], ecx", 32, "0fab08", "bts"),                  # 0F AB
    ("bts dword ptr [eax], 5", 32, "0fba2805", "bts"),                  # group8 /5
    ("lock bts qword ptr [rax], 5", 64, "f0480fba2805", "bts"),
    ("btc dword ptr [eax], ecx", 32, "0fbb08", "btc"),                  # 0F BB
    ("btc dword ptr [eax], 5", 32, "0fba3805", "btc"),                  # group8 /7
    ("btc qword ptr [rax], rcx", 64, "480fbb08", "btc"),
    ("cmpxchg byte ptr [eax], cl", 32, "0fb008", "cmpxchg"),            # 0F B0
    ("lock cmpxchg dword ptr [eax], ecx", 32, "f00fb108", "cmpxchg"),   # 0F B1
    ("lock cmpxchg qword ptr [rax], rcx", 64, "f0480fb108", "cmpxchg"),
    ("cmpxchg8b qword ptr [esi]", 32, "0fc70e", "cmpxchg8b"),           # group9 mod012 /1
    ("lock cmpxchg8b qword ptr [esi]", 32, "f00fc70e", "cmpxchg8b"),
    ("lock cmpxchg8b qword ptr [rax]", 64, "f00fc708", "cmpxchg8b"),
    ("cmpxchg16b xmmword ptr [rdi]", 64, "480fc70f", "cmpxchg16b"),
    ("lock cmpxchg16b xmmword ptr [rdi]", 64, "f0480fc70f", "cmpxchg16b"),
]


@pytest.mark.parametrize("src,bits,enc,cls", KVM_MEMBERS)
def test_kvm_page_table_set_members(src, bits, enc, cls):
    d = dec(src, bits, expect_hex=enc)
    assert d.kvm_pt_write is True
    assert d.mem_write is True
    assert d.kvm_class == cls
    assert d.mem_operand is not None and not d.mem_operand.implicit


KVM_NON_MEMBERS = [
    # (source, bits, kvm_class) -- all write memory, none is in KVM's PageTable set
    ("lock btr dword ptr [eax], 5", 32, "btr"),                         # group8 /6
    ("btr dword ptr [eax], ecx", 32, "btr"),                            # 0F B3
    ("lock btr qword ptr [rax], 5", 64, "btr"),
    ("lock xadd dword ptr [eax], ecx", 32, "xadd"),                     # 0F C1
    ("xadd byte ptr [eax], cl", 32, "xadd"),                            # 0F C0
    ("add dword ptr [eax], ecx", 32, "add"),
    ("lock add dword ptr [eax], 1", 32, "add"),
    ("adc dword ptr [eax], ecx", 32, "adc"),
    ("sbb dword ptr [eax], ecx", 32, "sbb"),
    ("sub dword ptr [eax], 1", 32, "sub"),
    ("xor dword ptr [eax], ecx", 32, "xor"),
    ("lock xor qword ptr [rax], 0x20", 64, "xor"),
    ("inc dword ptr [eax]", 32, "inc"),
    ("dec dword ptr [eax]", 32, "dec"),
    ("not dword ptr [eax]", 32, "not"),
    ("neg dword ptr [eax]", 32, "neg"),
    ("shl dword ptr [eax], 1", 32, "shl"),
    ("rol dword ptr [eax], cl", 32, "rol"),
    ("stosb", 32, "stos"),
    ("rep stosd", 32, "stos"),
    ("rep stosq", 64, "stos"),
    ("movsb", 32, "movs"),
    (raw("f3a5"), 32, "movs"),                                          # rep movsd
    ("movsq", 64, "movs"),
    ("movups xmmword ptr [eax], xmm0", 32, "sse-store"),
    ("movaps xmmword ptr [eax], xmm0", 32, "sse-store"),
    ("movdqa xmmword ptr [eax], xmm0", 32, "sse-store"),
    ("movdqu xmmword ptr [rax], xmm0", 64, "sse-store"),
    ("movntdq xmmword ptr [eax], xmm0", 32, "sse-store"),
    ("movq qword ptr [eax], xmm0", 32, "sse-store"),
    ("movd dword ptr [eax], xmm0", 32, "sse-store"),
    ("movq qword ptr [eax], mm0", 32, "sse-store"),
    (raw("f20f1100"), 32, "sse-store"),                                 # movsd m64, xmm0
    ("pextrd dword ptr [eax], xmm0, 1", 32, "sse-store"),
    ("vmovdqu ymmword ptr [eax], ymm1", 32, "sse-store"),
    ("movnti dword ptr [eax], ecx", 32, "movnti"),
    ("movbe dword ptr [eax], ecx", 32, "movbe"),
    ("push eax", 32, "push"),
    ("push dword ptr [eax]", 32, "push"),
    ("push 5", 32, "push"),
    ("pushfd", 32, "push"),
    ("push rax", 64, "push"),
    ("call eax", 32, "call"),
    ("call 0x2000", 32, "call"),
    ("call qword ptr [rax]", 64, "call"),
    ("pop dword ptr [eax]", 32, "pop"),
    ("sete byte ptr [eax]", 32, "setcc"),
    ("fstp qword ptr [eax]", 32, "fpu-store"),
    ("fnstcw word ptr [eax]", 32, "fpu-store"),
]


@pytest.mark.parametrize("src,bits,cls", KVM_NON_MEMBERS)
def test_kvm_page_table_set_non_members(src, bits, cls):
    d = dec(src, bits)
    assert d.kvm_pt_write is False
    assert d.mem_write is True
    assert d.kvm_class == cls


NO_MEMORY_WRITE = [
    # (source, bits, kvm_pt_write): KVM's flag is per opcode table entry, whatever the operands
    ("or eax, dword ptr [ebx]", 32, True),      # 0B: I6ALU reg <- r/m form carries PageTable
    ("and eax, 0x20", 32, True),                # 83 /4 on a register
    ("mov eax, ecx", 32, True),                 # 89 mod=3
    ("mov eax, dword ptr [ebx]", 32, False),    # 8B
    ("xchg eax, ecx", 32, False),               # 90+r
    ("cmp dword ptr [eax], ecx", 32, False),
    ("test dword ptr [eax], ecx", 32, False),
    ("bt dword ptr [eax], 5", 32, False),
    ("mul dword ptr [eax]", 32, False),
    ("imul dword ptr [eax]", 32, False),
    ("idiv qword ptr [rax]", 64, False),
    ("lea eax, [ebx]", 32, False),
    ("fld dword ptr [eax]", 32, False),
    ("prefetcht0 byte ptr [eax]", 32, False),
    ("clflush byte ptr [eax]", 32, False),
    ("invlpg byte ptr [eax]", 32, False),
    ("jmp dword ptr [eax]", 32, False),
    ("nop dword ptr [eax]", 32, False),
    ("cmpsb", 32, False),
    ("lodsd", 32, False),
    ("repne scasb", 32, False),
    (raw("c7f800000000"), 32, False),           # xbegin: group11 /7 is D(Undefined) in KVM
]


@pytest.mark.parametrize("src,bits,pt", NO_MEMORY_WRITE)
def test_no_memory_write(src, bits, pt):
    d = dec(src, bits)
    assert d.mem_write is False
    assert d.access_size == 0
    assert d.kvm_pt_write is pt
    assert d.clears_accessed_bit is False and d.is_zero_write_candidate is False


# ---------------------------------------------------------------------------------------------
# prefixes, text, sizes

PREFIXES = [
    # (source, bits, lock, rep)
    ("lock btr dword ptr [eax], 5", 32, True, False),
    ("lock cmpxchg8b qword ptr [esi]", 32, True, False),
    ("lock xadd dword ptr [eax], ecx", 32, True, False),
    ("lock or qword ptr [rax], rcx", 64, True, False),
    ("btr dword ptr [eax], 5", 32, False, False),
    ("rep stosd", 32, False, True),
    ("rep stosq", 64, False, True),
    ("stosd", 32, False, False),
    (raw("f3a5"), 32, False, True),             # rep movsd
    ("repne scasb", 32, False, True),
    ("movdqu xmmword ptr [eax], xmm0", 32, False, False),   # F3 is a mandatory prefix here
    (raw("f20f1100"), 32, False, False),                    # movsd xmm: F2 mandatory
    (raw("f390"), 32, False, False),                        # pause
    (raw("f3c3"), 32, False, False),                        # rep ret
    ("mov dword ptr [eax], 0", 32, False, False),
]


@pytest.mark.parametrize("src,bits,lock,rep", PREFIXES)
def test_lock_rep_prefixes(src, bits, lock, rep):
    d = dec(src, bits)
    assert (d.lock, d.rep) == (lock, rep)


def test_text_fields():
    d = dec("lock btr dword ptr [eax], 5", 32)
    assert d.text == "lock btr dword ptr [eax], 5"
    assert d.mnemonic == "lock btr" and d.op_str == "dword ptr [eax], 5"
    assert d.bits == 32 and d.address == ADDR and d.next_ip == ADDR + d.size
    assert dec("pushfd", 32).text == "pushfd"


ACCESS_SIZES = [
    # (source, bits, access_size, mem_operand.size)
    ("mov byte ptr [eax], 0", 32, 1, 1),
    ("mov word ptr [eax], 0", 32, 2, 2),
    ("mov dword ptr [eax], 0", 32, 4, 4),
    ("mov qword ptr [rax], 0", 64, 8, 8),
    ("xchg byte ptr [eax], cl", 32, 1, 1),
    ("cmpxchg8b qword ptr [esi]", 32, 8, 8),
    ("cmpxchg16b xmmword ptr [rdi]", 64, 16, 16),
    ("rep stosb", 32, 1, 1),
    ("rep stosw", 32, 2, 2),
    ("rep stosd", 32, 4, 4),
    ("rep stosq", 64, 8, 8),
    ("movsb", 32, 1, 1),
    ("movsq", 64, 8, 8),
    ("push eax", 32, 4, 4),
    ("push ax", 32, 2, 2),
    ("push rax", 64, 8, 8),
    ("call eax", 32, 4, 4),
    ("call rax", 64, 8, 8),
    ("pushal", 32, 4, 32),                      # eight 4-byte stores below ESP
    ("movdqa xmmword ptr [eax], xmm0", 32, 16, 16),
    ("movq qword ptr [eax], mm0", 32, 8, 8),
    ("vmovdqu ymmword ptr [eax], ymm1", 32, 32, 32),
    (raw("0f0100"), 32, 6, 6),                  # sgdt [eax]
    (raw("0f0100"), 64, 10, 10),                # sgdt [rax]
    ("fxsave [eax]", 32, 512, 512),
]


@pytest.mark.parametrize("src,bits,size,region", ACCESS_SIZES)
def test_access_sizes(src, bits, size, region):
    d = dec(src, bits)
    assert d.mem_write
    assert d.access_size == size
    assert d.mem_operand.size == region


# ---------------------------------------------------------------------------------------------
# effective addresses

def reader(**regs):
    """read_reg over a dict: asking for a register not given is a test failure (KeyError)."""
    return regs.__getitem__


EFFECTIVE_ADDRESSES = [
    # (source, bits, registers, expected linear address)
    ("mov dword ptr [eax + ebx*4 + 8], 0", 32, dict(eax=0x1000, ebx=0x10), 0x1048),
    ("mov dword ptr [eax + 0x20], 0", 32, dict(eax=0xFFFF_FFF0), 0x10),                 # 32-bit wrap
    ("mov dword ptr [eax - 8], 0", 32, dict(eax=4), 0xFFFF_FFFC),
    ("mov dword ptr [eax + ebx*8], 0", 32, dict(eax=0x8000_0000, ebx=0x1000_0000), 0),
    ("mov dword ptr [ebp + 4], 1", 32, dict(ebp=0x8FF0), 0x8FF4),
    ("mov word ptr [bx + si + 0x10], ax", 32, dict(ebx=0x1234_FFF0, esi=0), 0),         # 16-bit wrap
    ("mov dword ptr fs:[eax], 1", 32, dict(eax=0x10, fs_base=0xC000_0000), 0xC000_0010),
    ("mov dword ptr fs:[eax], 1", 32, dict(eax=0x2000, fs_base=0xFFFF_F000), 0x1000),   # linear wrap
    ("rep stosd", 32, dict(edi=0x2000), 0x2000),
    ("mov dword ptr [r8 + r9*8 - 8], r10d", 64, dict(r8=0x1000, r9=2), 0x1008),
    (raw("c644a5a900"), 64, dict(rbp=0x1000), 0x1000 - 0x57),   # SIB index 100: no index
    (raw("c644e5a900"), 32, dict(ebp=0x1000), 0x1000 - 0x57),   # ... capstone says "riz"/"eiz"
    ("mov qword ptr [rax + 0x10], rcx", 64, dict(rax=0xFFFF_FFFF_FFFF_FFF8), 8),         # 64-bit wrap
    ("mov dword ptr [eax + 0x10], 1", 64, dict(rax=0x1_FFFF_FFF8), 0x8),                 # addr32 (67)
    ("mov dword ptr gs:[rax], 0", 64, dict(rax=0x10, gs_base=0xFFFF_8880_0000_0000), 0xFFFF_8880_0000_0010),
    (raw("3ec70001000000"), 64, dict(rax=0x10), 0x10),                                   # ds: no base in 64-bit
    ("rep stosq", 64, dict(rdi=0x7000), 0x7000),
    ("push eax", 32, dict(esp=0x9000), 0x8FFC),
    ("push rax", 64, dict(rsp=0x9000), 0x8FF8),
    ("call eax", 32, dict(esp=0x9000), 0x8FFC),
    ("pushal", 32, dict(esp=0x9000), 0x8FE0),
    ("pop dword ptr [esp + 4]", 32, dict(esp=0x9000), 0x9008),     # SDM: ESP incremented first
]


@pytest.mark.parametrize("src,bits,regs,expected", EFFECTIVE_ADDRESSES)
def test_effective_address(src, bits, regs, expected):
    d = dec(src, bits)
    assert d.mem_operand.effective_address(reader(**regs)) == expected
    assert d.mem_operand.effective_address(reader(**regs), d.next_ip) == expected


def test_effective_address_rip_relative():
    code = asm("mov qword ptr [rip + 0x10], rax", 64)
    for addr in (0x40_1000, 0x50_0000, 0xFFFF_FFFF_8100_0000):
        d = decode(code, addr, 64)
        m = d.mem_operand
        assert m.rip_relative and m.base == "rip" and m.next_ip == addr + len(code)
        assert m.effective_address(reader()) == addr + len(code) + 0x10   # reads no register
        assert m.effective_address(reader(), d.next_ip) == addr + len(code) + 0x10
    m = MemOperand(seg=None, base="rip", index=None, scale=1, disp=-8, size=8, addr_size=8, bits=64)
    assert m.effective_address(reader(), 0x2000) == 0x1FF8
    with pytest.raises(ValueError):
        m.effective_address(reader())


def test_effective_address_eip_relative_wraps():
    code = raw("67c7051000000001000000")       # mov dword ptr [eip + 0x10], 1 (64-bit mode)
    d = decode(code, 0xFFFF_FFF0, 64)
    assert d.mem_operand.base == "eip"
    assert d.mem_operand.effective_address(reader()) == (0xFFFF_FFF0 + len(code) + 0x10) & 0xFFFF_FFFF


NON_FLAT = [
    ("mov dword ptr [eax], 1", dict(eax=0x10, ds_base=0x100), 0x110),
    ("mov dword ptr [ebp + 4], 1", dict(ebp=0x10, ss_base=0x200), 0x214),
    ("rep stosd", dict(edi=0x10, es_base=0x300), 0x310),
    ("mov dword ptr es:[eax], 1", dict(eax=0x10, es_base=0x400), 0x410),
]


@pytest.mark.parametrize("src,regs,expected", NON_FLAT)
def test_effective_address_segment_bases(src, regs, expected):
    d = dec(src, 32)
    assert d.mem_operand.effective_address(reader(**regs), flat=False) == expected
    flat_regs = {k: v for k, v in regs.items() if not k.endswith("_base")}
    assert d.mem_operand.effective_address(reader(**flat_regs)) == expected - [
        v for k, v in regs.items() if k.endswith("_base")][0]


def test_mem_operand_fields():
    m = dec("mov dword ptr fs:[eax + ebx*4 + 8], 0", 32).mem_operand
    assert m == MemOperand(seg="fs", base="eax", index="ebx", scale=4, disp=8, size=4,
                           addr_size=4, bits=32)
    assert m.effective_seg == "fs"
    assert dec("mov dword ptr [ebp + 4], 1").mem_operand.effective_seg == "ss"
    assert dec("mov dword ptr [eax], 1").mem_operand.effective_seg == "ds"
    assert dec("rep stosd").mem_operand.effective_seg == "es"


# ---------------------------------------------------------------------------------------------
# Andrea's accessed-bit clear

CLEARS_ACCESSED = [
    ("lock btr dword ptr [eax], 5", 32, True),       # 2.4 ptep_test_and_clear_young
    ("btr dword ptr [eax], 5", 32, True),
    ("btr word ptr [eax], 5", 32, True),
    ("lock btr qword ptr [rax], 5", 64, True),
    ("btr dword ptr [eax], 37", 32, True),           # imm bit offset is taken mod 32
    ("and dword ptr [eax], 0xffffffdf", 32, True),   # ~0x20
    ("lock and dword ptr [eax], 0xffffffdf", 32, True),
    ("lock and byte ptr [eax], 0xdf", 32, True),     # byte-sized clear_bit(5)
    ("and word ptr [eax], 0xffdf", 32, True),
    ("and qword ptr [rax], -0x21", 64, True),
    ("and dword ptr [eax], 0xffffff9f", 32, True),   # ~0x60: A and D, P..PCD and frame kept
    ("lock btr dword ptr [eax], 6", 32, False),      # dirty bit
    ("btr dword ptr [eax], 4", 32, False),
    ("btr qword ptr [rax], 37", 64, False),          # bit 37 of a qword
    ("btr dword ptr [eax], ecx", 32, False),         # register offset: unknown statically
    ("and dword ptr [eax], 0xffffffbf", 32, False),  # ~0x40
    ("and dword ptr [eax], 0xffffffde", 32, False),  # ~0x21 clears P too
    ("and dword ptr [eax], 0xdf", 32, False),        # clears the frame
    ("and dword ptr [eax], 0xffff0fdf", 32, False),  # clears frame bits 12-15
    ("and byte ptr [eax], 0xfe", 32, False),
    ("and dword ptr [eax], ecx", 32, False),
    ("and eax, 0xffffffdf", 32, False),              # register destination
    ("bts dword ptr [eax], 5", 32, False),
    ("btc dword ptr [eax], 5", 32, False),
    ("bt dword ptr [eax], 5", 32, False),
    ("or dword ptr [eax], 0x20", 32, False),
    ("mov dword ptr [eax], 0xffffffdf", 32, False),
]


@pytest.mark.parametrize("src,bits,expected", CLEARS_ACCESSED)
def test_clears_accessed_bit(src, bits, expected):
    assert dec(src, bits).clears_accessed_bit is expected


# ---------------------------------------------------------------------------------------------
# Xen's zero-write test

ZERO_WRITES = [
    # (value, size, addr, pte_size, expected)
    (0, 4, 0x1000, None, True),
    (0, 8, 0x1008, None, True),
    (0xFFFF_FFFF_0000_0000, 8, 0x1000, None, True),  # only the first 32 bits written count
    (0x0000_0000_FFFF_FFFF, 8, 0x1000, None, False),
    (1, 4, 0x1000, None, False),
    (0, 2, 0x1000, None, False),                     # shorter than 4 bytes
    (0, 1, 0x1000, None, False),
    (0, 4, 0x1002, None, False),
    (0, 8, 0x1004, None, False),                     # not aligned to its size...
    (0, 8, 0x1004, 4, True),                         # ...but pte-aligned in a 2-level table
    (0, 4, 0x1004, None, True),                      # high half of a PAE pte: size-aligned...
    (0, 4, 0x1004, 8, False),                        # ...not pte-aligned (Xen 3.3.1 resets)
    (0, 4, 0x1000, 8, True),
    (0, 16, 0x1010, 8, True),
]


@pytest.mark.parametrize("value,size,addr,pte_size,expected", ZERO_WRITES)
def test_is_zero_write(value, size, addr, pte_size, expected):
    assert is_zero_write(value, size, addr, pte_size) is expected
    if pte_size is None:
        assert is_zero_write(value, size, addr) is expected


ZERO_CANDIDATES = [
    # (source, bits, candidate, src_reg, src_imm)
    ("mov dword ptr [eax], 0", 32, True, None, 0),
    ("mov qword ptr [rax], 0", 64, True, None, 0),
    ("mov dword ptr [eax], 1", 32, False, None, 1),
    ("mov dword ptr [eax], ecx", 32, True, "ecx", None),
    ("mov byte ptr [rax], ah", 64, True, "ah", None),
    ("mov word ptr [eax], ds", 32, True, "ds", None),
    ("mov dword ptr [0x1234], eax", 32, True, "eax", None),
    ("stosd", 32, True, "eax", None),
    ("rep stosq", 64, True, "rax", None),
    ("movq qword ptr [eax], xmm0", 32, True, "xmm0", None),
    ("movnti dword ptr [eax], ecx", 32, True, "ecx", None),
    ("xchg dword ptr [eax], ecx", 32, False, "ecx", None),
    ("lock cmpxchg dword ptr [eax], ecx", 32, False, "ecx", None),
    ("and dword ptr [eax], 0", 32, False, None, 0),
    ("or dword ptr [eax], ecx", 32, False, "ecx", None),
    ("movsd", 32, False, None, None),
    ("push 0", 32, False, None, 0),                  # stack slot, not a plain r/m store
]


@pytest.mark.parametrize("src,bits,cand,reg,imm", ZERO_CANDIDATES)
def test_zero_write_candidate(src, bits, cand, reg, imm):
    if src == "movsd":
        src = raw("a5")   # keystone: "movsd" alone is not accepted
    d = dec(src, bits)
    assert d.is_zero_write_candidate is cand
    assert (d.src_reg, d.src_imm) == (reg, imm)


def test_store_value():
    regs = reader(eax=0x1122_3344, rax=0xAABB_CCDD_1122_3344, xmm0=(5 << 64) | 7, ds=0x10)
    assert dec("mov dword ptr [eax], ecx").store_value(reader(ecx=0x1_0000_0000)) == 0
    assert dec("mov byte ptr [rax], ah", 64).store_value(regs) == 0x33
    assert dec("stosd").store_value(regs) == 0x1122_3344
    assert dec("rep stosq", 64).store_value(regs) == 0xAABB_CCDD_1122_3344
    assert dec("movq qword ptr [eax], xmm0").store_value(regs) == 7
    assert dec("mov word ptr [eax], ds").store_value(regs) == 0x10
    assert dec("mov qword ptr [rax], 0", 64).store_value(regs) == 0
    assert dec("xchg dword ptr [eax], ecx").store_value(regs) is None
    d = dec("mov dword ptr [eax], 0")
    v = d.store_value(regs)
    assert is_zero_write(v, d.access_size, 0x1000)


# ---------------------------------------------------------------------------------------------
# KVM misalignment rules

MISALIGNED = [
    # (offset, size, pte_size, kvm2008, kvm)
    (0x000, 4, 4, False, False),
    (0x004, 4, 4, False, False),
    (0xFFC, 4, 4, False, False),
    (0x002, 4, 4, True, True),       # crosses a 4-byte pte
    (0x000, 8, 4, True, True),       # covers two 4-byte ptes
    (0x000, 2, 4, True, True),       # shorter than 4
    (0x000, 1, 4, True, False),      # 1 byte at a pte-aligned offset: KVM >= 3.x accepts
    (0x004, 1, 4, True, False),
    (0x003, 1, 4, True, True),       # 1 byte elsewhere
    (0x000, 8, 8, False, False),
    (0x008, 8, 8, False, False),
    (0x000, 4, 8, False, False),     # low half of a PAE pte
    (0x004, 4, 8, False, False),     # high half of a PAE pte
    (0x006, 4, 8, True, True),       # straddles two PAE ptes
    (0x004, 8, 8, True, True),
    (0x000, 16, 8, True, True),      # cmpxchg16b over two ptes
    (0x000, 2, 8, True, True),
    (0x000, 1, 8, True, False),
    (0x008, 1, 8, True, False),
    (0x004, 1, 8, True, True),       # pte-size alignment, not 4
    (0x007, 1, 8, True, True),
    (0xFF8, 8, 8, False, False),
]


@pytest.mark.parametrize("offset,size,pte_size,old,new", MISALIGNED)
def test_misaligned(offset, size, pte_size, old, new):
    assert misaligned_kvm2008(offset, size, pte_size) is old
    assert misaligned_kvm(offset, size, pte_size) is new


UNALIGNED_XEN = [
    (0x1000, 4, False),
    (0x1004, 4, False),
    (0x1002, 4, True),
    (0x1004, 8, True),
    (0x1008, 8, False),
    (0x1001, 1, False),
    (0x1001, 2, True),
    (0x1002, 2, False),
    (0x1000, 16, False),
    (0x1008, 16, True),
]


@pytest.mark.parametrize("addr,size,expected", UNALIGNED_XEN)
def test_unaligned_xen(addr, size, expected):
    assert unaligned_xen(addr, size) is expected


# ---------------------------------------------------------------------------------------------
# decoding, caching

def test_decode_is_cached():
    code = asm("lock btr dword ptr [eax], 5", 32)
    a = decode(code, 0x1000, 32)
    hot_before, core_before = decode_cache_info()
    assert decode(code, 0x1000, 32) is a
    assert decode(bytearray(code), 0x1000, 32) is a
    assert decode(memoryview(code), 0x1000, 32) is a
    hot_after, _ = decode_cache_info()
    assert hot_after.hits >= hot_before.hits + 3
    b = decode(code, 0x2000, 32)           # same bytes elsewhere: rebased from the core cache
    assert b.address == 0x2000 and b.text == a.text
    assert b.mem_operand is a.mem_operand
    _, core_after = decode_cache_info()
    assert core_after.hits > core_before.hits


def test_decode_long_buffer_and_bits():
    code = asm("mov dword ptr [eax], ecx", 32) + bytes(range(40))
    d = decode(code, 0x1000, 32)
    assert d.size == 2 and d.bytes == bytes.fromhex("8908")
    with pytest.raises(ValueError):
        decode(code, 0x1000, 8)


def test_relative_branch_text_follows_address():
    code = asm("call 0x2000", 32, addr=0x1000)     # e8 rel32
    a = decode(code, 0x1000, 32)
    b = decode(code, 0x3000, 32)
    assert a.op_str == "0x2000" and b.op_str == "0x4000"


@pytest.mark.parametrize("code", [b"", b"\xf0", raw("0fc7c8"), raw("0f")])
def test_undecodable_returns_none(code):
    assert decode(code, 0x1000, 32) is None
