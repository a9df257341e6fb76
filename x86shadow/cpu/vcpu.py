"""The Unicorn adapter: one vCPU whose memory accesses go through the shadow MMU core (or, as the
reference, through Unicorn's own page walker); ``run_once()`` returns the exits a VM must see.

Shadow mode (``UC_TLB_VIRTUAL``): every softmmu TLB miss calls ``_fill``, the hardware walker over
our shadow tables (``VcpuMmu.hw_fill``). Guest RAM is mapped twice; a write to a write-tracked
frame is pointed at the read-only alias, so the store arrives in ``_write_trap`` with its exact
address, size and value (no exit from ``emu_start``); the core's write-fault path
(``mmu/write_fault.py``) decides, and this carries out the outcome: continue, or refuse the store
and re-execute the instruction. A guest #PF is parked on an unmapped "hole" page so that the exact
faulting address is known, then injected through the guest IDT. What the MMU asks of the CPU
(a TLB flush) comes back as requests, serviced here.

Native mode (``UC_TLB_CPU``): Unicorn walks the guest tables itself; we only deliver exceptions and
run the devices. Guest-visible behaviour must be identical in both modes.
"""
from __future__ import annotations

import ctypes
import re

from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID,
                     UC_HOOK_INTR, UC_HOOK_MEM_FETCH_PROT, UC_HOOK_MEM_UNMAPPED,
                     UC_HOOK_MEM_WRITE_PROT,
                     UC_MEM_FETCH, UC_MEM_WRITE, UC_MODE_32, UC_MODE_64,
                     UC_PROT_ALL, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_CPU, UC_TLB_VIRTUAL, Uc,
                     UcError)
import unicorn.x86_const as _xc
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import (UC_X86_INS_IN, UC_X86_INS_OUT, UC_X86_INS_SYSCALL,
                               UC_X86_INS_SYSENTER, UC_X86_REG_CR0, UC_X86_REG_CR2,
                               UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_CS, UC_X86_REG_EFLAGS,
                               UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_FS, UC_X86_REG_GDTR,
                               UC_X86_REG_GS, UC_X86_REG_IDTR, UC_X86_REG_LDTR, UC_X86_REG_MSR,
                               UC_X86_REG_RIP,
                               UC_X86_REG_SS, UC_X86_REG_TR,
                               UC_X86_REG_EIP, UC_X86_REG_ESP, UC_X86_REG_RSP)

from .. import events as ev
from .. import layout
from .. import stopping
from .. import paging as pg
from ..devices.bus import StopRequest
from ..exits import (REASON_CR, REASON_EXCEPTION, REASON_HLT, REASON_INVLPG, REASON_IO, REASON_MMIO,
                     REASON_MSR_WRITE, Exit, ExitKind, count_exit)
from ..faults import VEC_PF, VEC_UD, Fault, GuestCrash
from ..mmu.vcpu_mmu import (FILL_GUEST_FAULT, FILL_OK, FILL_TRACKED, decode_guest_virt,
                             read_guest_virt, walk_translate)
from ..mmu.requests import REQ_ANY_TLB_FLUSH, REQ_TLB_FLUSH_SPTES
from ..mmu.vm_mmu import REQ_TLB_FLUSH, MMUError
from ..mmu.spte import PERM_W, PERM_X
from ..mmu.shadow_walk import shadow_leaf
from ..mmu.spt_image import FRAME_CODE, FRAME_DATA, FRAME_MIXED
from ..mmu.write_fault import REEXECUTE, TrappedWrite, handle_trapped_write
from . import rawhooks
from .cpustate import CpuState, page_flusher, probe_insn_counter_offset, read_insn_counter
from .delivery import Delivery
from .model import ModelChecks, make_model
from .privileged import INTERCEPTED, Interceptor
from . import walker

EFER = 0xC0000080
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_PGE, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 7, 1 << 20, 1 << 21
# the register bits a paging context depends on
_CR0_PAGING = CR0_PE | CR0_WP | CR0_PG
_CR4_PAGING = CR4_PSE | CR4_PAE | CR4_PGE | CR4_SMEP | CR4_SMAP
_EFER_PAGING = EFER_LME | EFER_LMA | EFER_NXE

# instruction classes whose stores TCG emits inline: refusing the store leaves no trace, so the
# instruction can be re-executed natively
_RESTARTABLE = frozenset("mov stos movs xchg cmpxchg bts btr btc or and xor add adc sub sbb inc dec "
                         "neg not xadd push setcc shl shr sar rol ror rcl rcr shld shrd".split())
# read-modify-write classes: their memory operand is read, then written
_RMW = frozenset("xchg cmpxchg cmpxchg8b cmpxchg16b bts btr btc or and xor add adc sub sbb inc dec "
                 "neg not xadd shl shr sar rol ror rcl rcr shld shrd".split())
_BIT_OPS = frozenset(("bt", "bts", "btr", "btc"))
# an operand that is a segment register (mov sreg, m / mov m, sreg)
_SREG_OPERAND = re.compile(r"(?:^|, )[cdefgs]s(?:,|$)")
# what a guest frame is used for (see _fill); the states the image's transform reads too
_DATA, _CODE, _MIXED = FRAME_DATA, FRAME_CODE, FRAME_MIXED
_MAX_FLIPS = 16
_MAX_SCOPED_FLUSH = 64        # more changed sptes than this in one flush: flush it all
_ACCESS = {16: 0, 17: pg.PFERR_W, 18: pg.PFERR_FETCH}     # UC_MEM_READ / WRITE / FETCH
_REG_IDS = {}
# Unicorn's register calls without the binding's argtypes: every argument passed is already a
# ctypes object (handle, array, byref) or a C int (register id, count), so ctypes converts
# nothing -- 0.2 us less per call (docs/PERFORMANCE.md), on every fill and register access
_uclib = ctypes.CDLL(uclib._name)
_uc_reg_read = _uclib.uc_reg_read
_uc_reg_write = _uclib.uc_reg_write
_uc_reg_read_batch = _uclib.uc_reg_read_batch
_uc_reg_write_batch = _uclib.uc_reg_write_batch
_new_tuple = tuple.__new__             # a NamedTuple without its Python-level constructor


class _Mmr(ctypes.Structure):
    """unicorn's uc_x86_mmr"""
    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


class _Msr(ctypes.Structure):
    """unicorn's uc_x86_msr"""
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


def _reg_id(name):
    """Unicorn register id from a capstone register name ('eax', 'r8d', 'cr3' ...)."""
    rid = _REG_IDS.get(name)
    if rid is None:
        import unicorn.x86_const as xc
        rid = getattr(xc, "UC_X86_REG_" + name.upper())
        _REG_IDS[name] = rid
    return rid


