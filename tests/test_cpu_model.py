"""The CPU model's pure side (x86shadow/cpu_model.py): --cpu parsing, feature resolution, CPUID,
the #GP rules, and MAXPHYADDR in the walker's reserved bits. No guest runs here (those are in
tests/test_cpu_faults.py); the base CPUID of a model comes from Unicorn (cpu/model.py) or, for
the rule tests, from a hand-made table."""
from __future__ import annotations

import pytest

from x86shadow import cpu_model as cm
from x86shadow.cpu.model import base_cpuid, make_model
from x86shadow.paging import (MAXPHYADDR, PFERR_P, PFERR_RSVD, PFERR_W, PTE_PS, Mode,
                              pse36_rsvd_mask, rsvd_mask, walk)

from pagetables import Tables  # noqa: E402

PWU = 7


def bits(*features):
    """A base CPUID table with exactly these features (vendor GenuineIntel)."""
    regs = {k: [0, 0, 0, 0] for k in cm.BASE_LEAVES}
    regs[(0, 0)] = [0xD, int.from_bytes(b"Genu", "little"), int.from_bytes(b"ntel", "little"),
                    int.from_bytes(b"ineI", "little")]
    regs[(0x80000008, 0)] = [0x3028, 0, 0, 0]
    for f in features:
        leaf, sub, reg, bit = cm.FEATURES[f]
        regs[(leaf, sub)][reg] |= 1 << bit
    return {k: tuple(v) for k, v in regs.items()}


BASE = bits("smep", "nx", "lm", "syscall", "xsave", "fsgsbase", "rdtscp")


def model(text="haswell", base=BASE, mmu="shadow"):
    return cm.resolve(cm.parse_cpu_spec(text), base, mmu=mmu)


# ------------------------------------------------------------------------------ parsing
def test_parse_qemu_syntax():
    s = cm.parse_cpu_spec("qemu64,+pcid,-invpcid,smep=on,nx=off,phys-bits=36,vendor=AuthenticAMD")
    assert s.model == "qemu64" and s.plus == ("pcid", "smep") and s.minus == ("invpcid", "nx")
    assert s.phys_bits == 36 and s.vendor == "AuthenticAMD"
    assert cm.parse_cpu_spec(s.text()) == s
    assert cm.parse_cpu_spec("HASWELL,+xd").plus == ("nx",)


@pytest.mark.parametrize("text, words", [
    ("", "empty CPU model"),
    ("pentium9", "unknown CPU model 'pentium9'"),
    ("haswell,+warp", "unknown CPU flag 'warp'"),
    ("haswell,,+pcid", "empty item"),
    ("haswell,pcid", "neither +flag"),
    ("haswell,pcid=maybe", "takes on or off"),
    ("haswell,phys-bits=64", "phys-bits must be 32..52"),
    ("haswell,phys-bits=x", "must be a number"),
    ("haswell,vendor=Cyrix", "vendor must be one of"),
    ("haswell,+pcid,-pcid", "both added and removed"),
])
def test_parse_errors_are_one_line(text, words):
    with pytest.raises(cm.CpuSpecError) as e:
        cm.parse_cpu_spec(text)
    assert words in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ resolution
def test_unsupported_features_are_off_and_refused():
    m = model("haswell", bits("smep", "smap", "pku", "la57", "umip", "lm", "nx"))
    assert not any(m.has(f) for f in cm.UNSUPPORTED) and m.has("smep")
    for f in ("smap", "pku", "la57", "umip", "rdpid", "vmx"):
        with pytest.raises(cm.CpuSpecError, match=f"\\+{f} is not supported"):
            model(f"haswell,+{f}")
    assert not model("haswell,-smap").has("smap")           # off anyway: accepted


def test_emulated_features_can_be_added_others_not():
    m = model("qemu64,+pcid,+invpcid", bits("lm", "nx"))
    assert m.has("pcid") and m.has("invpcid")
    with pytest.raises(cm.CpuSpecError, match="cannot do it"):
        model("qemu64,+rdtscp", bits("lm", "nx"))
    with pytest.raises(cm.CpuSpecError, match="cannot remove it"):
        model("haswell,-rdtscp")
    assert not model("haswell,-nx").has("nx") and not model("haswell,-smep").has("smep")


