"""Booting a guest: the firmware loader (and the coming multiboot loader)."""
