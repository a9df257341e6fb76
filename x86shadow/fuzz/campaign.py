"""A fuzzing campaign (``x86shadow fuzz``): shards of hypothesis examples, each a random
page-table program (fuzz/strategies.py) run under ``--mmu native`` and every policy config with
the audit on (fuzz/differential.py); a divergence is shrunk by hypothesis to a minimal program
and returned as a Failure, which ``save_failure`` writes as a runnable, replayable .asm file.

A campaign is split into shards of at most SHARD_EXAMPLES examples, each an independent
hypothesis run with its own seed derived from (campaign seed, mode, shard index): a shard is the
unit the executor (x86shadow/executor.py) runs, and a campaign's results do not depend on how
many jobs ran it.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from .differential import CONFIGS, check_source
from .ptprog import compared_frames, render

SHARD_EXAMPLES = 20
DEFAULT_SHRINK_RUNS = 150            # programs a shard runs while shrinking one failure (a
                                     # count, not a time: the result must not depend on load)
RUN_TIMEOUT_S = 5.0                  # watchdog per run (a program runs in ~0.02 s; a livelock
                                     # found while shrinking must not cost differential's 30 s)
HEADER = "# x86shadow-fuzz: "        # the replay header line of a saved program (JSON)
MODES = ("32", "pae", "64")


@dataclass(frozen=True)
class Shard:
    mode: str
    seed: int                        # the campaign's --seed
    index: int                       # shard number within the mode
    examples: int
    configs: tuple = tuple(CONFIGS)
    host_events: bool = True
    planted_bug: str | None = None   # test-only (mmu/vm_mmu.py PLANTED_BUGS)
    deadline: float | None = None    # time.time() after which no new example starts
    shrink_runs: int = DEFAULT_SHRINK_RUNS

    @property
    def hypothesis_seed(self) -> int:
        return (self.seed * 1_000_003 + MODES.index(self.mode)) * 100_003 + self.index


@dataclass
class Failure:
    """A divergence, shrunk: the minimal program and what it did."""
    mode: str
    seed: int
    shard: int
    source: str                      # the minimal program (x86shadow run FILE --mode MODE)
    divergences: list                # str(Divergence) of the minimal program
    configs: list                    # the policy configs the divergence showed under
    host: str | None                 # --host schedule of the shadow runs (None: none)
    host_seed: int
    planted_bug: str | None
    original_ops: int                # operations of the first failing example
    shrunk_ops: int                  # ... and of the minimal one
    original_lines: int
    shrunk_lines: int


@dataclass
class ShardResult:
    shard: Shard
    examples: int = 0                # examples generated (before a failure)
    runs: int = 0                    # programs run, shrinking included
    seconds: float = 0.0
    failure: Failure | None = None
    stopped_early: bool = False      # the deadline came before all examples ran
    notes: list = field(default_factory=list)


def host_config(schedule, seed):
    """The machine.HostConfig of a drawn host schedule (None: no host memory)."""
    if not schedule:
        return None
    from ..machine import HostConfig
    return HostConfig(schedule=schedule, seed=seed)


def divergences(source: str, mode: str, configs, host=None, host_seed=0, planted_bug=None):
    """Every difference of the shadow runs (``configs``) from the native run, as strings. The
    one place the fuzzer compares (fuzz/differential.py check_source)."""
    return [str(d) for d in check_source(source, mode, compared_frames(mode), policies=configs,
                                         host=host_config(host, host_seed),
                                         planted_bug=planted_bug, timeout=RUN_TIMEOUT_S)]


class _Divergent(Exception):
    pass


class _ShrinkBudgetSpent(BaseException):
    """Ends hypothesis's shrinking when the shard's budget of runs is spent (not an Exception:
    hypothesis lets it through at once instead of taking it for a failure; its own shrink
    passes over a long choice sequence would otherwise go on for minutes without a run)."""


class _ShardRun:
    """The property hypothesis runs for one shard, with what it saw."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.configs = list(shard.configs)
        self.cache = {}                     # (source, host, host seed) -> divergences
        self.first = None                   # (case, source) of the first failure
        self.last = None                    # (case, source, divergences) of the latest failure
        self.examples = 0
        self.runs = 0
        self.shrink_runs_left = None
        self.stopped_early = False

    def __call__(self, case):
        from hypothesis import assume
        sh = self.shard
        if self.first is None:
            if sh.deadline is not None and time.time() > sh.deadline:
                self.stopped_early = True
                assume(False)               # no new example after the deadline
            self.examples += 1
        source = render(case.spec)
        key = (source, case.host, case.host_seed)
        divs = self.cache.get(key)
        if divs is None:
            if self.shrink_runs_left is not None:
                if self.shrink_runs_left <= 0:
                    raise _ShrinkBudgetSpent    # the smallest failure so far is the result
                self.shrink_runs_left -= 1
            self.runs += 1
            divs = divergences(source, sh.mode, self.configs, case.host, case.host_seed,
                               sh.planted_bug)
            self.cache[key] = divs
        if not divs:
            return
        if self.first is None:
            self.first = (case, source)
            # shrink against the configs that diverged only (the others cost time, show nothing)
            self.configs = [c for c in self.configs if any(d.startswith(c + ":") for d in divs)]
            self.shrink_runs_left = sh.shrink_runs
        self.last = (case, source, divs)
        raise _Divergent(divs[0])


