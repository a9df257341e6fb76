# ptwrites.asm -- page-table writes by every kind of instruction, checked through the new mapping; A/D bits.
# x86shadow: modes=32,pae,64
#
# A window WIN is mapped by one page table PT_W (pte k maps WIN + k * 4 KiB). 16 frames F0..F15 lie in a
# 64 KiB-aligned block, F_i holding the marker 0x7f000000 + i at offset 0. Each case writes ptes of PT_W
# (through the identity map: PT_W is a shadowed page table), does invlpg (or a CR3 reload) and reads
# the page back (a read of a not-present page raises #PF; the handler makes it return FAULTED).
#   1 mov: a not-present pte made present, then re-pointed (PAE: two 4-byte stores, high half first)
#   2 xchg: the old pte comes back, the new one is used
#   3 lock cmpxchg: a successful one (ZF=1, new pte used) and a failing one (ZF=0, pte unchanged)
#   4 lock cmpxchg8b: pae/64 one 8-byte pte (with NX in the high half when the CPU has NX), mode 32 two
#     adjacent 4-byte ptes at once; and a failing one
#   5 lock btr: A cleared (CF=1, reads back cleared; after invlpg a read sets it again); W cleared with
#     btr (a write then faults P|W) and set again with lock bts
#   6 byte/word writes: byte 1 re-points the pte inside the 64 KiB block; byte 0 makes it read-only
#     (a write faults P|W) and writable again; a misaligned word write (bytes 1-2) re-points it
#   7 rep stos / rep movs on 8 ptes: fill with one value (modes 32 and 64: rep stosd / rep stosq),
#     copy 8 distinct ptes (rep movsd), clear (rep stosd of 0) -> each of the 8 pages faults
#   8 A and D at every level of fresh mappings: a 4 KiB page read (A on every level walked, D on none),
#     then written (D on the leaf only); a large page likewise; a first access that is a write (A and D
#     at once); D cleared in the pte + invlpg: a read leaves it clear, a write sets it again.
#     (PAE PDPTEs have no A bit.)
# Exit codes: 1..59 cases, 60..99 A/D (base + level), 100..102 #PF handler.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"

.set WIN, 0x40000000
.if BITS == 64
.set WIN_AD, 0x0000018000000000        # PML4 index 3: every level fresh
.set WIN_ADL, 0x0000020000000000       # PML4 index 4: large page, every level fresh
.else
.set WIN_AD, 0x81000000                # mode 32: fresh PDE; PAE: fresh PD (PDPTE 2) and PT
.set WIN_ADL, 0xc1000000               # mode 32: fresh PDE; PAE: fresh PD (PDPTE 3)
.endif
.set LARGE_PHYS, 0x3000000             # 48 MiB: 4 MiB aligned, beyond what pt_alloc hands out
.set MARK, 0x7f000000
.set FAULTED, 0xfa17fa17
.set PTE_PW, PTE_P | PTE_W

.set v_root, PROG_VARS + 0x00
.set v_pt_w, PROG_VARS + 0x08
.set v_f, PROG_VARS + 0x10             # 16 dwords: F0..F15
.set pf_exp_cr2, PROG_VARS + 0x50      # quad
.set pf_exp_err, PROG_VARS + 0x58
.set pf_count, PROG_VARS + 0x5c
.set pf_resume, PROG_VARS + 0x60       # quad: where the handler resumes (0: no fault expected)
.set have_nx, PROG_VARS + 0x68
.set pte_array, PROG_VARS + 0x100      # 8 ptes (8 bytes each) for rep movs

# ------------------------------------------------------------------ helpers
# pte_ptr: ecx = k -> eax = address of PT_W[k]
pte_ptr:
    mov eax, ecx
.if PAGING == 2
    shl eax, 2
.else
    shl eax, 3
.endif
    add eax, dword ptr [v_pt_w]
    ret

# fval: ecx = i -> eax = F_i | P | W
fval:
    mov eax, dword ptr [v_f + ecx * 4]
    or eax, PTE_PW
    ret

