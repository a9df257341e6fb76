"""Scenarios: guest workloads run under each policy and measured (``x86shadow scenario ...``).

``kmap`` (README, the kmap scenario): the RHEL3 kscand / kmap_atomic pathology. The guest is
``guestcode/kmap/kscand.asm``: a 32-bit highmem kernel whose kscand clears the accessed bit of every
pte of one user process through a kmap_atomic fixmap slot, while the process (CPL3) touches all its
pages between scans. The guest counts what it did (kmap_atomic calls, stores to the fixmap pte) in a
statistics block the host reads, and writes MARKER_PORT at every phase boundary (not an exit), where
the host snapshots the counters.

What the host measures itself, from what the MMU did:

* ``fixmap_writes_emulated``: stores emulated (EMULATE, and Xen's emulate-ahead) whose guest-physical
  address lies in the fixmap page-table frame -- counted from the ``emulated_write`` events the
  write-fault path emits after every emulated store (never for an unprotect-and-re-execute).
* ``emulated_writes``: every emulated store, same events.
* ``fixmap_pt_zaps`` / ``user_table_zaps``: shadow pages of the fixmap page table / of the user page
  tables zapped (for any reason) during the scans -- counted from the ``kvm_mmu_prepare_zap_page``
  events.
* ``reshadow_faults``: ``mmu_cache_miss`` during the scans. The warm-up (the process's first touch of
  every page) builds every shadow page the scenario needs, so each shadow page created afterwards
  shadows a guest table whose shadow was torn down (flooded, zapped as misaligned, unprotected,
  recycled) and is rebuilt by a later fault.

A *scan* is one kscand pass plus the process's touch of all its pages that follows it (where the
accessed bits come back through faults). ``counters`` are the totals over the scans (the boot,
the building of the tables and the warm-up are in ``warmup_counters``).

Several vCPUs (``vcpus``, docs/SMP.md): every vCPU ages its own share of the user tables through
its own kmap_atomic slot (fixmap index ``type + KM_TYPE_NR * smp_processor_id()``) and writes its
own statistics block; the host sums the blocks (``kmaps`` etc. are totals) and keeps each one in
``per_vcpu``, with the stores the MMU emulated into each vCPU's slot pte, counted by the gpa of the
store and the vCPU that made it. vCPU 0 writes the markers while the others wait at a barrier, so
a snapshot separates the phases of every vCPU. The MMU counters are the VM's (all vCPUs).
"""
from __future__ import annotations

import os
import resource
import struct
import time
from dataclasses import dataclass

from . import events as ev
from . import layout, resources

MiB = 1 << 20
PROGRAM = resources.guestcode_dir() / "kmap" / "kscand.asm"

VARIANTS = {"rhel3": 0, "2.4": 1, "debug": 2, "2.6": 3}
ORDERS = {"table": 0, "rmap": 1}
MODES = ("32", "pae")

LOWMEM_END = 32 * MiB                 # guestcode/kmap/kscand.asm: highmem starts here
MAX_TABLES = {"32": 767, "pae": 1024}
PTES_PER_TABLE = {"32": 1024, "pae": 512}
KSTAT = layout.FREE_BASE + 0xC00      # the guest's statistics block (lowmem, lib/console.inc's page)
KSTAT_STRIDE = 0x40                   # vCPU c's block at KSTAT + c * KSTAT_STRIDE (kscand.asm)
_KSTAT_FIELDS = ("kmaps", "fixmap_writes", "kmap_skips", "btrs", "young", "scan", "fixmap_pt",
                 "kpte", "tables_pa", "ntables", "nptes", "kmap_vaddr", "kunmaps", "touches", "magic")
_KSTAT = struct.Struct("<" + "I" * len(_KSTAT_FIELDS))
KSTAT_MAGIC = 0x6B6D6170

PH_WARMUP, PH_KSCAND, PH_USER, PH_DONE = 1, 2, 3, 4

