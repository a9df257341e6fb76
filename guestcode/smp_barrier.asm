# smp_barrier.asm -- several vCPUs meet at a spin-wait barrier (docs/SMP.md), with and without
# pause: ROUNDS rounds, in each every vCPU adds 1 to a shared counter (lock inc), waits at the
# barrier, checks that the counter holds N * (round + 1) -- every vCPU's increment of this round,
# none of the next -- and waits again. Even rounds spin with pause, odd rounds without: the
# scheduler's quantum must bound both spins. vCPU 0 prints the result.
# x86shadow: modes=32,pae,64
.include "lib/console.inc"
.include "lib/main.inc"
.include "lib/smp.inc"

.set ROUNDS, 24
.set v_sum, PROG_VARS + 0x00          # dword: lock-incremented by every vCPU every round

main:
    MAIN_PROLOGUE
    SMP_INIT
    xor ecx, ecx                      # the round
round:
    lock inc dword ptr [v_sum]
    test ecx, 1
    jnz round_nopause
    call smp_barrier
    jmp round_check
round_nopause:
    call smp_barrier_nopause
round_check:
    mov eax, dword ptr [smp_n]
    lea edx, [ecx + 1]
    imul eax, edx
    mov edx, dword ptr [v_sum]
    cmp edx, eax
    je round_ok
    FAILV 2, "the counter after the barrier is not N * (round + 1)", edx
round_ok:
    test ecx, 1
    jnz round_nopause2
    call smp_barrier
    jmp round_next
round_nopause2:
    call smp_barrier_nopause
round_next:
    inc ecx
    cmp ecx, ROUNDS
    jb round
    SMP_IF_AP done
    mov ecx, dword ptr [smp_n]
    PRINT_DEC "vcpus ", ecx
    mov ecx, ROUNDS
    PRINT_DEC " rounds ", ecx
    mov ecx, dword ptr [v_sum]
    PRINT_DEC " sum ", ecx
    PRINT "\n"
    PASS
done:
    MAIN_EPILOGUE
