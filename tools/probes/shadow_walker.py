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
  4a. a leaf to the read-only alias of RAM (RAM mapped twice with mem_map_ptr, as the adapter
     does) with W=1: the store arrives in UC_HOOK_MEM_WRITE_PROT (address, size, value), the hook
     completes it or refuses it; and a leaf with W=0: the store's #PF in UC_HOOK_INTR;
  4b. the walker's A/D bits in the tables in memory (which level, at which access);
  4c. PAE tables under 32-bit code with long mode off (a 2-level guest shadowed PAE-shaped):
     what the guest reads from CR4, whether CR3 keeps a root above 4 GiB;
  4d. guest reads of CR0 / CR4 / EFER (rdmsr) emulated by a one-address raw code hook: cost;
  4e. which RIP later memory hooks see after a RIP write in a code hook, after a restart from
     UC_HOOK_INTR, and after a delivery (RIP written to a handler) in UC_HOOK_INTR vs the run loop;
  4f. a whole-TLB flush (mov cr3) + the refills after it: walker vs a trivial Python fill hook;
  4g. stores through executable vs NX data leaves under the walker (QEMU's store fast path).
Prints one line per measurement. Needs unicorn and keystone (the project's dependencies).

    python tools/probes/shadow_walker.py [--pages N] [--rounds R]
"""
import argparse
import ctypes
import mmap
import struct
import time

from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_MEM_WRITE_PROT,
                     UC_HOOK_TLB_FILL, UC_MODE_32, UC_MODE_64, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ,
                     UC_PROT_WRITE, UC_TLB_CPU,
                     UC_TLB_VIRTUAL, Uc, UcError)
from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR2, UC_X86_REG_CR3, UC_X86_REG_CR4,
                               UC_X86_REG_EBX, UC_X86_REG_MSR, UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RIP,
                               UC_X86_REG_RSP)

from x86shadow.cpu.cpustate import CpuState, probe_offsets

RAM = 64 << 20
CODE, STACK = 0x1000, 0x8000
TABLES = 0x200000            # the "shadow tables" (the probe's own), above code and data
DATA = 0x1000000             # the pages touched: 1 MiB apart, so they collide in QEMU's TLB
P, W = 1, 2
NX_BIT = 1 << 63
EFER, EFER_NXE = 0xC0000080, 1 << 11


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


# ---------------------------------------------------------------- issue 16 direction 1, stage 1
ALIAS = 1 << 36                 # the read-only alias of RAM (layout.ALIAS_BASE)
D, A_BIT, NX = 1 << 6, 1 << 5, 1 << 63


def shared_machine(code, tlb=UC_TLB_CPU):
    """RAM as one host buffer, mapped twice: RWX at 0 and read-only at ALIAS (as the adapter)."""
    buf = mmap.mmap(-1, RAM)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, RAM, UC_PROT_ALL, addr)
    uc.mem_map_ptr(ALIAS, RAM, UC_PROT_READ, addr)
    uc.mem_write(CODE, code)
    uc.ctl_set_tlb_mode(tlb)
    uc._probe_buf = buf                  # keep the buffer alive with the Uc
    return uc, buf


def asm(text):
    return bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(text, CODE)[0])


def shared_build(code, pages=1):
    uc, buf = shared_machine(code)
    t = Tables(uc)
    for va in range(0, 0x10000, 0x1000):
        t.map(va)
    for i in range(pages):
        t.map(DATA + i * 0x1000)
    paging_on(uc, t)
    return uc, buf, t


def set_leaf(uc, t, va, value):
    uc.mem_write(t.entry_addr(va), struct.pack("<Q", value))


def walk_entries(uc, t, va):
    """The four entries (PML4E .. PTE) that translate va."""
    out, tab = [], t.root
    for shift in (39, 30, 21, 12):
        e = struct.unpack("<Q", uc.mem_read(tab + ((va >> shift) & 511) * 8, 8))[0]
        out.append(e)
        tab = e & 0x000F_FFFF_FFFF_F000
    return out


def probe_a_alias(n):
    """a. a leaf with W=1 to the read-only alias: the store arrives in UC_HOOK_MEM_WRITE_PROT."""
    code = asm(f"mov rsi, {DATA}; mov rax, 0x1122334455667788; mov rcx, {n};"
               f"l: mov qword ptr [rsi + 8], rax; dec rcx; jnz l; hlt")
    uc, buf, t = shared_build(code)
    set_leaf(uc, t, DATA, (ALIAS + DATA) | P | W)
    seen = []

    def trap(uc, acc, addr, size, value, _ud):
        if len(seen) < 2:
            seen.append((addr, size, value, uc.reg_read(UC_X86_REG_RIP)))
        off = addr - ALIAS
        buf[off:off + size] = value.to_bytes(size, "little")
        return True
    uc.hook_add(UC_HOOK_MEM_WRITE_PROT, trap, None, ALIAS, ALIAS + RAM - 1)
    el = timed(uc)
    ok = bool(seen) and seen[0][:3] == (ALIAS + DATA + 8, 8, 0x1122334455667788) \
        and buf[DATA + 8:DATA + 16] == (0x1122334455667788).to_bytes(8, "little")
    addr, size, value, rip = seen[0] if seen else (0, 0, 0, 0)
    print(f"4a. W=1 leaf to the read-only alias (UC_TLB_CPU): store arrives in MEM_WRITE_PROT with "
          f"addr {addr:#x} (alias physical), size {size}, value {value:#x}, RIP {rip:#x}; completed by "
          f"the hook: {'OK' if ok else 'FAILED'}; {el / n * 1e6:.2f} us per trapped store, no exit")
    # refused: the store must not happen, registers untouched, RIP on the store
    code = asm(f"mov rsi, {DATA}; mov rax, 0x55; add rbx, 1; mov qword ptr [rsi], rax; add rbx, 1; hlt")
    uc, buf, t = shared_build(code)
    set_leaf(uc, t, DATA, (ALIAS + DATA) | P | W)
    uc.hook_add(UC_HOOK_MEM_WRITE_PROT, lambda *a: False, None, ALIAS, ALIAS + RAM - 1)
    err = None
    try:
        uc.emu_start(CODE, 0)
    except UcError as e:
        err = e
    rip, rbx = uc.reg_read(UC_X86_REG_RIP), uc.reg_read(UC_X86_REG_RBX)
    store_rip = CODE + len(asm(f"mov rsi, {DATA}; mov rax, 0x55; add rbx, 1"))
    ok = err is not None and rip == store_rip and rbx == 1 and buf[DATA] == 0
    print(f"4a. refused (hook returns False): emu_start error {err}, RIP on the store: "
          f"{rip == store_rip}, RBX {rbx}, memory unchanged: {buf[DATA] == 0}: {'OK' if ok else 'FAILED'}")
    # the other way: W=0 in the leaf, the store is a #PF in UC_HOOK_INTR
    code = asm(f"mov rsi, {DATA}; mov rax, 0x77; mov qword ptr [rsi + 0x10], rax; hlt")
    uc, buf, t = shared_build(code)
    set_leaf(uc, t, DATA, DATA | P)
    cs = CpuState(uc)
    got = {}

    def intr(uc, intno, _ud):
        got.update(intno=intno, cr2=uc.reg_read(UC_X86_REG_CR2), ec=cs.error_code(),
                   rip=uc.reg_read(UC_X86_REG_RIP))
        uc.emu_stop()
    uc.hook_add(UC_HOOK_INTR, intr)
    uc.emu_start(CODE, 0)
    print(f"4a. W=0 leaf: the store is vector {got.get('intno')} in UC_HOOK_INTR, CR2 {got.get('cr2', 0):#x}, "
          f"error code {got.get('ec', 0):#x} (P|W), RIP on the store: "
          f"{got.get('rip') == CODE + len(asm(f'mov rsi, {DATA}; mov rax, 0x77'))}")


def probe_b_ad():
    """b. the walker sets A (every level) and D (leaf, on the first write) in memory."""
    code = asm(f"mov rsi, {DATA}; mov rax, qword ptr [rsi]; mov qword ptr [rsi], rax; hlt")
    uc, _buf, t = shared_build(code)
    for lvl_va in (DATA,):
        set_leaf(uc, t, lvl_va, DATA | P | W)
    # clear A/D everywhere on DATA's path
    ent = walk_entries(uc, t, DATA)
    tab = t.root
    for shift, e in zip((39, 30, 21, 12), ent):
        uc.mem_write(tab + ((DATA >> shift) & 511) * 8, struct.pack("<Q", e & ~(A_BIT | D)))
        tab = e & 0x000F_FFFF_FFFF_F000
    first_store = CODE + len(asm(f"mov rsi, {DATA}; mov rax, qword ptr [rsi]"))
    after = {}

    def at(uc, address, size, _ud):
        after[address] = walk_entries(uc, t, DATA)
    uc.hook_add(UC_HOOK_CODE, at, None, first_store, first_store)
    hlt = first_store + 3
    uc.hook_add(UC_HOOK_CODE, at, None, hlt, hlt)
    uc.emu_start(CODE, 0)

    def bits(es):
        return " ".join(f"{n}:{'A' if e & A_BIT else '-'}{'D' if e & D else '-'}"
                        for n, e in zip(("pml4e", "pdpte", "pde", "pte"), es))
    r, w = after.get(first_store), after.get(hlt)
    ok = r and w and all(e & A_BIT for e in r) and not r[3] & D and w[3] & D \
        and not any(e & D for e in w[:3])
    print(f"4b. A/D set by the walker in memory: after the read {bits(r)}; after the write {bits(w)}: "
          f"{'as hardware (A at every level on the first access, D on the leaf at the first write)' if ok else 'NOT as hardware'}")


def probe_c_pae():
    """c. PAE hardware paging (CR4.PAE=1, 32-bit code, long mode off) under a guest that believes
    it runs 2-level paging: the PDPT must be below 4 GiB; what else sees CR4.PAE."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, RAM, UC_PROT_ALL)
    uc.ctl_set_tlb_mode(UC_TLB_CPU)
    pdpt, pd, pt = 0x300000, 0x301000, 0x302000
    # one PDPTE, one PD, one PT over 0..2 MiB identity + DATA
    uc.mem_write(pdpt, struct.pack("<Q", pd | P))
    uc.mem_write(pd, struct.pack("<Q", pt | P | W))
    for i in range(512):
        uc.mem_write(pt + i * 8, struct.pack("<Q", (i << 12) | P | W))
    code = bytes(Ks(KS_ARCH_X86, 4).asm("mov eax, dword ptr [0x5000]; mov dword ptr [0x5004], eax;"
                                        "mov ebx, cr4; hlt", CODE)[0])
    uc.mem_write(CODE, code)
    uc.mem_write(0x5000, struct.pack("<I", 0xCAFE))
    uc.reg_write(UC_X86_REG_CR3, pdpt)
    uc.reg_write(UC_X86_REG_CR4, 0x20)
    uc.reg_write(UC_X86_REG_CR0, 0x80010011)
    uc.emu_start(CODE, 0)
    ok = struct.unpack("<I", uc.mem_read(0x5004, 4))[0] == 0xCAFE
    # a 32-bit CR3 cannot hold a root above 4 GiB
    uc.reg_write(UC_X86_REG_CR3, (1 << 32) | pdpt)
    cr3 = uc.reg_read(UC_X86_REG_CR3)
    print(f"4c. PAE tables under 32-bit code (long mode off): {'runs' if ok else 'FAILED'}; the guest's "
          f"'mov ebx, cr4' reads {uc.reg_read(UC_X86_REG_EBX):#x} (the hardware value: must be intercepted); "
          f"CR3 written {(1 << 32) | pdpt:#x} reads back {cr3:#x}")


def probe_d_reads(n):
    """d. guest reads of CR0/CR4/EFER: a one-address code hook (rawhooks) writes the guest's value
    and skips the instruction; cost per read vs running it."""
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    from x86shadow.cpu import rawhooks
    for what, text, ln in (("mov rax, cr0", "mov rax, cr0", 3), ("mov rax, cr4", "mov rax, cr4", 3),
                           ("rdmsr EFER", "mov ecx, 0xC0000080; rdmsr", 2)):
        pre = "mov ecx, 0xC0000080;" if what.startswith("rdmsr") else ""
        body = "rdmsr" if what.startswith("rdmsr") else text
        code = bytes(ks.asm(f"{pre} mov rdi, {n}; l: {body}; dec rdi; jnz l; hlt", CODE)[0])
        site = CODE + len(bytes(ks.asm(f"{pre} mov rdi, {n}", CODE)[0]))
        uc, _ = build(code, 0)
        plain = timed(uc)
        uc, _ = build(code, 0)
        hits = [0]
        rax = UC_X86_REG_RAX

        def hook(uc, address, size, _ud):
            hits[0] += 1
            uc.reg_write(rax, 0x11)
            uc.reg_write(UC_X86_REG_RIP, address + ln)
        cb = rawhooks.code_callback(uc, hook)
        rawhooks.add_code(uc, cb, site)
        el = timed(uc)
        print(f"4d. {what}: {hits[0]} of {n} intercepted, guest sees its value: "
              f"{uc.reg_read(rax) == 0x11}; {(el - plain) / n * 1e6:.2f} us more per read "
              f"(raw code hook, 2 register writes)")


def probe_e_stale_pc():
    """e. after a RIP write in a code hook (or a restart from UC_HOOK_INTR), which RIP do later
    memory hooks of the same block report?"""
    body = (f"mov rsi, {DATA}; mov rax, cr4; mov qword ptr [rsi], rax; mov qword ptr [rsi + 8], rax;"
            f"mov rax, qword ptr [rsi + 0x1000]; mov qword ptr [rsi + 16], rax; hlt")
    code = asm(body)
    uc, _buf, t = shared_build(code, 2)
    set_leaf(uc, t, DATA, (ALIAS + DATA) | P | W)
    set_leaf(uc, t, DATA + 0x1000, 0)                  # not present: a shadow fault
    pre = [CODE]
    parts = body.split(";")
    for k in range(1, len(parts)):
        pre.append(CODE + len(asm(";".join(parts[:k]))))
    cr4_site, st1, st2, st3 = pre[1], pre[2], pre[3], pre[5]
    got = []

    def cr4(uc, address, size, _ud):
        uc.reg_write(UC_X86_REG_RAX, 0x20)
        uc.reg_write(UC_X86_REG_RIP, address + 3)
    uc.hook_add(UC_HOOK_CODE, cr4, None, cr4_site, cr4_site)

    def trap(uc, acc, addr, size, value, _ud):
        got.append(uc.reg_read(UC_X86_REG_RIP))
        return True
    uc.hook_add(UC_HOOK_MEM_WRITE_PROT, trap, None, ALIAS, ALIAS + RAM - 1)
    ctx = uc.context_save()
    off = probe_offsets()
    addr = ctypes.cast(ctx.context, ctypes.c_void_p).value

    def intr(uc, intno, _ud):
        set_leaf(uc, t, DATA + 0x1000, (ALIAS + DATA + 0x1000) | P | W)
        uc.context_update(ctx)
        ctypes.c_int32.from_address(addr + off.old_exception).value = -1
        uc.context_restore(ctx)
    uc.hook_add(UC_HOOK_INTR, intr)
    uc.emu_start(CODE, 0)
    want = [st1, st2, st3]
    print(f"4e. RIP seen by MEM_WRITE_PROT after a RIP write in a code hook earlier in the block: "
          f"{', '.join(hex(g) for g in got[:2])} (true {st1:#x}, {st2:#x}); after a #PF restarted from "
          f"UC_HOOK_INTR: {got[2] if len(got) > 2 else 0:#x} (true {st3:#x}): "
          f"{'all exact' if got == want else 'STALE'}")
    # a guest #PF "delivered" from UC_HOOK_INTR: RIP written to a handler that makes two trapped
    # stores (as delivery in the hook, instead of the run loop, would do)
    handler = 0x3000
    hbody = f"mov rsi, {DATA}; mov qword ptr [rsi + 24], rax; mov qword ptr [rsi + 32], rax; hlt"
    hcode = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(hbody, handler)[0])
    hst1 = handler + len(bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(f"mov rsi, {DATA}", handler)[0]))
    hst2 = hst1 + 4
    code = asm(f"mov rsi, {DATA}; mov qword ptr [rsi + 8], rax; mov rax, qword ptr [rsi + 0x1000]; hlt")
    def setup():
        """the code, the handler, DATA behind the alias, the next page not present; the RIPs
        MEM_WRITE_PROT sees go into the returned list"""
        uc, _buf, t = shared_build(code, 2)
        uc.mem_write(handler, hcode)
        set_leaf(uc, t, DATA, (ALIAS + DATA) | P | W)
        set_leaf(uc, t, DATA + 0x1000, 0)
        got = []
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT,
                    lambda uc, *a: got.append(uc.reg_read(UC_X86_REG_RIP)) or True,
                    None, ALIAS, ALIAS + RAM - 1)
        ctx = uc.context_save()
        return uc, got, ctx, ctypes.cast(ctx.context, ctypes.c_void_p).value

    uc, got2, ctx, addr = setup()

    def deliver(uc, intno, _ud):
        uc.context_update(ctx)
        ctypes.c_int32.from_address(addr + off.old_exception).value = -1
        uc.context_restore(ctx)
        uc.reg_write(UC_X86_REG_RIP, handler)
    uc.hook_add(UC_HOOK_INTR, deliver)
    uc.emu_start(CODE, 0)
    first = CODE + len(asm(f"mov rsi, {DATA}"))
    print(f"4e. RIP seen by MEM_WRITE_PROT in a handler entered by a RIP write in UC_HOOK_INTR: "
          f"{', '.join(hex(g) for g in got2)} (true {first:#x}, {hst1:#x}, {hst2:#x}): "
          f"{'all exact' if got2 == [first, hst1, hst2] else 'STALE'}")
    # the same, delivered from the run loop: the hook stops, emu_start starts again at the handler
    uc, got3, ctx, addr = setup()
    faulted = []

    def stop(uc, intno, _ud):
        uc.context_update(ctx)
        ctypes.c_int32.from_address(addr + off.old_exception).value = -1
        uc.context_restore(ctx)
        faulted.append(intno)
        uc.emu_stop()
    uc.hook_add(UC_HOOK_INTR, stop)
    uc.emu_start(CODE, 0)
    if faulted:
        uc.emu_start(handler, 0)
    print(f"4e. the same delivered from the run loop (emu_stop, emu_start at the handler): "
          f"{', '.join(hex(g) for g in got3)}: {'all exact' if got3 == [first, hst1, hst2] else 'STALE'}")


