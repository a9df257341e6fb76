# bench/fork.asm -- fork with copy-on-write and an exec-less child that exits, N rounds.
#
# The parent owns M = 1024 pages at UWIN, each in a data frame of a pool that carries a mapping
# count per frame (Linux's mapcount) and a stack of free frames. One round:
#   1 fork (copy_one_pte, pte by pte): the child gets a fresh root sharing the root entries of the
#     identity map ("kernel" half); for each parent pte that is writable, W is cleared in place with
#     `lock and byte ptr [pte], 0xfd` (clear_bit(_PAGE_BIT_RW) on a constant bit: a locked AND of
#     the pte's low byte); the child's pte is the parent's without W and A (pte_mkold), stored with
#     set_pte (PAE: high half, then low half) into fresh child tables; the frame's count goes up.
#     Then the parent reloads CR3 (flush_tlb_mm).
#   2 CR3 := child. The child reads every page (marker, last round's number) and writes every 4th
#     page: a copy-on-write fault each.
#   3 CR3 := parent. The parent writes its odd pages while the child still shares them: a copy each.
#   4 the child exits (exit_mmap with its tables live): CR3 := child, every child pte is read and
#     cleared (pte_clear: PAE low half first), its frame's count goes down and a frame nobody maps
#     any more goes back to the pool; CR3 := parent. The child's table frames are handed out again
#     (and zeroed) by the next fork.
#   5 the parent writes its even pages: they are its own again (count 1), so the fault only makes
#     the pte writable (do_wp_page's reuse), no copy. Every parent pte is writable again for the
#     next fork.
# The #PF handler takes only error code P|W (a CPL0 write to a present read-only page; CR0.WP = 1):
# if the frame has more than one mapping it copies the page into a free frame and re-points the
# pte there (new frame | P|W|A|D), else it sets W|A|D on the pte; either way one set_pte, then
# INVLPG of the address.
#
# How this differs from pt-writes-fork: there the parent's W is cleared with a dword `lock and`, the
# child only reads, the child's ptes are cleared from the parent's address space (the child's tables
# are not in use), W comes back with a `lock or` on every parent pte and the parent then writes its
# pages natively -- no guest page fault, no copy, no INVLPG. Here write access comes back only
# through copy-on-write faults handled by the guest, the child writes too, the teardown runs on the
# child's own CR3 and frames are shared, copied and freed by count.
#
# Leaf ptes written (a PAE entry's two halves count once; upper-level entries are not counted):
# M at start-up, then per round M (W cleared) + M (child ptes) + M/4 (child copies) + M/2 (parent
# copies) + M (teardown) + M/2 (parent reuses) = 17 M / 4. The guest counts them as it goes, checks
# the total against that formula and reports it through MARKER_PORT (x86shadow bench compares it
# with the workload's definition in x86shadow/bench.py).
# Checks: what the child reads is the parent's data; each copy holds the source's data; a child
# write never reaches the parent's frame and a parent write after the fork never reaches the
# child's; the copy and reuse counts; at the end every parent page holds its marker and N, every
# parent pte is writable and its frame mapped once, and every other pool frame is free.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "../lib/idt.inc"
.include "bench.inc"

.ifndef N
.set N, 8
.endif
.set M, 1024                           # a multiple of 1024 (the pool's arrays are whole pages)
.set POOL, 2 * M                       # data frames; at most 7 M / 4 are in use at once
.set PER_ROUND, M * 17 / 4             # leaf pte writes per round
.set COPIES, N * (M / 4 + M / 2)       # copy-on-write faults that copy (child's, parent's)
.set REUSES, N * (M / 2)               # and that only make the pte writable
.set PTES, M + N * PER_ROUND           # leaf pte writes in all
.set CHILD_TAG, 0xc4000000             # what the child writes at +8 of a page (| round)
.set PF_COW, PF_P | PF_W
.set CHILD_PTE_MASK, 0xffffffdd        # clears W (bit 1) and A (bit 5)
.if BITS == 64
.set UWIN, 0x0000008000000000          # PML4 entry 1: the child needs tables at every level
.else
.set UWIN, 0x40000000
.endif

.set v_parent, PROG_VARS + 0x00        # quad: the parent's root
.set v_child, PROG_VARS + 0x08         # quad: the child's root
.set v_mark, PROG_VARS + 0x10          # allocator position where each fork's child tables start
.set v_round, PROG_VARS + 0x14
.set v_pool, PROG_VARS + 0x18          # first of the POOL data frames
.set v_count, PROG_VARS + 0x1c         # POOL dwords: mappings of each data frame
.set v_stack, PROG_VARS + 0x20         # POOL dwords: the free data frames
.set v_nfree, PROG_VARS + 0x24         # entries on that stack
.set v_ptes, PROG_VARS + 0x28          # leaf pte writes so far
.set v_copies, PROG_VARS + 0x2c        # copy-on-write faults that copied
.set v_reuses, PROG_VARS + 0x30        # copy-on-write faults that only set W