# what the tables show, in this order: (key, heading)
SHOWN = (
    ("exits", "exits"),
    ("emulated_writes", "emulated writes"),
    ("wp_faults", "wp faults"),
    ("mmu_unprotect", "unprotects"),
    ("mmu_shadow_zapped", "shadow zaps"),
    ("fixmap_pt_zaps", "  of the fixmap page table"),
    ("user_table_zaps", "  of user page tables"),
    ("mmu_flooded", "floods"),
    ("reshadow_faults", "re-shadow faults"),
    ("emulate_ahead", "emulate-ahead"),
    ("pf_fixed", "pf fixed"),
    ("invlpg", "invlpg"),
    ("fixmap_writes", "fixmap stores"),
    ("fixmap_writes_emulated", "fixmap stores emulated"),
    ("user_pte_writes_emulated", "user pte stores emulated (btr)"),
    ("mmu_unsync_events", "pages gone out of sync (KVM)"),
    ("shadow_unsync", "frames gone out of sync (Xen)"),
    ("mmu_sync_pages", "pages resynced"),
    ("mmu_sync_zapped", "  zapped by the sync"),
)


class ScenarioError(Exception):
    """Bad parameters (``status`` 2) or a guest that did not complete (``status`` 4)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KmapParams:
    mode: str = "pae"
    variant: str = "rhel3"
    order: str = "rmap"
    tables: int = 8
    ptes: int = 64
    scans: int = 4
    linearity: int = 0
    seed: int = 1
    ram_mib: int | None = None        # None: the smallest that fits (at least 128)
    vcpus: int = 1                    # docs/SMP.md; each vCPU scans a share of the tables
    schedule: str | None = None       # --schedule (vm_scheduler.py; None: its default), vcpus > 1

    def check(self) -> "KmapParams":
        if self.mode not in MODES:
            raise ScenarioError(f"mode {self.mode!r}: the kmap scenario is a 32-bit kernel "
                                f"(choose from {', '.join(MODES)})")
        if self.variant not in VARIANTS:
            raise ScenarioError(f"unknown variant {self.variant!r} (choose from {', '.join(VARIANTS)})")
        if self.order not in ORDERS:
            raise ScenarioError(f"unknown order {self.order!r} (choose from {', '.join(ORDERS)})")
        if not 1 <= self.tables <= MAX_TABLES[self.mode]:
            raise ScenarioError(f"--tables {self.tables}: must be 1..{MAX_TABLES[self.mode]} in mode "
                                f"{self.mode} (user page tables from 1 GiB up to the kernel's space)")
        if not 1 <= self.ptes <= PTES_PER_TABLE[self.mode]:
            raise ScenarioError(f"--ptes {self.ptes}: must be 1..{PTES_PER_TABLE[self.mode]} "
                                f"(entries of one page table in mode {self.mode})")
        if self.scans < 1:
            raise ScenarioError(f"--scans {self.scans}: must be at least 1")
        if not 0 <= self.linearity <= 100:
            raise ScenarioError(f"--linearity {self.linearity}: must be a percentage, 0..100")
        if not 0 <= self.seed < 1 << 32:
            raise ScenarioError(f"--seed {self.seed}: must fit in 32 bits")
        self.schedule_text()
        need = min_ram_mib(self.tables, self.ptes)
        if self.ram_mib is not None:
            if self.ram_mib < need:
                raise ScenarioError(f"--ram {self.ram_mib}: {self.tables} tables x {self.ptes} ptes need "
                                    f"at least {need} MiB (32 MiB lowmem + one highmem frame per "
                                    "table and per page)")
            if self.ram_mib > 4096:
                raise ScenarioError(f"--ram {self.ram_mib}: a 32-bit guest has at most 4096 MiB")
        elif need > 4096:
            raise ScenarioError(f"{self.tables} tables x {self.ptes} ptes need {need} MiB of RAM, "
                                "more than a 32-bit guest has (4096 MiB)")
        return self

    def schedule_text(self) -> str | None:
        """The schedule the run uses, as vm_scheduler writes it (None with one vCPU); checks
        ``vcpus`` and ``schedule`` (ScenarioError, status 2)."""
        from .machine import check_vcpus
        from .vm_scheduler import Schedule, parse_schedule
        try:
            check_vcpus(self.vcpus)
            sched = parse_schedule(self.schedule) if self.schedule is not None else None
        except (ValueError, TypeError) as e:
            raise ScenarioError(str(e)) from None
        if self.vcpus == 1:
            if sched is not None:
                raise ScenarioError("--schedule needs several vCPUs (--vcpus N, N > 1)")
            return None
        if self.vcpus > self.tables:
            raise ScenarioError(f"--vcpus {self.vcpus}: every vCPU scans a share of the user "
                                f"tables, so --tables ({self.tables}) must be at least --vcpus")
        return str(sched if sched is not None else Schedule("rr"))

    def share(self, cpu: int) -> tuple[int, int]:
        """vCPU ``cpu``'s user tables: (first, count) -- [c * T / N, (c + 1) * T / N), as the
        guest computes them (kscand.asm percpu_init)."""
        first = cpu * self.tables // self.vcpus
        return first, (cpu + 1) * self.tables // self.vcpus - first

    @property
    def ram(self) -> int:
        if self.ram_mib is not None:
            return self.ram_mib
        return max(128, -(-min_ram_mib(self.tables, self.ptes) // 64) * 64)

    def symbols(self) -> dict:
        return {"NTABLES": self.tables, "NPTES": self.ptes, "NSCANS": self.scans,
                "VARIANT": VARIANTS[self.variant], "ORDER": ORDERS[self.order],
                "LINEARITY": self.linearity, "SEED": self.seed, "KSTAT": KSTAT}


def min_ram_mib(tables: int, ptes: int) -> int:
    """RAM the guest needs: 32 MiB of lowmem, then one highmem frame per table and per page."""
    frames = tables * (ptes + 1)
    return LOWMEM_END // MiB + -(-frames * 4096 // MiB)


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (MiB if os.uname().sysname == "Darwin" else 1024), 1)


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


class _Snap:
    __slots__ = ("value", "counters", "emulated", "fix_emulated", "fix_zaps", "table_zaps", "guest", "t",
                 "tables_shadowed", "fixmap_shadowed", "user_emulated", "cpus", "slot_stores")


# the per-vCPU counts of a statistics block (summed over the vCPUs for the totals)
_PER_CPU_COUNTS = ("kmaps", "fixmap_writes", "kmap_skips", "btrs", "young", "kunmaps", "touches")


def _guest_blocks(m, n: int) -> list:
    """The guest's statistics blocks, one per vCPU (kscand.asm)."""
    raw = m.read_phys(KSTAT, KSTAT_STRIDE * (n - 1) + _KSTAT.size)
    return [dict(zip(_KSTAT_FIELDS, _KSTAT.unpack_from(raw, c * KSTAT_STRIDE))) for c in range(n)]


