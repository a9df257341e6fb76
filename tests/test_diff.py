"""x86shadow diff: the shadow MMU against Unicorn's own MMU in lockstep (x86shadow/diff.py)."""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

import pytest

from x86shadow import cli
from x86shadow.asm import assemble_firmware, assemble_program
from x86shadow.diff import diff_program
from x86shadow.machine import Machine
from x86shadow.mmu.vm_mmu import VmMmu
from x86shadow.resources import guestcode_dir

RAM = 128 << 20
GUEST = guestcode_dir()

# a store to a fresh data page (FREE_BASE: identity-mapped with a large page by the firmware),
# after a few instructions of its own
PLANTED = """
main:
    mov eax, 1
    mov ecx, 2
    add eax, ecx
    mov dword ptr [FREE_BASE + 0x104], 0x1234
    mov eax, dword ptr [FREE_BASE + 0x104]
    ret
"""


def _native_insns(path, mode):
    """Instructions a plain --mmu native run of the program retires (Unicorn's counter)."""
    m = Machine(mode, mmu="native")
    m.load(assemble_program(path, mode, RAM), assemble_firmware(mode, RAM))
    r = m.run(50_000_000)
    assert r.how == "halt"
    return m.vcpu.insns


def assemble_program_text(source, mode):
    fd, path = tempfile.mkstemp(suffix=".asm")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    try:
        return assemble_program(path, mode, RAM)
    finally:
        os.unlink(path)


def _plant_wrong_pfn(monkeypatch, gfn):
    """A shadow MMU bug for the test: the leaf spte for ``gfn`` maps the next frame."""
    orig = VmMmu.set_spte

    def wrong(self, vcpu, sp, idx, g, *a, **kw):
        if g == gfn and kw.get("pfn") is not None:
            kw["pfn"] = gfn + 1
        return orig(self, vcpu, sp, idx, g, *a, **kw)
    monkeypatch.setattr(VmMmu, "set_spte", wrong)


@pytest.mark.parametrize("name,mode", [("hello.asm", "32"), ("ptwrites.asm", "pae"),
                                       ("fork_cow.asm", "64"), ("user_int80.asm", "pae"),
                                       ("selfmap.asm", "64"),
                                       # a store through a clean large pte whose direct shadow
                                       # page a dirty one built (vcpu_mmu._fetch: D was lost)
                                       ("smc_stores.asm", "32"), ("smc_stores.asm", "pae"),
                                       ("smc_stores.asm", "64")])
def test_a_normal_guest_does_not_diverge(name, mode):
    path = str(GUEST / name)
    r = diff_program(path, mode, configs=["kvm", "kvm-2008", "xen-oos"], check_every=4000,
                     audit=True)
    assert not r.diverged and r.first is None, r.format()
    total = _native_insns(path, mode)
    for c in r.results:
        assert c.finished and c.native_status == c.shadow_status == 0
        assert c.insns == total                    # compared up to the very end
    assert r.format().endswith("no divergence")
    assert r.to_json()["diverged"] is False


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_a_planted_wrong_pfn_is_found_at_its_store(monkeypatch, mode):
    gfn = 0x1000                                    # FREE_BASE >> 12
    _plant_wrong_pfn(monkeypatch, gfn)
    r = diff_program(PLANTED, mode, configs=["kvm"])
    assert r.diverged
    d = r.first
    assert d.config == "kvm" and d.what == "memory"
    assert "mov dword ptr" in d.insn and "0x1234" in d.insn
    assert d.address == (gfn << 12) + 0x104         # the store's operand, computed from regs
    assert d.gpa == (gfn << 12) + 0x104             # the first byte that differs
    # the instruction is the one native executes after d.insns - 1 instructions
    m = Machine(mode, mmu="native")
    m.load(assemble_program_text(PLANTED, mode), assemble_firmware(mode, RAM))
    m.run(d.insns - 1)
    assert m.vcpu.rip() == d.rip
    # the guest walk of the address: every level down to the large-page leaf, which maps it
    walk = d.guest_ptes["native"]["after"][0]
    assert walk["ok"] and walk["gpa"] == d.address
    assert walk["entries"][-1]["value"] & 0x80       # PS: the firmware's large page
    assert walk["entries"][-1]["value"] & ~0xFFF & 0xFFFFFFFFF000 == (gfn << 12) & ~0x1FFFFF
    assert d.guest_ptes["shadow"]["before"] == d.guest_ptes["native"]["before"]
    # the shadow view shows the planted frame; Unicorn's walker the right one
    assert f"host frame {gfn + 1:#x} for gfn {gfn:#x}" in d.shadow_view[0]
    assert d.native_view == [f"va {d.address:#x} (write): -> gpa {d.address:#x}"]
    text = r.format()
    assert "first divergence: kvm, memory" in text and d.insn in text


def test_check_every_catches_a_difference_the_end_hides(monkeypatch):
    """The planted store's word is cleared again before the end (through the same wrong
    mapping, 6000 instructions later): RAM and registers are equal at the end, so only
    --check-every sees it."""
    src = PLANTED.replace("    ret", "    mov ecx, 3000\nspin:\n    dec ecx\n    jnz spin\n"
                                     "    mov dword ptr [FREE_BASE + 0x104], 0\n    ret")
    _plant_wrong_pfn(monkeypatch, 0x1000)
    end = diff_program(src, "pae", configs=["kvm"])
    assert not end.diverged and end.results[0].finished
    every = diff_program(src, "pae", configs=["kvm"], check_every=500)
    d = every.first
    assert d.what == "memory" and "0x1234" in d.insn and d.gpa == 0x1000104


