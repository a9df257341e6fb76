# kmap/kscand.asm -- a RHEL3-era 32-bit highmem kernel ageing the pages of one user process with kscand.
# x86shadow: modes=32,pae
#
# README, the kmap scenario. Built by `x86shadow scenario kmap` (x86shadow/scenario.py), which passes the parameters
# below as symbols; the defaults let the file be assembled on its own.
#
#   NTABLES    user page tables scanned (each a highmem frame)         default 8
#   NPTES      ptes used in each of them (each maps its own page)       default 64
#   NSCANS     kscand passes                                            default 4
#   VARIANT    0 rhel3  kmap_atomic skips the store and the flush when the slot already holds the pte;
#                       kunmap_atomic does nothing (2.4.21 atomic_kmap.h, production)
#              1 2.4    kmap_atomic always stores + flushes; kunmap_atomic does nothing
#              2 debug  HIGHMEM_DEBUG: kmap_atomic checks the slot is empty; kunmap_atomic = 2.4 pte_clear
#                       (PAE: set_pte(0) -> high half, then low half) + invlpg
#              3 2.6    kunmap_atomic = kpte_clear_flush (PAE pte_clear: low half, then high half)
#   ORDER      0 table  each user page table kmapped once, its ptes walked linearly
#              1 rmap   pages in "active list" order: every pte reached through its own kmap_atomic of
#                       its table; the next page lies in the same table with probability LINEARITY %,
#                       else in another table picked at random (deterministic LCG, SEED)
#   LINEARITY  0..100                                                   default 0
#   SEED       LCG seed                                                 default 1
#   KSTAT      guest-physical address of the statistics block below (lowmem, direct-mapped)
#
# Layout (guest-physical):
#   0 .. 32 MiB    lowmem: the kernel's direct map (identity, supervisor, large pages): this program,
#                  the firmware's GDT/IDT/TSS and stacks, and the kernel's own page tables (pgd/pmds,
#                  the fixmap page table, the user text page table), taken from lib/paging.inc's pool
#   32 MiB .. RAM  highmem: NTABLES user page tables, then NTABLES * NPTES user pages. The kernel never
#                  maps highmem except through the fixmap (the tables are written once, at boot,
#                  under the firmware's identity map, before the kernel loads its own CR3)
# Virtual:
#   USER_BASE + t * TABLE_SPAN + i * 4 KiB    page i of user table t (P|W|U; read by the process)
#   UCODE                                      the user process's code (read-only, U)
#   FIXADDR_TOP - (idx << 12)                  fixmap slot idx; all of them in ONE kernel page table
#                                              (the "fixmap page table" F); kscand uses the slot
#                                              FIX_KMAP_BEGIN + KM_TYPE of CPU 0 (KM_TYPE_NR = 13)
#
# Flow: build the tables, load CR3, kmap the process's first page once (boot: the fixmap page table
# is in use, hence shadowed, before kscand starts), run the process once (warm-up: every user page
# touched, so every user table is shadowed), then NSCANS times { kscand pass; run the process (it reads one dword of each
# of its pages, so the accessed bits kscand cleared come back through faults) }. Running the process
# reloads CR3 (the switch to its mm), so no stale translation hides an access. The process enters
# CPL3 by iret and comes back by `int 0x80`.
#
# Instrumentation (not part of the modelled kernel): counts in the KSTAT block, and a write to
# MARKER_PORT (not an exit) at every phase boundary: value = (phase << 24) | scan, phase
#   1 warm-up begins    2 kscand pass begins    3 user touch begins    4 all done
# The kernel checks itself: every pte kscand tests must be young (the process touched every page since
# the last pass) -- a shadow MMU that lost an accessed bit, or an emulation that lost btr's CF, fails.
# Exit codes: 1..9 checks (FAIL prints the reason).

.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "../lib/idt.inc"
.include "../lib/main.inc"

.ifndef NTABLES
.set NTABLES, 8
.endif
.ifndef NPTES
.set NPTES, 64
.endif
.ifndef NSCANS
.set NSCANS, 4
.endif
.ifndef VARIANT
.set VARIANT, 0
.endif
.ifndef ORDER
.set ORDER, 0
.endif
.ifndef LINEARITY
.set LINEARITY, 0
.endif
.ifndef SEED
.set SEED, 1
.endif
.ifndef KSTAT
.set KSTAT, PROG_VARS + 0x400
.endif

.set V_RHEL3, 0
.set V_24, 1
.set V_DEBUG, 2
.set V_26, 3

