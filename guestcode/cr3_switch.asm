# cr3_switch.asm -- three address spaces that share some page tables and differ in others.
# x86shadow: modes=32,pae,64
#
# Spaces A, B, C (three CR3s). Each identity-maps the low 64 MiB (mode 32: its own PDEs; PAE: the same
# PD linked from every PDPT; 64: the same PDPT linked from every PML4) and has, in a window WIN:
#   WIN + 0x000000  4 pages through ONE page table PT_S linked from all three spaces' PDEs   (shared)
#   WIN + 0x400000  2 pages through a page table of its own (different frames per space)   (private)
#   WIN + 0x40000000 (pae/64) 1 page: A through a PD of its own, B and C through ONE shared PD
# A sweep switches CR3 A -> B -> C several rounds and reads every page, comparing with the expected
# marker of that space (a not-present page must raise #PF; the handler makes the read return 0).
# Steps, each followed by sweeps:
#   1 initial state
#   2 a data write through the shared page in A is read in B and C
#   3 in A: shared pte re-pointed + invlpg: A sees it at once, B and C after their CR3 load
#   4 in B: shared pte re-pointed without invlpg, then CR3 := C: C sees it
#   5 in B: private pte re-pointed + invlpg: only B sees it
#   6 in C: its private PDE re-pointed at A's private page table (CR3 reload): C sees A's pages; then in
#     A a pte of that table is re-pointed + invlpg: A and C see it
#   7 in C: a shared pte cleared + invlpg: every space faults there; restored from A
#   8 (pae/64) in A: its root-level entry for the third window re-pointed at B's and C's PD (CR3
#     reload); then in B a pte of that shared table re-pointed + invlpg: all three see it
#   9 a long sweep
# Exit codes: 1..9 direct checks, 10 private / 11 shared / 12 third-window mismatch in a sweep,
# 13 wrong number of faults, 20..22 #PF handler.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"
.include "lib/probe.inc"

.if BITS == 64
.set WIN, 0x0000008000000000           # PML4 index 1
.else
.set WIN, 0x40000000
.endif
.set O_SHARED, 0
.set O_PRIV, 0x400000
.set O_BC, 0x40000000
.set FAULTED, 0                        # what win_read (probe) returns for a not-present page

# variables (and pf_count, exp_faults, pf_exp_cr2: lib/probe.inc)
.set v_roots, PROG_VARS + 0x00         # 3 quads
.set exp_priv, PROG_VARS + 0x40        # [space * 2 + i] dwords: expected marker (0: must fault)
.set exp_shared, PROG_VARS + 0x60      # [i] dwords
.set exp_bc, PROG_VARS + 0x70          # [space] dwords
.set v_pt_s, PROG_VARS + 0x80          # the shared page table
.set v_pde_priv, PROG_VARS + 0x88      # 3 quads: address of each space's PDE for WIN + O_PRIV
.set v_l3_bc, PROG_VARS + 0xa0         # 3 quads: address of each space's level-3 entry for WIN + O_BC
.set v_round, PROG_VARS + 0xd0
.set v_space, PROG_VARS + 0xd4
.set v_s3frame, PROG_VARS + 0xd8       # the original frame of shared page 3

.set M_SHARED, 0x5a000000              # + i
.set M_PRIV, 0x50000000                # + space * 0x100 + i
.set M_A2, 0x0a200000
.set M_BC, 0x0bc00000
.set M_NEW, 0x4e000000                 # + n: frames mapped by the steps

# ------------------------------------------------------------------ helpers
# win_va: ecx = offset -> esi (rsi) = WIN + offset
win_va:
.if BITS == 64
    mov rsi, WIN
    add rsi, rcx
.else
    lea esi, [ecx + WIN]
.endif
    ret

# probe: esi (rsi) = va -> eax = the dword there, or FAULTED (0) after a not-present #PF;
# probe_cmp: esi (rsi) = va, edx = expected marker (0: the page must fault) -> eax = what was read,
# ZF = it matched (lib/probe.inc)
    PROBE_ROUTINES

# win_read: ecx = offset -> eax = the dword at WIN + offset, or 0 when it faults (not present)
win_read:
    PUSHR esi, rsi
    call win_va
    call probe
    POPR esi, rsi
    ret

# win_write: ecx = offset, edx = value
win_write:
    PUSHR esi, rsi
    call win_va
    STSI 0, edx
    POPR esi, rsi
    ret

# win_invlpg: ecx = offset
win_invlpg:
    PUSHR esi, rsi
    call win_va
    INVLPG_SI
    POPR esi, rsi
    ret

