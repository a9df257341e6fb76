"""``--tlb walker``: Unicorn's own page walker (UC_TLB_CPU) walks the shadow tables
(direction 1, stage 3; docs/PERFORMANCE.md "Direction 1", probes 1-4g).

The VM's shadow tables are kept as an x86-format image (mmu/spt_image.py ShadowTableImage)
mapped into the CPU's physical memory at ``layout.SPT_ARENA_BASE``; while the guest has paging
on, the hardware runs with CR3 = the shadow root's slot, so a refill through a present spte
never reaches Python. What reaches Python:

* a #PF (UC_HOOK_INTR, vector 14) -- a shadow fault: the core's ``hw_fill`` with the access
  from the error code, as the fill hook calls it; a fix is synced into the image and the
  instruction restarts in place (probe 2) with the guest's CR2 written back (KVM reloads
  ``vcpu->arch.cr2`` before entry: arch/x86/kvm/vmx/vmx.c ``vmx_vcpu_run``); a guest fault is
  delivered from the run loop (probe 4e);
* the code/data split of frames (``VCPU.page_kind``, the fill hook's state machine): the image
  encodes data frames NX and code frames without W (ShadowTableImage.frame_kind), so the first
  fetch from a data frame and the first store to a code frame are #PFs that the spte itself
  allows: the frame flips (code: scanned for privileged instructions; data: its translated code
  dropped first, while it is still executable) and the instruction restarts;
* stores to write-tracked frames: through the alias in UC_HOOK_MEM_WRITE_PROT, unchanged
  (probe 4a);
* the guest's CR0/CR3/CR4 writes and EFER wrmsr (carried out here: the MMU context as today,
  then the hardware values: CR0.WP, CR4.PAE, EFER.NXE forced as KVM forces them under shadow
  paging -- vmx.c ``vmx_set_cr0`` ``hw_cr0 |= X86_CR0_WP`` when !enable_ept (v5.15+),
  ``KVM_PMODE_VM_CR4_ALWAYS_ON`` in ``vmx_set_cr4``, ``update_transition_efer`` /
  svm.c ``svm_set_efer``), and its CR0/CR3/CR4/EFER reads (mov from CR, rdmsr: the guest's
  values; KVM traps only CR3 reads, CR0/CR4 come from the VMCS read shadows -- Unicorn has no
  read shadow; these reads are not counted as exits, so the counters stay the fill adapter's).

While the guest has paging off there are no shadow tables (the core's root is None): the vCPU
runs the fill hook as ``--tlb virtual`` does, with the guest's own register values.

An access to an MMIO device's page (a kernel's xAPIC) has no spte: the core's fault ends in "no
memory" and, as under the fill hook, every access there walks the guest tables again. Under
paging the walker cannot reach the device's Unicorn MMIO region without an spte, so the vCPU
runs that one instruction under the fill hook: the fault restarts it, the TLB is switched to the
fill hook (``begin_fallback``) for one exact step, in which the fill maps the page through to
the region, and the walker takes over again after it (``end_fallback``). Counted as under the
fill hook: one MMIO exit per access. (KVM
caches such a translation in an MMIO spte, ``mark_mmio_spte``, Linux 3.1+; the core keeps none,
under either TLB mode.)

Several vCPUs (docs/SMP.md): each has its own Unicorn instance, TLB, translated code and
code/data split of frames, so each walks its own plane of the one image (ShadowTableImage
planes: the same shadow pages and slots, leaves encoded by that vCPU's ``page_kind``); a flip
changes the frame's entries in the flipping vCPU's plane only and flushes only its TLB. The other
vCPUs' TLBs are flushed where the core asks (KVM_REQ_TLB_FLUSH of a remote flush, served before
their next slice), as hardware keeps stale entries until then.

Scope: ``--mmu shadow``, no host memory manager; programs (modes 32, pae, 64, one or several
vCPUs) and kernels (their paging-mode switches go through ``cr_write`` / ``efer_written``).
"""
from __future__ import annotations

import ctypes

from unicorn import UC_PROT_READ, UC_PROT_WRITE, UC_TLB_CPU, UC_TLB_VIRTUAL
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR2, UC_X86_REG_CR3, UC_X86_REG_CR4,
                               UC_X86_REG_MSR)

