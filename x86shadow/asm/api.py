"""The public API: assemble text or a file, a guest program (mode header, layout symbols, ``jmp
main`` prologue) or the firmware (cached)."""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import layout, resources
from .diagnose import _diagnose
from .errors import AsmError
from .keystone_runner import _keystone
from .preprocess import _Pre
from .verify import _verify

MODES = ("32", "pae", "64")
_BITS = {"32": 32, "pae": 32, "64": 64}


@dataclass(frozen=True)
class Program:
    """An assembled guest program: ``code`` is loaded at ``base`` and entered at ``entry``."""
    code: bytes
    base: int
    entry: int
    modes: tuple = MODES
    path: str = ""
    mode: str = ""


def _assemble_pre(pre: _Pre, base: int) -> bytes:
    pre.finish()
    ks = _keystone(pre.bits)
    body = "\n".join(l.text for l in pre.lines)
    table = pre.table_text()
    out, e = ks.run(ks.plain, body + ("\n" + table if table else ""), base)
    if out is None:
        _diagnose(pre, base, e)
    if pre.checks:
        n = 16 * len(pre.checks)
        code, tab = out[:-n], out[-n:]
        _verify(pre, base, code, tab)
        return code
    return out


def _check_bits(bits):
    if bits not in (32, 64):
        raise ValueError(f"bits must be 32 or 64, not {bits!r}")


def assemble(text: str, *, bits: int, base: int, symbols: dict | None = None,
             filename: str = "<input>") -> bytes:
    """Assemble Intel-syntax ``text`` for ``bits`` (32/64) at address ``base``.

    ``symbols`` are predefined with ``.set``; ``.include`` paths are relative to ``filename``'s
    directory (the current directory for ``<...>`` names). Raises :class:`AsmError`."""
    _check_bits(bits)
    pre = _Pre(bits)
    pre.program_file = filename
    pre.add_symbols(symbols)
    basedir = "." if filename.startswith("<") else os.path.dirname(filename)
    chain = () if filename.startswith("<") else (os.path.realpath(filename),)
    pre.add_text(text, filename, basedir, chain)
    return _assemble_pre(pre, base)


def assemble_file(path, *, bits: int, base: int, symbols: dict | None = None) -> bytes:
    """Assemble the file at ``path`` (see :func:`assemble`)."""
    _check_bits(bits)
    path = os.fspath(path)
    pre = _Pre(bits)
    pre.program_file = path
    pre.add_symbols(symbols)
    pre.add_file(path, path)
    return _assemble_pre(pre, base)


_HEADER_RE = re.compile(r"^\s*#\s*x86shadow\s*:\s*(.*)$", re.I)


def _read_header(path: str, text: str):
    """The modes a program declares with ``# x86shadow: modes=32,pae,64`` -> (modes, lineno)."""
    for lineno, raw in enumerate(text.split("\n"), 1):
        m = _HEADER_RE.match(raw)
        if not m:
            continue
        mm = re.search(r"\bmodes\s*=\s*(\w*(?:\s*,\s*\w+)*)", m.group(1), re.I)
        if mm:
            val = mm.group(1).strip()
            modes = tuple(v.strip().lower() for v in val.split(",") if v.strip())
            bad = [v for v in modes if v not in MODES]
            if bad or not modes:
                raise AsmError(f"bad mode list '{val}' (modes are 32, pae, 64)", path, lineno)
            return modes, lineno
    return MODES, None


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AsmError(f"cannot read: {e.strerror}", path) from None
    bad = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start if bad < 0 else min(bad, e.start)
    if bad >= 0:
        line = data.count(b"\n", 0, bad) + 1
        raise AsmError(f"not an assembly source: byte {data[bad]:#04x} at offset {bad} "
                       f"(sources are ASCII text; UTF-8 is accepted in comments)", path, line)
    return text


def program_modes(path) -> tuple:
    """The modes the program at ``path`` supports (its ``# x86shadow: modes=...`` header)."""
    path = os.fspath(path)
    return _read_header(path, _read_text(path))[0]


def _norm_mode(mode) -> str:
    m = str(mode).lower()
    if m not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return m


