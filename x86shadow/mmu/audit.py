"""Invariant checker for the shadow MMU (``--audit``; always on in the tests).

Checks, after an exit:
* every present leaf spte agrees with its guest pte: same frame, no more rights than the guest gives
  (U, W, X), writable only if the guest pte is dirty and the frame is not write-protected;
* every shadowed guest page-table frame is mapped read-only by every spte that maps it (rmap);
* rmap entries point at present sptes of live pages, and every present leaf spte is in the rmap;
* every leaf spte holds the host pfn that backs the gfn it records (memslots, then the host's page
  table), unless an invalidation for that gfn is in progress, and is writable only if the host
  maps the page writable;
* parent/child links agree both ways, and root counts match the roots of every vCPU;
* write tracking counts exactly the shadow pages of each frame plus the PAE PDPTs in use;
* no zapped page is left uncommitted on the invalid list;
* with lockless walks (mmu/lockless.py): every page waiting for a grace period is zapped, not
  freed and no longer hashed, the backlog is within the scheme's bound, the reader count and the
  vCPU modes agree with the walkers inside their read side.
* with several vCPUs (``VcpuMmu.tlb_record``): no vCPU's TLB maps more than its sptes allow once
  its flush requests are served -- every recorded entry of a vCPU without a pending
  KVM_REQ_TLB_FLUSH is backed by a present leaf spte of its root with the same pfn and at least
  the entry's rights (the rule kvm_flush_remote_tlbs exists for: every downgrade another vCPU's
  TLB may hold is flushed before that vCPU runs again).
"""
from __future__ import annotations

from .. import paging as pg
from .pages import PaeRoot
from .shadow_walk import shadow_leaf
from .spte import PERM_W, PERM_X, SPTE_FRAME, SPTE_NX, SPTE_P, SPTE_U, SPTE_W, spte_pfn


class AuditError(AssertionError):
    pass


