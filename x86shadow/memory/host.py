"""The host under the guest: host physical pages, the VM process's page table over guest RAM,
and the host memory manager (the "Linux mm" of the model) that swaps, migrates, merges and
unmaps those pages behind the guest's back, calling the MMU notifiers as Linux does.

* **Host pages** (``HostPages``): the buffer Unicorn maps as its physical memory. The first
  ``ram_frames`` pages back guest RAM at the start (pfn == gfn); the pages after them are spare
  host memory the host allocates from. Every page has an owner tag (the VM page it backs, a KSM
  page, or free). A freed page is poisoned (filled with ``PAGE_POISON``, Linux's page-poisoning
  byte) and checked when it is handed out again, at every host event and at the end of the run:
  a write through a TLB entry that outlived its page is found there, every time
  (``HostViolation``).
* **The VM process's page table** (``HostMM``): guest RAM is one anonymous mapping of the VMM at
  ``HVA_BASE`` (QEMU's RAM block); the memslots map gfns into it. A page of it is present
  (pfn, writable or read-only), swapped out (its contents in the swap store) or unmapped.
  Identity by default, kept as overrides, so a 64 GiB guest costs nothing until the host acts.
* **Operations** (each calls the notifiers in the order the Linux of the chosen era does; see
  docs/HOST_MEMORY.md): ``swap_out`` (try_to_unmap_one + writeback), swap-in on the next access
  (``hva_to_pfn``), ``migrate`` (try_to_migrate), ``ksm_merge`` (write_protect_page +
  replace_page), copy-on-write break of a KSM page on a write, ``munmap`` (zap_page_range) and
  ``release`` (exit_mmap).

A page is freed only after the notifier call that unmapped it has returned (Linux: the caller
holds its reference until then). Whether every secondary TLB entry was gone by then is the MMU's
job (the flush rule, mmu/notifiers.py); the poison check catches it when it was not.
"""
from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from ..events import HOST_OP, HOST_TIMING, MMU_NOTIFIER
from ..steps import Step, run_steps

PAGE = 4096
PAGE_POISON = 0xAA                   # include/linux/poison.h PAGE_POISON
_POISON_PAGE = bytes([PAGE_POISON]) * PAGE
_ZERO_PAGE = bytes(PAGE)
HVA_BASE = 0x7F00_0000_0000          # where the VMM's guest RAM mapping starts (QEMU-like)
RECENT_FREES = 64                    # freed pages the check after every host event looks at

ERAS = ("2008", "modern")            # the mm / notifier API of Linux 2.6.27 or of Linux 6.x

# host pte states (overrides of the identity mapping)
_SWAPPED = -1
_UNMAPPED = -2


class HostViolation(Exception):
    """The host found memory it freed written, or a page freed while a TLB may still map it:
    the flush-before-free rule was broken. Ends the run with exit status 6."""

    def __init__(self, what: str, where: str, when: str):
        super().__init__(f"{what}: {where} ({when})")
        self.what, self.where, self.when = what, where, when


class HostFault(Exception):
    """An access to guest RAM whose host memory is gone (munmap, release): KVM's -EFAULT."""


class Pfn(NamedTuple):
    pfn: int
    writable: bool


def _first_difference(page: bytes, expect: bytes) -> int:
    for i in range(0, PAGE, 8):
        if page[i:i + 8] != expect[i:i + 8]:
            for j in range(i, i + 8):
                if page[j] != expect[j]:
                    return j
    return -1


