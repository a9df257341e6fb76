"""The host's schedule: which host operation runs when, reproducible from a seed.

A schedule is a list of rules, written ``OP:N`` (every N exits), ``OP@POINT`` or ``OP@POINT:N``
(every Nth time the fault path reaches the named point), separated by commas -- and/or a script
(``parse_script``: ``EXIT OP [GFN]`` lines, an operation at a given exit on a given page):

* ``swap`` -- swap one guest page out (MADV_PAGEOUT-like: its A bits are not asked); it comes back
  on the next access;
* ``reclaim`` -- swap one page out as the LRU would: ``clear_flush_young`` first, a young page is
  kept;
* ``migrate`` -- move one guest page to another host page;
* ``ksm`` -- merge the guest pages of identical contents (of the pages the guest maps) into
  read-only KSM pages;
* ``age`` -- ``clear_young`` on one page (the answer is traced);
* ``lru`` -- one pass of the LRU-like reclaim (memory/reclaim.py: age the active list, check the
  inactive tail, evict old pages; SWAP_CLUSTER_MAX pages a pass).

Points: ``after_seq_snapshot`` and ``after_gfn_to_pfn`` (the shadow page fault, between its
notifier-sequence snapshot and gfn_to_pfn, and between gfn_to_pfn and mmu_lock), and
``pte_prefetch_after_gfn_to_pfn`` (the emulated pte write's prefetch, kvm-2008 policies).

The page an operation acts on is drawn from the seed among the guest pages the shadow MMU maps
(``target="mapped"``) or among those a vCPU's TLB may hold (``target="tlb"``: the pages the guest
is using right now). Operations that are due run at the next point where the vCPU can have its TLB
flushed (a TLB fill, an I/O or privileged-instruction exit, the run loop) -- not inside a trapped
store, where the CPU emulator cannot flush.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

OPS = ("swap", "reclaim", "migrate", "ksm", "age", "lru")
POINTS = ("after_seq_snapshot", "after_gfn_to_pfn", "pte_prefetch_after_gfn_to_pfn")
TARGETS = ("mapped", "tlb")


SCRIPT_OPS = ("swap", "reclaim", "migrate", "ksm", "age", "lru")


def parse_script(text: str, where: str = "--host-script") -> list:
    """A host script: one operation per line, ``EXIT OP [GFN]`` (run OP at the first point
    where the TLB can be flushed once EXIT exits have happened, on page GFN -- hex with 0x -- or
    on a page drawn from the seed); ``#`` starts a comment. -> [(exit, op, gfn or None)] in
    order; ValueError naming the line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3):
            raise ValueError(f"{where}:{n}: write EXIT OP [GFN], not {line.strip()!r}")
        try:
            at = int(words[0], 0)
            gfn = int(words[2], 0) if len(words) == 3 else None
        except ValueError:
            raise ValueError(f"{where}:{n}: EXIT and GFN are numbers: {line.strip()!r}") from None
        if words[1] not in SCRIPT_OPS:
            raise ValueError(f"{where}:{n}: unknown operation {words[1]!r} (choose from "
                             f"{', '.join(SCRIPT_OPS)})")
        if at < 0 or (gfn is not None and gfn < 0):
            raise ValueError(f"{where}:{n}: negative number in {line.strip()!r}")
        out.append((at, words[1], gfn))
    out.sort(key=lambda e: e[0])
    return out


@dataclass(frozen=True)
class Rule:
    op: str
    every: int             # every N exits, or every Nth time at the point
    point: str | None = None

    def __str__(self):
        return f"{self.op}@{self.point}:{self.every}" if self.point else f"{self.op}:{self.every}"


def parse_schedule(text: str) -> list:
    """``OP:N[,OP@POINT[:N]...]`` -> [Rule]; ValueError naming what is wrong."""
    rules = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        point = None
        if "@" in part:
            op, _, rest = part.partition("@")
            point, _, n = rest.partition(":")
            n = n or "1"
            if point not in POINTS:
                raise ValueError(f"--host {part!r}: unknown point {point!r} (choose from "
                                 f"{', '.join(POINTS)})")
        else:
            op, sep, n = part.partition(":")
            if not sep:
                raise ValueError(f"--host {part!r}: write OP:N (every N exits) or OP@POINT[:N]")
        if op not in OPS:
            raise ValueError(f"--host {part!r}: unknown operation {op!r} (choose from "
                             f"{', '.join(OPS)})")
        try:
            every = int(n, 0)
        except ValueError:
            raise ValueError(f"--host {part!r}: {n!r} is not a number") from None
        if every < 1:
            raise ValueError(f"--host {part!r}: N must be at least 1")
        rules.append(Rule(op, every, point))
    if not rules:
        raise ValueError("--host: no operation given")
    return rules


