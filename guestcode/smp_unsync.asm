# smp_unsync.asm -- a page table written by one vCPU while the others read through it (docs/SMP.md):
# the out-of-sync case of KVM (kvm, kvm-2008-oos) and Xen 3.3 (xen-oos) with several vCPUs.
# x86shadow: modes=32,pae,64
#
# One page table PT maps WIN + k * 4 KiB, k = 0..7. Pages 4..7 never change (frames F8..F11).
# Pages 0..3 move each round: after round r, page k maps F((k + r + 1) % 8). The writer (the last
# vCPU; vCPU 0 when it is alone) rewrites PT's ptes 0..3 -- and stores the same values again into
# ptes 4..7 -- while every other vCPU keeps reading pages 4..7 through PT (those reads must see the
# fixed frames whatever the shadow's state: a write that leaves a pte unchanged changes nothing);
# then it publishes the round; every reader invalidates pages 0..3 -- invlpg in even rounds, a
# CR3 reload in odd ones -- checks them at once and acknowledges; the writer, once every reader
# has, invalidates its own; barrier; every vCPU checks all eight pages. A reader's CR3 reload meets
# the writer's page still out of sync: under xen-oos it sees the new ptes only because Xen 3.3
# sh_update_cr3 refreshes the other vCPUs' out-of-sync pages (shadow_sync_other_vcpus).
# Exit codes: 3 a fixed page read wrong while PT was written, 4 a moved page wrong after the flush.
.include "lib/console.inc"
.include "lib/main.inc"
.include "lib/paging.inc"
.include "lib/smp.inc"

.set WIN, 0x40000000
.set ROUNDS, 12
.set MARK, 0x3c000000

.set v_root, PROG_VARS + 0x00         # quad: the shared root
.set v_pt, PROG_VARS + 0x08           # dword: PT
.set v_gen, PROG_VARS + 0x0c          # dword: the last round the writer published
.set v_f, PROG_VARS + 0x10            # 12 dwords: F0..F11
.set v_writer, PROG_VARS + 0x40       # dword: the writer's vCPU number
.set v_acks, PROG_VARS + 0x44         # dword: readers' shoot-downs done, over all rounds
.if PAGING == 2
.set PTE_SHIFT, 2                     # log2 PTE_SIZE
.else
.set PTE_SHIFT, 3
.endif

# page_mark: edx = k -> eax = the dword at WIN + k * 4 KiB
page_mark:
    PUSHR esi, rsi
    mov esi, edx
    shl esi, 12
.if BITS == 64
    mov eax, dword ptr [rsi + WIN]
.else
    mov eax, dword ptr [esi + WIN]
.endif
    POPR esi, rsi
    ret

# check_fixed: fail unless pages 4..7 hold F8..F11's marks
check_fixed:
    PUSHR eax, rax
    PUSHR edx, rdx
    mov edx, 4
check_fixed_loop:
    call page_mark
    sub eax, edx
    cmp eax, MARK + 4
    je check_fixed_next
    FAILV 3, "a page PT does not change read wrong while PT was written", edx
check_fixed_next:
    inc edx
    cmp edx, 8
    jb check_fixed_loop
    POPR edx, rdx
    POPR eax, rax
    ret

# check_moved: ecx = round -> fail unless page k (0..3) holds F((k + round + 1) % 8)'s mark
check_moved:
    PUSHR eax, rax
    PUSHR edx, rdx
    PUSHR ebx, rbx
    xor edx, edx
check_moved_loop:
    call page_mark
    lea ebx, [edx + ecx + 1]
    and ebx, 7
    add ebx, MARK
    cmp eax, ebx
    je check_moved_next
    FAILV 4, "a page of PT read wrong after the writer's shoot-down", eax
check_moved_next:
    inc edx
    cmp edx, 4
    jb check_moved_loop
    POPR ebx, rbx
    POPR edx, rdx
    POPR eax, rax
    ret

