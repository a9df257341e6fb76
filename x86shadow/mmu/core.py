"""The shadow MMU proper — independent of any CPU emulator (a "sans-CPU" core).

It is driven by three calls that a CPU adapter (or a test with a bytearray) makes:

* ``set_context(ctx)`` whenever CR0/CR3/CR4/EFER change (root switch, like KVM's mmu reload);
* ``hw_fill(va, access)`` where the hardware would walk the (shadow) page tables on a TLB miss: it
  walks our shadow tables and, on a miss or missing right, runs the shadow page-fault handler
  (``page_fault``) — which walks the guest tables, sets guest A/D bits, builds shadow pages and
  write-protects the guest tables it shadows — exactly the round trip of a KVM shadow #PF exit;
* ``pte_write(gpa, size, value)`` after a guest store to a write-protected guest page table has been
  completed (emulated): the one pte-write path where the policies of DESIGN.md 3 plug in.

Structure follows KVM's pre-unsync shadow MMU (arch/x86/kvm/mmu.c, 2.6.25-2.6.27): shadow pages
hashed by (gfn, role), ``rmap`` from gfn to the leaf sptes mapping it, ``kvm_mmu_get_page`` write-
protecting every frame it starts shadowing, ``FNAME(fetch)`` linking non-leaf sptes and creating
direct pages for guest large pages, ``mmu_set_spte`` refusing W on shadowed frames and on clean
(D=0) guest ptes, ``kvm_mmu_zap_page`` unlinking children and parents.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

from .. import paging as pg
from .pages import (ENTRIES, SPTE_A, SPTE_D, SPTE_FRAME, SPTE_NONLEAF, SPTE_NX, SPTE_P, SPTE_U,
                    SPTE_W, PaeRoot, Role, ShadowPage)

# results of hw_fill (the second element of the returned tuple)
FILL_OK = 0          # (gpa_page, perms): map it
FILL_TRACKED = 1     # write to a write-protected guest page table: route the store to the trap
FILL_GUEST_FAULT = 2  # guest #PF; error code in mmu.pending_error_code
FILL_NO_MEMORY = 3   # the translation points outside guest RAM

PERM_R, PERM_W, PERM_X = 1, 2, 4     # same values as Unicorn's UC_PROT_*
ACC_ALL = pg.ACC_X | pg.ACC_W | pg.ACC_U

COUNTER_NAMES = (
    "exits", "pf_fixed", "pf_guest", "pf_spurious", "pf_emulate", "invlpg", "tlb_flush",
    "insn_emulation", "insn_emulation_fail", "io_exits", "halt_exits", "irq_injections",
    "mmu_shadow_zapped", "mmu_pte_write", "mmu_pte_updated", "mmu_pde_zapped", "mmu_flooded",
    "mmu_recycled", "mmu_cache_miss", "mmu_unsync", "remote_tlb_flush", "mmu_unprotect",
    "emulate_ahead", "wp_faults", "guest_insns",
)


def new_counters() -> dict:
    return {name: 0 for name in COUNTER_NAMES}


def _entry_access(mode, pte) -> int:
    """ACC_* rights one guest paging entry grants."""
    acc = 0
    if pte & pg.PTE_W:
        acc |= pg.ACC_W
    if pte & pg.PTE_U:
        acc |= pg.ACC_U
    if not (pte & pg.PTE_NX):
        acc |= pg.ACC_X
    return acc


class MMUError(Exception):
    """An internal inconsistency (reported, never silently ignored)."""


class ShadowMMU:
    def __init__(self, mem, counters=None, trace=None, max_pages=None):
        self.mem = mem
        self.c = counters if counters is not None else new_counters()
        self.trace = trace                       # callable(event: str, **fields) or None
        self.ctx = pg.PagingContext(pg.Mode.OFF, 0)
        self.hash: dict = {}                     # (gfn, role) -> ShadowPage, in creation order
        self.shadowed = defaultdict(int)         # gfn -> number of non-direct shadow pages of it
        self.sps_by_gfn = defaultdict(set)       # gfn -> {ShadowPage} (non-direct only)
        self.rmap = defaultdict(set)             # gfn -> {(ShadowPage, index)} leaf sptes mapping gfn
        self.root = None                         # ShadowPage (4-level) / PaeRoot / None (paging off)
        self.pdpt_gfn = None                     # PAE: frame of the PDPT in use (write-tracked)
        self.root_level = 0
        self.root_invalid = False
        self.need_flush = False                  # the CPU's TLB must be flushed before the guest runs
        self.pending_error_code = 0
        self.pending_vector = 14                 # 14 (#PF) or 13 (#GP: non-canonical address)
        self.next_id = 0
        self.ram_frames = mem.size >> 12
        self.max_pages = max_pages or max(64, (self.ram_frames * 20) // 1000)   # KVM: 2% of RAM pages
        self.policy = None                       # set by the machine (x86shadow.policies)
        self.after_exit = None                   # callable run after each MMU exit (the audit)
        self.rmw_probe = None                    # callable: is the current insn a memory RMW?

    # ------------------------------------------------------------------ context and roots
    def set_context(self, ctx: pg.PagingContext) -> None:
        """New CR0/CR3/CR4/EFER state: drop the old root, load (or reuse) the new one."""
        self._free_root()
        self.ctx = ctx
        self.pdpt_gfn = (ctx.cr3 & 0xFFFFFFE0) >> 12 if ctx.mode == pg.Mode.PAE else None
        if self.pdpt_gfn is not None:
            self.write_protect(self.pdpt_gfn)
        self._alloc_root()
        self.need_flush = True
        if self.after_exit is not None:
            self.after_exit()

    def _role(self, level, direct, access, va=0) -> Role:
        ctx = self.ctx
        gsize = 4 if ctx.mode == pg.Mode.LEGACY else 8
        quadrant = 0
        if not direct and gsize == 4:
            # kvm_mmu_get_page: which part of the 1024-entry guest table this 512-entry page shadows
            quadrant = (va >> (12 + 9 * level)) & ((1 << level) - 1)
        return Role(level, direct, access, gsize, quadrant, ctx.wp, ctx.smep, ctx.nxe)

    def _alloc_root(self) -> None:
        ctx = self.ctx
        self.root_invalid = False
        if ctx.mode == pg.Mode.OFF:
            self.root, self.root_level = None, 0
            return
        if ctx.mode == pg.Mode.LONG:
            sp = self.get_page(ctx.cr3 >> 12 & 0xFFFFFFFFFF, 0, 4, False, ACC_ALL)
            sp.root_count += 1
            self.root, self.root_level = sp, 4
            return
        root = PaeRoot()
        for i in range(4):
            if ctx.mode == pg.Mode.PAE:
                pdpte = ctx.pdptes[i]
                if not pdpte & pg.PTE_P:
                    continue
                gfn = (pdpte & 0x000F_FFFF_FFFF_F000) >> 12
            else:
                gfn = (ctx.cr3 & 0xFFFFF000) >> 12
            sp = self.get_page(gfn, i << 30, 2, False, ACC_ALL)
            sp.root_count += 1
            self._link(root, i, sp)
        self.root, self.root_level = root, 3

    def _free_root(self) -> None:
        root = self.root
        if root is None:
            return
        if isinstance(root, PaeRoot):
            for i in range(4):
                sp = root.children[i]
                if sp is not None:
                    sp.root_count -= 1
                    sp.parents.discard((root, i))
                    root.children[i] = None
                    root.spt[i] = 0
        else:
            root.root_count -= 1
        self.root = None

    def _refresh_pdptes(self) -> bool:
        """The guest wrote its PDPT. Real CPUs (and KVM) keep using the PDPTEs cached at the last
        CR3 load, but Unicorn's own walker -- our guest-visible reference, --mmu native -- reads
        them from memory at every TLB miss. To give the same guest-visible result the PDPT frame
        is write-tracked while it is in use, and a change reloads the root as a CR3 load would."""
        fresh = pg.load_pdptes(self.mem, self.ctx.cr3, strict=False)
        if fresh == tuple(self.ctx.pdptes):
            return False
        self._free_root()
        self.ctx = dataclasses.replace(self.ctx, pdptes=fresh)
        self._alloc_root()
        self.need_flush = True
        if self.trace:
            self.trace("kvm_mmu_reload_pdptes", cr3=self.ctx.cr3, pdptes=list(fresh))
        return True

    def reload_root_if_needed(self) -> None:
        if self.root_invalid:
            self._free_root()
            self._alloc_root()
            self.need_flush = True

    # ------------------------------------------------------------------ shadow pages
    def get_page(self, gfn, va, level, direct, access) -> ShadowPage:
        """kvm_mmu_get_page: find or create the shadow page for (gfn, role)."""
        role = self._role(level, direct, access, va)
        key = (gfn, role)
        sp = self.hash.get(key)
        if sp is not None:
            return sp
        self.c["mmu_cache_miss"] += 1
        if len(self.hash) >= self.max_pages:
            self._recycle()
        sp = ShadowPage(self.next_id, gfn, role)
        self.next_id += 1
        self.hash[key] = sp
        if not direct:
            self.sps_by_gfn[gfn].add(sp)
            self.shadowed[gfn] += 1
            if self.shadowed[gfn] == 1:
                self.write_protect(gfn)
        if self.trace:
            self.trace("kvm_mmu_get_page", gfn=gfn, level=level, direct=direct, quadrant=role.quadrant,
                       access=access, created=True, sp=sp.id)
        return sp

    def _recycle(self) -> None:
        """KVM's kvm_mmu_free_some_pages: zap the oldest page that is not a root."""
        for sp in list(self.hash.values()):
            if not sp.root_count:
                self.c["mmu_recycled"] += 1
                self.zap_page(sp, reason="recycled")
                return

    def _link(self, parent, idx, child) -> None:
        parent.spt[idx] = SPTE_NONLEAF | (child.id << 12)
        parent.children[idx] = child
        child.parents.add((parent, idx))

    def write_protect(self, gfn) -> None:
        """rmap_write_protect: make every spte that maps gfn read-only."""
        changed = False
        for sp, idx in self.rmap.get(gfn, ()):
            spte = sp.spt[idx]
            if spte & SPTE_W:
                sp.spt[idx] = spte & ~SPTE_W
                changed = True
        if changed:
            self.need_flush = True

    def is_tracked(self, gfn) -> bool:
        """Writes to gfn must be trapped: it is a shadowed guest page table (or the PDPT)."""
        return gfn in self.shadowed or gfn == self.pdpt_gfn

    def is_shadowed(self, gfn) -> bool:
        return gfn in self.shadowed

    def zap_page(self, sp: ShadowPage, reason: str = "") -> None:
        """kvm_mmu_zap_page: unlink children and parents, drop from the hash."""
        if sp.zapped:
            return
        self.c["mmu_shadow_zapped"] += 1
        if self.trace:
            self.trace("kvm_mmu_prepare_zap_page", sp=sp.id, gfn=sp.gfn, level=sp.role.level,
                       direct=sp.role.direct, quadrant=sp.role.quadrant, reason=reason)
        spt = sp.spt
        if sp.role.level == 1:
            for idx in range(ENTRIES):
                spte = spt[idx]
                if spte & SPTE_P:
                    self._rmap_remove(spte, sp, idx)
                    spt[idx] = 0
        else:
            children = sp.children
            for idx in range(ENTRIES):
                child = children[idx]
                if child is not None:
                    child.parents.discard((sp, idx))
                    children[idx] = None
                    spt[idx] = 0
        for parent, idx in sp.parents:
            parent.spt[idx] = 0
            parent.children[idx] = None
        sp.parents.clear()
        del self.hash[(sp.gfn, sp.role)]
        if not sp.role.direct:
            self.sps_by_gfn[sp.gfn].discard(sp)
            if not self.sps_by_gfn[sp.gfn]:
                del self.sps_by_gfn[sp.gfn]
            self.shadowed[sp.gfn] -= 1
            if not self.shadowed[sp.gfn]:
                del self.shadowed[sp.gfn]
        sp.zapped = True
        if self.policy is not None:
            self.policy.on_zap(self, sp)
        if sp.root_count:
            self.root_invalid = True
        self.need_flush = True

    def unprotect(self, gfn, reason: str = "") -> bool:
        """kvm_mmu_unprotect_page: zap every shadow of the guest table at gfn; the guest then writes
        the frame natively until a fault shadows it again."""
        sps = list(self.sps_by_gfn.get(gfn, ()))
        if not sps:
            return False
        self.c["mmu_unprotect"] += 1
        if self.trace:
            self.trace("kvm_mmu_unprotect", gfn=gfn, pages=len(sps), reason=reason)
        for sp in sps:
            self.zap_page(sp, reason="unprotect")
        return True

    # ------------------------------------------------------------------ rmap
    def _rmap_remove(self, spte, sp, idx) -> None:
        gfn = (spte & SPTE_FRAME) >> 12
        s = self.rmap.get(gfn)
        if s is not None:
            s.discard((sp, idx))
            if not s:
                del self.rmap[gfn]

    def drop_spte(self, sp, idx) -> None:
        """mmu_page_zap_pte: clear one spte (leaf: rmap_remove; non-leaf: unlink the child)."""
        spte = sp.spt[idx]
        if not spte & SPTE_P:
            return
        if sp.role.level == 1:
            self._rmap_remove(spte, sp, idx)
        else:
            child = sp.children[idx]
            child.parents.discard((sp, idx))
            sp.children[idx] = None
        sp.spt[idx] = 0
        self.need_flush = True

    def set_spte(self, sp, idx, gfn, pte_access, dirty, write_fault, user_fault, speculative=False) -> bool:
        """mmu_set_spte: install a leaf spte. Returns True if the faulting write must be emulated
        (the frame is a shadowed guest page table)."""
        # no A bit, speculative or not: the "hardware" (hw_fill) sets it when an access through
        # the spte succeeds -- an access that faults on a write-protected page table does not
        # (K25 mmu_set_spte never sets it either: "we sometimes want to see whether the guest
        # actually used the pte")
        spte = SPTE_P
        if pte_access & pg.ACC_U:
            spte |= SPTE_U
        if not pte_access & pg.ACC_X:
            spte |= SPTE_NX
        writable = bool(pte_access & pg.ACC_W)
        if (write_fault and not user_fault and not sp.role.cr0_wp and not writable):
            # CR0.WP=0: a supervisor write to a read-only page is allowed; KVM makes the spte
            # writable and supervisor-only so that a later user access faults and is re-checked.
            writable = True
            spte &= ~SPTE_U
        if writable and not dirty:
            writable = False                      # dirty tracking: read-only until the first write
        emulate = False
        if writable and (gfn in self.shadowed or gfn == self.pdpt_gfn):
            writable = False
            emulate = write_fault
        if writable:
            spte |= SPTE_W
            if write_fault:
                spte |= SPTE_D
        spte |= gfn << 12
        old = sp.spt[idx]
        if old & SPTE_P:
            if (old & SPTE_FRAME) != (spte & SPTE_FRAME):
                self._rmap_remove(old, sp, idx)
                self.rmap[gfn].add((sp, idx))
                self.need_flush = True
            elif old & SPTE_W and not spte & SPTE_W:
                self.need_flush = True
        else:
            self.rmap[gfn].add((sp, idx))
        sp.spt[idx] = spte
        if self.policy is not None:
            self.policy.on_spte_installed(self, sp, idx, gfn, speculative, emulate)
        return emulate

    # ------------------------------------------------------------------ the "hardware" walk
    def hw_fill(self, va: int, access: int):
        """TLB miss at va with access (PFERR_W/U/FETCH bits): walk the shadow tables as the MMU
        hardware would, setting spte A/D; on a miss run the shadow page-fault handler.

        Returns (gpa_page, perms, kind): kind FILL_OK / FILL_TRACKED / FILL_GUEST_FAULT /
        FILL_NO_MEMORY.
        """
        if self.root_invalid:
            self.reload_root_if_needed()
        root = self.root
        if root is None:
            gpa = va & 0xFFFFFFFF_FFFFF000 if self.ctx.mode == pg.Mode.OFF else va
            if (gpa >> 12) >= self.ram_frames:
                return gpa, 0, FILL_NO_MEMORY
            return gpa, PERM_R | PERM_W | PERM_X, FILL_OK
        for _attempt in range(4):
            leaf = self._shadow_walk(va)
            if leaf is not None:
                sp, idx = leaf
                spte = sp.spt[idx]
                ok = True
                if access & pg.PFERR_U and not spte & SPTE_U:
                    ok = False
                elif access & pg.PFERR_W and not spte & SPTE_W:
                    ok = False
                elif access & pg.PFERR_FETCH and spte & SPTE_NX:
                    ok = False
                elif (not access & (pg.PFERR_W | pg.PFERR_FETCH) and self.rmw_probe is not None
                      and (spte & SPTE_FRAME) >> 12 in self.shadowed and self.rmw_probe()):
                    # the read half of a read-modify-write (lock btr ...) of a write-protected
                    # page table: hardware translates it once, for writing, and faults without
                    # setting the spte's A bit -- so do we
                    access |= pg.PFERR_W
                    ok = False
                if ok:
                    spte |= SPTE_A
                    if access & pg.PFERR_W:
                        spte |= SPTE_D
                    sp.spt[idx] = spte
                    perms = PERM_R
                    if spte & SPTE_W and spte & SPTE_D:
                        perms |= PERM_W
                    if not spte & SPTE_NX:
                        perms |= PERM_X
                    gfn = (spte & SPTE_FRAME) >> 12
                    if gfn >= self.ram_frames:
                        return gfn << 12, 0, FILL_NO_MEMORY
                    return gfn << 12, perms, FILL_OK
            kind = self.page_fault(va, access)
            if kind == FILL_GUEST_FAULT:
                return 0, 0, FILL_GUEST_FAULT
            if kind == FILL_TRACKED:
                leaf = self._shadow_walk(va)
                spte = leaf[0].spt[leaf[1]]
                perms = PERM_R | PERM_W | (0 if spte & SPTE_NX else PERM_X)
                return spte & SPTE_FRAME, perms, FILL_TRACKED
            if kind == FILL_NO_MEMORY:
                return 0, 0, FILL_NO_MEMORY
        raise MMUError(f"shadow fault at {va:#x} (access {access:#x}) not fixed after 4 attempts")

    def _shadow_walk(self, va):
        """Follow the shadow tables to the leaf spte for va: (sp, index) if present, else None."""
        node = self.root
        level = self.root_level
        if level == 3:
            node = node.children[(va >> 30) & 3]
            if node is None:
                return None
            level = 2
        while level > 1:
            node = node.children[(va >> (12 + 9 * (level - 1))) & 511]
            if node is None:
                return None
            level -= 1
        idx = (va >> 12) & 511
        if node.spt[idx] & SPTE_P:
            return node, idx
        return None

    # ------------------------------------------------------------------ the shadow page fault
    def page_fault(self, va: int, access: int) -> int:
        """FNAME(page_fault): walk the guest tables; inject, or build the shadow mapping.

        A fault that ends in FILL_TRACKED (a write to a write-protected guest page table) is not
        counted here: the trapped store that follows is the exit (DESIGN.md 2.3 wp_faults)."""
        policy = self.policy
        for _ in range(3):
            w = pg.walk(self.mem, self.ctx, va, access)
            if w.ok and w.set_dirty and policy is not None and policy.walker_dirty_is_pte_write:
                pte_gpa = w.pte_gpa[w.level]
                if pte_gpa >> 12 in self.shadowed:
                    # 2.6.25's walker sets D with a cmpxchg and calls kvm_mmu_pte_write itself
                    self.pte_write(pte_gpa, 4 if self.ctx.mode == pg.Mode.LEGACY else 8)
            if not w.ok:
                self.c["exits"] += 1
                self.c["pf_guest"] += 1
                self.pending_error_code = w.error_code
                self.pending_vector = w.vector
                if self.trace:
                    self.trace("kvm_page_fault", address=va, error_code=access, result="inject",
                               guest_error_code=w.error_code, vector=w.vector)
                if policy is not None:
                    policy.on_guest_fault(self)
                return FILL_GUEST_FAULT
            if (w.gpa >> 12) >= self.ram_frames:
                return FILL_NO_MEMORY
            r = self._fetch(va, w, access)
            if r is not None:
                break
            # a guest pte changed while we write-protected its table (FNAME(fetch) returned NULL)
        else:
            raise MMUError(f"guest page tables keep changing under the fault at {va:#x}")
        if r == FILL_TRACKED:
            if self.trace:
                self.trace("kvm_page_fault", address=va, error_code=access, result="write-protected",
                           gpa=w.gpa)
            return r
        self.c["exits"] += 1
        self.c["pf_fixed"] += 1
        if policy is not None:
            policy.on_fault_fixed(self)
        if self.trace:
            self.trace("kvm_page_fault", address=va, error_code=access, result="fixed", gpa=w.gpa)
        if self.after_exit is not None:
            self.after_exit()
        return r

    def _fetch(self, va, w, access):
        """FNAME(fetch): link shadow pages down to the leaf and install the leaf spte."""
        if self.root_invalid:
            self.reload_root_if_needed()      # a root was zapped on the way here (flood)
        mode = self.ctx.mode
        glevel = w.level                 # guest leaf level (1, 2 = 2M/4M, 3 = 1G)
        node = self.root
        level = self.root_level
        acc = ACC_ALL
        if level == 3:
            # PAE root: entries were linked at CR3 load; a 2-level guest's directory is always there
            i = (va >> 30) & 3
            node = node.children[i]
            if node is None:
                raise MMUError(f"no shadow for PDPTE {i} although the guest walk succeeded")
            level = 2
        while True:
            node.write_flooding_count = 0     # modern KVM: a guest fault walked through this page
            idx = (va >> (12 + 9 * (level - 1))) & 511
            if level == 1:
                break
            child = node.children[idx]
            if child is None:
                if level - 1 < glevel:
                    # guest large page: a direct shadow page of 4 KiB sptes
                    span = 1 << (9 * (level - 1))
                    gfn = (w.gpa >> 12) & ~(span - 1)
                    child = self.get_page(gfn, va, level - 1, True, w.pte_access)
                else:
                    gl = level        # the guest entry at this level points to the table we shadow
                    for L in range(w.root_level, gl - 1, -1):   # rights of the entries above it
                        if not (mode == pg.Mode.PAE and L == 3):  # PAE PDPTEs carry no rights
                            acc &= _entry_access(mode, w.ptes[L])
                    table_gfn = pg.entry_frame(mode, gl, w.ptes[gl]) >> 12
                    child = self.get_page(table_gfn, va, level - 1, False, acc)
                    # the guest pte may have changed while we write-protected the table
                    cur = (self.mem.read32(w.pte_gpa[gl]) if mode == pg.Mode.LEGACY
                           else self.mem.read64(w.pte_gpa[gl]))
                    if (cur | pg.PTE_A | pg.PTE_D) != (w.ptes[gl] | pg.PTE_A | pg.PTE_D):
                        return None
                self._link(node, idx, child)
            node = child
            level -= 1
        gfn = w.gpa >> 12
        dirty = bool(w.dirty)
        emulate = self.set_spte(node, idx, gfn, w.pte_access & node.role.access if not node.role.direct
                                else w.pte_access, dirty, bool(access & pg.PFERR_W),
                                bool(access & pg.PFERR_U))
        return FILL_TRACKED if emulate else FILL_OK

    # ------------------------------------------------------------------ invlpg and pte writes
    def invlpg(self, va: int) -> None:
        """The guest invalidated va. Every write to a shadowed guest table is trapped and applied
        to the shadow at once, so the sptes are already in sync: like KVM before out-of-sync
        pages (2.6.25 had no invlpg hook at all; later FNAME(invlpg) only syncs unsync pages) and
        Xen 3.3 without OOS, nothing is dropped. (The CPU's TLB entry goes: Unicorn executes the
        invlpg itself.) Out-of-sync pages (DESIGN.md 5) will resync here."""
        self.c["invlpg"] += 1
        if self.trace:
            self.trace("kvm_mmu_invlpg", address=va)
        if self.after_exit is not None:
            self.after_exit()

    def affected_sptes(self, sp, offset, size):
        """The shadow entries of sp that shadow guest bytes [offset, offset+size) of its page,
        honouring quadrants and 2-level directories (one 4 MiB guest PDE = two shadow PDEs)."""
        gsize = sp.role.gpte_size
        out = []
        for gi in range(offset // gsize, (offset + size - 1) // gsize + 1):
            if gi * gsize >= 4096:
                break
            if gsize == 4:
                if sp.role.level == 1:
                    quadrant, sidx, n = gi >> 9, gi & 511, 1
                else:
                    quadrant, sidx, n = gi >> 8, (gi & 255) * 2, 2
                if quadrant != sp.role.quadrant:
                    continue
                out.extend(range(sidx, sidx + n))
            else:
                out.append(gi)
        return out

    def pte_write(self, gpa: int, size: int, insn=None) -> None:
        """The one pte-write path: the store [gpa, gpa+size) to a write-tracked frame has been
        completed in guest RAM; bring the shadow pages of that frame up to date. How (drop the
        affected sptes, re-install them, zap the whole page as misaligned or flooded) is the
        policy's (x86shadow.policies); without one the affected sptes are dropped."""
        gfn, offset = gpa >> 12, gpa & 0xFFF
        if gfn == self.pdpt_gfn:
            base = self.ctx.cr3 & 0xFE0
            if offset < base + 32 and offset + size > base:
                self._refresh_pdptes()
        if gfn not in self.shadowed:
            return
        self.c["mmu_pte_write"] += 1
        if self.policy is not None:
            self.policy.pte_write(self, gpa, size, insn)
        else:
            self.drop_written_sptes(gpa, size)
        if self.after_exit is not None:
            self.after_exit()

    def drop_written_sptes(self, gpa, size, sps=None):
        """Drop every spte that shadows the written guest bytes (counting mmu_pde_zapped for
        non-leaf ones); the next access through them faults and re-reads the guest pte."""
        offset = gpa & 0xFFF
        for sp in (self.shadow_pages_of(gpa >> 12) if sps is None else sps):
            if sp.zapped:
                continue
            for idx in self.affected_sptes(sp, offset, size):
                if sp.role.level > 1:
                    self.c["mmu_pde_zapped"] += 1
                self.drop_spte(sp, idx)

    def shadow_pages_of(self, gfn):
        return list(self.sps_by_gfn.get(gfn, ()))

    # ------------------------------------------------------------------ helpers for tests/audit
    def pages(self):
        return list(self.hash.values())

    def take_flush(self) -> bool:
        f = self.need_flush
        self.need_flush = False
        return f
