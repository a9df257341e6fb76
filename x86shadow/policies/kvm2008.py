"""KVM before out-of-sync shadow pages (~2.6.24-2.6.26): ``kvm-2008``, ``kvm-2008-accessfix``,
``andrea``. Sources (read through the code index; see docs/POLICY_SOURCES.md):

K25  torvalds/linux arch/x86/kvm/mmu.c + paging_tmpl.h at 947da538 (2.6.25)
K26  torvalds/linux arch/x86/kvm/mmu.c at 1b7fcd3263e5 (Avi Kivity's access fix)
"""
from __future__ import annotations

from .. import paging as pg
from ..emulate.decode import misaligned_kvm2008
from ..mmu.pages import SPTE_A, SPTE_FRAME, SPTE_P
from .base import EMULATE, FAIL, UNPROTECT, Policy, Verdict


class Kvm2008(Policy):
    name = "kvm-2008"
    walker_dirty_is_pte_write = True      # K25 FNAME(walk_addr): D set by cmpxchg -> pte write
    access_fix = False

    def __init__(self):
        # per-vCPU flood state (K25 kvm_vcpu_arch): last_pt_write_gfn/count, last_pte_updated
        self.last_pt_write_gfn = None
        self.last_pt_write_count = 0
        self.last_pte_updated = None      # (sp, idx) of the spte most recently installed
        self.last_pte_gfn = None          # K26: the gfn that spte maps

    # ------------------------------------------------------------------ the trap
    def classify(self, vcpu, gpa, size, value, insn, cpl) -> Verdict:
        if cpl == 3:
            # K25 mmu_set_spte: a user write fault to a shadowed gfn -> mmu_unshadow(gfn)
            return Verdict(UNPROTECT, "unprotect: user-mode (CPL3) write to a shadowed page table")
        if insn is None:
            # K25 x86.c emulate_instruction: decode failure -> kvm_mmu_unprotect_page_virt
            return Verdict(FAIL, "unprotect: emulation failed (instruction not decoded)")
        return Verdict(EMULATE, f"emulate: {insn.kvm_class} (kvm-2008 emulates every write)")

    # ------------------------------------------------------------------ the pte-write path
    def _last_updated_pte_accessed(self):
        lpu = self.last_pte_updated
        return lpu is not None and bool(lpu[0].spt[lpu[1]] & SPTE_A)

    def pte_write(self, mmu, gpa, size, insn) -> None:
        """K25 kvm_mmu_pte_write (plus K26 kvm_mmu_access_page when access_fix)."""
        gfn, offset = gpa >> 12, gpa & 0xFFF
        trace = mmu.trace
        if self.access_fix:
            self._access_page(mmu, gfn)
        # flood detector (per vCPU): the 3rd write in a row to a frame whose last installed spte
        # has not been accessed floods
        if gfn == self.last_pt_write_gfn and not self._last_updated_pte_accessed():
            self.last_pt_write_count += 1
        else:
            self.last_pt_write_gfn = gfn
            self.last_pt_write_count = 1
            self.last_pte_updated = None
        flooded = self.last_pt_write_count >= 3
        for sp in mmu.shadow_pages_of(gfn):
            if sp.zapped:
                continue
            gsize = sp.role.gpte_size
            misaligned = misaligned_kvm2008(offset, size, gsize)
            if misaligned or flooded:
                # K25: same counter for both; the test runs before the quadrant filter, so every
                # shadow page of the frame goes
                mmu.c["mmu_flooded"] += 1
                reason = (f"zap: misaligned {size}-byte write at offset {offset:#x}" if misaligned
                          else f"zap: flooded ({self.last_pt_write_count}th write in a row, "
                               "last pte not accessed)")
                if trace:
                    trace("kvm_mmu_policy", policy=self.name, gfn=gfn, sp=sp.id, decision=reason)
                mmu.zap_page(sp, reason=reason)
                continue
            idxs = mmu.affected_sptes(sp, offset, size)
            if not idxs:
                continue
            # the whole guest pte, as written (K25 re-reads it from guest memory, already updated;
            # for a PAE guest a 4-byte half is thereby overlaid on the 8-byte pte)
            pte_gpa = (gfn << 12) | (offset & ~(gsize - 1))
            gpte = mmu.mem.read32(pte_gpa) if gsize == 4 else mmu.mem.read64(pte_gpa)
            for idx in idxs:
                mmu.drop_spte(sp, idx)
                if sp.role.level > 1:
                    mmu.c["mmu_pde_zapped"] += 1          # a directory never re-installs
                    continue
                mmu.c["mmu_pte_updated"] += 1             # counted per update attempt (K25)
                self._update_pte(mmu, sp, idx, gpte)
            if trace:
                trace("kvm_mmu_policy", policy=self.name, gfn=gfn, sp=sp.id,
                      decision=f"update: {len(idxs)} spte(s) from guest pte {gpte:#x}")

    def _update_pte(self, mmu, sp, idx, gpte):
        """FNAME(update_pte): re-install only a Present AND Accessed guest pte, speculatively
        (no A bit in the spte), writable only if the guest pte is Dirty."""
        if (gpte & (pg.PTE_P | pg.PTE_A)) != (pg.PTE_P | pg.PTE_A):
            return
        mode = mmu.ctx.mode
        gfn = pg.entry_frame(mode, 1, gpte) >> 12
        if gfn >= mmu.ram_frames:
            return
        acc = pg.ACC_X
        if gpte & pg.PTE_W:
            acc |= pg.ACC_W
        if gpte & pg.PTE_U:
            acc |= pg.ACC_U
        if mode != pg.Mode.LEGACY and mmu.ctx.nxe and gpte & pg.PTE_NX:
            acc &= ~pg.ACC_X
        mmu.set_spte(sp, idx, gfn, acc & sp.role.access, bool(gpte & pg.PTE_D), False, False,
                     speculative=True)

    def _access_page(self, mmu, gfn):
        pass

    # ------------------------------------------------------------------ heuristics state
    def on_spte_installed(self, mmu, sp, idx, gfn, speculative, ptwrite) -> None:
        # K25 mmu_set_spte: every install that is not itself a page-table write
        if not ptwrite:
            self.last_pte_updated = (sp, idx)
            self.last_pte_gfn = gfn

    def on_zap(self, mmu, sp) -> None:
        # K25 kvm_mmu_zap_page -> kvm_mmu_reset_last_pte_updated (all vCPUs)
        self.last_pte_updated = None

    def on_guest_fault(self, mmu) -> None:
        self.last_pt_write_count = 0          # K25 FNAME(page_fault): "reset fork detector"

    def on_fault_fixed(self, mmu) -> None:
        self.last_pt_write_count = 0          # ... and after a fault that was not a pt write


