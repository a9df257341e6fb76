# x86shadow: kernel parts=32,64
# long64 -- a multiboot kernel that enters long mode itself (docs/KERNELS.md): the 32-bit part
# (entered by the loader, paging off) builds 4-level tables -- 0..4 MiB identity-mapped with
# 2 MiB pages, ALIAS_VA mapped with 4 KiB pages onto ALIAS_PA --, loads its GDT, sets CR4.PAE,
# CR3, EFER.LME, CR0.PG (compatibility mode) and far-jumps to the 64-bit part, which checks
# EFER.LMA, writes through the alias and reads back through the identity map, then remaps an
# alias page (a write to a live page table + invlpg) and checks the new mapping; then reads and
# writes the xAPIC page through a 4 KiB mapping (MMIO under paging: no RAM behind the spte).

.set STACK_TOP, KERNEL_DATA + 0x10000
.set PML4, KERNEL_DATA + 0x20000
.set PDPT, KERNEL_DATA + 0x21000
.set PD, KERNEL_DATA + 0x22000       # 0..1 GiB: 2 MiB identity pages
.set PD2, KERNEL_DATA + 0x23000      # 1..2 GiB: ALIAS_VA's page table
.set PT, KERNEL_DATA + 0x24000
.set ALIAS_VA, 0x40000000
.set ALIAS_PA, KERNEL_DATA + 0x30000
.set ALIAS_PA1, KERNEL_DATA + 0x31000
.set ALIAS_PA2, KERNEL_DATA + 0x32000
.set APIC_VA, ALIAS_VA + 0x2000
.set APIC_PA, 0xfee00000
.set SEL_CODE64, 0x18
.set SEL_DATA, 0x10

.if BITS == 32
    jmp start32
.else
    jmp start64
.endif
.include "lib/console.inc"

.if BITS == 32
start32:
    mov esp, STACK_TOP
    PRINT "long64: 32-bit entry\n"
    mov edi, PML4
    xor eax, eax
    mov ecx, 5 * 1024
    rep stosd
    mov dword ptr [PML4], PDPT | 3
    mov dword ptr [PDPT], PD | 3
    mov dword ptr [PDPT + 8], PD2 | 3
    mov dword ptr [PD], 0x83
    mov dword ptr [PD + 8], 0x200083
    mov dword ptr [PD2], PT | 3
    mov dword ptr [PT], ALIAS_PA | 3
    mov dword ptr [PT + 8], ALIAS_PA1 | 3
    mov dword ptr [PT + 16], APIC_PA | 0x1b     # present, writable, PWT, PCD
    lgdt [gdtr]
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    ljmp SEL_CODE64:KERNEL_BASE64

    .balign 8
gdt:
    .long 0, 0
    .long 0x0000ffff, 0x00cf9a00     # 0x08 flat 32-bit code
    .long 0x0000ffff, 0x00cf9200     # 0x10 flat data
    .long 0x0000ffff, 0x00af9a00     # 0x18 64-bit code
gdtr:
    .short 31
    .long gdt
.else
start64:
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, STACK_TOP
    PRINT "long64: 64-bit code\n"
    mov ecx, 0xc0000080
    rdmsr
    CHECK_BITS eax, 0x500, 0x500, 1, "EFER LME and LMA are not both set"
    mov rax, 0x1122334455667788
    mov rdi, ALIAS_VA
    mov qword ptr [rdi], rax
    mov qword ptr [rdi + 0x1008], rax
    mov rsi, ALIAS_PA
    mov rbx, qword ptr [rsi]
    CHECK_EQ rbx, rax, 2, "a store through the alias is not in its frame"
    mov rsi, ALIAS_PA1
    mov rbx, qword ptr [rsi + 8]
    CHECK_EQ rbx, rax, 3, "a store through the second alias page is not in its frame"
    # remap the first alias page onto ALIAS_PA2 (a write to a page table in use) and flush it
    mov dword ptr [PT], ALIAS_PA2 | 3
    invlpg [rdi]
    mov qword ptr [rdi], 0x5a
    mov rsi, ALIAS_PA2
    mov rbx, qword ptr [rsi]
    CHECK_EQ rbx, 0x5a, 4, "the remapped alias page does not reach its new frame"
    mov rsi, ALIAS_PA
    mov rbx, qword ptr [rsi]
    CHECK_EQ rbx, rax, 5, "the old frame changed after the remap"
    PRINT "long64: memory ok\n"
    mov rdi, APIC_VA
    mov ebx, dword ptr [rdi + 0x30]
    CHECK_EQ ebx, 0x50014, 6, "the APIC version read through paging is not 0x50014"
    mov dword ptr [rdi + 0xf0], 0x1ff
    mov ebx, dword ptr [rdi + 0xf0]
    CHECK_EQ ebx, 0x1ff, 7, "the APIC SVR written through paging does not read back"
    PRINT "long64: apic ok\n"
    PASS
    xor eax, eax
    out EXIT_PORT, eax
    cli
    hlt
.endif
