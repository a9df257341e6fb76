"""`x86shadow bench --quick` runs every workload under both MMUs and prints a well-formed table and
JSON (docs/JSON_RECORDS.md). No timing is asserted: the numbers live in the README."""
import json
import pathlib
import subprocess
import sys

import pytest

from x86shadow.bench import WORKLOADS

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW_FIELDS = ("name", "guest_insns", "shadow_s", "native_s", "ratio", "exits", "us_per_exit")


def bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "x86shadow.cli", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    # out-of-sync pages off: the pte-write workload's stores to a leaf table then trap and are
    # emulated, so the emulated-pt-write cost is measured (with them on, the table goes out of
    # sync at the first store: test_unsync_on_emulates_no_pte_write)
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    r = bench("--quick", "--silent", "--unsync", "off", "--json", str(path))
    return r, path


def test_quick_runs_and_prints_the_table(quick):
    r, _ = quick
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout
    header = next(line for line in out.splitlines() if "workload" in line and "ratio" in line)
    for col in ("workload", "mode", "guest insns", "shadow s", "native s", "ratio", "exits",
                "exit mix", "us/exit by kind"):
        assert col in header, col
    rows = [line for line in out.splitlines() if line.startswith("│")]
    for w in WORKLOADS:
        row = next((line for line in rows if line.split("│")[1].strip().split(" (")[0] == w.name), None)
        assert row is not None, f"no table row for {w.name}"
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert len(cells) == 10, cells
        assert cells[1] == "64"
        float(cells[4]), float(cells[5]), float(cells[6])       # shadow s, native s, ratio
    assert "Exit costs and targets" in out
    for label in ("shadow page fault", "guest #PF round trip", "emulated pt write", "CR3 switch"):
        assert label in out, label


def test_quick_json_has_the_required_fields(quick):
    r, path = quick
    assert r.returncode == 0, r.stderr
    doc = json.loads(path.read_text())
    assert isinstance(doc["workloads"], list)
    names = [row["name"] for row in doc["workloads"]]
    assert sorted(names) == sorted(w.name for w in WORKLOADS)
    for row in doc["workloads"]:
        for f in ROW_FIELDS:
            assert f in row, (row["name"], f)
        assert isinstance(row["guest_insns"], int) and row["guest_insns"] > 0
        assert isinstance(row["exits"], int) and row["exits"] > 0
        assert row["shadow_s"] > 0 and row["native_s"] > 0 and row["ratio"] > 0
        assert isinstance(row["us_per_exit"], dict)
        for v in row["us_per_exit"].values():
            assert v is None or isinstance(v, (int, float))
    by = {row["name"]: row for row in doc["workloads"]}
    for kind, name in (("pf_fixed", "fault-in"), ("pf_guest", "demand-paging"),
                       ("pt_write", "pte-write"), ("cr3_switch", "cr3-switch"), ("io", "io-loop")):
        assert kind in by[name]["us_per_exit"], (name, kind)
    assert {c["kind"] for c in doc["exit_costs"]} >= {"pf_fixed", "pf_guest", "pt_write",
                                                      "cr3_switch", "ratio"}


def test_unsync_on_emulates_no_pte_write(tmp_path):
    path = tmp_path / "b.json"
    r = bench("--quick", "--silent", "--workload", "pte-write", "--json", str(path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(path.read_text())
    assert doc["meta"]["unsync"] is True
    row = next(w for w in doc["workloads"] if w["name"] == "pte-write")
    assert row["counters"]["insn_emulation"] == 0 and row["counters"]["mmu_unsync_events"] > 0
    assert "pt_write" not in row["us_per_exit"]


@pytest.mark.parametrize("args,message", [
    (["--policy", "xen", "--unsync", "on"], "has no out-of-sync pages"),
    (["--workload", "no-such-workload"], "unknown workload"),
    (["--mode", "16"], "unknown mode"),
    (["--rounds", "-1"], "--rounds"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--json", "/proc/x86shadow-b.json"], "cannot write JSON"),
    (["--json", "/nonexistent-dir/bench.json"], "cannot write"),
])
def test_bad_options_exit_2_without_traceback(args, message):
    r = bench(*args, "--silent", timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("x86shadow: error:") or "\nx86shadow: error:" in r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
