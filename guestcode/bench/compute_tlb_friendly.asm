# bench/compute_tlb_friendly.asm -- compute over a few pages: N passes over a 16 KiB array (4 pages),
# each element loaded, updated, stored, with some register-only arithmetic in between. After the
# first pass every access hits the TLB: the MMU should cost nothing here.
# Check: after N passes buf[i] = i + N * (i + C) (mod 2^32), with buf[i] = i at the start.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"

.ifndef N
.set N, 4000
.endif
.set BUF, FREE_BASE + 0x100000         # identity-mapped by the firmware
.set M, 4096                           # dwords: 4 pages
.set C, 0x9e3779b9

.macro PASSES di, cx
    mov edi, BUF
    xor ecx, ecx
ct_init_\@:
    mov dword ptr [\di + \cx * 4], ecx
    inc ecx
    cmp ecx, M
    jb ct_init_\@
    mov edx, N
    mov ebx, 1
    mov esi, C
ct_pass_\@:
    xor ecx, ecx
ct_elem_\@:
    mov eax, dword ptr [\di + \cx * 4]
    add eax, ecx
    add eax, esi
    mov dword ptr [\di + \cx * 4], eax
    imul ebx, ebx, 0x2545f491
    xor ebx, eax
    rol ebx, 7
    inc ecx
    cmp ecx, M
    jb ct_elem_\@
    dec edx
    jnz ct_pass_\@
    # check: expected(i) = N * C + i * (N + 1)
    mov eax, N
    imul eax, esi
    xor ecx, ecx
ct_check_\@:
    cmp dword ptr [\di + \cx * 4], eax
    jne ct_bad
    add eax, N + 1
    inc ecx
    cmp ecx, M
    jb ct_check_\@
.endm

main:
.if BITS == 64
    push rbx
    PASSES rdi, rcx
    pop rbx
.else
    push ebx
    push esi
    push edi
    PASSES edi, ecx
    pop edi
    pop esi
    pop ebx
.endif
    PASS
    ret
ct_bad:
    FAILV 1, "compute: wrong array element (index follows)", ecx
