"""VM-wide shadow-MMU state (KVM's ``struct kvm_arch`` MMU part): shadow pages hashed by (gfn,
role), the rmap, write tracking of guest page tables, memslots, and the two-step zap.

Structure follows KVM's pre-unsync shadow MMU (arch/x86/kvm/mmu.c, 2.6.25-2.6.27):
``kvm_mmu_get_page`` write-protects every frame it starts shadowing, ``mmu_set_spte`` refuses W on
write-tracked frames and on clean (D=0) guest ptes, ``kvm_mmu_zap_page`` unlinks children and
parents. Zapping is two steps, as in later KVM (``kvm_mmu_prepare_zap_page`` puts the page on an
invalid list, ``kvm_mmu_commit_zap_page`` flushes every vCPU's TLB, then frees): the place where
deferred and lockless freeing plug in.

Per-vCPU state (paging context, roots, requests, policy state) lives in ``vcpu_mmu.VcpuMmu``.
"""
from __future__ import annotations

import time
from collections import defaultdict

from .. import events as ev
from .. import paging as pg
from ..counters import new_counters
from ..memory.memslots import Memslots
from . import unsync
from .pages import ENTRIES, Role, ShadowPage
from .requests import (OUTSIDE_GUEST_MODE, REQ_ANY_TLB_FLUSH, REQ_MMU_RELOAD, REQ_TLB_FLUSH,
                       REQ_TLB_FLUSH_SPTES)
from ..memory.guest_phys import GuestPhys
from ..memory.host import Pfn
from .mmu_lock import MmuLock
from .notifiers import KvmNotifier
from .spte import SPTE_A, SPTE_FRAME, SPTE_P, SPTE_W, make_spte
from ..steps import run_steps



_ACC_U, _ACC_W, _ACC_X = pg.ACC_U, pg.ACC_W, pg.ACC_X


class MMUError(Exception):
    """An internal inconsistency (reported, never silently ignored)."""


# Test-only bugs the differential fuzzer must find (tests/test_fuzz.py, docs/FUZZ.md). Each
# is read in exactly one place, named in its description.
PLANTED_BUGS = {
    "stale-spte-after-pte-write":
        "drop_written_sptes keeps the leaf sptes of an emulated guest pte write, so the old "
        "translation stays in the shadow table (the class of bug KVM's mmu_pte_write_zap_pte / "
        "kvm_mmu_pte_write exist to prevent)",
}


