"""Every policy against every instruction class, and each special rule, at instruction level
(x86shadow.faultlab). Expected decisions are derived from the rules of docs/POLICY_SOURCES.md (see
``expected``), not from earlier runs; guest memory, registers and flags must end up exactly as
Unicorn's own MMU leaves them."""
import pytest

from x86shadow.faultlab import FaultLab
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.policies import OOS_ALWAYS, POLICY_NAMES

X = 0x4000_0000            # a data page whose page table gets shadowed
WIN = 0x4080_0000          # that page table, mapped here (another table maps the window)
DATA = 0x0200_0000         # X's frame
OUT = 0x0300_0000          # where snippets save registers and flags (identity-mapped)
SAVE32 = f"""
    pushfd
    pop dword ptr [{OUT:#x}]
    mov dword ptr [{OUT + 4:#x}], eax
    mov dword ptr [{OUT + 8:#x}], edx
    mov dword ptr [{OUT + 12:#x}], ecx
    mov dword ptr [{OUT + 16:#x}], edi
    mov dword ptr [{OUT + 20:#x}], esi
"""

# (class name, snippet writing X's pte through WIN (ebx = address of the pte), is in KVM's
#  page-table-writing set, clears the accessed bit)
NEWPTE = DATA | 0x1000 | 0x67          # another frame, P|W|U|A|D
CLASSES = [
    ("mov-reg", f"mov eax, {NEWPTE:#x}\n mov dword ptr [ebx], eax", True, False),
    ("mov-imm", f"mov dword ptr [ebx], {NEWPTE:#x}", True, False),
    ("mov-moffs", f"mov eax, {NEWPTE:#x}\n .byte 0xa3\n .long PTE_ADDR", True, False),
    ("mov-sreg", "mov word ptr [ebx + 2], ds", True, False),
    ("or", "or dword ptr [ebx], 0x40", True, False),
    ("and", "and dword ptr [ebx], 0xfffffffd", True, False),
    ("and-clear-a", "lock and dword ptr [ebx], 0xffffffdf", True, True),
    ("xchg", f"mov eax, {NEWPTE:#x}\n xchg dword ptr [ebx], eax", True, False),
    ("bts", "lock bts dword ptr [ebx], 9", True, False),
    ("btc", "lock btc dword ptr [ebx], 9", True, False),
    ("cmpxchg", f"mov eax, dword ptr [ebx]\n mov ecx, {NEWPTE:#x}\n lock cmpxchg dword ptr [ebx], ecx",
     True, False),
    ("cmpxchg-fail", f"mov eax, 0x1234\n mov ecx, {NEWPTE:#x}\n lock cmpxchg dword ptr [ebx], ecx",
     True, False),
    ("cmpxchg8b", f"mov eax, dword ptr [ebx]\n mov edx, dword ptr [ebx + 4]\n mov ebx, {NEWPTE:#x}\n"
                  f" xor ecx, ecx\n mov esi, PTE_VA\n lock cmpxchg8b qword ptr [esi]", True, False),
    ("btr-a", "lock btr dword ptr [ebx], 5", False, True),
    ("btr-w", "lock btr dword ptr [ebx], 1", False, False),
    ("xadd", "mov eax, 0x1000\n lock xadd dword ptr [ebx], eax", False, False),
    ("add", "add dword ptr [ebx], 0x1000", False, False),
    ("sub", "sub dword ptr [ebx], 0x1000", False, False),
    ("xor", "xor dword ptr [ebx], 0x1000", False, False),
    ("inc", "inc dword ptr [ebx]", False, False),
    ("dec", "dec dword ptr [ebx]", False, False),
    ("stos", f"mov edi, ebx\n mov eax, {NEWPTE:#x}\n cld\n stosd", False, False),
    ("rep-stos", f"mov edi, ebx\n mov eax, {NEWPTE:#x}\n mov ecx, 2\n cld\n rep stosd", False, False),
    ("movs", f"mov edi, ebx\n mov esi, {OUT + 0x100:#x}\n mov dword ptr [esi], {NEWPTE:#x}\n cld\n movsd",
     False, False),
    ("sse-store", f"mov dword ptr [{OUT + 0x100:#x}], {NEWPTE:#x}\n movd xmm0, dword ptr [{OUT + 0x100:#x}]\n"
                  " movd dword ptr [ebx], xmm0", False, False),
]


def expected(policy, kvm_pt_write, clears_a):
    """The first decision's verb, from the policy rules (CPL0, aligned 4-byte writes)."""
    if policy == "kvm":
        return "emulate" if kvm_pt_write else "unprotect"
    if policy == "andrea":
        return "unprotect" if clears_a else "emulate"
    if policy == "unshadow-all":
        return "unprotect"
    return "emulate"            # kvm-2008, kvm-2008-accessfix, xen, emulate-all