def test_max_is_haswell_with_the_emulated_features():
    m = model("max")
    assert m.uc_model == "HASWELL" and m.has("pcid") and m.has("invpcid")


def test_phys_bits_needs_the_shadow_mmu():
    assert model("haswell,phys-bits=36").maxphyaddr == 36
    assert model("haswell").maxphyaddr == cm.TCG_PHYS_BITS
    with pytest.raises(cm.CpuSpecError, match="needs --mmu shadow"):
        model("haswell,phys-bits=36", mmu="native")


# ------------------------------------------------------------------------------ CPUID
def test_cpuid_feature_bits_follow_the_model():
    m = model("haswell,+pcid,-smep", bits("smep", "smap", "lm", "nx"))
    one = m.cpuid(1, 0, cr4=0)
    seven = m.cpuid(7, 0, cr4=0)
    assert one[cm.ECX] >> 17 & 1 == 1                      # PCID added
    assert seven[cm.EBX] >> 7 & 1 == 0                     # SMEP removed
    assert seven[cm.EBX] >> 20 & 1 == 0                    # SMAP never offered
    assert m.cpuid(7, 1, cr4=0) is None and m.cpuid(2, 0, cr4=0) is None   # base answer stands


def test_cpuid_osxsave_mirrors_cr4():
    m = model()
    assert m.cpuid(1, 0, cr4=cm.CR4_OSXSAVE)[cm.ECX] >> 27 & 1 == 1
    assert m.cpuid(1, 0, cr4=0)[cm.ECX] >> 27 & 1 == 0


def test_cpuid_maxphyaddr_and_vendor():
    m = model("haswell,phys-bits=36,vendor=AuthenticAMD")
    assert m.cpuid(0x80000008, 0, 0)[cm.EAX] & 0xFFFF == (48 << 8) | 36
    eax, ebx, ecx, edx = m.cpuid(0, 0, 0)
    assert b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)) == b"AuthenticAMD"


@pytest.mark.parametrize("name", ["haswell", "qemu64", "skylake-server", "icelake-server", "epyc"])
def test_unicorn_base_models(name):
    """The real base CPUID (from Unicorn): the default model is haswell, and no model offers
    what we do not enforce (skylake-server has SMAP and PKU in Unicorn; icelake-server LA57)."""
    m = make_model(name, 64)
    raw = dict(base_cpuid(64, cm.MODELS[name]))
    assert m.maxphyaddr == 40 and raw[(0x80000008, 0)][cm.EAX] & 0xFF == 40
    seven = m.cpuid(7, 0, 0)
    for f in ("smap", "pku", "la57", "umip", "rdpid"):
        _, _, reg, bit = cm.FEATURES[f]
        assert not seven[reg] >> bit & 1, f
    assert m.cpuid(0x80000008, 0, 0)[cm.EAX] >> 8 & 0xFF == 48
    if name == "skylake-server":
        assert raw[(7, 0)][cm.EBX] >> 20 & 1                # Unicorn's own model has SMAP ...
        assert m.ud_for("stac") is not None                  # ... so our rule makes stac #UD
    if name == "qemu64":
        assert m.vendor == "AuthenticAMD" and not m.has("pcid") and not m.has("smep")
    if name == "haswell":
        assert m.has("smep") and m.has("rdtscp") and not m.has("pcid")


# ------------------------------------------------------------------------------ CR rules
HASWELL = model()                     # smep, nx, lm, syscall, xsave, fsgsbase; no pcid, vmx ...
PCID = model("haswell,+pcid")
PAE_ON = cm.CR4_PAE | cm.CR4_PSE


@pytest.mark.parametrize("bit, name", [
    (cm.CR4_PKE, "PKE"), (cm.CR4_SMAP, "SMAP"), (cm.CR4_LA57, "LA57"), (cm.CR4_UMIP, "UMIP"),
    (cm.CR4_VMXE, "VMXE"), (cm.CR4_PCIDE, "PCIDE"), (1 << 25, "bit 25"), (1 << 24, "bit 24"),
    (1 << 32, "bit 32"), (cm.CR4_CET, "CET"), (cm.CR4_LAM_SUP, "LAM_SUP")])
