"""Scoped TLB flushes (docs/PERFORMANCE.md): a KVM flush after a change to some leaf sptes is
carried out on Unicorn by dropping just the pages translated through them (QEMU's per-page
flush, cpu/cpustate.py page_flusher), with the same guest-visible result as a whole flush.
Also the read half of a read-modify-write on an out-of-sync (writable) page table, which the
comparison of the two showed faulting needlessly."""
import ctypes
import mmap

import pytest
from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, Ks
from unicorn import (UC_ARCH_X86, UC_HOOK_TLB_FILL, UC_MODE_32, UC_MODE_64, UC_PROT_ALL,
                     UC_TLB_VIRTUAL, Uc, UcError)
from unicorn.x86_const import UC_X86_REG_EBX

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.asm import assemble_firmware, assemble_program
from x86shadow.cpu.cpustate import page_flusher
from x86shadow.machine import Machine
from x86shadow.mmu.audit import audit
from x86shadow.mmu.requests import REQ_TLB_FLUSH, REQ_TLB_FLUSH_SPTES
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import PERM_W, SPTE_A, SPTE_D
from x86shadow.mmu.vcpu_mmu import FILL_OK
from x86shadow import resources

from test_unsync import MODE_IDS, MODES, R, WIN, Guest


# ---------------------------------------------------------------- the per-page flush itself
@pytest.mark.parametrize("bits", [32, 64])
def test_page_flusher_drops_one_page_of_unicorns_tlb(bits):
    size = 0x100000
    buf = mmap.mmap(-1, size)
    uc = Uc(UC_ARCH_X86, UC_MODE_64 if bits == 64 else UC_MODE_32)
    uc.mem_map_ptr(0, size, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    uc.reg_write(UC_X86_REG_EBX, 0x77)
    flush = page_flusher(uc, bits)
    assert flush is not None, "QEMU's CPU state was not found in this Unicorn build"
    assert uc.reg_read(UC_X86_REG_EBX) == 0x77         # the search put the registers back
    fills = []

    def fill(_uc, va, _acc, entry, _ud):
        fills.append(va & ~0xFFF)
        entry.paddr, entry.perms = va & ~0xFFF, UC_PROT_ALL
        return True

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    asm = ("mov eax, [0x10000]; mov eax, [0x11000]; mov eax, [0x12000]; hlt")
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_64 if bits == 64 else KS_MODE_32).asm(asm, 0x1000)[0])
    buf[0x1000:0x1000 + len(code)] = code

    def run():
        fills.clear()
        try:
            uc.emu_start(0x1000, 0x1000 + len(code) - 1)
        except UcError:
            pass
        return sorted(set(fills))

    assert run() == [0x1000, 0x10000, 0x11000, 0x12000]
    assert run() == []                      # all in the TLB
    flush(0x11000)
    assert run() == [0x11000]               # only the flushed page is filled again
    # a flush changes no register
    uc.reg_write(UC_X86_REG_EBX, 0x1234)
    flush(0x10000)
    assert uc.reg_read(UC_X86_REG_EBX) == 0x1234 and run() == [0x10000]


# ---------------------------------------------------------------- the core's requests
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_leaf_spte_change_asks_for_a_scoped_flush_only_when_enabled(mode):
    g = Guest(mode)
    mmu, vm = g.mmu, g.vm
    leaf = shadow_leaf(mmu.root, mmu.root_level, 0x0040_0000)
    assert leaf is not None
    mmu.take_requests()
    vm.drop_spte(*leaf)                      # not enabled: KVM's whole flush, as always
    assert mmu.requests & REQ_TLB_FLUSH and not mmu.requests & REQ_TLB_FLUSH_SPTES
    mmu.take_requests()
    g.fill(0x0040_0000)
    vm.scoped_flushes = True
    leaf = shadow_leaf(mmu.root, mmu.root_level, 0x0040_0000)
    flushes = g.c["remote_tlb_flush"]
    vm.drop_spte(*leaf)
    assert mmu.requests & REQ_TLB_FLUSH_SPTES and not mmu.requests & REQ_TLB_FLUSH
    assert mmu.flush_sptes == [leaf] and g.c["remote_tlb_flush"] == flushes
    # a whole flush already pending covers a later leaf change: nothing is added
    mmu.take_requests()
    mmu.flush_sptes.clear()
    g.fill(0x0040_0000)
    mmu.requests |= REQ_TLB_FLUSH
    vm.drop_spte(*shadow_leaf(mmu.root, mmu.root_level, 0x0040_0000))
    assert mmu.flush_sptes == [] and not mmu.requests & REQ_TLB_FLUSH_SPTES
    # a table (non-leaf spte) dropped: every translation below it goes -> whole flush
    mmu.take_requests()
    node = mmu.root
    if getattr(node, "is_pae_root", False):          # (its entries are never dropped alone)
        node = next(c for c in node.children if c is not None)
    idx = next(i for i, c in enumerate(node.children) if c is not None)
    vm.drop_spte(node, idx)
    assert mmu.requests & REQ_TLB_FLUSH and not mmu.requests & REQ_TLB_FLUSH_SPTES
    # and with a second vCPU the request is KVM's whole flush again
    mmu.take_requests()
    vm.add_vcpu()
    g.fill(0x0040_0000)
    vm.drop_spte(*shadow_leaf(mmu.root, mmu.root_level, 0x0040_0000))
    assert mmu.requests & REQ_TLB_FLUSH


