"""Output files of the commands (--stats-json, --trace, --json, --plot): checked before any
guest runs, so a bad path is a status-2 error at once instead of after a long run."""
from __future__ import annotations

import os


class OutputError(Exception):
    """A path that cannot be written; the message names it and why."""


def check_writable(path, what: str) -> None:
    """Fail now if ``path`` cannot be written later: a directory, a missing or read-only parent,
    a file that cannot be opened for writing (e.g. under /proc). Opens the file for appending,
    so an existing file is left as it is (a new one is created empty)."""
    if os.path.isdir(path):
        raise OutputError(f"cannot write {what} {str(path)!r}: is a directory")
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {what} {str(path)!r}: {e.strerror}") from None


def open_output(path, what: str, mode: str = "w"):
    """Open an output file now (before the guest runs)."""
    if os.path.isdir(path):
        raise OutputError(f"cannot write {what} {str(path)!r}: is a directory")
    try:
        return open(path, mode)
    except OSError as e:
        raise OutputError(f"cannot write {what} {str(path)!r}: {e.strerror}") from None