def test_cr4_reserved_bits_fault(bit, name):
    assert HASWELL.cr4_write_fault(PAE_ON, PAE_ON | bit, 0x1000, long_mode=False) is not None, name


def test_cr4_bits_the_model_has_are_fine_and_removed_ones_fault():
    for bit in (cm.CR4_SMEP, cm.CR4_OSXSAVE, cm.CR4_FSGSBASE, cm.CR4_PGE, cm.CR4_OSFXSR):
        assert HASWELL.cr4_write_fault(PAE_ON, PAE_ON | bit, 0x1000, False) is None
    assert model("haswell,-smep").cr4_write_fault(0, cm.CR4_SMEP, 0, False) is not None
    assert model("haswell,-fsgsbase").cr4_write_fault(0, cm.CR4_FSGSBASE, 0, False) is not None


def test_cr4_long_mode_and_pcide_rules():
    assert HASWELL.cr4_write_fault(PAE_ON, cm.CR4_PSE, 0x1000, long_mode=True) is not None
    assert PCID.cr4_write_fault(PAE_ON, PAE_ON | cm.CR4_PCIDE, 0x1000, long_mode=True) is None
    assert PCID.cr4_write_fault(PAE_ON, PAE_ON | cm.CR4_PCIDE, 0x1001, long_mode=True) is not None
    assert PCID.cr4_write_fault(PAE_ON, PAE_ON | cm.CR4_PCIDE, 0x1000, long_mode=False) is not None
    # already set: CR3[11:0] is the PCID then, no new check
    on = PAE_ON | cm.CR4_PCIDE
    assert PCID.cr4_write_fault(on, on | cm.CR4_PGE, 0x1005, long_mode=True) is None


def test_cr0_rules():
    pe_pg = cm.CR0_PE | cm.CR0_PG
    assert HASWELL.cr0_write_fault(pe_pg, pe_pg | (1 << 32), PAE_ON, 0, False) is not None
    assert HASWELL.cr0_write_fault(pe_pg, pe_pg | cm.CR0_NW, PAE_ON, 0, False) is not None
    assert HASWELL.cr0_write_fault(pe_pg, pe_pg | cm.CR0_NW | cm.CR0_CD, PAE_ON, 0, False) is None
    assert HASWELL.cr0_write_fault(pe_pg, cm.CR0_PG, PAE_ON, 0, False) is not None
    assert HASWELL.cr0_write_fault(cm.CR0_PE, pe_pg, 0, cm.EFER_LME, False) is not None
    assert HASWELL.cr0_write_fault(cm.CR0_PE, pe_pg, cm.CR4_PAE, cm.EFER_LME, False) is None
    assert HASWELL.cr0_write_fault(pe_pg, cm.CR0_PE, PAE_ON, cm.EFER_LME | cm.EFER_LMA,
                                   code64=True) is not None
    assert HASWELL.cr0_write_fault(pe_pg, cm.CR0_PE, PAE_ON, 0, False) is None
    assert PCID.cr0_write_fault(pe_pg, cm.CR0_PE, PAE_ON | cm.CR4_PCIDE, 0, False) is not None


def test_cr3_rules():
    assert HASWELL.cr3_write(1 << 39, 0) == (1 << 39, None)
    assert HASWELL.cr3_write(1 << 40, 0)[1] is not None
    assert HASWELL.cr3_write(1 << 63 | 0x1000, 0)[1] is not None          # no PCIDE: reserved
    assert PCID.cr3_write(1 << 63 | 0x1005, cm.CR4_PCIDE) == (0x1005, None)  # no-flush hint
    assert model("haswell,phys-bits=36").cr3_write(1 << 36, 0)[1] is not None


