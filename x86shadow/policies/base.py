"""What a policy is: the decisions of DESIGN.md 3, called from the write trap and the MMU.

A trapped store arrives in ``classify`` *before* it reaches memory. The policy answers with a
``Verdict``: emulate it (the store completes and goes through the pte-write path), unprotect the
frame and let the guest re-execute the instruction natively, or (Xen) count it as one of the
instructions emulated ahead of the previous exit. After an emulated store the MMU calls
``pte_write`` (how the shadow pages of the frame are brought up to date). The remaining hooks
let a policy keep the state its heuristics need (flood counters, last_pte_updated, ...).

Every verdict carries the name of the rule that fired; it is put in the trace.
"""
from __future__ import annotations

from typing import NamedTuple

EMULATE = "emulate"
UNPROTECT = "unprotect"      # zap the frame's shadows, re-execute the instruction natively
FAIL = "fail"                # emulation failure: insn_emulation_fail, then unprotect + re-execute
AHEAD = "ahead"              # Xen: emulated as one of the instructions after the previous exit


class Verdict(NamedTuple):
    action: str
    reason: str
    ahead: int = 0           # AHEAD: how many extra instructions this store accounts for


class Policy:
    """Base class: emulate everything, drop the affected sptes (the modern synced-page path)."""

    name = "base"
    # 2.6.25's guest walker updates D with a cmpxchg and calls kvm_mmu_pte_write itself
    walker_dirty_is_pte_write = False

    def classify(self, vcpu, gpa, size, value, insn, cpl) -> Verdict:
        return Verdict(EMULATE, "emulate: every write")

    def pte_write(self, mmu, gpa, size, insn) -> None:
        mmu.drop_written_sptes(gpa, size)

    def after_emulate(self, vcpu, gpa, size, value, insn, rip, ahead=False) -> None:
        pass

    # --- hooks from the MMU
    def on_guest_fault(self, mmu) -> None:
        pass

    def on_fault_fixed(self, mmu) -> None:
        pass

    def on_spte_installed(self, mmu, sp, idx, gfn, speculative, ptwrite) -> None:
        pass

    def on_zap(self, mmu, sp) -> None:
        pass

    def on_other_exit(self, mmu) -> None:
        pass

