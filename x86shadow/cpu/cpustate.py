"""Direct access to QEMU's CPUX86State inside a Unicorn context, for what the API cannot do.

Unicorn 2.1.4 cannot raise privilege with ``reg_write`` (32-bit: the CS/SS write fails the privilege
check; 64-bit: only the selector changes) and never resets QEMU's ``old_exception`` (so a second
natively raised contributory exception or #PF turns into a false #DF). Both are fixed by patching a
saved context: segment caches + hflags for a CPL change, ``old_exception = -1`` after each delivered
exception, and reading ``error_code`` of a natively raised exception.

The offsets are internal to this Unicorn build. They are found and verified at start-up with a
throw-away CPU (``probe_offsets``); a mismatch is reported as an error, never ignored.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import lru_cache

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc, UcError
from unicorn.x86_const import UC_X86_REG_CR0, UC_X86_REG_EAX, UC_X86_REG_GDTR

# QEMU target/i386/cpu.h
HF_CPL_MASK = 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
DESC_B = 1 << 22
DESC_L = 1 << 21
DESC_DPL_SHIFT = 13
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
_SEG = struct.Struct("<I4xQII")     # SegmentCache {u32 selector; u64 base; u32 limit; u32 flags}


class CpuStateError(Exception):
    pass


@dataclass(frozen=True)
class Offsets:
    env: int          # CPUX86State within the context blob
    hflags: int
    segs: int
    error_code: int
    old_exception: int


@lru_cache(maxsize=1)
def probe_offsets() -> Offsets:
    """Find (and verify) the offsets with a throw-away 32-bit CPU raising two #GPs."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x10000)
    ctx = uc.context_save()
    uc.reg_write(UC_X86_REG_EAX, 0x5A5A1234)
    uc.context_update(ctx)
    addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
    raw = ctypes.string_at(addr, ctx.size)
    env = raw.find(struct.pack("<Q", 0x5A5A1234))
    if env < 0:
        raise CpuStateError("cannot locate CPUX86State in the Unicorn context")
    # regs[16], eip, eflags, cc_dst/src/src2, cc_op, df -> hflags at +176, segs at +184 (QEMU 5.0)
    hflags, segs = env + 176, env + 184
    # error_code: the only int that equals the selector of a faulting segment load, for 3 selectors
    cands = None
    gdt = bytes(8) * 4
    for sel in (0x48, 0x50, 0x58):
        u = Uc(UC_ARCH_X86, UC_MODE_32)
        u.mem_map(0, 0x10000)
        u.mem_write(0x1000, gdt)
        u.reg_write(UC_X86_REG_CR0, 0x11)
        u.reg_write(UC_X86_REG_GDTR, (0, 0x1000, 0x1F, 0))
        # mov ax, sel ; mov ds, ax
        u.mem_write(0x2000, bytes([0x66, 0xB8, sel, 0x00, 0x8E, 0xD8, 0x90]))
        got = {}

        def intr(uc, intno, _ud, got=got):
            got["ctx"] = uc.context_save()
            got["intno"] = intno
            uc.emu_stop()
        u.hook_add(UC_HOOK_INTR, intr)
        try:
            u.emu_start(0x2000, 0x2007)
        except UcError:
            pass
        if got.get("intno") != 13:
            raise CpuStateError("probe: expected #GP from a bad segment load")
        c = got["ctx"]
        blob = ctypes.string_at(ctypes.cast(c.context, ctypes.c_void_p).value, c.size)
        offs = {o for o in range(env + 256, len(blob) - 4, 4) if struct.unpack_from("<I", blob, o)[0] == sel}
        cands = offs if cands is None else cands & offs
        last = blob
    if not cands or len(cands) != 1:
        raise CpuStateError(f"probe: error_code offset ambiguous: {sorted(cands or ())}")
    err = cands.pop()
    # old_exception follows error_code, exception_is_int, exception_next_eip, dr[8], 4 pointers
    old = err + 4 + 4 + 8 + 64 + 32
    if struct.unpack_from("<i", last, old)[0] != 13:
        raise CpuStateError("probe: old_exception is not where QEMU 5.0's layout puts it")
    return Offsets(env, hflags, segs, err, old)


