"""Every policy driven through the sans-CPU MMU core (VmMmu / VcpuMmu / write_fault) with a plain
bytearray: the sans-CPU twins of tests/test_policies.py. No CPU adapter is involved: a trapped store
is what the CPU adapter would report -- ``hw_fill(window, PFERR_W)`` gives FILL_TRACKED, then
``handle_trapped_write`` gets the address, size, value, RIP, CPL and the decoded instruction (bytes
from keystone, which is an assembler, not a CPU).

Guest layout (every mode): X is a data page whose page table (PT) gets shadowed by a read of X;
WIN maps PT itself, writable, through another table, so a store through WIN is a store to X's pte.
The audit runs on every "exit" event and after every step.
"""
import ast
import functools
import os
import subprocess
import sys

import pytest
from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, Ks

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.emulate.decode import decode
from x86shadow.guesttables import GuestTables
from x86shadow.memory.ram import PhysMem
from x86shadow.mmu.audit import audit
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import PERM_W, SPTE_A, SPTE_W, spte_pfn
from x86shadow.mmu.vcpu_mmu import FILL_GUEST_FAULT, FILL_OK, FILL_TRACKED
from x86shadow.mmu.vm_mmu import REQ_TLB_FLUSH, VmMmu
from x86shadow.mmu.write_fault import COMPLETE, REEXECUTE, TrappedWrite, handle_trapped_write
from x86shadow.policies import OOS_ALWAYS, POLICY_NAMES, make_policy

LEGACY, PAE, LONG = pg.Mode.LEGACY, pg.Mode.PAE, pg.Mode.LONG
MODES = [LEGACY, PAE, LONG]
MODE_IDS = ["legacy", "pae", "long"]
R, W, U, FETCH = 0, pg.PFERR_W, pg.PFERR_U, pg.PFERR_FETCH          # access (PFERR_*) bits
P, RW, US, A, D = pg.PTE_P, pg.PTE_W, pg.PTE_U, pg.PTE_A, pg.PTE_D     # guest pte bits
PWU = pg.PTE_P | pg.PTE_W | pg.PTE_U
RAM = 8 << 20
TABLES, TABLES_END = 0x0040_0000, 0x0060_0000   # where the guest tables are allocated

X = 0x0040_0000            # data page whose page table is shadowed
OTHER = X + 0x3000         # another page mapped by the same table
DATA = 0x0030_0000         # X's frame
WIN = 0x0080_0000          # X's page table, mapped writable (through another table)
FAR = 0x00C0_0000          # a page mapped by yet another table
FAR2 = FAR + 0x1000
CODE = 0x00E0_0000         # guest code (Xen's emulate-ahead reads it from guest memory)
CODE_PA = 0x0020_0000
UNMAPPED = 0x0100_0000     # no mapping: a guest #PF
WIN_PD = 0x0140_0000       # X's page directory, mapped writable
WIN_PDPT = 0x0180_0000     # PAE: the PDPT, mapped writable
HIGH = 0xC000_0000         # PAE: mapped through PDPTE 3
RIP = 0x0010_0000          # unmapped RIP for traps whose code need not be in guest memory
NEWPTE = (DATA + 0x1000) | P | RW | US | A | D

_FORBIDDEN = ("x86shadow.cpu", "x86shadow.machine", "x86shadow.faultlab", "unicorn")


# --------------------------------------------------------------------------------------------
# helpers

@functools.lru_cache(maxsize=None)
def asm(src, bits, address=0):
    ks = Ks(KS_ARCH_X86, KS_MODE_64 if bits == 64 else KS_MODE_32)
    enc, _ = ks.asm(src, address)
    return bytes(enc)


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


class Tables(GuestTables):
    """tests/pagetables.Tables over zeroed RAM (its tagged RAM costs 0.2 s to import)."""

    def __init__(self, mode):
        self.buf = bytearray(RAM)
        super().__init__(mode, PhysMem(self.buf), TABLES, TABLES_END)


class Env:
    """One VM (one policy) over zeroed test RAM, with X's page table shadowed and write-tracked:
    the harness of the trapped-write path. ``kvm`` runs with out-of-sync pages off here (KVM's
    oos_shadow=0), as the leaf table would otherwise go out of sync at the first write
    (tests/test_unsync.py)."""

    def __init__(self, mode, policy="kvm", vcpus=1, setup=None, unsync=False):
        self.mode = mode
        self.t = t = Tables(mode)
        self.bits = 64 if mode == LONG else 32
        self.b = "rbx" if mode == LONG else "ebx"       # base register of the snippets
        self.esz = t.esz
        self.pte = t.map(X, DATA, PWU)
        self.pt = self.pte & ~0xFFF
        self.other_pte = t.map(OTHER, DATA + 0x3000, PWU)
        assert self.other_pte & ~0xFFF == self.pt
        t.map(WIN, self.pt, PWU | A | D)
        assert t.table_of(WIN) != self.pt
        t.map(FAR, DATA + 0x8000, PWU)
        t.map(FAR2, DATA + 0xA000, PWU)
        t.map(CODE, CODE_PA, PWU)
        self.windows = {self.pt: WIN}
        if setup is not None:
            setup(self)
        self.vm = vm = VmMmu(t.mem, policy=make_policy(policy, unsync))
        self.c = vm.counters
        self.decisions, self.policy_events, self.reloads = [], [], []
        vm.events.subscribe(self._record, (ev.WRITE_PROTECT_FAULT, ev.POLICY, ev.RELOAD_PDPTES))
        self.vcpus = [vm.add_vcpu() for _ in range(vcpus)]
        self.mmu = self.vcpus[0]
        for v in self.vcpus:
            v.set_context(self.ctx())
        # (the setup is audited once, at its end; from then on after every exit and every step)
        r = self.mmu.hw_fill(X, R)
        assert (r.kind, r.addr) == (FILL_OK, DATA)
        assert vm.is_shadowed(self.pt >> 12) and vm.is_tracked(self.pt >> 12)
        assert self.mmu.hw_fill(OTHER, R).kind == FILL_OK
        assert self.spte(X) is not None and self.spte(OTHER) is not None
        # the guest has read through the windows before (their shadows exist, read-only)
        for va in self.windows.values():
            r = self.mmu.hw_fill(va, R)
            assert r.kind == FILL_OK and not r.perms & PERM_W
        audit(vm)
        self.exit_audits = 0
        vm.events.subscribe(self._exit_audit, (ev.EXIT,))
        for v in self.vcpus:
            v.take_requests()          # serviced, as the CPU adapter does before entering the guest

    def ctx(self):
        t = self.t
        if self.mode == PAE:
            return pg.PagingContext(PAE, t.cr3, pdptes=pg.load_pdptes(t.mem, t.cr3))
        return t.ctx()

    def _exit_audit(self, _kind, _fields):
        audit(self.vm)
        self.exit_audits += 1

    def _record(self, kind, fields):
        if kind == ev.WRITE_PROTECT_FAULT:
            self.decisions.append(fields["decision"])
        elif kind == ev.POLICY:
            self.policy_events.append(fields["decision"])
        else:
            self.reloads.append(fields["pdptes"])

    # guest memory
    def rd(self, gpa, size=4):
        return self.t.mem.read_uint(gpa, size)

    def wr(self, gpa, size, value):
        self.t.mem.write_uint(gpa, size, value)

    # the MMU
    def fill(self, va, access=R, mmu=None):
        n = self.exit_audits
        r = (mmu or self.mmu).hw_fill(va, access)
        if self.exit_audits == n:
            audit(self.vm)      # (after a fault's "exit" audit the fill only sets spte A/D)
        return r

    def spte(self, va, mmu=None):
        m = mmu or self.mmu
        leaf = shadow_leaf(m.root, m.root_level, va)
        return None if leaf is None else leaf[0].spt[leaf[1]]

    @property
    def pt_gfn(self):
        return self.pt >> 12

    def shadowed(self):
        return self.vm.is_shadowed(self.pt_gfn)

    def insn(self, src, rip=RIP):
        d = decode(asm(src.format(b=self.b), self.bits, rip), rip, self.bits)
        assert d is not None
        return d

    def window_va(self, gpa):
        return self.windows[gpa & ~0xFFF] + (gpa & 0xFFF)

    def trap(self, insn, gpa, value, size=None, cpl=0, restartable=True, rip=None, mmu=None):
        """The guest stores value at gpa through the window; the CPU reports the trapped store."""
        m = mmu or self.mmu
        if isinstance(insn, str):
            insn = self.insn(insn, RIP if rip is None else rip)
        if rip is None:
            rip = insn.address if insn is not None else RIP
        if size is None:
            size = insn.access_size
        r = m.hw_fill(self.window_va(gpa), W | (U if cpl == 3 else 0))
        assert (r.kind, r.addr) == (FILL_TRACKED, gpa & ~0xFFF)
        audit(self.vm)
        out = handle_trapped_write(m, TrappedWrite(gpa, size, value, rip, cpl, insn, restartable,
                                                   exits=m.counters["exits"]))
        audit(self.vm)
        return out

    def native_store(self, gpa, size, value, mmu=None):
        """The re-execution after REEXECUTE: the window is now writable, the store goes through."""
        r = self.fill(self.window_va(gpa), W, mmu)
        assert r.kind == FILL_OK and r.perms & PERM_W and r.addr == gpa & ~0xFFF
        self.wr(gpa, size, value)
        audit(self.vm)

    def reshadow(self):
        r = self.fill(X)
        assert r.kind == FILL_OK and self.shadowed()

    def io_exit(self, mmu=None):
        """What the CPU adapter does for an I/O exit (vcpu._out): counted, seen by the policy."""
        m = mmu or self.mmu
        self.c["io_exits"] += 1
        self.c["exits"] += 1
        m.other_exit()


