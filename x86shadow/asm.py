"""Keystone front end: the only way guest code (firmware and programs) is assembled.

What this module adds on top of keystone 0.9.2 (docs/ARCHITECTURE.md, "Guest program contract"):

* ``.include "file"`` (relative to the including file, nested, cycle guard), predefined symbols
  (``.set NAME, value`` lines in front of the source; line numbers are kept), ``.error "text"``.
* Errors that name the file and line: ``prog.asm:12: invalid mnemonic 'foo eax'``. Keystone reports
  neither line nor symbol name: a failed assembly is diagnosed by bisecting over line prefixes
  (open blocks closed, symbols defined by later lines stubbed as labels) and undefined symbols are
  named. Users never see a ``KsError``, a traceback, a hang or a crash: everything is an
  :class:`AsmError`. Errors found by the preprocessor in a statement are deferred to that statement
  (reported only if keystone assembles it), so ``.if BITS == 64`` branches may hold 64-bit code.
* Keystone's mis-encodings are rewritten or rejected (each checked in tests/test_asm.py):

  - 32-bit ``lgdt/lidt/sgdt/sidt`` carry a bogus 0x66 prefix (24-bit base)   -> correct bytes
  - 32-bit ``ljmp SEL:OFF`` is a 16-bit far jump (66 EA ptr16:16)             -> EA ptr16:32
  - ``iret`` is the 16-bit ``iretw`` (66 CF) in both modes                    -> iretd / iretq
  - ``pushf``/``popf`` get a 0x66 prefix (16-bit) in both modes               -> pushfd / pushfq
  - 32-bit ``push/pop cs|ds|es|ss`` get a 0x66 prefix (a 2-byte push)         -> 1-byte opcodes
  - 64-bit ``mov r64, qword ptr [abs]`` (any register but rax) is encoded RIP-relative with the
    absolute value as displacement                                            -> SIB absolute form
  - 64-bit absolute memory operands no encoding reaches (2 GiB..top 2 GiB, not RIP-reachable) are
    silently truncated or sign-extended                                       -> rejected
  - ``movsd`` (string op) is rejected; 32-bit ``movsq/cmpsq/cdqe/cqo`` silently become
    movsd/cmpsd/cwde/cdq; 64-bit ``into/salc`` emit invalid opcodes          -> fixed / rejected
  - 64-bit ``ljmp/lcall SEL:OFF`` emit an opcode that does not exist in 64-bit mode -> rejected
  - ``.word`` out of range silently emits nothing; ``.equ`` redefinition silently empties the
    output; ``.error`` is silently ignored; ``mov eax, [`` assembles as ``[0]``  -> fixed / rejected
  - instruction operands with symbol expressions are silently mis-assembled: ``mov eax, 1 + S``
    and ``mov eax, -S`` become loads from ``[S]``, ``[ebx - S]`` is ``[ebx + S]``, ``[S*2 + ebx]``
    is ``[ebx + S]``; ``4 * S`` and parenthesised groups are "invalid operand"  -> the expression
    (the displacement, in a memory operand) is hoisted into a ``.set`` temporary, which keystone's
    directive parser evaluates correctly
  - ``push imm`` becomes a 16-bit push (66 6a / 66 68) for a symbol defined later, ``push dword 5``
    and 64-bit ``push 0x80000000``; ``push label`` (defined later) fails     -> ``68 imm32`` bytes
  - a symbol defined later is a sign-extended imm32 in 64-bit ``mov/add/and r64, S``; immediates
    too wide for 8/16/32-bit operands are silently truncated                -> every immediate with
    a symbol is compared, after assembly, with capstone's decoding; wrong ones are rejected
  - malformed macro arguments / .irp values / unknown ``\\name`` references hang keystone or
    silently drop the expansion (``m 1 2`` drops it)                           -> checked
  - ``nop # comment`` (comment after an operand-less instruction) fails       -> comments stripped
  - crashes (``.bss``, ``.section``, ``.cfi_*``, ``.org`` to a forward label), endless loops
    (malformed expressions such as ``.byte ^``, ``.fill %``, ``jmp % fs``, empty operands, labels
    named like conditionals, integer literals wider than 64 bits, unterminated strings, huge
    ``.align``) -> a directive whitelist and a syntax check of every expression and operand.
  - installing a symbol-resolver callback makes keystone drop every ``.align`` and evaluate
    comparisons with 64-bit constants wrongly: the code-producing instance never has one.

Left as keystone does it (documented): the ``offset`` keyword is unsupported (a bare label already
is an immediate: ``mov eax, label``); ``[rip + SYM]`` uses SYM as a displacement when SYM is a
constant defined before the use, as the target otherwise; 64-bit ``sysret``/``sysexit`` are the
REX.W forms (``sysretl``/``sysexitl`` give the 32-bit ones); ``ljmp [mem]`` takes an m16:32
pointer in both modes; ``mov ss, ax`` carries a harmless 0x66; ``.org``, ``$`` (use ``.``),
``jmp short/near`` and ``push dword`` are not supported; inside ``.macro``/``.rept``/``.irp``
bodies the hoisting and the post-assembly checks are skipped (a statement there may hold ``\\arg``
references, and labels would repeat), so the rewrites above do not see through macro arguments.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, Ks, KsError
import keystone.keystone_const as _kc

from . import layout

__all__ = [
    "AsmError", "Program", "assemble", "assemble_file", "assemble_program", "assemble_firmware",
    "program_modes", "firmware_path", "MODES",
]

MODES = ("32", "pae", "64")
_BITS = {"32": 32, "pae": 32, "64": 64}


class AsmError(Exception):
    """A bad guest program: the message names file and line (``prog.asm:12: ...``)."""

    def __init__(self, message: str, filename: str | None = None, line: int | None = None):
        self.detail = message
        self.filename = filename
        self.line = line
        if filename and line:
            text = f"{filename}:{line}: {message}"
        elif filename:
            text = f"{filename}: {message}"
        else:
            text = message
        super().__init__(text)


class _Fatal(AsmError):
    """A structural error (block nesting, .include) raised at once; other errors found while
    preprocessing are deferred to the statement (it may sit in a .if branch never assembled)."""


@dataclass(frozen=True)
class Program:
    """An assembled guest program: ``code`` is loaded at ``base`` and entered at ``entry``."""
    code: bytes
    base: int
    entry: int
    modes: tuple = MODES
    path: str = ""
    mode: str = ""


# --------------------------------------------------------------------------------------------
# lexical helpers

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


# --------------------------------------------------------------------------------------------
# syntax checks: keystone hangs (an endless loop in its parser) on many malformed expressions
# and operands ('.byte ^', '.fill %', '.long /', 'jmp % fs : push', '.if ,', ...), so every
# expression and operand is parsed here before keystone sees it.

_EXPR_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH](?![\w.$])|[0-9]+)(?P<bad>[\w.$]*)
  | (?P<chr>'(?:\\.|[^'\\])')
  | (?P<id>[A-Za-z_.$][\w.$@]*)
  | (?P<op><<|>>|<=|>=|==|!=|<>|&&|\|\||[-+*/%&|^~!<>()\[\]:])
""", re.X)
_UNARY = {"+", "-", "~", "!"}
_BINARY = {"+", "-", "*", "/", "%", "<<", ">>", "&", "|", "^", "<", ">", "<=", ">=", "==", "!=",
           "<>", "&&", "||"}
_SIZES = {"byte", "word", "dword", "fword", "qword", "tbyte", "tword", "xmmword", "ymmword",
          "zmmword", "oword"}


class _SyntaxProblem(ValueError):
    pass


class _TemplateRisk(Exception):
    pass


_TEMPLATE_RISK = ("inside a .macro/.rept/.irp body keystone mis-assembles this operand expression "
                  "(a symbol after a number or a unary operator, a subtracted or scaled symbol, "
                  "parentheses): define its value with .set before the body")


def _expr_tokens(text: str):
    toks, i = [], 0
    while i < len(text):
        m = _EXPR_TOKEN_RE.match(text, i)
        if not m:
            raise _SyntaxProblem(f"unexpected character '{text[i]}'")
        i = m.end()
        if m.group("ws"):
            continue
        if m.group("num") is not None:
            if m.group("bad"):
                raise _SyntaxProblem(f"bad number '{m.group(0)}'")
            toks.append(("num", m.group("num")))
        elif m.group("chr"):
            toks.append(("num", m.group("chr")))
        elif m.group("id"):
            toks.append(("id", m.group("id")))
        else:
            toks.append(("op", m.group("op")))
    return toks


