# selfmap.asm -- page tables written through mappings of themselves (recursive and self-mapping ptes).
# x86shadow: modes=32,pae,64
#
# A recursive entry makes the paging structures visible as data: mode 32 PD[1023] -> the PD
# (ptes at 0xffc00000, PDEs at 0xfffff000); PAE: PD3[508..511] -> PD0..PD3 (ptes at 0xff800000, PDEs
# at 0xffffc000); 64: PML4[510] -> the PML4 (ptes at 0xffffff0000000000 ...). So a page-table frame is
# shadowed both as a table and (through the recursive entry) mapped as data: every write below goes to a
# shadowed page table through a virtual address that maps that page table.
#   1 the PDE and a pte read through the recursive window equal the tables' contents (A/D masked)
#   2 a pte written through the window (a not-present pte made present) + invlpg: the page is mapped
#   3 the same pte re-pointed through the window + invlpg: the new frame is seen
#   4 a new chain built entirely through the window: mode 32/PAE a PDE -> new PT, 64 a PML4E -> new
#     PDPT -> new PD -> new PT; each new table (prefilled with a not-present junk pattern) is zeroed with
#     `rep stos` through the window before the next level is written; then a pte, invlpg, read
#   5 a pte of the window's page table that maps the page table itself (leaf self-map): pte k written
#     through it + invlpg -> seen; then the self-mapping pte re-points itself, written through itself,
#     + invlpg -> the same address now maps another frame
# Exit codes: 1..29 checks.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/main.inc"

.set WIN, 0x40000000                   # PT_W maps WIN .. WIN + 2/4 MiB
.set WIN3, 0x41000000                  # mode 32 / PAE: the chain built in step 4 (a PDE with no PT)
.set WIN3_64, 0x0000010000000000       # 64: PML4 index 2
.set SELF, 5                           # PT_W[SELF] maps PT_W itself (step 5)
.set SELF_OFF, PTE_SIZE * SELF
.set PTE2_OFF, PTE_SIZE * 2             # (keystone drops "* n" after a symbol inside [])
.set JUNK, 0xdead0000                  # prefill of new tables (P = 0 in every entry)
.set AD_MASK, 0xffffff9f               # ~(A | D)

.set v_root, PROG_VARS + 0x00
.set v_pt_w, PROG_VARS + 0x08
.set v_frame, PROG_VARS + 0x10         # 8 quads: frames with markers

.macro MARK n
    mov eax, 0x4d000000 + \n
.endm

.if BITS == 64
rec_prefix:
    .quad 0xffffff0000000000, 0xffffff7f80000000, 0xffffff7fbfc00000, 0xffffff7fbfdfe000
.endif

# rec_addr: esi (rsi) = va, edx = level (1 pte .. PT_LEVELS) -> eax (rax) = virtual address of the entry
# that maps va at that level, inside the recursive window
rec_addr:
.if BITS == 64
    push rcx
    push rdx
    lea ecx, [edx + edx * 8 + 3]       # 12 + 9 * (level - 1)
    mov rax, rsi
    shl rax, 16                        # drop the sign extension (bits 63..48)
    shr rax, 16
    shr rax, cl
    shl rax, 3
    mov rcx, rec_prefix - 8
    mov rdx, qword ptr [rcx + rdx * 8]
    or rax, rdx
    pop rdx
    pop rcx
.else
.if PAGING == 2
    mov eax, esi
    cmp edx, 1
    jne rec_addr_l2
    shr eax, 12
    lea eax, [eax * 4 + 0xffc00000]
    ret
rec_addr_l2:
    shr eax, 22
    lea eax, [eax * 4 + 0xfffff000]
.else
    mov eax, esi
    cmp edx, 1
    jne rec_addr_l2
    shr eax, 12
    lea eax, [eax * 8 + 0xff800000]
    ret
rec_addr_l2:
    shr eax, 21
    lea eax, [eax * 8 + 0xffffc000]
.endif
.endif
    ret

# rec_write: esi = va, edx = level, ecx = new entry (low 32 bits; high bits 0), written through the window
rec_write:
    PUSHR eax, rax
    call rec_addr
.if BITS == 64
    mov ecx, ecx                       # the high bits 0
.endif
    PTE_SET eax, ecx, rax, rcx
    POPR eax, rax
    ret

# rec_read: esi = va, edx = level -> ecx = low 32 bits of the entry, read through the window
rec_read:
    PUSHR eax, rax
    call rec_addr
.if BITS == 64
    mov ecx, dword ptr [rax]
.else
    mov ecx, dword ptr [eax]
.endif
    POPR eax, rax
    ret

# rec_invlpg: invlpg the page of the window that holds the entry (esi = va, edx = level)
rec_invlpg:
    PUSHR eax, rax
    call rec_addr
.if BITS == 64
    invlpg [rax]
.else
    invlpg [eax]
.endif
    POPR eax, rax
    ret