.macro SWITCH_TO var
.if BITS == 64
    mov rax, qword ptr [\var]
.else
    mov eax, dword ptr [\var]
.endif
    SET_CR3
.endm

# ---------------------------------------------------------------------------------------------
# helpers (each keeps every register but its outputs)

# fk_va: ebx = page index -> esi (rsi) = its address
fk_va:
.if BITS == 64
    push rax
    mov eax, ebx
    shl rax, 12
    mov rsi, UWIN
    add rsi, rax
    pop rax
.else
    mov esi, ebx
    shl esi, 12
    add esi, UWIN
.endif
    ret

# fk_slot: edi (rdi) = root, ebx = page index -> esi (rsi) = its address, eax (rax) = the address of
# its pte (never 0: a missing table is a failure)
fk_slot:
    call fk_va
.if BITS == 64
    push rcx
    push rdx
.else
    push ecx
    push edx
.endif
    mov edx, 1
    xor ecx, ecx
    call pt_entry
.if BITS == 64
    pop rdx
    pop rcx
.else
    pop edx
    pop ecx
.endif
    test eax, eax
    jz fk_no_table
    ret
fk_no_table:
    FAILV 10, "fork: no page table for a page of the window (page index in ebx)", ebx

# fk_count: eax = a data frame -> eax = the address of its mapping count
fk_count:
    sub eax, dword ptr [v_pool]
    shr eax, 12
    cmp eax, POOL
    jae fk_not_pool
    shl eax, 2
    add eax, dword ptr [v_count]
    ret
fk_not_pool:
    FAIL 11, "fork: a pte points outside the data pool"

# fk_take: -> eax = a free data frame
fk_take:
    mov eax, dword ptr [v_nfree]
    test eax, eax
    jz fk_pool_empty
    dec eax
    mov dword ptr [v_nfree], eax
    shl eax, 2
    add eax, dword ptr [v_stack]
    mov eax, dword ptr [eax]
    ret
fk_pool_empty:
    FAIL 12, "fork: no free data frame"

# fk_give: eax = a data frame nobody maps any more -> back on the free stack
fk_give:
.if BITS == 64
    push rcx
.else
    push ecx
.endif
    mov ecx, dword ptr [v_nfree]
    shl ecx, 2
    add ecx, dword ptr [v_stack]
    mov dword ptr [ecx], eax
    inc dword ptr [v_nfree]
.if BITS == 64
    pop rcx
.else
    pop ecx
.endif
    ret

# ---------------------------------------------------------------------------------------------
# the program

main:
    PUSHA_
    call pt_init
    call idt_init
    SET_GATE 14, fk_pf
    mov dword ptr [v_ptes], 0
    mov dword ptr [v_copies], 0
    mov dword ptr [v_reuses], 0
    mov dword ptr [v_nfree], 0
    # the count array, the free stack and the pool, carved from the allocator's area
    mov eax, dword ptr [lib_pt_next]
    mov dword ptr [v_count], eax
    add eax, POOL * 4
    mov dword ptr [v_stack], eax
    add eax, POOL * 4
    mov dword ptr [v_pool], eax
    add eax, POOL * 4096
    mov dword ptr [lib_pt_next], eax
    call new_root
    mov dword ptr [v_parent], eax
    mov dword ptr [v_parent + 4], 0
    # frame k holds k at +0 and zeros at +4 (the round that wrote it last) and +8 (the child's
    # mark); frames 0..M-1 become the parent's pages, the rest the free stack
    xor ebx, ebx
fk_init:
    mov eax, ebx
    shl eax, 12
    add eax, dword ptr [v_pool]
    mov dword ptr [eax], ebx
    mov dword ptr [eax + 4], 0
    mov dword ptr [eax + 8], 0
    mov ecx, dword ptr [v_count]
    mov dword ptr [ecx + ebx * 4], 0
    cmp ebx, M
    jae fk_init_free
    mov dword ptr [ecx + ebx * 4], 1
    or eax, PTE_P | PTE_W
    mov edi, dword ptr [v_parent]
    call fk_va
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc dword ptr [v_ptes]
    jmp fk_init_next
fk_init_free:
    call fk_give
fk_init_next:
    inc ebx
    cmp ebx, POOL
    jb fk_init
    SWITCH_TO v_parent
    mov eax, dword ptr [lib_pt_next]
    mov dword ptr [v_mark], eax
    mov dword ptr [v_round], 0

