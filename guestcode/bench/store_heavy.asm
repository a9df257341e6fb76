# bench/store_heavy.asm -- a store loop over many pages: N passes, each writing every dword of a
# 512 KiB buffer (128 pages, which all fit in the CPU's TLB) with eight stores per loop iteration.
# Check: every dword holds the last pass number.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"

.ifndef N
.set N, 150
.endif
.set BUF, FREE_BASE + 0x100000         # identity-mapped by the firmware
.set PAGES, 128
.set BYTES, PAGES * 4096

.macro STORES di
    mov edx, 1
sh_pass_\@:
    mov edi, BUF
    mov eax, edx
sh_loop_\@:
    mov dword ptr [\di], eax
    mov dword ptr [\di + 4], eax
    mov dword ptr [\di + 8], eax
    mov dword ptr [\di + 12], eax
    mov dword ptr [\di + 16], eax
    mov dword ptr [\di + 20], eax
    mov dword ptr [\di + 24], eax
    mov dword ptr [\di + 28], eax
    add edi, 32
    cmp edi, BUF + BYTES
    jb sh_loop_\@
    inc edx
    cmp edx, N
    jbe sh_pass_\@
    # check
    mov edi, BUF
sh_check_\@:
    cmp dword ptr [\di], N
    jne sh_bad
    add edi, 4
    cmp edi, BUF + BYTES
    jb sh_check_\@
.endm

main:
.if BITS == 64
    STORES rdi
.else
    push edi
    STORES edi
    pop edi
.endif
    PASS
    ret
sh_bad:
    FAILV 1, "store-heavy: wrong value at (address follows)", edi
