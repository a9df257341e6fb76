# many_procs.asm -- eight address spaces switching round robin over shared and private page tables.
# x86shadow: modes=32,pae,64
#
# NP = 8 roots. Every root links the same tables for two regions:
#   - the identity map of the low 64 MiB (mode 32: copied large-page PDEs; PAE: the same PD from
#     PDPTE 0; 64: the same PDPT from PML4E 0);
#   - the shared window SWIN: 8 ptes of ONE leaf table PT_S (mode 32: the same PDE -> PT_S; PAE: the
#     same PDPTE -> one PD -> PT_S; 64: the same PML4E -> one PDPT -> one PD -> PT_S).
# Each root also has a private window PWIN: 4 ptes in a leaf table of its own (and, in PAE / 64, its
# own upper tables). All ptes point into a pool of 16 frames, frame k holding FMARK + k at +0.
# Two rounds; in each, process p = 0..7 in turn (turn t = round * 8 + p, s = t + round):
#   1 CR3 := root p; read every shared and private page and compare with the model (a not-present
#     shared pte must fault with error code 0; the handler makes the read return FAULTED). This is
#     where a process sees the shared-pte edits of the processes before it, flushed only by its own
#     CR3 load.
#   2 re-point private ptes k1 = s mod 4 and k2 = k1 + 2, and shared ptes j1 = (s + 2 * round) mod 8
#     and j2 = j1 + 3 (j2 cleared on every third turn) -- all read just before, all written before any
#     flush, always to a different frame;
#   3 INVLPG of k1 only: k1 must read its new frame; INVLPG of j1 only: j1 likewise; then a CR3 reload:
#     k2 and j2 must read theirs;
#   4 re-point shared pte j3 = j1 + 5 with no flush at all: the next process must see it after its
#     CR3 load.
# Finally every process is checked once more.
# Exit codes: 1 private pte after its INVLPG, 2 shared pte after its INVLPG, 3 private pte after the
# CR3 reload, 4 shared pte after the CR3 reload, 10 a shared page in a process's sweep, 11 a private
# page in a sweep, 12 wrong number of faults, 20..22 #PF handler.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"

.set NP, 8
.set NS, 8                             # shared ptes
.set NPP, 4                            # private ptes per process
.set F, 16                             # pool frames
.set ROUNDS, 2
.if BITS == 64
.set SWIN, 0x0000008000000000          # PML4E 1
.set PWIN, 0x0000010000000000          # PML4E 2
.set S_IDX, 1                          # root entry of SWIN
.else
.set SWIN, 0x40000000                  # mode 32: PDE 256; PAE: PDPTE 1
.set PWIN, 0x80000000                  # mode 32: PDE 512; PAE: PDPTE 2
.if PAGING == 2
.set S_IDX, 256
.else
.set S_IDX, 1
.endif
.endif
.if PAGING == 2
.set ID_DWORDS, 16
.else
.set ID_DWORDS, 2
.endif
.set S_OFF, S_IDX * PTE_SIZE
.set FMARK, 0x3c000000
.set FAULTED, 0xfa17fa17
.set PTE_PWU, PTE_P | PTE_W | PTE_U

# variables
.set v_roots, PROG_VARS + 0x000        # NP quads
.set v_ptp, PROG_VARS + 0x060          # NP dwords: each process's private leaf table
.set v_pts, PROG_VARS + 0x090          # PT_S
.set v_cur, PROG_VARS + 0x094          # process whose CR3 is loaded
.set v_turn, PROG_VARS + 0x098
.set pf_count, PROG_VARS + 0x09c
.set pf_exp_cr2, PROG_VARS + 0x0a0     # quad
.set exp_faults, PROG_VARS + 0x0a8
.set v_k1, PROG_VARS + 0x0b0
.set v_k2, PROG_VARS + 0x0b4
.set v_j1, PROG_VARS + 0x0b8
.set v_j2, PROG_VARS + 0x0bc
.set v_j3, PROG_VARS + 0x0c0
.set v_round, PROG_VARS + 0x0c4
.set v_pool, PROG_VARS + 0x100         # F dwords: the pool frames
.set exp_s, PROG_VARS + 0x140          # NS dwords: expected marker of each shared page (0: must fault)
.set exp_p, PROG_VARS + 0x180          # [p * NPP + k] dwords: expected marker of private page k