class _ExprParser:
    """Recursive-descent check of a GAS/Intel expression or instruction operand."""

    def __init__(self, text: str, regs: bool):
        self.toks = _expr_tokens(text)
        self.i = 0
        self.regs = regs        # an instruction operand (registers, '$') or a directive argument

    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else (None, None)

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def expect_end(self):
        if self.i < len(self.toks):
            raise _SyntaxProblem(f"unexpected '{self.toks[self.i][1]}'")

    def expr(self):
        self.unary()
        while self.peek()[0] == "op" and self.peek()[1] in _BINARY:
            self.take()
            self.unary()

    def unary(self):
        while self.peek()[0] == "op" and self.peek()[1] in _UNARY:
            self.take()
        kind, val = self.take()
        if kind == "num":
            return
        if kind == "id":
            low = val.lower()
            if val.strip("$") == "":           # keystone hangs on '.byte $ - 1', 'push $ > x'
                raise _SyntaxProblem("'$' is not supported: use '.' for the current address")
            if low in _ALL_DIRECTIVES:                       # and on '.align .long, .byte'
                raise _SyntaxProblem(f"unexpected '{val}'")
            if low in _KEYWORDS:
                if low == "offset":
                    raise _SyntaxProblem("'offset' is not supported: a label is already an "
                                         "immediate ('mov eax, label')")
                raise _SyntaxProblem(f"unexpected '{val}'")
            if low in _REGISTERS and not self.regs:
                raise _SyntaxProblem(f"register '{val}' in an expression")
            if low == "st" and self.peek() == ("op", "("):      # x87 st(i)
                self.take()
                if self.take()[0] != "num" or self.take() != ("op", ")"):
                    raise _SyntaxProblem("bad st(i)")
            return
        if (kind, val) == ("op", "("):
            self.expr()
            if self.take() != ("op", ")"):
                raise _SyntaxProblem("missing ')'")
            return
        raise _SyntaxProblem("missing operand" if kind is None else f"unexpected '{val}'")

    def operand(self):
        if self.peek()[0] == "id" and self.peek()[1].lower() in ("short", "near", "far"):
            self.take()
        if self.peek()[0] == "id" and self.peek()[1].lower() in _SIZES:
            self.take()
            t = self.take()
            if t[0] != "id" or t[1].lower() != "ptr":
                raise _SyntaxProblem("expected 'ptr'")
        if self.peek()[0] == "id" and self.peek()[1].lower() in _SEGREGS \
                and self.peek(1) == ("op", ":"):
            self.take()
            self.take()
        if self.peek() == ("op", "["):
            self.take()
            if self.peek()[0] == "id" and self.peek()[1].lower() in _SEGREGS \
                    and self.peek(1) == ("op", ":"):
                self.take()
                self.take()
            self.expr()
            if self.take() != ("op", "]"):
                raise _SyntaxProblem("missing ']'")
        else:
            self.expr()
            if self.peek() == ("op", ":"):      # selector:offset
                self.take()
                self.expr()
        self.expect_end()


def _terms(toks):
    """Split an expression into its top-level additive terms: [(sign, tokens), ...]."""
    terms, cur, sign, depth, prev_operand = [], [], "+", 0, False
    for kind, val in toks:
        if kind == "op" and val in "+-" and depth == 0 and prev_operand:
            terms.append((sign, cur))
            cur, sign, prev_operand = [], val, False
            continue
        if kind == "op" and val in "+-" and depth == 0 and not cur:
            sign = "-" if (val == "-") != (sign == "-") else "+"     # leading unary sign
            continue
        cur.append((kind, val))
        if val == "(":
            depth += 1
        elif val == ")":
            depth -= 1
        prev_operand = kind in ("num", "id") or val == ")"
    if cur:
        terms.append((sign, cur))
    return terms


def _is_immediate(op: str) -> bool:
    """An immediate operand: an expression without brackets, registers or a selector."""
    if "[" in op or ":" in op or not op.strip():
        return False
    try:
        toks = _expr_tokens(op)
    except _SyntaxProblem:
        return False
    return not any(k == "id" and (v.lower() in _REGISTERS or v.lower() in _KEYWORDS)
                   for k, v in toks)


def _literal_value(op: str):
    """The value of a plain integer or character literal (optionally negated), else None."""
    t = op.strip()
    neg = t.startswith("-")
    t = t[1:].strip() if neg else t
    m = re.match(r"^'(\\?.)'$", t)
    v = (ord(m.group(1)[-1]) if len(m.group(1)) == 1 or m.group(1)[1] not in "ntr0\\'"
         else None) if m else _number_value(t)
    if v is None:
        return None
    return -v if neg else v


def _is_branch(mnemonic: str) -> bool:
    return mnemonic.startswith("j") or mnemonic in ("call", "loop", "loope", "loopne", "loopz",
                                                    "loopnz", "xbegin")


def _placeholders(text: str) -> str:
    """Macro/.irp parameter references (\\name, \\@, \\()) replaced by an identifier."""
    return re.sub(r"\\(\w+|@|\(\))", "x0", text)


def _check_macro_args(ops: str):
    """Arguments of a macro invocation or .irp values: strings or operands (keystone hangs or
    silently drops the expansion for malformed ones; space-separated arguments are dropped)."""
    if not ops.strip():
        return
    for arg in _split_operands(ops):
        if not arg or _STRING_RE.match(arg):
            continue
        m = re.match(r"^" + _IDENT + r"\s*=(?!=)\s*(.+)$", arg)      # keyword argument
        if m and _STRING_RE.match(m.group(1).strip()):
            continue
        try:
            _check_operand(m.group(1) if m else arg)
        except _SyntaxProblem as e:
            raise _SyntaxProblem(f"bad macro argument '{arg}' ({e}; separate arguments with "
                                 f"commas)") from None


def _check_expr(text: str, regs=False):
    p = _ExprParser(text, regs)
    p.expr()
    p.expect_end()


def _check_operand(text: str):
    text = re.sub(r"(\{[\w\s-]*\})+\s*$", "", text)     # AVX-512 {k1}{z} decorations
    _ExprParser(text, True).operand()


_STRING_RE = re.compile(r'^"(?:\\.|[^"\\])*"$')
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.I)


def _check_list(args: str, item, what: str, lo=0, hi=None):
    if not args.strip():
        if lo:
            raise _SyntaxProblem(f"missing {what}")
        return
    items = _split_operands(args)
    if len(items) < lo or (hi is not None and len(items) > hi):
        raise _SyntaxProblem("wrong number of arguments")
    for it in items:
        if not it:
            raise _SyntaxProblem(f"empty {what}")
        item(it)


def _check_string(text):
    if not _STRING_RE.match(text.strip()):
        raise _SyntaxProblem(f"expected a string, not '{text}'")


def _check_float(text):
    if not _FLOAT_RE.match(text.strip()):
        raise _SyntaxProblem(f"expected a floating-point number, not '{text}'")


# --------------------------------------------------------------------------------------------
# the preprocessor: source lines -> keystone text, one output line per source line

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
_CLOSER = {"if": ".endif", "macro": ".endm", "rept": ".endr"}
_MAX_FILL = 16 << 20
_MAX_ALIGN = 1 << 16


@dataclass
class _Stmt:
    orig: str
    text: str
    stack: tuple = ()          # open blocks after this statement (for prefix closers)
    hint: str | None = None    # better message for a range error on a rewritten statement
    error_text: str | None = None   # this statement is a user's .error (or a deferred error)
    error_plain: bool = False       # error_text is our own message, not a .error directive


@dataclass
class _Line:
    file: str
    lineno: int
    orig: str
    stmts: list = field(default_factory=list)
    stack: tuple = ()
    defines: set = field(default_factory=set)   # symbols this line defines (labels, .set, =)

    @property
    def text(self):
        return " ; ".join(s.text for s in self.stmts if s.text)


@dataclass
class _Check:
    kind: str          # "mem" (64-bit absolute memory operand) or "imm" (immediate vs register)
    line: _Line
    stmt: _Stmt
    width: int = 0


_NESTING_DIRECTIVES = (_IF_DIRECTIVES | _REPT_DIRECTIVES
                       | {".else", ".elseif", ".endif", ".macro", ".endm", ".endmacro", ".endr"})
_ALL_DIRECTIVES = (_NESTING_DIRECTIVES | _DATA_DIRECTIVES | _FILL_DIRECTIVES | _ALIGN_DIRECTIVES
                   | _SYMBOL_DIRECTIVES | _DROPPED_DIRECTIVES
                   | {".word", ".exitm", ".purgem", ".error", ".err", ".incbin", ".end", ".include",
                      ".code16", ".code32", ".code64", ".section", ".data", ".bss", ".org"})
