"""Aging: KVM's answer to the host's "was this page used since I last asked?" (the MMU
notifiers ``clear_flush_young``, ``clear_young``, ``test_young``), read from the A bits of the
sptes found through the rmap. The variants (docs/AGING.md), chosen per VM (``HostConfig.aging``;
None = the notifier era's own: ``2008`` for era "2008", ``6.15`` for "modern"):

* ``2008`` -- Linux 2.6.27/2.6.28 ``kvm_age_rmapp`` under ``spin_lock(&kvm->mmu_lock)``
  (arch/x86/kvm/mmu.c and virt/kvm/kvm_main.c ``kvm_mmu_notifier_clear_flush_young``, read in
  the 2.6.28 tree sensysnetworks/linux-2.6.28-at91 c1580f7d): clear A in every spte of the
  rmap, young if one had it; ``clear_flush_young`` flushes the remote TLBs after the unlock if
  young. 2.6.27 had no ``clear_young`` / ``test_young``: here ``clear_young`` is the same walk
  without the flush and ``test_young`` the shape of the later ``kvm_test_age_rmapp`` (stop at
  the first accessed spte, clear nothing; seen in ~2.6.38-3.x trees of the search index).
* ``6.14`` -- ``kvm_rmap_age_gfn_range`` (perishh/linux-6.14 347b100ec arch/x86/kvm/mmu/mmu.c)
  called by ``kvm_handle_hva_range`` with mmu_lock held for write over the whole call (the rmap
  pass first, then the TDP MMU's); test-only stops at the first accessed spte; no flush (x86
  selects CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG since 6.13).
* ``6.15`` -- the merged "age sptes locklessly" (v9 -> 6.15; gfunkmonk/linux-6.18.2 062668f4d
  mmu.c ``kvm_age_gfn``, ``kvm_test_age_gfn``, ``kvm_rmap_age_gfn_range``, ``__kvm_rmap_lock``;
  kvm_main.c ``kvm_age_hva_range`` with ``.lockless``): mmu_lock is never taken; each non-empty
  rmap is locked "read-only" through its lock bit (spinning while a writer holds it); sptes
  read locklessly and non-present ones skipped; test-only returns at the first accessed spte; A
  cleared atomically; no flush. The TDP MMU pass (a stand-in, ``TdpMmu``) comes first and a
  young answer from it ends ``test_young`` before the rmaps are read; the rmaps are read only
  when the VM may have shadow-MMU sptes (``kvm_may_have_shadow_mmu_sptes``).
* ``single-rmap-skip`` / ``single-rmap-fallback`` -- Sean Christopherson's June 2024 sketch
  (seed 004; never merged): lockless only for an rmap with exactly one entry (its spte read
  directly, no lock of any kind); an rmap with more entries is skipped (reported old) or the
  call falls back to mmu_lock for those rmaps. No flush (kept as 6.13+, so that only the
  locking differs from 6.14 / 6.15).

Hardware without A bits (EPT without A/D; model checklist B rule 8), as a suffix of the variant
``2008`` -- ``2008:always-old`` (2.6.27-2.6.32: ``kvm_age_rmapp`` returns 0 when
``!shadow_accessed_mask``; the sptes stay), ``2008:zap`` (~2.6.36: the spte is zapped instead,
``kvm_unmap_rmapp``, young if one was there; the next access faults) and ``2008:zap-seq``
(57128468080a "kvm: Fix page ageing bugs", 2014: ``mmu_notifier_seq++`` before the zap, so a
fault racing the aging retries). Modern KVM access-tracks such sptes instead
(``mark_spte_for_access_track``, restored by the lockless fast page fault): not modelled --
that needs a fast-page-fault path in the fill (mmu/vcpu_mmu.py), which x86shadow does not have.

Every entry point is a generator underneath (``steps``), so a test can interleave an ager with
rmap writers step by step (model checklist D2): it yields ``("spin", what)`` while a lock it
needs is held by another actor, ``("rmap", gfn)`` after it read an rmap (and, in 6.15, while it
holds that rmap's lock bit), ``("spte", gfn, sp, idx)`` after it cleared an A bit. The plain
calls run the generator to the end (a spin there is an error: nobody else can run).
"""
from __future__ import annotations

