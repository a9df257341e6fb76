# pcid.asm -- PCID and INVPCID as kvm-unit-tests' x86/pcid.c checks them, deciding from CPUID
# what the CPU model must do (run it with --cpu qemu64,+pcid,+invpcid / qemu64,-pcid,-invpcid /
# qemu64,-pcid,+invpcid as its unittests.cfg does; the default model has neither feature).
# Prints which features it found, then PASS.
# x86shadow: modes=64
.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/trap.inc"

.set CR4_PCIDE, 1 << 17
.set DESC, PROG_VARS                    # the 16-byte INVPCID descriptor: PCID, linear address

.macro INVPCID type
    mov eax, \type
    mov rbx, DESC
    .byte 0x66, 0x0f, 0x38, 0x82, 0x03  # invpcid rax, [rbx]
.endm

main:
    TRAP_SETUP
    mov qword ptr [DESC], 0
    mov qword ptr [DESC + 8], 0
    mov eax, 1
    xor ecx, ecx
    cpuid
    bt ecx, 17
    jnc pcid_disabled
    PRINT "pcid "
    # CR4.PCIDE can be set
    mov r12, cr4
    TRY e1
    mov rax, r12
    or rax, CR4_PCIDE
    mov cr4, rax
e1: CHECK_TRAP NO_TRAP, 0, 11
    # CR3 with the no-flush bit 63: taken, bit 63 not stored
    mov r13, cr3
    TRY e2
    mov rax, r13
    bts rax, 63
    mov cr3, rax
e2: CHECK_TRAP NO_TRAP, 0, 12
    mov rax, cr3
    cmp rax, r13
    je e2ok
    FAIL 13, "CR3 kept the no-flush bit"
e2ok:
    # clearing CR0.PG with CR4.PCIDE set (and in 64-bit mode): #GP
    TRY e3
    mov rax, cr0
    btr rax, 31
    mov cr0, rax
e3: CHECK_TRAP 13, 0, 14
    mov cr4, r12
    # setting CR4.PCIDE with CR3[11:0] != 0: #GP
    mov rax, r13
    or rax, 1
    mov cr3, rax
    TRY e4
    mov rax, r12
    or rax, CR4_PCIDE
    mov cr4, rax
e4: CHECK_TRAP 13, 0, 15
    mov cr3, r13
    jmp invpcid_part
pcid_disabled:
    PRINT "nopcid "
    mov r12, cr4
    TRY d1
    mov rax, r12
    or rax, CR4_PCIDE
    mov cr4, rax
d1: CHECK_TRAP 13, 0, 16

invpcid_part:
    mov eax, 7
    xor ecx, ecx
    cpuid
    bt ebx, 10
    jc invpcid_enabled
    PRINT "noinvpcid\n"
    TRY u1
    INVPCID 2
u1: CHECK_TRAP 6, 0, 17
    PASS
    ret
invpcid_enabled:
    PRINT "invpcid\n"
    # types 0..3 with PCID 0 and CR4.PCIDE = 0: no fault
    mov r14d, 0
inv_loop:
    TRY i1
    INVPCID r14d
i1: CHECK_TRAP NO_TRAP, 0, 18
    inc r14d
    cmp r14d, 4
    jb inv_loop
    # PCID 1 with CR4.PCIDE = 0: types 0 and 1 #GP
    mov qword ptr [DESC], 1
    TRY i2
    INVPCID 0
i2: CHECK_TRAP 13, 0, 19
    TRY i3
    INVPCID 1
i3: CHECK_TRAP 13, 0, 20
    # type 4 does not exist: #GP
    TRY i4
    INVPCID 4
i4: CHECK_TRAP 13, 0, 21
    mov eax, 1
    xor ecx, ecx
    cpuid
    bt ecx, 17
    jnc inv_done
    # with CR4.PCIDE = 1: type 2 with PCID 10 is fine
    mov rax, r12
    or rax, CR4_PCIDE
    mov cr4, rax
    mov qword ptr [DESC], 10
    TRY i5
    INVPCID 2
i5: CHECK_TRAP NO_TRAP, 0, 22
    mov cr4, r12
inv_done:
    PASS
    ret