fk_round:
    inc dword ptr [v_round]
    call fk_fork
    call fk_child_runs
    call fk_parent_copies
    call fk_child_exits
    call fk_parent_reuses
    cmp dword ptr [v_round], N
    jb fk_round

    # ---- final checks
    mov edi, dword ptr [v_parent]
    xor ebx, ebx
fk_final:
    call fk_slot
    mov eax, dword ptr [eax]
    CHECK_BITS eax, PTE_P | PTE_W, PTE_P | PTE_W, 20, "fork: a parent pte is read-only at the end"
    and eax, 0xfffff000
    mov edx, dword ptr [eax]
    CHECK_EQ edx, ebx, 21, "fork: a parent page lost its marker"
    mov edx, dword ptr [eax + 4]
    CHECK_EQ edx, N, 22, "fork: a parent page does not hold the last round number"
    mov edx, dword ptr [eax + 8]
    CHECK_EQ edx, 0, 23, "fork: a child's write reached a parent page"
    call fk_count
    mov edx, dword ptr [eax]
    CHECK_EQ edx, 1, 24, "fork: a parent frame is not mapped exactly once"
    inc ebx
    cmp ebx, M
    jb fk_final
    mov eax, dword ptr [v_nfree]
    CHECK_EQ eax, POOL - M, 25, "fork: data frames leaked (free frames at the end)"
    mov eax, dword ptr [v_copies]
    CHECK_EQ eax, COPIES, 26, "fork: wrong number of copy-on-write copies"
    mov eax, dword ptr [v_reuses]
    CHECK_EQ eax, REUSES, 27, "fork: wrong number of copy-on-write reuses"
    mov eax, dword ptr [v_ptes]
    CHECK_EQ eax, PTES, 28, "fork: wrong number of leaf pte writes"
    mov dx, MARKER_PORT                # the count, for the host
    out dx, eax
    POPA_
    PASS
    ret

# ---- 1: fork
fk_fork:
    mov eax, dword ptr [v_mark]
    mov dword ptr [lib_pt_next], eax   # the last child's table frames are free again
    call pt_alloc
    mov dword ptr [v_child], eax
    mov dword ptr [v_child + 4], 0
    mov esi, dword ptr [v_parent]
    xor ecx, ecx
fk_kernel_half:
    mov edx, dword ptr [esi + ecx * 4]
    mov dword ptr [eax + ecx * 4], edx
    inc ecx
    cmp ecx, ID_DWORDS
    jb fk_kernel_half
    xor ebx, ebx
fk_copy:
    mov edi, dword ptr [v_parent]
    call fk_slot
    mov ecx, eax
    test dword ptr [ecx], PTE_W
    jz fk_copy_shared
    lock and byte ptr [ecx], 0xfd      # ptep_set_wrprotect
    inc dword ptr [v_ptes]
fk_copy_shared:
    mov eax, dword ptr [ecx]
    CHECK_BITS eax, PTE_P | PTE_W, PTE_P, 30, "fork: parent pte not read-only after the copy"
    mov ebp, eax
    and eax, 0xfffff000
    call fk_count
    inc dword ptr [eax]
    mov eax, ebp
    and eax, CHILD_PTE_MASK
    mov edi, dword ptr [v_child]
    xor edx, edx
    mov ecx, 1
    call pt_map                        # esi: still the page's address
    inc dword ptr [v_ptes]
    inc ebx
    cmp ebx, M
    jb fk_copy
    SWITCH_TO v_parent                 # drop the parent's writable translations
    ret

# ---- 2: the child reads everything and writes every 4th page
.macro CHILD_RUN si
    mov ebp, dword ptr [v_round]
    dec ebp                            # the round that last wrote the parent's pages
    xor ebx, ebx
fk_child_\@:
    call fk_va
    mov eax, dword ptr [\si]
    CHECK_EQ eax, ebx, 40, "fork: the child read a wrong marker"
    mov eax, dword ptr [\si + 4]
    CHECK_EQ eax, ebp, 41, "fork: the child does not see the parent's data"
    test ebx, 3
    jnz fk_child_next_\@
    lea eax, [ebp + 1]
    or eax, CHILD_TAG
    mov dword ptr [\si + 8], eax       # copy-on-write
    mov edx, dword ptr [\si]
    CHECK_EQ edx, ebx, 42, "fork: the child's copy lost the marker"
    mov edx, dword ptr [\si + 8]
    CHECK_EQ edx, eax, 43, "fork: the child's write did not stick"
fk_child_next_\@:
    inc ebx
    cmp ebx, M
    jb fk_child_\@
.endm

fk_child_runs:
    SWITCH_TO v_child
.if BITS == 64
    CHILD_RUN rsi
.else
    CHILD_RUN esi
.endif
    ret

# ---- 3 and 5: the parent writes the round number into its odd (first = 1) or even (first = 0)
# pages
.macro PARENT_WRITES si, first
    mov ebp, dword ptr [v_round]
    mov ebx, \first
