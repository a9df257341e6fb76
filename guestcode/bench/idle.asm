# bench/idle.asm -- the null workload: boot and print PASS. The baseline that per-event costs of
# single workloads are measured against (x86shadow bench: (t - t_idle) / events).
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"

main:
    PASS
    ret
