"""Ctrl-C (SIGINT) of a fuzz campaign and of a sweep, once they are running jobs: exit status
130, the summary printed, what finished kept (the shards' lines, the sweep's JSON lines), no
traceback (docs/FUZZ.md, docs/SWEEP.md)."""
import json
import os
import re
import signal
import subprocess
import sys
import time


def _start(*args):
    env = {k: v for k, v in os.environ.items() if k != "X86SHADOW_PROGRESS"}
    return subprocess.Popen([sys.executable, "-m", "x86shadow.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt(proc, ready, timeout=240):
    """SIGINT once ``ready()`` is true; -> (status, stdout, stderr)."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the campaign never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_ctrl_c_of_a_fuzz_campaign_keeps_the_finished_shards(tmp_path):
    proc = _start("fuzz", "--mode", "32", "--count", "400", "--jobs", "2", "--no-host",
                  "--save", str(tmp_path))
    lines = []

    def a_shard_finished():
        line = proc.stdout.readline()           # the shard lines are flushed one by one
        lines.append(line)
        return "shard" in line
    status, out, err = _interrupt(proc, a_shard_finished)
    out = "".join(lines) + out
    assert status == 130, err
    assert "Traceback" not in err and "interrupted" in err
    m = re.search(r"(\d+) examples in (\d+) of 20 shards \(local, 2 jobs\)", out)
    assert m, out
    finished = int(m.group(2))
    assert 1 <= finished < 20
    shard_lines = [x for x in out.splitlines() if re.match(r"mode 32 shard \d+: ", x)]
    assert len(shard_lines) == finished                  # each finished shard reported
    assert int(m.group(1)) == 20 * finished


def test_ctrl_c_of_a_sweep_keeps_the_finished_points(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('kind = "kmap"\n[fixed]\ntables = 1\nptes = 8\nscans = 1\n'
                    '[grid]\nseed = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]\n'
                    'order = ["table", "rmap"]\n')
    out_path = tmp_path / "s.jsonl"
    proc = _start("sweep", str(spec), "-o", str(out_path), "--jobs", "1")

    def a_point_finished():
        return out_path.exists() and out_path.read_text().count("\n") >= 1
    status, out, err = _interrupt(proc, a_point_finished)
    assert status == 130, err
    assert "Traceback" not in err
    recs = [json.loads(x) for x in out_path.read_text().splitlines()]
    m = re.search(r"wrote (\d+) of 32 records to ", out)
    assert m and int(m.group(1)) == len(recs) and 1 <= len(recs) < 32, out
    assert all(r["kind"] == "kmap" and r["record"]["tables"] == 1 for r in recs)
