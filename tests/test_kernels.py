"""Multiboot kernels (docs/KERNELS.md): the loader, the entry state, the QEMU devices, a kernel's
own mode switches and faults -- the repository's kernels (guestcode/kernels/*.asm, assembled
with keystone and wrapped by boot/elfwriter.py at test time) under the shadow MMU (audit on)
and Unicorn's own MMU, through Machine and through the command."""
import json
import struct
import subprocess
import sys

import pytest

from x86shadow import events as ev
from x86shadow.asm.api import KERNEL_BASE32, assemble_kernel
from x86shadow.boot import multiboot as mb
from x86shadow.boot.elfwriter import multiboot_elf32
from x86shadow.devices.bus import StopRequest
from x86shadow.devices.qemu import BochsShutdown, FwCfg, LocalApic, Pic8259, Uart16550
from x86shadow.machine import Machine
from x86shadow.resources import guestcode_dir

from repo_kernels import build_kernel  # noqa: E402

MMUS = ("shadow", "native")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """name -> path of the ELF built from guestcode/kernels/NAME.asm."""
    d = tmp_path_factory.mktemp("kernels")
    return {name: build_kernel(name, d)
            for name in ("entry_state", "long64", "devices", "cpu_faults")}


def boot(path, mmu, ram_mib=128, append="", initrd=None, trace=None, tlb="virtual"):
    m = Machine.for_kernel(mmu=mmu, ram_mib=ram_mib, audit=mmu == "shadow", trace=trace, tlb=tlb)
    m.load_kernel(mb.load_multiboot(path, ram_mib << 20, append, initrd))
    return m, m.run()


