"""Post-assembly verification: what keystone encoded, decoded with capstone, compared with what
the source meant (immediates, 64-bit absolute memory operands)."""
from __future__ import annotations

from .errors import AsmError
from .lexical import _SENTINEL
from .preprocess import _Pre

_cs = {}


def _disasm_one(code: bytes, addr: int, bits: int):
    if bits not in _cs:
        from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs
        cs = Cs(CS_ARCH_X86, CS_MODE_32 if bits == 32 else CS_MODE_64)
        cs.detail = True
        _cs[bits] = cs
    for insn in _cs[bits].disasm(code[:16], addr, 1):
        return insn
    return None


def _effective_address(insn):
    from capstone import x86_const as X
    for op in insn.operands:
        if op.type == X.X86_OP_MEM:
            if op.mem.base == X.X86_REG_RIP and op.mem.index == 0:
                return (insn.address + insn.size + op.mem.disp) & _SENTINEL
            if op.mem.base == 0 and op.mem.index == 0:
                return op.mem.disp & _SENTINEL
            return None
    return None


def _verify(pre: _Pre, base: int, code: bytes, table: bytes):
    """Compare what keystone encoded with what the source meant (values from the table)."""
    from capstone import x86_const as X
    for n, chk in enumerate(pre.checks):
        addr = int.from_bytes(table[16 * n:16 * n + 8], "little")
        value = int.from_bytes(table[16 * n + 8:16 * n + 16], "little")
        if addr == _SENTINEL:
            continue      # the statement was in a conditional branch that was not assembled
        off = addr - base
        if not 0 <= off < len(code):
            continue
        where = (chk.line.file, chk.line.lineno or None)
        insn = _disasm_one(code[off:], addr, pre.bits)
        if insn is None:
            continue
        if chk.kind == "imm":
            sval = value - (1 << 64) if value >> 63 else value
            imm = next((op for op in insn.operands if op.type == X.X86_OP_IMM), None)
            if imm is None:
                if any(op.type == X.X86_OP_MEM for op in insn.operands):
                    raise AsmError(f"keystone encoded the immediate as a memory operand "
                                   f"'{chk.stmt.orig}'", *where)
                continue
            w = 8 * (imm.size or 4)
            if not -(1 << (w - 1)) <= sval < (1 << w) or (imm.imm - sval) % (1 << w):
                what = f"{sval:#x}" if -(1 << 63) <= sval < (1 << 64) else str(sval)
                hint = ""
                if w == 64 and insn.mnemonic == "mov":
                    hint = " (use movabs for a 64-bit value)"
                raise AsmError(f"immediate {what} does not fit in the {w}-bit operand"
                               f"{' (sign-extended from 32 bits)' if w == 64 else ''}{hint} "
                               f"'{chk.stmt.orig}'", *where)
            continue
        ea = _effective_address(insn)
        if ea is None or ea == value:
            continue
        raise AsmError(f"absolute address {value:#x} cannot be encoded in 64-bit mode (a 32-bit "
                       f"displacement reaches 0..0x7fffffff and the top 2 GiB, RIP-relative "
                       f"+-2 GiB around the code): load the address into a register first "
                       f"'{chk.stmt.orig}'", *where)