@contextmanager
def _seed_only_draws():
    """Make a shard's programs a function of its seed alone. hypothesis (6.1xx) mixes integer
    constants found in the "local" modules loaded in the process into its draws
    (``hypothesis.internal.conjecture.providers._get_local_constants``, about one draw in 20):
    the programs would then depend on what else the process imported -- an editable install
    against a wheel, pytest's collection, a worker's imports -- and a seeded shard would find
    different things on different machines. Only that private hook is replaced, for the
    duration of the shard; without it (another hypothesis), nothing changes."""
    try:
        from hypothesis.internal.conjecture import providers
        original = providers._get_local_constants
        empty = providers.Constants()
    except (ImportError, AttributeError):       # pragma: no cover - another hypothesis
        yield
        return
    providers._get_local_constants = lambda: empty
    try:
        yield
    finally:
        providers._get_local_constants = original


def run_shard(shard: Shard) -> ShardResult:
    """Run one shard: hypothesis generates up to ``shard.examples`` programs; on a divergence it
    shrinks the program; the result has the minimal one (executor job: module level)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
    from hypothesis.errors import Flaky, Unsatisfiable

    from .strategies import fuzz_cases

    t0 = time.perf_counter()
    prop = _ShardRun(shard)

    @seed(shard.hypothesis_seed)
    @settings(max_examples=shard.examples, database=None, deadline=None,
              phases=(Phase.generate, Phase.shrink), report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
              print_blob=False)
    @given(case=fuzz_cases(shard.mode, host=shard.host_events))
    def test(case):
        prop(case)

    result = ShardResult(shard)
    try:
        with _seed_only_draws():
            test()
    except (_Divergent, Flaky, _ShrinkBudgetSpent):
        pass
    except Unsatisfiable:                   # the deadline came before the first example
        pass
    result.examples, result.runs = prop.examples, prop.runs
    result.stopped_early = prop.stopped_early
    if prop.last is not None:
        case, source, divs = prop.last
        first_case, first_source = prop.first
        result.failure = Failure(
            mode=shard.mode, seed=shard.seed, shard=shard.index, source=source,
            divergences=divs, configs=prop.configs, host=case.host, host_seed=case.host_seed,
            planted_bug=shard.planted_bug, original_ops=len(first_case.spec.ops),
            shrunk_ops=len(case.spec.ops), original_lines=first_source.count("\n"),
            shrunk_lines=source.count("\n"))
    result.seconds = time.perf_counter() - t0
    return result


def shards(modes, count: int, seed: int, **kw) -> list:
    """The shards of a campaign of ``count`` examples per mode."""
    out = []
    for mode in modes:
        n, index = count, 0
        while n > 0:
            out.append(Shard(mode, seed, index, min(n, SHARD_EXAMPLES), **kw))
            n -= SHARD_EXAMPLES
            index += 1
    return out


# ------------------------------------------------------------------------------ saving, replay
def replay_header(f: Failure) -> dict:
    return {"mode": f.mode, "configs": f.configs, "host": f.host, "host_seed": f.host_seed,
            "planted_bug": f.planted_bug, "seed": f.seed, "shard": f.shard}


def failure_name(f: Failure) -> str:
    return f"fuzz-{f.mode}-seed{f.seed}-shard{f.shard}.asm"


def save_failure(directory: str, f: Failure) -> str:
    """Write the minimal program as DIR/fuzz-MODE-seedS-shardK.asm: the program's own header
    (``# x86shadow: modes=MODE``, so ``x86shadow run FILE --mode MODE`` runs it), then one
    ``# x86shadow-fuzz: {json}`` line (what ``fuzz --replay`` needs), then the divergences as
    comments. Returns the path."""
    os.makedirs(directory, exist_ok=True)
    first, rest = f.source.split("\n", 1)
    how = (f"# replay: x86shadow fuzz --replay FILE   (or: x86shadow run FILE --mode {f.mode}"
           f" --policy P --audit" + (f" --host {f.host} --host-seed {f.host_seed}" if f.host
                                     else "") + ")")
    lines = [first, HEADER + json.dumps(replay_header(f)), how,
             f"# shrunk from {f.original_ops} operations to {f.shrunk_ops}; divergences:"]
    lines += [f"#   {d}" for d in f.divergences]
    path = os.path.join(directory, failure_name(f))
    with open(path, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n" + rest)
    return path


class ReplayError(Exception):
    pass


def load_replay(path: str):
    """(source, header dict) of a saved program."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ReplayError(f"cannot read {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ReplayError(f"{path!r} is not text") from None
    for line in source.splitlines():
        if line.startswith(HEADER):
            try:
                header = json.loads(line[len(HEADER):])
            except json.JSONDecodeError as e:
                raise ReplayError(f"{path}: bad {HEADER.strip()} line: {e}") from None
            break
    else:
        raise ReplayError(f"{path}: no '{HEADER.strip()}' line: not a program saved by "
                          "x86shadow fuzz (run it with x86shadow run)")
    if header.get("mode") not in MODES:
        raise ReplayError(f"{path}: the header's mode {header.get('mode')!r} is not one of "
                          f"{', '.join(MODES)}")
    configs = header.get("configs")
    if not isinstance(configs, list) or not configs or any(c not in CONFIGS for c in configs):
        raise ReplayError(f"{path}: the header's configs {configs!r} are not policy configs "
                          f"({', '.join(CONFIGS)})")
    return source, header


def replay(path: str, configs=None):
    """Run a saved program again; returns (header, divergences)."""
    source, h = load_replay(path)
    return h, divergences(source, h["mode"], configs or h["configs"], h.get("host"),
                          h.get("host_seed", 0), h.get("planted_bug"))


def failure_record(f: Failure) -> dict:
    d = asdict(f)
    d.pop("source")
    return d