class HostPages:
    """Host physical pages over ``phys`` (a memory.ram.PhysMem): owners, the free list, poison.

    The free list is LIFO (the most recently freed page is handed out first, as Linux's per-cpu
    page lists do), so a freed page is reused soon. Spare pages never used are still zero
    (nothing touches them until they are handed out)."""

    def __init__(self, phys, ram_frames: int):
        self.phys = phys
        self.npages = phys.size // PAGE
        if self.npages <= ram_frames:
            raise ValueError("host memory must have spare pages beyond guest RAM")
        self.ram_frames = ram_frames
        self.owner: dict = {}                 # pfn -> tag; absent: pfn < ram_frames -> VM page
                                              # pfn (identity), else free
        self.free = list(range(self.npages - 1, ram_frames - 1, -1))   # pop() -> lowest first
        self.fresh = set(self.free)           # never used: still zero
        self.freed = set()                    # free and poisoned
        self.recent = deque(maxlen=RECENT_FREES)  # the pages freed last (the per-event check)
        self.clock = None                     # () -> str: "when" for reports (set by the VM)
        self.on_free = None                   # (pfn, tag) -> None: the TLB check of the audit
        self.rewritten = set()                # pfns whose contents the host replaced (the CPU
                                              # adapter drops translated code of these)
        self.allocs = 0

    def when(self) -> str:
        return self.clock() if self.clock is not None else "now"

    def owner_of(self, pfn: int):
        tag = self.owner.get(pfn, _NONE)
        if tag is _NONE:
            return pfn if pfn < self.ram_frames else None
        return tag

    def describe(self, pfn: int) -> str:
        tag = self.owner_of(pfn)
        if tag is None:
            who = "free"
        elif isinstance(tag, tuple):
            who = f"KSM page shared by {tag[1]} guest page(s)"
        else:
            who = f"guest RAM page {tag:#x} (hva {HVA_BASE + tag * PAGE:#x})"
        return f"host page {pfn:#x} ({who})"

    def alloc(self, tag) -> int:
        if not self.free:
            raise MemoryError("the host ran out of spare pages (swap something out first)")
        pfn = self.free.pop()
        base = pfn * PAGE
        page = self.phys.mv[base:base + PAGE]
        if pfn in self.fresh:
            self.fresh.discard(pfn)
            expect = _ZERO_PAGE
        else:
            self.freed.discard(pfn)
            expect = _POISON_PAGE
        if page != expect:
            off = _first_difference(bytes(page), expect)
            raise HostViolation(
                "a freed host page was written after it was freed",
                f"host page {pfn:#x}, byte {off:#x} holds {page[off]:#04x} instead of the "
                f"poison {expect[off]:#04x}", f"found when the host reused it, {self.when()}")
        self.owner[pfn] = tag
        self.allocs += 1
        return pfn

    def release_page(self, pfn: int) -> None:
        """__free_page: poison it and put it on the free list."""
        tag = self.owner_of(pfn)
        if tag is None:
            raise RuntimeError(f"host page {pfn:#x} freed twice")
        if self.on_free is not None:
            self.on_free(pfn, tag)
        base = pfn * PAGE
        self.phys.mv[base:base + PAGE] = _POISON_PAGE
        self.rewritten.add(pfn)
        self.owner[pfn] = None
        self.free.append(pfn)
        self.freed.add(pfn)
        self.recent.append(pfn)

    def check_free_pages(self, recent_only: bool = False) -> None:
        """Every freed page still holds nothing but poison (HostViolation otherwise).
        ``recent_only``: the pages freed last (``RECENT_FREES``), the ones a TLB entry that
        outlived its page can still reach -- the cheap check after every host event; every page
        is checked at the end of the run and when it is handed out again."""
        mv = self.phys.mv
        pages = sorted(set(self.recent) & self.freed) if recent_only else sorted(self.freed)
        for pfn in pages:
            base = pfn * PAGE
            if mv[base:base + PAGE] != _POISON_PAGE:
                page = bytes(mv[base:base + PAGE])
                off = _first_difference(page, _POISON_PAGE)
                raise HostViolation(
                    "a freed host page was written after it was freed",
                    f"host page {pfn:#x}, byte {off:#x} holds {page[off]:#04x} instead of the "
                    f"poison {PAGE_POISON:#04x}", f"found by the free-page check, {self.when()}")

    def copy(self, dst: int, src: int) -> None:
        mv = self.phys.mv
        mv[dst * PAGE:dst * PAGE + PAGE] = mv[src * PAGE:src * PAGE + PAGE]
        self.rewritten.add(dst)

    def read_page(self, pfn: int) -> bytes:
        return bytes(self.phys.mv[pfn * PAGE:pfn * PAGE + PAGE])

    def write_page(self, pfn: int, data: bytes) -> None:
        self.phys.mv[pfn * PAGE:pfn * PAGE + PAGE] = data
        self.rewritten.add(pfn)


_NONE = object()