# --------------------------------------------------------------------------------------------
# the module is sans-CPU

def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_this_module_imports_nothing_of_the_cpu_side():
    with open(__file__, encoding="utf-8") as f:
        names = set(_imported_modules(ast.parse(f.read())))
    assert "x86shadow.mmu.write_fault" in names        # the parse did see the imports
    assert not [n for n in names if n.startswith(_FORBIDDEN)]
    # and nothing it imports pulls the CPU side in (fresh interpreter)
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r); import test_core_policies; "
            "print(sorted(m for m in sys.modules if m.startswith(%r)))" % (here, _FORBIDDEN))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_make_policy_knows_every_policy_and_rejects_others():
    assert POLICY_NAMES == ["kvm", "kvm-2008", "kvm-2008-accessfix", "kvm-2008-oos", "andrea",
                            "xen", "xen-oos", "emulate-all", "unshadow-all"]
    assert [make_policy(n).name for n in POLICY_NAMES] == POLICY_NAMES
    with pytest.raises(ValueError, match="unknown policy 'kvm-2009'"):
        make_policy("kvm-2009")
    # out-of-sync pages: on by default where a policy has them; xen-oos cannot turn them off
    assert [n for n in POLICY_NAMES if make_policy(n).unsync] == ["kvm", "kvm-2008-oos",
                                                                  "xen-oos"]
    assert make_policy("kvm-2008-oos", unsync=False).unsync is None
    with pytest.raises(ValueError, match="without them it is policy 'xen'"):
        make_policy("xen-oos", unsync=False)
    with pytest.raises(ValueError, match="has no out-of-sync pages"):
        make_policy("xen", unsync=True)


def test_setup_traps_a_store_through_the_window():
    e = Env(PAE)
    assert e.c["exits"] == 3 and e.c["pf_fixed"] == 3      # X, OTHER, the window (read)
    misses = e.c["mmu_cache_miss"]
    r = e.mmu.hw_fill(WIN, W)
    assert (r.kind, r.addr) == (FILL_TRACKED, e.pt)
    # the write-protect fault is counted by the trapped store, not by the fill
    assert e.c["exits"] == 3 and e.c["wp_faults"] == 0 and e.c["mmu_cache_miss"] == misses
    # the window's spte stays read-only; reads go through
    r = e.fill(WIN, R)
    assert r.kind == FILL_OK and not r.perms & PERM_W


# --------------------------------------------------------------------------------------------
# every policy x instruction classes

# (id, snippet ({b} = the register holding the pte's window address; eax = NEWPTE or 0x1000,
#  ecx = NEWPTE for cmpxchg), new value from the old pte, kvm_class, KVM PageTable flag,
#  clears the accessed bit)
CLASSES = [
    ("mov-reg", "mov dword ptr [{b}], eax", lambda o: NEWPTE, "mov", True, False),
    ("mov-imm", f"mov dword ptr [{{b}}], {NEWPTE:#x}", lambda o: NEWPTE, "mov", True, False),
    ("or", "or dword ptr [{b}], 0x40", lambda o: o | 0x40, "or", True, False),
    ("and", "and dword ptr [{b}], 0xfffffffd", lambda o: o & ~2, "and", True, False),
    ("and-clear-a", "lock and dword ptr [{b}], 0xffffffdf", lambda o: o & ~0x20, "and", True, True),
    ("xchg", "xchg dword ptr [{b}], eax", lambda o: NEWPTE, "xchg", True, False),
    ("cmpxchg", "lock cmpxchg dword ptr [{b}], ecx", lambda o: NEWPTE, "cmpxchg", True, False),
    ("bts", "lock bts dword ptr [{b}], 9", lambda o: o | 0x200, "bts", True, False),
    ("btr-a", "lock btr dword ptr [{b}], 5", lambda o: o & ~0x20, "btr", False, True),
    ("btr-w", "lock btr dword ptr [{b}], 1", lambda o: o & ~2, "btr", False, False),
    ("add", "add dword ptr [{b}], 0x1000", lambda o: o + 0x1000, "add", False, False),
    ("xadd", "lock xadd dword ptr [{b}], eax", lambda o: o + 0x1000, "xadd", False, False),
    ("stos", "stosd", lambda o: NEWPTE, "stos", False, False),
]
K2008 = ("kvm-2008", "kvm-2008-accessfix", "kvm-2008-oos", "andrea")
# the policies whose writes to a synced leaf table trap (Env turns out-of-sync pages off); xen-oos
# cannot turn them off -- its first kernel write to the table goes out of sync instead
# (tests/test_unsync.py)
SYNCED = [p for p in POLICY_NAMES if p not in OOS_ALWAYS]


