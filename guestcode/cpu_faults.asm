# cpu_faults.asm -- the CPU model's faults (docs/CPU_MODEL.md) on the default model (haswell):
# each privileged instruction that must raise #GP(0) or #UD on it is run under TRY with our own
# handlers, and the vector and error code are checked; the instructions that must not fault run
# too. Then a pte with a frame bit at MAXPHYADDR (read from CPUID 0x80000008) must give a #PF
# with RSVD|P (PAE and 64-bit paging; 2-level 4 KiB ptes have no reserved bits).
# x86shadow: modes=32,pae,64
.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/trap.inc"

.set CR4_SMEP, 1 << 20
.set EFER, 0xc0000080
.set RSVD_VA, 0x40000000                # above RAM: unmapped by the firmware

.if BITS == 64
.macro CR4_READ
    mov rax, cr4
.endm
.macro CR4_OR bits
    mov rax, cr4
    or rax, \bits
    mov cr4, rax
.endm
.macro CR0_OR bits
    mov rax, cr0
    or rax, \bits
    mov cr0, rax
.endm
.macro CR0_CLEAR bit
    mov rax, cr0
    btr rax, \bit
    mov cr0, rax
.endm
.else
.macro CR4_READ
    mov eax, cr4
.endm
.macro CR4_OR bits
    mov eax, cr4
    or eax, \bits
    mov cr4, eax
.endm
.macro CR0_OR bits
    mov eax, cr0
    or eax, \bits
    mov cr0, eax
.endm
.macro CR0_CLEAR bit
    mov eax, cr0
    btr eax, \bit
    mov cr0, eax
.endm
.endif

# CASE n, resume: TRY, then the body follows; at resume: CHECK_TRAP vector, error, 10 + n
main:
    TRAP_SETUP
    # --- CR4 bits haswell lacks or that are reserved: #GP(0), CR4 unchanged
    TRY c1
    CR4_OR 0x2000000                    # bit 25, reserved
c1: CHECK_TRAP 13, 0, 11
    TRY c2
    CR4_OR 0x400000                     # PKE: no PKU
c2: CHECK_TRAP 13, 0, 12
    TRY c3
    CR4_OR 0x200000                     # SMAP: not offered
c3: CHECK_TRAP 13, 0, 13
    TRY c4
    CR4_OR 0x1000                       # LA57
c4: CHECK_TRAP 13, 0, 14
    TRY c5
    CR4_OR 0x800                        # UMIP
c5: CHECK_TRAP 13, 0, 15
    TRY c6
    CR4_OR 0x2000                       # VMXE
c6: CHECK_TRAP 13, 0, 16
    TRY c7
    CR4_OR 0x20000                      # PCIDE: no PCID on haswell
c7: CHECK_TRAP 13, 0, 17
    CR4_READ
    CHECK_BITS eax, 0x2623800, 0, 18, "a refused CR4 bit was set anyway"
    # --- SMEP: haswell has it
    TRY c8
    CR4_OR CR4_SMEP
c8: CHECK_TRAP NO_TRAP, 0, 19
    CR4_READ
    CHECK_BITS eax, CR4_SMEP, CR4_SMEP, 20, "CR4.SMEP not set"
    # --- CR0
    TRY c9
    CR0_OR 0x20000000                   # NW without CD
c9: CHECK_TRAP 13, 0, 21
    TRY c10
    CR0_CLEAR 0                         # PE cleared with PG set
c10: CHECK_TRAP 13, 0, 22
    # --- MSRs
    TRY c11
    mov ecx, 0xdeadbeef
    rdmsr
c11: CHECK_TRAP 13, 0, 23
    TRY c12
    mov ecx, 0xdeadbeef
    xor eax, eax
    xor edx, edx
    wrmsr
c12: CHECK_TRAP 13, 0, 24
    TRY c13
    mov ecx, EFER
    rdmsr
    or eax, 2                           # EFER bit 1: reserved
    wrmsr
c13: CHECK_TRAP 13, 0, 25
    TRY c14
    mov ecx, EFER
    rdmsr
    xor eax, 0x100                      # EFER.LME changed with paging on
    wrmsr
c14: CHECK_TRAP 13, 0, 26
    TRY c15
    mov ecx, 0x277                      # IA32_PAT: memory type 2 is reserved
    mov eax, 0x00070402
    mov edx, 0x00070406
    wrmsr
c15: CHECK_TRAP 13, 0, 27
    TRY c16
    mov ecx, 0x277
    rdmsr
    mov ebx, eax
c16: CHECK_TRAP NO_TRAP, 0, 28
    CHECK_EQ ebx, 0x00070406, 29, "IA32_PAT changed by a refused write"
    # --- #UD
    TRY c17
    ud2
c17: CHECK_TRAP 6, 0, 30
    TRY c18
    .byte 0x66, 0x0f, 0x38, 0x82, 0x00  # invpcid eax/rax, [eax/rax]: no INVPCID on haswell
c18: CHECK_TRAP 6, 0, 31
    TRY c19
    .byte 0xf3, 0x0f, 0xc7, 0xf8        # rdpid eax/rax
c19: CHECK_TRAP 6, 0, 32
    TRY c20
    .byte 0x0f, 0x01, 0xcb              # stac: no SMAP
c20: CHECK_TRAP 6, 0, 33
.if BITS == 64
    # --- long mode
    TRY c21
    mov rax, cr0
    bts rax, 32                         # CR0 bits 63:32
    mov cr0, rax
c21: CHECK_TRAP 13, 0, 34
    TRY c22
    mov rax, cr4
    btr rax, 5                          # CR4.PAE cleared in long mode
    mov cr4, rax
c22: CHECK_TRAP 13, 0, 35
    TRY c23
    mov rax, cr3
    bts rax, 45                         # CR3 above MAXPHYADDR
    mov cr3, rax
c23: CHECK_TRAP 13, 0, 36
    TRY c24
    mov ecx, 0xc0000100                 # FS_BASE := non-canonical
    xor eax, eax
    mov edx, 0x8000
    wrmsr
c24: CHECK_TRAP 13, 0, 37
    TRY c25
    CR0_CLEAR 31                        # CR0.PG cleared in 64-bit mode
c25: CHECK_TRAP 13, 0, 38
    TRY c26
    mov ecx, 0xc0000100
    mov eax, 0x1000
    xor edx, edx
    wrmsr
c26: CHECK_TRAP NO_TRAP, 0, 39
    mov ecx, 0xc0000100
    xor eax, eax
    wrmsr
.endif
.if PAGING >= 3
    # --- a frame bit at MAXPHYADDR is reserved: #PF with RSVD|P
    mov eax, 0x80000008
    cpuid
    movzx ecx, al                       # MAXPHYADDR
    call pt_init
.if BITS == 64
    mov rax, 1
    shl rax, cl
    or rax, FREE_BASE + 0x10000 + PTE_P + PTE_W
    mov rdi, cr3
    mov esi, RSVD_VA
    mov ecx, 1
    call pt_map
.else
    sub ecx, 32
    mov edx, 1
    shl edx, cl
    mov eax, FREE_BASE + 0x10000 + PTE_P + PTE_W
    mov edi, cr3
    mov esi, RSVD_VA
    mov ecx, 1
    call pt_map
.endif
    invlpg [RSVD_VA]
    TRY c27
    mov eax, dword ptr [RSVD_VA]
c27: CHECK_TRAP 14, PF_RSVD + PF_P, 40
    mov eax, dword ptr [trap_cr2]
    CHECK_EQ eax, RSVD_VA, 41, "wrong CR2"
.endif
    PASS
    ret