_image_cache: dict = {}


def scenario_images(path, mode: str, ram_mib: int, symbols: dict, what: str):
    """A scenario's guest program and firmware (assembled once per process: the assembler
    costs more than a small run); ScenarioError naming ``what`` (e.g. "the kmap guest")."""
    from .asm import AsmError, assemble_firmware, assemble_program
    key = (str(path), mode, ram_mib, tuple(sorted(symbols.items())))
    hit = _image_cache.get(key)
    if hit is not None:
        return hit
    try:
        program = assemble_program(str(path), mode, ram_mib * MiB, symbols=symbols)
        firmware = assemble_firmware(mode, ram_mib * MiB)
    except AsmError as e:
        raise ScenarioError(f"cannot assemble {what}: {e}", 70) from None
    except OSError as e:
        raise ScenarioError(f"cannot read {what} {e.filename}: {e.strerror} (a broken "
                            "install? reinstall x86shadow)") from None
    if len(_image_cache) >= 16:
        _image_cache.clear()
    _image_cache[key] = (program, firmware)
    return program, firmware


def _images(p: KmapParams):
    return scenario_images(PROGRAM, p.mode, p.ram, p.symbols(), "the kmap guest")


def run_kmap(params: KmapParams, policy_name: str, *, progress=None, unsync=None,
             host=None, audit: bool = False) -> dict:
    """Run the kmap scenario under one policy; return its run record (docs/JSON_RECORDS.md).
    ``host``: a machine.HostConfig (host memory under the guest, docs/HOST_MEMORY.md);
    ``audit``: check every shadow MMU invariant after each exit (a broken one ends the run with
    status 6)."""
    from .machine import Machine
    from .policies import config_label, make_policy

    p = params.check()
    ram = p.ram
    t0 = time.perf_counter()
    program, firmware = _images(p)
    try:
        policy = make_policy(policy_name, unsync)
    except ValueError as e:
        raise ScenarioError(str(e)) from None

    schedule = p.schedule_text()
    ncpu = p.vcpus
    try:
        m = Machine(p.mode, policy=policy, ram_mib=ram, host=host, audit=audit, vcpus=ncpu,
                    schedule=schedule)
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    m.load(program, firmware)
    vm_mmu = m.vm_mmu
    # every emulated store (emulated or emulated-ahead; never an unprotect), by frame
    emulated = {}
    # with several vCPUs, the emulated stores into the fixmap page table by (vCPU, pte address):
    # whose slot each vCPU wrote (the fixmap frame is known once block 0 is valid)
    slot_stores = {}
    pte_size = 4 if p.mode == "32" else 8
    fix_frame = [None]

    def on_emulated(_kind, f, _e=emulated):
        g = f["gpa"] >> 12
        _e[g] = _e.get(g, 0) + 1
        if g == fix_frame[0]:
            key = (m.current_vcpu.index, f["gpa"] & ~(pte_size - 1))
            slot_stores[key] = slot_stores.get(key, 0) + 1
    m.events.subscribe(on_emulated, (ev.EMULATED_WRITE,))
    # every shadow page zapped (flooded, misaligned, unprotected, recycled), by guest frame
    zapped = {}

    def on_zap(_kind, f, _z=zapped):
        if not f["direct"]:
            _z[f["gfn"]] = _z.get(f["gfn"], 0) + 1
    m.events.subscribe(on_zap, (ev.PREPARE_ZAP,))
    snaps: list[_Snap] = []

    def marker(_kind, f):
        value = f["value"]
        s = _Snap()
        s.value = value
        s.counters = dict(m.counters)
        s.emulated = sum(emulated.values())
        s.cpus = _guest_blocks(m, ncpu)
        g = dict(s.cpus[0])
        for name in _PER_CPU_COUNTS:              # block 0 is vCPU 0's: the totals are the sums
            g[name] = sum(c[name] for c in s.cpus)
        s.guest = g
        fgfn = g["fixmap_pt"] >> 12
        fix_frame[0] = fgfn
        s.slot_stores = dict(slot_stores)
        s.fix_emulated = emulated.get(fgfn, 0)
        s.fix_zaps = zapped.get(fgfn, 0)
        s.t = time.perf_counter()
        t0gfn = g["tables_pa"] >> 12
        s.user_emulated = sum(emulated.get(t0gfn + i, 0) for i in range(p.tables))
        s.table_zaps = sum(zapped.get(t0gfn + i, 0) for i in range(p.tables))
        s.tables_shadowed = sum(1 for i in range(p.tables) if vm_mmu.is_shadowed(t0gfn + i))
        s.fixmap_shadowed = vm_mmu.is_shadowed(fgfn)
        snaps.append(s)
        if progress is not None:
            progress(value >> 24, value & 0xFFFFFF)
    m.events.subscribe(marker, (ev.MARKER,))

    result = m.run()
    wall = time.perf_counter() - t0
    out = bytes(m.output).decode("latin-1")
    if result.status != 0 or not out.endswith("PASS\n"):
        why = result.report or out.strip() or f"exit status {result.status}"
        # a violation (docs/HOST_MEMORY.md) keeps its status 6; anything else is a crash
        raise ScenarioError(f"the kmap guest failed under policy {policy_name}: {why}",
                            6 if result.how == "violation" else 4)
    phases = [(s.value >> 24, s.value & 0xFFFFFF) for s in snaps]
    expect = [(PH_WARMUP, 0)] + [x for k in range(p.scans) for x in ((PH_KSCAND, k), (PH_USER, k))] \
        + [(PH_DONE, p.scans)]
    if phases != expect or any(c["magic"] != KSTAT_MAGIC for c in snaps[0].cpus):
        raise ScenarioError(f"the kmap guest's phase markers are not the expected ones: {phases}", 4)

    fgfn = snaps[0].guest["fixmap_pt"] >> 12
    starts = [snaps[1 + 2 * k] for k in range(p.scans)] + [snaps[-1]]
    mids = [snaps[2 + 2 * k] for k in range(p.scans)]

    def figures(a: _Snap, b: _Snap) -> dict:
        d = _delta(a.counters, b.counters)
        return {
            "kmaps": b.guest["kmaps"] - a.guest["kmaps"],
            "kmap_skips": b.guest["kmap_skips"] - a.guest["kmap_skips"],
            "fixmap_writes": b.guest["fixmap_writes"] - a.guest["fixmap_writes"],
            "fixmap_writes_emulated": b.fix_emulated - a.fix_emulated,
            "user_pte_writes_emulated": b.user_emulated - a.user_emulated,
            "emulated_writes": b.emulated - a.emulated,
            "fixmap_pt_zaps": b.fix_zaps - a.fix_zaps,
            "user_table_zaps": b.table_zaps - a.table_zaps,
            "reshadow_faults": d["mmu_cache_miss"],
            "ptes_tested": b.guest["btrs"] - a.guest["btrs"],
            "wall_s": round(b.t - a.t, 4),
        }, d

    per_scan, scan_details = [], []
    for k in range(p.scans):
        a, mid, b = starts[k], mids[k], starts[k + 1]
        info, d = figures(a, b)
        _, dk = figures(a, mid)
        _, du = figures(mid, b)
        per_scan.append(d)
        scan_details.append({
            "scan": k, **info,
            "kscand": {n: v for n, v in dk.items() if v},
            "user": {n: v for n, v in du.items() if v},
            "user_tables_shadowed_after_kscand": mid.tables_shadowed,
            "fixmap_pt_shadowed_after_kscand": mid.fixmap_shadowed,
        })
    info, totals = figures(starts[0], starts[-1])
    kmaps = info["kmaps"]
    per_vcpu = _per_vcpu(p, starts[0], starts[-1], m) if ncpu > 1 else None
    run = {
        "policy": policy_name, "unsync": bool(policy.unsync),
        "label": config_label(policy_name, bool(policy.unsync)), "mode": p.mode,
        "variant": p.variant, "order": p.order,
        "tables": p.tables, "ptes": p.ptes, "scans": p.scans,
        "linearity": p.linearity, "seed": p.seed, "ram_mib": ram,
        "vcpus": ncpu, "schedule": schedule,
        "kmaps": kmaps,
        "fixmap_writes": info["fixmap_writes"],
        "fixmap_writes_emulated": info["fixmap_writes_emulated"],
        "user_pte_writes_emulated": info["user_pte_writes_emulated"],
        "kmap_skips": info["kmap_skips"],
        "emulated_writes": info["emulated_writes"],
        "fixmap_pt_zaps": info["fixmap_pt_zaps"],
        "user_table_zaps": info["user_table_zaps"],
        "reshadow_faults": info["reshadow_faults"],
        "ptes_tested": info["ptes_tested"],
        "counters": totals,
        "per_scan": per_scan,
        "scan_details": scan_details,
        "per_kmap": ({k: round(v / kmaps, 4) for k, v in
                      (("exits", totals["exits"]), ("emulated_writes", info["emulated_writes"]),
                       ("fixmap_writes", info["fixmap_writes"]),
                       ("fixmap_writes_emulated", info["fixmap_writes_emulated"]),
                       ("user_pte_writes_emulated", info["user_pte_writes_emulated"]),
                       ("wp_faults", totals["wp_faults"]))} if kmaps else {}),
        "warmup_counters": dict(starts[0].counters),
        "run_counters": dict(result.counters),
        "fixmap_pt_gpa": fgfn << 12,
        "user_tables_gpa": snaps[0].guest["tables_pa"],
        "scans_wall_s": round(starts[-1].t - starts[0].t, 4),
        "wall_s": round(wall, 4),
        "peak_rss_mb": peak_rss_mb(),
    }
    if per_vcpu is not None:
        run["per_vcpu"] = per_vcpu
        run["smp"] = m.scheduler.stats()
    return run


