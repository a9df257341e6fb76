"""pytest plugin (docs/PYTEST_PLUGIN.md): run guest code from tests.

Registered through the ``pytest11`` entry point ``x86shadow`` when x86shadow is installed (turn it
off with ``-p no:x86shadow``). Fixtures:

* ``x86run``   -- ``x86run(program_or_source, mode=..., ...)`` assembles and runs a guest program
  (a ``.asm`` path or assembly source; a source without ``main:`` is a *snippet*, the body of
  ``main``) and returns an :class:`X86Result`; a guest that does not end with the expected status
  (``expect=0``) or an assembly error fails the test with the guest's output / ``file:line``.
* ``faultlab`` -- a factory of :class:`x86shadow.faultlab.FaultLab` instances.
* ``x86cfg``   -- the (mode, policy, mmu) of a test marked ``@pytest.mark.x86shadow(...)``, which
  parametrizes the test over modes, policies and MMUs; ``x86run`` and ``faultlab`` take their
  defaults from it.
* ``x86shadow_guestcode`` -- the folder of the bundled guest programs and library.

Nothing of x86shadow is imported until a fixture is used or a marked test is collected, and no
fixture is autouse: other test suites run exactly as without the plugin.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

import pytest

ALL = "all"
DEFAULT_MODE = "pae"
DEFAULT_POLICY = "kvm"
DEFAULT_MMU = "shadow"
# the marker's defaults: every mode, the default policy, the shadow MMU
MARKER_DEFAULTS = {"modes": ALL, "policies": [DEFAULT_POLICY], "mmus": [DEFAULT_MMU]}
CONSOLE_INC = "lib/console.inc"

_MAIN_RE = re.compile(r"(?:^|;)\s*main\s*:")
_INCLUDE_RE = re.compile(r"""^\s*\.include\s+"([^"]*)"\s*(?:#.*)?$""")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "x86shadow(modes='all', policies=['kvm'], mmus=['shadow']): run the test once per guest "
        "configuration (fixture x86cfg; x86run and faultlab default to it); each argument is "
        "'all', one name or a list of names (x86shadow pytest plugin, docs/PYTEST_PLUGIN.md)")


# ---------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class X86Config:
    """One guest configuration of a marked test. ``policy`` is None under the native MMU (Unicorn's
    own page walker has no shadow-MMU policy). ``marked``: from the marker (False: the defaults
    of an unmarked test)."""
    mode: str
    policy: str | None
    mmu: str
    marked: bool = True

    @property
    def id(self) -> str:
        if self.mmu == "native":
            return f"{self.mode}-native"
        return f"{self.mode}-{self.policy}-{self.mmu}"


def _names(what, value, known, where):
    """A marker argument -> list of names ('all', one name or a list)."""
    if value == ALL:
        return list(known)
    values = [value] if isinstance(value, (str, int)) else value
    try:
        # modes may be numbers: modes=[32, 64]
        values = [str(v) if what == "modes" and type(v) is int else v for v in values]
    except TypeError:
        values = None
    if not values or not all(isinstance(v, str) for v in values):
        raise _MarkerError(f"{where}: @pytest.mark.x86shadow({what}=...) must be 'all', a name or "
                           f"a list of names, not {value!r}")
    if ALL in values:
        return list(known)
    bad = [v for v in values if v not in known]
    if bad:
        raise _MarkerError(f"{where}: @pytest.mark.x86shadow: unknown {what} "
                           f"{', '.join(map(repr, bad))} (choose from {', '.join(known)} or 'all')")
    return list(dict.fromkeys(values))           # in the order given, without repeats


class _MarkerError(Exception):
    pass