def assemble_program(path, mode, ram_size: int, symbols: dict | None = None,
                     include_dirs=()) -> Program:
    """Assemble a guest program for ``mode`` at PROG_BASE with the layout symbols (plus
    ``symbols``, e.g. scenario parameters), behind a ``jmp main``. ``.include "x"`` is looked
    for beside the including file, then in ``include_dirs``, then in the guest library's folder
    (``lib/console.inc`` ... work from anywhere). Raises :class:`AsmError` (bad source, no
    ``main``, mode not in its header, image too large)."""
    path = os.fspath(path)
    mode = _norm_mode(mode)
    text = _read_text(path)
    modes, hline = _read_header(path, text)
    if mode not in modes:
        raise AsmError(f"program supports modes {', '.join(modes)}, not {mode}", path, hline)
    pre = _Pre(_BITS[mode])
    pre.program_file = path
    pre.include_dirs = [os.fspath(d) for d in include_dirs] + [str(resources.guestcode_dir())]
    pre.add_symbols({**layout.asm_symbols(mode, ram_size), **(symbols or {})})
    pre.add_synthetic("jmp main", "<prologue>")
    pre.add_text(text, path, os.path.dirname(path), (os.path.realpath(path),))
    code = _assemble_pre(pre, layout.PROG_BASE)
    if layout.PROG_BASE + len(code) > layout.PROG_LIMIT:
        raise AsmError(f"program image is {len(code):#x} bytes; it must end below "
                       f"{layout.PROG_LIMIT:#x}", path)
    return Program(code=code, base=layout.PROG_BASE, entry=layout.PROG_BASE, modes=modes,
                   path=path, mode=mode)


def firmware_path(mode) -> Path:
    """The firmware source for ``mode`` (firmware/boot32.asm or firmware/boot64.asm)."""
    mode = _norm_mode(mode)
    d = resources.firmware_dir()
    return d / ("boot64.asm" if mode == "64" else "boot32.asm")


_fw_cache: dict = {}
_fw_lock = threading.Lock()


def assemble_firmware(mode, ram_size: int) -> bytes:
    """The firmware image for ``mode``/``ram_size``, assembled at FW_BASE with the layout symbols
    and ``MAIN = PROG_BASE``. Results are cached (same inputs and source -> same bytes)."""
    mode = _norm_mode(mode)
    ram_size = int(ram_size)
    path = firmware_path(mode)
    try:
        st = path.stat()
    except OSError:
        raise AsmError(f"firmware source {path} not found (installed with the package as "
                       f"x86shadow/_data/firmware, or firmware/ beside it in a checkout; "
                       f"reinstall x86shadow)") from None
    if ram_size <= 0 or ram_size % (1 << 20):
        raise AsmError(f"RAM size {ram_size:#x} must be a positive multiple of 1 MiB")
    if mode != "64" and ram_size > 1 << 32:
        raise AsmError(f"RAM size {ram_size:#x}: modes 32 and pae address at most 4 GiB")
    if ram_size < layout.MIN_IDENTITY:
        raise AsmError(f"RAM size {ram_size:#x}: at least {layout.MIN_IDENTITY >> 20} MiB needed")
    key = (mode, ram_size, str(path), st.st_mtime_ns, st.st_size)
    with _fw_lock:
        code = _fw_cache.get(key)
    if code is None:
        symbols = dict(layout.asm_symbols(mode, ram_size))
        symbols["MAIN"] = layout.PROG_BASE
        code = assemble_file(str(path), bits=_BITS[mode], base=layout.FW_BASE, symbols=symbols)
        if layout.FW_BASE + len(code) > layout.FW_DATA:
            raise AsmError(f"firmware image too large ({len(code):#x} bytes)", str(path))
        with _fw_lock:
            _fw_cache[key] = code
    return code


