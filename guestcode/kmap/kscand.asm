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
#   KSTAT      guest-physical address of the statistics blocks below (lowmem, direct-mapped)
#
# Several CPUs (x86shadow scenario kmap --vcpus N; docs/SMP.md's guest contract: EDI = this CPU's
# number, ESI = N): CPU 0 builds the kernel as with one CPU; the others wait for it, load its IDT
# and CR3. Every CPU ages its own share of the process's page tables -- CPU c the tables
# [c * NTABLES / N, (c + 1) * NTABLES / N) -- through its own kmap_atomic slot: the fixmap index is
# type + KM_TYPE_NR * smp_processor_id() (2.4.0 and RHEL3 2.4.21 include/asm-i386/highmem.h /
# atomic_kmap.h `__kmap_atomic`), so the CPUs write different ptes of the one fixmap page table.
# (RHEL3 runs one kscand thread over every zone, mm/vmscan.c `kscand`; on an SMP box the same walk
# -- kmap the page table, ptep_test_and_clear_young -- runs on the other CPUs in kswapd's and the
# allocators' page_referenced at the same time: here each CPU runs the walk over a share.) The
# process has one thread per CPU (one mm, one CR3), each touching the pages of its CPU's share.
# Phases are separated by a spin barrier through shared memory (lib/smp.inc); CPU 0 writes the
# phase markers while the others wait, so a marker separates the phases of every CPU. With one
# CPU there is no barrier and the run is the one-CPU kernel of before, access for access.
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
#                                              FIX_KMAP_BEGIN + KM_TYPE + KM_TYPE_NR * cpu
#                                              (KM_TYPE_NR = 13, 2.6's kmap_types.h)
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
# Exit codes: 1..9 checks (FAIL prints the reason); every CPU checks its own share.

.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "../lib/idt.inc"
.include "../lib/main.inc"
.include "../lib/smp.inc"

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
.set KM_TYPE, 3                        # KM_USER0
.set KMAP_IDX, FIX_KMAP_BEGIN + KM_TYPE  # CPU 0's slot; CPU c's is KMAP_IDX + KM_TYPE_NR * c
.set KMAP_VADDR, FIXADDR_TOP - KMAP_IDX * PAGE
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

# the statistics blocks, read by the host: CPU c's at KSTAT + c * KSTAT_STRIDE, all with this
# layout; with one CPU block 0 describes the whole kernel. The counts and the slot are the CPU's;
# S_TABLES / S_NTABLES are its share (block 0 with one CPU: all tables); S_SCAN, S_FIXPT, S_NPTES
# and S_MAGIC are the same in every block. Addressed as [reg + S_x] with reg = c * KSTAT_STRIDE
# (KSTAT_PTR).
.set KSTAT_STRIDE, 0x40               # (KSTAT_PTR's shift)
.set KSTAT_MAGIC, 0x6b6d6170           # 'kmap'
.set S_KMAPS, KSTAT + 0x00             # kmap_atomic calls
.set S_FIXW, KSTAT + 0x04              # 4-byte stores made to the fixmap pte (kmap and kunmap)
.set S_SKIPS, KSTAT + 0x08             # kmap_atomic calls that found the pte in place (rhel3)
.set S_BTRS, KSTAT + 0x0c              # lock btr on user ptes
.set S_YOUNG, KSTAT + 0x10             # ... that found the accessed bit set (this pass)
.set S_SCAN, KSTAT + 0x14              # current scan
.set S_FIXPT, KSTAT + 0x18             # guest-physical address of the fixmap page table F
.set S_KPTE, KSTAT + 0x1c              # guest-physical address of the kmap slot's pte
.set S_TABLES, KSTAT + 0x20            # guest-physical address of the first user table of the share
.set S_NTABLES, KSTAT + 0x24           # user tables in the share (the rest follow the first)
.set S_NPTES, KSTAT + 0x28
.set S_KVADDR, KSTAT + 0x2c            # the kmap slot's virtual address
.set S_KUNMAPS, KSTAT + 0x30           # kunmap_atomic calls
.set S_TOUCHES, KSTAT + 0x34           # user page reads (counted by the kernel: the share's pages a round)
.set S_MAGIC, KSTAT + 0x38             # KSTAT_MAGIC once the block is valid
.if MAX_VCPUS * KSTAT_STRIDE > 0x400
.error "the statistics blocks must fit in PROG_VARS' page"
.endif
.if VCPU_AREA != 0x8000
.error "int80_handler divides by VCPU_AREA with a shift by 15"
.endif