# win_page: ecx = k -> esi = WIN + k * 4 KiB
win_page:
    mov esi, ecx
    shl esi, 12
    add esi, WIN
    ret

# flush_page: ecx = k: invlpg WIN + k * 4 KiB
flush_page:
.if BITS == 64
    push rsi
    call win_page
    invlpg [rsi]
    pop rsi
.else
    push esi
    call win_page
    invlpg [esi]
    pop esi
.endif
    ret

# probe: ecx = k -> eax = dword at WIN + k * 4 KiB, or FAULTED after a not-present #PF (err 0)
probe:
.if BITS == 64
    push rsi
    push rax
    call win_page
    mov rax, pf_exp_cr2
    mov qword ptr [rax], rsi
    mov dword ptr [pf_exp_err], 0
    mov rax, probe_resume
    mov qword ptr [pf_resume], rax
    pop rax
    mov eax, dword ptr [rsi]
probe_resume:
    mov qword ptr [pf_resume], 0
    pop rsi
.else
    push esi
    call win_page
    mov dword ptr [pf_exp_cr2], esi
    mov dword ptr [pf_exp_err], 0
    mov dword ptr [pf_resume], probe_resume
    mov eax, dword ptr [esi]
probe_resume:
    mov dword ptr [pf_resume], 0
    pop esi
.endif
    ret

# probe_write: ecx = k, edx = value -> writes it at WIN + k * 4 KiB + 4; eax = 0, or FAULTED after a
# protection #PF (err P|W)
probe_write:
.if BITS == 64
    push rsi
    call win_page
    add rsi, 4
    mov rax, pf_exp_cr2
    mov qword ptr [rax], rsi
    mov dword ptr [pf_exp_err], PF_P | PF_W
    mov rax, probe_write_resume
    mov qword ptr [pf_resume], rax
    xor eax, eax
    mov dword ptr [rsi], edx
probe_write_resume:
    mov qword ptr [pf_resume], 0
    pop rsi
.else
    push esi
    call win_page
    add esi, 4
    mov dword ptr [pf_exp_cr2], esi
    mov dword ptr [pf_exp_err], PF_P | PF_W
    mov dword ptr [pf_resume], probe_write_resume
    xor eax, eax
    mov dword ptr [esi], edx
probe_write_resume:
    mov dword ptr [pf_resume], 0
    pop esi
.endif
    ret

# map_k: ecx = k, edx = i: PT_W[k] := F_i | P | W (with pt_map)
map_k:
.if BITS == 64
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
.else
    pushal
.endif
    call win_page
    mov ecx, edx
    call fval
    mov edi, dword ptr [v_root]
    xor edx, edx
    mov ecx, 1
    call pt_map
.if BITS == 64
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
.else
    popal
.endif
    ret

.macro PROBE k, i, code, text
    mov ecx, \k
    call probe
    CHECK_EQ eax, MARK + \i, \code, "\text"
.endm

.macro PROBE_FAULTS k, code, text
    mov ecx, \k
    call probe
    CHECK_EQ eax, FAULTED, \code, "\text"
.endm

# entry: esi (rsi) = va, edx = level -> eax = low 32 bits of the entry (walk of v_root; 0 if missing)
entry:
.if BITS == 64
    push rcx
    push rdi
.else
    push ecx
    push edi
.endif
    mov edi, dword ptr [v_root]
    xor ecx, ecx
    call pt_entry
    test eax, eax
    jz entry_done
    mov eax, dword ptr [eax]
entry_done:
.if BITS == 64
    pop rdi
    pop rcx
.else
    pop edi
    pop ecx
.endif
    ret

# check_ad: esi (rsi) = va, ebp = leaf level, ebx = D expected on the leaf (0 or PTE_D), edi = fail-code
# base: every level from the top down to the leaf must have A; D only on the leaf, as expected
check_ad:
.if BITS == 64
    push rax
    push rdx
.else
    push eax
    push edx
.endif
    mov edx, PT_LEVELS
cad_loop:
.if PAGING == 3
    cmp edx, 3
    je cad_next                        # PAE PDPTE: no A/D
