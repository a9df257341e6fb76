# bench/pt_writes_fork.asm -- page-table writes of a fork-like copy and teardown, N times.
# A parent address space maps M = 1024 user pages at UWIN (each a frame of its own, marker i at +0).
# One fork:
#   1 the child gets a fresh root (the identity-map entries copied from the parent's) and, for each
#     parent pte: the parent's is write-protected in place (`lock and` of ~W, Linux's clear_bit on a
#     constant bit: a trapped write once the parent's page table is shadowed), the child's is the same
#     value without W (pt_map into fresh child tables); the parent reloads CR3 (flush)
#   2 CR3 := child; the child reads every page (its tables get shadowed)
#   3 CR3 := parent; the child's ptes are cleared one by one (trapped writes: the child's tables are
#     shadowed) and its table frames go back to the allocator (the next fork zeroes them again)
#   4 the parent gives W back to its ptes (`lock or`), reloads CR3 and writes every page (fork number
#     at +4)
# Under the shadow MMU the page-table writes are emulated until a table floods (3 writes without a
# fault through it: kvm policy) and is unshadowed; the rest runs natively and re-shadows on faults.
# Check: the child reads every marker; every page ends with the last fork number at +4.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "bench.inc"

.ifndef N
.set N, 40
.endif
.set M, 1024
.if BITS == 64
.set UWIN, 0x0000008000000000          # PML4 index 1: the child needs tables at every level
.else
.set UWIN, 0x40000000
.endif
.set v_parent, PROG_VARS + 0x00        # quad
.set v_child, PROG_VARS + 0x08         # quad
.set v_mark, PROG_VARS + 0x10          # allocator mark: the child's frames start here
.set v_fork, PROG_VARS + 0x14
.set v_frames, PROG_VARS + 0x20        # quad: the first data frame (M consecutive frames)

# uva: ebx = page index -> esi (rsi) = UWIN + index * 4 KiB
uva:
.if BITS == 64
    push rax
    mov rsi, UWIN
    mov eax, ebx
    shl rax, 12
    add rsi, rax
    pop rax
.else
    mov esi, ebx
    shl esi, 12
    add esi, UWIN
.endif
    ret

# pte_of: edi (rdi) = root, ebx = page index -> eax (rax) = address of its pte (0: none)
pte_of:
.if BITS == 64
    push rcx
    push rdx
    push rsi
    call uva
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    pop rsi
    pop rdx
    pop rcx
.else
    push ecx
    push edx
    push esi
    call uva
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    pop esi
    pop edx
    pop ecx
.endif
    ret

.macro LOAD_ROOT var
.if BITS == 64
    mov rax, qword ptr [\var]
    mov cr3, rax
.else
    mov eax, dword ptr [\var]
    mov cr3, eax
.endif
.endm

.macro ROOT_TO_DI var
    mov edi, dword ptr [\var]         # roots lie below 4 GiB (mode 64: zero-extended into rdi)
.endm

main:
    PUSHA_
    call pt_init
    # data frames
    mov eax, dword ptr [lib_pt_next]
    mov dword ptr [v_frames], eax
    add eax, M * 4096
    mov dword ptr [lib_pt_next], eax
    # parent: identity map + the M pages
    call new_root
    mov dword ptr [v_parent], eax
    mov dword ptr [v_parent + 4], 0
    ROOT_TO_DI v_parent
    xor ebx, ebx
pf_map:
    call uva
    mov eax, ebx
    shl eax, 12
    add eax, dword ptr [v_frames]
    mov dword ptr [eax], ebx
    mov dword ptr [eax + 4], 0
    or eax, PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc ebx
    cmp ebx, M
    jb pf_map
    LOAD_ROOT v_parent
    mov eax, dword ptr [lib_pt_next]
    mov dword ptr [v_mark], eax
    mov dword ptr [v_fork], 0

fork_loop:
    inc dword ptr [v_fork]
    # ---- 1: child root, copy of the user ptes, parent write-protected
    mov eax, dword ptr [v_mark]
    mov dword ptr [lib_pt_next], eax
    call pt_alloc
    mov dword ptr [v_child], eax
    mov dword ptr [v_child + 4], 0
.if BITS == 64
    mov rdi, rax
    mov esi, dword ptr [v_parent]
    mov ecx, ID_DWORDS
    cld
    rep movsd dword ptr [rdi], dword ptr [rsi]
.else
    mov edi, eax
    mov esi, dword ptr [v_parent]
    mov ecx, ID_DWORDS
    cld
    rep movsd dword ptr es:[edi], dword ptr [esi]
.endif
    xor ebx, ebx
fk_copy:
    ROOT_TO_DI v_parent
    call pte_of
.if BITS == 64
    mov rcx, rax
    lock and dword ptr [rcx], 0xfffffffd
    mov rax, qword ptr [rcx]
    ROOT_TO_DI v_child
    call uva
    mov ecx, 1
    call pt_map
.else
    mov ecx, eax
    lock and dword ptr [ecx], 0xfffffffd
    mov eax, dword ptr [ecx]
    mov edx, dword ptr [ecx + 4]
.if PAGING == 2
    xor edx, edx
.endif
    ROOT_TO_DI v_child
    call uva
    mov ecx, 1
    call pt_map
.endif
    inc ebx
    cmp ebx, M
    jb fk_copy
    LOAD_ROOT v_parent                 # flush the parent's writable translations
    # ---- 2: the child runs: reads every page
    LOAD_ROOT v_child
    xor ebx, ebx
fk_child:
    call uva
.if BITS == 64
    mov eax, dword ptr [rsi]
.else
    mov eax, dword ptr [esi]
.endif
    cmp eax, ebx
    jne fk_bad_child
    inc ebx
    cmp ebx, M
    jb fk_child
    # ---- 3: back in the parent: tear the child's ptes down
    LOAD_ROOT v_parent
    xor ebx, ebx
fk_clear:
    ROOT_TO_DI v_child
    call pte_of
    PTE_CLEAR eax, rax
    inc ebx
    cmp ebx, M
    jb fk_clear
    # ---- 4: the parent gets W back and writes every page
    ROOT_TO_DI v_parent
    xor ebx, ebx
fk_unprot:
    call pte_of
    lock or dword ptr [eax], PTE_W
    inc ebx
    cmp ebx, M
    jb fk_unprot
    LOAD_ROOT v_parent
    mov edx, dword ptr [v_fork]
    xor ebx, ebx
fk_write:
    call uva
.if BITS == 64
    mov dword ptr [rsi + 4], edx
.else
    mov dword ptr [esi + 4], edx
.endif
    inc ebx
    cmp ebx, M
    jb fk_write
    cmp dword ptr [v_fork], N
    jb fork_loop

    # check through the identity map
    mov esi, dword ptr [v_frames]
    xor ebx, ebx
fk_check:
    mov eax, dword ptr [esi + 4]
    CHECK_EQ eax, N, 2, "pt-writes-fork: a parent page does not hold the last fork number"
    add esi, 4096
    inc ebx
    cmp ebx, M
    jb fk_check
    POPA_
    PASS
    ret
fk_bad_child:
    FAILV 1, "pt-writes-fork: the child read a wrong marker (page index in ebx)", ebx