# switch_to: ecx = space (0..2): CR3 := its root
switch_to:
    SWITCH_CR3 v_roots, v_space
    ret

# new_frame: eax = marker -> eax = a fresh frame holding the marker at offset 0
new_frame:
    PUSHR edx, rdx
    mov edx, eax
    call pt_alloc
    mov dword ptr [eax], edx
    POPR edx, rdx
    ret

# pte_addr: ebx = space, ecx = offset -> eax = address of the pte mapping WIN + offset in that space
pte_addr:
    PUSHR edi, rdi
    PUSHR esi, rsi
    PUSHR edx, rdx
    PUSHR ecx, rcx
    mov edi, dword ptr [v_roots + ebx * 8]
    call win_va
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    POPR ecx, rcx
    POPR edx, rdx
    POPR esi, rsi
    POPR edi, rdi
    ret

# entry_addr: ebx = space, ecx = offset, edx = level -> eax = entry address (allocating tables)
entry_addr:
    PUSHR edi, rdi
    PUSHR esi, rsi
    PUSHR ecx, rcx
    mov edi, dword ptr [v_roots + ebx * 8]
    call win_va
    mov ecx, 1
    call pt_entry
    POPR ecx, rcx
    POPR esi, rsi
    POPR edi, rdi
    ret

# map_in: ebx = space, ecx = offset, eax = frame: maps WIN + offset -> frame (P|W) in that space
map_in:
    PUSHR edi, rdi
    PUSHR esi, rsi
    PUSHR ecx, rcx
    PUSHR edx, rdx
    mov edi, dword ptr [v_roots + ebx * 8]
    call win_va
    or eax, PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    POPR edx, rdx
    POPR ecx, rcx
    POPR esi, rsi
    POPR edi, rdi
    ret

# sweep: ecx = rounds; for each round, spaces 0, 1, 2: read every window page, compare
sweep:
    PUSHA_
    mov dword ptr [v_round], ecx
sw_round:
    xor ebx, ebx
sw_space:
    mov ecx, ebx
    call switch_to
    # private pages
    xor edi, edi
sw_priv:
    mov ecx, edi
    shl ecx, 12
    add ecx, O_PRIV
    call win_va
    lea edx, [ebx + ebx]
    add edx, edi
    mov edx, dword ptr [exp_priv + edx * 4]
    call probe_cmp
    je sw_priv_ok
    call sweep_where
    FAILV 10, "sweep: private page holds the wrong marker", eax
sw_priv_ok:
    inc edi
    cmp edi, 2
    jb sw_priv
    # shared pages
    xor edi, edi
sw_shared:
    mov ecx, edi
    shl ecx, 12
    add ecx, O_SHARED
    call win_va
    mov edx, dword ptr [exp_shared + edi * 4]
    call probe_cmp
    je sw_shared_ok
    call sweep_where
    FAILV 11, "sweep: shared page holds the wrong marker", eax
sw_shared_ok:
    inc edi
    cmp edi, 4
    jb sw_shared
.if PAGING >= 3
    mov ecx, O_BC
    call win_va
    mov edx, dword ptr [exp_bc + ebx * 4]    # (never 0: the third window is always mapped)
    call probe_cmp
    je sw_bc_ok
    xor edi, edi
    call sweep_where
    FAILV 12, "sweep: third window holds the wrong marker", eax
sw_bc_ok:
.endif
    inc ebx
    cmp ebx, 3
    jb sw_space
    dec dword ptr [v_round]
    jnz sw_round
    CHECK_FAULTS 13, "sweep: wrong number of page faults"
    POPA_
    ret

# print "space S page I: " before a sweep failure (ebx = space, edi = page)
sweep_where:
    PUSHR eax, rax
    PRINT_DEC "space ", ebx
    PRINT_DEC " page ", edi
    PRINT_HEX " expected ", edx
    PRINT ": "
    POPR eax, rax
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    PF_SETUP pf_handler

    # ---- roots: space 0 gets the identity map, 1 and 2 copy its first root entries
    NEW_ROOT v_roots
    mov ebx, 1
mk_root:
    SHARED_ROOT v_roots, ebx           # mode 32: PDEs 0..15; PAE: PDPTE 0; 64: PML4E 0
    inc ebx
    cmp ebx, 3
    jb mk_root

    # ---- shared page table: built in space 0, linked from the PDEs of spaces 1 and 2
    xor edi, edi