.macro PUSHR r32, r64
.if BITS == 64
    push \r64
.else
    push \r32
.endif
.endm

.macro POPR r32, r64
.if BITS == 64
    pop \r64
.else
    pop \r32
.endif
.endm

.macro PUSHA_
.if BITS == 64
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
.else
    pushal
.endif
.endm

.macro POPA_
.if BITS == 64
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
.else
    popal
.endif
.endm

# PTE_LEA dst, table, index: dst := address of entry index of the table
.macro PTE_LEA dst, table, index
.if PAGING == 2
    lea \dst, [\table + \index * 4]
.else
    lea \dst, [\table + \index * 8]
.endif
.endm

# ------------------------------------------------------------------ helpers
# sva / pva: ecx = index -> esi (rsi) = SWIN / PWIN + index * 4 KiB
sva:
.if BITS == 64
    push rax
    mov rsi, SWIN
    mov eax, ecx
    shl eax, 12
    add rsi, rax
    pop rax
.else
    mov esi, ecx
    shl esi, 12
    add esi, SWIN
.endif
    ret

pva:
.if BITS == 64
    push rax
    mov rsi, PWIN
    mov eax, ecx
    shl eax, 12
    add rsi, rax
    pop rax
.else
    mov esi, ecx
    shl esi, 12
    add esi, PWIN
.endif
    ret

# probe: esi (rsi) = va -> eax = the dword there, or FAULTED after a not-present #PF
probe:
.if BITS == 64
    mov rax, pf_exp_cr2
    mov qword ptr [rax], rsi
    mov eax, dword ptr [rsi]
.else
    mov dword ptr [pf_exp_cr2], esi
    mov eax, dword ptr [esi]
.endif
probe_resume:
    ret

# probe_cmp: esi (rsi) = va, edx = expected marker (0: the page must fault) -> eax = what was read,
# ZF = it matched; edx = what was expected (FAULTED for 0)
probe_cmp:
    test edx, edx
    jnz pc_read
    mov edx, FAULTED
    inc dword ptr [exp_faults]
pc_read:
    call probe
    cmp eax, edx
    ret

# switch_to: ecx = process: CR3 := its root
switch_to:
    mov dword ptr [v_cur], ecx
    PUSHR eax, rax
    mov eax, dword ptr [v_roots + ecx * 8]
.if BITS == 64
    mov cr3, rax
.else
    mov cr3, eax
.endif
    POPR eax, rax
    ret

# where: print "turn T process P pte I expected X: " (ecx = pte index, edx = expected)
where:
    PUSHR eax, rax
    PRINT "turn "
    mov eax, dword ptr [v_turn]
    call putdec
    PRINT " process "
    mov eax, dword ptr [v_cur]
    call putdec
    PRINT " pte "
    mov eax, ecx
    call putdec
    PRINT " expected "
    mov eax, edx
    call puthex
    PRINT ": "
    POPR eax, rax
    ret

# sweep: the current process reads every shared and private page and compares with the model
sweep:
    PUSHA_
    xor ecx, ecx
sw_shared:
    call sva
    mov edx, dword ptr [exp_s + ecx * 4]
    call probe_cmp
    je sw_shared_ok
    call where
    FAILV 10, "a shared page differs from the model (edits of other processes not seen?)", eax
sw_shared_ok:
    inc ecx
    cmp ecx, NS
    jb sw_shared
    xor ecx, ecx
    mov ebx, dword ptr [v_cur]
    shl ebx, 2                         # * NPP