_EXPR_IF = {".if", ".ifeq", ".ifne", ".ifgt", ".ifge", ".iflt", ".ifle", ".elseif", ".rept"}
_IDENT_RE = re.compile(_IDENT + "$")


def _check_directive_args(name: str, args: str):
    """Raise _SyntaxProblem for arguments keystone would hang on (or silently misread)."""
    def ident(t):
        if not _IDENT_RE.match(t.strip()):
            raise _SyntaxProblem(f"expected a name, not '{t}'")
    if name in _DATA_DIRECTIVES - {".ascii", ".asciz", ".string", ".float", ".single",
                                   ".double"} or name == ".word":
        _check_list(args, _check_expr, "value")
    elif name in (".ascii", ".asciz", ".string"):
        _check_list(args, _check_string, "string", lo=1)
    elif name in (".float", ".single", ".double"):
        _check_list(args, _check_float, "number", lo=1)
    elif name == ".fill" or name in _ALIGN_DIRECTIVES:
        _check_list(args, _check_expr, "argument", lo=1, hi=3)
    elif name in _FILL_DIRECTIVES:
        _check_list(args, _check_expr, "argument", lo=1, hi=2)
    elif name in _EXPR_IF:
        if not args:
            raise _SyntaxProblem("missing expression")
        _check_expr(args)
    elif name in (".ifdef", ".ifndef", ".purgem"):
        ident(args)
    elif name in (".else", ".endif", ".endm", ".endmacro", ".endr", ".exitm", ".text", ".err"):
        if args:
            raise _SyntaxProblem(f"unexpected '{args}'")
    elif name in (".globl", ".global"):
        _check_list(args, ident, "name", lo=1)
    elif name == ".irp":
        m = re.match(r"(" + _IDENT + r")\s*(?:,(.*))?$", args)
        if not m:
            raise _SyntaxProblem("expected '.irp name, values'")
        _check_macro_args(m.group(2) or "")
    elif name == ".irpc":
        if not re.match(_IDENT + r"\s*,\s*[\w.]+\s*$", args):
            raise _SyntaxProblem("expected '.irpc name, characters' (letters, digits, '_', '.')")
    elif name == ".macro":
        if not re.match(_IDENT + r"(\s|,|$)", args):
            raise _SyntaxProblem("'.macro' needs a name")
    elif name in _SYMBOL_DIRECTIVES:
        m = re.match(r"^(" + _IDENT + r")\s*,\s*(\S.*)$", args)
        if not m:
            raise _SyntaxProblem(f"expected '{name} NAME, value'")
        _check_expr(m.group(2))
    elif name == ".incbin":
        items = _split_operands(args)
        if not items or not _STRING_RE.match(items[0]) or len(items) > 3:
            raise _SyntaxProblem("expected .incbin \"file\"[, skip[, count]]")
        for it in items[1:]:
            if not it:
                raise _SyntaxProblem("empty argument")
            _check_expr(it)


