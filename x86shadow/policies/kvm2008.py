"""KVM before out-of-sync shadow pages (~2.6.24-2.6.26): ``kvm-2008``, ``kvm-2008-accessfix``,
``andrea``; and the first KVM with them (2.6.28): ``kvm-2008-oos``. Sources (read through the
code index; see docs/POLICY_SOURCES.md):

K25  torvalds/linux arch/x86/kvm/mmu.c + paging_tmpl.h at 947da538 (2.6.25)
K26  torvalds/linux arch/x86/kvm/mmu.c at 1b7fcd3263e5 (Avi Kivity's access fix)
T2628 arch/x86/kvm/mmu.c + paging_tmpl.h of the 2.6.28 baseline (sensysnetworks/linux-2.6.28-at91):
     ``kvm-2008-oos``
"""
from __future__ import annotations

from .. import events as ev
from .. import paging as pg
from ..emulate.decode import misaligned_kvm2008
from ..mmu.pages import prefetch_invalid_gpte
from ..mmu.spte import SPTE_A, SPTE_P
from ..mmu.unsync import Kvm2628Rules, invlpg_drop_leaf
from .base import EMULATE, FAIL, UNPROTECT, Policy, Verdict


class Kvm2008State:
    """Per-vCPU flood state (K25 kvm_vcpu_arch): last_pt_write_gfn/count, last_pte_updated."""

    __slots__ = ("last_pt_write_gfn", "last_pt_write_count", "last_pte_updated", "last_pte_gfn")

    def __init__(self):
        self.last_pt_write_gfn = None
        self.last_pt_write_count = 0
        self.last_pte_updated = None      # (sp, idx) of the spte most recently installed
        self.last_pte_gfn = None          # K26: the gfn that spte maps


