# demand_paging.asm -- a #PF handler that maps pages on demand, checking CR2 and the error code.
# x86shadow: modes=32,pae,64
#
# Own CR3 (identity map of the low 64 MiB with large pages) and own IDT (#PF = vector 14). Phases:
#   1  read of an unmapped page whose page table does not exist yet      err 0     map a fresh frame
#   2  read elsewhere in that page: no fault
#   3  write to an unmapped page (page table exists)                     err W     map a fresh frame
#   4  instruction fetch (call) from an unmapped page                    err 0 / I map a code frame
#      (I/D = 0x10 only with PAE or 4-level paging and EFER.NXE = 1; NXE is turned on when CPUID has NX,
#      also in mode 32 where the bit must then stay 0)
#   5  fetch from a present NX page (pae/64 with NX)                    err P|I   clear NX (no invlpg)
#   6  read of a read-only page: no fault; write with CR0.WP=1           err P|W   set W (no invlpg)
#   7  CR0.WP=0: a CPL0 write to a read-only page does not fault; WP=1 again: the same kind of write
#      faults (err P|W)
#   8  read of an unmapped large-page region (PDE not present)           err 0     map a 4/2 MiB page;
#      a second read 4 KiB pages further on does not fault
#   9  pte cleared + invlpg, read again                                  err 0     map a new frame
#  10  (64 only) read at a canonical higher-half address (fresh PML4 entry)  err 0
#  11  (64 only) write at a high lower-half address (fresh PML4 entry)       err W
# The handler also checks that it was entered from CPL0 and, for fetch faults, that the saved IP is CR2.
# Exit codes: 1..19 main's checks, 40+phase wrong CR2, 60+phase wrong error code, 80+phase other
# handler checks, 125/126 library.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"

.set WIN, 0x40000000                   # test window (PDE 256 in mode 32; PDPTE 1 in PAE)
.set LARGE_VA, WIN + 0x1000000         # large-page window (16 MiB further on)
.set LARGE_PHYS, 0x3000000             # 48 MiB: a 4 MiB-aligned chunk of the free area
.set HI_VA1, 0xffff800012345000        # 64 only
.set HI_VA2, 0x00007f1234567000        # 64 only
.set HI_VA1_LO, 0x12345000             # low 32 bits of HI_VA1
.set MARK_XOR, 0xa5a5a5a5

# variables
.set v_root, PROG_VARS + 0x00          # quad
.set pf_exp_cr2, PROG_VARS + 0x08      # quad
.set pf_exp_err, PROG_VARS + 0x10
.set pf_action, PROG_VARS + 0x14
.set pf_phase, PROG_VARS + 0x18
.set pf_count, PROG_VARS + 0x1c
.set pf_check_ip, PROG_VARS + 0x20     # 1: saved IP must equal CR2
.set have_nx, PROG_VARS + 0x24
.set fetch_err, PROG_VARS + 0x28       # 0 or PF_I
.set pf_flags, PROG_VARS + 0x2c        # entry flags the handler maps with

# actions
.set ACT_MAP, 1                        # map a fresh zeroed frame (flags pf_flags) with a marker at CR2
.set ACT_SETW, 2                       # set W in the existing pte
.set ACT_CLRNX, 3                      # clear NX in the existing pte
.set ACT_LARGE, 4                      # map LARGE_PHYS as a large page
.set ACT_CODE, 5                       # map a fresh frame holding fetch_blob at CR2's offset

.macro EXPECT_PF phase, addr, err, action
    mov dword ptr [pf_phase], \phase
.if BITS == 64
    mov rax, \addr
    mov qword ptr [pf_exp_cr2], rax
.else
    mov dword ptr [pf_exp_cr2], \addr
.endif
    mov dword ptr [pf_exp_err], \err
    mov dword ptr [pf_action], \action
    mov dword ptr [pf_check_ip], 0
.endm

.macro CHECK_COUNT n, code
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, \n, \code, "wrong number of page faults"
.endm

# the marker the handler leaves at the faulting address in a fresh frame (low 32 bits of CR2 ^ MARK_XOR)
.macro MARKER_OF reg, addr
    mov \reg, \addr
    xor \reg, MARK_XOR
.endm

# code copied into frames for the fetch tests (position independent)
fetch_blob:
    mov eax, 0xc0dec0de
    ret
fetch_blob_end:

main:
.if BITS == 64
    push rbx
    push rbp
.else
    push ebx
    push ebp
