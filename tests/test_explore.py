"""The interleaving explorer and the lockless freeing schemes (docs/EXPLORE.md), sans CPU: the
grace-period model, each scheme's freeing, the explorer's enumeration and counts, every scenario
correct (no violation) and broken (a violation, printed step by step), determinism, the CLI."""
import pytest

from x86shadow import paging as pg
from x86shadow.cli import main
from x86shadow.mmu.audit import AuditError, audit
from x86shadow.counters import new_counters
from x86shadow.explore import Actor, World, explore, format_counterexample, run_schedule
from x86shadow.explore_backlog import run_load
from x86shadow.explore_scenarios import ACC_ALL, SCENARIOS, VA, SmallVm
from x86shadow.guesttables import GuestTables
from x86shadow.memory.ram import PhysMem
from x86shadow.mmu.lockless import (READING_SHADOW_PAGE_TABLES, FreedShadowPageAccess,
                                    Lockless, Rcu, spte_walk_steps)
from x86shadow.mmu.vm_mmu import VmMmu
from x86shadow.steps import Step, WouldBlock, run_steps

# what each broken variant must be caught for (a part of the violation message)
BROKEN_FINDS = {
    "c1-irq": "FreedShadowPageAccess: vcpu0 walk read",
    "c2-rcu-readers": "FreedShadowPageAccess: vcpu0 walk read",
    "c2-backlog": "deferred-free backlog 5 pages is over its bound 4 (rcu-always",
    "c3-reading-mode": "FreedShadowPageAccess: vcpu0 walk read",
    "dirty-log": "FreedShadowPageAccess: dirty-log read",
    "notifier-flush": "HostViolation: a host page was freed while a vCPU's TLB may still map it",
    "seq-recheck": "holds pfn 0x10 but gfn 0x10 is backed by host pfn None",
    "aging-rmap-lock": "RmapRace: rmap 0x10 changed while the ager held its lock bit",
}


# ---------------------------------------------------------------------- the grace-period model
def test_grace_period_waits_for_readers_present_at_its_start_only():
    rcu = Rcu()
    freed = []
    rcu.read_lock("old")
    rcu.call_rcu(lambda: freed.append(1))
    assert rcu.advance() == "start"
    rcu.read_lock("new")                     # arrived after the start: does not delay it
    assert not rcu.can_advance() and rcu.advance() is None and freed == []
    rcu.read_unlock("old")
    assert rcu.can_advance() and rcu.advance() == "end"
    assert freed == [1] and rcu.completed == 1
    assert not rcu.can_advance()             # nothing queued: idle, though "new" still reads


def test_a_long_reader_delays_every_later_callback():
    rcu = Rcu()
    freed = []
    rcu.read_lock("long")
    for i in range(3):
        rcu.call_rcu(lambda i=i: freed.append(i))
    rcu.advance()
    rcu.call_rcu(lambda: freed.append(3))    # queued for the next grace period
    for _ in range(5):
        rcu.advance()
    assert freed == [] and rcu.completed == 0
    rcu.read_unlock("long")
    rcu.advance()                            # end of the first: its three callbacks
    assert freed == [0, 1, 2]
    rcu.advance(), rcu.advance()             # start and end of the second
    assert freed == [0, 1, 2, 3] and rcu.completed == 2


def test_synchronize_rcu_needs_a_grace_period_that_starts_after_it():
    rcu = Rcu()
    rcu.read_lock("r")
    rcu.call_rcu(lambda: None)
    rcu.advance()                            # a grace period in progress, waiting for r
    gen = rcu.synchronize_steps("sync")
    step = next(gen)
    assert not step.can_run()
    rcu.read_unlock("r")
    rcu.advance()                            # the old one ends: not enough
    assert rcu.completed == 1 and not step.can_run()
    rcu.advance(), rcu.advance()             # one started after the call, and ended
    assert step.can_run()
    with pytest.raises(WouldBlock):
        run_steps(Rcu().synchronize_steps("alone"))


# ---------------------------------------------------------------------- the freeing schemes
def _zap(vm, sp):
    vm.prepare_zap_page(sp, reason="test")
    return vm.commit_zap_steps("test")


def _drive(gen):
    """Run a stepped actor until it ends or waits; (ended, the step it waits at)."""
    try:
        step = next(gen)
        while step.can_run():
            step = gen.send(None)
        return False, step
    except StopIteration:
        return True, None


