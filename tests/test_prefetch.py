"""Modern KVM's fault-path prefetch (FNAME(pte_prefetch), Linux 2.6.36 .. 6.x), driven on the
sans-CPU core with plain memory: after a shadow fault on a 4 KiB page, the not-present sptes of
its aligned block of 8 are built from the guest ptes there, up to the first one that may not be
prefetched; the 2008-era policies do not prefetch."""
import pytest

from x86shadow import events as ev
from x86shadow import paging as pg
from x86shadow.mmu.audit import audit
from x86shadow.mmu.shadow_walk import shadow_leaf
from x86shadow.mmu.spte import SPTE_A, SPTE_P, SPTE_W
from x86shadow.mmu.vcpu_mmu import FILL_OK, PTE_PREFETCH_NUM
from x86shadow.mmu.vm_mmu import VmMmu
from x86shadow.policies import make_policy

from pagetables import PWU, Tables

MODES = [pg.Mode.LEGACY, pg.Mode.PAE, pg.Mode.LONG]
VA = 0x0040_0000              # 2 MiB / 4 MiB aligned: entry 0 of its page table
DATA = 0x0030_0000
A, D = pg.PTE_A, pg.PTE_D


def make(mode, policy="kvm", unsync=None):
    t = Tables(mode)
    vm = VmMmu(t.mem, policy=make_policy(policy, unsync))
    vm.events.subscribe(lambda _kind, _fields: audit(vm), (ev.EXIT,))
    return t, vm.add_vcpu()


def start(t, mmu):
    ctx = t.ctx()
    if t.mode == pg.Mode.PAE:
        ctx = pg.PagingContext(t.mode, t.cr3, pdptes=pg.load_pdptes(t.mem, t.cr3))
    mmu.set_context(ctx)


def spte(mmu, va):
    leaf = shadow_leaf(mmu.root, mmu.root_level, va)
    return 0 if leaf is None else leaf[0].spt[leaf[1]]


def present(mmu, pages):
    return [bool(spte(mmu, VA + 0x1000 * i) & SPTE_P) for i in pages]


@pytest.mark.parametrize("mode", MODES)
def test_a_fault_prefetches_its_block_up_to_the_first_unaccessed_gpte(mode):
    t, mmu = make(mode)
    flags = [A, A | D, A, 0, A, A, A, A, A]         # entry 3 not accessed: the prefetch stops there
    for i, f in enumerate(flags):
        t.map(VA + 0x1000 * i, DATA + 0x1000 * i, PWU | f)
    start(t, mmu)
    assert mmu.hw_fill(VA + 0x2000, pg.PFERR_W).kind == FILL_OK       # faults on entry 2
    assert mmu.counters["pf_fixed"] == 1
    # entries 0 and 1 (before it) are built, 3 stops the loop, 4.. 7 are not reached, 8 is in
    # the next block
    assert present(mmu, range(9)) == [True, True, True, False, False, False, False, False, False]
    # speculative sptes: no A bit; W only over a dirty guest pte (protect_clean_gpte)
    s0, s1 = spte(mmu, VA), spte(mmu, VA + 0x1000)
    assert not s0 & SPTE_A and not s0 & SPTE_W and s1 & SPTE_W
    # the guest ptes are untouched (a prefetch is no guest access)
    assert t.rd(t.slot(VA, 1)) & (A | D) == A
    # reading through a prefetched spte takes no exit
    exits = mmu.counters["exits"]
    assert mmu.hw_fill(VA + 0x1000, 0).kind == FILL_OK
    assert mmu.counters["exits"] == exits


@pytest.mark.parametrize("mode", MODES)
def test_a_not_present_gpte_stops_the_prefetch(mode):
    t, mmu = make(mode)
    for i in range(PTE_PREFETCH_NUM):
        t.map(VA + 0x1000 * i, DATA + 0x1000 * i, PWU | A)
    t.wr(t.slot(VA + 0x1000, 1), 0)                   # entry 1 not present
    start(t, mmu)
    mmu.hw_fill(VA + 0x3000, 0)
    # the loop runs from the block's first entry: 0 is built, 1 stops it before 3's neighbours
    assert present(mmu, range(8)) == [True, False, False, True, False, False, False, False]


@pytest.mark.parametrize("mode", [pg.Mode.PAE, pg.Mode.LONG])
def test_a_gpte_with_reserved_bits_stops_the_prefetch(mode):
    t, mmu = make(mode)
    for i in range(PTE_PREFETCH_NUM):
        t.map(VA + 0x1000 * i, DATA + 0x1000 * i, PWU | A)
    slot = t.slot(VA + 0x5000, 1)
    t.wr(slot, t.rd(slot) | pg.PTE_NX)                # NX with EFER.NXE clear: reserved
    start(t, mmu)
    mmu.hw_fill(VA, 0)
    assert present(mmu, range(8)) == [True] * 5 + [False] * 3


@pytest.mark.parametrize("mode", MODES)
def test_prefetch_into_a_shadowed_table_never_unsyncs(mode):
    # a prefetched writable gpte to a frame that is a shadowed page table: the spte gets no W
    # (mmu_try_to_unsync_pages refuses a prefetch), the table stays in sync
    t, mmu = make(mode)
    pt_frame = t.map(VA, DATA, PWU | A) & ~0xFFF
    t.map(VA + 0x1000, pt_frame, PWU | A | D)          # a window onto the page table itself
    start(t, mmu)
    mmu.hw_fill(VA, 0)
    s = spte(mmu, VA + 0x1000)
    assert s & SPTE_P and not s & SPTE_W
    assert not any(sp.unsync for sp in mmu.vm.pages())


@pytest.mark.parametrize("policy", ["kvm-2008", "kvm-2008-oos", "xen"])
def test_older_policies_do_not_prefetch(policy):
    t, mmu = make(pg.Mode.PAE, policy)
    for i in range(PTE_PREFETCH_NUM):
        t.map(VA + 0x1000 * i, DATA + 0x1000 * i, PWU | A | D)
    start(t, mmu)
    mmu.hw_fill(VA, 0)
    assert present(mmu, range(8)) == [True] + [False] * 7


def test_a_guest_large_page_prefetches_consecutive_frames():
    # a 2 MiB guest page is shadowed by a direct page of 4 KiB sptes: __direct_pte_prefetch
    t, mmu = make(pg.Mode.LONG)
    t.map(VA, 0x0060_0000, PWU | A | D, level=2)
    start(t, mmu)
    mmu.hw_fill(VA + 0x9000, 0)                       # block 8..15
    assert present(mmu, range(16)) == [False] * 8 + [True] * 8
    assert spte(mmu, VA + 0xA000) >> 12 & 0xFFFFFFFFFF == 0x60A
