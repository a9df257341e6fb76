"""The VM: guest RAM (and, on request, the host memory under it), the VM-wide shadow MMU, the
port and MMIO buses and their devices, the event sink, the vCPUs (with several, the scheduler of
vm_scheduler.py), and the run loop that turns the vCPUs' exits into a run result."""
from __future__ import annotations

from dataclasses import dataclass, field

from unicorn.x86_const import UC_X86_REG_CS

from . import events as ev
from . import stopping
from .boot.firmware import firmware_boot, kernel_boot
from .counters import new_counters
from .cpu.vcpu import VCPU
from .devices.bus import Bus
from .devices.pc import attach_pc_devices
from .devices.qemu import MSR_IA32_APICBASE, attach_qemu_devices
from .exits import ExitKind
from .faults import GuestCrash, vector_name
from .memory.host import HostFault, HostMM, HostPages, HostViolation
from .memory.ram import PhysMem
from .mmu.audit import AuditError

MODES = ("32", "pae", "64")
MMUS = ("shadow", "native")
TLBS = ("virtual", "walker")         # the fill hook, or Unicorn's walker over the image (--tlb)
INTERRUPTED_STATUS = 130             # a run stopped from outside (request_stop: Ctrl-C, watchdog)
VIOLATION_STATUS = 6                 # the host caught the flush-before-free rule broken, or the
                                     # audit an invariant (docs/GUEST_CONTRACT.md)


@dataclass(frozen=True)
class HostConfig:
    """Host memory under the guest (docs/HOST_MEMORY.md): memslots -> host pages the host may
    swap, migrate and merge. ``schedule``: the --host rules (memory/schedule.py; "" = host pages
    but no scheduled operation); ``notifiers``: KVM's notifier era, "2008" or "modern";
    ``break_flush``: --break flush-before-free; ``target``: where operations pick their page;
    ``spare_pages``: host pages beyond guest RAM (default RAM / 8, at least 1024);
    ``tlb_check``: the host refuses to free a page a vCPU's TLB may still map (HostViolation);
    False leaves detection to the poison check and the guest (a test knob); ``aging``: KVM's
    aging variant, "VARIANT[:A_BITS]" (mmu/aging.py, docs/AGING.md; None = the era's own:
    "2008" for notifiers "2008", "6.15" for "modern")."""
    schedule: str = ""
    seed: int = 0
    notifiers: str = "modern"
    break_flush: bool = False
    target: str = "mapped"
    spare_pages: int | None = None
    tlb_check: bool = True
    script: str = ""                  # a host script's text (memory/schedule.py parse_script)
    aging: str | None = None


@dataclass
class RunResult:
    status: int                      # process exit status (docs/GUEST_CONTRACT.md)
    how: str                         # "halt" | "exit" | "crash" | "interrupted"
    crash: GuestCrash | None = None
    report: str = ""
    counters: dict = field(default_factory=dict)
    exit_kind: ExitKind | None = None


RAM_MIN_MIB = 64                     # the firmware identity-maps at least this much
RAM_MAX_MIB = {"32": 4096, "pae": 4096, "64": 65536}
# a kernel machine (mode None): its RAM lies below 3 GiB, under QEMU's PCI hole, where the
# multiboot memory map and mem_upper describe it; the boot stub needs the first 2 MiB
KERNEL_RAM_MIN_MIB, KERNEL_RAM_MAX_MIB = 2, 3072


def check_vcpus(n: int) -> None:
    """--vcpus: 1..MAX_VCPUS (the firmware's per-vCPU stacks and TSSes: layout.py)."""
    from .layout import MAX_VCPUS
    if not isinstance(n, int) or not 1 <= n <= MAX_VCPUS:
        raise ValueError(f"--vcpus {n}: the number of vCPUs must be 1..{MAX_VCPUS}")


