"""The explorer's scenarios (docs/EXPLORE.md): small VMs over a bytearray (the sans-CPU MMU
core) and the actors that race in them, each with a correct and a deliberately broken variant.
Every actor is the real code as a stepped generator: ``VmMmu.prepare_zap_page`` /
``commit_zap_steps``, the walkers and schemes of mmu/lockless.py, ``HostMM.swap_out_steps``
with KVM's notifier (mmu/notifiers.py), and ``VcpuMmu.hw_fill`` -- the whole shadow fault --
run in a greenlet that is preempted at the fault path's named points (``VmMmu.point``:
"after_seq_snapshot", "after_gfn_to_pfn").
"""
from __future__ import annotations

from dataclasses import dataclass

from . import paging as pg
from .counters import new_counters
from .explore import Actor, Violation, World
from .guesttables import PWU, GuestTables
from .memory.host import HostMM, HostPages, HostViolation
from .memory.ram import PhysMem
from .mmu.audit import audit
from .mmu.lockless import (IN_GUEST_MODE, Lockless, dirty_log_steps, spte_walk_steps)
from .mmu.requests import REQ_TLB_FLUSH
from .mmu.shadow_walk import shadow_leaf
from .mmu.spte import SPTE_P, spte_pfn
from .mmu.vm_mmu import VmMmu
from .steps import Step

RAM = 1 << 20                  # 256 guest frames
FRAMES = RAM >> 12
SPARE = 16                     # spare host pages (swap-in, migration)
TABLES, TABLES_END = 0x80000, 0xC0000
VA = 0x0040_0000
DATA = 0x0001_0000
ACC_ALL = pg.ACC_X | pg.ACC_W | pg.ACC_U


@dataclass
class Scenario:
    name: str
    description: str
    correct: str                # what the correct variant does
    broken: str                 # what its broken variant does
    build: object               # (broken: bool) -> World


