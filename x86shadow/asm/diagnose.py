"""Diagnosis of a failed assembly: the failing line (bisection over line prefixes), the
statement, the undefined symbol, and the message."""
from __future__ import annotations

import re

import keystone.keystone_const as _kc

from .errors import AsmError
from .keystone_runner import _keystone, _phrase
from .lexical import (_IDENT, _INSN_PREFIXES, _INTERNAL, _KEYWORDS, _ONLY_64_REGS, _REGISTERS,
                      _idents)
from .preprocess import _CLOSER, _Pre


def _closers(stack) -> str:
    return "\n".join(_CLOSER[k] for k in reversed(stack))


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
