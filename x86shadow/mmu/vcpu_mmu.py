"""Per-vCPU shadow-MMU state and entry points (KVM's ``struct kvm_mmu`` + ``vcpu->arch``): the
paging context, the root, requests (``KVM_REQ_*``), the policy's per-vCPU state, and the calls a
CPU adapter (or a test with a bytearray) makes:

* ``set_context(ctx)`` whenever CR0/CR3/CR4/EFER change (root switch, like KVM's mmu reload);
* ``hw_fill(va, access)`` where the hardware would walk the (shadow) page tables on a TLB miss: it
  walks our shadow tables and, on a miss or missing right, runs the shadow page-fault handler
  (``page_fault``) -- which walks the guest tables, sets guest A/D bits, builds shadow pages and
  write-protects the guest tables it shadows -- exactly the round trip of a KVM shadow #PF exit.
  It returns a ``Fill`` value; work the CPU must do (flush its TLB) is left in ``requests``;
* ``write_fault.handle_trapped_write`` for a store that hit a write-tracked frame;
* ``invlpg(va)``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from .. import events as ev
from .. import paging as pg
from ..exits import REASON_EXCEPTION, count_exit
from ..emulate.decode import decode, is_control_transfer
from ..faults import VEC_PF, Fault, GuestCrash
from .pages import PaeRoot, prefetch_invalid_gpte
from .shadow_walk import shadow_leaf
from .spte import (PERM_R, PERM_W, PERM_X, SPTE_A, SPTE_D, SPTE_FRAME, SPTE_NX, SPTE_P, SPTE_U,
                   SPTE_W, spte_pfn)
from .requests import OUTSIDE_GUEST_MODE, REQ_MMU_SYNC
from .vm_mmu import REQ_MMU_RELOAD, REQ_TLB_FLUSH, MMUError

# kinds of Fill
FILL_OK = 0            # map addr (host address of the page) with perms
FILL_TRACKED = 1       # a write to a write-tracked frame: route the store to the write trap
FILL_GUEST_FAULT = 2   # inject vector / error_code into the guest
FILL_NO_MEMORY = 3     # the translation points outside guest RAM (addr: the guest-physical address)

ACC_ALL = pg.ACC_X | pg.ACC_W | pg.ACC_U
PTE_PREFETCH_NUM = 8   # arch/x86/kvm/mmu/mmu.c (Linux 2.6.36 .. 6.x)
_RWX = PERM_R | PERM_W | PERM_X


class Fill(NamedTuple):
    """What a TLB fill produced."""
    kind: int
    addr: int = 0
    perms: int = 0
    vector: int = 0
    error_code: int = 0


_new_fill = tuple.__new__        # Fill without the NamedTuple constructor (the fill's hot path)
_FIXED = Fill(FILL_OK)        # page_fault: the shadow mapping was built; walk it again
_TRACKED = Fill(FILL_TRACKED)
_RETRY = Fill(FILL_OK, 1)     # page_fault: raced an invalidation, nothing installed; again


def walk_translate(mem, ctx, va, access) -> int:
    """Guest-physical address of va through the guest tables, as the CPU would translate it for
    an access made on the guest's behalf (exception delivery, decoding); raises Fault (#PF)."""
    w = pg.walk(mem, ctx, va, access)
    if not w.ok:
        raise Fault(VEC_PF, w.error_code, va)
    if not mem.contains(w.gpa):
        raise GuestCrash(f"guest-physical address {w.gpa:#x} is outside RAM")
    return w.gpa


def read_guest_virt(mem, translate, va, n, user=False) -> bytes:
    """n bytes at guest-virtual va, page by page through ``translate(va, access) -> address``."""
    out = b""
    while n:
        chunk = min(n, 0x1000 - (va & 0xFFF))
        out += mem.read(translate(va, pg.PFERR_U if user else 0), chunk)
        va, n = va + chunk, n - chunk
    return out


def decode_guest_virt(read_virt, rip, bits):
    """The instruction at rip, read with ``read_virt(va, n)``; if the 15 bytes after rip run into
    an unmapped page, the bytes up to the page end (None if nothing can be read or decoded)."""
    try:
        code = read_virt(rip, 15)
    except (Fault, GuestCrash):
        try:
            code = read_virt(rip, 0x1000 - (rip & 0xFFF))
        except (Fault, GuestCrash):
            return None
    return decode(code, rip, bits)


