"""The repository's test kernels (guestcode/kernels/NAME.asm) built for a test: assembled with
keystone and wrapped as a multiboot ELF32 (boot/elfwriter.py)."""
from __future__ import annotations

from x86shadow.asm.api import KERNEL_BASE32, assemble_kernel
from x86shadow.boot.elfwriter import multiboot_elf32
from x86shadow.resources import guestcode_dir


def build_kernel(name: str, directory) -> str:
    """Path of ``directory/NAME.elf``, built from guestcode/kernels/NAME.asm."""
    path = directory / f"{name}.elf"
    path.write_bytes(multiboot_elf32(assemble_kernel(guestcode_dir() / "kernels" / f"{name}.asm"),
                                     KERNEL_BASE32))
    return str(path)