.set LOWMEM_END, 0x2000000             # 32 MiB direct map
.set HIGHMEM_BASE, LOWMEM_END
.set TABLES_PA, HIGHMEM_BASE           # NTABLES user page tables
.set PAGES_PA, HIGHMEM_BASE + NTABLES * PAGE
.set HIGHMEM_USED, PAGES_PA + NTABLES * NPTES * PAGE
.set USER_BASE, 0x40000000
.set UCODE, 0x08000000
.set USTACK, UCODE + 0x100000
.set USTACK_TOP, USTACK + PAGE
.if PAGING == 2
.set TABLE_SPAN, 0x400000
.set MAX_TABLES, 767                   # USER_BASE .. the fixmap's 4 MiB
.else
.set TABLE_SPAN, 0x200000
.set MAX_TABLES, 1024                  # USER_BASE .. 3 GiB
.endif
.set FIXADDR_TOP, 0xfffff000 - PAGE    # 0xffffe000, as in 2.4 (vsyscall page above)
.set FIX_KMAP_BEGIN, 16                # other fixmaps (APIC, IO-APIC, ...) below this index
.set KM_TYPE_NR, 13
.set KM_TYPE, 3                        # KM_USER0 of CPU 0
.set KMAP_IDX, FIX_KMAP_BEGIN + KM_TYPE
.set KMAP_VADDR, FIXADDR_TOP - KMAP_IDX * PAGE
.set KMAP_PTE_OFF, ((KMAP_VADDR >> 12) & (PT_ENTRIES - 1)) * PTE_SIZE
.set KMAP_PROT, PTE_P | PTE_W | PTE_A | PTE_D | PTE_G     # PAGE_KERNEL_GLOBAL
.set UPTE_FLAGS, PTE_P | PTE_W | PTE_U
.set KPDE_FLAGS, PTE_P | PTE_W | PTE_A                    # _KERNPG_TABLE (no U)
.set UPDE_FLAGS, PTE_P | PTE_W | PTE_U | PTE_A            # _PAGE_TABLE

.if NTABLES < 1 || NTABLES > MAX_TABLES
.error "NTABLES out of range for this paging mode"
.endif
.if NPTES < 1 || NPTES > PT_ENTRIES
.error "NPTES must be 1 .. entries per page table"
.endif
.if HIGHMEM_USED > RAM_SIZE
.error "not enough RAM for NTABLES * (NPTES + 1) highmem frames above 32 MiB"
.endif
.if LINEARITY < 0 || LINEARITY > 100
.error "LINEARITY must be 0..100"
.endif

# the statistics block (KSTAT), read by the host
.set S_KMAPS, KSTAT + 0x00             # kmap_atomic calls
.set S_FIXW, KSTAT + 0x04              # 4-byte stores made to the fixmap pte (kmap and kunmap)
.set S_SKIPS, KSTAT + 0x08             # kmap_atomic calls that found the pte in place (rhel3)
.set S_BTRS, KSTAT + 0x0c              # lock btr on user ptes
.set S_YOUNG, KSTAT + 0x10             # ... that found the accessed bit set (this pass)
.set S_SCAN, KSTAT + 0x14              # current scan
.set S_FIXPT, KSTAT + 0x18             # guest-physical address of the fixmap page table F
.set S_KPTE, KSTAT + 0x1c              # guest-physical address of the kmap slot's pte
.set S_TABLES, KSTAT + 0x20            # guest-physical address of user table 0 (the rest follow)
.set S_NTABLES, KSTAT + 0x24
.set S_NPTES, KSTAT + 0x28
.set S_KVADDR, KSTAT + 0x2c            # the kmap slot's virtual address
.set S_KUNMAPS, KSTAT + 0x30           # kunmap_atomic calls
.set S_TOUCHES, KSTAT + 0x34           # user page reads (counted by the kernel: NTABLES * NPTES a round)
.set S_MAGIC, KSTAT + 0x38             # 0x6b6d6170 ('kmap') once the block is valid

# kernel variables
.set v_root, PROG_VARS + 0x00
.set v_ksp, PROG_VARS + 0x08
.set v_kpte, PROG_VARS + 0x10
.set v_lcg, PROG_VARS + 0x14
.set v_cur, PROG_VARS + 0x18           # rmap: per-table next pte index (NTABLES dwords)
.set v_alive, PROG_VARS + 0x1c         # rmap: tables with ptes left (NTABLES dwords)
.set v_pos, PROG_VARS + 0x20           # rmap: position of each table in v_alive
.set v_alive_n, PROG_VARS + 0x24
.set v_left, PROG_VARS + 0x28
.set v_curtab, PROG_VARS + 0x2c
.set v_entry, PROG_VARS + 0x30         # user VA of user_entry
.set v_scan, PROG_VARS + 0x34

