#!/usr/bin/env python3
"""Probe: a data access made from inside a QEMU helper (lock cmpxchg8b, xadd for contrast, a plain
mov) to a page the virtual-TLB fill hook refuses for writes. Does a refused fill unwind the
instruction with no architectural state changed?

Measured with unicorn 2.1.4: yes. emu_start ends with UC_ERR_EXCEPTION, EIP on the instruction,
EDX:EAX, flags and memory untouched (cmpxchg8b would otherwise have loaded EDX:EAX from memory on
its failed compare). Pointing the access at an unmapped page instead lets the helper finish.

Run: python tools/probes/helper_access_fault.py
"""
import ctypes
import mmap

from keystone import KS_ARCH_X86, KS_MODE_32, Ks
from unicorn import (UC_ARCH_X86, UC_HOOK_TLB_FILL, UC_MEM_WRITE, UC_MODE_32, UC_PROT_ALL,
                     UC_PROT_READ, UC_TLB_VIRTUAL, Uc, UcError)
from unicorn.x86_const import (UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX,
                               UC_X86_REG_EFLAGS, UC_X86_REG_EIP, UC_X86_REG_ESI)

SIZE = 0x100000
PAGE = 0x5000
OPERAND = 0x5b50
HOLE = 0x80000000


def run(asm, refuse=True):
    buf = mmap.mmap(-1, SIZE)
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map_ptr(0, SIZE, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

    def fill(_uc, va, acc, entry, _ud):
        page = va & ~0xFFF
        if page == PAGE and acc == UC_MEM_WRITE:
            if refuse:
                return False                   # the guest pte is read-only: refuse
            entry.paddr, entry.perms = HOLE, UC_PROT_ALL     # park it on an unmapped page
            return True
        entry.paddr = page
        entry.perms = UC_PROT_READ if page == PAGE else UC_PROT_ALL
        return True

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_32).asm(asm + "; hlt", 0x1000)[0])
    uc.mem_write(0x1000, code)
    buf[OPERAND:OPERAND + 8] = (0x024fe1a5).to_bytes(8, "little")
    uc.reg_write(UC_X86_REG_ESI, OPERAND)
    uc.reg_write(UC_X86_REG_EBX, 0x11111111)
    uc.reg_write(UC_X86_REG_ECX, 0x22222222)
    try:
        uc.emu_start(0x1000, 0x1000 + len(code) - 1)
        err = None
    except UcError as e:
        err = str(e)
    return dict(err=err, eip=hex(uc.reg_read(UC_X86_REG_EIP)),
                eax=hex(uc.reg_read(UC_X86_REG_EAX)), edx=hex(uc.reg_read(UC_X86_REG_EDX)),
                zf=(uc.reg_read(UC_X86_REG_EFLAGS) >> 6) & 1,
                mem=hex(int.from_bytes(buf[OPERAND:OPERAND + 8], "little")))


def main():
    for asm in ("xor eax, eax; xor edx, edx; lock cmpxchg8b qword ptr [esi]",
                "mov eax, 7; lock xadd dword ptr [esi], eax",
                "mov eax, 7; mov dword ptr [esi], eax"):
        print(f"{asm:58s} refused: {run(asm)}")
        print(f"{'':58s} parked:  {run(asm, refuse=False)}")


if __name__ == "__main__":
    main()
