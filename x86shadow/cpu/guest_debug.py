"""Guest debugging on the Unicorn vCPU: what KVM_SET_GUEST_DEBUG gives QEMU's gdbstub
(breakpoints, single-step; ``run_once`` returns ``ExitKind.DEBUG`` as KVM_RUN returns
KVM_EXIT_DEBUG), plus the stub's register and memory access. docs/GDB.md.

Breakpoints are one-address ``UC_HOOK_CODE`` hooks (no int3 is written into guest memory, so
the guest, the shadow MMU's write tracking and the code-page bookkeeping never see them); a
single step is an all-address code hook present only while stepping. A hook added after a block
was translated is invisible to it, so every change flushes Unicorn's translation cache. An
``emu_stop()`` inside a code hook stops *before* that instruction (Unicorn checks the stop
request right after the hook call), which is where a breakpoint or a finished step stops.

At the addresses the privileged-instruction interceptor hooks (cpu/privileged.py), its hook
asks :meth:`GuestDebug.check` first and the debug hooks stay out, so that a stop there never
follows the MMU's side of an instruction that has not executed.

Memory is read and written by guest-virtual address through the guest's page tables, as
QEMU's stub does (cpu_memory_rw_debug: a walk that sets no A/D bits and checks no rights);
writes go through ``VCPU.write_guest_phys``, the path KVM's emulated writes take, so a write
into a write-tracked page table updates or zaps its shadow pages.
"""
from __future__ import annotations

from unicorn import UC_HOOK_CODE
import unicorn.x86_const as _xc

from .. import paging as pg
from ..exits import ExitKind
from ..faults import GuestCrash
from ..gdbstub import SIGINT, SIGSEGV, SIGTRAP, Stop, Target, TargetError, x86_registers

_K_GS_BASE = 0xC0000102
_WRITABLE_SUFFIXES = ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")
_CRASH_KINDS = (ExitKind.GUEST_CRASH, ExitKind.SHUTDOWN, ExitKind.MMIO, ExitKind.INTERNAL_ERROR,
                ExitKind.RUNAWAY)