def _no_rip():
    return None                 # a sans-CPU MMU (tests) knows no RIP


class VcpuMmu:
    __slots__ = ("vm", "id", "mem", "counters", "events", "policy", "policy_state",
                 "write_fault_state", "ctx", "fmt", "root", "root_level", "pdpt_gfn", "requests",
                 "guest_rip", "oos", "tlb_pfns", "flush_hw_tlb", "retrying", "mode",
                 "tlb_record", "flush_sptes", "filled_leaf", "write_removed")

    def __init__(self, vm, vcpu_id: int = 0):
        self.vm = vm
        self.id = vcpu_id
        self.mem = vm.mem
        self.counters = vm.counters
        self.events = vm.events
        self.policy = vm.policy
        self.policy_state = vm.policy.new_state()        # flood counters, last_pte_updated, ...
        from .write_fault import WriteFaultState
        self.write_fault_state = WriteFaultState()       # the loop breaker's memory
        self.ctx = pg.PagingContext(pg.Mode.OFF, 0)
        self.fmt = None                                  # guest format of ctx (None: paging off)
        self.root = None                                 # ShadowPage (4-level) / PaeRoot / None
        self.root_level = 0
        self.pdpt_gfn = None                             # PAE: frame of the PDPT in use (tracked)
        self.requests = 0                                # REQ_* bits
        self.guest_rip = _no_rip                         # the CPU adapter's RIP reader (traces)
        self.oos = None                                  # xen-oos: this vCPU's out-of-sync table
        # with a host memory manager: host pfns a fill handed to the CPU since its TLB was last
        # flushed (what its TLB may still map; the audit checks no such page is freed)
        self.tlb_pfns = None if vm.host is None else {}
        self.flush_hw_tlb = self._flush_model_tlb        # the CPU adapter's "flush my TLB now"
        self.retrying = False                            # hw_fill: again after a pf_retry
        self.mode = OUTSIDE_GUEST_MODE                   # vcpu->mode (mmu/requests.py)
        # with --audit and several vCPUs: what the CPU's TLB may hold, virtual page ->
        # (pfn, perms, user), filled by the adapter at every fill, emptied at every flush,
        # a page dropped at invlpg (the audit checks it against the sptes: mmu/audit.py)
        self.tlb_record = None
        # REQ_TLB_FLUSH_SPTES: the leaf sptes ((page, index)) changed since the last flush
        self.flush_sptes = []
        # the leaf spte the last successful hw_fill translated through, (page, index); None
        # when paging is off (the CPU adapter's record for scoped flushes)
        self.filled_leaf = None
        # a TLB flush is owed that takes W away from some spte (write protection, a resync, a
        # rebuilt spte): until the CPU has flushed, a TLB entry may still let stores through to
        # a frame that must trap (the CPU adapter flushes before the guest goes on after a
        # trapped store: VCPU._write_trap); cleared by the adapter at its flush
        self.write_removed = False

    def _flush_model_tlb(self) -> None:
        if self.tlb_pfns:
            self.tlb_pfns.clear()
        if self.tlb_record:
            self.tlb_record.clear()

    def enter_guest(self) -> None:
        """The MMU part of vcpu_enter_guest's request loop (2.6.28 arch/x86/kvm/x86.c:
        KVM_REQ_MMU_RELOAD -> kvm_mmu_unload + kvm_mmu_reload, KVM_REQ_MMU_SYNC ->
        kvm_mmu_sync_roots), for a vCPU about to run after other vCPUs ran (vm_scheduler.py).
        KVM_REQ_TLB_FLUSH stays for the CPU adapter (``VCPU.service_requests``)."""
        if self.requests & REQ_MMU_RELOAD:
            self.reload_root()
        rules = self.policy.unsync
        if self.requests & REQ_MMU_SYNC:
            if rules:
                rules.fault_done(self)                 # the rule set's KVM_REQ_MMU_SYNC
            self.requests &= ~REQ_MMU_SYNC

    # ------------------------------------------------------------------ requests
    def take_requests(self) -> int:
        r = self.requests
        self.requests = 0
        return r

    def request(self, req: int) -> None:
        self.requests |= req

    # ------------------------------------------------------------------ context and roots
    def set_context(self, ctx: pg.PagingContext) -> None:
        """New CR0/CR3/CR4/EFER state: drop the old root, load (or reuse) the new one; the
        policy's out-of-sync rules sync what the guest's TLB flush asks for."""
        rules = self.policy.unsync
        if rules:
            rules.before_root_switch(self)
        self._free_root()
        self.ctx = ctx
        self.fmt = pg.FORMATS.get(ctx.mode)             # None with paging off
        self._alloc_root()
        if rules:
            rules.root_loaded(self, "new root")
        self.requests |= REQ_TLB_FLUSH
        if ev.EXIT in self.events.subs:
            self.events.emit(ev.EXIT)

    def _alloc_root(self) -> None:
        ctx = self.ctx
        vm = self.vm
        self.requests &= ~REQ_MMU_RELOAD
        if ctx.mode == pg.Mode.OFF:
            self.root, self.root_level = None, 0
            return
        if ctx.mode == pg.Mode.PAE:
            self.pdpt_gfn = (ctx.cr3 & 0xFFFFFFE0) >> 12
            vm.track_add(self.pdpt_gfn)
        if ctx.mode == pg.Mode.LONG:
            sp = vm.get_page(ctx, ctx.cr3 >> 12 & 0xFFFFFFFFFF, 0, 4, False, ACC_ALL, self)
            sp.root_count += 1
            self.root, self.root_level = sp, 4
            return
        root = PaeRoot()
        if vm.image is not None:
            vm.image.page_created(root)
        for i in range(4):
            if ctx.mode == pg.Mode.PAE:
                pdpte = ctx.pdptes[i]
                if not pdpte & pg.PTE_P:
                    continue
                gfn = (pdpte & 0x000F_FFFF_FFFF_F000) >> 12
            else:
                gfn = (ctx.cr3 & 0xFFFFF000) >> 12
            sp = vm.get_page(ctx, gfn, i << 30, 2, False, ACC_ALL, self)
            sp.root_count += 1
            vm.link(root, i, sp)
        self.root, self.root_level = root, 3

    def _free_root(self) -> None:
        if self.pdpt_gfn is not None:
            self.vm.track_remove(self.pdpt_gfn)
            self.pdpt_gfn = None
        root = self.root
        if root is None:
            return
        if isinstance(root, PaeRoot):
            for i in range(4):
                sp = root.children[i]
                if sp is not None:
                    sp.root_count -= 1
                    sp.parents.discard((root, i))
                    root.children[i] = None
                    root.spt[i] = 0
            if self.vm.image is not None:
                self.vm.image.page_gone(root)
        else:
            root.root_count -= 1
        self.root = None

    def reload_root(self) -> None:
        """KVM_REQ_MMU_RELOAD: a page of the root was zapped; build the root again."""
        self._free_root()
        self._alloc_root()
        if self.policy.unsync:
            self.policy.unsync.root_loaded(self, "root reload")      # kvm_mmu_load
        self.requests |= REQ_TLB_FLUSH

    def _refresh_pdptes(self) -> bool:
        """The guest wrote its PDPT. Real CPUs (and KVM) keep using the PDPTEs cached at the last
        CR3 load, but Unicorn's own walker -- our guest-visible reference, --mmu native -- reads
        them from memory at every TLB miss. To give the same guest-visible result the PDPT frame
        is write-tracked while it is in use, and a change reloads the root as a CR3 load would."""
        fresh = pg.load_pdptes(self.mem, self.ctx.cr3, strict=False)
        if fresh == tuple(self.ctx.pdptes):
            return False
        self._free_root()
        self.ctx = dataclasses.replace(self.ctx, pdptes=fresh)
        self._alloc_root()
        self.requests |= REQ_TLB_FLUSH
        if self.events.tracing:
            self.events.emit(ev.RELOAD_PDPTES, cr3=self.ctx.cr3, pdptes=list(fresh))
        return True

    # ------------------------------------------------------------------ the "hardware" walk
    def hw_fill(self, va: int, access: int, rmw_read=None) -> Fill:
        """TLB miss at va with access (PFERR_W/U/FETCH bits): walk the shadow tables as the MMU
        hardware would, setting spte A/D; on a miss run the shadow page-fault handler.

        ``rmw_read(va)``: a callable the CPU adapter passes; called (rarely) for a read that hits
        a shadowed guest page table, it answers whether the read is the first half of a
        read-modify-write (``lock btr``...) that x86 translates for writing at this page.
        Hardware translates such an access once, for writing, so it faults as a write without
        setting the spte's A bit -- and so do we."""
        if self.requests & REQ_MMU_RELOAD:
            self.reload_root()
        root = self.root
        if root is None:
            gpa = va & 0xFFFFFFFF_FFFFF000
            p = self.vm.gfn_to_pfn(gpa >> 12, bool(access & pg.PFERR_W))
            if p is None:
                return Fill(FILL_NO_MEMORY, gpa)
            if self.tlb_pfns is not None:
                self.tlb_pfns[p.pfn] = self.counters["exits"]
            self.filled_leaf = None
            return Fill(FILL_OK, p.pfn << 12, _RWX if p.writable else PERM_R | PERM_X)
        attempts = retries = 0
        while True:
            leaf = shadow_leaf(root, self.root_level, va)
            if leaf is not None:
                sp, idx = leaf
                spte = sp.spt[idx]
                ok = True
                if access & pg.PFERR_U and not spte & SPTE_U:
                    ok = False
                elif access & pg.PFERR_W and not spte & SPTE_W:
                    ok = False
                elif access & pg.PFERR_FETCH and spte & SPTE_NX:
                    ok = False
                elif (not access & (pg.PFERR_W | pg.PFERR_FETCH) and rmw_read is not None
                      and sp.gfns[idx] in self.vm.sps_by_gfn and rmw_read(va)):
                    # translated for writing: it faults only if the spte is not writable (an
                    # out-of-sync table's spte is: the access goes through, setting A and D)
                    access |= pg.PFERR_W
                    ok = bool(spte & SPTE_W)
                if ok:
                    spte |= SPTE_A
                    if access & pg.PFERR_W:
                        spte |= SPTE_D
                    sp.spt[idx] = spte
                    perms = PERM_R
                    if spte & SPTE_W and spte & SPTE_D:
                        perms |= PERM_W
                    if not spte & SPTE_NX:
                        perms |= PERM_X
                    if self.tlb_pfns is not None:
                        self.tlb_pfns[spte_pfn(spte)] = self.counters["exits"]
                    if retries:
                        self.retrying = False
                    self.filled_leaf = leaf
                    return _new_fill(Fill, (FILL_OK, spte & SPTE_FRAME, perms, 0, 0))
            r = self.page_fault(va, access)
            if r is _RETRY:
                # the fault raced a host invalidation and installed nothing: the guest faults
                # again (RET_PF_RETRY)
                retries += 1
                if retries > 64:
                    self.retrying = False
                    raise MMUError(f"shadow fault at {va:#x} retried 64 times: an invalidation "
                                   "never ends")
                self.retrying = True
                root = self.root
                continue
            self.retrying = False
            kind = r.kind
            if kind == FILL_TRACKED:
                leaf = shadow_leaf(self.root, self.root_level, va)
                if leaf is not None:
                    spte = leaf[0].spt[leaf[1]]
                    if self.tlb_pfns is not None:
                        self.tlb_pfns[spte_pfn(spte)] = self.counters["exits"]
                    self.filled_leaf = leaf
                    return Fill(FILL_TRACKED, spte & SPTE_FRAME,
                                PERM_R | PERM_W | (0 if spte & SPTE_NX else PERM_X))
                kind = FILL_OK                  # (a sync on the way out dropped it: again)
            if kind != FILL_OK:
                return r
            root = self.root
            attempts += 1
            if attempts == 4:
                raise MMUError(f"shadow fault at {va:#x} (access {access:#x}) not fixed after 4 "
                               "attempts")

    # ------------------------------------------------------------------ the shadow page fault
    def page_fault(self, va: int, access: int) -> Fill:
        """FNAME(page_fault): walk the guest tables; inject, or build the shadow mapping.

        A fault that ends in FILL_TRACKED (a write to a write-protected guest page table) is not
        counted here: the trapped store that follows is the exit (docs/COUNTERS.md wp_faults)."""
        policy = self.policy
        vm = self.vm
        c = self.counters
        events = self.events
        if events.tracing:
            events.guest_runs()      # the entry before this exit, ahead of the fix's records
        for _ in range(3):
            w = pg.walk(self.mem, self.ctx, va, access)
            if w.ok and w.set_dirty and policy.walker_dirty_is_pte_write:
                pte_gpa = w.pte_gpa[w.level]
                if pte_gpa >> 12 in vm.sps_by_gfn:
                    # 2.6.25's walker sets D with a cmpxchg and calls kvm_mmu_pte_write itself
                    self.pte_write(pte_gpa, self.fmt.pte_size)
            if not w.ok:
                c["pf_taken"] += 1
                c["pf_guest"] += 1
                rip = self.guest_rip() if events.tracing else None     # one register read
                count_exit(c, events, REASON_EXCEPTION, rip, vector=14, address=va,
                           error_code=access)
                if events.tracing:
                    events.emit(ev.PAGE_FAULT, address=va, error_code=access, result="inject",
                                guest_error_code=w.error_code, vector=w.vector, rip=rip)
                policy.on_guest_fault(self, self.policy_state)
                return Fill(FILL_GUEST_FAULT, 0, 0, w.vector, w.error_code)
            gfn = w.gpa >> 12
            notifier = vm.notifier
            if notifier is None:
                pfn = gfn if gfn < vm.ram_frames else None
                host_writable = True
            else:
                # FNAME(page_fault): mmu_seq snapshot before gfn_to_pfn, re-checked under
                # mmu_lock (2.6.27 mmu_notifier_retry; 6.18 kvm_mmu_faultin_pfn +
                # is_page_fault_stale)
                seq = notifier.seq
                if vm.point is not None:
                    vm.point("after_seq_snapshot", self)
                p = vm.gfn_to_pfn(gfn, bool(access & pg.PFERR_W))
                if vm.point is not None:
                    vm.point("after_gfn_to_pfn", self)
                pfn, host_writable = p if p is not None else (None, False)
            if pfn is None:
                return Fill(FILL_NO_MEMORY, w.gpa)
            if (access & pg.PFERR_W and not w.pte_access & pg.ACC_W and not self.ctx.wp
                    and not access & pg.PFERR_U):
                # CR0.WP=0: a supervisor write to a read-only page is allowed; the spte is made
                # writable and supervisor-only (a later user access faults and is re-checked;
                # under SMEP not executable either) -- here, before the fetch, so that a direct
                # page shadowing a large guest page gets this access in its role (Linux 6.x
                # arch/x86/kvm/mmu/paging_tmpl.h FNAME(page_fault), before FNAME(fetch);
                # 2.6.25 did it in mmu_set_spte only, and two clean large ptes of one frame
                # then shared a writable direct page: the second one's D bit was never set --
                # kvm-unit-tests access.c check_large_pte_dirty_for_nowp, added with the KVM
                # fix by Xiao Guangrong in Dec 2012, kvm-unit-tests commit fcead254)
                w.pte_access = (w.pte_access | pg.ACC_W) & ~pg.ACC_U
                if self.ctx.smep:
                    w.pte_access &= ~pg.ACC_X
            if notifier is not None:
                with vm.mmu_lock.held("fault"):
                    if notifier.retry(seq, gfn):
                        # an exit like any fault (pf_taken), fixed by nobody: the guest
                        # re-executes and faults again
                        c["pf_taken"] += 1
                        c["pf_retry"] += 1
                        count_exit(c, events, REASON_EXCEPTION,
                                   self.guest_rip() if events.tracing else None, vector=14,
                                   address=va, error_code=access)
                        if events.tracing:
                            events.emit(ev.PF_RETRY, address=va, gfn=gfn, mmu_seq=seq,
                                        now=notifier.seq, in_progress=notifier.count)
                        return _RETRY
                    r = self._fetch(va, w, access, pfn, host_writable)
            else:
                r = self._fetch(va, w, access, pfn)
            if r is not None:
                break
            # a guest pte changed while we write-protected its table (FNAME(fetch) returned NULL)
        else:
            raise MMUError(f"guest page tables keep changing under the fault at {va:#x}")
        if policy.unsync:
            policy.unsync.fault_done(self)
        if r is _TRACKED:
            if events.tracing:
                events.emit(ev.PAGE_FAULT, address=va, error_code=access, result="write-protected",
                            gpa=w.gpa, rip=self.guest_rip())
            return r
        c["pf_taken"] += 1
        c["pf_fixed"] += 1
        rip = self.guest_rip() if events.tracing else None             # one register read
        count_exit(c, events, REASON_EXCEPTION, rip, vector=14, address=va, error_code=access)
        policy.on_fault_fixed(self, self.policy_state)
        if events.tracing:
            events.emit(ev.PAGE_FAULT, address=va, error_code=access, result="fixed", gpa=w.gpa,
                        rip=rip)
        if ev.EXIT in events.subs:
            events.emit(ev.EXIT)
        return r

    def _fetch(self, va, w, access, pfn, host_writable=True):
        """FNAME(fetch): link shadow pages down to the leaf and install the leaf spte."""
        if self.requests & REQ_MMU_RELOAD:
            self.reload_root()        # a root was zapped on the way here (flood)
        vm = self.vm
        fmt = self.fmt
        glevel = w.level                 # guest leaf level (1, 2 = 2M/4M, 3 = 1G)
        acc = ACC_ALL
        node = self.root
        level = self.root_level
        if level == 3:
            # PAE root: entries were linked at CR3 load; a 2-level guest's directory is always there
            i = (va >> 30) & 3
            node = node.children[i]
            if node is None:
                raise MMUError(f"no shadow for PDPTE {i} although the guest walk succeeded")
            level = 2
        # the walk of shadow_walk.shadow_leaf, creating what is missing on the way (for speed
        # written out here, as the fill's walk is: this runs on every shadow fault)
        while True:
            node.write_flooding_count = 0     # modern KVM: a guest fault walked through this page
            idx = (va >> (12 + 9 * (level - 1))) & 511
            if level == 1:
                break
            child = node.children[idx]
            if level - 1 < glevel:
                # A guest large page: a direct shadow page of 4 KiB sptes, whose role has no W
                # while the guest's large pte is clean (2.6.25 paging_tmpl.h FNAME(fetch):
                # "if (!is_dirty_pte(walker->ptes[level - 1])) access &= ~ACC_WRITE_MASK";
                # Linux 6.x: FNAME(walk_addr_generic)'s protect_clean_gpte on a read fault,
                # direct_access = gw->pte_access). A direct page of the other access is
                # unlinked (mmu.c validate_direct_spte, Linux 3.x-6.x): without both, a
                # writable spte built under a dirty pte is reused under a clean one, and a
                # store never sets the guest's D bit (found by x86shadow diff,
                # guestcode/smc_stores.asm)
                direct_access = w.pte_access if w.dirty else w.pte_access & ~pg.ACC_W
                if child is not None and child.role.access != direct_access:
                    vm.drop_spte(node, idx)           # (requests the TLB flush)
                    child = None
            if child is None:
                if level - 1 < glevel:
                    span = 1 << (9 * (level - 1))
                    gfn = (w.gpa >> 12) & ~(span - 1)
                    child = vm.get_page(self.ctx, gfn, va, level - 1, True, direct_access, self)
                else:
                    gl = level        # the guest entry at this level points to the table we shadow
                    for L in range(w.root_level, gl - 1, -1):   # rights of the entries above it
                        if fmt.carries_rights(L):
                            acc &= fmt.entry_access(w.ptes[L])
                    table_gfn = fmt.frame(gl, w.ptes[gl]) >> 12
                    child = vm.get_page(self.ctx, table_gfn, va, level - 1, False, acc, self)
                    rules = self.policy.unsync
                    if rules:
                        rules.linking(self, child, level)
                    # the guest pte may have changed while we write-protected the table
                    cur = fmt.read_pte(self.mem, w.pte_gpa[gl])
                    if (cur | pg.PTE_A | pg.PTE_D) != (w.ptes[gl] | pg.PTE_A | pg.PTE_D):
                        return None
                vm.link(node, idx, child)
            node = child
            level -= 1
        # the walk's pte_access already combines every level's rights (a subset of the role's,
        # which combines the levels above the table), plus the CR0.WP=0 write of page_fault:
        # passed as it is (Linux 6.x FNAME(fetch): mmu_set_spte(..., gw->pte_access, ...))
        emulate = vm.set_spte(self, node, idx, w.gpa >> 12, w.pte_access,
                              bool(w.dirty), bool(access & pg.PFERR_W),
                              bool(access & pg.PFERR_U), pfn=pfn,
                              gpte=None if node.role.direct else w.ptes[1],
                              host_writable=host_writable)
        if node.unsync:
            self.policy.unsync.leaf_installed(self, node, idx, w.ptes[1])
        if self.policy.fault_prefetch:
            self._pte_prefetch(node, idx)
        return _TRACKED if emulate else _FIXED

    def _pte_prefetch(self, sp, sidx) -> None:
        """FNAME(pte_prefetch) (arch/x86/kvm/mmu/paging_tmpl.h, Linux 2.6.36 commit 957ed9effd80
        "KVM: MMU: prefetch ptes when intercepted guest #PF" through 6.x): after a shadow fault
        installed a 4 KiB leaf, build speculative sptes for the not-present entries of its
        aligned block of PTE_PREFETCH_NUM (8) from the guest ptes there, stopping at the first
        guest pte that may not be prefetched (FNAME(prefetch_invalid_gpte): not present, not
        accessed, reserved bits) or whose page is not present in a memslot
        (FNAME(prefetch_gpte): gfn_to_pfn_memslot_atomic). Skipped while an MMU-notifier
        invalidation is in progress (mmu_invalidate_in_progress). A direct page (a guest large
        page) prefetches the consecutive gfns of its block (__direct_pte_prefetch,
        direct_pte_prefetch_many) with the page's own rights. The sptes are speculative:
        mmu_set_spte with no fault, so a shadowed frame gets no W rather than going out of sync
        (mmu_try_to_unsync_pages: "if (prefetch) return -EEXIST"). Not modelled: dirty logging
        (gfn_to_memslot_dirty_bitmap refuses a writable prefetch into a dirty-logged slot; there
        is none here)."""
        if sp.role.level != 1:
            return
        vm = self.vm
        if vm.notifier is not None and vm.notifier.count:
            return
        base = sidx & ~(PTE_PREFETCH_NUM - 1)
        spt = sp.spt
        if sp.role.direct:
            access = sp.role.access
            for i in range(base, base + PTE_PREFETCH_NUM):
                if i == sidx or spt[i] & SPTE_P:
                    continue
                gfn = sp.gfn + i
                p = vm.gfn_to_pfn(gfn, atomic=True)
                if p is None:
                    return       # (direct_pte_prefetch_many: no slot or no page -> stop)
                vm.set_spte(self, sp, i, gfn, access, True, False, False, speculative=True,
                            pfn=p.pfn, host_writable=p.writable)
            return
        # (written for speed: this runs after every shadow fault, and most stop at the first
        # candidate)
        for first in range(base, base + PTE_PREFETCH_NUM):
            if first != sidx and not spt[first] & SPTE_P:
                break
        else:
            return                       # the rest of the block is present already
        fmt = self.fmt
        ctx = self.ctx
        mem = vm.mem
        size = fmt.pte_size
        gpa = sp.gpte_gpa(first)
        role_access = sp.role.access
        for i in range(first, base + PTE_PREFETCH_NUM):
            if i != sidx and not spt[i] & SPTE_P:
                gpte = fmt.read_pte(mem, gpa)
                if prefetch_invalid_gpte(ctx, gpte):
                    return
                gfn = fmt.leaf_frame(gpte) >> 12
                p = vm.gfn_to_pfn(gfn, atomic=True)
                if p is None:
                    return
                vm.set_spte(self, sp, i, gfn, role_access & fmt.entry_access(gpte, ctx.nxe),
                            bool(gpte & pg.PTE_D), False, False, speculative=True, pfn=p.pfn,
                            gpte=gpte, host_writable=p.writable)
            gpa += size

    def other_exit(self) -> None:
        """An exit that is neither a shadow fault nor a trapped write (I/O, CR/MSR write, invlpg,
        an exception delivered): the policy may close what it keeps open (Xen's emulate-ahead)."""
        self.policy.on_other_exit(self, self.policy_state)

    # ------------------------------------------------------------------ invlpg and pte writes
    def invlpg(self, va: int) -> None:
        """The guest invalidated va. Every write to a synced guest table is trapped and applied
        to the shadow at once, so those sptes are already right: like KVM before out-of-sync
        pages (2.6.25 had no invlpg hook at all) and Xen 3.3 without OOS, nothing is dropped.
        What the policy does besides (resync the spte of an out-of-sync page, drop the leaf
        spte...) is its ``invlpg`` hook. (The CPU's TLB entry goes: the CPU executes the invlpg
        itself.)"""
        self.counters["invlpg"] += 1
        if self.tlb_record:
            self.tlb_record.pop(va >> 12, None)        # the CPU drops its own entry
        if self.events.tracing:
            self.events.emit(ev.INVLPG, address=va)
        self.policy.invlpg(self, va)
        if ev.EXIT in self.events.subs:
            self.events.emit(ev.EXIT)

    def pte_write(self, gpa: int, size: int, insn=None) -> None:
        """The one pte-write path: the store [gpa, gpa+size) to a write-tracked frame has been
        completed in guest RAM; bring the shadow pages of that frame up to date. How (drop the
        affected sptes, re-install them, zap the whole page as misaligned or flooded) is the
        policy's (x86shadow.policies)."""
        gfn, offset = gpa >> 12, gpa & 0xFFF
        vm = self.vm
        for v in (vm.vcpus if len(vm.vcpus) > 1 else (self,)):
            if gfn == v.pdpt_gfn:
                base = v.ctx.cr3 & 0xFE0
                if offset < base + 32 and offset + size > base:
                    v._refresh_pdptes()
        if gfn not in vm.sps_by_gfn:
            return
        self.counters["mmu_pte_write"] += 1
        self.policy.pte_write(self, self.policy_state, gpa, size, insn)
        if vm.invalid_list:
            vm.commit_zap()
        if ev.EXIT in self.events.subs:
            self.events.emit(ev.EXIT)

    # ------------------------------------------------------------------ guest memory, sans CPU
    def translate(self, va, access) -> int:
        """Guest-physical address of va for an access made on the guest's behalf: from the spte
        a TLB hit would use (a present spte with the rights asked for), else the guest walk."""
        if self.root is not None:
            leaf = shadow_leaf(self.root, self.root_level, va)
            if leaf is not None:
                sp, idx = leaf
                spte = sp.spt[idx]
                if ((not access & pg.PFERR_W or spte & SPTE_W and spte & SPTE_D)
                        and (not access & pg.PFERR_U or spte & SPTE_U)):
                    return (sp.gfns[idx] << 12) | (va & 0xFFF)
        return walk_translate(self.mem, self.ctx, va, access)

    def read_virt(self, va, n, user=False) -> bytes:
        return read_guest_virt(self.mem, self.translate, va, n, user)

    def decode_at(self, rip, bits):
        """The instruction at rip (None if it cannot be read or decoded)."""
        if (rip & 0xFFF) <= 0x1000 - 15 and self.root is not None:
            # the instruction was just fetched, so its shadow mapping exists: read it from there
            # (a Python guest walk costs several times more)
            leaf = shadow_leaf(self.root, self.root_level, rip)
            if leaf is not None:
                hpa = (leaf[0].spt[leaf[1]] & SPTE_FRAME) | (rip & 0xFFF)
                host_mem = self.vm.host_mem
                if hpa + 15 <= host_mem.size:
                    return decode(host_mem.read(hpa, 15), rip, bits)
        return decode_guest_virt(self.read_virt, rip, bits)

    def next_instructions(self, insn, n):
        """Addresses of up to n instructions after insn in program order (fall-through; a control
        transfer is the last one taken)."""
        out = []
        d = insn
        for _ in range(n):
            if d is None or is_control_transfer(d):
                break
            d = self.decode_at(d.address + d.size, d.bits)
            if d is None:
                break
            out.append(d.address)
        return out