class CpuState:
    """Reads and patches one Uc's CPUX86State through a reusable context."""

    def __init__(self, uc):
        self.uc = uc
        self.off = probe_offsets()
        self.ctx = uc.context_save()
        self.addr = ctypes.cast(self.ctx.context, ctypes.c_void_p).value

    def _u32(self, off):
        return ctypes.c_uint32.from_address(self.addr + off)

    def snapshot(self):
        self.uc.context_update(self.ctx)

    def error_code(self) -> int:
        self.snapshot()
        return self._u32(self.off.error_code).value

    def code_bits(self) -> int:
        """64, 32 or 16: the code width QEMU decodes with now (hflags HF_CS64 / HF_CS32)."""
        self.snapshot()
        hf = self._u32(self.off.hflags).value
        return 64 if hf & HF_CS64 else 32 if hf & HF_CS32 else 16

    # the field in the live CPU state, when a caller found it (cpu/walker.py find_live_state)
    live_old_exception = None

    def clear_old_exception(self) -> None:
        """Forget the exception in flight so the next native fault is not turned into a #DF."""
        live = self.live_old_exception
        if live is not None:
            live.value = -1
            return
        self.snapshot()
        ctypes.c_int32.from_address(self.addr + self.off.old_exception).value = -1
        self.uc.context_restore(self.ctx)

    def load_segments(self, cs, ss, cpl: int, lma: bool, pe: bool = True) -> None:
        """Load CS and SS caches (each (selector, base, limit, flags=descriptor high dword)) and set
        CPL, recomputing the hflags QEMU derives from them (cpu_x86_load_seg_cache)."""
        self.snapshot()
        a, o = self.addr, self.off
        for reg, seg in ((R_CS, cs), (R_SS, ss)):
            ctypes.memmove(a + o.segs + 24 * reg, _SEG.pack(*seg), 24)
        hf = self._u32(o.hflags)
        v = hf.value & ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG)
        v |= cpl & 3
        cs_flags, ss_flags = cs[3], ss[3]
        if lma and cs_flags & DESC_L:
            v |= HF_CS32 | HF_CS64                 # long mode
        elif cs_flags & DESC_B:
            v |= HF_CS32
        if ss_flags & DESC_B:
            v |= HF_SS32
        if v & HF_CS64:
            pass                                   # DS/ES/SS bases are ignored in 64-bit mode
        elif not pe or not v & HF_CS32:
            v |= HF_ADDSEG
        else:
            bases = 0
            for reg in (R_DS, R_ES, R_SS):
                bases |= struct.unpack_from("<Q", ctypes.string_at(a + o.segs + 24 * reg + 8, 8))[0]
            if bases:
                v |= HF_ADDSEG
        hf.value = v
        self.uc.context_restore(self.ctx)


@lru_cache(maxsize=1)
def probe_insn_counter_offset() -> int:
    """Offset of ``uc_struct.emu_counter`` (instructions executed by the last ``emu_start`` with a
    ``count``): Unicorn counts but does not expose it. Found by running two counted loops."""
    from keystone import KS_ARCH_X86, KS_MODE_32, Ks
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_32).asm("l: inc eax; jmp l", 0x1000)[0])
    found = None
    for n in (12345, 54321):
        u = Uc(UC_ARCH_X86, UC_MODE_32)
        u.mem_map(0, 0x10000)
        u.mem_write(0x1000, code)
        u.emu_start(0x1000, 0, count=n)
        h = u._uch.value if hasattr(u._uch, "value") else u._uch
        raw = ctypes.string_at(h, 0x4000)
        offs = {o for o in range(0, len(raw) - 8, 8) if struct.unpack_from("<Q", raw, o)[0] in (n, n + 1)}
        found = offs if found is None else found & offs
    # emu_counter and emu_count (the limit) sit side by side: a run that stops by itself (hlt)
    # before the limit tells them apart
    short = bytes(Ks(KS_ARCH_X86, KS_MODE_32).asm("mov ecx, 5; l: dec ecx; jnz l; hlt", 0x1000)[0])
    for off in sorted(found or ()):
        u = Uc(UC_ARCH_X86, UC_MODE_32)
        u.mem_map(0, 0x10000)
        u.mem_write(0x1000, short)
        u.emu_start(0x1000, 0, count=1000)
        h = u._uch.value if hasattr(u._uch, "value") else u._uch
        if struct.unpack_from("<Q", ctypes.string_at(h + off, 8))[0] in (11, 12, 13):
            return off
    raise CpuStateError("cannot locate Unicorn's instruction counter (needed for --max-insns)")


def read_insn_counter(uc, off: int) -> int:
    h = uc._uch.value if hasattr(uc._uch, "value") else uc._uch
    return ctypes.c_uint64.from_address(h + off).value


