# user_int80.asm -- a CPL3 process: user mappings, TSS stack switch, #PF from user mode, int 0x80 back.
# x86shadow: modes=32,pae,64
#
# The kernel builds its own address space: the low 64 MiB identity-mapped for the supervisor only, plus
# user windows (U at every level on the way): the user code pages (read-only), a data page, a stack
# page, and a page left unmapped for demand paging. It installs an IDT with a #PF handler and an
# `int 0x80` gate of DPL3, enters CPL3 with iret (CS 0x1b, SS 0x23) and the user process:
#   - sums the squares of the data array, stores the sum to the unmapped page (#PF W|U: mapped on demand)
#   - reads, then writes a supervisor page (#PF P|U, P|W|U), writes its own read-only code page (P|W|U),
#     reads a page whose leaf pte has U but whose PDE has not (P|U); in mode 64 also a PDPTE and a PML4E
#     without U (P|U). The handler sends each of these to the next user fix-up label (like an exception
#     table), after checking CR2, the error code, that it runs at CPL0 on the TSS stack, and the saved
#     CS/SS (user selectors).
#   - returns the sum through `int 0x80` (eax), with the number of fix-ups it passed through (ebx).
# The int 0x80 handler checks CPL0, the TSS stack, the saved CS/SS/IP/SP, and returns to the kernel
# context saved before the iret, which checks the results.
# Exit codes: 1..19 kernel checks, 20..29 #PF handler checks, 30..39 int 0x80 handler checks.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"

.if BITS == 64
.set USER_BASE, 0x00007f0000000000     # PML4 index 254
.set UNOU3, USER_BASE + 0x40000000     # under a PDPTE without U (64 only)
.set UNOU4, 0x00007e8000000000         # under a PML4E without U (64 only)
.else
.set USER_BASE, 0x08000000
.endif
.set UCODE, USER_BASE                  # user code pages (P|U, read-only)
.set UDATA, USER_BASE + 0x100000       # P|W|U: the input array
.set USTACK, USER_BASE + 0x200000      # P|W|U: the stack page
.set USTACK_TOP, USTACK + 0x1000
.set UBSS, USER_BASE + 0x300000        # unmapped: demand-paged by the #PF handler
.set UNOU, USER_BASE + 0x800000        # leaf P|W|U under a PDE without U
.set KSECRET, FREE_END - 0x1000        # supervisor-only (identity map), above what pt_alloc hands out
.set N_ELEMS, 32
.set EXPECT_SUM, 96752                 # sum of (3i+1)^2, i < 32
.if BITS == 64
.set N_FAULTS, 7
.set N_FIXUPS, 6
.else
.set N_FAULTS, 5
.set N_FIXUPS, 4
.endif

# variables
.set v_root, PROG_VARS + 0x00
.set v_ksp, PROG_VARS + 0x08           # quad: kernel stack pointer saved before entering CPL3
.set pf_count, PROG_VARS + 0x10
.set r_eax, PROG_VARS + 0x18           # results handed back by int 0x80
.set r_ebx, PROG_VARS + 0x1c
.set v_entry, PROG_VARS + 0x20         # quad: user VA of user_entry
.set v_ucode_page, PROG_VARS + 0x28    # quad: physical page of user_code_start
.set int80_count, PROG_VARS + 0x30
# expected faults, 16 bytes each: cr2 (quad), error code (dword), action (dword); fix-up IP (quad) below
.set pf_table, PROG_VARS + 0x100
.set pf_fixups, PROG_VARS + 0x200
.set ACT_MAP, 1
.set ACT_FIXUP, 2

# user VA of a label in the user code pages, into eax (32) / rax (64)
.macro UVA label
    mov eax, \label
    sub eax, dword ptr [v_ucode_page]
.if BITS == 64
    push rbx
    mov rbx, UCODE
    add rax, rbx
    pop rbx
.else
    add eax, UCODE
.endif
.endm

# pf_table entry k: cr2 (constant), error code, action, fix-up label (or 0)
.macro EXPECT k, cr2, err, action, fixlabel
.if BITS == 64
    mov rax, \cr2
    mov qword ptr [pf_table + \k * 16], rax
.else
    mov dword ptr [pf_table + \k * 16], \cr2
    mov dword ptr [pf_table + \k * 16 + 4], 0
.endif
    mov dword ptr [pf_table + \k * 16 + 8], \err
    mov dword ptr [pf_table + \k * 16 + 12], \action
    UVA \fixlabel
.if BITS == 64
    mov qword ptr [pf_fixups + \k * 8], rax
.else
    mov dword ptr [pf_fixups + \k * 8], eax
.endif
.endm

