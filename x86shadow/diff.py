"""``x86shadow diff``: the same guest under the shadow MMU and under Unicorn's own MMU, in lockstep,
and the first instruction after which they differ (docs/DIFF.md).

Both machines run in this process, each counting instructions retired (``Machine.run(n)``:
Unicorn's instruction counter, corrected for the instructions the shadow MMU refuses and
re-executes, so both count the same guest instructions). They advance to the same count, in
chunks of ``check_every`` instructions (default: one chunk, the whole run), and are compared
there: exit status and whether the guest ended, instructions retired, serial output, registers,
and all of guest RAM (byte for byte, by ``memcmp``). On a difference both are replayed from the
boot (fresh machines; the runs are deterministic) and the chunk is narrowed, 16 steps at a time,
down to one instruction: the state after instruction N-1 is equal, after N it is not.

The report of that instruction: its address and disassembly (read without setting A/D bits), the
address it accesses (its memory operand, or the byte where memory differs), the guest ptes of the
walk of that address in each machine's memory before and after it (each level's entry address and
value), and each MMU's view of the address: the shadow MMU's leaf spte (shadow page, gfn, rights),
whether its frame is write-tracked or out of sync, and the TLB entry a fill would get from it;
Unicorn's own walker through ``uc_vmem_translate`` (unicorn 2.1.4 exports it; called last, since
QEMU's walker sets A/D bits as it goes).

Python API (the fuzzer's entry point)::

    from x86shadow.diff import diff_program
    report = diff_program("guestcode/ptwrites.asm", "64")          # or source text, or a Program
    report = diff_program(src, "pae", configs=["kvm", "kvm --unsync off"], check_every=10_000,
                          max_insns=2_000_000, ram_mib=128, audit=True, timeout=30.0)
    report.diverged            # True if some config differs from native
    report.first               # the Divergence with the lowest instruction count (None)
    report.first.config, .what, .insns, .rip, .insn, .address, .guest_ptes, .shadow_view,
        .native_view, .details
    report.results             # one ConfigResult per config (config, divergence, insns, status)
    print(report.format())     # the text report;  report.to_json() -> dict (one record)

``configs``: config labels (``policies.config_label``: a policy name, or ``"kvm --unsync off"``);
None = every config of ``policies.comparison_configs()``. ``what`` is one of ``status``,
``insns`` (one guest ended, the other went on), ``output``, ``registers``, ``memory``.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import asdict, dataclass, field

from unicorn import UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE
from unicorn.unicorn_py3.unicorn import uclib

from . import paging as pg
from . import stopping
from .exits import ExitKind
from .machine import Machine
from .policies import comparison_configs, config_label, policy_of_label

DEFAULT_MAX_INSNS = 20_000_000
DEFAULT_TIMEOUT_S = 60.0          # wall clock per run segment (fuzz.differential.Watchdog)
STEPS = 16                        # sub-chunks per narrowing round
ALL_CONFIGS = [config_label(n, u is not False) for n, u in comparison_configs()]

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_vmem_translate = uclib.uc_vmem_translate
_vmem_translate.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                            ctypes.POINTER(ctypes.c_uint64))
_vmem_translate.restype = ctypes.c_int

_REGS32 = ["eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags"]
_REGS64 = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
           "r12", "r13", "r14", "r15", "rip", "rflags"]
_SYSREGS = ["cs", "ds", "es", "fs", "gs", "ss", "cr0", "cr2", "cr3", "cr4"]
_MAX_PAGES = 8                    # differing pages listed in a report


class DiffError(ValueError):
    """Bad input to diff_program (unknown config, bad count)."""


# ------------------------------------------------------------------------------ results
@dataclass
class Divergence:
    """The first instruction after which one config's shadow run differs from the native run.

    ``insns``: instructions retired when the difference appears (the divergent instruction is
    the ``insns``-th; the state after ``insns - 1`` is equal). ``rip`` / ``insn``: that
    instruction (address, disassembly). ``address``: the guest-virtual address it accesses
    (None without a memory operand); ``gpa``: the guest-physical byte where memory differs.
    ``guest_ptes``: {"native"|"shadow": {"before"|"after": [walk of each accessed page]}};
    ``shadow_view`` / ``native_view``: each MMU's view of the accessed page(s) after the
    instruction. ``details``: the differences themselves (register values, memory words...)."""
    config: str
    what: str
    insns: int
    rip: int | None = None
    insn: str = ""
    address: int | None = None
    gpa: int | None = None
    guest_ptes: dict = field(default_factory=dict)
    shadow_view: list = field(default_factory=list)
    native_view: list = field(default_factory=list)
    details: list = field(default_factory=list)

    def summary(self) -> str:
        where = f" at {self.rip:#x}" if self.rip is not None else ""
        return (f"{self.config}: {self.what} differs after instruction {self.insns}{where}: "
                f"{self.details[0] if self.details else ''}")


@dataclass
class ConfigResult:
    config: str
    divergence: Divergence | None
    insns: int                    # instructions both ran (equal) before it ended or diverged
    finished: bool                # both guests ended (not stopped at max_insns)
    native_status: int | None = None
    shadow_status: int | None = None
    interrupted: bool = False     # a signal stopped it: equal up to ``insns``, not further known


@dataclass
class DiffReport:
    mode: str
    program: str
    check_every: int | None
    max_insns: int
    results: list = field(default_factory=list)
    interrupted: bool = False
    stop: object = None           # the stopping.Stop that interrupted it

    @property
    def diverged(self) -> bool:
        return any(r.divergence is not None for r in self.results)

    @property
    def divergences(self) -> list:
        return [r.divergence for r in self.results if r.divergence is not None]

    @property
    def first(self) -> Divergence | None:
        divs = self.divergences
        return min(divs, key=lambda d: d.insns) if divs else None

    def format(self) -> str:
        lines = [f"x86shadow diff: {self.program}, mode {self.mode}, "
                 + (f"compared every {self.check_every} instructions"
                    if self.check_every else "compared at the end")
                 + f" (max {self.max_insns} instructions)"]
        for r in self.results:
            if r.interrupted:
                lines.append(f"  {r.config}: interrupted; same as native up to instruction "
                             f"{r.insns}" + ("" if self.check_every else
                                             " (compared at the end only)"))
            elif r.divergence is not None:
                lines.append("  " + r.divergence.summary())
            else:
                end = (f"status {r.native_status}" if r.finished
                       else f"not finished after {r.insns} instructions")
                lines.append(f"  {r.config}: same as native ({r.insns} instructions, {end})")
        if self.interrupted:
            lines.append("  interrupted: the configs after the last one listed were not run")
        first = self.first
        if first is None:
            lines.append("no divergence" + (" so far" if self.interrupted else ""))
            return "\n".join(lines)
        lines.append("")
        lines.extend(_format_divergence(first))
        return "\n".join(lines)

    def to_json(self) -> dict:
        first = self.first
        return {"command": "diff", "program": self.program, "mode": self.mode,
                "check_every": self.check_every, "max_insns": self.max_insns,
                "diverged": self.diverged, "interrupted": self.interrupted,
                "first": None if first is None else asdict(first),
                "configs": [{"config": r.config, "diverged": r.divergence is not None,
                             "insns": r.insns, "finished": r.finished,
                             "interrupted": r.interrupted,
                             "native_status": r.native_status, "shadow_status": r.shadow_status,
                             "divergence": None if r.divergence is None
                             else asdict(r.divergence)} for r in self.results]}


def _hex(v):
    return "-" if v is None else f"{v:#x}"


def _format_walks(walks, indent):
    out = []
    for w in walks:
        head = f"{indent}va {w['va']:#x}: "
        if w.get("error"):
            out.append(head + w["error"])
            continue
        out.append(head + (f"-> gpa {w['gpa']:#x}" if w["ok"] else
                           f"#PF error code {w['error_code']:#x} at level {w['level']}"))
        for e in w["entries"]:
            out.append(f"{indent}  L{e['level']} entry at {e['address']:#x} = {e['value']:#x}"
                       f"  [{e['bits']}]")
    return out


def _format_divergence(d: Divergence) -> list:
    lines = [f"first divergence: {d.config}, {d.what}, instruction {d.insns}"]
    if d.rip is not None:
        lines.append(f"  instruction  {d.insn}")
    if d.address is not None:
        lines.append(f"  address      {d.address:#x} (the instruction's memory operand)")
    if d.gpa is not None:
        lines.append(f"  differs at   guest-physical {d.gpa:#x}")
    lines.append("  differences:")
    lines.extend(f"    {x}" for x in d.details)
    for side in ("native", "shadow"):
        walks = d.guest_ptes.get(side)
        if not walks:
            continue
        for when in ("before", "after"):
            if walks.get(when):
                lines.append(f"  guest ptes in the {side} run's memory, {when} the instruction:")
                lines.extend(_format_walks(walks[when], "    "))
    if d.shadow_view:
        lines.append("  shadow MMU's view (after):")
        lines.extend(f"    {v}" for v in d.shadow_view)
    if d.native_view:
        lines.append("  Unicorn's own MMU (uc_vmem_translate: its TLB entry, else its walk; after):")
        lines.extend(f"    {v}" for v in d.native_view)
    return lines


# ------------------------------------------------------------------------------ one machine
class _Side:
    """One machine of a pair, advanced to a count of instructions retired."""

    def __init__(self, program, firmware, mode, mmu, config, ram_mib, audit, timeout):
        self.m = Machine(mode, mmu=mmu, policy=policy_of_label(config) if config else None,
                         ram_mib=ram_mib, audit=audit and mmu == "shadow")
        self.m.load(program, firmware)
        self.timeout = timeout
        self.started = False
        self.result = None            # the RunResult once the guest ended

    @property
    def insns(self) -> int:
        return self.m.vcpu.insns

    def advance(self, target: int) -> None:
        if self.result is not None or target <= 0 or (self.started and self.insns >= target):
            return                    # (run(0) would mean "no limit")
        from .fuzz.differential import Watchdog
        with Watchdog(self.m.vcpu, self.timeout):
            r = self.m.run(target, resume=self.started)
        self.started = True
        if r.exit_kind == ExitKind.RUNAWAY and self.insns >= target:
            return                    # stopped at the count: it goes on from here
        self.result = r


def _new_pair(program, firmware, mode, config, ram_mib, audit, timeout):
    return (_Side(program, firmware, mode, "native", None, ram_mib, audit, timeout),
            _Side(program, firmware, mode, "shadow", config, ram_mib, audit, timeout))


# ------------------------------------------------------------------------------ comparison
def _regs(m):
    v = m.vcpu
    names = (_REGS64 if v.bits == 64 else _REGS32) + _SYSREGS
    out = {n: v.reg_by_name(n) for n in names}
    out["efer"] = v.uc.msr_read(0xC0000080)
    for t in ("gdtr", "idtr"):
        _sel, base, limit, _flags = v.mmr(v.reg_id(t))
        out[t] = (base, limit)
    return out


def _ram(m):
    """(address, size) of the machine's guest RAM as one host buffer (None: host memory)."""
    if m.host is not None:
        return None
    return m.host_phys.address, m.ram_size


