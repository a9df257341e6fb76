# x86shadow firmware for mode 64 (docs/ARCHITECTURE.md, "Boot contract").
#
# Assembled by x86shadow.asm at FW_BASE with the symbols of layout.asm_symbols() plus MAIN.
# Entered at FW_BASE in Unicorn's initial UC_MODE_64 state: EFER.LME|LMA, CR0 = PE|ET, paging
# off, 64-bit code (so this file is 64-bit code throughout). It identity-maps all of RAM with
# 2 MiB pages (4-level paging), turns paging on, builds the GDT/TSS/IDT in FW_DATA, reloads
# every segment register and calls MAIN at CPL0 with interrupts off.

.set MSR_EFER, 0xc0000080
.set EFER_LME, 0x100
.set PTE_TABLE, 0x07                  # non-leaf: present | writable | user (the leaf decides)
.set FW_N2M, (RAM_SIZE + 0x1fffff) >> 21          # 2 MiB pages to map
.set FW_NPD, (FW_N2M + 511) >> 9                  # page directories (one per GiB)
.set FW_PML4, FW_PT_BASE
.set FW_PDPT, FW_PT_BASE + 0x1000
.set FW_PD, FW_PT_BASE + 0x2000

.if (2 + FW_NPD) * 0x1000 > FW_PT_END - FW_PT_BASE
.error "RAM too large for the firmware page-table area"
.endif

# ---- FW_BASE: the entry stub, fw_unhandled at FW_BASE + 0x10, fw_start (cli; cld)
.include "common.inc"

# paging on: CR4.PAE, CR3 = FW_PML4, EFER.LME (kept; NXE untouched), CR0.PG | CR0.WP -- the boot
# vCPU's and every other vCPU's (a macro, so that vCPU 0 runs the same instructions as before)
.macro FW_PAGING_ON
    mov rax, cr4
    or eax, CR4_PAE
    mov cr4, rax
    mov eax, FW_PML4
    mov cr3, rax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov rax, cr0
    mov ecx, CR0_PG | CR0_WP
    or rax, rcx
    mov cr0, rax
.endm

    # -- 4-level identity map of all of RAM: PML4 -> PDPT -> FW_NPD page directories
    mov edi, FW_PT_BASE
    xor eax, eax
    mov ecx, (2 + FW_NPD) * 1024
    rep stosd
    mov dword ptr [FW_PML4], FW_PDPT | PTE_TABLE
    mov edi, FW_PDPT
    mov eax, FW_PD | PTE_TABLE
    mov ecx, FW_NPD
fw_pdpt_loop:
    mov dword ptr [rdi], eax
    add eax, 0x1000
    add rdi, 8
    dec ecx
    jnz fw_pdpt_loop
    mov edi, FW_PD
    mov eax, PTE_LARGE                  # rax: 64-bit entry (RAM may exceed 4 GiB)
    mov rcx, FW_N2M
fw_pd_loop:
    mov qword ptr [rdi], rax
    add rax, 0x200000
    add rdi, 8
    dec rcx
    jnz fw_pd_loop

    # -- paging on: CR4.PAE, CR3, EFER.LME (kept; NXE untouched), CR0.PG | CR0.WP
    FW_PAGING_ON

    # -- clear the GDT, IDT and TSS pages (FW_DATA); GDT: null, kernel code (64-bit), kernel data,
    #    user code (64-bit), user data, TSS (16 bytes)
    FW_GDT_SETUP

    # -- TSS: RSP0 for CPL3 -> CPL0 transitions; no I/O bitmap
    mov dword ptr [FW_TSS + 4], TSS_STACK_TOP
    mov dword ptr [FW_TSS + 8], 0
    mov word ptr [FW_TSS + 102], TSS_SIZE

    # -- IDT: 256 present DPL0 64-bit interrupt gates to fw_unhandled (IST 0)
    mov edi, FW_IDT
    mov ecx, 256
fw_idt_loop:
    mov dword ptr [rdi], (FW_UNHANDLED & 0xffff) | (SEL_KCODE << 16)
    mov dword ptr [rdi + 4], (FW_UNHANDLED & 0xffff0000) | 0x8e00
    mov dword ptr [rdi + 8], FW_UNHANDLED >> 32
    mov dword ptr [rdi + 12], 0
    add rdi, 16
    dec ecx
    jnz fw_idt_loop

    # -- load GDT, reload CS (far return), the data segments, TR and IDTR
    lgdt [fw_gdtr]
    push SEL_KCODE
    push fw_cs_loaded
    retfq
fw_cs_loaded:
    FW_LOAD_SEGMENTS

    # -- main's environment (stack, RFLAGS, registers), call MAIN; main returned: stop (status 0)
    FW_CALL_MAIN

# ---- vCPU n > 0 (EBP = n), once vCPU 0 is in main: its stack, the same CR4, CR3, EFER and CR0
#      as vCPU 0, its GDT and TSS, the same IDT (docs/SMP.md)
fw_ap_start:
    mov esp, ebp
    shl esp, 15
    add esp, VCPU_STACKS
    FW_PAGING_ON
    FW_AP_SETUP
    push SEL_KCODE
    push fw_ap_cs_loaded
    retfq
fw_ap_cs_loaded:
    FW_LOAD_SEGMENTS
    push 2
    popfq
    jmp fw_main_tail

# ---- data kept in the image
    .balign 8
fw_gdt_template:
    .long 0, 0                                  # 0x00 null
    .long 0x0000ffff, 0x00af9a00                # 0x08 kernel code, 64-bit (L=1)
    .long 0x0000ffff, 0x00cf9200                # 0x10 kernel data
    .long 0x0000ffff, 0x00affa00                # 0x18 user code, 64-bit (DPL3)
    .long 0x0000ffff, 0x00cff200                # 0x20 user data (DPL3)
    .long ((FW_TSS & 0xffff) << 16) | (TSS_SIZE - 1)              # 0x28 64-bit TSS, 16 bytes
    .long (FW_TSS & 0xff000000) | 0x8900 | ((FW_TSS >> 16) & 0xff)
    .long FW_TSS >> 32
    .long 0
.set FW_GDT_TEMPLATE_DWORDS, 14

fw_gdtr:
    .short GDT_ENTRIES * 8 - 1
    .quad FW_GDT
fw_idtr:
    .short 256 * 16 - 1
    .quad FW_IDT
