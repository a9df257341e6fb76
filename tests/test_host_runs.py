"""Guests running while the host swaps, migrates and merges their pages (docs/HOST_MEMORY.md):
every guest program keeps its results -- the same console output, exit status and data as under
Unicorn's own MMU with no host at all -- in every mode, under every policy, with out-of-sync
pages on and off, in both notifier eras, audit on. The flush-before-free switch is caught every
time in its test and never without it."""
import json
import pathlib
import subprocess
import sys

import pytest

from x86shadow import events as ev
from x86shadow.asm import assemble_firmware, assemble_program, program_modes
from x86shadow.machine import HostConfig, Machine
from x86shadow.policies import POLICY_NAMES

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAMS = sorted((ROOT / "guestcode").glob("*.asm"))
RAM_MIB = 128
BUSY = "swap:7,migrate:11,ksm:53,reclaim:13,age:17"      # something every few exits


def run(path, mode, mmu="shadow", policy="kvm", host=None, unsync=None, src=None):
    if src is not None:
        path = src
    program = assemble_program(str(path), mode, RAM_MIB << 20)
    kw = {} if mmu == "native" else {"policy": policy, "audit": True, "host": host,
                                     "unsync": unsync}
    m = Machine(mode, mmu=mmu, ram_mib=RAM_MIB, **kw)
    m.load(program, assemble_firmware(mode, RAM_MIB << 20))
    result = m.run()
    return m, result, bytes(m.output), m.read_phys(program.base, len(program.code))


_native = {}


def native(path, mode):
    if (path, mode) not in _native:
        _native[path, mode] = run(path, mode, "native")[1:]
    return _native[path, mode]


def same_as_native(path, mode, **kw):
    n_res, n_out, n_data = native(path, mode)
    assert n_res.status == 0 and n_out.endswith(b"PASS\n"), n_out
    m, res, out, data = run(path, mode, **kw)
    assert (res.status, out) == (n_res.status, n_out), f"{out!r}\n{res.report}"
    assert data == n_data, "program data differs from the run without a host"
    return m


def cases():
    for path in PROGRAMS:
        for mode in ("32", "pae", "64"):
            if mode in program_modes(path):
                yield pytest.param(path, mode, id=f"{path.stem}-{mode}")


@pytest.mark.parametrize("path,mode", list(cases()))
def test_every_program_survives_host_events(path, mode):
    m = same_as_native(path, mode, host=HostConfig(schedule=BUSY, seed=3))
    c = m.counters
    log = m.host_schedule.log
    done = {op: sum(1 for e in log if e[1] == op and e[3] is True) for op in ("swap", "reclaim",
                                                                             "migrate")}
    assert c["host_swap_out"] == done["swap"] + done["reclaim"]
    assert c["host_migrate"] == done["migrate"]
    assert c["host_swap_young"] <= sum(1 for e in log if e[1] == "reclaim" and e[3] is False)
    if c["exits"] >= 100:                         # (hello: too short to be hit)
        assert done["swap"] + done["migrate"] > 0


STRESS = [p for p in PROGRAMS if p.stem in ("fork_cow", "host_churn")]
MORE = [p for p in PROGRAMS if p.stem in ("many_procs", "pt_reuse", "host_code", "host_ksm")]


def _program_cases():
    for p in STRESS:
        yield pytest.param(p, id=p.stem)
    for p in MORE:
        yield pytest.param(p, id=p.stem, marks=pytest.mark.slow)


@pytest.mark.parametrize("era", ["2008", "modern"])
@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("path", list(_program_cases()))
def test_every_policy_and_era_keeps_the_guest_intact(path, policy, era):
    mode = "pae"
    m = same_as_native(path, mode, policy=policy,
                       host=HostConfig(schedule=BUSY, seed=5, notifiers=era))
    assert m.counters["mmu_notifier_invalidate"] > 0


@pytest.mark.parametrize("era", ["2008", "modern"])
@pytest.mark.parametrize("path", list(_program_cases()))
def test_unsync_off_keeps_the_guest_intact(path, era):
    for mode in ("32", "64"):
        same_as_native(path, mode, unsync=False,
                       host=HostConfig(schedule=BUSY, seed=9, notifiers=era))


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_races_at_the_fault_path_points_retry_and_keep_the_guest_intact(mode):
    path = ROOT / "guestcode" / "fork_cow.asm"
    for era in ("2008", "modern"):
        m = same_as_native(path, mode, host=HostConfig(
            schedule="migrate@after_seq_snapshot:3,swap@after_gfn_to_pfn:5", notifiers=era))
        assert m.counters["pf_retry"] > 0


@pytest.mark.parametrize("policy", [p if p in ("kvm", "kvm-2008", "xen-oos") else
                                    pytest.param(p, marks=pytest.mark.slow) for p in POLICY_NAMES])
