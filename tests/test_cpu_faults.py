"""The CPU model seen by guest code, under both MMUs: CPUID per model, the #GP / #UD rules of
other models and flags than the default (guestcode/cpu_faults.asm and pcid.asm cover the
default model and run in tests/test_guestcode.py too), MAXPHYADDR from phys-bits, the trace
event, and --cpu errors on the command line."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from x86shadow import cpu_model as cm
from x86shadow.asm import assemble_firmware, assemble_program
from x86shadow.cpu.model import base_cpuid, make_model
from x86shadow.machine import Machine

ROOT = pathlib.Path(__file__).resolve().parent.parent
RAM = 64
HEADER = """.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/trap.inc"
main:
    TRAP_SETUP
"""


def run(source, mode, mmu, cpu=None, tmp_path=None, trace=None):
    path = tmp_path / "prog.asm"
    path.write_text(HEADER + source + "\n    PASS\n    ret\n")
    program = assemble_program(str(path), mode, RAM << 20)
    m = Machine(mode, mmu=mmu, ram_mib=RAM, audit=(mmu == "shadow"), cpu=cpu, trace=trace)
    m.load(program, assemble_firmware(mode, RAM << 20))
    r = m.run()
    return r, bytes(m.output).decode()


def passes(source, mode, mmu, cpu, tmp_path):
    r, out = run(source, mode, mmu, cpu, tmp_path)
    assert r.status == 0 and out.endswith("PASS\n"), f"{mode} {mmu} {cpu}: {out!r}\n{r.report}"
    return out


MMUS = ["shadow", "native"]


# ------------------------------------------------------------------------------ CPUID
CPUID_DUMP = """
    mov esi, 0
dump:
    mov eax, dword ptr [leaves + esi * 8]
    mov ecx, dword ptr [leaves + esi * 8 + 4]
    cpuid
    PRINT_HEX "", eax
    PRINT_HEX " ", ebx
    PRINT_HEX " ", ecx
    PRINT_HEX " ", edx
    PRINT "\\n"
    inc esi
    cmp esi, 5
    jb dump
    mov rax, cr4
    PRINT_HEX "", eax
    PRINT "\\n"
    jmp done
leaves:
    .long 0, 0, 1, 0, 7, 0, 0x80000001, 0, 0x80000008, 0
done:
"""


def _dumped(out):
    rows = [line.split() for line in out.splitlines()[:5]]
    return [tuple(int(v, 16) for v in row) for row in rows]


@pytest.mark.parametrize("cpu", ["haswell", "qemu64,+pcid,+invpcid", "skylake-server",
                                 "icelake-server", "epyc", "max,vendor=AuthenticAMD"])
@pytest.mark.parametrize("mmu", MMUS)
def test_guest_sees_the_models_cpuid(cpu, mmu, tmp_path):
    out = passes(CPUID_DUMP, "64", mmu, cpu, tmp_path)
    model = make_model(cpu, 64)
    got = _dumped(out)
    want = []
    base = dict(base_cpuid(64, model.uc_model))
    for leaf, sub in ((0, 0), (1, 0), (7, 0), (0x80000001, 0), (0x80000008, 0)):
        r = model.cpuid(leaf, sub, cr4=int(out.splitlines()[5], 16))
        want.append(r if r is not None else base[(leaf, sub)])
    assert got == want
    vendor = b"".join(got[0][r].to_bytes(4, "little") for r in (1, 3, 2)).decode()
    assert vendor == model.vendor
    assert got[4][0] & 0xFF == 40 and got[4][0] >> 8 & 0xFF == 48
    for f in cm.UNSUPPORTED:                              # never advertised
        leaf, sub, reg, bit = cm.FEATURES[f]
        row = {(1, 0): 1, (7, 0): 2, (0x80000001, 0): 3}[(leaf, sub)]
        assert not got[row][reg] >> bit & 1, f
    assert bool(got[1][2] >> 17 & 1) == model.has("pcid")
    assert bool(got[2][1] >> 10 & 1) == model.has("invpcid")


# ------------------------------------------------------------------------------ pcid.c variants
@pytest.mark.parametrize("cpu, found", [
    ("qemu64,+pcid,+invpcid", "pcid invpcid"),
    ("qemu64,-pcid,-invpcid", "nopcid noinvpcid"),
    ("qemu64,-pcid,+invpcid", "nopcid invpcid"),
])
@pytest.mark.parametrize("mmu", MMUS)
def test_pcid_variants_of_kvm_unit_tests(cpu, found, mmu):
    """guestcode/pcid.asm under the three -cpu lines of kvm-unit-tests' unittests.cfg."""
    program = assemble_program(str(ROOT / "guestcode/pcid.asm"), "64", RAM << 20)
    m = Machine("64", mmu=mmu, ram_mib=RAM, audit=(mmu == "shadow"), cpu=cpu)
    m.load(program, assemble_firmware("64", RAM << 20))
    r = m.run()
    assert r.status == 0, r.report
    assert bytes(m.output).decode() == found + "\nPASS\n"