def _diff_pages(a, b):
    """Guest-physical frames whose contents differ (all of them, ascending)."""
    (pa, size), (pb, _) = _ram(a), _ram(b)
    out = []
    block = 1 << 20
    for off in range(0, size, block):
        if _memcmp(pa + off, pb + off, block) == 0:
            continue
        for p in range(off, off + block, 0x1000):
            if _memcmp(pa + p, pb + p, 0x1000):
                out.append(p >> 12)
    return out


def _status_text(side):
    r = side.result
    if r is None:
        return "running"
    first = r.report.splitlines()[0] if r.report else r.how
    return f"status {r.status} ({first})"


def _reports(*sides):
    """The crash / violation reports of the runs that ended with one, line by line."""
    out = []
    for name, side in zip(("native", "shadow"), sides):
        if side.result is not None and side.result.report:
            out.append(f"{name} run's report:")
            out.extend("  " + line for line in side.result.report.splitlines())
    return out


def _compare(nat: _Side, sha: _Side):
    """(what, details, first differing gpa) of the first kind of difference, or None."""
    if (nat.result is None) != (sha.result is None) or nat.insns != sha.insns:
        return ("insns", [f"native: {_status_text(nat)} after {nat.insns} instructions; "
                          f"shadow: {_status_text(sha)} after {sha.insns} instructions"]
                + _reports(nat, sha), None)
    if nat.result is not None and nat.result.status != sha.result.status:
        return ("status", [f"native {_status_text(nat)}, shadow {_status_text(sha)}"]
                + _reports(nat, sha), None)
    a, b = bytes(nat.m.output), bytes(sha.m.output)
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return ("output", [f"serial output byte {i}: native {a[i:i + 24]!r}, "
                           f"shadow {b[i:i + 24]!r}"], None)
    ra, rb = _regs(nat.m), _regs(sha.m)
    regs = [n for n in ra if ra[n] != rb[n]]
    if regs:
        fmt = (lambda v: f"{v[0]:#x}/{v[1]:#x}" if isinstance(v, tuple) else f"{v:#x}")  # noqa: E731
        return ("registers", [f"{n.upper()}: native {fmt(ra[n])}, shadow {fmt(rb[n])}"
                              for n in regs], None)
    pages = _diff_pages(nat.m, sha.m)
    if pages:
        details, first = [], None
        for gfn in pages[:_MAX_PAGES]:
            x = nat.m.read_phys(gfn << 12, 0x1000)
            y = sha.m.read_phys(gfn << 12, 0x1000)
            off = next(i for i in range(0x1000) if x[i] != y[i]) & ~7
            if first is None:
                first = (gfn << 12) + next(i for i in range(0x1000) if x[i] != y[i])
            n = int.from_bytes(x[off:off + 8], "little")
            s = int.from_bytes(y[off:off + 8], "little")
            details.append(f"memory qword at {(gfn << 12) + off:#x}: native {n:#018x}, "
                           f"shadow {s:#018x}")
        if len(pages) > _MAX_PAGES:
            details.append(f"... {len(pages)} pages differ")
        return ("memory", details, first)
    return None


