"""``x86shadow run ... --gdb [HOST:]PORT [--gdb-wait]``: the gdb stub (gdbstub.py) attached to
a machine's vCPU (cpu/guest_debug.py). docs/GDB.md.

With ``--gdb-wait`` the guest does not start until gdb has connected; it is then stopped before
its first instruction. Without it the guest runs at once and gdb may attach at any time (the
guest stops where it is, as with QEMU's ``-s``). The session ends when gdb detaches or quits
(the guest runs on to its end), kills the guest, or the guest ends.
"""
from __future__ import annotations

import socket
import threading

from . import gdbstub, stopping
from .exits import ExitKind


class GdbSession:
    """A listening socket for gdb (opened at once, so that a bad address or a busy port is a
    usage error before the guest runs) and the ``drive`` function Machine.run calls."""

    def __init__(self, address: str, wait: bool, log=None):
        self.listener = gdbstub.listen(address)          # ValueError: a usage error
        self.wait = wait
        self.log = log
        host, port = self.listener.getsockname()[:2]
        self.address = f"{host}:{port}"
        self._conn = None
        self._attach_requested = False

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes an accept() in the thread
        except OSError:
            pass
        try:
            self.listener.close()
        except OSError:
            pass

    def drive(self, machine):
        """``drive(max_insns) -> Exit`` for Machine.run."""
        def run(max_insns):
            from .cpu.guest_debug import VcpuTarget
            vcpu = machine.vcpu
            conn = None
            try:
                if self.wait:
                    conn, _ = self.listener.accept()
                    first = gdbstub.Stop(gdbstub.SIGTRAP)
                else:
                    threading.Thread(target=self._accept, args=(vcpu,), daemon=True,
                                     name="gdb-accept").start()
                    ex = vcpu.run_once(max_insns)
                    if not (ex.kind == ExitKind.INTERRUPTED and self._attach_requested
                            and stopping.pending() is None):
                        return ex                   # the guest ended with no debugger
                    conn = self._conn
                    first = gdbstub.Stop(gdbstub.SIGINT)
                self.close()
                target = VcpuTarget(vcpu, max_insns)
                stub = gdbstub.GdbStub(conn, target, self.log)
                stub.last_stop = first
                how = stub.serve()
                try:
                    conn.close()
                except OSError:
                    pass
                conn = None
                return target.end(how)
            finally:
                if conn is not None:
                    conn.close()
                self.close()
        return run

    def _accept(self, vcpu):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return                                  # closed: the guest ended first
        self._conn = conn
        self._attach_requested = True
        vcpu.request_stop("gdb attached")
