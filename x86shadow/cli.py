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
    return p


def cmd_run(args) -> int:
    from .asm import AsmError, assemble_firmware, assemble_program
    from .machine import Machine, Tracer

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
                        trace=Tracer(trace_fp) if trace_fp else None, audit=args.audit,
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
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
