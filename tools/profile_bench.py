#!/usr/bin/env python3
"""Profile shadow runs of bench workloads and print the hot spots (function, % of the run's time).

Two profilers:
  --py-spy (default when `py-spy` is installed): a sampling profiler in a child process, ~1000
      samples/s; nothing is instrumented, so the proportions are those of a normal run. Only the
      samples taken inside the profiled Machine.run() count (not assembly, machine creation or the
      warm-up run). `emu_start` as the innermost frame = time inside Unicorn (translated guest code
      and QEMU's helpers), i.e. not in our Python.
  --cprofile: deterministic, in process (`x86shadow bench --profile` does the same); every Python
      call pays the profiler's overhead, so call-heavy paths look bigger than they are.

Self % = samples where the function is the innermost Python frame; total % = samples where it is
anywhere on the stack.

    tools/profile_bench.py [--mode 64] [--quick] [--top 15] [--cprofile] [--json PATH] [WORKLOAD ...]
"""
import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)

from x86shadow import bench as B  # noqa: E402

CHILD = r"""
import sys
sys.path.insert(0, {root!r})
from x86shadow import bench as B
w = B.BY_NAME[{name!r}]
pf = B.assemble(w, {mode!r}, {n}, 128)
B.run_once(w, {mode!r}, "shadow", pf, policy={policy!r})           # warm-up (not counted)

def profiled_run():
    return B.run_once(w, {mode!r}, "shadow", pf, policy={policy!r})

r = profiled_run()
with open({out!r}, "w") as f:
    f.write(repr(r.seconds))
"""

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    if "/" in f:
        f = "/".join(f.split("/")[-2:])
    return f"{m.group('func')} ({f})"


def pyspy(name, mode, n, policy, rate=1000):
    """Sampled profile of one shadow run: (seconds, samples, {func: self}, {func: total})."""
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "child.py")
        raw = os.path.join(d, "raw.txt")
        secs = os.path.join(d, "seconds.txt")
        with open(script, "w") as f:
            f.write(CHILD.format(root=os.path.abspath(ROOT), name=name, mode=mode, n=n, policy=policy,
                                 out=secs))
        p = subprocess.run(["py-spy", "record", "-r", str(rate), "-f", "raw", "-o", raw, "--",
                            sys.executable, script], capture_output=True, text=True)
        if p.returncode != 0 or not os.path.exists(raw) or not os.path.exists(secs):
            raise SystemExit(f"py-spy failed: {(p.stdout + p.stderr).strip()[-800:]}")
        with open(secs) as f:
            seconds = float(f.read())
        own = collections.Counter()
        total = collections.Counter()
        samples = 0
        with open(raw) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                frames = stack.split(";")
                if not any(fr.startswith("profiled_run ") for fr in frames):
                    continue
                # keep what is below Machine.run() (not the machine's creation)
                for i, fr in enumerate(frames):
                    if fr.startswith("Machine.run "):
                        frames = frames[i + 1:]
                        break
                else:
                    continue
                c = int(count)
                samples += c
                if not frames:
                    continue
                names = [_short(fr) for fr in frames]
                own[names[-1]] += c
                for nm in set(names):
                    total[nm] += c
    return seconds, samples, own, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workloads", nargs="*", default=list(B.PROFILE_DEFAULT))
    ap.add_argument("--mode", default="64", choices=B.MODES)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--policy", default="kvm")
    ap.add_argument("--cprofile", action="store_true", help="use cProfile instead of py-spy")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    for n in a.workloads:
        if n not in B.BY_NAME:
            ap.error(f"unknown workload {n!r} (choose from {', '.join(B.BY_NAME)})")
    use_pyspy = not a.cprofile and shutil.which("py-spy")
    if not use_pyspy:
        if not a.cprofile:
            print("py-spy not found: using cProfile (pip install py-spy for a sampling profile)",
                  file=sys.stderr)
        prof = B.profile(mode=a.mode, names=a.workloads, quick=a.quick, policy=a.policy, top=a.top,
                         log=lambda m: print(m, file=sys.stderr))
        B.print_profile(prof)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(prof, f, indent=1)
        return 0
    from rich.markup import escape
    from rich.table import Table
    con = B._console()
    doc = {}
    for name in a.workloads:
        w = B.BY_NAME[name]
        n = w.n_quick if a.quick else w.n_full
        print(f"[py-spy {a.mode}] {name} (N={n})", file=sys.stderr)
        seconds, samples, own, total = pyspy(name, a.mode, n, a.policy)
        t = Table(title=f"{name} (mode {a.mode}, N={n}): shadow run {seconds:.2f} s, {samples} samples"
                        " (py-spy)", title_justify="left")
        for c in ("function (innermost Python frame)", "self %", "total %"):
            t.add_column(c, justify="left" if c.startswith("function") else "right", no_wrap=True)
        rows = []
        for fn, c in own.most_common(a.top):
            pct, tot = 100 * c / samples, 100 * total[fn] / samples
            rows.append({"function": fn, "self_pct": round(pct, 1), "total_pct": round(tot, 1)})
            t.add_row(escape(fn), f"{pct:.1f}", f"{tot:.1f}")
        con.print(t)
        doc[name] = {"mode": a.mode, "n": n, "seconds": seconds, "samples": samples, "top": rows,
                     "total_pct": {fn: round(100 * c / samples, 1)
                                   for fn, c in total.most_common(40)}}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