def test_irq_the_free_waits_for_the_walkers_ipi_acknowledgement():
    g = SmallVm(scheme="irq")
    v0 = g.vcpus[0]
    leaf = g.leaf_page(v0)
    lk = g.vm.lockless
    lk.walk_begin(v0)
    assert lk.vcpu_mode(v0) == READING_SHADOW_PAGE_TABLES
    commit = _zap(g.vm, leaf)
    ended, waiting = _drive(commit)
    assert not ended and "IPIs acknowledged by vcpu0" in waiting.label and not leaf.freed
    lk.walk_end(v0)                          # interrupts back on: the IPI is acknowledged
    assert run_steps_from(commit, waiting) is None
    assert leaf.freed and lk.backlog == 0 and g.counters["mmu_deferred_free"] == 0


def run_steps_from(gen, step):
    while True:
        assert step.can_run()
        try:
            step = gen.send(None)
        except StopIteration as stop:
            return stop.value


def test_irq_without_walkers_frees_at_once_through_the_plain_commit():
    g = SmallVm(scheme="irq")
    leaf = g.leaf_page(g.vcpus[0])
    g.vm.zap_page(leaf)
    assert leaf.freed and not g.vm.invalid_list


@pytest.mark.parametrize("reader", [False, True])
def test_rcu_readers_defers_only_while_a_reader_is_active(reader):
    g = SmallVm(scheme="rcu-readers")
    v0 = g.vcpus[0]
    leaf = g.leaf_page(v0)
    lk = g.vm.lockless
    if reader:
        lk.walk_begin(v0)
    run_steps(_zap(g.vm, leaf))              # the 3.4 flush waits for nobody
    assert leaf.freed is not reader
    assert lk.backlog == int(reader) and g.counters["mmu_deferred_free"] == int(reader)
    if reader:
        lk.walk_end(v0)
        lk.rcu.advance(), lk.rcu.advance()
        assert leaf.freed and lk.backlog == 0 and g.counters["rcu_grace_periods"] == 1


def test_rcu_always_defers_every_free_while_a_walker_outside_vcpu_context_may_run():
    g = SmallVm(scheme="rcu-always")
    vm, lk = g.vm, g.vm.lockless
    ctx = g.vcpus[0].ctx
    pages = [vm.get_page(ctx, 0x20 + i, 0, 1, True, ACC_ALL) for i in range(5)]
    lk.outside_begin("dirty-log")
    for sp in pages:
        run_steps(_zap(vm, sp))
    assert lk.backlog == 5 and lk.peak_backlog == 5 and not any(sp.freed for sp in pages)
    lk.outside_end("dirty-log")
    late = vm.get_page(ctx, 0x40, 0, 1, True, ACC_ALL)
    run_steps(_zap(vm, late))                # the flag is clear: freed at once
    assert late.freed and lk.backlog == 5
    lk.rcu.advance(), lk.rcu.advance()
    assert lk.backlog == 0 and all(sp.freed for sp in pages)


@pytest.mark.parametrize("scheme,bound", [("rcu-rate-limit", 2 * 3), ("rcu-sync", 5),
                                          ("rcu-always", None), ("rcu-readers", None)])
def test_bounded_schemes_keep_the_backlog_under_their_bound(scheme, bound):
    # a reader that delays grace periods (64 steps in its read side, then back) under 200 zaps
    r = run_load(scheme, 64, zaps=200, limit=3, bound=5)
    lk_bound = Lockless(VmMmu(PhysMem(bytearray(1 << 20))), scheme, limit=3,
                        bound=5).backlog_bound()
    assert lk_bound == bound
    if bound is None:
        assert r["peak"] > 20                # unbounded: grows with the zaps per grace period
    else:
        assert 0 < r["peak"] <= bound and r["stalled"] > 0
    assert r["zapped"] == 200 and not r["hang"]


def test_a_reader_that_never_leaves_grows_rcu_always_without_bound_and_hangs_the_bounded():
    assert run_load("rcu-always", None, zaps=50)["peak"] == 50
    assert run_load("rcu-always", None, zaps=120)["peak"] == 120
    for scheme in ("irq", "rcu-sync"):
        r = run_load(scheme, None, zaps=50)
        assert r["hang"] and r["zapped"] < 50 and r["peak"] <= 16


def test_lockless_read_of_a_freed_page_raises():
    g = SmallVm(scheme="irq")
    v0 = g.vcpus[0]
    leaf = g.leaf_page(v0)
    assert run_steps(spte_walk_steps(v0, VA)) & 1          # present leaf spte
    g.vm.zap_page(leaf)
    with pytest.raises(FreedShadowPageAccess):
        Lockless.read_spte(leaf, 0, "test")


def test_bad_scheme_and_break_names():
    vm = VmMmu(PhysMem(bytearray(1 << 20)), new_counters())
    with pytest.raises(ValueError, match="unknown lockless scheme"):
        Lockless(vm, "rcu-sometimes")
    with pytest.raises(ValueError, match="unknown break"):
        Lockless(vm, "irq", breaks=("free-whenever",))