class _Pre:
    def __init__(self, bits: int):
        self.bits = bits
        self.lines: list[_Line] = []
        self.checks: list[_Check] = []
        self.stack: list[tuple[str, _Line]] = []
        self.macros: set[str] = set()
        self.errors = 0
        self.ended = False
        self.program_file: str | None = None
        self.temps = 0
        self.predefined: set[str] = set()
        self.tparams: list[set] = []        # parameter names of the open .macro/.irp blocks
        self.deferred: dict = {}            # N -> (statement, line) of __x86s_errN

    # ---- input
    def add_synthetic(self, text: str, origin: str):
        line = _Line(origin, 0, text)
        for s in _scan(text):
            if s:
                line.stmts.append(_Stmt(s, s, tuple(k for k, _ in self.stack)))
        line.stack = tuple(k for k, _ in self.stack)
        self.lines.append(line)

    def add_symbols(self, symbols):
        for name, value in (symbols or {}).items():
            if not re.match(_IDENT + "$", str(name)) or str(name).lower() in _REGISTERS:
                raise AsmError(f"invalid predefined symbol name {name!r}")
            self.add_synthetic(f".set {name}, {int(value)}", "<predefined>")
            self.predefined.add(str(name))

    def add_text(self, text: str, display: str, basedir: str, chain: tuple):
        for lineno, raw in enumerate(text.split("\n"), 1):
            if self.ended:
                return
            self._line(raw.rstrip("\r"), display, lineno, basedir, chain)

    def add_file(self, path: str, display: str, chain: tuple = (), where=None):
        real = os.path.realpath(path)
        if real in chain:
            raise AsmError(f".include cycle: '{display}' includes itself", *(where or (None, None)))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            if where:
                raise AsmError(f"cannot read included file '{display}': {e.strerror}",
                               *where) from None
            raise AsmError(f"cannot read: {e.strerror}", display) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        self.add_text(text, display, os.path.dirname(path), chain + (real,))

    def finish(self):
        if self.stack:
            kind, line = self.stack[-1]
            opener = {"if": ".if", "macro": ".macro", "rept": ".rept/.irp"}[kind]
            raise _Fatal(f"'{opener}' without '{_CLOSER[kind]}'", line.file, line.lineno)

    # ---- one physical line
    def _line(self, raw: str, file: str, lineno: int, basedir: str, chain: tuple):
        where = (file, lineno)
        try:
            stmts = _scan(raw)
            problem = None
        except ValueError as e:
            stmts, problem = [raw.strip()], str(e)
        code_part = " ; ".join(s for s in stmts if s)
        line = _Line(file, lineno, code_part)
        if problem is None and any(ord(c) > 126 or (ord(c) < 32 and c != "\t") for c in code_part):
            problem = "non-ASCII character outside a comment"
        if problem is not None:
            st = _Stmt(code_part, "")
            st.text = self._defer(st, problem, line)
            st.stack = line.stack = tuple(k for k, _ in self.stack)
            line.stmts.append(st)
            self.lines.append(line)
            return
        first = stmts[0].split(None, 1) if stmts and stmts[0] else []
        if first and first[0].lower() == ".include":
            if len([s for s in stmts if s]) != 1:
                raise _Fatal("'.include' must be alone on its line", *where)
            m = re.match(r'^\.include\s+"([^"]+)"\s*$', stmts[0], re.I)
            if not m:
                raise _Fatal("expected .include \"file\"", *where)
            name = m.group(1)
            path = name if os.path.isabs(name) else os.path.join(basedir, name)
            if os.path.isabs(name) or file.startswith("<"):
                disp = name
            else:
                disp = os.path.normpath(os.path.join(os.path.dirname(file), name))
            self.lines.append(line)            # keeps the include line itself (empty) in order
            line.stack = tuple(k for k, _ in self.stack)
            self.add_file(path, disp, chain, where)
            return
        for s in stmts:
            if self.ended:
                break
            if not s:
                continue
            st = _Stmt(s, "")
            try:
                st.text = self._statement(s, line, st, basedir)
            except _Fatal:
                raise
            except AsmError as e:
                st.text = self._defer(st, e.detail, line)
            st.stack = tuple(k for k, _ in self.stack)
            line.stmts.append(st)
        line.stack = tuple(k for k, _ in self.stack)
        self.lines.append(line)

    # ---- one statement
    def _err(self, msg, line):
        return AsmError(msg, line.file, line.lineno)

    def _defer(self, st: _Stmt, message: str, line: _Line) -> str:
        """Replace a statement by a reference to an undefined internal symbol: the error is
        reported (by _diagnose) only if keystone actually assembles the statement."""
        self.errors += 1
        st.error_text, st.error_plain = message, True
        self.deferred[self.errors] = (st, line)
        return f".long {_INTERNAL}err{self.errors}"

    def _check_numbers(self, s, line):
        # keystone hangs on integer literals wider than 64 bits
        for tok in _TOKEN_RE.findall(re.sub(r'"(?:\\.|[^"\\])*"', '""', s)):
            if tok[0].isdigit():
                v = _number_value(tok)
                if v is not None and v >= 1 << 64:
                    raise self._err(f"number {tok} does not fit in 64 bits", line)

    def _statement(self, s: str, line: _Line, st: _Stmt, basedir: str) -> str:
        if self._in_template() and "\\" in s and not s.startswith("."):
            # holds \arg / \@ references that keystone substitutes at expansion: check the
            # syntax with a placeholder in their place, hand the text over unchanged
            self._template_check(s, line)
            return s
        self._check_numbers(s, line)
        bare = re.sub(r'"(?:\\.|[^"\\])*"|' + r"'(?:\\.|[^'\\])'", "", s)
        for o, c in ("[]", "()"):           # keystone reads 'mov eax, [' as 'mov eax, [0]'
            depth = 0
            for ch in bare:
                depth += (ch == o) - (ch == c)
                if depth < 0:
                    break
            if depth:
                raise self._err(f"unbalanced '{o}{c}' in '{s}'", line)
        labels = []
        while True:
            if re.match(r"\s*\d+\s*:", s):
                raise self._err("numeric local labels are not supported: use a named label", line)
            m = _LABEL_RE.match(s)
            if not m or m.group(1).lower() in _SEGREGS:
                break
            name = m.group(1)
            if name.lower() in _REGISTERS or name.lower() in _KEYWORDS:
                raise self._err(f"'{name}' is a reserved word and cannot be a label", line)
            if name == "." or name.lower() in _ALL_DIRECTIVES:    # keystone hangs on '.if :'
                if name.lower() in _NESTING_DIRECTIVES:
                    raise _Fatal(f"'{name}' cannot be a label", line.file, line.lineno)
                raise self._err(f"'{name}' cannot be a label", line)
            if name in self.predefined:     # keystone would silently accept the label
                raise self._err(f"'{name}' is a predefined symbol and cannot be a label", line)
            labels.append(name + ":")
            line.defines.add(name)
            s = s[m.end():].strip()
        if s:
            # keystone hangs on statements that start with punctuation or have empty operands
            if not re.match(r"[A-Za-z_.]" + (r"|\\" if self._in_template() else ""), s):
                raise self._err(f"expected an instruction or directive: '{s}'", line)
            rest = s.split(None, 1)[1] if len(s.split(None, 1)) > 1 else ""
            if rest and not rest.lstrip().startswith("=") and \
                    any(not o for o in _split_operands(rest)):
                raise self._err(f"empty operand in '{s}'", line)
        body = self._body(s, line, st, basedir) if s else ""
        return " ".join(labels + ([body] if body else []))

    def _check_refs(self, s: str, line: _Line):
        """Every \\name must be a parameter of an enclosing .macro/.irp (keystone hangs on an
        unknown one, e.g. '\\a' in a .rept body)."""
        known = set().union(*self.tparams) if self.tparams else set()
        for m in re.finditer(r"\\(\w+|@|\(\)|.?)", re.sub(r'"(?:\\.|[^"\\])*"', '""', s)):
            ref = m.group(1)
            if ref in ("@", "()") or ref in known:
                continue
            raise self._err(f"'\\{ref}' is not a parameter of an enclosing .macro/.irp", line)

    def _template_check(self, s: str, line: _Line):
        self._check_refs(s, line)
        sub = _placeholders(s)
        self._check_numbers(sub, line)
        while True:
            m = _LABEL_RE.match(sub)
            if not m or m.group(1).lower() in _SEGREGS:
                break
            sub = sub[m.end():].strip()
        if not sub:
            return
        try:
            if sub.startswith("."):
                parts = sub.split(None, 1)
                _check_directive_args(parts[0].lower(), parts[1] if len(parts) > 1 else "")
                return
            if not re.match(r"[A-Za-z_.]", sub):
                raise _SyntaxProblem("expected an instruction or directive")
            m = re.match(r"^(" + _IDENT + r")\s*=(?!=)(.*)$", sub)
            if m:
                _check_expr(m.group(2))
                return
            parts = sub.split(None, 1)
            mn, ops = parts[0], (parts[1] if len(parts) > 1 else "")
            while mn.lower() in _INSN_PREFIXES and ops:
                parts = ops.split(None, 1)
                mn, ops = parts[0], (parts[1] if len(parts) > 1 else "")
            if mn.lower() in self.macros:
                _check_macro_args(ops)
            elif ops:
                for op in _split_operands(ops):
                    if not op:
                        raise _SyntaxProblem("empty operand")
                    _check_operand(op)
        except _SyntaxProblem as e:
            raise self._err(f"{e} in '{s}'", line) from None

    def _body(self, s: str, line: _Line, st: _Stmt, basedir: str) -> str:
        if s.startswith("."):
            return self._directive(s, line, st, basedir)
        m = re.match(r"^(" + _IDENT + r")\s*=(?!=)(.*)$", s)
        if m:
            if m.group(1).lower() in _REGISTERS:
                raise self._err(f"'{m.group(1)}' is a register name and cannot be a symbol", line)
            if not self._in_template():
                try:
                    _check_expr(m.group(2))
                except _SyntaxProblem as e:
                    raise self._err(f"{e} in '{s}'", line) from None
            line.defines.add(m.group(1))
            return s
        return self._instruction(s, line, st)

    # ---- directives
    def _directive(self, s: str, line: _Line, st: _Stmt, basedir: str) -> str:
        parts = s.split(None, 1)
        name, args = parts[0].lower(), (parts[1].strip() if len(parts) > 1 else "")
        err = lambda msg: self._err(msg, line)  # noqa: E731
        fatal = lambda msg: _Fatal(msg, line.file, line.lineno)  # noqa: E731
        top = self.stack[-1][0] if self.stack else None
        if "\\" in args and name not in (".ascii", ".asciz", ".string", ".error", ".incbin"):
            try:
                self._check_refs(args, line)
            except AsmError as e:
                raise (fatal(e.detail) if name in _NESTING_DIRECTIVES else e) from None
        if True:
            try:
                _check_directive_args(name, _placeholders(args) if self._in_template() else args)
            except _SyntaxProblem as e:
                msg = f"{e} in '{s}'"
                raise fatal(msg) if name in _NESTING_DIRECTIVES else err(msg)

        if name in _IF_DIRECTIVES:
            if name in (".ifdef", ".ifndef") and not re.match(_IDENT + "$", args):
                raise fatal(f"'{name}' needs a symbol name")
            if name not in (".ifb", ".ifnb") and not args:
                raise fatal(f"'{name}' needs an argument")
            self.stack.append(("if", line))
            return s
        if name in (".else", ".elseif"):
            if top != "if":
                raise fatal(f"'{name}' without '.if'")
            return s
        if name == ".endif":
            if top != "if":
                raise fatal("'.endif' without '.if'")
            self.stack.pop()
            return s
        if name == ".macro":
            m = re.match(r"^(" + _IDENT + r")", args)
            if not m:
                raise fatal("'.macro' needs a name")
            if "macro" in [k for k, _ in self.stack]:
                raise fatal("nested '.macro' definitions are not supported")
            self.macros.add(m.group(1).lower())
            self.stack.append(("macro", line))
            rest = args[m.end():]
            self.tparams.append({p.group(1) for p in re.finditer(
                r"(?:^|[\s,])([A-Za-z_][\w]*)(?=\s*(?:=|:req|:vararg|,|\s|$))", rest)})
            return s
        if name in (".endm", ".endmacro"):
            if top != "macro":
                raise fatal(f"'{name}' without '.macro'")
            self.stack.pop()
            self.tparams.pop()
            return s
        if name == ".exitm":
            if "macro" not in [k for k, _ in self.stack]:
                raise fatal("'.exitm' outside a macro")
            return s
        if name == ".purgem":
            return s
        if name in _REPT_DIRECTIVES:
            if not args:
                raise fatal(f"'{name}' needs an argument")
            if name == ".rept":
                v = _number_value(args)
                if v is not None and v > 1_000_000:
                    raise fatal(f"'.rept' count {args} is too large")
            self.stack.append(("rept", line))
            m = re.match(r"^(" + _IDENT + r")", args)
            self.tparams.append({m.group(1)} if name != ".rept" and m else set())
            return s
        if name == ".endr":
            if top != "rept":
                raise fatal("'.endr' without '.rept'")
            self.stack.pop()
            self.tparams.pop()
            return s
        if name in _SYMBOL_DIRECTIVES:
            m = re.match(r"^(" + _IDENT + r")\s*,\s*(\S.*)$", args)
            if not m:
                raise err(f"expected '{name} NAME, value'")
            if m.group(1).lower() in _REGISTERS:
                raise err(f"'{m.group(1)}' is a register name and cannot be a symbol")
            line.defines.add(m.group(1))
            if name == ".equ":            # keystone: .equ redefinition silently empties the output
                return ".set " + args
            return s
        if name in _DATA_DIRECTIVES:
            return s
        if name == ".word":               # keystone: .word out of range silently emits nothing
            return ".short " + args if args else ".short"
        if name in _FILL_DIRECTIVES:
            ops = _split_operands(args)
            if not ops or not ops[0]:
                raise err(f"'{name}' needs a count")
            v = _number_value(ops[0])
            if v is not None and v > _MAX_FILL:
                raise err(f"'{name}' count {ops[0]} is too large")
            if name == ".fill" and len(ops) > 1:
                v = _number_value(ops[1])
                if v is not None and v > 8:
                    raise err("'.fill' size must be at most 8")
            return s
        if name in _ALIGN_DIRECTIVES:
            ops = _split_operands(args)
            if not ops or not ops[0]:
                raise err(f"'{name}' needs an alignment")
            v = _number_value(ops[0])
            if v is not None:
                if name == ".p2align":
                    if v > 16:
                        raise err("'.p2align' exponent must be at most 16")
                elif v == 0 or v & (v - 1) or v > _MAX_ALIGN:
                    raise err(f"'{name}' alignment must be a power of two up to {_MAX_ALIGN:#x}")
            return s
        if name in (".error", ".err"):
            if name == ".error":
                m = re.match(r'^"((?:\\.|[^"\\])*)"$', args)
                if not m:
                    raise err("expected .error \"message\"")
                st.error_text = m.group(1).encode().decode("unicode_escape", "replace")
            else:
                st.error_text = ".err encountered"
            self.errors += 1
            self.deferred[self.errors] = (st, line)
            return f".long {_INTERNAL}err{self.errors}"
        if name == ".incbin":
            m = re.match(r'^"([^"]+)"(.*)$', args)
            if not m:
                raise err("expected .incbin \"file\"")
            path = m.group(1) if os.path.isabs(m.group(1)) else os.path.join(basedir, m.group(1))
            if not os.path.isfile(path):
                raise err(f"cannot read '{m.group(1)}'")
            apath = os.path.abspath(path)
            if '"' in apath or "\\" in apath or any(ord(c) > 126 for c in apath):
                raise err(f"unsupported characters in path '{apath}'")
            return f'.incbin "{apath}"{m.group(2)}'
        if name == ".end":
            if self.stack:
                raise fatal("'.end' inside a conditional, macro or repeat block")
            self.ended = True
            return ""
        if name == ".intel_syntax":
            if args.lower() not in ("", "noprefix"):
                raise err("only '.intel_syntax noprefix' is supported")
            return ""
        if name in _DROPPED_DIRECTIVES:
            return ""
        if name in (".code16", ".code32", ".code64"):
            raise err(f"'{name}' is not supported: the mode is fixed when the program is assembled")
        if name == ".include":
            raise err("'.include' must be alone on its line")
        raise err(f"unsupported directive '{parts[0]}'")

    # ---- instructions
    def _instrumentable(self):
        return not self._in_template()

    def _in_template(self):
        """Inside a .macro/.rept/.irp body: the text may hold \\arg references and repeats."""
        return any(k in ("macro", "rept") for k, _ in self.stack)

    def _instruction(self, s: str, line: _Line, st: _Stmt) -> str:
        err = lambda msg: self._err(msg, line)  # noqa: E731
        prefix = ""
        m = re.match(r"^(\S+)\s*(.*)$", s)
        mn, ops = m.group(1), m.group(2).strip()
        while mn.lower() in _INSN_PREFIXES and ops:
            prefix += mn + " "
            m = re.match(r"^(\S+)\s*(.*)$", ops)
            mn, ops = m.group(1), m.group(2).strip()
        low = mn.lower()
        if low in self.macros:
            try:
                _check_macro_args(ops)
            except _SyntaxProblem as e:
                raise err(f"{e} in '{s}'") from None
            return s
        if not re.match(r"^[A-Za-z_.][\w.]*$", mn):
            raise err(f"invalid mnemonic '{s}'")
        if ops:
            for op in _split_operands(ops):
                if not op:
                    raise err(f"empty operand in '{s}'")
                try:
                    _check_operand(op)
                except _SyntaxProblem as e:
                    raise err(f"invalid operand '{op}' ({e}) in '{s}'") from None
        hoisted = ""
        if ops:
            try:
                hoisted, ops = self._hoist(ops)
            except _TemplateRisk as e:
                raise err(f"{e} '{s}'") from None
            if hoisted:
                s = prefix + mn + " " + ops
        out = self._instruction2(s, prefix, mn, low, ops, line, st)
        return hoisted + out

    def _hoist(self, ops: str):
        """Keystone's Intel operand parser silently mis-assembles expressions with symbols:
        ``mov eax, 1 + S`` becomes ``mov eax, [S]``, ``mov eax, -S`` a load from ``[S]``,
        ``[ebx - S]`` is ``[ebx + S]``, ``[S*2 + ebx]`` is ``[ebx + S]``; and it rejects
        parenthesised groups (``mov eax, (A & 0xffff) | 1``). Its directive parser evaluates
        expressions correctly, so every such expression becomes a temporary symbol first:
        ``.set __x86s_eN, (1 + S) ; mov eax, __x86s_eN``. In a memory operand only the
        displacement (the terms without a register) is replaced.
        Returns (the .set statements, the rewritten operands)."""
        sets, out = [], []
        for op in _split_operands(ops):
            try:
                out.append(self._hoist_operand(op, sets))
            except _SyntaxProblem:
                out.append(op)
        return "".join(sets), ", ".join(out)

    def _temp(self, expr: str, sets: list) -> str:
        name = f"{_INTERNAL}e{self.temps}"
        self.temps += 1
        sets.append(f".set {name}, ({expr}) ; ")
        return name

    def _hoist_operand(self, op: str, sets: list) -> str:
        toks = _expr_tokens(op)
        if not toks or any(v == "$" for _, v in toks):
            return op
        lead = ""
        if toks[0][0] == "id" and toks[0][1].lower() in ("short", "near", "far"):
            lead, toks = toks[0][1] + " ", toks[1:]
        if any(v in ("[", "]") for _, v in toks):
            m = _MEM_RE.match(" ".join(v for _, v in toks).replace("[ ", "[").replace(" ]", "]")
                              .replace(" :", ":"))
            if not m:
                return op
            inner = m.group("inner").strip()
            seg_in = ""
            m2 = re.match(r"^([cdefgs]s)\s*:(.*)$", inner, re.I)
            if m2:
                seg_in, inner = m2.group(1) + ":", m2.group(2).strip()
            regs, disp = [], []
            for sign, term in _terms(_expr_tokens(inner)):
                text = " ".join(v for _, v in term)
                if any(k == "id" and v.lower() in _REGISTERS for k, v in term):
                    regs.append((sign, text))
                else:
                    disp.append((sign, text, term))
            simple = len(disp) == 1 and disp[0][0] == "+" and len(disp[0][2]) == 1
            has_sym = any(k == "id" or v in ("(", ")") for _, _, term in disp for k, v in term)
            if not disp or simple or not has_sym:
                return op
            if self._in_template():
                # no temporaries in a macro/.rept body (keystone mishandles a redefined .set that
                # depends on a later label, and hangs on '.set x_\\@'): refuse what it misreads
                if any(v in ("(", ")") for _, _, term in disp for _, v in term) or any(
                        any(k == "id" for k, _ in term) and not (sg == "+" and len(term) == 1)
                        for sg, _, term in disp):
                    raise _TemplateRisk(_TEMPLATE_RISK)
                return op
            name = self._temp(" ".join(f"{sg} ({tx})" for sg, tx, _ in disp), sets)
            parts = [f"{'- ' if sg == '-' else ''}{tx}" if i == 0 else f"{sg} {tx}"
                     for i, (sg, tx) in enumerate(regs)]
            body = " ".join(parts + [("+ " if parts else "") + name])
            size = f"{m.group('size')} ptr " if m.group("size") else ""
            seg = f"{m.group('seg')}:" if m.group("seg") else ""
            return f"{lead}{size}{seg}[{seg_in}{body}]"
        # far pointer SEL:OFF, or an immediate
        if any(v == ":" for _, v in toks):
            i = next(j for j, (_, v) in enumerate(toks) if v == ":")
            sides = [toks[:i], toks[i + 1:]]
            if sides[0] and sides[0][0][0] == "id" and sides[0][0][1].lower() in _SEGREGS:
                return op
            fixed = [self._hoist_imm(side, sets) for side in sides]
            return lead + fixed[0] + ":" + fixed[1]
        return lead + self._hoist_imm(toks, sets)

    def _hoist_imm(self, toks, sets) -> str:
        text = " ".join(v for _, v in toks)
        if len(toks) <= 1 or any(k == "id" and v.lower() in _REGISTERS for k, v in toks):
            return text
        if any(k == "id" or v in ("(", ")") for k, v in toks):
            if self._in_template():
                if toks[0][0] != "id" or any(v in ("(", ")") for _, v in toks):
                    raise _TemplateRisk(_TEMPLATE_RISK)
                return text
            return self._temp(text, sets)
        return text

    def _instruction2(self, s, prefix, mn, low, ops, line, st):
        bits = self.bits
        err = lambda msg: self._err(msg, line)  # noqa: E731
        operands = _split_operands(ops)

        # --- mnemonics keystone silently encodes as something else in this mode
        if not operands:
            bad = _NOT_IN_32 if bits == 32 else _NOT_IN_64
            if low in bad:
                raise err(f"'{mn}' does not exist in {bits}-bit mode")
        # --- mnemonics keystone encodes with the wrong operand size (or rejects)
        if not operands:
            alias = {
                "iret": "iretd" if bits == 32 else "iretq",
                "pushf": "pushfd" if bits == 32 else "pushfq",
                "popf": "popfd" if bits == 32 else "popfq",
            }
            alias["movsd"] = ("movs dword ptr es:[edi], dword ptr [esi]" if bits == 32
                              else "movs dword ptr [rdi], dword ptr [rsi]")
            if bits == 64:
                alias.update({"sysretq": "sysret", "sysexitq": "sysexit",
                              "sysretl": ".byte 0x0f, 0x07", "sysretd": ".byte 0x0f, 0x07",
                              "sysexitl": ".byte 0x0f, 0x35", "sysexitd": ".byte 0x0f, 0x35"})
            if low in alias:
                if alias[low].startswith(".") and prefix:
                    raise err(f"'{prefix.strip()}' prefix not supported on '{mn}'")
                return prefix + alias[low]
        if low in ("lret", "lretl", "lretd", "lretq", "retfd", "retfl"):
            if low == "lretq" and bits == 32:
                raise err("'lretq' does not exist in 32-bit mode")
            return prefix + ("retfq" if low == "lretq" else "retf") + (" " + ops if ops else "")

        # --- far jump/call with an immediate selector:offset
        far = None
        if low in ("ljmp", "lcall") and len(operands) == 1:
            far = low[1:]
        elif low in ("jmp", "call") and len(operands) == 1:
            m2 = re.match(r"^far\s+(.*)$", operands[0], re.I)
            if m2:
                far, operands = low, [m2.group(1)]
            elif _FARPTR_RE.match(operands[0]):
                far = low
        if far:
            pm = _FARPTR_RE.match(operands[0])
            if pm:
                if bits == 64:
                    raise err(f"far {far} with an immediate selector:offset does not exist in "
                              f"64-bit mode: push the selector and the offset and use 'retfq', "
                              f"or use an indirect far {far} through memory")
                sel, off = pm.group(1).strip(), pm.group(2).strip()
                opcode = 0xEA if far == "jmp" else 0x9A
                if prefix:
                    raise err(f"'{prefix.strip()}' prefix not supported on a far {far}")
                return f".byte {opcode:#x} ; .long {off} ; .short {sel}"
            if low in ("jmp", "call"):      # 'jmp far [mem]'
                return prefix + "l" + low + " " + operands[0]

        # --- 32-bit push/pop of a segment register: keystone adds 0x66 (a 16-bit push)
        if bits == 32 and low in ("push", "pop") and len(operands) == 1 \
                and operands[0].lower() in ("cs", "ds", "es", "ss") and not prefix:
            seg = operands[0].lower()
            if low == "pop" and seg == "cs":
                raise err("'pop cs' does not exist")
            code = {"es": 0x06, "cs": 0x0E, "ss": 0x16, "ds": 0x1E}[seg] + (low == "pop")
            return f".byte {code:#x}"

        # --- 32-bit lgdt/lidt/sgdt/sidt: keystone adds 0x66 (a 24-bit base)
        if bits == 32 and low in ("lgdt", "lidt", "sgdt", "sidt") and len(operands) == 1:
            mem = _parse_mem(operands[0])
            if mem is None or mem["size"] not in ("", "fword"):
                raise err(f"'{low}' needs a memory operand")
            regs = [t.lower() for t in _idents(mem["inner"]) if t.lower() in _REGISTERS]
            if any(r not in _GPR32 for r in regs):
                raise err(f"'{low}': only 32-bit address registers are supported")
            # 0F 01 /r with the ModRM of 'add [mem], r32' (opcode 01 /r): the reg field selects
            # lgdt (2) lidt (3) sgdt (0) sidt (1)
            reg = {"sgdt": "eax", "sidt": "ecx", "lgdt": "edx", "lidt": "ebx"}[low]
            pre = [f"{_SEG_PREFIX[mem['seg']]:#x}"] if mem["seg"] else []
            if prefix:
                raise err(f"'{prefix.strip()}' prefix not supported on '{low}'")
            return f".byte {', '.join(pre + ['0x0f'])} ; add dword ptr [{mem['inner']}], {reg}"

        out = prefix + mn + (" " + ops if ops else "")
        instrument = self._instrumentable()

        # --- push imm: keystone emits a 16-bit push (66 6a / 66 68) for a symbol defined later
        #     and for 'push 0x80000000' in 64-bit mode, and rejects a label defined later
        if low == "push" and len(operands) == 1 and _is_immediate(operands[0]) and not prefix:
            out = f".byte 0x68 ; .long ({operands[0]})"
            st.hint = f"immediate '{operands[0]}' does not fit in a 32-bit push"
            if instrument:
                out = self._instrument("imm", line, st, operands[0], out)
            return out

        # --- 64-bit mov r64, [abs]: keystone encodes [rip + abs]
        if bits == 64 and low == "mov" and len(operands) == 2 and not prefix:
            dst = operands[0].lower()
            mem = _parse_mem(operands[1])
            if dst in _GPR64 and dst != "rax" and mem and mem["size"] in ("", "qword") \
                    and not _has_register(mem["inner"]):
                if not _safe_expr(mem["inner"]):
                    raise err(f"unsupported absolute address expression '{mem['inner']}'")
                r = _GPR64[dst]
                rex = 0x48 | (0x04 if r >= 8 else 0)
                modrm = ((r & 7) << 3) | 0x04
                pre = [_SEG_PREFIX[mem["seg"]]] if mem["seg"] else []
                bts = ", ".join(f"{b:#x}" for b in pre + [rex, 0x8B, modrm, 0x25])
                out = f".byte {bts} ; .long ({mem['inner']})"
                st.hint = (f"absolute address '{mem['inner']}' does not fit in a sign-extended "
                           f"32-bit displacement: load the address into a register first")
                if instrument:
                    return self._instrument("mem", line, st, mem["inner"], out)
                return out

        if not instrument:
            return out
        # --- checks done after assembly (64-bit absolute memory operands, immediates)
        if bits == 64:
            for op in operands:
                mem = _parse_mem(op)
                if mem and not _has_register(mem["inner"]) and _safe_expr(mem["inner"]):
                    out = self._instrument("mem", line, st, mem["inner"], out)
                    break
        imms = [op for op in operands if _is_immediate(op)]
        if len(imms) == 1 and not _is_branch(low):
            lit = _literal_value(imms[0])
            if lit is None:
                out = self._instrument("imm", line, st, imms[0], out)
            elif len(operands) == 2 and operands[1] is imms[0] \
                    and operands[0].lower() in _REG_WIDTH:
                width = _REG_WIDTH[operands[0].lower()]
                if not -(1 << (width - 1)) <= lit < (1 << width):
                    raise err(f"immediate {lit:#x} does not fit in {width} bits '{st.orig}'")
        return out

    def _instrument(self, kind, line, st, expr, out, width=0):
        n = len(self.checks)
        self.checks.append(_Check(kind, line, st, width))
        return f".set {_INTERNAL}v{n}, ({expr}) ; {_INTERNAL}a{n}: {out}"

    def table_text(self) -> str:
        parts = []
        for n in range(len(self.checks)):
            parts.append(f".ifdef {_INTERNAL}a{n}\n.quad {_INTERNAL}a{n}, {_INTERNAL}v{n}\n"
                         f".else\n.quad -1, -1\n.endif")
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# keystone calls