class HostSchedule:
    """Runs the host operations of ``rules`` on ``host`` (memory.host.HostMM) under ``vm``
    (the shadow MMU, whose rmap and vCPUs name the candidate pages)."""

    def __init__(self, host, vm, rules, seed: int = 0, target: str = "mapped", script=()):
        if target not in TARGETS:
            raise ValueError(f"unknown host target {target!r} (choose from {', '.join(TARGETS)})")
        self.host = host
        self.vm = vm
        self.rules = list(rules)
        self.rng = random.Random(seed)
        self.target = target
        self.next_due = {r: r.every for r in self.rules if r.point is None}
        self.point_hits = {r: 0 for r in self.rules if r.point is not None}
        self.script = list(script)  # [(exit, op, gfn)] still to run (parse_script), in order
        self.log = []              # [when, op, gfn, result] of every operation run
        self.running = False
        # () -> [gfn]: replaces the default choice of candidate pages (a benchmark narrowing the
        # operations to its working set, a test aiming at one page)
        self.pick = None
        if any(r.point for r in self.rules):
            vm.point = self.at_point

    # ------------------------------------------------------------------ when
    def tick(self) -> None:
        """A point where the vCPU's TLB can be flushed (a fill, an exit): run what is due by the
        exit count; pay a flush the broken-flush switch owes (at the point after the next)."""
        exits = self.vm.counters["exits"]
        notifier = self.vm.notifier
        notifier.ticks += 1
        if notifier.owed_flush and notifier.ticks > notifier.owed_tick + 1:
            notifier.pay_owed_flush()
        if self.running:
            return
        for rule, due in self.next_due.items():
            if exits >= due:
                self.next_due[rule] = exits + rule.every
                self.run(rule.op, f"exit {exits}")
        script = self.script
        while script and exits >= script[0][0]:
            _, op, gfn = script.pop(0)
            self.run(op, f"exit {exits} (script)", gfn)

    def at_point(self, name: str, vcpu) -> None:
        """The fault path reached point ``name``. A fault being retried after such a race is
        left alone (else a rule firing at every fault would race every retry forever)."""
        if self.running or vcpu.retrying:
            return
        for rule in self.point_hits:
            if rule.point == name:
                self.point_hits[rule] += 1
                if self.point_hits[rule] % rule.every == 0:
                    self.run(rule.op, f"{name} #{self.point_hits[rule]}, exit "
                             f"{self.vm.counters['exits']}")

    # ------------------------------------------------------------------ what
    def candidates(self):
        """Guest pages an operation may take: ``tlb``: those a vCPU's TLB may hold now;
        ``mapped``: those the shadow MMU maps, except the ones the guest used since the host's
        last flush (what its TLB may hold: they are at the head of the LRU -- and taking them at
        every exit could take an instruction's pages from it forever)."""
        vm = self.vm
        if self.pick is not None:
            return self.pick()
        in_tlb = self.in_tlb()
        if self.target == "tlb":
            return sorted(in_tlb)
        return [g for g in vm.rmap if g not in in_tlb]

    def in_tlb(self) -> set:
        """The gfns a vCPU's TLB may hold now (the pages the guest used since the last flush)."""
        vm = self.vm
        out = set()
        for v in vm.vcpus:
            for pfn in v.tlb_pfns or ():
                gfn = vm.pfn_to_gfn(pfn)
                if gfn is not None:
                    out.add(gfn)
        return out

    def run(self, op: str, when: str, gfn=None):
        """Run one operation now (on ``gfn``, or a page drawn from the seed)."""
        host = self.host
        vm = self.vm
        t0 = host._timing()
        self.running = True
        try:
            if op == "ksm":
                indexes = sorted({vm.memslots.gfn_to_index(g) for g in self.candidates()} - {None})
                self.log.append([when, op, None, "running"])
                result = host.ksm_merge(indexes)
            elif op == "lru":
                from .reclaim import lru_for
                self.log.append([when, op, None, "running"])
                # the pages the guest is using now are kept (at the head of the LRU), as
                # candidates() keeps them from the other operations: a pass at every exit that
                # evicted the page the exit just faulted in would livelock the guest
                keep = {vm.memslots.gfn_to_index(g) for g in self.in_tlb()} - {None}
                result = lru_for(host, vm).run_pass(keep=keep)
            else:
                if gfn is None:
                    cands = self.candidates()
                    if not cands:
                        self.log.append([when, op, None, "no page"])
                        return None
                    gfn = self.rng.choice(cands)
                self.log.append([when, op, gfn, "running"])
                index = vm.memslots.gfn_to_index(gfn)
                if op == "swap":
                    result = host.swap_out(index)
                elif op == "reclaim":
                    result = host.swap_out(index, honour_young=True)
                elif op == "migrate":
                    result = host.migrate(index)
                elif op == "age":
                    result = any(n.clear_young(host.hva(index), host.hva(index + 1))
                                 for n in host.notifiers)
                else:
                    raise ValueError(f"unknown host operation {op!r}")
            self.log[-1][3] = result
            host.pages.check_free_pages(recent_only=True)
            return result
        finally:
            self.running = False
            host._timed("schedule", t0)
