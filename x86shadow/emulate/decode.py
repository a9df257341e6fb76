"""Decode and classify the instruction that trapped on a write-protected guest page table.

This runs on every trapped write, so decoding is cached (see ``decode``).  It is sans-CPU:
registers are read through a ``read_reg(name) -> int`` callable supplied by the caller.

What is classified, and where each rule comes from (the sources were read, not recalled):

* ``Decoded.kvm_pt_write`` -- KVM's ``PageTable`` opcode flag, i.e. what
  ``x86_page_table_writing_insn()`` returns (``return ctxt->d & PageTable;``), in
  torvalds/linux ``arch/x86/kvm/emulate.c``.  Read in two stored versions of that file: commit
  0017f93a2776 (~3.4: ``I6ALU``/``I2bv`` tables, ``em_bts``... execute functions) and commit
  5cfc7e0f5e5e (~3.13: ``F6ALU``/``F2bv`` fastop tables), plus later patches that touch
  ``group9`` (rdpid, the 8/16-byte ``em_cmpxchg8b`` rework) -- the set is identical in all of
  them.  (Our first write-up dated the flag to Linux 3.2; the earliest copy read here is ~3.4.)  The
  exact table entries are quoted at ``_PT_ONE`` below.
* ``misaligned_kvm2008`` -- ``kvm_mmu_pte_write()`` in ``arch/x86/kvm/mmu.c``, Linux 2.6.26
  era (the copy with ``tdp_enabled``, ``pfn_t``, ``role.metaphysical``)::

      pte_size = sp->role.glevels == PT32_ROOT_LEVEL ? 4 : 8;
      misaligned = (offset ^ (offset + bytes - 1)) & ~(pte_size - 1);
      misaligned |= bytes < 4;

  (The early-2007 ``drivers/kvm/mmu.c`` ``kvm_mmu_pre_write()``, ~2.6.20/21, had the first
  line only; the release that added ``bytes < 4`` was not pinned down.)
* ``misaligned_kvm`` -- ``detect_write_misaligned()`` in ``arch/x86/kvm/mmu/mmu.c``
  (unchanged from 3.x ``mmu.c`` to 6.x, only ``cr4_pae`` -> ``gpte_is_8_bytes`` ->
  ``has_4_byte_gpte`` renames)::

      if (!(offset & (pte_size - 1)) && bytes == 1)
          return false;
      misaligned = (offset ^ (offset + bytes - 1)) & ~(pte_size - 1);
      misaligned |= bytes < 4;

* ``unaligned_xen`` -- Xen 3.3.1 ``xen/arch/x86/mm/shadow/multi.c`` ``emulate_map_dest()``:
  ``/* Unaligned writes mean probably this isn't a pagetable */ if ( vaddr & (bytes - 1) )
  sh_remove_shadows(...)`` (also ``sh_x86_emulate_write()`` / ``_cmpxchg()``).
* ``is_zero_write`` -- Xen 3.3.1 ``multi.c`` ``emulate_unmap_dest()``::

      if ( likely(bytes >= 4)
           && (*(u32 *)addr == 0)
           && ((unsigned long) addr & ((sizeof (guest_intpte_t)) - 1)) == 0 )
          check_for_early_unshadow(v, sh_ctxt->mfn1);
      else
          reset_early_unshadow(v);

  NOTE: Xen aligns to the *guest pte size* (4 for 2-level, 8 for PAE/64-bit guests), not to
  the access size.  Pass ``pte_size=`` to get Xen's exact test; without it the function
  applies the rule as written in the task brief (aligned to the access size).  The two differ
  for a 4-byte zero store to the high half of a PAE pte (addr % 8 == 4): aligned to its size,
  but *not* pte-aligned, so in Xen 3.3.1 it resets the heuristic.  (Later Xen, e.g. 4.x
  ``sh_emulate_unmap_dest()``, no longer resets on non-aligned zero writes.)
* ``Decoded.clears_accessed_bit`` -- the ``andrea`` policy (Andrea Arcangeli's proposal;
  not in a source tree -- the guest side is the kmap scenario's ``ptep_test_and_clear_young`` =
  ``lock btrl $5, (pte_low)``), with the task brief's definition of the AND form.  See
  ``_clears_accessed_bit``.

Operand, size and write information comes from capstone 5 (detail on), except where capstone's
own ``access`` flags are wrong (measured: it marks ``cmpxchg``, ``cmpxchg8b``, ``movnti``,
``movups``, ``movq m64,xmm``, ``vmovdqu``, ``fist``... as reads), so whether an instruction
writes its memory operand is decided here from the instruction name and operand order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import capstone
from capstone import x86 as _cs_x86

__all__ = [
    "Decoded",
    "MemOperand",
    "decode",
    "decode_cache_clear",
    "decode_cache_info",
    "is_control_transfer",
    "is_zero_write",
    "misaligned_kvm",
    "misaligned_kvm2008",
    "unaligned_xen",
]

ReadReg = Callable[[str], int]

_MASK64 = (1 << 64) - 1
_MAX_INSN_LEN = 15  # architectural maximum; longer buffers are truncated for the cache key


# --------------------------------------------------------------------------------------------
# registers

def _build_gpr_table() -> dict[str, tuple[str, str, int, int]]:
    """name -> (full 64-bit name, full 32-bit name, shift, width in bits)."""
    t: dict[str, tuple[str, str, int, int]] = {}
    for r in "abcd":
        q, e = f"r{r}x", f"e{r}x"
        t[f"{r}l"] = (q, e, 0, 8)
        t[f"{r}h"] = (q, e, 8, 8)
        t[f"{r}x"] = (q, e, 0, 16)
        t[e] = (q, e, 0, 32)
        t[q] = (q, e, 0, 64)
    for r in ("si", "di", "sp", "bp"):
        q, e = f"r{r}", f"e{r}"
        t[f"{r}l"] = (q, e, 0, 8)
        t[r] = (q, e, 0, 16)
        t[e] = (q, e, 0, 32)
        t[q] = (q, e, 0, 64)
    for n in range(8, 16):
        q = f"r{n}"
        t[f"{q}b"] = (q, q, 0, 8)
        t[f"{q}w"] = (q, q, 0, 16)
        t[f"{q}d"] = (q, q, 0, 32)
        t[q] = (q, q, 0, 64)
    return t


_GPR = _build_gpr_table()
_SS_BASES = frozenset({"sp", "esp", "rsp", "bp", "ebp", "rbp"})
_VECTOR_PREFIXES = ("xmm", "ymm", "zmm", "mm")


def _full_gpr(name: str, bits: int) -> str:
    """The register to read for address arithmetic: the full-width register of the mode
    ("eax" in 16/32-bit modes, "rax" in 64-bit mode).  The effective address is masked to the
    address size afterwards, so reading the full register is exact."""
    q, e, _, _ = _GPR[name]
    return q if bits == 64 else e


def _read_value(read_reg: ReadReg, name: str, bits: int) -> int:
    """Value of a register operand as the instruction sees it (sub-registers extracted)."""
    g = _GPR.get(name)
    if g is None:  # segment / vector / other: ask for it by name
        return read_reg(name)
    q, e, shift, width = g
    full = q if bits == 64 else e
    return (read_reg(full) >> shift) & ((1 << width) - 1)


# --------------------------------------------------------------------------------------------
# data types

@dataclass(frozen=True, slots=True)
class MemOperand:
    """A memory operand: ``seg:[base + index*scale + disp]`` of ``size`` bytes.

    ``seg`` is the segment *override* from the encoding (None = the default segment, see
    ``effective_seg``).  ``addr_size`` is the address size in bytes (2, 4, 8); ``bits`` the
    CPU mode the instruction was decoded in.  RIP-relative operands have ``base`` "rip" (or
    "eip" with an address-size prefix) and ``next_ip`` = the address of the next
    instruction.  ``implicit`` marks operands that are not in the encoding (the stack slot of
    push/call/enter, the ``[edi]`` of maskmov*); ``size`` is then the whole region written.
    """

    seg: str | None
    base: str | None
    index: str | None
    scale: int
    disp: int
    size: int
    addr_size: int = 4
    bits: int = 32
    next_ip: int | None = None
    implicit: bool = False

    @property
    def rip_relative(self) -> bool:
        return self.base in ("rip", "eip")

    @property
    def effective_seg(self) -> str:
        """Segment actually used: the override, else SS for (e/r)sp/(e/r)bp bases, else DS."""
        if self.seg is not None:
            return self.seg
        return "ss" if self.base in _SS_BASES else "ds"

    def effective_address(self, read_reg: ReadReg, next_ip: int | None = None, *,
                          flat: bool = True) -> int:
        """Linear address of the operand.

        ``read_reg(name)`` must answer the full-width registers of the mode ("eax".."edi",
        "esp", "ebp" in 32-bit mode; "rax".."r15" in 64-bit mode) and "fs_base"/"gs_base"
        when the operand uses FS/GS.  The offset wraps at the address size (16/32/64 bits);
        RIP-relative operands use ``next_ip`` (the argument if given, else the one recorded at
        decode time -- both are the address of the next instruction).  Segment bases: in 64-bit mode only FS/GS
        have one (architectural).  In 16/32-bit mode FS/GS bases are always read; CS/DS/ES/SS
        bases are read as "<seg>_base" only with ``flat=False`` (docs/GUEST_CONTRACT.md: the guest
        runs with flat segments), and the linear address wraps at 32 bits.
        """
        bits = self.bits
        ea = self.disp
        base = self.base
        if base is not None:
            if base in ("rip", "eip"):
                nip = self.next_ip if next_ip is None else next_ip
                if nip is None:
                    raise ValueError("RIP-relative operand without next_ip")
                ea += nip
            else:
                ea += read_reg(_full_gpr(base, bits))
        if self.index is not None:
            ea += read_reg(_full_gpr(self.index, bits)) * self.scale
        ea &= (1 << (8 * self.addr_size)) - 1
        seg = self.effective_seg
        if bits == 64:
            if seg in ("fs", "gs"):
                ea += read_reg(seg + "_base")
            return ea & _MASK64
        if seg in ("fs", "gs") or not flat:
            ea += read_reg(seg + "_base")
        return ea & 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded instruction and the classes the policies (docs/POLICY_SOURCES.md) need.

    Fields beyond the brief: ``src_reg`` / ``src_imm`` = the register / immediate that
    supplies the stored value or the second operand (for ``btr`` the bit offset, for ``and``
    the mask, for ``stos`` the accumulator), the immediate masked to ``access_size`` bytes
    (for 0F BA bit ops it is the raw imm8).
    """

    address: int
    size: int
    bytes: bytes
    mnemonic: str           # capstone's, prefixes included ("lock btr", "rep stosd")
    op_str: str
    text: str               # "lock btr dword ptr [eax], 5"
    bits: int               # 16, 32 or 64
    lock: bool              # F0 prefix
    rep: bool               # F2/F3 prefix on a string instruction (not a mandatory SSE prefix)
    mem_write: bool         # the instruction writes memory
    mem_operand: MemOperand | None  # the memory operand written (implicit for push/call/enter
    #                                 and maskmov*); for non-writes the first memory operand;
    #                                 None without one (and for int n, whose frame may go to
    #                                 another stack)
    access_size: int        # bytes written per store (0 if mem_write is False)
    kvm_pt_write: bool      # KVM's PageTable flag (x86_page_table_writing_insn)
    kvm_class: str          # "mov", "or", "and", "xchg", "bts", "btc", "btr", "cmpxchg", ...
    clears_accessed_bit: bool
    is_zero_write_candidate: bool
    src_reg: str | None = None
    src_imm: int | None = None

    @property
    def next_ip(self) -> int:
        return self.address + self.size

    def store_value(self, read_reg: ReadReg) -> int | None:
        """The value a zero-write candidate stores (None for other instructions).

        ``read_reg`` is asked for the full-width GPR of the mode (sub-registers like "ah"
        are extracted here), or for the register by name otherwise ("ds", "xmm0").
        The value is truncated to ``access_size`` bytes."""
        if not self.is_zero_write_candidate:
            return None
        mask = (1 << (8 * self.access_size)) - 1
        if self.src_imm is not None:
            return self.src_imm & mask
        if self.src_reg is not None:
            return _read_value(read_reg, self.src_reg, self.bits) & mask
        return None