# kernel variables
.set v_root, PROG_VARS + 0x00
.set v_cur, PROG_VARS + 0x18           # rmap: per-table next pte index (NTABLES dwords)
.set v_alive, PROG_VARS + 0x1c         # rmap: tables with ptes left (NTABLES dwords; CPU c's list
                                       # at its share's first table's entry)
.set v_pos, PROG_VARS + 0x20           # rmap: position of each table in its CPU's list
.set v_entry, PROG_VARS + 0x30         # user VA of user_entry
.set v_ncpus, PROG_VARS + 0x38         # N
.set v_up, PROG_VARS + 0x3c            # CPU 0: the kernel is built, the others may start
# per-CPU variables: arrays of MAX_VCPUS dwords, indexed by the CPU number (ebp in all kernel code)
.set pc_kpte, PROG_VARS + 0x40         # guest-physical address of the CPU's kmap slot pte (kmap_pte - idx)
.set pc_kvaddr, PROG_VARS + 0x60       # the slot's virtual address
.set pc_ksp, PROG_VARS + 0x80          # kernel stack pointer while the process runs on the CPU
.set pc_lcg, PROG_VARS + 0xa0          # rmap: the CPU's LCG
.set pc_alive_n, PROG_VARS + 0xc0
.set pc_left, PROG_VARS + 0xe0
.set pc_curtab, PROG_VARS + 0x100
.set pc_first, PROG_VARS + 0x120       # the CPU's share: first table, number of tables
.set pc_count, PROG_VARS + 0x140

# S_FIXW += the 4-byte stores of one write of the fixmap pte: two in PAE (its halves), else one
# (\kst = this CPU's KSTAT_PTR)
.macro COUNT_FIXW kst
.if PAGING == 3
    add dword ptr [\kst + S_FIXW], 2
.else
    inc dword ptr [\kst + S_FIXW]
.endif
.endm

# reg := this CPU's offset in the statistics blocks (ebp * KSTAT_STRIDE)
.macro KSTAT_PTR reg
    mov \reg, ebp
    shl \reg, 6
.endm

# a phase boundary: every CPU has finished the phase before; CPU 0 writes the marker while the
# others wait; then all go on (no barrier with one CPU)
.macro SYNC_MARK phase, scanreg
    call smp_sync
    test ebp, ebp
    jnz sync_mark_ap_\@
    MARK \phase, \scanreg
sync_mark_ap_\@:
    call smp_sync
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
    mov ebp, edi                       # this CPU's number (smp_processor_id) in every kernel routine
    test ebp, ebp
    jnz ap_main
    mov dword ptr [v_ncpus], esi
    cmp esi, 1
    je main_up
    mov dword ptr [smp_n], esi         # lib/smp.inc's barrier
main_up:
    call pt_init

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

    # the fixmap page table F: one kernel page table holds every fixmap slot of every CPU
    call pt_alloc
    mov ebx, eax
    mov dword ptr [S_FIXPT], eax
    call percpu_init                   # CPU 0's statistics block and slot
    mov esi, FIXADDR_TOP
    mov edx, 2
    mov ecx, 1
    call pt_entry                      # the pde (allocates the pmd in PAE)
    or ebx, KPDE_FLAGS
    PTE_SET eax, ebx

    # the user's pdes -> the highmem tables
    mov esi, USER_BASE
    mov ebx, TABLES_PA | UPDE_FLAGS
    mov ecx, NTABLES
user_pdes:
    push ecx
    mov edx, 2
    mov ecx, 1
    call pt_entry
    PTE_SET eax, ebx
    pop ecx
    add ebx, PAGE
    add esi, TABLE_SPAN
    dec ecx
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
    mov dword ptr [S_MAGIC], KSTAT_MAGIC

    # boot: the kernel reads the process's first page through the slot (as clear_highpage /
    # copy_to_user of a highmem page do), so the fixmap page table is in use -- and shadowed --
    # before kscand starts, as on a kernel that has been running for a while
    mov eax, PAGES_PA
    call kmap_atomic
    mov edx, dword ptr [ebp * 4 + pc_kvaddr]
    mov eax, dword ptr [edx]
    call kunmap_atomic
    mov dword ptr [v_up], 1            # the other CPUs may start
    jmp all_cpus

    # ---- CPU c > 0: wait for CPU 0's kernel, then run on its IDT and page tables
