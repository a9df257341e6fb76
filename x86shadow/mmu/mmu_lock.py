"""``kvm->mmu_lock`` and the per-rmap lock bit: who takes them and how often.

x86shadow runs the MMU on one thread, so the lock is never contended by itself; it records the
acquisitions per taker ("fault", "notifier", "aging") and whether it is held, which the aging
variants and the notifier eras differ in (mmu/aging.py, mmu/notifiers.py). Contention between a
vCPU and a host-side taker is modelled where the two are interleaved: actors written as
generators (mmu/aging.py's stepped ager and rmap writers) use ``try_acquire`` and yield while the
lock is taken, and ``observer`` (a callable told about every acquisition before it happens) lets
the aging scenario put each acquisition on its virtual timeline (docs/AGING.md).

``rmap`` is the table of per-rmap lock bits of Linux 6.15+ (``KVM_RMAP_LOCKED``, bit 1 of each
``kvm_rmap_head``; arch/x86/kvm/mmu/mmu.c ``__kvm_rmap_lock``, ``kvm_rmap_lock``,
``kvm_rmap_lock_readonly``, read in the 6.18.2 tree): a writer (``pte_list_add``,
``pte_list_remove``, ``kvm_zap_all_rmap_sptes``) holds mmu_lock for write *and* the bit; the
lockless ager holds only the bit ("read-only", but not a reader-writer lock: one holder at a
time). It protects the rmap chain, not the sptes in it.
"""
from __future__ import annotations

from contextlib import contextmanager


class RmapLocks:
    """The lock bit of every rmap head (gfn -> holder); absent: unlocked."""
    __slots__ = ("holders", "taken")

    def __init__(self):
        self.holders = {}
        self.taken = 0                  # successful lock operations

    def holder(self, gfn):
        return self.holders.get(gfn)

    def try_lock(self, gfn, who: str) -> bool:
        """One try of __kvm_rmap_lock's cmpxchg: False while someone holds the bit (the caller
        spins: cpu_relax and read again)."""
        if gfn in self.holders:
            return False
        self.holders[gfn] = who
        self.taken += 1
        return True

    def unlock(self, gfn, who: str) -> None:
        """__kvm_rmap_unlock (atomic_long_set_release of the value without the bit)."""
        if self.holders.get(gfn) != who:
            raise RuntimeError(f"rmap {gfn:#x} unlocked by {who} but held by "
                               f"{self.holders.get(gfn)}")
        del self.holders[gfn]


class MmuLock:
    __slots__ = ("acquired", "by", "holder", "observer", "rmap")

    def __init__(self):
        self.acquired = 0
        self.by = {}                 # taker -> acquisitions
        self.holder = None
        self.observer = None         # fn(who), called before every acquisition (time models)
        self.rmap = RmapLocks()

    def acquire(self, who: str) -> None:
        if self.observer is not None:
            self.observer(who)
        if self.holder is not None:
            raise RuntimeError(f"mmu_lock taken by {who} while {self.holder} holds it")
        self.acquired += 1
        self.by[who] = self.by.get(who, 0) + 1
        self.holder = who

    def try_acquire(self, who: str) -> bool:
        """For a stepped actor: take the lock if it is free (False: spin and try again)."""
        if self.holder is not None:
            return False
        self.acquire(who)
        return True

    def release(self, who: str | None = None) -> None:
        if who is not None and self.holder != who:
            raise RuntimeError(f"mmu_lock released by {who} but held by {self.holder}")
        self.holder = None

    @contextmanager
    def held(self, who: str):
        self.acquire(who)
        try:
            yield self
        finally:
            self.holder = None
