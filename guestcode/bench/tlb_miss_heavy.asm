# bench/tlb_miss_heavy.asm -- a walk over a large working set that the CPU's TLB cannot hold: 512
# pages 1 MiB apart (QEMU's softmmu TLB is direct-mapped by virtual page number, 256 entries to
# start, 8-entry victim TLB: pages 1 MiB apart all land in the same slot), read in turn, N passes.
# After the first pass every access is a TLB refill that hits in the shadow tables: this measures the
# cost of the fill hook (no exit), against Unicorn's own page walker.
# Own CR3: the low 64 MiB identity-mapped, page i at BENCH_WIN + i MiB -> frame F_i holding i.
# Check: every read returns the page's marker.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "bench.inc"

.ifndef N
.set N, 500
.endif
.set P, 512
.set STRIDE, 0x100000
.set v_root, PROG_VARS + 0x00

.macro WALK si
    mov ebp, N
tm_pass_\@:
    mov esi, BENCH_WIN
    xor ecx, ecx
tm_acc_\@:
    mov eax, dword ptr [\si]
    cmp eax, ecx
    jne tm_bad
    add esi, STRIDE
    inc ecx
    cmp ecx, P
    jb tm_acc_\@
    dec ebp
    jnz tm_pass_\@
.endm

main:
    PUSHA_
    call pt_init
    call new_root
    mov dword ptr [v_root], eax
    mov edi, eax
    # map page i -> a fresh frame holding i
    xor ebx, ebx
    mov esi, BENCH_WIN
tm_map:
    call pt_alloc
    mov dword ptr [eax], ebx
    or eax, PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    add esi, STRIDE
    inc ebx
    cmp ebx, P
    jb tm_map
    mov eax, dword ptr [v_root]
    SET_CR3
.if BITS == 64
    WALK rsi
.else
    WALK esi
.endif
    POPA_
    PASS
    ret
tm_bad:
    FAILV 1, "tlb-miss-heavy: wrong marker read (got/expected page index in ecx)", eax
