"""``x86shadow sweep SPEC.toml``: a grid of scenario or bench parameters -> one JSON-lines file,
one record per grid point, run through the executor (x86shadow/executor.py; docs/SWEEP.md)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys

from .executor import ExecutorError, add_executor_options, executor_from_args

KINDS = ("kmap", "aging", "bench")
TOP_KEYS = {"kind", "output", "fixed", "grid"}


class SweepError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class BenchParams:
    """One point of a ``bench`` sweep: one workload of x86shadow/bench.py (its baseline is run
    too, as ``bench --workload`` does), under --mmu shadow and --mmu native."""
    workload: str = ""
    mode: str = "64"
    policy: str = "kvm"
    unsync: bool | None = None
    rounds: int = 1
    quick: bool = True
    ram_mib: int = 128

    def check(self) -> "BenchParams":
        from .bench import BY_NAME
        from .policies import POLICY_NAMES, UNSYNC_POLICIES
        from .scenario import ScenarioError
        if self.workload not in BY_NAME:
            raise ScenarioError(f"workload {self.workload!r}: choose from {', '.join(BY_NAME)}")
        if self.mode not in ("32", "pae", "64"):
            raise ScenarioError(f"mode {self.mode!r}: choose from 32, pae, 64")
        if self.policy not in POLICY_NAMES:
            raise ScenarioError(f"policy {self.policy!r}: choose from {', '.join(POLICY_NAMES)}")
        if self.unsync is not None and self.policy not in UNSYNC_POLICIES:
            raise ScenarioError(f"unsync: policy {self.policy!r} has no out-of-sync pages")
        if self.rounds < 1 or self.ram_mib < 64:
            raise ScenarioError("rounds must be at least 1 and ram_mib at least 64")
        return self


def _params_class(kind):
    if kind == "bench":
        return BenchParams, {}
    if kind == "kmap":
        from .scenario import KmapParams
        return KmapParams, {"policy": str, "unsync": bool}
    from .aging_scenario import AgingParams
    return AgingParams, {"variant": str}


def load_spec(path):
    """(kind, output, [point dict]) of a sweep spec; SweepError on anything wrong."""
    try:
        import tomllib
    except ImportError:                         # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except OSError as e:
        raise SweepError(f"cannot read {path!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not TOML: {e}") from None
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key {sorted(unknown)[0]!r} (keys: "
                         f"{', '.join(sorted(TOP_KEYS))})")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise SweepError(f"{path}: kind = {kind!r}: choose from {', '.join(KINDS)}")
    cls, extra = _params_class(kind)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "costs"}
    fixed, grid = spec.get("fixed", {}), spec.get("grid", {})
    for name, table in (("fixed", fixed), ("grid", grid)):
        if not isinstance(table, dict):
            raise SweepError(f"{path}: [{name}] must be a table")
        for key in table:
            if key not in fields and key not in extra:
                raise SweepError(f"{path}: [{name}] {key!r} is not a {kind} parameter (choose "
                                 f"from {', '.join(list(fields) + list(extra))})")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: [grid] {key} must be a non-empty list")
    points = []
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        point = dict(fixed, **dict(zip(keys, combo)))
        _check_point(path, kind, cls, fields, extra, point, len(points))
        points.append(point)
    output = spec.get("output")
    if output is not None and not isinstance(output, str):
        raise SweepError(f"{path}: output must be a string (a path)")
    return kind, output, points


def _check_point(path, kind, cls, fields, extra, point, i):
    from .scenario import ScenarioError
    where = f"{path}: grid point {i} ({', '.join(f'{k}={v!r}' for k, v in point.items())})"
    for k, v in point.items():
        want = extra.get(k) or {"int": int, "str": str, "int | None": int, "bool": bool,
                                "bool | None": bool}.get(str(fields[k].type), None)
        if want is not None and (not isinstance(v, want) or (want is int and isinstance(v, bool))):
            raise SweepError(f"{where}: {k} must be {want.__name__}, not {v!r}")
    if kind == "bench" and "workload" not in point:
        raise SweepError(f"{where}: no workload (a [fixed] or [grid] key)")
    try:
        params(kind, point).check()
    except ScenarioError as e:
        raise SweepError(f"{where}: {e}") from None
    if kind == "kmap":
        from .policies import POLICY_NAMES
        if point.get("policy", "kvm-2008") not in POLICY_NAMES:
            raise SweepError(f"{where}: unknown policy (choose from {', '.join(POLICY_NAMES)})")
    else:
        from .aging_scenario import VARIANTS
        if point.get("variant", "6.15") not in VARIANTS:
            raise SweepError(f"{where}: unknown variant (choose from {', '.join(VARIANTS)})")


def params(kind, point):
    cls, extra = _params_class(kind)
    return cls(**{k: v for k, v in point.items() if k not in extra})


def run_point(job):
    """One grid point -> its result record (executor job)."""
    index, kind, point = job
    p = params(kind, point)
    if kind == "bench":
        record = run_bench_point(p)
    elif kind == "kmap":
        from .scenario import run_kmap
        record = run_kmap(p, point.get("policy", "kvm-2008"), unsync=point.get("unsync"))
    else:
        from .aging_scenario import run_aging
        record = run_aging(p, point.get("variant", "6.15"))
    return {"point": index, "kind": kind, "params": point, "record": record}


def run_bench_point(p: BenchParams) -> dict:
    """The workload's row of ``bench --json`` (docs/JSON_RECORDS.md) for one point."""
    from .bench import run_bench, to_json
    results = run_bench(modes=(p.mode,), names=(p.workload,), rounds=p.rounds, quick=p.quick,
                        ram_mib=p.ram_mib, policy=p.policy, unsync=p.unsync)
    rows = to_json(results, rounds=p.rounds, quick=p.quick, policy=p.policy, ram_mib=p.ram_mib,
                   unsync=p.unsync)["workloads"]
    return next(r for r in rows if r["name"] == p.workload)