def test_thousands_of_host_events_leave_the_guest_intact(policy):
    path = ROOT / "guestcode" / "host_churn.asm"
    m = same_as_native(path, "64", policy=policy,
                       host=HostConfig(schedule="swap:1,migrate:1,ksm:20", seed=11))
    c = m.counters
    events = sum(c[k] for k in ("host_swap_out", "host_swap_in", "host_migrate",
                                "host_ksm_merge", "host_cow_break"))
    assert events >= 1000, c


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    path = ROOT / "guestcode" / "fork_cow.asm"
    logs = []
    for seed in (1, 1, 2):
        m = run(path, "pae", host=HostConfig(schedule=BUSY, seed=seed))[0]
        logs.append(([e[:3] for e in m.host_schedule.log], dict(m.counters)))
    assert logs[0] == logs[1]
    assert logs[0][0] != logs[2][0]


# ------------------------------------------------------------------ the flush-before-free rule
@pytest.mark.parametrize("mode", ["32", "pae", "64"])
@pytest.mark.parametrize("era", ["2008", "modern"])
def test_broken_flush_is_caught_every_time_and_never_without_the_switch(mode, era):
    path = ROOT / "guestcode" / "fork_cow.asm"
    for seed in range(3):
        good = run(path, mode, host=HostConfig(schedule=BUSY, seed=seed, notifiers=era,
                                               target="tlb"))
        assert good[1].status == 0, good[1].report
        m, res, _out, _ = run(path, mode, host=HostConfig(schedule=BUSY, seed=seed, target="tlb",
                                                          notifiers=era, break_flush=True))
        assert res.status == 6 and res.how == "violation"
        assert "freed while a vCPU's TLB may still map it" in res.report
        assert "vCPU 0 filled it at exit" in res.report and "host operations" in res.report
        assert m.counters["mmu_notifier_flush_deferred"] >= 1


VICTIM = """
# x86shadow: modes=32,pae,64
.include "lib/console.inc"
.set VICTIM, FREE_BASE + 0x100000
main:
    mov edi, VICTIM
    mov dword ptr [edi], 1
    mov al, 1
    out MARKER_PORT, al          # the test's host swaps VICTIM out here
    mov dword ptr [edi], 2       # through the TLB entry the broken flush left behind
    mov ebx, dword ptr [edi + 0x10000]
    mov ebx, dword ptr [edi + 0x20000]
    mov eax, dword ptr [edi]
    cmp eax, 2
    jne lost
    PASS
    ret
lost:
    FAIL 3, "the write of 2 was lost"
"""


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
@pytest.mark.parametrize("broken", [False, True])
def test_a_store_through_a_stale_entry_is_caught_by_the_poison(tmp_path, mode, broken):
    """With the owner check off, the broken flush lets the guest store into the page the host
    just freed: the poison check finds it when the page is reused (the swap-in right after)."""
    src = tmp_path / "victim.asm"
    src.write_text(VICTIM)
    program = assemble_program(str(src), mode, RAM_MIB << 20)
    m = Machine(mode, ram_mib=RAM_MIB, audit=True,
                host=HostConfig(break_flush=broken, tlb_check=False))
    m.load(program, assemble_firmware(mode, RAM_MIB << 20))
    victim = (0x0100_0000 + 0x100000) >> 12
    m.events.subscribe(lambda _k, f: m.host_schedule.run("swap", "marker", gfn=victim),
                       (ev.MARKER,))
    res = m.run()
    if broken:
        assert res.status == 6 and "written after it was freed" in res.report, res.report
    else:
        assert res.status == 0 and m.output.endswith(b"PASS\n"), (m.output, res.report)
        assert m.counters["host_swap_in"] == 1