def x86shadow(*args):
    p = subprocess.run([sys.executable, "-m", "x86shadow.cli", *args], capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p


# ---------------------------------------------------------------- the kernels, both MMUs
@pytest.mark.parametrize("mmu", MMUS)
def test_entry_state_and_multiboot_information(kernels, mmu, tmp_path):
    initrd = tmp_path / "initrd.txt"
    initrd.write_bytes(b"module-bytes")
    m, r = boot(kernels["entry_state"], mmu, ram_mib=64, append="x=1 y", initrd=str(initrd))
    out = m.output.decode()
    assert (r.how, r.status) == ("exit", 1), out + r.report       # isa-debug-exit of 0
    lines = out.splitlines()
    assert lines[0] == f"mem_upper={(64 - 1) * 1024}"
    assert lines[1] == f"cmdline={kernels['entry_state']} x=1 y"    # QEMU: "KERNEL ARGS"
    assert lines[2] == "mods=1"
    start = m.kernel.modules[0][0]
    # QEMU: the module list and strings on the page after the kernel, the module on the next
    assert start == mb.page_align(m.kernel.end) + 0x1000
    assert lines[3] == (f"mod0 start={start:#010x} end={start + 12:#010x} name={initrd} "
                        "data=module-bytes")
    mmap = [f"mmap {b:#010x} {n:#010x} {t}" for b, n, t in mb.e820_map(64 << 20)]
    assert lines[4:9] == mmap
    assert lines[9:] == ["loader=x86shadow", "PASS"]


@pytest.mark.parametrize("mmu", MMUS)
def test_entry_state_without_append_or_module(kernels, mmu):
    m, r = boot(kernels["entry_state"], mmu)
    assert r.status == 1, m.output.decode() + r.report
    lines = m.output.decode().splitlines()
    assert lines[1] == f"cmdline={kernels['entry_state']} "        # QEMU's "%s %s" with ""
    assert lines[2] == "mods=0"


@pytest.mark.parametrize("mmu", MMUS)
def test_long64_enters_long_mode_itself(kernels, mmu):
    trace = []
    m, r = boot(kernels["long64"], mmu, trace=lambda k, f: trace.append((k, f)))
    assert r.status == 1, m.output.decode() + r.report
    assert m.output.decode() == ("long64: 32-bit entry\nlong64: 64-bit code\n"
                                 "long64: memory ok\nlong64: apic ok\nPASS\n")
    assert m.vcpu.code_bits() == 64 and m.vcpu.efer() & 0x500 == 0x500
    if mmu == "shadow":
        # the paging mode follows the guest's control registers (KVM kvm_mmu_reset_context):
        # the stub's long mode, paging off for the kernel's entry, the kernel's long mode
        modes = [f["mode"] for k, f in trace if k == ev.NEW_ROOT]
        assert modes[0] == "OFF" and "LONG" in modes
        first_long = modes.index("LONG")
        off_again = modes.index("OFF", first_long)
        assert "LONG" in modes[off_again:]


@pytest.mark.parametrize("name", ("entry_state", "long64", "devices", "cpu_faults"))
def test_kernel_under_the_walker_as_under_the_fill_hook(kernels, name):
    """--tlb walker runs kernels (audit on): their own paging-mode switches, and the xAPIC
    reached through a 4 KiB mapping (long64; MMIO under paging: the vCPU steps that access
    under the fill hook, cpu/walker.py) -- the same output, status and exits as the fill hook."""
    (mv, rv), (mw, rw) = (boot(kernels[name], "shadow", tlb=t) for t in ("virtual", "walker"))
    assert (rw.how, rw.status) == (rv.how, rv.status), mw.output.decode() + rw.report
    assert mw.output == mv.output
    for k in ("exits", "mmio_exits", "io_exits", "pf_fixed", "pf_guest", "exception_injections"):
        assert mw.counters[k] == mv.counters[k], k
    fallbacks = mw.vcpu.walker_stats["fallbacks"]
    if name == "long64":
        # read, write, read back: each one step (the step's TLB entry goes with it)
        assert fallbacks == mw.counters["mmio_exits"] == 3
    else:
        assert fallbacks == 0         # their MMIO runs with paging off (the fill hook's)


def test_boot_stub_tables_stop_being_shadowed_at_the_kernel_entry(kernels):
    m, r = boot(kernels["long64"], "shadow")
    assert r.status == 1
    for gfn in mb.LOADER_TABLES:
        assert not m.vm_mmu.is_shadowed(gfn) and not m.vm_mmu.is_tracked(gfn), hex(gfn)


@pytest.mark.parametrize("mmu", MMUS)
def test_devices(kernels, mmu):
    m, r = boot(kernels["devices"], mmu)
    out = m.output.decode()
    assert (r.how, r.status) == ("exit", 0), out + r.report        # port 0x8900 "Shutdown"
    assert out.splitlines() == ["fw_cfg nb_cpus=1", "fw_cfg ram_size=0x08000000",
                                "apic version=0x00050014", "apic_base=0xfee00900", "PASS"]
    # the kernel makes 6 reads and 6 writes of the xAPIC page: each is an MMIO exit
    assert m.counters["mmio_exits"] == 12
    assert m.apic.eois == 1 and m.apic.ipis == [(0x000C4500, 0x01000000)]


@pytest.mark.parametrize("mmu", MMUS)
def test_cpu_faults_reach_the_kernels_idt(kernels, mmu):
    m, r = boot(kernels["cpu_faults"], mmu)
    assert r.status == 1, m.output.decode() + r.report
    assert m.output.decode().splitlines() == [
        "GP: cr4 bit 25", "GP: cr4 pke", "GP: rdmsr 0x12345678", "GP: wrmsr 0x12345678",
        "GP: efer bit 2", "UD: ud2", "PASS"]


# ---------------------------------------------------------------- the command
@pytest.mark.parametrize("mmu", MMUS)
def test_cli_runs_a_kernel(kernels, mmu, tmp_path):
    initrd = tmp_path / "m"
    initrd.write_text("mod")
    stats, trace = tmp_path / "s.json", tmp_path / "t.jsonl"
    p = x86shadow("run", kernels["entry_state"], "--mmu", mmu, "--append", "a b",
                  "--initrd", str(initrd), "--ram", "32", "--stats-json", str(stats),
                  "--max-insns", "1000000", "--quiet",
                  *(("--audit", "--trace", str(trace)) if mmu == "shadow" else ()))
    assert p.returncode == 1, p.stderr
    assert f"cmdline={kernels['entry_state']} a b\n" in p.stdout
    assert f"mem_upper={31 * 1024}\n" in p.stdout and p.stdout.endswith("PASS\n")
    assert json.loads(stats.read_text())["io_exits"] > 0
    if mmu == "shadow":
        kinds = {json.loads(line)["event"] for line in trace.read_text().splitlines()}
        assert {"kvm_exit", "kvm_pio", "kvm_cr"} <= kinds


def test_cli_devices_kernel_traces_mmio(kernels, tmp_path):
    trace = tmp_path / "t.jsonl"
    p = x86shadow("run", kernels["devices"], "--mmu", "native", "--trace", str(trace))
    assert p.returncode == 0, p.stderr
    mmio = [e for e in map(json.loads, trace.read_text().splitlines())
            if e["event"] == "kvm_mmio"]
    assert len(mmio) == 12
    assert {"rw": "read", "len": 4, "gpa": 0xFEE00030, "val": 0x50014}.items() <= mmio[1].items()


def test_cli_refuses_mode_for_a_kernel(kernels):
    p = x86shadow("run", kernels["long64"], "--mode", "64")
    assert p.returncode == 2 and "x86shadow: error:" in p.stderr and "--mode" in p.stderr


def test_cli_refuses_several_vcpus_for_a_kernel(kernels):
    p = x86shadow("run", kernels["long64"], "--vcpus", "2")
    assert p.returncode == 2 and "x86shadow: error: --vcpus 2" in p.stderr
    assert "one vCPU" in p.stderr and "Traceback" not in p.stderr


def test_cli_program_still_needs_mode_and_refuses_kernel_options(tmp_path):
    src = tmp_path / "p.asm"
    src.write_text("main:\n ret\n")
    p = x86shadow("run", str(src))
    assert p.returncode == 2 and "--mode" in p.stderr
    p = x86shadow("run", str(src), "--mode", "pae", "--append", "x")
    assert p.returncode == 2 and "--append" in p.stderr
    p = x86shadow("run", str(src), "--mode", "pae", "--initrd", str(src))
    assert p.returncode == 2 and "--initrd" in p.stderr


def test_cli_missing_initrd(kernels, tmp_path):
    p = x86shadow("run", kernels["entry_state"], "--initrd", str(tmp_path / "none"))
    assert p.returncode == 2 and "--initrd" in p.stderr and "No such file" in p.stderr


def test_cli_ram_too_small_for_the_kernel(tmp_path):
    segs = assemble_kernel(guestcode_dir() / "kernels" / "long64.asm")
    big = tmp_path / "big.elf"
    big.write_bytes(multiboot_elf32(segs, KERNEL_BASE32, bss=8 << 20))
    p = x86shadow("run", str(big), "--ram", "4")
    assert p.returncode == 2 and "outside guest RAM" in p.stderr and "--ram" in p.stderr
    p = x86shadow("run", str(big), "--ram", "1")
    assert p.returncode == 2 and "--ram 1" in p.stderr


@pytest.mark.parametrize("kw,message", [
    ({"mb_checksum": 1}, "bad checksum"),
    ({"mb_flags": mb.HDR_VIDEO_MODE}, "video mode"),
    ({"mb_flags": mb.HDR_AOUT_KLUDGE}, "load addresses"),
])
def test_cli_refuses_bad_headers(tmp_path, kw, message):
    segs = assemble_kernel(guestcode_dir() / "kernels" / "long64.asm")
    bad = tmp_path / "bad.elf"
    bad.write_bytes(multiboot_elf32(segs, KERNEL_BASE32, **kw))
    p = x86shadow("run", str(bad))
    assert p.returncode == 2 and message in p.stderr, p.stderr


def test_cli_refuses_an_elf_without_multiboot_header(tmp_path):
    data = bytearray(multiboot_elf32([(KERNEL_BASE32, b"\xf4")], KERNEL_BASE32))
    at = data.find(struct.pack("<I", mb.MB_HEADER_MAGIC))
    data[at:at + 4] = bytes(4)
    f = tmp_path / "plain.elf"
    f.write_bytes(bytes(data))
    p = x86shadow("run", str(f))
    assert p.returncode == 2 and "multiboot header" in p.stderr


# ---------------------------------------------------------------- the loader, without a CPU
def _info(kernel):
    images = dict(kernel.images)
    return images[mb.ADDR_MBI], images


def test_loader_places_the_information_as_qemu(tmp_path):
    f = tmp_path / "k.elf"
    f.write_bytes(multiboot_elf32([(0x400000, b"\x90" * 10)], 0x400000, bss=0x5000))
    mod = tmp_path / "mod"
    mod.write_bytes(b"M" * 5000)
    k = mb.load_multiboot(str(f), 32 << 20, "console=ttyS0", str(mod))
    info, images = _info(k)
    flags, lower, upper, bootdev, cmdline, count, mods = struct.unpack_from("<7I", info)
    assert (flags, lower, upper, bootdev) == (0x24F, 639, 31 * 1024, 0x8000FFFF)
    end = 0x400000 + 10 + 0x5000
    assert mods == mb.page_align(end) and count == 1
    block = images[mods]
    start, stop, name_at, _ = struct.unpack_from("<4I", block)
    assert start == mb.page_align(mods + len(block)) and stop == start + 5000
    assert images[start] == b"M" * 5000

    def cstr(addr):
        off = addr - mods
        return block[off:block.index(b"\0", off)].decode()
    assert cstr(name_at) == str(mod)
    assert cstr(cmdline) == f"{f} console=ttyS0"
    assert cstr(struct.unpack_from("<I", info, 64)[0]) == "x86shadow"
    length, addr = struct.unpack_from("<II", info, 44)
    assert addr == 0x9000 and length == 5 * 24
    assert images[0x9000][:24] == struct.pack("<IQQI", 20, 0, 0x9FC00, 1)
    assert k.zero == ((0x40000A, 0x5000),)


@pytest.mark.parametrize("paddr,message", [(0x8000, "loader's own area"),
                                           (0x1F00000, "outside guest RAM")])
def test_loader_refuses_segments_it_cannot_place(tmp_path, paddr, message):
    f = tmp_path / "k.elf"
    f.write_bytes(multiboot_elf32([(paddr, b"\x90" * 0x200000)], paddr))
    with pytest.raises(ValueError, match=message):
        mb.load_multiboot(str(f), 32 << 20)


def test_loader_refuses_an_entry_outside_its_segments(tmp_path):
    f = tmp_path / "k.elf"
    f.write_bytes(multiboot_elf32([(0x400000, b"\x90")], 0x500000))
    with pytest.raises(ValueError, match="entry point"):
        mb.load_multiboot(str(f), 32 << 20)


def test_machine_with_a_mode_refuses_a_kernel(tmp_path):
    f = tmp_path / "k.elf"
    f.write_bytes(multiboot_elf32([(0x400000, b"\xf4")], 0x400000))
    with pytest.raises(ValueError, match="mode None"):
        Machine("64", mmu="native").load_kernel(mb.load_multiboot(str(f), 128 << 20))


# ---------------------------------------------------------------- the devices, without a CPU
def test_uart_keeps_its_registers_and_the_divisor_latch():
    out = bytearray()
    u = Uart16550(0x3F8, out.extend)
    u.write(0x3FB, 1, 0x83)                              # DLAB
    u.write(0x3F8, 1, 0x01)
    u.write(0x3F9, 1, 0x02)
    assert (u.read(0x3F8, 1), u.read(0x3F9, 1)) == (0x01, 0x02) and out == b""
    u.write(0x3FB, 1, 0x03)
    u.write(0x3F8, 1, ord("A"))
    u.write(0x3F9, 1, 0xFF)
    assert out == b"A" and u.read(0x3F9, 1) == 0x0F and u.read(0x3FD, 1) == 0x60
    u.write(0x3FF, 1, 0x77)
    assert u.read(0x3FF, 1) == 0x77 and u.read(0x3FA, 1) == 0x01


def test_fw_cfg_items_are_byte_streams():
    f = FwCfg(128 << 20, 1)
    f.write(0x510, 2, 0)
    assert bytes(f.read(0x511, 1) for _ in range(5)) == b"QEMU\0"
    f.write(0x510, 2, 3)
    assert f.read(0x511, 4) == 0x08000000 and f.read(0x511, 4) == 0
    f.write(0x510, 2, 5)
    assert f.read(0x511, 2) == 1
    f.write(0x510, 2, 0x7777)
    assert f.read(0x511, 4) == 0
    with pytest.raises(ValueError):
        FwCfg(1 << 20, 0)


def test_pic_initialisation_then_mask():
    p = Pic8259(0x20)
    p.write(0x20, 1, 0x11)
    for icw in (0x20, 0x04, 0x01):
        p.write(0x21, 1, icw)
    assert p.vector_base == 0x20 and p.imr == 0
    p.write(0x21, 1, 0xFD)
    assert p.read(0x21, 1) == 0xFD


def test_bochs_shutdown_needs_the_whole_word():
    s = BochsShutdown()
    assert [s.write(0x8900, 1, b) for b in b"Shut"] == [None] * 4
    assert s.write(0x8900, 1, ord("x")) is None
    results = [s.write(0x8900, 1, b) for b in b"Shutdown"]
    assert results[-1] == StopRequest(0) and results[:-1] == [None] * 7


def test_apic_icr_delivery_status_reads_clear_and_apic_base_msr():
    a = LocalApic()
    a.write(0xFEE00300, 4, 0x4500 | (1 << 12))
    assert a.read(0xFEE00300, 4) == 0x4500
    a.write(0xFEE00020, 4, 0x5000000)                    # ID is read-only
    assert a.read(0xFEE00020, 4) == 0 and a.read(0xFEE00030, 4) == 0x50014
    assert a.read(0xFEE00360, 4) == 0x10000               # LVT reset value: masked
    msr = a.msr()
    assert msr.read() == 0xFEE00900
    msr.write(0)
    assert msr.read() == 0xFEE00100                       # disabled; base and BSP stay
    msr.write(0xFEE00900)
    assert msr.read() == 0xFEE00900