# ---------------------------------------------------------------------- the explorer
def _counter_actor(log, name, n):
    for i in range(n):
        yield Step(f"{name}{i}")
        log.append(f"{name}{i}")


def _two_actors():
    log = []
    return World([Actor("a", _counter_actor(log, "a", 2)), Actor("b", _counter_actor(log, "b", 2))])


@pytest.mark.parametrize("k,expected", [(0, 2), (1, 4), (2, 6), (3, 6)])
def test_preemption_bounded_enumeration_counts(k, expected):
    # two actors of 2 steps: C(4, 2) = 6 orders. Preemptions (a switch away from an actor that
    # could go on; the first choice and a switch after an actor ended are free): aabb 0, bbaa
    # 0, abba 1, baab 1, abab 2, baba 2
    rep = explore(_two_actors, preemptions=k)
    assert rep.interleavings == expected and rep.violation is None


def test_every_interleaving_is_run_once():
    seen = []

    def build():
        log = []
        seen.append(log)
        return World([Actor("a", _counter_actor(log, "a", 2)),
                      Actor("b", _counter_actor(log, "b", 2))])
    rep = explore(build, preemptions=5)
    orders = [tuple(log) for log in seen]
    assert len(orders) == len(set(orders)) == rep.interleavings == 6


def test_states_are_the_nodes_of_the_schedule_tree():
    # 2 actors x 2 steps: the tree of all 6 orders has 4 + 3 + 2 + 2 + ... nodes: count them
    def nodes(prefix_a, prefix_b):
        if prefix_a == 2 and prefix_b == 2:
            return 0
        return (1 + nodes(prefix_a + 1, prefix_b) if prefix_a < 2 else 0) + \
               (1 + nodes(prefix_a, prefix_b + 1) if prefix_b < 2 else 0)
    assert explore(_two_actors, preemptions=5).states == nodes(0, 0)


def test_a_deadlock_is_a_violation():
    def waiter():
        yield Step("wait for nothing", ready=lambda: False)
    out = run_schedule(lambda: World([Actor("w", waiter())]))
    assert out.violation == "deadlock: w waits for: wait for nothing"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_correct_has_no_violation_within_the_default_bound(name):
    rep = explore(lambda: SCENARIOS[name].build(False), preemptions=2)
    assert rep.violation is None, "\n".join(format_counterexample(rep.violation))
    assert rep.interleavings > 1 and rep.states > rep.interleavings


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_broken_is_caught_within_the_default_bound(name):
    rep = explore(lambda: SCENARIOS[name].build(True), preemptions=2)
    assert rep.violation is not None
    assert BROKEN_FINDS[name] in rep.violation.violation
    lines = format_counterexample(rep.violation)
    assert lines[0].startswith("counterexample") and lines[1].startswith("  ")
    assert len(lines) == len(rep.violation.trace) + 2


def test_the_race_needs_a_preemption():
    build = lambda: SCENARIOS["seq-recheck"].build(True)        # noqa: E731
    assert explore(build, preemptions=0).violation is None
    assert explore(build, preemptions=1).violation is not None


def test_random_schedules_are_seeded():
    build = lambda: SCENARIOS["c1-irq"].build(True)             # noqa: E731
    a = explore(build, preemptions=0, random_runs=30, seed=7)
    b = explore(build, preemptions=0, random_runs=30, seed=7)
    assert a.violation is not None and a.random >= 1
    assert a.violation.trace == b.violation.trace and a.interleavings == b.interleavings


