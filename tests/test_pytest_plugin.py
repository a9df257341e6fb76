"""The pytest plugin (x86shadow/pytest_plugin.py, docs/PYTEST_PLUGIN.md): generated test files run
by pytester in-process (the plugin comes in through its pytest11 entry point, as in any pytest run
once x86shadow is installed) and, where the process matters, in a subprocess."""
import importlib
import importlib.metadata
import sys
import textwrap

import pytest

# imported here so that pytester's in-process runs reuse them and the firmware cache (it drops the
# modules an inner run imports); hypothesis's plugin imports hypothesis at the end of every run
for _name in ("x86shadow.asm", "x86shadow.faultlab", "x86shadow.machine",
              "x86shadow.memory.schedule", "hypothesis"):
    try:
        importlib.import_module(_name)
    except ImportError:
        if _name.startswith("x86shadow"):
            raise
from x86shadow import pytest_plugin as plugin
from x86shadow.policies import POLICY_NAMES

pytest_plugins = ["pytester"]


def write(pytester, name, text):
    return pytester.makepyfile(**{name: textwrap.dedent(text)})


def no_traceback_into_x86shadow(out: str):
    assert "Traceback" not in out
    for frame in ("x86shadow/asm/", "x86shadow/machine.py", "pytest_plugin.py:", "AsmError"):
        assert frame not in out, frame


# ---------------------------------------------------------------------------- registration
def test_entry_point_names_the_plugin_module():
    eps = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "x86shadow"]
    assert [ep.value for ep in eps] == ["x86shadow.pytest_plugin"]
    assert eps[0].load() is plugin


def test_fixtures_listed_in_a_fresh_process(pytester):
    # a separate interpreter: what `pytest --fixtures` shows after a pip install (editable here)
    r = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    out = r.stdout.str()
    assert "fixtures defined from x86shadow.pytest_plugin" in out
    for name in ("x86run", "faultlab", "x86cfg", "x86shadow_guestcode [session scope]"):
        assert f"\n{name} -- " in out, name
    assert "x86shadow/pytest_plugin.py:" in out


def test_unrelated_runs_import_nothing_of_x86shadow_but_the_plugin(pytester):
    write(pytester, "test_plain", """
        import sys
        def test_plain():
            mods = sorted(m for m in sys.modules
                          if m.split(".")[0] in ("x86shadow", "unicorn", "capstone", "keystone"))
            assert mods == ["x86shadow", "x86shadow.pytest_plugin"], mods
    """)
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--trace-config")
    r.assert_outcomes(passed=1)
    # the module this process imports: with an editable install, the checkout's
    r.stdout.fnmatch_lines([f"*PLUGIN registered: <module 'x86shadow.pytest_plugin' from "
                            f"'{plugin.__file__}'>*"])


def test_plugin_can_be_turned_off(pytester):
    write(pytester, "test_off", """
        def test_uses_it(x86run):
            pass
    """)
    r = pytester.runpytest("-p", "no:x86shadow")
    r.assert_outcomes(errors=1)
    r.stdout.fnmatch_lines(["*fixture 'x86run' not found*"])


# ---------------------------------------------------------------------------- x86run
def test_snippet_in_every_mode_two_policies_and_native(pytester):
    write(pytester, "test_snip", '''
        import pytest

        @pytest.mark.x86shadow(policies=["kvm", "xen"], mmus=["shadow", "native"])
        def test_add(x86run, x86cfg):
            r = x86run("""
                mov eax, 40
                add eax, 2
                CHECK_EQ eax, 42, 3, "eax is not 42"
                PRINT_DEC "eax=", eax
                PRINT "\\\\n"
                PASS
            """)
            assert r.serial == "eax=42\\nPASS\\n"
            assert r.serial_bytes == b"eax=42\\nPASS\\n"
            assert (r.status, r.how) == (0, "halt") and r.passed and r.report == ""
            assert (r.mode, r.mmu) == (x86cfg.mode, x86cfg.mmu)
            assert r.policy == x86cfg.policy
            assert r.counters["exits"] > 0 and r.machine.mode == x86cfg.mode
    ''')
    r = pytester.runpytest("-v", "--strict-markers")
    r.assert_outcomes(passed=9)
    r.stdout.fnmatch_lines([f"*test_add[[]{i}[]] PASSED*" for i in (
        "32-kvm-shadow", "32-xen-shadow", "32-native", "pae-kvm-shadow", "pae-xen-shadow",
        "pae-native", "64-kvm-shadow", "64-xen-shadow", "64-native")])


