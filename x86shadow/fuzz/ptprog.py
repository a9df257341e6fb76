"""Random self-checking page-table programs (the differential fuzzer's guest side).

A program builds its own paging structures in guest RAM (an identity map of the low 64 MiB with
large pages, plus a window at WINDOW: two page tables whose entries get random bits and point at
data frames, at themselves, at each other, at the window's directory or at the root), installs a
#PF handler that records the error code and CR2 and resumes after the operation, then runs a list
of operations: stores of every kind (mov of each size, immediates, locked and unlocked
read-modify-writes, xchg, cmpxchg, cmpxchg8b, xadd, bit operations, string stores, setcc),
aligned, misaligned and page-crossing, through the window or through the identity map onto the
table frames; loads; invlpg; CR3 reloads; CR0.WP toggles; EFER.NXE toggles (pae, 64); CR3
switches to a second root and back (``Layout.root2``: its window entries point at the first
root's window tables, the same or swapped, or at a third one, ``pt3``); user-mode excursions
(``_render_user``: iret to CPL 3, one load, store or fetch through the window, ``int 0x81``
back; the identity map has U so that the program's code and stack serve at CPL 3). After
each operation it prints one line (operation number, faults taken, last error code and CR2, result registers and flags). After each
store it reloads CR3, so that no result depends on a stale TLB entry (which the architecture
leaves undefined); global pages (G) are not enabled (CR4.PGE = 0).

The program is self-contained (no includes): a saved one runs with ``x86shadow run FILE --mode M``.
What a run is compared on is the serial output, the exit status and the final contents of
``compared_frames()`` (tables and data frames), between ``--mmu native`` and every policy.

Known deviations of the native reference (README, "Known differences of the native reference"): Unicorn's TCG performs a
read-modify-write as read translations, then write translations, then the store. x86 translates
the operand once, with write intent, before reading it. So natively (1) a read-modify-write of
the very pte that translates it leaves D clear (x86 sets it); (2) one that crosses into a second
page and faults on the first page's write permission has set A in the second page's pte (x86
never reaches it); (3) such a crossing one reports the second page's read fault (not present,
reserved bit) where x86 reports the first page's write fault. Before a read-modify-write through
the window, programs set A|D in the window pte of the target page, and they make no
read-modify-write across two window pages, so that none of these cases can arise; every other
A/D or fault difference is a bug.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

T = 0x0200_0000                  # first table frame (32 MiB)
DATA = 0x0210_0000               # data frames
N_DATA = 6
WINDOW = 0x4000_0000             # VA of the window (PD index 0x100 / PDPT index 1)
N_WIN = 16                       # entries used in each window page table

PROG_VARS_OFF = 0x0300_0000      # program variables (identity-mapped, never a target)
V_RESUME, V_ERR, V_CR2, V_CNT, V_RES, V_RES2, V_KSP, V_KRET = (PROG_VARS_OFF + 8 * i
                                                              for i in range(8))
IDT = PROG_VARS_OFF + 0x1000
USTACK_TOP = PROG_VARS_OFF + 0x4000  # the user-mode excursions' stack
TO_KERNEL_VECTOR = 0x81          # the DPL3 gate a user-mode excursion comes back through
FETCH_OFF = 0xF00                # 0xF00..0xF7F of every table and data frame: `ret` bytes,
FETCH_LEN = 0x80                 # what a fetch through the window executes (never written)
N_TABLES = 0xA000 // 0x1000      # T..T+0xA000: every table frame of both roots

_PTE_P, _PTE_W, _PTE_U, _PTE_PWT, _PTE_PCD, _PTE_A, _PTE_D, _PTE_PS, _PTE_G = (
    1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x100)


@dataclass(frozen=True)
class Layout:
    """Frames of one mode's structures (physical == identity-mapped virtual)."""
    mode: str

    @property
    def pte_size(self):
        return 4 if self.mode == "32" else 8

    @property
    def root(self):
        return T

    @property
    def pdpt0(self):                 # 64 only: PML4[0] -> PDPT0
        return T + 0x1000

    @property
    def pd0(self):                   # identity directory (pae / 64)
        return T + 0x2000

    @property
    def pd1(self):                   # the window's directory (32: the root itself)
        return T if self.mode == "32" else T + 0x3000

    @property
    def ptw(self):
        return T + 0x4000

    @property
    def pt2(self):
        return T + 0x5000

    @property
    def root2(self):                 # the second root (CR3 switches)
        return T + 0x6000

    @property
    def pdpt0b(self):                # 64 only: root2's PML4[0] -> PDPT0b
        return T + 0x7000

    @property
    def pd1b(self):                  # root2's window directory (32: root2 itself)
        return self.root2 if self.mode == "32" else T + 0x8000

    @property
    def pt3(self):                   # a third window table, only root2 may map it
        return T + 0x9000

    def window_tables(self, root2_tables=None):
        """The tables that translate (WINDOW, window2) under the first root, or under root2
        when given ``Spec.root2_tables``."""
        if root2_tables is None:
            return (self.ptw, self.pt2)
        tables = (self.ptw, self.pt2, self.pt3)
        return tuple(tables[i] for i in root2_tables)

    def identity_frames(self):
        """Tables whose first entry maps the program (pdpt0 / pdpt0b entry 0, pd0): a store
        crossing into one from the frame before would unmap it."""
        if self.mode == "32":
            return ()
        if self.mode == "pae":
            return (self.pd0,)
        return (self.pdpt0, self.pd0, self.pdpt0b)

    def second_frames(self):
        """The frames of root2's structures (the identity part shares pd0 in pae / 64)."""
        if self.mode == "32":
            return [self.root2, self.pt3]
        if self.mode == "pae":
            return [self.root2, self.pd1b, self.pt3]
        return [self.root2, self.pdpt0b, self.pd1b, self.pt3]

    @property
    def window2(self):               # VA mapped by the second window table
        return WINDOW + (0x40_0000 if self.mode == "32" else 0x20_0000)

    def table_frames(self):
        if self.mode == "32":
            return [self.root, self.ptw, self.pt2]
        if self.mode == "pae":
            return [self.root, self.pd1, self.ptw, self.pt2]
        return [self.root, self.pdpt0, self.pd1, self.ptw, self.pt2]

    def data_frames(self):
        return [DATA + 0x1000 * i for i in range(N_DATA)]

    def writable_entries(self, frame):
        """Entry indices of a table frame that ops may write without unmapping the program."""
        if self.mode == "32" and frame in (self.root, self.root2):
            return [0x100, 0x101] + list(range(0x102, 0x110)) + [0x3ff]
        if self.mode == "pae" and frame in (self.root, self.root2):
            return []                                   # PDPT: see Op "pdpt"
        if self.mode == "64" and frame in (self.root, self.pdpt0, self.root2, self.pdpt0b):
            return ([1, 2, 3, 0x1ff] if frame in (self.pdpt0, self.pdpt0b)
                    else [1, 2, 0x100, 0x1ff])
        return list(range(0, N_WIN + 2)) + [0x1ff]


