"""What a user hits first (signals, the exit port, output paths, large RAM, crash reports), each
tried on a real `x86shadow` subprocess."""
import json
import resource
import signal
import subprocess
import sys
import time

import pytest

GUEST_SPIN = "main:\nspin:\n    jmp spin\n"
GUEST_IO = ("main:\n    mov dx, 0x3f8\nloop:\n    mov al, 0x2e\n    out dx, al\n    jmp loop\n")
GUEST_EXIT_TWICE = ("main:\n    mov dx, 0xf4\n    mov al, 1\n    out dx, al\n    mov al, 2\n"
                    "    out dx, al\n    mov dx, 0x3f8\n    mov al, 0x41\n    out dx, al\n    ret\n")
GUEST_HELLO = "main:\n    mov dx, 0x3f8\n    mov al, 0x41\n    out dx, al\n    ret\n"


def cli(*args):
    """The command as the console script runs it (x86shadow/__main__.py)."""
    return [sys.executable, "-m", "x86shadow", *args]


@pytest.fixture
def prog(tmp_path):
    def make(text, name="g.asm"):
        p = tmp_path / name
        p.write_text(text)
        return str(p)
    return make


def _wait_running(proc, seconds=1.0):
    """Long enough for the command to assemble and start the guest (~0.3 s here); the stats
    checked afterwards show that the guest did run."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)


@pytest.mark.parametrize("guest", ["spin", "io"])
@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_signal_stops_a_running_guest_and_keeps_what_it_collected(prog, tmp_path, guest, sig,
                                                                  status, word):
    """SIGINT / SIGTERM stop a spinning guest and an I/O-heavy guest at once, several times in a
    row: status 130 / 143, one line on stderr, the stats so far written, the trace complete."""
    src = prog(GUEST_SPIN if guest == "spin" else GUEST_IO)
    for i in range(3):
        stats, trace = tmp_path / f"s{i}.json", tmp_path / f"t{i}.jsonl"
        proc = subprocess.Popen(cli("run", src, "--mode", "64", "--stats-json", str(stats),
                                    "--trace", str(trace)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_running(proc, 1.0 + 0.3 * i)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{sig!r} did not stop the {guest} guest")
        assert proc.returncode == status, err
        assert err.decode().strip() == f"x86shadow: {word}"
        counters = json.loads(stats.read_text())
        assert counters["exits"] > 0
        lines = trace.read_text().splitlines()
        assert lines and all(json.loads(line)["event"] for line in lines)


def _loaded(pid, library):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return library in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("marker", ["_json", "libunicorn"])
def test_signal_before_the_guest_runs(prog, marker):
    """A signal while the command is still loading (its imports, assembling: no guest yet)
    stops it the same way, with no traceback. The signal goes as soon as `marker` is mapped:
    _json comes with the command's own imports (x86shadow/__main__.py guards them; a fixed
    0.3 s wait once hit an import outside cli.main's guard under load), libunicorn with the
    machine's."""
    proc = subprocess.Popen(cli("run", prog(GUEST_SPIN), "--mode", "64"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not _loaded(proc.pid, marker) and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert err.decode().strip() == "x86shadow: interrupted"


@pytest.mark.parametrize("mmu", ["shadow", "native"])
def test_exit_port_ends_the_run_at_the_out(prog, mmu):
    """out 0xf4, 1 then out 0xf4, 2 then a serial byte: status (1 << 1) | 1 = 3, nothing
    printed after the first exit write."""
    r = subprocess.run(cli("run", prog(GUEST_EXIT_TWICE), "--mode", "64", "--mmu", mmu),
                       capture_output=True, timeout=60)
    assert r.returncode == 3
    assert r.stdout == b""


@pytest.mark.parametrize("opt,path,message", [
    ("--stats-json", "/proc/x86shadow-test.json", "cannot write stats"),
    ("--stats-json", "/", "is a directory"),
    ("--trace", "/nonexistent-dir/t.jsonl", "cannot write trace"),
])
def test_bad_output_paths_are_refused_before_the_guest_runs(prog, opt, path, message):
    r = subprocess.run(cli("run", prog(GUEST_HELLO), "--mode", "64", opt, path),
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stdout == b"", "the guest ran before the output path was checked"
    assert message in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_trace_on_a_full_disk_is_a_clear_error(prog):
    r = subprocess.run(cli("run", prog(GUEST_HELLO), "--mode", "64", "--trace", "/dev/full"),
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "cannot write trace '/dev/full': No space left on device" in err
    assert "internal error" not in err


def test_closed_stdout_pipe_ends_quietly(prog):
    """`x86shadow run io-guest | head -c 10`: the run ends when the pipe closes; status 141 (as a
    shell reports SIGPIPE), nothing on stderr."""
    proc = subprocess.Popen(cli("run", prog(GUEST_IO), "--mode", "64"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run went on after its stdout pipe closed")
    assert proc.returncode == 141
    assert proc.stderr.read() == b""


def test_ram_limits_are_checked_before_assembling(prog):
    r = subprocess.run(cli("run", prog(GUEST_HELLO), "--mode", "64", "--ram", "999999"),
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.decode().strip() == ("x86shadow: error: --ram 999999: guest RAM must be "
                                         "64..65536 MiB in mode 64")


def test_large_guest_ram_is_reserved_lazily(prog):
    """16 GiB of guest RAM costs what is touched: the child's peak RSS stays far below it."""
    r = subprocess.run(cli("run", prog(GUEST_HELLO), "--mode", "64", "--ram", "16384"),
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout == b"A", r.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 1 << 20, f"peak RSS {peak_kib} KiB"


def _load_beyond_ram(tmp_path, mode):
    """A program whose load at WINDOW + 0x3010 maps guest-physical 0x70000010 (outside RAM)."""
    from x86shadow.fuzz.ptprog import WINDOW, Op, plain_spec, render
    src = tmp_path / "beyond.asm"
    src.write_text(render(plain_spec(mode, [Op("load", WINDOW + 0x3010, 4)],
                                     w1_3=0x7000_0000 | 0x63)))
    return src


@pytest.mark.parametrize("mmu", ["shadow", "native"])
def test_crash_report_names_the_byte_beyond_ram_and_the_registers(tmp_path, mmu):
    src = _load_beyond_ram(tmp_path, "64")
    r = subprocess.run(cli("run", str(src), "--mode", "64", "--mmu", mmu), capture_output=True,
                       timeout=60)
    assert r.returncode == 4
    err = r.stderr.decode()
    assert "0x70000010, outside RAM" in err
    assert "RSI 0000000040003010" in err and "EFER 0x" in err and "GDTR 0x" in err


def test_crash_report_shows_the_guest_control_registers_in_every_tlb_mode(tmp_path):
    """--tlb walker runs the hardware on the shadow root with WP/PAE/NXE forced: the report still
    shows the guest's CR0/CR2/CR3/CR4 line, the same as under the fill hook and Unicorn's MMU."""
    src = _load_beyond_ram(tmp_path, "pae")
    lines = []
    for extra in (["--mmu", "native"], ["--tlb", "virtual"], ["--tlb", "walker"]):
        r = subprocess.run(cli("run", str(src), "--mode", "pae", *extra), capture_output=True,
                           timeout=60)
        assert r.returncode == 4, r.stderr
        line = [x for x in r.stderr.decode().splitlines() if x.strip().startswith("CR0 ")][0]
        lines.append(line.split("mode pae")[0])          # (the MMU's name follows)
    assert lines[0] == lines[1] == lines[2], lines


@pytest.mark.parametrize("args,message", [
    (["--max-insns", "0"], "--max-insns must be at least 1"),
])
def test_options_that_used_to_be_silently_accepted(prog, args, message):
    r = subprocess.run(cli("run", prog(GUEST_HELLO), "--mode", "64", *args), capture_output=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr.decode()


def test_program_that_is_a_directory_or_binary(tmp_path):
    r = subprocess.run(cli("run", str(tmp_path), "--mode", "64"), capture_output=True, timeout=60)
    assert r.returncode == 2 and "is a directory" in r.stderr.decode()
    binary = tmp_path / "x.asm"
    binary.write_bytes(b"main:\n\x7fELF\x02\x01\x01\x00\x00")
    r = subprocess.run(cli("run", str(binary), "--mode", "64"), capture_output=True, timeout=60)
    assert r.returncode == 2
    assert "not an assembly source: byte 0x00" in r.stderr.decode()


def test_sigint_stops_a_counted_run(prog):
    """The same with --max-insns (Unicorn's instruction counting on)."""
    proc = subprocess.Popen(cli("run", prog(GUEST_SPIN), "--mode", "32", "--max-insns",
                                str(10 ** 12)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_running(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and err.decode().strip() == "x86shadow: interrupted"


def test_include_path(tmp_path):
    """The guest library is found from any folder; -I adds folders; a missing -I is an error."""
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "mine.inc").write_text(".set MY_CODE, 0x41\n")
    src = tmp_path / "p.asm"
    src.write_text('.include "lib/console.inc"\n.include "mine.inc"\nmain:\n'
                   "    mov al, MY_CODE\n    call putc\n    ret\n")
    r = subprocess.run(cli("run", str(src), "--mode", "32", "-I", str(tmp_path / "inc")),
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout == b"A", r.stderr
    r = subprocess.run(cli("run", str(src), "--mode", "32"), capture_output=True, timeout=60)
    assert r.returncode == 2 and "mine.inc" in r.stderr.decode()
    r = subprocess.run(cli("run", str(src), "--mode", "32", "-I", str(tmp_path / "nope")),
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and "no such directory" in r.stderr.decode()


def test_version():
    r = subprocess.run(cli("--version"), capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.decode().startswith("x86shadow ")