def test_the_known_page_crossing_rep_movsd_divergence():
    """The fuzzer's program 64:7031 (a rep movsd crossing from the PML4 frame into the PDPT,
    overwriting the PDPT entry the code runs through): the shadow MMU zaps at once and the
    next access faults (a triple fault: the IDT is no longer mapped), while Unicorn keeps
    using its TLB entries. If this test fails, the MMU or the program changed: look again."""
    from x86shadow.fuzz.differential import check_source
    from x86shadow.fuzz.ptprog import compared_frames
    # (rendered by the generator of that time: tests/fuzz_regressions/known-rep-movsd-64.asm)
    src = (pathlib.Path(__file__).parent / "fuzz_regressions"
           / "known-rep-movsd-64.asm").read_text()
    divs = check_source(src, "64", compared_frames("64"), policies=["kvm-2008"])
    assert divs and divs[0].what == "memory"
    differing = int(divs[0].detail.split(":")[0], 16)    # the pte the fuzzer saw differ
    r = diff_program(src, "64", configs=["kvm-2008"])
    d = r.first
    assert d.what == "insns" and "rep movsd" in d.insn
    entries = [e["address"] for w in d.guest_ptes["native"]["before"] for e in w["entries"]]
    assert differing in entries                     # the store goes through that very entry
    assert d.address < differing <= d.address + 3   # and crosses into it
    assert any("triple fault" in line for line in d.details)


def test_chunked_runs_equal_one_run_and_a_final_hlt_is_a_hlt():
    path = str(GUEST / "ptwrites.asm")
    total = _native_insns(path, "pae")
    for mmu in ("native", "shadow"):
        m = Machine("pae", mmu=mmu, policy="kvm-2008" if mmu == "shadow" else None)
        m.load(assemble_program(path, "pae", RAM), assemble_firmware("pae", RAM))
        r = m.run(1000)
        assert r.exit_kind.name == "RUNAWAY" and m.vcpu.insns == 1000
        n = 1000
        while r.exit_kind.name == "RUNAWAY":
            n += 777
            r = m.run(n, resume=True)
        assert r.how == "halt" and m.vcpu.insns == total
        assert bytes(m.output).endswith(b"PASS\n")
        exact = Machine("pae", mmu=mmu)
        exact.load(assemble_program(path, "pae", RAM), assemble_firmware("pae", RAM))
        assert exact.run(total).how == "halt"     # the hlt is the last instruction allowed
        short = Machine("pae", mmu=mmu)
        short.load(assemble_program(path, "pae", RAM), assemble_firmware("pae", RAM))
        assert short.run(total - 1).exit_kind.name == "RUNAWAY"


def test_shadow_and_native_count_the_same_instructions_retired():
    """unshadow-all unprotects on every trapped page-table write and re-executes the store:
    Unicorn counts that instruction twice, the vCPU retires it once, as natively."""
    path = str(GUEST / "ptwrites.asm")
    m = Machine("64", mmu="shadow", policy="unshadow-all")
    m.load(assemble_program(path, "64", RAM), assemble_firmware("64", RAM))
    m.run(50_000_000)
    assert m.vcpu.restarts > 0
    assert m.vcpu.insns == _native_insns(path, "64")


def test_cli_statuses_and_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "d.json"
    assert cli.main(["diff", str(GUEST / "hello.asm"), "--mode", "64", "--policy", "kvm",
                     "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["diverged"] is False and rec["configs"][0]["config"] == "kvm"
    assert "no divergence" in capsys.readouterr().out
    prog = tmp_path / "planted.asm"
    prog.write_text(PLANTED)
    _plant_wrong_pfn(monkeypatch, 0x1000)
    assert cli.main(["diff", str(prog), "--mode", "32", "--policy", "kvm", "--unsync", "off",
                     "--json", str(out)]) == 1
    rec = json.loads(out.read_text())
    assert rec["diverged"] and rec["first"]["config"] == "kvm --unsync off"
    assert rec["first"]["what"] == "memory" and rec["first"]["gpa"] == 0x1000104
    assert "first divergence: kvm --unsync off, memory" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["nope.asm", "--mode", "pae"], "no such file"),
    (["HELLO", "--mode", "pae", "--check-every", "0"], "--check-every"),
    (["HELLO", "--mode", "pae", "--max-insns", "0"], "--max-insns"),
    (["HELLO", "--mode", "pae", "--ram", "1"], "guest RAM"),
    (["HELLO", "--mode", "pae", "--json", "/nonexistent/d.json"], "cannot write"),
    (["HELLO", "--mode", "pae", "--policy", "nope"], "invalid choice"),
])
def test_cli_bad_input(argv, msg, capsys):
    argv = [str(GUEST / "hello.asm") if a == "HELLO" else a for a in argv]
    if msg == "invalid choice":                       # argparse's own check (its exit)
        with pytest.raises(SystemExit) as e:
            cli.main(["diff"] + argv)
        status = e.value.code
    else:
        status = cli.main(["diff"] + argv)
    assert status == 2
    err = capsys.readouterr().err
    assert "x86shadow: " in err and msg in err and "Traceback" not in err


def test_a_stop_keeps_what_was_compared():
    """A signal (here requested as the second config starts) ends the diff with the configs
    done so far and the interrupted one marked."""
    from x86shadow import stopping

    def progress(config):
        if config == "kvm-2008":
            stopping.request(stopping.Stop(130, "interrupted"))
    try:
        r = diff_program(str(GUEST / "hello.asm"), "pae", configs=["kvm", "kvm-2008", "xen"],
                         check_every=1000, progress=progress)
    finally:
        stopping.take()
    assert r.interrupted and r.stop.status == 130
    assert [c.config for c in r.results] == ["kvm", "kvm-2008"]
    assert r.results[0].finished and r.results[1].interrupted and not r.diverged
    assert "kvm-2008: interrupted" in r.format() and r.to_json()["interrupted"]