def check_ram(mode: str | None, ram_mib: int) -> None:
    """Guest RAM limits per mode (ValueError naming them): modes 32 and PAE address 4 GiB; the
    64-bit firmware identity-maps RAM with 2 MiB pages from tables below 4 MiB; a kernel's RAM
    is below 3 GiB (mode None)."""
    if mode is None:
        if not KERNEL_RAM_MIN_MIB <= ram_mib <= KERNEL_RAM_MAX_MIB:
            raise ValueError(f"--ram {ram_mib}: a kernel's guest RAM must be "
                             f"{KERNEL_RAM_MIN_MIB}..{KERNEL_RAM_MAX_MIB} MiB")
        return
    top = RAM_MAX_MIB.get(mode)
    if top is None:
        raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if not RAM_MIN_MIB <= ram_mib <= top:
        raise ValueError(f"--ram {ram_mib}: guest RAM must be {RAM_MIN_MIB}..{top} MiB in mode "
                         f"{mode}")


class Machine:
    """``mode``: "32", "pae" or "64" for a program behind the firmware (``load``), or None for
    a kernel that sets up its own paging (``load_kernel``, docs/KERNELS.md; or
    ``Machine.for_kernel``): its vCPU's code width and paging mode follow the guest's
    registers, and it has the QEMU devices of devices/qemu.py.

    ``trace``: a subscriber ``fn(kind, fields)`` for every tracepoint event (e.g.
    ``events.JsonTrace``); more subscribers with ``machine.events.subscribe``. ``cpu``: the CPU
    model, a ``--cpu`` string such as ``"qemu64,+pcid"`` (docs/CPU_MODEL.md; default haswell)."""

    def __init__(self, mode: str | None, *, mmu: str = "shadow", policy=None, ram_mib: int = 128,
                 trace=None, audit: bool = False, serial_out=None, unsync=None,
                 host: HostConfig | None = None, cpu=None, planted_bug: str | None = None,
                 vcpus: int = 1, schedule=None, scoped_flushes: bool = True,
                 tlb: str = "virtual"):
        # planted_bug: test-only, breaks the shadow MMU on purpose (mmu/vm_mmu.py PLANTED_BUGS)
        # scoped_flushes: False flushes the whole TLB for every KVM flush, as before
        # (docs/PERFORMANCE.md; for measurements and tests)
        # tlb: how the shadow MMU's translations reach Unicorn: "virtual" (the fill hook,
        # default) or "walker" (Unicorn's walker over an image of the shadow tables,
        # cpu/walker.py; no host memory manager)
        # vcpus, schedule: several vCPUs (docs/SMP.md; schedule: a --schedule string or a
        # vm_scheduler.Schedule, default round robin)
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        if mmu not in MMUS:
            raise ValueError(f"unknown MMU {mmu!r} (choose from {', '.join(MMUS)})")
        check_ram(mode, ram_mib)
        check_vcpus(vcpus)
        if tlb not in TLBS:
            raise ValueError(f"unknown TLB mode {tlb!r} (choose from {', '.join(TLBS)})")
        if tlb == "walker":
            from .cpu.walker import check_walker_config
            check_walker_config(mmu=mmu, host=host)
        self.tlb = tlb
        if mode is None and vcpus > 1:
            raise ValueError(f"--vcpus {vcpus}: a kernel runs on one vCPU (starting application "
                             "processors with INIT/SIPI through the APIC is not modelled yet)")
        self.mode = mode
        self.mmu_kind = mmu
        self.ram_size = ram_mib << 20
        self.counters = new_counters()
        self.events = ev.EventBus()
        self.host = self.host_schedule = None
        rules, script = [], []
        if host is not None:
            from .memory.schedule import parse_schedule, parse_script
            if mmu != "shadow":
                raise ValueError("host memory (--host, --notifiers, --break) needs --mmu shadow: "
                                 "under Unicorn's own MMU guest-physical memory is host memory")
            rules = parse_schedule(host.schedule) if host.schedule else []
            script = parse_script(host.script) if host.script else []
            frames = self.ram_size >> 12
            spare = host.spare_pages if host.spare_pages is not None else max(1024, frames // 8)
            self.host_phys = PhysMem(self.ram_size + (spare << 12))
            self.host = HostMM(HostPages(self.host_phys, frames), frames, host.notifiers,
                               self.counters, self.events)
            self.host.pages.clock = self._host_clock
            self.mem = None
        else:
            self.mem = self.host_phys = PhysMem(self.ram_size)
        if trace is not None:
            self.events.subscribe(self._traced(trace))
        self.output = bytearray()
        self._serial_sink = serial_out
        self.ports = Bus("port")
        self.mmio = Bus("mmio")
        self.apic = None
        if mode is None:
            self.apic = attach_qemu_devices(self.ports, self.mmio, self._serial, self.ram_size)
        else:
            attach_pc_devices(self.ports, self.events, self._serial)
        self.markers = []                # [(value, counters at that moment)]: guest writes to 0xf5
        self.events.subscribe(self._on_marker, (ev.MARKER,))
        self.vm_mmu = None
        if mmu == "shadow":
            from .mmu.vm_mmu import VmMmu
            from .policies import DEFAULT_POLICY, make_policy
            if policy is None:
                policy = DEFAULT_POLICY
            if isinstance(policy, str):
                policy = make_policy(policy, unsync)
            elif unsync is not None:
                raise ValueError("unsync is chosen with the policy's name, not with a policy object")
            self.vm_mmu = VmMmu(self.mem, self.counters, self.events, policy=policy,
                                host=self.host,
                                notifiers=host.notifiers if host is not None else "modern",
                                break_flush=host is not None and host.break_flush,
                                aging=host.aging if host is not None else None,
                                planted_bug=planted_bug)
            self.mem = self.vm_mmu.mem
            if self.host is not None:
                from .memory.schedule import HostSchedule
                self.host_schedule = HostSchedule(self.host, self.vm_mmu, rules, host.seed,
                                                  host.target, script)
                if host.tlb_check:
                    self.host.pages.on_free = self._check_tlb_on_free
            if audit:
                from .mmu.audit import audit as run_audit
                vm_mmu = self.vm_mmu
                if tlb == "walker":
                    def audit_walker(_kind, _fields, vm_mmu=vm_mmu):
                        # the A/D bits the hardware set in the image belong to the sptes
                        if vm_mmu.image is not None:
                            vm_mmu.image.harvest_ad()
                        run_audit(vm_mmu)
                    self.events.subscribe(audit_walker, (ev.EXIT,))
                else:
                    self.events.subscribe(lambda _kind, _fields: run_audit(vm_mmu), (ev.EXIT,))
        self.policy = self.vm_mmu.policy if self.vm_mmu is not None else None
        self.vcpus = []
        for index in range(vcpus):
            # every vCPU its own Unicorn instance over the same host buffer (mem_map_ptr)
            v = VCPU(mode, self.mem, vm_mmu=self.vm_mmu, counters=self.counters,
                     events=self.events, bus=self.ports, host_mem=self.host_phys,
                     host_tick=self.host_schedule.tick if self.host_schedule else None,
                     host_rewritten=self.host.pages.rewritten if self.host else None,
                     cpu=cpu, mmio=self.mmio, tlb=tlb if mmu == "shadow" else "virtual")
            if self.apic is not None:
                v.msr_handlers[MSR_IA32_APICBASE] = self.apic.msr()
            v.index = index
            if audit and vcpus > 1 and v.mmu is not None:
                v.mmu.tlb_record = {}                 # what its TLB may hold (mmu/audit.py)
            self.vcpus.append(v)
        self.vcpu = self.current_vcpu = self.vcpus[0]
        if (scoped_flushes and self.vm_mmu is not None and vcpus == 1 and self.host is None
                and tlb == "virtual"):
            self.vcpu.enable_scoped_flushes()
        self.scheduler = None
        if vcpus > 1:
            from .vm_scheduler import Schedule, VmScheduler, parse_schedule
            if schedule is None:
                schedule = Schedule("rr")
            elif isinstance(schedule, str):
                schedule = parse_schedule(schedule)
            self.scheduler = VmScheduler(self, schedule)
        self.program = None
        self.kernel = None
        self.boot = None

    @classmethod
    def for_kernel(cls, **kw) -> "Machine":
        """A machine for a multiboot kernel (``Machine(None, **kw)``)."""
        return cls(None, **kw)

    def _host_clock(self) -> str:
        try:
            rip = f", guest RIP {self.current_vcpu.rip():#x}"
        except Exception:                               # noqa: BLE001 - a report, never raise
            rip = ""
        return f"at exit {self.counters['exits']}{rip}"

    def _check_tlb_on_free(self, pfn, tag) -> None:
        """The flush-before-free check, by owner: no vCPU's TLB may still map a page the host
        frees (each fill records the pages it handed the CPU until the CPU's next flush)."""
        for v in self.vm_mmu.vcpus:
            filled = v.tlb_pfns.get(pfn) if v.tlb_pfns is not None else None
            if filled is not None:
                raise HostViolation(
                    "a host page was freed while a vCPU's TLB may still map it",
                    f"{self.host.pages.describe(pfn)}; vCPU {v.id} filled it at exit {filled} "
                    "and its TLB was not flushed since",
                    f"the host was freeing it, {self._host_clock()}")

    def _traced(self, trace):
        """The trace subscriber, with the guest instruction count in every event while
        instructions are counted (``run(max_insns)``)."""
        at_exit = [None]          # the count at the last kvm_exit (None: none yet)

        def sub(kind, fields):
            v = self.current_vcpu
            if kind == ev.KVM_ENTRY:
                # written lazily: the guest has not run since that exit (or since the start)
                n = at_exit[0]
                if n is None and v.insns_now() is not None:
                    n = 0
            else:
                n = v.insns_now()
                if kind == ev.KVM_EXIT:
                    at_exit[0] = n
            if self.scheduler is not None:
                fields = {**fields, "vcpu": v.index}     # several vCPUs: whose event
            trace(kind, fields if n is None else {**fields, "insns": n})
        return sub

    def _serial(self, data: bytes):
        self.output += data
        if self._serial_sink is not None:
            self._serial_sink(data)

    def _on_marker(self, _kind, fields):
        self.markers.append((fields["value"], dict(self.counters)))

    def stats_record(self) -> dict:
        """``--stats-json`` (docs/JSON_RECORDS.md): the counters, and the marker-port writes in
        order, each with the counters at that moment."""
        record = {**self.counters,
                  "markers": [{"value": v, "counters": c} for v, c in self.markers]}
        if self.scheduler is not None:
            record["smp"] = self.scheduler.stats()       # several vCPUs (docs/SMP.md)
        return record

    # ------------------------------------------------------------------ loading and boot
    def load(self, program, firmware: bytes) -> None:
        """The firmware boot (boot/firmware.py): images into RAM; the CPU starts at run()."""
        self.boot = firmware_boot(self.mode, program, firmware)
        for addr, data in self.boot.images:
            self.mem.write(addr, data)
        for v in self.vcpus:
            v.delivery.crash_gates = self.boot.crash_gates
        self.program = program

    def load_kernel(self, kernel) -> None:
        """A multiboot kernel (boot/multiboot.py ``load_multiboot``) behind the boot stub that
        leaves long mode (firmware/multiboot_leave64.asm); the CPU starts at run()."""
        if self.mode is not None:
            raise ValueError(f"a kernel sets up its own paging: make the machine with mode None "
                             f"(Machine.for_kernel), not mode {self.mode}")
        if kernel.ram_size != self.ram_size:
            raise ValueError("the kernel was loaded for another RAM size")
        from .asm import assemble_leave64
        self.boot = kernel_boot(kernel, assemble_leave64(kernel.entry, kernel.info_addr))
        for addr, n in kernel.zero:
            self.mem.write(addr, bytes(n))
        for addr, data in self.boot.images:
            self.mem.write(addr, data)
        self.vcpu.delivery.crash_gates = self.boot.crash_gates
        self.kernel = kernel
        self.vcpu.at_address(kernel.entry, self._kernel_entered)

    def _kernel_entered(self) -> None:
        """The kernel's first instruction: the boot stub's identity map is no guest page table
        any more. A real multiboot loader never had paging on; ours did only because Unicorn
        starts in long mode, so its tables stop being shadowed (and write-tracked) here instead
        of lingering until the kernel reuses the memory."""
        if self.vm_mmu is None:
            return
        from .boot.multiboot import LOADER_TABLES
        for gfn in LOADER_TABLES:
            self.vm_mmu.unprotect(gfn, "boot stub tables")
        self.vcpu.service_requests()

    def run(self, max_insns: int = 0, *, resume: bool = False, drive=None) -> RunResult:
        """Boot and run the guest. ``max_insns``: stop after that many instructions retired
        (how "runaway"); ``resume``: go on from where such a stop left the guest instead of
        booting (with a bigger ``max_insns``: it counts from the boot). ``drive(max_insns) ->
        Exit``, if given, runs the vCPU instead of one ``run_once`` (the gdb session:
        gdb_session.py)."""
        if self.boot is None:
            raise ValueError("nothing loaded: call load() first")
        if not resume:
            self._boot_vcpus()
        try:
            if self.scheduler is not None:
                if drive is not None:
                    raise ValueError("a debugger drives one vCPU: run it with vcpus=1")
                ex, self.current_vcpu = self.scheduler.run(max_insns)
            else:
                ex = self.vcpu.run_once(max_insns) if drive is None else drive(max_insns)
            if self.host is not None:
                self.host.pages.check_free_pages()       # a stale write after the last check
        except HostViolation as v:
            return RunResult(VIOLATION_STATUS, "violation", report=self.violation_report(v),
                             counters=self.counters)
        except AuditError as e:
            v = HostViolation("an MMU invariant is broken (--audit)", str(e),
                              f"found after an exit, {self._host_clock()}")
            return RunResult(VIOLATION_STATUS, "violation", report=self.violation_report(v),
                             counters=self.counters)
        except HostFault as f:
            crash = GuestCrash(f"KVM_RUN failed with EFAULT: {f}")
            return RunResult(4, "crash", crash, f"x86shadow: {crash.reason}", self.counters)
        if ex.kind == ExitKind.HLT:
            return RunResult(0, "halt", counters=self.counters, exit_kind=ex.kind)
        if ex.kind == ExitKind.SYSTEM_EVENT:
            return RunResult(ex.status, "exit", counters=self.counters, exit_kind=ex.kind)
        if ex.kind == ExitKind.INTERRUPTED:
            stop = stopping.take()
            if stop is not None:
                raise stop                    # a signal or a failing output (stopping.py)
            return RunResult(INTERRUPTED_STATUS, "interrupted", ex.crash,
                             f"x86shadow: stopped: {ex.crash.reason}", self.counters, ex.kind)
        return RunResult(4, "crash", ex.crash, self.crash_report(ex.crash), self.counters, ex.kind)

    def _boot_vcpus(self) -> None:
        """Every vCPU in the firmware's boot state, with EDI = its number and ESI = the number
        of vCPUs (docs/GUEST_CONTRACT.md); vCPU 0 at the firmware's start (the one-vCPU path,
        instruction for instruction), vCPU n > 0 at FW_AP_ENTRY on its own stack."""
        if self.kernel is not None:
            self.vcpu.load_boot_state(self.boot.state)    # the multiboot stub: one vCPU
            return
        from unicorn.x86_const import UC_X86_REG_EDI, UC_X86_REG_ESI
        from .layout import FW_AP_ENTRY, FW_SMP, vcpu_stack_top
        self.mem.write(FW_SMP, len(self.vcpus).to_bytes(4, "little"))    # main's ESI
        for v in self.vcpus:
            v.load_boot_state(self.boot.state)
            v.set_reg(UC_X86_REG_EDI, v.index)
            v.set_reg(UC_X86_REG_ESI, len(self.vcpus))
            if v.index:
                # vCPU n > 0 waits in the firmware for vCPU 0, then sets itself up (docs/SMP.md)
                v.pc = FW_AP_ENTRY
                v.set_reg(v.R_SP, vcpu_stack_top(v.index))

    # ------------------------------------------------------------------ reporting
    def violation_report(self, v: HostViolation) -> str:
        lines = [f"x86shadow: violation: {v.what}", f"  where  {v.where}", f"  when   {v.when}"]
        if self.host_schedule is not None and self.host_schedule.log:
            lines.append("  last host operations:")
            for when, op, gfn, result in self.host_schedule.log[-5:]:
                page = "" if gfn is None else f" gfn {gfn:#x}"
                lines.append(f"    {when}: {op}{page} -> {result}")
        return "\n".join(lines)

    def crash_report(self, crash: GuestCrash) -> str:
        v = self.current_vcpu
        rip = crash.rip if crash.rip is not None else v.rip()
        lines = [f"x86shadow: guest crashed: {crash.reason}"]
        if len(self.vcpus) > 1:
            lines.append(f"  vCPU        {v.index} of {len(self.vcpus)}")
        if crash.vector is not None:
            ec = "none" if crash.error_code is None else f"{crash.error_code:#x}"
            if crash.vector == 14 and crash.error_code is not None:
                e = crash.error_code
                ec += " [" + " ".join(f"{n}={(e >> b) & 1}" for n, b in
                                      (("P", 0), ("W", 1), ("U", 2), ("RSVD", 3), ("I/D", 4))) + "]"
            lines.append(f"  vector      {crash.vector} ({vector_name(crash.vector)}), error code {ec}")
        cr2 = crash.cr2 if crash.cr2 is not None else v.cr2()
        cs = v.reg(UC_X86_REG_CS)
        lines.append(f"  RIP {rip:#x}  CS {cs:#x} (CPL {cs & 3})  RSP {v.reg(v.R_SP):#x}")
        # the guest's control registers (--tlb walker: the hardware's are the shadow MMU's)
        lines.append(f"  CR0 {v.cr0():#x}  CR2 {cr2:#x}  CR3 {v.cr3():#x}  CR4 {v.cr4():#x}  "
                     f"{'kernel' if self.mode is None else 'mode ' + self.mode}, mmu {self.mmu_kind}")
        lines.append(f"  instruction {self.describe_insn(rip)}")
        lines.extend(self.register_dump())
        return "\n".join(lines)

    def register_dump(self) -> list:
        """General registers, RFLAGS, EFER and the descriptor-table registers, for a report."""
        v = self.current_vcpu
        wide = v.bits == 64
        names = (["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                  "r11", "r12", "r13", "r14", "r15"] if wide else
                 ["eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp"])
        width = 16 if wide else 8
        regs = [f"{n.upper():>3} {v.reg_by_name(n):0{width}x}" for n in names]
        lines = ["  " + "  ".join(regs[i:i + 4]) for i in range(0, len(regs), 4)]
        lines.append(f"  RFLAGS {v.reg_by_name('eflags'):#x}  EFER {v.efer():#x}")
        tables = []
        for name in ("gdtr", "idtr", "tr"):
            _sel, base, limit, _flags = v.uc.reg_read(v.reg_id(name))
            tables.append(f"{name.upper()} {base:#x}/{limit:#x}")
        lines.append("  " + "  ".join(tables))
        return lines

    def describe_insn(self, rip) -> str:
        from .emulate.decode import decode
        v = self.current_vcpu
        try:
            code = v.read_virt(rip, 15)
        except Exception:                                 # noqa: BLE001 - report, never raise
            try:
                code = v.read_virt(rip, 0x1000 - (rip & 0xFFF))
            except Exception:                             # noqa: BLE001
                return f"{rip:#x}: <not mapped>"
        d = decode(code, rip, v.code_bits())
        if d is None:
            return f"{rip:#x}: <cannot decode: {code[:8].hex(' ')}>"
        return f"{rip:#x}: {d.text}   ({d.bytes.hex(' ')})"

    def read_phys(self, pa, n) -> bytes:
        """Guest-physical memory, looked at without disturbing the host (no swap-in)."""
        if self.vm_mmu is not None:
            return self.vm_mmu.peek_mem.read(pa, n)
        return self.mem.read(pa, n)
