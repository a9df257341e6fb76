"""``x86shadow fuzz``: the differential fuzzing campaign on the command line (docs/FUZZ.md)."""
from __future__ import annotations

import sys
import time

from ..executor import ExecutorError, add_executor_options, executor_from_args
from . import campaign as cp

EXIT_FOUND = 1


class FuzzUsageError(Exception):
    pass


def add_fuzz_parser(sub) -> None:
    f = sub.add_parser("fuzz", help="random page-table programs, --mmu native against every "
                                    "policy; divergences shrunk and saved (docs/FUZZ.md)")
    f.add_argument("--mode", action="append", choices=("32", "pae", "64", "all"),
                   help="paging mode; repeatable (default all)")
    f.add_argument("--count", "--max-examples", dest="count", type=int, default=100,
                   metavar="N", help="examples per mode (default 100)")
    f.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    f.add_argument("--save", metavar="DIR", default="fuzz-failures",
                   help="where shrunk programs are written (default ./fuzz-failures, made only "
                        "when something is found)")
    f.add_argument("--policy", action="append", metavar="CONFIG",
                   help="compare only this policy config (e.g. kvm, 'kvm --unsync off'); "
                        "repeatable (default every one)")
    f.add_argument("--no-host", action="store_true",
                   help="no host events under the shadow runs")
    f.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting examples after this long")
    f.add_argument("--replay", metavar="FILE", help="run a saved program again instead")
    f.add_argument("--quiet", action="store_true",
                   help="only failures and the summary; no progress bar (docs/PROGRESS.md)")
    f.add_argument("--planted-bug", default=None, help=argparse_suppress())
    add_executor_options(f)
    f.set_defaults(run_command=cmd_fuzz)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS          # test-only switch (docs/FUZZ.md), not in --help


def _err(msg):
    sys.stderr.write(f"x86shadow: error: {msg}\n")
    return 2


def cmd_fuzz(args) -> int:
    from .differential import CONFIGS
    if args.replay:
        try:
            header, divs = cp.replay(args.replay, args.policy)
        except cp.ReplayError as e:
            return _err(str(e))
        for d in divs:
            print(d)
        print(f"{args.replay}: mode {header['mode']}: "
              + (f"{len(divs)} divergence(s)" if divs else "no divergence"))
        return EXIT_FOUND if divs else 0
    if args.count < 1:
        return _err("--count must be at least 1")
    if args.time_budget is not None and not args.time_budget > 0:
        return _err("--time-budget must be more than 0 seconds")
    configs = tuple(args.policy or CONFIGS)
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        return _err(f"--policy {bad[0]!r}: not a policy config (choose from {', '.join(CONFIGS)})")
    if args.planted_bug is not None:
        from ..mmu.vm_mmu import PLANTED_BUGS
        if args.planted_bug not in PLANTED_BUGS:
            return _err(f"--planted-bug {args.planted_bug!r}: choose from {', '.join(PLANTED_BUGS)}")
    modes = args.mode or ["all"]
    modes = ["32", "pae", "64"] if "all" in modes else list(dict.fromkeys(modes))
    deadline = time.time() + args.time_budget if args.time_budget else None
    shards = cp.shards(modes, args.count, args.seed, configs=configs,
                       host_events=not args.no_host, planted_bug=args.planted_bug,
                       deadline=deadline)
    try:
        ex = executor_from_args(args)
    except ExecutorError as e:
        return _err(str(e))
    from ..progress import progress
    done, failures = [], []
    status = 0
    try:
        with ex, progress(len(shards), "fuzz shards", args.quiet) as bar:
            bar.describe(f"fuzz: {len(shards)} shards ({ex.name}, {ex.jobs} jobs)")
            for _shard, r in ex.imap_unordered(cp.run_shard, shards):
                done.append(r)
                bar.advance()
                bar.describe(f"fuzz: {sum(x.examples for x in done)} examples, "
                             f"{len(failures) + (r.failure is not None)} divergence(s)")
                if r.failure is not None:
                    f = r.failure
                    path = cp.save_failure(args.save, f)
                    failures.append(path)
                    print(f"mode {f.mode} seed {f.seed} shard {f.shard}: divergence, shrunk "
                          f"from {f.original_ops} to {f.shrunk_ops} operations -> {path}")
                    for d in f.divergences[:4]:
                        print("   ", d)
                elif not args.quiet:
                    print(f"mode {r.shard.mode} shard {r.shard.index}: {r.examples} examples, "
                          f"no divergence ({r.seconds:.1f} s)")
                sys.stdout.flush()
    except (KeyboardInterrupt, Exception) as e:            # noqa: BLE001
        from ..stopping import Stop
        if isinstance(e, Stop):
            status = e.status
        elif isinstance(e, KeyboardInterrupt):
            status = 130
        else:
            raise
        print("x86shadow: interrupted: pending work cancelled", file=sys.stderr)
    n = sum(r.examples for r in done)
    print(f"{n} examples in {len(done)} of {len(shards)} shards ({ex.name}, {ex.jobs} jobs): "
          f"{len(failures)} divergence(s)")
    if status:
        return status
    return EXIT_FOUND if failures else 0