sw_priv:
    call pva
    lea edx, [ebx + ecx]
    mov edx, dword ptr [exp_p + edx * 4]
    call probe_cmp
    je sw_priv_ok
    call where
    FAILV 11, "a private page differs from the model", eax
sw_priv_ok:
    inc ecx
    cmp ecx, NPP
    jb sw_priv
    mov eax, dword ptr [pf_count]
    cmp eax, dword ptr [exp_faults]
    je sw_faults_ok
    FAILV 12, "wrong number of page faults", eax
sw_faults_ok:
    POPA_
    ret

# pick: edx = slot, eax = current marker of the pte -> eax = a pool frame index, never the frame
# the pte maps now: (turn * 5 + slot * 3 + process + 1) mod F, or the next one
pick:
    PUSHR ecx, rcx
    PUSHR edx, rdx
    PUSHR ebx, rbx
    mov ebx, eax
    mov eax, dword ptr [v_turn]
    imul eax, eax, 5
    lea eax, [eax + edx * 2]
    add eax, edx
    add eax, dword ptr [v_cur]
    inc eax
    xor edx, edx
    mov ecx, F
    div ecx
    mov eax, edx
    lea ecx, [eax + FMARK]
    cmp ecx, ebx
    jne pick_done
    inc eax
    and eax, F - 1
pick_done:
    POPR ebx, rbx
    POPR edx, rdx
    POPR ecx, rcx
    ret

# edit_priv: ecx = k, edx = slot: the current process re-points its private pte k (no flush)
edit_priv:
    PUSHA_
    mov ebx, dword ptr [v_cur]
    shl ebx, 2
    add ebx, ecx                       # exp_p index
    mov eax, dword ptr [exp_p + ebx * 4]
    call pick
    lea edx, [eax + FMARK]
    mov dword ptr [exp_p + ebx * 4], edx
    mov edx, dword ptr [v_pool + eax * 4]
    or edx, PTE_PWU
    mov eax, dword ptr [v_cur]
    mov eax, dword ptr [v_ptp + eax * 4]
    PTE_LEA eax, eax, ecx
    PTE_SET eax, edx, rax, rdx
    POPA_
    ret

# edit_shared: ecx = j, edx = slot, edi = 1 to clear the pte instead: re-points shared pte j (no flush)
edit_shared:
    PUSHA_
    mov eax, dword ptr [v_pts]
    PTE_LEA ebx, eax, ecx              # the pte's address
    test edi, edi
    jz es_frame
    mov dword ptr [exp_s + ecx * 4], 0
    PTE_CLEAR ebx, rbx
    jmp es_done
es_frame:
    mov eax, dword ptr [exp_s + ecx * 4]
    call pick
    lea edx, [eax + FMARK]
    mov dword ptr [exp_s + ecx * 4], edx
    mov edx, dword ptr [v_pool + eax * 4]
    or edx, PTE_PWU
    PTE_SET ebx, edx, rbx, rdx
es_done:
    POPA_
    ret

# invlpg_at: esi (rsi) = va
.macro INVLPG_SI
.if BITS == 64
    invlpg [rsi]
.else
    invlpg [esi]
.endif
.endm

# turn: ebp = turn number, ebx = process
turn:
    PUSHA_
    mov dword ptr [v_turn], ebp
    mov ecx, ebx
    call switch_to
    call sweep
    # the slots of this turn (s = turn + round, so that a process's slots differ between rounds)
    mov eax, ebp
    add eax, dword ptr [v_round]
    mov ecx, eax
    and eax, NPP - 1
    mov dword ptr [v_k1], eax
    add eax, 2
    and eax, NPP - 1
    mov dword ptr [v_k2], eax
    mov eax, dword ptr [v_round]
    lea eax, [ecx + eax * 2]
    and eax, NS - 1
    mov dword ptr [v_j1], eax
    add eax, 3
    and eax, NS - 1
    mov dword ptr [v_j2], eax
    add eax, 2
    and eax, NS - 1
    mov dword ptr [v_j3], eax
    # four ptes of two tables changed, nothing flushed yet
    mov ecx, dword ptr [v_k1]
    xor edx, edx
    call edit_priv
    mov ecx, dword ptr [v_k2]
    mov edx, 1
    call edit_priv
    mov ecx, dword ptr [v_j1]
    mov edx, 2
    xor edi, edi
    call edit_shared
    mov eax, ebp
    xor edx, edx
    mov ecx, 3
    div ecx
    xor edi, edi
    test edx, edx
    jnz tn_j2
    inc edi                            # every third turn: j2 cleared
