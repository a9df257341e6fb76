"""``--trace-format perfetto``: the trace as Chrome trace-event JSON, the format ui.perfetto.dev
and chrome://tracing open (docs/TRACE_VIEWERS.md).

:class:`PerfettoTrace` has :class:`events.JsonTrace`'s call interface (``trace(kind, fields)``
for every tracepoint event) plus ``close()``, and writes as it goes: nothing but a few numbers
per vCPU is kept, and ``close()`` finishes the JSON whatever stopped the run (the guest's end, a
crash, ``--max-insns``, SIGINT). The file::

    {"displayTimeUnit":"ns","traceEvents":[
    {"ph":"M","name":"process_name",...}
    ,{"ph":"X","name":"EXCEPTION_NMI",...}       <- one event per line, a comma in front
    ...
    ],"otherData":{"clock":"insns",...}}

* One process (pid 1), one thread per vCPU (tid = vCPU + 1, named ``vCPU n``); an event's vCPU is
  its ``vcpu_id`` field (``kvm_entry`` has it), 0 for events without one.
* Each exit is a complete slice (``ph`` X) named by its reason, with the ``kvm_exit`` fields as
  args. It covers the exit's handling: from the first record after the ``kvm_entry`` before it
  (a shadow page fault writes its ``kvm_mmu_get_page`` records ahead of its ``kvm_exit``,
  docs/TRACE.md) to the next ``kvm_entry``. Every other event is an instant (``ph`` i) on its
  vCPU's track, so the MMU's and the host's records of an exit sit inside the exit's slice.
  Events of the guest's own run never open a slice: ``x86shadow_marker`` (the marker port is not
  an exit) and a ``kvm_inj_exception`` before any exit (``int n``, ``ud2``: delivered through
  the guest IDT without an exit).
* Every event's args are its fields as the JSON-lines trace has them, plus ``trace_seq`` (the
  record's ``seq`` there) and ``insns`` when instructions are counted; addresses, frame numbers,
  error codes and values (:data:`HEX_KEYS`) are written as ``"0x..."`` strings so the UI shows
  them in hex.
* Counter tracks (``ph`` C) computed from the events: ``exits`` (one per ``kvm_exit``),
  ``shadow pages`` (``kvm_mmu_get_page`` minus ``kvm_mmu_prepare_zap_page``), ``page faults``
  (pf_taken, pf_fixed, pf_guest, pf_retry, wp_faults) and, with host memory, ``host ops``.
* The time axis (the trace has no wall clock): ``insns``: 1 us = 1 guest instruction (runs with
  ``--max-insns``), events at the same instruction count 10 ns apart; ``seq``: 1 us per event
  (the record's ``seq``); ``wall``: real time since the trace was opened (not deterministic).
  The process name says which, and so does ``otherData``.
"""
from __future__ import annotations

import json
import os
import time

from . import events as ev

CLOCKS = ("auto", "insns", "seq", "wall")
FORMATS = ("jsonl", "perfetto")
PID = 1

# fields shown in hex (as "0x..." strings in args; x86shadow.trace_view turns them back)
HEX_KEYS = frozenset({"rip", "address", "error_code", "guest_error_code", "gpa", "cr2", "cr3",
                      "value", "msr", "port", "gfn", "hva", "pfn", "old_pfn", "new_pfn", "start",
                      "end", "pdptes"})

# the "cat" of each kind's instants (a filter in chrome://tracing)
_MMU = {ev.PAGE_FAULT, ev.GET_PAGE, ev.PREPARE_ZAP, ev.UNSYNC_PAGE, ev.SYNC_PAGE,
        ev.WRITE_PROTECT_FAULT, ev.POLICY, ev.UNPROTECT, ev.INVLPG, ev.NEW_ROOT,
        ev.RELOAD_PDPTES, ev.KVM_EMULATE_INSN}
