"""The trace accounts for every exit: one kvm_exit per counted exit, in every guestcode program,
mode and MMU; every event has a sequence number; our own events carry our prefix."""
import pathlib

import pytest

from x86shadow import events as ev
from x86shadow.asm import assemble_firmware, assemble_program, program_modes
from x86shadow.machine import Machine

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAMS = sorted((ROOT / "guestcode").glob("*.asm"))


def traced_run(path, mode, mmu, policy="kvm"):
    records = []
    trace = ev.JsonTrace(type("Sink", (), {"write": lambda self, s: records.append(s)})())
    program = assemble_program(str(path), mode, 128 << 20)
    m = Machine(mode, mmu=mmu, policy=policy, trace=trace)
    m.load(program, assemble_firmware(mode, 128 << 20))
    m.run()
    import json
    return [json.loads(r) for r in records], m.counters


@pytest.mark.parametrize("mmu", ["shadow", "native"])
@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_one_kvm_exit_per_exit(path, mmu):
    for mode in program_modes(path):
        events, c = traced_run(path, mode, mmu)
        exits = [e for e in events if e["event"] == "kvm_exit"]
        assert len(exits) == c["exits"], (mode, len(exits), c["exits"])
        # entries and exits alternate: the guest enters first, the run ends at an exit
        flow = [e["event"] for e in events if e["event"] in ("kvm_entry", "kvm_exit")]
        assert flow == ["kvm_entry", "kvm_exit"] * c["exits"]
        assert {e["vcpu_id"] for e in events if e["event"] == "kvm_entry"} == {0}
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        pios = [e for e in events if e["event"] == "kvm_pio"]
        assert len(pios) == c["io_exits"]
        injected = [e for e in events if e["event"] == "kvm_inj_exception"]
        assert len(injected) == c["exception_injections"]
        assert c["irq_injections"] == 0                  # no interrupt source exists
        if mmu == "shadow":
            assert c["pf_taken"] == (c["pf_fixed"] + c["pf_guest"] + c["wp_faults"]
                                     + c["pf_retry"])
            assert all(e["rip"] is not None for e in exits)
            reasons = {e["reason"] for e in exits}
            assert reasons <= {"EXCEPTION_NMI", "IO_INSTRUCTION", "CR_ACCESS", "INVLPG",
                               "MSR_WRITE", "HLT"}
        for e in events:
            assert e["event"].startswith(("kvm_", "x86shadow_")), e["event"]


def test_our_events_are_prefixed_and_kvm_names_are_kvm_tracepoints():
    ours = {k for k in ev.TRACEPOINTS if not k.startswith("kvm_")}
    assert ours and all(k.startswith("x86shadow_") for k in ours)
    assert {k for k in ev.TRACEPOINTS if k.startswith("kvm_")} == {
        "kvm_exit", "kvm_entry", "kvm_pio", "kvm_mmio", "kvm_cr", "kvm_emulate_insn", "kvm_page_fault",
        "kvm_mmu_get_page", "kvm_mmu_prepare_zap_page", "kvm_mmu_unsync_page", "kvm_mmu_sync_page",
        "kvm_inj_exception", "kvm_unmap_hva_range", "kvm_age_hva"}


def test_instruction_count_in_every_event_when_counted():
    import json
    records = []
    trace = ev.JsonTrace(type("Sink", (), {"write": lambda self, s: records.append(s)})())
    path = ROOT / "guestcode" / "hello.asm"
    m = Machine("pae", trace=trace)
    m.load(assemble_program(str(path), "pae", 128 << 20), assemble_firmware("pae", 128 << 20))
    m.run(max_insns=10 ** 9)
    events = [json.loads(r) for r in records]
    # everything from the first instruction on carries the count (the boot state is loaded
    # before the guest runs)
    first = next(i for i, e in enumerate(events) if e["event"] == "kvm_exit")
    counts = [e["insns"] for e in events[first:]]
    assert counts == sorted(counts) and 0 < counts[-1] <= m.counters["guest_insns"]
    # the (lazily written) entry carries the count of the exit it follows; the first, 0
    entries = [e for e in events if e["event"] == "kvm_entry"]
    assert entries[0]["insns"] == 0
    last_exit = {"insns": 0}
    for before, entry in zip(events, events[1:]):
        if entry["event"] == "kvm_entry":
            assert entry["insns"] == last_exit["insns"]
        if before["event"] == "kvm_exit":
            last_exit = before


def test_a_machine_without_a_trace_is_not_tracing():
    """Observers (markers, the audit) never turn tracing on: the exits' trace records would cost
    a register read each (found by the bench: +4 us per shadow fault)."""
    m = Machine("pae", audit=True)
    assert not m.events.tracing
