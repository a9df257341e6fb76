"""The one exception users of the assembler see."""
from __future__ import annotations


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