def marker_configs(marker, where="") -> list:
    """The configurations ``@pytest.mark.x86shadow(modes=..., policies=..., mmus=...)`` asks for:
    mode by mode, the shadow MMU under each policy, then the native MMU once (no policy)."""
    from .machine import MMUS, MODES
    from .policies import POLICY_NAMES
    if marker.args:
        raise _MarkerError(f"{where}: @pytest.mark.x86shadow takes keyword arguments only "
                           f"(modes=, policies=, mmus=)")
    unknown = set(marker.kwargs) - set(MARKER_DEFAULTS)
    if unknown:
        raise _MarkerError(f"{where}: @pytest.mark.x86shadow: unknown argument(s) "
                           f"{', '.join(sorted(unknown))} (it takes modes=, policies=, mmus=)")
    kw = {**MARKER_DEFAULTS, **marker.kwargs}
    modes = _names("modes", kw["modes"], MODES, where)
    policies = _names("policies", kw["policies"], POLICY_NAMES, where)
    mmus = _names("mmus", kw["mmus"], MMUS, where)
    out = []
    for mode in modes:
        for mmu in mmus:
            if mmu == "native":
                out.append(X86Config(mode, None, mmu))
            else:
                out.extend(X86Config(mode, p, mmu) for p in policies)
    return out


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("x86shadow")
    if marker is None:
        return
    where = metafunc.definition.nodeid
    error = None
    try:
        configs = marker_configs(marker, where)
        if "x86cfg" not in metafunc.fixturenames:
            raise _MarkerError(f"{where}: @pytest.mark.x86shadow parametrizes the fixture x86cfg, "
                               f"but the test uses none of x86cfg, x86run, faultlab")
    except _MarkerError as e:
        error = str(e)
    if error is not None:                     # (outside the except: no chained exception shown)
        pytest.fail(error, pytrace=False)
    metafunc.parametrize("x86cfg", configs, ids=[c.id for c in configs], indirect=True)


@pytest.fixture
def x86cfg(request):
    """The guest configuration of this test case (``.mode``, ``.policy``, ``.mmu``, ``.id``): one
    of the marker's; pae / kvm / shadow in a test without the marker (``.marked`` False)."""
    cfg = getattr(request, "param", None)
    return cfg if cfg is not None else X86Config(DEFAULT_MODE, DEFAULT_POLICY, DEFAULT_MMU, False)


# ---------------------------------------------------------------------------- results
@dataclass(eq=False)
class X86Result:
    """What ``x86run`` returns."""
    status: int                 # exit status as `x86shadow run` gives it (docs/GUEST_CONTRACT.md)
    how: str                    # "halt" | "exit" | "crash" | "violation" | "interrupted"
    serial_bytes: bytes         # what the guest wrote to the serial port
    counters: dict              # the counters at the end (docs/COUNTERS.md)
    trace: list | None          # trace events (dicts with "event", "seq") when trace=True
    report: str                 # the crash / violation report ("" after a clean end)
    markers: list               # [(value, counters)] per write to the marker port
    mode: str
    mmu: str
    policy: str | None          # None under the native MMU
    name: str                   # the program's path, or "<source at FILE:LINE>"
    source: str                 # the program text assembled (a snippet: wrapped)
    machine: object = field(repr=False)      # the x86shadow.machine.Machine, after the run
    program: object = field(repr=False)      # the x86shadow.asm.Program
    crash: object = field(default=None, repr=False)   # GuestCrash or None

    @property
    def serial(self) -> str:
        """The serial output as text (UTF-8; other bytes as \\x.. escapes)."""
        return self.serial_bytes.decode("utf-8", "backslashreplace")

    @property
    def passed(self) -> bool:
        """The guest returned from main (or halted): status 0."""
        return self.status == 0

    def memory(self, pa: int, n: int) -> bytes:
        """n bytes of guest-physical memory at pa, as the run left them."""
        return self.machine.read_phys(pa, n)

    def __repr__(self):
        out = self.serial
        if len(out) > 60:
            out = out[:28] + "..." + out[-28:]
        return (f"<X86Result {self.name} {self.config_text()}: status {self.status} ({self.how}), "
                f"serial {out!r}>")

    def config_text(self) -> str:
        return (f"mode {self.mode}, mmu native" if self.mmu == "native" else
                f"mode {self.mode}, mmu {self.mmu}, policy {self.policy}")


