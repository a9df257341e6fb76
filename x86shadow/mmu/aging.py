"""Aging: answering the host's "was this page used since I last asked?" from the A bits of the
sptes found through the rmap (kvm_age_rmapp, 2.6.27: under mmu_lock clear the A bit of every
spte of the gfn, young if one had it; no flush here -- clear_flush_young's caller flushes).
"""
from __future__ import annotations

from .spte import SPTE_A, SPTE_P


def age_gfns(vm, gfns, clear: bool = True) -> bool:
    """Young if any spte of these gfns has its A bit (cleared when ``clear``)."""
    young = False
    with vm.mmu_lock.held("aging"):
        rmap = vm.rmap
        for gfn in gfns:
            for sp, idx in rmap.get(gfn, ()):
                spte = sp.spt[idx]
                if spte & SPTE_P and spte & SPTE_A:
                    young = True
                    if clear:
                        sp.spt[idx] = spte & ~SPTE_A
                    else:
                        return True
    return young