_HOST = {ev.HOST_OP, ev.MMU_NOTIFIER, ev.HOST_UNMAP_HVA, ev.HOST_AGE_HVA, ev.PF_RETRY}
_EXIT = {ev.KVM_ENTRY, ev.KVM_PIO, ev.KVM_CR, ev.INJ_EXCEPTION}
SLICE_CAT = "kvm_exit"
# events of the guest's own run (no exit): they never open an exit's slice. A marker write is not
# an exit; an exception or `int n` delivered through the guest IDT without an exit (ud2, int 0x80)
# happens while the guest runs (one reflected by a fault exit comes after that exit's kvm_exit)
_GUEST_RUN = frozenset({ev.TRACE_MARKER, ev.INJ_EXCEPTION})

# host operations counted as host_<op> in --stats-json
HOST_OPS = ("swap_out", "swap_in", "migrate", "ksm_merge", "cow_break", "munmap")
FAULT_COUNTERS = ("pf_taken", "pf_fixed", "pf_guest", "pf_retry", "wp_faults")
_FAULT_KIND = {ev.PAGE_FAULT: None, ev.PF_RETRY: "pf_retry", ev.WRITE_PROTECT_FAULT: "wp_faults"}

CLOCK_TEXT = {
    "insns": "guest instructions: 1 us = 1 instruction (events at the same count 10 ns apart)",
    "seq": "event sequence: 1 us = 1 trace event (ts = seq)",
    "wall": "wall clock: real time since the trace was opened",
}


def category(kind: str) -> str:
    if kind in _MMU:
        return "mmu"
    if kind in _HOST:
        return "host"
    if kind in _EXIT:
        return "exit"
    if kind == ev.TRACE_MARKER:
        return "guest"
    return "x86shadow"


def _hex(v):
    if type(v) is int:
        return hex(v)
    if isinstance(v, list):
        return [_hex(x) for x in v]
    return v


def _us(ns: int) -> str:
    """A timestamp in ns as the JSON number of microseconds, exactly (no float rounding)."""
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    return f"{sign}{ns // 1000}.{ns % 1000:03d}"


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _Vcpu:
    __slots__ = ("entered", "start", "exit", "fault")

    def __init__(self):
        self.entered = False    # a kvm_entry, and the exit that ends it not seen yet
        self.start = None       # ns: the open (or opening) exit slice began here
        self.exit = None        # (name, args) of the open slice's kvm_exit
        self.fault = False      # the open slice is an EXCEPTION_NMI exit not yet classified


