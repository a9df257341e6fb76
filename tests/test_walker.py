"""--tlb walker (cpu/walker.py): Unicorn's own walker over the image of the shadow tables.

Every guest program in every mode it supports runs under tlb="walker" with the audit on and must
leave what the fill adapter (tlb="virtual") leaves -- console output, status, the program's data
-- and the same KVM counters, except where a difference is explained here:

* ``tlb_flush``: the walker carries out a TLB flush the core asked for at the exit that asked
  for it (an invlpg, an I/O exit...: KVM services KVM_REQ_TLB_FLUSH in vcpu_enter_guest before
  every entry); the fill adapter at its next TLB fill, where several requests made meanwhile
  count once. So the walker's count is never lower.
* (Until 2026-12-03 ``ptwrites`` in PAE mode differed: a store to the PAE PDPT in use makes a
  new frame a shadowed page directory inside the trapped store, and the fill adapter kept the
  TLB entry that still mapped it writable until its next fill, so two of the guest's next stores
  into it were not trapped. Both adapters now flush before the guest goes on when the core took
  W away inside a trapped store (VCPU._write_trap, "skip"), as KVM flushes before re-entering;
  the counters are equal.)

Besides: the bad configurations are refused (one line, no traceback), data frames are NX and
code frames not writable in the image (the split the store fast path and the privileged-
instruction scan need), the hardware runs on the shadow root with WP/PAE/NXE forced while the
guest sees its own registers, and the image's sync keeps the hardware's A/D bits."""
import pathlib
import subprocess
import sys

import pytest

from x86shadow import layout
from x86shadow import paging as pg
from x86shadow.asm import assemble_firmware, assemble_program, program_modes
from x86shadow.cpu import walker as walker_mod
from x86shadow.machine import HostConfig, Machine
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spt_image import _present_leaves
from x86shadow.mmu.spte import SPTE_A, SPTE_FRAME, SPTE_NX, SPTE_P, SPTE_W

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAMS = sorted(p for p in (ROOT / "guestcode").glob("*.asm"))
RAM_MIB = 128
SLOW = {"host_churn", "host_code", "host_ksm"}      # a second or more per run

# (program, mode) -> counters that may differ, and how (module docstring): none now
EXPLAINED = {}


def run(path, mode, tlb, policy="kvm", audit=True):
    program = assemble_program(str(path), mode, RAM_MIB << 20)
    m = Machine(mode, mmu="shadow", policy=policy, ram_mib=RAM_MIB, audit=audit, tlb=tlb)
    m.load(program, assemble_firmware(mode, RAM_MIB << 20))
    result = m.run()
    data = m.read_phys(program.base, len(program.code))
    return result, bytes(m.output), data, dict(m.counters), m


def differing_counters(virtual, walker):
    """counter -> (fill adapter's, walker's) where they differ; tlb_flush left out (the walker
    flushes more: its extra flushes are its own)"""
    return {k: (virtual.get(k), walker.get(k)) for k in set(virtual) | set(walker)
            if k != "tlb_flush" and virtual.get(k) != walker.get(k)}


def cases():
    for path in PROGRAMS:
        for mode in ("32", "pae", "64"):
            marks = [pytest.mark.slow] if path.stem in SLOW else []
            yield pytest.param(path, mode, id=f"{path.stem}-{mode}", marks=marks)


@pytest.mark.parametrize("path,mode", list(cases()))
def test_program_same_as_the_fill_adapter(path, mode):
    if mode not in program_modes(path):
        pytest.skip(f"{path.name} does not support mode {mode}")
    v_res, v_out, v_data, v_c, _ = run(path, mode, "virtual")
    w_res, w_out, w_data, w_c, m = run(path, mode, "walker")
    assert v_res.status == 0, v_res.report
    assert w_res.status == v_res.status, f"{w_out!r}\n{w_res.report}"
    assert w_out == v_out
    assert w_data == v_data, "program data differs between the walker and the fill adapter"
    assert m.vcpu._hw_paging, "the run ended without the hardware walking the image"
    assert w_c["tlb_flush"] >= v_c["tlb_flush"]
    explained = EXPLAINED.get((path.stem, mode), ())
    diffs = differing_counters(v_c, w_c)
    for k in explained:
        diffs.pop(k, None)
        assert w_c.get(k, 0) >= v_c.get(k, 0), k
    assert not diffs, f"counters differ (virtual, walker): {diffs}"