# junk_frame: eax = a frame filled with JUNK (through the identity map)
junk_frame:
    PUSHR ecx, rcx
    PUSHR edi, rdi
    call pt_alloc
    mov edi, eax
    mov ecx, PAGE / 4
    PUSHR eax, rax
    mov eax, JUNK
    cld
    rep stosd
    POPR eax, rax
    POPR edi, rdi
    POPR ecx, rcx
    ret

# check_zero: eax = frame: fail (code in ebx) unless the whole frame reads 0 through the identity map
check_zero:
    PUSHR ecx, rcx
    PUSHR edx, rdx
    xor ecx, ecx
cz_loop:
    mov edx, dword ptr [eax + ecx * 4]
    test edx, edx
    jz cz_next
    mov ecx, ebx
    LOADSTR "step 4: a new table was not zeroed through the recursive window"
    SAVEVAL edx
    jmp fail_report_v
cz_next:
    inc ecx
    cmp ecx, PAGE / 4
    jb cz_loop
    POPR edx, rdx
    POPR ecx, rcx
    ret

# zero_through_window: esi = va, edx = level of the table to clear: rep stos over the table's page as
# seen through the recursive window (the table that the entry at level edx + 1 points to)
zero_through_window:
    PUSHR eax, rax
    PUSHR ecx, rcx
    PUSHR edi, rdi
    call rec_addr
.if BITS == 64
    and rax, -4096
    mov rdi, rax
    xor eax, eax
    mov ecx, PAGE / 8
    cld
    rep stosq
.else
    and eax, 0xfffff000
    mov edi, eax
    xor eax, eax
    mov ecx, PAGE / 4
    cld
    rep stosd
.endif
    POPR edi, rdi
    POPR ecx, rcx
    POPR eax, rax
    ret

main:
    MAIN_PROLOGUE
    call pt_init

    # marker frames 0..7
    xor ebx, ebx
mk_frames:
    call pt_alloc
    lea edx, [ebx + 0x4d000000]
    mov dword ptr [eax], edx
    mov dword ptr [v_frame + ebx * 8], eax
    mov dword ptr [v_frame + ebx * 8 + 4], 0
    inc ebx
    cmp ebx, 8
    jb mk_frames

    # root + identity map + PT_W (pte 0 not present, pte 2 -> frame 0)
    NEW_ROOT v_root
    mov esi, WIN + 0x2000
    mov eax, dword ptr [v_frame]
    or eax, PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    and eax, 0xfffff000
    mov dword ptr [v_pt_w], eax

    # the recursive entry
.if PAGING == 2
    mov eax, edi
    or eax, PTE_P | PTE_W
    mov dword ptr [edi + 1023 * 4], eax
.endif
.if PAGING == 3
    # all four PDs must exist; PD3[508 + i] -> PDi
    xor ebx, ebx
mk_pds:
    mov esi, ebx
    shl esi, 30
    mov edx, 2
    mov ecx, 1
    call pt_entry
    inc ebx
    cmp ebx, 4
    jb mk_pds
    mov edx, dword ptr [edi + 3 * 8]
    and edx, 0xfffff000                # PD3
    xor ebx, ebx
mk_rec:
    mov eax, dword ptr [edi + ebx * 8]
    and eax, 0xfffff000
    or eax, PTE_P | PTE_W
    mov dword ptr [edx + 508 * 8 + ebx * 8], eax
    mov dword ptr [edx + 508 * 8 + ebx * 8 + 4], 0
    inc ebx
    cmp ebx, 4
    jb mk_rec
.endif
.if PAGING == 4
    mov eax, edi
    or eax, PTE_P | PTE_W
    mov dword ptr [edi + 510 * 8], eax
    mov dword ptr [edi + 510 * 8 + 4], 0
.endif
.if BITS == 64
    mov cr3, rdi
.else
    mov cr3, edi
.endif

    # ---- 1: entries read through the window equal the tables
    mov esi, WIN
    mov edx, 2
    mov eax, dword ptr [v_root]
    mov edi, eax
    xor ecx, ecx
    call pt_entry
    mov eax, dword ptr [eax]
    mov edx, 2
    call rec_read
    and ecx, AD_MASK
    and eax, AD_MASK
    CHECK_EQ ecx, eax, 1, "step 1: PDE read through the window differs from the PD"
    mov esi, WIN + 0x2000
    mov eax, WIN + 0x2000
    mov eax, dword ptr [eax]
    CHECK_EQ eax, 0x4d000000, 2, "step 1: frame 0 not mapped at WIN + 0x2000"
    mov edx, 1
    call rec_read
    and ecx, AD_MASK
    mov eax, dword ptr [v_frame]
    or eax, PTE_P | PTE_W
    CHECK_EQ ecx, eax, 3, "step 1: pte read through the window differs"
    mov eax, dword ptr [v_pt_w]
    mov eax, dword ptr [eax + PTE2_OFF]
    and eax, PTE_A
    CHECK_EQ eax, PTE_A, 4, "step 1: accessed bit not set in the pte (seen through identity)"

    # ---- 2: a not-present pte made present through the window
    mov esi, WIN
    mov edx, 1
    mov ecx, dword ptr [v_frame + 8]
    or ecx, PTE_P | PTE_W
    call rec_write
    invlpg [esi]
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x4d000001, 5, "step 2: pte written through the window not used"
    mov eax, dword ptr [v_pt_w]
    mov eax, dword ptr [eax]
    and eax, AD_MASK
    CHECK_EQ eax, ecx, 6, "step 2: pte written through the window not in the PT"

    # ---- 3: re-pointed through the window
    mov ecx, dword ptr [v_frame + 16]
    or ecx, PTE_P | PTE_W
    call rec_write
    invlpg [esi]
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x4d000002, 7, "step 3: re-pointed pte not used after invlpg"
    mov dword ptr [esi + 4], 0x33333333
    mov eax, dword ptr [v_frame + 16]
    mov eax, dword ptr [eax + 4]
    CHECK_EQ eax, 0x33333333, 8, "step 3: write through the re-pointed pte not in frame 2"

    # ---- 4: a new chain built through the window
