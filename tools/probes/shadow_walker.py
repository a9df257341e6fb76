#!/usr/bin/env python3
"""Probe for issue 16, direction 1: can Unicorn's own page walker (UC_TLB_CPU) walk tables we
keep for it -- shadow tables in x86 format at CR3 -- and what would each event cost?

Measures, on one throw-away 64-bit CPU (no x86shadow machine):
  1. TLB refills that hit present entries: the walker's (UC_TLB_CPU) vs a trivial Python fill
     hook (UC_TLB_VIRTUAL, what x86shadow pays today per refill before its MMU work);
  2. a "shadow fault" as the walker would raise it: leaf entries start not present, the #PF
     arrives in UC_HOOK_INTR (vector 14, CR2, error code from the CPU state), the hook writes
     the entry into the table in memory and the instruction restarts in the same emu_start
     (QEMU's old_exception is reset in the hook, cpu/cpustate.py, or the second fault is a #DF);
  3. a guest read of CR3 (`mov rax, cr3`) -- it would see the shadow root: whether a code hook
     on it can emulate it (write RAX, skip the instruction) and what that costs.
Prints one line per measurement. Needs unicorn and keystone (the project's dependencies).

    python tools/probes/shadow_walker.py [--pages N] [--rounds R]
"""
import argparse
import ctypes
import struct
import time

from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_64,
                     UC_PROT_ALL, UC_TLB_CPU, UC_TLB_VIRTUAL, Uc)
from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR2, UC_X86_REG_CR3, UC_X86_REG_CR4,
                               UC_X86_REG_RAX, UC_X86_REG_RIP, UC_X86_REG_RSP)

from x86shadow.cpu.cpustate import probe_offsets

RAM = 64 << 20
CODE, STACK = 0x1000, 0x8000
TABLES = 0x200000            # the "shadow tables" (the probe's own), above code and data
DATA = 0x1000000             # the pages touched: 1 MiB apart, so they collide in QEMU's TLB
P, W = 1, 2


def frame(va):
    """The physical page behind va: identity below DATA, else one of 64 frames from DATA."""
    if va < DATA:
        return va & ~0xFFF
    return DATA + ((((va - DATA) >> 20) & 63) << 12)


class Tables:
    """4-level tables over the low RAM, 4 KiB pages, built in the CPU's physical memory."""

    def __init__(self, uc):
        self.uc, self.next = uc, TABLES
        self.root = self.alloc()

    def alloc(self):
        a = self.next
        self.next += 0x1000
        self.uc.mem_write(a, bytes(0x1000))
        return a

    def entry_addr(self, va, create=True):
        t = self.root
        for shift in (39, 30, 21):
            ea = t + ((va >> shift) & 511) * 8
            e = struct.unpack("<Q", self.uc.mem_read(ea, 8))[0]
            if not e & P:
                nt = self.alloc()
                self.uc.mem_write(ea, struct.pack("<Q", nt | P | W))
                e = nt | P | W
            t = e & ~0xFFF
        return t + ((va >> 12) & 511) * 8

    def map(self, va, present=True):
        self.uc.mem_write(self.entry_addr(va), struct.pack("<Q", frame(va) | (P | W if present else 0)))


def machine(code, tlb):
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, RAM, UC_PROT_ALL)
    uc.mem_write(CODE, code)
    uc.ctl_set_tlb_mode(tlb)
    return uc


def loop_code(pages, rounds, extra=""):
    asm = f"""
        mov rcx, {rounds}
    r:  mov rsi, {DATA}
        mov rdx, {pages}
    p:  mov rax, qword ptr [rsi]
        {extra}
        add rsi, 0x100000
        dec rdx
        jnz p
        dec rcx
        jnz r
        hlt
    """
    return bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(asm, CODE)[0])


def paging_on(uc, tables):
    uc.reg_write(UC_X86_REG_CR4, 0x20)                 # PAE (long mode is on from the start)
    uc.reg_write(UC_X86_REG_CR3, tables.root)
    uc.reg_write(UC_X86_REG_CR0, 0x80010033)
    uc.reg_write(UC_X86_REG_RSP, STACK)


