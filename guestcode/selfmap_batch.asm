# selfmap_batch.asm -- batches of pte writes through a leaf table's mapping of itself, few flushes.
# x86shadow: modes=32,pae,64
#
# selfmap.asm writes one pte at a time through a self-map and flushes each with INVLPG. Here a batch
# of ptes is written through the self-map (and through a cross map of a second table) before any
# flush; one address of the batch is flushed with INVLPG and checked, the rest only after a CR3
# reload -- the stale window an out-of-sync shadow page must close at the right flush.
# Window WIN is mapped by leaf table PT_W, WIN2 (the next level-2 entry) by PT_W2. PT_W[0..6] map pool
# frames 0..6 (frame k holds FMARK + k at +0), PT_W[7] is not present, PT_W[SELF] maps PT_W itself
# (the self-map, at SMAP = WIN + SELF pages), PT_W[CROSS] maps PT_W2 (at XMAP); PT_W2[0..3] map pool
# frames 16..19. Every page is read once first (translations cached).
#   A ptes 0..3 re-pointed through the self-map (frames 8..11): INVLPG of page 0 -> page 0; CR3
#     reload -> pages 1..3, pages 4..6 unchanged; PT_W (read through the identity map) holds the values
#   B pte 4 cleared, pte 5 re-pointed (frame 12), W taken from pte 6 with `lock btr`, pte 7 made
#     present (frame 13), all through the self-map: INVLPG of page 5 -> page 5; CR3 reload -> page 4
#     faults, page 6 reads but a write faults (P|W), page 7 maps frame 13
#   C ptes 0..3 cleared with one `rep stos` through the self-map, pte 1 re-pointed (frame 14), then
#     the self-map pte re-points itself, written through itself (frame 15): INVLPG of SMAP -> SMAP
#     maps frame 15; CR3 reload -> pages 0, 2, 3 fault, page 1 maps frame 14; the self-map is put
#     back (through the identity map) + INVLPG and pte 1 read through it
#   D two tables in one batch: PT_W2[0], PT_W2[1] re-pointed (frames 20, 21) and PT_W2[2] cleared
#     through the cross map, PT_W[2], PT_W[3] re-pointed (frames 22, 23) through the self-map:
#     INVLPG of WIN2 page 1 -> that page; INVLPG of WIN page 2 -> that page; CR3 reload -> the rest,
#     and WIN2 page 3 unchanged
#   E right after that reload (both tables synced again): PT_W2[3] and PT_W2[0] re-pointed through
#     the cross map, PT_W[4] made present through the self-map: INVLPG of WIN2 page 0 -> that page;
#     CR3 reload -> the other two
# Exit codes: 1..4 batch A, 5..8 B, 9..12 C, 13..16 D, 17 wrong number of page faults, 18 a write
# that must fault did not, 19 the initial reads, 20..21 E, 40..42 #PF handler.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"
.include "lib/probe.inc"

.set WIN, 0x40000000                   # every mode: below 4 GiB (64: PML4E 0 -> PDPTE 1)
.set WIN2, WIN + LARGE_PAGE
.set SELF, 8
.set CROSS, 9
.set SMAP, WIN + SELF * PAGE           # PT_W seen as data
.set XMAP, WIN + CROSS * PAGE          # PT_W2 seen as data
.set FMARK, 0x5e000000
.set FAULTED, 0xfa17fa17                # what probe returns for a not-present page
.set NPOOL, 24
.set AD_MASK, 0xffffff9f
.set PTE_PW, PTE_P | PTE_W
.set PF_PW, PF_P | PF_W
.set OFF2, PTE_SIZE * 2
.set OFF6, PTE_SIZE * 6
.set OFF_SELF, SELF * PTE_SIZE

.set R_WIN, 0
.set R_WIN2, 1

# variables (and pf_count, exp_faults, pf_exp_cr2: lib/probe.inc)
.set v_root, PROG_VARS + 0x00          # quad
.set v_ptw, PROG_VARS + 0x08
.set v_ptw2, PROG_VARS + 0x0c
.set pf_exp_err, PROG_VARS + 0x1c
.set pf_resume, PROG_VARS + 0x20       # quad: where the handler resumes (0: no fault expected)
.set v_pool, PROG_VARS + 0x100         # NPOOL dwords

regions:
    .quad WIN, WIN2

# SM_SET alias, index, frame: entry index of the table seen at alias := pool frame | P | W
# (frame NOPAGE: cleared), written through the alias
.macro SM_SET alias, index, frame
    mov eax, \alias
    mov ebx, \index
    mov edx, \frame
    call alias_set
.endm

# ------------------------------------------------------------------ helpers
# probe: esi = va -> eax = the dword there, or FAULTED after a not-present #PF
probe:
    mov dword ptr [pf_exp_cr2], esi
    mov dword ptr [pf_exp_err], 0
    mov dword ptr [pf_resume], probe_resume
    mov dword ptr [pf_resume + 4], 0
    mov eax, dword ptr [esi]
