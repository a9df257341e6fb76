"""Devices on the VM's buses: the port bus (serial console, QEMU's isa-debug-exit, the marker
port) and the MMIO bus (room for the coming xAPIC)."""