# S_FIXW += the 4-byte stores of one write of the fixmap pte: two in PAE (its halves), else one
.macro COUNT_FIXW
.if PAGING == 3
    add dword ptr [S_FIXW], 2
.else
    inc dword ptr [S_FIXW]
.endif
.endm

.macro MARK phase, scanreg
    push eax
    push edx
    mov eax, \scanreg
    or eax, \phase << 24
    mov dx, MARKER_PORT
    out dx, eax
    pop edx
    pop eax
.endm

main:
    MAIN_PROLOGUE
    call pt_init
    mov dword ptr [S_KMAPS], 0
    mov dword ptr [S_FIXW], 0
    mov dword ptr [S_SKIPS], 0
    mov dword ptr [S_BTRS], 0
    mov dword ptr [S_YOUNG], 0
    mov dword ptr [S_SCAN], 0
    mov dword ptr [S_KUNMAPS], 0
    mov dword ptr [S_TOUCHES], 0
    mov dword ptr [S_TABLES], TABLES_PA
    mov dword ptr [S_NTABLES], NTABLES
    mov dword ptr [S_NPTES], NPTES
    mov dword ptr [S_KVADDR], KMAP_VADDR
    mov dword ptr [v_lcg], SEED

    # ---- the user page tables, in highmem (still under the firmware's identity map of all RAM)
    mov edi, TABLES_PA                 # table
    mov eax, PAGES_PA | UPTE_FLAGS     # next pte
    mov ebx, NTABLES
build_table:
    xor ecx, ecx
build_pte:
    PTE_INIT edi, ecx, eax
    add eax, PAGE
    inc ecx
    cmp ecx, NPTES
    jb build_pte
    add edi, PAGE
    dec ebx
    jnz build_table

    # ---- the kernel's address space
    call pt_alloc
    mov dword ptr [v_root], eax
    mov edi, eax
    xor esi, esi                       # direct map of lowmem: large pages, supervisor only
direct_map:
    mov eax, esi
    or eax, PTE_P | PTE_W | PTE_A | PTE_D | PTE_PS
    xor edx, edx
    mov ecx, 2
    call pt_map
    add esi, LARGE_PAGE
    cmp esi, LOWMEM_END
    jb direct_map

    # the fixmap page table F: one kernel page table holds every fixmap slot of the CPU
    call pt_alloc
    mov ebx, eax
    mov dword ptr [S_FIXPT], eax
    lea eax, [ebx + KMAP_PTE_OFF]
    mov dword ptr [v_kpte], eax
    mov dword ptr [S_KPTE], eax
    mov esi, FIXADDR_TOP
    mov edx, 2
    mov ecx, 1
    call pt_entry                      # the pde (allocates the pmd in PAE)
    or ebx, KPDE_FLAGS
    PTE_SET eax, ebx

    # the user's pdes -> the highmem tables
    mov esi, USER_BASE
    mov ebx, TABLES_PA | UPDE_FLAGS
    mov ebp, NTABLES
user_pdes:
    mov edx, 2
    mov ecx, 1
    call pt_entry
    PTE_SET eax, ebx
    add ebx, PAGE
    add esi, TABLE_SPAN
    dec ebp
    jnz user_pdes

    # the user's text (read-only) and a stack page
    mov eax, user_code_start
    and eax, 0xfffff000
    mov ebx, eax
    mov ecx, user_code_end
    sub ecx, ebx
    add ecx, 0xfff
    shr ecx, 12
    mov edi, dword ptr [v_root]
    mov esi, UCODE
    or eax, PTE_P | PTE_U
    xor edx, edx
    call pt_map_range
    mov eax, user_entry
    sub eax, ebx
    add eax, UCODE
    mov dword ptr [v_entry], eax
    call pt_alloc
    or eax, PTE_P | PTE_W | PTE_U
    mov esi, USTACK
    xor edx, edx
    mov ecx, 1
    call pt_map

    # rmap bookkeeping arrays (lowmem)
    call pt_alloc
    mov dword ptr [v_cur], eax
    call pt_alloc
    mov dword ptr [v_alive], eax
    call pt_alloc
    mov dword ptr [v_pos], eax

    # IDT: int 0x80 reachable from CPL3; every other vector still reaches the firmware (a crash)
    call idt_init
    SET_GATE 0x80, int80_handler, GATE_INT3

    mov eax, dword ptr [v_root]
    mov cr3, eax
    mov dword ptr [S_MAGIC], 0x6b6d6170

    # boot: the kernel reads the process's first page through the slot (as clear_highpage /
    # copy_to_user of a highmem page do), so the fixmap page table is in use -- and shadowed --
    # before kscand starts, as on a kernel that has been running for a while
    mov eax, PAGES_PA
    call kmap_atomic
    mov eax, dword ptr [KMAP_VADDR]
    call kunmap_atomic

    # ---- warm-up: the process touches all its pages (shadows every user table)
    xor eax, eax
    MARK 1, eax
    call run_user

    # ---- the scans
    mov dword ptr [v_scan], 0