from .. import paging as pg
from ..faults import VEC_PF
from ..mmu.requests import REQ_ANY_TLB_FLUSH, REQ_MMU_RELOAD, REQ_TLB_FLUSH, REQ_TLB_FLUSH_SPTES
from ..mmu.shadow_walk import shadow_leaf
from ..mmu.spt_image import FRAME_CODE as _CODE, FRAME_DATA as _DATA, ShadowTableImage
from ..mmu.spte import SPTE_FRAME, SPTE_NX, SPTE_P, SPTE_U, SPTE_W
from ..mmu.vcpu_mmu import FILL_GUEST_FAULT, FILL_NO_MEMORY, FILL_OK, FILL_TRACKED
from ..mmu.vm_mmu import MMUError

EFER = 0xC0000080
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
CR0_WP, CR0_PG = 1 << 16, 1 << 31
CR4_PAE = 1 << 5
_PFERR = pg.PFERR_W | pg.PFERR_U | pg.PFERR_FETCH


def check_walker_config(*, mmu, host) -> None:
    """ValueError (one line) for what --tlb walker does not cover yet."""
    if mmu != "shadow":
        raise ValueError("--tlb walker needs --mmu shadow (it walks the shadow tables)")
    if host is not None:
        raise ValueError("--tlb walker has no host memory manager yet (no --host, --notifiers, "
                         "--break)")


def setup_walker(v) -> None:
    """Attach the image to the VM's shadow MMU and map it into v's physical memory."""
    vm = v.mmu.vm
    img = vm.image
    if img is None:
        img = ShadowTableImage(vm)
        img.frame_kind = v.page_kind
        plane = 0
    else:
        # another vCPU of the VM: the same shadow pages, its own code/data split of frames
        plane = img.add_plane(v.page_kind)
    v.image = img
    mem = img.planes[plane].mem
    # the bytearray must not move while it is mapped: this export makes a growth raise
    # (BufferError) instead of leaving the CPU a stale pointer; the default size is the
    # core's page limit (max_pages) plus the PAE roots
    v._image_buf = (ctypes.c_char * len(mem)).from_buffer(mem)
    v.uc.mem_map_ptr(img.base, len(mem), UC_PROT_READ | UC_PROT_WRITE,
                     ctypes.addressof(v._image_buf))
    v._hw_paging = False              # the hardware walks the image (else: the fill hook)
    v._hw_cr3 = None
    v._hw_root = None                 # the root the hardware's CR3 was last set for
    v._guest_cr2 = 0
    v._g_cr0 = v._g_cr3 = v._g_cr4 = v._g_efer = 0
    v._hw_fault_rip = None            # RIP of a guest fault raised by the hardware (run loop)
    # the kvm-2008 family reads spte A bits (policies/kvm2008.py): the walker's must be in
    # the core before it runs (harvest_ad at every exit); kvm/xen read none
    v._harvest_each_exit = vm.policy.reads_spte_accessed
    # a flush after a change to va's spte alone (an invlpg's) as QEMU's per-page flush: the
    # core then says which sptes changed (REQ_TLB_FLUSH_SPTES, VmMmu.flush_leaf_sptes)
    from .cpustate import page_flusher
    v._walker_page_flush = page_flusher(v.uc, v.bits)
    if v._walker_page_flush is not None:
        vm.scoped_flushes = True
    v.walker_stats = {"flips_code": 0, "flips_data": 0, "shadow_pf": 0, "restarts": 0,
                      "fallbacks": 0}
    v.mmio_fallback = False            # the next emu_start runs under the fill hook (MMIO)
    v.fallback_flips = None            # during it: gfns the fill hook flipped


