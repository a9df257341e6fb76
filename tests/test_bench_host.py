"""`x86shadow bench --host`: the host-memory part of the bench (x86shadow/bench_host.py) prints its
three tables and writes the JSON key ``host`` with positive counts, at the tiny --quick sizes. No
timing is asserted: the numbers live in the README."""
import json
import pathlib
import subprocess
import sys
from argparse import Namespace

import pytest

from x86shadow.bench import BenchError, parts
from x86shadow.bench_host import AGING, ERAS, QUICK

ROOT = pathlib.Path(__file__).resolve().parent.parent
INVALIDATION_FIELDS = ("op", "mode", "notifiers", "schedule", "mappings", "sptes_per_page",
                       "pages", "zapped", "flushes", "notifier_us", "host_us", "total_us",
                       "flush_us", "guest_us", "swap_in_us", "swap_ins", "refaults", "extra_fills")
RETRY_FIELDS = ("rule", "not_racing", "mode", "notifiers", "pf_retry", "pf_fixed", "ops",
                "ops_not_racing", "retry_us", "all_in_us", "aftermath_us_per_op",
                "normal_fault_us", "retry_over_normal")


def bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "x86shadow.cli", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "host.json"
    r = bench("--host", "--quick", "--silent", "--json", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    return r, json.loads(path.read_text())


def _rows(out, title):
    """The body rows (cells) of the table whose title starts with ``title``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    header = next(line for line in lines[start:] if line.startswith("┃"))
    cols = [c.strip() for c in header.split("┃")[1:-1]]
    rows = []
    for line in lines[lines.index(header, start) + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            rows.append(dict(zip(cols, [c.strip() for c in line.split("│")[1:-1]])))
    return cols, rows


def test_host_alone_prints_its_three_tables_and_no_workload_table(host):
    r, doc = host
    out = r.stdout
    assert "Traceback" not in r.stderr
    assert "shadow MMU vs Unicorn's own MMU" not in out and "workloads" not in doc
    cols, rows = _rows(out, "Host memory: a notifier invalidation")
    for c in ("op", "notifiers", "mappings", "pages", "sptes/page", "flushes", "notifier", "host",
              "total", "guest after", "refaults", "swap-ins", "fills after"):
        assert c in cols, c
    assert sorted({(row["op"].split()[0], row["notifiers"]) for row in rows}) == \
        sorted((op, era) for op in ("swap", "migrate", "munmap") for era in ERAS)
    for row in rows:
        assert int(row["pages"]) > 0
        float(row["notifier"]), float(row["host"]), float(row["total"])
    cols, rows = _rows(out, "Host memory: faults that race an invalidation")
    assert {"retried", "ops", "fixed", "retried fault", "normal fault"} <= set(cols)
    assert len(rows) == 2 * len(ERAS)
    for row in rows:
        assert int(row["retried"].rstrip("k").split(".")[0]) > 0
    cols, rows = _rows(out, "Host memory: aging through the notifier")
    assert {"call", "pages were", "1 spte/page", "2 sptes/page"} <= set(cols)
    assert len(rows) == len(AGING) * len(ERAS)


def test_host_json_has_the_keys_and_positive_counts(host):
    _, doc = host
    h = doc["host"]
    assert set(h) >= {"invalidation", "retried_faults", "aging", "variants", "meta"}
    assert h["meta"]["notifiers"] == list(ERAS) and h["meta"]["quick"] is True
    assert h["meta"]["sizes"]["pages"] == QUICK.pages
    inv = h["invalidation"]
    assert len(inv) == 5 * len(ERAS)
    for row in inv:
        for f in INVALIDATION_FIELDS:
            assert f in row, (row["op"], f)
        assert row["pages"] > 0 and row["zapped"] >= row["pages"] and row["flushes"] > 0
        assert row["notifier_us"] > 0 and row["total_us"] > 0
        if row["op"] == "munmap":
            assert row["flushes"] == 1 and row["pages"] == QUICK.pages
            assert row["zapped"] == row["mappings"] * row["pages"]
        else:
            assert row["refaults"] > 0 and row["extra_fills"] is not None
            assert isinstance(row["guest_us"], float)
            assert (row["swap_ins"] > 0) == (row["op"] == "swap")
    retry = h["retried_faults"]
    assert sorted((r["rule"].split("@")[0], r["notifiers"]) for r in retry) == \
        sorted((op, era) for op in ("migrate", "swap") for era in ERAS)
    for row in retry:
        for f in RETRY_FIELDS:
            assert f in row, (row["rule"], f)
        assert row["pf_retry"] > 0 and row["ops"] > 0 and row["ops_not_racing"] > 0
        assert row["pf_fixed"] >= QUICK.fault_pages and row["normal_faults"] > 0
        assert isinstance(row["retry_us"], float) and row["normal_fault_us"] > 0
    aging = h["aging"]
    assert len(aging) == len(AGING) * len(ERAS)
    for row in aging:
        for n in (1, 2):
            side = row[f"sptes_{n}"]
            assert side["pages"] == QUICK.pages and side["sptes"] == n * QUICK.pages
            assert side["us_per_page"] > 0
            # the run left every A bit set; clear_young clears them
            assert side["young"] == (side["pages"] if row["pages_were"] == "young" else 0)
    for v in h["variants"]:
        assert v["shadow_runs_s"] and all(x > 0 for x in v["shadow_runs_s"])
        assert v["counters"]["exits"] > 0


def _args(**kw):
    base = dict(host=False, workload=None, unsync=None, growth=False, profile=False)
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw,want", [
    ({}, (True, True)),                                   # everything
    ({"host": True}, (False, True)),                      # the host part alone
    ({"workload": ["idle"]}, (True, False)),              # those workloads
    ({"workload": ["idle"], "host": True}, (True, True)),
    ({"unsync": "both"}, (True, False)),                  # the on/off comparison of workloads
])
def test_which_parts_run(kw, want):
    assert parts(_args(**kw)) == want


@pytest.mark.parametrize("kw,message", [
    ({"host": True, "unsync": "both"}, "not both"),
    ({"host": True, "growth": True}, "not of --growth"),
    ({"host": True, "profile": True}, "not of --growth or --profile"),
])
def test_host_refuses_what_it_cannot_do(kw, message):
    with pytest.raises(BenchError, match=message):
        parts(_args(**kw))


def test_host_with_unsync_both_is_a_usage_error():
    r = bench("--host", "--unsync", "both", "--silent", timeout=60)
    assert r.returncode == 2 and "x86shadow: error:" in r.stderr and "Traceback" not in r.stderr