.endif
    call pt_init
    mov dword ptr [pf_count], 0
    mov dword ptr [have_nx], 0
    mov dword ptr [fetch_err], 0
    mov dword ptr [pf_flags], PTE_P | PTE_W

    # NX: turn EFER.NXE on when the CPU has it
    NX_ENABLE no_nx
    mov dword ptr [have_nx], 1
.if PAGING >= 3
    mov dword ptr [fetch_err], PF_I
.endif
no_nx:

    # address space: identity map of the low 64 MiB, nothing else yet
    call pt_alloc
    mov dword ptr [v_root], eax
    mov dword ptr [v_root + 4], 0
    mov edi, eax
    mov eax, PTE_P | PTE_W
    call pt_identity
.if BITS == 64
    mov cr3, rdi
.else
    mov cr3, edi
.endif

    call idt_init
    SET_GATE 14, pf_handler

    # ---- 1: read, no page table yet
    EXPECT_PF 1, WIN + 0x123, 0, ACT_MAP
    mov esi, WIN + 0x123
    mov eax, dword ptr [esi]
    MARKER_OF ebx, WIN + 0x123
    CHECK_EQ eax, ebx, 1, "phase 1: marker not read after the fault"
    CHECK_COUNT 1, 2

    # ---- 2: same page, no fault
    mov esi, WIN + 0xffc
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0, 3, "phase 2: fresh frame not zero"
    CHECK_COUNT 1, 4

    # ---- 3: write, page table exists
    EXPECT_PF 3, WIN + 0x1088, PF_W, ACT_MAP
    mov esi, WIN + 0x1088
    mov dword ptr [esi], 0x11223344
    CHECK_COUNT 2, 5
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x11223344, 6, "phase 3: written value not read back"
    # and it is in the frame the pte names
    mov edi, dword ptr [v_root]
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    mov eax, dword ptr [eax]
    and eax, 0xfffff000
    mov eax, dword ptr [eax + 0x88]
    CHECK_EQ eax, 0x11223344, 7, "phase 3: value not in the mapped frame"

    # ---- 4: fetch from an unmapped page
    EXPECT_PF 4, WIN + 0x2010, 0, ACT_CODE
    mov eax, dword ptr [fetch_err]
    mov dword ptr [pf_exp_err], eax
    mov dword ptr [pf_check_ip], 1
    xor eax, eax
    mov esi, WIN + 0x2010
.if BITS == 64
    call rsi
.else
    call esi
.endif
    CHECK_EQ eax, 0xc0dec0de, 8, "phase 4: code fetched on demand did not run"
    CHECK_COUNT 3, 9
    mov ebp, 3                         # faults so far

    # ---- 5: NX page (PAE / 4-level with NX only)
.if PAGING >= 3
    cmp dword ptr [have_nx], 0
    je skip_nx
    call pt_alloc
    mov esi, fetch_blob
    lea edi, [eax + 0x10]
    mov ecx, fetch_blob_end - fetch_blob
    cld
    rep movsb
    mov edi, dword ptr [v_root]
    mov esi, WIN + 0x3000
    or eax, PTE_P | PTE_W
    mov ecx, 1
.if BITS == 64
    bts rax, 63
.else
    mov edx, PTE_NX_HI
.endif
    call pt_map
    EXPECT_PF 5, WIN + 0x3010, PF_P | PF_I, ACT_CLRNX
    mov dword ptr [pf_check_ip], 1
    xor eax, eax
    mov esi, WIN + 0x3010
.if BITS == 64
    call rsi
.else
    call esi
.endif
    CHECK_EQ eax, 0xc0dec0de, 10, "phase 5: code did not run after NX was cleared"
    inc ebp
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 11, "phase 5: wrong number of page faults"
skip_nx:
.endif

    # ---- 6: read-only page: read ok, write faults with P|W (CR0.WP=1 from the firmware)
    call pt_alloc
    mov dword ptr [eax + 0x40], 0x600d0006
    mov edi, dword ptr [v_root]
    mov esi, WIN + 0x4000
    or eax, PTE_P
    xor edx, edx
    mov ecx, 1
    call pt_map
    mov esi, WIN + 0x4040
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x600d0006, 12, "phase 6: read-only page not readable"
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 13, "phase 6: read of a read-only page faulted"
    EXPECT_PF 6, WIN + 0x4044, PF_P | PF_W, ACT_SETW
    mov esi, WIN + 0x4044
    mov dword ptr [esi], 0x77777777
    inc ebp
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 14, "phase 6: write to a read-only page did not fault once"
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x77777777, 15, "phase 6: write lost"

    # ---- 7: CR0.WP=0 lets CPL0 write a read-only page; WP=1 again faults
    call pt_alloc
    mov ebx, eax                       # frame, for the check below
    mov edi, dword ptr [v_root]
    mov esi, WIN + 0x5000
    or eax, PTE_P
    xor edx, edx
    mov ecx, 1
    call pt_map
    mov esi, WIN + 0x5000
    mov eax, dword ptr [esi]           # read it first (a read-only translation may be cached)
