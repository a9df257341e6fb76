"""Per-vCPU requests (KVM's ``KVM_REQ_*`` bits in ``vcpu->requests``): work the MMU leaves for
the moment before the vCPU runs the guest again (``VcpuMmu.requests``)."""

REQ_TLB_FLUSH = 1          # KVM_REQ_TLB_FLUSH: flush the CPU's TLB
REQ_MMU_RELOAD = 2         # KVM_REQ_MMU_RELOAD: a root was zapped; reload it
REQ_MMU_SYNC = 4           # KVM_REQ_MMU_SYNC (2.6.28 kvm_host.h): sync the unsync pages the root reaches
# ours, not KVM's: a KVM_REQ_TLB_FLUSH after which the only translations the CPU's TLB may hold
# that no longer match the sptes are those through the leaf sptes in VcpuMmu.flush_sptes (a
# flush requested by VmMmu.flush_leaf_sptes). KVM flushes the whole TLB there; the CPU adapter
# may instead drop just those pages, which leaves the TLB holding exactly what a whole flush
# and refills from the same sptes would give (docs/PERFORMANCE.md, "scoped flushes").
REQ_TLB_FLUSH_SPTES = 8
REQ_ANY_TLB_FLUSH = REQ_TLB_FLUSH | REQ_TLB_FLUSH_SPTES

# vcpu->mode (include/linux/kvm_host.h, Linux 3.5+: the values of enum { OUTSIDE_GUEST_MODE,
# IN_GUEST_MODE, EXITING_GUEST_MODE, READING_SHADOW_PAGE_TABLES }). In x86shadow a vCPU the
# scheduler may run (vm_scheduler.py) is IN_GUEST_MODE even while another vCPU's slice runs:
# each vCPU is modelled as running on its own physical CPU, the one host thread only
# interleaves them. A stopped vCPU (halted, returned from main, not started) is OUTSIDE.
OUTSIDE_GUEST_MODE = 0
IN_GUEST_MODE = 1
EXITING_GUEST_MODE = 2
READING_SHADOW_PAGE_TABLES = 3
MODE_NAMES = {OUTSIDE_GUEST_MODE: "OUTSIDE_GUEST_MODE", IN_GUEST_MODE: "IN_GUEST_MODE",
              EXITING_GUEST_MODE: "EXITING_GUEST_MODE",
              READING_SHADOW_PAGE_TABLES: "READING_SHADOW_PAGE_TABLES"}
