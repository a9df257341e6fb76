"""Out-of-sync shadow pages on and off, with the guest programs of guestcode/.

* Every program, in every mode it supports, under policy kvm with out-of-sync pages turned off
  (``unsync=False``, KVM's oos_shadow=0) and the audit on, leaves exactly what Unicorn's own MMU
  leaves: out-of-sync pages change the cost, never the result (test_guestcode.py covers the
  default, unsync on).
* fork_cow and many_procs write guest page tables a lot: with out-of-sync pages on, tables go out of
  sync and the writes that would have been trapped and emulated run natively instead. The tests
  compare the counters of the two runs of the same program and mode.
"""
import pathlib

import pytest

from x86shadow.asm import assemble_firmware, assemble_program, program_modes
from x86shadow.machine import Machine

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUESTCODE = ROOT / "guestcode"
PROGRAMS = sorted(GUESTCODE.glob("*.asm"))
MODES = ("32", "pae", "64")
RAM_MIB = 128


def run(path, mode, mmu, unsync=None):
    """One run: (result, console output, the program's image afterwards, counters)."""
    program = assemble_program(str(path), mode, RAM_MIB << 20)
    kwargs = {} if mmu == "native" else {"policy": "kvm", "unsync": unsync, "audit": True}
    m = Machine(mode, mmu=mmu, ram_mib=RAM_MIB, **kwargs)
    m.load(program, assemble_firmware(mode, RAM_MIB << 20))
    result = m.run()
    return result, bytes(m.output), m.read_phys(program.base, len(program.code)), dict(m.counters)


def cases():
    for path in PROGRAMS:
        for mode in MODES:
            yield pytest.param(path, mode, id=f"{path.stem}-{mode}")


@pytest.mark.parametrize("path,mode", list(cases()))
def test_unsync_off_matches_native(path, mode):
    if mode not in program_modes(path):
        pytest.skip(f"{path.name} does not support mode {mode}")
    n_res, n_out, n_data, _ = run(path, mode, "native")
    assert n_res.status == 0 and n_out.endswith(b"PASS\n"), f"native: {n_out!r}\n{n_res.report}"
    s_res, s_out, s_data, c = run(path, mode, "shadow", unsync=False)
    assert (s_res.status, s_out) == (n_res.status, n_out), f"{s_out!r}\n{s_res.report}"
    assert s_data == n_data, "program data differs between shadow (unsync off) and native MMU"
    assert c["mmu_unsync_events"] == 0 and c["mmu_sync_pages"] == 0


def on_and_off(name, mode):
    """The counters of the program under kvm with out-of-sync pages on and off (both must pass)."""
    path = GUESTCODE / f"{name}.asm"
    counters = {}
    for unsync in (True, False):
        res, out, _, c = run(path, mode, "shadow", unsync=unsync)
        assert res.status == 0 and out.endswith(b"PASS\n"), \
            f"unsync={unsync}: {out!r}\n{res.report}"
        counters[unsync] = c
    return counters[True], counters[False]


def assert_unsync_saves_emulation(on, off):
    # with them on, tables went out of sync (and were synced again at the flushes) ...
    assert on["mmu_unsync_events"] > 0 and on["mmu_sync_pages"] > 0
    assert off["mmu_unsync_events"] == 0 and off["mmu_sync_pages"] == 0
    # ... and fewer page-table writes were trapped and emulated than with them off
    assert off["insn_emulation"] > 0
    for name in ("insn_emulation", "wp_faults"):
        assert on[name] < off[name], (name, on[name], off[name])


@pytest.mark.parametrize("mode", MODES)
def test_fork_cow_unsync_emulates_fewer_pte_writes(mode):
    """The fork's write-protection of every parent pte (lock and / lock btr in place) and the COW
    handler's pte updates: trapped one by one with out-of-sync pages off, native once the table
    is out of sync."""
    on, off = on_and_off("fork_cow", mode)
    assert_unsync_saves_emulation(on, off)


@pytest.mark.parametrize("mode", MODES)
def test_many_procs_unsync_emulates_fewer_pte_writes(mode):
    """Private and shared leaf tables edited by every process in its turn: with out-of-sync pages
    on, each table traps once per flush interval (the write that unsyncs it) instead of once per
    write, and every root load resyncs what it reaches."""
    on, off = on_and_off("many_procs", mode)
    assert_unsync_saves_emulation(on, off)
