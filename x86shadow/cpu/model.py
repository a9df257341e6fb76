"""The CPU model on Unicorn: the base model's CPUID read from Unicorn itself, the CPUID hook,
and the checks the vCPU makes before it lets Unicorn run an intercepted privileged instruction
(the rules are x86shadow/cpu_model.py's; this module reads the registers they need).

Unicorn 2.1.4 facts this relies on (measured):
- ``ctl_set_cpu_model`` works in UC_MODE_32 and UC_MODE_64; the default 64-bit model answers
  CPUID exactly as UC_CPU_X86_HASWELL.
- A ``UC_HOOK_INSN`` / ``UC_X86_INS_CPUID`` hook that returns 1 skips QEMU's CPUID: the hook
  writes EAX..EDX itself. ``UC_X86_INS_RDMSR`` / ``WRMSR`` hooks are refused (UC_ERR_ARG), so
  rdmsr / wrmsr are found by the privileged-instruction scanner (cpu/privileged.py) instead.
- ``emu_stop()`` in a one-address ``UC_HOOK_CODE`` hook stops before that instruction runs, so a
  #GP decided there leaves the guest state as the faulting instruction found it.
- ``invpcid`` and ``rdpid`` raise #UD on every model (UC_HOOK_INSN_INVALID with RIP on them);
  ``stac`` runs on models whose QEMU definition has SMAP (Skylake-Server and later).
"""
from __future__ import annotations

import struct
from functools import lru_cache

import unicorn.x86_const as xc
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_32, UC_MODE_64, Uc
from unicorn.x86_const import (UC_X86_INS_CPUID, UC_X86_REG_CR0, UC_X86_REG_CR4,
                               UC_X86_REG_CS, UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX,
                               UC_X86_REG_EDX, UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX,
                               UC_X86_REG_RDX)

from .. import cpu_model as cm
from ..faults import VEC_GP, VEC_UD

_CPUID_CODE = b"\x0f\xa2"


@lru_cache(maxsize=None)
def base_cpuid(bits: int, uc_model: str) -> tuple:
    """The base model's CPUID for cpu_model.BASE_LEAVES, from a throw-away Unicorn CPU."""
    out = []
    for leaf, sub in cm.BASE_LEAVES:
        uc = Uc(UC_ARCH_X86, UC_MODE_64 if bits == 64 else UC_MODE_32)
        uc.ctl_set_cpu_model(getattr(xc, "UC_CPU_X86_" + uc_model))
        uc.mem_map(0, 0x2000)
        uc.mem_write(0x1000, _CPUID_CODE)
        uc.reg_write(UC_X86_REG_EAX, leaf)
        uc.reg_write(UC_X86_REG_ECX, sub)
        uc.emu_start(0x1000, 0x1000 + len(_CPUID_CODE))
        out.append(((leaf, sub), tuple(uc.reg_read(r) & 0xFFFFFFFF for r in (
            UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX))))
    return tuple(out)


def make_model(cpu, bits: int, mmu: str = "shadow") -> cm.CpuModel:
    """A CpuModel from a --cpu string, a CpuSpec or a CpuModel (returned as is)."""
    if isinstance(cpu, cm.CpuModel):
        return cpu
    if cpu is None:
        spec = cm.CpuSpec()
    elif isinstance(cpu, cm.CpuSpec):
        spec = cpu
    else:
        spec = cm.parse_cpu_spec(cpu)
    return cm.resolve(spec, dict(base_cpuid(bits, cm.MODELS[spec.model])), mmu=mmu)


