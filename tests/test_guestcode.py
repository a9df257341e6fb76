"""Every program in guestcode/ in every mode it supports, under both MMUs and every policy:
it must PASS, and the shadow MMU must leave exactly what Unicorn's own MMU leaves (console output,
exit status, the program's data). The shadow runs have the audit on after every exit."""
import pathlib

import pytest

from x86shadow.asm import assemble_firmware, assemble_program, program_modes
from x86shadow.machine import Machine
from x86shadow.policies import POLICY_NAMES

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAMS = sorted(p for p in (ROOT / "guestcode").glob("*.asm"))
RAM_MIB = 128


def cases():
    for path in PROGRAMS:
        for mode in ("32", "pae", "64"):
            yield pytest.param(path, mode, id=f"{path.stem}-{mode}")


def run(path, mode, mmu, policy="kvm"):
    program = assemble_program(str(path), mode, RAM_MIB << 20)
    m = Machine(mode, mmu=mmu, policy=policy, ram_mib=RAM_MIB, audit=(mmu == "shadow"))
    m.load(program, assemble_firmware(mode, RAM_MIB << 20))
    result = m.run()
    data = m.read_phys(program.base, len(program.code))
    return result, bytes(m.output), data


def supported(path, mode):
    return mode in program_modes(path)


_native = {}


def native(path, mode):
    key = (path, mode)
    if key not in _native:
        _native[key] = run(path, mode, "native")
    return _native[key]


@pytest.mark.parametrize("path,mode", list(cases()))
def test_program_passes_and_matches_native(path, mode):
    if not supported(path, mode):
        pytest.skip(f"{path.name} does not support mode {mode}")
    n_res, n_out, n_data = native(path, mode)
    assert n_res.status == 0, f"native run failed: {n_out!r}\n{n_res.report}"
    assert n_out.endswith(b"PASS\n"), n_out
    s_res, s_out, s_data = run(path, mode, "shadow")
    assert s_res.status == n_res.status, f"{s_out!r}\n{s_res.report}"
    assert s_out == n_out
    assert s_data == n_data, "program data differs between shadow and native MMU"


@pytest.mark.parametrize("policy", [p for p in POLICY_NAMES if p != "kvm"])
@pytest.mark.parametrize("path,mode", list(cases()))
def test_policy_changes_cost_not_results(path, mode, policy):
    if not supported(path, mode):
        pytest.skip(f"{path.name} does not support mode {mode}")
    n_res, n_out, n_data = native(path, mode)
    s_res, s_out, s_data = run(path, mode, "shadow", policy)
    assert (s_res.status, s_out, s_data) == (n_res.status, n_out, n_data), s_res.report
