"""The one write-fault path: a guest store hit a write-tracked frame (a shadowed guest page
table, or a PAE PDPT in use). The CPU adapter reports the trapped store -- address, size, value,
RIP, CPL, the decoded instruction, and whether the CPU can refuse the store cleanly -- and carries
out the returned outcome; the decision, the loop breaker, the counters and the trace live here.

Outcomes:
* ``COMPLETE``: the store is done in guest memory (emulated, or completed after unprotecting the
  frame when the CPU cannot refuse it); the instruction continues.
* ``REEXECUTE``: the store was refused; the CPU flushes its TLB (``requests``) and re-executes the
  instruction at ``rip`` natively, the frame no longer write-protected.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import events as ev
from ..exits import REASON_EXCEPTION, count_exit
from ..policies.base import AHEAD, EMULATE, FAIL, UNPROTECT, Verdict
from .vm_mmu import REQ_TLB_FLUSH

COMPLETE = "complete"
REEXECUTE = "reexecute"


class TrappedWrite(NamedTuple):
    """The narrow context a policy decides from."""
    gpa: int
    size: int
    value: int
    rip: int
    cpl: int
    insn: object            # emulate.decode.Decoded, or None (not decodable)
    restartable: bool       # the CPU can refuse this store and re-execute the instruction
    exits: int = 0          # the exit counter when the store trapped


class WriteFaultState:
    """Per vCPU: the last unprotect-and-re-execute, for the loop breaker."""

    __slots__ = ("last_retry",)

    def __init__(self):
        self.last_retry = None        # (rip, gpa, progress mark, kvm-style retry)


def _loop_breaker(state, w: TrappedWrite, verdict: Verdict, progress: int) -> Verdict:
    """One loop breaker for every policy. A frame unprotected for a re-execution that traps again
    at the same RIP and address (a page table that maps itself: the instruction's own translation
    re-shadows it) is emulated instead.

    Two flavours, chosen by the verdict that asked for the retry:
    * KVM's (``verdict.retry``; x86.c retry_instruction, Linux >= 3.2): vcpu->arch.last_retry_eip
      and last_retry_addr are compared, whatever happened in between;
    * ours for the other policies: only the shadow faults of the re-execution may lie between the
      retry and the second trap.

    A store to a page table on the store's own translation path (a self-map, the active root)
    is where this matters: the re-execution re-shadows the table it writes. Per policy:
    * ``kvm``: the retry of a non-page-table-writing instruction ends here, as in KVM (x86.c
      retry_instruction from Linux 3.2; kvm_mmu_write_protect_fault after Sean Christopherson's
      2024 unprotect-and-retry series, e.g. commit 2df354e37c13). KVM's other
      self-change rule -- FNAME(page_fault)'s write_fault_to_shadow_pgtable, now
      EMULTYPE_WRITE_PF_TO_SP (commit 258d985f6eb3) -- only turns a *failed* emulation
      into an error for userspace instead of an unprotect-and-retry; not modelled (our FAIL
      verdict needs an instruction capstone cannot decode).
    * ``kvm-2008`` family: kernel-mode stores are always emulated (no retry); a CPL3 store
      unshadows (K25 mmu_set_spte -> mmu_unshadow) and the re-execution that re-shadows the
      table is emulated here.
    * ``xen``, ``unshadow-all``: our flavour above.
    (The livelocks the differential fuzzer found on misaligned stores came from QEMU's byte
    repeats of an accepted store being taken as new stores -- fixed in the CPU adapter -- not
    from a missing rule here.)"""
    last, state.last_retry = state.last_retry, None
    if verdict.action not in (UNPROTECT, FAIL) or last is None:
        return verdict
    rip, gpa, mark, kvm_style = last
    if rip != w.rip or gpa != w.gpa:
        return verdict
    if kvm_style and verdict.retry:
        cls = w.insn.kvm_class if w.insn is not None else "insn"
        return Verdict(EMULATE, f"emulate: loop breaker ({cls} retried at the same RIP and address)")
    if not kvm_style and mark == progress:
        return Verdict(EMULATE, "emulate: re-execution trapped again at the same RIP and address "
                                "(loop breaker)")
    return verdict


def handle_trapped_write(mmu, w: TrappedWrite) -> str:
    """Decide and carry out what happens to a trapped store; returns COMPLETE or REEXECUTE."""
    vm = mmu.vm
    mem = mmu.mem
    gpa, size = w.gpa, w.size
    gfn = gpa >> 12
    rules = mmu.policy.unsync
    if not vm.is_tracked(gfn) and not (rules and vm.is_shadowed(gfn)
                                       and rules.write_must_trap(vm, gfn, w.cpl == 3)):
        # a stale mapping to the trap (the frame was unshadowed since the TLB entry was made, or
        # it may go out of sync now -- the fault after the flush makes its spte writable):
        # refuse the store and flush, so the instruction and those after it store natively
        # (without this a loop keeps trapping until the next fill); a store the CPU cannot
        # refuse cleanly is completed here
        if w.restartable:
            mmu.requests |= REQ_TLB_FLUSH
            return REEXECUTE
        mem.write_uint(gpa, size, w.value)
        return COMPLETE
    c = mmu.counters
    policy = mmu.policy
    st = mmu.policy_state
    if not vm.is_shadowed(gfn):
        verdict = Verdict(EMULATE, "emulate: write to the PAE PDPT in use")
    else:
        verdict = policy.classify(mmu, st, w)
    # progress mark of the loop breaker: exits other than the shadow faults of a re-execution
    progress = c["exits"] - c["pf_fixed"] - c["pf_guest"]
    wstate = mmu.write_fault_state
    if wstate.last_retry is not None:
        verdict = _loop_breaker(wstate, w, verdict, progress)
    action = verdict.action
    if action == AHEAD:
        c["emulate_ahead"] += verdict.ahead
    else:
        c["pf_taken"] += 1
        c["wp_faults"] += 1
        c["pf_emulate"] += 1
        count_exit(c, mmu.events, REASON_EXCEPTION, w.rip, vector=14, address=gpa,
                   error_code=0x3)                 # a write to a present, write-protected page
    events = mmu.events
    if events.tracing:
        events.emit(ev.WRITE_PROTECT_FAULT, rip=w.rip, gpa=gpa, size=size, value=w.value,
                    insn=w.insn.text if w.insn else None, decision=verdict.reason)
    if action in (UNPROTECT, FAIL):
        if action == FAIL:
            c["insn_emulation_fail"] += 1
        vm.unprotect(gfn, reason=verdict.reason)
        mmu.requests |= REQ_TLB_FLUSH
        if verdict.retry:
            wstate.last_retry = (w.rip, gpa, progress + 1, True)
        if not w.restartable:
            # Stores made from inside a CPU helper (cmpxchg8b/16b, fxsave, far calls ...) cannot
            # be refused cleanly: the helper's register updates survive. The frame is unshadowed
            # all the same; the store completes here, which leaves exactly the state a native
            # re-execution would.
            mem.write_uint(gpa, size, w.value)
            return COMPLETE
        if not verdict.retry:
            wstate.last_retry = (w.rip, gpa, progress + 1, False)     # + this trap
        return REEXECUTE
    mem.write_uint(gpa, size, w.value)
    if action == EMULATE:
        c["insn_emulation"] += 1
        if events.tracing:
            insn = w.insn
            events.emit(ev.KVM_EMULATE_INSN, rip=w.rip, len=insn.size if insn else 0,
                        insn=insn.bytes.hex() if insn else "", failed=0)
    mmu.pte_write(gpa, size, w.insn)
    policy.after_emulate(mmu, st, w, ahead=(action == AHEAD))
    if ev.EMULATED_WRITE in events.subs:
        events.emit(ev.EMULATED_WRITE, gpa=gpa, size=size, ahead=(action == AHEAD))
    return COMPLETE