def find_live_state(v) -> None:
    """The error code and QEMU's exception in flight read and reset in the live CPU state
    (cpustate._find_env: the env the context snapshots copy from its start) instead of
    through a context snapshot and restore per shadow fault (two copies of the CPU state,
    ~2.5 us); the snapshot way if this build's state cannot be found or does not match."""
    from unicorn.x86_const import (UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX,
                                   UC_X86_REG_EDX, UC_X86_REG_RAX, UC_X86_REG_RBX,
                                   UC_X86_REG_RCX, UC_X86_REG_RDX)
    from .cpustate import _find_env
    gprs = ((UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX) if v.bits == 64
            else (UC_X86_REG_EAX, UC_X86_REG_ECX, UC_X86_REG_EDX, UC_X86_REG_EBX))
    v._live_ec = v._live_oe = None
    env = _find_env(v.uc, gprs)
    if env is None:
        return
    cs = v.cpustate
    cs.snapshot()
    off = cs.off                                 # (offsets in the context; env at off.env)
    n = off.old_exception + 4 - off.env
    if ctypes.string_at(env, 16) != ctypes.string_at(cs.addr + off.env, 16) or n <= 0:
        return                                   # the context does not copy env from its start
    v._live_ec = ctypes.c_uint32.from_address(env + off.error_code - off.env)
    v._live_oe = ctypes.c_int32.from_address(env + off.old_exception - off.env)
    # the copy and the live state agree on both fields now
    if (v._live_ec.value != cs._u32(off.error_code).value
            or v._live_oe.value != ctypes.c_int32.from_address(cs.addr + off.old_exception).value):
        v._live_ec = v._live_oe = None
        return
    cs.live_old_exception = v._live_oe


def boot(v) -> None:
    """After load_boot_state wrote the CPU's reset/boot registers: they are the guest's."""
    if v._hw_paging:
        v.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        v._hw_paging = False
    v._g_cr0 = v.reg(UC_X86_REG_CR0)
    v._g_cr3 = v.reg(UC_X86_REG_CR3)
    v._g_cr4 = v.reg(UC_X86_REG_CR4)
    v._g_efer = v._read_efer()
    v._guest_cr2 = v.reg(UC_X86_REG_CR2)
    v._hw_cr3 = None


def _write_efer(v, value) -> None:
    v.uc.reg_write(UC_X86_REG_MSR, (EFER, value))


def apply_hw(v) -> None:
    """Write the hardware CR0/CR3/CR4/EFER for the guest's current values (and switch between
    the walker and the fill hook as paging goes on or off); the TLB is flushed."""
    uc = v.uc
    g0, g3, g4, ge = v._g_cr0, v._g_cr3, v._g_cr4, v._g_efer
    if g0 & CR0_PG:
        mmu = v.mmu
        if mmu.requests & REQ_MMU_RELOAD:
            mmu.reload_root()
        if not v._hw_paging:
            # from the fill hook to the walker: every frame starts as data again, so that each
            # code page's first fetch under paging is a #PF that scans it at the virtual
            # address it runs at; the code translated so far goes (it was made without the
            # split's faults)
            v.page_kind.clear()
            v.image.reencode_all()
            uc.ctl_flush_tb()
            uc.ctl_set_tlb_mode(UC_TLB_CPU)
            v._hw_paging = True
        v.image.sync()
        cr3 = v.image.cr3(mmu)
        if cr3 is None:
            raise MMUError("paging is on but the vCPU has no shadow root")
        _write_efer(v, ge | EFER_NXE)
        v.set_reg(UC_X86_REG_CR4, g4 | CR4_PAE)
        v.set_reg(UC_X86_REG_CR3, cr3)
        v.set_reg(UC_X86_REG_CR0, g0 | CR0_WP)
        v._hw_cr3 = cr3
        v._hw_root = v.mmu.root
    else:
        v.set_reg(UC_X86_REG_CR0, g0)
        _write_efer(v, ge)
        v.set_reg(UC_X86_REG_CR4, g4)
        v.set_reg(UC_X86_REG_CR3, g3)
        if v._hw_paging:
            uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
            v._hw_paging = False
        v._hw_cr3 = None
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)


