"""The shadow page tables as an x86-format image: what a hardware walker (Unicorn's UC_TLB_CPU)
needs to translate through them the way ``VcpuMmu.hw_fill`` does (direction 1, stage 2,
docs/PERFORMANCE.md). Sans CPU: this module only builds and maintains the bytes; the adapter
that maps them into the CPU's physical memory is stage 3.

What it holds
    ``ShadowTableImage.mem``, a bytearray of 4 KiB *slots*, placed (by whoever maps it) at
    guest-physical ``base`` (default ``layout.SPT_ARENA_BASE``, below 4 GiB). Every live shadow
    page (``VmMmu.hash``) and every vCPU's live ``PaeRoot`` owns one slot; slot ``s`` is at
    ``base + s * 4096`` (KVM's ``__pa(sp->spt)``). Entries are 64-bit x86 entries,
    little-endian, 512 per slot (4 for a PAE root).

Encoding (``ShadowTableImage.encode_*``)
    * non-leaf spte: ``P|W|U|A | address of the child's slot`` -- the core's SPTE_NONLEAF with the
      child's id replaced by its slot address (KVM's ``link_shadow_page`` -> ``make_nonleaf_spte``:
      ``__pa(sp->spt) | shadow_present_mask | PT_WRITABLE_MASK | shadow_user_mask |
      shadow_x_mask | shadow_me_value`` and A, arch/x86/kvm/mmu/spte.c, v6.x). A is preset, so the
      walker never writes a non-leaf entry.
    * PAE root entry (a 2-level or PAE guest): ``P | address of the child's slot``, nothing else
      (KVM ``mmu_alloc_shadow_roots``, arch/x86/kvm/mmu/mmu.c, v6.x: ``root | PT_PRESENT_MASK |
      shadow_me_value``; W/U/A are reserved in a PDPTE on real CPUs).
    * leaf spte of a gfn that is not write-tracked: the core's spte as it is (P, W, U, A, D, NX,
      host frame). The core's host pfn is already what the fill gives Unicorn (``VCPU._fill``:
      ``entry.paddr = hpa``).
    * leaf spte of a write-tracked gfn (``VmMmu.is_tracked``; what makes hw_fill answer
      FILL_TRACKED): frame ``ALIAS_BASE | hpa`` (the read-only alias of RAM, ``VCPU._fill``'s
      ``ALIAS_BASE + hpa``) and, when the guest may write the page (the ``writable`` that
      ``VmMmu.set_spte`` computed before it refused W for the tracking: guest W, guest D,
      host-writable), W=1 and D=1. A store through it then reaches UC_HOOK_MEM_WRITE_PROT with
      no exit (probe 4a) -- where hw_fill would answer FILL_TRACKED -- and a read reads RAM
      through the alias. D is preset so that the walker never writes the entry (the core's spte
      has W=0 and must get no D). Without that right the entry has W=0 (a store exits as a
      #PF, hw_fill then answers with a guest fault or a fix, as today). An entry installed
      without set_spte (tests' interleavings: mmu/lockless.py rmap_add_steps), or before the
      image was attached, counts as guest writable only if its spte has W: a store to it exits
      once, and the FILL_TRACKED fill records the right.
    The core's sptes are not changed by any of this (the alias bit lives only in the image).

How it is kept in sync: one mechanism, dirty entries and a sync point
    Attaching (``ShadowTableImage(vm)``) gives every shadow page and PAE root a slot and
    replaces its ``spt`` list by a ``list`` subclass whose ``__setitem__`` records the index as
    dirty -- so every spte write of every module (vm_mmu, vcpu_mmu, aging, lockless, oos_xen,
    unsync, policies) is seen, whatever local name it writes through. The core calls the
    image (after one ``vm.image is not None`` check, nothing else without an image) where a
    page is created (``VmMmu.get_page``, ``VcpuMmu._alloc_root``) or goes
    (``VmMmu.prepare_zap_page``, ``VcpuMmu._free_root``: its slot is zeroed and reused), where a
    gfn's write tracking starts or ends (``VmMmu.track_add`` / ``track_remove``: its leaf
    sptes are re-encoded, alias bit on or off) and where ``set_spte`` records the guest's
    write right. ``sync()`` encodes the dirty entries (and only those) into ``mem``. The
    hardware may walk the image only between ``sync()`` and the next exit.

Planes: one copy of the bytes per CPU
    Each CPU that walks the image (a vCPU under ``--tlb walker``) walks its own *plane*
    (``planes[k]``, ``add_plane()``; ``mem`` is plane 0's): the same slots and the same entries,
    but for leaves the CPU adapter's code/data split of frames, which is per vCPU (each has its
    own translated code and privileged-instruction scan): a plane's ``frame_kind``. A dirty
    entry is encoded into every plane at ``sync()``; the hardware A/D bits of every plane are
    harvested. (KVM's vCPUs share one set of shadow pages and walk the same bytes; the planes
    differ only by the split, which is ours.)

A/D bits set by the hardware: ``harvest_ad()``
    The walker sets A in a leaf it translates through and D in a W=1 leaf it writes through (probe
    4b; never in non-leaf or PAE-root entries, whose A is preset / absent). ``harvest_ad()``
    compares ``mem`` with the copy of what ``sync()`` wrote and ORs the A (and, on an entry
    whose core spte is writable, D) bits found into the core's sptes: what hw_fill does
    itself at a fill. Call it first at every exit, before the core reads or clears A/D (aging,
    audit) or changes an spte; then ``sync()`` before entering the guest again. Any other bit
    the hardware changed is an MMUError.

``cr3(vcpu)``: the CR3 the hardware needs for the vCPU's current root -- the slot of the PML4
shadow page (4-level guest) or of the PaeRoot (2-level and PAE guests; 32 bits, hence the
arena below 4 GiB: KVM allocates pae_root with __GFP_DMA32, mmu.c mmu_alloc_pae_root, v6.0+).
None with paging off (no shadow tables: stage 3 decides how that runs).
"""
from __future__ import annotations

