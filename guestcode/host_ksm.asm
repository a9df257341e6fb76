# host_ksm.asm -- groups of identical pages, read again and again, then single members written.
# x86shadow: modes=32,pae,64
# For host KSM (and swap / migration) under guest RAM: 80 pages in 5 groups of identical contents
# (one all-zero), mergeable while they are only read; writes into a few members of each group must
# change those members only (a COW break keeps the write, its group-mates keep the group content),
# and a member written back to the group content may be merged again. Every dword is checked.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/main.inc"
.include "lib/pagecheck.inc"

# Page i (frame DATA + 4 KiB i, mapped twice: the identity map with supervisor large pages, and the
# window WIN with 4 KiB ptes) belongs to group i mod NG, as member m = i / NG; group contents are
# pc_verify patterns (lib/pagecheck.inc): 0 all zero, 1 all ones, 2 and 3 linear, 4 the dword index.
# A page may carry one poke (index pk, value pv, never a group value), the model is st_pk / st_pv.
# Round r = 1..ROUNDS:
#   reads   READS times: every page aged (A cleared in its window pte, invlpg, as a reclaim scan
#           does) and verified through the window, then every page through the identity map;
#   writes  member m with (m + r) mod 4 == 0: its poke (if any) written back to the group value, then
#           a new poke pk = (37 i + 101 r) mod 1024, pv = 0xa5000000 + 0x10000 r + i; (m + r) mod 4
#           == 2: its poke written back (the page is a group copy again). Through the window when r
#           is odd, the identity map when even; each page written is aged right after;
#   checks  every page through the identity map, then (aged again) through the window.
# Exit codes: 1 read through the window, 2 read through the identity map, 3 after the writes
# through the identity map, 4 after the writes through the window.

.set NPG, 80
.set NG, 5
.set ROUNDS, 4
.set READS, 1
.set DATA, FREE_BASE + 0x80000         # the data frames (16.5 MiB: pt_alloc stays below, in one large page)
.if BITS == 64
.set WIN, 0x0000008000000000           # PML4E 1
.else
.set WIN, 0x40000000                   # mode 32: PDE 256; PAE: PDPTE 1
.endif
.set NOT_A, 0xffffffdf

# variables
.set v_root, PROG_VARS + 0x00          # quad
.set v_wpt, PROG_VARS + 0x08           # the window's leaf table (pte of page 0)
.set v_round, PROG_VARS + 0x0c
.set v_code, PROG_VARS + 0x10          # exit code of the check running
.set g_seed, PROG_VARS + 0x20          # NG dwords
.set g_step, PROG_VARS + 0x40          # NG dwords
.set st_pk, PROG_VARS + 0x100          # NPG dwords: poke index or PC_NOPOKE
.set st_pv, PROG_VARS + 0x300          # NPG dwords: poke value

# ------------------------------------------------------------------ the model
# group_of: ebx = page -> eax = group, edx = member
group_of:
    mov eax, ebx
    xor edx, edx
    PUSHR ecx, rcx
    mov ecx, NG
    div ecx
    POPR ecx, rcx
    xchg eax, edx
    ret

# model: ebx = page -> eax = seed, edx = step, ecx = poke index, edi = poke value
model:
    call group_of
    mov edx, dword ptr [g_step + eax * 4]
    mov eax, dword ptr [g_seed + eax * 4]
    mov ecx, dword ptr [st_pk + ebx * 4]
    mov edi, dword ptr [st_pv + ebx * 4]
    ret

# group_value: ebx = page, ecx = dword index -> eax = the group's value there
group_value:
    PUSHR edx, rdx
    call group_of
    mov edx, dword ptr [g_step + eax * 4]
    imul edx, ecx
    add edx, dword ptr [g_seed + eax * 4]
    mov eax, edx
    POPR edx, rdx
    ret

# win_va / ident_va: ebx = page -> esi (rsi) = its address in the window / the identity map
win_va:
    PAGE_VA WIN, ebx
    ret

ident_va:
    PAGE_VA DATA, ebx
    ret

# page_va: ebx = page, eax = 0 identity, 1 window -> esi (rsi)
page_va:
    test eax, eax
    jnz win_va
    jmp ident_va

# ------------------------------------------------------------------ passes
# age: ebx = page: A cleared in its window pte, then invlpg of the page (as a reclaim scan does)
age:
    PUSHR eax, rax
    PUSHR esi, rsi
    mov eax, dword ptr [v_wpt]
.if PAGING == 2
    lock and dword ptr [eax + ebx * 4], NOT_A
.else
    lock and dword ptr [eax + ebx * 8], NOT_A
.endif
    call win_va
    INVLPG_SI
    POPR esi, rsi
    POPR eax, rax
    ret

# check_all: eax = 0 identity / 1 window (each page aged just before), edx = 0 ascending /
# 1 descending, ecx = exit code: every page against the model
check_all:
    PUSHA_
    mov dword ptr [v_code], ecx
    mov ebp, eax
    xor ebx, ebx
    test edx, edx
    mov edx, 1                         # ascending
    jz ca_page
    mov ebx, NPG - 1
    neg edx                            # -1: descending
