"""The devices of the machine guest programs run on (layout.py has their ports)."""
from __future__ import annotations

from .. import events as ev
from .. import layout
from .bus import Device, StopRequest


class SerialConsole(Device):
    """The transmit side of a 16550 UART: bytes written to THR go to ``sink``; LSR says the
    transmitter is empty; every other register reads as all ones."""

    name = "serial"
    LSR = 5

    def __init__(self, base: int, sink):
        self.base = base
        self.sink = sink

    def read(self, addr, size):
        if addr - self.base == self.LSR:
            return 0x60                     # line status: transmitter empty
        return super().read(addr, size)

    def write(self, addr, size, value):
        if addr == self.base:
            self.sink(bytes([value & 0xFF]))
        return None


class DebugExit(Device):
    """QEMU's isa-debug-exit: a write of v ends the run with status (v << 1) | 1."""

    name = "isa-debug-exit"

    def write(self, addr, size, value):
        return StopRequest(((value & 0xFFFFFFFF) << 1) | 1)


class MarkerPort(Device):
    """Instrumentation, not a device: a write emits a MARKER event (value) that observers
    (Machine.markers, the fault lab, the kmap scenario) subscribe to."""

    name = "marker"
    instrumentation = True

    def __init__(self, events):
        self.events = events

    def write(self, addr, size, value):
        events = self.events
        events.emit(ev.MARKER, value=value)
        if events.tracing:
            events.guest_runs()
            events.emit(ev.TRACE_MARKER, value=value)
        return None


def attach_pc_devices(bus, events, serial_sink) -> None:
    bus.attach(SerialConsole(layout.SERIAL_PORT, serial_sink), layout.SERIAL_PORT,
               layout.SERIAL_PORT + 7)
    bus.attach(DebugExit(), layout.EXIT_PORT)
    bus.attach(MarkerPort(events), layout.MARKER_PORT)