def _per_vcpu(p: KmapParams, a: _Snap, b: _Snap, m) -> list:
    """Each vCPU's own figures over the scans: the guest's counts from its statistics block and
    its slot, and the fixmap stores the MMU emulated for it, by the pte they went to."""
    out = []
    for c, (ga, gb) in enumerate(zip(a.cpus, b.cpus)):
        first, count = p.share(c)
        kpte = gb["kpte"]

        def emulated(own, _c=c, _kpte=kpte):
            return sum(n - a.slot_stores.get(k, 0) for k, n in b.slot_stores.items()
                       if k[0] == _c and (k[1] == _kpte) == own)
        out.append({
            "vcpu": c, "first_table": first, "tables": count,
            "guest_tables": gb["ntables"],
            "guest_first_table_gpa": gb["tables_pa"],
            "kpte_gpa": kpte, "kmap_vaddr": gb["kmap_vaddr"],
            **{name: gb[name] - ga[name] for name in ("kmaps", "kmap_skips", "fixmap_writes",
                                                       "btrs", "kunmaps", "touches")},
            "slot_writes_emulated": emulated(True),
            "other_fixmap_writes_emulated": emulated(False),
            "insns": m.vcpus[c].insns,
        })
    return out


def metric(run: dict, key: str) -> int:
    """A figure of the SHOWN table from a run record (counters or scenario fields)."""
    if key in run:
        return run[key]
    return run["counters"][key]