tn_j2:
    mov ecx, dword ptr [v_j2]
    mov edx, 3
    call edit_shared
    # INVLPG of k1 only
    mov ecx, dword ptr [v_k1]
    call pva
    INVLPG_SI
    mov eax, dword ptr [v_cur]
    shl eax, 2
    add eax, ecx
    mov edx, dword ptr [exp_p + eax * 4]
    call probe_cmp
    je tn_k1_ok
    call where
    FAILV 1, "private pte re-pointed + invlpg: new frame not seen", eax
tn_k1_ok:
    # INVLPG of j1 only
    mov ecx, dword ptr [v_j1]
    call sva
    INVLPG_SI
    mov edx, dword ptr [exp_s + ecx * 4]
    call probe_cmp
    je tn_j1_ok
    call where
    FAILV 2, "shared pte re-pointed + invlpg: new frame not seen", eax
tn_j1_ok:
    # the CR3 reload flushes the others
    RELOAD_CR3
    mov ecx, dword ptr [v_k2]
    call pva
    mov eax, dword ptr [v_cur]
    shl eax, 2
    add eax, ecx
    mov edx, dword ptr [exp_p + eax * 4]
    call probe_cmp
    je tn_k2_ok
    call where
    FAILV 3, "private pte re-pointed, CR3 reloaded: new frame not seen", eax
tn_k2_ok:
    mov ecx, dword ptr [v_j2]
    call sva
    mov edx, dword ptr [exp_s + ecx * 4]
    call probe_cmp
    je tn_j2_ok
    call where
    FAILV 4, "shared pte changed, CR3 reloaded: new translation not seen", eax
tn_j2_ok:
    # one more shared pte, never flushed here: for the next process to see
    mov ecx, dword ptr [v_j3]
    mov edx, 4
    xor edi, edi
    call edit_shared
    POPA_
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    xor eax, eax
    mov dword ptr [pf_count], eax
    mov dword ptr [exp_faults], eax
    mov dword ptr [v_turn], eax
    call idt_init
    mov ecx, 14
    mov eax, pf_handler
    mov edx, GATE_INT0
    call idt_set

    # the pool
    xor ebx, ebx
mk_pool:
    call pt_alloc
    lea edx, [ebx + FMARK]
    mov dword ptr [eax], edx
    mov dword ptr [v_pool + ebx * 4], eax
    inc ebx
    cmp ebx, F
    jb mk_pool

    # root 0: identity map and the shared window (PT_S: shared page j -> pool frame j)
    call pt_alloc
    mov dword ptr [v_roots], eax
    mov dword ptr [v_roots + 4], 0
    mov edi, eax
    mov eax, PTE_P | PTE_W
    call pt_identity
    xor ecx, ecx
mk_shared:
    call sva
    mov eax, dword ptr [v_pool + ecx * 4]
    lea edx, [ecx + FMARK]
    mov dword ptr [exp_s + ecx * 4], edx
    or eax, PTE_PWU
    xor edx, edx
    PUSHR ecx, rcx
    mov ecx, 1
    call pt_map
    POPR ecx, rcx
    and eax, 0xfffff000
    mov dword ptr [v_pts], eax
    inc ecx
    cmp ecx, NS
    jb mk_shared

    # the other roots: the identity-map and shared-window root entries of root 0
    mov ebx, 1
