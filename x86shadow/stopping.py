"""Stopping a run from outside the guest: SIGINT / SIGTERM, an output that fails (EPIPE, ENOSPC)
while the guest runs, a watchdog.

Nothing may be raised inside a Unicorn callback (a ctypes callback swallows the exception and the
guest runs on), and while the guest spins in translated code no Python code runs at all. So a
stop is *requested*: every vCPU inside ``run_once`` is asked to stop (``VCPU.request_stop``, which
calls Unicorn's thread-safe ``emu_stop``); ``run_once`` returns an INTERRUPTED exit; the machine
raises the pending :class:`Stop` from ordinary code, where the command writes what it collected
(stats, trace) and exits with the stop's status.

Signals reach a spinning guest through ``signal.set_wakeup_fd``: the C-level handler writes the
signal number to a pipe that a watcher thread reads, and the thread requests the stop. The
Python-level handler (which runs only when the main thread executes Python code) requests it too,
or -- when no guest is running -- raises the Stop at once, like KeyboardInterrupt.
"""
from __future__ import annotations

import os
import signal
import threading


class Stop(Exception):
    """A run stopped from outside: ``status`` is the process exit status, ``message`` what to
    print (``x86shadow: <message>``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_lock = threading.RLock()
_running = set()            # VCPUs inside run_once
_pending: Stop | None = None


def request(stop: Stop) -> None:
    """Ask every running vCPU to stop; the first request wins."""
    global _pending
    with _lock:
        if _pending is None:
            _pending = stop
        vcpus = list(_running)
    for v in vcpus:
        v.request_stop(stop.message)


def pending() -> Stop | None:
    return _pending


def take() -> Stop | None:
    """The pending stop, cleared."""
    global _pending
    with _lock:
        stop, _pending = _pending, None
    return stop


def enter(vcpu) -> None:
    """``vcpu`` starts running guest code (run_once). A stop requested before stays pending
    and is applied at once."""
    with _lock:
        _running.add(vcpu)
        stop = _pending
    if stop is not None:
        vcpu.request_stop(stop.message)


def leave(vcpu) -> None:
    with _lock:
        _running.discard(vcpu)


def signal_stop(signum: int) -> Stop:
    name = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(signum, "stopped")
    return Stop(128 + signum, name)


class SignalHandling:
    """Context manager for a command: SIGINT and SIGTERM stop it cleanly (see the module
    docstring). Only the main thread can install it; elsewhere it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._old = {}
        self._old_fd = None
        self._pipe = None
        self._thread = None

    def _handler(self, signum, _frame):
        stop = signal_stop(signum)
        with _lock:
            busy = bool(_running) or _pending is not None
        if busy:
            request(stop)           # a guest is running: its run loop raises it
            return
        take()
        raise stop

    def _watch(self, rfd):
        while True:
            try:
                data = os.read(rfd, 1)
            except OSError:
                return
            if not data:
                return
            signum = data[0]
            if signum in self.SIGNALS:
                with _lock:
                    busy = bool(_running)
                if busy:
                    request(signal_stop(signum))

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        take()
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        self._pipe = (rfd, wfd)
        self._old_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        self._thread = threading.Thread(target=self._watch, args=(rfd,), daemon=True,
                                        name="x86shadow-signals")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._pipe is None:
            return False
        for s, h in self._old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
        rfd, wfd = self._pipe
        os.close(wfd)               # the watcher's read returns b"" and the thread ends
        self._thread.join(timeout=1)
        os.close(rfd)
        self._pipe = None
        return False