def scan_metric(run: dict, k: int, key: str) -> int:
    d = run["scan_details"][k]
    if key in d:
        return d[key]
    return run["per_scan"][k][key]


# ---------------------------------------------------------------------------------- running several
def run_many(params: KmapParams, policies, *, executor=None, progress=None, unsync=None,
             host=None, audit: bool = False):
    """Run the scenario under each policy; results in order. ``policies``: names, or (name,
    unsync) pairs. ``executor`` (x86shadow/executor.py, made with ``fresh_process=True``):
    every run is a job in a process of its own (so wall time and peak RSS are that run's own);
    None: one after the other in this process. ``unsync`` (on/off/None) applies to the names
    given without a pair when they have out-of-sync pages; with several policies the others
    run as they are. ``audit``: run_kmap's."""
    params.check()
    from .policies import UNSYNC_POLICIES

    def config(entry):
        if not isinstance(entry, str):
            return entry
        return entry, (unsync if len(policies) == 1 or entry in UNSYNC_POLICIES else None)
    configs = [config(e) for e in policies]
    if executor is None:
        out = []
        for name, u in configs:
            if progress:
                progress(name, "start")
            out.append(run_kmap(params, name, progress=_scan_progress(name, params, progress),
                                unsync=u, host=host, audit=audit))
            if progress:
                progress(name, "done")
        return out
    from .executor import map_in_order
    jobs = [(params, name, u, host, audit) for name, u in configs]
    results = map_in_order(executor, _kmap_job, jobs,
                           done=(lambda job, _r: progress(job[1], "done")) if progress else None)
    return [job_result(r) for r in results]