class ModelChecks:
    """The model's checks on one vCPU. ``before(insn)`` for an intercepted instruction at CPL0
    -> None (let it run) or ``(vector, error_code, reason)``; ``cr3_value`` for the value a mov
    to CR3 stores; ``emulate_ud(insn)`` for an instruction Unicorn raised #UD on that the model
    has (invpcid)."""

    def __init__(self, vcpu, model: cm.CpuModel):
        self.vcpu = vcpu
        self.model = model
        self.wide = vcpu.bits == 64
        r = (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX) if self.wide else (
            UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX)
        self._regs = r
        vcpu.uc.hook_add(UC_HOOK_INSN, self._cpuid, None, 1, 0, UC_X86_INS_CPUID)

    # ---------------------------------------------------------------- CPUID
    def _cpuid(self, uc, _ud):
        v = self.vcpu
        leaf = v.reg(UC_X86_REG_EAX) & 0xFFFFFFFF
        sub = v.reg(UC_X86_REG_ECX) & 0xFFFFFFFF
        regs = self.model.cpuid(leaf, sub, v.reg(UC_X86_REG_CR4))
        if regs is None:
            return 0                      # Unicorn's own answer
        for rid, value in zip(self._regs, regs):
            v.set_reg(rid, value & 0xFFFFFFFF)
        return 1

    # ---------------------------------------------------------------- intercepted instructions
    def _code64(self) -> bool:
        """64-bit mode: EFER.LMA and CS.L (SDM vol. 3A 2.2.1), i.e. the width the vCPU decodes
        with (VCPU.code_bits: a program's mode, or QEMU's HF_CS64 = LMA && CS.L for a kernel) --
        not a read of the CS cache, which costs a context copy per intercepted instruction."""
        v = self.vcpu
        return v.long_mode() and v.code_bits() == 64

    def before(self, insn):
        v = self.vcpu
        m = self.model
        mn = insn.mnemonic
        reason = None
        if mn == "mov":
            dst, src = [s.strip() for s in insn.op_str.split(",")]
            if not dst.startswith("cr"):
                return None
            crn = int(dst[2:])
            if crn not in (0, 3, 4):
                return None
            value = v.reg_by_name(src)
            code64 = self.wide and self._code64()
            if not code64:
                # outside 64-bit mode the operand is 32 bits (a 64-bit CPU decodes compatibility
                # mode code as 64-bit: the register's upper half is not part of it)
                value &= 0xFFFFFFFF
            if crn == 0:
                reason = m.cr0_write_fault(v.cr0(), value, v.cr4(), v.efer(), code64)
            elif crn == 3:
                reason = m.cr3_write(value, v.cr4())[1]
            elif crn == 4:
                reason = m.cr4_write_fault(v.cr4(), value, v.cr3(), v.long_mode())
        elif mn in ("rdmsr", "wrmsr"):
            index = v.reg(UC_X86_REG_ECX) & 0xFFFFFFFF
            if index in v.msr_handlers:
                return None                   # a device's MSR: its handler decides
            if mn == "rdmsr":
                reason = m.rdmsr_fault(index)
            else:
                value = (v.reg(UC_X86_REG_EDX) & 0xFFFFFFFF) << 32 | (v.reg(UC_X86_REG_EAX) & 0xFFFFFFFF)
                reason = m.wrmsr_fault(index, value, v.efer(),
                                       bool(v.reg(UC_X86_REG_CR0) & cm.CR0_PG))
        elif mn in ("stac", "clac"):
            reason = m.ud_for(mn)
            if reason is not None:
                return (VEC_UD, None, reason)
        if reason is None:
            return None
        return (VEC_GP, 0, reason)

    def cr3_value(self, value: int) -> int:
        return self.model.cr3_write(value, self.vcpu.cr4())[0]

    def emulate_ud(self, insn):
        """Unicorn raised #UD on ``insn``. None: it stands (the model lacks the instruction too);
        else ``(vector, error_code, reason)`` to deliver instead, or ``()`` when the instruction
        was emulated (the caller resumes at its next instruction). Raises Fault (#PF) when the
        descriptor read faults."""
        if insn is None or insn.mnemonic != "invpcid" or not self.model.has("invpcid"):
            return None
        v = self.vcpu
        if v.reg(UC_X86_REG_CS) & 3:
            return (VEC_GP, 0, "INVPCID at CPL > 0")
        reg = insn.op_str.split(",")[0].strip()
        kind = v.reg_by_name(reg)
        if not self.wide:
            kind &= 0xFFFFFFFF
        ea = insn.mem_operand.effective_address(v.reg_by_name, insn.next_ip)
        lo, address = struct.unpack("<QQ", v.read_virt(ea, 16))
        reason = self.model.invpcid_fault(kind, lo, address, v.reg(UC_X86_REG_CR4))
        if reason is not None:
            return (VEC_GP, 0, reason)
        v.invpcid_flush(kind, address)
        return ()