# write_ptes: ecx = round: ptes 0..3 := F((k + round + 1) % 8), ptes 4..7 := F(k + 4) again
write_ptes:
    PUSHR eax, rax
    PUSHR ebx, rbx
    PUSHR edx, rdx
    xor edx, edx
write_ptes_loop:
    lea eax, [edx + ecx + 1]
    and eax, 7
    cmp edx, 4
    jb write_ptes_value
    lea eax, [edx + 4]
write_ptes_value:
    mov eax, dword ptr [v_f + eax * 4]
    or eax, PTE_P | PTE_W
    mov ebx, edx
    shl ebx, PTE_SHIFT
    add ebx, dword ptr [v_pt]
    PTE_SET ebx, eax, rbx, rax
    inc edx
    cmp edx, 8
    jb write_ptes_loop
    POPR edx, rdx
    POPR ebx, rbx
    POPR eax, rax
    ret

# flush_moved: ecx = round: drop this vCPU's translations of pages 0..3
flush_moved:
    PUSHR eax, rax
    PUSHR esi, rsi
    test ecx, 1
    jz flush_moved_invlpg
    RELOAD_CR3
    jmp flush_moved_done
flush_moved_invlpg:
    mov esi, WIN
flush_moved_loop:
    INVLPG_SI
    add esi, PAGE
    cmp esi, WIN + 4 * PAGE
    jb flush_moved_loop
flush_moved_done:
    POPR esi, rsi
    POPR eax, rax
    ret

main:
    MAIN_PROLOGUE
    SMP_INIT
    SMP_IF_AP tables_built
    call pt_init
    NEW_ROOT v_root
    MARKED_FRAMES v_f, 12, MARK
    # PT: page k -> F(k) for k < 4, F(k + 4) for k >= 4
    xor ebx, ebx
map_loop:
    mov eax, ebx
    cmp ebx, 4
    jb map_frame
    add eax, 4
map_frame:
    mov eax, dword ptr [v_f + eax * 4]
    or eax, PTE_P | PTE_W
    mov esi, ebx
    shl esi, 12
    add esi, WIN
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc ebx
    cmp ebx, 8
    jb map_loop
    and eax, ~(PAGE - 1)
    mov dword ptr [v_pt], eax
    mov dword ptr [v_gen], 0
    mov dword ptr [v_acks], 0
    mov eax, dword ptr [smp_n]
    dec eax
    mov dword ptr [v_writer], eax
tables_built:
    call smp_barrier
    LOAD_CR3 v_root
    mov ecx, -1
    call check_moved                  # the initial frames (round -1)
    call check_fixed
    xor ecx, ecx
round:
    call smp_barrier                  # everyone has read: its shadow and TLB hold PT's entries
    cmp ebp, dword ptr [v_writer]
    jne reader
    call write_ptes
    lea eax, [ecx + 1]
    mov dword ptr [v_gen], eax
    # the writer flushes last: the readers' shoot-downs meet its table still out of sync
    mov eax, dword ptr [smp_n]
    dec eax
    lea edx, [ecx + 1]
    imul eax, edx
writer_wait:
    pause
    cmp dword ptr [v_acks], eax
    jne writer_wait
    call flush_moved
    jmp flushed
reader:
    lea eax, [ecx + 1]
reader_spin:
    call check_fixed                  # reads through PT while the writer writes it
    cmp dword ptr [v_gen], eax
    jne reader_spin
    call flush_moved
    call check_moved                  # its own flush is all a reader needs to see the new ptes
    lock inc dword ptr [v_acks]
flushed:
    call smp_barrier                  # every vCPU has flushed
    call check_moved
    call check_fixed
    inc ecx
    cmp ecx, ROUNDS
    jb round
    call smp_barrier
    SMP_IF_AP done
    mov ecx, dword ptr [smp_n]
    PRINT_DEC "vcpus ", ecx
    mov ecx, ROUNDS
    PRINT_DEC " rounds ", ecx
    PRINT "\n"
    PASS
done:
    MAIN_EPILOGUE