def job_result(result):
    """The record of a scenario job (``_kmap_job``, aging's ``_aging_job``), or its error."""
    kind, payload = result
    if kind == "error":
        raise ScenarioError(*payload)
    return payload


def _kmap_job(job):
    """One kmap run in an executor's worker -> ("ok", record) or ("error", (message, status))."""
    params, name, unsync, host, audit = job
    try:
        return "ok", run_kmap(params, name, unsync=unsync, host=host, audit=audit)
    except ScenarioError as e:
        return "error", (str(e), e.status)
    except Exception as e:                         # noqa: BLE001 - reported by the parent
        return "error", (f"internal error in the run of policy {name}: {type(e).__name__}: {e}", 70)


def _scan_progress(name, params, progress):
    if progress is None:
        return None

    def each(phase, scan):
        if phase == PH_KSCAND:
            progress(name, f"scan {scan + 1}/{params.scans}")
    return each


# ---------------------------------------------------------------------------------- output
def _fmt(v) -> str:
    """A figure for a scenario table (also the aging scenario's)."""
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
    return f"{v:,}"


def describe(params: KmapParams) -> str:
    return (f"kmap scenario: mode {params.mode}, variant {params.variant}, order {params.order}"
            + (f" (linearity {params.linearity}%)" if params.order == "rmap" else "")
            + f", {params.tables} tables x {params.ptes} ptes, {params.scans} scans, "
              f"RAM {params.ram} MiB"
            + (f", {params.vcpus} vCPUs (schedule {params.schedule_text()})"
               if params.vcpus > 1 else ""))