from .. import layout
from .. import paging as pg
from .pages import PaeRoot
from .spte import SPTE_A, SPTE_D, SPTE_FRAME, SPTE_NX, SPTE_P, SPTE_U, SPTE_W
from .vm_mmu import MMUError

SLOT = 4096
_NONLEAF_BITS = SPTE_P | SPTE_W | SPTE_U | SPTE_A
_LEAF_BITS = SPTE_P | SPTE_W | SPTE_U | SPTE_A | SPTE_D | SPTE_NX | SPTE_FRAME
_AD = SPTE_A | SPTE_D
ALIAS = layout.ALIAS_BASE

KIND_LEAF, KIND_NONLEAF, KIND_PAE_ROOT = 1, 2, 3
# what a guest frame is used for, in the CPU adapter's state machine (cpu/vcpu.py page_kind,
# absent: data): the image's per-frame transform (frame_kind) reads it
FRAME_DATA, FRAME_CODE, FRAME_MIXED = 0, 1, 2


def _present_leaves(root, root_level):
    """(va, leaf page, index) of every present leaf spte reachable from a root (4-level: va
    sign-extended from bit 47)."""
    if root is None:
        return
    if root_level == 3:
        tops = [(i << 30, child, 2) for i, child in enumerate(root.children) if child is not None]
    else:
        tops = [(0, root, 4)]
    stack = tops
    while stack:
        base, sp, level = stack.pop()
        shift = 12 + 9 * (level - 1)
        if level == 1:
            spt = sp.spt
            for i in range(512):
                if spt[i] & SPTE_P:
                    va = base | (i << 12)
                    if va >> 47 & 1:
                        va |= 0xFFFF_0000_0000_0000
                    yield va, sp, i
            continue
        for i, child in enumerate(sp.children):
            if child is not None:
                stack.append((base | (i << shift), child, level - 1))