def describe_status(status: int, how: str) -> str:
    if status == 0:
        return "status 0 (returned from main / hlt)"
    if how == "exit" and status & 1:
        v = status >> 1
        return f"status {status} (wrote {v} to the exit port: FAIL {v})"
    return f"status {status} ({how})"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").split("\n"))


def _status_failure(r: X86Result, expect: int) -> str:
    lines = [f"x86run: the guest ended with {describe_status(r.status, r.how)}, expected "
             f"{describe_status(expect, 'exit')}",
             f"  program: {r.name}; {r.config_text()}"]
    if r.serial_bytes:
        lines += ["  serial output:", _indent(r.serial, "    | ")]
    else:
        lines.append("  serial output: (none)")
    if r.report:
        lines += ["  report:", _indent(r.report, "    ")]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- sources
def is_snippet(source: str) -> bool:
    """A source is a snippet when no statement defines the label ``main`` (``main:`` at the start
    of a line or after a ``;``, outside ``#`` comments)."""
    return not any(_MAIN_RE.search(line.split("#", 1)[0]) for line in source.split("\n"))


def wrap_snippet(source: str):
    """A snippet made a program -> (text, line map). The program is: ``.include
    "lib/console.inc"`` (unless the snippet includes it itself), the snippet's ``.include`` lines
    (hoisted: library code must not sit in main's path), ``main:``, the snippet's other lines in
    their order (the hoisted lines left empty, so line n of the snippet stays one line), ``ret``.
    ``line map``: program line -> snippet line (None for the lines we added)."""
    lines = source.split("\n")
    includes = [(i, l) for i, l in enumerate(lines, 1) if _INCLUDE_RE.match(l)]
    head, where = [], []
    if not any(_INCLUDE_RE.match(l).group(1) == CONSOLE_INC for _, l in includes):
        head.append(f'.include "{CONSOLE_INC}"')
        where.append(None)
    for i, l in includes:
        head.append(l.strip())
        where.append(i)
    head.append("main:")
    where.append(None)
    hoisted = {i for i, _ in includes}
    body = ["" if i in hoisted else l for i, l in enumerate(lines, 1)]
    text = "\n".join(head + body + ["    ret", ""])
    return text, where + list(range(1, len(lines) + 1)) + [None]


