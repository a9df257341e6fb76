"""``x86shadow trace show FILE``: a trace as text, one line per event, as ``trace-cmd report``
shows ftrace's (docs/TRACE_VIEWERS.md)::

        seq      insns vcpu  event: fields
         20      74131 [000] kvm_exit: reason=EXCEPTION_NMI rip=0x1000fd vector=14 ...

The sequence number, the guest instruction count (a column only when the trace has it: runs with
``--max-insns``), the vCPU, the event, then its fields as key=value in the order the trace has
them (the order the event's code emits them); addresses, frame numbers, error codes and values in
hex. FILE is a JSON-lines trace (``--trace``) or a Chrome trace-event file written by
``--trace-format perfetto``, told apart by content; both show the same lines (the JSON-lines
trace has lost an event's own ``seq`` field to the record number, docs/TRACE_VIEWERS.md).

Everything is read as a stream: a perfetto file written by x86shadow is read line by line (its
exit slices are written after their instants; a small heap puts the events back in order).
"""
from __future__ import annotations

import fnmatch
import heapq
import json
import sys

from .trace_perfetto import HEX_KEYS, SLICE_CAT

EXIT_BAD_INPUT = 2
_PEEK = 64                      # records read ahead to decide whether there is an insns column
_HEADER = '{"displayTimeUnit":"ns","traceEvents":['


class TraceError(Exception):
    """Bad input: the message names the file (and the line)."""


class Event:
    __slots__ = ("seq", "insns", "vcpu", "kind", "fields")

    def __init__(self, seq, insns, vcpu, kind, fields):
        self.seq, self.insns, self.vcpu, self.kind, self.fields = seq, insns, vcpu, kind, fields

    def __lt__(self, other):
        return self.seq < other.seq


# ---------------------------------------------------------------------- formatting
def _value(key, v) -> str:
    if type(v) is int:
        return hex(v) if key in HEX_KEYS else str(v)
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        if v and not any(ch.isspace() or ch in '"=\\' for ch in v):
            return v
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ",".join(_value(key, x) for x in v) + "]"
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def format_event(e: Event, insns_column: bool) -> str:
    fields = " ".join(f"{k}={_value(k, v)}" for k, v in e.fields.items())
    cols = f"{e.seq:>7} "
    if insns_column:
        cols += f"{'-' if e.insns is None else e.insns:>10} "
    return f"{cols}[{e.vcpu:03d}] {e.kind}: {fields}".rstrip()


def header(insns_column: bool) -> str:
    return f"{'seq':>7} " + (f"{'insns':>10} " if insns_column else "") + "vcpu  event: fields"


# ---------------------------------------------------------------------- reading
def _vcpu_of(fields) -> int:
    v = fields.get("vcpu_id", 0)
    return v if type(v) is int and v >= 0 else 0


def _jsonl_event(rec, where) -> Event:
    if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
        raise TraceError(f"{where}: not a trace record (a JSON object with \"event\" and "
                         "\"seq\")")
    seq = rec.get("seq")
    if type(seq) is not int:
        raise TraceError(f"{where}: not a trace record (no integer \"seq\")")
    fields = {k: v for k, v in rec.items() if k not in ("event", "seq", "insns")}
    return Event(seq, rec.get("insns"), _vcpu_of(fields), rec["event"], fields)


def _unhex(v):
    if isinstance(v, str) and v[:2] in ("0x", "-0"):
        try:
            return int(v, 16)
        except ValueError:
            return v
    if isinstance(v, list):
        return [_unhex(x) for x in v]
    return v


def _perfetto_event(d, where):
    """An x86shadow event from one trace-event dict, or None (metadata, counters, others')."""
    if not isinstance(d, dict):
        raise TraceError(f"{where}: not a trace event (a JSON object)")
    ph = d.get("ph")
    if ph not in ("X", "i", "I"):
        return None
    args = d.get("args")
    if not isinstance(args, dict) or type(args.get("trace_seq")) is not int:
        return None
    kind = "kvm_exit" if ph == "X" and d.get("cat") == SLICE_CAT else d.get("name")
    if not isinstance(kind, str):
        raise TraceError(f"{where}: trace event without a name")
    fields = {k: (_unhex(v) if k in HEX_KEYS else v) for k, v in args.items()
              if k not in ("trace_seq", "insns")}
    tid = d.get("tid")
    vcpu = tid - 1 if type(tid) is int and tid >= 1 else _vcpu_of(fields)
    return Event(args["trace_seq"], args.get("insns"), vcpu, kind, fields)