class _Spt(list):
    """A shadow page's spte list while an image is attached: a write also marks the entry dirty."""

    __slots__ = ("page", "slot", "kind", "dirty", "image", "gw")

    def __setitem__(self, i, v):
        list.__setitem__(self, i, v)
        d = self.dirty
        if not d:
            self.image._dirty.append(self)
        d.add(i)


class Plane:
    """One CPU's copy of the image (module docstring, "Planes"): the bytes it walks, the copy of
    what ``sync()`` wrote there (``harvest_ad``'s reference), and its code/data state of frames
    (pfn -> FRAME_CODE / FRAME_MIXED, absent: FRAME_DATA; cpu/vcpu.py page_kind), or None: no
    per-frame transform."""

    __slots__ = ("mem", "written", "q", "wq", "frame_kind")

    def __init__(self, nbytes: int, frame_kind=None):
        self.mem = bytearray(nbytes)
        self.written = bytearray(nbytes)
        self.q = memoryview(self.mem).cast("Q")
        self.wq = memoryview(self.written).cast("Q")
        self.frame_kind = frame_kind

    def grow(self, nbytes: int) -> None:
        """``nbytes`` more, zeroed (BufferError while a CPU maps the plane: it must not move)."""
        self.q.release()
        self.wq.release()
        try:
            self.mem.extend(bytes(nbytes))
            self.written.extend(bytes(nbytes))
        finally:
            self.q = memoryview(self.mem).cast("Q")
            self.wq = memoryview(self.written).cast("Q")

    def zero_slot(self, slot: int) -> None:
        off = slot * SLOT
        self.mem[off:off + SLOT] = bytes(SLOT)
        self.written[off:off + SLOT] = bytes(SLOT)