def expected(policy, cls, pt_write, clears_a, cpl=0):
    """(verb, decision text) of the first trap, from the rules in the policies' docstrings."""
    cpl3 = "unprotect: user-mode (CPL3) write to a shadowed page table"
    k2008 = ("emulate", f"emulate: {cls} (kvm-2008 emulates every write)")
    if policy == "kvm":
        if pt_write:
            return "emulate", f"emulate: page-table writing insn ({cls})"
        return "unprotect", f"unprotect: {cls} is not page-table writing (retry)"
    if policy in ("kvm-2008", "kvm-2008-accessfix"):
        return ("unprotect", cpl3) if cpl == 3 else k2008
    if policy == "kvm-2008-oos":
        return k2008                  # 2.6.28 set_spte: no user-fault unshadow any more
    if policy == "andrea":
        if cpl == 3:
            return "unprotect", cpl3
        if clears_a:
            return "unprotect", f"unprotect: {cls} clears a pte accessed bit (andrea)"
        return k2008
    if policy == "xen":
        return ("unprotect", cpl3) if cpl == 3 else ("emulate", f"emulate: {cls}")
    if policy == "emulate-all":
        return "emulate", "emulate: every write (emulate-all)"
    assert policy == "unshadow-all"
    return "unprotect", "unprotect: every write (unshadow-all)"


def check_emulated(e, policy, old, value, before):
    """The store completed in memory and went through the policy's pte-write path."""
    assert e.rd(e.pte) == value
    if e.esz == 8:
        assert e.rd(e.pte + 4) == old >> 32          # the high half is untouched
    want = {"exits": 1, "pf_taken": 1, "wp_faults": 1, "pf_emulate": 1, "insn_emulation": 1, "mmu_pte_write": 1}
    if policy in K2008:
        want["mmu_pte_updated"] = 1
    assert delta(before, e.c) == want
    assert e.shadowed() and e.vm.is_tracked(e.pt_gfn)
    spte = e.spte(X)
    if policy in K2008 and value & (P | A) == P | A:
        # K25 update_pte: a present and accessed guest pte is re-installed at once (no A bit),
        # writable only if the guest pte is dirty
        assert spte is not None and spte_pfn(spte) == (value & 0xFFFFF000) >> 12
        assert bool(spte & SPTE_W) == bool(value & D and value & RW)
        assert not spte & SPTE_A
    else:
        assert spte is None            # the written spte is dropped; the next access re-reads it
    assert e.spte(OTHER) is not None   # ... and only that one
    r = e.fill(X)
    if value & P:
        assert (r.kind, r.addr) == (FILL_OK, value & 0xFFFFF000)


def check_unprotected(e, old, before, restartable=True, fail=False):
    want = {"exits": 1, "pf_taken": 1, "wp_faults": 1, "pf_emulate": 1, "mmu_unprotect": 1, "mmu_shadow_zapped": 1}
    if fail:
        want["insn_emulation_fail"] = 1
    assert delta(before, e.c) == want
    assert not e.shadowed() and not e.vm.is_tracked(e.pt_gfn)
    assert e.spte(X) is None and e.spte(OTHER) is None
    assert e.mmu.requests & REQ_TLB_FLUSH
    if restartable:
        assert e.rd(e.pte, e.esz) == old, "a refused store must leave memory untouched"


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", SYNCED)
@pytest.mark.parametrize("name,src,new,cls,pt_write,clears_a", CLASSES, ids=[c[0] for c in CLASSES])
def test_decision_per_policy_and_instruction_class(mode, policy, name, src, new, cls, pt_write,
                                                   clears_a):
    e = Env(mode, policy)
    insn = e.insn(src)
    assert (insn.kvm_class, insn.kvm_pt_write, insn.clears_accessed_bit, insn.access_size) == \
        (cls, pt_write, clears_a, 4)
    old = e.rd(e.pte, e.esz)
    assert old == DATA | PWU | A                 # the read of X set A, not D
    value = new(old) & 0xFFFFFFFF
    before = dict(e.c)
    e.mmu.take_requests()
    out = e.trap(insn, e.pte, value)
    verb, reason = expected(policy, cls, pt_write, clears_a)
    assert e.decisions == [reason]
    if verb == "emulate":
        assert out == COMPLETE
        check_emulated(e, policy, old, value, before)
    else:
        assert out == REEXECUTE
        check_unprotected(e, old, before)
        # the guest re-executes the store natively: no trap, then a later access re-shadows
        e.native_store(e.pte, 4, value)
        assert e.decisions == [reason]
        e.reshadow()
        r = e.mmu.hw_fill(WIN, W)
        assert r.kind == FILL_TRACKED, "re-shadowing must write-protect the window again"


def test_long_mode_qword_store_is_one_pte_write():
    e = Env(LONG, "kvm")
    insn = e.insn("mov qword ptr [rbx], rax")
    assert insn.access_size == 8
    newpte = NEWPTE | 1 << 63 | 0x5 << 52     # NX and software bits in the high dword
    before = dict(e.c)
    assert e.trap(insn, e.pte, newpte) == COMPLETE
    assert e.rd(e.pte, 8) == newpte
    assert delta(before, e.c) == {"exits": 1, "pf_taken": 1, "wp_faults": 1, "pf_emulate": 1, "insn_emulation": 1,
                                  "mmu_pte_write": 1}
    assert e.c["mmu_flooded"] == 0 and e.spte(X) is None and e.shadowed()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", SYNCED)
def test_cpl3_write(mode, policy):
    e = Env(mode, policy)
    old = e.rd(e.pte, e.esz)
    before = dict(e.c)
    out = e.trap("mov dword ptr [{b}], eax", e.pte, NEWPTE, cpl=3)
    verb, reason = expected(policy, "mov", True, False, cpl=3)
    assert e.decisions == [reason]
    if verb == "emulate":            # kvm has no CPL rule; emulate-all emulates everything
        assert out == COMPLETE
        check_emulated(e, policy, old, NEWPTE, before)
    else:
        assert out == REEXECUTE
        check_unprotected(e, old, before)


def test_andrea_accessed_bit_clear_at_cpl3_is_the_cpl3_rule():
    e = Env(PAE, "andrea")
    assert e.trap("lock btr dword ptr [{b}], 5", e.pte, e.rd(e.pte) & ~0x20, cpl=3) == REEXECUTE
    assert e.decisions == ["unprotect: user-mode (CPL3) write to a shadowed page table"]


# --------------------------------------------------------------------------------------------
# undecodable instructions and stores the CPU cannot refuse

UNDECODABLE = {"kvm": "fail", "kvm-2008": "fail", "kvm-2008-accessfix": "fail",
               "kvm-2008-oos": "fail", "andrea": "fail", "xen": "fail", "emulate-all": "emulate",
               "unshadow-all": "unprotect"}


