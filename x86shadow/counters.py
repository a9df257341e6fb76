"""The counters of ``--stats-json`` (docs/COUNTERS.md: KVM's debugfs names where the event is the
same), one dict per VM. Each is incremented by the code path it names."""
from __future__ import annotations

COUNTER_NAMES = (
    "exits", "pf_taken", "pf_fixed", "pf_guest", "pf_emulate", "invlpg", "tlb_flush",
    "insn_emulation", "insn_emulation_fail", "io_exits", "mmio_exits", "halt_exits", "irq_injections",
    "exception_injections",
    "mmu_shadow_zapped", "mmu_pte_write", "mmu_pte_updated", "mmu_pde_zapped", "mmu_flooded",
    "mmu_recycled", "mmu_cache_miss", "mmu_unsync", "mmu_unsync_events", "mmu_sync_pages",
    "mmu_sync_zapped", "remote_tlb_flush", "mmu_unprotect",
    "shadow_unsync", "shadow_resync", "shadow_unsync_evict", "shadow_oos_fixup_add",
    "shadow_oos_fixup_evict",
    "emulate_ahead", "wp_faults", "guest_insns",
    "pf_retry", "pte_prefetch_retry", "mmu_notifier_invalidate", "mmu_notifier_zapped",
    "mmu_notifier_flush", "mmu_notifier_flush_deferred",
    "mmu_deferred_free", "mmu_deferred_peak", "rcu_grace_periods",
    "host_swap_out", "host_swap_in", "host_swap_young", "host_migrate", "host_ksm_merge",
    "host_cow_break", "host_munmap",
)


def new_counters() -> dict:
    return {name: 0 for name in COUNTER_NAMES}
