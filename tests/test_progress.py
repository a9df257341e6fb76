"""Progress on stderr (x86shadow/progress.py, docs/PROGRESS.md): drawn on a terminal (or with
X86SHADOW_PROGRESS=1), nothing at all with --quiet or when stderr is not a terminal."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from rich.console import Console

from x86shadow.progress import FORCE_ENV, poll, progress, shown


def _console():
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def test_forced_terminal_draws_the_bar_and_the_log_lines():
    con, buf = _console()
    with progress(3, "runs", console=con) as p:
        p.describe("kvm: scan 1/4")
        p.log("a line above the bar")
        p.advance()
    text = buf.getvalue()
    assert "a line above the bar" in text and "kvm: scan 1/4" in text and "1/3" in text


def test_quiet_draws_nothing_even_on_a_terminal():
    con, buf = _console()
    with progress(3, "runs", quiet=True, console=con) as p:
        p.describe("x")
        p.log("y")
        p.advance()
    assert buf.getvalue() == ""


def test_not_a_terminal_means_hidden(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    assert not shown(False, io.StringIO())
    monkeypatch.setenv(FORCE_ENV, "1")
    assert shown(False, io.StringIO()) and not shown(True, io.StringIO())


def test_poll_moves_the_bar_from_a_counter():
    con, buf = _console()
    done = [0]
    with progress(10, "insns", console=con) as p:
        with poll(p, lambda: done[0], interval=0.01):
            done[0] = 7
    assert "7/10" in buf.getvalue()


def _run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != FORCE_ENV}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "x86shadow.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


KMAP = ["scenario", "kmap", "--tables", "2", "--ptes", "8", "--scans", "2"]


def test_scenario_progress_only_when_forced_and_not_quiet():
    plain = _run(*KMAP)                                 # stderr is a pipe: nothing
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
    forced = _run(*KMAP, env_extra={FORCE_ENV: "1"})
    # the bar: one run (the default policy) done of one
    assert forced.returncode == 0 and "kvm-2008: done" in forced.stderr, forced.stderr
    assert "1/1" in forced.stderr and "\x1b[" not in forced.stdout     # stdout untouched
    quiet = _run(*KMAP, "--quiet", env_extra={FORCE_ENV: "1"})
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_long_run_progress_counts_guest_instructions():
    forced = _run("run", "guestcode/hello.asm", "--mode", "pae", "--max-insns", "100000000",
                  env_extra={FORCE_ENV: "1"})
    assert forced.returncode == 0 and "guest instructions" in forced.stderr
    quiet = _run("run", "guestcode/hello.asm", "--mode", "pae", "--max-insns", "100000000",
                 "--quiet", env_extra={FORCE_ENV: "1"})
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == forced.stdout


FUZZ = ["fuzz", "--mode", "32", "--count", "2", "--jobs", "1", "--no-host"]


def test_fuzz_progress_only_when_forced_and_not_quiet(tmp_path):
    save = ["--save", str(tmp_path)]
    plain = _run(*FUZZ, *save)
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
    assert "mode 32 shard 0: 2 examples, no divergence" in plain.stdout   # the plain lines stay
    forced = _run(*FUZZ, *save, env_extra={FORCE_ENV: "1"})
    assert forced.returncode == 0 and "fuzz: 2 examples, 0 divergence(s)" in forced.stderr
    assert "1/1" in forced.stderr and "\x1b[" not in forced.stdout
    quiet = _run(*FUZZ, *save, "--quiet", env_extra={FORCE_ENV: "1"})
    assert quiet.returncode == 0 and quiet.stderr == "" and "shard 0:" not in quiet.stdout


def test_sweep_progress_only_when_forced_and_not_quiet(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('kind = "kmap"\n[fixed]\ntables = 1\nptes = 8\nscans = 1\n'
                    '[grid]\norder = ["table", "rmap"]\n')
    args = ["sweep", str(spec), "-o", str(tmp_path / "o.jsonl"), "--jobs", "1"]
    plain = _run(*args)
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
    forced = _run(*args, env_extra={FORCE_ENV: "1"})
    assert forced.returncode == 0 and "sweep kmap: point" in forced.stderr
    assert "2/2" in forced.stderr and "\x1b[" not in forced.stdout
    quiet = _run(*args, "--quiet", env_extra={FORCE_ENV: "1"})
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_explore_progress_counts_interleavings():
    plain = _run("explore", "c1-irq")
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
    forced = _run("explore", "c1-irq", env_extra={FORCE_ENV: "1"})
    assert forced.returncode == 0 and "interleavings" in forced.stderr, forced.stderr
    assert "38" in forced.stderr and forced.stdout == plain.stdout.replace(
        plain.stdout.splitlines()[-1], forced.stdout.splitlines()[-1])     # (the time line)
    quiet = _run("explore", "c1-irq", "--quiet", env_extra={FORCE_ENV: "1"})
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_kernel_run_shows_progress_when_forced(tmp_path):
    from repo_kernels import build_kernel
    k = build_kernel("long64", tmp_path)
    plain = _run("run", k)
    assert plain.returncode == 1 and plain.stderr == "", plain.stderr
    forced = _run("run", k, env_extra={FORCE_ENV: "1"})
    assert forced.returncode == 1 and "kernel" in forced.stderr and forced.stdout == plain.stdout
    quiet = _run("run", k, "--quiet", env_extra={FORCE_ENV: "1"})
    assert quiet.returncode == 1 and quiet.stderr == ""
