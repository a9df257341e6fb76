# smp_shootdown.asm -- vCPUs share page tables while vCPU 0 rewrites a pte and shoots down the
# others' translations through shared memory, without IPIs (docs/SMP.md).
# x86shadow: modes=32,pae,64
#
# vCPU 0 builds one set of tables (the low 64 MiB identity-mapped, WIN mapped by one pte to frame
# F0 of NFRAMES marked frames); every vCPU loads that CR3. Each round: every vCPU reads WIN (its
# TLB now holds the translation) and checks the mark; barrier; vCPU 0 re-points the pte to the next
# frame, invalidates its own entry and publishes the round in v_gen; every other vCPU waits for
# v_gen and invalidates its entry (invlpg) -- the shoot-down; barrier; the next round's read must
# see the new frame on every vCPU. Odd rounds make the pte read-only as well (a W downgrade the
# others' TLBs may hold). Under the shadow MMU the trapped pte write must reach every vCPU's TLB
# before it runs again (kvm_flush_remote_tlbs); under Unicorn's own MMU the guest's invlpg does.
# Exit codes: 3 a vCPU read the wrong frame through WIN.
.include "lib/console.inc"
.include "lib/main.inc"
.include "lib/paging.inc"
.include "lib/smp.inc"

.set WIN, 0x40000000
.set ROUNDS, 16
.set NFRAMES, 4                       # a power of two
.set MARK, 0x5a000000

.set v_root, PROG_VARS + 0x00         # quad: the shared root
.set v_pte, PROG_VARS + 0x08          # dword: address of WIN's pte
.set v_gen, PROG_VARS + 0x0c          # dword: the last round whose pte write vCPU 0 published
.set v_f, PROG_VARS + 0x10            # NFRAMES dwords: the frames

# check_win: ecx = round -> fail unless [WIN] holds the mark of frame (round % NFRAMES)
check_win:
    PUSHR eax, rax
    PUSHR edx, rdx
    mov eax, ecx
    and eax, NFRAMES - 1
    add eax, MARK
    mov edx, dword ptr [WIN]
    cmp edx, eax
    je check_win_ok
    FAILV 3, "a vCPU read a stale frame through WIN after the shoot-down", edx
check_win_ok:
    POPR edx, rdx
    POPR eax, rax
    ret

main:
    MAIN_PROLOGUE
    SMP_INIT
    SMP_IF_AP tables_built
    call pt_init
    NEW_ROOT v_root
    MARKED_FRAMES v_f, NFRAMES, MARK
    mov esi, WIN
    mov eax, dword ptr [v_f]
    or eax, PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    mov dword ptr [v_pte], eax
    mov dword ptr [v_gen], 0
tables_built:
    call smp_barrier
    LOAD_CR3 v_root                   # every vCPU: the same tables
    xor ecx, ecx                      # the round
round:
    call check_win                    # fills this vCPU's TLB with the round's frame
    call smp_barrier
    SMP_IF_AP shoot_wait
    # vCPU 0: the next frame (read-only in odd rounds), its own entry, then the request
    lea eax, [ecx + 1]
    and eax, NFRAMES - 1
    mov eax, dword ptr [v_f + eax * 4]
    or eax, PTE_P | PTE_W
    test ecx, 1
    jz pte_writable
    and eax, ~PTE_W
pte_writable:
    mov ebx, dword ptr [v_pte]
    PTE_SET ebx, eax, rbx, rax
    mov esi, WIN
    INVLPG_SI
    lea eax, [ecx + 1]
    mov dword ptr [v_gen], eax
    jmp shot
shoot_wait:
    lea eax, [ecx + 1]
shoot_spin:
    pause
    cmp dword ptr [v_gen], eax
    jne shoot_spin
    mov esi, WIN
    INVLPG_SI
shot:
    call smp_barrier                  # every vCPU has dropped the old translation
    inc ecx
    cmp ecx, ROUNDS
    jb round
    call check_win
    call smp_barrier
    SMP_IF_AP done
    mov ecx, dword ptr [smp_n]
    PRINT_DEC "vcpus ", ecx
    mov ecx, ROUNDS
    PRINT_DEC " shoot-downs ", ecx
    PRINT "\n"
    PASS
done:
    MAIN_EPILOGUE