.if BITS == 64
    mov rsi, WIN3_64
    mov ebp, 4
.else
    mov esi, WIN3
    mov ebp, 2
.endif
chain:
    call junk_frame                    # the next table, junk-filled
    mov ebx, eax
    mov ecx, eax
    or ecx, PTE_P | PTE_W | PTE_U
    mov edx, ebp
    call rec_write                     # entry at this level -> new table
    dec edx
    call rec_invlpg                    # the window page through which the new table is now seen
    call zero_through_window
    mov eax, ebx
    lea ebx, [ebp + 8]                 # fail code 9..12 = 8 + level
    call check_zero
    dec ebp
    cmp ebp, 1
    ja chain
    # the leaf
    mov edx, 1
    mov ecx, dword ptr [v_frame + 24]
    or ecx, PTE_P | PTE_W
    call rec_write
.if BITS == 64
    invlpg [rsi]
    mov eax, dword ptr [rsi + 0x10]
.else
    invlpg [esi]
    mov eax, dword ptr [esi + 0x10]
.endif
    CHECK_EQ eax, 0, 13, "step 4: page mapped through the new chain: wrong data at +0x10"
    LDSI eax, 0
    CHECK_EQ eax, 0x4d000003, 14, "step 4: page mapped through the new chain: wrong marker"
    # the chain, walked through the identity map, ends at frame 3
    mov edi, dword ptr [v_root]
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    CHECK_NE eax, 0, 15, "step 4: chain not found by a walk of the tables"
    mov eax, dword ptr [eax]
    and eax, AD_MASK
    mov ecx, dword ptr [v_frame + 24]
    or ecx, PTE_P | PTE_W
    CHECK_EQ eax, ecx, 16, "step 4: leaf pte of the new chain"

    # ---- 5: leaf self-map: PT_W[SELF] -> PT_W
    mov esi, WIN + SELF * 0x1000
    mov edx, 1
    mov ecx, dword ptr [v_pt_w]
    or ecx, PTE_P | PTE_W
    call rec_write
    invlpg [esi]
    # pte 2 seen through the self-map
    mov eax, dword ptr [esi + PTE2_OFF]
    and eax, AD_MASK
    mov ecx, dword ptr [v_frame]
    or ecx, PTE_P | PTE_W
    CHECK_EQ eax, ecx, 17, "step 5: pte 2 read through the self-map"
    # pte 1 written through the self-map
    mov ecx, dword ptr [v_frame + 32]
    or ecx, PTE_P | PTE_W
.if PAGING >= 3
    mov dword ptr [esi + PTE_SIZE + 4], 0
.endif
    mov dword ptr [esi + PTE_SIZE], ecx
    mov edi, WIN + 0x1000
    invlpg [edi]
    mov eax, dword ptr [edi]
    CHECK_EQ eax, 0x4d000004, 18, "step 5: pte written through the self-map not used"
    # the self-map pte re-points itself (written through itself)
    mov ecx, dword ptr [v_frame + 40]
    or ecx, PTE_P | PTE_W
    mov dword ptr [esi + SELF_OFF], ecx
    invlpg [esi]
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x4d000005, 19, "step 5: self-map pte re-pointed through itself not used"
    mov eax, dword ptr [v_pt_w]
    mov eax, dword ptr [eax + SELF_OFF]
    and eax, AD_MASK
    CHECK_EQ eax, ecx, 20, "step 5: self-map pte value in the PT"
    # and the pages mapped before still work
    mov eax, WIN + 0x2000
    mov eax, dword ptr [eax]
    CHECK_EQ eax, 0x4d000000, 21, "step 5: WIN + 0x2000 lost"
    mov eax, WIN
    mov eax, dword ptr [eax]
    CHECK_EQ eax, 0x4d000002, 22, "step 5: WIN lost"

    PASS
    MAIN_EPILOGUE