ap_main:
    pause
    cmp dword ptr [v_up], 0
    je ap_main
    mov eax, lib_idtr                  # CPU 0's IDT (lib/idt.inc)
    .byte 0x0f, 0x01, 0x18             # lidt [eax] (keystone mis-encodes lidt in 32-bit mode)
    mov eax, dword ptr [v_root]
    mov cr3, eax
    call percpu_init

all_cpus:
    # ---- warm-up: the process touches all its pages (shadows every user table)
    xor eax, eax
    SYNC_MARK 1, eax
    call run_user

    # ---- the scans
    KSTAT_PTR ecx
    xor ebx, ebx                       # the scan
scan_loop:
    mov dword ptr [ecx + S_SCAN], ebx
    SYNC_MARK 2, ebx
    mov dword ptr [ecx + S_YOUNG], 0
.if ORDER == 0
    call kscand_table
.else
    call kscand_rmap
.endif
    mov eax, dword ptr [ebp * 4 + pc_count]
    imul eax, eax, NPTES
    mov edx, dword ptr [ecx + S_YOUNG]
    CHECK_EQ edx, eax, 1, "kscand: a pte the process touched was not young"
    SYNC_MARK 3, ebx
    call run_user
    inc ebx
    cmp ebx, NSCANS
    jb scan_loop

    mov eax, NSCANS
    SYNC_MARK 4, eax
    mov eax, dword ptr [ebp * 4 + pc_count]
    imul eax, eax, NSCANS * NPTES
    mov edx, dword ptr [ecx + S_BTRS]
    CHECK_EQ edx, eax, 2, "kscand: wrong number of ptes tested"
    SMP_IF_AP ap_done
    PASS
ap_done:
    MAIN_EPILOGUE

# smp_sync: every CPU waits here until all have arrived (lib/smp.inc's spin barrier; nothing with
# one CPU). Preserves every register except the flags.
smp_sync:
    cmp dword ptr [v_ncpus], 1
    je smp_sync_done
    call smp_barrier
smp_sync_done:
    ret

# percpu_init (ebp = the CPU; CPU 0's fixmap page table address in [S_FIXPT]): the CPU's kmap slot,
# its share of the user tables, its LCG and its statistics block. Preserves every register.
percpu_init:
    pushal
    KSTAT_PTR ecx
    # idx = KM_TYPE + KM_TYPE_NR * smp_processor_id(); vaddr = __fix_to_virt(FIX_KMAP_BEGIN + idx)
    imul eax, ebp, KM_TYPE_NR
    add eax, KMAP_IDX
    shl eax, 12
    mov edx, FIXADDR_TOP
    sub edx, eax
    mov dword ptr [ebp * 4 + pc_kvaddr], edx
    mov dword ptr [ecx + S_KVADDR], edx
    shr edx, 12                        # kmap_pte - idx: the slot's pte in F
    and edx, PT_ENTRIES - 1
    imul edx, edx, PTE_SIZE
    add edx, dword ptr [S_FIXPT]
    mov dword ptr [ebp * 4 + pc_kpte], edx
    mov dword ptr [ecx + S_KPTE], edx
    mov eax, dword ptr [S_FIXPT]
    mov dword ptr [ecx + S_FIXPT], eax
    # the share: tables [c * NTABLES / N, (c + 1) * NTABLES / N)
    imul eax, ebp, NTABLES
    xor edx, edx
    div dword ptr [v_ncpus]
    mov esi, eax                       # first
    lea eax, [ebp + 1]
    imul eax, eax, NTABLES
    xor edx, edx
    div dword ptr [v_ncpus]
    sub eax, esi                       # count
    mov dword ptr [ebp * 4 + pc_first], esi
    mov dword ptr [ebp * 4 + pc_count], eax
    mov dword ptr [ecx + S_NTABLES], eax
    shl esi, 12
    add esi, TABLES_PA
    mov dword ptr [ecx + S_TABLES], esi
    mov dword ptr [ecx + S_NPTES], NPTES
    # the LCG: SEED on CPU 0 (the one-CPU sequence), another start on each other CPU
    imul eax, ebp, 0x61c88647
    add eax, SEED
    mov dword ptr [ebp * 4 + pc_lcg], eax
    xor eax, eax
    mov dword ptr [ecx + S_KMAPS], eax
    mov dword ptr [ecx + S_FIXW], eax
    mov dword ptr [ecx + S_SKIPS], eax
    mov dword ptr [ecx + S_BTRS], eax
    mov dword ptr [ecx + S_YOUNG], eax
    mov dword ptr [ecx + S_SCAN], eax
    mov dword ptr [ecx + S_KUNMAPS], eax
    mov dword ptr [ecx + S_TOUCHES], eax
    test ebp, ebp
    jz percpu_done                     # CPU 0's block is valid once its CR3 is loaded (main)
    mov dword ptr [ecx + S_MAGIC], KSTAT_MAGIC
