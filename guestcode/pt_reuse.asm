# pt_reuse.asm -- one frame T used as a leaf page table, then as an upper-level table, then as a leaf again.
# x86shadow: modes=32,pae,64
#
# A pool of frames, frame k holding FMARK + k at +0; a large page at LARGE_PHYS (FMARK + 64 at +0,
# FMARK + 69 at +0x5000). Root R identity-maps the low 64 MiB. Phases:
#   1 leaf: T is linked as the leaf table of window W1 (the entry for W1 at level 2 := T); its ptes are
#     written natively (pool frames 0..5), CR3 reloaded, the pages read through. Then ptes 0, 1, 2
#     re-pointed, pte 3 cleared, pte 6 made present, all before any flush: INVLPG of page 0 only ->
#     page 0 checked; CR3 reload -> the others checked (page 3 must fault), and the untouched ptes 4
#     and 5.
#   2 unlink: the level-2 entry for W1 cleared; INVLPG of page 0 -> page 0 faults; CR3 reload ->
#     pages 1 and 6 fault.
#   3 upper level: T's used ptes cleared (one rep stos) and T refilled as an upper-level table of
#     window W2 -- mode 32: the root itself (identity PDEs copied in; CR3 := T), PAE: a PD
#     (PDPTE 2 := T), 64: a PDPT (PML4E 2 := T) -- entry U0 reaching leaf table PT_A (64: through
#     PD_X), entry U1 a large page (64: through PD_Y). Checked: 4 pages through U0, 2 in the large
#     page, W1 still faults. Then U0 re-pointed at leaf table PT_B (64: through a new PD_Z) and U1
#     cleared: INVLPG of one page of U0 -> that page; CR3 reload -> the other U0 pages and the
#     fault in U1.
#   4 leaf again: T unlinked from the upper level (mode 32: CR3 := R; PAE / 64: the root entry
#     cleared + CR3 reload; W2 faults), its used entries cleared, refilled as a leaf (pool frames
#     24..31) and linked as the leaf table of W3 (the level-2 entry next to W1's) + CR3 reload; read
#     through. Then ptes 1, 2, 3 re-pointed and pte 7 cleared: INVLPG of page 1 only -> page 1; CR3
#     reload -> pages 2, 3, the fault at 7, the untouched pages; W1 still faults.
# Exit codes: 1..6 phase 1, 10..11 phase 2, 20..25 phase 3, 30..36 phase 4, 37 wrong number of page
# faults, 40..42 #PF handler.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"
.include "lib/probe.inc"

.if BITS == 64
.set W1, 0x0000008000000000            # PML4E 1 -> PDPT -> PD entry 0 -> T
.set W2, 0x0000010000000000            # PML4E 2 := T (as a PDPT)
.set W2_U1, W2 + 0x40000000            # T's entry 1
.set U0, 0                             # T's entry for W2 (as an upper-level table)
.else
.set W1, 0x40000000                    # mode 32: PDE 256; PAE: PDPTE 1 -> PD entry 0 -> T
.set W2, 0x80000000                    # mode 32: PDE 512 of T (the root); PAE: PDPTE 2 := T (a PD)
.set W2_U1, W2 + LARGE_PAGE
.if PAGING == 2
.set U0, 512
.else
.set U0, 0
.endif
.endif
.set U1, U0 + 1
.set W3, W1 + LARGE_PAGE               # the level-2 entry after W1's
.set LARGE_PHYS, 0x3000000             # 48 MiB: aligned for 4 and 2 MiB pages, above the pool
.set FMARK, 0x2e000000
.set FAULTED, 0xfa17fa17                # what probe returns for a not-present page
.set NPOOL, 40
.set PTE_PWU, PTE_P | PTE_W | PTE_U
.set LARGE_ENTRY, LARGE_PHYS | PTE_PS | PTE_P | PTE_W | PTE_U

# region numbers (index of `regions`)
.set R_W1, 0
.set R_U0, 1
.set R_U1, 2
.set R_W3, 3

# variables (and pf_count, exp_faults, pf_exp_cr2: lib/probe.inc)
.set v_root, PROG_VARS + 0x00          # quad: R
.set v_t, PROG_VARS + 0x08             # T
.set v_pde1, PROG_VARS + 0x0c          # address of the level-2 entry for W1
.set v_pde3, PROG_VARS + 0x10          # ... for W3
.set v_pta, PROG_VARS + 0x14
.set v_ptb, PROG_VARS + 0x18
.set v_pool, PROG_VARS + 0x100         # NPOOL dwords

regions:
    .quad W1, W2, W2_U1, W3

# ------------------------------------------------------------------ helpers
# probe: esi (rsi) = va -> eax = the dword there, or FAULTED after a not-present #PF (lib/probe.inc)
    PROBE_ROUTINES

