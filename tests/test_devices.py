"""The port bus and the PC devices, without a CPU."""
import pytest

from x86shadow import events as ev
from x86shadow import layout
from x86shadow.devices.bus import Bus, Device, StopRequest
from x86shadow.devices.pc import attach_pc_devices


def make():
    out, marks = bytearray(), []
    events = ev.EventBus()
    events.subscribe(lambda _k, f: marks.append(f["value"]), (ev.MARKER,))
    bus = Bus("port")
    attach_pc_devices(bus, events, out.extend)
    return bus, out, marks


def test_unclaimed_ports_read_all_ones_by_size():
    bus, _, _ = make()
    assert bus.device_at(0x80) is None
    assert [bus.read(0x80, n) for n in (1, 2, 4)] == [0xFF, 0xFFFF, 0xFFFFFFFF]


def test_serial_transmits_bytes_and_reports_an_empty_transmitter():
    bus, out, _ = make()
    dev = bus.device_at(layout.SERIAL_PORT)
    assert dev.write(layout.SERIAL_PORT, 1, 0x141) is None
    assert bytes(out) == b"A"                                  # the low byte only
    assert bus.read(layout.SERIAL_PORT + 5, 1) == 0x60          # LSR: THR empty, idle
    assert bus.read(layout.SERIAL_PORT + 1, 1) == 0xFF          # other registers float
    dev.write(layout.SERIAL_PORT + 1, 1, 0x42)                  # not THR: nothing sent
    assert bytes(out) == b"A"


def test_debug_exit_asks_the_vm_to_stop_with_qemu_status():
    bus, _, _ = make()
    dev = bus.device_at(layout.EXIT_PORT)
    assert dev.write(layout.EXIT_PORT, 4, 3) == StopRequest(7)
    assert dev.write(layout.EXIT_PORT, 4, 0xFFFFFFFF) == StopRequest((0xFFFFFFFF << 1) | 1)


def test_marker_is_instrumentation_and_emits_an_event():
    bus, _, marks = make()
    dev = bus.device_at(layout.MARKER_PORT)
    assert dev.instrumentation and not bus.device_at(layout.EXIT_PORT).instrumentation
    dev.write(layout.MARKER_PORT, 1, 5)
    assert marks == [5]


def test_overlapping_devices_are_refused():
    bus, _, _ = make()
    with pytest.raises(ValueError, match="overlaps serial"):
        bus.attach(Device(), layout.SERIAL_PORT + 3, layout.SERIAL_PORT + 9)
    bus.attach(Device(), layout.SERIAL_PORT + 8)                # right after the UART: fine
    assert bus.read(layout.SERIAL_PORT + 8, 1) == 0xFF
