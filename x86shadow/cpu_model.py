"""The guest CPU model: what CPUID says, MAXPHYADDR, and the rules that make a privileged
instruction fault (#GP(0) or #UD) on that model. Pure Python, no Unicorn: the Unicorn adapter
(cpu/model.py) reads Unicorn's own CPUID for the base model once, builds a :class:`CpuModel`
from it with :func:`resolve`, and asks the decision functions below before it lets Unicorn run a
``mov crN`` / ``wrmsr`` / ``rdmsr`` / ``stac`` / ``clac`` or emulates an ``invpcid``.

Why the rules are ours: Unicorn 2.1.4 (QEMU 5.0's TCG) never raises #GP for a reserved or
unsupported CR4 bit (bit 25, LA57, PCIDE and UMIP are kept; SMAP and PKE silently dropped on
some models), for an unknown MSR (reads 0, writes ignored) or for a reserved EFER bit (masked
silently). Each rule names where it comes from: the Intel SDM (vol. 3A/2) and KVM's own checks
in Linux 6.18 (``arch/x86/kvm/x86.c``: ``kvm_is_valid_cr0``, ``kvm_set_cr0``, ``kvm_set_cr4``,
``kvm_set_cr3``, ``set_efer``, ``__kvm_valid_efer``, ``__kvm_set_msr``;
``arch/x86/kvm/x86.h``: ``__cr4_reserved_bits``, ``kvm_pat_valid``;
``arch/x86/include/asm/kvm_host.h``: ``CR4_RESERVED_BITS``; ``arch/x86/kvm/vmx/vmx.c``:
``handle_invpcid`` and ``x86.c``: ``kvm_handle_invpcid``). docs/CPU_MODEL.md lists them.

Every decision function returns ``None`` (the instruction may run) or a short reason string
(the instruction raises #GP(0)); the reasons appear in the trace and in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "FEATURES", "MODELS", "DEFAULT_MODEL", "CpuSpec", "CpuModel", "CpuSpecError", "parse_cpu_spec",
    "resolve", "known_msr",
]

EAX, EBX, ECX, EDX = range(4)

# QEMU's -cpu flag names -> (leaf, subleaf, register, bit) of the CPUID bit (SDM vol. 2A, CPUID)
FEATURES = {
    "vmx": (1, 0, ECX, 5),
    "pcid": (1, 0, ECX, 17),
    "x2apic": (1, 0, ECX, 21),
    "xsave": (1, 0, ECX, 26),
    "fsgsbase": (7, 0, EBX, 0),
    "smep": (7, 0, EBX, 7),
    "invpcid": (7, 0, EBX, 10),
    "smap": (7, 0, EBX, 20),
    "umip": (7, 0, ECX, 2),
    "pku": (7, 0, ECX, 3),
    "la57": (7, 0, ECX, 16),
    "rdpid": (7, 0, ECX, 22),
    "svm": (0x80000001, 0, ECX, 2),
    "syscall": (0x80000001, 0, EDX, 11),
    "nx": (0x80000001, 0, EDX, 20),
    "pdpe1gb": (0x80000001, 0, EDX, 26),
    "rdtscp": (0x80000001, 0, EDX, 27),
    "lm": (0x80000001, 0, EDX, 29),
}
_ALIASES = {"xd": "nx", "1gb": "pdpe1gb", "pdpe1g": "pdpe1gb"}

# Features x86shadow backs itself where Unicorn's model lacks them: "+flag" is allowed on any
# model. pcid: Unicorn keeps CR4.PCIDE (measured) and walks from CR3 & ~0xfff; we add the
# #GP rules and strip CR3's no-flush bit 63. invpcid: Unicorn raises #UD on every model; we
# emulate it. smep: QEMU's walker enforces CR4.SMEP on every model, and Unicorn keeps the bit.
EMULATED = frozenset({"pcid", "invpcid", "smep"})
# Features whose absence we enforce: "-flag" clears the CPUID bit and the rules below (CR4 bit
# reserved, EFER.NXE reserved, #UD) make the CPU behave as one without it.
REMOVABLE = frozenset({"pcid", "invpcid", "smep", "nx", "fsgsbase", "xsave"})
# Never offered: not enforced end to end here (docs/CPU_MODEL.md says why for each). Cleared
# from CPUID on every model; "+flag" is refused, "-flag" is accepted (it is off anyway).
UNSUPPORTED = {
    "smap": "SMAP is not enforced by x86shadow's walker (EFLAGS.AC, implicit supervisor "
            "accesses) and Unicorn drops CR4.SMAP on most models",
    "pku": "protection keys are not enforced by x86shadow's walker",
    "la57": "5-level paging is not implemented",
    "umip": "UMIP is not enforced by Unicorn (sgdt/sidt/smsw at CPL3 do not #GP)",
    "rdpid": "Unicorn raises #UD for rdpid on every model",
    "vmx": "Unicorn has no VMX",
    "svm": "Unicorn has no SVM",
    "x2apic": "there is no x2APIC (x86shadow models an xAPIC page at most)",
}

# --cpu model names -> Unicorn's UC_CPU_X86_* suffix. "haswell" is Unicorn's default 64-bit
# model (its CPUID is identical: measured). "max" = haswell + every feature of EMULATED.
MODELS = {
    "qemu64": "QEMU64",
    "kvm64": "KVM64",
    "haswell": "HASWELL",
    "broadwell": "BROADWELL",
    "skylake-client": "SKYLAKE_CLIENT",
    "skylake-server": "SKYLAKE_SERVER",
    "cascadelake-server": "CASCADELAKE_SERVER",
    "icelake-server": "ICELAKE_SERVER",
    "epyc": "EPYC",
    "epyc-rome": "EPYC_ROME",
    "max": "HASWELL",
}
DEFAULT_MODEL = "haswell"
_MAX_EXTRA = ("pcid", "invpcid")

TCG_PHYS_BITS = 40          # MAXPHYADDR of every Unicorn model (QEMU's TCG_PHYS_ADDR_BITS)
LINEAR_BITS = 48            # 4-level paging (LA57 is never offered)
_VENDORS = ("GenuineIntel", "AuthenticAMD")

# control register bits (SDM vol. 3A, 2.5)
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE = 1, 2, 4, 8, 16, 32
CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG = 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1 << 31
CR4_VME, CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE, CR4_MCE, CR4_PGE, CR4_PCE = (
    1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8)
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_UMIP, CR4_LA57, CR4_VMXE = 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13
CR4_FSGSBASE, CR4_PCIDE, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP, CR4_PKE = (
    1 << 16, 1 << 17, 1 << 18, 1 << 20, 1 << 21, 1 << 22)
CR4_CET, CR4_LAM_SUP = 1 << 23, 1 << 28
CR3_PCID_NOFLUSH = 1 << 63
CR3_PCID_MASK = 0xFFF
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME, EFER_FFXSR = (
    1 << 0, 1 << 8, 1 << 10, 1 << 11, 1 << 12, 1 << 14)

# KVM kvm_host.h CR4_RESERVED_BITS: the complement of every CR4 bit KVM knows
_CR4_KNOWN = (CR4_VME | CR4_PVI | CR4_TSD | CR4_DE | CR4_PSE | CR4_PAE | CR4_MCE | CR4_PGE
              | CR4_PCE | CR4_OSFXSR | CR4_PCIDE | CR4_OSXSAVE | CR4_SMEP | CR4_FSGSBASE
              | CR4_OSXMMEXCPT | CR4_LA57 | CR4_VMXE | CR4_SMAP | CR4_PKE | CR4_UMIP
              | CR4_LAM_SUP | CR4_CET)
# x86.h __cr4_reserved_bits: a CR4 bit is reserved when the model lacks its feature. LAM_SUP
# (LAM) and CET (shstk/ibt) are features no model here has.
_CR4_FEATURE = (("xsave", CR4_OSXSAVE), ("smep", CR4_SMEP), ("smap", CR4_SMAP),
                ("fsgsbase", CR4_FSGSBASE), ("pku", CR4_PKE), ("la57", CR4_LA57),
                ("umip", CR4_UMIP), ("vmx", CR4_VMXE), ("pcid", CR4_PCIDE))
_CR4_NEVER = CR4_LAM_SUP | CR4_CET

# MSRs (SDM vol. 4)
MSR_IA32_TSC, MSR_IA32_APICBASE = 0x10, 0x1B
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_PAT = 0x277
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = (0xC0000080, 0xC0000081, 0xC0000082,
                                                      0xC0000083, 0xC0000084)
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_TSC_AUX = (0xC0000100, 0xC0000101,
                                                             0xC0000102, 0xC0000103)
# The MSRs QEMU 5.0's helper_rdmsr / helper_wrmsr implement (target/i386/misc_helper.c as built
# into Unicorn 2.1.4); every other index reads 0 and ignores writes there. Two architectural
# MSRs Unicorn answers poorly are passed through rather than faulted: IA32_TSC (reads 0) and
# IA32_APIC_BASE (reads 0 unless the machine's devices answer it).
_KNOWN_MSRS = frozenset(
    [MSR_IA32_TSC, MSR_IA32_APICBASE, 0x34, 0x8B, 0xFE, MSR_SYSENTER_CS, MSR_SYSENTER_ESP,
     MSR_SYSENTER_EIP, 0x179, 0x17A, 0x17B, 0x198, 0x1A0, 0x250, 0x258, 0x259, MSR_PAT, 0x2FF,
     0xD90, MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK, MSR_FS_BASE, MSR_GS_BASE,
     MSR_KERNEL_GS_BASE, MSR_TSC_AUX, 0xC0010117]
    + list(range(0x200, 0x210))           # MTRRphysBase/Mask 0..7
    + list(range(0x268, 0x270))           # MTRRfix4K_*
    + list(range(0x400, 0x400 + 4 * 10)))  # MCi_CTL/STATUS/ADDR/MISC, QEMU's 10 banks
_MC_BANKS = (0x400, 0x400 + 4 * 10)
# AMD's legacy performance counters, MSR_K7_EVNTSEL0..3 and MSR_K7_PERFCTR0..3: present on every
# AMD CPU since the K7 (no CPUID bit announces them; AMD APM vol. 2, 13.2.1), so on an
# AuthenticAMD model they read 0 and take writes, as KVM answers them for an AMD guest
# (amd_pmu_get_pmc / amd_is_valid_msr, arch/x86/kvm/svm/pmu.c, Linux 6.18; before 6.9 x86.c
# kvm_get_msr_common answered them for every guest). kvm-unit-tests' pmu_init resets them on
# an AMD model (the pcid tests run on qemu64, which is AuthenticAMD).
_AMD_K7_PMU_MSRS = range(0xC0010000, 0xC0010008)
_CANONICAL_MSRS = frozenset({MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_CSTAR, MSR_LSTAR})
_MSRS_64 = frozenset({MSR_LSTAR, MSR_CSTAR, MSR_FMASK, MSR_FS_BASE, MSR_GS_BASE,
                      MSR_KERNEL_GS_BASE})


def known_msr(index: int) -> bool:
    """Does the model implement MSR ``index`` (else rdmsr/wrmsr #GP(0), as KVM: an unsupported
    MSR is KVM_MSR_RET_UNSUPPORTED, injected as #GP by kvm_emulate_rdmsr/wrmsr)?"""
    return index in _KNOWN_MSRS


def canonical(value: int, bits: int = LINEAR_BITS) -> bool:
    top = value >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


class CpuSpecError(ValueError):
    """A --cpu argument that names no model or flag we can honour."""


@dataclass(frozen=True)
class CpuSpec:
    """A parsed ``--cpu`` argument: ``MODEL[,+flag|-flag|flag=on|off|phys-bits=N|vendor=V...]``."""
    model: str = DEFAULT_MODEL
    plus: tuple = ()
    minus: tuple = ()
    phys_bits: int | None = None
    vendor: str | None = None

    def text(self) -> str:
        parts = [self.model] + ["+" + f for f in self.plus] + ["-" + f for f in self.minus]
        if self.phys_bits is not None:
            parts.append(f"phys-bits={self.phys_bits}")
        if self.vendor is not None:
            parts.append(f"vendor={self.vendor}")
        return ",".join(parts)


def _flag(name: str, where: str) -> str:
    n = name.strip().lower().replace("_", "-")
    n = _ALIASES.get(n, n)
    if n not in FEATURES:
        raise CpuSpecError(f"--cpu {where}: unknown CPU flag {name!r} (known: "
                           f"{', '.join(sorted(FEATURES))})")
    return n


def parse_cpu_spec(text: str) -> CpuSpec:
    """Parse QEMU's -cpu syntax: ``qemu64,+pcid,-invpcid``, ``max``, ``haswell,pcid=on``,
    ``haswell,phys-bits=36``, ``max,vendor=GenuineIntel``. Raises CpuSpecError (one line)."""
    if not isinstance(text, str) or not text.strip():
        raise CpuSpecError("--cpu: empty CPU model (choose from " + ", ".join(MODELS) + ")")
    parts = [p.strip() for p in text.split(",")]
    model = parts[0].lower()
    if model not in MODELS:
        raise CpuSpecError(f"--cpu {text}: unknown CPU model {parts[0]!r} (choose from "
                           f"{', '.join(MODELS)})")
    plus, minus, phys, vendor = [], [], None, None
    for p in parts[1:]:
        if not p:
            raise CpuSpecError(f"--cpu {text}: empty item between commas")
        if p[0] in "+-":
            f = _flag(p[1:], text)
            (plus if p[0] == "+" else minus).append(f)
            continue
        key, eq, val = p.partition("=")
        key = key.strip().lower()
        val = val.strip()
        if not eq:
            raise CpuSpecError(f"--cpu {text}: {p!r} is neither +flag, -flag nor key=value")
        if key == "phys-bits":
            try:
                phys = int(val, 0)
            except ValueError:
                raise CpuSpecError(f"--cpu {text}: phys-bits must be a number, not {val!r}") from None
            if not 32 <= phys <= 52:
                raise CpuSpecError(f"--cpu {text}: phys-bits must be 32..52 (SDM: MAXPHYADDR is "
                                   f"at most 52), not {phys}")
        elif key == "vendor":
            if val not in _VENDORS:
                raise CpuSpecError(f"--cpu {text}: vendor must be one of {', '.join(_VENDORS)}, "
                                   f"not {val!r}")
            vendor = val
        else:
            f = _flag(key, text)
            if val.lower() in ("on", "true", "yes"):
                plus.append(f)
            elif val.lower() in ("off", "false", "no"):
                minus.append(f)
            else:
                raise CpuSpecError(f"--cpu {text}: {key}= takes on or off, not {val!r}")
    both = set(plus) & set(minus)
    if both:
        raise CpuSpecError(f"--cpu {text}: {', '.join(sorted(both))} both added and removed")
    return CpuSpec(model, tuple(plus), tuple(minus), phys, vendor)


def _bit(regs, feature) -> bool:
    leaf, sub, reg, bit = FEATURES[feature]
    r = regs.get((leaf, sub))
    return r is not None and bool(r[reg] >> bit & 1)


@dataclass(frozen=True)
class CpuModel:
    """A resolved model: its features, MAXPHYADDR, and CPUID as the guest sees it."""
    spec: CpuSpec
    uc_model: str                      # UC_CPU_X86_<uc_model>
    features: frozenset
    maxphyaddr: int
    vendor: str
    base_cpuid: dict = field(repr=False, compare=False, hash=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.text()

    def has(self, feature: str) -> bool:
        return feature in self.features

    # ---------------------------------------------------------------- CPUID
    def cpuid(self, leaf: int, subleaf: int, cr4: int):
        """(eax, ebx, ecx, edx) the guest must see for CPUID ``leaf``/``subleaf``, or None: the
        base model's own answer stands (the adapter then lets Unicorn execute CPUID).

        Changed leaves: 0 (vendor=), 1, 7.0, 0x80000001 (feature bits as the model says;
        CPUID.1:ECX.OSXSAVE[27] mirrors CR4.OSXSAVE as the SDM defines it; CPUID.7.0:ECX.OSPKE[4]
        is 0, PKE is never enabled), 0x80000008 (EAX[7:0] = MAXPHYADDR, EAX[15:8] = 48 linear
        address bits)."""
        key = (leaf, subleaf if leaf == 7 else 0)
        if leaf == 0 and self.spec.vendor is not None and key in self.base_cpuid:
            v = self.vendor.encode()
            ebx, edx, ecx = (int.from_bytes(v[i:i + 4], "little") for i in (0, 4, 8))
            return (self.base_cpuid[key][EAX], ebx, ecx, edx)
        if leaf == 0x80000008 and key in self.base_cpuid:
            r = list(self.base_cpuid[key])
            r[EAX] = (r[EAX] & ~0xFFFF) | (LINEAR_BITS << 8) | self.maxphyaddr
            return tuple(r)
        if key not in ((1, 0), (7, 0), (0x80000001, 0)) or key not in self.base_cpuid:
            return None
        r = list(self.base_cpuid[key])
        for f, (fl, fs, reg, bit) in FEATURES.items():
            if (fl, fs) == key:
                if f in self.features:
                    r[reg] |= 1 << bit
                else:
                    r[reg] &= ~(1 << bit)
        if key == (1, 0):
            r[ECX] = (r[ECX] & ~(1 << 27)) | ((1 << 27) if cr4 & CR4_OSXSAVE else 0)
        elif key == (7, 0):
            r[ECX] &= ~(1 << 4)
        return tuple(r)

    # ---------------------------------------------------------------- control registers
    def cr4_reserved(self) -> int:
        """CR4 bits whose setting raises #GP(0): KVM's CR4_RESERVED_BITS | __cr4_reserved_bits
        (the bits of features the model lacks)."""
        rsvd = ~_CR4_KNOWN | _CR4_NEVER
        for f, bit in _CR4_FEATURE:
            if f not in self.features:
                rsvd |= bit
        return rsvd & 0xFFFFFFFFFFFFFFFF

    def cr0_write_fault(self, old_cr0: int, cr0: int, cr4: int, efer: int, code64: bool):
        """mov to CR0 (Linux 6.18 kvm_is_valid_cr0 + kvm_set_cr0; SDM vol. 3A 2.5, and MOV--Move
        to/from Control Registers in vol. 2B)."""
        if cr0 >> 32:
            return "CR0 bits 63:32 set (kvm_is_valid_cr0)"
        if cr0 & CR0_NW and not cr0 & CR0_CD:
            return "CR0.NW without CR0.CD (kvm_is_valid_cr0)"
        if cr0 & CR0_PG and not cr0 & CR0_PE:
            return "CR0.PG without CR0.PE (kvm_is_valid_cr0)"
        if efer & EFER_LME and not old_cr0 & CR0_PG and cr0 & CR0_PG and not cr4 & CR4_PAE:
            return "CR0.PG with EFER.LME and CR4.PAE clear (kvm_set_cr0)"
        if not cr0 & CR0_PG and old_cr0 & CR0_PG:
            if code64:
                return "CR0.PG cleared in 64-bit mode (kvm_set_cr0)"
            if cr4 & CR4_PCIDE:
                return "CR0.PG cleared with CR4.PCIDE set (kvm_set_cr0)"
        return None

    def cr4_write_fault(self, old_cr4: int, cr4: int, cr3: int, long_mode: bool):
        """mov to CR4 (Linux 6.18 kvm_set_cr4, __cr4_reserved_bits; SDM vol. 3A 2.5, 4.10.1)."""
        bad = cr4 & self.cr4_reserved()
        if bad:
            return f"reserved CR4 bits {bad:#x} for this model (__cr4_reserved_bits)"
        if long_mode:
            if not cr4 & CR4_PAE:
                return "CR4.PAE cleared in long mode (kvm_set_cr4)"
            if (cr4 ^ old_cr4) & CR4_LA57:
                return "CR4.LA57 changed in long mode (kvm_set_cr4)"
        if cr4 & CR4_PCIDE and not old_cr4 & CR4_PCIDE:
            if cr3 & CR3_PCID_MASK:
                return "CR4.PCIDE set with CR3[11:0] != 0 (kvm_set_cr4)"
            if not long_mode:
                return "CR4.PCIDE set outside long mode (kvm_set_cr4)"
        return None

    def cr3_write(self, cr3: int, cr4: int):
        """mov to CR3 -> (value CR3 takes, #GP reason or None). With CR4.PCIDE, bit 63 is the
        no-flush hint and is not stored (kvm_set_cr3); the rest must be a legal guest-physical
        address: bits 63:MAXPHYADDR are reserved (kvm_set_cr3 -> kvm_vcpu_is_legal_cr3; SDM vol.
        3A 4.5: #GP on reserved CR3 bits in long mode, and CR3 is 32 bits wide outside it)."""
        if cr4 & CR4_PCIDE:
            cr3 &= ~CR3_PCID_NOFLUSH
        bad = cr3 >> self.maxphyaddr
        if bad:
            return cr3, f"CR3 bits 63:{self.maxphyaddr} set: not a legal guest-physical address " \
                        f"(kvm_set_cr3)"
        return cr3, None

    # ---------------------------------------------------------------- MSRs
    def has_msr(self, index: int) -> bool:
        """Does this model implement MSR ``index`` (known_msr, plus the vendor's own)?"""
        return known_msr(index) or (self.vendor == "AuthenticAMD" and index in _AMD_K7_PMU_MSRS)

    def rdmsr_fault(self, index: int):
        if not self.has_msr(index):
            return f"unknown MSR {index:#x}"
        if index == MSR_TSC_AUX and not (self.has("rdtscp") or self.has("rdpid")):
            return "IA32_TSC_AUX without RDTSCP or RDPID (kvm_get_msr_common)"
        return None

    def wrmsr_fault(self, index: int, value: int, efer: int, paging: bool):
        """wrmsr of ``value`` (EDX:EAX) to MSR ``index``; ``efer`` the current EFER, ``paging``
        CR0.PG."""
        r = self.rdmsr_fault(index)
        if r is not None:
            return r
        if index == MSR_EFER:
            return self.efer_write_fault(efer, value, paging)
        if index in _CANONICAL_MSRS and not canonical(value):
            return f"non-canonical address {value:#x} written to MSR {index:#x} (__kvm_set_msr)"
        if index == MSR_PAT and not _pat_valid(value):
            return f"invalid memory type in IA32_PAT {value:#x} (kvm_pat_valid)"
        if index == MSR_TSC_AUX and value >> 32 and self.vendor == "GenuineIntel":
            return "IA32_TSC_AUX bits 63:32 set on an Intel CPU (__kvm_set_msr)"
        if _MC_BANKS[0] <= index < _MC_BANKS[1]:
            # Linux 6.18 x86.c set_msr_mce: MCi_CTL takes 0 or all ones (bits 10 and 0 may be
            # clear, for old kernels' workarounds); MCi_STATUS only 0 (can_set_mci_status is
            # AMD's HWCR.McStatusWrEn, never set here)
            kind = (index - _MC_BANKS[0]) & 3
            if kind == 0 and value and (value | (1 << 10) | 1) != 0xFFFFFFFFFFFFFFFF:
                return f"IA32_MC{(index - _MC_BANKS[0]) >> 2}_CTL takes 0 or all ones (set_msr_mce)"
            if kind == 1 and value:
                return f"IA32_MC{(index - _MC_BANKS[0]) >> 2}_STATUS takes only 0 (set_msr_mce)"
        return None

    def efer_allowed(self) -> int:
        """EFER bits the model lets software set: SCE (with SYSCALL), LME and LMA (with LM),
        NXE (with NX) -- Linux 6.18 x86.c efer_reserved_bits (SCE, LME, LMA; NX enabled by
        kvm_enable_efer_bits) and __kvm_valid_efer. SVME and FFXSR are never offered."""
        allowed = 0
        if self.has("syscall"):
            allowed |= EFER_SCE
        if self.has("lm"):
            allowed |= EFER_LME | EFER_LMA
        if self.has("nx"):
            allowed |= EFER_NXE
        return allowed

    def efer_write_fault(self, old: int, new: int, paging: bool):
        """Linux 6.18 set_efer: reserved bits, then a change of EFER.LME while CR0.PG = 1."""
        bad = new & ~self.efer_allowed() & 0xFFFFFFFFFFFFFFFF
        if bad:
            return f"reserved EFER bits {bad:#x} for this model (set_efer, __kvm_valid_efer)"
        if paging and (old ^ new) & EFER_LME:
            return "EFER.LME changed while CR0.PG = 1 (set_efer)"
        return None

    # ---------------------------------------------------------------- instructions
    def ud_for(self, mnemonic: str):
        """#UD for an instruction the model lacks though Unicorn would run it: stac/clac need
        SMAP (SDM vol. 2B STAC: #UD if CPUID.7.0:EBX.SMAP[20] = 0), which is never offered."""
        if mnemonic in ("stac", "clac") and not self.has("smap"):
            return "stac/clac without SMAP"
        return None

    def invpcid_fault(self, kind: int, pcid: int, address: int, cr4: int):
        """invpcid type ``kind`` with the descriptor's PCID and linear address (SDM vol. 2A
        INVPCID; Linux 6.18 vmx.c handle_invpcid: type > 3 -> #GP; x86.c kvm_handle_invpcid:
        PCID above 0xfff, a non-canonical address for type 0, a nonzero PCID for types 0 and 1
        with CR4.PCIDE = 0 -> #GP)."""
        if kind > 3:
            return f"INVPCID type {kind} (only 0..3 exist)"
        if pcid >> 12:
            return f"INVPCID descriptor PCID {pcid:#x} above 0xfff"
        if kind in (0, 1) and pcid and not cr4 & CR4_PCIDE:
            return f"INVPCID type {kind} with PCID {pcid} while CR4.PCIDE = 0"
        if kind == 0 and not canonical(address):
            return f"INVPCID type 0 with non-canonical address {address:#x}"
        return None


def _pat_valid(data: int) -> bool:
    """Linux 6.18 x86.h kvm_pat_valid: each byte 0, 1, 4, 5, 6 or 7."""
    if data & 0xF8F8F8F8F8F8F8F8:
        return False
    return (data | ((data & 0x0202020202020202) << 1)) == data


def resolve(spec: CpuSpec, base_cpuid: dict, *, mmu: str = "shadow") -> CpuModel:
    """The model ``spec`` asks for, on top of the base model's CPUID ``base_cpuid`` ({(leaf,
    subleaf): (eax, ebx, ecx, edx)} as Unicorn answers it). Raises CpuSpecError for a flag we
    cannot back, and for phys-bits other than Unicorn's 40 under ``--mmu native`` (Unicorn's
    walker has MAXPHYADDR 40 compiled in)."""
    features = {f for f in FEATURES if _bit(base_cpuid, f)}
    features -= set(UNSUPPORTED)
    plus = list(spec.plus) + (list(_MAX_EXTRA) if spec.model == "max" else [])
    for f in plus:
        if f in UNSUPPORTED:
            raise CpuSpecError(f"--cpu {spec.text()}: +{f} is not supported: {UNSUPPORTED[f]}")
        if f not in features and f not in EMULATED:
            raise CpuSpecError(f"--cpu {spec.text()}: +{f}: the {spec.model} model cannot do it "
                               f"(Unicorn's {MODELS[spec.model]} lacks it and x86shadow does "
                               f"not emulate it; emulated: {', '.join(sorted(EMULATED))})")
        features.add(f)
    for f in spec.minus:
        if f in UNSUPPORTED:
            continue
        if f in features and f not in REMOVABLE:
            raise CpuSpecError(f"--cpu {spec.text()}: -{f}: x86shadow cannot remove it (Unicorn "
                               f"would still execute it; removable: {', '.join(sorted(REMOVABLE))})")
        features.discard(f)
    phys = spec.phys_bits if spec.phys_bits is not None else TCG_PHYS_BITS
    if mmu == "native" and phys != TCG_PHYS_BITS:
        raise CpuSpecError(f"--cpu {spec.text()}: phys-bits={phys} needs --mmu shadow (Unicorn's "
                           f"own walker has MAXPHYADDR {TCG_PHYS_BITS} compiled in)")
    base0 = base_cpuid.get((0, 0))
    vendor = spec.vendor
    if vendor is None and base0 is not None:
        vendor = b"".join(base0[r].to_bytes(4, "little") for r in (EBX, EDX, ECX)).decode(
            "ascii", "replace")
    return CpuModel(spec, MODELS[spec.model], frozenset(features), phys, vendor or "",
                    dict(base_cpuid))


# the CPUID leaves the adapter reads from Unicorn for the base model
BASE_LEAVES = ((0, 0), (1, 0), (7, 0), (0x80000000, 0), (0x80000001, 0), (0x80000008, 0))