def assemble_leave64(entry: int, info_addr: int) -> bytes:
    """The boot stub of multiboot kernels (firmware/multiboot_leave64.asm): its 64-bit part at
    LEAVE64_BASE and its 32-bit part at LEAVE64_CODE32, as one image from LEAVE64_BASE, for a
    kernel entered at ``entry`` with the multiboot information at ``info_addr``."""
    from ..boot import multiboot as mb
    path = resources.firmware_dir() / "multiboot_leave64.asm"
    if not path.is_file():
        raise AsmError(f"firmware source {path} not found (reinstall x86shadow)")
    symbols = {"LEAVE64_PML4": mb.LEAVE64_PML4, "LEAVE64_PDPT": mb.LEAVE64_PDPT,
               "LEAVE64_PD": mb.LEAVE64_PD, "LEAVE64_CODE32": mb.LEAVE64_CODE32,
               "SEL_CODE32": mb.SEL_CODE32, "SEL_DATA": mb.SEL_DATA,
               "MB_BOOT_MAGIC": mb.MB_BOOT_MAGIC, "MB_INFO": info_addr, "KERNEL_ENTRY": entry}
    key = ("leave64", entry, info_addr, str(path), path.stat().st_mtime_ns)
    with _fw_lock:
        image = _fw_cache.get(key)
    if image is None:
        code64 = assemble_file(str(path), bits=64, base=mb.LEAVE64_BASE,
                               symbols={**symbols, "BITS": 64})
        code32 = assemble_file(str(path), bits=32, base=mb.LEAVE64_CODE32,
                               symbols={**symbols, "BITS": 32})
        room = mb.LEAVE64_CODE32 - mb.LEAVE64_BASE
        if len(code64) > room or mb.LEAVE64_CODE32 + len(code32) > mb.LEAVE64_GDT:
            raise AsmError("the multiboot boot stub is too large", str(path))
        image = code64 + bytes(room - len(code64)) + code32
        with _fw_lock:
            _fw_cache[key] = image
    return image


# the repository's test kernels (guestcode/kernels/, docs/KERNELS.md): where each part goes
KERNEL_BASE32 = 0x0010_0000          # the 32-bit part, entered by the multiboot loader
KERNEL_BASE64 = 0x0018_0000          # the 64-bit part (a kernel with "parts=32,64")
KERNEL_DATA = 0x0020_0000            # 0x200000..0x400000: the kernel's data, tables, stack
_PARTS_RE = re.compile(r"\bparts\s*=\s*(\w+(?:\s*,\s*\w+)*)", re.I)


def kernel_symbols() -> dict:
    """The ``.set`` symbols of a test kernel (besides BITS): its part bases, its data area (as
    FREE_BASE, which lib/console.inc keeps its state in) and the device ports."""
    return {"KERNEL_BASE32": KERNEL_BASE32, "KERNEL_BASE64": KERNEL_BASE64,
            "KERNEL_DATA": KERNEL_DATA, "FREE_BASE": KERNEL_DATA,
            "SERIAL_PORT": layout.SERIAL_PORT, "EXIT_PORT": layout.EXIT_PORT}


def assemble_kernel(path, symbols: dict | None = None) -> tuple:
    """Assemble a test kernel: its 32-bit part (``BITS == 32``) at KERNEL_BASE32, and, if its
    header says ``# x86shadow: kernel parts=32,64``, its 64-bit part (``BITS == 64``) at
    KERNEL_BASE64. Returns ((address, code), ...) for boot/elfwriter.py; the entry is
    KERNEL_BASE32."""
    path = os.fspath(path)
    text = _read_text(path)
    parts = (32,)
    for raw in text.split("\n"):
        m = _HEADER_RE.match(raw)
        pm = _PARTS_RE.search(m.group(1)) if m else None
        if pm:
            parts = tuple(int(p) for p in pm.group(1).replace(" ", "").split(","))
            break
    if parts not in ((32,), (32, 64)):
        raise AsmError(f"kernel parts must be 32 or 32,64, not {parts}", path)
    out = []
    for bits, base in zip(parts, (KERNEL_BASE32, KERNEL_BASE64)):
        pre = _Pre(bits)
        pre.program_file = path
        pre.include_dirs = [str(resources.guestcode_dir())]
        pre.add_symbols({**kernel_symbols(), **(symbols or {}), "BITS": bits})
        pre.add_text(text, path, os.path.dirname(path), (os.path.realpath(path),))
        code = _assemble_pre(pre, base)
        limit = KERNEL_BASE64 if base == KERNEL_BASE32 else KERNEL_DATA
        if base + len(code) > limit:
            raise AsmError(f"the {bits}-bit part is {len(code):#x} bytes: it must end below "
                           f"{limit:#x}", path)
        out.append((base, code))
    return tuple(out)