def _smp_rows(run: dict) -> list:
    """With several vCPUs, the rows below the totals: (heading, value) for the remote TLB
    flushes and each vCPU's share, kmaps and its own slot."""
    if run.get("vcpus", 1) == 1:
        return []
    rows = [("remote TLB flushes", run["counters"]["remote_tlb_flush"])]
    for v in run["per_vcpu"]:
        c = v["vcpu"]
        last = v["first_table"] + v["tables"] - 1
        rows.append((f"vCPU {c}: tables {v['first_table']}..{last}, kmaps", v["kmaps"]))
        rows.append((f"vCPU {c}: slot pte {v['kpte_gpa']:#x}, stores emulated",
                     v["slot_writes_emulated"]))
    return rows


def table_single(run: dict):
    """One run: each figure as total, per scan (mean) and per kmap."""
    from rich.table import Table
    t = Table(title=f"policy {run['label']}", title_justify="left")
    t.add_column("figure")
    t.add_column("total", justify="right")
    t.add_column("per scan", justify="right")
    t.add_column("per kmap", justify="right")
    kmaps, scans = run["kmaps"], run["scans"]
    for key, head in SHOWN:
        v = metric(run, key)
        t.add_row(head, _fmt(v), _fmt(v / scans), _fmt(v / kmaps) if kmaps else "-")
    t.add_row("kmap_atomic calls", _fmt(kmaps), _fmt(kmaps / scans), "1")
    for head, v in _smp_rows(run):
        t.add_row(head, _fmt(v), _fmt(v / scans), _fmt(v / kmaps) if kmaps else "-")
    t.add_row("wall time (s, scans)", _fmt(run["scans_wall_s"]), _fmt(run["scans_wall_s"] / scans), "")
    t.add_row("wall time (s, whole run)", _fmt(run["wall_s"]), "", "")
    t.add_row("peak RSS (MB)", _fmt(run["peak_rss_mb"]), "", "")
    return t


