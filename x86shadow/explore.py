"""The interleaving explorer (docs/EXPLORE.md): actors -- stepped generators over the real MMU,
notifier, host and lockless code (x86shadow/steps.py) -- run in every order up to a number of
preemptions (or in seeded random orders), with the checks of the scenario after every step.

Exploration is stateless: each schedule runs the scenario again from its setup, forcing the
choices of a prefix and then running each actor as long as it can (no preemption). A schedule
is identified by its first choice that differs from that default, so every schedule within
the bound is run exactly once (the preemption bounding of Musuvathi and Qadeer's CHESS, PLDI
2007 / OSDI 2008): a *preemption* is a switch away from an actor that could have gone on;
switching when it ends or waits is free. The counts: *interleavings* (schedules run to their
end) and *states* (distinct schedule prefixes, i.e. nodes of the schedule tree).

Checks after every step: the scenario's own (``World.check``: no spte or TLB entry to a freed
host page, the deferred-free backlog within its bound), the audit (mmu/audit.py) whenever
mmu_lock is free, and any exception a step raises (a lockless read of a freed shadow page
raises ``FreedShadowPageAccess``; a host page freed while a TLB maps it ``HostViolation``). At
the end of a schedule, with the daemons (the grace-period machinery) run until idle, no page
may be left deferred, and an actor that can never run again is a deadlock.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .steps import Step
from .stopping import Stop


class Violation(Exception):
    """A check failed (the message says which)."""


@dataclass
class Actor:
    name: str
    gen: object
    daemon: bool = False          # runs while others do; its end is not awaited
    step: Step | None = None      # what it does when resumed next (None: ended)
    result: object = None

    def start(self) -> None:
        self._resume(first=True)

    def _resume(self, first=False) -> None:
        try:
            self.step = next(self.gen) if first else self.gen.send(None)
        except StopIteration as stop:
            self.step = None
            self.result = stop.value

    @property
    def alive(self) -> bool:
        return self.step is not None

    def can_run(self) -> bool:
        return self.step is not None and self.step.can_run()


@dataclass
class World:
    """One fresh run of a scenario: its actors and its checks."""
    actors: list
    check: object = None            # () -> None, raises Violation
    audit: object = None            # () -> None (mmu/audit.py over the VM), when mmu_lock is free
    lock_free: object = None        # () -> bool: mmu_lock is not held
    final: object = None            # () -> None, raises Violation: checks at the end


@dataclass
class Outcome:
    trace: list                     # [(actor name, step label)]
    choices: list                   # the actor index chosen at each step
    points: list                    # per step: (enabled indexes, current index, preemptions so far)
    violation: str | None = None


def run_schedule(build, prefix=(), rng=None) -> Outcome:
    """Run one schedule of the world ``build()`` makes: the choices of ``prefix`` first, then
    the default (go on with the current actor; else the first that can run) or, with ``rng``,
    a random actor among those that can run at every step."""
    world = build()
    actors = world.actors
    for a in actors:
        a.start()
    out = Outcome([], [], [])
    current = None
    preemptions = 0
    try:
        while any(a.alive and not a.daemon for a in actors):
            enabled = [i for i, a in enumerate(actors) if a.can_run()]
            if not enabled:
                waiting = "; ".join(f"{a.name} waits for: {a.step.label}"
                                    for a in actors if a.alive)
                raise Violation(f"deadlock: {waiting}")
            pos = len(out.choices)
            if pos < len(prefix):
                choice = prefix[pos]
            elif rng is not None:
                choice = rng.choice(enabled)
            elif current in enabled:
                choice = current
            else:
                choice = enabled[0]
            out.points.append((enabled, current, preemptions))
            if current in enabled and choice != current:
                preemptions += 1
            out.choices.append(choice)
            current = choice
            _step(world, actors[choice], out)
        # the daemons' remaining work (grace periods), in order, then the final checks
        for _ in range(1000):
            ready = [a for a in actors if a.daemon and a.can_run()]
            if not ready:
                break
            _step(world, ready[0], out)
        if world.final is not None:
            world.final()
    except Violation as v:
        out.violation = str(v)
    return out


def _step(world, actor, out) -> None:
    out.trace.append((actor.name, actor.step.label))
    try:
        actor._resume()
    except (Violation, Stop):
        raise                   # (Stop: Ctrl-C / SIGTERM, not a finding)
    except Exception as e:      # noqa: BLE001 - what the real code raised is the finding
        raise Violation(f"{type(e).__name__}: {e}") from None
    if world.check is not None:
        world.check()
    if world.audit is not None and (world.lock_free is None or world.lock_free()):
        try:
            world.audit()
        except AssertionError as e:
            raise Violation(f"audit: {e}") from None


@dataclass
class Report:
    interleavings: int = 0
    random: int = 0                 # of which seeded random schedules
    states: int = 0
    seconds: float = 0.0
    violation: Outcome | None = None


def explore(build, preemptions: int = 2, random_runs: int = 0, seed: int = 0,
            rep: Report | None = None) -> Report:
    """Every schedule of ``build`` with at most ``preemptions`` preemptions, depth first in a
    fixed order, then ``random_runs`` seeded random schedules; stops at the first violation.
    ``rep``: the Report to fill as it goes (a caller interrupted by Ctrl-C keeps the counts)."""
    t0 = time.perf_counter()
    rep = rep if rep is not None else Report()
    try:
        _explore(build, preemptions, random_runs, seed, rep)
    finally:
        rep.seconds = time.perf_counter() - t0
    return rep


def _explore(build, preemptions, random_runs, seed, rep) -> None:
    todo = [()]
    while todo:
        prefix = todo.pop()
        out = run_schedule(build, prefix)
        rep.interleavings += 1
        rep.states += len(out.choices) - max(0, len(prefix) - 1)
        if out.violation is not None:
            rep.violation = out
            break
        children = []
        for i in range(len(prefix), len(out.choices)):
            enabled, current, pre = out.points[i]
            for alt in enabled:
                if alt == out.choices[i]:
                    continue
                cost = pre + (1 if current in enabled and alt != current else 0)
                if cost <= preemptions:
                    children.append(tuple(out.choices[:i]) + (alt,))
        todo.extend(reversed(children))     # depth first, earliest deviation first
    if rep.violation is None and random_runs:
        rng = random.Random(seed)
        for _ in range(random_runs):
            out = run_schedule(build, rng=rng)
            rep.interleavings += 1
            rep.random += 1
            rep.states += len(out.choices)
            if out.violation is not None:
                rep.violation = out
                break


def format_counterexample(out: Outcome) -> list:
    """The interleaving step by step, and the violation."""
    lines = ["counterexample (step: actor: what it did):"]
    width = len(str(len(out.trace)))
    for n, (name, label) in enumerate(out.trace, 1):
        lines.append(f"  {n:>{width}}. {name}: {label}")
    lines.append(f"violation after step {len(out.trace)}: {out.violation}")
    return lines
