"""Lexical helpers: register and keyword tables, the directive names, statement splitting
(comments, ``;``), operand splitting, integer literals, memory operands."""
from __future__ import annotations

import re

_SEGREGS = {"cs": 0, "ds": 1, "es": 2, "fs": 3, "gs": 4, "ss": 5}
_SEG_PREFIX = {"es": 0x26, "cs": 0x2E, "ss": 0x36, "ds": 0x3E, "fs": 0x64, "gs": 0x65}
_GPR64 = {n: i for i, n in enumerate(
    "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split())}
_GPR32 = {n: i for i, n in enumerate(
    "eax ecx edx ebx esp ebp esi edi r8d r9d r10d r11d r12d r13d r14d r15d".split())}
_GPR16 = {n: i for i, n in enumerate(
    "ax cx dx bx sp bp si di r8w r9w r10w r11w r12w r13w r14w r15w".split())}
_GPR8 = set("al cl dl bl ah ch dh bh spl bpl sil dil".split()) | {f"r{i}b" for i in range(8, 16)}
_REG_WIDTH = {**{n: 64 for n in _GPR64}, **{n: 32 for n in _GPR32},
              **{n: 16 for n in _GPR16}, **{n: 8 for n in _GPR8}}
_REGISTERS = (set(_REG_WIDTH) | set(_SEGREGS) | {"rip", "eip", "ip", "riz", "eiz"}
              | {f"cr{i}" for i in range(16)} | {f"dr{i}" for i in range(16)}
              | {f"xmm{i}" for i in range(32)} | {f"ymm{i}" for i in range(32)}
              | {f"zmm{i}" for i in range(32)} | {f"mm{i}" for i in range(8)}
              | {f"st{i}" for i in range(8)} | {f"k{i}" for i in range(8)} | {"st"})
_KEYWORDS = {"byte", "word", "dword", "fword", "qword", "tbyte", "tword", "xmmword", "ymmword",
             "zmmword", "oword", "ptr", "offset", "short", "near", "far"}
_INSN_PREFIXES = {"lock", "rep", "repe", "repz", "repne", "repnz"}
# operand-less mnemonics keystone turns into a different instruction (or an invalid opcode)
_NOT_IN_32 = {"movsq", "cmpsq", "stosq", "lodsq", "scasq", "cdqe", "cqo", "iretq", "pushfq",
              "popfq", "sysretq", "sysexitq", "swapgs", "retfq", "lretq"}
_NOT_IN_64 = {"into", "salc", "pusha", "popa", "pushad", "popad", "aaa", "aas", "daa", "das",
              "aam", "aad"}
_ONLY_64_REGS = (set(_GPR64) | {n for n in _GPR32 if n.startswith("r")}
                 | {n for n in _GPR16 if n.startswith("r")} | {"spl", "bpl", "sil", "dil", "rip",
                                                             "riz"}
                 | {f"r{i}b" for i in range(8, 16)} | {f"cr{i}" for i in range(9, 16)})

_IDENT = r"[A-Za-z_.$][\w.$]*"
_LABEL_RE = re.compile(r"\s*([A-Za-z_.][\w.$]*)\s*:(?!:)")     # keystone hangs on '$:'
_TOKEN_RE = re.compile(r"0[xX][0-9a-fA-F]*|0[bB][01]+|[0-9][0-9a-zA-Z]*|" + _IDENT
                       + r"|'(?:\\.|[^'\\])'|\S")
_MEM_RE = re.compile(
    r"^(?:(?P<size>byte|word|dword|fword|qword|tbyte|tword|xmmword|ymmword|zmmword|oword)"
    r"\s+ptr\s*)?"
    r"(?:(?P<seg>[cdefgs]s)\s*:\s*)?\[(?P<inner>[^\[\]]*)\]$", re.I)
_SAFE_EXPR_RE = re.compile(r"^[\w.$\s+\-*/()<>&|^~%!]+$|^'(?:\\.|[^'\\])'$")
_FARPTR_RE = re.compile(r"^(?!\s*[cdefgs]s\s*:)([^\[\]:,]+):([^\[\]:,]+)$", re.I)

_SENTINEL = (1 << 64) - 1
_INTERNAL = "__x86s_"


def _number_value(tok: str):
    """Value of an integer literal token (keystone/GAS spellings), or None."""
    t = tok.lower()
    try:
        if t.startswith("0x") and len(t) > 2:
            return int(t[2:], 16)
        if t.startswith("0b") and len(t) > 2 and set(t[2:]) <= set("01"):
            return int(t[2:], 2)
        if t.endswith("h") and t[0].isdigit() and all(c in "0123456789abcdef" for c in t[:-1]):
            return int(t[:-1], 16)
        if t.isdigit():
            return int(t, 8) if (t.startswith("0") and len(t) > 1 and set(t) <= set("01234567")) \
                else int(t, 10)
    except ValueError:
        return None
    return None


def _scan(text: str):
    """Split one physical line into (statements, had_comment): ``#`` starts a comment and ``;``
    separates statements, both outside string/char literals. Raises ValueError on an unterminated
    string."""
    stmts, cur, i, n = [], [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ValueError("unterminated string")
            cur.append(text[i:j + 1])
            i = j + 1
            continue
        if c == "'":
            m = re.match(r"'(?:\\.|[^'\\])'", text[i:])
            if m:
                cur.append(m.group(0))
                i += m.end()
                continue
            cur.append(c)
            i += 1
            continue
        if c == "#":
            break
        if c == ";":
            stmts.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    stmts.append("".join(cur))
    return [s.strip() for s in stmts]


def _split_operands(ops: str):
    """Top-level comma split (outside brackets, parentheses and quotes)."""
    out, cur, depth, i = [], [], 0, 0
    while i < len(ops):
        c = ops[i]
        if c in "\"'":
            m = re.match(r'"(?:\\.|[^"\\])*"' if c == '"' else r"'(?:\\.|[^'\\])'", ops[i:])
            if m:
                cur.append(m.group(0))
                i += m.end()
                continue
        if c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        elif c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    last = "".join(cur).strip()
    if last or out:
        out.append(last)
    return out


def _idents(expr: str):
    return [t for t in _TOKEN_RE.findall(expr) if re.match(_IDENT + "$", t)]


def _has_register(expr: str) -> bool:
    return any(t.lower() in _REGISTERS for t in _idents(expr))


def _safe_expr(expr: str) -> bool:
    if not expr.strip() or not _SAFE_EXPR_RE.match(expr.strip()):
        return False
    return not any(t.lower() in _REGISTERS or t.lower() in _KEYWORDS for t in _idents(expr))


def _parse_mem(op: str):
    """``[size ptr] [seg:] [inner]`` (segment also accepted inside the bracket) -> dict or None."""
    m = _MEM_RE.match(op.strip())
    if not m:
        return None
    size, seg, inner = m.group("size"), m.group("seg"), m.group("inner").strip()
    m2 = re.match(r"^([cdefgs]s)\s*:(.*)$", inner, re.I)
    if m2 and not seg:
        seg, inner = m2.group(1), m2.group(2).strip()
    return {"size": (size or "").lower(), "seg": (seg or "").lower(), "inner": inner}


# directive names (the preprocessor's whitelist)

_DATA_DIRECTIVES = {".byte", ".short", ".value", ".2byte", ".int", ".long", ".4byte", ".quad",
                    ".8byte", ".octa", ".ascii", ".asciz", ".string", ".float", ".single",
                    ".double", ".uleb128", ".sleb128"}
_FILL_DIRECTIVES = {".fill", ".space", ".skip", ".zero"}
_ALIGN_DIRECTIVES = {".align", ".balign", ".p2align"}
_IF_DIRECTIVES = {".if", ".ifdef", ".ifndef", ".ifeq", ".ifne", ".ifgt", ".ifge", ".iflt", ".ifle",
                  ".ifb", ".ifnb", ".ifc", ".ifnc", ".ifeqs", ".ifnes"}
_REPT_DIRECTIVES = {".rept", ".irp", ".irpc"}
_SYMBOL_DIRECTIVES = {".set", ".equ", ".equiv"}
_DROPPED_DIRECTIVES = {".text", ".globl", ".global", ".intel_syntax"}
_NESTING_DIRECTIVES = (_IF_DIRECTIVES | _REPT_DIRECTIVES
                       | {".else", ".elseif", ".endif", ".macro", ".endm", ".endmacro", ".endr"})
_ALL_DIRECTIVES = (_NESTING_DIRECTIVES | _DATA_DIRECTIVES | _FILL_DIRECTIVES | _ALIGN_DIRECTIVES
                   | _SYMBOL_DIRECTIVES | _DROPPED_DIRECTIVES
                   | {".word", ".exitm", ".purgem", ".error", ".err", ".incbin", ".end", ".include",
                      ".code16", ".code32", ".code64", ".section", ".data", ".bss", ".org"})