percpu_done:
    popal
    ret

# ------------------------------------------------------------------ kmap_atomic / kunmap_atomic
# kmap_atomic: eax = the page (a highmem frame) -> this CPU's slot maps it. Preserves every register.
kmap_atomic:
    push eax
    push edx
    push ecx
    KSTAT_PTR ecx
    inc dword ptr [ecx + S_KMAPS]
    mov edx, dword ptr [ebp * 4 + pc_kpte]
    or eax, KMAP_PROT                  # mk_pte(page, kmap_prot); the high half is 0 (RAM < 4 GiB)
.if VARIANT == V_RHEL3
    # "Performance optimization - do not flush if the new pte is the same as the old one"
    cmp dword ptr [edx], eax
    jne kmap_store
.if PAGING == 3
    cmp dword ptr [edx + 4], 0
    jne kmap_store
.endif
    inc dword ptr [ecx + S_SKIPS]
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
    COUNT_FIXW ecx
    mov eax, dword ptr [ebp * 4 + pc_kvaddr]
    invlpg byte ptr [eax]              # __flush_tlb_one(vaddr)
kmap_done:
    pop ecx
    pop edx
    pop eax
    ret

kunmap_atomic:
    push ecx
    KSTAT_PTR ecx
    inc dword ptr [ecx + S_KUNMAPS]
.if VARIANT == V_DEBUG || VARIANT == V_26
    push edx
    mov edx, dword ptr [ebp * 4 + pc_kpte]
.if VARIANT == V_DEBUG
    PTE_SET edx, 0                     # 2.4 pte_clear = set_pte(0): high half, then low half
.else
    PTE_CLEAR edx                      # 2.6 PAE pte_clear: low half, smp_wmb(), high half
.endif
    COUNT_FIXW ecx
    mov edx, dword ptr [ebp * 4 + pc_kvaddr]
    invlpg byte ptr [edx]              # (2.6: kpte_clear_flush)
    pop edx
.endif
    pop ecx
    ret

# ------------------------------------------------------------------ kscand, table order
# Each user page table of this CPU's share mapped once; its ptes tested linearly through the slot.
kscand_table:
    pushal
    KSTAT_PTR edx
    mov ebx, dword ptr [ebp * 4 + pc_first]
    shl ebx, 12
    add ebx, TABLES_PA
    mov edi, dword ptr [ebp * 4 + pc_count]
kt_table:
    mov eax, ebx
    call kmap_atomic
    mov esi, dword ptr [ebp * 4 + pc_kvaddr]
    mov ecx, NPTES
kt_pte:
    lock btr dword ptr [esi], 5        # ptep_test_and_clear_young
    adc dword ptr [edx + S_YOUNG], 0
    add esi, PTE_SIZE
    dec ecx
    jnz kt_pte
    add dword ptr [edx + S_BTRS], NPTES
    call kunmap_atomic
    add ebx, PAGE
    dec edi
    jnz kt_table
    popal
    ret

# ------------------------------------------------------------------ kscand, reverse-map order
# Pages in active-list order: each step picks the page whose pte is tested next -- in the same table
# as the previous one with probability LINEARITY %, else in another table of the share with ptes
# left (uniformly) -- and reaches that pte through its own kmap_atomic of its page table.
lcg_next:                              # eax = a pseudo-random number (24 bits), this CPU's LCG
    mov eax, dword ptr [ebp * 4 + pc_lcg]
    imul eax, eax, 1664525
    add eax, 1013904223
    mov dword ptr [ebp * 4 + pc_lcg], eax
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
    # all tables of the share alive, every cursor at 0; this CPU's list: v_alive from entry `first`
    mov esi, dword ptr [v_cur]
    mov edi, dword ptr [ebp * 4 + pc_first]
    shl edi, 2
    add edi, dword ptr [v_alive]
    mov edx, dword ptr [v_pos]
    xor ecx, ecx