def test_failing_guest_fails_the_test_with_its_output(pytester):
    write(pytester, "test_failing", '''
        def test_fails(x86run):
            x86run("""
                PRINT "checking the sum\\\\n"
                mov eax, 1
                CHECK_EQ eax, 2, 5, "sum is wrong"
                PASS
            """)

        def test_crash_report(x86run):
            x86run("mov eax, dword ptr [0xf0000000]", mode="64")

        def test_expected_status(x86run):
            r = x86run('FAIL 5, "expected"', expect=11)
            assert r.serial == "FAIL 5: expected\\n" and r.how == "exit"
            r = x86run("mov eax, dword ptr [0xf0000000]", expect=None)
            assert r.status == 4 and r.report.startswith("x86shadow: guest crashed: ")
            assert r.crash.vector == 14
    ''')
    r = pytester.runpytest()
    r.assert_outcomes(failed=2, passed=1)
    r.stdout.fnmatch_lines([
        "*x86run: the guest ended with status 11 (wrote 5 to the exit port: FAIL 5), "
        "expected status 0*",
        "*program: <source at test_failing.py:2>; mode pae, mmu shadow, policy kvm",
        "*serial output:",
        "*| checking the sum",
        "*| FAIL 5: sum is wrong (got 0x00000001)",
        "test_failing.py:2: Failed",
    ])
    r.stdout.fnmatch_lines([
        "*x86run: the guest ended with status 4 (crash)*",
        "*serial output: (none)",
        "*report:",
        "*x86shadow: guest crashed: unhandled #PF page fault",
        "*instruction 0x*: mov* eax, dword ptr [[]0xf0000000[]]*",
    ])
    no_traceback_into_x86shadow(r.stdout.str())


def test_asm_error_is_reported_as_file_and_line(pytester):
    pytester.makefile(".inc", mine="helper:\n    mov eax, [\n    ret\n")
    pytester.makefile(".asm", prog='.include "lib/console.inc"\n.include "mine.inc"\n'
                                   'main:\n    PASS\n    ret\n')
    pytester.makefile(".asm", typo='.include "lib/console.inc"\nmain:\n    movv eax, 1\n    ret\n')
    path = write(pytester, "test_asmerr", '''
        import pathlib
        HERE = pathlib.Path(__file__).parent

        def test_snippet(x86run):
            x86run("""
                mov eax, 1
                movx eax, 2
            """)

        def test_one_line(x86run):
            x86run("jmp nowhere")

        def test_file(x86run):
            x86run(HERE / "typo.asm")

        def test_included_file(x86run):
            x86run(str(HERE / "prog.asm"))

        def test_not_found(x86run):
            x86run("missing.asm")
    ''')
    lines = path.read_text().split("\n")

    def line_of(text):
        return next(i for i, line in enumerate(lines, 1) if text in line)
    call = line_of("def test_snippet") + 1
    assert line_of("movx eax, 2") == call + 2          # line 3 of the source (it starts with \n)
    r = pytester.runpytest()
    r.assert_outcomes(failed=5)
    out = r.stdout.str()
    r.stdout.fnmatch_lines([
        "E       Failed: x86run: assembly error: test_asmerr.py:%d: invalid mnemonic 'movx eax, 2'"
        % line_of("movx eax, 2"),
        "E           movx eax, 2",
        "E         (line 3 of the source given to x86run at test_asmerr.py:%d)" % call,
        "test_asmerr.py:%d: Failed" % call,
    ])
    r.stdout.fnmatch_lines(["E       Failed: x86run: assembly error: test_asmerr.py:%d: *nowhere*"
                            % line_of('x86run("jmp nowhere")')])
    r.stdout.fnmatch_lines(["E       Failed: x86run: assembly error: typo.asm:3: invalid mnemonic*",
                            "E           movv eax, 1"])
    r.stdout.fnmatch_lines(["E       Failed: x86run: assembly error: mine.inc:2: unbalanced *",
                            "E           mov eax, [[]",
                            "E         (program prog.asm given to x86run at test_asmerr.py:%d)"
                            % line_of('x86run(str(HERE / "prog.asm"))')])
    r.stdout.fnmatch_lines(["E       Failed: x86run: assembly error: missing.asm: cannot read*"])
    no_traceback_into_x86shadow(out)


