"""Syntax checks of expressions and operands: keystone hangs (an endless loop in its parser) on
many malformed ones, so every expression and operand is parsed here before keystone sees it."""
from __future__ import annotations

import re

from .lexical import (_ALL_DIRECTIVES, _IDENT, _KEYWORDS, _REGISTERS, _SEGREGS, _number_value,
                      _split_operands)

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
