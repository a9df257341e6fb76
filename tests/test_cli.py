"""The x86shadow command as a user meets it: exit statuses of docs/GUEST_CONTRACT.md, clear errors for bad
input (never a traceback), stats and trace files."""
import json
import subprocess
import sys

import pytest


def x86shadow(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "x86shadow.cli", *args], capture_output=True,
                       text=True, cwd=cwd, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def prog(tmp_path, body, name="p.asm"):
    f = tmp_path / name
    f.write_text(body)
    return str(f)


def test_hello_prints_and_exits_zero(tmp_path):
    p = x86shadow("run", "guestcode/hello.asm", "--mode", "pae", "--stats-json", str(tmp_path / "s.json"),
                  "--trace", str(tmp_path / "t.jsonl"))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hello from x86shadow\nPASS\n"
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["io_exits"] == len(p.stdout) and stats["halt_exits"] == 1
    assert stats["exits"] >= stats["io_exits"] + stats["pf_fixed"]
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert events and all("event" in e for e in events)
    assert any(e["event"] == "kvm_page_fault" for e in events)


@pytest.mark.parametrize("value,status", [(0, 1), (1, 3), (0x21, 0x43)])
def test_exit_port(tmp_path, value, status):
    p = x86shadow("run", prog(tmp_path, f"main:\n mov al, {value}\n out 0xf4, al\n hlt\n"), "--mode", "32")
    assert p.returncode == status


def test_return_from_main_is_exit_zero(tmp_path):
    assert x86shadow("run", prog(tmp_path, "main:\n ret\n"), "--mode", "64").returncode == 0


def test_missing_file():
    p = x86shadow("run", "no/such/file.asm", "--mode", "pae")
    assert p.returncode == 2 and "no such file" in p.stderr


def test_assembly_error_names_the_line(tmp_path):
    f = prog(tmp_path, "main:\n nop\n mov eax, ebx\n frobnicate eax\n ret\n")
    p = x86shadow("run", f, "--mode", "pae")
    assert p.returncode == 2
    assert ":4:" in p.stderr and "frobnicate" in p.stderr


def test_program_without_main(tmp_path):
    p = x86shadow("run", prog(tmp_path, "start:\n ret\n"), "--mode", "pae")
    assert p.returncode == 2 and "main" in p.stderr


@pytest.mark.parametrize("args", [["--mode", "16"], ["--mode", "pae", "--mmu", "hardware"],
                                  ["--mode", "pae", "--policy", "linux"], ["--mode", "pae", "--frobnicate"],
                                  ["--mode", "pae", "--ram", "12"], ["--mode", "pae", "--ram", "lots"],
                                  ["--mode", "pae", "--max-insns", "-5"], []])
def test_bad_options(args):
    p = x86shadow("run", "guestcode/hello.asm", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "x86shadow: error:" in p.stderr


def test_unhandled_exception_gives_crash_report(tmp_path):
    p = x86shadow("run", prog(tmp_path, "main:\n mov eax, dword ptr [0x7ffff000]\n ret\n"),
                  "--mode", "pae", "--ram", "64")
    assert p.returncode == 4
    err = p.stderr
    assert "unhandled #PF" in err and "error code 0x0" in err
    assert "CR2 0x7ffff000" in err and "CR3 0x" in err and "RIP 0x4" in err
    assert "mov eax, dword ptr [0x7ffff000]" in err


@pytest.mark.parametrize("mmu", ["shadow", "native"])
def test_triple_fault(tmp_path, mmu):
    # an IDT with no room for any gate: #UD -> #GP -> #DF -> triple fault
    src = "main:\n lidt [idtr]\n ud2\nidtr:\n .word 0\n .long 0\n"
    p = x86shadow("run", prog(tmp_path, src), "--mode", "pae", "--mmu", mmu)
    assert p.returncode == 4 and "triple fault" in p.stderr


def test_stats_json_has_the_marker_writes_with_their_counters(tmp_path):
    src = ("main:\n mov al, 7\n out MARKER_PORT, al\n mov dx, SERIAL_PORT\n mov al, 'x'\n out dx, al\n"
           " mov al, 9\n out MARKER_PORT, al\n ret\n")
    p = x86shadow("run", prog(tmp_path, src), "--mode", "pae", "--stats-json", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    first, second = stats["markers"]
    assert (first["value"], second["value"]) == (7, 9)
    # the serial byte between the markers is one I/O exit; the marker writes are not exits
    assert second["counters"]["io_exits"] == first["counters"]["io_exits"] + 1
    assert stats["io_exits"] >= second["counters"]["io_exits"]


def test_runaway_guest_stops_at_max_insns(tmp_path):
    p = x86shadow("run", prog(tmp_path, "main:\nspin:\n inc eax\n jmp spin\n"), "--mode", "32",
                  "--max-insns", "100000", "--stats-json", str(tmp_path / "s.json"))
    assert p.returncode == 4 and "runaway" in p.stderr
    assert json.loads((tmp_path / "s.json").read_text())["guest_insns"] == 100000


def test_ud2_in_user_mode_has_no_traceback_and_reports_instruction(tmp_path):
    p = x86shadow("run", prog(tmp_path, "main:\n ud2\n"), "--mode", "64")
    assert p.returncode == 4 and "#UD" in p.stderr and "ud2" in p.stderr


@pytest.mark.parametrize("mmu", ["shadow", "native"])
def test_exit_port_wins_over_a_fault_later_in_the_same_block(tmp_path, mmu):
    src = "main:\n mov al, 5\n mov dx, EXIT_PORT\n out dx, al\n ud2\n"
    assert x86shadow("run", prog(tmp_path, src), "--mode", "pae", "--mmu", mmu).returncode == 11