_KS_PHRASES = {
    _kc.KS_ERR_ASM_MNEMONICFAIL: "invalid mnemonic",
    _kc.KS_ERR_ASM_INVALIDOPERAND: "invalid operand",
    _kc.KS_ERR_ASM_MISSINGFEATURE: "instruction or operand not available in this mode",
    _kc.KS_ERR_ASM_SYMBOL_REDEFINED: "symbol redefined",
    _kc.KS_ERR_ASM_SYMBOL_MISSING: "undefined symbol",
    _kc.KS_ERR_ASM_EXPR_TOKEN: "unexpected token in expression",
    _kc.KS_ERR_ASM_DIRECTIVE_VALUE_RANGE: "value out of range",
    _kc.KS_ERR_ASM_DIRECTIVE_TOKEN: "unexpected token in directive",
    _kc.KS_ERR_ASM_DIRECTIVE_INVALID: "invalid directive",
    _kc.KS_ERR_ASM_DIRECTIVE_COMMA: "expected a comma",
    _kc.KS_ERR_ASM_DIRECTIVE_STR: "expected a string",
    _kc.KS_ERR_ASM_STAT_TOKEN: "unexpected token at start of statement",
    _kc.KS_ERR_ASM_FIXUP_INVALID: "value out of range",
    _kc.KS_ERR_ASM_FRAGMENT_INVALID: "invalid alignment or location",
    _kc.KS_ERR_ASM_EXPR_BRACKET: "unbalanced brackets",
    _kc.KS_ERR_ASM_RPAREN: "expected ')'",
    _kc.KS_ERR_ASM_MACRO_ARGS: "wrong macro arguments",
    _kc.KS_ERR_ASM_MACRO_TOKEN: "unexpected token in macro",
    _kc.KS_ERR_ASM_MACRO_LEVELS_EXCEED: "macros nested too deeply",
    _kc.KS_ERR_ASM_INSN_UNSUPPORTED: "unsupported instruction",
    _kc.KS_ERR_ASM_LABEL_INVALID: "invalid label",
    _kc.KS_ERR_ASM_TOKEN_INVALID: "invalid token",
}


