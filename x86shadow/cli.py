"""The ``x86shadow`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .trace_perfetto import add_run_options as _add_trace_format, trace_writer as _trace_writer
from .diff_cli import add_diff_parser
from .trace_view import add_trace_parser

EXIT_BAD_INPUT = 2
EXIT_CRASH = 4
EXIT_INTERNAL = 70
EXIT_EPIPE = 141                # 128 + SIGPIPE, as a shell reports a tool killed by a closed pipe


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as 'x86shadow: ...' with exit status 2 (docs/GUEST_CONTRACT.md)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"x86shadow: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("x86shadow")
    except PackageNotFoundError:
        return "(not installed)"


def _policy_names():
    from .policies import POLICY_NAMES
    return POLICY_NAMES


def _add_unsync(parser, both: bool = False) -> None:
    parser.add_argument("--unsync", choices=("on", "off", "both") if both else ("on", "off"),
                        default=None, type=str.lower,
                        help="out-of-sync leaf page tables (policy kvm; default on; off = KVM's "
                        "oos_shadow=0: every write to a shadowed table traps"
                        + ("; both: every workload under each, side by side)" if both else ")"))


def _unsync_arg(args):
    """--unsync as make_policy takes it: None (the policy's default), True or False."""
    v = getattr(args, "unsync", None)
    return None if v is None else v == "on"


def _add_host(parser) -> None:
    """Host memory under the guest (docs/HOST_MEMORY.md); any of these turns it on."""
    g = parser.add_argument_group("host memory (needs --mmu shadow; docs/HOST_MEMORY.md)")
    # (--host-seed alone changes nothing, so it does not turn host memory on)
    g.add_argument("--host", metavar="OP:N[,...]", default=None,
                   help="host operations: OP:N every N exits, OP@POINT[:N] at a named point of "
                        "the fault path; OP = swap, reclaim, migrate, ksm, age, lru; POINT = "
                        "after_seq_snapshot, after_gfn_to_pfn, pte_prefetch_after_gfn_to_pfn")
    g.add_argument("--host-script", metavar="FILE", default=None,
                   help="host operations from a file: one 'EXIT OP [GFN]' per line (OP at that "
                        "exit, on page GFN or one drawn from the seed)")
    g.add_argument("--host-seed", type=int, default=0, metavar="S",
                   help="seed of the host's choice of pages (default 0)")
    g.add_argument("--host-target", choices=("mapped", "tlb"), default=None,
                   help="pages the operations pick from: mapped by the shadow MMU (default) or "
                        "in a vCPU's TLB now")
    g.add_argument("--notifiers", choices=("2008", "modern"), default=None,
                   help="KVM's MMU-notifier era: 2008 (2.6.27: invalidate_page, count/seq, flush "
                        "after unlock) or modern (6.x: in_progress and range, flush before "
                        "unlock; default)")
    g.add_argument("--aging", metavar="VARIANT[:A_BITS]", default=None,
                   help="KVM's aging: 2008, 6.14, 6.15, single-rmap-skip, single-rmap-fallback "
                        "(default: the era's own, 2008 or 6.15); 2008:always-old|zap|zap-seq "
                        "for hardware without A bits (docs/AGING.md)")
    g.add_argument("--break", dest="break_rule", choices=("flush-before-free",), default=None,
                   help="break a rule on purpose (teaching and testing): flush-before-free defers "
                        "the notifier's TLB flush past the host's free, as the tlbs_dirty bug "
                        "did; the host detects it (exit status 6)")


def _host_config(args):
    """The HostConfig the host options ask for (None: no host memory)."""
    if (args.host is None and args.notifiers is None and args.break_rule is None
            and args.host_target is None and args.aging is None and args.host_script is None):
        return None
    from .machine import HostConfig
    from .memory.schedule import parse_schedule
    if getattr(args, "mmu", "shadow") != "shadow":
        raise UsageError("--host, --notifiers and --break need --mmu shadow: under Unicorn's "
                         "own MMU guest-physical memory is host memory")
    from .memory.schedule import parse_script
    from .mmu.aging import parse_aging
    script = ""
    if args.host_script is not None:
        try:
            with open(args.host_script, encoding="utf-8") as f:
                script = f.read()
        except OSError as e:
            raise UsageError(f"cannot read --host-script {args.host_script!r}: "
                             f"{e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--host-script {args.host_script!r} is not text") from None
    try:
        if args.host is not None:
            parse_schedule(args.host)
        parse_script(script, args.host_script or "--host-script")
        parse_aging(args.aging, args.notifiers or "modern")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return HostConfig(schedule=args.host or "", seed=args.host_seed,
                      notifiers=args.notifiers or "modern",
                      break_flush=args.break_rule == "flush-before-free",
                      target=args.host_target or "mapped", aging=args.aging, script=script)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="x86shadow", description="Run x86 guest code under a KVM-style shadow MMU.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="assemble and run a guest program, or run a multiboot kernel")
    r.add_argument("program", metavar="PROGRAM|KERNEL",
                   help="Intel-syntax assembly file that defines main, or a multiboot (v1) ELF "
                        "kernel as QEMU's -kernel takes it (told apart by content; "
                        "docs/KERNELS.md)")
    r.add_argument("--mode", default=None, choices=["32", "pae", "64"],
                   help="paging mode of a program: 32 (2-level), pae, 64 (4-level); required "
                        "for a program, refused for a kernel (it sets up its own paging)")
    r.add_argument("--append", metavar="ARGS", default=None,
                   help="a kernel's command line, after its file name (QEMU's -append)")
    r.add_argument("--initrd", metavar="FILE", default=None,
                   help="one module for a kernel (QEMU's -initrd)")
    r.add_argument("--mmu", default="shadow", choices=["shadow", "native"],
                   help="shadow (our MMU, default) or native (Unicorn's own page walker)")
    r.add_argument("--policy", default="kvm", choices=_policy_names(),
                   help="what to do with writes to write-protected guest page tables (default kvm)")
    _add_tlb(r)
    _add_unsync(r)
    r.add_argument("--ram", type=int, default=128, metavar="MIB", help="guest RAM in MiB (default 128)")
    r.add_argument("--cpu", default="haswell", metavar="MODEL[,+FLAG,-FLAG...]",
                   help="CPU model as QEMU's -cpu: haswell (default), qemu64, skylake-server, "
                        "max, ... with +pcid, -nx, phys-bits=N ... (docs/CPU_MODEL.md)")
    r.add_argument("--stats-json", metavar="PATH", help="write the final counters as one JSON object")
    r.add_argument("--trace", metavar="PATH", help="write one JSON object per MMU/exit event")
    _add_trace_format(r)                    # --trace-format jsonl|perfetto, --trace-clock
    r.add_argument("--audit", action="store_true", help="check every shadow MMU invariant after each exit")
    r.add_argument("--stats-interval", type=float, default=None, metavar="SECONDS",
                   help="show the counters every SECONDS while the guest runs, on stderr: a live "
                        "kvm_stat-like table on a terminal, else one line per interval "
                        "(kvm_stat -l)")
    r.add_argument("-I", dest="include", action="append", default=[], metavar="DIR",
                   help="look for .include files in DIR too (after the including file's folder; "
                        "the guest library, lib/*.inc, is always found)")
    r.add_argument("--max-insns", type=int, default=None, metavar="N",
                   help="stop a guest that runs more than N instructions (exit 4); counting makes "
                        "execution several times slower. Default: no limit")
    _add_quiet(r)
    _add_smp(r)
    r.add_argument("--gdb", metavar="[HOST:]PORT", default=None,
                   help="serve gdb's remote protocol there (`target remote HOST:PORT`; host "
                        "default 127.0.0.1, port 0 picks a free one): docs/GDB.md")
    r.add_argument("--gdb-wait", action="store_true",
                   help="with --gdb: wait for gdb before the first instruction")
    _add_host(r)
    _add_scenario_parser(sub)
    _add_bench_parser(sub)
    add_trace_parser(sub)                   # x86shadow trace show (x86shadow/trace_view.py)
    add_diff_parser(sub)                    # x86shadow diff (x86shadow/diff_cli.py)
    from .explore_cli import add_explore_parser
    add_explore_parser(sub)                 # x86shadow explore (x86shadow/explore_cli.py)
    from .fuzz.command import add_fuzz_parser
    add_fuzz_parser(sub)                    # x86shadow fuzz (x86shadow/fuzz/command.py)
    from .sweep import add_sweep_parser
    add_sweep_parser(sub)                   # x86shadow sweep (x86shadow/sweep.py)
    return p


def _add_scenario_parser(sub) -> None:
    s = sub.add_parser("scenario", help="run a measured scenario under one policy or all of them")
    ssub = s.add_subparsers(dest="scenario", required=True, parser_class=_Parser)
    k = ssub.add_parser("kmap", help="RHEL3 kscand / kmap_atomic (README: the kmap scenario)",
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
                   help="write-protect policy (default kvm-2008, the KVM of the scenario's era; "
                        "`run` defaults to kvm; ignored with --compare)")
    _add_unsync(k)
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
    k.add_argument("--json", metavar="PATH", help="write the runs as JSON (docs/JSON_RECORDS.md)")
    k.add_argument("--compare", action="store_true", help="run every policy; one side-by-side table")
    k.add_argument("--plot", metavar="PATH.png", help="draw exits per scan for each policy (matplotlib)")
    k.add_argument("--audit", action="store_true",
                   help="check every shadow MMU invariant after each exit (slower)")
    _add_smp(k)                             # every vCPU scans a share of the user tables
    _add_compare_executor(k)
    _add_quiet(k)
    _add_host(k)
    a = ssub.add_parser("aging", help="the host's LRU ageing a guest through KVM's aging "
                                      "variants (docs/AGING.md)",
                        description="A 32-bit kernel and one process with a hot set, a cold set "
                                    "and new pages every pass; the host reclaims under a limit, "
                                    "asking KVM's aging variant which pages are young. Counts "
                                    "false 'old' answers against the guest's ground truth, hot "
                                    "pages evicted, mmu_lock taken and the vCPU's wait for it "
                                    "(virtual time).")
    a.add_argument("--mode", default="pae", choices=["32", "pae"], help="paging mode (default pae)")
    a.add_argument("--layout", default="multi", choices=["multi", "tdp"],
                   help="multi: every data frame mapped by the kernel's direct map and the "
                        "process (two sptes, legacy shadow paging); tdp: by the process only "
                        "(one spte, as under nested TDP). Default multi")
    a.add_argument("--variant", default="6.15", metavar="V",
                   help="aging variant: 2008, 6.14, 6.15, single-rmap-skip, "
                        "single-rmap-fallback; 2008:always-old, 2008:zap, 2008:zap-seq for "
                        "hardware without A bits (default 6.15; ignored with --compare)")
    a.add_argument("--compare", action="store_true",
                   help="run every variant; one side-by-side table")
    a.add_argument("--hot", type=int, default=64, metavar="N",
                   help="hot pages, touched every pass (default 64)")
    a.add_argument("--cold", type=int, default=64, metavar="N",
                   help="cold pages, touched in the warm-up only (default 64)")
    a.add_argument("--stream", type=int, default=8, metavar="N",
                   help="new pages touched in each pass (default 8)")
    a.add_argument("--passes", type=int, default=12, metavar="N", help="passes (default 12)")
    a.add_argument("--tlb", default="switch", choices=["switch", "keep"],
                   help="switch: a CR3 load before each pass drops the guest's translations; "
                        "keep: they stay cached (a cleared A bit is not set again until a "
                        "flush). Default switch")
    a.add_argument("--limit", type=int, default=None, metavar="N",
                   help="resident data pages the host allows (default hot + cold / 2)")
    a.add_argument("--batch", type=int, default=16, metavar="N",
                   help="pages shrink_active_list ages at once (default 16)")
    a.add_argument("--active-op", default="clear_young", choices=["clear_young", "test_young"],
                   help="notifier the active list is aged with (modern era; default clear_young)")
    a.add_argument("--ram", type=int, default=64, metavar="MIB", help="guest RAM (default 64)")
    a.add_argument("--cost", action="append", metavar="NAME=NS",
                   help="change one virtual-time cost of the model (docs/AGING.md lists them: "
                        "touch, fill, exit, fault_locked, swapin, primary, call, lock, rmap, "
                        "spte, flush, unmap, writeback); repeatable")
    a.add_argument("--json", metavar="PATH", help="write the runs as JSON (docs/AGING.md)")
    a.add_argument("--plot", metavar="PATH.png",
                   help="draw hot pages evicted per pass and the lock wait (matplotlib)")
    _add_compare_executor(a)
    _add_quiet(a)


def _add_compare_executor(parser) -> None:
    """--executor, --jobs, --address of ``scenario ... --compare`` (x86shadow/executor.py)."""
    from .executor import add_executor_options
    # one run at a time by default: the runs' wall times and peak RSS are measured
    add_executor_options(parser, default_jobs=1,
                         jobs_help="--compare: runs at a time, each in a process of its own")


def _add_quiet(parser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (shown only on a terminal anyway; "
                             "docs/PROGRESS.md)")


class _TraceSink:
    """``--trace``: the trace writer (JSON lines, or --trace-format perfetto's); a write error
    (ENOSPC, EIO) stops the run with a status-2 error naming the file instead of escaping from
    inside a CPU callback."""

    def __init__(self, fp, path, writer=None):
        from .events import JsonTrace
        self.fp, self.path = fp, path
        self.trace = (writer or JsonTrace)(fp)      # writer: --trace-format perfetto's
        self.error = None

    def __call__(self, kind, fields):
        if self.error is not None:
            return
        try:
            self.trace(kind, fields)
        except OSError as e:
            self._fail(e)

    def _fail(self, e):
        from . import stopping
        self.error = f"cannot write trace {self.path!r}: {e.strerror}"
        stopping.request(stopping.Stop(EXIT_BAD_INPUT, f"error: {self.error}"))

    def close(self):
        try:
            try:
                if self.error is None and hasattr(self.trace, "close"):
                    self.trace.close()              # perfetto: the end of the JSON
            finally:
                self.fp.close()
        except OSError as e:
            if self.error is None:
                self.error = f"cannot write trace {self.path!r}: {e.strerror}"


class _Serial:
    """The guest's serial console on stdout; a closed pipe (``| head``) ends the run quietly."""

    def __init__(self, out):
        self.out = out
        self.broken = False

    def __call__(self, data):
        if self.broken:
            return
        try:
            self.out.write(data)
            self.out.flush()
        except BrokenPipeError:
            from . import stopping
            self.broken = True
            stopping.request(stopping.Stop(EXIT_EPIPE, ""))


def _quiet_stdout():
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:
        pass


def load_guest(args, kernels: bool = True):
    """boot/guest.py ``load_guest`` for the command's arguments (run, diff): a kernel or a
    program for ``args.mode``; bad input is a UsageError."""
    from .boot.guest import GuestError, load_guest as load
    try:
        return load(args.program, mode=args.mode, ram_mib=args.ram, include_dirs=args.include,
                    append=getattr(args, "append", None), initrd=getattr(args, "initrd", None),
                    kernels=kernels)
    except GuestError as e:
        raise UsageError(str(e)) from None


def load_program(args):
    """(program, firmware) of an assembly PROGRAM for ``args.mode`` (diff)."""
    guest = load_guest(args, kernels=False)
    return guest.program, guest.firmware


def _add_smp(r) -> None:
    """--vcpus / --schedule (docs/SMP.md)."""
    g = r.add_argument_group("several vCPUs (docs/SMP.md)")
    g.add_argument("--vcpus", type=int, default=1, metavar="N",
                   help="vCPUs, 1..8 (default 1); each enters main with its number in EDI/RDI "
                        "and N in ESI/RSI")
    g.add_argument("--schedule", default=None, metavar="rr[:Q]|random:SEED[:Q][:exits]",
                   help="how the vCPUs share the host thread: round robin or seeded random "
                        "slices of Q guest instructions (default rr:1000); ':exits' also "
                        "switches at every MMU exit")


def _smp_config(args):
    """(vcpus, schedule) from --vcpus / --schedule; bad input is a UsageError."""
    from .machine import check_vcpus
    from .vm_scheduler import parse_schedule
    try:
        check_vcpus(args.vcpus)
        schedule = parse_schedule(args.schedule) if args.schedule is not None else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.vcpus > 1 and getattr(args, "gdb", None) is not None:
        raise UsageError("--gdb debugs one vCPU: leave out --vcpus (or use --vcpus 1)")
    if schedule is not None and args.vcpus == 1:
        raise UsageError("--schedule needs several vCPUs (--vcpus N, N > 1)")
    return args.vcpus, schedule


def _add_tlb(p, both=False) -> None:
    p.add_argument("--tlb", default="virtual",
                   choices=["virtual", "walker"] + (["both"] if both else []),
                   help="how the shadow MMU's translations reach the CPU: virtual (a fill hook "
                        "per TLB miss, default) or walker (Unicorn's walker over an image of "
                        "the shadow tables; no host memory yet)"
                        + ("; both: the two side by side in one run" if both else ""))


def cmd_run(args) -> int:
    from . import stopping
    from .outputs import OutputError, open_output
    from .machine import Machine, check_ram

    if args.max_insns is not None and args.max_insns < 1:
        raise UsageError("--max-insns must be at least 1 (leave it out for no limit)")
    if args.stats_interval is not None and not args.stats_interval > 0:
        raise UsageError("--stats-interval must be more than 0 seconds")
    from .boot.guest import GuestError, guest_kind
    try:
        kernel = guest_kind(args.program) == "kernel"
    except GuestError as e:
        raise UsageError(str(e)) from None
    if kernel and args.mode is not None:
        raise UsageError(f"{args.program} is a multiboot kernel, which sets up its own paging: "
                         "leave out --mode")
    mode = None if kernel else args.mode
    if not kernel and args.mode is None:
        raise UsageError(f"{args.program} is an assembly program: --mode 32, pae or 64 is "
                         "required")
    try:
        from .cpu.model import make_model
        args.cpu = make_model(args.cpu, 32 if mode in ("32", "pae") else 64, args.mmu)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        check_ram(mode, args.ram)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        trace_writer = _trace_writer(args)      # --trace-format, --trace-clock
    except ValueError as e:
        raise UsageError(str(e)) from None
    host = _host_config(args)
    vcpus, schedule = _smp_config(args)
    guest = load_guest(args)
    try:
        stats_fp = open_output(args.stats_json, "stats") if args.stats_json else None
        trace = (_TraceSink(open_output(args.trace, "trace"), args.trace, trace_writer)
                 if args.trace else None)
    except OutputError as e:
        raise UsageError(str(e)) from None
    if args.gdb_wait and args.gdb is None:
        raise UsageError("--gdb-wait needs --gdb [HOST:]PORT")
    gdb = None
    if args.gdb is not None:
        from .gdb_session import GdbSession
        try:
            gdb = GdbSession(args.gdb, args.gdb_wait)
        except ValueError as e:
            raise UsageError(str(e)) from None
        sys.stderr.write(f"x86shadow: gdb: listening on {gdb.address}"
                         f"{' (waiting for gdb before the first instruction)' if args.gdb_wait else ''}\n")
        sys.stderr.flush()
    serial = _Serial(sys.stdout.buffer)
    m = None
    stop = None
    result = None
    try:
        try:
            m = Machine(guest.mode, mmu=args.mmu, policy=args.policy, ram_mib=args.ram,
                        trace=trace, audit=args.audit, serial_out=serial,
                        unsync=_unsync_arg(args), host=host, cpu=args.cpu,
                        vcpus=vcpus, schedule=schedule, tlb=args.tlb)
            guest.load_into(m)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.audit and vcpus > 1 and args.tlb == "walker":
            sys.stderr.write("x86shadow: note: --audit under --tlb walker does not check the "
                             "vCPUs' TLBs against their sptes (Unicorn's own TLB keeps no record "
                             "of its entries); --tlb virtual does (docs/SMP.md)\n")
        live = None
        if args.stats_interval is not None:
            from .live_stats import LiveStats
            live = LiveStats(m.counters, args.stats_interval, sys.stderr, sys.stderr.isatty(),
                             host=m.host is not None)
            live.start()
        try:
            result = _run_machine(m, args, gdb)
        except stopping.Stop as e:
            stop = e
        finally:
            if live is not None:
                live.stop()
    finally:
        if gdb is not None:
            gdb.close()
        if trace is not None:
            trace.close()
        if stats_fp is not None and m is not None:
            try:
                with stats_fp:
                    json.dump(m.stats_record(), stats_fp, indent=1)
                    stats_fp.write("\n")
            except OSError as e:
                raise UsageError(f"cannot write stats {args.stats_json!r}: {e.strerror}") from None
    if serial.broken:
        _quiet_stdout()
        return EXIT_EPIPE
    if trace is not None and trace.error:
        raise UsageError(trace.error)
    if stop is not None:
        if stop.message:
            sys.stdout.flush()
            sys.stderr.write(f"x86shadow: {stop.message}\n")
        return stop.status
    if result.report:
        sys.stdout.flush()
        sys.stderr.write(result.report + "\n")
    return result.status


def _run_machine(m, args, gdb):
    """m.run(); with --max-insns (and no debugger) a progress bar of the instructions run, for
    a kernel an open-ended one with the exits so far."""
    if gdb is not None:
        return m.run(args.max_insns or 0, drive=gdb.drive(m))
    from .progress import poll, progress
    if not args.max_insns:
        if m.kernel is None:
            return m.run()
        # a kernel can run for minutes (kvm-unit-tests' access test): an open-ended bar
        with progress(None, "kernel", args.quiet) as bar, \
                poll(bar, lambda: bar.describe(f"kernel: {m.counters['exits']} exits")):
            return m.run()
    with progress(args.max_insns, "guest instructions", args.quiet) as bar:
        with poll(bar, m.vcpu.insns_now):
            return m.run(args.max_insns)


def cmd_scenario(args) -> int:
    from rich.console import Console

    from . import scenario as sc
    from .outputs import OutputError, check_writable
    from .policies import comparison_configs

    if args.scenario == "aging":
        from . import aging_scenario
        try:
            return aging_scenario.cli_main(args)
        except sc.ScenarioError as e:
            sys.stderr.write(f"x86shadow: error: {e}\n")
            return e.status
    from .executor import ExecutorError, compare_executor
    try:
        ex = compare_executor(args)
    except ExecutorError as e:
        raise UsageError(str(e)) from None
    vcpus, schedule = _smp_config(args)
    params = sc.KmapParams(mode=args.mode, variant=args.variant, order=args.order, tables=args.tables,
                           ptes=args.ptes, scans=args.scans, linearity=args.linearity, seed=args.seed,
                           ram_mib=args.ram, vcpus=vcpus,
                           schedule=str(schedule) if schedule is not None else None)
    from .progress import progress as show_progress
    con = Console(width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True)
    try:
        params.check()
        if args.plot:
            sc.check_plot(args.plot)
        try:
            for path, what in ((args.json, "JSON"), (args.plot, "plot")):
                if path:
                    check_writable(path, what)
        except OutputError as e:
            raise UsageError(str(e)) from None
        policies = comparison_configs(_unsync_arg(args)) if args.compare else [args.policy]

        with show_progress(len(policies), "kmap", args.quiet) as bar, ex:
            def progress(name, what):
                if what == "done":
                    bar.advance()
                bar.describe(f"{name}: {what}")
            runs = sc.run_many(params, policies, executor=ex if args.compare else None,
                               progress=progress, unsync=_unsync_arg(args),
                               host=_host_config(args), audit=args.audit)
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
        if args.json:
            err.print(f"wrote {args.json}")
        if args.plot:
            sc.plot(args.plot, runs, params)
            err.print(f"wrote {args.plot}")
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
    b.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="shadow/native rounds per workload (default 3; 1 with --quick)")
    b.add_argument("--mode", action="append", metavar="M",
                   help="paging mode: 32, pae, 64 or all; repeatable (default 64)")
    b.add_argument("--workload", nargs="+", metavar="NAME",
                   help="run only these workloads (their baselines are added)")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON (docs/JSON_RECORDS.md)")
    b.add_argument("--policy", default="kvm", choices=_policy_names(),
                   help="page-table write policy of the shadow runs (default kvm)")
    _add_unsync(b, both=True)
    _add_tlb(b, both=True)
    b.add_argument("--ram", type=int, default=128, metavar="MIB", help="guest RAM (default 128)")
    b.add_argument("--growth", action="store_true",
                   help="instead: the growth sweep (working set, shadow pages, guest RAM; "
                        "bytes per shadow page)")
    b.add_argument("--tracemalloc", action="store_true",
                   help="with --growth: also measure the memory a run keeps with tracemalloc")
    b.add_argument("--profile", action="store_true",
                   help="instead: cProfile one shadow run of each workload, print the hot spots")
    b.add_argument("--top", type=int, default=20, metavar="K", help="with --profile: rows per table")
    b.add_argument("--host", action="store_true",
                   help="the host-memory part: a notifier invalidation per page (swap, migrate, "
                        "munmap), a fault that races one (pf_retry), aging per page "
                        "(clear_young/test_young), in both notifier eras; alone it runs only "
                        "this part, with --workload those workloads too. Without --host and "
                        "--workload the bench runs every workload, then this part (not with "
                        "--unsync both)")
    _add_quiet(b)
    b.add_argument("--silent", dest="quiet", action="store_true", help="the same as --quiet")


def cmd_bench(args) -> int:
    from .bench import BenchError
    from .bench import main as bench_main
    from .policies import make_policy
    if args.rounds is not None and args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    # --unsync both (each workload under the shadow MMU with out-of-sync pages on and off) is
    # checked by bench.main before anything runs: a policy without them is a usage error there
    if args.unsync != "both":
        args.unsync = _unsync_arg(args)
        try:
            make_policy(args.policy, args.unsync)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        return bench_main(args)
    except BenchError as e:
        raise UsageError(str(e)) from None


def main(argv=None) -> int:
    try:
        from . import stopping
        args = build_parser().parse_args(argv)     # (a Ctrl-C up to here is "interrupted" too)
        with stopping.SignalHandling():
            return _dispatch(args)
    except KeyboardInterrupt:                   # (first: `stopping` may not be imported yet)
        sys.stderr.write("x86shadow: interrupted\n")
        return 130
    except UsageError as e:
        sys.stderr.write(f"x86shadow: error: {e}\n")
        return EXIT_BAD_INPUT
    except stopping.Stop as e:                  # a signal outside a guest run (or a failing output)
        if e.message:
            sys.stderr.write(f"x86shadow: {e.message}\n")
        return e.status
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_EPIPE
    except MemoryError as e:
        detail = f": {e}" if str(e) else " (is --ram larger than this host can hold?)"
        sys.stderr.write(f"x86shadow: error: out of memory{detail}\n")
        return EXIT_BAD_INPUT
    except Exception as e:                      # noqa: BLE001 - our bug: say so, no traceback
        if os.environ.get("X86SHADOW_DEBUG"):
            raise
        sys.stderr.write(f"x86shadow: internal error: {type(e).__name__}: {e}\n"
                         "  (this is a bug in x86shadow; set X86SHADOW_DEBUG=1 for a traceback)\n")
        return EXIT_INTERNAL


def _dispatch(args) -> int:
    if args.command == "run":
        return cmd_run(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "scenario":
        return cmd_scenario(args)
    if hasattr(args, "run_command"):           # a subcommand registered by its own module
        return args.run_command(args)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