ca_page:
    PUSHR edx, rdx
    test ebp, ebp
    jz ca_va
    call age
ca_va:
    mov eax, ebp
    call page_va
    call model
    call pc_verify
    cmp ecx, PC_NOPOKE
    jne ca_bad
    POPR edx, rdx
    add ebx, edx
    cmp ebx, NPG                       # (unsigned: -1 ends the descending loop too)
    jb ca_page
    POPA_
    ret
ca_bad:
    mov edi, dword ptr [v_round]
    mov ebp, dword ptr [v_code]
    cmp ebp, 1
    je ca_f1
    cmp ebp, 2
    je ca_f2
    cmp ebp, 3
    je ca_f3
    PC_FAIL host_ksm, 4, "after the writes: read through the window"
ca_f1:
    PC_FAIL host_ksm, 1, "read through the window"
ca_f2:
    PC_FAIL host_ksm, 2, "read through the identity map"
ca_f3:
    PC_FAIL host_ksm, 3, "after the writes: read through the identity map"

# writes: ecx = round: the pokes and write-backs of the round
writes:
    PUSHA_
    xor ebx, ebx
wr_page:
    call group_of
    add edx, dword ptr [v_round]
    and edx, 3
    jz wr_poke
    cmp edx, 2
    je wr_restore
    jmp wr_next
wr_poke:
    call restore
    mov ecx, ebx
    imul ecx, ecx, 37
    imul eax, dword ptr [v_round], 101
    add ecx, eax
    and ecx, 1023
    mov edi, dword ptr [v_round]
    shl edi, 16
    add edi, ebx
    add edi, 0xa5000000
    mov dword ptr [st_pk + ebx * 4], ecx
    mov dword ptr [st_pv + ebx * 4], edi
    mov eax, dword ptr [v_round]
    and eax, 1
    call page_va
.if BITS == 64
    mov dword ptr [rsi + rcx * 4], edi
.else
    mov dword ptr [esi + ecx * 4], edi
.endif
    call age
    jmp wr_next
wr_restore:
    call restore
    call age
wr_next:
    inc ebx
    cmp ebx, NPG
    jb wr_page
    POPA_
    ret

# restore: ebx = page: its poke (if any) written back to the group value; st_pk := PC_NOPOKE
restore:
    PUSHA_
    mov ecx, dword ptr [st_pk + ebx * 4]
    cmp ecx, PC_NOPOKE
    je rs_done
    call group_value
    mov edi, eax
    mov eax, dword ptr [v_round]
    and eax, 1
    call page_va
.if BITS == 64
    mov dword ptr [rsi + rcx * 4], edi
.else
    mov dword ptr [esi + ecx * 4], edi
.endif
    mov dword ptr [st_pk + ebx * 4], PC_NOPOKE
rs_done:
    POPA_
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    mov dword ptr [g_seed + 0], 0
    mov dword ptr [g_step + 0], 0
    mov dword ptr [g_seed + 4], 0xffffffff
    mov dword ptr [g_step + 4], 0
    mov dword ptr [g_seed + 8], 0x11110000
    mov dword ptr [g_step + 8], 0x00010001
    mov dword ptr [g_seed + 12], 0x33330000
    mov dword ptr [g_step + 12], 0x00020003
    mov dword ptr [g_seed + 16], 0
    mov dword ptr [g_step + 16], 1
    mov dword ptr [v_round], 0

    # ---- the address space: identity (supervisor, large pages) + the window (4 KiB ptes)
    NEW_ROOT v_root
    xor ebx, ebx
mk_win:
    call win_va
    mov eax, ebx
    shl eax, 12
    add eax, DATA | PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc ebx
    cmp ebx, NPG
    jb mk_win
    xor ebx, ebx
    call win_va
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    mov dword ptr [v_wpt], eax
    LOAD_CR3 v_root

    # ---- every page gets its group's content, written through the identity map
    xor ebx, ebx
init_page:
    mov dword ptr [st_pk + ebx * 4], PC_NOPOKE
    mov dword ptr [st_pv + ebx * 4], 0
    call ident_va
    call model
    call pc_fill
    inc ebx
    cmp ebx, NPG
    jb init_page

    mov ecx, 1
round_loop:
    mov dword ptr [v_round], ecx
    mov ebp, READS
rd_loop:
    mov eax, 1
    lea edx, [ecx + ebp]               # alternate the direction of the window reads
    and edx, 1
    PUSHR ecx, rcx
    mov ecx, 1
    call check_all
    xor eax, eax
    mov ecx, 2
    call check_all
    POPR ecx, rcx
    dec ebp
    jnz rd_loop
    call writes
    PUSHR ecx, rcx
    xor eax, eax
    xor edx, edx
    mov ecx, 3
    call check_all
    mov eax, 1
    xor edx, edx
    mov ecx, 4
    call check_all
    POPR ecx, rcx
    inc ecx
    cmp ecx, ROUNDS
    jbe round_loop

    PASS
    MAIN_EPILOGUE

    PC_ROUTINES                        # pc_fill, pc_verify (lib/pagecheck.inc)