kr_init:
    mov eax, dword ptr [ebp * 4 + pc_first]
    add eax, ecx                       # the table
    mov dword ptr [esi + eax * 4], 0
    mov dword ptr [edi + ecx * 4], eax
    mov dword ptr [edx + eax * 4], ecx
    inc ecx
    cmp ecx, dword ptr [ebp * 4 + pc_count]
    jb kr_init
    mov dword ptr [ebp * 4 + pc_alive_n], ecx
    imul eax, ecx, NPTES
    mov dword ptr [ebp * 4 + pc_left], eax
    call lcg_mod
    add eax, dword ptr [ebp * 4 + pc_first]
    mov dword ptr [ebp * 4 + pc_curtab], eax
kr_step:
    # same table?
    mov ebx, dword ptr [ebp * 4 + pc_curtab]
    mov ecx, 100
    call lcg_mod
    cmp eax, LINEARITY
    jae kr_other
    cmp dword ptr [esi + ebx * 4], NPTES
    jb kr_have
kr_other:
    mov ecx, dword ptr [ebp * 4 + pc_alive_n]
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
    push edx
    mov edx, dword ptr [v_pos]
    mov eax, dword ptr [edx + ebx * 4] # its position
    mov ecx, dword ptr [ebp * 4 + pc_alive_n]
    dec ecx
    mov dword ptr [ebp * 4 + pc_alive_n], ecx
    mov ecx, dword ptr [edi + ecx * 4] # the last alive table
    mov dword ptr [edi + eax * 4], ecx
    mov dword ptr [edx + ecx * 4], eax
    pop edx
kr_alive:
    mov dword ptr [ebp * 4 + pc_curtab], ebx
    mov eax, ebx
    shl eax, 12
    add eax, TABLES_PA
    call kmap_atomic                   # rmap_ptep_map
    mov eax, dword ptr [ebp * 4 + pc_kvaddr]
    KSTAT_PTR ecx
.if PAGING == 2
    lock btr dword ptr [eax + edx * 4], 5
.else
    lock btr dword ptr [eax + edx * 8], 5
.endif
    adc dword ptr [ecx + S_YOUNG], 0
    inc dword ptr [ecx + S_BTRS]
    call kunmap_atomic                 # rmap_ptep_unmap
    dec dword ptr [ebp * 4 + pc_left]
    jnz kr_step
    popal
    ret

# ------------------------------------------------------------------ the user process
# run_user: the process's thread on this CPU runs at user_entry over the CPU's share; returns when
# it does int 0x80.
run_user:
    pushal
    # schedule() to the process: switch_mm loads its CR3, which drops the non-global TLB entries,
    # so its accesses walk the page tables again and set the accessed bits kscand cleared (without
    # it, a CPU may keep using cached translations and never set them: that is architectural)
    mov eax, dword ptr [v_root]
    mov cr3, eax
    mov dword ptr [ebp * 4 + pc_ksp], esp
    mov edx, dword ptr [ebp * 4 + pc_count]     # the thread's tables: edx of them from esi
    imul eax, edx, NPTES
    KSTAT_PTR ecx
    add dword ptr [ecx + S_TOUCHES], eax
    mov esi, dword ptr [ebp * 4 + pc_first]
    imul esi, esi, TABLE_SPAN
    add esi, USER_BASE
    mov ebx, dword ptr [v_entry]
    IRET_TO_CPL3
user_back:
    LOAD_DATA_SEGS SEL_KDATA
    popal
    ret

int80_handler:
    # which CPU: the one whose TSS stack we are on (as 2.4 finds current, and current->processor,
    # from esp): CPU 0's below VCPU_STACKS, CPU c's in area c - 1 of VCPU_STACKS (docs/SMP.md)
    xor ebp, ebp
    cmp esp, VCPU_STACKS
    jb int80_cpu
    mov ebp, esp
    sub ebp, VCPU_STACKS
    shr ebp, 15                        # / VCPU_AREA
    inc ebp
int80_cpu:
    mov esp, dword ptr [ebp * 4 + pc_ksp]   # ss is the kernel's (SS0 of the TSS)
    jmp user_back

# Runs at UCODE + (label - page of user_code_start): position independent.
# In: esi = the first page of the thread's first table, edx = its number of tables.
.align 4096
user_code_start:
user_entry:
    mov ebx, edx
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