# ------------------------------------------------------------------------------ flags
STAC = """
    TRY r1
    .byte 0x0f, 0x01, 0xcb              # stac
r1: CHECK_TRAP 6, 0, 3
    TRY r2
    .byte 0x0f, 0x01, 0xca              # clac
r2: CHECK_TRAP 6, 0, 4
"""


@pytest.mark.parametrize("mmu", MMUS)
def test_stac_is_ud_on_skylake_server_where_unicorn_would_run_it(mmu, tmp_path):
    """Unicorn's Skylake-Server has SMAP and executes stac; our model does not offer SMAP, so
    stac/clac must #UD (the rule, not Unicorn, raises it: checked by the model's own answer)."""
    assert dict(base_cpuid(64, "SKYLAKE_SERVER"))[(7, 0)][cm.EBX] >> 20 & 1
    passes(STAC, "64", mmu, "skylake-server", tmp_path)


SMEP_ON = """
    TRY r1
.if BITS == 64
    mov rax, cr4
    bts rax, 20
    mov cr4, rax
.else
    mov eax, cr4
    bts eax, 20
    mov cr4, eax
.endif
r1: CHECK_TRAP {vector}, 0, 3
"""


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
@pytest.mark.parametrize("mmu", MMUS)
def test_smep_flag(mode, mmu, tmp_path):
    passes(SMEP_ON.format(vector=13), mode, mmu, "haswell,-smep", tmp_path)
    passes(SMEP_ON.format(vector="NO_TRAP"), mode, mmu, "qemu64,+smep", tmp_path)
    passes(SMEP_ON.format(vector=13), mode, mmu, "qemu64", tmp_path)


NXE = """
    TRY r1
    mov ecx, 0xc0000080
    rdmsr
    bts eax, 11
    wrmsr
r1: CHECK_TRAP {vector}, 0, 3
"""


@pytest.mark.parametrize("mode", ["pae", "64"])
@pytest.mark.parametrize("mmu", MMUS)
def test_nx_flag(mode, mmu, tmp_path):
    passes(NXE.format(vector=13), mode, mmu, "haswell,-nx", tmp_path)
    passes(NXE.format(vector="NO_TRAP"), mode, mmu, "haswell", tmp_path)


TSC_AUX = """
    TRY r1
    mov ecx, 0xc0000103
    rdmsr
r1: CHECK_TRAP {vector}, 0, 3
"""


@pytest.mark.parametrize("mmu", MMUS)
def test_tsc_aux_needs_rdtscp(mmu, tmp_path):
    passes(TSC_AUX.format(vector=13), "64", mmu, "qemu64", tmp_path)
    passes(TSC_AUX.format(vector="NO_TRAP"), "64", mmu, "haswell", tmp_path)


# ------------------------------------------------------------------------------ MAXPHYADDR
RSVD_PF = """
    call pt_init
.if BITS == 64
    mov rax, 1
    shl rax, {bit}
    or rax, FREE_BASE + 0x10000 + PTE_P + PTE_W
    mov rdi, cr3
.else
    mov edx, 1 << ({bit} - 32)
    mov eax, FREE_BASE + 0x10000 + PTE_P + PTE_W
    mov edi, cr3
.endif
    mov esi, 0x40000000
    mov ecx, 1
    call pt_map
    invlpg [0x40000000]
    TRY r1
    mov dword ptr [0x40000000], 1
r1: CHECK_TRAP 14, PF_RSVD + PF_P + PF_W, 3
    mov eax, 0x80000008
    cpuid
    movzx eax, al
    CHECK_EQ eax, {phys}, 4, "CPUID MAXPHYADDR"
"""


@pytest.mark.parametrize("mode", ["pae", "64"])
def test_phys_bits_moves_the_reserved_bits(mode, tmp_path):
    """--cpu haswell,phys-bits=36 (shadow MMU): CPUID says 36 and a pte with frame bit 36 (an
    address bit with MAXPHYADDR 40) faults with RSVD|P|W."""
    passes(RSVD_PF.format(bit=36, phys=36), mode, "shadow", "haswell,phys-bits=36", tmp_path)
    passes(RSVD_PF.format(bit=40, phys=40), mode, "native", "haswell", tmp_path)
    r, out = run(RSVD_PF.format(bit=36, phys=40), mode, "shadow", "haswell", tmp_path)
    assert r.status != 0            # bit 36 is an address bit at MAXPHYADDR 40: no RSVD fault


