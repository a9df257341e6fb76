"""Instruction-level MMU fault tests: "guest page tables like this, this frame shadowed, run these
instructions under this policy" -> the exits, the decoded instructions, each decision with the
rule that fired, the counters and the resulting memory.

    lab = FaultLab("pae", policy="kvm")
    lab.map(0x4000_0000, 0x0200_0000)                  # a data page
    lab.map_table_window(0x4010_0000, 0x4000_0000)     # its page table, mapped at 0x4010_0000
    res = lab.run("mov dword ptr [0x40100000], 0x2001007", shadow=[0x4000_0000])
    res.decisions   -> ["emulate: page-table writing insn (mov)"]
    res.counters    -> counters of the snippet alone (docs/COUNTERS.md names)
    res.read(pa, n) -> guest memory afterwards

The lab builds its own page tables host-side (identity map of the low 64 MiB with large pages,
plus your 4 KiB mappings), boots the firmware, loads that CR3, touches the ``shadow`` addresses
(which shadows the tables on their paths), then runs the snippet between two markers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import layout
from . import paging as pg
from .asm import Program, assemble, assemble_firmware
from .guesttables import PWU, GuestTables
from . import events as ev
from .events import MARKER
from .machine import Machine

_MODE = {"32": pg.Mode.LEGACY, "pae": pg.Mode.PAE, "64": pg.Mode.LONG}
TABLE_AREA = (layout.FREE_BASE, layout.FREE_BASE + (8 << 20))    # 16..24 MiB: the lab's tables
DATA_BASE = 0x0200_0000                                         # 32 MiB..: frames for tests


@dataclass
class LabResult:
    status: int
    output: bytes
    report: str
    counters: dict                     # counters of the snippet (between the two markers)
    events: list                       # trace events of the snippet
    machine: Machine = field(repr=False)

    @property
    def decisions(self):
        """The decision (with its rule) of every write-protect fault in the snippet."""
        return [e["decision"] for e in self.events if e["event"] == ev.WRITE_PROTECT_FAULT]

    @property
    def insns(self):
        return [e["insn"] for e in self.events if e["event"] == ev.WRITE_PROTECT_FAULT]

    @property
    def policy_events(self):
        return [e["decision"] for e in self.events if e["event"] == ev.POLICY]

    def read(self, pa, n) -> bytes:
        return self.machine.read_phys(pa, n)

    def read_pte(self, pa) -> int:
        size = 4 if self.machine.mode == "32" else 8
        return int.from_bytes(self.read(pa, size), "little")


class FaultLab:
    def __init__(self, mode: str, policy: str = "kvm", ram_mib: int = 128, unsync=None):
        if mode not in _MODE:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.policy = policy
        self.unsync = unsync             # out-of-sync pages (None: the policy's default)
        self.ram_mib = ram_mib
        self.maps = []                   # (va, pa, flags)
        self.windows = []                # (window va, mapped va)
        self.pokes = []                  # (pa, bytes) written before boot
        self._tables = None

    # ---------------------------------------------------------------- describing the guest
    def map(self, va, pa, flags=PWU | pg.PTE_A | pg.PTE_D):
        """A 4 KiB mapping va -> pa (flags: guest pte bits)."""
        self.maps.append((va, pa, flags))
        self._tables = None
        return self

    def map_table_window(self, window_va, of_va, flags=PWU | pg.PTE_A | pg.PTE_D):
        """Map the page table that holds of_va's pte at window_va (so the snippet can write ptes)."""
        self.windows.append((window_va, of_va, flags))
        self._tables = None
        return self

    def poke(self, pa, data: bytes):
        self.pokes.append((pa, bytes(data)))
        return self

    def _build(self, mem):
        t = GuestTables(_MODE[self.mode], mem, *TABLE_AREA)
        big = 4 << 20 if self.mode == "32" else 2 << 20
        for pa in range(0, layout.FREE_END, big):
            t.map(pa, pa, PWU | pg.PTE_A | pg.PTE_D, level=2)
        for va, pa, flags in self.maps:
            t.map(va, pa, flags)
        for window_va, of_va, flags in self.windows:
            t.map(window_va, t.table_of(of_va), flags)
        return t

    def pte_addr(self, va) -> int:
        """Guest-physical address of va's pte (as the lab lays the tables out)."""
        return self.tables().slot(va, 1)

    def table_addr(self, va) -> int:
        return self.pte_addr(va) & ~0xFFF

    def tables(self):
        if self._tables is None:
            from .memory.ram import PhysMem
            self._tables = self._build(PhysMem(bytearray(self.ram_mib << 20)))
        return self._tables

    # ---------------------------------------------------------------- running
    def source(self, snippet: str, shadow=()) -> str:
        reg = "rax" if self.mode == "64" else "eax"
        lines = ["main:", f"    mov {reg}, {self.tables().cr3:#x}", f"    mov cr3, {reg}"]
        for va in shadow:
            if self.mode == "64":
                lines += [f"    mov rax, {va:#x}", "    mov eax, dword ptr [rax]"]
            else:
                lines += [f"    mov eax, dword ptr [{va:#x}]"]
        lines += ["    mov al, 1", f"    out {layout.MARKER_PORT:#x}, al", snippet,
                  "    mov al, 2", f"    out {layout.MARKER_PORT:#x}, al", "    cli", "    hlt"]
        return "\n".join(lines) + "\n"

    def run(self, snippet: str, shadow=(), mmu: str = "shadow", audit: bool = True) -> LabResult:
        bits = 64 if self.mode == "64" else 32
        code = assemble(self.source(snippet, shadow), bits=bits, base=layout.PROG_BASE,
                        symbols=layout.asm_symbols(self.mode, self.ram_mib << 20),
                        filename="<faultlab>")
        events = []
        marks = []

        def trace(kind, fields):
            events.append({**fields, "event": kind})
        m = Machine(self.mode, mmu=mmu, policy=self.policy, ram_mib=self.ram_mib,
                    unsync=self.unsync if mmu == "shadow" else None, trace=trace if mmu == "shadow" else None, audit=audit and mmu == "shadow")
        m.load(Program(code=code, base=layout.PROG_BASE, entry=layout.PROG_BASE), assemble_firmware(self.mode, self.ram_mib << 20))
        self._build(m.mem)
        for pa, data in self.pokes:
            m.mem.write(pa, data)
        m.events.subscribe(lambda _k, f: marks.append((f["value"], dict(m.counters), len(events))),
                           (MARKER,))
        result = m.run()
        if len(marks) == 2:
            (_, c0, e0), (_, c1, e1) = marks
            counters = {k: c1[k] - c0[k] for k in c1}
            snippet_events = events[e0:e1]
        else:
            counters, snippet_events = {}, events
        return LabResult(result.status, bytes(m.output), result.report, counters, snippet_events, m)
