"""Modern KVM (Linux >= 3.2 rules): ``kvm``, with out-of-sync leaf pages unless turned off.

Sources (docs/POLICY_SOURCES.md, "K5"): arch/x86/kvm/x86.c retry_instruction /
reexecute_instruction, arch/x86/kvm/emulate.c x86_page_table_writing_insn (the PageTable flag),
arch/x86/kvm/mmu/mmu.c kvm_mmu_pte_write, detect_write_misaligned, detect_write_flooding.
The retry's loop breaker (last_retry_eip / last_retry_addr) is the one of mmu/write_fault.py,
asked for with ``Verdict.retry``.
"""
from __future__ import annotations

from .. import events as ev
from ..emulate.decode import misaligned_kvm
from ..mmu.unsync import ModernRules
from .base import EMULATE, FAIL, UNPROTECT, Policy, Verdict

FLOOD_THRESHOLD = 3        # detect_write_flooding: ++sp->write_flooding_count >= 3


class Kvm(Policy):
    """``unsync`` (default on): out-of-sync 4 KiB leaf pages with modern KVM's rules
    (mmu/unsync.py, docs/UNSYNC.md); off is KVM's ``oos_shadow=0``: every shadowed frame is
    write-tracked and every write to it takes the path below."""

    name = "kvm"
    fault_prefetch = True      # FNAME(pte_prefetch), since Linux 2.6.36 (commit 957ed9effd80)

    def __init__(self, unsync: bool = True):
        self.unsync = ModernRules() if unsync else None

    def classify(self, mmu, st, w) -> Verdict:
        insn = w.insn
        if insn is None:
            # x86_emulate_instruction fails -> reexecute_instruction -> kvm_mmu_unprotect_page
            return Verdict(FAIL, "unprotect: emulation failed (instruction not decoded)")
        if insn.kvm_pt_write:
            return Verdict(EMULATE, f"emulate: page-table writing insn ({insn.kvm_class})")
        # retry_instruction: unprotect and re-execute; the same RIP faulting on the same address
        # right after is emulated (loop breaker in write_fault)
        return Verdict(UNPROTECT, f"unprotect: {insn.kvm_class} is not page-table writing (retry)",
                       retry=True)

    def pte_write(self, mmu, st, gpa, size, insn) -> None:
        """kvm_mmu_pte_write: zap misaligned or flooded pages, else zap the written sptes."""
        vm = mmu.vm
        gfn, offset = gpa >> 12, gpa & 0xFFF
        keep = []
        for sp in vm.shadow_pages_of(gfn):
            if sp.zapped:
                continue
            misaligned = misaligned_kvm(offset, size, sp.role.gpte_size)
            if self.unsync and sp.role.level == 1:
                # detect_write_flooding skips 4 KiB pages "because it can become unsync"
                # (mmu.c, Linux >= 3.x): only with out-of-sync pages on; with them off, leaf
                # pages are counted like the others
                flooded = False
            else:
                sp.write_flooding_count += 1
                flooded = sp.write_flooding_count >= FLOOD_THRESHOLD
            if misaligned or flooded:
                mmu.counters["mmu_flooded"] += 1
                reason = (f"zap: misaligned {size}-byte write at offset {offset:#x}" if misaligned
                          else f"zap: flooded ({sp.write_flooding_count} writes without a guest "
                               "fault through the page)")
                if mmu.events.tracing:
                    mmu.events.emit(ev.POLICY, policy=self.name, gfn=gfn, sp=sp.id, decision=reason)
                vm.prepare_zap_page(sp, reason=reason)
            else:
                keep.append(sp)
        vm.drop_written_sptes(gpa, size, keep)