class SmallVm:
    """A small VM: a 4-level guest with VA -> DATA, vCPUs on its CR3, optionally a host memory
    manager under guest RAM and a lockless scheme."""

    def __init__(self, vcpus=2, host=False, scheme=None, breaks=(), break_flush=False, bound=None):
        buf = bytearray(RAM + (SPARE << 12 if host else 0))
        self.counters = new_counters()
        self.host = None
        if host:
            self.host = HostMM(HostPages(PhysMem(buf), FRAMES), FRAMES, "modern", self.counters)
            self.vm = VmMmu(None, self.counters, host=self.host, notifiers="modern",
                            break_flush=break_flush)
        else:
            self.vm = VmMmu(PhysMem(buf), self.counters)
        vm = self.vm
        if scheme is not None:
            kw = {} if bound is None else {"bound": bound, "limit": max(1, bound // 2)}
            vm.lockless = Lockless(vm, scheme, breaks=breaks, **kw)
        self.t = GuestTables(pg.Mode.LONG, PhysMem(buf), TABLES, TABLES_END)
        self.t.map(VA, DATA, PWU | pg.PTE_A | pg.PTE_D)
        self.vcpus = [vm.add_vcpu() for _ in range(vcpus)]
        for v in self.vcpus:
            v.set_context(self.t.ctx())
            v.take_requests()
        if self.host is not None:
            self.host.pages.on_free = self._tlb_check_on_free
        else:
            self.access(self.vcpus[0])          # the shadow path to VA exists

    def access(self, v, va=VA, access=0):
        """The CPU's access through its TLB: a fill, then its pending flush serviced."""
        r = v.hw_fill(va, access)
        if v.requests & REQ_TLB_FLUSH:
            v.requests &= ~REQ_TLB_FLUSH
            v.flush_hw_tlb()
        return r

    def leaf_page(self, v, va=VA):
        return shadow_leaf(v.root, v.root_level, va)[0]

    def _tlb_check_on_free(self, pfn, tag):
        for v in self.vm.vcpus:
            if v.tlb_pfns and pfn in v.tlb_pfns:
                raise HostViolation("a host page was freed while a vCPU's TLB may still map it",
                                    f"{self.host.pages.describe(pfn)}, in vcpu{v.id}'s TLB",
                                    "explore")

    # ------------------------------------------------------------------ checks
    def check(self, bound=None):
        vm = self.vm
        lk = vm.lockless
        if bound is not None and lk is not None and lk.backlog > bound:
            raise Violation(f"deferred-free backlog {lk.backlog} pages is over its bound "
                            f"{bound} ({lk.scheme}; {lk.rcu.completed} grace periods ended)")
        host = self.host
        if host is not None and host.pages.freed:
            freed = host.pages.freed
            for v in vm.vcpus:
                for pfn in v.tlb_pfns or ():
                    if pfn in freed:
                        raise Violation(f"vcpu{v.id}'s TLB maps freed host page {pfn:#x}")
            for sp in vm.hash.values():
                if sp.role.level != 1:
                    continue
                for idx, spte in enumerate(sp.spt):
                    if spte & SPTE_P and spte_pfn(spte) in freed:
                        raise Violation(f"{sp}[{idx}] maps freed host page {spte_pfn(spte):#x}")

    def final(self):
        lk = self.vm.lockless
        if lk is not None and lk.backlog:
            raise Violation(f"{lk.backlog} zapped pages never freed (no grace period ended)")

    def world(self, actors, bound=None):
        vm = self.vm
        return World(actors, check=lambda: self.check(bound), audit=lambda: audit(vm),
                     lock_free=lambda: vm.mmu_lock.holder is None, final=self.final)


def zap_steps(vm, pages, who="zapper"):
    """A vCPU zapping shadow pages one at a time: mmu_lock, kvm_mmu_prepare_zap_page,
    kvm_mmu_commit_zap_page (VmMmu.commit_zap_steps), unlock."""
    lock = vm.mmu_lock
    for sp in pages:
        yield Step(f"{who}: take mmu_lock", ready=lambda: lock.holder is None)
        lock.acquire(who)
        yield Step(f"{who}: prepare_zap_page {sp}")
        vm.prepare_zap_page(sp, reason="explore")
        yield Step(f"{who}: commit_zap (kvm_mmu_commit_zap_page)")
        yield from vm.commit_zap_steps(who)
        yield Step(f"{who}: release mmu_lock")
        lock.release(who)


_POINT_NEXT = {"after_seq_snapshot": "gfn_to_pfn (the host page backing the gfn)",
               "after_gfn_to_pfn": "take mmu_lock, re-check mmu_seq, install the spte"}


def fault_steps(g, v, times=1, va=VA, who=None):
    """vCPU ``v`` accessing ``va`` ``times`` times through its TLB: the real fill and shadow
    fault (VcpuMmu.hw_fill -> page_fault), run in a greenlet that hands control back at each
    of the fault path's named points (VmMmu.point). A fault that retries (RET_PF_RETRY: it
    raced an invalidation) re-faults only once no invalidation is in progress: spinning
    before that retries again and changes nothing (the explorer's one fairness assumption)."""
    from greenlet import getcurrent, greenlet
    who = who or f"vcpu{v.id}"
    vm = g.vm
    back = [None]

    def invalidation_over():
        return vm.notifier is None or not vm.notifier.count

    def at_point(name, vcpu):
        if vcpu is v:
            ready = invalidation_over if name == "after_seq_snapshot" and v.retrying else None
            what = _POINT_NEXT.get(name, name)
            if ready is not None:
                what += " (a retried fault: once the invalidation is over)"
            back[0].switch(Step(f"{who} fault: {what}", ready=ready))

    def body():
        vm.point = at_point
        try:
            for n in range(times):
                g.access(v, va)
                if n + 1 < times:
                    back[0].switch(Step(f"{who}: access {va:#x} again (TLB fill)"))
        finally:
            vm.point = None
    run = greenlet(body)
    yield Step(f"{who}: access {va:#x} (TLB fill; on a miss the guest walk, mmu_seq snapshot)")
    while True:
        back[0] = getcurrent()
        r = run.switch()
        if run.dead:
            return r
        yield r


def aging_actor(vm, gen, who):
    """mmu/aging.py's stepped actors report after a step (("rmap", gfn), ("cleared", gfn),
    ...) and yield ("spin", what) while a lock they need is held; as explorer steps, each
    resumes where the report was made, and a spin can run once that lock is free."""
    lock = vm.mmu_lock

    def free(what):
        if what == "mmu_lock":
            return lambda: lock.holder is None
        gfn = int(what.split()[1], 16)               # "rmap 0x10"
        return lambda: lock.rmap.holder(gfn) is None
    yield Step(f"{who}: start")
    while True:
        try:
            what = next(gen)
        except StopIteration as stop:
            return stop.value
        if what[0] == "spin":
            yield Step(f"{who}: take {what[1]} (held: spin until it is free)", ready=free(what[1]))
        else:
            done = " ".join(f"{x:#x}" if isinstance(x, int) else str(x) for x in what[:2])
            yield Step(f"{who}: go on (after: {done})")


# ---------------------------------------------------------------------- the scenarios
def _c1(broken):
    g = SmallVm(scheme="irq", breaks=("free-before-flush",) if broken else ())
    v0, v1 = g.vcpus
    leaf = g.leaf_page(v0)
    return g.world([Actor("vcpu0-walk", spte_walk_steps(v0, VA, "vcpu0 walk")),
                    Actor("vcpu1-zap", zap_steps(g.vm, [leaf], "vcpu1 zap"))], bound=0)


def _c2(broken):
    g = SmallVm(scheme="rcu-readers", breaks=("free-ignoring-readers",) if broken else ())
    v0, v1 = g.vcpus
    leaf = g.leaf_page(v0)
    return g.world([Actor("vcpu0-walk", spte_walk_steps(v0, VA, "vcpu0 walk")),
                    Actor("vcpu1-zap", zap_steps(g.vm, [leaf], "vcpu1 zap")),
                    Actor("rcu", g.vm.lockless.rcu.steps(), daemon=True)])


BACKLOG_BOUND = 4
BACKLOG_ZAPS = 6


def _c2_backlog(broken):
    g = SmallVm(scheme="rcu-always" if broken else "rcu-sync", bound=BACKLOG_BOUND)
    vm = g.vm
    g.access(g.vcpus[0], VA, pg.PFERR_W)
    ctx = g.vcpus[0].ctx
    pages = [vm.get_page(ctx, 0x20 + 8 * i, 0, 1, True, ACC_ALL) for i in range(BACKLOG_ZAPS)]
    return g.world([Actor("dirty-log", dirty_log_steps(vm, [DATA >> 12])),
                    Actor("vcpu1-zap", zap_steps(vm, pages, "vcpu1 zap")),
                    Actor("rcu", vm.lockless.rcu.steps(), daemon=True)], bound=BACKLOG_BOUND)


def _c3(broken):
    g = SmallVm(vcpus=3, scheme="irq", breaks=("ipi-in-guest-only",) if broken else ())
    v0, v1, v2 = g.vcpus
    g.vm.lockless.mode[v2.id] = IN_GUEST_MODE       # vcpu2 runs the guest: kicked either way
    leaf = g.leaf_page(v0)
    return g.world([Actor("vcpu0-walk", spte_walk_steps(v0, VA, "vcpu0 walk")),
                    Actor("vcpu1-zap", zap_steps(g.vm, [leaf], "vcpu1 zap"))], bound=0)


def _dirty_log(broken):
    g = SmallVm(scheme="irq" if broken else "rcu-always")
    vm = g.vm
    v0 = g.vcpus[0]
    g.access(v0, VA, pg.PFERR_W)                    # a writable spte for dirty logging to protect
    leaf = g.leaf_page(v0)
    return g.world([Actor("dirty-log", dirty_log_steps(vm, [DATA >> 12])),
                    Actor("vcpu1-zap", zap_steps(vm, [leaf], "vcpu1 zap")),
                    Actor("rcu", vm.lockless.rcu.steps(), daemon=True)])


def _notifier_flush(broken):
    g = SmallVm(vcpus=1, host=True, break_flush=broken)
    v0 = g.vcpus[0]
    index = g.vm.memslots.gfn_to_index(DATA >> 12)
    g.access(v0)                                    # vcpu0's TLB maps the page
    return g.world([Actor("vcpu0", fault_steps(g, v0)),
                    Actor("host", g.host.swap_out_steps(index))])


def _seq_recheck(broken):
    g = SmallVm(vcpus=1, host=True)
    g.vm.notifier.break_retry = broken
    v0 = g.vcpus[0]
    index = g.vm.memslots.gfn_to_index(DATA >> 12)
    return g.world([Actor("vcpu0", fault_steps(g, v0)),
                    Actor("host", g.host.swap_out_steps(index))])


VA2 = 0x0060_0000               # a second mapping of DATA (kernel direct map + user mapping)


def _aging(broken):
    from .mmu.aging import Aging, zap_spte_steps
    g = SmallVm(vcpus=1)
    v0 = g.vcpus[0]
    g.t.map(VA2, DATA, PWU | pg.PTE_A | pg.PTE_D)
    g.access(v0, VA2)                               # rmap[DATA] has two sptes, both young
    vm = g.vm
    (sp, idx), _ = list(vm.rmap[DATA >> 12])
    ager = Aging(vm, "6.15", "modern")
    return g.world([Actor("aging", aging_actor(vm, ager.steps([DATA >> 12], "clear"), "aging")),
                    Actor("zapper", aging_actor(vm, zap_spte_steps(vm, sp, idx, "zapper",
                                                                   rmap_bit=not broken),
                                                "zapper"))])


SCENARIOS = {s.name: s for s in (
    Scenario("c1-irq",
             "C1: vcpu0 walks the shadow tables locklessly (IRQs off, READING_SHADOW_PAGE_TABLES) "
             "while vcpu1 zaps the leaf page it is reading (scheme irq, 3.5+)",
             "the zap's remote flush waits for vcpu0's IPI acknowledgement, then frees",
             "free before the flush: the page is freed, then the flush sent", _c1),
    Scenario("c2-rcu-readers",
             "C2: the same walk under rcu_read_lock + reader_counter (scheme rcu-readers, "
             "3.1-3.4); commit_zap defers to call_rcu while a reader is active",
             "freed by the grace period after the walker left",
             "the free ignores reader_counter (frees at once)", _c2),
    Scenario("c2-backlog",
             f"C2 stress (Marcelo Tosatti, 2013: 'This is unbounded'): a dirty-log walker "
             f"outside vCPU context holds its RCU read side while vcpu1 zaps {BACKLOG_ZAPS} "
             f"pages; the deferred-free backlog must stay within {BACKLOG_BOUND} pages",
             f"scheme rcu-sync (synchronize_rcu past {BACKLOG_BOUND} pages)",
             "scheme rcu-always (call_rcu for every free): a reader that delays the grace "
             "period lets the backlog grow with the zaps", _c2_backlog),
    Scenario("c3-reading-mode",
             "C3: vcpu0 is in READING_SHADOW_PAGE_TABLES, not in guest mode; the zap's "
             "KVM_REQ_TLB_FLUSH (KVM_REQUEST_WAIT) must still IPI it and wait; vcpu2 in guest "
             "mode is kicked either way",
             "kvm_request_needs_ipi: every vCPU not OUTSIDE_GUEST_MODE",
             "only IN_GUEST_MODE vCPUs are IPI'd (as for a request without KVM_REQUEST_WAIT)",
             _c3),
    Scenario("dirty-log",
             "a write-protect walk for dirty logging outside any vCPU (Xiao 2013) while vcpu1 "
             "zaps the leaf page whose spte it protects",
             "scheme rcu-always: the walker's RCU read side keeps the page until it leaves",
             "scheme irq: the remote flush waits only for vCPUs, so the page is freed under "
             "the walker (why 3.5+ KVM takes mmu_lock there)", _dirty_log),
    Scenario("notifier-flush",
             "DESIGN 6 / seed 002: the host swaps out a page vcpu0's TLB maps; the notifier "
             "must zap and flush before invalidate_range_end returns and the page is freed",
             "modern notifier: flush before the unlock (flush_on_ret)",
             "the notifier's flush is deferred past the free (--break flush-before-free, the "
             "tlbs_dirty bug fixed by a4ee1ca4a36e)", _notifier_flush),
    Scenario("seq-recheck",
             "DESIGN 6 / checklist B1: vcpu0's shadow fault snapshots mmu_notifier_seq, "
             "translates gfn -> pfn, re-checks under mmu_lock; the host swaps the page out in "
             "between",
             "the re-check sees the sequence moved: nothing installed, the fault retries",
             "the fault installs the pfn without the re-check (a freed host page)",
             _seq_recheck),
    Scenario("aging-rmap-lock",
             "DESIGN 7 / checklist D2 (6.15 lockless aging): the ager holds the rmap's lock bit "
             "while an mmu_lock holder zaps one of its sptes",
             "pte_list_remove takes the rmap bit: the writer spins until the ager is done",
             "pte_list_remove without the rmap bit: the chain changes under the ager "
             "(RmapRace)", _aging),
)}