def make_lab(policy, mode="pae", unsync=False):
    """X's leaf page table shadowed, written through WIN. The trapped-write path: with
    out-of-sync pages on, kvm would let the leaf table go out of sync at the first write
    (tests/test_unsync.py), so it runs with them off (KVM's oos_shadow=0)."""
    lab = FaultLab(mode, policy=policy, ram_mib=64, unsync=unsync)
    lab.map(X, DATA)
    lab.map(X + 0x1000, DATA + 0x1000)
    lab.map_table_window(WIN, X)
    return lab


def snippet(lab, body):
    pte_off = lab.pte_addr(X) & 0xFFF
    return (f".set PTE_ADDR, {WIN + pte_off:#x}\n.set PTE_VA, {WIN + pte_off:#x}\n"
            f" mov ebx, {WIN + pte_off:#x}\n{body}\n{SAVE32}")


_native = {}


def native_state(name, body):
    if name not in _native:
        lab = make_lab("kvm")
        r = lab.run(snippet(lab, body), shadow=[X], mmu="native")
        assert r.status == 0, r.report
        _native[name] = (r.read(lab.table_addr(X), 4096), r.read(OUT, 32))
    return _native[name]


# xen-oos cannot turn out-of-sync pages off: its writes to the leaf table do not trap (below)
SYNCED = [p for p in POLICY_NAMES if p not in OOS_ALWAYS]
OOS_ON = ["kvm", "kvm-2008-oos", "xen-oos"]


@pytest.mark.parametrize("policy", SYNCED)
@pytest.mark.parametrize("name,body,pt_write,clears_a", CLASSES, ids=[c[0] for c in CLASSES])
def test_policy_decision_per_instruction_class(policy, name, body, pt_write, clears_a):
    lab = make_lab(policy)
    r = lab.run(snippet(lab, body), shadow=[X])
    assert r.status == 0, r.report
    assert r.decisions, "the write to the shadowed page table was not trapped"
    verb = r.decisions[0].split(":")[0]
    assert verb == expected(policy, pt_write, clears_a), r.decisions
    c = r.counters
    if verb == "emulate":
        assert c["insn_emulation"] >= 1 and c["mmu_unprotect"] == 0
    else:
        assert c["mmu_unprotect"] == 1 and c["insn_emulation"] == 0
        assert len(r.decisions) == 1, "after unprotecting, the re-executed write must not trap"
    # exact x86 results: the page table, registers and flags as Unicorn's own MMU leaves them
    table, regs = native_state(name, body)
    assert r.read(lab.table_addr(X), 4096) == table
    assert r.read(OUT, 32) == regs


@pytest.mark.parametrize("policy", OOS_ON)
@pytest.mark.parametrize("name,body,pt_write,clears_a", CLASSES, ids=[c[0] for c in CLASSES])
def test_out_of_sync_leaf_table_takes_every_write_natively(policy, name, body, pt_write, clears_a):
    """With out-of-sync pages on, the leaf table written through WIN goes out of sync at the
    first write (KVM: set_spte makes the window's spte writable and unsyncs the table; Xen:
    sh_page_fault unsyncs it on the demand write), whatever the instruction: nothing is
    emulated, and the results are Unicorn's own MMU's."""
    lab = make_lab(policy, unsync=None)
    r = lab.run(snippet(lab, body), shadow=[X])
    assert r.status == 0, r.report
    c = r.counters
    assert not r.decisions, r.decisions
    assert c["insn_emulation"] == 0 and c["mmu_unprotect"] == 0 and c["wp_faults"] == 0
    assert c["mmu_unsync_events" if policy != "xen-oos" else "shadow_unsync"] == 1
    table, regs = native_state(name, body)
    assert r.read(lab.table_addr(X), 4096) == table
    assert r.read(OUT, 32) == regs


# ------------------------------------------------------------------------------- special rules
def write_twice(policy, first, second, between=""):
    lab = make_lab(policy)
    return lab, lab.run(snippet(lab, f"{first}\n{between}\n{second}"), shadow=[X])


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_misaligned_two_byte_write_zaps_the_shadow_page(mode):
    lab = make_lab("kvm", mode)
    off = lab.pte_addr(X) & 0xFFF
    reg = "rbx" if mode == "64" else "ebx"
    r = lab.run(f" mov {reg}, {WIN + off:#x}\n mov word ptr [{reg} + 1], 0x0010", shadow=[X])
    assert r.status == 0, r.report
    assert r.counters["mmu_flooded"] == 1 and r.counters["mmu_shadow_zapped"] == 1
    assert any("misaligned 2-byte" in e for e in r.policy_events)


@pytest.mark.parametrize("policy,zapped", [("kvm", 0), ("kvm-2008", 1)])
def test_one_byte_write_at_pte_offset_misaligned_only_for_kvm_2008(policy, zapped):
    lab = make_lab(policy)
    r = lab.run(snippet(lab, "mov byte ptr [ebx], 0x67"), shadow=[X])
    assert r.counters["mmu_flooded"] == zapped
    assert r.counters["mmu_shadow_zapped"] == zapped


