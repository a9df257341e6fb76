"""What ``x86shadow run FILE`` runs, decided by the file's content: a multiboot kernel (an ELF
with a multiboot header in its first 8 KiB, boot/multiboot.py) or an assembly program behind the
firmware (boot/firmware.py). ``load_guest`` is the one loading function of ``run`` and
``diff``; bad input raises ``GuestError`` with the message the command prints."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .multiboot import MultibootKernel, kernel_file_kind, load_multiboot


class GuestError(Exception):
    """Bad input: the message says what and how to fix it."""


@dataclass(frozen=True)
class Guest:
    path: str
    mode: str | None                 # the program's paging mode; None for a kernel
    program: object = None           # asm.Program (with ``firmware``)
    firmware: bytes = b""
    kernel: MultibootKernel | None = None

    @property
    def is_kernel(self) -> bool:
        return self.kernel is not None

    def load_into(self, machine) -> None:
        if self.kernel is not None:
            machine.load_kernel(self.kernel)
        else:
            machine.load(self.program, self.firmware)


def check_guest_path(path) -> None:
    if os.path.isdir(path):
        raise GuestError(f"cannot read program {path!r}: is a directory")
    if not os.path.exists(path):
        raise GuestError(f"cannot read program {path!r}: no such file")
    if not os.path.isfile(path):
        raise GuestError(f"cannot read program {path!r}: not a regular file (give the path of "
                         "an assembly source or a multiboot kernel)")


def guest_kind(path) -> str:
    """"kernel" or "program" (GuestError for an unreadable file or an ELF that is no
    multiboot kernel)."""
    check_guest_path(path)
    try:
        kind = kernel_file_kind(path)
    except OSError as e:
        raise GuestError(f"cannot read {path!r}: {e.strerror}") from None
    if kind == "elf":
        raise GuestError(f"{path}: an ELF file without a multiboot header in its first 8 KiB: "
                         "x86shadow runs multiboot kernels (as QEMU's -kernel) and assembly "
                         "sources")
    return "kernel" if kind == "kernel" else "program"


def load_guest(path, *, mode=None, ram_mib: int = 128, include_dirs=(), append=None,
               initrd=None, kernels: bool = True) -> Guest:
    """Load FILE for a machine of ``ram_mib``: a kernel (``append``: its command line after the
    file name, ``initrd``: one module) or a program for ``mode``. ``kernels=False``: a command
    that runs programs only."""
    kind = guest_kind(path)
    if kind == "kernel":
        if not kernels:
            raise GuestError(f"{path} is a multiboot kernel: this command runs assembly "
                             "programs only")
        if mode is not None:
            raise GuestError(f"{path} is a multiboot kernel, which sets up its own paging: "
                             "leave out --mode")
        try:
            kernel = load_multiboot(path, ram_mib << 20, append or "", initrd)
        except ValueError as e:
            raise GuestError(str(e)) from None
        except OSError as e:
            raise GuestError(f"cannot read {e.filename or path}: {e.strerror}") from None
        return Guest(path, None, kernel=kernel)
    if append is not None:
        raise GuestError("--append is the command line of a multiboot kernel: "
                         f"{path} is an assembly program")
    if initrd is not None:
        raise GuestError("--initrd is a module for a multiboot kernel: "
                         f"{path} is an assembly program")
    if mode is None:
        raise GuestError(f"{path} is an assembly program: --mode 32, pae or 64 is required")
    from ..asm import AsmError, assemble_firmware, assemble_program
    try:
        for d in include_dirs:
            if not os.path.isdir(d):
                raise GuestError(f"-I {d!r}: no such directory")
        program = assemble_program(path, mode, ram_mib << 20, include_dirs=include_dirs)
        firmware = assemble_firmware(mode, ram_mib << 20)
    except AsmError as e:
        raise GuestError(str(e)) from None
    except OSError as e:
        raise GuestError(f"cannot read {e.filename}: {e.strerror}") from None
    return Guest(path, mode, program=program, firmware=firmware)
