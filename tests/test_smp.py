"""Several vCPUs (docs/SMP.md): the scheduler, KVM's requests and remote TLB flush (sans-CPU, on
the MMU core with a bytearray), the audit's TLB check, the SMP guest programs under every policy
with both MMUs, ``--vcpus 1`` unchanged, and bad input."""
import json
import pathlib
import subprocess
import sys

import pytest

from x86shadow import paging as pg
from x86shadow.asm import assemble_firmware, assemble_program
from x86shadow.guesttables import GuestTables
from x86shadow.machine import Machine
from x86shadow.memory.ram import PhysMem
from x86shadow.mmu.audit import AuditError, audit
from x86shadow.mmu.requests import (IN_GUEST_MODE, OUTSIDE_GUEST_MODE, READING_SHADOW_PAGE_TABLES,
                                    REQ_MMU_RELOAD, REQ_MMU_SYNC, REQ_TLB_FLUSH)
from x86shadow.mmu.spte import PERM_W
from x86shadow.mmu.vcpu_mmu import FILL_OK
from x86shadow.mmu.vm_mmu import VmMmu
from x86shadow.policies import POLICY_NAMES, make_policy
from x86shadow.vm_scheduler import DEFAULT_QUANTUM, Schedule, parse_schedule

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMP_PROGRAMS = sorted((ROOT / "guestcode").glob("smp_*.asm"))
MODES = ("32", "pae", "64")
RAM_MIB = 128


def machine(path, mode, *, vcpus, mmu="shadow", policy="kvm", schedule=None, audit=True,
            host=None):
    program = assemble_program(str(path), mode, RAM_MIB << 20)
    m = Machine(mode, mmu=mmu, policy=policy if mmu == "shadow" else None, ram_mib=RAM_MIB,
                audit=audit and mmu == "shadow", vcpus=vcpus, schedule=schedule, host=host)
    m.load(program, assemble_firmware(mode, RAM_MIB << 20))
    return m