class PerfettoTrace:
    """``--trace-format perfetto`` (module docstring). ``clock``: ``insns``, ``seq`` or
    ``wall``; ``title``: the process name shown in the viewer."""

    def __init__(self, fp, clock: str = "seq", title: str = "x86shadow"):
        if clock not in CLOCKS[1:]:
            raise ValueError(f"unknown trace clock {clock!r} (insns, seq or wall)")
        self.fp = fp
        self.clock = clock
        self.n = 0
        self.tick = 1000 if clock == "seq" else 10          # ns between two events at least
        self.half = self.tick // 2
        self.last = 0                                        # ns of the last event
        self.insns = 0
        self.t0 = time.perf_counter_ns()
        self.vcpus = {}
        self.counts = dict.fromkeys(("exits", "shadow_pages") + FAULT_COUNTERS, 0)
        self.host = None                                     # host_<op> counts, once one ran
        self.closed = False
        self.title = title
        self.started = False            # the header is written with the first event (so that
                                        # a write error happens in a call, where the sink is)

    # ------------------------------------------------------------------ building blocks
    def _start(self) -> None:
        self.started = True
        name = f"{self.title} [clock: {CLOCK_TEXT[self.clock]}]"
        self.fp.write('{"displayTimeUnit":"ns","traceEvents":[\n'
                      + _dumps({"ph": "M", "name": "process_name", "pid": PID, "tid": 0,
                                "args": {"name": name}}) + "\n")
        self._out([self._counter(0, 1, "exits", {"total": 0}),
                   self._counter(0, 1, "shadow pages", {"live": 0}),
                   self._counter(0, 1, "page faults", self._faults())])

    def _out(self, lines) -> None:
        if not self.started:
            self._start()
        if lines:
            self.fp.write("".join("," + s + "\n" for s in lines))

    @staticmethod
    def _event(ph, ts, tid, name, cat, args, dur=None) -> str:
        d = "" if dur is None else f'"dur":{_us(dur)},'
        return (f'{{"ph":"{ph}","ts":{_us(ts)},{d}"pid":{PID},"tid":{tid},'
                f'"name":{_dumps(name)},"cat":"{cat}"'
                + ("" if ph == "X" else ',"s":"t"') + f',"args":{_dumps(args)}}}')

    @staticmethod
    def _counter(ts, tid, name, values) -> str:
        return (f'{{"ph":"C","ts":{_us(ts)},"pid":{PID},"tid":{tid},"name":{_dumps(name)},'
                f'"args":{_dumps(values)}}}')

    def _faults(self) -> dict:
        return {k: self.counts[k] for k in FAULT_COUNTERS}

    def _now(self, fields) -> int:
        if self.clock == "seq":
            t = self.n * 1000
        elif self.clock == "insns":
            n = fields.get("insns")
            if n is not None:
                self.insns = n
            t = max(self.insns * 1000, self.last + self.tick)
        else:
            t = max(time.perf_counter_ns() - self.t0, self.last + self.tick)
        self.last = t
        return t

    def _vcpu(self, vcpu, out):
        st = self.vcpus.get(vcpu)
        if st is None:
            st = self.vcpus[vcpu] = _Vcpu()
            out.append(_dumps({"ph": "M", "name": "thread_name", "pid": PID, "tid": vcpu + 1,
                               "args": {"name": f"vCPU {vcpu}"}}))
            out.append(_dumps({"ph": "M", "name": "thread_sort_index", "pid": PID,
                               "tid": vcpu + 1, "args": {"sort_index": vcpu}}))
        return st

    def _end_slice(self, vcpu, st, end, out) -> None:
        if st.fault:                                  # a fault exit nothing classified
            self._fault(st, None, end, vcpu + 1, out)
        if st.exit is not None:
            name, args = st.exit
            out.append(self._event("X", st.start, vcpu + 1, name, SLICE_CAT, args,
                                   dur=max(end - st.start, 0)))
        st.start = st.exit = None

    # ------------------------------------------------------------------ the sink
    def __call__(self, kind, fields):
        if self.closed:
            return
        self.n += 1
        t = self._now(fields)
        vcpu = fields.get("vcpu_id", 0)
        if type(vcpu) is not int or vcpu < 0:
            vcpu = 0
        out = []
        st = self._vcpu(vcpu, out)
        args = {k: (_hex(v) if k in HEX_KEYS else v) for k, v in fields.items() if k != "insns"}
        args["trace_seq"] = self.n
        if "insns" in fields:
            args["insns"] = fields["insns"]
        tid = vcpu + 1
        c = self.counts
        if kind == ev.KVM_ENTRY:
            self._end_slice(vcpu, st, t - self.half, out)
            st.entered = True
            out.append(self._event("i", t, tid, kind, "exit", args))
        elif kind == ev.KVM_EXIT:
            if st.exit is not None:                       # two exits without an entry between
                self._end_slice(vcpu, st, t - self.half, out)
            if st.start is None:
                st.start = t - self.half
            st.exit = (str(fields.get("reason", "kvm_exit")), args)
            st.entered = False
            c["exits"] += 1
            out.append(self._counter(t, tid, "exits", {"total": c["exits"]}))
            st.fault = fields.get("reason") == "EXCEPTION_NMI"
        else:
            if st.entered and st.start is None and kind not in _GUEST_RUN:
                st.start = t - self.half                  # the exit's records before its kvm_exit
            out.append(self._event("i", t, tid, kind, category(kind), args))
            self._count(st, kind, fields, t, tid, out)
        self._out(out)

    def _fault(self, st, key, t, tid, out) -> None:
        """The open EXCEPTION_NMI exit is a fault of kind ``key`` (None: none of them)."""
        st.fault = False
        c = self.counts
        c["pf_taken"] += 1
        if key is not None:
            c[key] += 1
        out.append(self._counter(t, tid, "page faults", self._faults()))

    def _count(self, st, kind, fields, t, tid, out) -> None:
        c = self.counts
        if kind == ev.GET_PAGE:
            c["shadow_pages"] += 1
            out.append(self._counter(t, tid, "shadow pages", {"live": c["shadow_pages"]}))
        elif kind == ev.PREPARE_ZAP:
            c["shadow_pages"] -= 1
            out.append(self._counter(t, tid, "shadow pages", {"live": c["shadow_pages"]}))
        elif st.fault and kind in _FAULT_KIND:
            # what an EXCEPTION_NMI exit was: the record that follows its kvm_exit says
            # (pf_taken = pf_fixed + pf_guest + wp_faults + pf_retry, docs/COUNTERS.md)
            key = _FAULT_KIND[kind]
            if kind == ev.PAGE_FAULT:
                key = {"fixed": "pf_fixed", "inject": "pf_guest"}.get(fields.get("result"))
            if key is not None:
                self._fault(st, key, t, tid, out)
        elif kind == ev.HOST_OP and fields.get("op") in HOST_OPS:
            if self.host is None:
                self.host = {f"host_{op}": 0 for op in HOST_OPS}
                out.append(self._counter(0, tid, "host ops", dict(self.host)))
            self.host[f"host_{fields['op']}"] += 1
            out.append(self._counter(t, tid, "host ops", dict(self.host)))

    def close(self) -> None:
        """End the open exit slices and the JSON (the run ends at an exit, so one is open).
        Called once, from the trace sink's close(), whatever stopped the run."""
        if self.closed:
            return
        self.closed = True
        out = []
        try:
            end = self.last + self.half
            for vcpu, st in sorted(self.vcpus.items()):
                self._end_slice(vcpu, st, end, out)
        finally:
            # even if a second signal lands in the middle of the above
            self._out(out)                  # (the header too, for a trace without events)
            other = {"generator": "x86shadow", "clock": self.clock,
                     "time_axis": CLOCK_TEXT[self.clock], "events": str(self.n),
                     "format": "docs/TRACE_VIEWERS.md"}
            self.fp.write("]," + _dumps({"otherData": other})[1:] + "\n")
            self.fp.flush()