# ------------------------------------------------------------------------------ the views
def _peek_mem(m):
    return m.vm_mmu.peek_mem if m.vm_mmu is not None else m.mem


def _peek_virt(m, va, n):
    """n bytes at guest-virtual va through the guest tables, A/D bits left alone."""
    mem, ctx = _peek_mem(m), m.vcpu.paging_context()
    out = b""
    while n:
        w = pg.walk(mem, ctx, va, 0, set_ad=False)
        if not w.ok or not mem.contains(w.gpa):
            break
        chunk = min(n, 0x1000 - (va & 0xFFF))
        out += mem.read(w.gpa, chunk)
        va, n = va + chunk, n - chunk
    return out


def _decode(m):
    from .emulate.decode import decode
    rip = m.vcpu.rip()
    code = _peek_virt(m, rip, 15)
    return rip, (decode(code, rip, m.vcpu.bits) if code else None)


_BITS = ((0, "P"), (1, "W"), (2, "U"), (5, "A"), (6, "D"), (7, "PS"), (8, "G"), (63, "NX"))


def _bits(v):
    return " ".join(n for b, n in _BITS if v >> b & 1) or "-"


def _walk_record(m, va, access):
    mem, ctx = _peek_mem(m), m.vcpu.paging_context()
    try:
        w = pg.walk(mem, ctx, va, access, set_ad=False)
    except Exception as e:                           # noqa: BLE001 - a report, never raise
        return {"va": va, "error": f"walk failed: {e}"}
    entries = []
    if w.pte_gpa is not None:
        for level in range(len(w.pte_gpa) - 1, 0, -1):
            addr = w.pte_gpa[level]
            if addr is None:
                continue
            value = w.ptes[level]
            entries.append({"level": level, "address": addr, "value": value,
                            "bits": _bits(value)})
    return {"va": va, "ok": w.ok, "gpa": w.gpa, "error_code": w.error_code,
            "level": w.level, "entries": entries}