def prepare(v) -> None:
    """What must hold before the hardware walks the image again (every emu_start, every
    in-place restart after the core ran): the root reloaded if it was zapped (KVM_REQ_MMU_RELOAD,
    as the fill hook's next hw_fill would), the image synced, the core's TLB flush requests
    carried out (whole, but for an invlpg's own spte: invlpg_flush), the hardware CR3 on the
    current root. Nothing to do (the common case) when nothing is asked, nothing is dirty and
    the root is the one the hardware's CR3 was set for."""
    if not v._hw_paging:
        return
    mmu = v.mmu
    img = v.image
    if not mmu.requests and not img._dirty and mmu.root is v._hw_root:
        return
    if mmu.requests & REQ_MMU_RELOAD:
        mmu.reload_root()
    img.sync()
    if mmu.requests & REQ_ANY_TLB_FLUSH:
        v.service_requests()
    cr3 = img.cr3(mmu)
    if cr3 != v._hw_cr3:
        v.set_reg(UC_X86_REG_CR3, cr3)          # (flushes the TLB)
        v._hw_cr3 = cr3
    v._hw_root = mmu.root


def invlpg_flush(v, va, leaf) -> None:
    """After the core's invlpg of va (``leaf``: va's spte before it): a flush it asked for that
    covers va's spte alone is carried out as a flush of va's page -- the one the guest's
    invlpg, which the CPU executes next, does anyway -- and counted as KVM's flush; any other
    is left to prepare() (whole)."""
    mmu = v.mmu
    r = mmu.requests
    if not r & REQ_TLB_FLUSH_SPTES or r & REQ_TLB_FLUSH or leaf is None:
        return
    if any(s != leaf for s in mmu.flush_sptes):
        return
    mmu.requests &= ~REQ_TLB_FLUSH_SPTES
    mmu.flush_sptes.clear()
    v._walker_page_flush(va)
    v.counters["tlb_flush"] += 1                 # KVM's one flush, however it is carried out


def cr_write(v, crn, value, address) -> None:
    """A guest mov to CR0/CR3/CR4 (from the run loop, the instruction skipped after): the MMU's
    side as the fill adapter does it (counts the exit and, for CR3, the CPU's flush), the
    guest's register, the hardware's."""
    v._shadow_cr_write(crn, value, address)
    if crn == 0:
        v._g_cr0 = value
        e = v._g_efer
        # QEMU cpu_x86_update_cr0: LMA follows PG while LME is set
        if value & CR0_PG and e & EFER_LME:
            e |= EFER_LMA
        elif not value & CR0_PG:
            e &= ~EFER_LMA
        v._g_efer = e
    elif crn == 3:
        v._g_cr3 = value
        if v._hw_paging:
            # paging stays on: only the root changes. prepare() writes the hardware's CR3
            # whatever it held (the slot may be the old root's address): that write flushes
            # the TLB, the flush the guest's mov does
            v._hw_cr3 = v._hw_root = None
            prepare(v)
            return
    else:
        v._g_cr4 = value
    apply_hw(v)
    v.service_requests()
    prepare(v)


def efer_written(v, new) -> None:
    """The guest's wrmsr of EFER (after the MMU's side): the guest's copy and the hardware's
    (with NXE forced); LMA is not writable (QEMU helper_wrmsr)."""
    v._g_efer = (new & ~EFER_LMA) | (v._g_efer & EFER_LMA)
    _write_efer(v, v._g_efer | EFER_NXE)


