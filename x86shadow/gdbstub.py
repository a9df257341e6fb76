"""A GDB remote-serial-protocol stub (``x86shadow run ... --gdb [HOST:]PORT``, docs/GDB.md).

This module is the protocol side only: packet framing and checksums, the target description XML,
the packets gdb sends (qSupported, qXfer:features:read, g/G/p/P, m/M, Z0/z0/Z1/z1, c/s/vCont,
?, k, D, qAttached, the 0x03 interrupt) and the session that drives a *target* -- anything with
the methods of :class:`Target`. It imports nothing from Unicorn: the vCPU side
(``cpu/guest_debug.py``) implements the target, ``gdb_session.py`` joins the two to a machine.

Protocol reference: the GDB manual, appendix "Remote Serial Protocol" (GDB 13); the register
layout and feature names follow QEMU's x86 stub (target/i386/gdbstub.c, gdb-xml/i386-*.xml) and
gdb's i386 target descriptions (org.gnu.gdb.i386.core / .sse / .segments).
"""
from __future__ import annotations

import os
import select
import socket
import threading
from dataclasses import dataclass

SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11
INTERRUPT = 0x03                  # what gdb sends (outside any packet) to stop a running target
PACKET_SIZE = 0x4000


class ProtocolError(Exception):
    """A malformed packet (answered with an error reply, never raised to the user)."""


class TargetError(Exception):
    """The target cannot do what a packet asks (unmapped memory, a read-only register): the
    packet gets an ``Enn`` reply."""


