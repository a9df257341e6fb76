# fork_cow.asm -- fork with copy-on-write: write-protected ptes shared by two processes, COW #PFs.
# x86shadow: modes=32,pae,64
#
# The parent maps N = 48 pages P|W|U at UBASE, half of them at the end of one leaf page table and half
# at the start of the next (so two leaf tables). Page i is frame O_i holding MARK + i at +0 and
# MARK2 + i at +0xffc; the parent reads every page and writes PRE + i at +4 (the shadow MMU then holds
# writable translations of all of them). Fork, as Linux's copy_one_pte does it:
#   - a fresh child root shares the identity-map entries of the parent's root;
#   - for each pte: the parent's W bit is cleared in place with a locked RMW (`lock and` for even
#     pages, `lock btr` for odd ones), and the write-protected value (A cleared) is stored into the
#     child's fresh leaf tables; nothing is flushed yet.
# Then (the stale window): INVLPG of page 0 only and a parent write there -> one COW fault; then the
# parent reloads CR3 and only after that writes other pages.
# Every first write of a process to a page it shares faults with P|W (CPL0, CR0.WP = 1). The #PF handler
# checks CR2 and the error code and either copies the page to a fresh frame and points the faulting
# process's pte at the copy with W set (the other process still uses O_i), or -- when the other
# process already has its own copy -- sets W in place (Linux's wp_page_reuse); then INVLPG and the
# write is retried. Write phases (i mod 6 picks the pages): parent {0,3}, child {0,2,4}, parent {0,2},
# child {3}; then both again over the pages they own (no new faults). Residues 1 and 5 are never
# written.
# Checks after the phases (every page in both processes, switching CR3): each process reads its own
# last write at +4 and the markers at +0 / +0xffc; a page nobody wrote is still O_i in both ptes,
# without W; a page somebody wrote has different frames in the two ptes, W exactly where the process
# wrote; the number of faults equals the number of first writes, copies = pages written by anyone,
# reuses = pages written by both.
# Exit codes: 1 the stale-window write did not fault once, 2 wrong number of faults after a phase,
# 3 pre-fork marker, 4 a value read right after a write differs, 10..12 data read in a process,
# 13/14 W bit of the parent's / child's pte, 15 an unwritten page lost its original frame, 16 a
# written page has one frame in both ptes, 17 copies, 18 reuses, 40..44 #PF handler.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"
.include "lib/probe.inc"                # pf_count, exp_faults, pf_exp_cr2, PF_SETUP, CHECK_FAULTS

.set N, 48
.set HALF, 24
.if BITS == 64
.set UWIN, 0x0000008000000000          # PML4 index 1: the child needs tables at every level
.else
.set UWIN, 0x40000000
.endif
.set UBASE, UWIN + LARGE_PAGE - HALF * PAGE    # a leaf table covers LARGE_PAGE: 24 pages in each
.set MARK, 0x66000000
.set MARK2, 0x77000000
.set PRE, 0x50000000
.set TAG_A, 0x0a000000
.set TAG_B, 0x0b000000
.set TAG_C, 0x0c000000
.set TAG_D, 0x0d000000
.set TAG_E, 0x0e000000
.set TAG_F, 0x0f000000
.set PF_PW, PF_P | PF_W
.set NOT_W, 0xfffffffd
.set NOT_A, 0xffffffdf

# variables
.set v_root, PROG_VARS + 0x00          # 2 quads: parent, child
.set v_cur, PROG_VARS + 0x10           # the process whose CR3 is loaded
.set pf_copies, PROG_VARS + 0x1c
.set pf_cr2, PROG_VARS + 0x28          # quad
.set pf_reuses, PROG_VARS + 0x30
.set v_cnt_w, PROG_VARS + 0x34
.set v_cnt_b, PROG_VARS + 0x38
.set v_orig, PROG_VARS + 0x40          # N dwords: O_i
.set v_ref, PROG_VARS + 0x100          # N dwords: processes using O_i
.set exp_val, PROG_VARS + 0x200        # [p * N + i] dwords: the value process p must read at +4
.set written, PROG_VARS + 0x400        # [p * N + i] dwords: 1 once process p wrote page i
.set written_c, written + N * 4

# CHECK_COW_FAULTS code: fail with code unless the COW faults taken are the first writes counted
.macro CHECK_COW_FAULTS code
    CHECK_FAULTS \code, "wrong number of COW faults after a phase"
.endm

# ------------------------------------------------------------------ helpers
# uva: ebx = page index -> esi (rsi) = UBASE + index * 4 KiB
uva:
    PAGE_VA UBASE, ebx
    ret

