"""Per-vCPU requests (KVM's ``KVM_REQ_*`` bits in ``vcpu->requests``): work the MMU leaves for
the moment before the vCPU runs the guest again (``VcpuMmu.requests``)."""

REQ_TLB_FLUSH = 1          # KVM_REQ_TLB_FLUSH: flush the CPU's TLB
REQ_MMU_RELOAD = 2         # KVM_REQ_MMU_RELOAD: a root was zapped; reload it
REQ_MMU_SYNC = 4           # KVM_REQ_MMU_SYNC (2.6.28 kvm_host.h): sync the unsync pages the root reaches
