"""``x86shadow explore backlog``: the numbers behind Marcelo Tosatti's "This is unbounded"
(docs/EXPLORE.md). The same zap load -- one vCPU zapping shadow pages one after another, each
through the real prepare_zap_page / commit_zap_steps -- runs against a lockless reader that
stays in its read side for D steps, leaves, and comes straight back, under each freeing scheme
(mmu/lockless.py). The reader is the walker each scheme protects: a vCPU walk for ``irq`` and
``rcu-readers`` (3.1-3.5 had no other), the dirty-log walk outside vCPU context for the
``rcu-*`` schemes of 2013. A round-robin schedule, one step per actor per round; the grace-
period machinery steps whenever it can. Measured: the peak of zapped pages waiting for a
grace period (memory held), and the rounds the zapper could not run (its latency: the bounded
schemes pay for their bound there, and ``irq`` waits for the walker's IPI acknowledgement).
"""
from __future__ import annotations

from . import paging as pg
from .counters import new_counters
from .explore_scenarios import ACC_ALL, RAM, TABLES, TABLES_END, zap_steps
from .guesttables import GuestTables
from .memory.ram import PhysMem
from .mmu.lockless import SCHEMES, Lockless
from .mmu.vm_mmu import VmMmu
from .steps import Step

DELAYS = (1, 4, 16, 64, None)          # None: the reader stays for the whole load
ZAPS = 256
LIMIT, BOUND = 8, 16


def _reader(lk, vcpu, delay, done):
    while not done():
        yield Step("reader: begin")
        if vcpu is not None:
            lk.walk_begin(vcpu)
        else:
            lk.outside_begin("dirty-log")
        n = 0
        while (delay is None or n < delay) and not done():
            yield Step("reader: in its read side")
            n += 1
        yield Step("reader: end")
        if vcpu is not None:
            lk.walk_end(vcpu)
        else:
            lk.outside_end("dirty-log")


def run_load(scheme: str, delay, zaps: int = ZAPS, limit: int = LIMIT, bound: int = BOUND):
    """One cell: {"peak": pages, "stalled": rounds (or "hang": the zapper waits for ever for a
    reader that stays), "grace_periods": n, "deferred": pages, "zapped": pages, "hang": bool}."""
    counters = new_counters()
    vm = VmMmu(PhysMem(bytearray(RAM)), counters, max_pages=zaps + 16)
    lk = vm.lockless = Lockless(vm, scheme, limit=limit, bound=bound)
    t = GuestTables(pg.Mode.LONG, vm.mem, TABLES, TABLES_END)
    v0 = vm.add_vcpu()
    vm.add_vcpu()                      # vcpu1: the zapper
    ctx = t.ctx()
    pages = [vm.get_page(ctx, i, 0, 1, True, ACC_ALL) for i in range(zaps)]
    zapper = zap_steps(vm, pages, "vcpu1 zap")
    finished = [False]
    vcpu_reader = scheme in ("irq", "rcu-readers")
    reader = _reader(lk, v0 if vcpu_reader else None, delay, lambda: finished[0])
    rcu = lk.rcu.steps()
    actors = {"reader": [reader, next(reader)], "zapper": [zapper, next(zapper)],
              "rcu": [rcu, next(rcu)]}
    stalled = 0
    hang = False
    idle = 0                  # rounds in which neither the zapper nor the grace periods moved
    for _ in range(100 * zaps * (2 + (delay or 64))):
        moved = False
        for name in ("reader", "zapper", "rcu"):
            gen_step = actors.get(name)
            if gen_step is None:
                continue
            gen, step = gen_step
            if not step.can_run():
                if name == "zapper":
                    stalled += 1
                continue
            moved = moved or name != "reader"
            try:
                gen_step[1] = gen.send(None)
            except StopIteration:
                del actors[name]
                if name == "zapper":
                    finished[0] = True
        if "reader" not in actors and "zapper" not in actors and not lk.rcu.can_advance():
            break
        idle = 0 if moved or "zapper" not in actors else idle + 1
        if idle > 3 and delay is None:
            hang = True           # the zapper waits for a reader that stays until it is done
            break
    else:
        raise RuntimeError(f"backlog load {scheme} delay {delay} did not finish")
    return {"peak": lk.peak_backlog, "stalled": "hang" if hang else stalled,
            "grace_periods": lk.rcu.completed, "deferred": counters["mmu_deferred_free"],
            "zapped": counters["mmu_shadow_zapped"], "hang": hang}


def backlog_table(delays=DELAYS, zaps: int = ZAPS, limit: int = LIMIT, bound: int = BOUND):
    """{scheme: {delay: run_load(...)}} for every scheme."""
    return {s: {d: run_load(s, d, zaps, limit, bound) for d in delays} for s in SCHEMES}


def format_table(table, key: str, title: str) -> list:
    delays = list(next(iter(table.values())))
    head = ["scheme"] + [("D=inf" if d is None else f"D={d}") for d in delays]
    rows = [[s] + [str(cells[d][key]) for d in delays] for s, cells in table.items()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def fmt(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":")
                         for i, w in enumerate(widths)) + "|"
    return [title, "", fmt(head), sep] + [fmt(r) for r in rows]