# pte_of: ecx = process, ebx = page index -> eax (rax) = address of its pte (0: no table)
pte_of:
    PUSHR ecx, rcx
    PUSHR edx, rdx
    PUSHR esi, rsi
    PUSHR edi, rdi
    mov edi, dword ptr [v_root + ecx * 8]
    call uva
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    POPR edi, rdi
    POPR esi, rsi
    POPR edx, rdx
    POPR ecx, rcx
    ret

# switch_to: ecx = process: CR3 := its root
switch_to:
    SWITCH_CR3 v_root, v_cur
    ret

# where: print "process ecx page ebx: " (before a failure report)
where:
    PUSHR eax, rax
    PRINT_DEC "process ", ecx
    PRINT_DEC " page ", ebx
    PRINT ": "
    POPR eax, rax
    ret

# uwrite: ebx = page index, edx = value: the current process writes it at +4 of the page (a first
# write of a shared page faults: counted in exp_faults), then reads it back
uwrite:
    PUSHR eax, rax
    PUSHR ecx, rcx
    PUSHR esi, rsi
    mov ecx, dword ptr [v_cur]
    imul ecx, ecx, N
    add ecx, ebx
    cmp dword ptr [written + ecx * 4], 0
    jne uw_known
    mov dword ptr [written + ecx * 4], 1
    inc dword ptr [exp_faults]
uw_known:
    mov dword ptr [exp_val + ecx * 4], edx
    call uva
.if BITS == 64
    add rsi, 4
    mov rax, pf_exp_cr2
    mov qword ptr [rax], rsi
    mov dword ptr [rsi], edx
    mov eax, dword ptr [rsi]
.else
    add esi, 4
    mov dword ptr [pf_exp_cr2], esi
    mov dword ptr [esi], edx
    mov eax, dword ptr [esi]
.endif
    cmp eax, edx
    je uw_ok
    mov ecx, dword ptr [v_cur]
    call where
    FAILV 4, "value read right after the write differs", eax
uw_ok:
    POPR esi, rsi
    POPR ecx, rcx
    POPR eax, rax
    ret

# write_set: ecx = mask of residues (bit r: pages i with i mod 6 == r), edx = tag: the current process
# writes tag + i to each of those pages
write_set:
    PUSHA_
    xor ebx, ebx
    xor edi, edi                       # i mod 6
ws_loop:
    bt ecx, edi
    jnc ws_next
    PUSHR edx, rdx
    add edx, ebx
    call uwrite
    POPR edx, rdx
ws_next:
    inc edi
    cmp edi, 6
    jb ws_r
    xor edi, edi
ws_r:
    inc ebx
    cmp ebx, N
    jb ws_loop
    POPA_
    ret

# verify: every page in both processes (data through CR3 switches, then both ptes through the
# identity map), and the handler's copy / reuse counts. Leaves the child's CR3 loaded.
verify:
    PUSHA_
    mov dword ptr [v_cnt_w], 0
    mov dword ptr [v_cnt_b], 0
    xor ecx, ecx
vf_proc:
    call switch_to
    xor ebx, ebx
vf_page:
    call uva
    LDSI eax, 0
    lea edx, [ebx + MARK]
    cmp eax, edx
    je vf_m0_ok
    call where
    FAILV 10, "marker at +0 wrong", eax
vf_m0_ok:
    LDSI eax, 4
    imul edx, ecx, N
    add edx, ebx
    mov edx, dword ptr [exp_val + edx * 4]
    cmp eax, edx
    je vf_v_ok
    call where
    PUSHR eax, rax
    PRINT_HEX "expected ", edx
    POPR eax, rax
    PRINT ": "
    FAILV 11, "the process does not read its own data at +4", eax
vf_v_ok:
    LDSI eax, 0xffc
    lea edx, [ebx + MARK2]
    cmp eax, edx
    je vf_m1_ok
    call where
    FAILV 12, "marker at +0xffc wrong", eax
vf_m1_ok:
    inc ebx
    cmp ebx, N
    jb vf_page
    inc ecx
    cmp ecx, 2
    jb vf_proc

    xor ebx, ebx
vf_pte:
    xor ecx, ecx
    call pte_of
    mov esi, dword ptr [eax]           # parent's pte (low half)
    mov ecx, 1
    call pte_of
    mov edi, dword ptr [eax]           # child's pte
    mov eax, dword ptr [written + ebx * 4]
    mov edx, dword ptr [written_c + ebx * 4]
    mov ebp, esi
    shr ebp, 1
    and ebp, 1
    cmp ebp, eax
    je vf_wp_ok
    xor ecx, ecx
    call where
    FAILV 13, "W in the parent's pte is not exactly 'the parent wrote the page'", esi
