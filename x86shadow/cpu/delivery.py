"""Exception and interrupt delivery through the guest IDT (Unicorn never does it itself).

Protected mode (32-bit gates) and long mode (64-bit gates), from CPL0 or CPL3 with the TSS stack
switch, double-fault escalation and triple fault, all as the SDM (vol. 3, 6.12-6.15) describes.
The CPU-specific work (registers, segment caches, guest virtual memory) goes through the vCPU.
"""
from __future__ import annotations

import struct

from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR2, UC_X86_REG_CS, UC_X86_REG_EFLAGS,
                               UC_X86_REG_GDTR, UC_X86_REG_IDTR,
                               UC_X86_REG_SS, UC_X86_REG_TR)

from ..events import INJ_EXCEPTION
from ..faults import (CONTRIBUTORY, VEC_DF, VEC_GP, VEC_NP, VEC_PF, VEC_SS, VEC_TS, Fault,
                      GuestCrash, vector_name)

# a 64-bit exception frame, lowest address first: RIP, CS, RFLAGS, RSP, SS (error code below)
_FRAME64 = struct.Struct("<5Q")
_FRAME64_EC = struct.Struct("<6Q")
EFLAGS_TF, EFLAGS_IF, EFLAGS_NT, EFLAGS_RF, EFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17


