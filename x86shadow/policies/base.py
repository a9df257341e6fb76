"""What a policy is: the decisions of docs/POLICY_SOURCES.md, called from the write-fault path and the MMU.

A policy is a set of rules, shared by the VM; what its heuristics remember (flood counters,
last_pte_updated, the emulate-ahead window ...) lives in a per-vCPU state object that
``new_state()`` makes and the vCPU's MMU owns and hands back to every hook.

A trapped store arrives in ``classify(mmu, state, write)`` *before* it reaches memory, as a
``write_fault.TrappedWrite`` (address, size, value, RIP, CPL, decoded instruction). The policy
answers with a ``Verdict``: emulate it (the store completes and goes through the pte-write path),
unprotect the frame and let the guest re-execute the instruction natively, or (Xen) count it as
one of the instructions emulated ahead of the previous exit. After an emulated store the MMU calls
``pte_write`` (how the shadow pages of the frame are brought up to date). ``mmu`` is always the
sans-CPU ``VcpuMmu`` of the vCPU (its ``vm`` holds the shadow pages), never a CPU.

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
    retry: bool = False      # UNPROTECT: KVM's retry_instruction (the loop breaker compares
                             # RIP and address only)


class Policy:
    """Base class: emulate everything, drop the affected sptes (the modern synced-page path)."""

    name = "base"
    # out-of-sync shadow pages: None (off: every shadowed frame is write-tracked, KVM's
    # oos_shadow=0) or the rule set the policy follows (an mmu.unsync.UnsyncRules)
    unsync = None
    # 2.6.25's guest walker updates D with a cmpxchg and calls kvm_mmu_pte_write itself
    walker_dirty_is_pte_write = False
    # a shadow fault on a 4 KiB page also builds sptes for the neighbours in its aligned block
    # of guest ptes (modern KVM's FNAME(pte_prefetch): VcpuMmu._pte_prefetch); 0: none
    fault_prefetch = False
    # the policy's rules read spte A bits (the CPU adapter must have the hardware's in the core
    # before each exit's rules run: --tlb walker harvests them)
    reads_spte_accessed = False

    def new_state(self):
        """The per-vCPU state of this policy's heuristics (None: it keeps none)."""
        return None

    def classify(self, mmu, st, w) -> Verdict:
        return Verdict(EMULATE, "emulate: every write")

    def pte_write(self, mmu, st, gpa, size, insn) -> None:
        mmu.vm.drop_written_sptes(gpa, size)

    def after_emulate(self, mmu, st, w, ahead=False) -> None:
        pass

    # --- hooks from the MMU
    def on_guest_fault(self, mmu, st) -> None:
        pass

    def on_fault_fixed(self, mmu, st) -> None:
        pass

    def on_spte_installed(self, mmu, st, sp, idx, gfn, speculative, ptwrite) -> None:
        pass

    def on_zap(self, mmu, st, sp) -> None:
        pass

    def on_other_exit(self, mmu, st) -> None:
        pass

    def invlpg(self, mmu, va) -> None:
        """The guest invalidated va (VcpuMmu.invlpg): what the out-of-sync rules do, if any."""
        if self.unsync:
            self.unsync.invlpg(mmu, va)
