"""The gdb stub (docs/GDB.md): the protocol without gdb, then the real gdb (GNU gdb, batch mode)
against ``x86shadow run ... --gdb-wait --gdb 127.0.0.1:0`` in every paging mode and both MMUs."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from x86shadow import gdbstub as g
from x86shadow import layout
from x86shadow.asm import assemble_program

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="GNU gdb is not installed (apt-get install gdb)")

MSG_VA = 0x3000_0000                   # mapped by the guest to MSG_PA, not identity-mapped
MSG_PA = layout.FREE_BASE + 0x20_0000
MSG2_PA = layout.FREE_BASE + 0x20_1000
PTE_SLOT = layout.FREE_BASE + 0x800    # PROG_VARS: where the guest leaves MSG_VA's pte address
CHECKPOINT_MARK = bytes.fromhex("b8efbe0d60")     # mov eax, 0x600dbeef

GUEST = f"""
# x86shadow: modes=32,pae,64
.include "lib/console.inc"
.include "lib/paging.inc"
main:
    call pt_init
    mov dword ptr [{MSG_PA:#x}], 0x41414141
    mov dword ptr [{MSG_PA + 4:#x}], 0x0a
    mov dword ptr [{MSG2_PA:#x}], 0x43434343
    mov dword ptr [{MSG2_PA + 4:#x}], 0x0a
.if BITS == 64
    mov rdi, cr3
.else
    mov edi, cr3
.endif
.if PAGING == 3
    and edi, 0xffffffe0
.else
    and edi, 0xfffff000
.endif
    mov esi, {MSG_VA:#x}
    mov eax, {MSG_PA:#x} | PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    mov dword ptr [{PTE_SLOT:#x}], eax
    mov eax, dword ptr [{MSG_VA:#x}]
.if BITS == 64
    mov rax, cr3
.else
    mov eax, cr3
.endif
    PRINT_HEX "cr3=", eax
    PRINT "\\n"
checkpoint:
    mov eax, 0x600dbeef
    invlpg [{MSG_VA:#x}]
    mov esi, {MSG_VA:#x}
    call puts
    PASS
    ret
"""


# ------------------------------------------------------------------ protocol, no gdb
def test_framing_and_checksum():
    assert g.frame(b"OK") == b"$OK#9a"
    assert g.frame(b"a#b") == b"$a}\x03b#%02x" % g.checksum(b"a}\x03b")
    assert g.unescape(g.escape(b"$#}*x")) == b"$#}*x"


def test_reader_splits_packets_acks_interrupts_and_rejects_bad_checksums():
    r = g.PacketReader()
    ev = r.feed(b"+$g#67\x03$m10,4#00$qC#b4")
    assert ev == [("ack", b"+"), ("packet", b"g"), ("interrupt", None), ("bad", None),
                  ("packet", b"qC")]
    whole = g.frame(b"m10,4")
    assert r.feed(whole[:5]) == [] and r.feed(whole[5:]) == [("packet", b"m10,4")]


@pytest.mark.parametrize("bits", [32, 64])
def test_target_xml_lists_every_register_in_g_order(bits):
    import xml.etree.ElementTree as ET
    regs = g.x86_registers(bits)
    root = ET.fromstring(g.target_xml(bits).split("\n", 2)[2])
    assert root.find("architecture").text == ("i386:x86-64" if bits == 64 else "i386")
    listed = {int(e.get("regnum")): e.get("name") for e in root.iter("reg")}
    assert [listed[i] for i in range(len(regs))] == [r.name for r in regs]
    for name in ("cr0", "cr2", "cr3", "cr4", "efer", "eflags", "cs", "fs_base"):
        assert name in listed.values()
    assert ("cr8" in listed.values()) == (bits == 64)


class _FakeTarget(g.Target):
    """A target with plain dicts, to drive GdbStub over a socket pair."""

    def __init__(self):
        self.bits = 64
        self.registers = g.x86_registers(64)
        self.values = {r.name: 0 for r in self.registers}
        self.values["cr3"] = 0x1234000
        self.mem = bytearray(0x2000)
        self.bps = set()
        self.stepped = 0

    def read_register(self, name):
        return self.values[name]

    def write_register(self, name, value):
        if name.startswith("cr"):
            raise g.TargetError("read-only")
        self.values[name] = value

    def read_memory(self, addr, n):
        if addr + n > len(self.mem):
            raise g.TargetError("unmapped")
        return bytes(self.mem[addr:addr + n])

    def write_memory(self, addr, data):
        self.mem[addr:addr + len(data)] = data

    def insert_breakpoint(self, kind, addr):
        self.bps.add((kind, addr))

    def remove_breakpoint(self, kind, addr):
        self.bps.discard((kind, addr))

    def resume(self, step):
        self.stepped += step
        return g.Stop(g.SIGTRAP, "" if step else "swbreak")


def _exchange(sock, payload):
    sock.sendall(g.frame(payload))
    data = b""
    while not re.search(rb"\$([^#]*)#[0-9a-f]{2}", data):
        data += sock.recv(65536)
    return g.unescape(re.search(rb"\$([^#]*)#[0-9a-f]{2}", data).group(1))


def test_stub_answers_the_packets_gdb_sends():
    import threading
    a, b = socket.socketpair()
    t = _FakeTarget()
    stub = g.GdbStub(a, t)
    result = []
    th = threading.Thread(target=lambda: result.append(stub.serve()))
    th.start()
    try:
        assert b"qXfer:features:read+" in _exchange(b, b"qSupported:swbreak+")
        assert _exchange(b, b"QStartNoAckMode") == b"OK"
        xml = _exchange(b, b"qXfer:features:read:target.xml:0,3fff")
        assert xml[:1] == b"l" and b"<architecture>i386:x86-64</architecture>" in xml
        regs = t.registers
        cr3 = next(i for i, r in enumerate(regs) if r.name == "cr3")
        assert _exchange(b, b"p%x" % cr3) == (0x1234000).to_bytes(8, "little").hex().encode()
        g_all = _exchange(b, b"g")
        assert len(g_all) == sum(r.bits for r in regs) // 4
        rax = 0
        assert _exchange(b, b"P%x=%s" % (rax, (0x55).to_bytes(8, "little").hex().encode())) == b"OK"
        assert t.values["rax"] == 0x55
        assert _exchange(b, b"P%x=%s" % (cr3, bytes(8).hex().encode())) == b"E14"
        assert _exchange(b, b"M10,3:616263") == b"OK" and _exchange(b, b"m10,3") == b"616263"
        assert _exchange(b, b"m1ff0,100") == b"E14"
        assert _exchange(b, b"Z0,400000,1") == b"OK" and (0, 0x400000) in t.bps
        assert _exchange(b, b"Z2,400000,4") == b""            # watchpoints: unsupported
        assert _exchange(b, b"vCont;s:1") == b"S05" and t.stepped == 1
        assert _exchange(b, b"c") == b"T05swbreak:;"
        assert _exchange(b, b"?") == b"T05swbreak:;"
        assert _exchange(b, b"qAttached") == b"1"
        assert _exchange(b, b"D") == b"OK"
    finally:
        th.join(5)
        a.close()
        b.close()
    assert result == [g.DETACHED]


def test_parse_address():
    assert g.parse_address("1234") == ("127.0.0.1", 1234)
    assert g.parse_address(":1234") == ("127.0.0.1", 1234)
    assert g.parse_address("0.0.0.0:5") == ("0.0.0.0", 5)
    with pytest.raises(ValueError):
        g.parse_address("host:port")


# ------------------------------------------------------------------ command line
def _x86shadow(*args, **kw):
    return subprocess.run([sys.executable, "-m", "x86shadow.cli", *args], capture_output=True,
                          text=True, timeout=60, **kw)


def test_bad_gdb_options_are_usage_errors(tmp_path):
    p = _x86shadow("run", "guestcode/hello.asm", "--mode", "pae", "--gdb", "nohost:xx")
    assert p.returncode == 2 and p.stderr.startswith("x86shadow: error: --gdb 'nohost:xx'")
    assert "Traceback" not in p.stderr
    p = _x86shadow("run", "guestcode/hello.asm", "--mode", "pae", "--gdb-wait")
    assert p.returncode == 2 and "--gdb-wait needs --gdb" in p.stderr
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        busy = s.getsockname()[1]
        p = _x86shadow("run", "guestcode/hello.asm", "--mode", "pae", "--gdb", f"127.0.0.1:{busy}")
        assert p.returncode == 2 and "cannot listen there" in p.stderr
    finally:
        s.close()


# ------------------------------------------------------------------ the real gdb
class Guest:
    """``x86shadow run PROGRAM --gdb 127.0.0.1:0 [--gdb-wait]`` in the background."""

    def __init__(self, path, mode, *extra, wait=True):
        args = [sys.executable, "-m", "x86shadow.cli", "run", str(path), "--mode", mode,
                "--gdb", "127.0.0.1:0", *extra] + (["--gdb-wait"] if wait else [])
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.p.stderr.readline().decode()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))

    def finish(self):
        out, err = self.p.communicate(timeout=60)
        return self.p.returncode, out.decode(), err.decode()


def gdb_batch(port, arch, *commands):
    args = [GDB, "-nx", "-batch", "-ex", f"set architecture {arch}",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


def _values(text):
    """gdb's ``$N = V`` lines, in order."""
    return re.findall(r"^\$\d+ = (.*)$", text, re.M)


@pytest.fixture(scope="module")
def guest_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gdb") / "target.asm"
    path.write_text(GUEST)
    return path


def _checkpoint(path, mode):
    """The address of the guest's ``checkpoint`` label, found in the assembled program."""
    prog = assemble_program(str(path), mode, 128 << 20)
    off = prog.code.find(CHECKPOINT_MARK)
    assert off > 0 and prog.code.count(CHECKPOINT_MARK) == 1
    return prog.base + off


def _arch(mode):
    return "i386:x86-64" if mode == "64" else "i386"


@needs_gdb
@pytest.mark.parametrize("mode,mmu", [("32", "shadow"), ("pae", "shadow"), ("64", "shadow"),
                                      ("pae", "native"), ("64", "native")])
def test_gdb_registers_virtual_memory_breakpoint_step_and_write(guest_file, mode, mmu):
    cp = _checkpoint(guest_file, mode)
    guest = Guest(guest_file, mode, "--mmu", mmu, *(["--audit"] if mmu == "shadow" else []))
    out = gdb_batch(guest.port, _arch(mode),
                    "p/x $pc",
                    f"break *{cp:#x}", "continue",
                    "p/x $pc", "p/x $cr3", "p/x $cr0", "p/x $efer",
                    f"p/x *(unsigned int *){MSG_VA:#x}",
                    f"p/x *(unsigned int *){MSG_PA:#x}",
                    "stepi", "p/x $pc", "p/x $eax",
                    f"set var *(unsigned int *){MSG_VA:#x} = 0x42424242",
                    f"p/x *(unsigned int *){MSG_PA:#x}",
                    "continue")
    status, stdout, stderr = guest.finish()
    vals = _values(out)
    assert len(vals) == 10, out
    pc0, pc, cr3, cr0, _efer, via_va, via_pa, pc2, eax, after = vals
    assert int(pc0, 16) == layout.FW_BASE                  # --gdb-wait: before the first insn
    assert int(pc, 16) == cp
    printed = re.search(r"cr3=(0x[0-9a-f]+)", stdout).group(1)
    assert int(cr3, 16) == int(printed, 16)                # the guest's own mov from cr3
    assert int(cr0, 16) & 0x80010001 == 0x80010001         # PG | WP | PE
    assert via_va == via_pa == "0x41414141"               # MSG_VA translated to MSG_PA
    assert int(pc2, 16) == cp + len(CHECKPOINT_MARK) and eax == "0x600dbeef"
    assert after == "0x42424242"                           # written at MSG_VA, landed at MSG_PA
    assert stdout.endswith("BBBB\nPASS\n"), stdout             # the guest printed it
    assert status == 0, stderr


@needs_gdb
@pytest.mark.parametrize("mode,unsync", [("32", "off"), ("pae", "off"), ("64", "off"),
                                         ("64", "on")])
def test_gdb_write_into_a_shadowed_page_table_updates_the_shadow(guest_file, mode, unsync):
    """gdb rewrites the pte of MSG_VA (a page table the shadow MMU write-protects) to point at
    MSG2_PA: the write goes through the pte-write path, so after the guest's invlpg it reads
    the new page ('CCCC') and the audit finds every spte consistent."""
    cp = _checkpoint(guest_file, mode)
    guest = Guest(guest_file, mode, "--audit", "--policy", "kvm", "--unsync", unsync)
    out = gdb_batch(guest.port, _arch(mode),
                    f"break *{cp:#x}", "continue",
                    f"set $pte = *(unsigned int *){PTE_SLOT:#x}",
                    "p/x $pte",
                    f"set var *(unsigned int *)$pte = {MSG2_PA | 3:#x}",
                    f"p/x *(unsigned int *){MSG_VA:#x}",
                    "continue")
    status, stdout, stderr = guest.finish()
    vals = _values(out)
    assert vals[1] == "0x43434343", out                    # gdb's own walk sees the new pte
    assert stdout.endswith("CCCC\nPASS\n") and status == 0, (stdout, stderr)


SPIN = """
# x86shadow: modes=32,pae,64
.include "lib/console.inc"
main:
    xor ecx, ecx
spin:
    inc ecx
    jmp spin
"""


@needs_gdb
@pytest.mark.parametrize("mode", ["pae", "64"])
def test_gdb_attaches_to_a_running_guest_and_kills_it(tmp_path, mode):
    path = tmp_path / "spin.asm"
    path.write_text(SPIN)
    guest = Guest(path, mode, wait=False)
    time.sleep(0.5)                                        # the guest is spinning by now
    out = gdb_batch(guest.port, _arch(mode), "p/x $ecx", "stepi", "p/x $ecx", "kill")
    status, _stdout, stderr = guest.finish()
    a, b = (int(v, 16) for v in _values(out)[:2])
    assert a > 0 and b - a in (0, 1)                       # spinning; one step: one insn
    assert status == 130 and "killed from gdb" in stderr


def test_interrupt_from_gdb_stops_a_running_guest(tmp_path):
    """The protocol's 0x03 while the guest runs (what gdb sends on Ctrl-C): a SIGINT stop."""
    path = tmp_path / "spin.asm"
    path.write_text(SPIN)
    guest = Guest(path, "pae")
    s = socket.create_connection(("127.0.0.1", guest.port), timeout=30)
    try:
        assert _exchange(s, b"QStartNoAckMode") == b"OK"
        s.sendall(g.frame(b"c"))
        time.sleep(0.3)
        s.sendall(b"\x03")
        data = b""
        while b"#" not in data:
            data += s.recv(4096)
        assert data.lstrip(b"+").startswith(b"$S02"), data
        regs = g.x86_registers(32)
        ecx = next(i for i, r in enumerate(regs) if r.name == "ecx")
        assert int.from_bytes(bytes.fromhex(_exchange(s, b"p%x" % ecx).decode()), "little") > 0
        assert _exchange(s, b"D") == b"OK"
    finally:
        s.close()
    # detached: the spinning guest runs on; stop it as a user would
    guest.p.terminate()
    status, _out, _err = guest.finish()
    assert status == 143


@needs_gdb
def test_gdb_hardware_breakpoint_and_crash_stop(tmp_path, guest_file):
    """hbreak (Z1) stops as break does; a guest crash stops with SIGSEGV at the crashing
    instruction, and continuing ends the run with the crash report (status 4)."""
    cp = _checkpoint(guest_file, "32")
    crash = tmp_path / "crash.asm"
    crash.write_text(GUEST.replace("    mov eax, 0x600dbeef\n", "    mov eax, 0x600dbeef\n    ud2\n"))
    guest = Guest(crash, "32")
    out = gdb_batch(guest.port, "i386", f"hbreak *{cp:#x}", "continue", "p/x $pc", "delete",
                    "continue", "p/x $pc", "continue")
    status, _stdout, stderr = guest.finish()
    assert "Hardware assisted breakpoint 1" in out and "SIGSEGV" in out, out
    at_bp, at_crash = (int(v, 16) for v in _values(out))
    assert at_bp == cp and at_crash == cp + len(CHECKPOINT_MARK)          # the ud2
    assert status == 4 and "unhandled #UD" in stderr


HANDLER_MARK = bytes.fromhex("b8ed5eed5e")      # mov eax, 0x5eed5eed

STEP_INTO_FAULT = """
# x86shadow: modes=32,pae,64
.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
main:
    call pt_init
    call idt_init
.if BITS == 64
    lea rax, [rip + ud_handler]
.else
    mov eax, ud_handler
.endif
    mov ecx, 6
    mov edx, GATE_INT0
    call idt_set
    mov eax, 0x600dbeef
    ud2
ud_handler:
    mov eax, 0x5eed5eed
    PASS
    cli
    hlt
"""


@needs_gdb
@pytest.mark.parametrize("mode", ["pae", "64"])
def test_gdb_step_into_an_exception_stops_at_the_handler(tmp_path, mode):
    """stepi over an instruction that raises #UD: the exception is delivered through the
    guest's IDT and the step ends before the handler's first instruction (as a CPU's TF trap
    after delivery)."""
    path = tmp_path / "ud.asm"
    path.write_text(STEP_INTO_FAULT)
    prog = assemble_program(str(path), mode, 128 << 20)
    cp = prog.base + prog.code.find(CHECKPOINT_MARK)
    handler = prog.base + prog.code.find(HANDLER_MARK)
    guest = Guest(path, mode)
    out = gdb_batch(guest.port, _arch(mode), f"break *{cp:#x}", "continue", "delete",
                    "stepi", "p/x $pc", "stepi", "p/x $pc", "stepi", "p/x $pc", "p/x $eax",
                    "continue")
    status, stdout, stderr = guest.finish()
    at_ud2, at_handler, after, eax = _values(out)
    assert int(at_ud2, 16) == cp + len(CHECKPOINT_MARK)
    assert int(at_handler, 16) == handler, out
    assert int(after, 16) == handler + len(HANDLER_MARK) and eax == "0x5eed5eed"
    assert stdout == "PASS\n" and status == 0, stderr


@needs_gdb
@pytest.mark.parametrize("mmu", ["shadow", "native"])
def test_gdb_on_a_multiboot_kernel_stops_at_its_entry_with_the_loaders_state(tmp_path, mmu):
    """A kernel under gdb: --gdb-wait stops in the boot stub (as QEMU's stub stops before the
    firmware); a breakpoint at the kernel's entry sees the multiboot entry state, and memory
    reads reach the multiboot information."""
    from repo_kernels import build_kernel
    from x86shadow.boot.multiboot import load_multiboot
    k = build_kernel("long64", tmp_path)
    entry = load_multiboot(k, 128 << 20, "", None).entry
    p = subprocess.Popen([sys.executable, "-m", "x86shadow.cli", "run", k, "--mmu", mmu,
                          "--gdb", "127.0.0.1:0", "--gdb-wait"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", p.stderr.readline().decode())
    assert m
    out = gdb_batch(int(m.group(1)), "i386:x86-64", f"break *{entry:#x}", "continue",
                    "p/x $pc", "p/x $eax", "p/x $ebx", "p/x *(unsigned int *)0x9500", "continue")
    stdout, stderr = p.communicate(timeout=60)
    vals = _values(out)
    assert vals == [f"{entry:#x}", "0x2badb002", "0x9500", "0x24f"], out
    assert stdout.decode().endswith("PASS\n") and p.returncode == 1, stderr.decode()
