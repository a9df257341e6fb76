"""A regular (non-editable) install carries the guest sources: the wheel holds firmware/ and
guestcode/ as x86shadow/_data/, and x86shadow.resources finds them there (a checkout or an editable
install finds them beside the package). Builds run offline (--no-isolation: the build backend of
this environment, no download)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from x86shadow import resources

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("firmware/boot32.asm", "firmware/boot64.asm", "guestcode/lib/console.inc",
            "guestcode/kmap/kscand.asm")
HAVE_BUILD = importlib.util.find_spec("build") is not None


def guest_sources():
    """Every file of firmware/ and guestcode/ in this checkout, relative to it."""
    return sorted(str(p.relative_to(ROOT)).replace(os.sep, "/")
                  for top in ("firmware", "guestcode") for p in (ROOT / top).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def source_copy(tmp_path):
    """The project copied without the venv, git and build leftovers (a stale build/lib would end up
    in the wheel, and the build must not write into the checkout)."""
    top_skip = {".venv", ".git", "build", "dist", "out", ".pytest_cache"}

    def ignore(d, names):
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (Path(d) == ROOT and n in top_skip)]
    dst = tmp_path / "src"
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def build(src, outdir, *, sdist=False):
    if HAVE_BUILD:
        cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir)]
        cmd += [] if sdist else ["--wheel"]
        cmd.append(str(src))
    else:
        assert not sdist
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-w", str(outdir), str(src)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=src)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    wheels = list(Path(outdir).glob("x86shadow-*.whl"))
    assert len(wheels) == 1, list(Path(outdir).iterdir())
    return wheels[0]


def check_wheel(wheel, tmp_path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in REQUIRED:
        assert f"x86shadow/_data/{rel}" in names, rel
    missing = [rel for rel in guest_sources() if f"x86shadow/_data/{rel}" not in names]
    assert not missing, missing
    assert not any(n.startswith(("firmware/", "guestcode/")) for n in names)   # under x86shadow/
    # the pytest plugin's entry point (docs/PYTEST_PLUGIN.md) and its module
    assert "x86shadow/pytest_plugin.py" in names
    (eps,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    eps = zipfile.ZipFile(wheel).read(eps).decode().replace("\r\n", "\n")
    assert "[pytest11]\nx86shadow = x86shadow.pytest_plugin\n" in eps, eps
    # installed (a pure wheel unpacked on the path is an install), away from the checkout
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import sys, x86shadow, x86shadow.resources as r, x86shadow.asm as a\n"
        "import x86shadow.bench as b, x86shadow.scenario as s\n"
        "print(x86shadow.__file__)\n"
        "print(r.firmware_dir()); print(r.guestcode_dir()); print(a.firmware_path('64'))\n"
        "print(b.BENCH_DIR); print(s.PROGRAM)\n"
        "fw = a.assemble_firmware('pae', 128 << 20)\n"
        "prog = a.assemble_program(str(s.PROGRAM), 'pae', 128 << 20)\n"
        "print(len(fw) > 0 and len(prog.code) > 0)\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    pkg, fw_dir, gc_dir, fw64, bench_dir, program, ok = p.stdout.split("\n")[:7]
    data = site / "x86shadow" / "_data"
    assert Path(pkg) == site / "x86shadow" / "__init__.py"
    assert Path(fw_dir) == data / "firmware" and Path(gc_dir) == data / "guestcode"
    assert Path(fw64) == data / "firmware" / "boot64.asm"
    assert Path(bench_dir) == data / "guestcode" / "bench"
    assert Path(program) == data / "guestcode" / "kmap" / "kscand.asm"
    assert ok == "True"


def test_wheel_carries_guest_sources(tmp_path):
    src = source_copy(tmp_path)
    check_wheel(build(src, tmp_path / "dist"), tmp_path)


@pytest.mark.skipif(not HAVE_BUILD, reason="the 'build' package (test extra) is not installed")
def test_sdist_carries_guest_sources_into_its_wheel(tmp_path):
    src = source_copy(tmp_path)
    wheel = build(src, tmp_path / "dist", sdist=True)      # sdist, then the wheel from the sdist
    (sdist,) = (tmp_path / "dist").glob("x86shadow-*.tar.gz")
    top = sdist.name[:-len(".tar.gz")]
    names = set(tarfile.open(sdist).getnames())
    missing = [rel for rel in guest_sources() if f"{top}/{rel}" not in names]
    assert not missing, missing
    check_wheel(wheel, tmp_path)


def test_checkout_resources_are_beside_the_package():
    # a source checkout / editable install: no package data, the top-level folders are used
    if resources.PACKAGE_DIR != ROOT / "x86shadow":
        pytest.skip("x86shadow is not imported from this checkout (a regular install)")
    assert not resources.DATA_DIR.exists()
    assert resources.firmware_dir() == ROOT / "firmware"
    assert resources.guestcode_dir() == ROOT / "guestcode"
    from x86shadow import asm
    assert asm.firmware_path("32") == ROOT / "firmware" / "boot32.asm"


def test_installed_data_wins_and_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    data, checkout = tmp_path / "pkg" / "_data", tmp_path / "checkout"
    (checkout / "firmware").mkdir(parents=True)
    monkeypatch.setattr(resources, "DATA_DIR", data)
    monkeypatch.setattr(resources, "CHECKOUT_DIR", checkout)
    assert resources.firmware_dir() == checkout / "firmware"
    (data / "firmware").mkdir(parents=True)
    assert resources.firmware_dir() == data / "firmware"
    with pytest.raises(resources.ResourceError) as e:
        resources.guestcode_dir()
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert msg.startswith("x86shadow's guest code not found: neither ")
    assert str(data / "guestcode") in msg and str(checkout / "guestcode") in msg
