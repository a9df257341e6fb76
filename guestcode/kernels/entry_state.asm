# x86shadow: kernel parts=32
# entry_state -- a multiboot kernel that checks the state it is entered in (docs/KERNELS.md,
# "Entry state") and prints the multiboot information for the test to compare:
#   EAX = 0x2BADB002, EBX = 0x9500 (QEMU's ADDR_MBI), EFLAGS.IF = 0, CR0.PE = 1 and CR0.PG = 0,
#   CR4 = 0, EFER = 0, CS = 0x08 and DS = ES = SS = FS = GS = 0x10 (QEMU multiboot.S), flat 4 GiB
#   segments (32-bit code), info flags 0x24f, mem_lower 639.
# Prints mem_upper, the command line, the modules (start, end, name, contents), the memory map
# and the loader's name, then PASS; exits through isa-debug-exit with 0 (status 1).

.set MB_MAGIC, 0x2badb002
.set SAVED, KERNEL_DATA + 0x1000       # eax, ebx at entry
.set STACK_TOP, KERNEL_DATA + 0x10000
.set MBI_FLAGS, 0
.set MBI_MEM_LOWER, 4
.set MBI_MEM_UPPER, 8
.set MBI_CMDLINE, 16
.set MBI_MODS_COUNT, 20
.set MBI_MODS_ADDR, 24
.set MBI_MMAP_LENGTH, 44
.set MBI_MMAP_ADDR, 48
.set MBI_LOADER, 64

    jmp start                          # the entry (KERNEL_BASE32), over the library
.include "lib/console.inc"

start:
    mov dword ptr [SAVED], eax         # before anything else: no stack yet (ESP is undefined)
    mov dword ptr [SAVED + 4], ebx
    mov esp, STACK_TOP
    mov eax, dword ptr [SAVED]
    CHECK_EQ eax, MB_MAGIC, 1, "EAX is not the multiboot magic"
    mov ebx, dword ptr [SAVED + 4]
    CHECK_EQ ebx, 0x9500, 2, "EBX is not QEMU's ADDR_MBI"
    pushfd
    pop eax
    CHECK_BITS eax, 0x20200, 0, 3, "EFLAGS IF or VM set at entry"
    mov eax, cr0
    CHECK_BITS eax, 0x80000001, 1, 4, "CR0 is not protected mode with paging off"
    mov eax, cr4
    CHECK_EQ eax, 0, 12, "CR4 is not 0"
    mov ecx, 0xc0000080
    rdmsr
    CHECK_EQ eax, 0, 5, "EFER is not 0"
    xor eax, eax
    mov ax, cs
    CHECK_EQ eax, 0x08, 6, "CS is not 0x08"
    mov ax, ds
    CHECK_EQ eax, 0x10, 7, "DS is not 0x10"
    mov ax, es
    CHECK_EQ eax, 0x10, 7, "ES is not 0x10"
    mov ax, ss
    CHECK_EQ eax, 0x10, 7, "SS is not 0x10"
    mov ax, fs
    CHECK_EQ eax, 0x10, 7, "FS is not 0x10"
    mov ax, gs
    CHECK_EQ eax, 0x10, 7, "GS is not 0x10"
    mov ecx, 0x08
    lsl eax, ecx
    CHECK_EQ eax, 0xffffffff, 8, "CS limit is not 4 GiB"
    lar eax, ecx
    CHECK_BITS eax, 0x00409a00, 0x00409a00, 8, "CS is not a present 32-bit code segment"
    mov ecx, 0x10
    lsl eax, ecx
    CHECK_EQ eax, 0xffffffff, 8, "DS limit is not 4 GiB"
    # -- the multiboot information
    mov eax, dword ptr [ebx + MBI_FLAGS]
    CHECK_EQ eax, 0x24f, 9, "info flags are not QEMU's 0x24f"
    mov eax, dword ptr [ebx + MBI_MEM_LOWER]
    CHECK_EQ eax, 639, 10, "mem_lower is not 639"
    mov edx, dword ptr [ebx + MBI_MEM_UPPER]
    PRINT_DEC "mem_upper=", edx
    PRINT "\ncmdline="
    mov esi, dword ptr [ebx + MBI_CMDLINE]
    call puts
    mov edx, dword ptr [ebx + MBI_MODS_COUNT]
    PRINT_DEC "\nmods=", edx
    test edx, edx
    jz no_module
    mov edi, dword ptr [ebx + MBI_MODS_ADDR]
    mov edx, dword ptr [edi]
    PRINT_HEX "\nmod0 start=", edx
    CHECK_BITS edx, 0xfff, 0, 11, "module start is not page-aligned"
    mov edx, dword ptr [edi + 4]
    PRINT_HEX " end=", edx
    PRINT " name="
    mov esi, dword ptr [edi + 8]
    call puts
    PRINT " data="
    mov esi, dword ptr [edi]
    mov ecx, dword ptr [edi + 4]
module_byte:
    cmp esi, ecx
    jae no_module
    mov al, byte ptr [esi]
    call putc
    inc esi
    jmp module_byte
no_module:
    # -- the memory map: entries of size (4 bytes, not counted), base, length, type
    mov esi, dword ptr [ebx + MBI_MMAP_ADDR]
    mov edi, esi
    add edi, dword ptr [ebx + MBI_MMAP_LENGTH]
mmap_entry:
    cmp esi, edi
    jae mmap_done
    mov edx, dword ptr [esi + 4]
    PRINT_HEX "\nmmap ", edx
    mov edx, dword ptr [esi + 12]
    PRINT_HEX " ", edx
    mov edx, dword ptr [esi + 20]
    PRINT_DEC " ", edx
    mov eax, dword ptr [esi]
    add esi, eax
    add esi, 4
    jmp mmap_entry
mmap_done:
    PRINT "\nloader="
    mov esi, dword ptr [ebx + MBI_LOADER]
    call puts
    PRINT "\n"
    PASS
    xor eax, eax
    out EXIT_PORT, eax
    cli
    hlt
