"""The shadow tables as an x86-format image (mmu/spt_image.py), sans CPU: the core is driven
with a bytearray of guest RAM (fills, faults, pte writes, zaps, unsync + resync, CR3 switches,
aging) and after each step the image is walked with the project's own walker (paging.walk, a
PAE or 4-level context at the image's CR3, over the image at its base plus RAM): for every page
and access, the image must translate exactly when hw_fill would hit a present spte with the
right (same frame -- through the alias for a write-tracked gfn -- same R/W/U/NX), must deny
what hw_fill would fault on, and must let a store to a tracked frame through (to the alias)
exactly where hw_fill would answer FILL_TRACKED without touching the guest. Each of the image's
hooks in the core is switched off once, and the check must then fail."""
import pytest

from x86shadow import events as ev
from x86shadow import layout
from x86shadow import paging as pg
from x86shadow.guesttables import GuestTables
from x86shadow.mmu import spt_image
from x86shadow.mmu.audit import audit
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spt_image import ShadowTableImage
from x86shadow.mmu.spte import SPTE_A, SPTE_D, SPTE_FRAME, SPTE_NX, SPTE_U, SPTE_W
from x86shadow.mmu.vcpu_mmu import FILL_OK, FILL_TRACKED
from x86shadow.mmu.requests import REQ_MMU_RELOAD
from x86shadow.mmu.vm_mmu import MMUError, VmMmu
from x86shadow.policies import POLICY_NAMES, make_policy

from pagetables import PWU, A, D, NX, P, U, W as PTE_W, Tables

LEGACY, PAE, LONG = pg.Mode.LEGACY, pg.Mode.PAE, pg.Mode.LONG
MODES = [LEGACY, PAE, LONG]
MODE_IDS = ["legacy", "pae", "long"]
R, W, X, US = 0, pg.PFERR_W, pg.PFERR_FETCH, pg.PFERR_U
ACCESSES = [R, W, X, US | R, US | W, US | X]
ALIAS = layout.ALIAS_BASE

DATA = 0x0030_0000
VA = 0x0040_0000              # VA + k * 0x1000 -> DATA + k * 0x1000, rights by k (below)
WIN = 0x0080_0000             # windows onto the leaf table (write-tracked frame)
BIG = 0x0100_0000             # a large guest page (direct shadow page)
HOLE = 0x0090_0000            # not mapped