# ------------------------------------------------------------------------------ MSRs
def test_unknown_msrs_fault_known_ones_do_not():
    assert HASWELL.rdmsr_fault(0xDEADBEEF) is not None
    assert HASWELL.wrmsr_fault(0x12345, 0, 0, False) is not None
    for msr in (cm.MSR_EFER, cm.MSR_PAT, cm.MSR_LSTAR, cm.MSR_SYSENTER_CS, 0x200, 0x403,
                cm.MSR_IA32_TSC, cm.MSR_IA32_APICBASE, cm.MSR_TSC_AUX):
        assert HASWELL.rdmsr_fault(msr) is None, hex(msr)
    assert model("qemu64", bits("lm", "nx")).rdmsr_fault(cm.MSR_TSC_AUX) is not None


def test_amd_legacy_pmu_msrs_exist_on_amd_models_only():
    amd = model("qemu64,vendor=AuthenticAMD")
    for msr in range(0xC0010000, 0xC0010008):
        assert amd.rdmsr_fault(msr) is None and amd.wrmsr_fault(msr, 0, 0, True) is None
        assert HASWELL.rdmsr_fault(msr) is not None
    assert amd.rdmsr_fault(0xC0010008) is not None
    assert model("haswell,vendor=AuthenticAMD").rdmsr_fault(0xC0010000) is None
    from x86shadow.cpu.model import make_model           # Unicorn's own qemu64 is AMD's
    assert make_model("qemu64", 64).has_msr(0xC0010000)
    assert not make_model("haswell", 64).has_msr(0xC0010000)


def test_efer_rules():
    lme_lma = cm.EFER_LME | cm.EFER_LMA
    assert HASWELL.efer_write_fault(0, cm.EFER_NXE | cm.EFER_SCE | cm.EFER_LME, False) is None
    assert HASWELL.efer_write_fault(0, 1 << 1, False) is not None
    assert HASWELL.efer_write_fault(0, cm.EFER_SVME, False) is not None
    assert HASWELL.efer_write_fault(0, cm.EFER_FFXSR, False) is not None
    assert model("haswell,-nx").efer_write_fault(0, cm.EFER_NXE, False) is not None
    assert HASWELL.efer_write_fault(lme_lma, lme_lma | cm.EFER_NXE, paging=True) is None
    assert HASWELL.efer_write_fault(lme_lma, cm.EFER_LMA, paging=True) is not None
    assert HASWELL.efer_write_fault(0, cm.EFER_LME, paging=True) is not None
    assert HASWELL.efer_write_fault(0, cm.EFER_LME, paging=False) is None


def test_msr_value_rules():
    assert HASWELL.wrmsr_fault(cm.MSR_PAT, 0x0007040600070406, 0, True) is None   # reset value
    assert HASWELL.wrmsr_fault(cm.MSR_PAT, 0x0007040600070402, 0, True) is not None
    assert HASWELL.wrmsr_fault(cm.MSR_PAT, 0x0007040600070408, 0, True) is not None
    assert HASWELL.wrmsr_fault(cm.MSR_FS_BASE, 0x00007FFFFFFFF000, 0, True) is None
    assert HASWELL.wrmsr_fault(cm.MSR_FS_BASE, 0xFFFF800000000000, 0, True) is None
    assert HASWELL.wrmsr_fault(cm.MSR_LSTAR, 0x0000800000000000, 0, True) is not None
    assert HASWELL.wrmsr_fault(cm.MSR_TSC_AUX, 1 << 32, 0, True) is not None
    mc1_ctl, mc1_status = 0x404, 0x405
    assert HASWELL.wrmsr_fault(mc1_ctl, 0xFFFFFFFFFFFFFFFF, 0, True) is None
    assert HASWELL.wrmsr_fault(mc1_ctl, 0xFFFFFFFFFFFFFBFE, 0, True) is None    # bits 10, 0 clear
    assert HASWELL.wrmsr_fault(mc1_ctl, 0x0000800000000000, 0, True) is not None
    assert HASWELL.wrmsr_fault(mc1_status, 0, 0, True) is None
    assert HASWELL.wrmsr_fault(mc1_status, 1, 0, True) is not None
    assert HASWELL.rdmsr_fault(0x400 + 4 * 10) is not None                      # bank 10: none


