"""Typed events with one sink: the trace, the counters' observers (scenario, bench, fault lab)
subscribe here; nothing is observed by wrapping or monkey-patching the MMU or the vCPU.

Every event has a kind. Tracepoint kinds (KVM's tracepoint names) go to ``--trace``; observer kinds
are for in-process subscribers only and never appear in a trace, so adding one changes no output.
Emitting is cheap when nobody listens: ``wants(kind)`` is one set lookup, and hot paths (the TLB
fill) test it before building the fields.
"""
from __future__ import annotations

import json

# tracepoint kinds (written by --trace; docs/TRACE.md). KVM's names where KVM has the same
# tracepoint, x86shadow_* for ours.
KVM_EXIT = "kvm_exit"
KVM_ENTRY = "kvm_entry"
KVM_PIO = "kvm_pio"
KVM_MMIO = "kvm_mmio"                  # rw, len, gpa, val: an MMIO access (after its kvm_exit)
KVM_CR = "kvm_cr"
KVM_EMULATE_INSN = "kvm_emulate_insn"
PAGE_FAULT = "kvm_page_fault"
GET_PAGE = "kvm_mmu_get_page"
PREPARE_ZAP = "kvm_mmu_prepare_zap_page"
UNSYNC_PAGE = "kvm_mmu_unsync_page"
SYNC_PAGE = "kvm_mmu_sync_page"
INJ_EXCEPTION = "kvm_inj_exception"
WRITE_PROTECT_FAULT = "x86shadow_write_protect_fault"
POLICY = "x86shadow_policy"
UNPROTECT = "x86shadow_unprotect"
INVLPG = "x86shadow_invlpg"
NEW_ROOT = "x86shadow_new_root"
RELOAD_PDPTES = "x86shadow_reload_pdptes"
TRACE_MARKER = "x86shadow_marker"      # value: the guest wrote MARKER_PORT
HOST_OP = "x86shadow_host_op"          # op, hva ...: the host swapped, migrated, merged ... a page
MMU_NOTIFIER = "x86shadow_mmu_notifier"  # notifier: the mm called KVM's notifier op
HOST_UNMAP_HVA = "kvm_unmap_hva_range"  # KVM zapped the sptes of an hva range
HOST_AGE_HVA = "kvm_age_hva"           # KVM aged an hva range (young: the answer)
PF_RETRY = "x86shadow_pf_retry"        # a fault raced an invalidation: nothing installed
X86SHADOW_CPU_FAULT = "x86shadow_cpu_fault"  # insn, vector, reason: the CPU model's rule made
                                       # an instruction fault (cpu_model.py, docs/CPU_MODEL.md)
X86SHADOW_CPU_EMULATE = "x86shadow_cpu_emulate"  # insn: the CPU model carried it out itself
TRACEPOINTS = frozenset({KVM_EXIT, KVM_ENTRY, KVM_PIO, KVM_MMIO, KVM_CR, KVM_EMULATE_INSN, PAGE_FAULT,
                         GET_PAGE, PREPARE_ZAP, UNSYNC_PAGE, SYNC_PAGE, INJ_EXCEPTION,
                         WRITE_PROTECT_FAULT, POLICY, UNPROTECT, INVLPG, NEW_ROOT, RELOAD_PDPTES,
                         TRACE_MARKER, HOST_OP, MMU_NOTIFIER, HOST_UNMAP_HVA, HOST_AGE_HVA,
                         PF_RETRY, X86SHADOW_CPU_FAULT, X86SHADOW_CPU_EMULATE})

# observer kinds (in-process only)
TLB_FILL = "tlb_fill"                  # va, access: the hardware walk ran (a TLB miss)
CR3_LOAD = "cr3_load"                  # cr3: the guest executed mov to CR3
EMULATED_WRITE = "emulated_write"      # gpa, size, ahead: a trapped store completed for the guest
EXIT = "exit"                          # the MMU finished handling an exit (the audit runs here)
MARKER = "marker"                      # value: the guest wrote MARKER_PORT (Machine.markers ...;
                                       # the trace gets TRACE_MARKER: observing a marker must not
                                       # turn tracing on)
HOST_TIMING = "host_timing"            # part, seconds: a host-side call took this long (part:
                                       # "schedule" a scheduled operation, "op" a host operation,
                                       # "swap_in", "notifier" an invalidation, "flush" the
                                       # notifier's TLB flush); emitted only while subscribed
OBSERVER_KINDS = frozenset({TLB_FILL, CR3_LOAD, EMULATED_WRITE, EXIT, MARKER, HOST_TIMING})


class EventBus:
    """One sink per VM. ``subscribe(fn, kinds)``: fn(kind, fields) for those kinds (all
    tracepoints when kinds is None)."""

    def __init__(self):
        self.subs = {}                  # kind -> [fn]; `kind in bus.subs` is the cheapest test
        self.tracing = False            # any tracepoint subscriber
        self.entry_due = True           # the guest has not run since the last kvm_exit (or start)

    def subscribe(self, fn, kinds=None) -> None:
        for kind in (TRACEPOINTS if kinds is None else kinds):
            if kind not in TRACEPOINTS and kind not in OBSERVER_KINDS:
                raise ValueError(f"unknown event kind {kind!r}")
            self.subs.setdefault(kind, []).append(fn)
        self.tracing = any(k in self.subs for k in TRACEPOINTS)

    def wants(self, kind) -> bool:
        return kind in self.subs

    def guest_runs(self) -> None:
        """The guest is running (it exits, or writes a marker): emit the ``kvm_entry`` that
        preceded this if it is still due. Exits are handled inside the CPU emulator's callbacks
        and the guest resumes when the callback returns, so the entry is written lazily, just
        before the guest's next event; an exit the run ends at has no entry after it. Called
        only while tracing."""
        if self.entry_due:
            self.entry_due = False
            self.emit(KVM_ENTRY, vcpu_id=0)

    def emit(self, kind, **fields) -> None:
        subs = self.subs.get(kind)
        if subs:
            for fn in subs:
                fn(kind, fields)


class JsonTrace:
    """``--trace``: one JSON object per tracepoint event, ``{"...fields", "event": kind}``."""

    def __init__(self, fp):
        self.fp = fp
        self.n = 0

    def __call__(self, kind, fields):
        self.n += 1
        rec = dict(fields)
        rec["event"] = kind
        rec["seq"] = self.n                # 1, 2, ... in the order the events happened
        self.fp.write(json.dumps(rec, separators=(",", ":")) + "\n")