# ---------------------------------------------------------------- read half of an RMW
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_rmw_read_of_an_out_of_sync_table_goes_through_its_writable_spte(mode):
    g = Guest(mode)
    c = g.c
    g.native_store(g.pte_x, 0x0050_0000 | 7 | pg.PTE_A | pg.PTE_D)   # PT goes out of sync
    assert g.leaf.unsync
    win = shadow_leaf(g.mmu.root, g.mmu.root_level, WIN)
    sp, idx = win
    sp.spt[idx] &= ~(SPTE_A | SPTE_D)
    before = dict(c)
    # a `lock btr` on the table: x86 translates its read for writing; the spte is writable,
    # so the translation succeeds (A and D set), no fault, no exit
    r = g.mmu.hw_fill(WIN, R, lambda va: True)
    assert r.kind == FILL_OK and r.perms & PERM_W
    assert sp.spt[idx] & SPTE_A and sp.spt[idx] & SPTE_D
    assert c["exits"] == before["exits"] and c["pf_fixed"] == before["pf_fixed"]
    audit(g.vm)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_rmw_read_of_a_write_protected_table_faults_as_a_write(mode):
    g = Guest(mode)                       # PT shadowed, its WIN spte read-only
    c = g.c
    before = dict(c)
    r = g.mmu.hw_fill(WIN, R, lambda va: True)
    assert c["exits"] == before["exits"] + 1       # the write fault (unsyncs PT under kvm)
    assert r.kind == FILL_OK and r.perms & PERM_W and g.leaf.unsync


# ---------------------------------------------------------------- whole machines, both ways
PROGRAMS = ["ptwrites.asm", "pt_reuse.asm", "fork_cow.asm", "selfmap.asm", "demand_paging.asm"]


def _run(prog, mode, policy, scoped):
    out = bytearray()
    m = Machine(mode, audit=True, policy=policy, scoped_flushes=scoped, serial_out=out.extend)
    fills = []
    m.events.subscribe(lambda _k, f: fills.append(f["va"]), (ev.TLB_FILL,))
    path = resources.guestcode_dir() / prog
    m.load(assemble_program(str(path), mode, 128 << 20), assemble_firmware(mode, 128 << 20))
    r = m.run()
    return r, bytes(out), dict(m.counters), len(fills), m.vm_mmu.scoped_flushes


@pytest.mark.parametrize("mode", ["32", "pae", "64"])
@pytest.mark.parametrize("prog", PROGRAMS)
def test_scoped_flushes_change_nothing_the_guest_or_kvms_counters_see(prog, mode):
    r1, out1, c1, fills1, on = _run(prog, mode, "kvm", True)
    r0, out0, c0, fills0, off = _run(prog, mode, "kvm", False)
    assert on and not off
    assert r1.status == r0.status == 0 and out1 == out0
    assert c1["tlb_flush"] <= c0["tlb_flush"]     # one batch may span exits now (COUNTERS.md)
    for k in ("exits", "pf_fixed", "pf_guest", "mmu_unsync", "invlpg",
              "insn_emulation", "mmu_shadow_zapped"):
        assert c1.get(k) == c0.get(k), k
    assert fills1 <= fills0


def test_scoped_flushes_save_refills_after_emulated_pte_writes():
    _, _, c1, fills1, _ = _run("ptwrites.asm", "64", "kvm-2008", True)
    _, _, c0, fills0, _ = _run("ptwrites.asm", "64", "kvm-2008", False)
    assert c1["insn_emulation"] == c0["insn_emulation"] > 0
    assert fills1 < 0.8 * fills0


def test_scoped_flushes_are_off_with_several_vcpus_and_with_a_host():
    from x86shadow.machine import HostConfig
    assert not Machine("64", vcpus=2).vm_mmu.scoped_flushes
    assert not Machine("64", host=HostConfig()).vm_mmu.scoped_flushes
    assert Machine("64").vm_mmu.scoped_flushes