def _phrase(e) -> str:
    if isinstance(e, str):
        return e
    p = _KS_PHRASES.get(getattr(e, "errno", None))
    if p:
        return p
    return re.sub(r"\s*\(KS_ERR_\w+\)", "", str(e)).strip().lower() or "assembly failed"


class _Keystone:
    """Per-thread keystone instances. ``plain`` produces all code and all diagnosis attempts;
    ``diag`` carries a symbol-resolver callback that only records the names keystone could not
    resolve (the last resort for naming an undefined symbol). It never produces code: with a
    resolver installed keystone drops every ``.align`` and mis-evaluates ``.if A > 0x100000000``."""

    def __init__(self, bits):
        mode = KS_MODE_32 if bits == 32 else KS_MODE_64
        self.plain = Ks(KS_ARCH_X86, mode)
        self.diag = Ks(KS_ARCH_X86, mode)
        self.asked: list[str] = []
        self.diag.sym_resolver = self._resolve
        self._capture = None

    def _resolve(self, name, value):
        try:
            n = name.decode("ascii", "replace")
            if n.startswith(_INTERNAL + "err"):
                self.asked.append(n)
                return False
            if n.startswith(_INTERNAL):
                value[0] = _SENTINEL
                return True
            self.asked.append(n)
        except Exception:   # never let an exception cross the C callback
            pass
        return False

    def run(self, ks, src: str, base: int):
        """-> (bytes, None) or (None, error) where error is a KsError or a diagnostic string."""
        try:
            data = src.encode("ascii")
        except UnicodeEncodeError:
            return None, "non-ASCII character"
        cap = self._stderr_begin()
        try:
            enc, _count = ks.asm(data, base, as_bytes=True)
            result = (enc or b"", None)
        except KsError as e:
            result = (None, e)
        finally:
            diag = self._stderr_end(cap)
        if result[1] is None and diag:
            m = re.search(r"error: (.*)", diag)
            if m:
                return None, m.group(1).strip()
        return result

    # keystone (LLVM) prints some diagnostics straight to file descriptor 2; keep them off the
    # user's terminal and treat a printed "error:" as a failure (keystone then returns success)
    def _stderr_begin(self):
        try:
            if self._capture is None:
                self._capture = tempfile.TemporaryFile()
            self._capture.seek(0)
            self._capture.truncate()
            try:
                sys.stderr.flush()
            except Exception:
                pass
            saved = os.dup(2)
            os.dup2(self._capture.fileno(), 2)
            return saved
        except OSError:
            return None

    def _stderr_end(self, saved):
        if saved is None:
            return ""
        try:
            os.dup2(saved, 2)
            os.close(saved)
            self._capture.seek(0)
            return self._capture.read(65536).decode("utf-8", "replace")
        except OSError:
            return ""


