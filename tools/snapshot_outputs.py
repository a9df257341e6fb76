#!/usr/bin/env python3
"""Record everything a user sees from every guest program, to compare two revisions.

    python tools/snapshot_outputs.py DIR            # write DIR/<case>.json for every case
    python tools/snapshot_outputs.py --diff A B     # compare two such directories

A case is one program of guestcode/ (and guestcode/bench/ at its --quick size) in one mode it
supports, under --mmu native or under --mmu shadow with one policy. Each record holds the exit
status, the console output, the crash report, the final counters and every trace event (in
order), plus the kmap scenario's per-policy counters. Run it on the old revision and on the new
one; ``--diff`` prints every difference and exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cases():
    from x86shadow.asm import program_modes
    from x86shadow.policies import POLICY_NAMES
    progs = sorted((ROOT / "guestcode").glob("*.asm"))
    bench = sorted((ROOT / "guestcode" / "bench").glob("*.asm"))
    for path in progs + bench:
        for mode in program_modes(path):
            yield path, mode, "native", None
            for pol in POLICY_NAMES:
                yield path, mode, "shadow", pol


def _bench_symbols(path):
    from x86shadow.bench import WORKLOADS
    for w in WORKLOADS:
        if w.path == path:
            return {"N": w.n_quick, **w.symbols}
    return None


def record(path, mode, mmu, policy):
    from x86shadow.asm import assemble_firmware, assemble_program
    from x86shadow.machine import Machine
    symbols = _bench_symbols(path) if path.parent.name == "bench" else None
    prog = assemble_program(str(path), mode, 128 << 20, symbols=symbols)
    events = []

    def trace(kind, fields):
        events.append({"event": kind, **fields})
    m = Machine(mode, mmu=mmu, policy=policy, ram_mib=128, trace=trace if mmu == "shadow" else None,
                audit=False)
    m.load(prog, assemble_firmware(mode, 128 << 20))
    r = m.run()
    return {"status": r.status, "how": r.how, "output": bytes(m.output).decode("latin-1"),
            "report": r.report, "counters": dict(r.counters), "events": events}


def kmap_records():
    from x86shadow import scenario as sc
    from x86shadow.policies import POLICY_NAMES
    out = {}
    for mode in ("32", "pae"):
        for variant in ("rhel3", "debug"):
            p = sc.KmapParams(mode=mode, variant=variant, tables=2, ptes=16, scans=2)
            for pol in POLICY_NAMES:
                run = sc.run_kmap(p, pol)
                keep = {k: v for k, v in run.items() if k not in ("wall_s", "scans_wall_s", "peak_rss_mb",
                                                                  "scan_details")}
                keep["scan_details"] = [{k: v for k, v in d.items() if k != "wall_s"}
                                        for d in run["scan_details"]]
                out[f"kmap-{mode}-{variant}-{pol}"] = keep
    return out


def snapshot(dest: pathlib.Path):
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for path, mode, mmu, policy in _cases():
        name = f"{path.parent.name}-{path.stem}-{mode}-{mmu}" + (f"-{policy}" if policy else "")
        (dest / f"{name}.json").write_text(json.dumps(record(path, mode, mmu, policy), indent=0))
        n += 1
    for name, rec in kmap_records().items():
        (dest / f"{name}.json").write_text(json.dumps(rec, indent=0))
        n += 1
    print(f"{n} records in {dest}")


def diff(a: pathlib.Path, b: pathlib.Path) -> int:
    names_a = {p.name for p in a.glob("*.json")}
    names_b = {p.name for p in b.glob("*.json")}
    bad = 0
    for name in sorted(names_a ^ names_b):
        print(f"only in {'A' if name in names_a else 'B'}: {name}")
        bad += 1
    for name in sorted(names_a & names_b):
        ra = json.loads((a / name).read_text())
        rb = json.loads((b / name).read_text())
        if ra == rb:
            continue
        bad += 1
        for key in sorted(set(ra) | set(rb)):
            if ra.get(key) != rb.get(key):
                va, vb = ra.get(key), rb.get(key)
                if key == "events" and isinstance(va, list) and isinstance(vb, list):
                    for i, (x, y) in enumerate(zip(va, vb)):
                        if x != y:
                            print(f"{name}: event {i}: {x} != {y}")
                            break
                    else:
                        print(f"{name}: {len(va)} vs {len(vb)} events")
                elif isinstance(va, dict) and isinstance(vb, dict):
                    d = {k: (va.get(k), vb.get(k)) for k in set(va) | set(vb) if va.get(k) != vb.get(k)}
                    print(f"{name}: {key}: {d}")
                else:
                    print(f"{name}: {key}: {str(va)[:200]!r} != {str(vb)[:200]!r}")
    print(f"{len(names_a & names_b)} records compared, {bad} differ")
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR")
    ap.add_argument("--diff", action="store_true", help="compare two snapshot directories")
    args = ap.parse_args(argv)
    if args.diff:
        if len(args.dirs) != 2:
            ap.error("--diff takes two directories")
        return diff(pathlib.Path(args.dirs[0]), pathlib.Path(args.dirs[1]))
    if len(args.dirs) != 1:
        ap.error("one output directory")
    snapshot(pathlib.Path(args.dirs[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