# ------------------------------------------------------------------------------ trace, CLI
def test_a_cpu_fault_is_traced(tmp_path):
    events = []
    src = """
    TRY r1
    mov ecx, 0x12345
    rdmsr
r1: CHECK_TRAP 13, 0, 3
"""
    r, out = run(src, "64", "shadow", None, tmp_path, trace=lambda k, f: events.append((k, f)))
    assert r.status == 0, out
    faults = [f for k, f in events if k == "x86shadow_cpu_fault"]
    assert len(faults) == 1 and faults[0]["vector"] == 13 and "0x12345" in faults[0]["reason"]
    assert faults[0]["insn"] == "rdmsr"
    inj = [f for k, f in events if k == "kvm_inj_exception"]
    assert inj and inj[0]["vector"] == 13 and inj[0]["error_code"] == 0


@pytest.mark.parametrize("cpu, words", [
    ("pentium9", "unknown CPU model"),
    ("haswell,+smap", "+smap is not supported"),
    ("haswell,phys-bits=36", "needs --mmu shadow"),
    ("qemu64,+rdtscp", "cannot do it"),
])
def test_cli_cpu_errors(cpu, words):
    args = [sys.executable, "-m", "x86shadow.cli", "run", str(ROOT / "guestcode/hello.asm"),
            "--mode", "64", "--mmu", "native", "--cpu", cpu]
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("x86shadow: ") and words in lines[0]


def test_cli_cpu_runs(tmp_path):
    stats = tmp_path / "s.json"
    args = [sys.executable, "-m", "x86shadow.cli", "run", str(ROOT / "guestcode/pcid.asm"),
            "--mode", "64", "--cpu", "qemu64,+pcid,+invpcid", "--stats-json", str(stats)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == "pcid invpcid\nPASS\n", p.stderr
    # the faults pcid.asm expects with both features: e3, e4, i2, i3, i4
    assert json.loads(stats.read_text())["exception_injections"] == 5


DEVICE_MSR = """
    TRY r1
    mov ecx, 0x4b564d00
    rdmsr
    mov ebx, eax
    mov esi, edx
r1: CHECK_TRAP NO_TRAP, 0, 3
    CHECK_EQ ebx, 0x9abcdef0, 4, "low half"
    CHECK_EQ esi, 0x12345678, 5, "high half"
    mov ecx, 0x4b564d00
    mov eax, 0x11
    mov edx, 0x22
    wrmsr
"""


@pytest.mark.parametrize("mmu", MMUS)
@pytest.mark.parametrize("mode", ["32", "64"])
def test_a_device_msr_bypasses_the_unknown_msr_rule(mode, mmu, tmp_path):
    """VCPU.msr_handlers: an MSR a device implements (e.g. IA32_APIC_BASE for an APIC) is read
    and written through its handler; without the handler the same index is an unknown MSR."""
    class Reg:
        value = 0x123456789ABCDEF0

        def read(self):
            return self.value

        def write(self, v):
            self.value = v
    path = tmp_path / "prog.asm"
    path.write_text(HEADER + DEVICE_MSR + "\n    PASS\n    ret\n")
    program = assemble_program(str(path), mode, RAM << 20)
    m = Machine(mode, mmu=mmu, ram_mib=RAM, audit=(mmu == "shadow"))
    reg = Reg()
    m.vcpu.msr_handlers[0x4B564D00] = reg
    m.load(program, assemble_firmware(mode, RAM << 20))
    r = m.run()
    assert r.status == 0 and bytes(m.output) == b"PASS\n", (bytes(m.output), r.report)
    assert reg.value == 0x22_00000011
    r, out = run(DEVICE_MSR, mode, mmu, None, tmp_path)
    assert "FAIL 3" in out                       # no handler: #GP


@pytest.mark.parametrize("mmu", MMUS)
def test_clearing_cr0_pg_in_64bit_code_is_gp(mmu, tmp_path):
    """kvm_set_cr0: CR0.PG cleared in 64-bit mode (EFER.LMA and CS.L) is #GP(0) and nothing
    changes; the model's "64-bit mode" test is what the vCPU decodes with (VCPU.code_bits)."""
    events = []
    src = """
    TRY r1
    mov rax, cr0
    btr rax, 31
    mov cr0, rax
r1: CHECK_TRAP 13, 0, 3
    mov rax, cr0
    bt rax, 31
    jc still_on
    FAIL 9, "paging went off"
still_on:
"""
    path = tmp_path / "prog.asm"
    path.write_text(HEADER + src + "\n    PASS\n    ret\n")
    program = assemble_program(str(path), "64", RAM << 20)
    m = Machine("64", mmu=mmu, ram_mib=RAM, audit=(mmu == "shadow"),
                trace=lambda k, f: events.append((k, f)))
    m.load(program, assemble_firmware("64", RAM << 20))
    r = m.run()
    out = bytes(m.output).decode()
    assert r.status == 0 and out.endswith("PASS\n"), out
    faults = [f for k, f in events if k == "x86shadow_cpu_fault"]
    assert [f["reason"] for f in faults] == ["CR0.PG cleared in 64-bit mode (kvm_set_cr0)"]