# ---------------------------------------------------------------------- the run command's options
def add_run_options(parser) -> None:
    """``--trace-format`` and ``--trace-clock`` on ``x86shadow run``."""
    parser.add_argument("--trace-format", choices=FORMATS, default=None,
                        help="--trace as JSON lines (jsonl, default; docs/TRACE.md) or as "
                             "Chrome trace-event JSON for ui.perfetto.dev and chrome://tracing "
                             "(perfetto; docs/TRACE_VIEWERS.md)")
    parser.add_argument("--trace-clock", choices=CLOCKS, default=None,
                        help="time axis of --trace-format perfetto: insns (1 us = 1 guest "
                             "instruction; needs --max-insns), seq (1 us = 1 event), wall "
                             "(real time); auto (default): insns with --max-insns, else seq")


def trace_writer(args):
    """What ``--trace`` writes with: None (the JSON-lines ``events.JsonTrace``) or a function
    ``fp -> PerfettoTrace``. ValueError for a combination of options that makes no sense."""
    fmt = getattr(args, "trace_format", None)
    clock = getattr(args, "trace_clock", None)
    if args.trace is None:
        if fmt is not None or clock is not None:
            raise ValueError(f"--trace-{'format' if fmt is not None else 'clock'} needs "
                             "--trace PATH")
        return None
    if fmt in (None, "jsonl"):
        if clock is not None:
            raise ValueError("--trace-clock is for --trace-format perfetto (the JSON-lines "
                             "trace numbers its records: seq, and insns with --max-insns)")
        return None
    if clock in (None, "auto"):
        clock = "insns" if args.max_insns else "seq"
    elif clock == "insns" and not args.max_insns:
        raise ValueError("--trace-clock insns needs --max-insns N (guest instructions are "
                         "counted only then)")
    title = f"x86shadow run {os.path.basename(args.program)} --mode {args.mode}"
    if getattr(args, "mmu", "shadow") == "shadow":
        title += f" --policy {args.policy}"
    else:
        title += f" --mmu {args.mmu}"
    if getattr(args, "host", None):
        title += f" --host {args.host}"
    return lambda fp: PerfettoTrace(fp, clock=clock, title=title)
