"""Where the guest sources are: the firmware (``firmware/*.asm``) and the guest library and
programs (``guestcode/``).

The top-level ``firmware/`` and ``guestcode/`` folders of the repository are the only copies. A
built wheel (``pip install .``) carries them as package data in ``x86shadow/_data/`` (copied there
by setup.py's ``build_py``); a source checkout or an editable install (``pip install -e .``) finds
them beside the package. The installed copy wins when both exist.
"""
from __future__ import annotations

import errno
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "_data"          # package data of a regular install
CHECKOUT_DIR = PACKAGE_DIR.parent         # the source checkout holding the package

FIRMWARE = "firmware"
GUESTCODE = "guestcode"


class ResourceError(FileNotFoundError):
    """The guest sources are neither installed with the package nor beside it (a broken
    install)."""

    def __init__(self, what: str, candidates):
        tried = " nor ".join(str(c) for c in candidates)
        super().__init__(errno.ENOENT, f"x86shadow's {what} not found: neither {tried} exists "
                                       f"(reinstall x86shadow, or run it from a source checkout)",
                         str(candidates[0]))

    def __str__(self):
        return self.strerror


def _locate(name: str, what: str) -> Path:
    candidates = (DATA_DIR / name, CHECKOUT_DIR / name)
    for d in candidates:
        if d.is_dir():
            return d
    raise ResourceError(what, candidates)


def firmware_dir() -> Path:
    """The folder of the firmware sources (boot32.asm, boot64.asm)."""
    return _locate(FIRMWARE, "firmware sources")


def guestcode_dir() -> Path:
    """The folder of the guest library and programs (lib/, bench/, kmap/, the examples)."""
    return _locate(GUESTCODE, "guest code")