class GuestDebug:
    """Breakpoints and single-step on one vCPU (``vcpu.debug``)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.breakpoints = {}        # address -> [kind, hook handle]
        self.stepping = False
        self._step_hook = None
        self._executed = None        # stepping: the address of the instruction the step runs
        self.why = ""                # the last stop: "swbreak" / "hwbreak" (Z0 / Z1), "" a step
        vcpu.debug = self

    # -- set-up (between runs)
    def _flush_translations(self):
        self.vcpu.uc.ctl_flush_tb()

    def _addr(self, addr):
        return addr & 0xFFFFFFFF if self.vcpu.bits == 32 else addr

    def insert(self, kind: int, addr: int) -> None:
        addr = self._addr(addr)
        if addr in self.breakpoints:
            return
        h = self.vcpu.uc.hook_add(UC_HOOK_CODE, self._hook, None, addr, addr)
        self.breakpoints[addr] = [kind, h]
        self._flush_translations()

    def remove(self, kind: int, addr: int) -> None:
        bp = self.breakpoints.pop(self._addr(addr), None)
        if bp is not None:
            self.vcpu.uc.hook_del(bp[1])
            self._flush_translations()

    def set_step(self, on: bool) -> None:
        self._executed = None
        if on == self.stepping:
            return
        self.stepping = on
        if on:
            self._step_hook = self.vcpu.uc.hook_add(UC_HOOK_CODE, self._hook, None, 1, 0)
        else:
            self.vcpu.uc.hook_del(self._step_hook)
            self._step_hook = None
        self._flush_translations()

    # -- from the run loop and the hooks
    def resuming(self, pc: int) -> None:
        """The run loop restarts Unicorn at ``pc``: if that is the instruction the step already
        started (a refused store, a code page dropped and retranslated), it has not executed."""
        if self._executed == pc:
            self._executed = None

    def _hook(self, uc, address, _size, _ud):
        if address in self.vcpu.interceptor.hooked:
            return                   # VCPU._privileged asks check() itself
        self.check(address)

    def check(self, address) -> bool:
        """Before the instruction at ``address``: stop here (True) when it ends a step or has a
        breakpoint."""
        v = self.vcpu
        if v.stop is not None:
            return True
        if self.stepping:
            if self._executed is None:
                self._executed = address      # the step's instruction: let it run
                return False
            why = ""
        elif address in self.breakpoints:
            why = "swbreak" if self.breakpoints[address][0] == 0 else "hwbreak"
        else:
            return False
        self.why = why
        v.stop = ("debug", address)
        v.uc.emu_stop()
        return True


class VcpuTarget(Target):
    """The gdb stub's target (gdbstub.Target) over one vCPU of a machine."""

    def __init__(self, vcpu, max_insns: int = 0):
        self.vcpu = vcpu
        self.bits = vcpu.bits
        self.registers = x86_registers(vcpu.bits)
        self._width = {r.name: r.bits for r in self.registers}
        self.debug = GuestDebug(vcpu)
        self.max_insns = max_insns
        self.final = None            # the Exit that ended the guest (set by resume)
        self._interrupted = False
        self.sync_ip()

    def sync_ip(self):
        """Unicorn's RIP := where the vCPU resumes (run_once starts at vcpu.pc)."""
        self.vcpu.set_reg(self.vcpu.R_IP, self.vcpu.pc)

    # -- registers
    def read_register(self, name):
        v = self.vcpu
        if name in ("rip", "eip"):
            return v.pc
        if name == "efer":
            return v.efer()
        if name in ("cr0", "cr2", "cr3", "cr4"):
            return getattr(v, name)()        # the guest's (--tlb walker: not the hardware's)
        if name == "k_gs_base":
            return v.uc.msr_read(_K_GS_BASE)
        if name.startswith("st"):
            # ST(i) is the physical register (TOP + i) % 8, as QEMU's stub reads it; Unicorn's
            # own ST0..ST7 return the mantissa alone (measured), its FP0..FP7 both halves
            top = (v.reg(_xc.UC_X86_REG_FPSW) >> 11) & 7
            phys = (top + int(name[2:])) % 8
            mantissa, exponent = v.uc.reg_read(_xc.UC_X86_REG_FP0 + phys)
            return mantissa | exponent << 64
        if name in ("fctrl", "fstat"):
            return v.reg(_xc.UC_X86_REG_FPCW if name == "fctrl" else _xc.UC_X86_REG_FPSW)
        if name in ("ftag", "fiseg", "fioff", "foseg", "fooff", "fop"):
            return 0                  # as QEMU's stub (target/i386/gdbstub.c): reported as 0
        if name.startswith("xmm"):
            return v.uc.reg_read(getattr(_xc, "UC_X86_REG_" + name.upper()))
        if name in ("fs_base", "gs_base") and v.bits == 32:
            return v.segment_cache(name[:2])[1]     # 32-bit Unicorn has no FS_BASE/GS_BASE
        return v.reg(v.reg_id(name))

    def write_register(self, name, value):
        v = self.vcpu
        if name in ("rip", "eip"):
            v.pc = value
            self.sync_ip()
            return
        if (name == "eflags" or name.endswith(_WRITABLE_SUFFIXES)
                or (name.startswith("r") and name[1:].isdigit())):
            v.set_reg(v.reg_id(name), value)
            return
        raise TargetError(f"register {name} is read-only from gdb (docs/GDB.md)")

    # -- memory
    def translate(self, va: int) -> int:
        """Guest-physical address of ``va`` through the guest's page tables, as a debugger walk
        (QEMU x86_cpu_get_phys_page_attrs_debug): no A/D bits set, no rights checked -- a
        present page is readable whether it is a user or a supervisor page."""
        v = self.vcpu
        ctx = v.paging_context()
        w = pg.walk(v.mem, ctx, va, 0, set_ad=False)
        if not w.ok and w.error_code & pg.PFERR_P:
            w = pg.walk(v.mem, ctx, va, pg.PFERR_U, set_ad=False)    # a SMAP-protected user page
        if not w.ok:
            raise TargetError(f"virtual address {va:#x} is not mapped")
        if not v.mem.contains(w.gpa):
            raise TargetError(f"virtual address {va:#x} maps {w.gpa:#x}, outside RAM")
        return w.gpa

    def _pages(self, addr, n):
        mask = 0xFFFFFFFF if self.bits == 32 else (1 << 64) - 1
        pos = 0
        while pos < n:
            va = (addr + pos) & mask
            chunk = min(n - pos, 0x1000 - (va & 0xFFF))
            yield self.translate(va), pos, chunk
            pos += chunk

    def read_memory(self, addr, n):
        out = bytearray()
        for gpa, _pos, chunk in self._pages(addr, n):
            out += self.vcpu.mem.read(gpa, chunk)
        return bytes(out)

    def write_memory(self, addr, data):
        parts = list(self._pages(addr, len(data)))     # every page first: all or nothing
        for gpa, pos, chunk in parts:
            self.vcpu.write_guest_phys(gpa, data[pos:pos + chunk])
        self.vcpu.code_changed()

    # -- breakpoints and running
    def insert_breakpoint(self, kind, addr):
        self.debug.insert(kind, addr)

    def remove_breakpoint(self, kind, addr):
        self.debug.remove(kind, addr)

    def interrupt(self):
        self._interrupted = True
        self.vcpu.request_stop("interrupted from gdb")

    def resume(self, step):
        """Run until a breakpoint, the end of a step, an interrupt from gdb or the end of the
        guest. A crash stops with SIGSEGV first (gdb can look at it); resuming after that ends
        the guest."""
        from .. import stopping
        if self.final is not None:
            return Stop(exited=True, status=self._status(self.final))
        self.debug.set_step(step)
        self._interrupted = False
        try:
            ex = self.vcpu.run_once(self.max_insns)
        finally:
            self.debug.set_step(False)
        self.sync_ip()
        if ex.kind == ExitKind.DEBUG:
            return Stop(SIGTRAP, self.debug.why)
        if ex.kind == ExitKind.INTERRUPTED:
            if stopping.pending() is None and self._interrupted:
                return Stop(SIGINT)
            self.final = ex            # a signal to x86shadow: the run ends
            return Stop(exited=True, status=0x82)
        self.final = ex
        if ex.kind in _CRASH_KINDS:
            if ex.crash is not None and ex.crash.rip is not None:
                self.vcpu.pc = ex.crash.rip           # gdb shows where it crashed
                self.sync_ip()
            return Stop(SIGSEGV)
        return Stop(exited=True, status=self._status(ex))

    @staticmethod
    def _status(ex):
        if ex.kind == ExitKind.HLT:
            return 0
        if ex.kind == ExitKind.SYSTEM_EVENT:
            return ex.status
        return 4

    def end(self, how: str):
        """The session is over (detached, killed, exited, gdb gone): the Exit the run ends with.
        Detached or disconnected, the guest runs on to its end without the debugger."""
        from ..exits import Exit
        self.debug.set_step(False)
        for addr in list(self.debug.breakpoints):
            self.debug.remove(0, addr)
        if self.final is not None:
            return self.final
        if how == "killed":
            return Exit(ExitKind.INTERRUPTED, crash=GuestCrash("killed from gdb", rip=self.vcpu.pc))
        return self.vcpu.run_once(self.max_insns)