def table_scans(runs: list) -> object:
    """Exits (and floods / re-shadows / unprotects) scan by scan, one column per policy."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    t = Table()
    t.add_column("scan", justify="right")
    for r in runs:
        t.add_column(r["label"], justify="right")
    for k in range(runs[0]["scans"]):
        cells = []
        for r in runs:
            s = r["per_scan"][k]
            cells.append(f"{s['exits']:,} ({s['mmu_flooded']}/{s['mmu_cache_miss']}/{s['mmu_unprotect']})")
        t.add_row(str(k + 1), *cells)          # scans are numbered from 1, as in the plot
    return Group(Text("per scan: exits (floods / re-shadow faults / unprotects)", style="italic"), t)


def table_compare(runs: list) -> object:
    """Every policy side by side: totals over the scans, then per-kmap and per-scan figures."""
    from rich.table import Table
    t = Table(title="totals over the scans", title_justify="left")
    t.add_column("figure")
    for r in runs:
        t.add_column(r["label"], justify="right")
    for key, head in SHOWN:
        t.add_row(head, *[_fmt(metric(r, key)) for r in runs])
    t.add_row("kmap_atomic calls", *[_fmt(r["kmaps"]) for r in runs])
    smp = [_smp_rows(r) for r in runs]
    for i, (head, _v) in enumerate(smp[0]):
        t.add_row(head, *[_fmt(rows[i][1]) for rows in smp])
    t.add_section()
    per_kmap = [("exits", "exits / kmap"), ("emulated_writes", "emulated / kmap"),
                ("fixmap_writes_emulated", "fixmap emulated / kmap"),
                ("user_pte_writes_emulated", "btrs emulated / kmap"),
                ("pf_fixed", "pf fixed / kmap")]
    if smp[0]:
        per_kmap.append(("remote_tlb_flush", "remote TLB flushes / kmap"))
    for key, head in per_kmap:
        t.add_row(head, *[_fmt(metric(r, key) / r["kmaps"]) if r["kmaps"] else "-" for r in runs])
    t.add_row("exits / scan (first)", *[_fmt(r["per_scan"][0]["exits"]) for r in runs])
    t.add_row("exits / scan (last)", *[_fmt(r["per_scan"][-1]["exits"]) for r in runs])
    t.add_row("user tables shadowed after last kscand",
              *[f"{r['scan_details'][-1]['user_tables_shadowed_after_kscand']}/{r['tables']}" for r in runs])
    t.add_section()
    t.add_row("wall time (s, scans)", *[_fmt(r["scans_wall_s"]) for r in runs])
    t.add_row("wall time (ms / scan)", *[_fmt(1000 * r["scans_wall_s"] / r["scans"]) for r in runs])
    t.add_row("peak RSS (MB)", *[_fmt(r["peak_rss_mb"]) for r in runs])
    return t


def write_json(path, runs: list, scenario: str = "kmap") -> None:
    """``--json``: ``{"scenario": NAME, "runs": [...]}`` (docs/JSON_RECORDS.md)."""
    import json
    with open(path, "w") as f:
        json.dump({"scenario": scenario, "runs": runs}, f, indent=1)
        f.write("\n")


def check_plot(path) -> None:
    """Fail before any run if --plot cannot work."""
    if not str(path).lower().endswith(".png"):
        raise ScenarioError(f"--plot {path!r}: the plot is a PNG file (name it ...png)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ScenarioError("--plot needs matplotlib, which is not installed "
                            "(pip install matplotlib, or pip install 'x86shadow[plot]')") from None


def plot(path, runs: list, params: KmapParams) -> None:
    """Cost (exits) of every scan, one line per policy."""
    check_plot(path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(9, 4.8))
    xs = list(range(1, params.scans + 1))
    markers = "osD^vP*Xh"
    styles = ["-", "--", "-.", ":"]
    n = len(runs)
    for i, r in enumerate(runs):
        # policies with equal costs draw on top of each other: earlier lines are drawn wider
        # and with bigger markers, so each stays visible under the later ones
        width = 1.2 + (3.0 * (n - 1 - i) / (n - 1) if n > 1 else 0)
        ax.plot(xs, [s["exits"] for s in r["per_scan"]], marker=markers[i % len(markers)],
                markersize=4 + width * 1.5, linewidth=width, linestyle=styles[i % len(styles)],
                label=r["label"], alpha=0.8)
    ax.set_ylim(bottom=0)                 # from zero: a 20% difference looks like one
    ax.set_xlabel("scan (kscand pass + the process touching its pages), numbered from 1")
    ax.set_ylabel("exits in the scan")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_title(describe(params).replace("kmap scenario: ", ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise ScenarioError(f"cannot write plot {path!r}: {e.strerror}") from None
    finally:
        plt.close(fig)


__all__ = ["KmapParams", "ScenarioError", "run_kmap", "run_many", "min_ram_mib", "VARIANTS", "ORDERS",
           "table_single", "table_compare", "table_scans", "write_json", "plot", "check_plot",
           "describe"]
