"""The fast paths of docs/PERFORMANCE.md keep their behaviour and their cost shape.

Counts, not timings: each test would fail if its fast path broke (the work it saves comes back)
or if the guest saw a difference (the workloads check CR2, the error code and every value)."""
import pytest

from x86shadow import bench as B
from x86shadow.machine import Machine

MODES = ("32", "pae", "64")


def _demand_paging(mode, mmu, n):
    w = B.BY_NAME["demand-paging"]
    return B.run_once(w, mode, mmu, B.assemble(w, mode, n, 128)).counters


@pytest.mark.parametrize("mode", MODES)
def test_guest_pf_from_an_operand_needs_no_tlb_flush(mode):
    """A guest #PF whose byte the decoded operand gives is raised by refusing the fill: no hole
    entry to drop, so no TLB flush per fault and no refill of the handler's pages (the TLB
    fills per fault stay about 2: the retry's shadow fault and the handler's pte write)."""
    small, big = _demand_paging(mode, "shadow", 64), _demand_paging(mode, "shadow", 320)
    faults = big["pf_guest"] - small["pf_guest"]
    assert faults == 256
    assert big["tlb_flush"] - small["tlb_flush"] < faults // 8
    assert big["exception_injections"] - small["exception_injections"] == faults


@pytest.mark.parametrize("mode", MODES)
def test_guest_pf_delivery_is_the_same_in_both_mmus(mode):
    """The batched delivery (one register read, one write, one paging context per delivery)
    gives every fault to the guest's handler in both MMUs: the handler checks CR2 and the error
    code of each (a wrong one fails the workload)."""
    shadow, native = _demand_paging(mode, "shadow", 200), _demand_paging(mode, "native", 200)
    assert shadow["exception_injections"] == native["exception_injections"] >= 200


@pytest.mark.parametrize("mode", ("pae", "64"))
def test_delivery_reads_and_writes_registers_in_batches(mode, monkeypatch):
    """One delivery = one batched read and one batched write of the registers it needs, and
    the frame it pushes holds the interrupted RIP (the handler irets back to it)."""
    from x86shadow.cpu.vcpu import VCPU
    calls = {"read": 0, "write": 0}
    read, write = VCPU.read_regs, VCPU.write_regs

    def counted_read(self, ids):
        calls["read"] += 1
        return read(self, ids)

    def counted_write(self, ids, values):
        calls["write"] += 1
        return write(self, ids, values)
    monkeypatch.setattr(VCPU, "read_regs", counted_read)
    monkeypatch.setattr(VCPU, "write_regs", counted_write)
    c = _demand_paging(mode, "native", 50)
    assert calls["read"] == calls["write"] == c["exception_injections"]


def test_read_regs_matches_single_reads():
    """The batch gives what one read per register gives, 16-bit registers zero-extended."""
    from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CS, UC_X86_REG_EFLAGS,
                                   UC_X86_REG_RSP)
    m = Machine("64", mmu="native")
    v = m.vcpu
    v.set_reg(UC_X86_REG_RSP, 0xFFFF_8000_1234_5678)
    ids = (UC_X86_REG_CS, UC_X86_REG_EFLAGS, UC_X86_REG_RSP, UC_X86_REG_CR0)
    assert v.read_regs(ids) == [v.reg(r) for r in ids]
    v.write_regs((UC_X86_REG_RSP,), (0x7000,))
    assert v.reg(UC_X86_REG_RSP) == 0x7000
    assert v.efer() == v.uc.msr_read(0xC0000080)


# instructions whose #PF is raised by refusing the fill: the guest must see the CR2, error code
# and registers Unicorn's own MMU gives (the reference). The bit-string cases access
# ea + (offset >> (3 + log2 size)) * size, not the operand's address.
_FAULTING = [
    "mov eax, 0x40000010; add dword ptr [eax], ecx",
    "mov eax, 0x4000003d; movzx ebx, word ptr [eax]",
    "mov eax, 0x40000000; mov ecx, 1000; bts dword ptr [eax], ecx",
    "mov eax, 0x40000800; mov ecx, 0xfffff448; bt dword ptr [eax], ecx",
    "mov eax, 0x40000000; mov ecx, 1000; btr word ptr [eax], cx",
    "mov eax, 0x40000100; bts dword ptr [eax], 5",
    "mov edi, 0x3ffffff0; mov ecx, 8; mov eax, 0x11223344; rep stosd",
    "mov eax, 0x3ffffffe; mov dword ptr [eax], 0x55667788",
]


@pytest.mark.parametrize("mode", MODES)
def test_refused_guest_faults_match_the_native_mmu(mode):
    from x86shadow.faultlab import FaultLab
    lab = FaultLab(mode)
    lab.map(0x3FFFF000, 0x0200_0000)       # mapped; 0x40000000.. is not
    for snippet in _FAULTING:
        shadow, native = lab.run(snippet, mmu="shadow"), lab.run(snippet, mmu="native")
        assert shadow.status == native.status == 4, snippet
        got = shadow.report.replace("mmu shadow", "mmu native")
        assert got == native.report, snippet
        assert "#PF" in native.report