def compared_frames(mode):
    lay = Layout(mode)
    frames = lay.table_frames() + lay.data_frames()
    if mode != "32":
        frames.append(lay.pd0)
    return frames + lay.second_frames()


@dataclass
class Op:
    kind: str                    # see _OPS
    target: int = 0              # linear address written / read
    size: int = 4
    value: int = 0
    lock: bool = False
    extra: int = 0               # kind-specific (bit number, count, compare value...)
    rmw_window_pages: tuple = ()  # window VA pages whose ptes get A|D first (module docstring)


@dataclass
class Spec:
    mode: str
    nxe: bool
    win_ptes: list               # initial entries of the two window tables (2 * N_WIN)
    pd1_flags: tuple             # flags of the two window directory entries
    ops: list = field(default_factory=list)
    seed: int | None = None
    # the second root: which table (0 ptw, 1 pt2, 2 pt3) each of its two window directory
    # entries points at, and their flags; pt3's entries (N_WIN)
    root2_tables: tuple = (0, 1)
    root2_flags: tuple = (0x23, 0x23)
    pt3: tuple = ()


_RMW = ("or", "and", "xor", "add", "sub", "inc", "dec", "not", "neg", "bts", "btr", "btc",
        "xchg", "cmpxchg", "xadd", "cmpxchg8b")
_OPS = ("mov", "movimm", "stos", "movs", "setcc", "load", "invlpg", "cr3", "wp", "cr3switch",
        "user", "user") + _RMW
USER_ACCESSES = ("load", "store", "fetch")  # Op("user").extra: what the excursion does
_OPS_NX = _OPS + ("nx",)         # modes pae and 64: EFER.NXE toggles too


def ops_of(mode):
    """The operation kinds a program of ``mode`` draws from."""
    return _OPS if mode == "32" else _OPS_NX


def _random_pte(rng, lay: Layout, nxe: bool, present_bias=0.8):
    frames = lay.table_frames() + lay.data_frames() * 2
    frame = rng.choice(frames)
    flags = 0
    if rng.random() < present_bias:
        flags |= _PTE_P
    for bit, p in ((_PTE_W, 0.6), (_PTE_U, 0.5), (_PTE_PWT, 0.05), (_PTE_PCD, 0.05),
                   (_PTE_A, 0.5), (_PTE_D, 0.4), (_PTE_G, 0.1)):
        if rng.random() < p:
            flags |= bit
    v = frame | flags
    if lay.mode != "32":
        if rng.random() < 0.2:
            v |= 1 << 63                                   # NX (reserved when EFER.NXE = 0)
        if rng.random() < 0.04:
            v |= 1 << rng.choice((45, 51))                 # reserved (MAXPHYADDR 40)
    return v