# --------------------------------------------------------------------------------------------
# KVM's PageTable set

# One-byte opcodes flagged PageTable, from the opcode_table[] of arch/x86/kvm/emulate.c:
#   /* 0x08 - 0x0F */ I6ALU(Lock | PageTable, em_or)     -> 08 09 0A 0B 0C 0D
#   /* 0x20 - 0x27 */ I6ALU(Lock | PageTable, em_and)    -> 20 21 22 23 24 25
#   /* 0x80 - 0x87 */ ... I2bv(DstMem | SrcReg | ModRM | Lock | PageTable, em_xchg) -> 86 87
#   /* 0x88 - 0x8F */ I2bv(DstMem | SrcReg | ModRM | Mov | PageTable, em_mov)       -> 88 89
#                     I(DstMem | SrcNone | ModRM | Mov | PageTable, em_mov_rm_sreg)  -> 8C
#   /* 0xA0 - 0xA7 */ I2bv(DstMem | SrcAcc | Mov | MemAbs | PageTable, em_mov)      -> A2 A3
# I6ALU/F6ALU expands to the r/m<-reg, reg<-r/m and acc<-imm forms, all carrying the flag;
# only 08/09/20/21 of those write memory.  x86_page_table_writing_insn() tests the flag of the
# opcode, whatever the operands, and so does ``kvm_pt_write``.
_PT_ONE = frozenset({0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D,
                     0x20, 0x21, 0x22, 0x23, 0x24, 0x25,
                     0x86, 0x87, 0x88, 0x89, 0x8C, 0xA2, 0xA3})