def _caller():
    """(file, line) of the first frame outside this module: where the test called us."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename == __file__:
        f = f.f_back
    return (f.f_code.co_filename, f.f_lineno) if f is not None else ("<unknown>", 0)


def _locate_in_file(source: str, filename: str, call_line: int):
    """The line of ``filename`` where the text of ``source`` starts when it is a literal there (a
    triple-quoted string in the test file): the occurrence nearest the call (a one-line source:
    only within 5 lines of the call). None when it is not found."""
    if not source.strip():
        return None
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    starts, at = [], text.find(source)
    while at >= 0:
        starts.append(text.count("\n", 0, at) + 1)
        at = text.find(source, at + 1)
    if "\n" not in source.strip("\n"):
        starts = [s for s in starts if abs(s - call_line) <= 5]
    if not starts:
        return None
    return min(starts, key=lambda s: (abs(s - call_line), s))


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith(".." + os.sep) else path


class _Source:
    """The program x86run assembles: a file, or a source string written to a temporary file."""

    def __init__(self, program_or_source, call_file, call_line):
        self.snippet = False
        self.line_map = None
        self.text = None
        self.tmpdir = None
        self.call = f"{_short(call_file)}:{call_line}"
        if isinstance(program_or_source, os.PathLike) or (
                isinstance(program_or_source, str) and "\n" not in program_or_source
                and (program_or_source.endswith(".asm") or os.path.isfile(program_or_source))):
            self.path = os.fspath(program_or_source)
            self.name = _short(self.path)
            self.user_text = None
            return
        if not isinstance(program_or_source, str):
            raise TypeError(f"the program must be a path (str or os.PathLike) or assembly "
                            f"source text, not {type(program_or_source).__name__}")
        self.user_text = program_or_source
        self.snippet = is_snippet(program_or_source)
        if self.snippet:
            self.text, self.line_map = wrap_snippet(program_or_source)
        else:
            self.text = program_or_source
        # where the source sits in the test file, if it is a literal there
        self.file_line = _locate_in_file(program_or_source, call_file, call_line)
        self.call_file = call_file
        self.name = f"<source at {self.call}>"
        self.tmpdir = tempfile.TemporaryDirectory(prefix="x86run-")
        self.path = os.path.join(self.tmpdir.name, "snippet.asm" if self.snippet else "program.asm")
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(self.text)

    def close(self):
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None

    def user_line(self, line):
        """The line of the source as the test gave it, for a line of the file assembled."""
        if line is None or self.user_text is None:
            return line
        if self.line_map is not None:
            return self.line_map[line - 1] if 0 < line <= len(self.line_map) else None
        return line

    def asm_error(self, e) -> str:
        """An AsmError as a failure message: ``file:line: what`` and the line itself."""
        filename, line, detail = e.filename, e.line, e.detail
        if self.user_text is not None and filename and _same_file(filename, self.path):
            detail = detail.replace(self.path, self.name)
            uline = self.user_line(line)
            text_line = (self.user_text.split("\n")[uline - 1]
                         if uline is not None else None)
            if uline is None:
                where = (f"{self.name} (in the lines x86run adds around a snippet)"
                         if line else self.name)
            elif self.file_line is not None:
                where = f"{_short(self.call_file)}:{self.file_line + uline - 1}"
            else:
                where = f"{self.name}, line {uline} of the source"
            out = f"x86run: assembly error: {where}: {detail}"
            if text_line is not None:
                out += f"\n    {text_line.strip()}"
            if uline is not None and self.file_line is not None:
                out += f"\n  (line {uline} of the source given to x86run at {self.call})"
            return out
        if filename:
            where = f"{_short(filename)}:{line}" if line else _short(filename)
            out = f"x86run: assembly error: {where}: {detail}"
        else:
            out = f"x86run: assembly error: {detail}"
        if filename and line:
            try:
                with open(filename, encoding="utf-8", errors="replace") as f:
                    out += "\n    " + f.read().split("\n")[line - 1].strip()
            except (OSError, IndexError):
                pass
        return out + f"\n  (program {self.name} given to x86run at {self.call})"


def _same_file(a, b) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _host_config(host):
    from .machine import HostConfig
    if host is None or isinstance(host, HostConfig):
        return host
    if isinstance(host, str):
        return HostConfig(schedule=host)
    if isinstance(host, dict):
        return HostConfig(**host)
    raise TypeError(f"host must be a HostConfig, a --host schedule string or a dict of "
                    f"HostConfig fields, not {type(host).__name__}")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def x86run(request, x86cfg):
    """Assemble and run a guest program; see docs/PYTEST_PLUGIN.md.

    ``x86run(program_or_source, mode=None, mmu=None, policy=None, unsync=None, audit=True,
    ram_mib=128, trace=False, host=None, max_insns=0, cpu=None, *, expect=0, symbols=None,
    include_dirs=())`` -> X86Result. mode / mmu / policy default to the test's x86cfg."""
    test_dir = str(request.path.parent) if getattr(request, "path", None) else None

    def run(program_or_source, mode=None, mmu=None, policy=None, unsync=None, audit=True,
            ram_mib=128, trace=False, host=None, max_insns=0, cpu=None, *, expect=0,
            symbols=None, include_dirs=()):
        __tracebackhide__ = True
        from .asm import AsmError, assemble_firmware, assemble_program, program_modes
        from .machine import Machine, check_ram
        mode_from_cfg = mode is None
        mode = x86cfg.mode if mode is None else str(mode).lower()
        mmu = x86cfg.mmu if mmu is None else mmu
        if policy is None:
            policy = x86cfg.policy or DEFAULT_POLICY
        call_file, call_line = _caller()
        failure = None
        try:
            src = _Source(program_or_source, call_file, call_line)
        except TypeError as e:
            failure = f"x86run: {e}"
        if failure is not None:
            pytest.fail(failure)
        try:
            try:
                check_ram(mode, ram_mib)
                incs = [os.fspath(d) for d in include_dirs]
                if src.user_text is not None:
                    incs += [os.path.dirname(os.path.abspath(call_file))]
                    if test_dir:
                        incs.append(test_dir)
                modes = program_modes(src.path)
                if mode not in modes and mode_from_cfg and x86cfg.marked:
                    pytest.skip(f"{src.name} supports modes {', '.join(modes)}, not {mode}")
                program = assemble_program(src.path, mode, ram_mib << 20, symbols=symbols,
                                           include_dirs=incs)
                firmware = assemble_firmware(mode, ram_mib << 20)
            except AsmError as e:
                failure = src.asm_error(e)
            except ValueError as e:
                failure = f"x86run: {e}"
        finally:
            src.close()
        if failure is not None:
            pytest.fail(failure)
        events = [] if trace else None

        def collect(kind, fields):
            events.append({**fields, "event": kind, "seq": len(events) + 1})
        try:
            m = Machine(mode, mmu=mmu, policy=policy, ram_mib=ram_mib, audit=audit,
                        unsync=unsync if mmu == "shadow" else None, host=_host_config(host),
                        trace=collect if trace else None, cpu=cpu)
        except (ValueError, TypeError) as e:
            failure = f"x86run: {e}"
        if failure is not None:
            pytest.fail(failure)
        m.load(program, firmware)
        res = m.run(max_insns)
        r = X86Result(status=res.status, how=res.how, serial_bytes=bytes(m.output),
                      counters=dict(res.counters or m.counters), trace=events, report=res.report,
                      markers=list(m.markers), mode=mode, mmu=mmu,
                      policy=policy if mmu == "shadow" else None, name=src.name,
                      source=src.text if src.text is not None else _read(src.path),
                      machine=m, program=program, crash=res.crash)
        if expect is not None and r.status != expect:
            pytest.fail(_status_failure(r, expect))
        return r
    return run


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _lab_class():
    """FaultLab with runs that default to the test's MMU and fail the test on an assembly error
    (made on first use: x86shadow is imported lazily)."""
    global _LabClass
    if _LabClass is None:
        from .asm import AsmError
        from .faultlab import FaultLab

        class PytestFaultLab(FaultLab):
            default_mmu = DEFAULT_MMU

            def run(self, snippet, shadow=(), mmu=None, audit=True):
                __tracebackhide__ = True
                failure = None
                try:
                    return super().run(snippet, shadow, mmu or self.default_mmu, audit)
                except AsmError as e:
                    text = self.source(snippet, shadow).split("\n")
                    failure = f"faultlab: assembly error in the lab program: {e}"
                    if e.line and 0 < e.line <= len(text):
                        failure += f"\n    {text[e.line - 1].strip()}"
                pytest.fail(failure)
        _LabClass = PytestFaultLab
    return _LabClass


_LabClass = None


@pytest.fixture
def faultlab(x86cfg):
    """A factory of FaultLabs (x86shadow.faultlab): ``faultlab(mode=None, policy=None,
    ram_mib=64, unsync=None)``; mode and policy default to the test's x86cfg, and ``lab.run``
    to its MMU."""
    def make(mode=None, policy=None, ram_mib=64, unsync=None):
        __tracebackhide__ = True
        cls = _lab_class()
        try:
            lab = cls(mode or x86cfg.mode, policy=policy or x86cfg.policy or DEFAULT_POLICY,
                      ram_mib=ram_mib, unsync=unsync)
        except ValueError as e:
            failure = f"faultlab: {e}"
        else:
            lab.default_mmu = x86cfg.mmu
            return lab
        pytest.fail(failure)
    return make


@pytest.fixture(scope="session")
def x86shadow_guestcode():
    """The folder of the guest programs bundled with x86shadow (lib/*.inc, hello.asm, bench/,
    kmap/, ...) as a pathlib.Path."""
    from .resources import guestcode_dir
    return guestcode_dir()