class ImageView:
    """Physical memory as the hardware walker sees it: the image (plane ``plane``) at its base,
    ``ram`` (any object with read64/write32, or None) elsewhere. What ``paging.walk`` needs
    (read64, write32 -- the walker's A/D stores)."""

    def __init__(self, image, ram=None, plane: int = 0):
        self.image = image
        self.ram = ram
        self.plane = plane

    def _off(self, addr, n):
        img = self.image
        off = addr - img.base
        if 0 <= off and off + n <= len(img.planes[self.plane].mem):
            return off
        return None

    def read64(self, addr):
        off = self._off(addr, 8)
        if off is not None:
            return int.from_bytes(self.image.planes[self.plane].mem[off:off + 8], "little")
        if self.ram is None:
            return 0
        return self.ram.read64(addr)

    def write32(self, addr, value):
        off = self._off(addr, 4)
        if off is not None:
            mem = self.image.planes[self.plane].mem
            mem[off:off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        elif self.ram is not None:
            self.ram.write32(addr, value)


class ShadowTableImage:
    """The x86-format image of ``vm``'s shadow tables (module docstring). Attaches itself
    (``vm.image``); ``detach()`` undoes it."""

    def __init__(self, vm, base: int = layout.SPT_ARENA_BASE, slots: int | None = None):
        if getattr(vm, "image", None) is not None:
            raise MMUError("an image is attached to this VM already")
        if base & (SLOT - 1) or base + SLOT > 1 << 32:
            raise ValueError("the arena must be 4 KiB aligned and start below 4 GiB")
        self.vm = vm
        self.base = base
        n = slots if slots is not None else vm.max_pages + 2 * layout.MAX_VCPUS + 8
        self.planes = [Plane(n * SLOT)]         # plane 0; add_plane() for more CPUs
        self._free = list(range(n - 1, -1, -1))  # slot numbers, lowest on top
        self._by_slot: dict = {}                # slot -> _Spt of the page that owns it
        self._dirty: list = []                  # _Spt with dirty entries
        self.grown = 0                          # times the arena had to grow (no slot free)
        vm.image = self
        for sp in vm.hash.values():
            self.page_created(sp)
        # (prepared zaps on vm.invalid_list are unlinked already: no slot)
        for v in vm.vcpus:
            if isinstance(v.root, PaeRoot):
                self.page_created(v.root)
        for spt in self._by_slot.values():      # everything present is dirty once
            for i, e in enumerate(spt):
                if e & SPTE_P:
                    spt.__setitem__(i, e)
        self.sync()

    # plane 0, which one CPU (or a test) walks
    @property
    def mem(self) -> bytearray:
        return self.planes[0].mem

    @property
    def _q(self):
        return self.planes[0].q

    @property
    def frame_kind(self):
        return self.planes[0].frame_kind

    @frame_kind.setter
    def frame_kind(self, kinds) -> None:
        self.planes[0].frame_kind = kinds

    def add_plane(self, frame_kind=None) -> int:
        """A plane for one more CPU (its own code/data state of frames), encoded from the core
        now; returns its index."""
        self.planes.append(Plane(len(self.planes[0].mem), frame_kind))
        self.reencode_all()
        self.sync()
        return len(self.planes) - 1

    def detach(self) -> None:
        """Back to plain lists; the core no longer calls the image."""
        for spt in self._by_slot.values():
            spt.page.spt = list(spt)
        self._by_slot.clear()
        self._dirty = []
        self.vm.image = None

    # ------------------------------------------------------------------ slots
    def _grow(self) -> None:
        n = len(self.mem) // SLOT
        for p in self.planes:
            p.grow(n * SLOT)
        self._free.extend(range(2 * n - 1, n - 1, -1))
        self.grown += 1

    def slot_addr(self, page) -> int:
        """Guest-physical address of page's slot (KeyError-like MMUError without one)."""
        spt = page.spt
        if not isinstance(spt, _Spt) or spt.slot < 0:
            raise MMUError(f"{page} has no slot in the image")
        return self.base + spt.slot * SLOT

    def page_created(self, page) -> None:
        """A new shadow page or PaeRoot: a zeroed slot, its spt list watched."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        for p in self.planes:
            p.zero_slot(slot)
        spt = _Spt(page.spt)
        spt.page = page
        spt.slot = slot
        if isinstance(page, PaeRoot):
            spt.kind = KIND_PAE_ROOT
        else:
            spt.kind = KIND_LEAF if page.role.level == 1 else KIND_NONLEAF
        spt.dirty = set(i for i, e in enumerate(spt) if e)
        spt.image = self
        spt.gw = {}                              # leaf: idx -> (gfn, guest may write)
        if spt.dirty:
            self._dirty.append(spt)
        page.spt = spt
        self._by_slot[slot] = spt

    def page_gone(self, page) -> None:
        """A shadow page was prepared for zapping (unlinked from every parent in the core) or a
        PaeRoot dropped: its slot is zeroed and free. The image's parents still point at it
        until the next sync() re-encodes them (the core cleared them: they are dirty)."""
        spt = page.spt
        if not isinstance(spt, _Spt) or spt.slot < 0:
            return
        slot = spt.slot
        spt.slot = -1
        spt.dirty = set()
        del self._by_slot[slot]
        for p in self.planes:
            p.zero_slot(slot)
        self._free.append(slot)
        page.spt = list(spt)                     # (a zapped page's later writes: not watched)

    # ------------------------------------------------------------------ hooks of the core
    def guest_writable(self, sp, idx, gfn, writable) -> None:
        """VmMmu.set_spte: the guest (and host) would let this spte be writable; whether it is
        depends on the write tracking (the alias encoding's W)."""
        spt = sp.spt
        if isinstance(spt, _Spt):
            spt.gw[idx] = (gfn, writable)
            d = spt.dirty
            if not d:
                self._dirty.append(spt)
            d.add(idx)

    def gfn_retracked(self, gfn) -> None:
        """gfn's write tracking started or ended: its leaf sptes change encoding."""
        for sp, idx in self.vm.rmap.get(gfn, ()):
            spt = sp.spt
            if isinstance(spt, _Spt):
                d = spt.dirty
                if not d:
                    self._dirty.append(spt)
                d.add(idx)

    def frame_changed(self, gfn) -> None:
        """gfn's code/data state (``frame_kind``) changed: its leaf sptes change encoding."""
        self.gfn_retracked(gfn)

    def reencode_all(self) -> None:
        """Every present entry dirty (a new ``frame_kind``, or its contents reset)."""
        for spt in self._by_slot.values():
            d = spt.dirty
            was = bool(d)
            d.update(i for i, e in enumerate(list.__iter__(spt)) if e & SPTE_P)
            if d and not was:
                self._dirty.append(spt)

    # ------------------------------------------------------------------ encoding
    def encode_leaf(self, spt, idx, transform: bool = True, plane: int = 0) -> int:
        """The image entry of leaf spt[idx] in plane ``plane`` (``transform`` False: without
        the code/data split of the plane's ``frame_kind``: what the hardware would be allowed
        through the spte alone, the same in every plane)."""
        e = self._leaf_entry(spt, idx)
        if transform and e:
            return self._split(e, list.__getitem__(spt, idx), self.planes[plane].frame_kind)
        return e

    def _leaf_entry(self, spt, idx) -> int:
        """encode_leaf without the code/data split."""
        spte = list.__getitem__(spt, idx)
        if not spte & SPTE_P:
            spt.gw.pop(idx, None)
            return 0
        page = spt.page
        gfn = page.gfns[idx]
        e = spte & _LEAF_BITS
        if gfn in self.vm.write_track:
            rec = spt.gw.get(idx)
            writable = rec[1] if rec is not None and rec[0] == gfn else bool(spte & SPTE_W)
            e |= ALIAS
            if writable:
                e |= SPTE_W | SPTE_D
        return e

    @staticmethod
    def _split(e, spte, kinds) -> int:
        """A present leaf entry ``e`` (of core spte ``spte``) under a plane's ``frame_kind``."""
        if kinds is None:
            return e
        # the hardware-walk adapter's code/data split (cpu/vcpu.py, tlb="walker"): a data
        # frame's leaves NX (QEMU's inline store path needs a non-executable TLB entry,
        # docs/PERFORMANCE.md probe 4g), a code frame's without W (a store to it must exit
        # so that its translated code goes and it is scanned again); a mixed frame as the
        # spte is. The first fetch from a data frame / store to a code frame is a #PF the
        # adapter answers by flipping the frame (ours, not KVM's: KVM needs no such split)
        k = kinds.get((spte & SPTE_FRAME) >> 12, FRAME_DATA)
        if k == FRAME_DATA:
            return e | SPTE_NX
        if k == FRAME_CODE:
            return e & ~SPTE_W
        return e

    def encode_nonleaf(self, spt, idx) -> int:
        spte = list.__getitem__(spt, idx)
        if not spte & SPTE_P:
            return 0
        child = spt.page.children[idx]
        if child is None:
            raise MMUError(f"{spt.page}[{idx}] = {spte:#x} is present with no child")
        return (_NONLEAF_BITS if spt.kind == KIND_NONLEAF else SPTE_P) | self.slot_addr(child)

    def sync(self) -> int:
        """Encode every dirty entry into ``mem`` of every plane; returns how many entries were
        written (per plane)."""
        dirty = self._dirty
        if not dirty:
            return 0
        self._dirty = []
        planes = [(p.q, p.wq, p.frame_kind) for p in self.planes]
        leaf_entry = self._leaf_entry
        n = 0
        for spt in dirty:
            idxs = spt.dirty
            spt.dirty = set()
            if spt.slot < 0:
                continue
            b = spt.slot * 512
            if spt.kind == KIND_LEAF:
                for q, wq, _ in planes:
                    for i in idxs:
                        if q[b + i] != wq[b + i]:
                            # A/D the hardware set since the last sync/harvest on an entry the
                            # core rewrote: kept in the core (not dropped by the re-encode), as
                            # KVM's mmu_spte_update keeps the volatile A/D bits of the old spte
                            # (arch/x86/kvm/mmu/mmu.c, v6.x: spte_has_volatile_bits)
                            self._merge_hw(spt, i, q[b + i], wq[b + i])
                ents = [(b + i, leaf_entry(spt, i), (list.__getitem__(spt, i) & SPTE_FRAME) >> 12)
                        for i in idxs]
                for q, wq, kinds in planes:
                    for j, e, pfn in ents:
                        # (_split, inlined: this loop runs for every dirty entry)
                        if e and kinds is not None:
                            k = kinds.get(pfn, FRAME_DATA)
                            e = e | SPTE_NX if k == FRAME_DATA else (
                                e & ~SPTE_W if k == FRAME_CODE else e)
                        q[j] = e
                        wq[j] = e
            else:
                for i in idxs:
                    v = self.encode_nonleaf(spt, i)
                    for q, wq, _ in planes:
                        q[b + i] = v
                        wq[b + i] = v
            n += len(idxs)
        return n

    def _merge_hw(self, spt, i, now, was) -> bool:
        """OR the A/D bits the hardware set in leaf entry i (``now``, against ``was`` as
        written) into the core's spte, without marking it dirty; True if it gained a bit. Not
        when the core's spte no longer maps the frame the hardware went through."""
        diff = now ^ was
        if diff & ~_AD or now & diff != diff or spt.kind != KIND_LEAF:
            raise MMUError(f"the hardware changed {spt.page}[{i}] from {was:#x} to "
                           f"{now:#x} (only A/D of a leaf may change)")
        core = list.__getitem__(spt, i)
        add = diff & SPTE_A
        if diff & SPTE_D and core & SPTE_W:
            add |= SPTE_D
        if (core & SPTE_P and (core & SPTE_FRAME) == (was & SPTE_FRAME & ~ALIAS)
                and add & ~core):
            list.__setitem__(spt, i, core | add)
            return True
        return False

    # ------------------------------------------------------------------ the hardware's A/D
    def harvest_ad(self) -> int:
        """OR the A/D bits the hardware set in leaf entries (of every plane) into the core's
        sptes (module docstring); returns how many sptes gained a bit."""
        n = 0
        for p in self.planes:
            mem, written, q, wq = p.mem, p.written, p.q, p.wq
            for slot, spt in self._by_slot.items():
                off = slot * SLOT
                if mem[off:off + SLOT] == written[off:off + SLOT]:
                    continue
                b = slot * 512
                for i in range(512 if spt.kind != KIND_PAE_ROOT else 4):
                    now, was = q[b + i], wq[b + i]
                    if now == was:
                        continue
                    if spt.kind != KIND_LEAF:
                        raise MMUError(f"the hardware changed {spt.page}[{i}] from {was:#x} "
                                       f"to {now:#x} (only A/D of a leaf may change)")
                    if self._merge_hw(spt, i, now, was):
                        n += 1
                    # accounted for: a later sync() of this entry must not merge them again
                    # (the core may clear A after this, aging)
                    wq[b + i] = now
                    spt.__setitem__(i, list.__getitem__(spt, i))   # re-encode what the core holds
        return n

    # ------------------------------------------------------------------ checking
    def audit(self) -> list:
        """Problems (strings) between the core and a synced image: a live page or root
        without its slot, a slot owned by a dead page, an entry that differs from its encoding
        now. (The check the tests run besides their walks; costs a full re-encode.)"""
        out = []
        live = {id(sp): sp for sp in self.vm.hash.values()}
        for v in self.vm.vcpus:
            if isinstance(v.root, PaeRoot):
                live[id(v.root)] = v.root
        owners = {id(spt.page): spt for spt in self._by_slot.values()}
        for key, page in live.items():
            if key not in owners:
                out.append(f"{page} has no slot")
        for key, spt in owners.items():
            if key not in live:
                out.append(f"slot {spt.slot} is owned by {spt.page}, which is not live")
        if self._dirty:
            out.append(f"{len(self._dirty)} pages have entries not synced")
            return out
        for k, p in enumerate(self.planes):
            q = p.q
            where = f"plane {k}: " if len(self.planes) > 1 else ""
            for slot, spt in self._by_slot.items():
                leaf = spt.kind == KIND_LEAF
                b = slot * 512
                for i in range(len(spt)):
                    want = (self.encode_leaf(spt, i, plane=k) if leaf
                            else self.encode_nonleaf(spt, i))
                    if q[b + i] != want:
                        out.append(f"{where}{spt.page}[{i}]: image {q[b + i]:#x}, core "
                                   f"{list.__getitem__(spt, i):#x} encodes to {want:#x}")
        return out

    def hardware_context(self, vcpu):
        """The paging context the hardware walks the image with (None: paging off): 4-level or
        PAE at ``cr3(vcpu)``, CR0.WP=1 and EFER.NXE=1 as KVM forces them under shadow paging
        (vmx.c vmx_set_cr0 ``hw_cr0 |= X86_CR0_WP`` when !enable_ept, v5.15+;
        update_transition_efer; docs/PERFORMANCE.md item 4c)."""
        cr3 = self.cr3(vcpu)
        if cr3 is None:
            return None
        mode = pg.Mode.LONG if vcpu.root_level == 4 else pg.Mode.PAE
        return pg.PagingContext(mode, cr3, wp=True, nxe=True)

    def compare(self, vcpu, ram=None, plane: int = 0) -> list:
        """Problems (strings) between a synced image and the core for vcpu, through walks:
        every present leaf spte reachable from vcpu's root is walked in the image with
        ``paging.walk`` (hardware_context, no A/D set) and must translate to the same frame --
        ``ALIAS_BASE | hpa`` when the gfn is write-tracked -- with the spte's U and NX, and W
        as the spte's (untracked) or, tracked, W only where the guest's own tables let the
        store through (a guest walk for writing; not checked for out-of-sync leaf pages, whose
        guest ptes may have moved on). Not-present entries are ``audit()``'s part."""
        ctx = self.hardware_context(vcpu)
        if ctx is None:
            return []
        view = self.view(ram, plane)
        out = []
        vm = self.vm
        for va, sp, idx in _present_leaves(vcpu.root, vcpu.root_level):
            spte = sp.spt[idx]
            gfn = sp.gfns[idx]
            tracked = gfn in vm.write_track
            frame = (spte & SPTE_FRAME) | (ALIAS if tracked else 0)
            w = pg.walk(view, ctx, va, 0, set_ad=False)
            where = f"{va:#x} ({sp}[{idx}] = {spte:#x})"
            if not w.ok:
                out.append(f"{where}: the image faults (error {w.error_code:#x})")
                continue
            if w.gpa & ~0xFFF != frame:
                out.append(f"{where}: image frame {w.gpa & ~0xFFF:#x}, expected {frame:#x}")
            if w.user != bool(spte & SPTE_U) or w.nx != bool(spte & SPTE_NX):
                out.append(f"{where}: image U={w.user} NX={w.nx}")
            if not tracked:
                if w.writable != bool(spte & SPTE_W):
                    out.append(f"{where}: image W={w.writable}")
            elif spte & SPTE_W:
                out.append(f"{where}: a writable spte of a tracked gfn")
            elif w.writable and not sp.unsync:
                access = pg.PFERR_W | (pg.PFERR_U if spte & SPTE_U else 0)
                g = pg.walk(vcpu.mem, vcpu.ctx, va, access, set_ad=False)
                if not (g.ok and g.dirty):
                    out.append(f"{where}: the image lets a store through to the alias that "
                               "the guest's tables refuse (or that must set their D first)")
        return out

    # ------------------------------------------------------------------ for the hardware
    def cr3(self, vcpu):
        """The CR3 the hardware walks for vcpu's current root (None: paging off)."""
        root = vcpu.root
        if root is None:
            return None
        return self.slot_addr(root)

    def view(self, ram=None, plane: int = 0) -> ImageView:
        return ImageView(self, ram, plane)

    def live_slots(self) -> int:
        return len(self._by_slot)