scan_loop:
    mov eax, dword ptr [v_scan]
    mov dword ptr [S_SCAN], eax
    MARK 2, eax
    mov dword ptr [S_YOUNG], 0
.if ORDER == 0
    call kscand_table
.else
    call kscand_rmap
.endif
    mov eax, dword ptr [S_YOUNG]
    CHECK_EQ eax, NTABLES * NPTES, 1, "kscand: a pte the process touched was not young"
    mov eax, dword ptr [v_scan]
    MARK 3, eax
    call run_user
    inc dword ptr [v_scan]
    cmp dword ptr [v_scan], NSCANS
    jb scan_loop

    mov eax, NSCANS
    MARK 4, eax
    mov eax, dword ptr [S_BTRS]
    CHECK_EQ eax, NSCANS * NTABLES * NPTES, 2, "kscand: wrong number of ptes tested"
    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ kmap_atomic / kunmap_atomic
# kmap_atomic: eax = the page (a highmem frame) -> the slot maps it. Preserves every register.
kmap_atomic:
    push eax
    push edx
    inc dword ptr [S_KMAPS]
    mov edx, dword ptr [v_kpte]
    or eax, KMAP_PROT                  # mk_pte(page, kmap_prot); the high half is 0 (RAM < 4 GiB)
.if VARIANT == V_RHEL3
    # "Performance optimization - do not flush if the new pte is the same as the old one"
    cmp dword ptr [edx], eax
    jne kmap_store
.if PAGING == 3
    cmp dword ptr [edx + 4], 0
    jne kmap_store
.endif
    inc dword ptr [S_SKIPS]
    jmp kmap_done
.endif
.if VARIANT == V_DEBUG || VARIANT == V_26
    # HIGHMEM_DEBUG / CONFIG_DEBUG_HIGHMEM: BUG_ON(!pte_none(*(kmap_pte - idx)))
    cmp dword ptr [edx], 0
    je kmap_none
    FAIL 3, "kmap_atomic: slot not empty"
kmap_none:
.endif
kmap_store:
    # set_pte: PAE = high half, smp_wmb(), low half; 2-level = one store
    PTE_SET edx, eax
    COUNT_FIXW
    invlpg byte ptr [KMAP_VADDR]       # __flush_tlb_one(vaddr)
kmap_done:
    pop edx
    pop eax
    ret

kunmap_atomic:
    inc dword ptr [S_KUNMAPS]
.if VARIANT == V_DEBUG || VARIANT == V_26
    push edx
    mov edx, dword ptr [v_kpte]
.if VARIANT == V_DEBUG
    PTE_SET edx, 0                     # 2.4 pte_clear = set_pte(0): high half, then low half
.else
    PTE_CLEAR edx                      # 2.6 PAE pte_clear: low half, smp_wmb(), high half
.endif
    COUNT_FIXW
    invlpg byte ptr [KMAP_VADDR]       # (2.6: kpte_clear_flush)
    pop edx
.endif
    ret

# ------------------------------------------------------------------ kscand, table order
# Each user page table mapped once; its ptes tested linearly through the slot.
kscand_table:
    pushal
    mov ebx, TABLES_PA
    mov ebp, NTABLES
kt_table:
    mov eax, ebx
    call kmap_atomic
    mov esi, KMAP_VADDR
    mov ecx, NPTES
kt_pte:
    lock btr dword ptr [esi], 5        # ptep_test_and_clear_young
    adc dword ptr [S_YOUNG], 0
    add esi, PTE_SIZE
    dec ecx
    jnz kt_pte
    add dword ptr [S_BTRS], NPTES
    call kunmap_atomic
    add ebx, PAGE
    dec ebp
    jnz kt_table
    popal
    ret

# ------------------------------------------------------------------ kscand, reverse-map order
# Pages in active-list order: each step picks the page whose pte is tested next -- in the same table
# as the previous one with probability LINEARITY %, else in another table with ptes left (uniformly) --
# and reaches that pte through its own kmap_atomic of its page table.
lcg_next:                              # eax = a pseudo-random number (24 bits)
    mov eax, dword ptr [v_lcg]
    imul eax, eax, 1664525
    add eax, 1013904223
    mov dword ptr [v_lcg], eax
    shr eax, 8
    ret