class HostMM:
    """The VMM process's memory over guest RAM, and what the host does to it.

    ``notifiers``: the registered MMU notifiers (KVM's, mmu/notifiers.py), called with the API of
    ``era`` ("2008": Linux 2.6.27's invalidate_page / range start-end / clear_flush_young;
    "modern": range start-end around every unmap, clear_young). ``counters``: the VM's."""

    def __init__(self, pages: HostPages, npages: int, era: str = "modern", counters=None,
                 events=None):
        if era not in ERAS:
            raise ValueError(f"unknown notifier era {era!r} (choose from {', '.join(ERAS)})")
        self.pages = pages
        self.npages = npages                  # pages of the guest RAM mapping
        self.era = era
        self.pt: dict = {}                    # page index -> pfn, _SWAPPED or _UNMAPPED
        self.readonly = set()                 # page indexes mapped read-only (KSM)
        self.swap: dict = {}                  # page index -> bytes (the swap store)
        self.ksm_refs: dict = {}              # KSM pfn -> number of page indexes mapping it
        self.notifiers = []
        self.counters = counters if counters is not None else {}
        self.events = events
        self.released = False

    # ------------------------------------------------------------------ the page table
    def hva(self, index: int) -> int:
        return HVA_BASE + index * PAGE

    def index_of(self, hva: int) -> int:
        return (hva - HVA_BASE) // PAGE

    def current(self, index: int):
        """The pfn mapped at page ``index`` now (None: swapped out or unmapped); no fault."""
        p = self.pt.get(index, index)
        return p if p >= 0 else None

    def peek_page(self, index: int) -> bytes:
        """The contents of page ``index`` without faulting it in (swap store if swapped out)."""
        p = self.pt.get(index, index)
        if p >= 0:
            return self.pages.read_page(p)
        if p == _SWAPPED and index in self.swap:
            return self.swap[index]
        if p == _SWAPPED:                       # (mid-migration: the old page is still there)
            raise HostFault(f"guest RAM page {index:#x} is being migrated")
        raise HostFault(f"guest RAM page {index:#x} (hva {self.hva(index):#x}) is not mapped "
                        "in the host")

    def is_writable(self, index: int) -> bool:
        return index not in self.readonly

    def hva_to_pfn(self, index: int, write: bool = False, atomic: bool = False):
        """hva_to_pfn (get_user_pages): the page at ``index``, faulted in if it was swapped out,
        copied if it is a KSM page and ``write``. ``atomic`` (KVM's gfn_to_pfn_atomic): no fault,
        None if it is not present. Returns Pfn(pfn, writable). HostFault if it is unmapped."""
        p = self.pt.get(index, index)
        if p == _UNMAPPED or self.released:
            raise HostFault(f"guest RAM page {index:#x} (hva {self.hva(index):#x}) is not mapped "
                            "in the host")
        if p == _SWAPPED:
            if atomic:
                return None
            p = self._swap_in(index)
        if index in self.readonly:
            if write and not atomic:
                p = self._cow_break(index, p)
                return Pfn(p, True)
            return Pfn(p, False)
        return Pfn(p, True)

    # ------------------------------------------------------------------ notifier calls
    def _invalidate_page(self, index):
        self._trace_notifier("invalidate_page", hva=self.hva(index))
        t0 = self._timing()
        for n in self.notifiers:
            n.invalidate_page(self.hva(index))
        self._timed("notifier", t0)

    def _range_start(self, start, end):
        self._trace_notifier("invalidate_range_start", start=self.hva(start), end=self.hva(end))
        t0 = self._timing()
        for n in self.notifiers:
            n.invalidate_range_start(self.hva(start), self.hva(end))
        self._timed("notifier", t0)

    def _range_end(self, start, end):
        self._trace_notifier("invalidate_range_end", start=self.hva(start), end=self.hva(end))
        t0 = self._timing()
        for n in self.notifiers:
            n.invalidate_range_end(self.hva(start), self.hva(end))
        self._timed("notifier", t0)

    def _unmap_one(self, index, new_state, body=None):
        """Take page ``index`` away from the VM process as the era's try_to_unmap_one does:
        2.6.27 clears the pte, then ``invalidate_page`` (ptep_clear_flush_notify); 6.x brackets
        the pte change with ``invalidate_range_start``/``end``. ``body()`` runs where the new pte
        is written (inside the bracket in 6.x)."""
        run_steps(self._unmap_one_steps(index, new_state, body))

    def _unmap_one_steps(self, index, new_state, body=None):
        """_unmap_one as a stepped actor (x86shadow/steps.py): one step per notifier call (and
        in 6.x the pte change between them)."""
        if self.era == "2008":
            yield Step(f"host: clear the pte of hva {self.hva(index):#x}, invalidate_page")
            self.pt[index] = new_state
            self._invalidate_page(index)
            if body is not None:
                body()
            return
        yield Step(f"host: invalidate_range_start hva {self.hva(index):#x}")
        self._range_start(index, index + 1)
        yield Step(f"host: change the pte of hva {self.hva(index):#x}")
        self.pt[index] = new_state
        if body is not None:
            body()
        yield Step(f"host: invalidate_range_end hva {self.hva(index):#x}")
        self._range_end(index, index + 1)

    def _timing(self):
        """perf_counter now if someone observes host timings (events.HOST_TIMING), else None."""
        ev = self.events
        return time.perf_counter() if ev is not None and HOST_TIMING in ev.subs else None

    def _timed(self, part, t0):
        if t0 is not None:
            self.events.emit(HOST_TIMING, part=part, seconds=time.perf_counter() - t0)

    def _count(self, name):
        self.counters[name] = self.counters.get(name, 0) + 1

    def _trace(self, op, **fields):
        if self.events is not None and self.events.tracing:
            self.events.emit(HOST_OP, op=op, **fields)

    def _trace_notifier(self, name, **fields):
        if self.events is not None and self.events.tracing:
            self.events.emit(MMU_NOTIFIER, notifier=name, **fields)

    # ------------------------------------------------------------------ operations
    def clear_flush_young(self, index) -> bool:
        self._trace_notifier("clear_flush_young", start=self.hva(index),
                             end=self.hva(index + 1))
        young = False
        for n in self.notifiers:
            young |= n.clear_flush_young(self.hva(index), self.hva(index + 1))
        return young

    def swap_out(self, index: int, honour_young: bool = False) -> bool:
        """Reclaim one page (shrink_page_list -> try_to_unmap_one -> pageout -> free). With
        ``honour_young`` the page is first aged (``clear_flush_young``; 2.6.27 try_to_unmap_one
        returns SWAP_FAIL for a young page) and kept if young; without it the page goes
        regardless (MADV_PAGEOUT). Returns True if the page was swapped out."""
        return run_steps(self.swap_out_steps(index, honour_young))

    def swap_out_steps(self, index: int, honour_young: bool = False):
        """swap_out as a stepped actor (the interleaving explorer runs it against the MMU):
        the unmap's notifier calls, then the writeback and the free, one step each."""
        pfn = self.current(index)
        if pfn is None or index in self.readonly:
            return False                            # (KSM pages are not swapped here)
        t0 = self._timing()
        if honour_young and self.clear_flush_young(index):
            self._count("host_swap_young")
            self._timed("op", t0)
            return False
        self._count("host_swap_out")
        self._trace("swap_out", hva=self.hva(index), pfn=pfn)
        # the contents are in the swap store from the pte change on (shrink_page_list puts the
        # page in the swap cache, add_to_swap, before try_to_unmap), so a fault between the
        # unmap and the free swaps them in
        yield from self._unmap_one_steps(
            index, _SWAPPED, lambda: self.swap.__setitem__(index, self.pages.read_page(pfn)))
        yield Step(f"host: free host page {pfn:#x} (after the notifier returned)")
        self.pages.release_page(pfn)
        self._timed("op", t0)
        return True

    def _swap_in(self, index: int) -> int:
        """do_swap_page: a new page with the swapped contents; no notifier (nothing was mapped)."""
        t0 = self._timing()
        pfn = self.pages.alloc(index)
        self.pages.write_page(pfn, self.swap.pop(index))
        self.pt[index] = pfn
        self._count("host_swap_in")
        self._trace("swap_in", hva=self.hva(index), pfn=pfn)
        self._timed("swap_in", t0)
        return pfn

    def migrate(self, index: int) -> bool:
        """Move page ``index`` to another host page (compaction, NUMA): unmap with migration
        entries (the notifier), copy, map the new page, free the old one (migrate_pages)."""
        old = self.current(index)
        if old is None or index in self.readonly:
            return False
        t0 = self._timing()
        new = self.pages.alloc(index)
        self._count("host_migrate")
        self._trace("migrate", hva=self.hva(index), old_pfn=old, new_pfn=new)
        self._unmap_one(index, _SWAPPED)          # a migration entry: a fault would wait
        self.pages.copy(new, old)
        self.pt[index] = new
        self.pages.release_page(old)
        self._timed("op", t0)
        return True

    def ksm_merge(self, indexes) -> int:
        """Merge pages of identical contents into one read-only KSM page (try_to_merge_one_page:
        write_protect_page, then replace_page for each duplicate). Returns the pages freed."""
        groups: dict = {}
        for index in indexes:
            pfn = self.current(index)
            if pfn is None or index in self.readonly:
                continue
            groups.setdefault(self.pages.read_page(pfn), []).append(index)
        freed = 0
        for content, members in groups.items():
            if len(members) < 2:
                continue
            first = members[0]
            kpfn = self.current(first)
            # write_protect_page: the first page becomes the stable KSM page
            self._unmap_one(first, kpfn, lambda f=first: self.readonly.add(f))
            self.pages.owner[kpfn] = ("ksm", 1)
            self.ksm_refs[kpfn] = 1
            for index in members[1:]:
                old = self.current(index)
                if self.pages.read_page(old) != content:       # changed meanwhile: skip
                    continue
                # replace_page: the duplicate's pte now maps the KSM page, read-only
                self._unmap_one(index, kpfn, lambda i=index: self.readonly.add(i))
                self.ksm_refs[kpfn] += 1
                self.pages.owner[kpfn] = ("ksm", self.ksm_refs[kpfn])
                self.pages.release_page(old)
                freed += 1
            self._count("host_ksm_merge")
            self._trace("ksm_merge", pfn=kpfn, pages=self.ksm_refs[kpfn],
                        hva=self.hva(first))
        return freed

    def _cow_break(self, index: int, kpfn: int) -> int:
        """do_wp_page on a KSM page: copy it, map the copy writable (the notifier around the pte
        change), drop the KSM page's reference (freed when it was the last)."""
        new = self.pages.alloc(index)
        self.pages.copy(new, kpfn)
        self._count("host_cow_break")
        self._trace("cow_break", hva=self.hva(index), old_pfn=kpfn, new_pfn=new)

        def remap():
            self.readonly.discard(index)
            self.pt[index] = new
        self._unmap_one(index, _SWAPPED, remap)    # (the pte is cleared, then the copy mapped)
        self._put_ksm(kpfn)
        return new

    def _put_ksm(self, kpfn):
        n = self.ksm_refs[kpfn] - 1
        if n:
            self.ksm_refs[kpfn] = n
            self.pages.owner[kpfn] = ("ksm", n)
        else:
            del self.ksm_refs[kpfn]
            self.pages.release_page(kpfn)

    def _drop_mapping(self, index):
        """Remove page ``index``'s pte for good (zap_pte_range): free or put its page."""
        p = self.pt.get(index, index)
        self.pt[index] = _UNMAPPED
        self.swap.pop(index, None)
        if p < 0:
            return
        if index in self.readonly:
            self.readonly.discard(index)
            self._put_ksm(p)
        else:
            self.pages.release_page(p)

    def munmap(self, start: int, end: int) -> None:
        """munmap of guest RAM pages [start, end) (unmap_vmas / zap_page_range): range_start, the
        ptes go and their pages are freed, range_end -- safe because range_start already zapped
        and flushed, and new sptes are refused until range_end."""
        t0 = self._timing()
        self._count("host_munmap")
        self._trace("munmap", start=self.hva(start), end=self.hva(end))
        self._range_start(start, end)
        for index in range(start, end):
            self._drop_mapping(index)
        self._range_end(start, end)
        self._timed("op", t0)

    def release(self) -> None:
        """The VMM process exits (exit_mmap): ``release`` first, then every mapping goes."""
        self._trace("release")
        self._trace_notifier("release")
        for n in self.notifiers:
            n.release()
        self.munmap(0, self.npages)
        self.released = True