def insn(v, uc, insn, address) -> bool:
    """The walker's part of the privileged-instruction hook (after the CPU model's checks):
    True when the instruction was dealt with here (skipped or handed to the run loop)."""
    m = insn.mnemonic
    if m == "rdmsr":
        if v.reg(v.reg_id("ecx")) & 0xFFFFFFFF != EFER:
            return False
        value = v._g_efer
        v.set_reg(v.reg_id("rax" if v.bits == 64 else "eax"), value & 0xFFFFFFFF)
        v.set_reg(v.reg_id("rdx" if v.bits == 64 else "edx"), value >> 32)
        v.set_reg(v.R_IP, insn.next_ip)          # exact in a code hook (probe 4e)
        return True
    if m != "mov":
        return False
    dst, src = [s.strip() for s in insn.op_str.split(",")]
    if src.startswith("cr"):
        crn = int(src[2:])
        if crn not in (0, 3, 4):
            return False                          # CR2 is the guest's in the hardware; CR8 too
        value = {0: v._g_cr0, 3: v._g_cr3, 4: v._g_cr4}[crn]
        if v.code_bits() != 64:
            value &= 0xFFFFFFFF
        v.set_reg(v.reg_id(dst), value)
        v.set_reg(v.R_IP, insn.next_ip)
        return True
    if not dst.startswith("cr"):
        return False
    crn = int(dst[2:])
    value = v.reg(v.reg_id(src))
    if v.code_bits() != 64:
        value &= 0xFFFFFFFF
    if crn == 2:
        v._guest_cr2 = value                      # executed by the CPU (its CR2 is the guest's)
        return True
    if crn not in (0, 3, 4):
        return False
    if crn == 3:
        value = v.model_checks.cr3_value(value)   # (PCID no-flush bit 63 not stored)
        if v._hw_paging and v._g_cr0 & CR0_PG:
            # a CR3 switch under paging: carried out in the hook, the instruction skipped by
            # the RIP write (exact for later hooks: probe 4e) -- no emu_start round trip
            cr_write(v, crn, value, address)
            v.set_reg(v.R_IP, insn.next_ip)
            return True
    v.stop = ("emulate", insn.next_ip, lambda: cr_write(v, crn, value, address))
    uc.emu_stop()
    return True


def _allowed_by_spte(v, va, access, leaf=None):
    """(gfn, hpa) when the core's present spte for va allows ``access`` (PFERR bits) through
    its own encoding, the split aside; else None. ``leaf``: (page, index) of va's spte if
    known."""
    mmu = v.mmu
    if leaf is None:
        leaf = shadow_leaf(mmu.root, mmu.root_level, va)
    if leaf is None:
        return None
    sp, idx = leaf
    e = v.image.encode_leaf(sp.spt, idx, transform=False)
    if not e & SPTE_P:
        return None
    if access & pg.PFERR_U and not e & SPTE_U:
        return None
    if access & pg.PFERR_W and not e & SPTE_W:
        return None
    if access & pg.PFERR_FETCH and e & SPTE_NX:
        return None
    hpa = list.__getitem__(sp.spt, idx) & SPTE_FRAME
    return hpa >> 12, hpa


def flip_for(v, va, access, scan=False, leaf=None) -> bool:
    """A fetch from a data frame or a store to a code frame that the spte allows: the frame
    changes state (the fill hook's state machine, VCPU._fill: code frames scanned before they
    run, a store to one drops its translated code first). True if it did. ``scan`` (after a
    fill made a new leaf): a frame that stays code is scanned at va, since it runs there with
    no fetch fault (the interceptor's hooks are per virtual address; the same bytes at the same
    address add nothing). A code frame reached through a spte no fault made (prefetched) is not
    scanned at that address: as in native mode (docs/CPU_MODEL.md)."""
    if not (scan or access & (pg.PFERR_FETCH | pg.PFERR_W)):
        return False
    if leaf is not None and not access & pg.PFERR_FETCH:
        spte = list.__getitem__(leaf[0].spt, leaf[1])
        if (spte & SPTE_FRAME) >> 12 not in v.page_kind:
            return False                         # a data access to a data frame: nothing
    got = _allowed_by_spte(v, va, access, leaf)
    if got is None:
        return False
    gfn, hpa = got
    state = v.page_kind.get(gfn, _DATA)
    uc = v.uc
    page = va & ~0xFFF
    if access & pg.PFERR_FETCH and state == _DATA:
        v._flip(gfn, _CODE)
        v.walker_stats["flips_code"] += 1
        # the scan's new hooks need no retranslation: a data frame has no translated code (it
        # went, by physical address, when the frame last became data)
        v.interceptor.on_exec_fill(page, gfn, v.host_mem.read(hpa, 4096))
    elif access & pg.PFERR_W and state == _CODE:
        # its translated code goes first, while the frame is still executable: QEMU finds it
        # through a fetch translation and skips the invalidation if that is refused (the fill
        # hook's pitfall, VCPU._fill)
        uc.ctl_remove_cache(page, page + 0x1000)
        v._flip(gfn, _DATA)
        v.walker_stats["flips_data"] += 1
    else:
        if scan and state == _CODE:
            v.interceptor.on_exec_fill(page, gfn, v.host_mem.read(hpa, 4096))
        return False
    v.image.frame_changed(gfn)
    v.image.sync()
    # the TLB may hold the frame with the rights it just lost (W of a data frame, X of a code
    # frame): not a KVM flush, not counted
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    return True