class VmMmu:
    __slots__ = ("mem", "counters", "events", "policy", "ram_frames", "memslots", "hash",
                 "sps_by_gfn", "rmap", "write_track", "invalid_list", "vcpus", "next_id",
                 "max_pages", "host", "host_mem", "peek_mem", "notifier", "mmu_lock", "point",
                 "planted_bug", "lockless", "running", "scoped_flushes", "image")

    def __init__(self, mem, counters=None, events=None, policy=None, max_pages=None, host=None,
                 notifiers="modern", break_flush=False, aging=None, planted_bug=None,
                 lockless=None):
        """``mem``: guest RAM (a memory.ram.PhysMem, pfn == gfn). With a host memory manager
        ``host`` (memory.host.HostMM; ``mem`` is then None) guest-physical memory is a
        memory.guest_phys.GuestPhys view over the host's pages, and the MMU registers KVM's
        notifier of era ``notifiers`` on the host's mm, aging as ``aging`` says (mmu/aging.py;
        None: the era's own variant). ``planted_bug``: test-only, a name from PLANTED_BUGS (the
        MMU breaks on purpose so that the differential fuzzer's tests can find it; never set it
        otherwise). ``lockless``: the freeing scheme for lockless shadow walks (mmu/lockless.py
        SCHEMES, or a ``Lockless``); None: no lockless walkers, pages are freed at commit."""
        if planted_bug is not None and planted_bug not in PLANTED_BUGS:
            raise ValueError(f"unknown planted bug {planted_bug!r} (choose from "
                             f"{', '.join(PLANTED_BUGS)})")
        self.planted_bug = planted_bug
        if host is not None:
            mem = GuestPhys(host, Memslots(host.npages), host.npages << 12)
        self.mem = mem
        self.counters = counters if counters is not None else new_counters()
        self.events = events if events is not None else ev.EventBus()
        if policy is None:
            from ..policies.base import Policy
            policy = Policy()
        self.policy = policy
        self.ram_frames = mem.size >> 12
        self.memslots = mem.memslots if host is not None else Memslots(self.ram_frames)
        self.mmu_lock = MmuLock()
        self.host = host
        self.notifier = None
        self.point = None                       # (name, vcpu) -> None: the host schedule's
                                                # named points inside the fault path
        if host is None:
            self.host_mem = self.peek_mem = mem     # pfn == gfn: RAM is the host memory
        else:
            self.peek_mem = GuestPhys(host, self.memslots, mem.size, peek=True)
            self.host_mem = host.pages.phys
            self.notifier = KvmNotifier(self, notifiers, break_flush, aging)
            host.notifiers.append(self.notifier)   # mmu_notifier_register
        self.hash: dict = {}                    # (gfn, role) -> ShadowPage, in creation order
        # insertion-ordered (dicts used as sets), so that every walk over them -- and the trace --
        # is the same from run to run
        self.sps_by_gfn = defaultdict(dict)     # gfn -> {ShadowPage: None}: the non-direct shadows
        self.rmap = defaultdict(dict)           # gfn -> {(ShadowPage, index): None}: leaf sptes
        self.write_track: dict = {}             # gfn -> users that need its writes trapped (shadow
                                                # pages of it, a PAE PDPT in use): KVM's page track
        self.invalid_list: list = []            # prepared zaps waiting for commit
        self.vcpus: list = []
        self.scoped_flushes = False          # flush_leaf_sptes tells the vCPU what changed
        self.running = None                     # the VcpuMmu whose vCPU the host thread runs
                                                # now (vm_scheduler.py; None: one vCPU)
        self.next_id = 0
        # KVM: 2% of RAM pages (KVM_PERMILLE_MMU_PAGES 20), at least 64
        self.max_pages = max_pages or max(64, (self.ram_frames * 20) // 1000)
        if isinstance(lockless, str):
            from .lockless import Lockless
            lockless = Lockless(self, lockless)
        self.lockless = lockless
        self.image = None                       # mmu/spt_image.ShadowTableImage, if attached

    def add_vcpu(self):
        from .vcpu_mmu import VcpuMmu
        v = VcpuMmu(self, len(self.vcpus))
        self.vcpus.append(v)
        return v

    # ------------------------------------------------------------------ requests
    def request_all(self, req: int) -> bool:
        """kvm_make_all_cpus_request: ``req`` on every vCPU; True if another vCPU had to be
        interrupted for it -- one not OUTSIDE_GUEST_MODE (Linux 3.5+ kvm_make_all_cpus_request
        / 6.x kvm_make_vcpus_request_mask and kvm_request_needs_ipi: a KVM_REQUEST_WAIT request
        such as KVM_REQ_TLB_FLUSH IPIs every vCPU whose mode is not OUTSIDE_GUEST_MODE, the
        requester itself excepted)."""
        ipi = False
        me = self.running
        for v in self.vcpus:
            v.requests |= req
            if v is not me and v.mode != OUTSIDE_GUEST_MODE:
                ipi = True
        return ipi

    def flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs (virt/kvm/kvm_main.c, Linux 2.6.x-6.x): KVM_REQ_TLB_FLUSH on
        every vCPU, so every vCPU's TLB is flushed before it next runs the guest (the adapter
        services it at its next fill or entry; vm_scheduler.py before each slice). Counts
        ``remote_tlb_flush`` as KVM does -- ``if (!kvm_arch_flush_remote_tlbs(kvm) ||
        kvm_make_all_cpus_request(kvm, KVM_REQ_TLB_FLUSH)) ++remote_tlb_flush`` -- that is, only
        when another vCPU was interrupted for it (so never with one vCPU)."""
        if self.request_all(REQ_TLB_FLUSH):
            self.counters["remote_tlb_flush"] += 1

    def note_write_removed(self) -> None:
        """Sptes just lost W and a flush of them was requested: every vCPU must flush before
        its guest goes on (VcpuMmu.write_removed)."""
        for v in self.vcpus:
            v.write_removed = True

    def flush_leaf_sptes(self, sptes) -> None:
        """kvm_flush_remote_tlbs after a change to the leaf sptes ``sptes`` ((page, index)
        pairs) alone. The same request as flush_remote_tlbs() for the model (KVM flushes the
        whole TLB); when ``scoped_flushes`` is on (the CPU adapter turns it on for one vCPU
        without a host memory manager, where nothing else depends on the TLB's contents), the
        vCPU is told which sptes changed (REQ_TLB_FLUSH_SPTES), so that the adapter may drop
        only the translations made through them."""
        if not self.scoped_flushes or len(self.vcpus) != 1:
            self.flush_remote_tlbs()
            return
        v = self.vcpus[0]
        if not v.requests & REQ_TLB_FLUSH:
            v.requests |= REQ_TLB_FLUSH_SPTES
            v.flush_sptes.extend(sptes)

    # ------------------------------------------------------------------ host pages
    def gfn_to_pfn(self, gfn, write: bool = False, atomic: bool = False):
        """__gfn_to_pfn_memslot: the host page backing gfn as Pfn(pfn, writable), or None
        outside every memslot. With a host memory manager a swapped-out page is faulted in and
        a write breaks a KSM page's sharing; ``atomic`` (gfn_to_pfn_atomic, what a prefetch
        uses): no fault, None if the page is not present."""
        host = self.host
        if host is None:
            return Pfn(gfn, True) if 0 <= gfn < self.ram_frames else None
        index = self.memslots.gfn_to_index(gfn)
        if index is None:
            return None
        return host.hva_to_pfn(index, write, atomic)

    def pfn_to_gfn(self, pfn):
        """The gfn a host page backs (None: free, or a KSM page shared by several)."""
        host = self.host
        if host is None:
            return pfn if 0 <= pfn < self.ram_frames else None
        tag = host.pages.owner_of(pfn)
        if not isinstance(tag, int):
            return None
        return self.memslots.index_to_gfn(tag)

    def current_pfn(self, gfn):
        """The host pfn backing gfn right now (None: none, or not present); never faults."""
        host = self.host
        if host is None:
            return gfn if 0 <= gfn < self.ram_frames else None
        index = self.memslots.gfn_to_index(gfn)
        return None if index is None else host.current(index)

    def zap_gfn_sptes(self, gfn) -> int:
        """kvm_unmap_rmapp: clear every leaf spte that maps gfn and empty its rmap. No flush
        request: the notifier decides (mmu/notifiers.py)."""
        entries = self.rmap.pop(gfn, None)
        if not entries:
            return 0
        for sp, idx in entries:
            sp.spt[idx] = 0
            sp.gfns[idx] = None
            sp.gptes[idx] = None
        return len(entries)

    def flush_remote_tlbs_now(self) -> None:
        """kvm_flush_remote_tlbs as the notifiers need it: every vCPU's TLB is empty when this
        returns (the CPU adapter flushes now; without one, the model TLB is emptied)."""
        timed = ev.HOST_TIMING in self.events.subs
        t0 = time.perf_counter() if timed else 0.0
        me = self.running
        ipi = False
        for v in self.vcpus:
            v.requests &= ~REQ_ANY_TLB_FLUSH
            v.flush_sptes.clear()
            v.flush_hw_tlb()
            if v is not me and v.mode != OUTSIDE_GUEST_MODE:
                ipi = True
        if ipi:
            self.counters["remote_tlb_flush"] += 1       # kvm_flush_remote_tlbs, as above
        if timed:
            self.events.emit(ev.HOST_TIMING, part="flush", seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ write tracking
    def track_add(self, gfn) -> None:
        """kvm_slot_page_track_add_page: from now on writes to gfn trap."""
        wt = self.write_track
        n = wt.get(gfn, 0) + 1
        wt[gfn] = n
        if n == 1:
            self.write_protect(gfn)
            if self.image is not None:
                self.image.gfn_retracked(gfn)

    def track_remove(self, gfn) -> None:
        n = self.write_track.get(gfn, 0) - 1
        if n < 0:
            raise MMUError(f"write tracking of gfn {gfn:#x} removed more often than added")
        if n:
            self.write_track[gfn] = n
        else:
            del self.write_track[gfn]
            if self.image is not None:
                self.image.gfn_retracked(gfn)

    def is_tracked(self, gfn) -> bool:
        """Writes to gfn must be trapped: it is a shadowed guest page table (or a PDPT in use)."""
        return gfn in self.write_track

    def is_shadowed(self, gfn) -> bool:
        return gfn in self.sps_by_gfn

    def shadow_pages_of(self, gfn):
        return list(self.sps_by_gfn.get(gfn, ()))

    def write_protect(self, gfn) -> None:
        """rmap_write_protect: make every spte that maps gfn read-only."""
        changed = []
        for sp, idx in self.rmap.get(gfn, ()):
            spte = sp.spt[idx]
            if spte & SPTE_W:
                sp.spt[idx] = spte & ~SPTE_W
                changed.append((sp, idx))
        if changed:
            # 2.6.28 kvm_mmu_get_page / 6.x kvm_mmu_alloc_shadow_page -> account_shadowed:
            # rmap_write_protect, then kvm_flush_remote_tlbs
            self.note_write_removed()
            self.flush_leaf_sptes(changed)

    # ------------------------------------------------------------------ shadow pages
    @staticmethod
    def role(ctx, level, direct, access, va=0) -> Role:
        gsize = 4 if ctx.mode == pg.Mode.LEGACY else 8
        quadrant = 0
        if not direct and gsize == 4:
            # kvm_mmu_get_page: which part of the 1024-entry guest table this 512-entry page shadows
            quadrant = (va >> (12 + 9 * level)) & ((1 << level) - 1)
        return Role(level, direct, access, gsize, quadrant, ctx.wp, ctx.smep, ctx.nxe)

    def get_page(self, ctx, gfn, va, level, direct, access, mmu=None) -> ShadowPage:
        """kvm_mmu_get_page: find or create the shadow page for (gfn, role). ``mmu``: the vCPU
        asking (out-of-sync pages of gfn may have to be synced or zapped first)."""
        role = self.role(ctx, level, direct, access, va)
        key = (gfn, role)
        rules = self.policy.unsync
        if rules:
            rules.before_get_page(self, mmu, gfn, role, direct)
        sp = self.hash.get(key)
        if sp is not None:
            return sp
        self.counters["mmu_cache_miss"] += 1
        if len(self.hash) >= self.max_pages:
            self._recycle()
        sp = ShadowPage(self.next_id, gfn, role)
        self.next_id += 1
        self.hash[key] = sp
        if self.image is not None:
            self.image.page_created(sp)
        if not direct:
            self.sps_by_gfn[gfn][sp] = None
            if level > 1 or not rules:
                sp.write_tracked = True
                self.track_add(gfn)
            elif not rules.page_created(self, mmu, sp):
                # modern account_shadowed: a 4 KiB leaf page is not write-tracked (it may go
                # out of sync); its frame's sptes are only made read-only (2.6.28
                # kvm_mmu_get_page: rmap_write_protect)
                self.write_protect(gfn)
        if self.events.tracing:
            self.events.emit(ev.GET_PAGE, gfn=gfn, level=level, direct=direct, quadrant=role.quadrant,
                             access=access, created=True, sp=sp.id)
        return sp

    def _recycle(self) -> None:
        """KVM's kvm_mmu_free_some_pages: zap the oldest page that is not a root."""
        for sp in list(self.hash.values()):
            if not sp.root_count:
                self.counters["mmu_recycled"] += 1
                self.zap_page(sp, reason="recycled")
                return

    @staticmethod
    def link(parent, idx, child) -> None:
        """__link_shadow_page: parent[idx] -> child; an unsync child (or one with unsync
        children) marks the new path (mark_unsync)."""
        parent.spt[idx] = child.nonleaf_spte
        parent.children[idx] = child
        child.parents.add((parent, idx))
        if child.unsync or child.unsync_children:
            unsync.mark_unsync(parent, idx)

    def prepare_zap_page(self, sp: ShadowPage, reason: str = "") -> None:
        """kvm_mmu_prepare_zap_page: unlink children and parents, drop from the hash and put the
        page on the invalid list. Walks no longer reach it; it is freed by commit_zap()."""
        if sp.zapped:
            return
        if sp.role.level > 1 and sp.unsync_children:
            unsync.zap_unsync_children(self, sp)      # mmu_zap_unsync_children
        self.counters["mmu_shadow_zapped"] += 1
        if self.events.tracing:
            self.events.emit(ev.PREPARE_ZAP, sp=sp.id, gfn=sp.gfn, level=sp.role.level,
                             direct=sp.role.direct, quadrant=sp.role.quadrant, reason=reason)
        spt = sp.spt
        if sp.role.level == 1:
            gfns = sp.gfns
            for idx in range(ENTRIES):
                if spt[idx] & SPTE_P:
                    self._rmap_remove(gfns[idx], sp, idx)
                    spt[idx] = 0
                    gfns[idx] = None
        else:
            children = sp.children
            for idx in range(ENTRIES):
                child = children[idx]
                if child is not None:
                    child.parents.discard((sp, idx))
                    children[idx] = None
                    spt[idx] = 0
        for parent, idx in sp.parents:
            parent.spt[idx] = 0
            parent.children[idx] = None
        sp.parents.clear()
        del self.hash[(sp.gfn, sp.role)]
        if not sp.role.direct:
            peers = self.sps_by_gfn[sp.gfn]
            peers.pop(sp, None)
            if not peers:
                del self.sps_by_gfn[sp.gfn]
                if self.policy.unsync:
                    self.policy.unsync.gfn_unshadowed(self, sp.gfn)
            if sp.write_tracked:
                sp.write_tracked = False
                self.track_remove(sp.gfn)
        unsync.unlink_unsync_page(self, sp)
        sp.zapped = True
        if self.image is not None:
            self.image.page_gone(sp)
        policy = self.policy
        for v in self.vcpus:
            policy.on_zap(v, v.policy_state, sp)
        if sp.root_count:
            self.request_all(REQ_MMU_RELOAD)
        self.invalid_list.append(sp)

    def commit_zap(self) -> None:
        """kvm_mmu_commit_zap_page: every vCPU's TLB is flushed before the pages are freed."""
        if self.invalid_list:
            run_steps(self.commit_zap_steps())

    def commit_zap_steps(self, who: str = "zapper"):
        """commit_zap as a stepped actor (x86shadow/steps.py): with lockless walkers the flush
        may wait for them and the free may be deferred to a grace period, as the scheme says
        (mmu/lockless.py)."""
        pages = self.invalid_list
        if not pages:
            return
        self.invalid_list = []
        if self.lockless is None:
            self.flush_remote_tlbs()   # kvm_mmu_commit_zap_page (6.18 mmu.c): flush, then free
            for sp in pages:
                sp.freed = True
            return
        yield from self.lockless.commit_steps(pages, who)

    def zap_page(self, sp: ShadowPage, reason: str = "") -> None:
        self.prepare_zap_page(sp, reason)
        self.commit_zap()

    def unprotect(self, gfn, reason: str = "") -> bool:
        """kvm_mmu_unprotect_page: zap every shadow of the guest table at gfn; the guest then writes
        the frame natively until a fault shadows it again."""
        sps = list(self.sps_by_gfn.get(gfn, ()))
        if not sps:
            return False
        self.counters["mmu_unprotect"] += 1
        if self.events.tracing:
            self.events.emit(ev.UNPROTECT, gfn=gfn, pages=len(sps), reason=reason)
        for sp in sps:
            self.prepare_zap_page(sp, reason="unprotect")
        self.commit_zap()
        return True

    # ------------------------------------------------------------------ sptes and the rmap
    def _rmap_remove(self, gfn, sp, idx) -> None:
        s = self.rmap.get(gfn)
        if s is not None:
            s.pop((sp, idx), None)
            if not s:
                del self.rmap[gfn]

    def drop_spte(self, sp, idx) -> None:
        """mmu_page_zap_pte: clear one spte (leaf: rmap_remove; non-leaf: unlink the child)."""
        spte = sp.spt[idx]
        if not spte & SPTE_P:
            return
        if sp.role.level == 1:
            self._rmap_remove(sp.gfns[idx], sp, idx)
            sp.gfns[idx] = None
            sp.gptes[idx] = None
        else:
            child = sp.children[idx]
            child.parents.discard((sp, idx))
            sp.children[idx] = None
        sp.spt[idx] = 0
        # mmu_page_zap_pte's callers (kvm_mmu_pte_write, sync_page) flush remotely
        if sp.role.level == 1:
            self.flush_leaf_sptes(((sp, idx),))
        else:
            self.flush_remote_tlbs()              # a whole table's translations went

    def mark_accessed(self, sp, idx) -> None:
        sp.spt[idx] |= SPTE_A

    def set_spte(self, vcpu, sp, idx, gfn, pte_access, dirty, write_fault, user_fault,
                 speculative=False, pfn=None, synchronizing=False, gpte=None,
                 host_writable=True) -> bool:
        """mmu_set_spte: install a leaf spte for gfn (its host pfn from the memslots), built from
        guest pte ``gpte``. Returns True if the faulting write must be emulated (the frame is
        write-tracked, or its shadows may not go out of sync). (Linux 6.x also returns
        RET_PF_SPURIOUS for an unchanged spte: not modelled.)

        A writable spte to a shadowed frame that is not write-tracked makes its shadows go out
        of sync when the policy allows (make_spte -> mmu_try_to_unsync_pages, Linux 6.18
        spte.c; only when the spte was not writable already).

        ``host_writable`` False (the host maps the page read-only: KSM): never W, as KVM's
        SPTE_HOST_WRITEABLE (2.6.32 set_spte). ``pfn`` None: a prefetch; the page the host maps
        now, nothing installed if it is not present (gfn_to_pfn_atomic)."""
        user = bool(pte_access & _ACC_U)
        writable = bool(pte_access & _ACC_W)          # (CR0.WP=0: see VcpuMmu.page_fault)
        if writable and not dirty:
            writable = False                      # dirty tracking: read-only until the first write
        if pfn is None:                           # (the fault path looked it up already)
            p = self.gfn_to_pfn(gfn, atomic=True)
            if p is None:
                if self.host is None:
                    raise MMUError(f"set_spte: gfn {gfn:#x} is in no memslot")
                self.drop_spte(sp, idx)           # swapped out: no prefetch
                return False
            pfn, host_writable = p
        if not host_writable:
            writable = False
        guest_writable = writable             # (before the write tracking: the image's alias W)
        emulate = False
        if writable:
            if gfn in self.write_track:
                writable = False
                emulate = write_fault
            elif gfn in self.sps_by_gfn:
                old = sp.spt[idx]
                rules = self.policy.unsync
                if (not rules or not (old & SPTE_P and old & SPTE_W and sp.gfns[idx] == gfn)
                        and not rules.may_unsync(self, vcpu, sp, idx, gfn, write_fault,
                                                 user_fault, speculative, synchronizing)):
                    writable = False
                    emulate = write_fault
        spte = make_spte(pfn, writable, user, pte_access & _ACC_X, write_fault)
        old = sp.spt[idx]
        if old & SPTE_P:
            if sp.gfns[idx] != gfn:
                self._rmap_remove(sp.gfns[idx], sp, idx)
                self.rmap[gfn][(sp, idx)] = None
                self.flush_leaf_sptes(((sp, idx),))   # mmu_set_spte: a new pfn -> remote flush
            elif (old & SPTE_FRAME) != (spte & SPTE_FRAME) or (old & SPTE_W and not spte & SPTE_W):
                # mmu_set_spte / mmu_spte_update (3.x+): a W removed -> kvm_flush_remote_tlbs
                if old & SPTE_W and not spte & SPTE_W:
                    self.note_write_removed()
                self.flush_leaf_sptes(((sp, idx),))
        else:
            self.rmap[gfn][(sp, idx)] = None
        sp.spt[idx] = spte
        sp.gfns[idx] = gfn
        sp.gptes[idx] = gpte
        if self.image is not None:
            self.image.guest_writable(sp, idx, gfn, guest_writable)
        if not synchronizing:        # (a resync is set_spte, not mmu_set_spte, in KVM 2.6.28)
            self.policy.on_spte_installed(vcpu, vcpu.policy_state, sp, idx, gfn, speculative,
                                          emulate)
        return emulate

    # ------------------------------------------------------------------ the pte-write path helpers
    @staticmethod
    def affected_sptes(sp, offset, size):
        """The shadow entries of sp that shadow guest bytes [offset, offset+size) of its page,
        honouring quadrants and 2-level directories (one 4 MiB guest PDE = two shadow PDEs)."""
        gsize = sp.role.gpte_size
        out = []
        for gi in range(offset // gsize, (offset + size - 1) // gsize + 1):
            if gi * gsize >= 4096:
                break
            if gsize == 4:
                if sp.role.level == 1:
                    quadrant, sidx, n = gi >> 9, gi & 511, 1
                else:
                    quadrant, sidx, n = gi >> 8, (gi & 255) * 2, 2
                if quadrant != sp.role.quadrant:
                    continue
                out.extend(range(sidx, sidx + n))
            else:
                out.append(gi)
        return out

    def drop_written_sptes(self, gpa, size, sps=None):
        """Drop every spte that shadows the written guest bytes (counting mmu_pde_zapped for
        non-leaf ones); the next access through them faults and re-reads the guest pte."""
        offset = gpa & 0xFFF
        keep_leaves = self.planted_bug == "stale-spte-after-pte-write"     # test-only
        for sp in (self.shadow_pages_of(gpa >> 12) if sps is None else sps):
            if sp.zapped or (keep_leaves and sp.role.level == 1):
                continue
            for idx in self.affected_sptes(sp, offset, size):
                if sp.role.level > 1:
                    self.counters["mmu_pde_zapped"] += 1
                self.drop_spte(sp, idx)

    # ------------------------------------------------------------------ helpers for tests/audit
    def pages(self):
        return list(self.hash.values())