fk_parent_\@:
    call fk_va
    mov dword ptr [\si + 4], ebp       # copy-on-write
    mov eax, dword ptr [\si]
    CHECK_EQ eax, ebx, 50, "fork: a parent page lost its marker after its fault"
    add ebx, 2
    cmp ebx, M
    jb fk_parent_\@
.endm

fk_parent_copies:
    SWITCH_TO v_parent
.if BITS == 64
    PARENT_WRITES rsi, 1
.else
    PARENT_WRITES esi, 1
.endif
    ret

fk_parent_reuses:
.if BITS == 64
    PARENT_WRITES rsi, 0
.else
    PARENT_WRITES esi, 0
.endif
    ret

# ---- 4: the child exits
fk_child_exits:
    SWITCH_TO v_child
    mov ebp, dword ptr [v_round]
    xor ebx, ebx
fk_exit:
    mov edi, dword ptr [v_child]
    call fk_slot
    mov ecx, eax
    mov eax, dword ptr [ecx]
    PTE_CLEAR ecx, rcx
    inc dword ptr [v_ptes]
    test eax, PTE_P
    jz fk_exit_gone
    and eax, 0xfffff000
    # what the frame holds: last round's number (the parent's writes of this round went to its
    # copies), and the child's mark exactly where the child copied
    lea edx, [ebp - 1]
    cmp dword ptr [eax + 4], edx
    jne fk_exit_leak
    xor edx, edx
    test ebx, 3
    jnz fk_exit_mark
    mov edx, ebp
    or edx, CHILD_TAG
fk_exit_mark:
    cmp dword ptr [eax + 8], edx
    jne fk_exit_leak
    mov esi, eax
    call fk_count
    dec dword ptr [eax]
    jnz fk_exit_next
    mov eax, esi
    call fk_give
fk_exit_next:
    inc ebx
    cmp ebx, M
    jb fk_exit
    SWITCH_TO v_parent
    ret
fk_exit_gone:
    FAILV 60, "fork: a child pte was not present at exit (page index in ebx)", ebx
fk_exit_leak:
    FAILV 61, "fork: a write crossed between parent and child (page index in ebx)", ebx

# ---------------------------------------------------------------------------------------------
# #PF: copy-on-write
fk_pf:
    SAVE_ALL
.if BITS == 64
    mov eax, dword ptr [rsp + FRAME_ERR]
.else
    mov eax, dword ptr [esp + FRAME_ERR]
.endif
    CHECK_EQ eax, PF_COW, 70, "fork: #PF error code is not P|W"
.if BITS == 64
    mov rsi, cr2
    mov rax, rsi
    mov rcx, UWIN
    sub rax, rcx
    shr rax, 12
    cmp rax, M
    jae fk_pf_where
    shr rsi, 12
    shl rsi, 12
    mov rdi, cr3
.else
    mov esi, cr2
    mov eax, esi
    sub eax, UWIN
    shr eax, 12
    cmp eax, M
    jae fk_pf_where
    and esi, 0xfffff000
    mov edi, cr3
.endif
    and edi, 0xfffff000
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    test eax, eax
    jz fk_pf_where
    mov ebx, eax                       # the pte
    mov eax, dword ptr [ebx]
    CHECK_BITS eax, PTE_P | PTE_W, PTE_P, 71, "fork: the faulting pte is not present and read-only"
    and eax, 0xfffff000
    mov ebp, eax                       # the shared frame
    call fk_count
    cmp dword ptr [eax], 1
    je fk_pf_reuse
    dec dword ptr [eax]                # the other address space keeps the old frame
    call fk_take
    mov edx, eax
    call fk_count
    mov dword ptr [eax], 1
    cld
    mov ecx, 1024
.if BITS == 64
    mov esi, ebp
    mov edi, edx
    rep movsd dword ptr [rdi], dword ptr [rsi]
.else
    mov esi, ebp
    mov edi, edx
    rep movsd dword ptr es:[edi], dword ptr [esi]
.endif
    mov eax, edx
    or eax, PTE_P | PTE_W | PTE_A | PTE_D
    inc dword ptr [v_copies]
    jmp fk_pf_set
fk_pf_reuse:
    mov eax, dword ptr [ebx]           # the last mapping: writable in place
    or eax, PTE_W | PTE_A | PTE_D
    inc dword ptr [v_reuses]
fk_pf_set:
    PTE_SET ebx, eax, rbx, rax
    inc dword ptr [v_ptes]
.if BITS == 64
    mov rsi, cr2
    invlpg [rsi]
.else
    mov esi, cr2
    invlpg [esi]
.endif
    RESTORE_ALL
    IRET_ERR
fk_pf_where:
    FAIL 72, "fork: #PF outside the window or without a page table"