def probe_f_flush(pages, rounds):
    """f. a TLB flush (CR3 write) + the refills after it: the walker vs a trivial Python fill hook."""
    code = asm(f"""
        mov rcx, {rounds}
    r:  mov rax, cr3
        mov cr3, rax
        mov rsi, {DATA}
        mov rdx, {pages}
    p:  mov rax, qword ptr [rsi]
        add rsi, 0x1000
        dec rdx
        jnz p
        dec rcx
        jnz r
        hlt""")
    uc, _buf, t = shared_build(code, pages)
    hw = timed(uc)
    ucv = machine(code, UC_TLB_VIRTUAL)
    fills = [0]

    def fill(_uc, va, _acc, entry, _ud):
        fills[0] += 1
        entry.paddr = va
        entry.perms = UC_PROT_ALL
        return True
    ucv.hook_add(UC_HOOK_TLB_FILL, fill)
    ucv.reg_write(UC_X86_REG_CR4, 0x20)
    ucv.reg_write(UC_X86_REG_CR3, 0x200000)
    ucv.reg_write(UC_X86_REG_CR0, 0x80010033)
    ucv.reg_write(UC_X86_REG_RSP, STACK)
    sw = timed(ucv)
    per = rounds * (pages + 1)
    print(f"4f. CR3 write (whole-TLB flush) + {pages} data pages and the code page refilled, {rounds} rounds: "
          f"walker {hw / rounds * 1e6:.1f} us per round ({hw / per * 1e6:.2f} us per refill); trivial "
          f"Python fill hook {sw / rounds * 1e6:.1f} us per round ({fills[0]} fills, "
          f"{sw / max(fills[0], 1) * 1e6:.2f} us per fill)")

