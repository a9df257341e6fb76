"""Precise interception of the privileged instructions the MMU and the CPU model must see.

Unicorn has no hook for ``mov crN``, ``invlpg``, ``wrmsr`` or ``rdmsr`` (its RDMSR/WRMSR
instruction hooks are refused in 2.1.4). We find them ourselves: whenever a code page is first
executed (shadow mode: filled for execution; native mode: its first fetch, see
``VCPU._exec_page``), its bytes are scanned for the opcode patterns (``0F 22`` mov to CR,
``0F 01 /7`` invlpg, ``0F 30`` wrmsr, ``0F 32`` rdmsr, ``0F 01 CA/CB`` clac/stac), and a
one-address ``UC_HOOK_CODE`` is placed on every possible
instruction start (the pattern, or the pattern preceded by legal prefix bytes). A hook on an address
that turns out not to start such an instruction just returns. Code pages are re-scanned when their
bytes change, so self-modifying or freshly loaded code is covered.

A new hook is invisible to blocks already translated, and a page is scanned while QEMU is translating
it, so the fill that finds new sites asks the run loop to drop the page's translations and restart.
"""
from __future__ import annotations

import re

from . import rawhooks

# prefixes that may precede the 0F escape: operand/address size, segment, lock/rep, REX (64-bit)
_PREFIX32 = frozenset(b"\x66\x67\xF2\xF3\x2E\x36\x3E\x26\x64\x65\xF0")
_PREFIX64 = _PREFIX32 | frozenset(range(0x40, 0x50))
# 0F 22 (mov cr, r); 0F 01 with modrm.reg = 7 and mod != 3 (invlpg m); 0F 30 (wrmsr);
# 0F 32 (rdmsr); 0F 01 CA / CB (clac / stac)
_OPCODES = rb"\x22|\x30|\x32|\x01[\x38-\x3F\x78-\x7F\xB8-\xBF\xCA\xCB]"
# (a match consumes only the 0F: the rest is a lookahead, so that overlapping candidates --
# 0F 20 0F 22 holds one at 0 and one at 2 -- are all found)
_PATTERN = re.compile(rb"\x0F(?=" + _OPCODES + rb")", re.DOTALL)
# the same with 0F 20 (mov r, cr: the guest's CR reads) -- --tlb walker, where the hardware's
# CR0/CR3/CR4 are not the guest's (cpu/walker.py)
# but not of CR2 (ModRM.reg 2; the CPU ignores ModRM.mod here): the hardware's CR2 is the
# guest's, and a #PF handler reads it at every fault
_PATTERN_READS = re.compile(rb"\x0F(?=\x20[^\x10-\x17\x50-\x57\x90-\x97\xD0-\xD7]|" + _OPCODES
                            + rb")", re.DOTALL)
# the mnemonics (capstone's) the hooks act on; any other instruction found at a hooked address
# just runs
INTERCEPTED = frozenset({"mov", "invlpg", "wrmsr", "rdmsr", "stac", "clac"})


def candidate_offsets(page: bytes, bits: int, reads: bool = False):
    """Offsets in a 4 KiB page where an intercepted instruction may start (``reads``: mov from
    CR too)."""
    prefixes = _PREFIX64 if bits == 64 else _PREFIX32
    out = set()
    for m in (_PATTERN_READS if reads else _PATTERN).finditer(page):
        off = m.start()
        out.add(off)
        k = off - 1
        while k >= 0 and off - k <= 4 and page[k] in prefixes:
            out.add(k)
            k -= 1
    return out


class Interceptor:
    """Scans executed code pages and keeps one code hook per candidate address."""

    def __init__(self, uc, bits, callback, reads=False):
        self.uc = uc
        self.reads = reads
        self.bits = bits
        self.callback = callback
        self._raw = rawhooks.code_callback(uc, callback)    # one C callback for every site
        self.scanned = {}          # va_page -> (gfn, page bytes) at the last scan
        self.hooked = set()        # virtual addresses with a hook

    def on_exec_fill(self, va_page: int, gfn: int, page: bytes) -> bool:
        """Called from the fill hook for an executable fill; True if new hooks were added (the
        caller must then make the run loop drop cached translations of that page and retry)."""
        prev = self.scanned.get(va_page)
        if prev is not None and prev[0] == gfn and prev[1] == page:
            return False
        self.scanned[va_page] = (gfn, page)
        added = False
        for off in candidate_offsets(page, self.bits, self.reads):
            va = va_page + off
            if va not in self.hooked:
                self.hooked.add(va)
                rawhooks.add_code(self.uc, self._raw, va)
                added = True
        return added