# Group opcodes: ModRM.reg selects the entry.
#   80 81 82 83 -> group1[]:  I(Lock | PageTable, em_or) at /1, I(Lock | PageTable, em_and) at /4
#   C6 C7       -> group11[]: I(DstMem | SrcImm | Mov | PageTable, em_mov) at /0; X7(D(Undefined))
_PT_ONE_GROUP = {0x80: (1, 4), 0x81: (1, 4), 0x82: (1, 4), 0x83: (1, 4), 0xC6: (0,), 0xC7: (0,)}
# Two-byte opcodes (twobyte_table[]):
#   0F AB  (DstMem | SrcReg | ModRM | BitOp | Lock | PageTable, em_bts)
#   0F B0 0F B1  I2bv(DstMem | SrcReg | ModRM | Lock | PageTable, em_cmpxchg)
#   0F BB  (DstMem | SrcReg | ModRM | BitOp | Lock | PageTable, em_btc)
# (0F B3 btr and 0F C0/C1 xadd are "| Lock" without PageTable.)
_PT_TWO = frozenset({0xAB, 0xB0, 0xB1, 0xBB})
#   0F BA -> group8[]: bts at /5 and btc at /7 carry PageTable; bt /4 and btr /6 do not.
#   0F C7 -> group9 (GroupDual): mod012 /1 = I(DstMem64 | Lock | PageTable, em_cmpxchg8b)
#            (cmpxchg8b, and cmpxchg16b with REX.W); the mod==3 half has no PageTable entry.
_PT_TWO_GROUP = {0xBA: (5, 7)}

