"""``x86shadow explore SCENARIO``: the command around the interleaving explorer
(x86shadow/explore.py, scenarios in x86shadow/explore_scenarios.py, docs/EXPLORE.md);
``x86shadow explore backlog``: the backlog report (x86shadow/explore_backlog.py).

Exit status: 0 no violation, 6 a violation (the counterexample is printed), 2 bad input,
130 / 143 interrupted (the counts so far are printed)."""
from __future__ import annotations

import sys

EXIT_NONE, EXIT_VIOLATION = 0, 6
DEFAULT_PREEMPTIONS = 2
BACKLOG = "backlog"


def add_explore_parser(sub) -> None:
    """Registered by cli.build_parser; dispatched through ``run_command``."""
    e = sub.add_parser("explore", help="run MMU actors (fault path, lockless walker, zapper, host "
                                       "notifier, grace periods) in every interleaving and check "
                                       "each step",
                       description="Run the actors of SCENARIO -- the real MMU, notifier, host "
                                   "and lockless code as sequences of atomic steps -- in every "
                                   "interleaving with at most --preemptions preemptions (then "
                                   "--random seeded random ones), checking after every step: no "
                                   "read of a freed shadow page, no spte or TLB entry to a freed "
                                   "host page, the deferred-free backlog within its bound, the "
                                   "audit's invariants (docs/EXPLORE.md). Exit status 0: no "
                                   "violation, 6: one (printed step by step). "
                                   "'explore backlog' prints the backlog report instead.")
    e.add_argument("scenario", nargs="?",
                   help="a scenario name (see --list), or 'backlog' for the backlog report")
    e.add_argument("--list", action="store_true", help="list the scenarios, one per line")
    e.add_argument("--broken", action="store_true",
                   help="run the scenario's deliberately broken variant")
    e.add_argument("--preemptions", type=int, default=DEFAULT_PREEMPTIONS, metavar="K",
                   help=f"at most K preemptions per interleaving (default {DEFAULT_PREEMPTIONS})")
    e.add_argument("--random", type=int, default=0, metavar="N",
                   help="then N seeded random interleavings (no preemption bound)")
    e.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the random interleavings (default 0)")
    e.add_argument("--zaps", type=int, default=None, metavar="N",
                   help="backlog: shadow pages zapped in each load (default 256)")
    e.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (shown only on a terminal anyway; "
                        "docs/PROGRESS.md)")
    e.add_argument("--delays", default=None, metavar="D,...",
                   help="backlog: reader delays in steps, 'inf' for a reader that stays "
                        "(default 1,4,16,64,inf)")
    e.set_defaults(run_command=cmd_explore)


def _parse_delays(text):
    from .cli import UsageError
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "inf":
            out.append(None)
            continue
        try:
            d = int(part)
        except ValueError:
            d = 0
        if d < 1:
            raise UsageError(f"--delays: {part!r} is not a positive number of steps or 'inf'")
        out.append(d)
    return tuple(out)


def cmd_explore(args) -> int:
    from .cli import UsageError
    from .explore_scenarios import SCENARIOS
    if args.list:
        width = max(len(n) for n in list(SCENARIOS) + [BACKLOG])
        for s in SCENARIOS.values():
            print(f"{s.name:<{width}}  {s.description}")
        print(f"{BACKLOG:<{width}}  report: peak deferred-free pages per scheme and grace-period "
              "delay under the same zap load")
        return EXIT_NONE
    if args.scenario is None:
        raise UsageError("explore needs a SCENARIO (or --list)")
    if args.scenario == BACKLOG:
        return _backlog(args)
    if args.zaps is not None or args.delays is not None:
        raise UsageError("--zaps and --delays are options of 'explore backlog'")
    scenario = SCENARIOS.get(args.scenario)
    if scenario is None:
        raise UsageError(f"unknown scenario {args.scenario!r} (choose from "
                         f"{', '.join(SCENARIOS)}, {BACKLOG}; see --list)")
    if args.preemptions < 0:
        raise UsageError("--preemptions must be 0 or more")
    if args.random < 0:
        raise UsageError("--random must be 0 or more")
    return _explore(scenario, args)


def _explore(scenario, args) -> int:
    from . import stopping
    from .explore import Report, explore, format_counterexample
    variant = "broken" if args.broken else "correct"
    print(f"scenario {scenario.name} ({variant}): {scenario.description}")
    print(f"  {variant} variant: {scenario.broken if args.broken else scenario.correct}")
    rep = Report()
    broken = args.broken
    from .progress import poll, progress
    try:
        # an open-ended bar: the number of interleavings is known only at the end
        with progress(None, "interleavings", args.quiet) as bar, \
                poll(bar, lambda: bar.describe(f"{rep.interleavings} interleavings, "
                                               f"{rep.states} states")):
            explore(lambda: scenario.build(broken), args.preemptions, args.random, args.seed,
                    rep)
    except stopping.Stop as e:
        print(_counts(rep, args), flush=True)
        sys.stderr.write(f"x86shadow: {e.message or 'interrupted'} (after {rep.interleavings} "
                         "interleavings)\n")
        return e.status
    if rep.violation is not None:
        print("\n".join(format_counterexample(rep.violation)))
    print(_counts(rep, args))
    print(f"time: {rep.seconds:.3f} s", flush=True)
    return EXIT_VIOLATION if rep.violation is not None else EXIT_NONE


def _counts(rep, args) -> str:
    rand = f" + {rep.random} random (seed {args.seed})" if rep.random else ""
    found = "1 violation" if rep.violation is not None else "no violation"
    return (f"explored {rep.interleavings - rep.random} interleavings with at most "
            f"{args.preemptions} preemptions{rand} ({rep.states} states): {found}")


def _backlog(args) -> int:
    from .cli import UsageError
    from .explore_backlog import BOUND, DELAYS, LIMIT, ZAPS, backlog_table, format_table
    if args.broken or args.random:
        raise UsageError("--broken and --random are options of a scenario, not of the backlog "
                         "report")
    zaps = ZAPS if args.zaps is None else args.zaps
    if zaps < 1 or zaps > 100000:
        raise UsageError("--zaps must be between 1 and 100000")
    delays = DELAYS if args.delays is None else _parse_delays(args.delays)
    table = backlog_table(delays, zaps)
    print(f"{zaps} shadow pages zapped one at a time by vcpu1 while a lockless reader stays D "
          f"steps in its read side, leaves and comes back (rcu-rate-limit: {LIMIT} per grace "
          f"period; rcu-sync: bound {BOUND})")
    print()
    print("\n".join(format_table(table, "peak", "peak deferred pages (zapped, waiting for a "
                                                 "grace period):")))
    print()
    print("\n".join(format_table(table, "stalled", "rounds the zapper waited (hang: for ever, "
                                                    "the reader stays until the load is done):")))
    print()
    print("\n".join(format_table(table, "grace_periods", "grace periods ended:")))
    return EXIT_NONE