class Kvm2008AccessFix(Kvm2008):
    """kvm-2008 + Avi Kivity's commit 1b7fcd3263e5 ("KVM: MMU: Fix false flooding when a pte
    points to page table"): an emulated write to the frame that ``last_pte_updated`` maps marks
    that spte accessed, before the flood test (K26 kvm_mmu_access_page); and only speculative
    installs become ``last_pte_updated`` (K26 mmu_set_spte)."""

    name = "kvm-2008-accessfix"
    access_fix = True

    def _access_page(self, mmu, gfn):
        lpu = self.last_pte_updated
        if lpu is None or self.last_pte_gfn != gfn:
            return
        sp, idx = lpu
        spte = sp.spt[idx]
        if spte & SPTE_P and not spte & SPTE_A and (spte & SPTE_FRAME) >> 12 == gfn:
            sp.spt[idx] = spte | SPTE_A
            if mmu.trace:
                mmu.trace("kvm_mmu_policy", policy=self.name, gfn=gfn, sp=sp.id,
                          decision="access fix: last installed pte maps this page table; marked accessed")

    def on_spte_installed(self, mmu, sp, idx, gfn, speculative, ptwrite) -> None:
        if speculative:
            self.last_pte_updated = (sp, idx)
            self.last_pte_gfn = gfn


class Andrea(Kvm2008AccessFix):
    """kvm-2008-accessfix + Andrea Arcangeli's proposal (kvm-devel, 2008; no code to cite): a
    write that clears the accessed bit of a guest pte (``lock btr $5`` / ``and`` with ~0x20)
    unshadows the target frame at once instead of being emulated."""

    name = "andrea"

    def classify(self, vcpu, gpa, size, value, insn, cpl) -> Verdict:
        if cpl != 3 and insn is not None and insn.clears_accessed_bit:
            return Verdict(UNPROTECT, f"unprotect: {insn.kvm_class} clears a pte accessed bit (andrea)")
        return super().classify(vcpu, gpa, size, value, insn, cpl)
