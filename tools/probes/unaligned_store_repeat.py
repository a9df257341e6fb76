#!/usr/bin/env python3
"""Probe: which stores to a read-only RAM alias does Unicorn announce to UC_HOOK_MEM_WRITE_PROT
whole and then repeat byte by byte?

Set-up as in x86shadow's shadow mode: guest RAM mapped twice over one buffer, the alias read-only,
a virtual-TLB fill hook pointing one data page (R|W) at the alias. Each store is run twice: with
the hook accepting the store (returns True) and refusing it (returns False).

Measured with unicorn 2.1.4: a store of size > 1 whose address is not a multiple of its size
(within one page) is announced whole and, when accepted, repeated as `size` one-byte stores of the
same bytes; when refused, nothing follows. Aligned stores are announced once. 16-byte SSE stores
arrive as two 8-byte stores, each following the same rule.

Run: python tools/probes/unaligned_store_repeat.py
"""
import ctypes
import mmap

from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import (UC_ARCH_X86, UC_HOOK_MEM_WRITE_PROT, UC_HOOK_TLB_FILL, UC_MODE_64,
                     UC_PROT_ALL, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_VIRTUAL, Uc, UcError)
from unicorn.x86_const import UC_X86_REG_RBX

SIZE = 0x100000
ALIAS = 0x40000000
PAGE = 0x5000


def stores_seen(asm, accept):
    buf = mmap.mmap(-1, SIZE)
    host = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, SIZE, UC_PROT_ALL, host)
    uc.mem_map_ptr(ALIAS, SIZE, UC_PROT_READ, host)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

    def fill(_uc, va, _acc, entry, _ud):
        page = va & ~0xFFF
        if page == PAGE:
            entry.paddr, entry.perms = ALIAS + page, UC_PROT_READ | UC_PROT_WRITE
        else:
            entry.paddr, entry.perms = page, UC_PROT_ALL
        return True

    seen = []

    def trap(_uc, _acc, addr, size, _value, _ud):
        seen.append((addr - ALIAS - PAGE, size))
        return accept

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    uc.hook_add(UC_HOOK_MEM_WRITE_PROT, trap, None, ALIAS, ALIAS + SIZE - 1)
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(asm + "; hlt", 0x1000)[0])
    uc.mem_write(0x1000, code)
    uc.reg_write(UC_X86_REG_RBX, PAGE)
    try:
        uc.emu_start(0x1000, 0x1000 + len(code) - 1)
    except UcError:
        seen.append("stopped")
    return seen


def main():
    forms = [("mov word ptr [rbx+%d], 0x1234", 2), ("mov dword ptr [rbx+%d], 0x12345678", 4),
             ("mov qword ptr [rbx+%d], rax", 8), ("movdqu xmmword ptr [rbx+%d], xmm0", 16),
             ("lock xadd dword ptr [rbx+%d], eax", 4), ("lock cmpxchg8b qword ptr [rbx+%d]", 8)]
    for form, size in forms:
        for off in range(size):
            insn = form % off
            print(f"{insn:40s} accepted: {stores_seen(insn, True)}")
            print(f"{'':40s} refused:  {stores_seen(insn, False)}")


if __name__ == "__main__":
    main()