# ------------------------------------------------------------------ the command line and the trace
def cli(*args):
    return subprocess.run([sys.executable, "-m", "x86shadow.cli", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_host_options_and_exit_status_6(tmp_path):
    prog = "guestcode/fork_cow.asm"
    stats = tmp_path / "s.json"
    r = cli("run", prog, "--mode", "pae", "--host", "swap:5,migrate@after_seq_snapshot:4",
            "--notifiers", "2008", "--audit", "--stats-json", str(stats))
    assert r.returncode == 0 and r.stdout.endswith("PASS\n"), r.stderr
    c = json.loads(stats.read_text())
    assert c["host_swap_out"] > 0 and c["pf_retry"] > 0
    r = cli("run", prog, "--mode", "pae", "--host", "swap:5", "--host-target", "tlb",
            "--break", "flush-before-free")
    assert r.returncode == 6
    assert r.stderr.startswith("x86shadow: violation: a host page was freed while")
    assert "Traceback" not in r.stderr
    for bad, msg in ((["--host", "swap"], "OP:N"), (["--host", "fly:3"], "unknown operation"),
                     (["--host", "swap@nowhere"], "unknown point"), (["--host", "swap:0"],
                                                                     "at least 1"),
                     (["--host", "swap:1", "--mmu", "native"], "need --mmu shadow"),
                     (["--notifiers", "1999"], "invalid choice"),
                     (["--aging", "7.0"], "unknown aging variant"),
                     (["--aging", "6.15:zap"], "2008:zap")):
        r = cli("run", prog, "--mode", "pae", *bad)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_host_script_runs_each_operation_at_its_exit_on_its_page(tmp_path):
    script = tmp_path / "host.txt"
    script.write_text("# exit op [gfn]\n20 swap 0x400\n20 migrate 0x401\n60 ksm\n"
                      "90 swap   # a page drawn from the seed\n")
    stats = tmp_path / "s.json"
    r = cli("run", "guestcode/fork_cow.asm", "--mode", "pae", "--host-script", str(script),
            "--audit", "--stats-json", str(stats))
    assert r.returncode == 0 and r.stdout.endswith("PASS\n"), r.stderr
    c = json.loads(stats.read_text())
    assert c["host_swap_out"] == 2 and c["host_migrate"] == 1
    m = run(ROOT / "guestcode" / "fork_cow.asm", "pae",
            host=HostConfig(script=script.read_text()))[0]
    assert [e[1:3] for e in m.host_schedule.log[:3]] == [["swap", 0x400], ["migrate", 0x401],
                                                        ["ksm", None]]
    assert m.host_schedule.log[0][0].startswith("exit 2") and "script" in m.host_schedule.log[0][0]
    for text, msg in (("20\n", ":1: write EXIT OP"), ("x swap\n", "are numbers"),
                      ("# ok\n5 fly\n", ":2: unknown operation")):
        script.write_text(text)
        r = cli("run", "guestcode/hello.asm", "--mode", "pae", "--host-script", str(script))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("run", "guestcode/hello.asm", "--mode", "pae", "--host-script", str(tmp_path / "no"))
    assert r.returncode == 2 and "cannot read --host-script" in r.stderr


def test_kmap_scenario_takes_the_host_options():
    small = ("scenario", "kmap", "--tables", "2", "--ptes", "8", "--scans", "2")
    r = cli(*small, "--host", "swap:3,migrate:4", "--notifiers", "2008", "--aging", "2008")
    assert r.returncode == 0, r.stderr
    r = cli(*small, "--host", "swap:1", "--host-target", "tlb", "--break", "flush-before-free")
    assert r.returncode == 6 and "violation" in r.stderr, r.stderr


def test_trace_shows_host_events_between_guest_events(tmp_path):
    trace = tmp_path / "t.jsonl"
    r = cli("run", "guestcode/fork_cow.asm", "--mode", "64", "--host",
            "swap:9,ksm:40,age:13,migrate@after_gfn_to_pfn:7", "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    for k in ("x86shadow_host_op", "x86shadow_mmu_notifier", "kvm_unmap_hva_range",
              "kvm_age_hva", "x86shadow_pf_retry"):
        assert k in kinds, k
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    first_host = kinds.index("x86shadow_host_op")
    assert "kvm_exit" in kinds[:first_host] and "kvm_exit" in kinds[first_host:]
    ops = {e["op"] for e in events if e["event"] == "x86shadow_host_op"}
    assert {"swap_out", "migrate"} <= ops
    notifier = {e["notifier"] for e in events if e["event"] == "x86shadow_mmu_notifier"}
    assert {"invalidate_range_start", "invalidate_range_end"} <= notifier


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_an_lru_pass_at_every_exit_keeps_the_pages_in_use(mode):
    """``--host lru:1``: a reclaim pass after every exit. It evicts pages, but not the ones a
    vCPU's TLB holds (memory/schedule.py, as candidates() keeps them from the other
    operations): when it did, it evicted the page the exit had just faulted in, before the
    guest could use it, and every guest livelocked (found by x86shadow fuzz, mode 64)."""
    from x86shadow.fuzz.differential import Watchdog
    from x86shadow.memory.reclaim import lru_for
    path = ROOT / "guestcode" / "demand_paging.asm"
    m = Machine(mode, ram_mib=RAM_MIB, audit=True, host=HostConfig(schedule="lru:1"))
    m.load(assemble_program(str(path), mode, RAM_MIB << 20),
           assemble_firmware(mode, RAM_MIB << 20))
    with Watchdog(m.vcpu, 20):
        result = m.run()
    assert result.status == 0 and bytes(m.output) == native(path, mode)[1], result.report
    stats = lru_for(m.host).stats
    # (due passes run at the next tick: several exits can share one)
    assert stats["passes"] >= m.counters["exits"] // 2
    assert stats["evicted"] > 0 and stats["refaults"] > 0 and stats["kept"] > 0