def test_results_trace_memory_markers_and_guestcode(pytester):
    write(pytester, "test_result", '''
        import pytest

        def test_everything(x86run, x86shadow_guestcode):
            assert (x86shadow_guestcode / "lib" / "console.inc").is_file()
            r = x86run(x86shadow_guestcode / "hello.asm", trace=True)
            assert r.serial == "hello from x86shadow\\nPASS\\n"
            assert r.trace[0]["seq"] == 1 and r.trace[-1]["seq"] == len(r.trace)
            assert "kvm_exit" in {e["event"] for e in r.trace}
            assert r.memory(r.program.base, 16) == r.program.code[:16]
            assert r.name.endswith("hello.asm") and "main:" in r.source
            assert x86run("PASS").trace is None
            r = x86run("""
                mov dword ptr [FREE_BASE + 0x10000], 0x12345678
                mov al, 7
                out MARKER_PORT, al
            """, mode="32", mmu="native")
            assert r.memory(0x1010000, 4) == bytes.fromhex("78563412")
            assert [v for v, _ in r.markers] == [7] and r.policy is None

        def test_full_program_source(x86run):
            src = '.include "lib/console.inc"\\nmain:\\n    PRINT "x"\\n    ret\\n'
            r = x86run(src, mode="64")
            assert r.serial == "x" and r.source == src

        def test_include_beside_the_test(x86run):
            assert x86run('.include "helper.inc"\\n call helper\\n').serial == "helped\\nPASS\\n"

        def test_symbols_and_limits(x86run):
            assert x86run("PRINT_DEC \\"\\", N", symbols={"N": 31}).serial == "31"
            r = x86run("spin:\\n jmp spin\\n", max_insns=5000, expect=4)
            assert "--max-insns 5000" in r.report

        def test_host(x86run, x86shadow_guestcode):
            r = x86run(x86shadow_guestcode / "host_churn.asm", mode="64", host="swap:3")
            assert r.counters["host_swap_out"] > 0

        def test_cpu_model(x86run, x86shadow_guestcode):
            pcid = x86shadow_guestcode / "pcid.asm"
            assert x86run(pcid, mode="64", cpu="qemu64,+pcid,+invpcid").serial.startswith(
                "pcid invpcid")
            assert not x86run(pcid, mode="64").serial.startswith("pcid")

        def test_bad_cpu(x86run):
            x86run("PASS", cpu="no-such-cpu")

        def test_bad_arguments(x86run):
            x86run("PASS", policy="nope")

        def test_bad_program(x86run):
            x86run(42)
    ''')
    pytester.makefile(".inc", helper='helper:\n    PRINT "helped\\n"\n    PASS\n    ret\n')
    r = pytester.runpytest()
    r.assert_outcomes(passed=6, failed=3)
    r.stdout.fnmatch_lines(["E       Failed: x86run: unknown policy 'nope' (choose from kvm, *"])
    r.stdout.fnmatch_lines(["E       Failed: x86run: --cpu no-such-cpu: unknown CPU model *"])
    r.stdout.fnmatch_lines(["E       Failed: x86run: the program must be a path (str or "
                            "os.PathLike) or assembly source text, not int"])