def _window_slot(rng, lay: Layout, w, win_ptes, pt3, entries=24):
    """A pte slot (byte offset) of window page ``w`` (0 .. 2 * N_WIN - 1) that is safe to
    write: a page that initially maps a table the program runs on, through any of the tables
    that may translate it (ptw and pt2 under either root, pt3 under the second), is written
    only in the entries that do not map the program (``Layout.writable_entries``)."""
    i = w % N_WIN
    frames = {v & 0xFFFFF000 for v in (list(win_ptes or ())[i::N_WIN] + list(pt3 or ())[i:i + 1])}
    for frame in frames:
        if frame == lay.root or (lay.mode == "64" and frame == lay.pdpt0):
            return rng.choice(lay.writable_entries(frame) or [0x1ff]) * lay.pte_size
    return rng.randrange(0, entries) * lay.pte_size


def _random_target(rng, lay: Layout, size, win_ptes=None, pt3=()):
    """A linear address: through the window, or through the identity map onto a table frame
    (of either root) or a data frame; aligned, the high half of a pte, misaligned, or crossing
    a page; through the window only in safe slots (``_window_slot``)."""
    where = rng.random()
    if where < 0.5:
        w = rng.randrange(2 * N_WIN)
        base = (WINDOW if w < N_WIN else lay.window2) + 0x1000 * (w % N_WIN)
        slot = _window_slot(rng, lay, w, win_ptes, pt3)
    elif where < 0.85:
        frame = rng.choice(lay.table_frames() + lay.second_frames())
        entries = lay.writable_entries(frame)
        if not entries:
            frame = lay.ptw
            entries = lay.writable_entries(frame)
        base = frame
        slot = rng.choice(entries) * lay.pte_size
    else:
        base = rng.choice(lay.data_frames())
        slot = rng.randrange(0, 64) * 4
    sub = rng.random()
    if base + 0x1000 in lay.identity_frames():
        sub = min(sub, 0.91)        # no crossing into the identity map the program runs on
    if sub < 0.55:
        off = slot
    elif sub < 0.7 and lay.pte_size == 8:
        off = slot + 4
    elif sub < 0.92:
        off = slot + rng.randrange(1, max(2, lay.pte_size))
    else:
        off = 0x1000 - rng.randrange(1, size) if size > 1 else 0xFFF
    return base + (off & 0xFFF)