# ---------------------------------------------------------------------- per-page TLB flush
# Unicorn 2.1.4 flushes only its whole TLB (UC_CTL_TLB_FLUSH). QEMU's per-page flush is the
# guest's invlpg, target/i386/helper.c helper_invlpg(env, addr) -> tlb_flush_page (every MMU
# index, the victim TLB, the page's jump-cache entries, a large page's whole range), exported
# by libunicorn as helper_invlpg_x86_64 (one x86 build serves UC_MODE_32 and UC_MODE_64). It
# needs the live CPUX86State, which the API never hands out: it is found from the uc handle.
# Some pointer in the first words of struct uc_struct leads to the CPU object (uc->cpu), whose
# env holds the general registers (regs[R_EAX], [R_ECX], [R_EDX], [R_EBX] consecutive):
# written with a sentinel through the API, found in memory, then confirmed by writing a
# second value and seeing it there (a copy, such as a saved context, would not change).
# Measured (tools/probes/tlb_flush_page.py): a refill of only the flushed page afterwards,
# 0.3-0.4 us per flush; the search ~4 ms the first time, ~0.05 ms once the (slot, offset)
# pair is known. Not found (another Unicorn build) -> None, and callers flush the whole TLB.
_SENTINELS = (0x5A17_0001, 0x5A17_0002, 0x5A17_0003, 0x5A17_0004)
_CONFIRM = 0x5A17_0FF5
_UC_SLOTS = 0x1000            # bytes of uc_struct searched for the CPU pointer
_CPU_SPAN = 0x20000           # bytes searched from it for env.regs
_found_at = None              # (uc_struct offset of the pointer, env - pointer) once found


def _rw_regions():
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1].startswith("rw"):
                a, b = (int(x, 16) for x in fields[0].split("-"))
                out.append((a, b))
    return out


def _find_env(uc, gprs) -> int | None:
    """The address of the live CPUX86State of ``uc`` (``gprs``: its EAX, ECX, EDX, EBX ids)."""
    global _found_at
    saved = [uc.reg_read(r) for r in gprs]
    try:
        for rid, value in zip(gprs, _SENTINELS):
            uc.reg_write(rid, value)
        pattern = struct.pack("<4Q", *_SENTINELS)
        handle = ctypes.cast(uc._uch, ctypes.c_void_p).value

        def confirmed(env):
            uc.reg_write(gprs[0], _CONFIRM)
            ok = ctypes.c_uint64.from_address(env).value == _CONFIRM
            uc.reg_write(gprs[0], _SENTINELS[0])
            return ok

        regions = _rw_regions()

        def region_of(p):
            for a, b in regions:
                if a <= p < b:
                    return a, b
            return None

        if _found_at is not None:
            slot, delta = _found_at
            r = region_of(handle + slot)
            if r is not None:
                env = ctypes.c_uint64.from_address(handle + slot).value + delta
                r = region_of(env)
                if r is not None and env + 32 <= r[1] and ctypes.string_at(env, 32) == pattern \
                        and confirmed(env):
                    return env
        home = region_of(handle)
        if home is None:
            return None
        for slot in range(0, _UC_SLOTS, 8):
            if handle + slot + 8 > home[1]:
                break
            p = ctypes.c_uint64.from_address(handle + slot).value
            r = region_of(p)
            if r is None:
                continue
            blob = ctypes.string_at(p, min(p + _CPU_SPAN, r[1]) - p)
            k = blob.find(pattern)
            if k >= 0 and k % 8 == 0 and confirmed(p + k):
                _found_at = (slot, k)
                return p + k
        return None
    finally:
        for rid, value in zip(gprs, saved):
            uc.reg_write(rid, value)


def page_flusher(uc, bits: int):
    """``flush(va)``: drop the TLB entries of the page at va on this CPU, as the guest's invlpg
    does; None when this Unicorn build's CPU state cannot be found."""
    from unicorn.unicorn_py3.unicorn import uclib
    from unicorn.x86_const import (UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX,
                                   UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX,
                                   UC_X86_REG_RDX)
    gprs = ((UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX) if bits == 64 else
            (UC_X86_REG_EAX, UC_X86_REG_ECX, UC_X86_REG_EDX, UC_X86_REG_EBX))
    try:
        invlpg = ctypes.CDLL(uclib._name).helper_invlpg_x86_64
    except AttributeError:
        return None
    env = _find_env(uc, gprs)
    if env is None:
        return None
    env_arg = ctypes.c_void_p(env)
    mask = (1 << 64) - 1
    # no argtypes: both arguments are passed as ctypes objects / a Python int fits target_ulong
    invlpg.restype = None

    def flush(va, _f=invlpg, _env=env_arg, _m=mask, _u64=ctypes.c_uint64):
        _f(_env, _u64(va & _m))
    return flush