probe_resume:
    mov dword ptr [pf_resume], 0
    ret

# probe_write: esi = va: writes a dword at va + 4 -> eax = 0, or FAULTED after a P|W #PF
probe_write:
    PUSHA_
    add esi, 4
    mov dword ptr [pf_exp_cr2], esi
    mov dword ptr [pf_exp_err], PF_PW
    mov dword ptr [pf_resume], pw_resume
    mov dword ptr [pf_resume + 4], 0
    xor eax, eax
    mov dword ptr [esi], 0x12345678
pw_resume:
    mov dword ptr [pf_resume], 0
    mov dword ptr [lib_scratch], eax
    POPA_
    mov eax, dword ptr [lib_scratch]
    ret

# va_of (eax = region, ebx = page -> esi/rsi), flush, chk (lib/probe.inc; chk reads through the probe
# above). In main: CHK region, first page, count, want, code: those pages must read pool frames
# want, want + 1, ... (want = NOPAGE: each must fault); FLUSH region, page: INVLPG of that page
    REGION_CHECKS regions, FMARK, 17, "window ", "the page does not read what its table maps now"

# alias_set: eax = the table's address (an alias or its physical address), ebx = index,
# edx = pool frame or NOPAGE
alias_set:
    PUSHA_
    PTE_LEA eax, eax, ebx
    cmp edx, NOPAGE
    jne as_frame
    xor edx, edx
    jmp as_store
as_frame:
    mov edx, dword ptr [v_pool + edx * 4]
    or edx, PTE_PW
as_store:
    call pte_store
    POPA_
    ret

# pte_is: eax = table (physical), ebx = index, edx = pool frame: fail with code edi unless the
# entry, A/D masked, is that frame | P | W (read through the identity map)
pte_is:
    PUSHA_
    PTE_LEA ecx, eax, ebx
    mov ecx, dword ptr [ecx]
    and ecx, AD_MASK
    mov edx, dword ptr [v_pool + edx * 4]
    or edx, PTE_PW
    cmp ecx, edx
    je pi_ok
    PRINT_DEC "pte ", ebx
    PRINT ": "
    SAVEVAL ecx
    LOADSTR "the table does not hold the value written through the self-map"
    mov ecx, edi
    jmp fail_report_v
pi_ok:
    POPA_
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    mov dword ptr [pf_resume], 0
    mov dword ptr [pf_resume + 4], 0
    PF_SETUP pf_handler
    MARKED_FRAMES v_pool, NPOOL, FMARK

    # R; PT_W and PT_W2 (allocated by mapping their first page)
    NEW_ROOT v_root
    mov esi, WIN
    mov eax, dword ptr [v_pool]
    or eax, PTE_PW
    xor edx, edx
    mov ecx, 1
    call pt_map
    and eax, 0xfffff000
    mov dword ptr [v_ptw], eax
    mov esi, WIN2
    mov eax, dword ptr [v_pool + 16 * 4]
    or eax, PTE_PW
    xor edx, edx
    call pt_map
    and eax, 0xfffff000
    mov dword ptr [v_ptw2], eax
    # the rest of the ptes, written before the tables are in use
    mov eax, dword ptr [v_ptw]
    mov ebx, 1
mk_w:
    mov edx, ebx
    call alias_set
    inc ebx
    cmp ebx, 7
    jb mk_w
    mov eax, dword ptr [v_ptw2]
    mov ebx, 1
mk_w2:
    lea edx, [ebx + 16]
    call alias_set
    inc ebx
    cmp ebx, 4
    jb mk_w2
    mov eax, dword ptr [v_ptw]
    mov edx, eax
    or edx, PTE_PW
    lea eax, [eax + OFF_SELF]
    call pte_store                     # PT_W[SELF] -> PT_W
    mov eax, dword ptr [v_ptw]
    mov ebx, CROSS
    mov edx, dword ptr [v_ptw2]
    or edx, PTE_PW
    PTE_LEA eax, eax, ebx
    call pte_store                     # PT_W[CROSS] -> PT_W2
    LOAD_CR3 v_root

    # every page read once; pte 2 read through the self-map
    CHK R_WIN, 0, 7, 0, 19
    CHK R_WIN, 7, 1, NOPAGE, 19
    CHK R_WIN2, 0, 4, 16, 19
    mov eax, SMAP
    mov ecx, dword ptr [eax + OFF2]
    and ecx, AD_MASK
    mov edx, dword ptr [v_pool + 2 * 4]
    or edx, PTE_PW
    CHECK_EQ ecx, edx, 19, "pte 2 read through the self-map"
    mov eax, XMAP
    mov ecx, dword ptr [eax + PTE_SIZE]
    and ecx, AD_MASK
    mov edx, dword ptr [v_pool + 17 * 4]
    or edx, PTE_PW
    CHECK_EQ ecx, edx, 19, "PT_W2 pte 1 read through the cross map"

    # ---- A: ptes 0..3 through the self-map
    SM_SET SMAP, 0, 8
    SM_SET SMAP, 1, 9
    SM_SET SMAP, 2, 10
    SM_SET SMAP, 3, 11
    FLUSH R_WIN, 0
    CHK R_WIN, 0, 1, 8, 1
    RELOAD_CR3
    CHK R_WIN, 1, 3, 9, 2
    CHK R_WIN, 4, 3, 4, 3
    mov eax, dword ptr [v_ptw]
    mov edi, 4
    xor ebx, ebx
    mov edx, 8