.if BITS == 64
    mov rax, cr0
    btr rax, 16
    mov cr0, rax
.else
    mov eax, cr0
    btr eax, 16
    mov cr0, eax
.endif
    mov dword ptr [esi], 0x57575757
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 16, "phase 7: write with CR0.WP=0 faulted"
    mov eax, dword ptr [ebx]
    CHECK_EQ eax, 0x57575757, 17, "phase 7: write with CR0.WP=0 lost"
.if BITS == 64
    mov rax, cr0
    bts rax, 16
    mov cr0, rax
.else
    mov eax, cr0
    bts eax, 16
    mov cr0, eax
.endif
    EXPECT_PF 7, WIN + 0x5004, PF_P | PF_W, ACT_SETW
    mov esi, WIN + 0x5004
    mov dword ptr [esi], 0x75757575
    inc ebp
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 18, "phase 7: write with CR0.WP=1 did not fault once"
    mov eax, dword ptr [ebx + 4]
    CHECK_EQ eax, 0x75757575, 19, "phase 7: write after the fault lost"

    # ---- 8: large page on demand
    mov edi, LARGE_PHYS + 0x123
    mov dword ptr [edi], 0x1a1a1a1a
    mov edi, LARGE_PHYS + LARGE_PAGE - 0x1000 + 0x10
    mov dword ptr [edi], 0x2b2b2b2b
    EXPECT_PF 8, LARGE_VA + 0x123, 0, ACT_LARGE
    mov esi, LARGE_VA + 0x123
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x1a1a1a1a, 20, "phase 8: large page content"
    inc ebp
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 21, "phase 8: wrong number of page faults"
    mov esi, LARGE_VA + LARGE_PAGE - 0x1000 + 0x10
    mov eax, dword ptr [esi]
    CHECK_EQ eax, 0x2b2b2b2b, 22, "phase 8: large page content (last 4 KiB)"
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 23, "phase 8: second read in the large page faulted"

    # ---- 9: clear the pte of WIN+0x1000, invlpg, read again: not-present fault, new frame
    mov edi, dword ptr [v_root]
    mov esi, WIN + 0x1000
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    xor edx, edx
    call pte_set
    invlpg [esi]
    EXPECT_PF 9, WIN + 0x1088, 0, ACT_MAP
    mov esi, WIN + 0x1088
    mov eax, dword ptr [esi]
    MARKER_OF ebx, WIN + 0x1088
    CHECK_EQ eax, ebx, 24, "phase 9: not the new frame after pte clear + invlpg"
    inc ebp
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 25, "phase 9: wrong number of page faults"

.if BITS == 64
    # ---- 10: higher-half canonical address, fresh PML4 entry
    EXPECT_PF 10, HI_VA1 + 0x8, 0, ACT_MAP
    mov rsi, HI_VA1 + 0x8
    mov eax, dword ptr [rsi]
    MARKER_OF ebx, HI_VA1_LO + 0x8
    CHECK_EQ eax, ebx, 26, "phase 10: marker at a higher-half address"
    inc ebp
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 27, "phase 10: wrong number of page faults"
    # ---- 11: write at a high lower-half address
    EXPECT_PF 11, HI_VA2 + 0xff8, PF_W, ACT_MAP
    mov rsi, HI_VA2 + 0xff8
    mov qword ptr [rsi], rsi
    mov rax, qword ptr [rsi]
    CHECK_EQ rax, rsi, 28, "phase 11: write at a high address lost"
    inc ebp
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, ebp, 29, "phase 11: wrong number of page faults"
    # the two high pages are distinct frames
    mov rsi, HI_VA1 + 0x8
    mov eax, dword ptr [rsi]
    MARKER_OF ebx, HI_VA1_LO + 0x8
    CHECK_EQ eax, ebx, 30, "phase 11: higher-half page changed"