def test_marker_defaults_and_header_modes(pytester):
    pytester.makefile(".asm", only32=("# x86shadow: modes=32,pae\n.include \"lib/console.inc\"\n"
                                      "main:\n    PASS\n    ret\n"))
    write(pytester, "test_modes", '''
        import pathlib, pytest
        HERE = pathlib.Path(__file__).parent

        @pytest.mark.x86shadow
        def test_program(x86run):
            assert x86run(HERE / "only32.asm").serial == "PASS\\n"

        @pytest.mark.x86shadow(modes="pae")
        def test_explicit_mode_is_not_skipped(x86run):
            x86run(HERE / "only32.asm", mode="32")
            x86run(HERE / "only32.asm", mode="64")

        def test_unmarked(x86run, x86cfg):
            cfg = (x86cfg.mode, x86cfg.policy, x86cfg.mmu, x86cfg.marked)
            assert cfg == ("pae", "kvm", "shadow", False)
            assert x86run("PASS").mode == "pae"
    ''')
    r = pytester.runpytest("-rs")
    r.assert_outcomes(passed=3, skipped=1, failed=1)
    r.stdout.fnmatch_lines(["*x86run: assembly error: only32.asm:1: program supports modes 32, "
                            "pae, not 64"])
    r.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_modes.py:6: only32.asm supports modes 32, pae, "
                            "not 64"])


# ---------------------------------------------------------------------------- the marker
def test_marker_parametrization_ids_and_count(pytester):
    write(pytester, "test_ids", '''
        import pytest

        @pytest.mark.x86shadow
        def test_default(x86cfg):
            assert x86cfg.policy == "kvm" and x86cfg.mmu == "shadow"

        @pytest.mark.x86shadow(modes=[64, "32"], policies=["kvm", "xen-oos"], mmus="all")
        def test_lists(x86cfg):
            assert x86cfg.id == {"native": f"{x86cfg.mode}-native"}.get(
                x86cfg.mmu, f"{x86cfg.mode}-{x86cfg.policy}-{x86cfg.mmu}")

        @pytest.mark.x86shadow(modes="pae", policies="all")
        def test_all_policies(x86cfg):
            pass

        @pytest.mark.x86shadow(modes="32", mmus="native", policies="all")
        class TestClass:
            def test_method(self, x86cfg):
                assert x86cfg.policy is None
    ''')
    r = pytester.runpytest("--collect-only", "-q", "--strict-markers")
    ids = [line.split("::", 1)[1] for line in r.stdout.lines if line.startswith("test_ids.py::")]
    expected = (["test_default[32-kvm-shadow]", "test_default[pae-kvm-shadow]",
                 "test_default[64-kvm-shadow]",
                 "test_lists[64-kvm-shadow]", "test_lists[64-xen-oos-shadow]",
                 "test_lists[64-native]", "test_lists[32-kvm-shadow]",
                 "test_lists[32-xen-oos-shadow]", "test_lists[32-native]"]
                + [f"test_all_policies[pae-{p}-shadow]" for p in POLICY_NAMES]
                + ["TestClass::test_method[32-native]"])
    assert ids == expected
    r = pytester.runpytest("--strict-markers")
    r.assert_outcomes(passed=len(expected))
    r = pytester.runpytest("--markers")
    r.stdout.fnmatch_lines(["@pytest.mark.x86shadow(modes='all', policies=[[]'kvm'[]], "
                            "mmus=[[]'shadow'[]]): *"])


@pytest.mark.parametrize("args,message", [
    ('modes=["96"]', "unknown modes '96' (choose from 32, pae, 64 or 'all')"),
    ('policies="kvm2"', "unknown policies 'kvm2' (choose from kvm, *"),
    ("mmus=[]", "mmus=...) must be 'all', a name or a list of names, not []"),
    ('"pae"', "takes keyword arguments only (modes=, policies=, mmus=)"),
    ('mode="pae"', "unknown argument(s) mode (it takes modes=, policies=, mmus=)"),
])
def test_bad_marker_is_a_collection_error(pytester, args, message):
    write(pytester, "test_bad", f'''
        import pytest

        @pytest.mark.x86shadow({args})
        def test_it(x86cfg):
            pass
    ''')
    r = pytester.runpytest()
    r.assert_outcomes(errors=1)
    r.stdout.fnmatch_lines([f"test_bad.py::test_it: @pytest.mark.x86shadow*{message}"])
    assert "Traceback" not in r.stdout.str() and "During handling" not in r.stdout.str()


def test_marker_on_a_test_that_uses_no_configuration(pytester):
    write(pytester, "test_unused", '''
        import pytest

        @pytest.mark.x86shadow
        def test_it():
            pass
    ''')
    r = pytester.runpytest()
    r.assert_outcomes(errors=1)
    r.stdout.fnmatch_lines(["*parametrizes the fixture x86cfg, but the test uses none of x86cfg, "
                            "x86run, faultlab"])