# va_of (eax = region, ebx = page -> esi/rsi), flush, chk (lib/probe.inc). In main:
#   CHK region, first page, count, want, code: pages first.. of the region must read pool frame
#   want, want + 1, ... (want = NOPAGE: each must fault); FLUSH region, page: INVLPG of that page
    REGION_CHECKS regions, FMARK, 37, "region ", "the page does not read what its tables map now"

# ent_set: eax = table, ebx = index, edx = new value: entry ebx of the table := edx, written as
# Linux would (0: PTE_CLEAR, otherwise PTE_SET: lib/paging.inc's pte_store)
ent_set:
    PUSHR eax, rax
    PTE_LEA eax, eax, ebx
    call pte_store
    POPR eax, rax
    ret

# pte_to: eax = table, ebx = index, edx = pool frame (NOPAGE: clear the pte)
pte_to:
    PUSHR edx, rdx
    cmp edx, NOPAGE
    jne pt_frame
    xor edx, edx
    jmp pt_store
pt_frame:
    mov edx, dword ptr [v_pool + edx * 4]
    or edx, PTE_PWU
pt_store:
    call ent_set
    POPR edx, rdx
    ret

# ptes_to: eax = table, ebx = first index, ecx = count, edx = first pool frame (consecutive)
ptes_to:
    PUSHA_
ptes_loop:
    call pte_to
    inc ebx
    inc edx
    dec ecx
    jnz ptes_loop
    POPA_
    ret

# clear_t: eax = first entry, ecx = number of entries: those entries of T := 0 with one `rep stos`
# through the identity map (only the entries a phase used: a whole page would be 1024 emulated
# stores under the policies that emulate every write)
clear_t:
    PUSHA_
    mov edi, dword ptr [v_t]
    PTE_LEA edi, edi, eax
.if PAGING != 2
    shl ecx, 1
.endif
    xor eax, eax
    cld
    rep stosd
    POPA_
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    PF_SETUP pf_handler
    MARKED_FRAMES v_pool, NPOOL, FMARK
    mov eax, LARGE_PHYS
    mov dword ptr [eax], FMARK + 64
    mov dword ptr [eax + 0x5000], FMARK + 69

    # R, the level-2 entries for W1 and W3 (upper tables allocated on the way), T
    NEW_ROOT v_root
.if BITS == 64
    mov rsi, W1
.else
    mov esi, W1
.endif
    mov edx, 2
    mov ecx, 1
    call pt_entry
    mov dword ptr [v_pde1], eax
.if BITS == 64
    mov rsi, W3
.else
    mov esi, W3
.endif
    call pt_entry
    mov dword ptr [v_pde3], eax
    call pt_alloc
    mov dword ptr [v_t], eax
    LOAD_CR3 v_root

    # ---- 1: T as the leaf table of W1
    mov edx, dword ptr [v_t]
    or edx, PTE_INTER
    mov eax, dword ptr [v_pde1]
    call pte_store
    mov eax, dword ptr [v_t]
    xor ebx, ebx
    mov ecx, 6
    xor edx, edx
    call ptes_to
    RELOAD_CR3                         # (not present -> present: flushed before relying on it)
    CHK R_W1, 0, 6, 0, 1
    mov eax, dword ptr [v_t]
    xor ebx, ebx
    mov ecx, 3
    mov edx, 8
    call ptes_to                       # ptes 0..2 -> frames 8..10
    mov ebx, 3
    mov edx, NOPAGE
    call pte_to                        # pte 3 cleared
    mov ebx, 6
    mov edx, 14
    call pte_to                        # pte 6 -> frame 14
    FLUSH R_W1, 0
    CHK R_W1, 0, 1, 8, 2
    RELOAD_CR3
    CHK R_W1, 1, 2, 9, 3
    CHK R_W1, 3, 1, NOPAGE, 4
    CHK R_W1, 6, 1, 14, 5
    CHK R_W1, 4, 2, 4, 6

    # ---- 2: T unlinked
    mov eax, dword ptr [v_pde1]
    xor edx, edx
    call pte_store
    FLUSH R_W1, 0
    CHK R_W1, 0, 1, NOPAGE, 10
    RELOAD_CR3
    CHK R_W1, 1, 1, NOPAGE, 11
    CHK R_W1, 6, 1, NOPAGE, 11

    # ---- 3: T as an upper-level table of W2
    xor eax, eax
    mov ecx, 8
    call clear_t                       # the ptes of phase 1
    call pt_alloc
    mov dword ptr [v_pta], eax
    xor ebx, ebx
    mov ecx, 4
    mov edx, 16
    call ptes_to                       # PT_A: frames 16..19
    call pt_alloc
    mov dword ptr [v_ptb], eax
    mov ecx, 4
    mov edx, 20
    call ptes_to                       # PT_B: frames 20..23