.endif
    call entry
    test eax, PTE_A
    jnz cad_a_ok
    lea ecx, [edi + edx]
    SAVEVAL eax
    LOADSTR "A/D: accessed bit missing at level (code - base)"
    jmp fail_report_v
cad_a_ok:
    and eax, PTE_D
    cmp edx, ebp
    jne cad_inner
    cmp eax, ebx
    je cad_next
    lea ecx, [edi + edx]
    SAVEVAL eax
    LOADSTR "A/D: wrong dirty bit on the leaf (code - base = level)"
    jmp fail_report_v
cad_inner:
    test eax, eax
    jz cad_next
    lea ecx, [edi + edx]
    SAVEVAL eax
    LOADSTR "A/D: dirty bit set on a non-leaf entry (code - base = level)"
    jmp fail_report_v
cad_next:
    dec edx
    cmp edx, ebp
    jae cad_loop
.if BITS == 64
    pop rdx
    pop rax
.else
    pop edx
    pop eax
.endif
    ret

# memory access through esi (rsi in mode 64, where the A/D windows lie above 4 GiB): LDSI, STSI
# (lib/main.inc)

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    mov dword ptr [pf_count], 0
    mov dword ptr [pf_resume], 0
    mov dword ptr [pf_resume + 4], 0
    mov dword ptr [have_nx], 0

.if PAGING >= 3
    NX_ENABLE no_nx
    mov dword ptr [have_nx], 1
no_nx:
.endif

    call idt_init
    SET_GATE 14, pf_handler

    # root, identity map, PT_W (created by mapping WIN + 31 pages: F15, kept to the end)
    call pt_alloc
    mov dword ptr [v_root], eax
    mov dword ptr [v_root + 4], 0
    mov edi, eax

    # 16 frames in a 64 KiB-aligned block
    mov eax, dword ptr [lib_pt_next]
    add eax, 0xffff
    and eax, 0xffff0000
    mov dword ptr [lib_pt_next], eax
    xor ebx, ebx
mk_frames:
    call pt_alloc
    lea edx, [ebx + MARK]
    mov dword ptr [eax], edx
    mov dword ptr [v_f + ebx * 4], eax
    inc ebx
    cmp ebx, 16
    jb mk_frames

    mov eax, PTE_P | PTE_W
    call pt_identity
    mov esi, WIN + 31 * 0x1000
    mov ecx, 15
    call fval
    xor edx, edx
    mov ecx, 1
    call pt_map
    and eax, 0xfffff000
    mov dword ptr [v_pt_w], eax
.if BITS == 64
    mov cr3, rdi
.else
    mov cr3, edi
.endif
    PROBE 31, 15, 1, "setup: WIN + 31 pages"

    # ---- 1: mov
    PROBE_FAULTS 0, 2, "mov: pte 0 should start not present"
    xor ecx, ecx
    call pte_ptr
    mov ebx, eax
    mov ecx, 1
    call fval
    PTE_SET ebx, eax, rbx, rax
    xor ecx, ecx
    call flush_page
    PROBE 0, 1, 3, "mov: not-present -> present"
    mov ecx, 2
    call fval
    PTE_SET ebx, eax, rbx, rax
    xor ecx, ecx
    call flush_page
    PROBE 0, 2, 4, "mov: re-pointed"

    # ---- 2: xchg
    mov ecx, 1
    mov edx, 3
    call map_k
    PROBE 1, 3, 5, "xchg: before"
    mov ecx, 1
    call pte_ptr
    mov ebx, eax
    mov ecx, 4
    call fval
.if BITS == 64
    xchg qword ptr [rbx], rax
.else
    xchg dword ptr [ebx], eax