_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})

# one-byte string opcodes -> class
_STRING_OPS = {0xA4: "movs", 0xA5: "movs", 0xAA: "stos", 0xAB: "stos", 0xA6: "cmps", 0xA7: "cmps",
               0xAE: "scas", 0xAF: "scas", 0xAC: "lods", 0xAD: "lods", 0x6C: "ins", 0x6D: "ins",
               0x6E: "outs", 0x6F: "outs"}


@dataclass(frozen=True, slots=True)
class _Encoding:
    lock: bool
    rep_prefix: int        # 0, 0xF2 or 0xF3
    opsize_prefix: bool    # 0x66 seen
    opmap: int             # 1 = one-byte, 2 = 0F xx, 3 = 0F 38/3A xx, 0 = VEX/EVEX/XOP
    opcode: int
    modrm: int | None


def _scan_encoding(code: bytes, bits: int) -> _Encoding:
    """Walk prefixes and opcode bytes like x86_decode_insn() does (REX only in 64-bit mode)."""
    i, n = 0, len(code)
    lock = False
    rep = 0
    opsize = False
    while i < n:
        b = code[i]
        if b in _LEGACY_PREFIXES:
            if b == 0xF0:
                lock = True
            elif b in (0xF2, 0xF3):
                rep = b
            elif b == 0x66:
                opsize = True
            i += 1
            continue
        if bits == 64 and 0x40 <= b <= 0x4F:
            i += 1
            continue
        break
    b = code[i] if i < n else 0
    nxt = code[i + 1] if i + 1 < n else None
    if b in (0xC4, 0xC5, 0x62) and nxt is not None and (bits == 64 or nxt >= 0xC0):
        return _Encoding(lock, rep, opsize, 0, b, None)          # VEX / EVEX
    if b == 0x8F and nxt is not None and (nxt >> 3) & 7 != 0:
        return _Encoding(lock, rep, opsize, 0, b, None)          # XOP
    if b == 0x0F:
        b2 = nxt if nxt is not None else 0
        if b2 in (0x38, 0x3A):
            op3 = code[i + 2] if i + 2 < n else 0
            return _Encoding(lock, rep, opsize, 3, op3, code[i + 3] if i + 3 < n else None)
        return _Encoding(lock, rep, opsize, 2, b2, code[i + 2] if i + 2 < n else None)
    return _Encoding(lock, rep, opsize, 1, b, nxt)