from .spte import SPTE_A, SPTE_P

VARIANTS = ("2008", "6.14", "6.15", "single-rmap-skip", "single-rmap-fallback")
A_BITS = ("hw", "always-old", "zap", "zap-seq")
ERA_DEFAULT = {"2008": "2008", "modern": "6.15"}
LOCKED_VARIANTS = ("2008", "6.14")
_OPS = ("clear_flush", "clear", "test")


class RmapRace(Exception):
    """An rmap chain changed while the lockless ager held its lock bit: a writer did not wait
    (6.15 kvm_rmap_lock: every writer takes the bit)."""


def parse_aging(spec, era: str = "modern"):
    """``VARIANT[:A_BITS]`` (None: the era's own) -> (variant, a_bits); ValueError naming what
    is wrong."""
    if spec is None:
        if era not in ERA_DEFAULT:
            raise ValueError(f"unknown notifier era {era!r} (choose from {', '.join(ERA_DEFAULT)})")
        return ERA_DEFAULT[era], "hw"
    variant, _, a_bits = str(spec).partition(":")
    a_bits = a_bits or "hw"
    if variant not in VARIANTS:
        raise ValueError(f"unknown aging variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if a_bits == "access-track":
        raise ValueError("aging without A bits by access tracking (modern KVM) is not modelled: "
                         "it needs a lockless fast page fault in the fill")
    if a_bits not in A_BITS:
        raise ValueError(f"unknown A-bit mode {a_bits!r} (choose from {', '.join(A_BITS)})")
    if a_bits != "hw" and variant != "2008":
        raise ValueError(f"aging {spec!r}: the A-bit-less modes ({', '.join(A_BITS[1:])}) are "
                         "those of the 2008-2014 kernels: write 2008:" + a_bits)
    return variant, a_bits


class CallRecord:
    """What one aging call did (the aging scenario turns it into time)."""
    __slots__ = ("op", "pages", "young", "rmaps", "sptes", "locked_rmaps", "locked_sptes",
                 "mmu_lock", "skipped", "fallback", "nonpresent", "zapped", "spins", "tdp")

    def __init__(self, op: str, pages: int):
        self.op = op
        self.pages = pages
        self.young = False
        self.rmaps = self.sptes = 0          # rmaps and sptes read (all of them)
        self.locked_rmaps = self.locked_sptes = 0   # ... of which with mmu_lock held
        self.mmu_lock = 0                    # mmu_lock acquisitions
        self.skipped = 0                     # single-rmap-skip: multi-entry rmaps not read
        self.fallback = 0                    # single-rmap-fallback: rmaps read under mmu_lock
        self.nonpresent = 0                  # 6.15: non-present sptes met in a locked rmap
        self.zapped = 0                      # 2008:zap*: sptes zapped to emulate the A bit
        self.spins = 0                       # steps spent waiting for a lock
        self.tdp = 0                         # TDP MMU stand-in entries read


class AgingStats:
    """Totals over every call (the aging scenario's figures)."""
    __slots__ = ("calls", "pages", "young", "rmaps", "sptes", "mmu_lock", "skipped",
                 "fallback", "nonpresent", "zapped", "spins")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def add(self, rec: CallRecord) -> None:
        self.calls += 1
        self.pages += rec.pages
        self.young += rec.young
        self.rmaps += rec.rmaps
        self.sptes += rec.sptes
        self.mmu_lock += rec.mmu_lock
        self.skipped += rec.skipped
        self.fallback += rec.fallback
        self.nonpresent += rec.nonpresent
        self.zapped += rec.zapped
        self.spins += rec.spins

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class TdpMmu:
    """A stand-in for the TDP MMU's leaf sptes (arch/x86/kvm/mmu/tdp_mmu.c) of the VM's own
    memory: gfn -> accessed. Enough for the order of kvm_age_gfn / kvm_test_age_gfn (model
    checklist D rules 2-3, scenario D3); x86shadow has no TDP MMU otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.accessed: dict = {}

    def age(self, gfns, test: bool, rec: CallRecord) -> bool:
        """kvm_tdp_mmu_age_gfn_range / kvm_tdp_mmu_test_age_gfn (under RCU, no mmu_lock)."""
        young = False
        for gfn in gfns:
            if gfn not in self.accessed:
                continue
            rec.tdp += 1
            if self.accessed[gfn]:
                young = True
                if test:
                    return True
                self.accessed[gfn] = False
        return young


def indirect_shadow_pages(vm) -> int:
    """kvm->arch.indirect_shadow_pages: shadow pages that shadow a guest page table."""
    return sum(len(sps) for sps in vm.sps_by_gfn.values())


class Aging:
    """The aging of one VM: ``variant`` (and ``a_bits``) from ``spec`` ("VARIANT[:A_BITS]", None
    = the era's own). ``flushes_young``: clear_flush_young flushes the remote TLBs when the
    answer is young (the notifier does it, after the walk)."""

    def __init__(self, vm, spec=None, era: str = "modern"):
        self.vm = vm
        self.variant, self.a_bits = parse_aging(spec, era)
        self.spec = self.variant if self.a_bits == "hw" else f"{self.variant}:{self.a_bits}"
        self.tdp = None                  # a TdpMmu (tests of kvm_age_gfn's TDP MMU pass)
        self.stats = AgingStats()
        self.last = None                 # the CallRecord of the last call

    @property
    def flushes_young(self) -> bool:
        # 2.6.27 kvm_mmu_notifier_clear_flush_young: kvm_flush_remote_tlbs if young; x86 stopped
        # flushing in 6.13 (KVM_ELIDE_TLB_FLUSH_IF_YOUNG, selected in arch/x86/kvm/Kconfig of
        # 6.14 and 6.18)
        return self.variant == "2008"

    # ------------------------------------------------------------------ the notifier's calls
    def clear_flush_young(self, gfns) -> bool:
        return self._run(self.steps(gfns, "clear_flush"))

    def clear_young(self, gfns) -> bool:
        return self._run(self.steps(gfns, "clear"))

    def test_young(self, gfns) -> bool:
        return self._run(self.steps(gfns, "test"))

    @staticmethod
    def _run(gen) -> bool:
        try:
            while True:
                what = next(gen)
                if what[0] == "spin":
                    gen.close()
                    raise RuntimeError(f"aging would spin forever on {what[1]}: another actor "
                                       "holds it and nothing else runs")
        except StopIteration as stop:
            return stop.value

    # ------------------------------------------------------------------ the walk, step by step
    def steps(self, gfns, op: str):
        """The aging of ``gfns`` as a generator (see the module docstring); its return value
        (StopIteration.value) is the answer, young or not. ``op``: "clear_flush", "clear" or
        "test"."""
        if op not in _OPS:
            raise ValueError(f"unknown aging operation {op!r}")
        gfns = list(gfns)
        rec = CallRecord(op, len(gfns))
        self.last = rec
        test = op == "test"
        v = self.variant
        try:
            if v in LOCKED_VARIANTS:
                young = yield from self._locked(gfns, test, rec, tdp=v == "6.14")
            elif v == "6.15":
                young = yield from self._lockless(gfns, test, rec)
            else:
                young = yield from self._single_rmap(gfns, test, rec)
            rec.young = bool(young)
        finally:
            self.stats.add(rec)
        return rec.young

    def _take_mmu_lock(self, rec):
        lock = self.vm.mmu_lock
        while not lock.try_acquire("aging"):
            rec.spins += 1
            yield ("spin", "mmu_lock")
        rec.mmu_lock += 1

    def _locked(self, gfns, test, rec, tdp=False):
        """2008 and 6.14: the whole call under mmu_lock (2.6.27 spin_lock around kvm_age_hva;
        6.14 kvm_handle_hva_range's KVM_MMU_LOCK, write on x86)."""
        vm = self.vm
        yield from self._take_mmu_lock(rec)
        try:
            young = yield from self._walk_locked(gfns, test, rec)
            if tdp and self.tdp is not None and self.tdp.enabled and not (test and young):
                # 6.14 kvm_age_gfn / kvm_test_age_gfn: the rmaps first, then the TDP MMU,
                # both inside the same mmu_lock section, no short-circuit between them
                young |= self.tdp.age(gfns, test, rec)
            return young
        finally:
            vm.mmu_lock.release("aging")

    def _walk_locked(self, gfns, test, rec):
        vm = self.vm
        rmap = vm.rmap
        young = False
        a_bits = self.a_bits
        if a_bits == "zap-seq" and not test:
            # 57128468080a kvm_age_hva: mmu_notifier_seq++ (under mmu_lock) before blowing the
            # sptes away, like every other spte removal a fault must notice
            if vm.notifier is not None:
                vm.notifier.seq += 1
        for gfn in gfns:
            entries = rmap.get(gfn)
            if not entries:
                continue
            rec.rmaps += 1
            rec.locked_rmaps += 1
            if a_bits == "always-old":
                continue                    # 2.6.27 kvm_age_rmapp: "always return old for EPT"
            if a_bits in ("zap", "zap-seq"):
                if test:
                    continue                # kvm_test_age_rmapp: no A bit -> old
                # ~2.6.36 kvm_age_rmapp: emulate the A bit by unmapping (kvm_unmap_rmapp); the
                # next access faults and maps the page again. The zap's flush is requested as
                # for every spte drop (the notifier flushes before returning when young).
                n = vm.zap_gfn_sptes(gfn)
                rec.zapped += n
                rec.locked_sptes += n
                rec.sptes += n
                if n:
                    young = True
                    vm.flush_remote_tlbs()
                yield ("rmap", gfn)
                continue
            for sp, idx in list(entries):
                spte = sp.spt[idx]
                rec.sptes += 1
                rec.locked_sptes += 1
                # (2.6.27 BUG_ON(!present): under mmu_lock an rmap entry is always present)
                if spte & SPTE_A:
                    young = True
                    if test:
                        return True         # test-only: the first accessed spte answers
                    sp.spt[idx] = spte & ~SPTE_A
            yield ("rmap", gfn)
        return young

    def _lockless(self, gfns, test, rec):
        """6.15 kvm_age_gfn / kvm_test_age_gfn -> kvm_rmap_age_gfn_range(lockless): no
        mmu_lock; per rmap the read-only lock bit."""
        vm = self.vm
        young = False
        tdp = self.tdp
        if tdp is not None and tdp.enabled:
            young = tdp.age(gfns, test, rec)
            if test and young:
                return True                 # kvm_test_age_gfn: TDP MMU young -> done
            if not indirect_shadow_pages(vm):
                return young                # kvm_may_have_shadow_mmu_sptes: rmaps not read
        rmap = vm.rmap
        locks = vm.mmu_lock.rmap
        for gfn in gfns:
            if not rmap.get(gfn):
                continue                    # empty rmap: __kvm_rmap_lock returns 0, no lock
            while not locks.try_lock(gfn, "aging"):
                rec.spins += 1              # a writer holds the bit: cpu_relax and re-read
                yield ("spin", f"rmap {gfn:#x}")
            entries = rmap.get(gfn)
            if not entries:                 # re-check: the writer may have emptied it
                locks.unlock(gfn, "aging")
                continue
            rec.rmaps += 1
            chain = tuple(entries)
            try:
                yield ("rmap", gfn)         # others run while this rmap is locked
                for sp, idx in chain:
                    self._check_chain(gfn, chain)
                    spte = sp.spt[idx]      # mmu_spte_get_lockless
                    rec.sptes += 1
                    if not spte & SPTE_P:   # for_each_rmap_spte_lockless: zapped under us
                        rec.nonpresent += 1
                        continue
                    if not spte & SPTE_A:
                        continue
                    if test:
                        return True
                    sp.spt[idx] &= ~SPTE_A  # clear_bit: atomic, a concurrent A set survives
                    young = True
                    yield ("spte", gfn, sp, idx)
                self._check_chain(gfn, chain)
            finally:
                locks.unlock(gfn, "aging")
        return young

    def _check_chain(self, gfn, chain) -> None:
        if tuple(self.vm.rmap.get(gfn, ())) != chain:
            raise RmapRace(f"rmap {gfn:#x} changed while the ager held its lock bit (a writer "
                           "must take the bit: kvm_rmap_lock in pte_list_add/pte_list_remove)")

    def _single_rmap(self, gfns, test, rec):
        """Sean Christopherson's June 2024 sketch: an rmap of exactly one entry is read without
        any lock; a longer one is skipped (old) or read under mmu_lock (fallback)."""
        rmap = self.vm.rmap
        young = False
        multi = []
        for gfn in gfns:
            entries = rmap.get(gfn)
            if not entries:
                continue
            if len(entries) > 1:
                multi.append(gfn)
                continue
            (sp, idx), = entries
            rec.rmaps += 1
            rec.sptes += 1
            spte = sp.spt[idx]
            if spte & SPTE_P and spte & SPTE_A:
                young = True
                if test:
                    return True
                sp.spt[idx] = spte & ~SPTE_A
            yield ("rmap", gfn)
        if not multi:
            return young
        if self.variant == "single-rmap-skip":
            rec.skipped += len(multi)       # James Houghton's objection: these answer "old"
            return young
        if test and young:
            return True
        rec.fallback += len(multi)
        yield from self._take_mmu_lock(rec)
        try:
            young |= yield from self._walk_locked(multi, test, rec)
        finally:
            self.vm.mmu_lock.release("aging")
        return young


# ---------------------------------------------------------------------- rmap writers, stepped
def _take_mmu_lock(vm, who):
    while not vm.mmu_lock.try_acquire(who):
        yield ("spin", "mmu_lock")


def _take_rmap_bit(vm, gfn, who):
    locks = vm.mmu_lock.rmap
    while not locks.try_lock(gfn, who):
        yield ("spin", f"rmap {gfn:#x}")


def zap_spte_steps(vm, sp, idx, who: str = "zapper", rmap_bit: bool = True):
    """An rmap writer as a generator, for interleaving tests (model checklist D2): 6.15
    kvm_zap_one_rmap_spte under mmu_lock (write) -- the spte is cleared first
    (mmu_spte_clear_track_bits: the sptes are not under the rmap bit), then pte_list_remove,
    which needs the rmap's lock bit and spins while the ager holds it. Yields ("spin", ...)
    while waiting, ("cleared", gfn) after clearing the spte. ``rmap_bit`` False (the broken
    variant of x86shadow explore's aging-rmap-lock scenario): pte_list_remove without the bit."""
    yield from _take_mmu_lock(vm, who)
    try:
        gfn = sp.gfns[idx]
        sp.spt[idx] = 0
        yield ("cleared", gfn)
        if rmap_bit:
            yield from _take_rmap_bit(vm, gfn, who)
        try:
            entries = vm.rmap.get(gfn)
            if entries is not None:
                entries.pop((sp, idx), None)
                if not entries:
                    del vm.rmap[gfn]
            sp.gfns[idx] = None
            sp.gptes[idx] = None
        finally:
            if rmap_bit:
                vm.mmu_lock.rmap.unlock(gfn, who)
        vm.flush_remote_tlbs()
    finally:
        vm.mmu_lock.release(who)


def rmap_add_steps(vm, sp, idx, gfn, spte, who: str = "fault"):
    """The other rmap writer: installing a leaf spte and pte_list_add (6.15: under mmu_lock and
    the rmap bit). Yields ("spin", ...) while the bit is held."""
    yield from _take_mmu_lock(vm, who)
    try:
        yield from _take_rmap_bit(vm, gfn, who)
        try:
            sp.spt[idx] = spte
            sp.gfns[idx] = gfn
            vm.rmap[gfn][(sp, idx)] = None
        finally:
            vm.mmu_lock.rmap.unlock(gfn, who)
    finally:
        vm.mmu_lock.release(who)


def run_steps(gen):
    """Run a stepped actor to its end; its return value."""
    try:
        while True:
            what = next(gen)
            if what[0] == "spin":
                gen.close()
                raise RuntimeError(f"would spin forever on {what[1]}")
    except StopIteration as stop:
        return stop.value