def _acc(a):
    return "".join(n for bit, n in ((pg.ACC_U, "U"), (pg.ACC_W, "W"), (pg.ACC_X, "X"))
                   if a & bit) or "-"


def _shadow_view(m, va):
    from .mmu.shadow_walk import shadow_leaf
    from .mmu.spte import SPTE_D, SPTE_FRAME, SPTE_NX, SPTE_W
    mmu = m.vcpu.mmu
    vm = mmu.vm
    leaf = shadow_leaf(mmu.root, mmu.root_level, va) if mmu.root is not None else None
    if leaf is None:
        return [f"va {va:#x}: no present leaf spte (a TLB miss here takes a shadow page fault)"]
    sp, idx = leaf
    spte = sp.spt[idx]
    gfn = sp.gfns[idx]
    perms = "R" + ("W" if spte & SPTE_W and spte & SPTE_D else "") + \
        ("" if spte & SPTE_NX else "X")
    tracked = gfn is not None and vm.is_tracked(gfn)
    role = sp.role
    lines = [f"va {va:#x}: spte {spte:#018x} [{_bits(spte)}] -> host frame "
             f"{(spte & SPTE_FRAME) >> 12:#x} for gfn {_hex(gfn)}",
             f"  in shadow page #{sp.id} (gfn {sp.gfn:#x}, level {role.level}, "
             f"{'direct: a guest large page' if role.direct else 'shadows a guest table'}, "
             f"role access {_acc(role.access)}{', unsync' if sp.unsync else ''}), entry {idx}"
             + (f", built from guest pte {sp.gptes[idx]:#x}" if sp.gptes[idx] is not None else ""),
             f"  TLB entry a fill gets: perms {perms}"
             + (" through the read-only alias (frame write-tracked: stores trap)" if tracked
                else "")
             + (", frame shadowed as a page table" if gfn is not None and vm.is_shadowed(gfn)
                else "")]
    return lines