class Kvm2008(Policy):
    name = "kvm-2008"
    walker_dirty_is_pte_write = True      # K25 FNAME(walk_addr): D set by cmpxchg -> pte write
    reads_spte_accessed = True            # last_pte_updated's accessed test (the flood rule)
    access_fix = False

    def new_state(self):
        return Kvm2008State()

    # ------------------------------------------------------------------ the trap
    def classify(self, mmu, st, w) -> Verdict:
        insn = w.insn
        if w.cpl == 3:
            # K25 mmu_set_spte: a user write fault to a shadowed gfn -> mmu_unshadow(gfn)
            return Verdict(UNPROTECT, "unprotect: user-mode (CPL3) write to a shadowed page table")
        if insn is None:
            # K25 x86.c emulate_instruction: decode failure -> kvm_mmu_unprotect_page_virt
            return Verdict(FAIL, "unprotect: emulation failed (instruction not decoded)")
        return Verdict(EMULATE, f"emulate: {insn.kvm_class} (kvm-2008 emulates every write)")

    # ------------------------------------------------------------------ the pte-write path
    @staticmethod
    def _last_updated_pte_accessed(st):
        lpu = st.last_pte_updated
        return lpu is not None and bool(lpu[0].spt[lpu[1]] & SPTE_A)

    def pte_write(self, mmu, st, gpa, size, insn) -> None:
        """K25 kvm_mmu_pte_write (plus K26 kvm_mmu_access_page when access_fix)."""
        vm = mmu.vm
        gfn, offset = gpa >> 12, gpa & 0xFFF
        events = mmu.events
        if self.access_fix:
            self._access_page(mmu, st, gfn)
        # flood detector (per vCPU): the 3rd write in a row to a frame whose last installed spte
        # has not been accessed floods
        if gfn == st.last_pt_write_gfn and not self._last_updated_pte_accessed(st):
            st.last_pt_write_count += 1
        else:
            st.last_pt_write_gfn = gfn
            st.last_pt_write_count = 1
            st.last_pte_updated = None
        flooded = st.last_pt_write_count >= 3
        for sp in vm.shadow_pages_of(gfn):
            if sp.zapped:
                continue
            gsize = sp.role.gpte_size
            misaligned = misaligned_kvm2008(offset, size, gsize)
            if misaligned or flooded:
                # K25: same counter for both; the test runs before the quadrant filter, so every
                # shadow page of the frame goes
                mmu.counters["mmu_flooded"] += 1
                reason = (f"zap: misaligned {size}-byte write at offset {offset:#x}" if misaligned
                          else f"zap: flooded ({st.last_pt_write_count}th write in a row, "
                               "last pte not accessed)")
                if events.tracing:
                    events.emit(ev.POLICY, policy=self.name, gfn=gfn, sp=sp.id, decision=reason)
                vm.prepare_zap_page(sp, reason=reason)
                continue
            idxs = vm.affected_sptes(sp, offset, size)
            if not idxs:
                continue
            # the whole guest pte, as written (K25 re-reads it from guest memory, already updated;
            # for a PAE guest a 4-byte half is thereby overlaid on the 8-byte pte)
            gpte = mmu.mem.read_uint(gpa & ~(gsize - 1), gsize)
            for idx in idxs:
                vm.drop_spte(sp, idx)
                if sp.role.level > 1:
                    mmu.counters["mmu_pde_zapped"] += 1   # a directory never re-installs
                    continue
                mmu.counters["mmu_pte_updated"] += 1      # counted per update attempt (K25)
                self._update_pte(mmu, sp, idx, gpte)
            if events.tracing:
                events.emit(ev.POLICY, policy=self.name, gfn=gfn, sp=sp.id,
                            decision=f"update: {len(idxs)} spte(s) from guest pte {gpte:#x}")

    def _update_pte(self, mmu, sp, idx, gpte):
        """FNAME(update_pte): re-install only a Present AND Accessed guest pte, speculatively
        (no A bit in the spte), writable only if the guest pte is Dirty."""
        fmt = mmu.fmt
        if fmt is None:                   # paging is off: nothing maps through guest tables
            return
        if prefetch_invalid_gpte(mmu.ctx, gpte):
            # K25's update_pte checks only P and A, so it would install a pte with reserved
            # bits and the guest would miss its reserved-bit #PF (found by the differential
            # fuzzer). We keep the guest architectural as later KVM does: its
            # FNAME(prefetch_invalid_gpte) also refuses reserved bits: no install.
            return
        gfn = fmt.leaf_frame(gpte) >> 12
        vm = mmu.vm
        notifier = vm.notifier
        if notifier is not None:
            # T2628 mmu_guess_page_from_pte_write: mmu_seq snapshot, then gfn_to_pfn (which may
            # fault the host page in); FNAME(update_pte) installs nothing if
            # mmu_notifier_retry says an invalidation ran in between
            seq = notifier.seq
            p = vm.gfn_to_pfn(gfn)
            if vm.point is not None:
                vm.point("pte_prefetch_after_gfn_to_pfn", mmu)
            if p is None:
                return
            if notifier.retry(seq, gfn):
                mmu.counters["pte_prefetch_retry"] += 1
                return
            pfn, host_writable = p
        else:
            if vm.gfn_to_pfn(gfn) is None:
                return
            pfn, host_writable = None, True
        acc = fmt.entry_access(gpte, mmu.ctx.nxe)
        vm.set_spte(mmu, sp, idx, gfn, acc & sp.role.access, bool(gpte & pg.PTE_D), False,
                    False, speculative=True, gpte=gpte, pfn=pfn, host_writable=host_writable)

    def _access_page(self, mmu, st, gfn):
        pass

    # ------------------------------------------------------------------ heuristics state
    def on_spte_installed(self, mmu, st, sp, idx, gfn, speculative, ptwrite) -> None:
        # K25 mmu_set_spte: every install that is not itself a page-table write
        if not ptwrite:
            st.last_pte_updated = (sp, idx)
            st.last_pte_gfn = gfn

    def on_zap(self, mmu, st, sp) -> None:
        # K25 kvm_mmu_zap_page -> kvm_mmu_reset_last_pte_updated (all vCPUs)
        st.last_pte_updated = None

    def on_guest_fault(self, mmu, st) -> None:
        st.last_pt_write_count = 0            # K25 FNAME(page_fault): "reset fork detector"

    def on_fault_fixed(self, mmu, st) -> None:
        st.last_pt_write_count = 0            # ... and after a fault that was not a pt write


class Kvm2008AccessFix(Kvm2008):
    """kvm-2008 + Avi Kivity's commit 1b7fcd3263e5 ("KVM: MMU: Fix false flooding when a pte
    points to page table"): an emulated write to the frame that ``last_pte_updated`` maps marks
    that spte accessed, before the flood test (K26 kvm_mmu_access_page); and only speculative
    installs become ``last_pte_updated`` (K26 mmu_set_spte)."""

    name = "kvm-2008-accessfix"
    access_fix = True

    def _access_page(self, mmu, st, gfn):
        lpu = st.last_pte_updated
        if lpu is None or st.last_pte_gfn != gfn:
            return
        sp, idx = lpu
        spte = sp.spt[idx]
        if spte & SPTE_P and not spte & SPTE_A and sp.gfns[idx] == gfn:
            mmu.vm.mark_accessed(sp, idx)
            if mmu.events.tracing:
                mmu.events.emit(ev.POLICY, policy=self.name, gfn=gfn, sp=sp.id,
                                decision="access fix: last installed pte maps this page table; "
                                         "marked accessed")

    def on_spte_installed(self, mmu, st, sp, idx, gfn, speculative, ptwrite) -> None:
        if speculative:
            st.last_pte_updated = (sp, idx)
            st.last_pte_gfn = gfn


class Andrea(Kvm2008AccessFix):
    """kvm-2008-accessfix + Andrea Arcangeli's proposal (kvm-devel, 2008; no code to cite): a
    write that clears the accessed bit of a guest pte (``lock btr $5`` / ``and`` with ~0x20)
    unshadows the target frame at once instead of being emulated."""

    name = "andrea"

    def classify(self, mmu, st, w) -> Verdict:
        insn = w.insn
        if w.cpl != 3 and insn is not None and insn.clears_accessed_bit:
            return Verdict(UNPROTECT, f"unprotect: {insn.kvm_class} clears a pte accessed bit (andrea)")
        return super().classify(mmu, st, w)


class Kvm2008Oos(Kvm2008AccessFix):
    """kvm-2008-accessfix + KVM 2.6.28's out-of-sync shadow pages (commit 4731d4c7a077 and the
    2.6.28 tree, "T2628" in docs/POLICY_SOURCES.md): the rules of mmu/unsync.Kvm2628Rules
    (single role, level 1 only, can_unsync false while syncing, every CR3 write syncs, get_page
    syncs and write-protects every unsync shadow of the frame, a page left with no present spte
    is zapped), and 2.6.28's INVLPG, which drops the leaf spte. ``unsync=False`` is 2.6.28 with
    its ``oos_shadow`` module parameter 0: the rest of 2.6.28 stays (INVLPG still drops)."""

    name = "kvm-2008-oos"

    def __init__(self, unsync: bool = True):
        self.unsync = Kvm2628Rules() if unsync else None

    def classify(self, mmu, st, w) -> Verdict:
        insn = w.insn
        # T2628 set_spte / mmu_set_spte: no user_fault -> mmu_unshadow any more (2.6.25 had
        # it); a CPL3 write that still traps is emulated like any other
        if insn is None:
            return Verdict(FAIL, "unprotect: emulation failed (instruction not decoded)")
        return Verdict(EMULATE, f"emulate: {insn.kvm_class} (kvm-2008 emulates every write)")

    def invlpg(self, mmu, va) -> None:
        # T2628 FNAME(invlpg): the level-1 spte for va is dropped, in any page (2.6.28; 2.6.29
        # re-instantiates it from the guest pte -- we model 2.6.28)
        invlpg_drop_leaf(mmu, va)
