"""The preprocessor: source lines -> keystone text, one output line per source line (.include,
predefined symbols, block nesting, directive checks, the rewrites of keystone's mis-encodings
and the instrumentation the post-assembly checks read)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import AsmError, _Fatal
from .expr import (_STRING_RE, _SyntaxProblem, _check_expr, _check_float, _check_list,
                   _check_macro_args, _check_operand, _check_string, _expr_tokens, _is_branch,
                   _is_immediate, _literal_value, _placeholders, _terms)
from .lexical import (_ALIGN_DIRECTIVES, _ALL_DIRECTIVES, _DATA_DIRECTIVES, _DROPPED_DIRECTIVES,
                      _FARPTR_RE, _FILL_DIRECTIVES, _GPR32, _GPR64, _IDENT, _IF_DIRECTIVES,
                      _INSN_PREFIXES, _INTERNAL, _KEYWORDS, _LABEL_RE, _MEM_RE, _NESTING_DIRECTIVES,
                      _NOT_IN_32, _NOT_IN_64, _REGISTERS, _REG_WIDTH, _REPT_DIRECTIVES, _SEGREGS,
                      _SEG_PREFIX, _SYMBOL_DIRECTIVES, _TOKEN_RE, _has_register, _idents,
                      _number_value, _parse_mem, _safe_expr, _scan, _split_operands)

_CLOSER = {"if": ".endif", "macro": ".endm", "rept": ".endr"}
_MAX_FILL = 16 << 20
_MAX_ALIGN = 1 << 16


class _TemplateRisk(Exception):
    pass


_TEMPLATE_RISK = ("inside a .macro/.rept/.irp body keystone mis-assembles this operand expression "
                  "(a symbol after a number or a unary operator, a subtracted or scaled symbol, "
                  "parentheses): define its value with .set before the body")


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
        self.include_dirs: list = []          # searched after the including file's folder
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
            if not os.path.isabs(name) and not os.path.exists(path):
                # not beside the including file: the include path (-I DIRs, then the guest
                # library's folder, so "lib/console.inc" is found from anywhere)
                for d in self.include_dirs:
                    cand = os.path.join(d, name)
                    if os.path.exists(cand):
                        path = disp = cand
                        break
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