_tls = threading.local()


def _keystone(bits) -> _Keystone:
    cache = getattr(_tls, "ks", None)
    if cache is None:
        cache = _tls.ks = {}
    if bits not in cache:
        cache[bits] = _Keystone(bits)
    return cache[bits]


# --------------------------------------------------------------------------------------------
# assembly, diagnosis, verification

def _closers(stack) -> str:
    return "\n".join(_CLOSER[k] for k in reversed(stack))


def _assemble_pre(pre: _Pre, base: int) -> bytes:
    pre.finish()
    ks = _keystone(pre.bits)
    body = "\n".join(l.text for l in pre.lines)
    table = pre.table_text()
    out, e = ks.run(ks.plain, body + ("\n" + table if table else ""), base)
    if out is None:
        _diagnose(pre, base, e)
    if pre.checks:
        n = 16 * len(pre.checks)
        code, tab = out[:-n], out[-n:]
        _verify(pre, base, code, tab)
        return code
    return out


def _diagnose(pre: _Pre, base: int, first_error):
    """Locate the error of a failed assembly: the smallest failing prefix of lines.

    Each prefix is assembled by the code-producing keystone instance with its open blocks
    closed and every symbol that only a later line defines stubbed as a label at the end (a
    symbol-resolver callback would be simpler, but keystone evaluates expressions differently
    once one is installed)."""
    ks = _keystone(pre.bits)
    lines = pre.lines
    n = len(lines)
    defined_before = [set()]
    for l in lines:
        defined_before.append(defined_before[-1] | l.defines)
    everything = defined_before[-1]
    # symbols defined by the lines before k, except those defined by a later line too (a later
    # definition may be the only one actually assembled, e.g. in the other branch of a .if)
    later = [set() for _ in range(n + 1)]
    for k in range(n - 1, -1, -1):
        later[k] = later[k + 1] | lines[k].defines
    defined_before = [defined_before[k] - later[k] for k in range(n + 1)]

    def attempt(k, nstmts=None):
        """Assemble lines[:k] (plus the first nstmts statements of line k)."""
        parts = [l.text for l in lines[:k]]
        stack = lines[k - 1].stack if k else ()
        have = defined_before[k]
        if nstmts is not None:
            stmts = lines[k].stmts[:nstmts]
            parts.append(" ; ".join(s.text for s in stmts if s.text))
            stack = stmts[-1].stack if stmts else stack
            have = have | lines[k].defines     # (approximation: the whole line's labels)
        parts.append(_closers(stack))
        # a name may be defined in a .if branch that is not assembled: stub it only if undefined
        parts.extend(f".ifndef {name}\n{name}:\n.endif" for name in sorted(everything - have))
        _, err = ks.run(ks.plain, "\n".join(parts), base)
        return err

    if attempt(n) is None:
        raise AsmError(f"assembly failed: {_phrase(first_error)}", pre.program_file)
    lo, hi = 1, n            # smallest k such that lines[:k] fails
    while lo < hi:
        mid = (lo + hi) // 2
        if attempt(mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    idx = lo - 1
    line = lines[idx]
    err = attempt(lo)
    stmt = None
    for j in range(1, len(line.stmts) + 1):
        e = attempt(idx, j)
        if e is not None:
            stmt, err = line.stmts[j - 1], e
            break
    quoted = stmt.orig if stmt is not None else line.orig
    where = (line.file, line.lineno or None)
    errno = getattr(err, "errno", None)
    if stmt is not None and stmt.error_text is not None:
        if stmt.error_plain:
            raise AsmError(stmt.error_text, *where)
        raise AsmError(f".error: {stmt.error_text}", *where)
    if errno == _kc.KS_ERR_ASM_SYMBOL_MISSING and pre.deferred:
        # a deferred error inside a macro or .rept body, reached by this expansion?
        ks = _keystone(pre.bits)
        ks.asked = []
        ks.run(ks.diag, "\n".join(l.text for l in lines[:idx + 1]) + "\n"
               + _closers(line.stack), base)
        for name in ks.asked:
            m = re.match(re.escape(_INTERNAL) + r"err(\d+)$", name)
            if m and int(m.group(1)) in pre.deferred:
                dst, dline = pre.deferred[int(m.group(1))]
                text = dst.error_text if dst.error_plain else f".error: {dst.error_text}"
                raise AsmError(f"{text} (expanded from {line.file}:{line.lineno})",
                               dline.file, dline.lineno or None)
    if errno == _kc.KS_ERR_ASM_SYMBOL_MISSING and pre.bits == 32:
        regs = [t for t in _idents(quoted) if t.lower() in _ONLY_64_REGS]
        if regs:
            raise AsmError(f"register '{regs[0]}' does not exist in 32-bit mode '{quoted}'",
                           *where)
    if errno == _kc.KS_ERR_ASM_SYMBOL_MISSING:
        name = _missing_symbol(pre, quoted, everything, lines[:idx + 1], base)
        if name == "main" and line.file == "<prologue>":
            raise AsmError("program does not define main", pre.program_file)
        if name:
            raise AsmError(f"undefined symbol '{name}'", *where)
    phrase = _phrase(err)
    if stmt is not None and stmt.hint and errno in (
            _kc.KS_ERR_ASM_DIRECTIVE_VALUE_RANGE, _kc.KS_ERR_ASM_FIXUP_INVALID):
        phrase = stmt.hint
    if errno == _kc.KS_ERR_ASM_SYMBOL_REDEFINED:
        labels = re.findall(r"(" + _IDENT + r")\s*:", quoted)
        m = re.match(r"^\s*(?:\.set|\.equiv)\s+(" + _IDENT + ")", quoted, re.I) or \
            re.match(r"^\s*(" + _IDENT + r")\s*=", quoted)
        names = labels or ([m.group(1)] if m else [])
        if names:
            phrase = f"symbol '{names[0]}' redefined"
    first = re.match(r"^\s*(?:[A-Za-z_.][\w.$]*\s*:\s*)*([A-Za-z_.][\w.]*)", quoted)
    if first and first.group(1).lower() in pre.macros:
        raise AsmError(f"{phrase} in the expansion of macro '{first.group(1)}' '{quoted}'", *where)
    raise AsmError(f"{phrase} '{quoted}'", *where)


def _missing_symbol(pre, text, everything, lines, base):
    """The name of the undefined symbol a failing statement uses."""
    toks = _idents(re.sub(r'"(?:\\.|[^"\\])*"', "", text))
    first = re.match(r"^\s*(?:" + _IDENT + r"\s*:\s*)*(" + _IDENT + ")", text)
    skip = {first.group(1)} if first else set()
    for t in toks:
        if t in skip or t.lower() in _REGISTERS or t.lower() in _KEYWORDS or t in everything \
                or t.startswith(".") or t.lower() in _INSN_PREFIXES:
            continue
        return t
    # fall back to keystone's own resolver callback (it reports the names it could not find)
    ks = _keystone(pre.bits)
    ks.asked = []
    ks.run(ks.diag, "\n".join(l.text for l in lines) + "\n" + _closers(lines[-1].stack), base)
    names = [a for a in ks.asked if not a.startswith(_INTERNAL)]
    return names[0] if names else None


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


# --------------------------------------------------------------------------------------------
# public API

def _check_bits(bits):
    if bits not in (32, 64):
        raise ValueError(f"bits must be 32 or 64, not {bits!r}")


def assemble(text: str, *, bits: int, base: int, symbols: dict | None = None,
             filename: str = "<input>") -> bytes:
    """Assemble Intel-syntax ``text`` for ``bits`` (32/64) at address ``base``.

    ``symbols`` are predefined with ``.set``; ``.include`` paths are relative to ``filename``'s
    directory (the current directory for ``<...>`` names). Raises :class:`AsmError`."""
    _check_bits(bits)
    pre = _Pre(bits)
    pre.program_file = filename
    pre.add_symbols(symbols)
    basedir = "." if filename.startswith("<") else os.path.dirname(filename)
    chain = () if filename.startswith("<") else (os.path.realpath(filename),)
    pre.add_text(text, filename, basedir, chain)
    return _assemble_pre(pre, base)


def assemble_file(path, *, bits: int, base: int, symbols: dict | None = None) -> bytes:
    """Assemble the file at ``path`` (see :func:`assemble`)."""
    _check_bits(bits)
    path = os.fspath(path)
    pre = _Pre(bits)
    pre.program_file = path
    pre.add_symbols(symbols)
    pre.add_file(path, path)
    return _assemble_pre(pre, base)


_HEADER_RE = re.compile(r"^\s*#\s*x86shadow\s*:\s*(.*)$", re.I)


def _read_header(path: str, text: str):
    """The modes a program declares with ``# x86shadow: modes=32,pae,64`` -> (modes, lineno)."""
    for lineno, raw in enumerate(text.split("\n"), 1):
        m = _HEADER_RE.match(raw)
        if not m:
            continue
        mm = re.search(r"\bmodes\s*=\s*(\w*(?:\s*,\s*\w+)*)", m.group(1), re.I)
        if mm:
            val = mm.group(1).strip()
            modes = tuple(v.strip().lower() for v in val.split(",") if v.strip())
            bad = [v for v in modes if v not in MODES]
            if bad or not modes:
                raise AsmError(f"bad mode list '{val}' (modes are 32, pae, 64)", path, lineno)
            return modes, lineno
    return MODES, None


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AsmError(f"cannot read: {e.strerror}", path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def program_modes(path) -> tuple:
    """The modes the program at ``path`` supports (its ``# x86shadow: modes=...`` header)."""
    path = os.fspath(path)
    return _read_header(path, _read_text(path))[0]


def _norm_mode(mode) -> str:
    m = str(mode).lower()
    if m not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return m


def assemble_program(path, mode, ram_size: int, symbols: dict | None = None) -> Program:
    """Assemble a guest program for ``mode`` at PROG_BASE with the layout symbols (plus
    ``symbols``, e.g. scenario parameters), behind a ``jmp main``. Raises :class:`AsmError` (bad
    source, no ``main``, mode not in its header, image too large)."""
    path = os.fspath(path)
    mode = _norm_mode(mode)
    text = _read_text(path)
    modes, hline = _read_header(path, text)
    if mode not in modes:
        raise AsmError(f"program supports modes {', '.join(modes)}, not {mode}", path, hline)
    pre = _Pre(_BITS[mode])
    pre.program_file = path
    pre.add_symbols({**layout.asm_symbols(mode, ram_size), **(symbols or {})})
    pre.add_synthetic("jmp main", "<prologue>")
    pre.add_text(text, path, os.path.dirname(path), (os.path.realpath(path),))
    code = _assemble_pre(pre, layout.PROG_BASE)
    if layout.PROG_BASE + len(code) > layout.PROG_LIMIT:
        raise AsmError(f"program image is {len(code):#x} bytes; it must end below "
                       f"{layout.PROG_LIMIT:#x}", path)
    return Program(code=code, base=layout.PROG_BASE, entry=layout.PROG_BASE, modes=modes,
                   path=path, mode=mode)


def firmware_path(mode) -> Path:
    """The firmware source for ``mode`` (firmware/boot32.asm or firmware/boot64.asm)."""
    mode = _norm_mode(mode)
    d = Path(__file__).resolve().parent.parent / "firmware"
    return d / ("boot64.asm" if mode == "64" else "boot32.asm")


_fw_cache: dict = {}
_fw_lock = threading.Lock()


def assemble_firmware(mode, ram_size: int) -> bytes:
    """The firmware image for ``mode``/``ram_size``, assembled at FW_BASE with the layout symbols
    and ``MAIN = PROG_BASE``. Results are cached (same inputs and source -> same bytes)."""
    mode = _norm_mode(mode)
    ram_size = int(ram_size)
    path = firmware_path(mode)
    try:
        st = path.stat()
    except OSError:
        raise AsmError(f"firmware source {path} not found (x86shadow expects its repository "
                       f"layout: firmware/ next to the x86shadow package)") from None
    if ram_size <= 0 or ram_size % (1 << 20):
        raise AsmError(f"RAM size {ram_size:#x} must be a positive multiple of 1 MiB")
    if mode != "64" and ram_size > 1 << 32:
        raise AsmError(f"RAM size {ram_size:#x}: modes 32 and pae address at most 4 GiB")
    if ram_size < layout.MIN_IDENTITY:
        raise AsmError(f"RAM size {ram_size:#x}: at least {layout.MIN_IDENTITY >> 20} MiB needed")
    key = (mode, ram_size, str(path), st.st_mtime_ns, st.st_size)
    with _fw_lock:
        code = _fw_cache.get(key)
    if code is None:
        symbols = dict(layout.asm_symbols(mode, ram_size))
        symbols["MAIN"] = layout.PROG_BASE
        code = assemble_file(str(path), bits=_BITS[mode], base=layout.FW_BASE, symbols=symbols)
        if layout.FW_BASE + len(code) > layout.FW_DATA:
            raise AsmError(f"firmware image too large ({len(code):#x} bytes)", str(path))
        with _fw_lock:
            _fw_cache[key] = code
    return code