.endif

    PASS
.if BITS == 64
    pop rbp
    pop rbx
.else
    pop ebp
    pop ebx
.endif
    ret

# ------------------------------------------------------------------ #PF handler
pf_handler:
    SAVE_ALL
.if BITS == 64
    mov rbp, rsp
    mov rax, cr2
    mov rbx, rax
    mov rcx, pf_exp_cr2
    cmp rax, qword ptr [rcx]
.else
    mov ebp, esp
    mov eax, cr2
    mov ebx, eax
    cmp eax, dword ptr [pf_exp_cr2]
.endif
    je pf_cr2_ok
    SAVEVAL eax
    LOADSTR "#PF: unexpected CR2"
    mov ecx, dword ptr [pf_phase]
    add ecx, 40
    jmp fail_report_v
pf_cr2_ok:
    mov eax, dword ptr [ebp + FRAME_ERR]
    cmp eax, dword ptr [pf_exp_err]
    je pf_err_ok
    SAVEVAL eax
    LOADSTR "#PF: unexpected error code"
    mov ecx, dword ptr [pf_phase]
    add ecx, 60
    jmp fail_report_v
pf_err_ok:
    mov eax, dword ptr [ebp + FRAME_CS]
    cmp eax, SEL_KCODE
    je pf_cs_ok
    SAVEVAL eax
    LOADSTR "#PF: saved CS is not the kernel's"
    mov ecx, dword ptr [pf_phase]
    add ecx, 80
    jmp fail_report_v
pf_cs_ok:
    cmp dword ptr [pf_check_ip], 0
    je pf_ip_ok
.if BITS == 64
    mov rax, qword ptr [rbp + FRAME_IP]
    cmp rax, rbx
.else
    mov eax, dword ptr [ebp + FRAME_IP]
    cmp eax, ebx
.endif
    je pf_ip_ok
    SAVEVAL eax
    LOADSTR "#PF: saved IP of a fetch fault is not CR2"
    mov ecx, dword ptr [pf_phase]
    add ecx, 80
    jmp fail_report_v
pf_ip_ok:
    inc dword ptr [pf_count]
    mov edi, dword ptr [v_root]
.if BITS == 64
    mov rsi, rbx
    and rsi, -4096
.else
    mov esi, ebx
    and esi, 0xfffff000
.endif
    mov eax, dword ptr [pf_action]
    cmp eax, ACT_MAP
    je pf_do_map
    cmp eax, ACT_CODE
    je pf_do_code
    cmp eax, ACT_SETW
    je pf_do_setw
    cmp eax, ACT_CLRNX
    je pf_do_clrnx
    cmp eax, ACT_LARGE
    je pf_do_large
    LOADSTR "#PF: no fault expected here"
    mov ecx, dword ptr [pf_phase]
    add ecx, 80
    jmp fail_report

pf_do_map:
    call pt_alloc
    mov edx, ebx
    and edx, 0xfff
    mov ecx, ebx
    xor ecx, MARK_XOR
    mov dword ptr [eax + edx], ecx
    or eax, dword ptr [pf_flags]
    xor edx, edx
    mov ecx, 1
    call pt_map
    jmp pf_done

pf_do_code:
    call pt_alloc
    mov edx, ebx
    and edx, 0xfff
    mov ecx, fetch_blob_end - fetch_blob
.if BITS == 64
    push rsi
    push rdi
    mov esi, fetch_blob
    lea rdi, [rax + rdx]
    cld
    rep movsb
    pop rdi
    pop rsi
.else
    push esi
    push edi
    mov esi, fetch_blob
    lea edi, [eax + edx]
    cld
    rep movsb
    pop edi
    pop esi
.endif
    or eax, dword ptr [pf_flags]
    xor edx, edx
    mov ecx, 1
    call pt_map
    jmp pf_done

pf_do_setw:
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    or dword ptr [eax], PTE_W
    jmp pf_done

pf_do_clrnx:
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    and dword ptr [eax + 4], 0x7fffffff
    jmp pf_done

pf_do_large:
.if BITS == 64
    and rsi, LARGE_MASK
.else
    and esi, LARGE_MASK
.endif
    mov eax, LARGE_PHYS | PTE_P | PTE_W | PTE_PS
    xor edx, edx
    mov ecx, 2
    call pt_map

pf_done:
    RESTORE_ALL
    IRET_ERR
