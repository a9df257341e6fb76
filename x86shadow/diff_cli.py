"""``x86shadow diff PROGRAM --mode M``: the command around x86shadow/diff.py (docs/DIFF.md).

Exit status: 0 no divergence, 1 a divergence, 2 bad input, 130 / 143 interrupted (the report of
the configs done so far is printed and written)."""
from __future__ import annotations

import json
import sys

EXIT_SAME, EXIT_DIVERGED = 0, 1


def add_diff_parser(sub) -> None:
    """Registered by cli.build_parser; dispatched through ``run_command``."""
    from .diff import DEFAULT_MAX_INSNS, DEFAULT_TIMEOUT_S
    from .policies import POLICY_NAMES
    d = sub.add_parser("diff", help="run a guest under --mmu shadow and --mmu native in "
                                    "lockstep; report the first divergence",
                       description="Run PROGRAM under the shadow MMU (one policy, or every "
                                   "comparison config) and under Unicorn's own MMU, instruction "
                                   "for instruction, and report the first instruction after "
                                   "which exit status, serial output, registers or guest RAM "
                                   "differ: its address and disassembly, the guest ptes of the "
                                   "address it accesses, and both MMUs' view of it "
                                   "(docs/DIFF.md). Exit status 0: no divergence, 1: one.")
    d.add_argument("program", help="Intel-syntax assembly file that defines main (as for run)")
    d.add_argument("--mode", required=True, choices=["32", "pae", "64"],
                   help="paging mode: 32 (2-level), pae, 64 (4-level)")
    d.add_argument("--policy", default="all", choices=["all"] + list(POLICY_NAMES),
                   help="the shadow MMU's policy; all (default): every policy, and kvm with "
                        "out-of-sync pages off too")
    d.add_argument("--unsync", choices=("on", "off"), default=None, type=str.lower,
                   help="out-of-sync leaf page tables (policies kvm, kvm-2008-oos; default on; "
                        "with --policy all it decides for all of them)")
    d.add_argument("--check-every", type=int, default=None, metavar="N",
                   help="compare registers and RAM every N instructions too (default: at the "
                        "end only; a divergence that later disappears is only seen with it)")
    d.add_argument("--max-insns", type=int, default=DEFAULT_MAX_INSNS, metavar="N",
                   help=f"instructions each run may execute (default {DEFAULT_MAX_INSNS})")
    d.add_argument("--ram", type=int, default=128, metavar="MIB",
                   help="guest RAM in MiB (default 128)")
    d.add_argument("--audit", action="store_true",
                   help="check every shadow MMU invariant after each exit (a broken one ends "
                        "the shadow run: a divergence in status)")
    d.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="wall-clock limit per run segment against livelocks (default "
                        f"{DEFAULT_TIMEOUT_S:g}; 0: none)")
    d.add_argument("-I", dest="include", action="append", default=[], metavar="DIR",
                   help="look for .include files in DIR too")
    d.add_argument("--json", metavar="PATH", help="write the result as one JSON object")
    d.set_defaults(run_command=cmd_diff)


def _configs(args):
    from .policies import comparison_configs, config_label, make_policy
    unsync = None if args.unsync is None else args.unsync == "on"
    if args.policy == "all":
        return [config_label(n, u is not False) for n, u in comparison_configs(unsync)]
    make_policy(args.policy, unsync)                   # ValueError: not for this policy
    return [config_label(args.policy, unsync is not False)]


def cmd_diff(args) -> int:
    from .cli import UsageError, load_program
    from .diff import DiffError, diff_program
    from .machine import check_ram
    from .outputs import OutputError, check_writable

    if args.check_every is not None and args.check_every < 1:
        raise UsageError("--check-every must be at least 1")
    if args.max_insns < 1:
        raise UsageError("--max-insns must be at least 1")
    if args.timeout < 0:
        raise UsageError("--timeout must be 0 (none) or more seconds")
    try:
        check_ram(args.mode, args.ram)
        configs = _configs(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        try:
            check_writable(args.json, "JSON")
        except OutputError as e:
            raise UsageError(str(e)) from None
    program, firmware = load_program(args)
    chatty = sys.stderr.isatty()

    def progress(config):
        if chatty:
            sys.stderr.write(f"x86shadow diff: {config} ...\n")
    try:
        report = diff_program(program, args.mode, configs=configs, check_every=args.check_every,
                              max_insns=args.max_insns, ram_mib=args.ram, audit=args.audit,
                              timeout=args.timeout, firmware=firmware, progress=progress,
                              name=args.program)
    except DiffError as e:
        raise UsageError(str(e)) from None
    print(report.format(), flush=True)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report.to_json(), f, indent=1)
                f.write("\n")
        except OSError as e:
            raise UsageError(f"cannot write JSON {args.json!r}: {e.strerror}") from None
    if report.interrupted:
        if report.stop.message:
            sys.stderr.write(f"x86shadow: {report.stop.message}\n")
        return report.stop.status
    return EXIT_DIVERGED if report.diverged else EXIT_SAME
