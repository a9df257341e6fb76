"""Hypothesis strategies for the differential fuzzer: a random page-table program (ptprog) and
the host events under it, as a function of hypothesis's drawn data, so that hypothesis can shrink
a failing program (fewer operations, simpler entries, no host events).

ptprog's generators take any object with random.Random's ``random``, ``choice``, ``randrange``
and ``getrandbits``; ``DrawnRandom`` answers each call with a hypothesis draw. The operations are
drawn as a hypothesis list, so that shrinking can delete any of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from .ptprog import Layout, Spec, random_op, random_tables

# host operations drawn for the shadow runs (docs/HOST_MEMORY.md): each "OP:N" acts every N exits
HOST_OPS = ("swap", "migrate", "ksm", "reclaim", "age", "lru")
MAX_OPS = 20


class DrawnRandom:
    """The part of random.Random ptprog uses, each value drawn from hypothesis (a draw of a
    composite strategy, or ``data.draw``). Values shrink towards 0 and the first choice."""

    def __init__(self, draw):
        self.draw = draw

    def random(self) -> float:
        return self.draw(st.integers(0, 1023)) / 1024

    def choice(self, seq):
        return self.draw(st.sampled_from(seq))

    def randrange(self, start, stop=None):
        if stop is None:
            start, stop = 0, start
        return self.draw(st.integers(start, stop - 1))

    def getrandbits(self, k: int) -> int:
        return self.draw(st.integers(0, (1 << k) - 1))


@dataclass
class FuzzCase:
    """One generated example: the program and the host events of its shadow runs."""
    spec: Spec
    host: str | None = None          # a --host schedule ("swap:3,ksm:7"), None: no host memory
    host_seed: int = 0


def _ops(lay: Layout, nxe: bool, win_ptes, pt3):
    @st.composite
    def op(draw):
        return random_op(DrawnRandom(draw), lay, nxe, win_ptes, pt3)
    return op()


def host_schedules():
    """None (no host memory; what shrinking goes to) or 1..3 host operations every 1..40 exits."""
    rule = st.tuples(st.sampled_from(HOST_OPS), st.integers(1, 40))
    return st.one_of(st.none(), st.lists(rule, min_size=1, max_size=3, unique_by=lambda r: r[0])
                     .map(lambda rules: ",".join(f"{op}:{n}" for op, n in rules)))


@st.composite
def fuzz_cases(draw, mode: str, host: bool = True, max_ops: int = MAX_OPS):
    """A FuzzCase for ``mode``; ``host``: draw host events for the shadow runs too."""
    spec = random_tables(DrawnRandom(draw), mode)
    spec.ops = draw(st.lists(_ops(Layout(mode), spec.nxe, spec.win_ptes, spec.pt3), min_size=1,
                             max_size=max_ops))
    schedule = draw(host_schedules()) if host else None
    seed = draw(st.integers(0, 2 ** 16)) if schedule else 0
    return FuzzCase(spec, schedule, seed)
