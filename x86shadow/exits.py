"""What a vCPU's ``run_once()`` returns to the VM: a typed exit (KVM_RUN's exit reasons)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from . import events as ev
from .faults import GuestCrash

# KVM's exit reasons (the VMX names kvm_exit prints) for the exits x86shadow takes
REASON_EXCEPTION = "EXCEPTION_NMI"     # a #PF intercepted under shadow paging
REASON_IO = "IO_INSTRUCTION"
REASON_CR = "CR_ACCESS"
REASON_INVLPG = "INVLPG"
REASON_MSR_WRITE = "MSR_WRITE"
REASON_HLT = "HLT"
# an access to an MMIO device's page under --mmu native (Unicorn's own MMU, in the place of EPT):
# KVM exits with EPT_MISCONFIG on an MMIO spte; under shadow paging it is a #PF
# (REASON_EXCEPTION) on an MMIO spte, emulated (handle_mmio_page_fault)
REASON_MMIO = "EPT_MISCONFIG"


def count_exit(counters, events, reason: str, rip, **info) -> None:
    """One exit, the one place that counts it: ``exits`` and, when tracing, a ``kvm_exit``
    event (reason, guest RIP -- a value or a callable read only when tracing --, and the
    reason's qualification: address, error code, port ...), preceded by the ``kvm_entry`` of
    the guest's previous entry (EventBus.guest_runs)."""
    counters["exits"] += 1
    if events.tracing:
        events.guest_runs()
        events.emit(ev.KVM_EXIT, reason=reason, rip=rip() if callable(rip) else rip, **info)
        events.entry_due = True


class ExitKind(enum.Enum):
    HLT = "hlt"                        # hlt with interrupts off: the guest is done
    SYSTEM_EVENT = "system-event"      # a device asked the VM to stop (isa-debug-exit): status
    SHUTDOWN = "shutdown"              # triple fault
    GUEST_CRASH = "guest-crash"        # an exception reached the firmware's crash gate, or the
                                       # guest cannot go on (hlt with interrupts on, task gate ...)
    MMIO = "mmio"                      # an access to a guest-physical address no memslot or
                                       # device backs
    RUNAWAY = "runaway"                # still running after --max-insns
    INTERRUPTED = "interrupted"        # stopped from outside the guest (a signal, a watchdog):
                                       # KVM_RUN's -EINTR; run_once() can be called again
    INTERNAL_ERROR = "internal-error"  # the CPU emulator failed
    DEBUG = "debug"                    # a breakpoint or the end of a single step (KVM_EXIT_DEBUG;
                                       # cpu/guest_debug.py); run_once() can be called again


@dataclass
class Exit:
    kind: ExitKind
    status: int | None = None          # SYSTEM_EVENT
    crash: GuestCrash | None = None    # every other kind but HLT