@pytest.mark.parametrize("policy", ["xen", "kvm-2008"])
@pytest.mark.parametrize("name,mode", [("ptwrites", "64"), ("fork_cow", "pae"),
                                       ("selfmap", "32")])
def test_other_policies_same_results(policy, name, mode):
    """Other policies: the same results. (kvm-2008's flood detection reads the A bit of the
    last pte it updated, which the hardware sets at a refill: the walker refills after its
    extra flushes, so its flood counts may differ; compared here: the outputs.)"""
    path = ROOT / "guestcode" / f"{name}.asm"
    v = run(path, mode, "virtual", policy)
    w = run(path, mode, "walker", policy)
    assert w[0].status == v[0].status == 0, w[0].report
    assert (w[1], w[2]) == (v[1], v[2])


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_kvm_2008_flood_decisions_read_the_accessed_bits_the_hardware_set(mode):
    """ptwrites refills in the same places under both adapters, so kvm-2008's flood rule (an
    emulated write to the last updated pte counts as a flood only while that spte's A bit is
    clear) must decide the same: the walker merges the A bits the hardware set in the image
    before each exit (Policy.reads_spte_accessed). Without that merge ptwrites 32 and pae flood
    once more than under the fill adapter. (Audit off: the audit merges them at every exit too.)"""
    path = ROOT / "guestcode" / "ptwrites.asm"
    v = run(path, mode, "virtual", "kvm-2008", audit=False)[3]
    w = run(path, mode, "walker", "kvm-2008", audit=False)[3]
    assert v["mmu_flooded"] > 0
    diffs = differing_counters(v, w)
    assert not diffs, f"counters differ (virtual, walker): {diffs}"


# ---------------------------------------------------------------------------------------------
# what the hardware runs on

def _hello(mode):
    return run(ROOT / "guestcode" / "hello.asm", mode, "walker", audit=False)


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_data_frames_are_nx_and_code_frames_not_writable_in_the_image(mode):
    """The split QEMU's store fast path needs (data leaves NX: probe 4g) and the scan needs
    (code leaves without W): fails if the image's per-frame transform is off."""
    res, out, _, _, m = _hello(mode)
    assert res.status == 0 and out.endswith(b"PASS\n")
    v = m.vcpu
    img = v.image
    assert img.frame_kind is v.page_kind
    img.sync()
    kinds = {0: 0, 1: 0}
    for va, sp, idx in _present_leaves(v.mmu.root, v.mmu.root_level):
        e = img._q[sp.spt.slot * 512 + idx]
        gfn = (list.__getitem__(sp.spt, idx) & SPTE_FRAME) >> 12
        kind = v.page_kind.get(gfn, 0)
        if kind == 0:
            assert e & SPTE_NX, f"data page {va:#x}: image entry {e:#x} without NX"
        elif kind == 1:
            assert not e & SPTE_W, f"code page {va:#x}: image entry {e:#x} writable"
            assert not e & SPTE_NX
        kinds[kind if kind in kinds else 1] += 1
    assert kinds[0] and kinds[1], kinds
    assert v.walker_stats["flips_code"] >= 1


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
def test_hardware_registers_are_the_shadow_roots_the_guest_sees_its_own(mode):
    from unicorn.x86_const import UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4
    _, _, _, _, m = _hello(mode)
    v = m.vcpu
    hw_cr3 = v.reg(UC_X86_REG_CR3)
    assert hw_cr3 == v.image.cr3(v.mmu)
    assert layout.SPT_ARENA_BASE <= hw_cr3 < layout.SPT_ARENA_BASE + len(v.image.mem)
    assert v.cr3() == v.mmu.ctx.cr3 != hw_cr3
    assert v.reg(UC_X86_REG_CR4) & walker_mod.CR4_PAE
    assert v.reg(UC_X86_REG_CR0) & walker_mod.CR0_WP
    assert v._read_efer() & walker_mod.EFER_NXE
    if mode == "32":
        assert not v.cr4() & walker_mod.CR4_PAE        # the guest's: a 2-level guest
        assert v.mmu.ctx.mode == pg.Mode.LEGACY
    if mode != "64":
        assert not v.efer() & walker_mod.EFER_NXE or mode == "pae"


# ---------------------------------------------------------------------------------------------
# refused configurations

@pytest.mark.parametrize("kw,what", [
    (dict(mmu="native"), "--mmu shadow"),
    (dict(host=HostConfig()), "host memory"),
])
def test_bad_configurations_are_refused(kw, what):
    with pytest.raises(ValueError, match=what):
        Machine("64", tlb="walker", **kw)