.endif
    and eax, 0xffffff9f                # A/D of the old pte
    mov ecx, 3
    mov edx, eax
    call fval
    CHECK_EQ edx, eax, 6, "xchg: old pte not returned"
    mov ecx, 1
    call flush_page
    PROBE 1, 4, 7, "xchg: new pte not used"

    # ---- 3: lock cmpxchg
    mov ecx, 2
    mov edx, 5
    call map_k
    PROBE 2, 5, 8, "cmpxchg: before"
    mov ecx, 2
    call pte_ptr
    mov ebx, eax
    mov ecx, 6
    call fval
    mov ecx, eax                       # new
.if BITS == 64
    mov rax, qword ptr [rbx]           # expected = current (with A)
    lock cmpxchg qword ptr [rbx], rcx
.else
    mov eax, dword ptr [ebx]
    lock cmpxchg dword ptr [ebx], ecx
.endif
    je cmpxchg_ok
    FAIL 9, "lock cmpxchg: ZF=0 with the right expected value"
cmpxchg_ok:
    mov ecx, 2
    call flush_page
    PROBE 2, 6, 10, "lock cmpxchg: new pte not used"
    # a failing one
    mov ecx, 7
    call fval
    mov ecx, eax
    mov eax, PTE_PW | 0x12345000
.if BITS == 64
    lock cmpxchg qword ptr [rbx], rcx
.else
    lock cmpxchg dword ptr [ebx], ecx
.endif
    jne cmpxchg_fail_ok
    FAIL 11, "lock cmpxchg: ZF=1 with a wrong expected value"
cmpxchg_fail_ok:
    and eax, 0xffffff9f
    mov edx, eax
    mov ecx, 6
    call fval
    CHECK_EQ edx, eax, 12, "failing lock cmpxchg: current pte not returned"
    mov ecx, 2
    call flush_page
    PROBE 2, 6, 13, "failing lock cmpxchg changed the mapping"

    # ---- 4: lock cmpxchg8b
.if PAGING == 2
    # two adjacent 4-byte ptes (4 and 5) in one 8-byte write
    mov ecx, 4
    mov edx, 7
    call map_k
    mov ecx, 5
    mov edx, 8
    call map_k
    PROBE 4, 7, 14, "cmpxchg8b: before (pte 4)"
    PROBE 5, 8, 15, "cmpxchg8b: before (pte 5)"
    mov ecx, 4
    call pte_ptr
    mov esi, eax
    mov eax, dword ptr [esi]
    mov edx, dword ptr [esi + 4]
    mov ecx, 9
    call fval
    mov ebx, eax                       # new pte 4
    push ebx
    mov ecx, 10
    call fval
    mov ecx, eax                       # new pte 5
    pop ebx
    mov eax, dword ptr [esi]
    lock cmpxchg8b qword ptr [esi]
    je c8_ok
    FAIL 16, "lock cmpxchg8b: ZF=0 with the right expected value"
c8_ok:
    mov ecx, 4
    call flush_page
    mov ecx, 5
    call flush_page
    PROBE 4, 9, 17, "lock cmpxchg8b: new pte 4 not used"
    PROBE 5, 10, 18, "lock cmpxchg8b: new pte 5 not used"
    # a failing one
    xor eax, eax
    xor edx, edx
    lock cmpxchg8b qword ptr [esi]
    jne c8_fail_ok
    FAIL 19, "lock cmpxchg8b: ZF=1 with a wrong expected value"
c8_fail_ok:
    and eax, 0xffffff9f
    mov ecx, eax
    push ecx
    mov ecx, 9
    call fval
    pop ecx
    CHECK_EQ ecx, eax, 20, "failing lock cmpxchg8b: current pte 4 not returned"
    PROBE 4, 9, 21, "failing lock cmpxchg8b changed pte 4"
.else
    mov ecx, 4
    mov edx, 7
    call map_k
    PROBE 4, 7, 14, "cmpxchg8b: before"
    mov ecx, 4
    call pte_ptr
    mov esi, eax
    mov eax, dword ptr [esi]           # expected = current
    mov edx, dword ptr [esi + 4]
    mov ebx, dword ptr [v_f + 9 * 4]   # new low: F9 | P | W
    or ebx, PTE_PW
    xor ecx, ecx                       # new high: NX when available (reads are unaffected)
    cmp dword ptr [have_nx], 0
    je c8_nonx
    mov ecx, PTE_NX_HI
