"""Stepped actors: code of the MMU, the host or a walker written as a generator that yields
between its atomic steps, so that the interleaving explorer (x86shadow/explore.py) can run
several of them in any order, and plain callers can run one to its end.

The protocol is "announce, then do": each ``yield`` hands out a ``Step`` naming the step the
generator will carry out when it is resumed, and ``ready`` (None: always) tells whether that
step can run now (a lock it takes is free, the IPIs it waits for were acknowledged, a grace
period it waits for has ended). A resumed generator runs exactly the announced step and then
announces the next one; returning ends the actor. Code before the first ``yield`` runs when the
actor is started (its setup, before any step is scheduled). Because the condition is known before the
step runs, an actor that cannot run is simply not chosen, and no step is an empty spin.
"""
from __future__ import annotations


class Step:
    """The next atomic step of an actor: ``label`` (what it will do) and ``ready`` (a callable
    saying whether it can run now; None: always)."""
    __slots__ = ("label", "ready")

    def __init__(self, label: str, ready=None):
        self.label = label
        self.ready = ready

    def can_run(self) -> bool:
        return self.ready is None or bool(self.ready())

    def __repr__(self):
        return f"Step({self.label!r})"


class WouldBlock(RuntimeError):
    """A stepped actor run on its own must wait for something no other actor will do."""


def run_steps(gen):
    """Run a stepped actor to its end with nothing interleaved; its return value. A step that
    is not ready can never become ready here: WouldBlock."""
    try:
        step = next(gen)
        while True:
            if not step.can_run():
                gen.close()
                raise WouldBlock(f"would wait forever for: {step.label} (nothing else runs)")
            step = gen.send(None)
    except StopIteration as stop:
        return stop.value
