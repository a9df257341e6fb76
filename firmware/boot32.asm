# x86shadow firmware for modes 32 and pae (docs/ARCHITECTURE.md, "Boot contract").
#
# Assembled by x86shadow.asm at FW_BASE with the symbols of layout.asm_symbols() plus MAIN.
# Entered at FW_BASE in 32-bit protected mode, paging off, CR0 = PE|ET, a flat boot GDT
# (0x08 code, 0x10 data) loaded, ESP = STACK_TOP. It builds the GDT/TSS/IDT in FW_DATA,
# identity-maps all of RAM with large pages (4 MiB PSE pages for PAGING == 2, 2 MiB PAE pages
# for PAGING == 3), turns paging on and calls MAIN at CPL0 with interrupts off.

.set CR4_PSE, 0x10

.if RAM_SIZE > 0x100000000
.error "modes 32 and pae identity-map at most 4 GiB of RAM"
.endif

# ---- FW_BASE: the entry stub, fw_unhandled at FW_BASE + 0x10, fw_start (cli; cld)
.include "common.inc"

    # -- clear the GDT, IDT and TSS pages; GDT: null, kernel code, kernel data, user code, user
    #    data, TSS (docs/GUEST_CONTRACT.md)
    FW_GDT_SETUP

    # -- TSS: ESP0/SS0 for CPL3 -> CPL0 transitions; no I/O bitmap
    mov dword ptr [FW_TSS + 4], TSS_STACK_TOP
    mov dword ptr [FW_TSS + 8], SEL_KDATA
    mov word ptr [FW_TSS + 102], TSS_SIZE

    # -- IDT: 256 present DPL0 32-bit interrupt gates to fw_unhandled
    mov edi, FW_IDT
    mov ecx, 256
fw_idt_loop:
    mov dword ptr [edi], (FW_UNHANDLED & 0xffff) | (SEL_KCODE << 16)
    mov dword ptr [edi + 4], (FW_UNHANDLED & 0xffff0000) | 0x8e00
    add edi, 8
    dec ecx
    jnz fw_idt_loop

    # -- load GDT, reload every segment register, TR and IDTR
    lgdt [fw_gdtr]
    ljmp SEL_KCODE:fw_cs_loaded
fw_cs_loaded:
    FW_LOAD_SEGMENTS

.if PAGING == 2
    # -- 2-level paging: one page directory of 4 MiB pages
    .set FW_NLARGE, (RAM_SIZE + 0x3fffff) >> 22
    mov edi, FW_PT_BASE
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov edi, FW_PT_BASE
    mov eax, PTE_LARGE
    mov ecx, FW_NLARGE
fw_pd_loop:
    mov dword ptr [edi], eax
    add eax, 0x400000
    add edi, 4
    dec ecx
    jnz fw_pd_loop
    mov eax, cr4
    or eax, CR4_PSE
    mov cr4, eax
.else
    # -- PAE paging: a PDPT (its own page at FW_PT_BASE) and four page directories of 2 MiB pages
    .set FW_NLARGE, (RAM_SIZE + 0x1fffff) >> 21
    mov edi, FW_PT_BASE
    xor eax, eax
    mov ecx, 5 * 1024
    rep stosd
    mov edi, FW_PT_BASE
    mov eax, (FW_PT_BASE + 0x1000) | 1         # PDPTEs: present only (RW/US are reserved)
    mov ecx, 4
fw_pdpt_loop:
    mov dword ptr [edi], eax
    add eax, 0x1000
    add edi, 8
    dec ecx
    jnz fw_pdpt_loop
    mov edi, FW_PT_BASE + 0x1000
    mov eax, PTE_LARGE
    mov ecx, FW_NLARGE
fw_pd_loop:
    mov dword ptr [edi], eax                   # the high dword stays 0 (RAM below 4 GiB)
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz fw_pd_loop
    mov eax, cr4
    or eax, CR4_PAE
    mov cr4, eax
.endif

    # -- paging on (CR0.PG | CR0.WP)
    mov eax, FW_PT_BASE
    mov cr3, eax
    mov eax, cr0
    or eax, CR0_PG | CR0_WP
    mov cr0, eax
    jmp fw_paging_on
fw_paging_on:

    # -- main's environment (stack, EFLAGS, registers), call MAIN; main returned: stop (status 0)
    FW_CALL_MAIN

# ---- vCPU n > 0 (EBP = n), once vCPU 0 is in main: its stack, GDT and TSS, the same IDT, CR4,
#      CR3 and CR0 as vCPU 0 (docs/SMP.md)
fw_ap_start:
    mov esp, ebp
    shl esp, 15
    add esp, VCPU_STACKS
    FW_AP_SETUP
    ljmp SEL_KCODE:fw_ap_cs_loaded
fw_ap_cs_loaded:
    FW_LOAD_SEGMENTS
    mov eax, cr4
.if PAGING == 2
    or eax, CR4_PSE
.else
    or eax, CR4_PAE
.endif
    mov cr4, eax
    mov eax, FW_PT_BASE
    mov cr3, eax
    mov eax, cr0
    or eax, CR0_PG | CR0_WP
    mov cr0, eax
    push 2
    popfd
    jmp fw_main_tail

# ---- data kept in the image
    .balign 8
fw_gdt_template:
    .long 0, 0                                  # 0x00 null
    .long 0x0000ffff, 0x00cf9a00                # 0x08 kernel code, 32-bit, base 0, 4 GiB
    .long 0x0000ffff, 0x00cf9200                # 0x10 kernel data
    .long 0x0000ffff, 0x00cffa00                # 0x18 user code (DPL3)
    .long 0x0000ffff, 0x00cff200                # 0x20 user data (DPL3)
    .long ((FW_TSS & 0xffff) << 16) | (TSS_SIZE - 1)              # 0x28 32-bit TSS
    .long (FW_TSS & 0xff000000) | 0x8900 | ((FW_TSS >> 16) & 0xff)
.set FW_GDT_TEMPLATE_DWORDS, 12

fw_gdtr:
    .short GDT_ENTRIES * 8 - 1
    .long FW_GDT
fw_idtr:
    .short 256 * 8 - 1
    .long FW_IDT