def audit(vm) -> None:
    """Check every invariant of the VM's shadow MMU (all vCPUs' roots); raise AuditError."""
    from .vm_mmu import REQ_MMU_RELOAD
    problems = []
    p = problems.append
    mem = vm.peek_mem
    host = vm.host
    notifier = vm.notifier

    def invalidating(gfn):
        """An invalidation covering gfn is in progress (its sptes may lag until range_end)."""
        if notifier is None or not notifier.count:
            return False
        return notifier.era == "2008" or notifier.range_start <= gfn < notifier.range_end
    # roots in use
    expected_roots = {}
    for v in vm.vcpus:
        root = v.root
        if isinstance(root, PaeRoot):
            for i, child in enumerate(root.children):
                if child is not None:
                    expected_roots[child] = expected_roots.get(child, 0) + 1
                    if (root, i) not in child.parents:
                        p(f"vcpu{v.id} pae_root[{i}] -> {child} has no back link")
        elif root is not None and not v.requests & REQ_MMU_RELOAD:
            expected_roots[root] = expected_roots.get(root, 0) + 1
    if vm.invalid_list:
        p(f"{len(vm.invalid_list)} zapped pages not committed after the exit")
    for (gfn, role), sp in vm.hash.items():
        if sp.zapped:
            p(f"{sp} zapped but still hashed")
        if sp.gfn != gfn or sp.role != role:
            p(f"{sp} hashed under the wrong key")
        if sp.root_count != expected_roots.get(sp, 0):
            p(f"{sp} root_count {sp.root_count} but used as a root {expected_roots.get(sp, 0)} times")
        for parent, idx in sp.parents:
            if parent.children[idx] is not sp:
                p(f"{sp} lists parent {parent}[{idx}] which does not point to it")
        if sp.role.level > 1:
            for idx, child in enumerate(sp.children):
                spte = sp.spt[idx]
                if child is None:
                    if spte & SPTE_P:
                        p(f"{sp}[{idx}] present non-leaf spte without a child")
                    continue
                if child.zapped:
                    p(f"{sp}[{idx}] points to zapped {child}")
                if (spte & SPTE_FRAME) >> 12 != child.id or not spte & SPTE_P:
                    p(f"{sp}[{idx}] spte {spte:#x} does not encode child {child}")
                if (sp, idx) not in child.parents:
                    p(f"{child} misses parent link {sp}[{idx}]")
            continue
        gsize = sp.role.gpte_size
        for idx, spte in enumerate(sp.spt):
            if not spte & SPTE_P:
                if sp.gfns[idx] is not None:
                    p(f"{sp}[{idx}] not present but records gfn {sp.gfns[idx]:#x}")
                continue
            gfn_mapped = sp.gfns[idx]
            if gfn_mapped is None:
                p(f"{sp}[{idx}] present spte {spte:#x} without its gfn")
                continue
            if not invalidating(gfn_mapped):
                backing = vm.current_pfn(gfn_mapped)
                if spte_pfn(spte) != backing:
                    p(f"{sp}[{idx}] holds pfn {spte_pfn(spte):#x} but gfn {gfn_mapped:#x} is "
                      f"backed by host pfn {backing} and no invalidation of it is in progress")
                elif spte & SPTE_W and host is not None and not host.is_writable(
                        vm.memslots.gfn_to_index(gfn_mapped)):
                    p(f"{sp}[{idx}] maps gfn {gfn_mapped:#x} writable but the host maps its page "
                      "read-only (KSM)")
            if (sp, idx) not in vm.rmap.get(gfn_mapped, ()):
                p(f"{sp}[{idx}] maps gfn {gfn_mapped:#x} but is not in its rmap")
            if spte & SPTE_W:
                if vm.is_tracked(gfn_mapped):
                    p(f"{sp}[{idx}] maps write-tracked gfn {gfn_mapped:#x} (page table or PDPT) "
                      "writable")
                elif any(not s.unsync for s in vm.sps_by_gfn.get(gfn_mapped, ())):
                    p(f"{sp}[{idx}] maps gfn {gfn_mapped:#x} writable, which has a shadow page "
                      "in sync")
            acc = sp.role.access
            if spte & SPTE_U and not acc & pg.ACC_U:
                p(f"{sp}[{idx}] user spte under a supervisor-only path")
            if spte & SPTE_W and not acc & pg.ACC_W and sp.role.cr0_wp:
                p(f"{sp}[{idx}] writable spte under a read-only path")
            if not spte & SPTE_NX and not acc & pg.ACC_X:
                p(f"{sp}[{idx}] executable spte under an NX path")
            if sp.role.direct:
                if gfn_mapped != sp.gfn + idx:
                    p(f"{sp}[{idx}] direct spte maps gfn {gfn_mapped:#x}, expected {sp.gfn + idx:#x}")
                continue
            fmt = pg.FORMATS[pg.Mode.LEGACY if gsize == 4 else pg.Mode.LONG]
            gpa = sp.gpte_gpa(idx)
            gpte = fmt.read_pte(mem, gpa)
            if sp.unsync:
                # the one legal difference: an out-of-sync page's sptes may lag behind the
                # guest's edits; each must agree with the guest pte it was built from
                if sp.gptes[idx] is None:
                    p(f"{sp}[{idx}] unsync page: spte without the guest pte it was built from")
                    continue
                gpte = sp.gptes[idx]
            if not gpte & pg.PTE_P:
                p(f"{sp}[{idx}] present but guest pte {gpte:#x} at {gpa:#x} is not")
                continue
            gframe = fmt.leaf_frame(gpte) >> 12
            if gframe != gfn_mapped:
                p(f"{sp}[{idx}] maps gfn {gfn_mapped:#x} but guest pte {gpte:#x} maps {gframe:#x}")
            if spte & SPTE_U and not gpte & pg.PTE_U:
                p(f"{sp}[{idx}] user spte for supervisor guest pte {gpte:#x}")
            if spte & SPTE_W:
                if not gpte & pg.PTE_D:
                    p(f"{sp}[{idx}] writable spte for clean guest pte {gpte:#x}")
                if not gpte & pg.PTE_W and (sp.role.cr0_wp or spte & SPTE_U):
                    p(f"{sp}[{idx}] writable spte for read-only guest pte {gpte:#x}")
            if not spte & SPTE_NX and gsize == 8 and sp.role.nxe and gpte & pg.PTE_NX:
                p(f"{sp}[{idx}] executable spte for NX guest pte {gpte:#x}")
    for gfn, entries in vm.rmap.items():
        for sp, idx in entries:
            if sp.zapped:
                p(f"rmap[{gfn:#x}] holds zapped {sp}")
            elif sp.gfns[idx] != gfn or not sp.spt[idx] & SPTE_P:
                p(f"rmap[{gfn:#x}] holds {sp}[{idx}] = {sp.spt[idx]:#x}")
    # write tracking: one user per write-tracked shadow page of the frame (every non-direct
    # page, or only the upper-level ones when leaf pages may go out of sync), one per vCPU using
    # it as its PAE PDPT
    want = {}
    for gfn, sps in vm.sps_by_gfn.items():
        live = [sp for sp in sps if not sp.zapped]
        if len(live) != len(sps) or not sps:
            p(f"gfn {gfn:#x}: {len(sps) - len(live)} zapped pages among its shadows")
        for sp in live:
            if sp.write_tracked != (sp.role.level > 1 or not vm.policy.unsync):
                p(f"{sp} write_tracked is {sp.write_tracked}")
        n = sum(1 for sp in live if sp.write_tracked)
        if n:
            want[gfn] = n
    for v in vm.vcpus:
        if v.pdpt_gfn is not None:
            want[v.pdpt_gfn] = want.get(v.pdpt_gfn, 0) + 1
    if dict(vm.write_track) != want:
        p(f"write tracking {dict(vm.write_track)} but shadows and PDPTs need {want}")
    _audit_unsync(vm, p)
    if vm.lockless is not None:
        _audit_lockless(vm, p)
    audit_tlbs(vm, p)
    if problems:
        raise AuditError("shadow MMU audit failed:\n  " + "\n  ".join(problems[:20]) +
                         (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _audit_unsync(vm, p) -> None:
    """Out-of-sync bookkeeping: only leaf pages are unsync, and only when the policy allows;
    ``mmu_unsync`` is their number; every count equals its bitmap's set bits; every page that
    is unsync or has unsync children is marked in each parent that points at it (so the sync
    walk from the roots reaches it)."""
    n_unsync = 0
    rules = vm.policy.unsync
    marks = rules is not None and rules.marks_parents
    for sp in vm.hash.values():
        if sp.unsync:
            n_unsync += 1
            if sp.role.level != 1 or sp.role.direct or not rules:
                p(f"{sp} is unsync but cannot be")
        if sp.role.level == 1:
            if sp.unsync_children or sp.unsync_child_bitmap:
                p(f"{sp} leaf page with unsync children")
            continue
        if not marks:
            if sp.unsync_children or sp.unsync_child_bitmap:
                p(f"{sp} has unsync marks but the rule set keeps none")
            continue
        if sp.unsync_children != bin(sp.unsync_child_bitmap).count("1"):
            p(f"{sp} unsync_children {sp.unsync_children} but {bin(sp.unsync_child_bitmap).count('1')}"
              " bits set")
        for idx, child in enumerate(sp.children):
            if child is not None and (child.unsync or child.unsync_children) \
                    and not sp.unsync_child_bitmap >> idx & 1:
                p(f"{sp}[{idx}] -> {child} is unsync (or has unsync children) but not marked")
    if vm.counters["mmu_unsync"] != n_unsync:
        p(f"mmu_unsync is {vm.counters['mmu_unsync']} but {n_unsync} pages are unsync")
    if rules:
        rules.audit(vm, p)


def _audit_lockless(vm, p) -> None:
    from .lockless import IN_GUEST_MODE, READING_SHADOW_PAGE_TABLES
    lk = vm.lockless
    for sp in lk.deferred:
        if not sp.zapped or sp.freed:
            p(f"{sp} waits for a grace period but is {'freed' if sp.freed else 'not zapped'}")
        if vm.hash.get((sp.gfn, sp.role)) is sp:
            p(f"{sp} waits for a grace period but is still hashed")
    bound = lk.backlog_bound()
    if bound is not None and lk.backlog > bound:
        p(f"{lk.backlog} pages wait for a grace period, over the {lk.scheme} bound {bound}")
    if lk.scheme == "rcu-readers" and lk.reader_counter != len(lk.rcu.readers):
        p(f"reader_counter {lk.reader_counter} but {len(lk.rcu.readers)} RCU readers")
    if lk.reader_counter < 0 or lk.rcu_free_shadow_page < 0:
        p("a lockless walk ended more often than it began")
    for vid, mode in lk.mode.items():
        if mode not in (IN_GUEST_MODE, READING_SHADOW_PAGE_TABLES):
            p(f"vcpu{vid} in unknown mode {mode!r}")


def audit_tlbs(vm, p) -> None:
    """Every vCPU's recorded TLB against its sptes (see the module docstring). A vCPU with a
    TLB flush pending is skipped: its TLB is flushed before it runs the guest again
    (vm_scheduler.py services the request before each slice), which is all KVM promises."""
    from .requests import REQ_ANY_TLB_FLUSH, REQ_MMU_RELOAD
    for v in vm.vcpus:
        rec = v.tlb_record
        if not rec or v.requests & (REQ_ANY_TLB_FLUSH | REQ_MMU_RELOAD) or v.root is None:
            continue
        for vpn, (pfn, perms, user) in rec.items():
            va = vpn << 12
            leaf = shadow_leaf(v.root, v.root_level, va)
            if leaf is None:
                p(f"vcpu{v.id} TLB maps va {va:#x} -> pfn {pfn:#x} but no spte does (no flush "
                  "since the spte went)")
                continue
            sp, idx = leaf
            spte = sp.spt[idx]
            if spte_pfn(spte) != pfn:
                p(f"vcpu{v.id} TLB maps va {va:#x} -> pfn {pfn:#x} but {sp}[{idx}] maps pfn "
                  f"{spte_pfn(spte):#x}")
            if perms & PERM_W and not spte & SPTE_W:
                p(f"vcpu{v.id} TLB maps va {va:#x} writable but {sp}[{idx}] = {spte:#x} is not")
            if perms & PERM_X and spte & SPTE_NX:
                p(f"vcpu{v.id} TLB maps va {va:#x} executable but {sp}[{idx}] = {spte:#x} is NX")
            if user and not spte & SPTE_U:
                p(f"vcpu{v.id} TLB maps va {va:#x} for CPL3 but {sp}[{idx}] = {spte:#x} is "
                  "supervisor-only")
