"""The ``x86shadow`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_CRASH = 4
EXIT_INTERNAL = 70


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as 'x86shadow: ...' with exit status 2 (DESIGN.md 2.1)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"x86shadow: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def _policy_names():
    from .policies import POLICY_NAMES
    return POLICY_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="x86shadow", description="Run x86 guest code under a KVM-style shadow MMU.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="assemble and run a guest program")
    r.add_argument("program", help="Intel-syntax assembly file that defines main")
    r.add_argument("--mode", required=True, choices=["32", "pae", "64"],
                   help="paging mode: 32 (2-level), pae, 64 (4-level)")
    r.add_argument("--mmu", default="shadow", choices=["shadow", "native"],
                   help="shadow (our MMU, default) or native (Unicorn's own page walker)")
    r.add_argument("--policy", default="kvm", choices=_policy_names(),
                   help="what to do with writes to write-protected guest page tables (default kvm)")
    r.add_argument("--ram", type=int, default=128, metavar="MIB", help="guest RAM in MiB (default 128)")
    r.add_argument("--stats-json", metavar="PATH", help="write the final counters as one JSON object")
    r.add_argument("--trace", metavar="PATH", help="write one JSON object per MMU/exit event")
    r.add_argument("--audit", action="store_true", help="check every shadow MMU invariant after each exit")
    r.add_argument("--max-insns", type=int, default=0, metavar="N",
                   help="stop a guest that runs more than N instructions (exit 4); counting makes "
                        "execution several times slower. Default: no limit")
    _add_scenario_parser(sub)
    _add_bench_parser(sub)
    return p


def _add_scenario_parser(sub) -> None:
    s = sub.add_parser("scenario", help="run a measured scenario under one policy or all of them")
    ssub = s.add_subparsers(dest="scenario", required=True, parser_class=_Parser)
    k = ssub.add_parser("kmap", help="RHEL3 kscand / kmap_atomic (DESIGN.md 4)",
                        description="A 32-bit highmem kernel whose kscand clears the accessed bit of "
                                    "every user pte through a kmap_atomic fixmap slot, while the user "
                                    "process touches its pages between scans.")
    k.add_argument("--mode", default="pae", choices=["32", "pae"], help="paging mode (default pae)")
    k.add_argument("--variant", default="rhel3", choices=["rhel3", "2.4", "debug", "2.6"],
                   help="rhel3: kmap skips an unchanged pte, kunmap does nothing; 2.4: always stores, "
                        "kunmap does nothing; debug: HIGHMEM_DEBUG, kunmap clears (high, low); "
                        "2.6: kunmap clears (low, high). Default rhel3")
    k.add_argument("--order", default="rmap", choices=["table", "rmap"],
                   help="table: each user table kmapped once, walked linearly; rmap: a kmap per pte, "
                        "pages in active-list order (default rmap)")
    k.add_argument("--policy", default="kvm-2008", choices=_policy_names(),
                   help="write-protect policy (default kvm-2008; ignored with --compare)")
    k.add_argument("--tables", type=int, default=8, metavar="N", help="user page tables (default 8)")
    k.add_argument("--ptes", type=int, default=64, metavar="P", help="ptes used per table (default 64)")
    k.add_argument("--scans", type=int, default=4, metavar="S", help="kscand passes (default 4)")
    k.add_argument("--linearity", type=int, default=0, metavar="L",
                   help="rmap order: percent chance that the next page's pte lies in the same table "
                        "(default 0)")
    k.add_argument("--seed", type=int, default=1, help="seed of the guest's LCG (rmap order; default 1)")
    k.add_argument("--ram", type=int, default=None, metavar="MIB",
                   help="guest RAM in MiB (default: the smallest that holds the tables and pages, "
                        "at least 128)")
    k.add_argument("--json", metavar="PATH", help="write the runs as JSON (DESIGN.md 2.4)")
    k.add_argument("--compare", action="store_true", help="run every policy; one side-by-side table")
    k.add_argument("--plot", metavar="PATH.png", help="draw exits per scan for each policy (matplotlib)")
    k.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="--compare: runs at a time, each in its own process (default 1)")


def cmd_run(args) -> int:
    from .asm import AsmError, assemble_firmware, assemble_program
    from .events import JsonTrace
    from .machine import Machine

    if args.max_insns < 0:
        raise UsageError("--max-insns must be >= 0")
    if args.ram <= 0:
        raise UsageError("--ram must be a positive number of MiB")
    if not os.path.isfile(args.program):
        raise UsageError(f"cannot read program {args.program!r}: no such file")
    try:
        program = assemble_program(args.program, args.mode, args.ram << 20)
        firmware = assemble_firmware(args.mode, args.ram << 20)
    except AsmError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot read {e.filename}: {e.strerror}") from None
    trace_fp = None
    try:
        if args.trace:
            try:
                trace_fp = open(args.trace, "w")
            except OSError as e:
                raise UsageError(f"cannot write trace {args.trace!r}: {e.strerror}") from None
        out = sys.stdout.buffer

        def serial(data, out=out):
            out.write(data)
            out.flush()
        try:
            m = Machine(args.mode, mmu=args.mmu, policy=args.policy, ram_mib=args.ram,
                        trace=JsonTrace(trace_fp) if trace_fp else None, audit=args.audit,
                        serial_out=serial)
            m.load(program, firmware)
        except ValueError as e:
            raise UsageError(str(e)) from None
        result = m.run(args.max_insns)
    finally:
        if trace_fp:
            trace_fp.close()
    if result.report:
        sys.stdout.flush()
        sys.stderr.write(result.report + "\n")
    if args.stats_json:
        try:
            with open(args.stats_json, "w") as f:
                json.dump(result.counters, f, indent=1)
                f.write("\n")
        except OSError as e:
            raise UsageError(f"cannot write stats {args.stats_json!r}: {e.strerror}") from None
    return result.status


def cmd_scenario(args) -> int:
    from rich.console import Console

    from . import scenario as sc

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    params = sc.KmapParams(mode=args.mode, variant=args.variant, order=args.order, tables=args.tables,
                           ptes=args.ptes, scans=args.scans, linearity=args.linearity, seed=args.seed,
                           ram_mib=args.ram)
    con = Console(width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True)
    chatty = sys.stderr.isatty()
    try:
        params.check()
        if args.plot:
            sc.check_plot(args.plot)
        for path in (args.json, args.plot):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise UsageError(f"cannot write {path!r}: no such directory")
        policies = _policy_names() if args.compare else [args.policy]

        def progress(name, what):
            if chatty:
                err.print(f"[dim]{name}: {what}[/dim]")
        runs = sc.run_many(params, policies, jobs=args.jobs, isolate=args.compare, progress=progress)
        con.print(sc.describe(params))
        if args.compare:
            con.print(sc.table_compare(runs))
        else:
            con.print(sc.table_single(runs[0]))
        con.print(sc.table_scans(runs))
        if args.json:
            try:
                sc.write_json(args.json, runs)
            except OSError as e:
                raise UsageError(f"cannot write {args.json!r}: {e.strerror}") from None
        if args.plot:
            sc.plot(args.plot, runs, params)
    except sc.ScenarioError as e:
        sys.stderr.write(f"x86shadow: error: {e}\n")
        return e.status
    return 0


def _add_bench_parser(sub) -> None:
    """``x86shadow bench``: the shadow MMU against Unicorn's own MMU (x86shadow/bench.py)."""
    b = sub.add_parser("bench", help="benchmark workloads under --mmu shadow and --mmu native",
                       description="Run the workloads of guestcode/bench/ under --mmu shadow and "
                                   "--mmu native alternately (A B A B ...) and print medians, "
                                   "ratios, exits and the cost per exit by kind.")
    b.add_argument("--quick", action="store_true",
                   help="small sizes and one round (a smoke test; the numbers mean little)")
    b.add_argument("--rounds", type=int, default=0, metavar="N",
                   help="shadow/native rounds per workload (default 3; 1 with --quick)")
    b.add_argument("--mode", action="append", metavar="M",
                   help="paging mode: 32, pae, 64 or all; repeatable (default 64)")
    b.add_argument("--workload", nargs="+", metavar="NAME",
                   help="run only these workloads (their baselines are added)")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON (DESIGN.md 2.5)")
    b.add_argument("--policy", default="kvm", choices=_policy_names(),
                   help="page-table write policy of the shadow runs (default kvm)")
    b.add_argument("--ram", type=int, default=128, metavar="MIB", help="guest RAM (default 128)")
    b.add_argument("--growth", action="store_true",
                   help="instead: the growth sweep (working set, shadow pages, guest RAM; "
                        "bytes per shadow page)")
    b.add_argument("--tracemalloc", action="store_true",
                   help="with --growth: also measure the memory a run keeps with tracemalloc")
    b.add_argument("--profile", action="store_true",
                   help="instead: cProfile one shadow run of each workload, print the hot spots")
    b.add_argument("--top", type=int, default=20, metavar="K", help="with --profile: rows per table")
    b.add_argument("--silent", action="store_true", help="no progress lines on stderr")


def cmd_bench(args) -> int:
    from .bench import BenchError
    from .bench import main as bench_main
    if args.rounds < 0:
        raise UsageError("--rounds must be >= 1")
    try:
        return bench_main(args)
    except BenchError as e:
        raise UsageError(str(e)) from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "scenario":
            return cmd_scenario(args)
    except UsageError as e:
        sys.stderr.write(f"x86shadow: error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("x86shadow: interrupted\n")
        return 130
    except Exception as e:                      # noqa: BLE001 - our bug: say so, no traceback
        if os.environ.get("X86SHADOW_DEBUG"):
            raise
        sys.stderr.write(f"x86shadow: internal error: {type(e).__name__}: {e}\n"
                         "  (this is a bug in x86shadow; set X86SHADOW_DEBUG=1 for a traceback)\n")
        return EXIT_INTERNAL
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