c8_nonx:
.if BITS == 64
    lock cmpxchg8b qword ptr [rsi]
.else
    lock cmpxchg8b qword ptr [esi]
.endif
    je c8_ok
    FAIL 16, "lock cmpxchg8b: ZF=0 with the right expected value"
c8_ok:
    mov ecx, 4
    call flush_page
    PROBE 4, 9, 17, "lock cmpxchg8b: new pte not used"
    mov eax, dword ptr [esi + 4]
    xor ecx, ecx
    cmp dword ptr [have_nx], 0
    je c8_nonx2
    mov ecx, PTE_NX_HI
c8_nonx2:
    CHECK_EQ eax, ecx, 18, "lock cmpxchg8b: high half of the pte"
    # a failing one
    xor eax, eax
    xor edx, edx
    xor ebx, ebx
    xor ecx, ecx
.if BITS == 64
    lock cmpxchg8b qword ptr [rsi]
.else
    lock cmpxchg8b qword ptr [esi]
.endif
    jne c8_fail_ok
    FAIL 19, "lock cmpxchg8b: ZF=1 with a wrong expected value"
c8_fail_ok:
    and eax, 0xffffff9f
    mov ebx, eax
    mov ecx, 9
    call fval
    CHECK_EQ ebx, eax, 20, "failing lock cmpxchg8b: current pte not returned"
    PROBE 4, 9, 21, "failing lock cmpxchg8b changed the pte"
.endif

    # ---- 5: lock btr / bts
    mov ecx, 6
    mov edx, 10
    call map_k
    PROBE 6, 10, 22, "btr: before"
    mov ecx, 6
    call pte_ptr
    mov ebx, eax
    mov eax, dword ptr [ebx]
    CHECK_BITS eax, PTE_A, PTE_A, 23, "btr: A not set by the read"
    lock btr dword ptr [ebx], 5
    jc btr_cf_ok
    FAIL 24, "lock btr: CF=0 (A was set)"
btr_cf_ok:
    mov eax, dword ptr [ebx]
    CHECK_BITS eax, PTE_A, 0, 25, "lock btr: A reads back set"
    mov ecx, 6
    call flush_page
    PROBE 6, 10, 26, "lock btr: mapping lost"
    mov eax, dword ptr [ebx]
    CHECK_BITS eax, PTE_A, PTE_A, 27, "A not set again by a read after btr + invlpg"
    lock btr dword ptr [ebx], 5
    jc btr_cf2_ok
    FAIL 28, "second lock btr: CF=0"
btr_cf2_ok:
    # W cleared with btr: a write faults P|W
    lock btr dword ptr [ebx], 1
    jc btr_w_ok
    FAIL 29, "lock btr of W: CF=0"
btr_w_ok:
    mov ecx, 6
    call flush_page
    mov edx, 0x66666666
    call probe_write
    CHECK_EQ eax, FAULTED, 30, "write after lock btr of W did not fault"
    lock bts dword ptr [ebx], 1
    jnc bts_ok
    FAIL 31, "lock bts of W: CF=1"
