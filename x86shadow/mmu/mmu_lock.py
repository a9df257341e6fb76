"""``kvm->mmu_lock``: who takes it and how often.

x86shadow runs the MMU on one thread, so the lock is never contended by itself; it records the
acquisitions per taker ("fault", "notifier", "aging") and whether it is held, which the aging
variants and the notifier eras differ in (mmu/aging.py, mmu/notifiers.py). Contention between a
vCPU and a host-side taker is modelled where the two are interleaved (the aging scenario).
"""
from __future__ import annotations

from contextlib import contextmanager


class MmuLock:
    __slots__ = ("acquired", "by", "holder")

    def __init__(self):
        self.acquired = 0
        self.by = {}                 # taker -> acquisitions
        self.holder = None

    @contextmanager
    def held(self, who: str):
        if self.holder is not None:
            raise RuntimeError(f"mmu_lock taken by {who} while {self.holder} holds it")
        self.acquired += 1
        self.by[who] = self.by.get(who, 0) + 1
        self.holder = who
        try:
            yield self
        finally:
            self.holder = None
