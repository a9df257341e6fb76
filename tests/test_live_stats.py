"""--stats-interval: kvm_stat-like counters while the guest runs (x86shadow/live_stats.py)."""
import io
import json
import subprocess
import sys
import pathlib

import pytest

from x86shadow.live_stats import LOG_FIELDS, LiveStats

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_logging_mode_prints_what_each_counter_did_in_the_interval():
    counters = {k: 0 for k in LOG_FIELDS}
    out = io.StringIO()
    s = LiveStats(counters, 10.0, out, tty=False)
    counters["exits"] = 7
    counters["pf_fixed"] = 3
    s._tick()
    counters["exits"] = 10
    s._tick()
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["time", *LOG_FIELDS]
    first, second = (dict(zip(lines[0].split(), ln.split())) for ln in lines[1:3])
    assert (first["exits"], first["pf_fixed"], second["exits"], second["pf_fixed"]) == \
        ("7", "3", "3", "0")


def test_live_table_lists_busiest_counters_first():
    counters = {"exits": 0, "pf_fixed": 0, "invlpg": 5}
    s = LiveStats(counters, 1.0, io.StringIO(), tty=True)
    counters.update(exits=100, pf_fixed=40)
    now, d, dt, el = s._deltas()
    table = s._table(now, d, dt, el)
    names = list(table.columns[0]._cells)
    assert names[:3] == ["exits", "pf_fixed", "invlpg"]


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="more than 0"):
        LiveStats({}, 0, io.StringIO(), tty=False)


def test_run_with_stats_interval_keeps_stdout_for_the_guest(tmp_path):
    stats = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "x86shadow.cli", "run", "guestcode/host_churn.asm",
                        "--mode", "pae", "--audit", "--host", "swap:3", "--stats-interval", "0.2",
                        "--stats-json", str(stats)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == "PASS\n", r.stderr
    lines = [ln.split() for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0][:2] == ["time", "exits"] and "host_swap_out" in lines[0]
    rows = [dict(zip(lines[0], ln)) for ln in lines[1:]]
    assert len(rows) >= 2
    total = json.loads(stats.read_text())
    for name in ("exits", "pf_fixed", "host_swap_out"):       # the intervals add up
        assert sum(int(row[name]) for row in rows) == total[name]
    r = subprocess.run([sys.executable, "-m", "x86shadow.cli", "run", "guestcode/hello.asm",
                        "--mode", "pae", "--stats-interval", "-1"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "more than 0" in r.stderr