a_ptes:
    call pte_is
    inc ebx
    inc edx
    cmp ebx, 4
    jb a_ptes

    # ---- B: cleared, re-pointed, W taken away, made present
    SM_SET SMAP, 4, NOPAGE
    SM_SET SMAP, 5, 12
    mov eax, SMAP
    lock btr dword ptr [eax + OFF6], 1
    SM_SET SMAP, 7, 13
    FLUSH R_WIN, 5
    CHK R_WIN, 5, 1, 12, 5
    RELOAD_CR3
    CHK R_WIN, 4, 1, NOPAGE, 6
    CHK R_WIN, 6, 1, 6, 7
    mov eax, R_WIN
    mov ebx, 6
    call va_of
    call probe_write
    cmp eax, FAULTED
    je b_wfault
    FAIL 18, "batch B: a write to the page whose pte lost W did not fault"
b_wfault:
    inc dword ptr [exp_faults]
    CHK R_WIN, 7, 1, 13, 8

    # ---- C: rep stos through the self-map, then the self-map pte re-points itself
    mov edi, SMAP
    xor eax, eax
    mov ecx, PTE_SIZE                  # 4 ptes = PTE_SIZE dwords
    cld
    rep stosd
    SM_SET SMAP, 1, 14
    SM_SET SMAP, SELF, 15              # the last write through the old self-map
    FLUSH R_WIN, SELF
    CHK R_WIN, SELF, 1, 15, 9
    RELOAD_CR3
    CHK R_WIN, 0, 1, NOPAGE, 10
    CHK R_WIN, 2, 2, NOPAGE, 10
    CHK R_WIN, 1, 1, 14, 11
    mov eax, dword ptr [v_ptw]
    mov edx, eax
    or edx, PTE_PW
    lea eax, [eax + OFF_SELF]
    call pte_store                     # the self-map back (through the identity map)
    FLUSH R_WIN, SELF
    mov eax, SMAP
    mov ecx, dword ptr [eax + PTE_SIZE]
    and ecx, AD_MASK
    mov edx, dword ptr [v_pool + 14 * 4]
    or edx, PTE_PW
    CHECK_EQ ecx, edx, 12, "batch C: pte 1 read through the restored self-map"

    # ---- D: two tables in one batch
    SM_SET XMAP, 0, 20
    SM_SET XMAP, 1, 21
    SM_SET SMAP, 2, 22
    SM_SET XMAP, 2, NOPAGE
    SM_SET SMAP, 3, 23
    FLUSH R_WIN2, 1
    CHK R_WIN2, 1, 1, 21, 13
    FLUSH R_WIN, 2
    CHK R_WIN, 2, 1, 22, 14
    RELOAD_CR3
    CHK R_WIN2, 0, 1, 20, 15
    CHK R_WIN2, 2, 1, NOPAGE, 15
    CHK R_WIN2, 3, 1, 19, 15
    CHK R_WIN, 3, 1, 23, 16

    # ---- E: right after the sync of both tables, more ptes through the aliases
    SM_SET XMAP, 3, 12
    SM_SET XMAP, 0, 13
    SM_SET SMAP, 4, 14
    FLUSH R_WIN2, 0
    CHK R_WIN2, 0, 1, 13, 20
    RELOAD_CR3
    CHK R_WIN2, 3, 1, 12, 21
    CHK R_WIN, 4, 1, 14, 21

    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ #PF handler: probe / probe_write
pf_handler:
    SAVE_ALL frame=1
.if BITS == 64
    mov rax, cr2
.else
    mov eax, cr2
.endif
    cmp eax, dword ptr [pf_exp_cr2]
    je pf_cr2_ok
    FAILV 40, "#PF at an unexpected address", eax
pf_cr2_ok:
    mov eax, dword ptr [ebp + FRAME_ERR]
    cmp eax, dword ptr [pf_exp_err]
    je pf_err_ok
    FAILV 41, "#PF: unexpected error code", eax
pf_err_ok:
    mov eax, dword ptr [pf_resume]
    test eax, eax
    jnz pf_resume_ok
    FAIL 42, "#PF where no fault is expected"
pf_resume_ok:
.if BITS == 64
    mov qword ptr [rbp + FRAME_IP], rax
    mov dword ptr [rbp + FRAME_AX], FAULTED    # saved rax (low half)
.else
    mov dword ptr [ebp + FRAME_IP], eax
    mov dword ptr [ebp + FRAME_AX], FAULTED
.endif
    inc dword ptr [pf_count]
    RESTORE_ALL
    IRET_ERR
