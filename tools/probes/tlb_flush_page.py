#!/usr/bin/env python3
"""Probe and measurement: QEMU's per-page TLB flush reached from Python, and what scoped flushes
(docs/PERFORMANCE.md) save on bench workloads.

Part 1 (plain Unicorn 2.1.4, virtual-TLB mode, a fill hook that maps identity): after three
loads fill three pages, ``helper_invlpg_x86_64(env, va)`` -- the guest invlpg's QEMU helper,
with the CPU state found by x86shadow.cpu.cpustate.page_flusher -- makes the next run refill
only that page; its cost per call against the whole-TLB flush.

Part 2: each workload under the shadow MMU with scoped flushes on and off, alternating, in one
run (medians of --rounds), and Unicorn's own MMU beside them; TLB fills from an instrumented
run. Run:

    python tools/probes/tlb_flush_page.py [--rounds 3] [--mode 64] [WORKLOAD ...]
"""
import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from keystone import KS_ARCH_X86, KS_MODE_64, Ks  # noqa: E402
from unicorn import (UC_ARCH_X86, UC_HOOK_TLB_FILL, UC_MODE_64, UC_PROT_ALL,  # noqa: E402
                     UC_TLB_VIRTUAL, Uc, UcError)
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH  # noqa: E402

from x86shadow import bench as B  # noqa: E402
from x86shadow import machine as M  # noqa: E402
from x86shadow.cpu.cpustate import page_flusher  # noqa: E402

DEFAULT = ["pte-write", "pt-writes-fork", "fork", "demand-paging", "tlb-miss-heavy", "fault-in"]


def part1():
    size = 0x100000
    buf = mmap.mmap(-1, size)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, size, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    t = time.perf_counter()
    flush = page_flusher(uc, 64)
    found = time.perf_counter() - t
    fills = []

    def fill(_uc, va, _acc, entry, _ud):
        fills.append(va & ~0xFFF)
        entry.paddr, entry.perms = va & ~0xFFF, UC_PROT_ALL
        return True

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(
        "mov rax, [0x10000]; mov rax, [0x11000]; mov rax, [0x12000]; hlt", 0x1000)[0])
    buf[0x1000:0x1000 + len(code)] = code

    def run():
        fills.clear()
        try:
            uc.emu_start(0x1000, 0x1000 + len(code) - 1)
        except UcError:
            pass
        return [hex(x) for x in sorted(set(fills))]

    print(f"1. CPU state found in {found * 1e3:.2f} ms: {flush is not None}")
    print(f"   first run fills {run()}; again {run()}")
    flush(0x11000)
    print(f"   after the per-page flush of 0x11000: {run()}")
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        flush(0x11000)
    per_page = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    whole = (time.perf_counter() - t) / n * 1e6
    print(f"   per-page flush {per_page:.2f} us, whole-TLB flush {whole:.2f} us (no refills)")


def part2(workloads, modes, rounds):
    real = M.Machine.__init__

    def with_scoped(on):
        def init(self, *a, **k):
            k.setdefault("scoped_flushes", on)
            real(self, *a, **k)
        return init

    print("2. shadow with scoped flushes (on) / without (off) / Unicorn's MMU (native), "
          f"medians of {rounds}")
    print(f"   {'workload':16} {'mode':4} {'on s':>7} {'off s':>7} {'native':>7} "
          f"{'on/nat':>7} {'off/nat':>7} {'fills on':>9} {'fills off':>9}")
    try:
        for name in workloads:
            w = B.BY_NAME[name]
            for mode in modes:
                pf = B.assemble(w, mode, w.n_full, 128)
                times = {"on": [], "off": [], "native": []}
                for _ in range(rounds):
                    for key in ("on", "off", "native"):
                        M.Machine.__init__ = with_scoped(key == "on")
                        mmu = "native" if key == "native" else "shadow"
                        times[key].append(B.run_once(w, mode, mmu, pf).seconds)
                fills = {}
                for key in ("on", "off"):
                    M.Machine.__init__ = with_scoped(key == "on")
                    fills[key] = B.run_once(w, mode, "shadow", pf, instrument=True).fills
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"   {name:16} {mode:4} {med['on']:7.3f} {med['off']:7.3f} "
                      f"{med['native']:7.3f} {med['on'] / med['native']:7.2f} "
                      f"{med['off'] / med['native']:7.2f} {fills['on']:9} {fills['off']:9}")
    finally:
        M.Machine.__init__ = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", action="append", choices=["32", "pae", "64"])
    ap.add_argument("workload", nargs="*", default=DEFAULT)
    a = ap.parse_args()
    part1()
    part2(a.workload, a.mode or ["pae", "64"], a.rounds)


if __name__ == "__main__":
    main()