@pytest.mark.parametrize("restartable", [True, False], ids=["restartable", "not-restartable"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("policy", SYNCED)
def test_undecodable_instruction(policy, mode, restartable):
    e = Env(mode, policy)
    old = e.rd(e.pte, e.esz)
    before = dict(e.c)
    e.mmu.take_requests()
    out = e.trap(None, e.pte, NEWPTE, size=4, restartable=restartable)
    kind = UNDECODABLE[policy]
    if kind == "emulate":
        assert e.decisions == ["emulate: every write (emulate-all)"]
        assert out == COMPLETE
        check_emulated(e, policy, old, NEWPTE, before)
        return
    if kind == "fail":
        assert e.decisions == ["unprotect: emulation failed (instruction not decoded)"]
    else:
        assert e.decisions == ["unprotect: every write (unshadow-all)"]
    check_unprotected(e, old, before, restartable, fail=(kind == "fail"))
    if restartable:
        assert out == REEXECUTE and e.rd(e.pte, e.esz) == old
    else:
        # unshadowed all the same, and the store is completed here (helper stores)
        assert out == COMPLETE and e.rd(e.pte) == NEWPTE


@pytest.mark.parametrize("policy", ["kvm", "unshadow-all"])
def test_not_restartable_unprotect_completes_the_store(policy):
    e = Env(PAE, policy)
    before = dict(e.c)
    value = e.rd(e.pte) + 0x1000
    out = e.trap("add dword ptr [{b}], 0x1000", e.pte, value, restartable=False)
    assert out == COMPLETE and e.rd(e.pte) == value
    check_unprotected(e, None, before, restartable=False)
    # the store needs no native re-execution: the window is writable at once
    r = e.fill(WIN, W)
    assert r.kind == FILL_OK and r.perms & PERM_W


# --------------------------------------------------------------------------------------------
# the loop breaker

@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_kvm_loop_breaker_emulates_the_same_rip_and_address(mode):
    e = Env(mode, "kvm")
    src = "lock btr dword ptr [{b}], 5"
    old = e.rd(e.pte)
    assert e.trap(src, e.pte, old & ~0x20) == REEXECUTE
    # the re-execution re-shadows the table before the store (a table that maps itself)
    e.reshadow()
    before = dict(e.c)
    assert e.trap(src, e.pte, old & ~0x20) == COMPLETE
    assert e.decisions == ["unprotect: btr is not page-table writing (retry)",
                           "emulate: loop breaker (btr retried at the same RIP and address)"]
    assert e.rd(e.pte) == old & ~0x20
    assert delta(before, e.c) == {"exits": 1, "pf_taken": 1, "wp_faults": 1, "pf_emulate": 1, "insn_emulation": 1,
                                  "mmu_pte_write": 1}
    assert e.shadowed() and e.c["mmu_unprotect"] == 1
    # the breaker fired once: the next trap at the same place is retried again
    assert e.trap(src, e.pte, old & ~0x20) == REEXECUTE
    assert e.decisions[-1] == "unprotect: btr is not page-table writing (retry)"
    assert e.c["mmu_unprotect"] == 2


@pytest.mark.parametrize("change", ["rip", "gpa"])
def test_kvm_loop_breaker_needs_the_same_rip_and_address(change):
    e = Env(PAE, "kvm")
    old = e.rd(e.pte)
    assert e.trap("add dword ptr [{b}], 0x1000", e.pte, old + 0x1000) == REEXECUTE
    e.native_store(e.pte, 4, old + 0x1000)
    e.reshadow()
    if change == "rip":
        out = e.trap(e.insn("add dword ptr [{b}], 0x1000", RIP + 0x40), e.pte, old + 0x2000)
    else:
        out = e.trap("add dword ptr [{b}], 0x1000", e.other_pte, e.rd(e.other_pte) + 0x1000)
    assert out == REEXECUTE
    assert e.decisions == ["unprotect: add is not page-table writing (retry)"] * 2
    assert e.c["mmu_unprotect"] == 2 and e.c["insn_emulation"] == 0


def test_kvm_loop_breaker_ignores_exits_in_between():
    # x86.c retry_instruction compares last_retry_eip/addr only, whatever happened in between
    e = Env(PAE, "kvm")
    old = e.rd(e.pte)
    assert e.trap("add dword ptr [{b}], 0x1000", e.pte, old + 0x1000) == REEXECUTE
    e.io_exit()
    e.fill(UNMAPPED)
    e.reshadow()
    assert e.trap("add dword ptr [{b}], 0x1000", e.pte, old + 0x1000) == COMPLETE
    assert e.decisions[-1] == "emulate: loop breaker (add retried at the same RIP and address)"


# (policy, cpl, snippet): verdicts that unprotect without KVM's retry flag
NO_RETRY = [("unshadow-all", 0, "mov dword ptr [{b}], eax"),
            ("kvm-2008", 3, "mov dword ptr [{b}], eax"),
            ("xen", 3, "mov dword ptr [{b}], eax"),
            ("andrea", 0, "lock btr dword ptr [{b}], 5")]
REEXEC_BREAKER = "emulate: re-execution trapped again at the same RIP and address (loop breaker)"


@pytest.mark.parametrize("between", ["nothing", "shadow-faults", "guest-fault", "io-exit",
                                     "other-rip"])
@pytest.mark.parametrize("policy,cpl,src", NO_RETRY, ids=[f"{p}-cpl{c}" for p, c, _ in NO_RETRY])
def test_loop_breaker_for_other_policies(policy, cpl, src, between):
    e = Env(PAE, policy)
    value = NEWPTE if "mov" in src else e.rd(e.pte) & ~0x20
    assert e.trap(src, e.pte, value, cpl=cpl) == REEXECUTE
    first = e.decisions[0]
    assert first.startswith("unprotect:")
    if between == "shadow-faults":
        e.fill(FAR)                  # pf_fixed: a shadow fault of the re-execution
    elif between == "guest-fault":
        r = e.fill(UNMAPPED)         # pf_guest is not progress either (write_fault._progress)
        assert r.kind == FILL_GUEST_FAULT
    elif between == "io-exit":
        e.io_exit()                  # a real exit: the guest made progress
    e.reshadow()
    rip = RIP + 0x40 if between == "other-rip" else RIP
    before = dict(e.c)
    out = e.trap(e.insn(src, rip), e.pte, value, cpl=cpl)
    if between in ("nothing", "shadow-faults", "guest-fault"):
        assert out == COMPLETE and e.decisions == [first, REEXEC_BREAKER]
        assert e.rd(e.pte) == value
        assert delta(before, e.c)["insn_emulation"] == 1
    else:
        assert out == REEXECUTE and e.decisions == [first, first]
        assert e.c["mmu_unprotect"] == 2 and e.c["insn_emulation"] == 0


def test_no_loop_breaker_after_a_completed_store():
    # a non-restartable store was completed, so no re-execution is pending
    e = Env(PAE, "unshadow-all")
    assert e.trap("mov dword ptr [{b}], eax", e.pte, NEWPTE, restartable=False) == COMPLETE
    e.reshadow()
    assert e.trap("mov dword ptr [{b}], eax", e.pte, NEWPTE) == REEXECUTE
    assert e.decisions == ["unprotect: every write (unshadow-all)"] * 2


def test_undecodable_retried_twice_is_completed_by_the_loop_breaker():
    e = Env(LEGACY, "kvm")
    assert e.trap(None, e.pte, NEWPTE, size=4) == REEXECUTE
    e.reshadow()
    assert e.trap(None, e.pte, NEWPTE, size=4) == COMPLETE
    assert e.decisions == ["unprotect: emulation failed (instruction not decoded)", REEXEC_BREAKER]
    assert e.rd(e.pte) == NEWPTE
    assert e.c["insn_emulation_fail"] == 1 and e.c["insn_emulation"] == 1


# --------------------------------------------------------------------------------------------
# a stale trap: the frame stopped being tracked after the fill

@pytest.mark.parametrize("restartable", [True, False], ids=["restartable", "not-restartable"])
@pytest.mark.parametrize("policy", SYNCED)
def test_stale_trap(policy, restartable):
    e = Env(PAE, policy)
    r = e.mmu.hw_fill(WIN, W)
    assert r.kind == FILL_TRACKED
    assert e.vm.unprotect(e.pt_gfn, reason="another vCPU")
    audit(e.vm)
    e.mmu.take_requests()
    old = e.rd(e.pte)
    before = dict(e.c)
    insn = e.insn("mov dword ptr [{b}], eax")
    out = handle_trapped_write(e.mmu, TrappedWrite(e.pte, 4, NEWPTE, RIP, 0, insn, restartable,
                                                   e.c["exits"]))
    audit(e.vm)
    assert e.c == before and e.decisions == []
    if restartable:
        assert out == REEXECUTE and e.rd(e.pte) == old
        assert e.mmu.requests & REQ_TLB_FLUSH
    else:
        assert out == COMPLETE and e.rd(e.pte) == NEWPTE
        assert not e.mmu.requests & REQ_TLB_FLUSH


# --------------------------------------------------------------------------------------------
# kvm-2008: flood detection, re-install, misaligned writes

def write_ptes(e, n, value=NEWPTE, mmu=None, first=0):
    """n emulated 4-byte movs to the ptes first .. first+n-1 of X's table."""
    for k in range(first, first + n):
        assert e.trap("mov dword ptr [{b}], eax", e.pte + k * e.esz, value, mmu=mmu) == COMPLETE


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_kvm_2008_third_write_in_a_row_floods(mode):
    e = Env(mode, "kvm-2008")
    st = e.mmu.policy_state
    write_ptes(e, 2)
    assert (st.last_pt_write_gfn, st.last_pt_write_count) == (e.pt_gfn, 2)
    assert e.c["mmu_flooded"] == 0 and e.shadowed()
    # the spte the second write installed speculatively: not accessed
    assert not e.spte(X + 0x1000) & SPTE_A
    write_ptes(e, 1, first=2)
    assert e.c["mmu_flooded"] == 1 and e.c["mmu_shadow_zapped"] == 1
    assert not e.shadowed() and not e.vm.is_tracked(e.pt_gfn)
    assert e.policy_events[-1] == "zap: flooded (3th write in a row, last pte not accessed)"
    assert [e.rd(e.pte + k * e.esz) for k in range(3)] == [NEWPTE] * 3
    assert e.c["mmu_pte_updated"] == 2          # the flooded write updates nothing
    assert st.last_pte_updated is None


@pytest.mark.parametrize("between", ["guest-fault", "fixed-fault", "access"])
def test_kvm_2008_flood_count_reset(between):
    e = Env(PAE, "kvm-2008")
    st = e.mmu.policy_state
    write_ptes(e, 2)
    exits = e.c["exits"]
    if between == "guest-fault":
        assert e.fill(UNMAPPED).kind == FILL_GUEST_FAULT        # K25: "reset fork detector"
        assert st.last_pt_write_count == 0
    elif between == "fixed-fault":
        assert e.fill(FAR).kind == FILL_OK
        assert st.last_pt_write_count == 0
    else:
        # the guest uses the pte it just wrote: a TLB fill that hits, no exit; A is set
        assert e.fill(X + 0x1000).kind == FILL_OK
        assert e.c["exits"] == exits and st.last_pt_write_count == 2
        assert e.spte(X + 0x1000) & SPTE_A
    write_ptes(e, 1, first=2)
    assert e.c["mmu_flooded"] == 0 and e.shadowed()
    assert st.last_pt_write_count == 1


@pytest.mark.parametrize("policy,flooded", [("kvm-2008", 1), ("kvm-2008-accessfix", 0),
                                            ("andrea", 0)])
def test_access_fix_for_ptes_pointing_to_the_page_table(policy, flooded):
    # the guest writes ptes that map its page table itself (K26's "false flooding")
    e = Env(PAE, policy)
    value = e.pt | P | RW | US | A | D
    write_ptes(e, 2, value)
    spte = e.spte(X)                    # installed by the first write, maps the page table
    assert spte is not None and spte_pfn(spte) == e.pt_gfn and not spte & SPTE_W
    if policy == "kvm-2008":
        assert not spte & SPTE_A
    else:
        assert spte & SPTE_A, "the access fix marks the last installed spte accessed"
        assert e.policy_events.count(
            "access fix: last installed pte maps this page table; marked accessed") == 1
    write_ptes(e, 1, value, first=2)
    assert e.c["mmu_flooded"] == flooded and e.shadowed() == (not flooded)


def test_access_fix_does_not_help_ptes_to_other_frames():
    e = Env(PAE, "kvm-2008-accessfix")
    write_ptes(e, 3)
    assert e.c["mmu_flooded"] == 1
    assert not any(p.startswith("access fix") for p in e.policy_events)


@pytest.mark.parametrize("policy,recorded", [("kvm-2008", True), ("kvm-2008-accessfix", False)])
def test_last_pte_updated_demand_vs_speculative_installs(policy, recorded):
    # K25: every install that is not a pt write; K26: speculative installs only
    e = Env(LEGACY, policy)
    st = e.mmu.policy_state
    if recorded:
        sp, idx = st.last_pte_updated        # the setup's last demand fault: the window read
        assert sp.spt[idx] == e.spte(WIN) and st.last_pte_gfn == e.pt_gfn
    else:
        assert st.last_pte_updated is None
    write_ptes(e, 1)
    sp, idx = st.last_pte_updated
    assert sp.spt[idx] == e.spte(X) and st.last_pte_gfn == NEWPTE >> 12


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("flags,installed,writable", [
    (P | RW | US | A | D, True, True), (P | RW | US | A, True, False),
    (P | US | A | D, True, False), (P | RW | US, False, False), (RW | US | A | D, False, False)],
    ids=["PWUAD", "PWUA", "PUAD", "PWU", "not-present"])
def test_kvm_2008_reinstalls_present_and_accessed_ptes_only(mode, flags, installed, writable):
    e = Env(mode, "kvm-2008")
    value = (DATA + 0x1000) | flags
    assert e.trap("mov dword ptr [{b}], eax", e.pte, value) == COMPLETE
    assert e.decisions == ["emulate: mov (kvm-2008 emulates every write)"]
    assert e.c["mmu_pte_updated"] == 1          # counted per attempt
    spte = e.spte(X)
    if installed:
        assert spte is not None and spte_pfn(spte) == (DATA + 0x1000) >> 12
        assert bool(spte & SPTE_W) == writable
        assert e.policy_events == [f"update: 1 spte(s) from guest pte {value:#x}"]
    else:
        assert spte is None


def test_kvm_2008_walker_dirty_bit_is_a_pte_write():
    # K25 FNAME(walk_addr) sets D with a cmpxchg and calls kvm_mmu_pte_write itself
    for policy, writes in (("kvm-2008", 1), ("kvm", 0)):
        e = Env(PAE, policy)
        r = e.fill(X, W)
        assert r.kind == FILL_OK and r.perms & PERM_W
        assert e.rd(e.pte) & D
        assert e.c["mmu_pte_write"] == writes, policy
        assert e.c["wp_faults"] == 0


# (id, snippet, offset into the pte, size, zapped by kvm, zapped by kvm-2008, modes)
MISALIGNED = [
    ("2-byte", "mov word ptr [{b}+1], 0x10", 1, 2, True, True, MODES),
    ("1-byte-at-pte", "mov byte ptr [{b}], 0x67", 0, 1, False, True, MODES),
    ("1-byte-inside", "mov byte ptr [{b}+1], 0x10", 1, 1, True, True, MODES),
    ("4-byte-crossing-4", "mov dword ptr [{b}+2], 0x1000", 2, 4, True, True, [LEGACY]),
    ("4-byte-crossing-8", "mov dword ptr [{b}+6], 0", 6, 4, True, True, [PAE, LONG]),
    ("4-byte-high-half", "mov dword ptr [{b}+4], 0", 4, 4, False, False, [PAE, LONG]),
]
MISALIGNED_CASES = [(mode, *m[1:6]) for m in MISALIGNED for mode in m[6]]


@pytest.mark.parametrize("policy", ["kvm", "kvm-2008"])
@pytest.mark.parametrize("mode,src,off,size,kvm_zap,k2008_zap", MISALIGNED_CASES,
                         ids=[f"{m[0]}-{mode.name.lower()}" for m in MISALIGNED for mode in m[6]])
def test_misaligned_writes(policy, mode, src, off, size, kvm_zap, k2008_zap):
    e = Env(mode, policy)
    insn = e.insn(src)
    assert insn.access_size == size
    value = insn.src_imm
    gpa = e.pte + off
    image = bytearray(e.t.buf[e.pt:e.pt + 0x1000])
    image[gpa & 0xFFF:(gpa & 0xFFF) + size] = value.to_bytes(size, "little")
    assert e.trap(insn, gpa, value) == COMPLETE
    assert e.t.buf[e.pt:e.pt + 0x1000] == image
    zapped = kvm_zap if policy == "kvm" else k2008_zap
    assert e.decisions == ["emulate: page-table writing insn (mov)" if policy == "kvm"
                           else "emulate: mov (kvm-2008 emulates every write)"]
    assert e.c["mmu_flooded"] == zapped and e.c["mmu_shadow_zapped"] == zapped
    assert e.shadowed() == (not zapped)
    reason = f"zap: misaligned {size}-byte write at offset {gpa & 0xFFF:#x}"
    assert (reason in e.policy_events) == zapped
    if zapped:
        assert e.spte(X) is None and e.spte(OTHER) is None
    elif policy == "kvm":
        assert e.spte(X) is None and e.spte(OTHER) is not None
    else:
        # K25 re-reads the whole pte (the high half, rewritten) and re-installs it
        assert spte_pfn(e.spte(X)) == DATA >> 12 and e.c["mmu_pte_updated"] == 1


# --------------------------------------------------------------------------------------------
# modern kvm

@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_kvm_flooding_without_a_fault_through_the_page(mode):
    e = Env(mode, "kvm")
    sp = e.vm.shadow_pages_of(e.pt_gfn)[0]
    write_ptes(e, 2)
    assert sp.write_flooding_count == 2
    e.fill(FAR)                               # a fault elsewhere does not reset the count
    assert sp.write_flooding_count == 2
    write_ptes(e, 1, first=2)
    assert e.c["mmu_flooded"] == 1 and sp.zapped and not e.shadowed()
    assert e.policy_events == ["zap: flooded (3 writes without a guest fault through the page)"]


def test_kvm_fault_through_the_page_resets_the_flood_count():
    e = Env(PAE, "kvm")
    sp = e.vm.shadow_pages_of(e.pt_gfn)[0]
    write_ptes(e, 2)
    assert e.fill(X).kind == FILL_OK            # X's spte was dropped: a fault through the page
    assert sp.write_flooding_count == 0
    write_ptes(e, 2, first=2)
    assert sp.write_flooding_count == 2 and e.c["mmu_flooded"] == 0 and e.shadowed()


@pytest.mark.parametrize("policy", ["kvm", "kvm-2008"])
@pytest.mark.parametrize("mode,pde_sptes", [(LEGACY, 2), (PAE, 1), (LONG, 1)],
                         ids=MODE_IDS)
def test_write_to_a_page_directory_zaps_the_pde(policy, mode, pde_sptes):
    def window_on_pd(e):
        pd = e.t.table_of(X, 2)
        e.t.map(WIN_PD, pd, PWU | A | D)
        e.windows[pd] = WIN_PD
        e.pde = e.t.slot(X, 2)

    e = Env(mode, policy, setup=window_on_pd)
    pde = e.rd(e.pde)
    misses = e.c["mmu_cache_miss"]
    assert e.trap("mov dword ptr [{b}], eax", e.pde, pde) == COMPLETE
    # one 4 MiB guest PDE is two shadow PDEs
    assert e.c["mmu_pde_zapped"] == pde_sptes and e.c["mmu_pte_updated"] == 0
    assert e.spte(X) is None and e.shadowed()   # unlinked, not zapped
    assert e.fill(X).addr == DATA and e.c["mmu_cache_miss"] == misses


# --------------------------------------------------------------------------------------------
# xen

XEN_EARLY = [(mode, between) for mode in MODES
             for between in ("nothing", "nonzero", "high-half", "fixed-fault")
             if not (between == "high-half" and mode == LEGACY)]     # 4-byte ptes: no high half


@pytest.mark.parametrize("mode,between", XEN_EARLY,
                         ids=[f"{m.name.lower()}-{b}" for m, b in XEN_EARLY])
def test_xen_early_unshadow(mode, between):
    e = Env(mode, "xen")
    z = "mov dword ptr [{b}], 0"
    assert e.trap(z, e.pte + e.esz, 0) == COMPLETE
    assert e.mmu.policy_state.last_emulated_gfn == e.pt_gfn
    if between == "nonzero":
        assert e.trap("mov dword ptr [{b}], 0x1000", e.pte + 3 * e.esz, 0x1000) == COMPLETE
    elif between == "high-half":
        # X33: aligned to the guest pte size (8), so a zero high half is not a zero write
        assert e.trap(z, e.pte + 3 * e.esz + 4, 0) == COMPLETE
    elif between == "fixed-fault":
        e.fill(FAR)
    if between != "nothing":
        assert e.mmu.policy_state.last_emulated_gfn is None
    assert e.trap(z, e.pte + 2 * e.esz, 0) == COMPLETE
    assert set(e.decisions) == {"emulate: mov"}
    unshadowed = between == "nothing"
    assert e.c["mmu_unprotect"] == unshadowed and e.shadowed() == (not unshadowed)
    early = "unshadow: early unshadow (second zero write in a row)"
    assert (early in e.policy_events) == unshadowed
    assert e.c["insn_emulation"] == len(e.decisions)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_xen_unaligned_write_unshadows_but_is_emulated(mode):
    e = Env(mode, "xen")
    image = bytearray(e.t.buf[e.pt:e.pt + 16])
    image[2:6] = (0x1000).to_bytes(4, "little")
    assert e.trap("mov dword ptr [{b}+2], 0x1000", e.pte + 2, 0x1000) == COMPLETE
    assert e.t.buf[e.pt:e.pt + 16] == image
    assert e.decisions == ["emulate: mov"]
    assert e.policy_events == ["unshadow: unaligned 4-byte write"]
    assert e.c["mmu_unprotect"] == 1 and e.c["insn_emulation"] == 1 and not e.shadowed()


def code_at(e, src):
    """Put the 32-bit code in guest RAM at CODE, fetch it, and decode it from guest memory."""
    code = asm(src, 32, CODE)
    e.t.buf[CODE_PA:CODE_PA + len(code) + 16] = code + b"\xf4" * 16
    assert e.fill(CODE, FETCH).kind == FILL_OK
    out = [e.mmu.decode_at(CODE, 32)]
    while out[-1].address + out[-1].size < CODE + len(code):
        out.append(e.mmu.decode_at(out[-1].address + out[-1].size, 32))
    return out


@pytest.mark.parametrize("gap,ahead", [(0, 1), (1, 2), (3, 4), (4, None)])
def test_xen_pae_emulate_ahead(gap, ahead):
    e = Env(PAE, "xen")
    off = e.pte & 0xFFF
    src = (f"mov ebx, {WIN + off:#x}; mov dword ptr [ebx + 4], 0;" + " nop;" * gap +
           f" mov dword ptr [ebx], {NEWPTE:#x}")
    insns = code_at(e, src)
    first, second = insns[1], insns[-1]
    assert first.text == "mov dword ptr [ebx + 4], 0" and second.kvm_class == "mov"
    assert e.trap(first, e.pte + 4, 0) == COMPLETE
    # the 4 instructions after it in program order (the code ends with hlt, which stops it)
    end = CODE + len(asm(src, 32, CODE))
    assert e.mmu.policy_state.ahead[1] == ([d.address for d in insns[2:]] + [end])[:4]
    before = dict(e.c)
    assert e.trap(second, e.pte, NEWPTE) == COMPLETE
    assert e.rd(e.pte, 8) == NEWPTE
    if ahead is not None:
        # the store belongs to the ahead-th instruction emulated after the exit: no exit
        assert e.decisions == ["emulate: mov", f"emulate-ahead {ahead}/4"]
        assert delta(before, e.c) == {"emulate_ahead": ahead, "mmu_pte_write": 1}
    else:
        # the window ran its course (4 instructions without a page-table write)
        assert e.decisions == ["emulate: mov"] * 2
        assert delta(before, e.c) == {"emulate_ahead": 4, "exits": 1, "pf_taken": 1, "wp_faults": 1,
                                      "pf_emulate": 1, "insn_emulation": 1, "mmu_pte_write": 1}


@pytest.mark.parametrize("between", ["fixed-fault", "io-exit"])
def test_xen_emulate_ahead_window_closes_on_an_exit(between):
    e = Env(PAE, "xen")
    off = e.pte & 0xFFF
    insns = code_at(e, f"mov ebx, {WIN + off:#x}; mov dword ptr [ebx + 4], 0; "
                       f"mov dword ptr [ebx], {NEWPTE:#x}; nop; nop; nop")
    assert e.trap(insns[1], e.pte + 4, 0) == COMPLETE
    if between == "fixed-fault":
        e.fill(FAR)
    else:
        e.io_exit()
    assert e.mmu.policy_state.ahead is None and e.c["emulate_ahead"] == 4
    assert e.trap(insns[2], e.pte, NEWPTE) == COMPLETE
    assert e.decisions == ["emulate: mov"] * 2 and e.c["wp_faults"] == 2


def test_xen_emulate_ahead_stops_at_a_control_transfer():
    e = Env(PAE, "xen")
    off = e.pte & 0xFFF
    insns = code_at(e, f"mov ebx, {WIN + off:#x}; mov dword ptr [ebx + 4], 0; jmp next; next: "
                       f"mov dword ptr [ebx], {NEWPTE:#x}")
    assert e.trap(insns[1], e.pte + 4, 0) == COMPLETE
    assert e.mmu.policy_state.ahead[1] == [insns[2].address]      # the jmp, then stop
    assert e.trap(insns[3], e.pte, NEWPTE) == COMPLETE
    assert e.decisions == ["emulate: mov"] * 2 and e.c["emulate_ahead"] == 1


@pytest.mark.parametrize("mode", [LEGACY, LONG], ids=["legacy", "long"])
def test_xen_emulates_ahead_only_for_pae_guests(mode):
    e = Env(mode, "xen")
    assert e.trap("mov dword ptr [{b}+4], 0", e.pte + 4, 0) == COMPLETE
    assert e.mmu.policy_state.ahead is None
    assert e.trap("mov dword ptr [{b}], eax", e.pte, NEWPTE) == COMPLETE
    assert e.c["wp_faults"] == 2 and e.c["emulate_ahead"] == 0


# --------------------------------------------------------------------------------------------
# PAE: the PDPT in use is tracked but not shadowed

def pdpt_setup(e):
    t = e.t
    assert t.map(HIGH, DATA + 0x9000, PWU) and t.cr3 & 0xFFF == 0
    e.pdpte3 = t.cr3 + 24
    e.saved_pdpte3 = t.rd(e.pdpte3)
    t.wr(e.pdpte3, 0)                  # not present when CR3 is loaded
    t.map(WIN_PDPT, t.cr3, PWU | A | D)
    e.windows[t.cr3] = WIN_PDPT


@pytest.mark.parametrize("policy", SYNCED)
def test_pae_pdpt_write_is_emulated_and_reloads_the_root(policy):
    e = Env(PAE, policy, setup=pdpt_setup)
    pdpt_gfn = e.t.cr3 >> 12
    assert e.vm.is_tracked(pdpt_gfn) and not e.vm.is_shadowed(pdpt_gfn)
    assert e.mmu.pdpt_gfn == pdpt_gfn
    assert e.fill(HIGH).kind == FILL_GUEST_FAULT
    root = e.mmu.root
    assert root.children[3] is None
    before = dict(e.c)
    value = e.saved_pdpte3
    assert value & P and value >> 32 == 0
    assert e.trap("mov dword ptr [{b}], eax", e.pdpte3, value) == COMPLETE
    assert e.decisions == ["emulate: write to the PAE PDPT in use"]
    assert e.rd(e.pdpte3, 8) == value
    # the reload shadows the new PDPTE's directory: one new shadow page
    assert delta(before, e.c) == {"exits": 1, "pf_taken": 1, "wp_faults": 1, "pf_emulate": 1, "insn_emulation": 1,
                                  "mmu_cache_miss": 1}
    assert e.mmu.ctx.pdptes[3] == value and e.mmu.root is not root
    assert e.mmu.root.children[3] is not None and e.reloads == [list(e.mmu.ctx.pdptes)]
    assert e.mmu.requests & REQ_TLB_FLUSH
    audit(e.vm)
    r = e.fill(HIGH)
    assert (r.kind, r.addr) == (FILL_OK, DATA + 0x9000)
    # the page tables are still shadowed as before
    assert e.shadowed() and e.fill(X).addr == DATA


def test_pae_pdpt_frame_write_outside_the_pdptes_keeps_the_root():
    e = Env(PAE, "kvm", setup=pdpt_setup)
    root = e.mmu.root
    gpa = e.t.cr3 + 0x100
    assert e.trap("mov dword ptr [{b}], eax", gpa, 0x1234) == COMPLETE
    assert e.decisions == ["emulate: write to the PAE PDPT in use"]
    assert e.rd(gpa) == 0x1234 and e.mmu.root is root and e.reloads == []
    # rewriting a PDPTE with the value it has is no change either
    assert e.trap("mov dword ptr [{b}], eax", e.t.cr3, e.rd(e.t.cr3)) == COMPLETE
    assert e.mmu.root is root and e.reloads == []


# --------------------------------------------------------------------------------------------
# per-vCPU policy state

@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_kvm_2008_flood_counters_are_per_vcpu(mode):
    e = Env(mode, "kvm-2008", vcpus=2)
    v0, v1 = e.vcpus
    assert v0.policy_state is not v1.policy_state
    assert v0.policy_state.last_pte_updated is not None   # v0 installed the setup's sptes
    assert v1.policy_state.last_pte_updated is None
    for k in range(4):                                    # interleaved: v0, v1, v0, v1
        write_ptes(e, 1, mmu=e.vcpus[k % 2], first=k)
    assert e.c["mmu_flooded"] == 0 and e.shadowed()
    assert v0.policy_state.last_pt_write_count == 2 == v1.policy_state.last_pt_write_count
    assert v0.policy_state.last_pte_updated is not None
    assert v1.policy_state.last_pte_updated is not None
    # a fault on v1 resets v1's detector only
    assert e.fill(FAR2, mmu=v1).kind == FILL_OK
    assert v1.policy_state.last_pte_updated[0].gfn != e.pt_gfn
    assert (v0.policy_state.last_pt_write_count, v1.policy_state.last_pt_write_count) == (2, 0)
    write_ptes(e, 1, mmu=v0, first=4)                     # v0's third write in a row
    assert e.c["mmu_flooded"] == 1 and not e.shadowed()
    # K25 kvm_mmu_zap_page resets last_pte_updated on every vCPU
    assert v0.policy_state.last_pte_updated is None
    assert v1.policy_state.last_pte_updated is None


def test_any_zap_resets_last_pte_updated_on_every_vcpu():
    e = Env(PAE, "kvm-2008", vcpus=2)
    v0, v1 = e.vcpus
    assert v0.policy_state.last_pte_updated is not None
    far_pt = e.t.table_of(FAR) >> 12
    e.fill(FAR, mmu=v1)
    assert v1.policy_state.last_pte_updated[0].gfn == far_pt
    e.vm.zap_page(e.vm.shadow_pages_of(far_pt)[0], reason="test")
    audit(e.vm)
    assert v0.policy_state.last_pte_updated is None and v1.policy_state.last_pte_updated is None
    assert e.shadowed()


def test_loop_breaker_state_is_per_vcpu():
    e = Env(PAE, "kvm", vcpus=2)
    v0, v1 = e.vcpus
    src = "add dword ptr [{b}], 0x1000"
    old = e.rd(e.pte)
    assert e.trap(src, e.pte, old + 0x1000, mmu=v0) == REEXECUTE
    e.reshadow()
    # the same RIP and address on the other vCPU is not v0's retry
    assert e.trap(src, e.pte, old + 0x1000, mmu=v1) == REEXECUTE
    assert e.decisions == ["unprotect: add is not page-table writing (retry)"] * 2
    # v0's retry is still pending: its next trap there is v0's loop breaker
    e.reshadow()
    assert e.trap(src, e.pte, old + 0x1000, mmu=v0) == COMPLETE
    assert e.decisions[-1] == "emulate: loop breaker (add retried at the same RIP and address)"


# --------------------------------------------------------------------------------------------
# andrea: the accessed bit is bit 5 of a pte's low dword (low byte for the byte-sized AND)

@pytest.mark.parametrize("mode", [PAE, LONG], ids=["pae", "long"])
@pytest.mark.parametrize("src,off,size", [("lock btr dword ptr [{b}], 5", 0, 4),
                                          ("lock and byte ptr [{b}], 0xdf", 0, 1)],
                         ids=["btr", "and-byte"])
def test_andrea_unprotects_an_accessed_bit_clear(mode, src, off, size):
    e = Env(mode, "andrea")
    old = e.rd(e.pte, e.esz)
    assert e.trap(src, e.pte + off, e.rd(e.pte + off, size) & ~0x20) == REEXECUTE
    assert e.decisions[0].endswith("clears a pte accessed bit (andrea)")
    assert e.rd(e.pte, e.esz) == old


@pytest.mark.xfail(strict=True, reason=(
    "x86shadow/policies/kvm2008.py Andrea.classify (line 175) trusts the static "
    "Decoded.clears_accessed_bit alone; decode.py _clears_accessed_bit says the policy must "
    "still check that the store hits the low dword (byte) of a pte"))
@pytest.mark.parametrize("mode", [PAE, LONG], ids=["pae", "long"])
@pytest.mark.parametrize("src,off,size", [("lock btr dword ptr [{b}], 5", 4, 4),
                                          ("lock and byte ptr [{b}], 0xdf", 1, 1)],
                         ids=["btr-high-dword", "and-byte-1"])
def test_andrea_store_that_clears_no_accessed_bit_is_emulated(mode, src, off, size):
    # bit 5 of the high dword is pte bit 37 (a frame bit); bit 5 of byte 1 is bit 13
    e = Env(mode, "andrea")
    value = e.rd(e.pte + off, size) & ~0x20
    out = e.trap(src, e.pte + off, value)
    assert e.decisions[0] == f"emulate: {e.insn(src).kvm_class} (kvm-2008 emulates every write)"
    assert out == COMPLETE and e.rd(e.pte + off, size) == value
