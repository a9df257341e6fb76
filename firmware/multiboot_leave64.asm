# x86shadow boot stub for multiboot kernels (docs/KERNELS.md, "Entry state").
#
# A multiboot loader enters the kernel in 32-bit protected mode with paging off. Unicorn's
# UC_MODE_64 cannot start there (measured on Unicorn 2.1.4: a reg_write of EFER or CS does not
# recompute QEMU's hflags), and a UC_MODE_32 CPU that the kernel switches to long mode can no
# longer have its 64-bit registers read. So the CPU starts in UC_MODE_64's reset state (EFER =
# LME|LMA, CR0 = PE|ET, paging off, 64-bit code) and this stub leaves long mode the way the SDM
# describes it (vol. 3A 10.8.5.4, "Switching Out of IA-32e Mode Operation"), which is also the
# only way QEMU clears EFER.LMA (target/i386 cpu_x86_update_cr0: CR0.PG 1 -> 0 with LMA set):
#
#   1. (64-bit code) identity-map the first 2 MiB, CR4.PAE, CR3, CR0.PG: long mode with paging
#   2. far return to SEL_CODE32, a 32-bit code segment: compatibility mode
#   3. (32-bit code) CR0.PG := 0, which leaves long mode (EFER.LMA := 0); EFER := 0; CR4 := 0;
#      CR3 := 0; flat data segments (SEL_DATA)
#   4. EAX = MB_BOOT_MAGIC, EBX = MB_INFO, ECX = KERNEL_ENTRY (QEMU's multiboot.S jumps through
#      ECX), the other general registers 0; jump to the kernel
#
# Assembled twice by x86shadow.asm (assemble_leave64): BITS == 64 at LEAVE64_BASE (step 1-2) and
# BITS == 32 at LEAVE64_CODE32 (step 3-4). The machine loads the boot GDT (0x08 32-bit code,
# 0x10 data, 0x18 64-bit code) and starts the CPU at LEAVE64_BASE with CS = SEL_CODE64 and the
# stack below LEAVE64_STACK_TOP. Nothing here is used once the kernel runs: its tables stop
# being shadowed at the kernel's entry (Machine.load_kernel).

.set MSR_EFER, 0xc0000080
.set CR0_PG, 0x80000000
.set CR4_PAE, 0x20
.set PTE_TABLE, 0x03                  # present | writable (supervisor)
.set PTE_LARGE, 0x83                  # 2 MiB leaf: present | writable | page size

.if BITS == 64
    cli
    cld
    # -- identity map of 0..2 MiB (the stub and its stack): PML4 -> PDPT -> PD with one 2 MiB page
    mov edi, LEAVE64_PML4
    xor eax, eax
    mov ecx, 3 * 1024
    rep stosd
    mov dword ptr [LEAVE64_PML4], LEAVE64_PDPT | PTE_TABLE
    mov dword ptr [LEAVE64_PDPT], LEAVE64_PD | PTE_TABLE
    mov dword ptr [LEAVE64_PD], PTE_LARGE
    # -- paging on (EFER.LME is already set in the reset state): long mode with paging
    mov eax, CR4_PAE
    mov cr4, rax
    mov eax, LEAVE64_PML4
    mov cr3, rax
    mov rax, cr0
    mov ecx, CR0_PG
    or rax, rcx
    mov cr0, rax
    # -- to the 32-bit code segment: compatibility mode
    push SEL_CODE32
    push LEAVE64_CODE32
    retfq
.else
    # -- compatibility mode: paging off leaves long mode
    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax
    mov ecx, MSR_EFER
    xor eax, eax
    xor edx, edx
    wrmsr
    mov cr4, eax
    mov cr3, eax
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    # -- the multiboot entry state
    mov eax, MB_BOOT_MAGIC
    mov ebx, MB_INFO
    mov ecx, KERNEL_ENTRY
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor ebp, ebp
    xor esp, esp
    jmp ecx
.endif
