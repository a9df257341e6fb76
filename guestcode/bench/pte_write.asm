# bench/pte_write.asm -- emulated page-table writes: N times, re-point one pte of a page table the
# shadow MMU has shadowed (mode 32 / 64: one store; PAE: two 4-byte stores, high half first, as
# Linux's set_pte), invlpg the page and read it through the new mapping. Every store is trapped and
# emulated (a kvm_mmu_pte_write). With WRITE=0 the loop is the same without the store (invlpg and
# the read only): the difference of the two runs, per store, is the cost of one emulated pte write.
# Own CR3; the page BENCH_WIN alternates between frames A and B (markers 0xa and 0xb).
# Check: every read returns the marker of the frame just mapped.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "bench.inc"

.ifndef N
.set N, 20000
.endif
.ifndef WRITE
.set WRITE, 1
.endif
.set v_root, PROG_VARS + 0x00
.set v_pte, PROG_VARS + 0x08           # address of the pte
.set v_fa, PROG_VARS + 0x10            # frame A | P | W
.set v_fb, PROG_VARS + 0x14            # frame B | P | W

.macro LOOP si
    mov esi, BENCH_WIN
    mov ebx, dword ptr [v_pte]
    xor ecx, ecx
pw_loop_\@:
.if WRITE
    mov eax, dword ptr [v_fa]
    mov edx, 0xa
    test ecx, 1
    jz pw_even_\@
    mov eax, dword ptr [v_fb]
    mov edx, 0xb
pw_even_\@:
    PTE_SET ebx, eax, rbx, rax
.else
    mov edx, 0xa
.endif
    invlpg [\si]
    cmp dword ptr [\si], edx
    jne pw_bad
    inc ecx
    cmp ecx, N
    jb pw_loop_\@
.endm

main:
    PUSHA_
    call pt_init
    call pt_alloc
    mov dword ptr [eax], 0xa
    or eax, PTE_P | PTE_W
    mov dword ptr [v_fa], eax
    call pt_alloc
    mov dword ptr [eax], 0xb
    or eax, PTE_P | PTE_W
    mov dword ptr [v_fb], eax
    call new_root
    mov dword ptr [v_root], eax
    mov dword ptr [v_root + 4], 0
.if BITS == 64
    mov rdi, rax
.else
    mov edi, eax
.endif
    mov esi, BENCH_WIN
    mov eax, dword ptr [v_fa]
    xor edx, edx
    mov ecx, 1
    call pt_map
    mov dword ptr [v_pte], eax
    mov eax, dword ptr [v_root]
    SET_CR3
.if BITS == 64
    xor eax, eax
    LOOP rsi
.else
    LOOP esi
.endif
    POPA_
    PASS
    ret
pw_bad:
    FAILV 1, "pte-write: wrong marker after re-pointing the pte (iteration in ecx)", ecx