def _native_view(m, va, access):
    prot = (UC_PROT_WRITE if access & pg.PFERR_W else
            UC_PROT_EXEC if access & pg.PFERR_FETCH else UC_PROT_READ)
    out = ctypes.c_uint64()
    err = _vmem_translate(m.vcpu.uc._uch, va, prot, ctypes.byref(out))
    kind = {UC_PROT_WRITE: "write", UC_PROT_EXEC: "fetch", UC_PROT_READ: "read"}[prot]
    if err:
        return [f"va {va:#x} ({kind}): no translation (uc_err {err}: Unicorn's walker faults)"]
    return [f"va {va:#x} ({kind}): -> gpa {out.value:#x}"]


def _accessed_pages(m, insn):
    """(virtual address of the memory operand or None, access bits, [pages it touches])."""
    if insn is None or insn.mem_operand is None:
        return None, 0, []
    try:
        ea = insn.mem_operand.effective_address(m.vcpu.reg_by_name, insn.next_ip)
    except Exception:                                # noqa: BLE001 - a report, never raise
        return None, 0, []
    access = pg.PFERR_W if insn.mem_write else 0
    if m.vcpu.reg_by_name("cs") & 3 == 3:
        access |= pg.PFERR_U
    size = max(insn.mem_operand.size or 1, 1)
    last = (ea + size - 1) & ~0xFFF
    return ea, access, [ea] if last == ea & ~0xFFF else [ea, last]   # a crossing access: both


