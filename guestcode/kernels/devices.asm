# x86shadow: kernel parts=32
# devices -- a multiboot kernel that checks the QEMU devices a kernel machine has (docs/KERNELS.md,
# "Devices"), in 32-bit protected mode with paging off: fw_cfg (signature, NB_CPUS, RAM_SIZE, an
# unknown key), both PICs (initialisation sequence, masks read back), the 16550's registers,
# the xAPIC page (ID, version, SVR, TPR, ICR, LVT, EOI), IA32_APIC_BASE, an unknown port (0xff);
# prints what it read and ends through port 0x8900 ("Shutdown": status 0).

.set STACK_TOP, KERNEL_DATA + 0x10000
.set FW_CFG_SEL, 0x510
.set FW_CFG_DATA, 0x511
.set APIC, 0xfee00000
.set COM1, SERIAL_PORT

    jmp start
.include "lib/console.inc"

# fw_cfg item eax (key) -> edx:eax its first 8 bytes (little endian), ecx = 8 bytes read
fw_cfg_read:
    push ebx
    mov dx, FW_CFG_SEL
    out dx, ax
    mov dx, FW_CFG_DATA
    xor ebx, ebx
    xor ecx, ecx
fw_cfg_lo:
    in al, dx
    movzx eax, al
    shl eax, 24
    shr ebx, 8
    or ebx, eax
    inc ecx
    cmp ecx, 4
    jb fw_cfg_lo
    xor edi, edi
fw_cfg_hi:
    in al, dx
    movzx eax, al
    shl eax, 24
    shr edi, 8
    or edi, eax
    inc ecx
    cmp ecx, 8
    jb fw_cfg_hi
    mov eax, ebx
    mov edx, edi
    pop ebx
    ret

start:
    mov esp, STACK_TOP
    # -- fw_cfg
    xor eax, eax
    call fw_cfg_read
    CHECK_EQ eax, 0x554d4551, 1, "fw_cfg signature is not QEMU"
    CHECK_EQ edx, 0, 1, "fw_cfg signature has bytes past QEMU"
    mov eax, 5
    call fw_cfg_read
    mov ebx, eax
    PRINT_DEC "fw_cfg nb_cpus=", ebx
    CHECK_EQ ebx, 1, 2, "NB_CPUS is not 1"
    mov eax, 3
    call fw_cfg_read
    mov ebx, eax
    mov esi, edx
    PRINT_HEX "\nfw_cfg ram_size=", ebx
    CHECK_EQ esi, 0, 3, "RAM_SIZE has a high dword"
    mov eax, 0x1234
    call fw_cfg_read
    or eax, edx
    CHECK_EQ eax, 0, 4, "an unknown fw_cfg key is not 0"
    # -- PICs: ICW1..ICW4, then masks
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x02
    out 0xa1, al
    mov al, 0x01
    out 0x21, al
    out 0xa1, al
    mov al, 0xfb
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    xor eax, eax
    in al, 0x21
    CHECK_EQ eax, 0xfb, 5, "master PIC mask not kept"
    in al, 0xa1
    CHECK_EQ eax, 0xff, 5, "slave PIC mask not kept"
    # -- 16550: divisor latch, LCR, IER, MCR, SCR, LSR
    mov dx, COM1 + 3
    mov al, 0x83
    out dx, al
    mov dx, COM1
    mov al, 0x01
    out dx, al
    mov dx, COM1 + 1
    mov al, 0x00
    out dx, al
    mov dx, COM1
    in al, dx
    CHECK_EQ eax, 0x01, 6, "DLL not kept"
    mov dx, COM1 + 3
    mov al, 0x03
    out dx, al
    in al, dx
    CHECK_EQ eax, 0x03, 6, "LCR not kept"
    mov dx, COM1 + 1
    mov al, 0x05
    out dx, al
    in al, dx
    CHECK_EQ eax, 0x05, 6, "IER not kept"
    mov dx, COM1 + 4
    mov al, 0x0b
    out dx, al
    in al, dx
    CHECK_EQ eax, 0x0b, 6, "MCR not kept"
    mov dx, COM1 + 7
    mov al, 0x5a
    out dx, al
    in al, dx
    CHECK_EQ eax, 0x5a, 6, "SCR not kept"
    mov dx, COM1 + 5
    in al, dx
    CHECK_EQ eax, 0x60, 6, "LSR is not 0x60"
    # -- xAPIC
    mov ebx, dword ptr [APIC + 0x20]
    CHECK_EQ ebx, 0, 7, "APIC ID is not 0"
    mov ebx, dword ptr [APIC + 0x30]
    PRINT_HEX "\napic version=", ebx
    CHECK_EQ ebx, 0x50014, 7, "APIC version is not 0x50014"
    mov dword ptr [APIC + 0xf0], 0x1ff
    mov ebx, dword ptr [APIC + 0xf0]
    CHECK_EQ ebx, 0x1ff, 7, "SVR not kept"
    mov dword ptr [APIC + 0x80], 0x20
    mov ebx, dword ptr [APIC + 0x80]
    CHECK_EQ ebx, 0x20, 7, "TPR not kept"
    mov dword ptr [APIC + 0x350], 0x700
    mov ebx, dword ptr [APIC + 0x350]
    CHECK_EQ ebx, 0x700, 7, "LVT LINT0 not kept"
    mov dword ptr [APIC + 0x310], 0x01000000
    mov dword ptr [APIC + 0x300], 0x000c4500
    mov ebx, dword ptr [APIC + 0x300]
    CHECK_EQ ebx, 0x000c4500, 7, "ICR not kept (or delivery status set)"
    mov dword ptr [APIC + 0xb0], 0
    # -- IA32_APIC_BASE
    mov ecx, 0x1b
    rdmsr
    mov ebx, eax
    PRINT_HEX "\napic_base=", ebx
    CHECK_EQ ebx, 0xfee00900, 8, "IA32_APIC_BASE is not 0xfee00900"
    CHECK_EQ edx, 0, 8, "IA32_APIC_BASE has a high dword"
    # -- an unknown port reads all ones
    mov dx, 0x2f0
    xor eax, eax
    in al, dx
    CHECK_EQ eax, 0xff, 9, "an unknown port does not read 0xff"
    in eax, dx
    CHECK_EQ eax, 0xffffffff, 9, "an unknown port does not read 0xffffffff"
    PRINT "\n"
    PASS
    # -- power off through the Bochs port: "Shutdown"
    mov dx, 0x8900
    mov esi, shutdown
shutdown_byte:
    mov al, byte ptr [esi]
    test al, al
    jz shutdown_failed
    out dx, al
    inc esi
    jmp shutdown_byte
shutdown_failed:
    FAIL 10, "port 0x8900 did not power off"
shutdown:
    .asciz "Shutdown"