mk_shared:
    lea eax, [edi + M_SHARED]
    mov dword ptr [exp_shared + edi * 4], eax
    call new_frame
    cmp edi, 3
    jne mk_shared_map
    mov dword ptr [v_s3frame], eax
mk_shared_map:
    xor ebx, ebx
    mov ecx, edi
    shl ecx, 12
    add ecx, O_SHARED
    call map_in
    inc edi
    cmp edi, 4
    jb mk_shared
    xor ebx, ebx
    mov ecx, O_SHARED
    mov edx, 2
    call entry_addr
    mov edi, dword ptr [eax]           # space 0's PDE: PT_S | flags
    mov edx, edi
    and edx, 0xfffff000
    mov dword ptr [v_pt_s], edx
    mov ebx, 1
mk_link:
    mov ecx, O_SHARED
    mov edx, 2
    call entry_addr
    mov dword ptr [eax], edi
    inc ebx
    cmp ebx, 3
    jb mk_link

    # ---- private pages
    xor ebx, ebx
mk_priv_space:
    xor edi, edi
mk_priv:
    mov eax, ebx
    shl eax, 8
    lea eax, [eax + edi + M_PRIV]
    lea edx, [ebx + ebx]
    add edx, edi
    mov dword ptr [exp_priv + edx * 4], eax
    call new_frame
    mov ecx, edi
    shl ecx, 12
    add ecx, O_PRIV
    call map_in
    inc edi
    cmp edi, 2
    jb mk_priv
    mov ecx, O_PRIV
    mov edx, 2
    call entry_addr
    mov dword ptr [v_pde_priv + ebx * 8], eax
    inc ebx
    cmp ebx, 3
    jb mk_priv_space

.if PAGING >= 3
    # ---- third window: A has its own PD, B and C share one
    xor ebx, ebx
    mov eax, M_A2
    mov dword ptr [exp_bc], eax
    call new_frame
    mov ecx, O_BC
    call map_in
    mov ebx, 1
    mov eax, M_BC
    mov dword ptr [exp_bc + 4], eax
    mov dword ptr [exp_bc + 8], eax
    call new_frame
    mov ecx, O_BC
    call map_in
    mov edx, 3
    call entry_addr
    mov edi, dword ptr [eax]           # B's level-3 entry: PD_BC | flags
    mov ebx, 2
    mov ecx, O_BC
    mov edx, 3
    call entry_addr
    mov dword ptr [eax], edi
    xor ebx, ebx
bc_l3:
    mov ecx, O_BC
    mov edx, 3
    call entry_addr
    mov dword ptr [v_l3_bc + ebx * 8], eax
    inc ebx
    cmp ebx, 3
    jb bc_l3
.endif

    # ---- 1: initial sweep
    mov ecx, 10
    call sweep

    # ---- 2: data written through the shared page in A is seen in B and C
    xor ecx, ecx
    call switch_to
    mov ecx, O_SHARED + 0x1000 + 8
    mov edx, 0xabcd0001
    call win_write
    mov ebx, 1
