"""Modern KVM (Linux >= 3.2 rules), before out-of-sync pages are modelled: ``kvm``.

Sources (docs/POLICY_SOURCES.md, "K5"): arch/x86/kvm/x86.c retry_instruction /
reexecute_instruction, arch/x86/kvm/emulate.c x86_page_table_writing_insn (the PageTable flag),
arch/x86/kvm/mmu/mmu.c kvm_mmu_pte_write, detect_write_misaligned, detect_write_flooding.
"""
from __future__ import annotations

from ..emulate.decode import misaligned_kvm
from .base import EMULATE, FAIL, UNPROTECT, Policy, Verdict

FLOOD_THRESHOLD = 3        # detect_write_flooding: ++sp->write_flooding_count >= 3


class Kvm(Policy):
    name = "kvm"

    def __init__(self):
        self.last_retry = None        # (rip, gpa): vcpu->arch.last_retry_eip / last_retry_addr

    def classify(self, vcpu, gpa, size, value, insn, cpl) -> Verdict:
        last, self.last_retry = self.last_retry, None   # retry_instruction clears it every time
        rip = insn.address if insn is not None else None
        if insn is None:
            # x86_emulate_instruction fails -> reexecute_instruction -> kvm_mmu_unprotect_page
            return Verdict(FAIL, "unprotect: emulation failed (instruction not decoded)")
        if insn.kvm_pt_write:
            return Verdict(EMULATE, f"emulate: page-table writing insn ({insn.kvm_class})")
        if last == (rip, gpa):
            # the same instruction faulted on the same address right after a retry
            return Verdict(EMULATE, f"emulate: loop breaker ({insn.kvm_class} retried at the same "
                                    "RIP and address)")
        self.last_retry = (rip, gpa)
        return Verdict(UNPROTECT, f"unprotect: {insn.kvm_class} is not page-table writing (retry)")

    def pte_write(self, mmu, gpa, size, insn) -> None:
        """kvm_mmu_pte_write: zap misaligned or flooded pages, else zap the written sptes."""
        gfn, offset = gpa >> 12, gpa & 0xFFF
        keep = []
        for sp in mmu.shadow_pages_of(gfn):
            if sp.zapped:
                continue
            misaligned = misaligned_kvm(offset, size, sp.role.gpte_size)
            # DESIGN.md 3: flood detection is for non-leaf pages; leaf pages are handled like
            # non-leaf ones until out-of-sync pages exist
            sp.write_flooding_count += 1
            flooded = sp.write_flooding_count >= FLOOD_THRESHOLD
            if misaligned or flooded:
                mmu.c["mmu_flooded"] += 1
                reason = (f"zap: misaligned {size}-byte write at offset {offset:#x}" if misaligned
                          else f"zap: flooded ({sp.write_flooding_count} writes without a guest "
                               "fault through the page)")
                if mmu.trace:
                    mmu.trace("kvm_mmu_policy", policy=self.name, gfn=gfn, sp=sp.id, decision=reason)
                mmu.zap_page(sp, reason=reason)
            else:
                keep.append(sp)
        mmu.drop_written_sptes(gpa, size, keep)
