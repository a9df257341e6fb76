"""x86shadow sweep: a tiny grid writes one JSON line per point with its parameters and the
scenario's own run record; bad specs are clear errors."""
import json
import subprocess
import sys

from x86shadow.scenario import KmapParams, run_kmap


def _sweep(tmp_path, text, *extra):
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    return subprocess.run([sys.executable, "-m", "x86shadow.cli", "sweep", str(spec), "--quiet",
                           *extra], capture_output=True, text=True)


def test_tiny_grid_writes_one_record_per_point(tmp_path):
    out = tmp_path / "out.jsonl"
    r = _sweep(tmp_path, 'kind = "kmap"\n[fixed]\ntables = 1\nptes = 8\nscans = 1\n'
               '[grid]\npolicy = ["kvm", "kvm-2008"]\norder = ["table", "rmap"]\n',
               "-o", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    recs = sorted((json.loads(line) for line in out.read_text().splitlines()),
                  key=lambda x: x["point"])
    assert [x["params"]["policy"] for x in recs] == ["kvm", "kvm", "kvm-2008", "kvm-2008"]
    assert [x["params"]["order"] for x in recs] == ["table", "rmap", "table", "rmap"]
    for x in recs:
        assert x["record"]["policy"] == x["params"]["policy"]
        assert x["record"]["order"] == x["params"]["order"] and x["record"]["tables"] == 1
    # the record is what the scenario itself produces (counts; times differ run to run)
    own = run_kmap(KmapParams(tables=1, ptes=8, scans=1, order="rmap"), "kvm-2008")
    assert recs[3]["record"].keys() == own.keys()


def test_bad_specs_are_clear_errors(tmp_path):
    for text, msg in (('kind = "kmap"\nbogus = 1\n', "unknown key 'bogus'"),
                      ('kind = "nope"\n', "choose from kmap, aging"),
                      ('kind = "kmap"\n[grid]\ntables = [0]\n', "--tables 0"),
                      ('kind = "kmap"\n[grid]\nwidth = [1]\n', "not a kmap parameter"),
                      ('kind = "kmap"\n[grid]\ntables = []\n', "non-empty list"),
                      ('kind = "kmap"\n[grid]\ntables = ["x"]\n', "must be int"),
                      ('kind = "aging"\n[grid]\nvariant = ["x"]\n', "unknown variant"),
                      ('kind = = 1\n', "not TOML")):
        r = _sweep(tmp_path, text)
        assert r.returncode == 2 and r.stderr.startswith("x86shadow: error:"), (text, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)


def test_bench_kind_writes_the_rows_bench_json_gives(tmp_path):
    out = tmp_path / "b.jsonl"
    r = _sweep(tmp_path, 'kind = "bench"\n[fixed]\nworkload = "pte-write"\n'
               '[grid]\nmode = ["pae", "64"]\n', "-o", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    recs = sorted((json.loads(line) for line in out.read_text().splitlines()),
                  key=lambda x: x["point"])
    assert [x["params"]["mode"] for x in recs] == ["pae", "64"]
    bench = tmp_path / "bench.json"
    b = subprocess.run([sys.executable, "-m", "x86shadow.cli", "bench", "--quick", "--workload",
                        "pte-write", "--mode", "pae", "--json", str(bench), "--quiet"],
                       capture_output=True, text=True)
    assert b.returncode == 0, b.stderr
    row = next(w for w in json.loads(bench.read_text())["workloads"] if w["name"] == "pte-write")
    rec = recs[0]["record"]
    assert rec.keys() == row.keys() and rec["mode"] == "pae" and rec["name"] == "pte-write"
    for key in ("guest_insns", "exits", "counters", "ptes_written"):    # counts, not times
        assert rec[key] == row[key], key
    assert recs[1]["record"]["mode"] == "64"


def test_bad_bench_specs_are_clear_errors(tmp_path):
    for text, msg in (('kind = "bench"\n[grid]\nmode = ["pae"]\n', "no workload"),
                      ('kind = "bench"\n[grid]\nworkload = ["nope"]\n', "workload 'nope'"),
                      ('kind = "bench"\n[grid]\nworkload = ["idle"]\nquick = [1]\n',
                       "must be bool"),
                      ('kind = "bench"\n[fixed]\nworkload = "idle"\npolicy = "xen"\n'
                       'unsync = true\n', "no out-of-sync")):
        r = _sweep(tmp_path, text)
        assert r.returncode == 2 and r.stderr.startswith("x86shadow: error:"), (text, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)