def build(code, pages, present=True):
    uc = machine(code, UC_TLB_CPU)
    t = Tables(uc)
    for va in range(0, 0x10000, 0x1000):
        t.map(va)
    for i in range(pages):
        t.map(DATA + i * 0x100000, present)
    paging_on(uc, t)
    return uc, t


def timed(uc):
    t0 = time.perf_counter()
    uc.emu_start(CODE, 0)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()
    accesses = a.pages * a.rounds

    # 1. refills: the walker over our tables vs a trivial Python fill hook
    code = loop_code(a.pages, a.rounds)
    uc, _ = build(code, a.pages)
    hw = timed(uc)
    ucv = machine(code, UC_TLB_VIRTUAL)
    fills = [0]

    def fill(_uc, va, _acc, entry, _ud):
        fills[0] += 1
        entry.paddr = frame(va)
        entry.perms = UC_PROT_ALL
        return True
    ucv.hook_add(UC_HOOK_TLB_FILL, fill)
    ucv.reg_write(UC_X86_REG_CR4, 0x20)
    ucv.reg_write(UC_X86_REG_CR0, 0x80010033)
    ucv.reg_write(UC_X86_REG_RSP, STACK)
    sw = timed(ucv)
    print(f"1. refills: {accesses} accesses 1 MiB apart; walker over our tables {hw / accesses * 1e6:.2f} us "
          f"per access; trivial Python fill hook {sw / accesses * 1e6:.2f} us per access "
          f"({fills[0]} fills, {(sw - hw) / max(fills[0], 1) * 1e6:.2f} us more per fill)")

    # 2. shadow faults through UC_HOOK_INTR, fixed in place
    uc, t = build(loop_code(a.pages, 1), a.pages, present=False)
    off = probe_offsets()
    ctx = uc.context_save()
    addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
    seen = {"pf": 0, "other": 0, "bad": 0}

    def intr(uc, intno, _ud):
        if intno != 14:
            seen["other"] += 1
            uc.emu_stop()
            return
        seen["pf"] += 1
        cr2 = uc.reg_read(UC_X86_REG_CR2)
        uc.context_update(ctx)
        ec = ctypes.c_uint32.from_address(addr + off.error_code).value
        if ec & 1:
            seen["bad"] += 1
        t.map(cr2)                                     # the "shadow fault": install the entry
        uc.context_update(ctx)
        ctypes.c_int32.from_address(addr + off.old_exception).value = -1
        uc.context_restore(ctx)                        # RIP unchanged: the access restarts
    uc.hook_add(UC_HOOK_INTR, intr)
    el = timed(uc)
    ok = seen["pf"] == a.pages and not seen["other"] and not seen["bad"]
    print(f"2. shadow faults via UC_HOOK_INTR, fixed in the hook, restarted in place: {seen['pf']} faults "
          f"for {a.pages} pages, other exceptions {seen['other']}, {'OK' if ok else 'FAILED'}; "
          f"{el / max(seen['pf'], 1) * 1e6:.1f} us per fault (hook included)")

    # 3. mov rax, cr3 emulated by a code hook
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    n = 20000
    code = bytes(ks.asm(f"mov rcx, {n}; l: mov rax, cr3; dec rcx; jnz l; hlt", CODE)[0])
    uc, t = build(code, 0)
    site = CODE + 7                                    # mov rcx, imm32 is 7 bytes
    guest_cr3 = 0x12345000
    hits = [0]
    good = [0]

    def read_cr3(uc, address, size, _ud):
        hits[0] += 1
        uc.reg_write(UC_X86_REG_RAX, guest_cr3)
        uc.reg_write(UC_X86_REG_RIP, address + 3)     # skip the 3-byte mov rax, cr3

    uc.hook_add(UC_HOOK_CODE, read_cr3, None, site, site)
    el = timed(uc)
    good[0] = uc.reg_read(UC_X86_REG_RAX) == guest_cr3
    print(f"3. mov rax, cr3 emulated in a code hook: {hits[0]} of {n} reads hooked, guest sees its CR3: "
          f"{'yes' if good[0] else 'NO'}; {el / n * 1e6:.2f} us per read")


if __name__ == "__main__":
    main()
