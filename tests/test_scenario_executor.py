"""scenario kmap --compare / scenario aging --compare on the executor (x86shadow/executor.py):
the same table rows and JSON records (apart from what is measured: wall times, peak RSS)
whatever --jobs is, the Ray path when Ray is installed, and usage errors."""
import json
import subprocess
import sys

import pytest

KMAP = ["scenario", "kmap", "--compare", "--tables", "1", "--ptes", "8", "--scans", "1"]
AGING = ["scenario", "aging", "--compare", "--hot", "8", "--cold", "8", "--stream", "2",
         "--passes", "2"]
MEASURED = ("wall", "rss", "us_per_aged_page")       # keys of what a run measures of itself


def _unmeasured(x):
    """``x`` without the keys of what a run measures (recursively)."""
    if isinstance(x, dict):
        return {k: _unmeasured(v) for k, v in x.items() if not any(m in k for m in MEASURED)}
    if isinstance(x, list):
        return [_unmeasured(v) for v in x]
    return x


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "x86shadow.cli", *args], capture_output=True,
                          text=True)


def _run(tmp_path, base, name, *extra):
    path = tmp_path / f"{name}.json"
    r = _cli(*base, "--json", str(path), "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    runs = json.loads(path.read_text())["runs"]
    records = _unmeasured(runs)
    rows = [line for line in r.stdout.splitlines()
            if not any(m in line for m in ("wall time", "peak RSS", "measured", "median of"))]
    return records, rows


@pytest.mark.parametrize("base", [KMAP, AGING], ids=["kmap", "aging"])
def test_compare_gives_the_same_results_with_one_job_and_two(tmp_path, base):
    one = _run(tmp_path, base, "one", "--jobs", "1")
    two = _run(tmp_path, base, "two", "--jobs", "2")
    assert one == two
    records = one[0]
    assert len(records) > 3                               # every policy / variant ran
    key = "label" if base is KMAP else "variant"
    assert len({r[key] for r in records}) == len(records)      # each run its own config


def test_kmap_compare_records_are_the_in_process_runs(tmp_path):
    from x86shadow.scenario import KmapParams, run_kmap
    records, _ = _run(tmp_path, KMAP, "k", "--jobs", "2")
    own = run_kmap(KmapParams(tables=1, ptes=8, scans=1), records[0]["policy"],
                   unsync=records[0]["unsync"])
    assert records[0] == _unmeasured(own)


def test_compare_on_ray():
    pytest.importorskip("ray", reason="Ray not installed (pip install 'x86shadow[ray]')")
    r = _cli(*KMAP, "--executor", "ray", "--jobs", "2", "--quiet")
    assert r.returncode == 0, r.stderr


def test_executor_options_without_compare_or_bad_are_usage_errors():
    for args, msg in ((["scenario", "kmap", "--executor", "ray"], "need --compare"),
                      (["scenario", "aging", "--address", "h:1"], "need --compare"),
                      ([*KMAP, "--jobs", "0"], "at least 1"),
                      ([*AGING, "--jobs", "0"], "at least 1")):
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("x86shadow: error:"), r.stderr
        assert msg in r.stderr and "Traceback" not in r.stderr


def test_cancelling_the_local_pool_waits_for_its_manager_thread():
    # leaving the block early terminates the workers; the pool's manager thread must be gone
    # (its wake-up pipe closed) before close() returns, or CPython 3.11's exit hook can write to
    # the pipe as the thread closes it and print an OSError traceback after Ctrl-C
    import time
    from concurrent.futures import process

    from x86shadow.executor import LocalExecutor
    with pytest.raises(KeyboardInterrupt):
        with LocalExecutor(jobs=1) as ex:
            for _ in ex.imap_unordered(time.sleep, [0.0, 30.0]):
                raise KeyboardInterrupt
    assert not [t for t in process._threads_wakeups if t.is_alive()]