def test_invpcid_rules():
    m = model("haswell,+invpcid")
    assert m.invpcid_fault(4, 0, 0, 0) is not None
    assert all(m.invpcid_fault(k, 0, 0, 0) is None for k in range(4))
    assert m.invpcid_fault(0, 1, 0, 0) is not None and m.invpcid_fault(1, 1, 0, 0) is not None
    assert m.invpcid_fault(2, 1, 0, 0) is None and m.invpcid_fault(3, 10, 0, 0) is None
    assert m.invpcid_fault(0, 1, 0, cm.CR4_PCIDE) is None
    assert m.invpcid_fault(2, 1 << 12, 0, cm.CR4_PCIDE) is not None
    assert m.invpcid_fault(0, 0, 0x0000800000000000, 0) is not None


# ------------------------------------------------------------------------------ MAXPHYADDR
def test_rsvd_masks_follow_maxphyaddr():
    for mp in (36, 40, 46, 52):
        m = rsvd_mask(Mode.LONG, 1, nxe=True, maxphyaddr=mp)
        assert m == ((1 << 52) - 1) & ~((1 << mp) - 1)         # bits 51:MAXPHYADDR
    assert pse36_rsvd_mask(40) == 1 << 21                      # what QEMU checks
    assert pse36_rsvd_mask(36) == sum(1 << b for b in range(17, 22))   # SDM: 21 and 20:17


@pytest.mark.parametrize("mode", [Mode.PAE, Mode.LONG])
@pytest.mark.parametrize("mp", [36, 40])
def test_walker_rsvd_fault_above_maxphyaddr(mode, mp):
    """A pte whose frame has a bit at MAXPHYADDR: #PF with RSVD|P (and W for a write); one bit
    lower is an address, not reserved."""
    t = Tables(mode)
    va = 0x40000000
    t.map(va, 0x7000 | (1 << mp))
    w = walk(t.mem, t.ctx(maxphyaddr=mp), va, PFERR_W)
    assert not w.ok and w.vector == 14 and w.error_code == PFERR_RSVD | PFERR_P | PFERR_W
    t.map(va, 0x7000 | (1 << (mp - 1)))
    w = walk(t.mem, t.ctx(maxphyaddr=mp), va, 0)
    assert w.ok and w.gpa == 0x7000 | (1 << (mp - 1))


def test_walker_pse36_rsvd_bits_with_small_maxphyaddr():
    t = Tables(Mode.LEGACY)
    va = 0x40000000
    t.set(va, 2, 0x00400000 | (1 << 17) | PTE_PS | PWU)      # PDE bit 17 = address bit 36
    assert walk(t.mem, t.ctx(pse=True), va, 0).ok             # MAXPHYADDR 40: an address bit
    w = walk(t.mem, t.ctx(pse=True, maxphyaddr=36), va, 0)
    assert not w.ok and w.error_code == PFERR_RSVD | PFERR_P
    assert MAXPHYADDR == cm.TCG_PHYS_BITS


@pytest.mark.parametrize("bits", [32, 64])
def test_default_model_is_unicorns_default(bits):
    """--cpu haswell (the default) is what Unicorn runs without ctl_set_cpu_model, in both of
    its modes: the same CPUID for every leaf the model reads."""
    from unicorn import UC_ARCH_X86, UC_MODE_32, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX
    for (leaf, sub), regs in base_cpuid(bits, cm.MODELS[cm.DEFAULT_MODEL]):
        uc = Uc(UC_ARCH_X86, UC_MODE_64 if bits == 64 else UC_MODE_32)
        uc.mem_map(0, 0x2000)
        uc.mem_write(0x1000, b"\x0f\xa2")
        uc.reg_write(UC_X86_REG_EAX, leaf)
        uc.reg_write(UC_X86_REG_ECX, sub)
        uc.emu_start(0x1000, 0x1002)
        assert tuple(uc.reg_read(r) & 0xFFFFFFFF for r in (
            UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX)) == regs, hex(leaf)