class Rig:
    """One VM and vCPU over a bytearray, an image attached from the start."""

    def __init__(self, mode, policy=None, max_pages=None, attach=True, **ctxkw):
        self.mode = mode
        self.t = Tables(mode)
        self.ctxkw = ctxkw
        self.nxe = mode != LEGACY
        self.vm = VmMmu(self.t.mem, policy=policy, max_pages=max_pages)
        self.vm.events.subscribe(lambda _k, _f: audit(self.vm), (ev.EXIT,))
        self.mmu = self.vm.add_vcpu()
        self.image = ShadowTableImage(self.vm) if attach else None
        self.vas = []

    def ctx(self, t=None):
        t = t or self.t
        kw = dict(self.ctxkw)
        kw.setdefault("nxe", self.nxe)
        kw.setdefault("wp", True)
        if self.mode == PAE:
            return pg.PagingContext(PAE, t.cr3, pdptes=pg.load_pdptes(t.mem, t.cr3), **kw)
        return t.ctx(**kw)

    def start(self, t=None):
        self.mmu.set_context(self.ctx(t))

    def standard_map(self, t=None):
        """Pages of every kind of right, windows onto the leaf table, a large page."""
        t = t or self.t
        rights = [PWU, P | U, P | PTE_W | D, PWU | A | D, P | U | A]
        if self.nxe:
            rights.append(PWU | A | D | NX)
        leaves = [t.map(VA + k * 0x1000, DATA + k * 0x1000, r) for k, r in enumerate(rights)]
        pt = leaves[0] & ~0xFFF
        t.map(WIN, pt, PWU | A | D)               # writable, dirty window: alias W
        t.map(WIN + 0x1000, pt, P | U | A)        # read-only window: alias, no W
        t.map(WIN + 0x2000, pt, PWU | A)          # clean window: no W until the first store
        t.map(BIG, 0, PWU | A | D, level=2)
        self.vas = ([VA + k * 0x1000 for k in range(len(rights))]
                    + [WIN, WIN + 0x1000, WIN + 0x2000, BIG, BIG + 0x5000, HOLE])
        return leaves

    def fill_all(self, vas=None):
        for va in vas or self.vas:
            for acc in ACCESSES:
                self.mmu.hw_fill(va, acc)
        audit(self.vm)

    # ------------------------------------------------------------------ the comparison
    def image_ctx(self):
        cr3 = self.image.cr3(self.mmu)
        mode = LONG if self.mmu.root_level == 4 else PAE
        # the hardware state under shadow paging: CR0.WP=1, EFER.NXE=1 (docs/PERFORMANCE.md 4c)
        return pg.PagingContext(mode, cr3, wp=True, nxe=True)

    def image_walk(self, va, access, set_ad=False):
        return pg.walk(self.image.view(self.t.mem), self.image_ctx(), va, access, set_ad=set_ad)

    def check(self, vas=None):
        """Sync the image (as the adapter would before entering the guest), then compare it
        with the core for every page of ``vas`` and every access. Returns the problems. Runs
        hw_fill for the stores to tracked frames (so it may set a guest D bit)."""
        image, mmu, vm = self.image, self.mmu, self.vm
        mmu.hw_fill(HOLE, R)                  # (services a pending root reload, as a fill does)
        image.sync()
        problems = list(image.audit())
        cr3 = image.cr3(mmu)
        if mmu.root_level == 3 and cr3 >> 32:
            problems.append(f"PAE root above 4 GiB: {cr3:#x}")
        suspects = []
        for va in vas or self.vas:
            leaf = shadow_leaf(mmu.root, mmu.root_level, va)
            for acc in ACCESSES:
                w = self.image_walk(va, acc)
                hit = None
                if leaf is not None:
                    sp, idx = leaf
                    spte = sp.spt[idx]
                    tracked = vm.is_tracked(sp.gfns[idx])
                    frame = (spte & SPTE_FRAME) | (ALIAS if tracked else 0)
                    if not ((acc & US and not spte & SPTE_U) or (acc & W and not spte & SPTE_W)
                            or (acc & X and spte & SPTE_NX)):
                        hit = frame
                what = f"{va:#x} access {acc:#x}"
                if hit is not None:
                    if not w.ok:
                        problems.append(f"{what}: hw_fill hits ({hit:#x}), the image faults "
                                        f"(error {w.error_code:#x})")
                    elif w.gpa & ~0xFFF != hit:
                        problems.append(f"{what}: image frame {w.gpa & ~0xFFF:#x}, "
                                        f"hw_fill {hit:#x}")
                elif w.ok:
                    if leaf is not None and tracked and acc & W:
                        if w.gpa & ~0xFFF != frame:
                            problems.append(f"{what}: tracked store to {w.gpa:#x}, not to the "
                                            f"alias {frame:#x}")
                        suspects.append((va, acc, frame, True))
                    else:
                        problems.append(f"{what}: the image translates ({w.gpa:#x}) where "
                                        "hw_fill would fault")
                elif leaf is not None and tracked and acc & W:
                    suspects.append((va, acc, frame, False))
        # the tracked stores: the image lets one through (to the alias) exactly where hw_fill
        # answers FILL_TRACKED for that frame without touching the guest or the spte (runs
        # hw_fill: last)
        for va, acc, frame, _ in suspects:
            image.sync()                     # (after the previous one's hw_fill)
            leaf = shadow_leaf(mmu.root, mmu.root_level, va)
            if leaf is None:
                continue
            sp, idx = leaf
            w = self.image_walk(va, acc)
            through = w.ok
            before = bytes(self.t.buf)
            spte = sp.spt[idx]
            r = mmu.hw_fill(va, acc)
            # (a fault that rebuilt the spte -- CR0.WP=0's supervisor write -- or wrote the
            # guest's tables is a real exit: the image rightly faulted)
            untouched = (bytes(self.t.buf) == before
                         and sp.spt[idx] | SPTE_A | SPTE_D == spte | SPTE_A | SPTE_D)
            tracked_fill = r.kind == FILL_TRACKED and (r.addr | ALIAS) == frame
            if through and not (tracked_fill and untouched):
                problems.append(f"{va:#x} access {acc:#x}: the image lets the store through to "
                                f"the alias, hw_fill answers {r} (guest untouched: {untouched})")
            elif not through and tracked_fill and untouched:
                problems.append(f"{va:#x} access {acc:#x}: hw_fill answers FILL_TRACKED, the "
                                "image faults the store")
        image.sync()
        problems.extend(image.audit())
        problems.extend(image.compare(mmu, self.t.mem))
        return problems

    def ok(self, vas=None):
        problems = self.check(vas)
        assert not problems, "\n".join(problems)

    def translates(self, va, access=R):
        w = self.image_walk(va, access)
        return w.gpa & ~0xFFF if w.ok else None