main:
    MAIN_PROLOGUE r12_15=1
    call pt_init
    mov dword ptr [pf_count], 0
    mov dword ptr [int80_count], 0
    mov dword ptr [r_eax], 0
    mov dword ptr [r_ebx], 0
    mov eax, user_code_start
    and eax, 0xfffff000
    mov dword ptr [v_ucode_page], eax
    mov dword ptr [v_ucode_page + 4], 0

    # ---- address space
    call pt_alloc
    mov dword ptr [v_root], eax
    mov dword ptr [v_root + 4], 0
    mov edi, eax
    mov eax, PTE_P | PTE_W             # supervisor only
    call pt_identity

    # user code: the pages holding user_code_start..user_code_end, read-only
.if BITS == 64
    mov rsi, UCODE
.else
    mov esi, UCODE
.endif
    mov ecx, user_code_end
    sub ecx, dword ptr [v_ucode_page]
    add ecx, 0xfff
    shr ecx, 12
    mov eax, dword ptr [v_ucode_page]
    or eax, PTE_P | PTE_U
    xor edx, edx
    call pt_map_range

    # data page with the array a[i] = 3i + 1
    call pt_alloc
    mov ebx, eax
    xor ecx, ecx
fill_array:
    lea eax, [ecx + ecx * 2 + 1]
    mov dword ptr [ebx + ecx * 4], eax
    inc ecx
    cmp ecx, N_ELEMS
    jb fill_array
    mov eax, ebx
    or eax, PTE_P | PTE_W | PTE_U
.if BITS == 64
    mov rsi, UDATA
.else
    mov esi, UDATA
.endif
    mov ecx, 1
    call pt_map

    # stack page
    call pt_alloc
    or eax, PTE_P | PTE_W | PTE_U
.if BITS == 64
    mov rsi, USTACK
.else
    mov esi, USTACK
.endif
    mov ecx, 1
    call pt_map

    # a user page under a PDE without U
    call pt_alloc
    mov dword ptr [eax], 0x5e5e5e5e
    or eax, PTE_P | PTE_W | PTE_U
.if BITS == 64
    mov rsi, UNOU
.else
    mov esi, UNOU
.endif
    mov ecx, 1
    call pt_map
    mov edx, 2
    xor ecx, ecx
    call pt_entry
    and dword ptr [eax], 0xfffffffb    # clear U in the PDE
.if BITS == 64
    # ... under a PDPTE without U
    call pt_alloc
    or eax, PTE_P | PTE_W | PTE_U
    mov rsi, UNOU3
    mov ecx, 1
    call pt_map
    mov edx, 3
    xor ecx, ecx
    call pt_entry
    and dword ptr [eax], 0xfffffffb
    # ... under a PML4E without U
    call pt_alloc
    or eax, PTE_P | PTE_W | PTE_U
    mov rsi, UNOU4
    mov ecx, 1
    call pt_map
    mov edx, 4
    xor ecx, ecx
    call pt_entry
    and dword ptr [eax], 0xfffffffb
.endif

    # ---- expected faults, in order
    EXPECT 0, UBSS + 0x10, PF_W | PF_U, ACT_MAP, user_code_start
    EXPECT 1, KSECRET, PF_P | PF_U, ACT_FIXUP, ufix1
    EXPECT 2, KSECRET + 4, PF_P | PF_W | PF_U, ACT_FIXUP, ufix2
    EXPECT 3, UCODE + 8, PF_P | PF_W | PF_U, ACT_FIXUP, ufix3
    EXPECT 4, UNOU + 0x20, PF_P | PF_U, ACT_FIXUP, ufix4
.if BITS == 64
    EXPECT 5, UNOU3 + 0x30, PF_P | PF_U, ACT_FIXUP, ufix5
    EXPECT 6, UNOU4 + 0x40, PF_P | PF_U, ACT_FIXUP, ufix6
.endif

    # ---- IDT
    call idt_init
    SET_GATE 14, pf_handler
    SET_GATE 0x80, int80_handler, GATE_INT3

    mov edi, dword ptr [v_root]
.if BITS == 64
    mov cr3, rdi
.else
    mov cr3, edi
.endif
    # the kernel still runs from the identity map
    mov edx, KSECRET
    mov dword ptr [edx], 0x5ec7e700

    # ---- enter CPL3
    UVA user_entry
.if BITS == 64
    mov rbx, rax
    mov qword ptr [v_ksp], rsp
.else
    mov ebx, eax
    mov dword ptr [v_ksp], esp
.endif
    IRET_TO_CPL3

back_in_kernel:
    # the int 0x80 handler switched back to the stack saved above
.if BITS == 32
    LOAD_DATA_SEGS SEL_KDATA
.else
    mov ax, SEL_KDATA
    mov ss, ax