bts_ok:
    mov ecx, 6
    call flush_page
    mov edx, 0x66666666
    call probe_write
    CHECK_EQ eax, 0, 32, "write after lock bts of W faulted"
    mov eax, dword ptr [v_f + 10 * 4]
    mov eax, dword ptr [eax + 4]
    CHECK_EQ eax, 0x66666666, 33, "write after lock bts of W not in the frame"

    # ---- 6: byte and word writes
    mov ecx, 7
    mov edx, 3
    call map_k
    PROBE 7, 3, 34, "byte: before"
    mov ecx, 7
    call pte_ptr
    mov ebx, eax
    mov byte ptr [ebx + 1], 0x50       # frame bits 15..12 := 5 (the block is 64 KiB aligned)
    mov ecx, 7
    call flush_page
    PROBE 7, 5, 35, "byte write to pte byte 1 not used"
    mov byte ptr [ebx], PTE_P          # read-only, A/D clear
    mov ecx, 7
    call flush_page
    PROBE 7, 5, 36, "read-only after a byte write: read lost"
    mov edx, 0x77777777
    call probe_write
    CHECK_EQ eax, FAULTED, 37, "write to a pte made read-only by a byte write did not fault"
    mov byte ptr [ebx], PTE_PW
    mov ecx, 7
    call flush_page
    mov edx, 0x77777777
    call probe_write
    CHECK_EQ eax, 0, 38, "write to a pte made writable by a byte write faulted"
    mov eax, dword ptr [v_f + 12 * 4]
    shr eax, 8
    mov word ptr [ebx + 1], ax         # bytes 1-2: frame := F12
    mov ecx, 7
    call flush_page
    PROBE 7, 12, 39, "misaligned word write to the pte not used"
    mov eax, dword ptr [ebx]
    and eax, 0xffffff9f
    mov ecx, 12
    mov edx, eax
    call fval
    CHECK_EQ edx, eax, 40, "pte after the word write"

    # ---- 7: rep stos / rep movs on ptes 8..15
    mov ecx, 8
    call pte_ptr
    mov ebx, eax
.if PAGING == 2
    mov ecx, 11
    call fval
    mov edi, ebx
    mov ecx, 8
    cld
    rep stosd dword ptr es:[edi], eax
.endif
.if PAGING == 4
    mov ecx, 11
    call fval
    mov edi, ebx
    mov ecx, 8
    cld
    rep stosq qword ptr [rdi], rax
.endif
.if PAGING != 3
    RELOAD_CR3
    mov ebp, 8
stos_fill_check:
    mov ecx, ebp
    call probe
    CHECK_EQ eax, MARK + 11, 41, "rep stos fill: a pte not used"
    inc ebp
    cmp ebp, 16
    jb stos_fill_check
.endif
    # rep movs: ptes F0..F7 copied into PT_W[8..15]
    xor ecx, ecx
mk_array:
    call fval
    PTE_INIT pte_array, ecx, eax
    inc ecx
    cmp ecx, 8
    jb mk_array
    mov esi, pte_array
    mov edi, ebx
.if PAGING == 2
    mov ecx, 8
.else
    mov ecx, 16
.endif
    cld
.if BITS == 64
    rep movsd dword ptr [rdi], dword ptr [rsi]
.else
    rep movsd dword ptr es:[edi], dword ptr [esi]
.endif
    RELOAD_CR3
    mov ebp, 8
movs_check:
    mov ecx, ebp
    call probe
    lea edx, [ebp + MARK - 8]
    CHECK_EQ eax, edx, 42, "rep movs: a copied pte not used"
    inc ebp
    cmp ebp, 16
    jb movs_check
    # rep stos of 0: all 8 not present
    mov edi, ebx
    xor eax, eax
.if PAGING == 2
    mov ecx, 8
.else
    mov ecx, 16
.endif
    cld
.if BITS == 64
    rep stosd dword ptr [rdi], eax
.else
    rep stosd dword ptr es:[edi], eax
.endif
    RELOAD_CR3
    mov esi, dword ptr [pf_count]
    mov ebp, 8
clear_check:
    mov ecx, ebp
    call probe
    CHECK_EQ eax, FAULTED, 43, "rep stos clear: a page still mapped"
    inc ebp
    cmp ebp, 16
    jb clear_check
    mov eax, dword ptr [pf_count]
    sub eax, esi
    CHECK_EQ eax, 8, 44, "rep stos clear: not one fault per page"
    PROBE 31, 15, 45, "rep stos clear: pte 31 lost"

    # ---- 8: A and D at every level
    # 4 KiB page, every table on the way fresh: read, then write
.if BITS == 64
    mov rsi, WIN_AD
.else
    mov esi, WIN_AD
