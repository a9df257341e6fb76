"""Port and MMIO buses: a device claims a range; an access goes to the device that claims it.

A write may ask the VM to stop (a device's ``write`` returns a ``StopRequest``); reads nobody
claims float high (all ones), as on a PC.
"""
from __future__ import annotations

from typing import NamedTuple


class StopRequest(NamedTuple):
    """A device asked the VM to end the run with this exit status (QEMU's isa-debug-exit)."""
    status: int


class Device:
    """A device: ``read(addr, size) -> int`` and ``write(addr, size, value) -> StopRequest|None``.
    ``instrumentation``: not a device of the guest's machine (no exit is counted for it)."""

    name = "device"
    instrumentation = False

    def read(self, addr: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, addr: int, size: int, value: int):
        return None


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._ranges = []            # (first, last, device)
        self._by_addr = {}           # exact-address cache

    def attach(self, device: Device, first: int, last: int | None = None) -> Device:
        last = first if last is None else last
        for a, b, d in self._ranges:
            if first <= b and a <= last:
                raise ValueError(f"{self.name} bus: {device.name} at {first:#x}-{last:#x} overlaps "
                                 f"{d.name} at {a:#x}-{b:#x}")
        self._ranges.append((first, last, device))
        self._by_addr.clear()
        return device

    def ranges(self):
        """(first, last, device) of every device, in the order they were attached."""
        return list(self._ranges)

    def device_at(self, addr: int):
        d = self._by_addr.get(addr, self)
        if d is self:
            d = None
            for a, b, dev in self._ranges:
                if a <= addr <= b:
                    d = dev
                    break
            self._by_addr[addr] = d
        return d

    def read(self, addr: int, size: int) -> int:
        d = self.device_at(addr)
        if d is None:
            return (1 << (8 * size)) - 1
        return d.read(addr, size)