.endif
    mov ax, cs
    and eax, 3
    CHECK_EQ eax, 0, 1, "not back at CPL0"
    mov eax, dword ptr [int80_count]
    CHECK_EQ eax, 1, 2, "int 0x80 count"
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, N_FAULTS, 3, "number of page faults from user mode"
    mov eax, dword ptr [r_ebx]
    CHECK_EQ eax, N_FIXUPS, 4, "user passed through the wrong number of fix-ups"
    mov eax, dword ptr [r_eax]
    CHECK_EQ eax, EXPECT_SUM, 5, "user result (sum of squares) wrong"
    # the user's store went to the frame mapped on demand
    mov edi, dword ptr [v_root]
.if BITS == 64
    mov rsi, UBSS
.else
    mov esi, UBSS
.endif
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    CHECK_NE eax, 0, 6, "no pte for the demand-paged user page"
    mov ecx, dword ptr [eax]
    CHECK_BITS ecx, PTE_P | PTE_W | PTE_U | PTE_A | PTE_D, PTE_P | PTE_W | PTE_U | PTE_A | PTE_D, 7, "user pte flags (P W U A D)"
    and ecx, 0xfffff000
    mov eax, dword ptr [ecx + 0x10]
    CHECK_EQ eax, EXPECT_SUM, 8, "user store not in the frame"
    # the supervisor page was not written
    mov edx, KSECRET
    mov eax, dword ptr [edx + 4]
    CHECK_EQ eax, 0, 9, "user wrote a supervisor page"
    mov eax, dword ptr [edx]
    CHECK_EQ eax, 0x5ec7e700, 10, "supervisor page changed"

    PASS
    MAIN_EPILOGUE r12_15=1

# ------------------------------------------------------------------ #PF handler (from CPL3)
pf_handler:
    SAVE_ALL frame=1
    mov ax, cs
    and eax, 3
    CHECK_EQ eax, 0, 20, "#PF handler not at CPL0"
    # on the TSS stack
.if BITS == 64
    mov rax, rsp
.else
    mov eax, esp
.endif
    CHECK_BITS eax, 0xffffc000, TSS_STACK_TOP - 0x4000, 21, "#PF handler not on the TSS stack"
    mov eax, dword ptr [ebp + FRAME_CS]
    CHECK_EQ eax, SEL_UCODE, 22, "#PF: saved CS is not the user's"
    mov eax, dword ptr [ebp + FRAME_SS]
    CHECK_EQ eax, SEL_UDATA, 23, "#PF: saved SS is not the user's"
    mov ebx, dword ptr [pf_count]
    cmp ebx, N_FAULTS
    jb pf_in_table
    FAIL 24, "#PF: more faults than expected"
pf_in_table:
    shl ebx, 4
    add ebx, pf_table
.if BITS == 64
    mov rax, cr2
    mov rsi, rax
    cmp rax, qword ptr [rbx]
.else
    mov eax, cr2
    mov esi, eax
    cmp eax, dword ptr [ebx]
.endif
    je pf_cr2_ok
    mov eax, dword ptr [pf_count]
    call putdec
    FAILV 25, "#PF from user: unexpected CR2 (fault number printed before)", esi
pf_cr2_ok:
    mov eax, dword ptr [ebp + FRAME_ERR]
    cmp eax, dword ptr [ebx + 8]
    je pf_err_ok
    mov eax, dword ptr [pf_count]
    call putdec
    mov eax, dword ptr [ebp + FRAME_ERR]
    FAILV 26, "#PF from user: unexpected error code (fault number printed before)", eax
pf_err_ok:
    mov eax, dword ptr [ebx + 12]
    cmp eax, ACT_MAP
    jne pf_fixup
    call pt_alloc
    or eax, PTE_P | PTE_W | PTE_U
    mov edi, dword ptr [v_root]
.if BITS == 64
    and rsi, -4096
.else
    and esi, 0xfffff000
.endif
    xor edx, edx
    mov ecx, 1
    call pt_map
    jmp pf_done
pf_fixup:
    mov ecx, dword ptr [pf_count]
.if BITS == 64
    mov rax, pf_fixups
    mov rax, qword ptr [rax + rcx * 8]
    mov qword ptr [rbp + FRAME_IP], rax
.else
    mov eax, dword ptr [pf_fixups + ecx * 8]
    mov dword ptr [ebp + FRAME_IP], eax
.endif
pf_done:
    inc dword ptr [pf_count]
    RESTORE_ALL
    IRET_ERR

# ------------------------------------------------------------------ int 0x80 handler
.set I80_IP, 0
.if BITS == 64
.set I80_CS, 8
.set I80_SP, 24
.set I80_SS, 32
.else
.set I80_CS, 4
.set I80_SP, 12
.set I80_SS, 16
.endif
int80_handler:
    mov dword ptr [r_eax], eax
    mov dword ptr [r_ebx], ebx
    inc dword ptr [int80_count]
    CHECK_NE eax, 0xdead, 36, "int 0x80: the user process took its failure path"
    mov ax, cs
    and eax, 3
    CHECK_EQ eax, 0, 30, "int 0x80 handler not at CPL0"
