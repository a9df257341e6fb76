"""Hooks registered straight with ctypes, without the Unicorn binding's per-call wrapper (which
costs about 1 us per call: it converts the handle back to the Uc object and looks the callback
up). An exception raised by the callback is kept and re-raised by ``emu_start``, as the
binding's own wrapper does."""
from __future__ import annotations

import ctypes

from unicorn.unicorn_py3.unicorn import uc_tlb_entry

from unicorn import UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_TLB_FILL

# the binding's HOOK_TLB_FILL_CFUNC and HOOK_CODE_CFUNC with the handle (and the entry) as plain
# addresses: ctypes then makes one object per fill (the entry, at its address) instead of three
_TLB_FILL = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_void_p)
_CODE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
_INTR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)


def _hand_back(uc, e) -> None:
    """The callback raised: keep the exception for emu_start and stop."""
    if uc._hook_exception is None:
        uc._hook_exception = e
    uc.emu_stop()


def tlb_fill_callback(uc, fill):
    """A UC_HOOK_TLB_FILL callback: ``fill(uc, va, access, entry, None) -> bool`` (entry: the
    uc_tlb_entry to fill), the binding's signature. Keep the returned object alive as long as
    the hook."""
    entry_at = uc_tlb_entry.from_address

    def call(_handle, va, access, entry, _key):
        try:
            return fill(uc, va, access, entry_at(entry), None)
        except BaseException as e:           # noqa: BLE001 - handed back to emu_start
            _hand_back(uc, e)
            return False
    return _TLB_FILL(call)


def code_callback(uc, hook):
    """A UC_HOOK_CODE callback: ``hook(uc, address, size, None)``, the binding's signature.
    Keep the returned object alive as long as any hook registered with it."""
    def call(_handle, address, size, _key):
        try:
            hook(uc, address, size, None)
        except BaseException as e:           # noqa: BLE001 - handed back to emu_start
            _hand_back(uc, e)
    return _CODE(call)


def intr_callback(uc, hook):
    """A UC_HOOK_INTR callback: ``hook(uc, intno, None)``, the binding's signature (--tlb
    walker: every shadow fault arrives here). Keep the returned object alive."""
    def call(_handle, intno, _key):
        try:
            hook(uc, intno, None)
        except BaseException as e:           # noqa: BLE001 - handed back to emu_start
            _hand_back(uc, e)
    return _INTR(call)


def add_intr(uc, cfunc) -> None:
    uc._Uc__do_hook_add(UC_HOOK_INTR, cfunc, 1, 0)


def add_tlb_fill(uc, cfunc) -> None:
    uc._Uc__do_hook_add(UC_HOOK_TLB_FILL, cfunc, 1, 0)


def add_code(uc, cfunc, address: int) -> None:
    """The code hook on one instruction address."""
    uc._Uc__do_hook_add(UC_HOOK_CODE, cfunc, address, address)