def _kvm_page_table_flag(enc: _Encoding) -> bool:
    """x86_page_table_writing_insn(): the PageTable flag of KVM's opcode table entry."""
    op, modrm = enc.opcode, enc.modrm
    if enc.opmap == 1:
        if op in _PT_ONE:
            return True
        regs = _PT_ONE_GROUP.get(op)
        return regs is not None and modrm is not None and (modrm >> 3) & 7 in regs
    if enc.opmap == 2:
        if op in _PT_TWO:
            return True
        if modrm is None:
            return False
        if op in _PT_TWO_GROUP:
            return (modrm >> 3) & 7 in _PT_TWO_GROUP[op]
        if op == 0xC7:  # group9: GroupDual, only the memory (mod != 3) half has cmpxchg8b
            return (modrm >> 3) & 7 == 1 and modrm >> 6 != 3
    return False


# --------------------------------------------------------------------------------------------
# which instructions write memory

# Instructions whose first (Intel-order) operand may be memory but is only read.
_READ_ONLY_DEST = frozenset({
    "cmp", "test", "bt", "cmpsb", "cmpsw", "cmpsd", "cmpsq",
    "mul", "imul", "div", "idiv",          # one-operand forms: r/m is the source
    "jmp", "ljmp", "nop", "lgdt", "lidt", "lldt", "ltr", "lmsw", "verr", "verw", "invlpg",
    "invlpga", "clflush", "clflushopt", "clwb", "cldemote", "prefetch", "prefetchw",
    "prefetchwt1", "prefetchnta", "prefetcht0", "prefetcht1", "prefetcht2", "ptwrite",
    "vmptrld", "vmxon", "ldmxcsr", "vldmxcsr", "fxrstor", "fxrstor64", "xrstor", "xrstor64",
    "xrstors", "xrstors64", "rstorssp",
    # x87 instructions whose single memory operand is a source
    "fld", "fild", "fbld", "fldcw", "fldenv", "frstor", "fadd", "fiadd", "fsub", "fisub",
    "fsubr", "fisubr", "fmul", "fimul", "fdiv", "fidiv", "fdivr", "fidivr", "fcom", "fcomp",
    "ficom", "ficomp",
})
_FPU_STORES = frozenset({"fst", "fstp", "fist", "fistp", "fisttp", "fbstp", "fnstcw", "fnstsw",
                         "fnstenv", "fnsave"})
# Implicit stack writers (the written slot is not an operand).
_PUSHES = frozenset({"push", "pushf", "pushfd", "pushfq", "pushal", "pushaw", "call", "lcall",
                     "enter"})
_INTS = frozenset({"int", "int1", "int3", "into"})
_MASKMOV = {"maskmovq": 8, "maskmovdqu": 16, "vmaskmovdqu": 16}
# capstone reports too small a size for these (measured); bytes actually written
_FIXED_SIZES = {"fxsave": 512, "fxsave64": 512, "xsave": 576, "xsave64": 576, "xsaveopt": 576,
                "xsaveopt64": 576, "xsavec": 576, "xsavec64": 576, "xsaves": 576, "xsaves64": 576}
_PLAIN_STORE_CLASSES = frozenset({"mov", "stos", "movnti", "movbe", "sse-store"})

_CS_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_disassemblers: dict[int, capstone.Cs] = {}


def _md(bits: int) -> capstone.Cs:
    md = _disassemblers.get(bits)
    if md is None:
        md = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODES[bits])
        md.detail = True
        _disassemblers[bits] = md
    return md