.if BITS == 64
    mov rax, rsp
.else
    mov eax, esp
.endif
    CHECK_BITS eax, 0xffffc000, TSS_STACK_TOP - 0x4000, 31, "int 0x80 handler not on the TSS stack"
.if BITS == 64
    mov rbp, rsp
.else
    mov ebp, esp
.endif
    mov eax, dword ptr [ebp + I80_CS]
    CHECK_EQ eax, SEL_UCODE, 32, "int 0x80: saved CS is not the user's"
    mov eax, dword ptr [ebp + I80_SS]
    CHECK_EQ eax, SEL_UDATA, 33, "int 0x80: saved SS is not the user's"
.if BITS == 64
    mov rbx, USTACK_TOP
    mov rax, qword ptr [rbp + I80_SP]
    CHECK_EQ rax, rbx, 34, "int 0x80: saved user stack pointer"
    UVA u_after_int
    mov rbx, qword ptr [rbp + I80_IP]
    CHECK_EQ rbx, rax, 35, "int 0x80: saved IP is not the next instruction"
    mov rax, v_ksp
    mov rsp, qword ptr [rax]
.else
    mov eax, dword ptr [ebp + I80_SP]
    CHECK_EQ eax, USTACK_TOP, 34, "int 0x80: saved user stack pointer"
    UVA u_after_int
    mov ebx, dword ptr [ebp + I80_IP]
    CHECK_EQ ebx, eax, 35, "int 0x80: saved IP is not the next instruction"
    mov esp, dword ptr [v_ksp]
.endif
    jmp back_in_kernel

# ------------------------------------------------------------------ user code (CPL3)
# Runs at UCODE + (label - page of user_code_start): position independent, no absolute code refs.
.align 4096
user_code_start:
user_entry:
.if BITS == 64
    mov rsi, UDATA
.else
    mov esi, UDATA
.endif
    xor ecx, ecx
    xor edi, edi
u_loop:
.if BITS == 64
    mov eax, dword ptr [rsi + rcx * 4]
.else
    mov eax, dword ptr [esi + ecx * 4]
.endif
    imul eax, eax
    add edi, eax
    inc ecx
    cmp ecx, N_ELEMS
    jb u_loop
.if BITS == 64
    mov rsi, UBSS + 0x10
    mov dword ptr [rsi], edi           # fault 0: demand paging (W|U)
    mov edx, dword ptr [rsi]
    xor ebx, ebx
    mov esi, KSECRET
    mov eax, dword ptr [rsi]           # fault 1: supervisor page (P|U)
    jmp u_fail
ufix1:
    inc ebx
    mov dword ptr [rsi + 4], eax       # fault 2: supervisor page (P|W|U)
    jmp u_fail
ufix2:
    inc ebx
    mov rsi, UCODE + 8
    mov byte ptr [rsi], al             # fault 3: read-only user page (P|W|U)
    jmp u_fail
ufix3:
    inc ebx
    mov rsi, UNOU + 0x20
    mov eax, dword ptr [rsi]           # fault 4: PDE without U (P|U)
    jmp u_fail
ufix4:
    inc ebx
    mov rsi, UNOU3 + 0x30
    mov eax, dword ptr [rsi]           # fault 5: PDPTE without U (P|U)
    jmp u_fail
ufix5:
    inc ebx
    mov rsi, UNOU4 + 0x40
    mov eax, dword ptr [rsi]           # fault 6: PML4E without U (P|U)
    jmp u_fail
ufix6:
    inc ebx
.else
    mov esi, UBSS + 0x10
    mov dword ptr [esi], edi           # fault 0: demand paging (W|U)
    mov edx, dword ptr [esi]
    xor ebx, ebx
    mov esi, KSECRET
    mov eax, dword ptr [esi]           # fault 1: supervisor page (P|U)
    jmp u_fail
ufix1:
    inc ebx
    mov dword ptr [esi + 4], eax       # fault 2: supervisor page (P|W|U)
    jmp u_fail
ufix2:
    inc ebx
    mov esi, UCODE + 8
    mov byte ptr [esi], al             # fault 3: read-only user page (P|W|U)
    jmp u_fail
ufix3:
    inc ebx
    mov esi, UNOU + 0x20
    mov eax, dword ptr [esi]           # fault 4: PDE without U (P|U)
    jmp u_fail
ufix4:
    inc ebx
.endif
    mov eax, edx
    int 0x80
u_after_int:
    jmp u_after_int                    # never: the kernel does not come back here
u_fail:
    mov eax, 0xdead                    # a fault was not sent to its fix-up
    int 0x80
    jmp u_fail
user_code_end:
