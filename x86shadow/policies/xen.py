"""Xen 3.3 shadow paging without out-of-sync pages (``xen``), and with them (``xen-oos``).

Source: Xen 3.3.1 xen/arch/x86/mm/shadow/multi.c (tumf/xen-3.3.1 at 4de6d963): sh_page_fault's
emulate path, emulate_map_dest / emulate_unmap_dest, check_for_early_unshadow. See
docs/POLICY_SOURCES.md ("X33").
"""
from __future__ import annotations

from .. import events as ev
from .. import paging as pg
from ..emulate.decode import is_zero_write, unaligned_xen
from ..mmu.oos_xen import Xen33Rules
from .base import AHEAD, EMULATE, FAIL, UNPROTECT, Policy, Verdict

EMULATE_AHEAD_MAX = 4       # sh_page_fault: "emulate up to four extra instructions" (PAE guests)


class XenState:
    """Per vCPU (Xen keeps both in struct shadow_vcpu)."""

    __slots__ = ("last_emulated_gfn", "ahead")

    def __init__(self):
        self.last_emulated_gfn = None     # check_for_early_unshadow's last_emulated_mfn
        self.ahead = None                 # (exit count when armed, [next insn addresses])


class Xen(Policy):
    name = "xen"

    def new_state(self):
        return XenState()

    def classify(self, mmu, st, w) -> Verdict:
        insn = w.insn
        ahead = st.ahead
        st.ahead = None
        if w.cpl == 3:
            # sh_page_fault: user-mode write to a page table -> sh_remove_shadows, no emulation
            return Verdict(UNPROTECT, "unprotect: user-mode (CPL3) write to a shadowed page table")
        if insn is None:
            # X86EMUL_UNHANDLEABLE -> shadow_remove_all_shadows
            return Verdict(FAIL, "unprotect: emulation failed (instruction not decoded)")
        if ahead is not None and ahead[0] == w.exits and insn.address in ahead[1]:
            k = ahead[1].index(insn.address) + 1
            # PAE loop: this store belongs to the k-th instruction emulated after the exit; it
            # writes a page table, which ends the loop (shadow_em_ex_pt)
            return Verdict(AHEAD, f"emulate-ahead {k}/{EMULATE_AHEAD_MAX}", ahead=k)
        if ahead is not None:
            # the loop ran its course without another page-table write (shadow_em_ex_non_pt)
            mmu.counters["emulate_ahead"] += len(ahead[1])
        return Verdict(EMULATE, f"emulate: {insn.kvm_class}")

    def pte_write(self, mmu, st, gpa, size, insn) -> None:
        # Xen's shadow code re-validates the written guest entries (sh_validate_guest_entry);
        # in this model that is: drop what they shadowed, the next fault re-reads them
        mmu.vm.drop_written_sptes(gpa, size)

    def after_emulate(self, mmu, st, w, ahead=False) -> None:
        vm = mmu.vm
        gpa, size, insn = w.gpa, w.size, w.insn
        gfn = gpa >> 12
        events = mmu.events
        if unaligned_xen(gpa, size) and vm.is_shadowed(gfn):
            # emulate_map_dest: "unaligned writes mean probably this isn't a pagetable"; the write
            # itself is still emulated (HVM guests)
            if events.tracing:
                events.emit(ev.POLICY, policy=self.name, gfn=gfn,
                            decision=f"unshadow: unaligned {size}-byte write")
            vm.unprotect(gfn, reason="xen: unaligned write")
        pte_size = mmu.fmt.pte_size
        word = mmu.mem.read32(gpa) if size >= 4 else 1
        if is_zero_write(word, size, gpa, pte_size=pte_size):
            if st.last_emulated_gfn == gfn and vm.is_shadowed(gfn):
                if events.tracing:
                    events.emit(ev.POLICY, policy=self.name, gfn=gfn,
                                decision="unshadow: early unshadow (second zero write in a row)")
                vm.unprotect(gfn, reason="xen: early unshadow")
            st.last_emulated_gfn = gfn
        else:
            st.last_emulated_gfn = None       # reset_early_unshadow
        if mmu.ctx.mode == pg.Mode.PAE and insn is not None and not ahead:
            # PAE guest: emulate up to 4 more instructions, stopping after one that writes a
            # page table (or fails). The instructions are the ones that follow in program order.
            st.ahead = (mmu.counters["exits"], mmu.next_instructions(insn, EMULATE_AHEAD_MAX))

    def on_guest_fault(self, mmu, st) -> None:
        st.last_emulated_gfn = None
        self._close_ahead(mmu, st)

    def on_fault_fixed(self, mmu, st) -> None:
        st.last_emulated_gfn = None           # every normally fixed shadow fault
        self._close_ahead(mmu, st)

    def on_other_exit(self, mmu, st) -> None:
        self._close_ahead(mmu, st)

    @staticmethod
    def _close_ahead(mmu, st):
        if st.ahead is not None:
            mmu.counters["emulate_ahead"] += len(st.ahead[1])
            st.ahead = None


class XenOos(Xen):
    """xen + Xen 3.3's out-of-sync L1 page tables (mmu/oos_xen.py: 3 per vCPU, snapshots,
    fixups, resync at CR3 updates). Writes that still trap -- to upper-level tables, from user
    mode, to a frame with several shadow types -- take the xen path above."""

    name = "xen-oos"

    def __init__(self):
        self.unsync = Xen33Rules()