def random_op(rng, lay: Layout, nxe: bool, win_ptes=None, pt3=()) -> Op:
    kind = rng.choice(ops_of(lay.mode) + ("mov", "mov", "load"))
    wide = lay.mode == "64"
    if kind in ("invlpg",):
        return Op(kind, target=rng.choice((WINDOW, lay.window2)) + 0x1000 * rng.randrange(N_WIN))
    if kind in ("cr3", "wp", "nx"):
        return Op(kind)
    if kind == "cr3switch":
        return Op(kind, extra=rng.randrange(2))              # 1: to root2, 0: back to root
    if kind == "user":
        # a user-mode excursion: iret to CPL 3, one access through the window, int back
        access = rng.randrange(len(USER_ACCESSES))
        w = rng.randrange(2 * N_WIN)
        page = (WINDOW if w < N_WIN else lay.window2) + 0x1000 * (w % N_WIN)
        if USER_ACCESSES[access] == "fetch":
            return Op(kind, target=page + FETCH_OFF + 16 * rng.randrange(FETCH_LEN // 16),
                      extra=access)
        size = rng.choice((1, 4))
        off = _window_slot(rng, lay, w, win_ptes, pt3) + rng.choice((0, 0, 1, 4))
        return Op(kind, target=page + off, size=size, extra=access,
                  value=rng.getrandbits(8 * size))
    if kind == "cmpxchg8b":
        size = 8
    elif kind in ("setcc",):
        size = 1
    elif kind in ("bts", "btr", "btc"):
        size = rng.choice((4, 8) if wide else (4,))
    elif kind in ("mov", "load"):
        size = rng.choice((1, 2, 4, 8) if wide else (1, 2, 4))
    elif kind in ("stos", "movs", "movimm"):
        size = 4
    else:
        size = rng.choice((1, 2, 4, 8) if wide else (1, 2, 4))
    target = _random_target(rng, lay, size, win_ptes, pt3)
    if kind in _RMW and WINDOW <= target < lay.window2 + 0x1000 * N_WIN \
            and (target & 0xFFF) + size > 0x1000:
        target = (target & ~0xFFF) + 0x1000 - size      # (module docstring, difference 3)
    if rng.random() < 0.5:
        value = _random_pte(rng, lay, nxe)
    else:
        value = rng.getrandbits(64)
    value &= (1 << (8 * size)) - 1
    op = Op(kind, target=target, size=size, value=value)
    if kind in _RMW:
        op.lock = kind not in ("xchg",) and rng.random() < 0.6
        if kind in ("bts", "btr", "btc"):
            op.extra = rng.choice((0, 1, 5, 6, 7, 63 if size == 8 else 31))
        if kind in ("cmpxchg", "cmpxchg8b"):
            op.extra = rng.random() < 0.6          # 1: load the comparand first (succeeds)
        if WINDOW <= target < lay.window2 + 0x1000 * N_WIN:
            pages = {target & ~0xFFF, (target + size - 1) & ~0xFFF}
            op.rmw_window_pages = tuple(sorted(p for p in pages
                                               if p < lay.window2 + 0x1000 * N_WIN))
    if kind in ("stos", "movs"):
        # a repeated string store through the window can rewrite the pte of its own next
        # iteration: whether the rest uses the old translation is not defined (the TLB may
        # hold it), so repeats go through the identity map only
        window = WINDOW <= target < lay.window2 + 0x1000 * N_WIN
        op.extra = 1 if window else rng.randrange(1, 4)
    return op


def random_tables(rng, mode: str) -> Spec:
    """A Spec without operations: EFER.NXE at the start, the window tables' entries (random
    bits, pointing at data frames, the tables themselves and each other) and the window
    directory entries. ``rng``: anything with random.Random's random / choice / randrange /
    getrandbits (the fuzzer passes hypothesis draws: fuzz/strategies.py)."""
    lay = Layout(mode)
    nxe = mode != "32" and rng.random() < 0.7
    win = [_random_pte(rng, lay, nxe, present_bias=0.85) for _ in range(2 * N_WIN)]
    pd1 = tuple(_PTE_P | _PTE_A | (_PTE_W if rng.random() < 0.8 else 0) |
                (_PTE_U if rng.random() < 0.6 else 0) for _ in range(2))
    spec = Spec(mode, nxe, win, pd1)
    # the second root: its window entries reuse the first root's tables (the same or swapped)
    # or point at pt3, whose entries are drawn like the window's
    spec.root2_tables = (rng.randrange(3), rng.randrange(3))
    spec.root2_flags = tuple(_PTE_P | _PTE_A | (_PTE_W if rng.random() < 0.8 else 0) |
                             (_PTE_U if rng.random() < 0.5 else 0) for _ in range(2))
    if 2 in spec.root2_tables:
        spec.pt3 = tuple(_random_pte(rng, lay, nxe, present_bias=0.85) for _ in range(N_WIN))
    return spec


def random_spec(rng: random.Random, mode: str, n_ops: int | None = None, seed=None) -> Spec:
    spec = random_tables(rng, mode)
    spec.seed = seed
    n = rng.randrange(4, 20) if n_ops is None else n_ops
    lay = Layout(mode)
    spec.ops = [random_op(rng, lay, spec.nxe, spec.win_ptes, spec.pt3) for _ in range(n)]
    return spec


# ------------------------------------------------------------------------------------ rendering
class _Asm:
    def __init__(self, mode):
        self.mode = mode
        self.wide = mode == "64"
        self.lines = []

    def __call__(self, *lines):
        self.lines.extend("    " + ln for ln in lines)

    def label(self, name):
        self.lines.append(f"{name}:")

    def r(self, name):
        """32-bit register name -> the mode's address-sized register."""
        return "r" + name[1:] if self.wide else name

    def store64(self, addr, value):
        """[addr] := 64-bit value (two dword stores in 32-bit mode, low first)."""
        self(f"mov dword ptr [{addr:#x}], {value & 0xFFFFFFFF:#x}",
             f"mov dword ptr [{addr + 4:#x}], {value >> 32:#x}")


_SIZE_PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword"}
_REG = {"a": {1: "al", 2: "ax", 4: "eax", 8: "rax"}, "d": {1: "dl", 2: "dx", 4: "edx", 8: "rdx"}}


def _entry(a: _Asm, table, index, value, size):
    addr = table + index * size
    if size == 4:
        a(f"mov dword ptr [{addr:#x}], {value & 0xFFFFFFFF:#x}")
    else:
        a.store64(addr, value)


def render(spec: Spec) -> str:
    mode = spec.mode
    lay = Layout(mode)
    a = _Asm(mode)
    ps = lay.pte_size
    head = [f"# x86shadow: modes={mode}",
            "# Generated by x86shadow.fuzz.ptprog (random page-table program"
            + (f", seed {spec.seed}" if spec.seed is not None else "") + ").",
            "# Output: one line per operation: <op> <faults> <last error code> <last CR2> "
            "<result> <result2> <flags>"]
    a.label("main")
    if a.wide:
        a("push rbx", "push rbp")
    else:
        a("push ebx", "push esi", "push edi", "push ebp")
    a("cld")
    # zero the tables and the variables, fill the data frames
    a(f"mov edi, {T:#x}", f"mov ecx, {N_TABLES * 0x1000 // 4:#x}", "xor eax, eax")
    a("rep stosd dword ptr es:[rdi], eax" if a.wide else "rep stosd dword ptr es:[edi], eax")
    a(f"mov edi, {PROG_VARS_OFF:#x}", "mov ecx, 0x400", "xor eax, eax")
    a("rep stosd dword ptr es:[rdi], eax" if a.wide else "rep stosd dword ptr es:[edi], eax")
    for i, f in enumerate(lay.data_frames()):
        a(f"mov edi, {f:#x}", "mov ecx, 0x400", f"mov eax, {0xd0000007 | (i << 16):#x}")
        a("rep stosd dword ptr es:[rdi], eax" if a.wide else "rep stosd dword ptr es:[edi], eax")
    # `ret` bytes where a fetch through the window lands (entries no walk reaches in a table)
    for f in [T + 0x1000 * i for i in range(N_TABLES)] + lay.data_frames():
        a(f"mov edi, {f + FETCH_OFF:#x}", f"mov ecx, {FETCH_LEN // 4}", "mov eax, 0xc3c3c3c3")
        a("rep stosd dword ptr es:[rdi], eax" if a.wide else "rep stosd dword ptr es:[edi], eax")
    # 0xe7: identity large pages, U too (user-mode excursions run the program's code and stack
    # at CPL 3; CR4.SMEP / SMAP stay clear, so the supervisor's accesses are unchanged)
    big = _PTE_P | _PTE_W | _PTE_U | _PTE_A | _PTE_D | _PTE_PS
    r2 = lay.window_tables(spec.root2_tables)
    if mode == "32":
        for i in range(16):
            _entry(a, lay.root, i, (i << 22) | big, 4)
        _entry(a, lay.root, 0x100, lay.ptw | spec.pd1_flags[0], 4)
        _entry(a, lay.root, 0x101, lay.pt2 | spec.pd1_flags[1], 4)
        for i in range(16):
            _entry(a, lay.root2, i, (i << 22) | big, 4)
        _entry(a, lay.root2, 0x100, r2[0] | spec.root2_flags[0], 4)
        _entry(a, lay.root2, 0x101, r2[1] | spec.root2_flags[1], 4)
    else:
        for i in range(32):
            _entry(a, lay.pd0, i, (i << 21) | big, 8)
        _entry(a, lay.pd1, 0, lay.ptw | spec.pd1_flags[0], 8)
        _entry(a, lay.pd1, 1, lay.pt2 | spec.pd1_flags[1], 8)
        _entry(a, lay.pd1b, 0, r2[0] | spec.root2_flags[0], 8)
        _entry(a, lay.pd1b, 1, r2[1] | spec.root2_flags[1], 8)
        if mode == "pae":
            for root, pd1 in ((lay.root, lay.pd1), (lay.root2, lay.pd1b)):
                _entry(a, root, 0, lay.pd0 | 1, 8)
                _entry(a, root, 1, pd1 | 1, 8)
        else:
            for root, pdpt0, pd1 in ((lay.root, lay.pdpt0, lay.pd1),
                                     (lay.root2, lay.pdpt0b, lay.pd1b)):
                _entry(a, root, 0, pdpt0 | 0x27, 8)
                _entry(a, pdpt0, 0, lay.pd0 | 0x27, 8)
                _entry(a, pdpt0, 1, pd1 | 0x27, 8)
    for i, v in enumerate(spec.win_ptes[:N_WIN]):
        _entry(a, lay.ptw, i, v if ps == 8 else v & 0xFFFFFFFF, ps)
    for i, v in enumerate(spec.win_ptes[N_WIN:]):
        _entry(a, lay.pt2, i, v if ps == 8 else v & 0xFFFFFFFF, ps)
    for i, v in enumerate(spec.pt3):
        _entry(a, lay.pt3, i, v if ps == 8 else v & 0xFFFFFFFF, ps)
    # the #PF handler: a copy of the firmware IDT with vector 14 replaced
    a("mov esi, FW_IDT", f"mov edi, {IDT:#x}", f"mov ecx, {(4096 if a.wide else 2048) // 4}")
    a("rep movsd dword ptr es:[rdi], dword ptr [rsi]" if a.wide
      else "rep movsd dword ptr es:[edi], dword ptr [esi]")
    gate = IDT + 14 * (16 if a.wide else 8)
    a("mov eax, pf_handler", f"mov word ptr [{gate:#x}], ax", "shr eax, 16",
      f"mov word ptr [{gate + 6:#x}], ax", f"mov word ptr [{gate + 2:#x}], SEL_KCODE",
      f"mov word ptr [{gate + 4:#x}], 0x8e00")
    # the way back from a user-mode excursion: an interrupt gate of DPL 3
    gate = IDT + TO_KERNEL_VECTOR * (16 if a.wide else 8)
    a("mov eax, to_kernel", f"mov word ptr [{gate:#x}], ax", "shr eax, 16",
      f"mov word ptr [{gate + 6:#x}], ax", f"mov word ptr [{gate + 2:#x}], SEL_KCODE",
      f"mov word ptr [{gate + 4:#x}], 0xee00")
    idtr = PROG_VARS_OFF + 0x800
    a(f"mov word ptr [{idtr:#x}], {(4096 if a.wide else 2048) - 1}",
      f"mov dword ptr [{idtr + 2:#x}], {IDT:#x}")
    if a.wide:
        a(f"mov dword ptr [{idtr + 6:#x}], 0", f"mov rax, {idtr:#x}", "lidt [rax]")
    else:
        a(f"mov eax, {idtr:#x}", ".byte 0x0f, 0x01, 0x18")      # lidt [eax]
    if spec.nxe:
        a("mov ecx, 0xc0000080", "rdmsr", "or eax, 0x800", "wrmsr")
    a(f"mov eax, {lay.root:#x}", "mov cr3, rax" if a.wide else "mov cr3, eax")
    window_tables = lay.window_tables()          # what translates the window now (CR3)
    for k, op in enumerate(spec.ops):
        _render_op(a, lay, k, op, window_tables)
        if op.kind == "cr3switch":
            window_tables = lay.window_tables(spec.root2_tables if op.extra else None)
    if a.wide:
        a("pop rbp", "pop rbx")
    else:
        a("pop ebp", "pop edi", "pop esi", "pop ebx")
    a("ret")
    _render_support(a)
    return "\n".join(head + a.lines) + "\n"


def _render_op(a: _Asm, lay: Layout, k, op: Op, window_tables):
    R = a.r
    done = f"op{k}_done"
    a.lines.append(f"# op {k}: {op.kind} size {op.size} at {op.target:#x} value {op.value:#x}"
                   + (" lock" if op.lock else "") + (f" extra {op.extra}" if op.extra else ""))
    a(f"mov dword ptr [{V_RESUME:#x}], {done}", f"mov dword ptr [{V_RESUME + 4:#x}], 0",
      "xor eax, eax", "xor edx, edx")
    for page in op.rmw_window_pages:
        # see the module docstring: the window ptes of the target's pages get A|D first
        table, base = ((window_tables[1], lay.window2) if page >= lay.window2
                       else (window_tables[0], WINDOW))
        pte = table + ((page - base) >> 12) * lay.pte_size
        a(f"or dword ptr [{pte:#x}], 0x60", f"mov esi, {page:#x}", f"invlpg [{R('esi')}]")
    a(f"mov esi, {op.target:#x}")
    ptr = f"{_SIZE_PTR[op.size]} ptr [{R('esi')}]"
    dreg = _REG["d"][op.size]
    lk = "lock " if op.lock else ""
    if a.wide:
        a(f"mov rdx, {op.value:#x}")
    else:
        a(f"mov edx, {op.value & 0xFFFFFFFF:#x}")
    kind = op.kind
    if kind == "mov":
        a(f"mov {ptr}, {dreg}")
    elif kind == "movimm":
        a(f"mov {ptr}, {op.value & 0xFFFFFFFF:#x}")
    elif kind == "load":
        a(f"mov {_REG['a'][op.size]}, {ptr}")
    elif kind in ("or", "and", "xor", "add", "sub", "xadd"):
        a(f"{lk}{kind} {ptr}, {dreg}")
    elif kind in ("inc", "dec", "not", "neg"):
        a(f"{lk}{kind} {ptr}")
    elif kind in ("bts", "btr", "btc"):
        a(f"{lk}{kind} {ptr}, {op.extra}")
    elif kind == "xchg":
        a(f"xchg {ptr}, {dreg}")
    elif kind == "cmpxchg":
        if op.extra:
            a(f"mov {_REG['a'][op.size]}, {ptr}")
        a(f"{lk}cmpxchg {ptr}, {dreg}")
    elif kind == "cmpxchg8b":
        a(f"mov ebx, {op.value & 0xFFFFFFFF:#x}", f"mov ecx, {op.value >> 32:#x}")
        if op.extra:
            a(f"mov eax, dword ptr [{R('esi')}]", f"mov edx, dword ptr [{R('esi')} + 4]")
        a(f"{lk}cmpxchg8b qword ptr [{R('esi')}]")
    elif kind == "setcc":
        a("test edx, 1", f"setnz {ptr}")
    elif kind == "stos":
        a(f"mov edi, {op.target:#x}", f"mov ecx, {op.extra}", f"mov eax, {op.value & 0xFFFFFFFF:#x}")
        a("rep stosd dword ptr es:[rdi], eax" if a.wide else "rep stosd dword ptr es:[edi], eax")
    elif kind == "movs":
        a(f"mov edi, {op.target:#x}", f"mov esi, {DATA + 0x1000 * (N_DATA - 1) + 0x40:#x}",
          f"mov ecx, {op.extra}")
        a("rep movsd dword ptr es:[rdi], dword ptr [rsi]" if a.wide
          else "rep movsd dword ptr es:[edi], dword ptr [esi]")
    elif kind == "invlpg":
        a(f"invlpg [{R('esi')}]")
    elif kind == "cr3":
        a("mov rax, cr3" if a.wide else "mov eax, cr3", "mov cr3, rax" if a.wide else "mov cr3, eax")
    elif kind == "wp":
        a("mov rax, cr0" if a.wide else "mov eax, cr0", "xor eax, 0x10000",
          "mov cr0, rax" if a.wide else "mov cr0, eax")
    elif kind == "cr3switch":
        a(f"mov eax, {(lay.root2 if op.extra else lay.root):#x}",
          "mov cr3, rax" if a.wide else "mov cr3, eax")
    elif kind == "user":
        _render_user(a, k, op, done)
    elif kind == "nx":
        # EFER.NXE toggled: NX (bit 63) in a pte becomes a reserved bit or back; the CR3
        # reload below drops translations cached under the old setting
        a("mov ecx, 0xc0000080", "rdmsr", "xor eax, 0x800", "wrmsr")
    else:
        raise ValueError(f"unknown op kind {kind!r}")
    a.label(done)
    a("pushfq" if a.wide else "pushfd")
    a(f"mov dword ptr [{V_RES:#x}], eax", f"mov dword ptr [{V_RES2:#x}], edx")
    if a.wide:
        a("shr rax, 32", f"mov dword ptr [{V_RES + 4:#x}], eax", "shr rdx, 32",
          f"mov dword ptr [{V_RES2 + 4:#x}], edx")
    if kind not in ("load", "invlpg", "cr3", "wp", "cr3switch"):   # (after a store, nx, user)
        # the program invalidates after every store: what a stale TLB entry would give is
        # not defined by the architecture (the shadow MMU may drop an entry earlier than
        # Unicorn's TLB does), so no result may depend on one
        a("mov rax, cr3" if a.wide else "mov eax, cr3", "mov cr3, rax" if a.wide else "mov cr3, eax")
    a("pop rax" if a.wide else "pop eax", f"mov ecx, {k}", "call report")


def _render_user(a: _Asm, k, op: Op, done):
    """A user-mode excursion: save the kernel stack pointer, iret to CPL 3 (CS SEL_UCODE, SS
    SEL_UDATA, the stack at USTACK_TOP; the firmware's TSS gives the #PF handler its CPL-0
    stack), one load, store or fetch (a call to `ret` bytes) through the window with ESI =
    target, EDX = value; a #PF resumes at CPL 3 after the access; ``int TO_KERNEL_VECTOR``
    comes back to CPL 0 (``to_kernel``), at ``done``."""
    R = a.r
    back = f"op{k}_user_back"
    access = USER_ACCESSES[op.extra]
    a(f"mov dword ptr [{V_RESUME:#x}], {back}", f"mov dword ptr [{V_KRET:#x}], {done}",
      f"mov dword ptr [{V_KRET + 4:#x}], 0")
    if a.wide:
        a(f"mov qword ptr [{V_KSP:#x}], rsp", "push SEL_UDATA", f"push {USTACK_TOP:#x}",
          "pushfq", "push SEL_UCODE", f"mov ecx, op{k}_user", "push rcx", "iretq")
    else:
        a(f"mov dword ptr [{V_KSP:#x}], esp", "push SEL_UDATA", f"push {USTACK_TOP:#x}",
          "pushfd", "push SEL_UCODE", f"push op{k}_user", "iretd")
    a.label(f"op{k}_user")
    if not a.wide:                                   # iret to CPL 3 nulled DS and ES
        a("mov cx, SEL_UDATA", "mov ds, cx", "mov es, cx")
    ptr = f"{_SIZE_PTR[op.size]} ptr [{R('esi')}]"
    if access == "load":
        a(f"mov {_REG['a'][op.size]}, {ptr}")
    elif access == "store":
        a(f"mov {ptr}, {_REG['d'][op.size]}")
    else:
        a(f"call {R('esi')}")
    a.label(back)
    a(f"int {TO_KERNEL_VECTOR:#x}")


def _render_support(a: _Asm):
    R = a.r
    w = a.wide
    # to_kernel: the end of a user-mode excursion (int TO_KERNEL_VECTOR from CPL 3): kernel
    # segments, the kernel stack saved before the iret, on at [V_KRET]; EAX / EDX kept
    a.label("to_kernel")
    a("mov cx, SEL_KDATA", "mov ds, cx", "mov es, cx", "mov ss, cx")
    if w:
        a(f"mov rsp, qword ptr [{V_KSP:#x}]", f"jmp qword ptr [{V_KRET:#x}]")
    else:
        a(f"mov esp, dword ptr [{V_KSP:#x}]", f"jmp dword ptr [{V_KRET:#x}]")
    # report: ecx = op number, eax = flags; prints the line, clears the fault count
    a.label("report")
    a("and eax, 0x8d5", "push " + R("eax"), "mov eax, ecx", "call phex")
    a(f"mov eax, dword ptr [{V_CNT:#x}]", "call phex",
      f"mov eax, dword ptr [{V_ERR:#x}]", "call phex",
      f"mov eax, dword ptr [{V_CR2:#x}]", "call phex")
    if w:
        a(f"mov eax, dword ptr [{V_RES + 4:#x}]", "call phex")
    a(f"mov eax, dword ptr [{V_RES:#x}]", "call phex")
    if w:
        a(f"mov eax, dword ptr [{V_RES2 + 4:#x}]", "call phex")
    a(f"mov eax, dword ptr [{V_RES2:#x}]", "call phex")
    a("pop " + R("eax"), "call phex", "mov dx, 0x3f8", "mov al, 10", "out dx, al",
      f"mov dword ptr [{V_CNT:#x}], 0", "ret")
    # pf_handler: record error code and CR2, resume at [V_RESUME]
    a.label("pf_handler")
    if w:
        a("push rax", "mov rax, qword ptr [rsp + 8]", f"mov dword ptr [{V_ERR:#x}], eax",
          "mov rax, cr2", f"mov dword ptr [{V_CR2:#x}], eax", f"inc dword ptr [{V_CNT:#x}]",
          f"mov rax, {V_RESUME:#x}", "mov rax, qword ptr [rax]", "mov qword ptr [rsp + 16], rax",
          "pop rax", "add rsp, 8", "iretq")
    else:
        a("push eax", "mov eax, dword ptr [esp + 4]", f"mov dword ptr [{V_ERR:#x}], eax",
          "mov eax, cr2", f"mov dword ptr [{V_CR2:#x}], eax", f"inc dword ptr [{V_CNT:#x}]",
          f"mov eax, dword ptr [{V_RESUME:#x}]", "mov dword ptr [esp + 8], eax",
          "pop eax", "add esp, 4", "iretd")
    # phex: print eax as 8 hex digits and a space (preserves every register)
    a.label("phex")
    a(*(f"push {R(x)}" for x in ("eax", "ebx", "ecx", "edx")))
    a("mov ebx, eax", "mov ecx, 8", "mov dx, 0x3f8")
    a.label("phex_l")
    a("rol ebx, 4", "mov al, bl", "and al, 15", "cmp al, 10", "jb phex_d", "add al, 39")
    a.label("phex_d")
    a("add al, 48", "out dx, al", "dec ecx", "jnz phex_l", "mov al, 32", "out dx, al")
    a(*(f"pop {R(x)}" for x in ("edx", "ecx", "ebx", "eax")))
    a("ret")


def plain_spec(mode: str, ops=(), **win) -> Spec:
    """A Spec with every window pte mapping a data frame P|W|A|D (window table 1, entries
    0..N_DATA-1; the rest not present), overridden by ``win``: ``w1_<i>`` / ``w2_<i>`` = value of
    entry i of window table 1 / 2."""
    ptes = [0] * (2 * N_WIN)
    for i in range(N_DATA):
        ptes[i] = (DATA + 0x1000 * i) | _PTE_P | _PTE_W | _PTE_A | _PTE_D
    for key, value in win.items():
        table, idx = key.split("_")
        ptes[(0 if table == "w1" else N_WIN) + int(idx)] = value
    flags = _PTE_P | _PTE_W | _PTE_A
    return Spec(mode, False, ptes, (flags, flags), list(ops))


@dataclass(frozen=True)
class OpReport:
    op: int
    faults: int
    error_code: int
    cr2: int
    result: int                  # EAX / RAX after the operation
    result2: int                 # EDX / RDX
    flags: int                   # EFLAGS & (OF|SF|ZF|AF|PF|CF)


def parse_output(output: bytes, mode: str) -> list:
    """The per-operation lines of a program's serial output."""
    out = []
    for line in output.decode(errors="replace").splitlines():
        v = [int(x, 16) for x in line.split()]
        if mode == "64":
            v = v[:4] + [v[4] << 32 | v[5], v[6] << 32 | v[7], v[8]]
        out.append(OpReport(*v))
    return out