def _mem_from_cs(insn, op, bits: int) -> MemOperand:
    m = op.mem
    base = insn.reg_name(m.base) if m.base else None
    nxt = insn.address + insn.size if base in ("rip", "eip") else None
    index = insn.reg_name(m.index) if m.index else None
    if index in ("riz", "eiz"):   # SIB "no index" encoded with REX.X / explicitly: no index
        index = None
    return MemOperand(
        seg=insn.reg_name(m.segment) if m.segment else None,
        base=base,
        index=index,
        scale=m.scale if index is not None else 1,
        disp=m.disp,
        size=op.size,
        addr_size=insn.addr_size,
        bits=bits,
        next_ip=nxt,
    )


def _stack_width(bits: int, opsize_prefix: bool) -> int:
    if bits == 64:
        return 2 if opsize_prefix else 8
    if bits == 32:
        return 2 if opsize_prefix else 4
    return 4 if opsize_prefix else 2


def _clears_accessed_bit(cls: str, mem_dest: bool, size: int, imm: int | None) -> bool:
    """Andrea's "write that clears the accessed bit of a guest pte" (the ``andrea`` policy).

    * ``btr m, imm8`` whose bit offset is 5.  The CPU takes an immediate bit offset modulo
      the operand width (SDM BTR), so ``btr dword [m], 37`` also clears bit 5 and
      ``btr qword [m], 37`` does not.  ``btr m, reg`` cannot be judged statically -> False.
    * ``and m, imm`` whose mask (at the operand width) has bit 5 clear, bits 0-4 set (P, RW,
      US, PWT, PCD kept) and every pte frame bit inside the operand kept (bits 12..31 for a
      4-byte operand, 12..51 for 8 bytes, none for a byte: ``lock andb $0xdf,(pte)`` is the
      byte-sized clear_bit(5)).  Bits 6-11 and 52-63 are not constrained (~0x60 counts).
    Static only: the policy must still check that the store hits the low dword of a pte (a
    ``btrl $5`` on the high half of a PAE pte clears bit 37).
    """
    if not mem_dest or imm is None:
        return False
    width = 8 * size
    if cls == "btr":
        return width in (16, 32, 64) and imm & (width - 1) == 5
    if cls == "and":
        mask = imm & ((1 << width) - 1)
        frame = ((1 << min(width, 52)) - 1) & ~0xFFF
        return mask & 0x20 == 0 and mask & 0x1F == 0x1F and mask & frame == frame
    return False