def add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="a grid of scenario or bench parameters -> one JSON-lines "
                                     "file (docs/SWEEP.md)")
    s.add_argument("spec", metavar="SPEC.toml")
    s.add_argument("-o", "--output", metavar="PATH",
                   help="the JSON-lines file (default: the spec's output, else SPEC.jsonl)")
    s.add_argument("--quiet", action="store_true",
                   help="no progress bar (shown only on a terminal anyway; docs/PROGRESS.md)")
    add_executor_options(s)
    s.set_defaults(run_command=cmd_sweep)


def cmd_sweep(args) -> int:
    from .outputs import OutputError, check_writable
    try:
        kind, out, points = load_spec(args.spec)
        path = args.output or out or args.spec.rsplit(".", 1)[0] + ".jsonl"
        check_writable(path, "sweep output")
        ex = executor_from_args(args)
    except (SweepError, ExecutorError, OutputError) as e:
        sys.stderr.write(f"x86shadow: error: {e}\n")
        return 2
    from .progress import progress
    n = 0
    status = 0
    with open(path, "w", encoding="utf-8") as f:
        try:
            with ex, progress(len(points), "sweep points", args.quiet) as bar:
                bar.describe(f"sweep {kind}: {len(points)} points ({ex.name}, {ex.jobs} jobs)")
                jobs = [(i, kind, p) for i, p in enumerate(points)]
                for _job, rec in ex.imap_unordered(run_point, jobs):
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    n += 1
                    bar.advance()
                    bar.describe(f"sweep {kind}: point {rec['point']} done "
                                 f"({', '.join(f'{k}={v}' for k, v in rec['params'].items())})")
        except KeyboardInterrupt:
            status = 130
        except Exception as e:                          # noqa: BLE001
            from .stopping import Stop
            if not isinstance(e, Stop):
                raise
            status = e.status
    print(f"wrote {n} of {len(points)} records to {path}")
    return status