# ---------------------------------------------------------------------------- faultlab
def test_faultlab_fixture(pytester):
    write(pytester, "test_lab", '''
        import pytest

        X, WIN, DATA = 0x4000_0000, 0x4080_0000, 0x0200_0000

        @pytest.mark.x86shadow(modes=["pae", "64"], policies=["kvm-2008", "unshadow-all"])
        def test_pte_write(faultlab, x86cfg):
            lab = faultlab(unsync=None)
            assert (lab.mode, lab.policy, lab.ram_mib) == (x86cfg.mode, x86cfg.policy, 64)
            lab.map(X, DATA).map_table_window(WIN, X)
            pte = WIN + (lab.pte_addr(X) & 0xFFF)
            reg = "rbx" if x86cfg.mode == "64" else "ebx"
            r = lab.run(f"mov {reg}, {pte:#x}\\n mov dword ptr [{reg}], {DATA | 0x1067:#x}",
                        shadow=[X])
            assert r.status == 0, r.report
            verb = {"kvm-2008": "emulate", "unshadow-all": "unprotect"}[x86cfg.policy]
            assert [d.split(":")[0] for d in r.decisions] == [verb]
            assert r.read_pte(lab.pte_addr(X)) == DATA | 0x1067

        @pytest.mark.x86shadow(modes="32", mmus="native")
        def test_native(faultlab):
            lab = faultlab()
            r = lab.run("mov eax, 1")
            assert r.status == 0 and r.machine.mmu_kind == "native" and r.events == []

        def test_asm_error(faultlab):
            faultlab("32").run("movx eax, 1")
    ''')
    r = pytester.runpytest("-v")
    r.assert_outcomes(passed=5, failed=1)
    r.stdout.fnmatch_lines(["*test_pte_write[[]pae-kvm-2008-shadow[]] PASSED*",
                            "*test_pte_write[[]64-unshadow-all-shadow[]] PASSED*",
                            "*test_native[[]32-native[]] PASSED*"])
    r.stdout.fnmatch_lines(["E       Failed: faultlab: assembly error in the lab program: "
                            "<faultlab>:*: invalid mnemonic 'movx eax, 1'",
                            "E           movx eax, 1"])
    no_traceback_into_x86shadow(r.stdout.str())


# ---------------------------------------------------------------------------- snippets
def test_snippet_definition():
    assert plugin.is_snippet("mov eax, 1\nPASS")
    assert plugin.is_snippet("# main: is only a comment here\ncall mainly\n")
    assert not plugin.is_snippet("main:\n ret")
    assert not plugin.is_snippet("  nop; main: ret")
    text, where = plugin.wrap_snippet('mov eax, 1\n.include "lib/probe.inc"  # probes\nPASS')
    lines = text.split("\n")
    assert lines[:3] == ['.include "lib/console.inc"', '.include "lib/probe.inc"  # probes',
                         "main:"]
    assert lines[3:] == ["mov eax, 1", "", "PASS", "    ret", ""]
    assert where == [None, 2, None, 1, 2, 3, None]
    text, where = plugin.wrap_snippet('.include "lib/console.inc"\nPASS')
    assert text.split("\n")[:2] == ['.include "lib/console.inc"', "main:"]


def test_docs_examples_run(pytester):
    """Every python block of docs/PYTEST_PLUGIN.md, as it is there (the first is the example
    whose run the document shows)."""
    import pathlib
    import re
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "PYTEST_PLUGIN.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert blocks[0].startswith("# test_example.py\n") and len(blocks) == 3
    for i, block in enumerate(blocks):
        pytester.makepyfile(**{f"test_doc{i}": "import pytest\n\n" + block})
    r = pytester.runpytest("-v", "--strict-markers")
    r.assert_outcomes(passed=6 + 4 + 1)
    r.stdout.fnmatch_lines(["test_doc0.py::test_store_and_load[[]pae-kvm-shadow[]] PASSED*"])
    assert sys.modules["x86shadow.pytest_plugin"] is plugin
