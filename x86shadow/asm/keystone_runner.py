"""Keystone calls: per-thread instances, stderr capture, error phrases."""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, Ks, KsError
import keystone.keystone_const as _kc

from .lexical import _INTERNAL, _SENTINEL

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