def probe_g_store_path(n):
    """g. stores under UC_TLB_CPU: a loop of loads and stores over 4 data pages, with the data
    leaves executable (as a guest's own ptes usually are) or NX (EFER.NXE on), against the
    virtual TLB with data pages R|W and code R|X (what the fill hook gives today)."""
    code = asm(f"""
        mov rcx, {n}
        mov rsi, {DATA}
    r:  mov rax, qword ptr [rsi]
        add rax, rcx
        mov qword ptr [rsi + 0x1000], rax
        mov qword ptr [rsi + 0x2008], rcx
        xor rax, qword ptr [rsi + 0x3010]
        dec rcx
        jnz r
        hlt""")
    out = {}
    for nx in (False, True):
        uc = machine(code, UC_TLB_CPU)
        t = Tables(uc)
        for va in (CODE, STACK - 0x1000):
            t.map(va)
        for i in range(4):
            va = DATA + i * 0x1000
            uc.mem_write(t.entry_addr(va), struct.pack("<Q", frame(va) | P | W | (NX_BIT if nx else 0)))
        paging_on(uc, t)
        if nx:
            uc.reg_write(UC_X86_REG_MSR, (EFER, uc.reg_read(UC_X86_REG_MSR, EFER) | EFER_NXE))
        out[nx] = timed(uc)
    ucv = machine(code, UC_TLB_VIRTUAL)

    def fill(_uc, va, _acc, entry, _ud):
        entry.paddr = va & ~0xFFF
        entry.perms = (UC_PROT_READ | UC_PROT_EXEC) if va < DATA else (UC_PROT_READ | UC_PROT_WRITE)
        return True
    ucv.hook_add(UC_HOOK_TLB_FILL, fill)
    ucv.reg_write(UC_X86_REG_CR4, 0x20)
    ucv.reg_write(UC_X86_REG_CR0, 0x80010033)
    ucv.reg_write(UC_X86_REG_RSP, STACK)
    sw = timed(ucv)
    per = 1e9 / (7 * n)
    print(f"4g. {n} iterations of 2 loads + 2 stores over 4 data pages: walker, executable data "
          f"leaves {out[False]:.3f} s ({per * out[False]:.1f} ns per insn); walker, NX data leaves "
          f"{out[True]:.3f} s ({per * out[True]:.1f} ns); virtual TLB, data R|W / code R|X "
          f"{sw:.3f} s ({per * sw:.1f} ns)")


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

    probe_a_alias(20000)
    probe_b_ad()
    probe_c_pae()
    probe_d_reads(20000)
    probe_e_stale_pc()
    probe_f_flush(16, 5000)
    probe_g_store_path(2_000_000)


if __name__ == "__main__":
    main()