vf_wp_ok:
    mov ebp, edi
    shr ebp, 1
    and ebp, 1
    cmp ebp, edx
    je vf_wc_ok
    mov ecx, 1
    call where
    FAILV 14, "W in the child's pte is not exactly 'the child wrote the page'", edi
vf_wc_ok:
    and esi, 0xfffff000
    and edi, 0xfffff000
    test eax, eax
    jnz vf_pf_ok
    cmp esi, dword ptr [v_orig + ebx * 4]
    je vf_pf_ok
    xor ecx, ecx
    call where
    FAILV 15, "a page the process never wrote is not the original frame", esi
vf_pf_ok:
    test edx, edx
    jnz vf_cf_ok
    cmp edi, dword ptr [v_orig + ebx * 4]
    je vf_cf_ok
    mov ecx, 1
    call where
    FAILV 15, "a page the process never wrote is not the original frame", edi
vf_cf_ok:
    mov ebp, eax
    or ebp, edx
    jz vf_pte_next
    inc dword ptr [v_cnt_w]
    cmp esi, edi
    jne vf_split_ok
    xor ecx, ecx
    call where
    FAILV 16, "a written page has the same frame in both processes", esi
vf_split_ok:
    test eax, eax
    jz vf_pte_next
    test edx, edx
    jz vf_pte_next
    inc dword ptr [v_cnt_b]
vf_pte_next:
    inc ebx
    cmp ebx, N
    jb vf_pte
    mov eax, dword ptr [pf_copies]
    cmp eax, dword ptr [v_cnt_w]
    je vf_copies_ok
    FAILV 17, "COW copies differ from the number of pages written", eax
vf_copies_ok:
    mov eax, dword ptr [pf_reuses]
    cmp eax, dword ptr [v_cnt_b]
    je vf_reuses_ok
    FAILV 18, "COW reuses differ from the number of pages both processes wrote", eax
vf_reuses_ok:
    POPA_
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    xor eax, eax
    mov dword ptr [pf_copies], eax
    mov dword ptr [pf_reuses], eax
    xor ecx, ecx
clr_vars:
    mov dword ptr [written + ecx * 4], 0
    inc ecx
    cmp ecx, 2 * N
    jb clr_vars

    PF_SETUP pf_handler

    # ---- the parent's pages and address space
    xor ebx, ebx
mk_frames:
    call pt_alloc
    lea edx, [ebx + MARK]
    mov dword ptr [eax], edx
    lea edx, [ebx + MARK2]
    mov dword ptr [eax + 0xffc], edx
    mov dword ptr [v_orig + ebx * 4], eax
    inc ebx
    cmp ebx, N
    jb mk_frames
    NEW_ROOT v_root
    xor ebx, ebx
mk_map:
    call uva
    mov eax, dword ptr [v_orig + ebx * 4]
    or eax, PTE_P | PTE_W | PTE_U
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc ebx
    cmp ebx, N
    jb mk_map
    xor ecx, ecx
    call switch_to

    # ---- the parent uses every page (writable translations get cached)
    xor ebx, ebx
touch:
    call uva
    LDSI eax, 0
    lea edx, [ebx + MARK]
    cmp eax, edx
    je touch_ok
    xor ecx, ecx
    call where
    FAILV 3, "the parent does not read its marker before the fork", eax
touch_ok:
    lea edx, [ebx + PRE]
    STSI 4, edx
    mov dword ptr [exp_val + ebx * 4], edx
    mov dword ptr [exp_val + N * 4 + ebx * 4], edx
    inc ebx
    cmp ebx, N
    jb touch

    # ---- fork: the child's root shares the identity-map entries
    SHARED_ROOT v_root, 1
    # ... and a write-protected copy of each pte (the parent's write-protected in place)
    xor ebx, ebx
fk_copy:
    mov dword ptr [v_ref + ebx * 4], 2
    xor ecx, ecx
    call pte_of
    test ebx, 1
    jnz fk_btr
.if BITS == 64
    lock and dword ptr [rax], NOT_W
.else
    lock and dword ptr [eax], NOT_W
.endif
    jmp fk_wp_done
fk_btr:
.if BITS == 64
    lock btr dword ptr [rax], 1
.else
    lock btr dword ptr [eax], 1
.endif
fk_wp_done:
    mov edi, dword ptr [v_root + 8]
    call uva
    mov ecx, 1
.if BITS == 64
    mov rax, qword ptr [rax]
    btr rax, 5                         # A (bit 5)
.else
    mov edx, dword ptr [eax + 4]
    mov eax, dword ptr [eax]