lcg_mod:                               # in: ecx = n > 0; out: eax = random in [0, n). Keeps edx.
    push edx
    call lcg_next
    xor edx, edx
    div ecx
    mov eax, edx
    pop edx
    ret

kscand_rmap:
    pushal
    # all tables alive, every cursor at 0
    mov esi, dword ptr [v_cur]
    mov edi, dword ptr [v_alive]
    mov ebp, dword ptr [v_pos]
    xor ecx, ecx
kr_init:
    mov dword ptr [esi + ecx * 4], 0
    mov dword ptr [edi + ecx * 4], ecx
    mov dword ptr [ebp + ecx * 4], ecx
    inc ecx
    cmp ecx, NTABLES
    jb kr_init
    mov dword ptr [v_alive_n], NTABLES
    mov dword ptr [v_left], NTABLES * NPTES
    mov ecx, NTABLES
    call lcg_mod
    mov dword ptr [v_curtab], eax
kr_step:
    # same table?
    mov ebx, dword ptr [v_curtab]
    mov ecx, 100
    call lcg_mod
    cmp eax, LINEARITY
    jae kr_other
    cmp dword ptr [esi + ebx * 4], NPTES
    jb kr_have
kr_other:
    mov ecx, dword ptr [v_alive_n]
    call lcg_mod
    mov edx, dword ptr [edi + eax * 4]
    cmp edx, ebx
    jne kr_picked
    cmp ecx, 1
    je kr_picked                       # the current table is the only one left
    inc eax
    cmp eax, ecx
    jb kr_wrap
    xor eax, eax
kr_wrap:
    mov edx, dword ptr [edi + eax * 4]
kr_picked:
    mov ebx, edx
kr_have:
    # ebx = table; take its next pte
    mov edx, dword ptr [esi + ebx * 4]
    lea eax, [edx + 1]
    mov dword ptr [esi + ebx * 4], eax
    cmp eax, NPTES
    jb kr_alive
    # table exhausted: swap-remove it from the alive list
    mov eax, dword ptr [ebp + ebx * 4] # its position
    mov ecx, dword ptr [v_alive_n]
    dec ecx
    mov dword ptr [v_alive_n], ecx
    mov ecx, dword ptr [edi + ecx * 4] # the last alive table
    mov dword ptr [edi + eax * 4], ecx
    mov dword ptr [ebp + ecx * 4], eax
kr_alive:
    mov dword ptr [v_curtab], ebx
    mov eax, ebx
    shl eax, 12
    add eax, TABLES_PA
    call kmap_atomic                   # rmap_ptep_map
.if PAGING == 2
    lock btr dword ptr [KMAP_VADDR + edx * 4], 5
.else
    lock btr dword ptr [KMAP_VADDR + edx * 8], 5
.endif
    adc dword ptr [S_YOUNG], 0
    inc dword ptr [S_BTRS]
    call kunmap_atomic                 # rmap_ptep_unmap
    dec dword ptr [v_left]
    jnz kr_step
    popal
    ret

# ------------------------------------------------------------------ the user process
# run_user: enter CPL3 at user_entry; returns when the process does int 0x80.
run_user:
    pushal
    # schedule() to the process: switch_mm loads its CR3, which drops the non-global TLB entries,
    # so its accesses walk the page tables again and set the accessed bits kscand cleared (without
    # it, a CPU may keep using cached translations and never set them: that is architectural)
    mov eax, dword ptr [v_root]
    mov cr3, eax
    mov dword ptr [v_ksp], esp
    add dword ptr [S_TOUCHES], NTABLES * NPTES
    mov ebx, dword ptr [v_entry]
    IRET_TO_CPL3
user_back:
    LOAD_DATA_SEGS SEL_KDATA
    popal
    ret

int80_handler:
    mov esp, dword ptr [v_ksp]         # ss is the kernel's (SS0 of the TSS)
    jmp user_back

# Runs at UCODE + (label - page of user_code_start): position independent.
.align 4096
user_code_start:
user_entry:
    mov esi, USER_BASE
    mov ebx, NTABLES
u_table:
    mov edi, esi
    mov ecx, NPTES
u_page:
    mov eax, dword ptr [edi]           # touch: the walk sets the accessed bit again
    add edi, PAGE
    dec ecx
    jnz u_page
    add esi, TABLE_SPAN
    dec ebx
    jnz u_table
    int 0x80
u_hang:
    jmp u_hang
user_code_end:
