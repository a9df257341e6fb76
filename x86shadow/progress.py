"""Progress of long commands on stderr (rich.progress), for every command to share
(docs/PROGRESS.md)::

    with progress(total, "runs", quiet=args.quiet) as p:
        for ...:
            p.describe("kvm-2008: scan 2/4")     # what is going on now
            p.log("a line kept above the bar")
            p.advance()

Shown only on a terminal: with ``quiet`` (``--quiet``), or when stderr is not a terminal (a pipe,
a file, CI), nothing at all is written. ``X86SHADOW_PROGRESS=1`` in the environment shows it
even when stderr is not a terminal (``--quiet`` still wins); ``total=None`` is a bar without an
end. ``poll(p, fn)`` moves the bar from ``fn()`` (the work done so far) every fraction of a
second, for work that cannot call ``advance`` itself (a guest running in Unicorn).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

FORCE_ENV = "X86SHADOW_PROGRESS"


def shown(quiet: bool, stream=None) -> bool:
    """Whether progress is drawn: not ``quiet``, and stderr a terminal or X86SHADOW_PROGRESS=1."""
    if quiet:
        return False
    if os.environ.get(FORCE_ENV, "") == "1":
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Hidden:
    """Progress that shows nothing (quiet, or not a terminal)."""

    def advance(self, n: float = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass

    def log(self, text: str) -> None:
        pass

    def set_completed(self, n: float) -> None:
        pass


class _Shown:
    def __init__(self, bar, task):
        self._bar, self._task = bar, task

    def advance(self, n: float = 1) -> None:
        self._bar.advance(self._task, n)

    def describe(self, text: str) -> None:
        self._bar.update(self._task, description=text)

    def log(self, text: str) -> None:
        self._bar.console.print(text, markup=False, highlight=False)

    def set_completed(self, n: float) -> None:
        self._bar.update(self._task, completed=n)


@contextlib.contextmanager
def progress(total, description: str, quiet: bool = False, *, console=None):
    """A progress bar of ``total`` steps on stderr (see the module docstring); ``console``: a
    rich Console to draw on instead (tests)."""
    if console is None and not shown(quiet):
        yield _Hidden()
        return
    if console is not None and quiet:
        yield _Hidden()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)
    if console is None:
        console = Console(stderr=True, force_terminal=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    if total is not None:
        columns.append(MofNCompleteColumn())
    columns.append(TimeElapsedColumn())
    # transient: the bar goes when the work is done (the lines logged above it stay); stdout is
    # not redirected: results printed meanwhile stay on stdout
    with Progress(*columns, console=console, transient=True, redirect_stdout=False,
                  redirect_stderr=False) as bar:
        yield _Shown(bar, bar.add_task(description, total=total))


@contextlib.contextmanager
def poll(p, done, interval: float = 0.2):
    """While the block runs, set the bar of ``p`` to ``done()`` every ``interval`` seconds."""
    if isinstance(p, _Hidden):
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            value = done()
            if value is not None:
                p.set_completed(value)
    t = threading.Thread(target=loop, name="progress-poll", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        value = done()
        if value is not None:
            p.set_completed(value)