# ------------------------------------------------------------------------------ the search
def _narrow(program, firmware, mode, config, lo, hi, ram_mib, audit, timeout):
    """The state after ``lo`` instructions is equal, after ``hi`` not: the first n in
    (lo, hi] after which it differs. Replays from the boot once per round."""
    while hi - lo > 1:
        nat, sha = _new_pair(program, firmware, mode, config, ram_mib, audit, timeout)
        nat.advance(lo)
        sha.advance(lo)
        step = max(1, -(-(hi - lo) // STEPS))
        at = lo
        while at < hi:
            nxt = min(at + step, hi)
            nat.advance(nxt)
            sha.advance(nxt)
            if _compare(nat, sha) is not None:
                hi = nxt
                break
            at = nxt
        lo = at
    return hi


def _describe(program, firmware, mode, config, n, ram_mib, audit, timeout) -> Divergence:
    """Replay to instruction n - 1 (equal), look at instruction n, run it, report."""
    nat, sha = _new_pair(program, firmware, mode, config, ram_mib, audit, timeout)
    rip = insn = None
    va, access, pages = None, 0, []
    before = {}
    if n > 1:                         # (instruction 1 starts from the boot state)
        nat.advance(n - 1)
        sha.advance(n - 1)
        if nat.result is None:
            rip, insn = _decode(nat.m)
            va, access, pages = _accessed_pages(nat.m, insn)
            before = {s: [_walk_record(side.m, p, access) for p in pages]
                      for s, side in (("native", nat), ("shadow", sha))}
    nat.advance(n)
    sha.advance(n)
    found = _compare(nat, sha)
    if found is None:
        found = ("none", ["no difference on replay (the runs are not deterministic?)"], None)
    what, details, gpa = found
    after = {s: [_walk_record(side.m, p, access) for p in pages]
             for s, side in (("native", nat), ("shadow", sha))}
    ptes = {s: {"before": before.get(s, []), "after": after[s]} for s in after}
    d = Divergence(config, what, n, rip, "" if insn is None else
                   f"{rip:#x}: {insn.text}   ({insn.bytes.hex(' ')})",
                   va, gpa, ptes, details=details)
    if rip is not None and insn is None:
        d.insn = f"{rip:#x}: <cannot read or decode>"
    for p in pages:
        d.shadow_view.extend(_shadow_view(sha.m, p))
    for p in pages:                                   # last: QEMU's walker sets A/D bits
        d.native_view.extend(_native_view(nat.m, p, access))
    return d


class _Interrupted(Exception):
    def __init__(self, stop, partial):
        super().__init__(str(stop))
        self.stop, self.partial = stop, partial


def _diff_config(program, firmware, mode, config, check_every, max_insns, ram_mib, audit,
                 timeout) -> ConfigResult:
    lo = [0]
    try:
        return _lockstep(program, firmware, mode, config, check_every, max_insns, ram_mib,
                         audit, timeout, lo)
    except stopping.Stop as e:
        raise _Interrupted(e, ConfigResult(config, None, lo[0], False, interrupted=True)) from None


def _lockstep(program, firmware, mode, config, check_every, max_insns, ram_mib, audit, timeout,
              equal_up_to) -> ConfigResult:
    nat, sha = _new_pair(program, firmware, mode, config, ram_mib, audit, timeout)
    step = check_every or max_insns
    lo = 0
    while True:
        target = min(lo + step, max_insns)
        nat.advance(target)
        sha.advance(target)
        if _compare(nat, sha) is not None:
            n = _narrow(program, firmware, mode, config, lo, target, ram_mib, audit, timeout)
            d = _describe(program, firmware, mode, config, n, ram_mib, audit, timeout)
            return ConfigResult(config, d, n - 1, False, _status(nat), _status(sha))
        ended = nat.result is not None
        if ended or target >= max_insns:
            return ConfigResult(config, None, nat.insns, ended, _status(nat), _status(sha))
        lo = equal_up_to[0] = target


def _status(side):
    return None if side.result is None else side.result.status


# ------------------------------------------------------------------------------ entry point
def _assemble(program_or_source, mode, ram_mib, include_dirs):
    from .asm import assemble_program
    from .asm.api import Program
    if isinstance(program_or_source, Program):
        return program_or_source, program_or_source.path or "<program>"
    text = os.fspath(program_or_source)
    if "\n" not in text and os.path.exists(text):
        return assemble_program(text, mode, ram_mib << 20, include_dirs=include_dirs), text
    fd, path = tempfile.mkstemp(suffix=".asm", prefix="x86shadow-diff-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return (assemble_program(path, mode, ram_mib << 20, include_dirs=include_dirs),
                "<source>")
    finally:
        os.unlink(path)


def check_configs(configs) -> list:
    """The config labels asked for (None: all), checked (DiffError names an unknown one)."""
    if configs is None:
        return list(ALL_CONFIGS)
    out = []
    for c in configs:
        try:
            policy_of_label(c)
        except ValueError as e:
            raise DiffError(str(e)) from None
        out.append(c)
    return out


def diff_program(program_or_source, mode, *, configs=None, check_every=None,
                 max_insns=DEFAULT_MAX_INSNS, ram_mib=128, audit=False,
                 timeout=DEFAULT_TIMEOUT_S, include_dirs=(), firmware=None, progress=None,
                 name=None) -> DiffReport:
    """Run the guest under ``--mmu native`` and, for each config, under ``--mmu shadow`` in
    lockstep; the first divergence of each (module docstring). ``program_or_source``: a path,
    assembly source text, or an assembled ``asm.Program`` (then ``firmware`` may be given too).
    ``progress(config)`` is called before each config runs. Raises DiffError on bad input,
    asm.AsmError on a bad program. A signal (Ctrl-C) ends it early: the report then has the
    configs done so far, ``interrupted`` True and ``stop`` (the stopping.Stop, its status)."""
    from .asm import assemble_firmware
    from .machine import check_ram
    if check_every is not None and check_every < 1:
        raise DiffError("--check-every must be at least 1")
    if max_insns < 1:
        raise DiffError("--max-insns must be at least 1")
    try:
        check_ram(mode, ram_mib)
    except ValueError as e:
        raise DiffError(str(e)) from None
    configs = check_configs(configs)
    program, label = _assemble(program_or_source, mode, ram_mib, include_dirs)
    if firmware is None:
        firmware = assemble_firmware(mode, ram_mib << 20)
    report = DiffReport(mode, name or label, check_every, max_insns)
    try:
        for config in configs:
            if progress is not None:
                progress(config)
            report.results.append(_diff_config(program, firmware, mode, config, check_every,
                                               max_insns, ram_mib, audit, timeout))
    except _Interrupted as e:                         # Ctrl-C, SIGTERM: what is done so far
        report.results.append(e.partial)
        report.interrupted = True
        report.stop = e.stop
    except stopping.Stop as e:                        # (between two configs)
        report.interrupted = True
        report.stop = e
    return report


__all__ = ["ALL_CONFIGS", "ConfigResult", "DiffError", "DiffReport", "Divergence",
           "check_configs", "diff_program"]