def _restart(v, access) -> None:
    """The faulting instruction runs again in the same emu_start (probe 2). While instructions
    are counted (--max-insns), one whose data access faulted was counted before it ran and is
    counted again: it has not retired (VCPU._restarted); a fetch fault comes before the
    block runs."""
    if v._counting is not None and not access & pg.PFERR_FETCH:
        v._restarted()
    v.set_reg(UC_X86_REG_CR2, v._guest_cr2)
    oe = v._live_oe
    if oe is not None:
        oe.value = -1                            # (cpustate.clear_old_exception, in place)
    else:
        v.cpustate.clear_old_exception()
    v.walker_stats["restarts"] += 1


def page_fault(v, uc) -> None:
    """A #PF the hardware raised walking the image (UC_HOOK_INTR)."""
    va = v.reg(UC_X86_REG_CR2)
    ec = v._live_ec.value if v._live_ec is not None else v.cpustate.error_code()
    access = ec & _PFERR
    if v._harvest_each_exit:
        v.image.harvest_ad()
    if ec & pg.PFERR_P and flip_for(v, va, access):      # (a not-present fault: no spte)
        _restart(v, access)
        return
    v.walker_stats["shadow_pf"] += 1
    mmu = v.mmu
    kind, addr, _perms, vector, error_code = mmu.hw_fill(va, access, v._rmw_read)
    if kind == FILL_OK or kind == FILL_TRACKED:
        # the leaf hw_fill went through (unless prepare reloads the root)
        leaf = None if mmu.requests & REQ_MMU_RELOAD else mmu.filled_leaf
        prepare(v)
        # the new spte's frame may be in the wrong state for this access
        flip_for(v, va, access, scan=True, leaf=leaf)
        _restart(v, access)
        return
    prepare(v)
    if kind == FILL_GUEST_FAULT:
        v.pending_fault = (vector, error_code, va if vector == VEC_PF else None)
        v._hw_fault_rip = v.rip()
    elif (kind == FILL_NO_MEMORY and addr & ~0xFFF in v.mmio_pages
          and not access & pg.PFERR_FETCH):
        # a device's page: the instruction runs again under the fill hook (module docstring)
        _restart(v, access)
        v.mmio_fallback = True
    else:
        v.pending_fault = ("nomem", va, addr)
        v._hw_fault_rip = v.rip()
    uc.emu_stop()


def begin_fallback(v, pc) -> int:
    """Before the emu_start that runs the instruction at pc under the fill hook (an MMIO access
    under paging): the TLB switches to the fill hook, which then also takes the faults (the
    hardware registers stay the walker's: the fill hook reads the guest's paging context from
    the core). Returns the address the step ends at: one exact step, as measured on Unicorn
    2.1.4 (the cached block at pc dropped first, else it ignores ``until``)."""
    end = v._decode_at(pc).next_ip
    uc = v.uc
    uc.ctl_remove_cache(pc, pc + 1)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    v._hw_paging = False
    v.fallback_flips = []
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    v.walker_stats["fallbacks"] += 1
    return end


def end_fallback(v, pc, end) -> None:
    """After that step: the walker again. The one-instruction block made for the step (and any
    block at its end address) is dropped, frames the fill hook flipped between code and data
    are re-encoded in the image, and the TLB the fill hook filled is dropped (its entries were
    made without the code/data split's faults the walker relies on)."""
    v.mmio_fallback = False
    uc = v.uc
    uc.ctl_remove_cache(pc, pc + 1)
    uc.ctl_remove_cache(end, end + 1)
    uc.ctl_set_tlb_mode(UC_TLB_CPU)
    v._hw_paging = True
    flips, v.fallback_flips = v.fallback_flips, None
    for gfn in flips:
        v.image.frame_changed(gfn)
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