def _build(code: bytes, address: int, bits: int) -> tuple[Decoded | None, bool]:
    """Decode at ``address``; also say whether the result depends on the address (relative
    branches print an absolute target; RIP-relative operands carry next_ip)."""
    insn = next(_md(bits).disasm(code, address, 1), None)
    if insn is None:
        return None, False
    raw = bytes(insn.bytes)
    enc = _scan_encoding(raw, bits)
    name = insn.insn_name() or insn.mnemonic.split()[-1]
    ops = list(insn.operands)
    mem_idx = [k for k, o in enumerate(ops) if o.type == _cs_x86.X86_OP_MEM]
    string_cls = _STRING_OPS.get(enc.opcode) if enc.opmap == 1 else None

    mem_write = False
    mem_op: MemOperand | None = None
    access = 0
    src_reg: str | None = None
    src_imm: int | None = None
    mem_dest = bool(ops) and ops[0].type == _cs_x86.X86_OP_MEM   # first operand is memory

    def take_source(start: int, size: int) -> None:
        nonlocal src_reg, src_imm
        for o in ops[start:]:
            if o.type == _cs_x86.X86_OP_REG:
                src_reg = insn.reg_name(o.reg)
                return
            if o.type == _cs_x86.X86_OP_IMM:
                src_imm = o.imm & ((1 << (8 * size)) - 1) if size else o.imm
                return

    if name in _PUSHES:
        width = _stack_width(bits, enc.opsize_prefix)
        far = (enc.opmap == 1 and enc.opcode == 0x9A) or (
            enc.opmap == 1 and enc.opcode == 0xFF and enc.modrm is not None
            and (enc.modrm >> 3) & 7 == 3) or name == "lcall"
        region = 8 * width if name in ("pushal", "pushaw") else (2 * width if far else width)
        sp = "rsp" if bits == 64 else ("esp" if bits == 32 else "sp")
        mem_write = True
        access = width
        mem_op = MemOperand(seg=None, base=sp, index=None, scale=1, disp=-region, size=region,
                            addr_size=8 if bits == 64 else (4 if bits == 32 else 2), bits=bits,
                            implicit=True)
        cls = "call" if name in ("call", "lcall") else ("enter" if name == "enter" else "push")
        if cls == "push":
            take_source(0, width)   # call stores next_ip, enter stores (e/r)bp
    elif name in _INTS:
        mem_write = True          # pushes an exception frame on a (possibly other) stack
        access = _stack_width(bits, False)
        cls = "int"
    elif name in _MASKMOV:
        size = _MASKMOV[name]
        di = "rdi" if insn.addr_size == 8 else ("edi" if insn.addr_size == 4 else "di")
        seg_prefix = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
        seg = None
        for b in raw:
            if b in seg_prefix:
                seg = seg_prefix[b]
            elif b not in _LEGACY_PREFIXES:
                break
        mem_write = True
        access = size
        mem_op = MemOperand(seg=seg, base=di, index=None, scale=1, disp=0, size=size,
                            addr_size=insn.addr_size, bits=bits, implicit=True)
        take_source(0, 0)
        cls = "sse-store"
    else:
        if mem_idx:
            mem_op = _mem_from_cs(insn, ops[mem_idx[0]], bits)
        mem_write = mem_dest and name not in _READ_ONLY_DEST
        if mem_write:
            access = _FIXED_SIZES.get(name, mem_op.size)
            if name == "fnsave":
                access = 94 if enc.opsize_prefix else 108
            if access != mem_op.size:
                mem_op = replace(mem_op, size=access)
            take_source(1, access if name not in ("btr", "bts", "btc") else 0)
            if name == "pop" and mem_op.base in _SS_BASES and mem_op.base.endswith("sp"):
                # SDM POP: with ESP as base, the address is computed after ESP is incremented
                mem_op = replace(mem_op, disp=mem_op.disp + _stack_width(bits, enc.opsize_prefix))
        # classify
        vector_src = any(
            o.type == _cs_x86.X86_OP_REG and insn.reg_name(o.reg).startswith(_VECTOR_PREFIXES)
            for o in ops)
        if string_cls is not None:
            cls = string_cls
        elif name in ("mov", "movabs"):
            cls = "mov"
        elif name in ("cmpxchg8b", "cmpxchg16b"):
            cls = name
        elif enc.opmap == 2 and 0x90 <= enc.opcode <= 0x9F:
            cls = "setcc"
        elif name in _FPU_STORES:
            cls = "fpu-store"
        elif mem_write and vector_src:
            cls = "sse-store"
        else:
            cls = name

    rep = enc.rep_prefix != 0 and string_cls is not None
    clears_a = _clears_accessed_bit(cls, mem_write and mem_dest, access, src_imm)
    zero_cand = (mem_write and cls in _PLAIN_STORE_CLASSES and mem_op is not None
                 and not mem_op.implicit
                 and (src_reg is not None or src_imm == 0))
    op_str = insn.op_str
    dependent = (mem_op is not None and mem_op.rip_relative) or (
        _cs_x86.X86_GRP_BRANCH_RELATIVE in insn.groups)
    return Decoded(
        address=address,
        size=insn.size,
        bytes=raw,
        mnemonic=insn.mnemonic,
        op_str=op_str,
        text=f"{insn.mnemonic} {op_str}".strip(),
        bits=bits,
        lock=enc.lock,
        rep=rep,
        mem_write=mem_write,
        mem_operand=mem_op,
        access_size=access if mem_write else 0,
        kvm_pt_write=_kvm_page_table_flag(enc),
        kvm_class=cls,
        clears_accessed_bit=clears_a,
        is_zero_write_candidate=zero_cand,
        src_reg=src_reg,
        src_imm=src_imm,
    ), dependent


# --------------------------------------------------------------------------------------------
# cached entry point

@functools.lru_cache(maxsize=8192)
def _decode_core(code: bytes, bits: int) -> tuple[Decoded | None, bool]:
    """Position-independent decode, keyed by (bytes, bits): decoded at address 0."""
    return _build(code, 0, bits)