# ---------------------------------------------------------------------------- framing
def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(payload: bytes) -> bytes:
    """Binary-data escaping of the reply payload: '#', '$', '}' and '*' as '}' + (byte ^ 0x20)."""
    out = bytearray()
    for b in payload:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            try:
                out.append(next(it) ^ 0x20)
            except StopIteration:
                raise ProtocolError("packet ends inside an escape") from None
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` with the payload escaped."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


class PacketReader:
    """Splits the byte stream from gdb into events: ``("packet", payload)`` (checksum good,
    payload unescaped), ``("bad", None)`` (checksum wrong: the packet must be NAKed),
    ``("interrupt", None)`` for a 0x03 outside a packet, ``("ack", b"+"/b"-")``."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list:
        self.buf += data
        events = []
        buf = self.buf
        while buf:
            c = buf[0]
            if c == INTERRUPT:
                events.append(("interrupt", None))
                del buf[0]
            elif c in b"+-":
                events.append(("ack", bytes((c,))))
                del buf[0]
            elif c == ord("$"):
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    break                                   # incomplete packet
                body = bytes(buf[1:end])
                sent = bytes(buf[end + 1:end + 3])
                del buf[:end + 3]
                try:
                    good = int(sent, 16) == checksum(body)
                except ValueError:
                    good = False
                if not good:
                    events.append(("bad", None))
                    continue
                try:
                    events.append(("packet", unescape(body)))
                except ProtocolError:
                    events.append(("bad", None))
            else:
                del buf[0]                                  # noise between packets
        return events


# ---------------------------------------------------------------------------- registers
@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    feature: str
    group: str | None = None


_CORE = "org.gnu.gdb.i386.core"
_SSE = "org.gnu.gdb.i386.sse"
_SEGMENTS = "org.gnu.gdb.i386.segments"
# gdb knows no feature for the control registers; QEMU lists them (with fs_base, gs_base,
# k_gs_base) in its own i386-64bit.xml. Ours is a feature of its own so that gdb's i386
# validation of the standard features is untouched; gdb shows its registers by name
# (``info registers cr3``, ``p $cr3``) and in ``info registers system``.
_SYS = "org.x86shadow.gdb.i386.sys"


def x86_registers(bits: int) -> list:
    """The registers in 'g'-packet order for a 32-bit (gdb arch i386) or 64-bit (i386:x86-64)
    vCPU: general registers, instruction pointer, EFLAGS, segment selectors, x87, SSE, the
    segment bases, then CR0/CR2/CR3/CR4/CR8/EFER (QEMU's order: target/i386/gdbstub.c; CR8
    exists in 64-bit mode only)."""
    w = bits
    if bits == 64:
        gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
        ip = "rip"
    else:
        gprs = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"]     # gdb's i386 order
        ip = "eip"
    regs = []
    for g in gprs:
        t = "data_ptr" if g in ("rsp", "rbp", "esp", "ebp") else f"int{w}"
        regs.append(Reg(g, w, t, _CORE))
    regs.append(Reg(ip, w, "code_ptr", _CORE))
    regs.append(Reg("eflags", 32, "i386_eflags", _CORE))
    for s in ("cs", "ss", "ds", "es", "fs", "gs"):
        regs.append(Reg(s, 32, "int32", _CORE))
    for i in range(8):
        regs.append(Reg(f"st{i}", 80, "i387_ext", _CORE))
    for f in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"):
        regs.append(Reg(f, 32, "int", _CORE, "float"))
    for i in range(16 if bits == 64 else 8):
        regs.append(Reg(f"xmm{i}", 128, "vec128", _SSE))
    regs.append(Reg("mxcsr", 32, "i386_mxcsr", _SSE, "vector"))
    regs.append(Reg("fs_base", w, f"int{w}", _SEGMENTS))
    regs.append(Reg("gs_base", w, f"int{w}", _SEGMENTS))
    # unsigned, so that gdb does not print CR0 with PG set as a negative number
    if bits == 64:
        regs.append(Reg("k_gs_base", 64, "uint64", _SYS, "system"))
    for c in ("cr0", "cr2", "cr3", "cr4") + (("cr8",) if bits == 64 else ()):
        regs.append(Reg(c, w, f"uint{w}", _SYS, "system"))
    regs.append(Reg("efer", w, f"uint{w}", _SYS, "system"))
    return regs


_EFLAGS_FIELDS = [("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8),
                  ("IF", 9), ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17),
                  ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21)]
_MXCSR_FIELDS = [("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
                 ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)]


def _flags(fid, fields):
    lines = [f'  <flags id="{fid}" size="4">']
    lines += [f'    <field name="{n}" start="{b}" end="{b}"/>' for n, b in fields]
    lines.append("  </flags>")
    return lines


def target_xml(bits: int, regs=None) -> str:
    """The target description gdb reads with qXfer:features:read:target.xml."""
    regs = regs if regs is not None else x86_registers(bits)
    arch = "i386:x86-64" if bits == 64 else "i386"
    out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
           '<target version="1.0">', f"<architecture>{arch}</architecture>",
           # a bare machine, not a Linux process: without this a gdb built for Linux assumes
           # GNU/Linux and its i386 Linux ABI rejects the description (no orig_eax)
           "<osabi>none</osabi>"]
    for feature in (_CORE, _SSE, _SEGMENTS, _SYS):
        out.append(f'<feature name="{feature}">')
        if feature == _CORE:
            out += _flags("i386_eflags", _EFLAGS_FIELDS)
        if feature == _SSE:
            out += ['  <vector id="v4f" type="ieee_single" count="4"/>',
                    '  <vector id="v2d" type="ieee_double" count="2"/>',
                    '  <vector id="v16i8" type="int8" count="16"/>',
                    '  <vector id="v8i16" type="int16" count="8"/>',
                    '  <vector id="v4i32" type="int32" count="4"/>',
                    '  <vector id="v2i64" type="int64" count="2"/>',
                    '  <union id="vec128">', '    <field name="v4_float" type="v4f"/>',
                    '    <field name="v2_double" type="v2d"/>',
                    '    <field name="v16_int8" type="v16i8"/>',
                    '    <field name="v8_int16" type="v8i16"/>',
                    '    <field name="v4_int32" type="v4i32"/>',
                    '    <field name="v2_int64" type="v2i64"/>',
                    '    <field name="uint128" type="uint128"/>', '  </union>']
            out += _flags("i386_mxcsr", _MXCSR_FIELDS)
        for i, r in enumerate(regs):
            if r.feature != feature:
                continue
            group = f' group="{r.group}"' if r.group else ""
            out.append(f'  <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" '
                       f'regnum="{i}"{group}/>')
        out.append("</feature>")
    out.append("</target>")
    return "\n".join(out) + "\n"


def encode_reg(value: int | None, bits: int) -> bytes:
    """A register value as gdb wants it: target byte order (little endian), hex; None: 'xx'
    bytes (unavailable)."""
    n = bits // 8
    if value is None:
        return b"xx" * n
    return (value & ((1 << bits) - 1)).to_bytes(n, "little").hex().encode()


def decode_reg(text: bytes, bits: int) -> int:
    n = bits // 8
    if len(text) != 2 * n:
        raise ProtocolError(f"register value of {len(text) // 2} bytes, {n} expected")
    return int.from_bytes(bytes.fromhex(text.decode()), "little")


# ---------------------------------------------------------------------------- the target
class Target:
    """What the stub needs of a CPU. ``resume(step)`` runs until the target stops and returns a
    :class:`Stop`; ``interrupt()`` (from another thread) makes a running ``resume`` return."""

    bits = 64
    registers: list = []

    def read_register(self, name: str) -> int | None:
        raise NotImplementedError

    def write_register(self, name: str, value: int) -> None:
        raise NotImplementedError

    def read_memory(self, addr: int, n: int) -> bytes:
        raise NotImplementedError

    def write_memory(self, addr: int, data: bytes) -> None:
        raise NotImplementedError

    def insert_breakpoint(self, kind: int, addr: int) -> None:
        raise NotImplementedError

    def remove_breakpoint(self, kind: int, addr: int) -> None:
        raise NotImplementedError

    def resume(self, step: bool) -> "Stop":
        raise NotImplementedError

    def interrupt(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Stop:
    """Why the target stopped: ``signal`` (SIGTRAP after a step or breakpoint, SIGINT after an
    interrupt, SIGSEGV when the guest crashed) with ``why`` ('swbreak', 'hwbreak' or ''), or
    ``exited`` (the guest is gone; ``status`` its exit status)."""
    signal: int = SIGTRAP
    why: str = ""
    exited: bool = False
    status: int = 0

    def reply(self) -> bytes:
        if self.exited:
            return b"W%02x" % (self.status & 0xFF)
        if self.why:
            return b"T%02x%s:;" % (self.signal, self.why.encode())
        return b"S%02x" % self.signal


# ---------------------------------------------------------------------------- the session
DETACHED, KILLED, EXITED, DISCONNECTED = "detached", "killed", "exited", "disconnected"


class GdbStub:
    """One gdb connection over ``sock`` driving ``target``. ``serve()`` answers packets until
    gdb detaches, kills the target, disconnects or the target exits, and returns which."""

    def __init__(self, sock, target: Target, log=None):
        self.sock = sock
        self.target = target
        self.reader = PacketReader()
        self.pending = []                      # events read but not handled yet
        self.ack = True                        # until QStartNoAckMode
        self.last_stop = Stop(SIGTRAP)
        self.log = log
        self.regs = target.registers
        self._xml = target_xml(target.bits, self.regs).encode()

    # -- transport
    def _recv_events(self):
        while not self.pending:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                return False
            self.pending.extend(self.reader.feed(data))
        return True

    def send(self, payload: bytes) -> None:
        if self.log:
            self.log(f"<- {payload[:200]!r}")
        self.sock.sendall(frame(payload))

    def _next_packet(self):
        """The next good packet (acked), or None when gdb is gone."""
        while True:
            if not self._recv_events():
                return None
            kind, payload = self.pending.pop(0)
            if kind == "bad":
                if self.ack:
                    self.sock.sendall(b"-")
                continue
            if kind == "packet":
                if self.ack:
                    self.sock.sendall(b"+")
                if self.log:
                    self.log(f"-> {payload[:200]!r}")
                return payload
            # acks and an interrupt while stopped need nothing

    # -- the loop
    def serve(self) -> str:
        while True:
            pkt = self._next_packet()
            if pkt is None:
                return DISCONNECTED
            try:
                outcome = self.handle(pkt)
            except TargetError as e:
                if self.log:
                    self.log(f"   error: {e}")
                self.send(b"E14")
                continue
            except (ProtocolError, ValueError, IndexError) as e:
                if self.log:
                    self.log(f"   bad packet: {e}")
                self.send(b"E01")
                continue
            if outcome is not None:
                return outcome

    def handle(self, pkt: bytes):
        """Answer one packet; return DETACHED / KILLED / EXITED to end the session."""
        c = pkt[:1]
        t = self.target
        if pkt.startswith(b"qSupported"):
            self.send(b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;"
                      b"QStartNoAckMode+;vContSupported+" % PACKET_SIZE)
        elif pkt == b"QStartNoAckMode":
            self.send(b"OK")
            self.ack = False
        elif pkt.startswith(b"qXfer:features:read:"):
            annex, _, span = pkt[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                self.send(b"E00")
                return None
            off, length = (int(x, 16) for x in span.split(b","))
            part = self._xml[off:off + length]
            self.send((b"l" if off + length >= len(self._xml) else b"m") + part)
        elif pkt == b"?":
            self.send(self.last_stop.reply())
        elif pkt == b"qAttached":
            self.send(b"1")                    # as QEMU: gdb detaches (not kills) when it quits
        elif pkt == b"qC":
            self.send(b"QC1")
        elif pkt == b"qfThreadInfo":
            self.send(b"m1")
        elif pkt == b"qsThreadInfo":
            self.send(b"l")
        elif c == b"H" or c == b"T":
            self.send(b"OK")                   # one thread: every thread id is it
        elif pkt == b"qSymbol::":
            self.send(b"OK")
        elif pkt == b"vCont?":
            self.send(b"vCont;c;C;s;S")
        elif c == b"g":
            self.send(b"".join(encode_reg(t.read_register(r.name), r.bits) for r in self.regs))
        elif c == b"G":
            self._write_all(pkt[1:])
            self.send(b"OK")
        elif c == b"p":
            r = self.regs[int(pkt[1:], 16)]
            self.send(encode_reg(t.read_register(r.name), r.bits))
        elif c == b"P":
            num, _, val = pkt[1:].partition(b"=")
            r = self.regs[int(num, 16)]
            t.write_register(r.name, decode_reg(val, r.bits))
            self.send(b"OK")
        elif c == b"m":
            addr, n = (int(x, 16) for x in pkt[1:].split(b","))
            self.send(t.read_memory(addr, min(n, PACKET_SIZE // 2)).hex().encode())
        elif c == b"M":
            head, _, data = pkt[1:].partition(b":")
            addr, n = (int(x, 16) for x in head.split(b","))
            raw = bytes.fromhex(data.decode())
            if len(raw) != n:
                raise ProtocolError(f"M packet says {n} bytes, carries {len(raw)}")
            t.write_memory(addr, raw)
            self.send(b"OK")
        elif c in (b"Z", b"z"):
            kind, addr, _size = pkt[1:].split(b",")[:3]
            kind = int(kind)
            if kind not in (0, 1):
                self.send(b"")                 # watchpoints: unsupported (gdb steps instead)
                return None
            if c == b"Z":
                t.insert_breakpoint(kind, int(addr, 16))
            else:
                t.remove_breakpoint(kind, int(addr, 16))
            self.send(b"OK")
        elif c in (b"c", b"s", b"C", b"S"):
            if c in (b"c", b"s") and len(pkt) > 1:
                t.write_register("rip" if t.bits == 64 else "eip", int(pkt[1:], 16))
            return self._resume(step=c in (b"s", b"S"))
        elif pkt.startswith(b"vCont;"):
            action = pkt[6:].split(b";")[0].split(b":")[0]
            if action[:1] not in (b"c", b"C", b"s", b"S"):
                self.send(b"")
                return None
            return self._resume(step=action[:1] in (b"s", b"S"))
        elif c == b"k" or pkt.startswith(b"vKill"):
            if pkt.startswith(b"vKill"):
                self.send(b"OK")
            return KILLED
        elif c == b"D":
            self.send(b"OK")
            return DETACHED
        else:
            self.send(b"")                     # not supported: the empty reply
        return None

    def _write_all(self, hexdata: bytes) -> None:
        pos = 0
        for r in self.regs:
            n = r.bits // 4
            chunk = hexdata[pos:pos + n]
            pos += n
            if len(chunk) < n:
                break
            if b"x" in chunk:
                continue
            value = decode_reg(chunk, r.bits)
            if value != self.target.read_register(r.name):
                self.target.write_register(r.name, value)

    def _resume(self, step: bool):
        """Run the target; an interrupt from gdb (0x03) stops it meanwhile."""
        watcher = _InterruptWatcher(self.sock, self.target, self.reader, self.pending)
        watcher.start()
        try:
            stop = self.target.resume(step)
        finally:
            watcher.stop()
        self.last_stop = stop
        try:
            self.send(stop.reply())
        except OSError:
            return DISCONNECTED
        return EXITED if stop.exited else None


class _InterruptWatcher(threading.Thread):
    """While the target runs: reads from gdb's socket, turning a 0x03 into target.interrupt();
    anything else is kept for after the stop. Woken through a pipe when the run ends."""

    def __init__(self, sock, target, reader, pending):
        super().__init__(name="gdb-interrupt", daemon=True)
        self.sock, self.target, self.reader, self.pending = sock, target, reader, pending
        self._wake_r, self._wake_w = os.pipe()
        self.gone = False

    def run(self):
        try:
            while True:
                r, _, _ = select.select([self.sock, self._wake_r], [], [])
                if self._wake_r in r:
                    return
                try:
                    data = self.sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.gone = True           # gdb went away: the guest runs on
                    return
                for ev in self.reader.feed(data):
                    if ev[0] == "interrupt":
                        self.target.interrupt()
                    else:
                        self.pending.append(ev)
        finally:
            os.close(self._wake_r)

    def stop(self):
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self.join()
        os.close(self._wake_w)


# ---------------------------------------------------------------------------- addresses
def parse_address(text: str) -> tuple:
    """``[HOST:]PORT`` -> (host, port); host defaults to 127.0.0.1 (ValueError if malformed)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = ""
    host = host or "127.0.0.1"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--gdb {text!r}: give [HOST:]PORT with a port number 0..65535")
    return host, int(port)


def listen(text: str):
    """A listening socket for ``--gdb [HOST:]PORT`` (ValueError naming the problem)."""
    host, port = parse_address(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--gdb {text!r}: cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
        s.listen(1)
    except OSError as e:
        s.close()
        raise ValueError(f"--gdb {text!r}: cannot listen there: {e.strerror}") from None
    return s