def _lines(fp, name):
    """(number, text) of each line; a last line without its newline is marked truncated."""
    n = 0
    try:
        for line in fp:
            n += 1
            yield n, line
    except UnicodeDecodeError:
        raise TraceError(f"{name} line {n + 1}: not text (a binary file is not a trace)") \
            from None
    except OSError as e:
        raise TraceError(f"cannot read trace {name!r}: {e.strerror}") from None


def _bad_json(name, n, line, e) -> TraceError:
    if not line.endswith("\n"):
        return TraceError(f"{name} line {n}: truncated (the file ends in the middle of a "
                          "record)")
    return TraceError(f"{name} line {n}: not JSON ({e.msg} at column {e.colno})")


def _read_jsonl(first, lines, name):
    n, line = first
    while True:
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad_json(name, n, line, e) from None
            yield _jsonl_event(rec, f"{name} line {n}")
        try:
            n, line = next(lines)
        except StopIteration:
            return


def _in_order(events):
    """Events by seq: the writer puts an exit's slice after the instants that follow its
    kvm_exit; hold them until the next expected number arrives."""
    heap = []
    want = None
    error = None
    try:
        for e in events:
            if want is None:
                want = e.seq
            heapq.heappush(heap, e)
            while heap and heap[0].seq <= want:
                e = heapq.heappop(heap)
                want = e.seq + 1
                yield e
    except TraceError as e:
        error = e
    # the end, or bad input, with events held: they come out first, in order
    while heap:
        yield heapq.heappop(heap)
    if error is not None:
        raise error


def _read_perfetto_lines(lines, name):
    """A file as PerfettoTrace writes it: the header line, one event per line (a comma in
    front), the closing line ``],"otherData":...}``."""
    n = 1
    for n, line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("]"):
            try:
                json.loads("{" + text[1:].lstrip().lstrip(",") if text[1:].strip() else "{}")
            except json.JSONDecodeError as e:
                raise _bad_json(name, n, line, e) from None
            return
        if text.startswith(","):
            text = text[1:]
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad_json(name, n, line, e) from None
        e = _perfetto_event(d, f"{name} line {n}")
        if e is not None:
            yield e
    raise TraceError(f"{name} line {n}: truncated (the trace-event array is not closed: the "
                     "run was killed before the trace was closed?)")