def _entry(rig, va):
    """The image's leaf entry for va (hardware view), via the walk's record."""
    w = rig.image_walk(va, R)
    return w.ptes[w.level] if w.ok else None


# ---------------------------------------------------------------------------------------------
# the image follows the core

@pytest.mark.parametrize("wp", [True, False], ids=["wp1", "wp0"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_fills_faults_and_rights_match_hw_fill(mode, wp):
    g = Rig(mode, wp=wp)
    leaves = g.standard_map()
    g.start()
    g.ok()                                    # roots only: everything faults
    g.fill_all()
    g.ok()
    # the encoding itself
    assert g.translates(VA) == DATA
    assert g.translates(VA, US | W) == DATA   # filled for a user write: W, D
    assert g.translates(VA + 0x1000, W) is None            # read-only user page
    assert g.translates(VA + 0x2000, US) is None           # supervisor page
    if g.nxe:
        assert g.translates(VA + 0x5000, X) is None        # NX
    pt = leaves[0] & ~0xFFF
    assert g.vm.is_tracked(pt >> 12)
    assert g.translates(WIN) == ALIAS | pt and g.translates(WIN, W) == ALIAS | pt
    e = _entry(g, WIN)
    assert e & (SPTE_W | SPTE_D) == SPTE_W | SPTE_D      # D preset: the walker never writes it
    assert g.translates(WIN + 0x1000) == ALIAS | pt
    if wp:
        assert g.translates(WIN + 0x1000, W) is None
    else:
        # CR0.WP=0: the supervisor store was let through (spte made writable, supervisor-only:
        # the hardware runs with WP=1), to the alias; a user access faults and is re-checked
        assert g.translates(WIN + 0x1000, W) == ALIAS | pt
        assert g.translates(WIN + 0x1000, US) is None
    assert g.translates(BIG + 0x5000) == 0x5000
    assert g.translates(HOLE) is None
    cr3 = g.image.cr3(g.mmu)
    assert cr3 == g.image.slot_addr(g.mmu.root) and cr3 & 0xFFF == 0
    if mode == LONG:
        assert g.mmu.root_level == 4
    else:
        assert g.mmu.root_level == 3 and cr3 < 1 << 32
        # the PAE root's entries: P and the frame only
        ent = [g.image.view().read64(cr3 + 8 * i) for i in range(4)]
        assert all(e & 0xFFF in (0, P) and not e >> 52 for e in ent) and any(ent)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_pte_writes_zaps_and_the_clean_window(mode):
    g = Rig(mode)
    leaves = g.standard_map()
    g.start()
    # the clean window: no W in the image until a store's fault sets the guest's D
    assert g.mmu.hw_fill(VA, R).kind == FILL_OK          # (the leaf table is shadowed)
    assert g.mmu.hw_fill(WIN + 0x2000, R).kind == FILL_OK
    g.image.sync()
    assert g.translates(WIN + 0x2000) == ALIAS | (leaves[0] & ~0xFFF)
    assert g.translates(WIN + 0x2000, W) is None
    g.ok([WIN + 0x2000])                 # (its hw_fill of the store sets the guest's D)
    assert g.mmu.hw_fill(WIN + 0x2000, W).kind == FILL_TRACKED
    g.ok([WIN + 0x2000])
    assert g.translates(WIN + 0x2000, W) == ALIAS | (leaves[0] & ~0xFFF)
    g.fill_all()
    g.ok()
    # an emulated guest pte write: the spte goes, the image faults there until the refill
    g.t.wr(leaves[0], 0x0031_0000 | PWU)
    g.mmu.pte_write(leaves[0], g.t.esz)
    g.ok()
    assert g.translates(VA) is None
    g.fill_all()
    g.ok()
    assert g.translates(VA) == 0x0031_0000
    # unprotect: every shadow of the leaf table is zapped, the frame no longer tracked -- the
    # windows' sptes stay (read-only) but leave the alias
    pt = leaves[0] & ~0xFFF
    slots = g.image.live_slots()
    assert g.vm.unprotect(pt >> 12)
    assert not g.vm.is_tracked(pt >> 12)
    g.ok()
    assert g.image.live_slots() < slots
    assert g.translates(WIN + 0x1000) == pt                # no alias any more
    assert g.translates(VA) is None
    g.fill_all()
    g.ok()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_frame_becoming_a_page_table_moves_its_sptes_to_the_alias(mode):
    g = Rig(mode)
    g.standard_map()
    frame = 0x0070_0000
    g.t.map(0x0060_0000, frame, PWU | A | D)               # data page, written first
    g.t.map(0x0061_0000, frame, P | U | A)                 # and a read-only view of it
    g.start()
    g.fill_all([0x0060_0000, 0x0061_0000])
    g.ok([0x0060_0000, 0x0061_0000])
    assert g.translates(0x0061_0000) == frame
    # the guest links the frame as a page table and touches an address through it
    g.t.buf[frame:frame + 0x1000] = bytes(4096)
    g.t.wr(g.t.slot(0x00C0_0000, 2), frame | PWU)
    g.t.wr(frame, DATA | PWU)
    g.fill_all([0x00C0_0000])
    vas = [0x0060_0000, 0x0061_0000, 0x00C0_0000]
    g.ok(vas)
    assert g.translates(0x0061_0000) == ALIAS | frame       # an unchanged spte, re-encoded
    assert g.translates(0x0060_0000, W) == ALIAS | frame


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_cr3_switches_and_cached_roots(mode):
    g = Rig(mode)
    g.standard_map()
    t2 = GuestTables(mode, g.t.mem, 0x0058_0000, 0x0060_0000)
    for k in range(4):
        t2.map(VA + k * 0x1000, 0x0020_0000 + k * 0x1000, PWU | A | D)
    vas2 = [VA + k * 0x1000 for k in range(4)] + [HOLE]
    g.start()
    g.fill_all()
    g.ok()
    cr3a = g.image.cr3(g.mmu)
    g.start(t2)
    g.ok(vas2)
    assert g.translates(VA) is None
    g.fill_all(vas2)
    g.ok(vas2)
    assert g.translates(VA) == 0x0020_0000
    cr3b = g.image.cr3(g.mmu)
    # 4-level: another PML4 shadow page; PAE root: the vCPU's one 4-entry root is rebuilt in
    # the same slot (as KVM keeps mmu->pae_root)
    assert (cr3b != cr3a) == (mode == LONG)
    g.start()                                               # back: the cached shadow pages
    g.ok()
    assert g.translates(VA, US | W) == DATA                 # no fault needed: reused sptes
    g.fill_all()
    g.ok()
    if mode == PAE:
        # the guest rewrites a PDPTE in use: the root is rebuilt (VcpuMmu._refresh_pdptes)
        pdpte_gpa = g.t.cr3 & ~0x1F
        g.t.mem.write64(pdpte_gpa + 8, g.t.mem.read64(pdpte_gpa))
        g.mmu.pte_write(pdpte_gpa + 8, 8)
        g.ok()
        g.fill_all([0x4000_0000 + VA])
        g.ok(g.vas + [0x4000_0000 + VA])
        assert g.translates(0x4000_0000 + VA) == DATA


def test_recycling_reuses_slots():
    """With few shadow pages allowed, pages are zapped and created over and over: slots are
    reused, the arena does not grow, the image stays right."""
    g = Rig(LONG, max_pages=64)
    vas = []
    for k in range(120):                     # 120 leaf tables (one per 2 MiB)
        va = 0x4000_0000 + k * 0x20_0000
        g.t.map(va, DATA + (k % 16) * 0x1000, PWU | A | D)
        vas.append(va)
    g.start()
    for round_ in range(2):
        for va in vas:
            g.mmu.hw_fill(va, W)
        g.ok(vas[-20:] + [HOLE])
    assert g.vm.counters["mmu_recycled"] > 50
    assert g.image.grown == 0 and g.image.live_slots() <= 64 + 1


def test_attaching_to_a_running_vm_and_detaching():
    g = Rig(PAE, attach=False)
    g.standard_map()
    g.start()
    g.fill_all()
    g.image = ShadowTableImage(g.vm)
    # the one thing an image attached late does not know: which tracked sptes the guest may
    # write (set_spte's record); those stores exit once, and hw_fill's FILL_TRACKED records it
    problems = g.check()
    assert problems and all(p.endswith("hw_fill answers FILL_TRACKED, the image faults the store")
                            for p in problems)
    g.ok()
    g.image.detach()
    assert g.vm.image is None and all(type(sp.spt) is list for sp in g.vm.pages())
    g.fill_all()                             # the core runs on without it
    g.image = ShadowTableImage(g.vm)         # and a new one starts from what is there
    with pytest.raises(MMUError):
        ShadowTableImage(g.vm)               # one image per VM
    g.check()
    g.ok()


# ---------------------------------------------------------------------------------------------
# out-of-sync pages

@pytest.mark.parametrize("policy,unsync_on", [("kvm", True), ("kvm-2008-oos", True),
                                              ("xen-oos", None)])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_unsync_and_resync(mode, policy, unsync_on):
    g = Rig(mode, policy=make_policy(policy, unsync_on))
    leaves = g.standard_map()
    pt = leaves[0] & ~0xFFF
    g.start()
    g.fill_all([VA, VA + 0x3000, WIN + 0x1000])
    vas = [VA, VA + 0x3000, WIN, WIN + 0x1000, WIN + 0x2000, HOLE]
    g.ok(vas)
    # a store through the writable window: the leaf table may go out of sync (its spte W, the
    # frame no longer tracked: the image's window entry is RAM, writable)
    r = g.mmu.hw_fill(WIN, W)
    g.ok(vas)
    if r.kind == FILL_OK:
        assert g.translates(WIN, W) == pt
        slot = leaves[3]
        g.t.wr(slot, 0x0032_0000 | PWU | A | D)          # the guest's native store
        g.ok(vas)
        assert g.translates(VA + 0x3000) == DATA + 0x3000   # stale until the guest flushes
    else:
        assert r.kind == FILL_TRACKED
    g.start()                                             # CR3 reload: resync
    g.ok(vas)
    g.fill_all(vas)
    g.ok(vas)
    if r.kind == FILL_OK:
        assert g.translates(VA + 0x3000) == 0x0032_0000
    g.mmu.invlpg(VA)
    g.ok(vas)


# ---------------------------------------------------------------------------------------------
# the hardware's A/D bits

@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_harvest_ad_brings_the_walkers_bits_to_the_core(mode):
    g = Rig(mode)
    leaves = g.standard_map()
    g.start()
    g.mmu.hw_fill(VA + 0x3000, R)          # dirty writable pte, read fault: W=1 D=0 spte
    g.mmu.hw_fill(WIN, R)
    sp, idx = shadow_leaf(g.mmu.root, g.mmu.root_level, VA + 0x3000)
    assert sp.spt[idx] & SPTE_W and not sp.spt[idx] & SPTE_D
    wsp, widx = shadow_leaf(g.mmu.root, g.mmu.root_level, WIN)
    sp.spt[idx] &= ~SPTE_A                 # aged (mmu/aging.py clears A so)
    wsp.spt[widx] &= ~SPTE_A
    g.ok([VA + 0x3000, WIN])
    assert g.image.harvest_ad() == 0
    # the hardware walks: a write through the data page, a read and a trapped store (alias)
    # through the window
    assert g.image_walk(VA + 0x3000, W, set_ad=True).ok
    assert g.image_walk(WIN, R, set_ad=True).ok
    assert g.image_walk(WIN, W, set_ad=True).ok
    assert g.image.harvest_ad() == 2
    assert sp.spt[idx] & (SPTE_A | SPTE_D) == SPTE_A | SPTE_D
    assert wsp.spt[widx] & SPTE_A and not wsp.spt[widx] & (SPTE_D | SPTE_W)
    g.ok([VA + 0x3000, WIN])
    assert g.image.harvest_ad() == 0
    # only A/D of a leaf may change
    cr3 = g.image.cr3(g.mmu)
    view = g.image.view()
    view.write32(cr3, view.read64(cr3) ^ 0x800)
    with pytest.raises(MMUError):
        g.image.harvest_ad()


def test_aging_through_the_image():
    """kvm_age_gfn clears A in the core; the image follows; the walker's A, harvested, makes
    the page young again."""
    g = Rig(PAE)
    g.standard_map()
    g.start()
    g.fill_all()
    g.ok()
    gfn = DATA >> 12
    from x86shadow.mmu import aging as ag
    aging = ag.Aging(g.vm)
    assert aging.clear_young([gfn])
    g.ok()
    assert not aging.test_young([gfn])
    assert all(not _entry(g, va) & SPTE_A for va in [VA])
    g.image_walk(VA, R, set_ad=True)
    g.image.harvest_ad()
    assert aging.test_young([gfn])
    g.ok()


# ---------------------------------------------------------------------------------------------
# the check can fail: each hook of the image switched off in turn

def _scenario(g):
    leaves = g.standard_map()
    frame = 0x0070_0000
    g.t.map(0x0061_0000, frame, P | U | A)
    g.start()
    g.fill_all([0x0061_0000] + g.vas)
    problems = g.check([0x0061_0000] + g.vas)
    g.t.buf[frame:frame + 0x1000] = bytes(4096)
    g.t.wr(g.t.slot(0x00C0_0000, 2), frame | PWU)          # the frame becomes a page table
    g.t.wr(frame, DATA | PWU)
    g.fill_all([0x00C0_0000])
    g.t.wr(leaves[0], 0x0031_0000 | PWU)                    # a pte write
    g.mmu.pte_write(leaves[0], g.t.esz)
    g.vm.unprotect(leaves[0] >> 12)                         # a zap, untracking
    g.fill_all()
    g.start()
    return problems + g.check([0x0061_0000, 0x00C0_0000] + g.vas)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_the_scenario_passes_with_every_hook(mode):
    assert _scenario(Rig(mode)) == []


@pytest.mark.parametrize("broken", ["spte writes", "retrack", "guest writable", "page gone"])
def test_the_check_fails_when_the_image_misses_an_update(broken, monkeypatch):
    if broken == "spte writes":
        monkeypatch.setattr(spt_image._Spt, "__setitem__", list.__setitem__)
    elif broken == "retrack":
        monkeypatch.setattr(ShadowTableImage, "gfn_retracked", lambda self, gfn: None)
    elif broken == "guest writable":
        monkeypatch.setattr(ShadowTableImage, "guest_writable", lambda self, *a: None)
    else:
        monkeypatch.setattr(ShadowTableImage, "page_gone", lambda self, page: None)
    problems = _scenario(Rig(LONG))
    assert problems


# ---------------------------------------------------------------------------------------------
# the guest programs: the image beside the Unicorn adapter's shadow MMU, compared at exits

def run_program_with_image(path, mode, every=1, policy="kvm", host=None, vcpus=1):
    """Run a guestcode program under the shadow MMU with an image attached; at every exit the
    image is synced (what the hardware-walk adapter will do before entering the guest), and
    at every ``every``-th exit and at the end audited and compared with the core. Returns
    (result, output, counts, problems). ``host``: a machine.HostConfig (pfn != gfn, swapping,
    migration, KSM under the run)."""
    from x86shadow.asm import assemble_firmware, assemble_program
    from x86shadow.machine import Machine
    ram = 128
    program = assemble_program(str(path), mode, ram << 20)
    m = Machine(mode, mmu="shadow", policy=policy, ram_mib=ram, host=host, vcpus=vcpus)
    image = ShadowTableImage(m.vm_mmu)
    state = {"exits": 0, "checked": 0, "synced": 0}
    problems = []

    def check_all():
        state["checked"] += 1
        cr3s = set()
        for v in m.vcpus:
            mmu = v.mmu
            if mmu.root is None or mmu.requests & REQ_MMU_RELOAD:
                continue
            cr3s.add(image.cr3(mmu))
            problems.extend(f"exit {state['exits']}: {p}" for p in image.compare(mmu))
        problems.extend(f"exit {state['exits']}: {p}" for p in image.audit())
        state["roots"] = max(state.get("roots", 0), len(cr3s))

    def on_exit(_kind, _fields):
        state["exits"] += 1
        state["synced"] += image.sync()
        if state["exits"] % every == 0 and len(problems) < 20:
            check_all()

    m.events.subscribe(on_exit, (ev.EXIT,))
    m.load(program, assemble_firmware(mode, ram << 20))
    result = m.run()
    image.sync()
    check_all()
    return result, bytes(m.output), state, problems


def _programs():
    import pathlib
    from x86shadow.asm import program_modes
    root = pathlib.Path(__file__).resolve().parent.parent / "guestcode"
    for path in sorted(root.glob("*.asm")):
        for mode in ("32", "pae", "64"):
            if mode in program_modes(path):
                yield pytest.param(path, mode, id=f"{path.stem}-{mode}")


@pytest.mark.parametrize("name", ["ptwrites", "cr3_switch", "selfmap"])
@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_guest_programs_image_matches_the_core_at_every_exit(name, mode):
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "guestcode" / f"{name}.asm"
    result, out, state, problems = run_program_with_image(path, mode)
    assert result.status == 0 and out.endswith(b"PASS\n"), out
    assert not problems, "\n".join(problems[:20])
    assert state["checked"] > 10


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_several_vcpus_each_root_its_own_slot(mode):
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "guestcode" / "smp_unsync.asm"
    result, out, state, problems = run_program_with_image(path, mode, vcpus=3)
    assert result.status == 0 and out.endswith(b"PASS\n"), out
    assert not problems, "\n".join(problems[:20])
    assert state["checked"] > 10
    if mode != "64":
        assert state["roots"] == 3          # a PAE root (and slot) per vCPU


@pytest.mark.slow
@pytest.mark.parametrize("path,mode", list(_programs()))
def test_every_guest_program_image_matches_the_core(path, mode):
    result, out, state, problems = run_program_with_image(path, mode)
    assert result.status == 0 and out.endswith(b"PASS\n"), out
    assert not problems, "\n".join(problems[:20])


@pytest.mark.slow
@pytest.mark.parametrize("variant", [p for p in POLICY_NAMES if p != "kvm"] + ["host"])
@pytest.mark.parametrize("path,mode", list(_programs()))
def test_every_guest_program_image_matches_the_core_under_every_policy_and_a_host(path, mode,
                                                                                  variant):
    from x86shadow.machine import HostConfig
    if variant == "host":
        kw = {"host": HostConfig(schedule="swap:7,migrate:11,ksm:53,reclaim:13,age:17", seed=3)}
    else:
        kw = {"policy": variant}
    result, out, state, problems = run_program_with_image(path, mode, **kw)
    assert result.status == 0 and out.endswith(b"PASS\n"), out
    assert not problems, "\n".join(problems[:20])