.if BITS == 64
    call pt_alloc                      # PD_X: entry 0 -> PT_A
    mov edx, dword ptr [v_pta]
    or edx, PTE_INTER
    xor ebx, ebx
    call ent_set
    mov edx, eax
    or edx, PTE_INTER
    mov eax, dword ptr [v_t]
    mov ebx, U0
    call ent_set                       # T[0] -> PD_X
    call pt_alloc                      # PD_Y: entry 0 -> the large page
    mov edx, LARGE_ENTRY
    xor ebx, ebx
    call ent_set
    mov edx, eax
    or edx, PTE_INTER
    mov eax, dword ptr [v_t]
    mov ebx, U1
    call ent_set                       # T[1] -> PD_Y
    mov edx, eax
    or edx, PTE_INTER
    mov eax, dword ptr [v_root]
    mov ebx, 2
    call ent_set                       # PML4E 2 -> T
    RELOAD_CR3
.else
    mov eax, dword ptr [v_t]
    mov edx, dword ptr [v_pta]
    or edx, PTE_INTER
    mov ebx, U0
    call ent_set                       # T[U0] -> PT_A
    mov edx, LARGE_ENTRY
    mov ebx, U1
    call ent_set                       # T[U1] -> the large page
.if PAGING == 2
    mov edi, eax
    mov esi, dword ptr [v_root]
    ID_COPY                            # the identity PDEs
    mov cr3, eax                       # T is the root
.else
    mov edx, eax
    or edx, PTE_P                      # a PDPTE: P only
    mov eax, dword ptr [v_root]
    mov ebx, 2
    call ent_set                       # PDPTE 2 -> T
    RELOAD_CR3                         # (PDPTEs are loaded with CR3)
.endif
.endif
    CHK R_U0, 0, 4, 16, 20
    CHK R_U1, 0, 1, 64, 21
    CHK R_U1, 5, 1, 69, 21
    CHK R_W1, 0, 1, NOPAGE, 22
    # T's entries changed: U0 -> PT_B, U1 cleared
.if BITS == 64
    call pt_alloc                      # PD_Z: entry 0 -> PT_B
    mov edx, dword ptr [v_ptb]
    or edx, PTE_INTER
    xor ebx, ebx
    call ent_set
    mov edx, eax
    or edx, PTE_INTER
.else
    mov edx, dword ptr [v_ptb]
    or edx, PTE_INTER
.endif
    mov eax, dword ptr [v_t]
    mov ebx, U0
    call ent_set
    mov ebx, U1
    xor edx, edx
    call ent_set
    FLUSH R_U0, 0
    CHK R_U0, 0, 1, 20, 23
    RELOAD_CR3
    CHK R_U0, 1, 3, 21, 24
    CHK R_U1, 0, 1, NOPAGE, 25

    # ---- 4: T a leaf table again, of W3
.if PAGING == 2
    LOAD_CR3 v_root
.else
    mov eax, dword ptr [v_root]
    mov ebx, 2
    xor edx, edx
    call ent_set                       # R's root entry 2 cleared
    RELOAD_CR3
.endif
    CHK R_U0, 0, 1, NOPAGE, 30
    xor eax, eax
.if PAGING == 2
    mov ecx, ID_DWORDS
    call clear_t                       # the identity PDEs copied in
    mov eax, U0
.endif
    mov ecx, 2
    call clear_t                       # U0, U1
    mov eax, dword ptr [v_t]
    xor ebx, ebx
    mov ecx, 8
    mov edx, 24
    call ptes_to                       # frames 24..31
    mov edx, eax
    or edx, PTE_INTER
    mov eax, dword ptr [v_pde3]
    call pte_store
    RELOAD_CR3
    CHK R_W3, 0, 8, 24, 31
    mov eax, dword ptr [v_t]
    mov ebx, 1
    mov ecx, 3
    mov edx, 33
    call ptes_to                       # ptes 1..3 -> frames 33..35
    mov ebx, 7
    mov edx, NOPAGE
    call pte_to                        # pte 7 cleared
    FLUSH R_W3, 1
    CHK R_W3, 1, 1, 33, 32
    RELOAD_CR3
    CHK R_W3, 2, 2, 34, 33
    CHK R_W3, 7, 1, NOPAGE, 34
    CHK R_W3, 0, 1, 24, 35
    CHK R_W3, 4, 3, 28, 35
    CHK R_W1, 0, 1, NOPAGE, 36

    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ #PF handler: only probe may fault
    PROBE_PF_HANDLER 40