step2:
    mov ecx, ebx
    call switch_to
    mov ecx, O_SHARED + 0x1000 + 8
    call win_read
    CHECK_EQ eax, 0xabcd0001, 1, "step 2: data written in A not seen through the shared page"
    inc ebx
    cmp ebx, 3
    jb step2

    # ---- 3: in A, a shared pte re-pointed + invlpg
    xor ecx, ecx
    call switch_to
    mov ecx, O_SHARED + 0x2000
    call win_read                      # A has it cached (TLB / shadow): the invlpg below matters
    mov eax, M_NEW + 1
    mov dword ptr [exp_shared + 8], eax
    call new_frame
    or eax, PTE_P | PTE_W
    mov edx, eax
    mov eax, dword ptr [v_pt_s]
    add eax, PTE_SIZE * 2
    call pte_set
    mov ecx, O_SHARED + 0x2000
    call win_invlpg
    call win_read
    CHECK_EQ eax, M_NEW + 1, 2, "step 3: A does not see its shared pte change after invlpg"
    mov ecx, 3
    call sweep

    # ---- 4: in B, a shared pte re-pointed without invlpg, then CR3 := C
    mov ecx, 1
    call switch_to
    mov ecx, O_SHARED + 0x1000
    call win_read                      # B has it cached (read: TLB / shadow)
    mov eax, M_NEW + 2
    mov dword ptr [exp_shared + 4], eax
    call new_frame
    or eax, PTE_P | PTE_W
    mov edx, eax
    mov eax, dword ptr [v_pt_s]
    add eax, PTE_SIZE
    call pte_set
    mov ecx, 2
    call switch_to
    mov ecx, O_SHARED + 0x1000
    call win_read
    CHECK_EQ eax, M_NEW + 2, 3, "step 4: C does not see the shared pte B changed"
    mov ecx, 3
    call sweep

    # ---- 5: in B, a private pte re-pointed + invlpg
    mov ecx, 1
    call switch_to
    mov ecx, O_PRIV
    call win_read                      # cached before the change
    mov eax, M_NEW + 3
    mov dword ptr [exp_priv + 8], eax  # space 1, page 0
    call new_frame
    or eax, PTE_P | PTE_W
    mov edx, eax
    mov ebx, 1
    mov ecx, O_PRIV
    call pte_addr
    call pte_set
    call win_invlpg
    call win_read
    CHECK_EQ eax, M_NEW + 3, 4, "step 5: B does not see its private pte change"
    mov ecx, 3
    call sweep

    # ---- 6: in C, the private PDE re-pointed at A's private page table
    mov ecx, 2
    call switch_to
    mov eax, dword ptr [v_pde_priv]
    mov edx, dword ptr [eax]           # A's PDE value
    mov eax, dword ptr [v_pde_priv + 16]
    mov dword ptr [eax], edx           # (upper half of an 8-byte PDE is 0 in both)
    RELOAD_CR3
    mov eax, dword ptr [exp_priv]
    mov dword ptr [exp_priv + 16], eax
    mov eax, dword ptr [exp_priv + 4]
    mov dword ptr [exp_priv + 20], eax
    mov ecx, O_PRIV
    call win_read
    CHECK_EQ eax, M_PRIV, 5, "step 6: C does not see A's page after its PDE changed"
    mov ecx, 3
    call sweep
    # ... then in A, a pte of that table re-pointed + invlpg: A and C see it
    xor ecx, ecx
    call switch_to
    mov eax, M_NEW + 4
    mov dword ptr [exp_priv + 4], eax
    mov dword ptr [exp_priv + 20], eax
    call new_frame
    or eax, PTE_P | PTE_W
    mov edx, eax
    xor ebx, ebx
    mov ecx, O_PRIV + 0x1000
    call pte_addr
    call pte_set
    call win_invlpg
    mov ecx, 3
    call sweep

    # ---- 7: in C, a shared pte cleared: every space faults there; restored from A
    mov ecx, 2
    call switch_to
    mov ebx, 2
    mov ecx, O_SHARED + 0x3000
    call pte_addr
    xor edx, edx
    call pte_set
    call win_invlpg
    mov dword ptr [exp_shared + 12], 0
    mov ecx, 2
    call sweep
    xor ecx, ecx
    call switch_to
    xor ebx, ebx
    mov ecx, O_SHARED + 0x3000
    call pte_addr
    mov edx, dword ptr [v_s3frame]
    or edx, PTE_P | PTE_W
    call pte_set
    call win_invlpg
    mov dword ptr [exp_shared + 12], M_SHARED + 3
    mov ecx, 2
    call sweep
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, 6, 6, "step 7: the cleared shared pte did not fault once per space and round"

.if PAGING >= 3
    # ---- 8: A's root-level entry for the third window re-pointed at the PD B and C share
    xor ecx, ecx
    call switch_to
    mov eax, dword ptr [v_l3_bc + 8]
    mov edx, dword ptr [eax]
    mov eax, dword ptr [v_l3_bc]
    mov dword ptr [eax], edx
    RELOAD_CR3
    mov ecx, O_BC
    call win_read
    CHECK_EQ eax, M_BC, 7, "step 8: A does not see the shared PD after its PDPTE changed"
    mov dword ptr [exp_bc], M_BC
    mov ecx, 2
    call sweep
    mov ecx, 1
    call switch_to
    mov eax, M_NEW + 5
    mov dword ptr [exp_bc], eax
    mov dword ptr [exp_bc + 4], eax
    mov dword ptr [exp_bc + 8], eax
    call new_frame
    or eax, PTE_P | PTE_W
    mov edx, eax
    mov ebx, 1
    mov ecx, O_BC
    call pte_addr
    call pte_set
    call win_invlpg
    call win_read
    CHECK_EQ eax, M_NEW + 5, 8, "step 8: B does not see its pte change in the shared PD"
    mov ecx, 3
    call sweep
.endif

    # ---- 9: long sweep
    mov ecx, 30
    call sweep

    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ #PF handler: only win_read may fault
    PROBE_PF_HANDLER 20, win_read
