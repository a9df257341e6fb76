"""Baselines for comparison: ``emulate-all`` and ``unshadow-all``."""
from __future__ import annotations

from .base import EMULATE, UNPROTECT, Policy, Verdict


class EmulateAll(Policy):
    """Emulate every trapped write (even from CPL3) and drop the sptes it changed; never unshadow."""

    name = "emulate-all"

    def classify(self, mmu, st, w) -> Verdict:
        return Verdict(EMULATE, "emulate: every write (emulate-all)")


class UnshadowAll(Policy):
    """Unshadow the frame on every trapped write; the guest re-executes the store natively."""

    name = "unshadow-all"

    def classify(self, mmu, st, w) -> Verdict:
        return Verdict(UNPROTECT, "unprotect: every write (unshadow-all)")
