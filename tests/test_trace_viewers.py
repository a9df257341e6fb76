"""Traces people can look at (docs/TRACE_VIEWERS.md): ``run --trace-format perfetto`` (Chrome
trace-event JSON for ui.perfetto.dev) checked against the JSON-lines trace and --stats-json of the
same run, a valid file however the run stops, and ``x86shadow trace show`` on both formats."""
import bisect
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest

from x86shadow import cli
from x86shadow import events as ev
from x86shadow import trace_view
from x86shadow.asm import assemble_firmware, assemble_program
from x86shadow.machine import Machine
from x86shadow.trace_perfetto import HEX_KEYS, PerfettoTrace

ROOT = pathlib.Path(__file__).resolve().parent.parent
G = ROOT / "guestcode"

# (name, program, mode, extra run options); the host run counts instructions (the insns clock)
RUNS = {
    "fork_cow": ("fork_cow.asm", "pae", []),
    "hello": ("hello.asm", "64", []),
    "host": ("host_churn.asm", "pae", ["--host", "swap:5,migrate:7", "--max-insns", "1000000000"]),
}


def x86shadow(*args, **kw):
    p = subprocess.run([sys.executable, "-m", "x86shadow.cli", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)
    assert "Traceback" not in p.stderr, p.stderr
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run twice, JSON lines and perfetto: {name: (jsonl events, perfetto doc, stats,
    paths)} (the runs are deterministic: the same events in the same order)."""
    d = tmp_path_factory.mktemp("traces")
    out = {}
    for name, (program, mode, extra) in RUNS.items():
        jl, pf, st = d / f"{name}.jsonl", d / f"{name}.json", d / f"{name}.stats.json"
        p = x86shadow("run", G / program, "--mode", mode, *extra, "--trace", jl)
        assert p.returncode == 0, p.stderr
        p = x86shadow("run", G / program, "--mode", mode, *extra, "--trace", pf,
                      "--trace-format", "perfetto", "--stats-json", st)
        assert p.returncode == 0, p.stderr
        events = [json.loads(line) for line in jl.read_text().splitlines()]
        out[name] = (events, json.loads(pf.read_text()), json.loads(st.read_text()),
                     {"jsonl": jl, "perfetto": pf})
    return out


def _decode(args):
    """An event's fields back from a perfetto event's args (hex strings -> ints)."""
    return {k: trace_view._unhex(v) if k in HEX_KEYS else v for k, v in args.items()
            if k not in ("trace_seq", "insns")}


def _jsonl_fields(e):
    return {k: v for k, v in e.items() if k not in ("event", "seq", "insns")}


def check_perfetto(doc, events, stats=None):
    """The structure docs/TRACE_VIEWERS.md promises, against the JSON-lines events of the same
    run (and its --stats-json counters)."""
    assert set(doc) >= {"traceEvents", "displayTimeUnit", "otherData"}
    tev = doc["traceEvents"]
    meta = [e for e in tev if e["ph"] == "M"]
    procs = [e for e in meta if e["name"] == "process_name"]
    assert len(procs) == 1 and "clock:" in procs[0]["args"]["name"]
    threads = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    vcpus = {e.get("vcpu_id", 0) for e in events}
    assert threads == {v + 1: f"vCPU {v}" for v in vcpus}               # one track per vCPU
    assert doc["otherData"]["events"] == str(len(events))
    assert doc["otherData"]["clock"] in ("insns", "seq", "wall")
    for e in tev:
        assert e["pid"] == 1
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
    # every event is there once: the exits as slices, everything else as instants
    slices = [e for e in tev if e["ph"] == "X"]
    instants = [e for e in tev if e["ph"] == "i"]
    by_seq = {e["args"]["trace_seq"]: e for e in slices + instants}
    assert sorted(by_seq) == [e["seq"] for e in events]
    exits = [e for e in events if e["event"] == "kvm_exit"]
    assert len(slices) == len(exits)
    for j in events:
        p = by_seq[j["seq"]]
        assert p["tid"] == j.get("vcpu_id", 0) + 1
        if j["event"] == "kvm_exit":
            assert p["ph"] == "X" and p["name"] == j["reason"] and p["cat"] == "kvm_exit"
        else:
            assert p["ph"] == "i" and p["name"] == j["event"] and p["s"] == "t"
        fields = _jsonl_fields(j)
        got = _decode(p["args"])
        if j["event"] in (ev.MMU_NOTIFIER, ev.PF_RETRY) and "seq" in got:
            del got["seq"]          # the event's own seq: the JSON-lines record number hides it
        assert got == fields, (j, p)
        assert p["args"].get("insns") == j.get("insns")
        if "insns" in j and doc["otherData"]["clock"] == "insns" and p["ph"] == "i":
            assert p["ts"] >= j["insns"] - 0.0005           # 1 us = 1 instruction, at least
    # time only goes forward, in the order of the events
    stamps = [by_seq[s]["ts"] for s in sorted(by_seq) if by_seq[s]["ph"] == "i"]
    assert stamps == sorted(stamps)
    # the slices: dur >= 0, disjoint on each track (exits do not nest in each other), and
    # each holds exactly the records of its exit -- from the first record after the entry
    # before it (a fault's get_page records precede its kvm_exit) to the next entry
    for tid in threads:
        mine = sorted((e for e in slices if e["tid"] == tid), key=lambda e: e["ts"])
        for a, b in zip(mine, mine[1:]):
            assert a["dur"] >= 0 and a["ts"] + a["dur"] <= b["ts"]
        assert all(e["dur"] >= 0 for e in mine)
    group, exit_of = 0, {}
    for j in events:
        if j["event"] == "kvm_entry":
            group += 1
        elif j["event"] == "kvm_exit":
            exit_of[group] = j["seq"]
    group, expect_of, opened = 0, {}, False     # the slice each record is in (None: none)
    for j in events:
        if j["event"] == "kvm_entry":
            group, opened = group + 1, False
            continue
        # the guest's own events (a marker, an int n delivered without an exit) open no slice
        opened = opened or j["event"] not in ("x86shadow_marker", "kvm_inj_exception") \
            or j["event"] == "kvm_exit"
        expect_of[j["seq"]] = exit_of.get(group) if opened else None
    starts = {tid: sorted((e["ts"], e["ts"] + e["dur"], e["args"]["trace_seq"])
                          for e in slices if e["tid"] == tid) for tid in threads}
    for j in events:
        if j["event"] in ("kvm_exit",):
            continue
        p = by_seq[j["seq"]]
        track = starts[p["tid"]]
        i = bisect.bisect_left(track, (p["ts"],))           # the slices are disjoint: the one
        inside = [seq for ts, end, seq in track[max(i - 1, 0):i + 1]   # before it, if any
                  if ts < p["ts"] < end]
        expect = expect_of.get(j["seq"])
        if expect is None:
            assert inside == [], j
        else:
            assert inside == [expect], j
    # counter tracks, computed from the events: their last values are the run's counters
    last = {}
    for e in sorted((e for e in tev if e["ph"] == "C"), key=lambda e: e["ts"]):
        last[e["name"]] = e["args"]
    assert last["exits"]["total"] == len(exits)
    if stats is not None:
        assert last["exits"]["total"] == stats["exits"]
        assert last["shadow pages"]["live"] == stats["mmu_cache_miss"] - stats["mmu_shadow_zapped"]
        for k, v in last["page faults"].items():
            assert v == stats[k], k
        for k, v in last.get("host ops", {}).items():
            assert v == stats[k], k
    return last


@pytest.mark.parametrize("name", list(RUNS))
def test_perfetto_file_has_the_runs_events_slices_and_counters(runs, name):
    events, doc, stats, _ = runs[name]
    last = check_perfetto(doc, events, stats)
    assert last["page faults"]["pf_fixed"] > 0
    if name == "host":
        assert doc["otherData"]["clock"] == "insns"                  # --max-insns: counted
        assert last["host ops"]["host_swap_out"] > 0 and last["host ops"]["host_migrate"] > 0
        kinds = {e["name"] for e in doc["traceEvents"] if e["ph"] == "i"}
        assert {"x86shadow_host_op", "x86shadow_mmu_notifier", "kvm_unmap_hva_range"} <= kinds
    else:
        assert doc["otherData"]["clock"] == "seq"
        assert "host ops" not in last


def test_every_policy_and_mode_gives_a_consistent_file():
    """In process, both writers on the same run: every exit and every counter lines up."""
    for program, mode, policy in (("ptwrites.asm", "64", "kvm-2008"), ("ptwrites.asm", "32", "xen"),
                                  ("cr3_switch.asm", "pae", "kvm"),
                                  ("selfmap.asm", "32", "xen-oos")):
        lines, buf = [], io.StringIO()
        jt = ev.JsonTrace(type("Sink", (), {"write": lambda self, s: lines.append(s)})())
        pt = PerfettoTrace(buf, clock="insns")

        def tee(kind, fields):
            jt(kind, fields)
            pt(kind, fields)
        m = Machine(mode, policy=policy, trace=tee)
        m.load(assemble_program(str(G / program), mode, 128 << 20),
               assemble_firmware(mode, 128 << 20))
        assert m.run(max_insns=10 ** 8).status == 0
        pt.close()
        check_perfetto(json.loads(buf.getvalue()), [json.loads(s) for s in lines],
                       m.stats_record())


def test_several_vcpus_get_a_track_each():
    """vCPU = the event's vcpu_id (kvm_entry has it; 0 where an event has none): two vCPUs
    whose exits interleave get two tracks, each exit slice holding its own vCPU's records."""
    buf = io.StringIO()
    t = PerfettoTrace(buf, clock="seq")
    seq = [(ev.KVM_ENTRY, {"vcpu_id": 0}),
           (ev.KVM_ENTRY, {"vcpu_id": 1}),
           (ev.GET_PAGE, {"vcpu_id": 1, "gfn": 5, "sp": 0}),
           (ev.KVM_EXIT, {"vcpu_id": 0, "reason": "IO_INSTRUCTION", "rip": 0x400000,
                          "port": 0x3f8}),
           (ev.KVM_EXIT, {"vcpu_id": 1, "reason": "EXCEPTION_NMI", "rip": 0x400100}),
           (ev.KVM_PIO, {"vcpu_id": 0, "rw": "write", "port": 0x3f8, "size": 1, "value": 80}),
           (ev.PAGE_FAULT, {"vcpu_id": 1, "result": "fixed", "address": 0x1000}),
           (ev.KVM_ENTRY, {"vcpu_id": 0}),
           (ev.KVM_ENTRY, {"vcpu_id": 1}),
           (ev.KVM_EXIT, {"vcpu_id": 1, "reason": "HLT", "rip": 0x400200}),
           (ev.KVM_EXIT, {"vcpu_id": 0, "reason": "HLT", "rip": 0x400300})]
    for kind, fields in seq:
        t(kind, fields)
    t.close()
    doc = json.loads(buf.getvalue())
    tev = doc["traceEvents"]
    assert {e["tid"]: e["args"]["name"] for e in tev if e.get("name") == "thread_name"} == \
        {1: "vCPU 0", 2: "vCPU 1"}
    slices = {(e["tid"], e["name"]): e for e in tev if e["ph"] == "X"}
    assert set(slices) == {(1, "IO_INSTRUCTION"), (2, "EXCEPTION_NMI"), (1, "HLT"), (2, "HLT")}

    def inside(seqno):
        i = next(e for e in tev if e["ph"] == "i" and e["args"]["trace_seq"] == seqno)
        return [k for k, s in slices.items()
                if s["tid"] == i["tid"] and s["ts"] < i["ts"] < s["ts"] + s["dur"]]
    assert inside(3) == [(2, "EXCEPTION_NMI")]          # vCPU 1's get_page before its exit
    assert inside(6) == [(1, "IO_INSTRUCTION")]
    assert inside(7) == [(2, "EXCEPTION_NMI")]
    last = {e["name"]: e["args"] for e in sorted((e for e in tev if e["ph"] == "C"),
                                                 key=lambda e: e["ts"])}
    assert last["exits"]["total"] == 4 and last["page faults"]["pf_fixed"] == 1
    assert last["shadow pages"]["live"] == 1
    lines = []
    trace_view.show(io.StringIO(buf.getvalue()), "t", type("W", (), {
        "write": lambda self, s: lines.append(s)})())
    assert [ln.split()[1] for ln in lines] == ["[%03d]" % f["vcpu_id"] for _, f in seq]


def _valid(path):
    doc = json.loads(pathlib.Path(path).read_text())
    assert doc["traceEvents"] and doc["otherData"]
    return doc


def test_a_stopped_guest_still_gives_valid_json(tmp_path):
    # --max-insns stops a running guest (exit 4): the open slice and the array are closed
    f = tmp_path / "t.json"
    p = x86shadow("run", G / "fork_cow.asm", "--mode", "pae", "--max-insns", "20000",
                  "--trace", f, "--trace-format", "perfetto")
    assert p.returncode == 4, p.stderr
    doc = _valid(f)
    assert doc["otherData"]["clock"] == "insns"
    assert any(e["ph"] == "X" for e in doc["traceEvents"])
    # a guest crash (exit 4, with its report)
    crash = tmp_path / "crash.asm"
    crash.write_text("main:\n    mov eax, [0x7ffff000]\n    ud2\n")
    p = x86shadow("run", crash, "--mode", "32", "--trace", f, "--trace-format", "perfetto")
    assert p.returncode == 4 and "guest crashed" in p.stderr
    _valid(f)


def test_sigint_still_gives_valid_json(tmp_path):
    """Ctrl-C while the guest exits in a loop: status 130 and a closed, valid file."""
    loop = tmp_path / "loop.asm"
    loop.write_text("main:\nspin:\n    invlpg [0x500000]\n    jmp spin\n")
    f = tmp_path / "t.json"
    proc = subprocess.Popen([sys.executable, "-m", "x86shadow.cli", "run", str(loop), "--mode",
                             "pae", "--trace", str(f), "--trace-format", "perfetto"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while (not f.exists() or f.stat().st_size < 20000) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    doc = _valid(f)
    assert sum(e["ph"] == "X" and e["name"] == "INVLPG" for e in doc["traceEvents"]) > 10


def test_request_stop_in_process_closes_the_slice():
    """The stop machinery (stopping.request, as SIGINT does) in the middle of an exit."""
    from x86shadow import stopping
    buf, lines = io.StringIO(), []
    pt = PerfettoTrace(buf, clock="seq")
    jt = ev.JsonTrace(type("Sink", (), {"write": lambda self, s: lines.append(s)})())

    def tee(kind, fields):
        jt(kind, fields)
        pt(kind, fields)
        if kind == ev.KVM_EXIT and fields.get("reason") == "EXCEPTION_NMI":
            stopping.request(stopping.Stop(130, "interrupted"))
    m = Machine("pae", trace=tee)
    m.load(assemble_program(str(G / "fork_cow.asm"), "pae", 128 << 20),
           assemble_firmware("pae", 128 << 20))
    with pytest.raises(stopping.Stop):
        m.run()
    pt.close()
    doc = json.loads(buf.getvalue())
    check_perfetto(doc, [json.loads(s) for s in lines], None)
    assert [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"][-1] == "EXCEPTION_NMI"


def test_wall_clock_and_option_errors(tmp_path):
    f = tmp_path / "t.json"
    p = x86shadow("run", G / "hello.asm", "--mode", "32", "--trace", f, "--trace-format",
                  "perfetto", "--trace-clock", "wall")
    assert p.returncode == 0, p.stderr
    doc = _valid(f)
    assert doc["otherData"]["clock"] == "wall"
    # jsonl stays today's format, byte for byte (the sequence numbers are the same)
    p = x86shadow("run", G / "hello.asm", "--mode", "32", "--trace", f, "--trace-format", "jsonl")
    assert p.returncode == 0 and f.read_text().startswith('{"mode":"OFF"')
    for args, msg in ((["--trace-format", "perfetto"], "--trace-format needs --trace PATH"),
                      (["--trace", f, "--trace-clock", "wall"], "--trace-clock is for"),
                      (["--trace", f, "--trace-format", "perfetto", "--trace-clock", "insns"],
                       "--trace-clock insns needs --max-insns")):
        p = x86shadow("run", G / "hello.asm", "--mode", "32", *args)
        assert p.returncode == 2 and f"x86shadow: error: {msg}" in p.stderr, p.stderr
    p = x86shadow("run", G / "hello.asm", "--mode", "32", "--trace", "/dev/full",
                  "--trace-format", "perfetto")
    assert p.returncode == 2 and "cannot write trace '/dev/full'" in p.stderr, p.stderr


# ---------------------------------------------------------------------- trace show
def _show(*args):
    """``x86shadow trace show ARGS`` in this process (the command's own main())."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["trace", "show", *map(str, args)])
    assert "Traceback" not in err.getvalue()
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def _parse_line(line, insns_column):
    """A show line -> (seq, insns, vcpu, event, {key: text})."""
    parts = line.split()
    seq = int(parts.pop(0))
    insns = None
    if insns_column:
        v = parts.pop(0)
        insns = None if v == "-" else int(v)
    vcpu = int(parts.pop(0).strip("[]"))
    event = parts.pop(0).rstrip(":")
    return seq, insns, vcpu, event, " ".join(parts)


def _expected_fields(j):
    return " ".join(f"{k}={trace_view._value(k, v)}" for k, v in _jsonl_fields(j).items())


@pytest.mark.parametrize("fmt", ["jsonl", "perfetto"])
@pytest.mark.parametrize("name", ["fork_cow", "host"])
def test_show_prints_one_line_per_event_of_the_jsonl(runs, name, fmt):
    events, _, _, paths = runs[name]
    p = _show(paths[fmt])
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == len(events)
    insns_column = name == "host"
    for line, j in zip(lines, events):
        seq, insns, vcpu, event, fields = _parse_line(line, insns_column)
        assert (seq, insns, vcpu, event) == (j["seq"], j.get("insns"), j.get("vcpu_id", 0),
                                             j["event"])
        if fmt == "perfetto" and j["event"] in (ev.MMU_NOTIFIER, ev.PF_RETRY):
            fields = " ".join(f for f in fields.split(" ") if not f.startswith("seq="))
        assert fields == _expected_fields(j), line
    # addresses in hex, the rest in decimal
    exit0 = next(ln for ln, j in zip(lines, events) if j["event"] == "kvm_exit"
                 and j["reason"] == "EXCEPTION_NMI")
    assert " rip=0x" in exit0 and " address=0x" in exit0 and " vector=14" in exit0
    # both formats give the same lines (but for the events' own seq fields)
    other = _show(paths["jsonl" if fmt == "perfetto" else "perfetto"]).stdout.splitlines()
    strip = [" ".join(f for f in ln.split(" ") if not f.startswith("seq=")) for ln in other]
    assert strip == [" ".join(f for f in ln.split(" ") if not f.startswith("seq="))
                     for ln in lines]


def test_show_event_filter_head_and_header(runs):
    events, _, _, paths = runs["host"]
    for fmt in ("jsonl", "perfetto"):
        p = _show(paths[fmt], "--event", "kvm_exit,x86shadow_host_op", "--head", "25")
        lines = p.stdout.splitlines()
        want = [j for j in events if j["event"] in ("kvm_exit", "x86shadow_host_op")][:25]
        assert [int(ln.split()[0]) for ln in lines] == [j["seq"] for j in want]
        p = _show(paths[fmt], "--event", "kvm_mmu_*", "--event", "kvm_pio", "--header")
        lines = p.stdout.splitlines()
        assert lines[0].split() == ["seq", "insns", "vcpu", "event:", "fields"]
        want = [j for j in events if j["event"].startswith("kvm_mmu_") or j["event"] == "kvm_pio"]
        assert [int(ln.split()[0]) for ln in lines[1:]] == [j["seq"] for j in want]
    p = _show(paths["jsonl"], "--event", "kvm_exti")
    assert p.returncode == 2 and "no event is named 'kvm_exti' (did you mean kvm_exit" in p.stderr
    p = _show(paths["jsonl"], "--event", "nothing_*")
    assert p.returncode == 2 and "--event 'nothing_*' matches no event" in p.stderr


def test_show_bad_input_names_the_file_and_line(tmp_path, runs):
    _, _, _, paths = runs["fork_cow"]
    cases = []
    missing = tmp_path / "missing.jsonl"
    cases.append((missing, "cannot read trace '{}': No such file or directory"))
    notrace = tmp_path / "notes.txt"
    notrace.write_text("hello\n")
    cases.append((notrace, "{} line 1: not an x86shadow trace"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append((empty, "{}: empty, not a trace"))
    # a JSON-lines trace cut in the middle of its last record (a killed run)
    text = paths["jsonl"].read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[:len(text) // 2])
    n = text[:len(text) // 2].count("\n") + 1
    cases.append((cut, "{} line %d: truncated" % n))
    bad = tmp_path / "bad.jsonl"
    lines = text.splitlines(keepends=True)
    bad.write_text("".join(lines[:3]) + "{oops\n" + "".join(lines[3:]))
    cases.append((bad, "{} line 4: not JSON"))
    rec = tmp_path / "rec.jsonl"
    rec.write_text("".join(lines[:3]) + '{"seq": 4}\n')
    cases.append((rec, "{} line 4: not a trace record"))
    # a perfetto file cut short (killed before close)
    ptext = paths["perfetto"].read_text()
    pcut = tmp_path / "cut.json"
    pcut.write_text(ptext[:len(ptext) // 2])
    cases.append((pcut, "{} line %d: truncated" % (ptext[:len(ptext) // 2].count("\n") + 1)))
    pnoend = tmp_path / "noend.json"
    pnoend.write_text(ptext[:ptext.rindex("],")])
    cases.append((pnoend, "{} line"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"traceEvents": [{"ph": "i", "ts": 1, "pid": 1, "tid": 1,
                                                  "name": "x"}]}))
    cases.append((other, "{}: a trace-event file without x86shadow events"))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\x00\xff\xfe\x80" * 10)
    cases.append((binary, "{} line 1: not"))
    for path, msg in cases:
        p = _show(path)
        assert p.returncode == 2, (path, p.stderr)
        assert f"x86shadow: error: {msg.format(path)}" in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
    # what was read before the bad line is shown
    p = _show(bad)
    assert len(p.stdout.splitlines()) == 3


def test_show_reads_other_layouts_of_the_perfetto_json(tmp_path, runs):
    """A file re-saved by another tool (pretty-printed, or the bare array format) still shows."""
    events, doc, _, paths = runs["fork_cow"]
    want = _show(paths["jsonl"]).stdout
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(doc, indent=2))
    assert _show(pretty).stdout == _show(paths["perfetto"]).stdout
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(doc["traceEvents"]))
    assert _show(arr).stdout == _show(paths["perfetto"]).stdout
    assert len(want.splitlines()) == len(events)


def test_show_into_a_closed_pipe_ends_quietly(runs):
    _, _, _, paths = runs["host"]
    for fmt in ("jsonl", "perfetto"):
        proc = subprocess.Popen([sys.executable, "-m", "x86shadow.cli", "trace", "show",
                                 str(paths[fmt])], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=30)
        assert err == b"" and proc.returncode in (0, 141), err


def test_show_from_stdin(runs):
    _, _, _, paths = runs["hello"]
    with open(paths["perfetto"]) as f:
        p = x86shadow("trace", "show", "-", "--head", "3", stdin=f)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 3


# ---------------------------------------------------------------------- Perfetto itself
def _trace_processor():
    try:
        from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig
    except ImportError:
        pytest.skip("the perfetto package is not installed (pip install perfetto)")
    shell = os.environ.get("PERFETTO_TP_SHELL") or shutil.which("trace_processor_shell")
    if shell is None:
        cached = pathlib.Path.home() / ".local/share/perfetto/prebuilts"
        found = sorted(cached.glob("trace_processor_shell*")) if cached.is_dir() else []
        found = [f for f in found if not f.name.endswith(".tmp") and os.access(f, os.X_OK)]
        if not found:
            pytest.skip("no trace_processor_shell binary: the perfetto package downloads it on "
                        "first use, which needs the network (set PERFETTO_TP_SHELL to one)")
        shell = str(found[-1])
    return TraceProcessor, TraceProcessorConfig(bin_path=shell)


def test_perfettos_trace_processor_reads_the_file(runs):
    TraceProcessor, config = _trace_processor()
    events, _, stats, paths = runs["host"]
    tp = TraceProcessor(trace=str(paths["perfetto"]), config=config)
    try:
        n = next(iter(tp.query("select count(*) as n from slice where category = 'kvm_exit'"))).n
        assert n == stats["exits"]
        threads = {r.name for r in tp.query("select name from thread where name like 'vCPU%'")}
        assert threads == {"vCPU 0"}
        depth = next(iter(tp.query("select max(depth) as d from slice"))).d
        assert depth == 1                                # instants inside the exit slices
        last = next(iter(tp.query(
            "select value from counter join counter_track t on counter.track_id = t.id "
            "where t.name = 'exits total' order by ts desc limit 1"))).value
        assert last == stats["exits"]
    finally:
        tp.close()