def test_kvm_2008_third_write_in_a_row_floods():
    # three writes to the same frame, the spte installed by the last one never accessed
    lab, r = write_twice("kvm-2008", "mov dword ptr [ebx], 0x2001067",
                         "mov dword ptr [ebx + 8], 0x2001067", "mov dword ptr [ebx + 16], 0x2001067")
    assert r.counters["mmu_flooded"] == 1
    assert any("flooded (3th write" in e for e in r.policy_events)


def test_kvm_2008_flood_count_resets_on_a_fault_that_is_not_a_pt_write():
    # a fresh page touched between the writes: a shadow fault that is not a page-table write
    lab = make_lab("kvm-2008")
    lab.map(0x4040_0000, DATA + 0x5000)
    r = lab.run(snippet(lab, "mov dword ptr [ebx], 0x2001067\n mov dword ptr [ebx + 8], 0x2001067\n"
                             " mov eax, dword ptr [0x40400000]\n mov dword ptr [ebx + 16], 0x2001067"),
                shadow=[X])
    assert r.counters["mmu_flooded"] == 0


def test_kvm_2008_reinstalls_present_and_accessed_ptes_only():
    lab = make_lab("kvm-2008")
    r = lab.run(snippet(lab, f"mov dword ptr [ebx], {DATA | 0x1000 | 0x27:#x}"), shadow=[X])  # P|W|U|A
    mmu = r.machine.vcpu.mmu
    leaf = shadow_leaf(mmu.root, mmu.root_level, X)
    assert leaf is not None and (leaf[0].spt[leaf[1]] >> 12) == (DATA + 0x1000) >> 12
    assert not leaf[0].spt[leaf[1]] & 2, "re-installed writable although the guest pte is clean"
    r = lab.run(snippet(lab, f"mov dword ptr [ebx], {DATA | 0x1000 | 0x07:#x}"), shadow=[X])  # no A
    mmu = r.machine.vcpu.mmu
    assert shadow_leaf(mmu.root, mmu.root_level, X) is None
    assert r.counters["mmu_pte_updated"] == 1


def test_kvm_loop_breaker_emulates_when_the_retry_faults_again():
    # the window lies inside the region its own page table maps: re-execution re-shadows it
    lab = FaultLab("pae", policy="kvm", ram_mib=64, unsync=False)
    lab.map(X, DATA)
    lab.map_table_window(X + 0x10_0000, X)
    off = lab.pte_addr(X) & 0xFFF
    r = lab.run(f" lock btr dword ptr [{X + 0x10_0000 + off:#x}], 5", shadow=[X])
    assert [d.split(":")[0] for d in r.decisions] == ["unprotect", "emulate"]
    assert "loop breaker" in r.decisions[1]


def test_xen_catches_the_second_pae_half_without_an_exit():
    lab, r = write_twice("xen", "mov dword ptr [ebx + 4], 0", f"mov dword ptr [ebx], {NEWPTE:#x}")
    assert r.counters["wp_faults"] == 1 and r.counters["emulate_ahead"] == 1
    assert r.decisions[1] == "emulate-ahead 1/4"


@pytest.mark.parametrize("between,unshadowed", [
    ("", 1),
    # a zero store to a PAE pte's high half is not pte-aligned: it resets the detector (X33)
    ("mov dword ptr [ebx + 12], 0", 0),
    # so does a non-zero write
    ("mov dword ptr [ebx + 24], 0x1000", 0),
])
def test_xen_early_unshadow_after_two_zero_writes(between, unshadowed):
    nops = "\n nop" * 5        # leave the emulate-ahead window
    lab, r = write_twice("xen", f"mov dword ptr [ebx + 8], 0{nops}",
                         "mov dword ptr [ebx + 16], 0", f"{between}{nops}")
    assert r.counters["mmu_unprotect"] == unshadowed


def test_xen_unaligned_write_unshadows_but_is_emulated():
    lab, r = write_twice("xen", "mov dword ptr [ebx + 2], 0x1000", "nop")
    assert r.counters["mmu_unprotect"] == 1 and r.counters["insn_emulation"] == 1


def test_pte_write_is_exact_in_32_and_64_bit_modes():
    for mode in ("32", "64"):
        lab = make_lab("kvm", mode)
        off = lab.pte_addr(X) & 0xFFF
        reg = "rbx" if mode == "64" else "ebx"
        body = f" mov {reg}, {WIN + off:#x}\n mov dword ptr [{reg}], {NEWPTE:#x}"
        r = lab.run(body, shadow=[X])
        n = lab.run(body, shadow=[X], mmu="native")
        assert r.decisions == ["emulate: page-table writing insn (mov)"]
        assert r.read(lab.table_addr(X), 4096) == n.read(lab.table_addr(X), 4096)
        assert r.read_pte(lab.pte_addr(X)) & ~0xFFF == DATA + 0x1000

