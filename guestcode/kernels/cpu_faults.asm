# x86shadow: kernel parts=32
# cpu_faults -- a multiboot kernel with its own IDT that checks the faults the CPU model injects
# (docs/CPU_MODEL.md) reach a kernel's handlers: #GP(0) for a reserved CR4 bit (25) and for
# CR4.PKE on a model without PKU, for rdmsr / wrmsr of an unknown MSR and for a reserved EFER
# bit; #UD for ud2. Each handler records the vector and error code and resumes at RESUME.

.set STACK_TOP, KERNEL_DATA + 0x10000
.set IDT, KERNEL_DATA + 0x20000
.set RESUME, KERNEL_DATA + 0x1000
.set LAST_VEC, KERNEL_DATA + 0x1004
.set LAST_EC, KERNEL_DATA + 0x1008
.set NO_FAULT, 0xffffffff

    jmp start
.include "lib/console.inc"

gp_handler:
    mov dword ptr [LAST_VEC], 13
    pop eax
    mov dword ptr [LAST_EC], eax
    mov eax, dword ptr [RESUME]
    mov dword ptr [esp], eax
    iret
ud_handler:
    mov dword ptr [LAST_VEC], 6
    mov dword ptr [LAST_EC], 0
    mov eax, dword ptr [RESUME]
    mov dword ptr [esp], eax
    iret

# ecx = vector, eax = handler: a present DPL0 32-bit interrupt gate, selector 0x08
set_gate:
    lea edi, [IDT + ecx * 8]
    mov word ptr [edi], ax
    mov word ptr [edi + 2], 0x08
    mov word ptr [edi + 4], 0x8e00
    shr eax, 16
    mov word ptr [edi + 6], ax
    ret

# the fault recorded since the last ARM must be vector \vec with error code 0
.macro ARM resume
    mov dword ptr [LAST_VEC], NO_FAULT
    mov dword ptr [RESUME], \resume
.endm
.macro EXPECT vec, code, text
    mov ebx, dword ptr [LAST_VEC]
    CHECK_EQ ebx, \vec, \code, "\text"
    mov ebx, dword ptr [LAST_EC]
    CHECK_EQ ebx, 0, \code, "\text"
.endm

start:
    mov esp, STACK_TOP
    mov edi, IDT
    xor eax, eax
    mov ecx, 512
    rep stosd
    mov ecx, 13
    mov eax, gp_handler
    call set_gate
    mov ecx, 6
    mov eax, ud_handler
    call set_gate
    lidt [idtr]
    # -- CR4 bit 25 is reserved
    ARM after_cr4_25
    mov eax, cr4
    or eax, 0x2000000
    mov cr4, eax
after_cr4_25:
    EXPECT 13, 1, "mov cr4 with reserved bit 25 did not #GP(0)"
    PRINT "GP: cr4 bit 25\n"
    # -- CR4.PKE (bit 22): the default model (haswell) has no PKU
    ARM after_cr4_pke
    mov eax, cr4
    or eax, 0x400000
    mov cr4, eax
after_cr4_pke:
    EXPECT 13, 2, "mov cr4 with PKE on a model without PKU did not #GP(0)"
    PRINT "GP: cr4 pke\n"
    # -- an unknown MSR
    ARM after_rdmsr
    mov ecx, 0x12345678
    rdmsr
after_rdmsr:
    EXPECT 13, 3, "rdmsr of an unknown MSR did not #GP(0)"
    PRINT "GP: rdmsr 0x12345678\n"
    ARM after_wrmsr
    mov ecx, 0x12345678
    xor eax, eax
    xor edx, edx
    wrmsr
after_wrmsr:
    EXPECT 13, 4, "wrmsr of an unknown MSR did not #GP(0)"
    PRINT "GP: wrmsr 0x12345678\n"
    # -- a reserved EFER bit (bit 2)
    ARM after_efer
    mov ecx, 0xc0000080
    mov eax, 4
    xor edx, edx
    wrmsr
after_efer:
    EXPECT 13, 5, "wrmsr of a reserved EFER bit did not #GP(0)"
    PRINT "GP: efer bit 2\n"
    # -- the CPU goes on normally after the faults
    mov eax, cr4
    CHECK_EQ eax, 0, 6, "CR4 changed by a faulting write"
    # -- an invalid opcode
    ARM after_ud2
    ud2
after_ud2:
    EXPECT 6, 7, "ud2 did not #UD"
    PRINT "UD: ud2\n"
    PASS
    xor eax, eax
    out EXIT_PORT, eax
    cli
    hlt

    .balign 8
idtr:
    .short 256 * 8 - 1
    .long IDT