@functools.lru_cache(maxsize=16384)
def _decode_at(code: bytes, address: int, bits: int) -> Decoded | None:
    core, dependent = _decode_core(code, bits)
    if core is None:
        return None
    if dependent:
        return _build(code, address, bits)[0]
    return replace(core, address=address)


def decode(code: bytes, address: int, bits: int) -> Decoded | None:
    """Decode the first instruction of ``code`` (at guest address ``address``, ``bits`` = 16,
    32 or 64).  Returns None if capstone cannot decode it.

    Cached at two levels: (code, address, bits) -> Decoded (the hot path: the same trapping
    instruction at the same RIP), and (code, bits) -> the position-independent decode, which
    is re-based with ``dataclasses.replace`` (only relative branches and RIP-relative operands
    are decoded again at their address).  ``code`` may be longer than the instruction (e.g.
    16 bytes fetched at RIP); it is cut to 15 bytes, the architectural maximum.
    """
    if bits not in _CS_MODES:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits!r}")
    if not isinstance(code, bytes) or len(code) > _MAX_INSN_LEN:
        code = bytes(code[:_MAX_INSN_LEN])
    return _decode_at(code, address, bits)


def decode_cache_info():
    """(hot cache info, position-independent cache info), functools.lru_cache style."""
    return _decode_at.cache_info(), _decode_core.cache_info()


def decode_cache_clear() -> None:
    _decode_at.cache_clear()
    _decode_core.cache_clear()


# --------------------------------------------------------------------------------------------
# control transfers (Xen's emulate-ahead window follows program order and stops after one)

_CONTROL = frozenset("jmp call ret retf iret iretd iretq int int3 into syscall sysenter sysret "
                     "sysexit hlt loop loope loopne jecxz jrcxz ljmp lcall".split()) | frozenset(
    "jo jno jb jae je jne jbe ja js jns jp jnp jl jge jle jg".split())


def is_control_transfer(d: Decoded) -> bool:
    """The instruction may transfer control (a jump, call, return, interrupt, hlt ...)."""
    return d.mnemonic.split()[-1] in _CONTROL


# --------------------------------------------------------------------------------------------
# alignment / zero-write rules (sources in the module docstring)

def is_zero_write(value: int, size: int, addr: int, pte_size: int | None = None) -> bool:
    """Xen's early-unshadow zero-write test on an emulated store of ``size`` bytes.

    ``size >= 4`` and the first 32 bits written (the low 32 bits of ``value``) are zero and
    the address is aligned: to ``pte_size`` (4 or 8) when given -- Xen 3.3.1
    ``emulate_unmap_dest()``, ``addr & (sizeof(guest_intpte_t) - 1)`` -- else to ``size``
    (the task brief's wording of the rule).
    """
    align = size if pte_size is None else pte_size
    return size >= 4 and value & 0xFFFF_FFFF == 0 and addr % align == 0


def misaligned_kvm2008(offset_in_page: int, size: int, pte_size: int) -> bool:
    """KVM 2.6.26 ``kvm_mmu_pte_write()``: the write crosses a ``pte_size`` boundary or is
    shorter than 4 bytes.  A 4-byte write to either half of an 8-byte pte is not misaligned.
    (KVM calls this per page: emulated writes that cross a page are split first.)"""
    off = offset_in_page
    return bool((off ^ (off + size - 1)) & ~(pte_size - 1)) or size < 4


def misaligned_kvm(offset_in_page: int, size: int, pte_size: int) -> bool:
    """Modern KVM ``detect_write_misaligned()``: as ``misaligned_kvm2008``, except that a
    1-byte write at a pte-aligned offset is not misaligned ("Sometimes, the OS only writes the
    last one bytes to update status bits, for example, in linux, andb instruction is used in
    clear_bit()").  A 1-byte write elsewhere in the pte, and any 2-byte write, still is."""
    off = offset_in_page
    if off & (pte_size - 1) == 0 and size == 1:
        return False
    return bool((off ^ (off + size - 1)) & ~(pte_size - 1)) or size < 4


def unaligned_xen(addr: int, size: int) -> bool:
    """Xen 3.3.1 ``emulate_map_dest()``: ``vaddr & (bytes - 1)`` -- the address is not a
    multiple of the access size (exactly that for the power-of-two sizes stores have)."""
    return bool(addr & (size - 1))