# ---------------------------------------------------------------------- the command
def _run(capsys, *argv):
    status = main(["explore", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_list(capsys):
    status, out, _ = _run(capsys, "--list")
    assert status == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == list(SCENARIOS) + ["backlog"]
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines())


def test_cli_exit_status_and_determinism(capsys):
    status, out, _ = _run(capsys, "c1-irq")
    assert status == 0
    assert "explored 38 interleavings with at most 2 preemptions (251 states): no violation" in out
    status, out1, _ = _run(capsys, "c1-irq", "--broken")
    assert status == 6
    assert "counterexample (step: actor: what it did):" in out1
    assert "   8. vcpu1-zap: vcpu1 zap: free 1 page(s) at once (before the flush)" in out1
    assert "  10. vcpu0-walk: vcpu0 walk: read <sp#3" in out1
    assert "violation after step 10: FreedShadowPageAccess" in out1
    status, out2, _ = _run(capsys, "c1-irq", "--broken")

    def strip(text):
        return [line for line in text.splitlines() if not line.startswith("time: ")]
    assert strip(out1) == strip(out2)


def test_cli_random(capsys):
    status, out, _ = _run(capsys, "c3-reading-mode", "--preemptions", "0", "--random", "5",
                          "--seed", "3")
    assert status == 0
    assert "explored 2 interleavings with at most 0 preemptions + 5 random (seed 3)" in out


@pytest.mark.parametrize("argv,msg", [
    (["nope"], "unknown scenario 'nope'"),
    ([], "explore needs a SCENARIO"),
    (["c1-irq", "--preemptions", "-1"], "--preemptions must be 0 or more"),
    (["backlog", "--delays", "0"], "--delays: '0' is not a positive number"),
    (["backlog", "--broken"], "--broken and --random are options of a scenario"),
    (["c1-irq", "--zaps", "3"], "--zaps and --delays are options of 'explore backlog'"),
])
def test_cli_bad_input(capsys, argv, msg):
    status, out, err = _run(capsys, *argv)
    assert status == 2 and err.startswith("x86shadow: error: ") and msg in err
    assert "Traceback" not in err


def test_cli_backlog(capsys):
    status, out, _ = _run(capsys, "backlog", "--zaps", "40", "--delays", "1,inf")
    assert status == 0
    lines = out.splitlines()
    peak = lines[lines.index("peak deferred pages (zapped, waiting for a grace period):") + 4:][:5]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:4]] for r in peak}
    assert rows["irq"] == ["0", "0"] and rows["rcu-always"][1] == "40"
    assert int(rows["rcu-sync"][1]) <= 16


def test_guest_tables_for_the_scenarios_are_4_level():
    t = GuestTables(pg.Mode.LONG, PhysMem(bytearray(1 << 20)), 0x80000, 0xC0000)
    assert t.ctx().mode == pg.Mode.LONG


@pytest.mark.parametrize("scheme", ["rcu-rate-limit", "rcu-sync"])
def test_a_large_batch_keeps_the_bound(scheme):
    """One commit of 10 pages (a root zapped with its children) while a dirty-log walker may
    run: handed to call_rcu in chunks, waiting for grace periods in between."""
    g = SmallVm(scheme=scheme)
    vm, lk = g.vm, g.vm.lockless
    lk.limit, lk.bound = 2, 4
    ctx = g.vcpus[0].ctx
    pages = [vm.get_page(ctx, 0x20 + i, 0, 1, True, ACC_ALL) for i in range(10)]
    lk.outside_begin("dirty-log")
    for sp in pages:
        vm.prepare_zap_page(sp, reason="test")
    commit = vm.commit_zap_steps("test")
    rcu = lk.rcu.steps()
    rcu_step = next(rcu)
    ended, waiting = _drive(commit)
    assert not ended and lk.backlog <= lk.backlog_bound()
    lk.outside_end("dirty-log")              # the walker leaves: grace periods can end
    for _ in range(100):
        if rcu_step.can_run():
            rcu_step = rcu.send(None)
        if not ended and waiting.can_run():
            try:
                waiting = commit.send(None)
            except StopIteration:
                ended = True
        assert lk.backlog <= lk.backlog_bound()
        audit(vm)
    assert ended and lk.backlog == 0 and all(sp.freed for sp in pages)


def test_audit_checks_the_lockless_bookkeeping():
    g = SmallVm(scheme="rcu-readers")
    v0 = g.vcpus[0]
    lk = g.vm.lockless
    lk.walk_begin(v0)
    run_steps(_zap(g.vm, g.leaf_page(v0)))
    audit(g.vm)                              # one page waiting, one reader: consistent
    lk.deferred[0].freed = True
    with pytest.raises(AuditError, match="waits for a grace period but is freed"):
        audit(g.vm)
    lk.deferred[0].freed = False
    lk.reader_counter += 1
    with pytest.raises(AuditError, match="reader_counter 2 but 1 RCU readers"):
        audit(g.vm)


def test_ctrl_c_keeps_the_counts(capsys, monkeypatch):
    from x86shadow import stopping
    from x86shadow.explore_scenarios import Scenario
    real = SCENARIOS["c1-irq"]
    calls = [0]

    def build(broken):
        calls[0] += 1
        if calls[0] == 4:
            raise stopping.Stop(130, "interrupted")
        return real.build(broken)
    monkeypatch.setitem(SCENARIOS, "c1-irq", Scenario("c1-irq", real.description, real.correct,
                                                      real.broken, build))
    status, out, err = _run(capsys, "c1-irq")
    assert status == 130
    assert "explored 3 interleavings with at most 2 preemptions" in out
    assert "x86shadow: interrupted (after 3 interleavings)" in err
