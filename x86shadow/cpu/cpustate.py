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

    def clear_old_exception(self) -> None:
        """Forget the exception in flight so the next native fault is not turned into a #DF."""
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