.if PAGING == 2
    xor edx, edx
.endif
    and eax, NOT_A
.endif
    call pt_map
    inc ebx
    cmp ebx, N
    jb fk_copy

    # ---- the stale window: only page 0 is flushed; a write there must fault at once
    xor ebx, ebx
    call uva
    INVLPG_SI
    mov edx, TAG_A
    call uwrite
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, 1, 1, "the parent's write after the fork (page 0, invlpg) did not fault once"
    RELOAD_CR3                         # the parent's flush after the copy (flush_tlb_mm)

    # ---- the write phases
    mov ecx, 0x09                      # parent {0,3}
    mov edx, TAG_B
    call write_set
    CHECK_COW_FAULTS 2
    mov ecx, 1
    call switch_to
    mov ecx, 0x15                      # child {0,2,4}
    mov edx, TAG_C
    call write_set
    CHECK_COW_FAULTS 2
    xor ecx, ecx
    call switch_to
    mov ecx, 0x05                      # parent {0,2}
    mov edx, TAG_D
    call write_set
    CHECK_COW_FAULTS 2
    mov ecx, 1
    call switch_to
    mov ecx, 0x08                      # child {3}
    mov edx, TAG_E
    call write_set
    CHECK_COW_FAULTS 2
    call verify

    # ---- both again, round robin, over the pages each owns: no new faults
    xor ebx, ebx
rr_loop:
    mov ecx, ebx
    and ecx, 1
    call switch_to
    mov edx, ebx
    shl edx, 20
    add edx, TAG_F
    test ecx, ecx
    mov ecx, 0x0d                      # parent {0,2,3}
    jz rr_write
    mov ecx, 0x1d                      # child {0,2,3,4}
rr_write:
    call write_set
    inc ebx
    cmp ebx, 4
    jb rr_loop
    CHECK_COW_FAULTS 2
    call verify

    xor ecx, ecx
    call switch_to
    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ #PF handler: COW
pf_handler:
    SAVE_ALL frame=1
    mov eax, dword ptr [ebp + FRAME_ERR]
    CHECK_EQ eax, PF_PW, 40, "#PF: error code is not P|W"
.if BITS == 64
    mov rax, cr2
    mov rcx, pf_cr2
    mov qword ptr [rcx], rax
    mov rcx, pf_exp_cr2
    cmp rax, qword ptr [rcx]
    je pf_cr2_ok
    FAILV 41, "#PF at an unexpected address", rax
pf_cr2_ok:
    mov rcx, UBASE
    sub rax, rcx
.else
    mov eax, cr2
    mov dword ptr [pf_cr2], eax
    cmp eax, dword ptr [pf_exp_cr2]
    je pf_cr2_ok
    FAILV 41, "#PF at an unexpected address", eax
pf_cr2_ok:
    sub eax, UBASE
.endif
    shr eax, 12
    mov ebx, eax                       # page index
    mov ecx, dword ptr [v_cur]
    call pte_of
    mov edx, dword ptr [eax]
    test edx, PTE_P
    jnz pf_present
    call where
    FAILV 44, "#PF: the pte is not present", edx
pf_present:
    test edx, PTE_W
    jz pf_ro
    call where
    FAILV 42, "#PF: the pte is writable already (spurious fault)", edx
pf_ro:
    mov esi, edx
    and esi, 0xfffff000
    cmp esi, dword ptr [v_orig + ebx * 4]
    je pf_orig
    call where
    FAILV 43, "#PF: a read-only pte that is not the original frame", edx
pf_orig:
    cmp dword ptr [v_ref + ebx * 4], 1
    je pf_reuse
    # the other process still uses the frame: copy it
    mov ebp, eax                       # the pte's address
    call pt_alloc
    mov edi, eax
    mov ecx, PAGE / 4
    cld
    rep movsd
    mov ecx, edx
    and ecx, 0xfff
    or ecx, PTE_W
    or ecx, eax
    PTE_SET ebp, ecx, rbp, rcx
    mov dword ptr [v_ref + ebx * 4], 1
    inc dword ptr [pf_copies]
    jmp pf_flush
pf_reuse:
    # the other process has its own copy: this one keeps the frame, writable again
.if BITS == 64
    lock bts dword ptr [rax], 1
.else
    lock bts dword ptr [eax], 1
.endif
    inc dword ptr [pf_reuses]
pf_flush:
.if BITS == 64
    mov rax, pf_cr2
    mov rax, qword ptr [rax]
    invlpg [rax]
.else
    mov eax, dword ptr [pf_cr2]
    invlpg [eax]
.endif
    inc dword ptr [pf_count]
    RESTORE_ALL
    IRET_ERR