def x86shadow(*args):
    p = subprocess.run([sys.executable, "-m", "x86shadow.cli", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p


# ------------------------------------------------------------------ the schedule's syntax

@pytest.mark.parametrize("text,want", [
    ("rr", Schedule("rr", DEFAULT_QUANTUM)),
    ("rr:50", Schedule("rr", 50)),
    ("rr:50:exits", Schedule("rr", 50, exits=True)),
    ("random:7", Schedule("random", DEFAULT_QUANTUM, 7)),
    ("random:7:300", Schedule("random", 300, 7)),
    ("random:0x10:3:exits", Schedule("random", 3, 16, True)),
])
def test_schedule_parses(text, want):
    assert parse_schedule(text) == want
    assert parse_schedule(str(want)) == want


@pytest.mark.parametrize("text", ["", "rr:0", "rr:x", "rr:1:2", "random", "random:s:4",
                                  "random:1:0", "fifo:3", "exits", "rr:-5"])
def test_bad_schedule_is_refused(text):
    with pytest.raises(ValueError, match="--schedule"):
        parse_schedule(text)


# ------------------------------------------------------------------ the scheduler on real vCPUs

def slices(schedule, mode="32", vcpus=3):
    m = machine(ROOT / "guestcode/smp_barrier.asm", mode, vcpus=vcpus, schedule=schedule,
                audit=False)
    m.scheduler.record = True
    r = m.run()
    assert r.status == 0, bytes(m.output) + r.report.encode()
    return [(s.vcpu, s.start, s.insns, s.end) for s in m.scheduler.slices], m


def test_same_seed_same_interleaving():
    a, ma = slices("random:11:400")
    b, mb = slices("random:11:400")
    c, _ = slices("random:12:400")
    assert a == b
    assert ma.counters == mb.counters
    assert a != c
    assert {v for v, *_ in a} == {0, 1, 2}
    # every slice but a vCPU's last (hlt) ran 1..Q instructions
    assert all(1 <= n <= 400 for _v, _s, n, end in a if end == "quantum")


def test_round_robin_takes_turns_by_quantum():
    trace, m = slices("rr:64", vcpus=2)
    quantum_ends = [(v, n) for v, _s, n, end in trace if end == "quantum"]
    assert all(n == 64 for _v, n in quantum_ends)
    first_stop = next(i for i, (*_x, end) in enumerate(trace) if end != "quantum")
    order = [v for v, *_ in trace[:first_stop + 1]]
    # strictly alternating while both run (then the one left runs alone)
    assert order[:2] == [0, 1] and all(x != y for x, y in zip(order, order[1:]))
    assert all(v == trace[-1][0] for v, *_ in trace[first_stop + 1:])
    assert m.counters["guest_insns"] == sum(n for _v, _s, n, _e in trace)
    assert m.stats_record()["smp"]["slices"] == len(trace)


def test_exits_schedule_switches_at_mmu_exits():
    trace, _ = slices("rr:100000:exits", vcpus=2)
    plain, _ = slices("rr:100000", vcpus=2)
    assert not any(end == "exit" for *_x, end in plain)
    cut = [i for i, (*_x, end) in enumerate(trace) if end == "exit"]
    assert cut and len(trace) > len(plain)
    assert all(trace[i][0] != trace[i + 1][0] for i in cut)      # the other vCPU goes next


def test_spinning_does_not_stall_and_quantum_bounds_it():
    # vCPU 1 spins (pause) in the firmware until vCPU 0 has built the tables, then at every
    # barrier: a quantum of 7 instructions still gets through
    trace, m = slices("rr:7", vcpus=2, mode="64")
    assert bytes(m.output).endswith(b"PASS\n")
    assert max(n for _v, _s, n, _e in trace) <= 7


def test_max_insns_counts_all_vcpus():
    m = machine(ROOT / "guestcode/smp_barrier.asm", "32", vcpus=4, audit=False)
    r = m.run(max_insns=5000)
    assert r.how == "crash" and "runaway" in r.report
    assert m.counters["guest_insns"] == 5000
    assert sum(v.insns for v in m.vcpus) == 5000


@pytest.mark.parametrize("mode", MODES)
def test_each_vcpu_has_its_own_stack_gdt_and_tss(mode):
    from unicorn.x86_const import UC_X86_REG_CR3, UC_X86_REG_GDTR, UC_X86_REG_IDTR, UC_X86_REG_TR
    from x86shadow import layout as L
    m = machine(ROOT / "guestcode/smp_barrier.asm", mode, vcpus=3, audit=False)
    assert m.run().status == 0
    v0 = m.vcpus[0]
    for v in m.vcpus:
        n = v.index
        sel, base, limit, _ = v.mmr(UC_X86_REG_TR)
        assert (sel, base, limit) == (L.SEL_TSS, L.FW_TSS + L.TSS_STRIDE * n, 0x67)
        _, gdt, glimit, _ = v.mmr(UC_X86_REG_GDTR)
        assert glimit == 16 * 8 - 1
        assert gdt == (L.FW_GDT if n == 0 else L.FW_SMP + 0x380 + 0x80 * n)
        assert v.mmr(UC_X86_REG_IDTR)[1] == L.FW_IDT
        assert v.reg(UC_X86_REG_CR3) == L.FW_PT_BASE
        esp0 = int.from_bytes(m.read_phys(L.FW_TSS + L.TSS_STRIDE * n + 4, 4), "little")
        assert esp0 == L.vcpu_tss_stack_top(n)
        if n:
            # the same descriptors as vCPU 0's but the TSS
            assert m.read_phys(gdt, L.SEL_TSS) == m.read_phys(L.FW_GDT, L.SEL_TSS)
        assert v is v0 or v.reg(v.R_SP) <= L.vcpu_stack_top(n)


# ------------------------------------------------------------------ requests, sans CPU

X = 0x0040_0000
DATA = 0x0030_0000


class TwoVcpus:
    """Two vCPUs on one guest page-table set over a bytearray; ``fill`` is what the CPU
    adapter does at a TLB miss, with the entry recorded in the vCPU's model TLB."""

    def __init__(self, mode=pg.Mode.LONG, policy="kvm", unsync=None, n=2):
        self.buf = bytearray(8 << 20)
        self.t = t = GuestTables(mode, PhysMem(self.buf), 0x0040_0000 + 0x10_0000, 0x0070_0000)
        t.map(X, DATA)
        self.vm = vm = VmMmu(PhysMem(self.buf), policy=make_policy(policy, unsync))
        self.v = [vm.add_vcpu() for _ in range(n)]
        for v in self.v:
            v.tlb_record = {}
            v.set_context(t.ctx())
            v.take_requests()
            v.mode = IN_GUEST_MODE
        vm.running = self.v[0]

    def fill(self, v, va, access):
        r = v.hw_fill(va, access)
        if v.requests & REQ_TLB_FLUSH:
            v.requests &= ~REQ_TLB_FLUSH
            v.flush_hw_tlb()
        assert r.kind == FILL_OK
        v.tlb_record[va >> 12] = (r.addr >> 12, r.perms, access & pg.PFERR_U)
        return r


def test_write_protect_flushes_the_other_vcpu_remotely():
    e = TwoVcpus()
    vm, (v0, v1) = e.vm, e.v
    r = e.fill(v1, X, pg.PFERR_W)                      # vCPU 1's TLB: X writable
    assert r.perms & PERM_W
    audit(vm)
    before = vm.counters["remote_tlb_flush"]
    vm.write_protect(DATA >> 12)                       # a downgrade, made on vCPU 0
    assert vm.counters["remote_tlb_flush"] == before + 1
    assert v1.requests & REQ_TLB_FLUSH and v0.requests & REQ_TLB_FLUSH
    audit(vm)                                          # vCPU 1 flushes before it runs again
    v1.requests &= ~REQ_TLB_FLUSH                      # ... unless the request were lost:
    with pytest.raises(AuditError, match="vcpu1 TLB maps va 0x400000 writable"):
        audit(vm)
    v1.flush_hw_tlb()                                  # the flush it was owed
    audit(vm)
    assert not v1.tlb_record


def test_zap_flushes_remotely_and_reloads_the_shared_root():
    e = TwoVcpus()
    vm, (v0, v1) = e.vm, e.v
    e.fill(v1, X, 0)
    root = v1.root
    assert root is v0.root                             # same CR3, same role: one shadow root
    before = vm.counters["remote_tlb_flush"]
    vm.zap_page(root)                                  # kvm_mmu_commit_zap_page on vCPU 0
    assert vm.counters["remote_tlb_flush"] == before + 1
    assert v1.requests & REQ_MMU_RELOAD and v1.requests & REQ_TLB_FLUSH
    v1.enter_guest()                                   # vcpu_enter_guest: KVM_REQ_MMU_RELOAD
    assert not v1.requests & REQ_MMU_RELOAD
    assert v1.root is not root and not v1.root.zapped
    v1.flush_hw_tlb()
    v1.requests &= ~REQ_TLB_FLUSH
    e.fill(v1, X, 0)
    audit(vm)


def test_remote_flush_counts_only_vcpus_not_outside_guest_mode():
    e = TwoVcpus()
    vm, v1 = e.vm, e.v[1]
    c = vm.counters
    v1.mode = OUTSIDE_GUEST_MODE                       # halted: no IPI, still the request
    vm.flush_remote_tlbs()
    assert c["remote_tlb_flush"] == 0 and v1.requests & REQ_TLB_FLUSH
    v1.mode = READING_SHADOW_PAGE_TABLES               # a lockless walker must be IPIed too
    vm.flush_remote_tlbs()
    assert c["remote_tlb_flush"] == 1
    v1.mode = IN_GUEST_MODE
    vm.flush_remote_tlbs_now()                         # the notifiers' synchronous flush
    assert c["remote_tlb_flush"] == 2 and not v1.requests & REQ_TLB_FLUSH


def test_one_vcpu_never_counts_a_remote_flush():
    e = TwoVcpus(n=1)
    e.vm.write_protect(DATA >> 12)
    e.vm.flush_remote_tlbs()
    assert e.vm.counters["remote_tlb_flush"] == 0


def test_mmu_sync_request_is_served_at_entry():
    e = TwoVcpus(policy="kvm", unsync="on")
    v1 = e.v[1]
    v1.request(REQ_MMU_SYNC)
    v1.enter_guest()
    assert not v1.requests & REQ_MMU_SYNC


# ------------------------------------------------------------------ the guest programs

def cases():
    for path in SMP_PROGRAMS:
        for mode in MODES:
            yield pytest.param(path, mode, id=f"{path.stem}-{mode}")


_native = {}


def native(path, mode, vcpus):
    key = (path, mode, vcpus)
    if key not in _native:
        m = machine(path, mode, vcpus=vcpus, mmu="native")
        r = m.run()
        _native[key] = (r.status, bytes(m.output))
    return _native[key]


def test_smp_programs_exist():
    assert {p.stem for p in SMP_PROGRAMS} >= {"smp_barrier", "smp_shootdown", "smp_unsync"}


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("path,mode", list(cases()))
def test_smp_program_every_policy_matches_native(path, mode, policy):
    status, out = native(path, mode, 3)
    assert status == 0 and out.endswith(b"PASS\n"), out
    assert out.startswith(b"vcpus 3 ")
    m = machine(path, mode, vcpus=3, policy=policy)
    r = m.run()
    assert (r.status, bytes(m.output)) == (status, out), r.report
    if path.stem != "smp_barrier":
        # the shared tables were written: other vCPUs were interrupted for the flushes
        assert m.counters["remote_tlb_flush"] > 0


@pytest.mark.parametrize("schedule", ["rr:1", "random:5:50", "random:9:2000:exits"])
@pytest.mark.parametrize("path", SMP_PROGRAMS, ids=lambda p: p.stem)
def test_smp_program_any_schedule(path, schedule):
    status, out = native(path, "pae", 2)
    m = machine(path, "pae", vcpus=2, schedule=schedule, policy="kvm-2008-oos")
    r = m.run()
    assert (r.status, bytes(m.output)) == (status, out), r.report
    mn = machine(path, "pae", vcpus=2, schedule=schedule, mmu="native")
    rn = mn.run()
    assert (rn.status, bytes(mn.output)) == (status, out), rn.report


def test_eight_vcpus():
    path = ROOT / "guestcode/smp_shootdown.asm"
    status, out = native(path, "64", 8)
    assert status == 0 and out.startswith(b"vcpus 8 ")
    m = machine(path, "64", vcpus=8, policy="xen-oos")
    r = m.run()
    assert (r.status, bytes(m.output)) == (status, out), r.report


@pytest.mark.parametrize("ops", ["swap:20", "migrate:30,ksm:40"])
def test_host_memory_under_several_vcpus(ops):
    """The host swaps / migrates / merges pages under three vCPUs: the notifiers' synchronous
    flush reaches every vCPU's TLB (the host's flush-before-free check looks at all of them)."""
    from x86shadow.machine import HostConfig
    path = ROOT / "guestcode/smp_unsync.asm"
    status, out = native(path, "pae", 3)
    m = machine(path, "pae", vcpus=3, host=HostConfig(schedule=ops))
    r = m.run()
    assert (r.status, bytes(m.output)) == (status, out), r.report
    c = m.counters
    assert c["host_swap_out"] + c["host_migrate"] + c["host_ksm_merge"] > 0
    assert c["mmu_notifier_flush"] > 0


def test_audit_catches_a_missing_remote_flush(monkeypatch):
    """A kvm_flush_remote_tlbs that flushes only the calling vCPU: the guest still passes (every
    vCPU does its own invlpg), but between the pte write and that invlpg another vCPU's TLB maps
    the old frame -- the audit reports it."""
    def local_only(vm):
        if vm.running is not None:
            vm.running.requests |= REQ_TLB_FLUSH
    monkeypatch.setattr(VmMmu, "flush_remote_tlbs", local_only)
    m = machine(ROOT / "guestcode/smp_shootdown.asm", "32", vcpus=2)
    r = m.run()
    assert r.status == 6, r.report
    assert "TLB maps va" in r.report


def test_xen_oos_resyncs_other_vcpus_pages_on_cr3_load(monkeypatch):
    """Xen 3.3 sh_update_cr3 -> shadow_sync_other_vcpus: without it a reader's CR3 reload
    keeps the writer's out-of-sync page stale (smp_unsync's check right after the reload)."""
    path = ROOT / "guestcode/smp_unsync.asm"
    m = machine(path, "pae", vcpus=2, policy="xen-oos")
    assert m.run().status == 0
    assert m.counters["shadow_unsync"] > 0
    from x86shadow.mmu import oos_xen
    monkeypatch.setattr(oos_xen.Xen33Rules, "root_loaded", lambda self, mmu, reason: None)
    m = machine(path, "pae", vcpus=2, policy="xen-oos")
    r = m.run()
    assert r.status == (4 << 1) | 1 and b"FAIL 4" in bytes(m.output)


CROSS_MODIFY = r"""
.include "lib/console.inc"
.include "lib/main.inc"
.include "lib/smp.inc"
.set v_stage, PROG_VARS
main:
    MAIN_PROLOGUE
    SMP_INIT
    SMP_IF_AP ap
    call patch
    PRINT_DEC "first ", eax
    mov dword ptr [v_stage], 1
wait2:
    pause
    cmp dword ptr [v_stage], 2
    jne wait2
    call patch
    PRINT_DEC " second ", eax
    PRINT "\n"
    jmp out
ap:
    pause
    cmp dword ptr [v_stage], 1
    jne ap
    mov byte ptr [patch + 1], 2
    mov dword ptr [v_stage], 2
out:
    MAIN_EPILOGUE
    .balign 4096
patch:
    mov eax, 1
    ret
"""


@pytest.mark.parametrize("mmu", ["shadow", "native"])
def test_cross_vcpu_code_modification_is_not_seen(tmp_path, mmu):
    """The limitation docs/SMP.md states (measured on Unicorn 2.1.4): Unicorn drops translated
    code only for stores made through the same instance, so vCPU 0 keeps running its old
    translation of code vCPU 1 rewrote. If this fails, the limitation is gone: update the docs."""
    src = tmp_path / "xmod.asm"
    src.write_text(CROSS_MODIFY)
    m = machine(src, "32", vcpus=2, mmu=mmu)
    assert m.run().status == 0
    assert bytes(m.output) == b"first 1 second 1\n"
    code = m.read_phys(m.program.base, len(m.program.code))
    assert b"\xb8\x02\x00\x00\x00\xc3" in code          # vCPU 1's store did reach RAM
    assert b"\xb8\x01\x00\x00\x00\xc3" not in code


# ------------------------------------------------------------------ one vCPU: unchanged

def test_one_vcpu_has_no_scheduler_and_no_smp_record():
    m = machine(ROOT / "guestcode/smp_shootdown.asm", "pae", vcpus=1)
    assert m.scheduler is None and len(m.vcpus) == 1 and m.vcpu is m.vcpus[0]
    r = m.run()
    assert r.status == 0 and bytes(m.output) == b"vcpus 1 shoot-downs 16\nPASS\n"
    record = m.stats_record()
    assert "smp" not in record
    assert record["remote_tlb_flush"] == 0 and record["guest_insns"] == 0


def test_cli_vcpus_1_is_the_default(tmp_path):
    runs = []
    for extra in ([], ["--vcpus", "1"]):
        stats = tmp_path / f"s{len(runs)}.json"
        p = x86shadow("run", "guestcode/ptwrites.asm", "--mode", "64", "--stats-json", str(stats),
                      *extra)
        assert p.returncode == 0, p.stderr
        runs.append((p.stdout, json.loads(stats.read_text())))
    assert runs[0] == runs[1]


def test_cli_several_vcpus(tmp_path):
    stats = tmp_path / "s.json"
    p = x86shadow("run", "guestcode/smp_shootdown.asm", "--mode", "32", "--vcpus", "4",
                  "--schedule", "random:3:500", "--audit", "--stats-json", str(stats))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "vcpus 4 shoot-downs 16\nPASS\n"
    record = json.loads(stats.read_text())
    assert record["smp"]["schedule"] == "random:3:500"
    assert len(record["smp"]["vcpus"]) == 4 and record["remote_tlb_flush"] > 0
    assert record["guest_insns"] == sum(v["insns"] for v in record["smp"]["vcpus"])


@pytest.mark.parametrize("args,message", [
    (["--vcpus", "0"], "--vcpus 0: the number of vCPUs must be 1..8"),
    (["--vcpus", "99"], "--vcpus 99: the number of vCPUs must be 1..8"),
    (["--vcpus", "2", "--schedule", "fifo"], "--schedule 'fifo': expected"),
    (["--vcpus", "2", "--schedule", "rr:0"], "quantum must be 1.."),
    (["--vcpus", "2", "--schedule", "random:x:5"], "seed 'x' is not a number"),
    (["--schedule", "rr:10"], "--schedule needs several vCPUs"),
    (["--vcpus", "2", "--gdb", "0"], "--gdb debugs one vCPU"),
])
def test_bad_input_is_a_clear_error(args, message):
    p = x86shadow("run", "guestcode/hello.asm", "--mode", "32", *args)
    assert p.returncode == 2
    assert p.stderr.startswith("x86shadow: error: ") and message in p.stderr, p.stderr
