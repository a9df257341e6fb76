# bench/fault_in.asm -- shadow page faults: N pages mapped by the guest before it loads its CR3,
# each then touched once (a read). Under the shadow MMU every first touch is a shadow page fault
# (pf_fixed: walk the guest tables, set A, install an spte; a new shadow page every 512 pages);
# Unicorn's own walker just walks. STRIDE (default 4 KiB) spaces the pages: with STRIDE = 2 MiB
# every page needs a page table (and a shadow page) of its own.
# Own CR3: the low 64 MiB identity-mapped, page i at BENCH_WIN + i * STRIDE -> frame F_(i mod 64)
# holding i mod 64. Check: every read returns the marker.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "bench.inc"

.ifndef N
.set N, 131072
.endif
.ifndef STRIDE
.set STRIDE, 0x1000
.endif
.set v_root, PROG_VARS + 0x00
.set v_frames, PROG_VARS + 0x100       # 64 dwords

.macro TOUCH si
.if BITS == 64
    mov rsi, BENCH_WIN
    mov rdx, STRIDE
.else
    mov esi, BENCH_WIN
    mov edx, STRIDE
.endif
    xor ecx, ecx
fi_touch_\@:
    mov eax, dword ptr [\si]
    mov ebx, ecx
    and ebx, 63
    cmp eax, ebx
    jne fi_bad
.if BITS == 64
    add rsi, rdx
.else
    add esi, edx
.endif
    inc ecx
    cmp ecx, N
    jb fi_touch_\@
.endm

main:
    PUSHA_
    call pt_init
    MARKED_FRAMES v_frames, 64
    call new_root
    mov dword ptr [v_root], eax
    mov dword ptr [v_root + 4], 0
.if BITS == 64
    mov rdi, rax
    mov rsi, BENCH_WIN
.else
    mov edi, eax
    mov esi, BENCH_WIN
.endif
    xor ebx, ebx
fi_map:
    mov eax, ebx
    and eax, 63
    mov eax, dword ptr [v_frames + eax * 4]
    or eax, PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
.if BITS == 64
    mov rax, STRIDE
    add rsi, rax
.else
    add esi, STRIDE
.endif
    inc ebx
    cmp ebx, N
    jb fi_map
    mov eax, dword ptr [v_root]
    SET_CR3
.if BITS == 64
    TOUCH rsi
.else
    TOUCH esi
.endif
    POPA_
    PASS
    ret
fi_bad:
    FAILV 1, "fault-in: wrong marker (page index in ecx)", eax