class VCPU:
    """One vCPU. ``vm_mmu`` (shadow mode) is the VM's shadow MMU; this vCPU gets its own per-vCPU
    MMU state from it. ``bus`` is the VM's port bus; ``crash_gates`` the IDT gate targets that
    mean "unhandled exception" (the firmware's)."""

    def __init__(self, mode: str, mem, *, vm_mmu=None, counters: dict, events, bus,
                 crash_gates=frozenset(), host_mem=None, host_tick=None, host_rewritten=None,
                 cpu=None, mmio=None, tlb="virtual"):
        """``mem``: guest-physical memory; ``host_mem``: the host memory Unicorn maps as its
        physical space (``mem`` itself unless a host memory manager is under the guest; then
        ``host_tick`` runs the host's due operations where the TLB can be flushed and
        ``host_rewritten`` holds the host pages whose contents the host replaced). ``cpu``: the
        CPU model (a --cpu string, cpu_model.CpuSpec or CpuModel; None: the default). ``mmio``:
        the VM's MMIO bus (devices/bus.py), whose ranges are mapped as Unicorn MMIO regions.
        ``tlb``: shadow mode only, "virtual" (the fill hook, default) or "walker" (Unicorn's own
        walker over the shadow tables' image, cpu/walker.py)."""
        # mode None: a kernel that sets up its own paging and code width (docs/KERNELS.md):
        # Unicorn runs as UC_MODE_64 (its registers are 64 bits wide) and the code width is the
        # guest's, code_bits(); the paging mode follows CR0/CR4/EFER as for every mode
        self.mode = mode
        self.bits = 32 if mode in ("32", "pae") else 64       # Unicorn's register width
        self.mem = mem
        self.host_mem = host_mem = host_mem if host_mem is not None else mem
        self._host_tick = host_tick
        self._rewritten = host_rewritten
        self._in_write_hook = False
        self.shadow = vm_mmu is not None
        self.walker = tlb == "walker"      # (Machine checked it: machine.TLBS, shadow only)
        self.counters = counters
        self.events = events
        self.bus = bus
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64 if self.bits == 64 else UC_MODE_32)
        self.cpu_model = make_model(cpu, self.bits, "shadow" if self.shadow else "native")
        uc.ctl_set_cpu_model(getattr(_xc, "UC_CPU_X86_" + self.cpu_model.uc_model))
        self.maxphyaddr = self.cpu_model.maxphyaddr
        self._h = uc._uch
        self._rv = ctypes.c_uint64()
        self._rvp = ctypes.byref(self._rv)
        self._wv = ctypes.c_uint64()
        self._wvp = ctypes.byref(self._wv)
        self._mmr = _Mmr()
        self._mmrp = ctypes.byref(self._mmr)
        self._msr = _Msr()
        self._msrp = ctypes.byref(self._msr)
        self._batches = {}               # register id tuple -> prepared uc_reg_*_batch arrays
        self.pinned_ctx = None           # the paging context of a delivery in progress (native)
        # native mode: RAM is not executable until a page is first executed (_exec_page scans
        # it for privileged instructions then); shadow mode: the fill hook sets the rights
        uc.mem_map_ptr(0, host_mem.size, UC_PROT_ALL if self.shadow else UC_PROT_READ | UC_PROT_WRITE,
                       host_mem.address)
        self.exec_page = None            # native: the virtual address of a first fetch from a page
        self.mmu = None
        self.stop = None                 # why emu_start stopped: ("exit", status), ("crash", GuestCrash),
                                         # ("event", ...) to deliver, ("reexec", rip)
        self.pending_fault = None        # (vector, error_code, cr2) to inject after emu_start returns
        self.retry_page = None           # code page whose translations must be dropped
        self.page_kind = {}              # gfn -> _CODE / _MIXED (absent: _DATA)
        self.flips = {}                  # gfn -> code/data transitions so far
        self.invalidating = False        # inside ctl_remove_cache (its fetch fill is not code)
        self._efer = None                # EFER as last read or intercepted (None: read it)
        # shadow mode: CR0 and CR4 as last read (None: read them). Every write to them is
        # intercepted, and the cache is dropped there, so a CR3 switch reads neither
        self._cr0 = self._cr4 = None
        self._contexts = {}              # paging-relevant register bits -> PagingContext
        self._rmw_read = self._current_insn_is_rmw
        self._byte_repeat = None         # (next gpa, end, rip, tail): byte repeats of a store
        self._retry_counted = False      # retry_page was set by a data access (counted)
        self._parked = False             # this run's fault sits on the hole (a TLB entry to drop)
        self._stop_request = None        # request_stop(): why run_once() must return
        self._counting = None            # uc_struct offset of the counter while counting
        self._observe_fills = False      # a TLB_FILL subscriber exists (refreshed by run_once)
        # scoped flushes (enable_scoped_flushes): the leaf sptes our fills translated through
        # since the last whole flush, (shadow page, index) -> virtual page; _leaves_exact
        # False once one spte was filled at two pages (then a flush is a whole flush)
        self._page_flush = None
        self._tlb_leaves = None
        self._leaves_exact = True
        if self.shadow:
            uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
            uc.mem_map_ptr(layout.ALIAS_BASE, host_mem.size, UC_PROT_READ, host_mem.address)
            self.mmu = vm_mmu.add_vcpu()
            self.mmu.flush_hw_tlb = self.flush_tlb       # the notifiers' "flush it now"
            self.mmu.guest_rip = self.rip            # read only when tracing (kvm_exit, faults)
            self._add_raw_fill_hook()
            # memory hooks only over the addresses they are for: a hook whose range covers a
            # store sends every such store down QEMU's slow path (measured: 10x per store)
            uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._write_trap, None, layout.ALIAS_BASE,
                        layout.ALIAS_BASE + host_mem.size - 1)
            uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._unmapped, None, layout.HOLE_BASE,
                        layout.HOLE_BASE + 0xFFF)
            self.interceptor = Interceptor(uc, self.bits, self._privileged, reads=self.walker)
            if self.walker:
                walker.setup_walker(self)
        else:
            uc.ctl_set_tlb_mode(UC_TLB_CPU)
            uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._unmapped_native, None, mem.size, (1 << 52) - 1)
            uc.hook_add(UC_HOOK_MEM_FETCH_PROT, self._fetch_prot)
            self.interceptor = Interceptor(uc, self.bits, self._privileged)
        if self.walker:
            # raw: every shadow fault comes through this hook (the binding's wrapper ~1 us)
            self._raw_intr = rawhooks.intr_callback(uc, self._intr)
            rawhooks.add_intr(uc, self._raw_intr)
        else:
            uc.hook_add(UC_HOOK_INTR, self._intr)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._invalid)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._sys_insn, None, 1, 0, UC_X86_INS_SYSENTER)
        if self.bits == 64:
            uc.hook_add(UC_HOOK_INSN, self._sys_insn, None, 1, 0, UC_X86_INS_SYSCALL)
        # 32-bit Unicorn warns on RIP/RSP: use the register ids of the CPU's width
        if self.bits == 64:
            self.R_IP, self.R_SP = UC_X86_REG_RIP, UC_X86_REG_RSP
        else:
            self.R_IP, self.R_SP = UC_X86_REG_EIP, UC_X86_REG_ESP
        self.cpustate = CpuState(uc)
        if self.walker:
            walker.find_live_state(self)
        self.delivery = Delivery(self, crash_gates)
        # MSRs a device implements (index -> object with read() -> int and write(value)); the
        # CPU model's MSR rules leave them to it, rdmsr/wrmsr of them are carried out here
        self.msr_handlers = {}
        self.model_checks = ModelChecks(self, self.cpu_model)
        self.mmio_pages = set()          # guest-physical pages of MMIO devices
        if mmio is not None:
            self._map_mmio(mmio)
        self.pc = None                   # where the next run_once() starts (load_boot_state)
        self.debug = None                # guest_debug.GuestDebug while a debugger is attached
        self.before_insn = False         # inside the privileged-instruction hook (_privileged)
        self.insns = 0                   # guest instructions retired so far (with max_insns)
        self.restarts = 0                # of the counted ones, started again (not retired)

    # ------------------------------------------------------------------ boot
    def load_boot_state(self, state) -> None:
        """Put the CPU in a boot.firmware.BootState: boot GDT, CR0, segments, stack, entry."""
        uc = self.uc
        self.mem.write(state.gdt_base, state.gdt_bytes())
        uc.reg_write(UC_X86_REG_GDTR, (0, state.gdt_base, len(state.gdt) * 8 - 1, 0))
        if state.cr0 is not None:
            uc.reg_write(UC_X86_REG_CR0, state.cr0)
        self._cr0 = self._cr4 = self._efer = None
        uc.reg_write(UC_X86_REG_CS, state.code_sel)
        for rid in (UC_X86_REG_SS, UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_FS, UC_X86_REG_GS):
            uc.reg_write(rid, state.data_sel)
        uc.reg_write(self.R_SP, state.sp)
        if self.walker:
            walker.boot(self)
        if self.shadow:
            self._set_context()
        self.pc = state.entry

    def _map_mmio(self, bus) -> None:
        """Every range of the MMIO bus as a Unicorn MMIO region: guest accesses there call the
        device (native: Unicorn's walker reaches the region; shadow: the fill points the TLB
        entry at it, ``_fill``). Each access is an exit, counted as KVM counts ``mmio_exits``
        (arch/x86/kvm/x86.c, vcpu->stat.mmio_exits on a KVM_EXIT_MMIO) and traced as
        ``kvm_mmio`` (KVM's tracepoint: rw, len, gpa, val)."""
        for first, last, dev in bus.ranges():
            size = ((last - first) | 0xFFF) + 1
            self.mmio_pages.update(range(first & ~0xFFF, first + size, 0x1000))

            def read(uc, offset, size, _ud, first=first, dev=dev):
                return self._mmio(dev, first + offset, size, None)

            def write(uc, offset, size, value, _ud, first=first, dev=dev):
                self._mmio(dev, first + offset, size, value)
            self.uc.mmio_map(first & ~0xFFF, size, read, None, write, None)

    def _mmio(self, dev, gpa, size, value):
        c = self.counters
        c["mmio_exits"] += 1
        if self.shadow:
            count_exit(c, self.events, REASON_EXCEPTION, self.rip, vector=14, address=gpa,
                       size=size, write=value is not None, mmio=True)
        else:
            count_exit(c, self.events, REASON_MMIO, self.rip, address=gpa, size=size,
                       write=value is not None)
        if self.shadow:
            self.mmu.other_exit()
        if value is None:
            value = dev.read(gpa, size)
            rw = "read"
        else:
            dev.write(gpa, size, value)
            rw = "write"
        if self.events.tracing:
            self.events.emit(ev.KVM_MMIO, rw=rw, len=size, gpa=gpa, val=value)
        return value

    def at_address(self, address: int, fn) -> None:
        """Call ``fn()`` once, when the guest is about to execute the instruction at
        ``address`` (a one-address code hook, removed after it fired)."""
        handle = []

        def hook(uc, addr, size, _ud):
            if handle:
                uc.hook_del(handle.pop())
                fn()
        handle.append(self.uc.hook_add(UC_HOOK_CODE, hook, None, address, address))

    def _add_raw_fill_hook(self):
        """Register _fill straight with ctypes: the binding's wrapper costs ~1 us per TLB miss."""
        self._raw_fill = rawhooks.tlb_fill_callback(self.uc, self._fill)
        rawhooks.add_tlb_fill(self.uc, self._raw_fill)

    # ------------------------------------------------------------------ registers
    def reg(self, rid) -> int:
        self._rv.value = 0                  # 16/32-bit registers fill only the low bytes
        _uc_reg_read(self._h, rid, self._rvp)
        return self._rv.value

    def set_reg(self, rid, value) -> None:
        self._wv.value = value & 0xFFFFFFFFFFFFFFFF
        _uc_reg_write(self._h, rid, self._wvp)

    def _batch(self, ids: tuple):
        """The ctypes arrays of a register batch (made once per tuple of ids)."""
        prep = self._batches.get(ids)
        if prep is None:
            n = len(ids)
            vals = (ctypes.c_uint64 * n)()
            ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(vals) + 8 * i for i in range(n)])
            prep = self._batches[ids] = ((ctypes.c_int * n)(*ids), ptrs, vals, n)
        return prep

    def read_regs(self, ids: tuple) -> list:
        """Several registers in one raw ``uc_reg_read_batch`` (one call instead of one per
        register: the exception delivery reads six)."""
        rids, ptrs, vals, n = self._batch(ids)
        ctypes.memset(vals, 0, 8 * n)       # 16/32-bit registers fill only the low bytes
        _uc_reg_read_batch(self._h, rids, ptrs, n)
        return vals[:]

    def write_regs(self, ids: tuple, values) -> None:
        """Several registers in one raw ``uc_reg_write_batch``."""
        rids, ptrs, vals, n = self._batch(ids)
        for i, value in enumerate(values):
            vals[i] = value & 0xFFFFFFFFFFFFFFFF
        _uc_reg_write_batch(self._h, rids, ptrs, n)

    def mmr(self, rid):
        """(selector, base, limit, flags) of GDTR/IDTR/LDTR/TR, read without the binding."""
        m = self._mmr
        _uc_reg_read(self._h, rid, self._mmrp)
        return m.selector, m.base, m.limit, m.flags

    def rip(self) -> int:
        return self.reg(self.R_IP)

    def _read_efer(self) -> int:
        """EFER through the raw API (the binding's msr_read costs several us)."""
        m = self._msr
        m.rid = EFER
        _uc_reg_read(self._h, UC_X86_REG_MSR, self._msrp)
        return m.value

    def efer(self) -> int:
        if self.walker:
            return self._g_efer          # the guest's (the hardware's has NXE forced)
        if not self.shadow:
            return self._read_efer()
        if self._efer is None:          # shadow mode caches it: every EFER change is intercepted
            self._efer = self._read_efer()
        return self._efer

    def long_mode(self) -> bool:
        return self.bits == 64 and bool(self.efer() & EFER_LMA)

    def code_bits(self) -> int:
        """The width of the code the CPU runs now: 64 in 64-bit mode (EFER.LMA and CS.L), else
        32 or 16 from CS.D (SDM vol. 3A 3.4.5 and 5.2.1). A program's width is its mode's; a
        kernel's is read from QEMU's hflags, which QEMU derives from exactly those bits
        (cpu_x86_load_seg_cache: HF_CS64 = LMA && CS.L, HF_CS32 = CS.D) and decodes with."""
        if self.mode is not None:
            return self.bits
        return self.cpustate.code_bits()

    def segment_cache(self, name):
        """(selector, base, limit, flags) of segment register ``name`` from QEMU's cache."""
        from .cpustate import _SEG, R_CS, R_DS, R_ES, R_FS, R_GS, R_SS
        self.cpustate.snapshot()
        reg = {"cs": R_CS, "ss": R_SS, "ds": R_DS, "es": R_ES, "fs": R_FS, "gs": R_GS}[name]
        off = self.cpustate.off.segs + 24 * reg
        return _SEG.unpack(ctypes.string_at(self.cpustate.addr + off, 24))

    def _cached_cr(self, attr, rid):
        """CR0/CR4: in shadow mode read once and kept until the next intercepted write (which
        drops the cache); in native mode always read."""
        if self.walker:
            return getattr(self, "_g" + attr)   # the guest's (the hardware's: WP / PAE forced)
        value = getattr(self, attr)
        if value is None:
            value = self.reg(rid)
            if self.shadow:
                setattr(self, attr, value)
        return value

    def cr0(self) -> int:
        return self._cached_cr("_cr0", UC_X86_REG_CR0)

    def cr4(self) -> int:
        return self._cached_cr("_cr4", UC_X86_REG_CR4)

    def cr2(self) -> int:
        """The guest's CR2 (--tlb walker: the hardware's also takes the shadow faults')."""
        if self.walker:
            return self._guest_cr2
        return self.reg(UC_X86_REG_CR2)

    def cr3(self) -> int:
        """The guest's CR3 (--tlb walker: the hardware's is the shadow root's)."""
        if self.walker:
            return self._g_cr3
        return self.reg(UC_X86_REG_CR3)

    def paging_context(self, cr0=None, cr3=None, cr4=None, efer=None, cache_pdptes=False):
        """The guest paging context from the registers, with any of them replaced by a new value.
        ``cache_pdptes``: load the PAE PDPTEs now, as a CR3 load does (the shadow MMU's roots are
        built from them); otherwise the walker reads them from memory, as Unicorn's walker does."""
        if cr0 is None:
            cr0 = self._cached_cr("_cr0", UC_X86_REG_CR0)
        cr3 = self.cr3() if cr3 is None else cr3
        if cr4 is None:
            cr4 = self._cached_cr("_cr4", UC_X86_REG_CR4)
        efer = self.efer() if efer is None else efer
        if cr0 & CR0_PG and efer & EFER_LME:
            efer |= EFER_LMA
        pdptes = ()
        if cache_pdptes and cr0 & CR0_PG and cr4 & CR4_PAE and not efer & EFER_LME:
            # Unicorn never #GPs on reserved PDPTE bits (the walk #PFs with RSVD): match it
            pdptes = pg.load_pdptes(self.mem, cr3, strict=False, maxphyaddr=self.maxphyaddr)
        # contexts are immutable: reuse them (a CR3 switch between a few processes is common)
        key = (cr0 & _CR0_PAGING, cr3, cr4 & _CR4_PAGING, efer & _EFER_PAGING, pdptes)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) > 4096:
                self._contexts.clear()
            ctx = self._contexts[key] = pg.PagingContext.from_regs(*key,
                                                                   maxphyaddr=self.maxphyaddr)
        return ctx

    # ------------------------------------------------------------------ guest virtual memory
    def _translate(self, va, access):
        if self.shadow:
            return self.mmu.translate(va, access)
        return walk_translate(self.mem, self.pinned_ctx or self.paging_context(), va, access)

    def read_virt(self, va, n, user=False) -> bytes:
        return read_guest_virt(self.mem, self._translate, va, n, user)

    def write_virt(self, va, data, user=False) -> None:
        data = bytes(data)
        # translate every page first so that a fault leaves memory untouched
        parts, pos = [], 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - ((va + pos) & 0xFFF))
            parts.append((self._translate(va + pos, pg.PFERR_W | (pg.PFERR_U if user else 0)),
                          data[pos:pos + chunk]))
            pos += chunk
        for gpa, part in parts:
            self.write_guest_phys(gpa, part)

    def write_guest_phys(self, gpa, part) -> None:
        """A write made for the guest (an exception frame, a debugger's write) within one page
        of guest-physical memory."""
        self.mem.write(gpa, part)
        if self.shadow and (self.mmu.vm.is_tracked(gpa >> 12)
                            or self.mmu.vm.is_shadowed(gpa >> 12)):
            # to a guest page table, in sync or not: the pte-write path, as KVM's emulated
            # writes (kvm_mmu_track_write)
            self.mmu.pte_write(gpa, len(part))

    def code_changed(self) -> None:
        """Guest memory changed behind the CPU (a debugger's write, between runs): drop every
        translated block (measured on Unicorn 2.1.4: writes into RAM never invalidate them) and, in shadow
        mode, the TLB, so that the next fetch fill re-scans a changed code page for privileged
        instructions."""
        self.uc.ctl_flush_tb()
        if self.walker and self._hw_paging:
            # no fill comes to re-scan a code page: every frame is data again, so the next
            # fetch from each faults and scans it (the image re-encoded at the next entry)
            self.page_kind.clear()
            self.image.reencode_all()
        if self.shadow:
            self.flush_tlb()

    # ------------------------------------------------------------------ TLB and MMU requests
    def _check_flush_allowed(self):
        if self._in_write_hook:
            raise MMUError("a TLB flush was asked for inside a trapped store, where Unicorn "
                           "cannot flush")

    def _tlb_emptied(self):
        """Unicorn's whole TLB was just flushed: forget which sptes its entries came from."""
        if self._tlb_leaves:
            self._tlb_leaves.clear()
        self._leaves_exact = True
        if self.mmu is not None:
            self.mmu.write_removed = False

    def flush_tlb(self):
        self._check_flush_allowed()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.counters["tlb_flush"] += 1
        self._tlb_emptied()
        if self.mmu is not None:
            if self.mmu.tlb_pfns:
                self.mmu.tlb_pfns.clear()
            if self.mmu.tlb_record:
                self.mmu.tlb_record.clear()

    def service_requests(self):
        """Carry out what the MMU asked of the CPU (KVM's vcpu_enter_guest request loop). The
        MMU_RELOAD request is the MMU's own (the next fill reloads the root)."""
        mmu = self.mmu
        if mmu.requests & REQ_TLB_FLUSH:
            mmu.requests &= ~REQ_ANY_TLB_FLUSH
            mmu.flush_sptes.clear()
            self.flush_tlb()
        elif mmu.requests & REQ_TLB_FLUSH_SPTES:
            mmu.requests &= ~REQ_TLB_FLUSH_SPTES
            if self.walker:
                # no record of which pages the hardware filled through which sptes: whole
                # (the invlpg hook carries out its own one-spte case, walker.invlpg_flush)
                mmu.flush_sptes.clear()
                self.flush_tlb()
            else:
                self._flush_changed_sptes()

    def enable_scoped_flushes(self) -> bool:
        """Carry out a flush after a change to some leaf sptes only (REQ_TLB_FLUSH_SPTES) by
        dropping the pages our fills translated through them (QEMU's per-page flush): every
        other entry of the TLB is what a refill from its unchanged spte would give again, so
        the TLB ends up holding what a whole flush and the refills would leave. Only for a VM
        with this one vCPU and no host memory manager (the machine decides): there nothing
        reads the TLB's contents (host pages it maps, other vCPUs' records). False when this
        Unicorn build has no per-page flush we can reach (every flush stays whole)."""
        self._page_flush = page_flusher(self.uc, self.bits)
        if self._page_flush is None:
            return False
        self._tlb_leaves = {}
        self.mmu.vm.scoped_flushes = True
        return True

    def _flush_changed_sptes(self):
        mmu = self.mmu
        sptes = mmu.flush_sptes
        if not self._leaves_exact or len(sptes) > _MAX_SCOPED_FLUSH:
            sptes.clear()
            self.flush_tlb()
            return
        self._check_flush_allowed()
        leaves = self._tlb_leaves
        flush = self._page_flush
        for leaf in sptes:
            va = leaves.pop(leaf, None)
            if va is not None:
                flush(va)
        sptes.clear()
        mmu.write_removed = False
        self.counters["tlb_flush"] += 1           # KVM's one flush, however it is carried out

    # ------------------------------------------------------------------ shadow-mode hooks
    def _fill(self, uc, va, acc, entry, _ud):
        if self._host_tick is not None and not self.invalidating:
            if self.events.tracing:
                self.events.guest_runs()     # the guest was running: its entry comes first
            self._host_tick()            # due host operations (their flushes are safe here)
        access = _ACCESS[acc]
        rv = self._rv
        rv.value = 0
        _uc_reg_read(self._h, UC_X86_REG_CS, self._rvp)
        if rv.value & 3 == 3:
            access |= pg.PFERR_U
        mmu = self.mmu
        if self._observe_fills:
            self.events.emit(ev.TLB_FILL, va=va, access=access)
        kind, addr, perms, vector, error_code = mmu.hw_fill(va, access, self._rmw_read)
        if kind == FILL_GUEST_FAULT and access & pg.PFERR_U and self._system_table_page(va):
            # implicit supervisor access (GDT/IDT/TSS read) made at CPL3: it lands in QEMU's
            # kernel TLB, so granting it as supervisor gives user code nothing
            access &= ~pg.PFERR_U
            kind, addr, perms, vector, error_code = mmu.hw_fill(va, access, self._rmw_read)
        if mmu.requests:
            self.service_requests()
            if mmu.tlb_pfns is not None and (kind == FILL_OK or kind == FILL_TRACKED):
                # the flush emptied the record of what the TLB may hold; this entry goes in
                # after it
                mmu.tlb_pfns[addr >> 12] = self.counters["exits"]
        if kind == FILL_OK or kind == FILL_TRACKED:
            hpa = addr
            gfn = hpa >> 12
            state = self.page_kind.get(gfn, _DATA)
            if self._rewritten and gfn in self._rewritten:
                # the host replaced this page's contents (swap-in, migration, copy-on-write,
                # poison) behind QEMU's back: code translated from what was there before must
                # go (measured on Unicorn 2.1.4: writes into the buffer never invalidate
                # translated code). A page in the data state has none (a fetch makes it code; a store to a code
                # page drops its translations)
                self._rewritten.discard(gfn)
                if state != _DATA and not self.invalidating:
                    self.retry_page = va
                    self._retry_counted = acc != UC_MEM_FETCH
                    return False
            if acc == UC_MEM_FETCH:
                if state == _DATA and not self.invalidating:
                    self._flip(gfn, _CODE)
                    state = _CODE
                if self.interceptor.on_exec_fill(va, gfn, self.host_mem.read(hpa, 4096)):
                    self.retry_page = va
                    self._retry_counted = False       # a fetch: the block never ran
                    return False
            elif acc == UC_MEM_WRITE and state == _CODE:
                # a store to a page we run code from: its translations must go first (Unicorn
                # does not notice stores through non-executable TLB entries)
                self._flip(gfn, _DATA)
                self.retry_page = va
                self._retry_counted = True            # the storing instruction was counted
                return False
            # Code pages R|X, data pages R|W: stores through an executable TLB entry take QEMU's
            # slow path (measured on Unicorn 2.1.4: 6-10x), so a page is executable only while it holds code.
            # A page that keeps flipping holds both; it gets R|W|X and QEMU's own SMC detection.
            if state == _CODE:
                perms &= ~PERM_W
            elif state == _DATA and not self.invalidating:
                # (inside ctl_remove_cache the page was just flipped to data by a store: QEMU
                # finds its translated code through a fetch translation of it, and silently
                # skips the invalidation if that is refused -- found by guestcode/host_code's
                # author: a second store into just-run code was lost)
                perms &= ~PERM_X
            elif state == _DATA:
                # ... and that fetch translation gets no W: the store that flipped the page
                # re-executes next and must fill again (to R|W); an R|W|X entry left here would
                # take the page's next stores and code past the flip and the privileged-
                # instruction scan (found when a TLB flush came inside that store's fill:
                # tests/test_pitfalls.py, a mov cr3 written into executed code)
                perms &= ~PERM_W
            entry.paddr = hpa if kind == FILL_OK else layout.ALIAS_BASE + hpa
            entry.perms = perms
            leaves = self._tlb_leaves
            if leaves is not None:
                leaf = mmu.filled_leaf               # (page, index) of the spte, or None
                if leaf is not None:
                    page = va & ~0xFFF
                    if leaves.setdefault(leaf, page) != page:
                        self._leaves_exact = False
            if mmu.tlb_record is not None:          # --audit with several vCPUs (mmu/audit.py)
                mmu.tlb_record[va >> 12] = (gfn, perms if kind == FILL_OK else perms & ~PERM_W,
                                            access & pg.PFERR_U)
            return True
        if kind == FILL_GUEST_FAULT:
            if vector != VEC_PF:            # #GP(0): non-canonical address
                self.pending_fault = (vector, error_code, None)
                return False
            if acc == UC_MEM_FETCH:
                rip = self.rip()
                cr2 = rip if (rip & ~0xFFF) == va else va
                self.pending_fault = (VEC_PF, error_code, cr2)
                return False
            cr2 = self._refused_fault_address(va, acc)
            if cr2 is not None:
                # a refused fill unwinds the instruction with no state changed (measured,
                # tools/probes/helper_access_fault.py)
                self.pending_fault = (VEC_PF, error_code, cr2)
                return False
            # park the access on the hole so that _unmapped learns the exact byte address (the
            # run loop must then flush the TLB to drop the hole entry)
            entry.paddr = layout.HOLE_BASE
            entry.perms = UC_PROT_ALL
            self.pending_fault = (VEC_PF, error_code, va)
            self._parked = True
            return True
        # FILL_NO_MEMORY: an MMIO device's page is mapped through to its Unicorn MMIO region
        # (no spte: every TLB miss there walks the guest tables again); anything else reaches
        # the hole and is reported
        if addr & ~0xFFF in self.mmio_pages and acc != UC_MEM_FETCH:
            entry.paddr = addr & ~0xFFF
            entry.perms = UC_PROT_READ | UC_PROT_WRITE
            return True
        self._parked = True
        entry.paddr = layout.HOLE_BASE
        entry.perms = UC_PROT_ALL
        self.pending_fault = ("nomem", va, addr)
        return True

    def _flip(self, gfn, state):
        n = self.flips.get(gfn, 0) + 1
        self.flips[gfn] = n
        self.page_kind[gfn] = _MIXED if n > _MAX_FLIPS else state
        if self.walker and self.fallback_flips is not None:
            self.fallback_flips.append(gfn)      # (the image re-encodes it: walker.end_fallback)

    def _system_table_page(self, va):
        for rid in (UC_X86_REG_GDTR, UC_X86_REG_IDTR, UC_X86_REG_TR, UC_X86_REG_LDTR):
            _, base, limit, _ = self.uc.reg_read(rid)
            if limit and base <= va + 0xFFF and va <= base + limit:
                return True
        return False

    def _unmapped(self, uc, acc, addr, size, value, _ud):
        pf = self.pending_fault
        if pf is not None and pf[0] == VEC_PF and addr >= layout.HOLE_BASE:
            self.pending_fault = (VEC_PF, pf[1], pf[2] | (addr & 0xFFF))
        elif pf is not None and pf[0] == "nomem" and pf[1] is not None \
                and addr >= layout.HOLE_BASE:
            off = addr & 0xFFF                        # the byte, as for a #PF parked here
            self.pending_fault = ("nomem", pf[1] | off, pf[2] | off)
        elif pf is None or pf[0] != "nomem":
            self.pending_fault = ("nomem", None, addr)
        return False

    def _fetch_prot(self, uc, acc, addr, size, value, _ud):
        """Native mode: the first fetch from a guest page (RAM is mapped without execute right
        until then). Unicorn reports the guest-physical address (measured). Refused: the run loop
        scans the page (_exec_page) and restarts there; the fetch happens while QEMU translates,
        so nothing of the block has run."""
        self.exec_page = addr
        return False

    def _exec_page(self, gpa):
        """Native mode: make the guest-physical page at ``gpa`` executable and scan it for the
        privileged instructions the CPU model checks (cpu/privileged.py), hooked at the virtual
        page the fetch came through: RIP's page or, for a block running into the next page, the
        one after. A page is scanned at its first execution only: code stored into it later, or
        the page run through a second virtual address, is not scanned again (docs/CPU_MODEL.md;
        the shadow MMU re-scans both)."""
        gpa &= ~0xFFF
        ctx = self.paging_context()
        rip = self.rip() & ~0xFFF
        va = None
        for cand in (rip, rip + 0x1000):
            w = pg.walk(self.mem, ctx, cand, 0, set_ad=False)
            if w.ok and w.gpa & ~0xFFF == gpa:
                va = cand
                break
        if va is None:
            raise MMUError(f"a first fetch from guest-physical {gpa:#x} that RIP {self.rip():#x} "
                           "does not lead to")
        self.uc.mem_protect(gpa, 0x1000, UC_PROT_ALL)
        # the refused fetch leaves QEMU's exception-in-flight state set (measured: the next
        # natively raised #PF became a #DF)
        self.cpustate.clear_old_exception()
        self.interceptor.on_exec_fill(va, gpa >> 12, self.host_mem.read(gpa, 0x1000))

    def invpcid_flush(self, kind, address):
        """What an emulated INVPCID invalidates (SDM vol. 2A INVPCID; Linux 6.18 x86.c
        kvm_handle_invpcid): type 0 one address (as invlpg), types 1..3 everything the guest may
        have cached -- under shadow paging KVM syncs the roots then (KVM_REQ_TLB_FLUSH_GUEST ->
        kvm_vcpu_flush_tlb_guest -> kvm_mmu_sync_roots), which a context reload does here. There
        is no PCID tagging, so a flush covers every PCID."""
        if self.shadow:
            if kind == 0:
                self.mmu.invlpg(address)
            else:
                self._set_context()
            self.mmu.other_exit()
            self.service_requests()
        self.flush_tlb()

    def _unmapped_native(self, uc, acc, addr, size, value, _ud):
        self.pending_fault = ("nomem", None, addr)
        return False

    def _write_trap(self, uc, acc, addr, size, value, _ud):
        """A store to a write-tracked frame (through the read-only alias): the write-protection
        fault of a shadow-paging hypervisor. The MMU core decides (mmu/write_fault.py); this
        reports the store and carries out the outcome."""
        gpa = addr - layout.ALIAS_BASE            # a host address: the gpa, unless the host
        if self._rewritten is not None:           # moved pages under the guest
            gfn = self.mmu.vm.pfn_to_gfn(gpa >> 12)
            if gfn is None:
                # a TLB entry to a host page that no longer backs guest RAM (the flush-before-
                # free rule broken on purpose): hardware would fault on the read-only entry;
                # refuse the store, flush, and let the guest retry through the shadow tables
                self.mmu.request(REQ_TLB_FLUSH)
                self.stop = ("reexec", self.reg(self.R_IP))
                return False
            gpa = (gfn << 12) | (gpa & 0xFFF)
        repeat = self._byte_repeat
        tail = None
        if repeat is not None:
            self._byte_repeat = None
            nxt, end, rep_rip, tail = repeat
            if size == 1 and gpa == nxt:
                # a byte of a store already completed whole: the bytes are in memory
                if gpa + 1 < end:
                    self._byte_repeat = (gpa + 1, end, rep_rip, tail)
                elif tail is not None:
                    self._byte_repeat = (None, None, rep_rip, tail)
                return True
        rip = self.reg(self.R_IP)
        insn = self.mmu.decode_at(rip, self.code_bits())
        # Refusing a store (return False) re-executes the instruction cleanly only for stores TCG
        # emits inline; stores made from inside a QEMU helper (cmpxchg8b/16b, fxsave, far calls)
        # keep the helper's register updates (measured)
        restartable = insn is not None and insn.kvm_class in _RESTARTABLE
        part = 0x1000 - (gpa & 0xFFF)
        repeats = None               # (first, end) of the byte repeats that will follow
        if part < size:
            # a store crossing into the next page, announced whole with its whole value: the
            # part on this page is decided now (refusing it here stops the instruction cleanly);
            # the part on the next page, if that page is tracked too, arrives as byte stores
            # after this page's bytes and is completed then (tools/probes/
            # unaligned_store_repeat.py measures both)
            if self._next_page_faults(insn):
                return False                          # nothing stored; the #PF is pending
            tail = (value >> (8 * part), size - part)
            value &= (1 << (8 * part)) - 1
            size = part
            repeats = (gpa, gpa + size)
        elif size == 1 and insn is not None and insn.access_size > 1:
            # A byte of a bigger store whose first bytes are already stored: the next page's
            # part of a crossing store (taken whole, from the value announced before), or a byte
            # of a crossing store whose first page is not tracked. The instruction is past the
            # point where it could be refused.
            if tail is not None and rip == repeat[2] and gpa & 0xFFF == 0 \
                    and tail[0] & 0xFF == value:
                value, size = tail
                repeats = (gpa + 1, gpa + size)
            restartable = False
            tail = None
        else:
            tail = None
            if gpa & (size - 1):
                # misaligned within the page: announced whole, then repeated byte by byte
                repeats = (gpa, gpa + size)
        w = _new_tuple(TrappedWrite, (gpa, size, value, rip, self.reg(UC_X86_REG_CS) & 3, insn,
                                      restartable, self.counters["exits"]))
        if self.walker and self._harvest_each_exit:
            self.image.harvest_ad()
        self._in_write_hook = True
        try:
            outcome = handle_trapped_write(self.mmu, w)
        finally:
            self._in_write_hook = False
        if self.walker:
            self.image.sync()             # the hardware walks on through the changed tables
        if (outcome != REEXECUTE and self.mmu.requests & REQ_ANY_TLB_FLUSH
                and (self.walker or self.mmu.write_removed)
                and repeats is None and tail is None and insn is not None
                and insn.kvm_class == "mov" and not self._exited()):
            # The core wants the TLB flushed and the CPU cannot flush inside a store. Under the
            # walker no fill comes before the next exit; under the fill hook the flush waits
            # for the next fill -- and when it takes W away (a frame became a shadowed table),
            # the stores after this one through a TLB entry that still maps the frame writable
            # would bypass the tracking (found by the walker: ptwrites --mode pae, a store to
            # the PDPT in use makes a new shadowed directory, which the guest then fills with
            # plain movs). A plain mov is complete once the core stored its value: refuse it
            # in Unicorn (nothing more is stored) and go on after it from the run loop, which
            # flushes first -- KVM's emulated store, then vcpu_enter_guest's flush
            self.stop = ("skip", insn.next_ip)
            return False
        if outcome == REEXECUTE:
            # refuse the store: Unicorn stops with the instruction not done (measured: memory and
            # registers untouched, RIP on it; an emu_stop() here would let the store through and
            # then re-execute the instruction). The run loop flushes the TLB, dropping the alias
            # mapping, and the guest re-executes the instruction natively. Unicorn leaves a stale
            # RIP when the refused store came from a helper (cmpxchg8b: measured), so resume at
            # the RIP read here, on the instruction. A refused store is not repeated.
            if not self._exited():
                self.stop = ("reexec", rip)
            return False
        if repeats is not None and repeats[0] < repeats[1]:
            # A misaligned or page-crossing store accepted whole is then repeated by QEMU byte
            # by byte (measured; a refused one is not). The store is complete: the repeats must
            # not be taken for new stores (re-deciding them after an unprotect re-executed the
            # finished instruction -- a store done twice, or a livelock when the table is on the
            # store's own translation path).
            self._byte_repeat = (repeats[0], repeats[1], rip, tail)
        elif tail is not None:
            self._byte_repeat = (None, None, rip, tail)
        return True

    def _next_page_faults(self, insn) -> bool:
        """A store crossing into the next page is announced (for its first, tracked page)
        before QEMU fills the second page: if that page faults, no byte may be stored. Walks it
        now through the MMU (the guest #PF counted and traced as any other); on a fault, leaves
        it pending for the run loop."""
        ea = self._operand_address(insn)
        if ea is None:
            return False
        va = (ea & ~0xFFF) + 0x1000
        kind, _addr, _perms, vector, error_code = self.mmu.hw_fill(va, self._write_access())
        if kind != FILL_GUEST_FAULT:
            return False
        self.pending_fault = (vector, error_code, va if vector == VEC_PF else None)
        return True

    def _refused_fault_address(self, va, acc):
        """CR2 for a guest #PF on a data access to page ``va`` that must be raised by refusing
        the fill rather than by parking the access on the hole (None: park it).

        Refused: an access that crosses into the next page (parked, QEMU would store the bytes
        of the page that is mapped before the parked ones fault -- measured: a partly done
        store), an access made by an instruction whose memory accesses TCG does not emit
        inline (not in _RESTARTABLE: parked, the helper goes on with what it read there), and
        -- for speed -- every access whose byte the decoded operand gives exactly: the one
        explicit operand of an instruction that makes no other access (a refused fill leaves
        no TLB entry behind, so the run loop need not flush the TLB after the fault and the
        handler does not refill it; docs/PERFORMANCE.md). The faulting byte comes from the
        decoded memory operand."""
        insn = self._decode_at(self.rip())
        ea = self._accessed_address(insn)
        if ea is None:
            return None
        if acc != UC_MEM_WRITE and insn.kvm_class in ("movs", "cmps"):
            return None                               # two memory operands: which one is unknown
        size = insn.mem_operand.size or 1
        crosses = (ea & 0xFFF) + size > 0x1000
        page = ea & ~0xFFF
        if page == va and (crosses or insn.kvm_class not in _RESTARTABLE
                           or not _SREG_OPERAND.search(insn.op_str)):
            # (a segment register operand means a descriptor read too, which may be the access
            # that faulted: parked, the hole tells)
            return ea
        if page + 0x1000 == va and crosses:
            return va                                 # the part on the next page faulted
        return None

    def _current_insn_is_rmw(self, va):
        """Is the read at page ``va`` the read half of a read-modify-write that x86 translates
        for writing? Not when the operand starts on the page before and that page cannot be
        written: x86 translates the first page with write intent, faults there, and never
        translates this one for writing (TCG reads both pages first; found by the fuzzer)."""
        insn = self._decode_at(self.rip())
        if insn is None or not insn.mem_write or insn.kvm_class not in _RMW:
            return False
        ea = self._operand_address(insn)
        if ea is None:
            return True
        first = ea & ~0xFFF
        if first == va & ~0xFFF:
            return True
        return pg.walk(self.mem, self.mmu.ctx, first, self._write_access(), set_ad=False).ok

    def _operand_address(self, insn):
        """Linear address of the decoded instruction's explicit memory operand (None without
        one)."""
        if insn is None or insn.mem_operand is None or insn.mem_operand.implicit:
            return None
        return insn.mem_operand.effective_address(self._read_reg_by_name, insn.next_ip)

    def _accessed_address(self, insn):
        """Linear address the instruction's explicit memory operand is accessed at: the operand's
        address, except for bt/bts/btr/btc with a register bit offset, which selects the
        operand-sized unit of a bit string from the operand on (signed, so before it too): SDM
        vol. 2 BT; QEMU 5.0 target/i386/translate.c, the bt case (ea + (offset >> (3 + ot)
        << ot)). None without an explicit operand."""
        ea = self._operand_address(insn)
        if ea is None or insn.kvm_class not in _BIT_OPS:
            return ea
        src = insn.op_str.rsplit(", ", 1)[-1]
        if src.isdigit() or src.startswith("0x") or not src.isalnum():
            return ea                                 # an immediate offset stays in the unit
        size = insn.mem_operand.size
        bits = 8 * size
        off = self._read_reg_by_name(src) & ((1 << bits) - 1)
        if off >> (bits - 1):
            off -= 1 << bits
        ea += (off >> (bits.bit_length() - 1)) * size
        return ea & ((1 << (8 * insn.mem_operand.addr_size)) - 1)

    def _write_access(self):
        """PFERR bits of a data write at the current CPL."""
        return pg.PFERR_W | (pg.PFERR_U if self.reg(UC_X86_REG_CS) & 3 == 3 else 0)

    def _decode_at(self, rip):
        if self.shadow:
            return self.mmu.decode_at(rip, self.code_bits())
        return decode_guest_virt(self.read_virt, rip, self.code_bits())

    # ------------------------------------------------------------------ privileged instructions
    def _privileged(self, uc, address, size, _ud):
        # an emu_stop() from here stops before the instruction: vm_scheduler.py must not cut a
        # slice at an exit this hook takes (the instruction would be intercepted again)
        self.before_insn = True
        try:
            self._privileged_insn(uc, address)
        finally:
            self.before_insn = False

    def _privileged_insn(self, uc, address):
        if self.stop is not None:
            return          # emulation is stopping before this instruction (exit port, event)
        if self.debug is not None and self.debug.check(address):
            return          # a breakpoint or the end of a step: stop before it
        if self._host_tick is not None:
            self._host_tick()
        insn = self._decode_at(address)
        if insn is None:
            return
        m = insn.mnemonic
        if m not in INTERCEPTED:
            return
        if self.reg(UC_X86_REG_CS) & 3:
            return                                    # the CPU raises #GP / #UD itself
        # the CPU model first: an instruction that faults on this model never reaches the MMU
        # (emu_stop in this hook stops before the instruction: nothing of it is done)
        fault = self.model_checks.before(insn)
        if fault is not None:
            vector, error_code, reason = fault
            if self.events.tracing:
                self.events.emit(ev.X86SHADOW_CPU_FAULT, insn=insn.text, vector=vector,
                                 reason=reason)
            self._event(uc, vector, error_code, rip=address)
            return
        if m in ("rdmsr", "wrmsr"):
            handler = self.msr_handlers.get(self.reg(_reg_id("ecx")) & 0xFFFFFFFF)
            if handler is not None:
                self.stop = ("emulate", insn.next_ip, lambda: self._device_msr(handler, m))
                uc.emu_stop()
                return
        if self.walker and m not in ("invlpg", "wrmsr") and walker.insn(self, uc, insn, address):
            return
        if m == "mov" and insn.op_str.startswith("cr3"):
            value = self.reg(_reg_id(insn.op_str.split(",")[1].strip()))
            stored = self.model_checks.cr3_value(value)
            if stored != value:
                # CR4.PCIDE with the no-flush bit 63: Unicorn would store it; we do the write
                self.stop = ("emulate", insn.next_ip, lambda: self._write_cr3(stored, address))
                uc.emu_stop()
                return
        if not self.shadow:
            return
        c = self.counters
        if m == "invlpg":
            va = self._operand_address(insn)
            count_exit(c, self.events, REASON_INVLPG, address, address=va)
            leaf = shadow_leaf(self.mmu.root, self.mmu.root_level, va) if self.walker else None
            self.mmu.invlpg(va)
            self.mmu.other_exit()
            if self.walker:
                walker.invlpg_flush(self, va, leaf)
                walker.prepare(self)
            return                                    # QEMU executes it and drops its own entry
        if m == "wrmsr":
            if self.reg(_reg_id("ecx")) & 0xFFFFFFFF != EFER:
                return
            new = (self.reg(_reg_id("edx")) & 0xFFFFFFFF) << 32 | (self.reg(_reg_id("eax")) & 0xFFFFFFFF)
            count_exit(c, self.events, REASON_MSR_WRITE, address, msr=EFER, value=new)
            old = self.efer()
            if self.reg(UC_X86_REG_CR0) & CR0_PG:
                new = (new & ~EFER_LMA) | (old & EFER_LMA)
            self._set_context(efer=new)
            self._efer = None                         # re-read once the CPU has executed it
            if (old ^ new) & EFER_NXE:
                self.mmu.request(REQ_TLB_FLUSH)       # QEMU does not flush on an NXE change
            self._finish_privileged(uc)
            if self.walker:
                # carried out here: the CPU's wrmsr would drop the forced NXE
                walker.efer_written(self, new)
                walker.prepare(self)
                self.set_reg(self.R_IP, insn.next_ip)
            return
        if m != "mov":
            return
        dst, src = [s.strip() for s in insn.op_str.split(",")]
        if not dst.startswith("cr"):
            return
        crn = int(dst[2:])
        if crn not in (0, 3, 4):
            return
        value = self.reg(_reg_id(src))
        if self.code_bits() != 64:
            value &= 0xFFFFFFFF
        self._shadow_cr_write(crn, value, address)
        self._finish_privileged(uc)

    def _device_msr(self, handler, mnemonic):
        """rdmsr / wrmsr of a device's MSR (from the run loop): EDX:EAX from or to its handler."""
        rax, rdx = _reg_id("rax" if self.bits == 64 else "eax"), _reg_id("rdx" if self.bits == 64 else "edx")
        if mnemonic == "rdmsr":
            value = handler.read() & 0xFFFFFFFFFFFFFFFF
            self.set_reg(rax, value & 0xFFFFFFFF)
            self.set_reg(rdx, value >> 32)
        else:
            handler.write((self.reg(rdx) & 0xFFFFFFFF) << 32 | (self.reg(rax) & 0xFFFFFFFF))

    def _write_cr3(self, value, address):
        """mov to CR3 carried out by us (from the run loop): Unicorn's CR3 and, in shadow mode,
        the MMU's context, as when the CPU executes it."""
        self.set_reg(UC_X86_REG_CR3, value)
        if self.shadow:
            self._shadow_cr_write(3, value, address)      # counts the CPU's flush
            self.service_requests()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)    # the flush the CPU's mov does
        if self.mmu is not None and self.mmu.tlb_record:
            self.mmu.tlb_record.clear()

    def _shadow_cr_write(self, crn, value, address):
        """The shadow MMU's side of a mov to CR0/CR3/CR4 of ``value`` (before the CPU does it)."""
        c = self.counters
        count_exit(c, self.events, REASON_CR, address, cr=crn, write=True)
        if self.events.tracing:
            self.events.emit(ev.KVM_CR, rw="write", cr=crn, value=value)
        if crn == 0:
            self._set_context(cr0=value)
            self._efer = None                         # a paging switch may toggle EFER.LMA
            self._cr0 = None                          # re-read once the CPU has executed it
        elif crn == 3:
            self._set_context(cr3=value)
            if ev.CR3_LOAD in self.events.subs:
                self.events.emit(ev.CR3_LOAD, cr3=value)
            if self.mmu.ctx.mode != pg.Mode.OFF:
                # Unicorn flushes its whole TLB itself when it executes this mov to CR3 with
                # paging on, right after this hook: that flush is ours
                self.mmu.requests &= ~REQ_ANY_TLB_FLUSH
                self.mmu.flush_sptes.clear()
                self._tlb_emptied()
                self.counters["tlb_flush"] += 1
                if self.mmu.tlb_record:
                    self.mmu.tlb_record.clear()
        else:
            self._set_context(cr4=value)
            self._cr4 = None                          # re-read once the CPU has executed it

    def _finish_privileged(self, uc):
        self.service_requests()

    def _read_reg_by_name(self, name):
        return self.reg(_reg_id(name))

    reg_by_name = _read_reg_by_name

    @staticmethod
    def reg_id(name):
        return _reg_id(name)

    def _set_context(self, **regs):
        """A new paging context for the shadow MMU from the registers (with the value a mov to
        CR0/CR3/CR4 or a wrmsr of EFER is about to store): the paging mode is never fixed, it
        follows CR0.PG, CR4.PAE and EFER.LMA at every change, as KVM rebuilds its MMU context
        (kvm_mmu_reset_context -> kvm_init_mmu, from kvm_post_set_cr0 on a CR0.PG/WP change,
        kvm_post_set_cr4 on PAE/PSE/PGE/SMEP/SMAP changes, set_efer on an NX/LMA change;
        arch/x86/kvm/x86.c, Linux 6.x). A kernel switching paging off and on again (the boot
        stub, then its own long mode) gets a new root each time."""
        ctx = self.paging_context(cache_pdptes=True, **regs)
        if self.events.tracing:
            self.events.emit(ev.NEW_ROOT, mode=ctx.mode.name, cr3=ctx.cr3, wp=ctx.wp, nxe=ctx.nxe,
                             smep=ctx.smep)
        self.mmu.set_context(ctx)
        self.mmu.other_exit()

    # ------------------------------------------------------------------ events
    # Events Unicorn raises are delivered from the run loop, never inside the hook: a write of
    # RIP inside a hook leaves Unicorn reporting stale PCs to later memory hooks (measured: the
    # next trapped stores in a block all report the first one's RIP), so a hook only records
    # the event and stops.
    def _event(self, uc, vector, error_code=None, *, soft=False, rip=None, cr2=None):
        self.stop = ("event", vector, error_code, soft, self.rip() if rip is None else rip, cr2)
        uc.emu_stop()

    def _intr(self, uc, intno, _ud):
        """Exceptions and software interrupts Unicorn raised (it never uses the guest IDT)."""
        if self.stop is not None:
            return                  # the guest already asked to stop (exit port) in this block
        if intno == VEC_PF and self.walker and self._hw_paging:
            walker.page_fault(self, uc)          # the hardware walking the shadow tables
        elif intno == VEC_PF:                    # native mode: QEMU's walker raised it
            self._event(uc, VEC_PF, self.cpustate.error_code(), cr2=self.reg(UC_X86_REG_CR2))
        elif self._exception_is_int():
            self._event(uc, intno, soft=True)    # int n / int3 / into: RIP is the next insn
        elif intno in (8, 10, 11, 12, 13, 17):
            self._event(uc, intno, self.cpustate.error_code())
        else:
            self._event(uc, intno)

    def _exception_is_int(self):
        self.cpustate.snapshot()
        return ctypes.c_int32.from_address(self.cpustate.addr + self.cpustate.off.error_code + 4).value != 0

    def _invalid(self, uc, _ud):
        if self.stop is None:       # else the guest already asked to stop (exit port)
            self._event(uc, VEC_UD)
        return True

    def _sys_insn(self, uc, _ud):
        # syscall/sysenter are not modelled (Unicorn performs no mode switch for them): #UD
        if self.stop is None:
            self._event(uc, VEC_UD)

    def _exited(self):
        """The guest wrote the exit port: the run ends at that out. Unicorn runs on to the end
        of the translation block (emu_stop is not immediate); those instructions' port I/O is
        dropped, so nothing after the exit write prints or exits again."""
        stop = self.stop
        return stop is not None and stop[0] == "exit"

    def _out(self, uc, port, size, value, _ud):
        if self._exited():
            return
        dev = self.bus.device_at(port)
        if dev is not None and dev.instrumentation:
            dev.write(port, size, value)          # neither counted nor seen by the policy
            return
        c = self.counters
        c["io_exits"] += 1
        count_exit(c, self.events, REASON_IO, self.rip, port=port, size=size, write=True)
        if self.events.tracing:
            self.events.emit(ev.KVM_PIO, rw="write", port=port, size=size, value=value)
        if self.shadow:
            self.mmu.other_exit()
            if self.walker:
                walker.prepare(self)
        if self._host_tick is not None:
            self._host_tick()
        if dev is not None:
            r = dev.write(port, size, value)
            if isinstance(r, StopRequest):
                self.stop = ("exit", r.status)
                uc.emu_stop()

    def _in(self, uc, port, size, _ud):
        if self._exited():
            return (1 << (8 * size)) - 1
        c = self.counters
        c["io_exits"] += 1
        count_exit(c, self.events, REASON_IO, self.rip, port=port, size=size, write=False)
        if self.shadow:
            self.mmu.other_exit()
            if self.walker:
                walker.prepare(self)
        if self._host_tick is not None:
            self._host_tick()
        value = self.bus.read(port, size)
        if self.events.tracing:
            self.events.emit(ev.KVM_PIO, rw="read", port=port, size=size, value=value)
        return value

    # ------------------------------------------------------------------ run loop
    def insns_now(self):
        """Guest instructions executed so far, while they are counted (--max-insns), else None
        (read in the middle of a run for the trace)."""
        off = self._counting
        if off is None:
            return self.insns if self.insns else None
        return self.insns + read_insn_counter(self.uc, off)

    def request_stop(self, reason: str) -> None:
        """Make run_once() return an INTERRUPTED exit as soon as possible. Safe from another
        thread (Unicorn's emu_stop is) and from inside a hook."""
        self._stop_request = reason
        self.uc.emu_stop()

    def run_once(self, max_insns: int = 0) -> Exit:
        """Run the guest until something the VM must see happens; return it as a typed Exit.
        Faults the MMU fixes, guest exceptions (delivered through the guest IDT), re-executions
        after an unprotect and code-page rescans are handled here, as KVM handles them inside
        KVM_RUN.

        ``max_insns`` > 0: count guest instructions (Unicorn's ``count``: every translated block
        then calls a counting hook, several times slower) and stop a guest that runs past it.

        While it runs, the vCPU is registered with ``stopping`` (signals and failing outputs
        stop it through ``request_stop``)."""
        stopping.enter(self)
        try:
            return self._run_loop(max_insns)
        finally:
            stopping.leave(self)

    def _run_loop(self, max_insns):
        pc = self.pc
        uc = self.uc
        counter_off = probe_insn_counter_offset() if max_insns else None
        self._observe_fills = self.events.wants(ev.TLB_FILL)
        count_stopped = False
        while True:
            if self._stop_request is not None:
                reason, self._stop_request = self._stop_request, None
                self.pc = pc
                return Exit(ExitKind.INTERRUPTED, crash=GuestCrash(reason, rip=pc))
            if max_insns and self.insns >= max_insns:
                # the budget is used up (e.g. by the instruction that faulted): count=0 would
                # mean "no limit". The run can go on from pc with a bigger max_insns
                self.pc = pc
                return self._runaway(max_insns, pc)
            if self._host_tick is not None:
                self._host_tick()
            if self.debug is not None:
                self.debug.resuming(pc)
            self.stop = None
            self.pending_fault = None
            self._parked = False
            self.retry_page = None
            self._byte_repeat = None
            self.exec_page = None
            until = 0
            if self.walker:
                self._hw_fault_rip = None
                walker.prepare(self)
                if self.mmio_fallback:
                    until = walker.begin_fallback(self, pc)    # one step under the fill hook
            try:
                if max_insns:
                    left = max_insns - self.insns
                    self._counting = counter_off
                    if self.events.tracing:
                        self.events.guest_runs()
                    try:
                        uc.emu_start(pc, until, count=left)
                    finally:
                        self._counting = None
                        counted = read_insn_counter(uc, counter_off)
                        # Unicorn counts an instruction before it runs and stops before the
                        # one past the limit, which it has counted too (left + 1): a hlt that
                        # is the last instruction allowed stops at exactly left
                        count_stopped = counted > left
                        self.insns += min(counted, left)
                        self.counters["guest_insns"] = self.insns
                else:
                    if self.events.tracing:
                        self.events.guest_runs()
                    uc.emu_start(pc, until)
                err = None
            except UcError as e:
                if uc._hook_exception is not None:
                    # a hook raised: the binding reports only the UcError when the run also
                    # failed, so surface the real exception (our bug or an audit failure)
                    raise uc._hook_exception from None
                err = e
            finally:
                if until:
                    walker.end_fallback(self, pc, until)
            if self.walker and self._harvest_each_exit and self._hw_paging:
                self.image.harvest_ad()
            if self.exec_page is not None and self.stop is None:
                self._exec_page(self.exec_page)
                pc = self.rip()
                continue
            stop = self.stop
            if stop is not None and stop[0] == "exit":
                self.pc = self.rip()
                return Exit(ExitKind.SYSTEM_EVENT, status=stop[1])
            if stop is not None and stop[0] == "debug":
                self.pc = stop[1]                 # stopped before this instruction
                return Exit(ExitKind.DEBUG)
            if self.retry_page is not None:
                if max_insns and self._retry_counted:
                    self._restarted()
                self.invalidating = True
                try:
                    uc.ctl_remove_cache(self.retry_page, self.retry_page + 0x1000)
                finally:
                    self.invalidating = False
                pc = self.rip()
                continue
            pf = self.pending_fault
            if pf is not None:
                if pf[0] == "nomem":
                    return Exit(ExitKind.MMIO, crash=GuestCrash(
                        f"access to guest-physical address {pf[2]:#x}, outside RAM"
                        if pf[1] is None else
                        f"virtual address {pf[1]:#x} maps guest-physical {pf[2]:#x}, outside RAM",
                        rip=self.rip()))
                if self._parked:
                    self.flush_tlb()                      # drop the hole mapping
                hw = self.walker and self._hw_fault_rip is not None
                if hw:
                    uc.reg_write(self.R_IP, self._hw_fault_rip)
                try:
                    # (a fault the hardware raised, --tlb walker: QEMU's exception in flight
                    # must be forgotten, as in native mode)
                    pc = self.delivery.raise_exception(pf[0], pf[1], cr2=pf[2],
                                                       native=not self.shadow or hw)
                except GuestCrash as crash:
                    return self._crash_exit(crash)
                if self.walker:
                    self._guest_cr2 = self.reg(UC_X86_REG_CR2)
                if self.shadow:
                    self.service_requests()               # the frame may have hit a page table
                continue
            if stop is not None and stop[0] == "emulate":
                # an instruction the CPU model carries out itself: done here, outside the hook
                _, pc, action = stop
                action()
                uc.reg_write(self.R_IP, pc)
                continue
            if stop is not None and stop[0] == "event":
                _, vector, ec, soft, rip, cr2 = stop
                uc.reg_write(self.R_IP, rip)
                if vector == VEC_UD:
                    # an instruction Unicorn lacks that the model has (invpcid): emulate it
                    try:
                        done = self.model_checks.emulate_ud(self._decode_at(rip))
                    except Fault as f:
                        done = (f.vector, f.error_code, "descriptor read faulted")
                        cr2 = f.cr2
                    if done == ():
                        if self.events.tracing:
                            self.events.emit(ev.X86SHADOW_CPU_EMULATE, rip=rip,
                                             insn=self._decode_at(rip).text)
                        pc = self._decode_at(rip).next_ip
                        uc.reg_write(self.R_IP, pc)
                        continue
                    if done is not None:
                        vector, ec = done[0], done[1]
                        if self.events.tracing:
                            self.events.emit(ev.X86SHADOW_CPU_FAULT, insn=self._decode_at(rip).text,
                                             vector=vector, reason=done[2])
                try:
                    pc = self.delivery.raise_exception(vector, ec, cr2=cr2, soft=soft,
                                                       return_rip=rip)
                except GuestCrash as crash:
                    return self._crash_exit(crash)
                if self.walker:
                    self._guest_cr2 = self.reg(UC_X86_REG_CR2)
                if self.shadow:
                    self.mmu.other_exit()
                continue
            if stop is not None and stop[0] == "skip":
                self.service_requests()           # a trapped mov completed: flush, go on after it
                pc = stop[1]
                uc.reg_write(self.R_IP, pc)
                continue
            if stop is not None and stop[0] == "reexec":
                if max_insns:
                    self._restarted()
                self.service_requests()
                pc = stop[1]
                uc.reg_write(self.R_IP, pc)
                continue
            if err is not None:
                return Exit(ExitKind.INTERNAL_ERROR, crash=GuestCrash(f"CPU error: {err}",
                                                                      rip=self.rip()))
            rip = self.rip()
            if self._stop_request is not None:
                pc = rip                              # emu_stop() from request_stop()
                continue
            if self.walker and (self.mmio_fallback or until and rip == until):
                pc = rip              # (walker) an MMIO access: its step comes / has ended
                continue
            if count_stopped:
                if self.insns >= max_insns:
                    self.pc = rip                     # run_once(bigger max_insns) goes on here
                    return self._runaway(max_insns, rip)
                # (walker) Unicorn's count included instructions restarted in place after a
                # shadow fault, which have not retired: the budget is not used up
                pc = rip
                continue
            # emu_start returned by itself: hlt
            self.counters["halt_exits"] += 1
            count_exit(self.counters, self.events, REASON_HLT, rip)
            if self.reg(UC_X86_REG_EFLAGS) & (1 << 9):
                return Exit(ExitKind.GUEST_CRASH, crash=GuestCrash(
                    "hlt with interrupts enabled: no interrupt source exists, the guest would "
                    "wait forever", rip=rip))
            self.pc = rip
            return Exit(ExitKind.HLT)

    def _restarted(self):
        """The instruction Unicorn counted was refused and is started again: it has not
        retired, so ``insns`` counts instructions retired, the same under both MMUs (the native
        MMU restarts nothing; x86shadow diff compares the two at equal counts)."""
        self.insns -= 1
        self.restarts += 1
        self.counters["guest_insns"] = self.insns

    @staticmethod
    def _runaway(max_insns, rip) -> Exit:
        return Exit(ExitKind.RUNAWAY, crash=GuestCrash(
            f"runaway: still running after --max-insns {max_insns} instructions", rip=rip))

    @staticmethod
    def _crash_exit(crash) -> Exit:
        return Exit(ExitKind.SHUTDOWN if crash.shutdown else ExitKind.GUEST_CRASH, crash=crash)