class Delivery:
    """``crash_gates``: gate targets that mean "unhandled exception" (the firmware's IDT points
    every gate there); delivering through one ends the run with the crash report."""

    def __init__(self, vcpu, crash_gates=frozenset()):
        self.vcpu = vcpu
        self.uc = vcpu.uc
        self.crash_gates = frozenset(crash_gates)
        # what a delivery reads, in one batch, and writes, in another (docs/PERFORMANCE.md)
        self._reads = (UC_X86_REG_CS, UC_X86_REG_SS, UC_X86_REG_EFLAGS, vcpu.R_IP, vcpu.R_SP,
                       UC_X86_REG_CR0)
        self._writes = (UC_X86_REG_EFLAGS, vcpu.R_SP, vcpu.R_IP)

    # --------------------------------------------------------------- descriptors
    def _descriptor(self, sel, vector_ec):
        """Read a GDT descriptor (LDT not supported: reported as a crash)."""
        if sel & 4:
            raise GuestCrash(f"selector {sel:#x} refers to the LDT, which x86shadow does not model")
        _, base, limit, _ = self.vcpu.mmr(UC_X86_REG_GDTR)
        idx = sel & ~7
        if idx == 0 or idx + 7 > limit:
            raise Fault(VEC_GP, vector_ec)
        lo, hi = struct.unpack("<II", self.vcpu.read_virt(base + idx, 8))
        return lo, hi

    @staticmethod
    def _cache(sel, lo, hi):
        base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
        limit = (lo & 0xFFFF) | (hi & 0x000F0000)
        if hi & (1 << 23):
            limit = (limit << 12) | 0xFFF
        return (sel, base, limit, hi)

    # --------------------------------------------------------------- one delivery
    def deliver(self, vector, error_code=None, *, soft=False, ext=True, return_rip=None):
        """Deliver one event; raises Fault if delivery itself faults. Returns the handler's
        address (the new RIP).

        The registers are read in one batch and written in one; every guest-virtual access of
        one delivery (gate, descriptors, TSS, frame) goes through one paging context, as the
        CPU's does."""
        v = self.vcpu
        if v.shadow:
            return self._deliver(vector, error_code, soft, ext, return_rip)
        v.pinned_ctx = v.paging_context()
        try:
            return self._deliver(vector, error_code, soft, ext, return_rip)
        finally:
            v.pinned_ctx = None

    def _deliver(self, vector, error_code, soft, ext, return_rip):
        v = self.vcpu
        old_cs, old_ss, rflags, rip, old_rsp, cr0 = v.read_regs(self._reads)
        if return_rip is not None:
            rip = return_rip
        long_mode = v.long_mode()
        _, idt_base, idt_limit, _ = v.mmr(UC_X86_REG_IDTR)
        gsize = 16 if long_mode else 8
        idt_ec = (vector << 3) | 2 | (1 if ext else 0)
        if vector * gsize + gsize - 1 > idt_limit:
            raise Fault(VEC_GP, idt_ec)
        raw = v.read_virt(idt_base + vector * gsize, gsize)
        lo, hi = struct.unpack_from("<II", raw)
        gtype, gdpl, present = (hi >> 8) & 0xF, (hi >> 13) & 3, (hi >> 15) & 1
        valid = (0xE, 0xF) if long_mode else (0xE, 0xF, 0x6, 0x7)
        if gtype not in valid:
            if gtype == 0x5 and not long_mode:
                raise GuestCrash(f"task gate for {vector_name(vector)}: task switches are not modelled")
            raise Fault(VEC_GP, idt_ec)
        cpl = old_cs & 3
        if soft and gdpl < cpl:
            raise Fault(VEC_GP, idt_ec)
        if not present:
            raise Fault(VEC_NP, idt_ec)
        sel = lo >> 16
        offset = (lo & 0xFFFF) | (hi & 0xFFFF0000)
        ist = 0
        if long_mode:
            offset |= struct.unpack_from("<I", raw, 8)[0] << 32
            ist = hi & 7
        if offset in self.crash_gates:
            raise GuestCrash(f"unhandled {vector_name(vector)}", vector, error_code)
        csl, csh = self._descriptor(sel, sel & ~3)
        if not (csh >> 15) & 1:
            raise Fault(VEC_NP, sel & ~3)
        if not (csh >> 11) & 1 or not (csh >> 12) & 1:     # must be a code segment
            raise Fault(VEC_GP, sel & ~3)
        new_cpl = (csh >> 13) & 3
        if csh & (1 << 10):            # conforming: stays at the current CPL
            new_cpl = cpl
        if new_cpl > cpl:
            raise Fault(VEC_GP, sel & ~3)
        if long_mode and not csh & (1 << 21):
            raise Fault(VEC_GP, sel & ~3)
        gate32 = gtype in (0xE, 0xF)
        _, tss_base, tss_limit, _ = v.mmr(UC_X86_REG_TR)
        if long_mode:
            if ist:
                rsp = struct.unpack("<Q", v.read_virt(tss_base + 0x24 + 8 * (ist - 1), 8))[0]
            elif new_cpl < cpl:
                rsp = struct.unpack("<Q", v.read_virt(tss_base + 4 + 8 * new_cpl, 8))[0]
            else:
                rsp = old_rsp
            rsp &= ~0xF
            if error_code is None:
                data = _FRAME64.pack(rip, old_cs, rflags, old_rsp, old_ss)
            else:
                data = _FRAME64_EC.pack(error_code & 0xFFFFFFFFFFFFFFFF, rip, old_cs, rflags,
                                        old_rsp, old_ss)
            rsp -= len(data)
            v.write_virt(rsp, data)
            # a privilege change loads a null SS with RPL = new CPL (do_interrupt64)
            ss_cache = (new_cpl, 0, 0, new_cpl << 13) if new_cpl < cpl else None
        else:
            if new_cpl < cpl:
                if tss_limit < 8 + 8 * new_cpl - 1:
                    raise Fault(VEC_TS, 0)
                esp0, ss0 = struct.unpack("<IH", v.read_virt(tss_base + 4 + 8 * new_cpl, 6))
                ssl, ssh = self._descriptor(ss0, ss0 & ~3)
                if (ss0 & 3) != new_cpl or ((ssh >> 13) & 3) != new_cpl or not (ssh >> 9) & 1:
                    raise Fault(VEC_TS, ss0 & ~3)
                if not (ssh >> 15) & 1:
                    raise Fault(VEC_SS, ss0 & ~3)
                frame = [old_ss, old_rsp, rflags, old_cs, rip]
                rsp = esp0
                ss_cache = self._cache(ss0, ssl, ssh)
            else:
                frame = [rflags, old_cs, rip]
                rsp = old_rsp
                ss_cache = None
            if error_code is not None:
                frame.append(error_code)
            fmt = "<I" if gate32 else "<H"
            data = b"".join(struct.pack(fmt, x & (0xFFFFFFFF if gate32 else 0xFFFF)) for x in reversed(frame))
            rsp = (rsp - len(data)) & 0xFFFFFFFF
            v.write_virt(rsp, data)
        new_cs = (sel & ~3) | new_cpl
        cs_cache = self._cache(new_cs, csl, csh)
        if new_cpl != cpl or new_cs != old_cs:
            if ss_cache is None:
                ss_cache = v.segment_cache("ss")
            v.cpustate.load_segments(cs_cache, ss_cache, new_cpl, long_mode, pe=bool(cr0 & 1))
        rflags &= ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
        if gtype in (0xE, 0x6):
            rflags &= ~EFLAGS_IF
        v.write_regs(self._writes, (rflags, rsp, offset))
        return offset

    # --------------------------------------------------------------- with escalation
    def raise_exception(self, vector, error_code=None, *, cr2=None, soft=False, return_rip=None,
                        native=True):
        """Deliver an exception or software interrupt, escalating to #DF and triple fault;
        returns the address of the handler that got it (the new RIP).

        ``native``: Unicorn raised it (QEMU then remembers it as the exception in flight, which
        must be forgotten or the next native fault turns into a false #DF); False for the faults
        the shadow MMU injects itself, which never went through QEMU."""
        v = self.vcpu
        first = vector
        first_ec = error_code
        ext = not soft
        rip0 = return_rip if return_rip is not None else v.reg(v.R_IP)
        while True:
            if vector == VEC_PF and cr2 is not None:
                v.set_reg(UC_X86_REG_CR2, cr2)
            v.counters["exception_injections"] += 1
            if v.events.tracing:
                v.events.emit(INJ_EXCEPTION, vector=vector, error_code=error_code, rip=rip0,
                              cr2=cr2 if vector == VEC_PF else None)
            try:
                target = self.deliver(vector, error_code, soft=soft, ext=ext,
                                      return_rip=return_rip)
                if native:
                    v.cpustate.clear_old_exception()
                return target
            except GuestCrash as crash:
                crash.rip = rip0 if crash.rip is None else crash.rip
                if crash.vector is not None and crash.error_code is None:
                    crash.error_code = error_code
                if crash.vector == VEC_PF and crash.cr2 is None:
                    crash.cr2 = cr2
                raise
            except Fault as f:
                second = f.vector
                if vector == VEC_DF:
                    raise GuestCrash(f"triple fault ({vector_name(second)} while delivering #DF; "
                                     f"first exception {vector_name(first)})",
                                     first, first_ec, rip0, cr2, shutdown=True)
                df = ((vector in CONTRIBUTORY and second in CONTRIBUTORY) or
                      (vector == VEC_PF and (second in CONTRIBUTORY or second == VEC_PF)))
                soft = False
                ext = True
                if df:
                    vector, error_code, cr2 = VEC_DF, 0, None
                else:
                    vector, error_code = second, f.error_code
                    cr2 = f.cr2 if second == VEC_PF else None
                return_rip = rip0