def _read_perfetto_whole(fp, name, head, lineno):
    """Any other trace-event JSON file (one object or one array): read whole."""
    try:
        text = head + fp.read()
    except UnicodeDecodeError:
        raise TraceError(f"{name}: not text (a binary file is not a trace)") from None
    except OSError as e:
        raise TraceError(f"cannot read trace {name!r}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{name} line {lineno + e.lineno - 1}"
        if e.pos >= len(text.rstrip()):
            raise TraceError(f"{where}: truncated (the file ends in the middle of the "
                             "JSON)") from None
        raise TraceError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    items = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise TraceError(f"{name}: not a trace (no traceEvents array)")
    evs = [e for e in (_perfetto_event(d, f"{name} event {i}") for i, d in enumerate(items))
           if e is not None]
    if items and not evs:
        raise TraceError(f"{name}: a trace-event file without x86shadow events (written by "
                         "x86shadow run --trace-format perfetto?)")
    evs.sort(key=lambda e: e.seq)
    return iter(evs)


def read_trace(fp, name="trace"):
    """The events of a trace file (an open text file), in order: JSON lines or perfetto."""
    lines = _lines(fp, name)
    for first in lines:
        if first[1].strip():
            break
    else:
        raise TraceError(f"{name}: empty, not a trace")
    n, line = first
    text = line.strip()
    if text == _HEADER:
        return _in_order(_read_perfetto_lines(lines, name))
    if text.startswith("{"):
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            # not one record a line: one JSON document (a trace-event file laid out otherwise)
            return _read_perfetto_whole(fp, name, line, n)
        if isinstance(rec, dict) and "event" in rec:
            return _read_jsonl(first, lines, name)
        if isinstance(rec, dict) and "traceEvents" in rec:
            return _read_perfetto_whole(fp, name, line, n)
    elif text.startswith("["):
        return _read_perfetto_whole(fp, name, line, n)
    raise TraceError(f"{name} line {n}: not an x86shadow trace (neither JSON lines from "
                     "--trace nor a trace-event file from --trace-format perfetto)")


# ---------------------------------------------------------------------- the command
def add_trace_parser(sub) -> None:
    """``x86shadow trace show`` (registered by cli.build_parser)."""
    t = sub.add_parser("trace", help="look at a trace written by run --trace",
                       description="Look at a trace written by x86shadow run --trace "
                                   "(JSON lines or --trace-format perfetto).")
    tsub = t.add_subparsers(dest="trace_command", metavar="{show}", required=True,
                            parser_class=type(t))
    s = tsub.add_parser("show", help="one line per event, as trace-cmd report",
                        description="One line per event: seq, insns (when counted), vCPU, the "
                                    "event, its fields as key=value (addresses in hex). FILE "
                                    "is a JSON-lines trace or a --trace-format perfetto file.")
    s.add_argument("file", metavar="FILE", help="the trace (- for standard input)")
    s.add_argument("--event", action="append", metavar="NAME[,NAME]",
                   help="only these events (names or patterns such as 'kvm_mmu_*'); "
                        "repeatable")
    s.add_argument("--head", type=int, default=None, metavar="N",
                   help="stop after N lines")
    s.add_argument("--header", action="store_true", help="a line of column names first")
    t.set_defaults(run_command=cmd_trace)


def _event_filter(specs):
    if not specs:
        return None
    from .events import TRACEPOINTS
    names, patterns = set(), []
    for spec in specs:
        for name in spec.split(","):
            name = name.strip()
            if not name:
                continue
            if any(ch in name for ch in "*?["):
                if not fnmatch.filter(TRACEPOINTS, name):
                    raise TraceError(f"--event {name!r} matches no event (the events: "
                                     "docs/TRACE.md)")
                patterns.append(name)
            elif name in TRACEPOINTS:
                names.add(name)
            else:
                import difflib
                close = difflib.get_close_matches(name, sorted(TRACEPOINTS), n=3)
                hint = f" (did you mean {' or '.join(close)}?)" if close else \
                    " (the events: docs/TRACE.md)"
                raise TraceError(f"--event: no event is named {name!r}{hint}")
    if not names and not patterns:
        raise TraceError("--event: no event named")
    return lambda kind: kind in names or any(fnmatch.fnmatchcase(kind, p) for p in patterns)


def show(fp, name, out, events=None, head=None, with_header=False) -> int:
    """Write the lines of ``show``; the number written."""
    wanted = _event_filter(events)
    if head is not None and head < 0:
        raise TraceError("--head must be 0 or more")
    stream = read_trace(fp, name)
    peek, error = [], None
    try:
        for e in stream:
            peek.append(e)
            if len(peek) >= _PEEK:
                break
    except TraceError as e:
        error = e                       # shown after the lines read before it
    insns = any(e.insns is not None for e in peek)
    written = 0
    if with_header:
        out.write(header(insns) + "\n")

    def all_events():
        yield from peek
        if error is not None:
            raise error
        yield from stream
    for e in all_events():
        if head is not None and written >= head:
            break
        if wanted is None or wanted(e.kind):
            out.write(format_event(e, insns) + "\n")
            written += 1
    return written


def cmd_trace(args) -> int:
    """Bad input: ``x86shadow: error: ...`` and status 2 (as cli.UsageError; a closed stdout
    reaches cli.main as BrokenPipeError, which ends quietly)."""
    path = args.file
    try:
        if path == "-":
            fp, name = sys.stdin, "<stdin>"
        else:
            import os
            if os.path.isdir(path):
                raise TraceError(f"cannot read trace {path!r}: is a directory")
            try:
                fp = open(path, encoding="utf-8")
            except OSError as e:
                raise TraceError(f"cannot read trace {path!r}: {e.strerror}") from None
            name = path
        try:
            show(fp, name, sys.stdout, args.event, args.head, args.header)
            sys.stdout.flush()               # a closed pipe is reported here, not at exit
        finally:
            if fp is not sys.stdin:
                fp.close()
    except TraceError as e:
        sys.stdout.flush()
        sys.stderr.write(f"x86shadow: error: {e}\n")
        return EXIT_BAD_INPUT
    return 0
