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
.include "lib/probe.inc"

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
.set S_OFF, S_IDX * PTE_SIZE
.set FMARK, 0x3c000000
.set FAULTED, 0xfa17fa17                # what probe returns for a not-present page
.set PTE_PWU, PTE_P | PTE_W | PTE_U

# variables (and pf_count, exp_faults, pf_exp_cr2: lib/probe.inc)
.set v_roots, PROG_VARS + 0x000        # NP quads
.set v_ptp, PROG_VARS + 0x060          # NP dwords: each process's private leaf table
.set v_pts, PROG_VARS + 0x090          # PT_S
.set v_cur, PROG_VARS + 0x094          # process whose CR3 is loaded
.set v_turn, PROG_VARS + 0x098
.set v_k1, PROG_VARS + 0x0b0
.set v_k2, PROG_VARS + 0x0b4
.set v_j1, PROG_VARS + 0x0b8
.set v_j2, PROG_VARS + 0x0bc
.set v_j3, PROG_VARS + 0x0c0
.set v_round, PROG_VARS + 0x0c4
.set v_pool, PROG_VARS + 0x100         # F dwords: the pool frames
.set exp_s, PROG_VARS + 0x140          # NS dwords: expected marker of each shared page (0: must fault)
.set exp_p, PROG_VARS + 0x180          # [p * NPP + k] dwords: expected marker of private page k

# ------------------------------------------------------------------ helpers
# sva / pva: ecx = index -> esi (rsi) = SWIN / PWIN + index * 4 KiB
sva:
    PAGE_VA SWIN, ecx
    ret

pva:
    PAGE_VA PWIN, ecx
    ret

# probe: esi (rsi) = va -> eax = the dword there, or FAULTED after a not-present #PF;
# probe_cmp: esi (rsi) = va, edx = expected marker (0: the page must fault) -> eax = what was read,
# ZF = it matched; edx = what was expected (FAULTED for 0)  (lib/probe.inc)
    PROBE_ROUTINES

# switch_to: ecx = process: CR3 := its root
switch_to:
    SWITCH_CR3 v_roots, v_cur
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
    PRINT_DEC " pte ", ecx
    PRINT_HEX " expected ", edx
    PRINT ": "
    POPR eax, rax
    ret

# shared_cmp / priv_cmp: ecx = j / k, esi (rsi) = the address of shared page j / of the current
# process's private page k: probe_cmp against the model (edx := the marker expected there)
shared_cmp:
    mov edx, dword ptr [exp_s + ecx * 4]
    jmp probe_cmp

priv_cmp:
    mov edx, dword ptr [v_cur]
    shl edx, 2                         # * NPP
    add edx, ecx
    mov edx, dword ptr [exp_p + edx * 4]
    jmp probe_cmp

# sweep: the current process reads every shared and private page and compares with the model
sweep:
    PUSHA_
    xor ecx, ecx
sw_shared:
    call sva
    call shared_cmp
    je sw_shared_ok
    call where
    FAILV 10, "a shared page differs from the model (edits of other processes not seen?)", eax
sw_shared_ok:
    inc ecx
    cmp ecx, NS
    jb sw_shared
    xor ecx, ecx
sw_priv:
    call pva
    call priv_cmp
    je sw_priv_ok
    call where
    FAILV 11, "a private page differs from the model", eax
sw_priv_ok:
    inc ecx
    cmp ecx, NPP
    jb sw_priv
    CHECK_FAULTS 12
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

# repoint: edi = the model's dword of a page (exp_s / exp_p), edx = slot: a new frame for the page
# (pick); [edi] := its marker -> edx = the new pte (frame | P|W|U)
repoint:
    PUSHR eax, rax
    mov eax, dword ptr [edi]
    call pick
    lea edx, [eax + FMARK]
    mov dword ptr [edi], edx
    mov edx, dword ptr [v_pool + eax * 4]
    or edx, PTE_PWU
    POPR eax, rax
    ret

# map_pool: edi (rdi) = root, esi (rsi) = va, eax = pool frame index: maps va -> that frame (P|W|U)
# -> eax = the leaf table that maps it
map_pool:
    PUSHR ecx, rcx
    PUSHR edx, rdx
    mov eax, dword ptr [v_pool + eax * 4]
    or eax, PTE_PWU
    xor edx, edx
    mov ecx, 1
    call pt_map
    and eax, 0xfffff000
    POPR edx, rdx
    POPR ecx, rcx
    ret

# edit_priv: ecx = k, edx = slot: the current process re-points its private pte k (no flush)
edit_priv:
    PUSHA_
    mov edi, dword ptr [v_cur]
    shl edi, 2
    add edi, ecx                       # exp_p index
    lea edi, [exp_p + edi * 4]
    call repoint
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
    lea edi, [exp_s + ecx * 4]
    call repoint
    PTE_SET ebx, edx, rbx, rdx
es_done:
    POPA_
    ret

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
    call priv_cmp
    je tn_k1_ok
    call where
    FAILV 1, "private pte re-pointed + invlpg: new frame not seen", eax
tn_k1_ok:
    # INVLPG of j1 only
    mov ecx, dword ptr [v_j1]
    call sva
    INVLPG_SI
    call shared_cmp
    je tn_j1_ok
    call where
    FAILV 2, "shared pte re-pointed + invlpg: new frame not seen", eax
tn_j1_ok:
    # the CR3 reload flushes the others
    RELOAD_CR3
    mov ecx, dword ptr [v_k2]
    call pva
    call priv_cmp
    je tn_k2_ok
    call where
    FAILV 3, "private pte re-pointed, CR3 reloaded: new frame not seen", eax
tn_k2_ok:
    mov ecx, dword ptr [v_j2]
    call sva
    call shared_cmp
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
    mov dword ptr [v_turn], 0
    PF_SETUP pf_handler

    # the pool
    MARKED_FRAMES v_pool, F, FMARK

    # root 0: identity map and the shared window (PT_S: shared page j -> pool frame j)
    NEW_ROOT v_roots
    xor ecx, ecx
mk_shared:
    call sva
    lea edx, [ecx + FMARK]
    mov dword ptr [exp_s + ecx * 4], edx
    mov eax, ecx
    call map_pool
    mov dword ptr [v_pts], eax
    inc ecx
    cmp ecx, NS
    jb mk_shared

    # the other roots: the identity-map and shared-window root entries of root 0
    mov ebx, 1
mk_root:
    SHARED_ROOT v_roots, ebx
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
    call map_pool
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
    PROBE_PF_HANDLER 20
