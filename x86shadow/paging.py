"""Guest paging formats and the guest page-table walker (pure Python, no Unicorn).

The walker reproduces, rule for rule, the walker of the CPU our differential reference runs on:
QEMU's x86 softmmu walker as built into unicorn 2.1.4 (QEMU 5.0, ``target/i386/excp_helper.c``,
``handle_mmu_fault``).  The shadow MMU calls :func:`walk` where the hardware would walk the guest's
tables, so the guest-visible side effects (accessed/dirty bits, #PF error code, CR2) must come out
exactly as unicorn's own MMU (``UC_TLB_CPU``) leaves them.  tests/test_paging.py runs the same
tables and accesses on unicorn and on this walker and compares error codes and every byte of RAM.

Facts about unicorn 2.1.4's CPU, established by probing:

- CPUID 0x80000008: EAX = 0x3028 -> MAXPHYADDR = 40 (QEMU's ``TCG_PHYS_ADDR_BITS``; the walker's
  reserved-bit mask ``PG_HI_RSVD_MASK`` is compiled from that constant, not read from CPUID).
  Our walker takes MAXPHYADDR from the context (``PagingContext.maxphyaddr``, the CPU model's:
  ``--cpu ...,phys-bits=N``, shadow MMU only): bits 51:MAXPHYADDR of an entry's address are
  reserved, as KVM's ``rsvd_bits(maxphyaddr, 51)`` in ``reset_rsvds_bits_mask``
  (arch/x86/kvm/mmu/mmu.c, Linux 6.18) and SDM vol. 3A 4.4.2/4.5.4 say.
- CPUID 0x80000001 EDX bit 26 (Page1GB) is clear, yet QEMU's walker accepts 1 GiB pages in every
  long-mode PDPTE with PS=1 (it never consults the CPUID bit).  We do the same.
- CPUID 1 EDX: PSE, PAE, PSE-36 present; CPUID 7 EBX: SMEP present, SMAP absent (unicorn drops
  CR4.SMAP and CR4.PKE on write, so those rules never fire in the reference).
- A paging-structure read outside guest RAM returns 0 (-> not-present fault); we also drop A/D
  stores there.
- PAE: ``mov cr3`` never #GPs, whatever the PDPTEs hold; the PDPTEs are re-read from memory at
  every TLB miss (a PDPTE rewritten after the CR3 load is used at once); see :func:`load_pdptes`.

Where real Intel hardware differs (the walker follows QEMU):

- PAE PDPTEs: Intel loads and checks them at CR3 load (#GP on bits 2:1, 8:5, 63:MAXPHYADDR) and
  caches them; QEMU checks only bits 63:MAXPHYADDR, at walk time, as a #PF with RSVD|P.
- Intel: PS in a PDPTE is reserved on CPUs without Page1GB (QEMU: 1 GiB page).
- A bits on faulting walks: QEMU sets A in each non-leaf entry as soon as that entry passed its
  checks, even if the walk then faults, and sets A in a 1 GiB leaf before the permission checks.
  Intel leaves the A/D updates of a faulting walk implementation-specific (KVM's own guest walker
  writes them only after a successful walk).
- 4 MiB PSE-36 pages: QEMU checks only bit 21 whatever MAXPHYADDR is (Intel also reserves PDE bits
  20:(MAXPHYADDR-19); with MAXPHYADDR = 40 there are none).
- Non-canonical long-mode addresses: #GP(0) (for stack accesses Intel raises #SS; QEMU's walker
  does not know the segment).
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

__all__ = [
    "PTE_P", "PTE_W", "PTE_U", "PTE_PWT", "PTE_PCD", "PTE_A", "PTE_D", "PTE_PS", "PTE_G", "PTE_PAT",
    "PTE_PAT_LARGE", "PTE_NX",
    "PFERR_P", "PFERR_W", "PFERR_U", "PFERR_RSVD", "PFERR_FETCH",
    "ACC_X", "ACC_W", "ACC_U", "ACC_ALL",
    "MAXPHYADDR", "HAS_1G_PAGES", "ADDR_MASK",
    "Mode", "PagingContext", "PdpteError", "Walk",
    "load_pdptes", "walk", "entry_frame", "pte_size", "index_bits", "levels", "rsvd_mask",
    "pse36_rsvd_mask",
    "pdpte_rsvd_mask", "va_mask",
]

# --------------------------------------------------------------------------------------------
# entry bits
PTE_P, PTE_W, PTE_U, PTE_PWT, PTE_PCD, PTE_A, PTE_D, PTE_PS, PTE_G = 1, 2, 4, 8, 16, 32, 64, 128, 256
PTE_PAT = 128               # bit 7 in a 4 KiB pte (same bit as PS one level up)
PTE_PAT_LARGE = 1 << 12     # PAT bit of a 2M/4M/1G leaf (never a reserved or address bit)
PTE_NX = 1 << 63

# #PF error code bits; also used as the requested-access bitmask of walk()
PFERR_P, PFERR_W, PFERR_U, PFERR_RSVD, PFERR_FETCH = 1, 2, 4, 8, 16

# combined access rights (KVM's ACC_EXEC_MASK / ACC_WRITE_MASK / ACC_USER_MASK).  Note that
# ACC_W == PTE_W and ACC_U == PTE_U, which the walker relies on.
ACC_X, ACC_W, ACC_U = 1, 2, 4
ACC_ALL = ACC_X | ACC_W | ACC_U

MAXPHYADDR = 40             # unicorn 2.1.4: CPUID 0x80000008 EAX[7:0] = 0x28 (probed)
HAS_1G_PAGES = True         # what QEMU's walker does (CPUID says no; see module docstring)

ADDR_MASK = 0x000FFFFFFFFFF000      # QEMU PG_ADDRESS_MASK: bits 51:12 of an 8-byte entry
_U64 = 0xFFFFFFFFFFFFFFFF
_HI_USER = 0x7FF0000000000000       # bits 62:52 (QEMU PG_HI_USER_MASK)
_LOW_2M = 0x1FE000                  # bits 20:13: must be 0 in a 2 MiB leaf (bit 12 is PAT)
_LOW_1G = 0x3FFFE000                # bits 29:13: must be 0 in a 1 GiB leaf
_PSE36_HI = 0x1FE000                # bits 20:13 of a 4 MiB PDE = physical address bits 39:32
_PDPTE_INTEL_RSVD_LOW = 0x1E6       # bits 8:5 and 2:1 of a PAE PDPTE (Intel; QEMU ignores them)

_CR0_WP, _CR0_PG = 1 << 16, 1 << 31
_CR4_PSE, _CR4_PAE, _CR4_SMEP, _CR4_SMAP = 1 << 4, 1 << 5, 1 << 20, 1 << 21
_EFER_NXE, _EFER_LMA = 1 << 11, 1 << 10

_PAGE_SIZE = (0, 1 << 12, 1 << 21, 1 << 30)            # by level, 8-byte formats
_SHIFT64 = (0, 12, 21, 30, 39)


class Mode(enum.IntEnum):
    """Guest paging mode; the value is the number of guest levels (PAE counts the PDPTE level)."""
    OFF = 0
    LEGACY = 2      # 32-bit 2-level paging, 4-byte entries, optional 4 MiB PSE(-36) pages
    PAE = 3         # 32-bit PAE paging: 4 PDPTEs, 8-byte PD/PT entries, 2 MiB pages
    LONG = 4        # 4-level paging: 2 MiB and 1 GiB pages


def _hi_rsvd(maxphyaddr: int) -> int:
    """QEMU PG_HI_RSVD_MASK: address bits 51:MAXPHYADDR."""
    return ADDR_MASK & ~((1 << maxphyaddr) - 1)


def pse36_rsvd_mask(maxphyaddr: int = MAXPHYADDR) -> int:
    """Reserved bits of a 4 MiB PSE-36 PDE: bit 21 and bits 20:(MAXPHYADDR-19) (SDM vol. 3A
    4.3, table 4-4; address bits 39:32 sit in PDE bits 20:13). With MAXPHYADDR 40 (QEMU's) that
    is bit 21 alone, the one bit QEMU checks."""
    low = min(maxphyaddr, 40) - 19
    return ((1 << 22) - 1) & ~((1 << low) - 1)


def rsvd_mask(mode: Mode, level: int, nxe: bool, large: bool = False, maxphyaddr: int = MAXPHYADDR) -> int:
    """Reserved bits of a present entry at ``level`` as QEMU checks them (a set bit -> #PF RSVD|P).

    ``large``: the entry has PS=1 and is a leaf (2 MiB PDE, 1 GiB PDPTE, 4 MiB PSE PDE).
    LEGACY 4 KiB ptes and PDEs have no reserved bits; PAE PDPTEs: see :func:`pdpte_rsvd_mask`.
    """
    if mode == Mode.LEGACY:
        return pse36_rsvd_mask(maxphyaddr) if (level == 2 and large) else 0
    if mode == Mode.PAE and level == 3:
        return pdpte_rsvd_mask(maxphyaddr)
    m = _hi_rsvd(maxphyaddr)
    if not nxe:
        m |= PTE_NX
    if mode == Mode.PAE:
        m |= _HI_USER           # PAE: bits 62:52 too, so 62:MAXPHYADDR in all (as Intel)
    if mode == Mode.LONG and level == 4:
        m |= PTE_PS
    if large:
        m |= _LOW_2M if level == 2 else _LOW_1G
    return m


def pdpte_rsvd_mask(maxphyaddr: int = MAXPHYADDR, intel: bool = False) -> int:
    """Reserved bits of a present PAE PDPTE.

    QEMU (``intel=False``): bits 63:MAXPHYADDR (NX is always reserved there), checked at every walk
    and reported as a #PF with RSVD|P.  Intel (``intel=True``) also reserves bits 8:5 and 2:1 and
    checks them when CR3 is loaded (#GP), see :func:`load_pdptes`.
    """
    m = _U64 & ~((1 << maxphyaddr) - 1)
    if intel:
        m |= _PDPTE_INTEL_RSVD_LOW
    return m


class PdpteError(Exception):
    """A present PAE PDPTE has reserved bits set: on Intel the CR3 write raises #GP(0)."""

    def __init__(self, index: int, value: int):
        super().__init__("PDPTE %d = %#x has reserved bits set" % (index, value))
        self.index = index
        self.value = value


@dataclass(frozen=True, slots=True)
class PagingContext:
    mode: Mode
    cr3: int
    wp: bool = False        # CR0.WP
    pse: bool = False       # CR4.PSE (matters in LEGACY only)
    smep: bool = False      # CR4.SMEP
    smap: bool = False      # CR4.SMAP (unicorn drops it; rule kept, assuming EFLAGS.AC = 0)
    nxe: bool = False       # EFER.NXE (NX is a reserved bit when clear, in PAE/LONG)
    # PAE only: the PDPTEs cached at CR3 load (Intel/KVM); () = read them from memory at every
    # walk, which is what QEMU/unicorn does -- use () to match the reference exactly
    pdptes: tuple = ()
    maxphyaddr: int = MAXPHYADDR
    lma: bool = False       # EFER.LMA; only matters with paging off (QEMU: 64-bit identity map)
    # derived, precomputed once per context: (rsvd, rsvd_root, pdpte_rsvd, fetch_err_bit)
    _m: tuple = field(init=False, repr=False, compare=False, hash=False, default=())
    # derived: the reserved bits of a present 4 KiB pte (rsvd_mask(mode, 1, nxe)), 0 in LEGACY
    pte_rsvd: int = field(init=False, repr=False, compare=False, hash=False, default=0)

    def __post_init__(self):
        mode = self.mode
        if mode == Mode.LEGACY or mode == Mode.OFF:
            rsvd4 = 0               # LEGACY: rsvd is the 4 MiB PDE's (4 KiB entries have none)
            rsvd = pse36_rsvd_mask(self.maxphyaddr)
        else:
            rsvd = rsvd_mask(mode, 1, self.nxe, maxphyaddr=self.maxphyaddr)
            rsvd4 = rsvd_mask(Mode.LONG, 4, self.nxe, maxphyaddr=self.maxphyaddr)
        pdrsvd = pdpte_rsvd_mask(self.maxphyaddr)
        # QEMU sets I/D only if ((EFER.NXE and CR4.PAE) or CR4.SMEP); Intel documents the same rule
        idbit = PFERR_FETCH if ((self.nxe and mode >= Mode.PAE) or self.smep) else 0
        object.__setattr__(self, "_m", (rsvd, rsvd4, pdrsvd, idbit))
        object.__setattr__(self, "pte_rsvd", rsvd if mode >= Mode.PAE else 0)
        if self.pdptes and len(self.pdptes) != 4:
            raise ValueError("pdptes must hold 4 entries (or be empty)")

    @classmethod
    def from_regs(cls, cr0: int, cr3: int, cr4: int, efer: int, pdptes=(), *,
                  maxphyaddr: int = MAXPHYADDR) -> "PagingContext":
        """Mode from CR0.PG, CR4.PAE, EFER.LMA (as QEMU decides it); ``maxphyaddr``: the CPU
        model's (CPUID 0x80000008 EAX[7:0]), which places the reserved address bits."""
        lma = bool(efer & _EFER_LMA)
        if not cr0 & _CR0_PG:
            mode = Mode.OFF
        elif not cr4 & _CR4_PAE:
            mode = Mode.LEGACY
        elif lma:
            mode = Mode.LONG
        else:
            mode = Mode.PAE
        return cls(mode, cr3, wp=bool(cr0 & _CR0_WP), pse=bool(cr4 & _CR4_PSE),
                   smep=bool(cr4 & _CR4_SMEP), smap=bool(cr4 & _CR4_SMAP), nxe=bool(efer & _EFER_NXE),
                   pdptes=tuple(pdptes) if mode == Mode.PAE else (), maxphyaddr=maxphyaddr,
                   lma=lma)

    @property
    def root_level(self) -> int:
        return int(self.mode)


def load_pdptes(mem, cr3: int, *, strict: bool = True, maxphyaddr: int = MAXPHYADDR) -> tuple:
    """Read the 4 PAE PDPTEs at CR3[31:5], as a CPU does when CR3 is loaded in PAE mode.

    ``strict`` (Intel): raise :class:`PdpteError` if a present PDPTE has a reserved bit set (bits
    2:1, 8:5, 63:MAXPHYADDR) -- the CR3 write would #GP(0).

    QEMU 5.0 / unicorn 2.1.4 does NOT do this: it neither loads nor checks the PDPTEs on a CR3
    write (no #GP ever); its walker reads the PDPTE from memory on every TLB miss, ignores bits
    8:5/2:1 (and the PDPTE's R/W and U/S), never sets its A bit, and turns bits 63:MAXPHYADDR into
    a #PF with RSVD|P.  To match unicorn, a CR3-write handler must not inject #GP: use
    ``strict=False`` (or do not cache at all: ``PagingContext(pdptes=())``).
    """
    base = cr3 & 0xFFFFFFE0
    out = []
    for i in range(4):
        try:
            e = mem.read64(base + 8 * i)
        except struct.error:
            e = 0
        out.append(e)
    if strict:
        bad = pdpte_rsvd_mask(maxphyaddr, intel=True)
        for i, e in enumerate(out):
            if e & PTE_P and e & bad:
                raise PdpteError(i, e)
    return tuple(out)


def pte_size(mode) -> int:
    """Bytes per guest paging entry: 4 for LEGACY, 8 for PAE and LONG."""
    return 4 if mode == Mode.LEGACY else 8


def levels(mode) -> int:
    """Number of guest paging levels (root level)."""
    return int(mode)


def va_mask(mode) -> int:
    """Linear addresses wrap at 4 GiB outside long mode."""
    return _U64 if mode == Mode.LONG else 0xFFFFFFFF


def index_bits(mode, level: int):
    """(shift, mask): the table at ``level`` is indexed by ``(va >> shift) & mask``."""
    if mode == Mode.LEGACY:
        if level == 1:
            return 12, 0x3FF
        if level == 2:
            return 22, 0x3FF
    elif mode == Mode.PAE:
        if level == 3:
            return 30, 0x3
        if level in (1, 2):
            return _SHIFT64[level], 0x1FF
    elif mode == Mode.LONG:
        if 1 <= level <= 4:
            return _SHIFT64[level], 0x1FF
    raise ValueError("no level %d in mode %s" % (level, Mode(mode).name))


def entry_frame(mode, level: int, pte: int, pse: bool = True) -> int:
    """Physical base address an entry points to (a table, a 4 KiB page, or a large page).

    A PS=1 entry at level 2 (and at level 3 in LONG) is taken as a large-page leaf; in LEGACY only
    when ``pse`` (CR4.PSE) is set, else PS is ignored there.  LEGACY 4 MiB pages use PSE-36:
    PDE bits 20:13 give physical address bits 39:32.
    """
    if mode == Mode.LEGACY:
        if level == 2 and pte & PTE_PS and pse:
            return (pte & 0xFFC00000) | ((pte & _PSE36_HI) << 19)
        return pte & 0xFFFFF000
    if pte & PTE_PS:
        if level == 2:
            return pte & ADDR_MASK & ~0x1FFFFF
        if level == 3 and mode == Mode.LONG:
            return pte & ADDR_MASK & ~0x3FFFFFFF
    return pte & ADDR_MASK


class Walk:
    """Result of one guest page-table walk.

    Per-level lists are indexed by level number (1..root_level; index 0 unused) and filled only
    for the levels actually walked (others stay None).  For PAE level 3 the "table" holding the
    PDPTE is the 32-byte PDPT at CR3[31:5], not a page: ``table_gfn[3]`` is ``cr3 >> 12`` and
    ``pte_gpa[3]`` the PDPTE's address (when the context caches PDPTEs, ``ptes[3]`` is the cached
    value).

    On a fault (``ok`` False): ``vector`` is 14 (#PF) -- or 13 (#GP(0), error code 0) for a
    non-canonical long-mode address -- ``error_code`` the code the CPU pushes, ``va`` the value
    of CR2, ``level`` the level of the entry at which the walk stopped, ``gpa`` None;
    ``writable``/``user``/``nx``/``pte_access`` combine the entries walked so far (including the
    stopping entry if it was present with no reserved bit set) and ``pt_access`` the levels above
    the stopping level.
    """

    __slots__ = ("ok", "error_code", "vector", "va", "gpa", "level", "page_size", "writable", "user",
                 "nx", "pte_access", "pt_access", "dirty", "set_dirty", "table_gfn", "pte_gpa", "ptes",
                 "root_level")

    def __init__(self):
        self.ok = False
        self.error_code = 0
        self.vector = 14
        self.va = 0
        self.gpa = None
        self.level = 0
        self.page_size = 4096
        self.writable = False
        self.user = False
        self.nx = False
        self.pte_access = 0
        self.pt_access = 0
        self.dirty = False
        self.set_dirty = False      # this walk set the leaf's D bit (a pte write by the "hardware")
        self.table_gfn = None
        self.pte_gpa = None
        self.ptes = None
        self.root_level = 0

    @property
    def gfn(self):
        """Guest frame number of the 4 KiB page containing va (None on a fault)."""
        return None if self.gpa is None else self.gpa >> 12

    @property
    def leaf_gpa(self):
        """Address of the leaf entry (the one whose A/D bits translate this va)."""
        return self.pte_gpa[self.level] if self.ok else None

    def __repr__(self):
        if self.ok:
            return ("Walk(ok va=%#x gpa=%#x level=%d size=%#x acc=%s%s%s pt_acc=%d dirty=%s)" % (
                self.va, self.gpa, self.level, self.page_size,
                "U" if self.pte_access & ACC_U else "-", "W" if self.pte_access & ACC_W else "-",
                "X" if self.pte_access & ACC_X else "-", self.pt_access, self.dirty))
        return "Walk(fault vector=%d err=%#x va=%#x level=%d)" % (self.vector, self.error_code, self.va,
                                                                self.level)


# --------------------------------------------------------------------------------------------
# the walker

def walk(mem, ctx: PagingContext, va: int, access: int, *, set_ad: bool = True) -> Walk:
    """Translate ``va`` for ``access`` (PFERR_W | PFERR_U | PFERR_FETCH bits; U = CPL3 explicit
    access; at most one of W and FETCH), setting A/D bits in guest memory exactly where and when
    QEMU's walker does (unless ``set_ad`` is False: then memory is left untouched).

    QEMU's A/D rules (all A/D stores are 4-byte stores of the entry's low half):
    - a non-leaf entry gets A as soon as it is found present and free of reserved bits, before
      the next level is read -- so A is set on upper levels even when the walk then faults;
    - quirk: a long-mode PDPTE gets A *before* QEMU looks at its PS bit, so a 1 GiB leaf gets A
      even when the access then faults (reserved bits 29:13 or a protection violation);
    - otherwise the leaf gets A (and D on a write) only after all permission checks passed;
    - PAE PDPTEs never get A.
    Intel: A/D updates on a faulting walk are implementation specific; KVM's own guest walker sets
    all of them only after a successful walk.
    """
    mode = ctx.mode
    if mode == Mode.LEGACY:
        return _walk_legacy(mem, ctx, va & 0xFFFFFFFF, access, set_ad)
    if mode == Mode.OFF:
        w = Walk()
        va = va & _U64 if ctx.lma else va & 0xFFFFFFFF
        w.ok = True
        w.va = w.gpa = va
        w.level = 1
        w.writable = w.user = True
        w.pte_access = w.pt_access = ACC_ALL
        w.dirty = True
        w.table_gfn, w.pte_gpa, w.ptes = [None, None], [None, None], [None, None]
        return w
    return _walk64(mem, ctx, va, access, set_ad)


def _fault(w, level, err, rights, nx, pt_rights, pt_nx):
    w.level = level
    w.error_code = err
    w.writable = bool(rights & PTE_W)
    w.user = bool(rights & PTE_U)
    w.nx = bool(nx)
    w.pte_access = (rights & 6) | (0 if nx else ACC_X)
    w.pt_access = (pt_rights & 6) | (0 if pt_nx else ACC_X)
    return w


def _walk_legacy(mem, ctx, va, access, set_ad):
    w = Walk()
    w.va = va
    w.root_level = 2
    tgfn = w.table_gfn = [None, None, None]
    pgpa = w.pte_gpa = [None, None, None]
    ptes = w.ptes = [None, None, None]
    is_write = access & PFERR_W
    is_user = access & PFERR_U
    is_fetch = access & PFERR_FETCH
    err = is_write | is_user | (ctx._m[3] if is_fetch else 0)

    cr3 = ctx.cr3
    addr = (cr3 & ~0xFFF) + ((va >> 20) & 0xFFC)
    tgfn[2] = cr3 >> 12
    pgpa[2] = addr
    try:
        pde = mem.read32(addr)
    except struct.error:
        pde = 0
    ptes[2] = pde
    if not pde & PTE_P:
        return _fault(w, 2, err, 6, 0, 6, 0)
    if pde & PTE_PS and ctx.pse:
        # 4 MiB page, PSE-36: PDE bits 20:13 are physical address bits 39:32.  QEMU checks only
        # bit 21 (Intel: bits 21 and 20:(MAXPHYADDR-19); with MAXPHYADDR 40 that is just bit 21).
        if pde & ctx._m[0]:
            return _fault(w, 2, err | PFERR_RSVD | PFERR_P, 6, 0, 6, 0)
        level = 2
        rights = pde
        pt_rights = 6
        pte = pde
        addr_leaf = addr
        frame = (pde & 0xFFC00000) | ((pde & _PSE36_HI) << 19)
        size = 0x400000
    else:
        if set_ad and not pde & PTE_A:
            pde |= PTE_A
            ptes[2] = pde
            _store32(mem, addr, pde)
        addr_leaf = (pde & 0xFFFFF000) + ((va >> 10) & 0xFFC)
        tgfn[1] = pde >> 12
        pgpa[1] = addr_leaf
        try:
            pte = mem.read32(addr_leaf)
        except struct.error:
            pte = 0
        ptes[1] = pte
        if not pte & PTE_P:
            return _fault(w, 1, err, pde, 0, pde, 0)
        level = 1
        rights = pde & pte
        pt_rights = pde
        frame = pte & 0xFFFFF000
        size = 0x1000
    # LEGACY 4 KiB ptes/PDEs have no reserved bits; no NX in 4-byte entries
    if _denied(ctx, rights, 0, is_write, is_user, is_fetch):
        return _fault(w, level, err | PFERR_P, rights, 0, pt_rights, 0)
    if not pte & PTE_A or (is_write and not pte & PTE_D):
        if set_ad:
            w.set_dirty = is_write and not pte & PTE_D
            pte |= PTE_A | PTE_D if is_write else PTE_A
            ptes[level] = pte
            _store32(mem, addr_leaf, pte)
    w.ok = True
    w.level = level
    w.page_size = size
    w.gpa = frame | (va & (size - 1))
    w.writable = bool(rights & PTE_W)
    w.user = bool(rights & PTE_U)
    w.pte_access = (rights & 6) | ACC_X
    w.pt_access = (pt_rights & 6) | ACC_X
    w.dirty = bool(pte & PTE_D)
    return w


def _denied(ctx, rights, nx, is_write, is_user, is_fetch):
    """QEMU's permission check on the combined rights; True -> #PF with P set."""
    if rights & PTE_U:
        if is_user:
            pass
        elif is_fetch:
            if ctx.smep:                # SMEP: supervisor fetch from a user page
                return True
        elif ctx.smap:                  # SMAP (EFLAGS.AC = 0): supervisor data access to a user page
            return True
    elif is_user:
        return True
    if is_write:
        # supervisor writes ignore R/W when CR0.WP = 0
        return not (rights & PTE_W) and (is_user or ctx.wp)
    if is_fetch:
        return bool(nx)
    return False


def _store32(mem, addr, value):
    """QEMU's x86_stl_phys_notdirty: a 4-byte store of the entry's low half (dropped outside RAM)."""
    try:
        mem.write32(addr, value & 0xFFFFFFFF)
    except (struct.error, ValueError, IndexError):
        pass


def _walk64(mem, ctx, va, access, set_ad):
    w = Walk()
    mode = ctx.mode
    root = int(mode)
    w.root_level = root
    rsvd, rsvd4, pdrsvd, idbit = ctx._m
    is_write = access & PFERR_W
    is_user = access & PFERR_U
    is_fetch = access & PFERR_FETCH
    err = is_write | is_user | (idbit if is_fetch else 0)
    tgfn = w.table_gfn = [None] * (root + 1)
    pgpa = w.pte_gpa = [None] * (root + 1)
    ptes = w.ptes = [None] * (root + 1)
    read64 = mem.read64
    rights = 6          # W|U combined (AND) over the levels walked
    nx = 0              # NX combined (OR)
    cr3 = ctx.cr3

    if mode == Mode.LONG:
        va &= _U64
        w.va = va
        top = va >> 47
        if top and top != 0x1FFFF:
            # non-canonical: QEMU raises #GP(0) from its walker (CR2 untouched)
            w.vector = 13
            return _fault(w, 4, 0, 6, 0, 6, 0)
        table = cr3 & ADDR_MASK
        level = 4
    else:
        va &= 0xFFFFFFFF
        w.va = va
        addr = (cr3 & ~0x1F) + ((va >> 27) & 0x18)
        tgfn[3] = cr3 >> 12
        pgpa[3] = addr
        if ctx.pdptes:
            e = ctx.pdptes[va >> 30]
        else:               # QEMU: "XXX: load them when cr3 is loaded ?" -- read at every walk
            try:
                e = read64(addr)
            except struct.error:
                e = 0
        ptes[3] = e
        if not e & PTE_P:
            return _fault(w, 3, err, 6, 0, 6, 0)
        if e & pdrsvd:
            return _fault(w, 3, err | PFERR_RSVD | PFERR_P, 6, 0, 6, 0)
        # the PDPTE's R/W, U/S and A bits are ignored (rights stay full), no A update
        table = e & ADDR_MASK
        level = 2

    while True:
        addr = table + ((va >> _SHIFT64[level]) & 0x1FF) * 8
        tgfn[level] = table >> 12
        pgpa[level] = addr
        try:
            e = read64(addr)
        except struct.error:
            e = 0
        ptes[level] = e
        if not e & PTE_P:
            return _fault(w, level, err, rights, nx, rights, nx)
        if e & (rsvd4 if level == 4 else rsvd):
            return _fault(w, level, err | PFERR_RSVD | PFERR_P, rights, nx, rights, nx)
        pt_rights, pt_nx = rights, nx
        rights &= e
        nx |= e & PTE_NX
        if level == 1:
            lowrsvd = 0
            break
        if level == 2:
            if e & PTE_PS:
                lowrsvd = _LOW_2M
                break
        elif level == 3:
            # quirk reproduced: QEMU sets A on a long-mode PDPTE before testing PS (1 GiB leaf)
            if set_ad and not e & PTE_A:
                e |= PTE_A
                ptes[3] = e
                _store32(mem, addr, e)
            if e & PTE_PS:          # 1 GiB page (HAS_1G_PAGES: QEMU never makes PS reserved here)
                lowrsvd = _LOW_1G
                break
            table = e & ADDR_MASK
            level = 3 - 1
            continue
        if set_ad and not e & PTE_A:
            e |= PTE_A
            ptes[level] = e
            _store32(mem, addr, e)
        table = e & ADDR_MASK
        level -= 1

    # e is the leaf at `level`, addr its address
    if e & lowrsvd:
        return _fault(w, level, err | PFERR_RSVD | PFERR_P, rights, nx, pt_rights, pt_nx)
    if _denied(ctx, rights, nx, is_write, is_user, is_fetch):
        return _fault(w, level, err | PFERR_P, rights, nx, pt_rights, pt_nx)
    if not e & PTE_A or (is_write and not e & PTE_D):
        if set_ad:
            w.set_dirty = is_write and not e & PTE_D
            e |= PTE_A | PTE_D if is_write else PTE_A
            ptes[level] = e
            _store32(mem, addr, e)
    size = _PAGE_SIZE[level]
    w.ok = True
    w.level = level
    w.page_size = size
    w.gpa = (e & ADDR_MASK & ~(size - 1)) | (va & (size - 1))
    w.writable = bool(rights & PTE_W)
    w.user = bool(rights & PTE_U)
    w.nx = bool(nx)
    w.pte_access = (rights & 6) | (0 if nx else ACC_X)
    w.pt_access = (pt_rights & 6) | (0 if pt_nx else ACC_X)
    w.dirty = bool(e & PTE_D)
    return w


# --------------------------------------------------------------------------------------------
# one format object per paging mode (Python's answer to KVM's paging_tmpl.h): what the shadow
# MMU, its audit and the policies need to know about a guest entry, in one place

class GuestFormat:
    """The guest entry format of one paging mode: entry size, frames, rights."""

    __slots__ = ("mode", "pte_size", "frame_mask")

    def __init__(self, mode: Mode):
        self.mode = mode
        self.pte_size = 4 if mode == Mode.LEGACY else 8
        self.frame_mask = 0xFFFFF000 if mode == Mode.LEGACY else ADDR_MASK

    def read_pte(self, mem, gpa: int) -> int:
        """The guest entry at ``gpa`` (4 or 8 bytes)."""
        return mem.read32(gpa) if self.pte_size == 4 else mem.read64(gpa)

    def frame(self, level: int, pte: int, pse: bool = True) -> int:
        """Physical address the entry points to (see :func:`entry_frame`)."""
        return entry_frame(self.mode, level, pte, pse)

    def leaf_frame(self, pte: int) -> int:
        """Physical address of the 4 KiB page a level-1 entry maps."""
        return pte & self.frame_mask

    def entry_access(self, pte: int, nxe: bool = True) -> int:
        """ACC_* rights one entry grants (NX only counts in 8-byte formats with EFER.NXE)."""
        acc = ACC_X
        if pte & PTE_W:
            acc |= ACC_W
        if pte & PTE_U:
            acc |= ACC_U
        if self.pte_size == 8 and nxe and pte & PTE_NX:
            acc &= ~ACC_X
        return acc

    def carries_rights(self, level: int) -> bool:
        """PAE PDPTEs carry no R/W, U/S or NX rights; every other entry does."""
        return not (self.mode == Mode.PAE and level == 3)

    def __repr__(self):
        return f"<GuestFormat {self.mode.name}>"


FORMATS = {m: GuestFormat(m) for m in (Mode.LEGACY, Mode.PAE, Mode.LONG)}