def test_unknown_tlb_modes_are_refused():
    with pytest.raises(ValueError, match="unknown TLB mode"):
        Machine("64", tlb="hardware")


def test_cli_refuses_with_one_line():
    r = subprocess.run([sys.executable, "-m", "x86shadow", "run", str(ROOT / "guestcode" / "hello.asm"),
                        "--mode", "64", "--tlb", "walker", "--host", "swap:5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "host memory" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_runs_a_program_under_the_walker():
    r = subprocess.run([sys.executable, "-m", "x86shadow", "run", str(ROOT / "guestcode" / "hello.asm"),
                        "--mode", "pae", "--tlb", "walker", "--audit"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("PASS\n")


# ---------------------------------------------------------------------------------------------
# the image (mmu/spt_image.py): the split and the hardware's A/D across a sync

def _rig():
    from test_spt_image import LONG, VA, Rig
    g = Rig(LONG)
    g.standard_map()
    g.start()
    return g, VA


def _image_entry(g, sp, idx):
    return g.image._q[sp.spt.slot * 512 + idx]


def test_frame_kind_transform():
    g, va = _rig()
    g.mmu.hw_fill(va, pg.PFERR_W)
    g.image.sync()
    sp, idx = shadow_leaf(g.mmu.root, g.mmu.root_level, va)
    e = _image_entry(g, sp, idx)
    assert e & SPTE_W and not e & SPTE_NX               # no transform: as the spte
    g.image.frame_kind = kinds = {}
    g.image.reencode_all()
    g.image.sync()
    assert _image_entry(g, sp, idx) & SPTE_NX            # data
    gfn = (list.__getitem__(sp.spt, idx) & SPTE_FRAME) >> 12
    kinds[gfn] = 1
    g.image.frame_changed(gfn)
    g.image.sync()
    e = _image_entry(g, sp, idx)
    assert not e & (SPTE_W | SPTE_NX) and e & SPTE_P     # code
    assert g.image.encode_leaf(sp.spt, idx, transform=False) & SPTE_W
    kinds[gfn] = 2
    g.image.frame_changed(gfn)
    g.image.sync()
    assert _image_entry(g, sp, idx) & SPTE_W and not _image_entry(g, sp, idx) & SPTE_NX


def test_sync_keeps_the_hardwares_accessed_bit_of_an_entry_it_re_encodes():
    g, va = _rig()
    g.mmu.hw_fill(va, 0)
    sp, idx = shadow_leaf(g.mmu.root, g.mmu.root_level, va)
    sp.spt[idx] &= ~SPTE_A                               # aged
    g.image.sync()
    assert not _image_entry(g, sp, idx) & SPTE_A
    assert g.image_walk(va, 0, set_ad=True).ok           # the hardware sets A
    assert _image_entry(g, sp, idx) & SPTE_A
    sp.spt[idx] = sp.spt[idx]                            # the core rewrites it (no harvest)
    g.image.sync()
    assert sp.spt[idx] & SPTE_A, "sync dropped the A bit the hardware set"
    assert _image_entry(g, sp, idx) & SPTE_A
    # harvested, then cleared by the core (aging): the sync must not bring it back
    sp.spt[idx] &= ~SPTE_A
    g.image.sync()
    assert g.image_walk(va, 0, set_ad=True).ok
    g.image.harvest_ad()
    assert sp.spt[idx] & SPTE_A
    sp.spt[idx] &= ~SPTE_A
    g.image.sync()
    assert not sp.spt[idx] & SPTE_A and not _image_entry(g, sp, idx) & SPTE_A


@pytest.mark.parametrize("name,mode", [("fork_cow", "64"), ("smc_stores", "pae"),
                                       ("demand_paging", "32")])
def test_counted_instructions_are_the_fill_adapters(name, mode):
    """--max-insns: an instruction restarted after a shadow fault on its data access is not
    counted twice (x86shadow diff compares runs at equal counts)."""
    path = ROOT / "guestcode" / f"{name}.asm"
    counts = []
    for tlb in ("virtual", "walker"):
        program = assemble_program(str(path), mode, RAM_MIB << 20)
        m = Machine(mode, ram_mib=RAM_MIB, tlb=tlb)
        m.load(program, assemble_firmware(mode, RAM_MIB << 20))
        assert m.run(max_insns=10 ** 8).status == 0
        counts.append(m.counters["guest_insns"])
    assert counts[0] == counts[1]


def test_a_budget_that_ends_after_a_restarted_instruction_is_a_runaway():
    """Unicorn's count includes an instruction restarted in place after a shadow fault (it ran
    up to its fault and was counted), so a run under the walker stops there before the budget of
    retired instructions is used up: it must go on, not be taken for a hlt (until 2026-12-04 such
    a --max-insns run ended "hlt", status 0: demand_paging's first restart is near 9870)."""
    path = ROOT / "guestcode" / "demand_paging.asm"
    program = assemble_program(str(path), "pae", RAM_MIB << 20)
    firmware = assemble_firmware("pae", RAM_MIB << 20)
    for n in range(9860, 10060, 20):
        m = Machine("pae", ram_mib=RAM_MIB, tlb="walker")
        m.load(program, firmware)
        r = m.run(max_insns=n)
        assert "runaway" in (r.report or ""), (n, r.status, r.report)
        assert m.counters["guest_insns"] == n
    assert m.vcpu.walker_stats["restarts"] > 0


def test_the_scan_finds_overlapping_candidates_and_skips_cr2_reads():
    # cpu/privileged.py: a candidate consumes only its 0F, so bytes that are one instruction's
    # tail and the next one's start are both found; under the walker mov-from-CR0/CR3/CR4 are
    # candidates, mov-from-CR2 is not (the hardware's CR2 is the guest's)
    from x86shadow.cpu.privileged import candidate_offsets
    pad = bytes(4096)
    assert candidate_offsets(b"\x0f\x20\x0f\x22\xc0" + pad, 64, reads=True) == {0, 2}
    assert candidate_offsets(b"\x0f\x20\x0f\x22\xc0" + pad, 64) == {2}
    assert candidate_offsets(b"\x90\x0f\x20\xd0" + pad, 64, reads=True) == set()     # cr2
    assert candidate_offsets(b"\x90\x0f\x20\xd8" + pad, 64, reads=True) == {1}       # cr3
    assert candidate_offsets(b"\x0f\x01\x0f\x22\xd8" + pad, 64) == {2}


# ---------------------------------------------------------------------------------------------
# several vCPUs: each walks its own plane of the image

SMP = sorted(p for p in PROGRAMS if p.stem.startswith("smp_"))


def smp_run(path, mode, tlb, *, vcpus=3, policy="kvm", schedule=None, audit=True):
    program = assemble_program(str(path), mode, RAM_MIB << 20)
    m = Machine(mode, policy=policy, ram_mib=RAM_MIB, audit=audit, tlb=tlb, vcpus=vcpus,
                schedule=schedule)
    m.load(program, assemble_firmware(mode, RAM_MIB << 20))
    r = m.run()
    return r, bytes(m.output), dict(m.counters), m


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
@pytest.mark.parametrize("path", SMP, ids=lambda p: p.stem)
def test_smp_program_same_as_the_fill_adapter(path, mode):
    """Audit on: the same output, KVM counters (remote flushes included) and interleaving (the
    schedule counts retired instructions, the same under both adapters) as the fill hook."""
    rv, ov, cv, mv = smp_run(path, mode, "virtual")
    rw, ow, cw, m = smp_run(path, mode, "walker")
    assert rv.status == rw.status == 0, rw.report
    assert ow == ov and ow.endswith(b"PASS\n")
    assert not differing_counters(cv, cw), differing_counters(cv, cw)
    assert m.scheduler.stats() == mv.scheduler.stats()
    img = m.vm_mmu.image
    assert len(img.planes) == 3 and [v.image for v in m.vcpus] == [img] * 3
    assert all(v.walker_stats["shadow_pf"] > 0 for v in m.vcpus)
    img.sync()
    assert img.audit() == []


def test_a_random_schedule_interleaves_the_same_under_both_tlb_modes():
    path = ROOT / "guestcode" / "smp_shootdown.asm"
    runs = [smp_run(path, "64", tlb, schedule="random:5:200") for tlb in ("virtual", "walker")]
    (rv, ov, cv, mv), (rw, ow, cw, mw) = runs
    assert rv.status == rw.status == 0 and ow == ov
    assert mv.scheduler.stats() == mw.scheduler.stats()
    assert not differing_counters(cv, cw), differing_counters(cv, cw)


def test_cli_says_the_audit_does_not_check_the_tlbs_under_the_walker():
    r = subprocess.run([sys.executable, "-m", "x86shadow", "run",
                        str(ROOT / "guestcode" / "smp_barrier.asm"), "--mode", "pae",
                        "--vcpus", "2", "--tlb", "walker", "--audit"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("PASS\n")
    assert "does not check the vCPUs' TLBs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("policy", ["xen-oos", "kvm-2008-oos", "kvm-2008"])
def test_smp_unsync_under_other_policies_same_as_the_fill_adapter(policy):
    path = ROOT / "guestcode" / "smp_unsync.asm"
    rv, ov, cv, _ = smp_run(path, "pae", "virtual", policy=policy)
    rw, ow, cw, _ = smp_run(path, "pae", "walker", policy=policy)
    assert rv.status == rw.status == 0 and ow == ov, rw.report
    assert not differing_counters(cv, cw), differing_counters(cv, cw)


def test_each_vcpu_walks_its_own_split_of_code_and_data_frames(tmp_path):
    """The code/data split is per vCPU (its own translated code and privileged-instruction scan):
    a vCPU's plane encodes the frames by its own page_kind. In tests/test_smp.py's cross-
    modifying program vCPU 0 runs code from a page vCPU 1 only stores to: that frame is code
    (not writable) in vCPU 0's plane and data (NX, writable) in vCPU 1's. Fails with one
    shared plane."""
    from test_smp import CROSS_MODIFY
    src = tmp_path / "xmod.asm"
    src.write_text(CROSS_MODIFY)
    r, out, _, m = smp_run(src, "32", "walker", vcpus=2)
    assert r.status == 0 and out == b"first 1 second 1\n"   # (docs/SMP.md: not seen)
    img = m.vm_mmu.image
    img.sync()
    v0, v1 = m.vcpus
    assert img.planes[0].frame_kind is v0.page_kind
    assert img.planes[1].frame_kind is v1.page_kind
    differ = []
    for va, sp, idx in _present_leaves(v0.mmu.root, v0.mmu.root_level):
        gfn = (list.__getitem__(sp.spt, idx) & SPTE_FRAME) >> 12
        j = sp.spt.slot * 512 + idx
        for k, v in enumerate(m.vcpus):
            e = img.planes[k].q[j]
            if v.page_kind.get(gfn, 0) == 0:
                assert e & SPTE_NX, (k, hex(va))
            elif v.page_kind[gfn] == 1:
                assert not e & SPTE_W and not e & SPTE_NX, (k, hex(va))
        if v0.page_kind.get(gfn, 0) == 1 and v1.page_kind.get(gfn, 0) == 0:
            differ.append(va)
            assert img.planes[1].q[j] & SPTE_W and not img.planes[0].q[j] & SPTE_W
    assert differ, "no frame that is code for vCPU 0 and data for vCPU 1"


def test_a_second_plane_is_encoded_and_its_hardware_ad_bits_are_harvested():
    g, va = _rig()
    g.mmu.hw_fill(va, 0)
    sp, idx = shadow_leaf(g.mmu.root, g.mmu.root_level, va)
    sp.spt[idx] &= ~SPTE_A
    img = g.image
    k = img.add_plane({})
    j = sp.spt.slot * 512 + idx
    p0, p1 = img.planes[0].q, img.planes[k].q
    assert p1[j] == p0[j] | SPTE_NX                     # its own split: data
    assert img.audit() == []
    p1[j] |= SPTE_A                                      # plane k's hardware walked it
    assert img.harvest_ad() == 1
    assert sp.spt[idx] & SPTE_A
    img.sync()
    assert p0[j] & SPTE_A and p1[j] & SPTE_A
    assert img.audit() == []


def test_exits_schedule_under_the_walker():
    """``:exits`` ends a slice at each exit the walker's vCPUs take too (a shadow fault in the
    #PF hook included); the programs pass with the audit on."""
    for path in SMP:
        r, out, _, _ = smp_run(path, "pae", "walker", vcpus=2, schedule="random:3:500:exits")
        assert r.status == 0 and out.endswith(b"PASS\n"), r.report
    program = assemble_program(str(SMP[0]), "pae", RAM_MIB << 20)
    m = Machine("pae", ram_mib=RAM_MIB, tlb="walker", vcpus=2, schedule="rr:100000:exits")
    m.load(program, assemble_firmware("pae", RAM_MIB << 20))
    m.scheduler.record = True
    assert m.run().status == 0
    ends = [s.end for s in m.scheduler.slices]
    assert ends.count("exit") > 10, ends