mk_root:
    call pt_alloc
    mov dword ptr [v_roots + ebx * 8], eax
    mov dword ptr [v_roots + ebx * 8 + 4], 0
    mov edi, eax
    mov esi, dword ptr [v_roots]
    mov ecx, ID_DWORDS
.if BITS == 64
    cld
    rep movsd dword ptr [rdi], dword ptr [rsi]
.else
    cld
    rep movsd dword ptr es:[edi], dword ptr [esi]
.endif
    mov esi, dword ptr [v_roots]
    mov ecx, dword ptr [esi + S_OFF]
    mov dword ptr [eax + S_OFF], ecx
.if PAGING >= 3
    mov dword ptr [eax + S_OFF + 4], 0
.endif
    inc ebx
    cmp ebx, NP
    jb mk_root

    # each root's private window: private page k of process p -> pool frame (p + k) mod F
    xor ebx, ebx
mk_priv_p:
    mov edi, dword ptr [v_roots + ebx * 8]
    xor ecx, ecx
mk_priv_k:
    call pva
    lea eax, [ebx + ecx]
    and eax, F - 1
    lea edx, [eax + FMARK]
    PUSHR ebx, rbx
    shl ebx, 2
    add ebx, ecx
    mov dword ptr [exp_p + ebx * 4], edx
    POPR ebx, rbx
    mov eax, dword ptr [v_pool + eax * 4]
    or eax, PTE_PWU
    xor edx, edx
    PUSHR ecx, rcx
    mov ecx, 1
    call pt_map
    POPR ecx, rcx
    and eax, 0xfffff000
    mov dword ptr [v_ptp + ebx * 4], eax
    inc ecx
    cmp ecx, NPP
    jb mk_priv_k
    inc ebx
    cmp ebx, NP
    jb mk_priv_p

    # the rounds
    xor ebp, ebp
rounds:
    mov eax, ebp
    xor edx, edx
    mov ecx, NP
    div ecx
    mov dword ptr [v_round], eax
    mov ebx, edx                       # process = turn mod NP
    call turn
    inc ebp
    cmp ebp, NP * ROUNDS
    jb rounds

    # a last sweep of every process
    mov dword ptr [v_turn], ebp
    xor ecx, ecx
final:
    call switch_to
    call sweep
    inc ecx
    cmp ecx, NP
    jb final

    xor ecx, ecx
    call switch_to
    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ #PF handler: only probe may fault
pf_handler:
    SAVE_ALL
.if BITS == 64
    mov rax, cr2
    mov rcx, pf_exp_cr2
    cmp rax, qword ptr [rcx]
.else
    mov eax, cr2
    cmp eax, dword ptr [pf_exp_cr2]
.endif
    je pf_cr2_ok
    FAILV 20, "#PF at an unexpected address", eax
pf_cr2_ok:
.if BITS == 64
    mov eax, dword ptr [rsp + FRAME_ERR]
.else
    mov eax, dword ptr [esp + FRAME_ERR]
.endif
    CHECK_EQ eax, 0, 21, "#PF: error code is not 0 (not-present read)"
.if BITS == 64
    mov rax, qword ptr [rsp + FRAME_IP]
    mov rcx, probe
    cmp rax, rcx
    jb pf_bad_ip
    mov rcx, probe_resume
    cmp rax, rcx
    jae pf_bad_ip
    mov qword ptr [rsp + FRAME_IP], rcx
    mov dword ptr [rsp + 112], FAULTED # saved rax (low half): the read returns FAULTED
.else
    mov eax, dword ptr [esp + FRAME_IP]
    cmp eax, probe
    jb pf_bad_ip
    cmp eax, probe_resume
    jae pf_bad_ip
    mov dword ptr [esp + FRAME_IP], probe_resume
    mov dword ptr [esp + 28], FAULTED
.endif
    inc dword ptr [pf_count]
    RESTORE_ALL
    IRET_ERR
pf_bad_ip:
    FAILV 22, "#PF outside probe", eax