.endif
    mov ecx, 12
    call fval
    mov edi, dword ptr [v_root]
    xor edx, edx
    mov ecx, 1
    call pt_map
    LDSI eax, 0
    CHECK_EQ eax, MARK + 12, 46, "A/D: fresh 4 KiB page content"
    mov ebp, 1
    xor ebx, ebx
    mov edi, 60
    call check_ad
    STSI 8, 0x12121212
    mov ebx, PTE_D
    mov edi, 65
    call check_ad
    # first access a write: A and D at once (the next page, same page table)
.if BITS == 64
    add rsi, 0x1000
.else
    add esi, 0x1000
.endif
    mov ecx, 13
    call fval
    mov edi, dword ptr [v_root]
    xor edx, edx
    mov ecx, 1
    call pt_map
    STSI 8, 0x13131313
    mov ebx, PTE_D
    mov edi, 80
    call check_ad
    # D cleared + invlpg: a read leaves it clear, a write sets it again
    mov edx, 1
    mov edi, dword ptr [v_root]
    xor ecx, ecx
    call pt_entry
    and dword ptr [eax], 0xffffffbf
.if BITS == 64
    invlpg [rsi]
.else
    invlpg [esi]
.endif
    LDSI ecx, 8
    CHECK_EQ ecx, 0x13131313, 47, "A/D: data after D was cleared"
    mov ebx, 0
    mov edi, 85
    call check_ad
    STSI 12, 0x14141414
    mov ebx, PTE_D
    mov edi, 90
    call check_ad
    # large page, every table on the way fresh: read, then write
    mov edi, LARGE_PHYS + 0x40
    mov dword ptr [edi], 0x1a1a1a1a
.if BITS == 64
    mov rsi, WIN_ADL
.else
    mov esi, WIN_ADL
.endif
    mov eax, LARGE_PHYS | PTE_P | PTE_W | PTE_PS
    mov edi, dword ptr [v_root]
    xor edx, edx
    mov ecx, 2
    call pt_map
    LDSI eax, 0x40
    CHECK_EQ eax, 0x1a1a1a1a, 48, "A/D: large page content"
    mov ebp, 2
    xor ebx, ebx
    mov edi, 70
    call check_ad
    STSI 0x44, 0x1b1b1b1b
    mov ebx, PTE_D
    mov edi, 75
    call check_ad

    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ #PF handler: probes only
pf_handler:
    SAVE_ALL
.if BITS == 64
    mov rax, qword ptr [pf_resume]
    test rax, rax
    jnz pf_expected
    mov rax, cr2
    FAILV 100, "unexpected #PF (CR2)", rax
pf_expected:
    mov rax, cr2
    mov rcx, pf_exp_cr2
    cmp rax, qword ptr [rcx]
    je pf_cr2_ok
    FAILV 101, "#PF: unexpected CR2", rax
pf_cr2_ok:
    mov eax, dword ptr [rsp + FRAME_ERR]
    cmp eax, dword ptr [pf_exp_err]
    je pf_err_ok
    FAILV 102, "#PF: unexpected error code", eax
pf_err_ok:
    mov rax, qword ptr [pf_resume]
    mov qword ptr [rsp + FRAME_IP], rax
    mov dword ptr [rsp + 112], FAULTED # saved rax
    mov dword ptr [rsp + 116], 0
.else
    mov eax, dword ptr [pf_resume]
    test eax, eax
    jnz pf_expected
    mov eax, cr2
    FAILV 100, "unexpected #PF (CR2)", eax
pf_expected:
    mov eax, cr2
    cmp eax, dword ptr [pf_exp_cr2]
    je pf_cr2_ok
    FAILV 101, "#PF: unexpected CR2", eax
pf_cr2_ok:
    mov eax, dword ptr [esp + FRAME_ERR]
    cmp eax, dword ptr [pf_exp_err]
    je pf_err_ok
    FAILV 102, "#PF: unexpected error code", eax
pf_err_ok:
    mov eax, dword ptr [pf_resume]
    mov dword ptr [esp + FRAME_IP], eax
    mov dword ptr [esp + 28], FAULTED  # saved eax
.endif
    inc dword ptr [pf_count]
    RESTORE_ALL
    IRET_ERR
