"""The machine: guest RAM, firmware + program loading, devices, counters, trace, the run loop."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR2, UC_X86_REG_CR3, UC_X86_REG_CR4,
                               UC_X86_REG_CS, UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_FS,
                               UC_X86_REG_GDTR, UC_X86_REG_GS,
                               UC_X86_REG_SS)

from . import layout
from .cpu.delivery import GuestCrash, vector_name
from .cpu.vcpu import VCPU
from .mmu.core import new_counters
from .physmem import PhysMem

MODES = ("32", "pae", "64")
MMUS = ("shadow", "native")


class Tracer:
    """``--trace``: one JSON object per event, KVM tracepoint-style names."""

    def __init__(self, fp):
        self.fp = fp
        self.n = 0

    def __call__(self, event, **fields):
        self.n += 1
        fields["event"] = event
        self.fp.write(json.dumps(fields, separators=(",", ":")) + "\n")


@dataclass
class RunResult:
    status: int                      # process exit status (DESIGN.md 2.1)
    how: str                         # "halt" | "exit" | "crash"
    crash: GuestCrash | None = None
    report: str = ""
    counters: dict = field(default_factory=dict)


def _seg_desc(base, limit, access, flags):
    d = limit & 0xFFFF
    d |= (base & 0xFFFFFF) << 16
    d |= (access & 0xFF) << 40
    d |= ((limit >> 16) & 0xF) << 48
    d |= (flags & 0xF) << 52
    d |= ((base >> 24) & 0xFF) << 56
    return d


class Machine:
    def __init__(self, mode: str, *, mmu: str = "shadow", policy=None, ram_mib: int = 128,
                 trace=None, audit: bool = False, serial_out=None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        if mmu not in MMUS:
            raise ValueError(f"unknown MMU {mmu!r} (choose from {', '.join(MMUS)})")
        if ram_mib < 64 or (mode != "64" and ram_mib > 4096) or ram_mib > 65536:
            raise ValueError(f"--ram {ram_mib}: must be at least 64 MiB"
                             f" and at most {4096 if mode != '64' else 65536} MiB in mode {mode}")
        self.mode = mode
        self.mmu_kind = mmu
        self.ram_size = ram_mib << 20
        self.mem = PhysMem(self.ram_size)
        self.counters = new_counters()
        self.trace = trace
        self.output = bytearray()
        self._serial_sink = serial_out
        if policy is not None and mmu == "shadow":
            from .policies import make_policy
            policy = make_policy(policy) if isinstance(policy, str) else policy
        else:
            policy = None
        self.policy = policy
        self.vcpu = VCPU(mode, self.mem, mmu_kind=mmu, counters=self.counters, trace=trace,
                         policy=policy)
        self.vcpu.serial_out = self._serial
        self.markers = []                # [(value, counters at that moment)]: guest writes to 0xf5
        self.vcpu.marker = lambda value: self.markers.append((value, dict(self.counters)))
        if audit and self.vcpu.mmu is not None:
            from .mmu.audit import audit as run_audit
            mmu_obj = self.vcpu.mmu
            self.vcpu.mmu.after_exit = lambda: run_audit(mmu_obj)
        self.program = None

    def _serial(self, data: bytes):
        self.output += data
        if self._serial_sink is not None:
            self._serial_sink(data)

    # ------------------------------------------------------------------ loading and boot
    def load(self, program, firmware: bytes) -> None:
        if program.base + len(program.code) > layout.PROG_LIMIT:
            raise ValueError(f"program is {len(program.code)} bytes: it must end below 16 MiB")
        self.mem.write(layout.FW_BASE, firmware)
        self.mem.write(program.base, program.code)
        self.program = program

    def _boot_state(self) -> None:
        uc = self.vcpu.uc
        if self.mode == "64":
            gdt = [0, _seg_desc(0, 0xFFFFF, 0x9A, 0xA), _seg_desc(0, 0xFFFFF, 0x92, 0xC)]
        else:
            gdt = [0, _seg_desc(0, 0xFFFFF, 0x9A, 0xC), _seg_desc(0, 0xFFFFF, 0x92, 0xC)]
        self.mem.write(layout.FW_GDT, b"".join(struct.pack("<Q", d) for d in gdt))
        uc.reg_write(UC_X86_REG_GDTR, (0, layout.FW_GDT, len(gdt) * 8 - 1, 0))
        if self.mode != "64":
            uc.reg_write(UC_X86_REG_CR0, 0x11)               # PE | ET, paging off
        uc.reg_write(UC_X86_REG_CS, layout.SEL_KCODE)
        for rid in (UC_X86_REG_SS, UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_FS, UC_X86_REG_GS):
            uc.reg_write(rid, layout.SEL_KDATA)
        uc.reg_write(self.vcpu.R_SP, layout.STACK_TOP)
        if self.vcpu.mmu is not None:
            self.vcpu._set_context()

    def run(self, max_insns: int = 0) -> RunResult:
        self._boot_state()
        stop = self.vcpu.run(layout.FW_BASE, max_insns)
        if stop[0] == "halt":
            return RunResult(0, "halt", counters=self.counters)
        if stop[0] == "exit":
            return RunResult(stop[1], "exit", counters=self.counters)
        crash = stop[1]
        return RunResult(4, "crash", crash, self.crash_report(crash), self.counters)

    # ------------------------------------------------------------------ reporting
    def crash_report(self, crash: GuestCrash) -> str:
        v = self.vcpu
        rip = crash.rip if crash.rip is not None else v.rip()
        lines = [f"x86shadow: guest crashed: {crash.reason}"]
        if crash.vector is not None:
            ec = "none" if crash.error_code is None else f"{crash.error_code:#x}"
            if crash.vector == 14 and crash.error_code is not None:
                e = crash.error_code
                ec += " [" + " ".join(f"{n}={(e >> b) & 1}" for n, b in
                                      (("P", 0), ("W", 1), ("U", 2), ("RSVD", 3), ("I/D", 4))) + "]"
            lines.append(f"  vector      {crash.vector} ({vector_name(crash.vector)}), error code {ec}")
        cr2 = crash.cr2 if crash.cr2 is not None else v.reg(UC_X86_REG_CR2)
        cs = v.reg(UC_X86_REG_CS)
        lines.append(f"  RIP {rip:#x}  CS {cs:#x} (CPL {cs & 3})  RSP {v.reg(v.R_SP):#x}")
        lines.append(f"  CR0 {v.reg(UC_X86_REG_CR0):#x}  CR2 {cr2:#x}  CR3 {v.reg(UC_X86_REG_CR3):#x}"
                     f"  CR4 {v.reg(UC_X86_REG_CR4):#x}  mode {self.mode}, mmu {self.mmu_kind}")
        lines.append(f"  instruction {self.describe_insn(rip)}")
        return "\n".join(lines)

    def describe_insn(self, rip) -> str:
        from .emulate.decode import decode
        try:
            code = self.vcpu.read_virt(rip, 15)
        except Exception:                                 # noqa: BLE001 - report, never raise
            try:
                code = self.vcpu.read_virt(rip, 0x1000 - (rip & 0xFFF))
            except Exception:                             # noqa: BLE001
                return f"{rip:#x}: <not mapped>"
        d = decode(code, rip, self.vcpu.bits)
        if d is None:
            return f"{rip:#x}: <cannot decode: {code[:8].hex(' ')}>"
        return f"{rip:#x}: {d.text}   ({d.bytes.hex(' ')})"

    def read_phys(self, pa, n) -> bytes:
        return self.mem.read(pa, n)
