# bench/host_pages.asm -- a working set for the host-memory part of the bench (x86shadow bench
# --host): PAGES pages at BENCH_WIN, page i mapped to frame WS_BASE + i * 4 KiB. The guest reaches
# those frames through no other mapping (they lie in the identity-mapped low 64 MiB, but nothing
# touches them there), so each has one spte; with ALIAS=1 the same frames are mapped a second time
# at BENCH_WIN + ALIAS_OFF and every pass reads both, so each has two sptes.
# The first pass writes tag i into page i (one shadow page fault per page); then N passes read every
# page (and its alias) and check the tag, with IO=1 an `out` to port 0x80 (the POST port, which
# nothing decodes) after each page: an I/O exit, the clock of the host schedule's OP:N rules. The
# host may swap out or migrate any page between two accesses: the check finds contents that did
# not come back.
# Check: every read returns its page's tag.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "bench.inc"

.ifndef N
.set N, 16
.endif
.ifndef PAGES
.set PAGES, 1024
.endif
.ifndef ALIAS
.set ALIAS, 0
.endif
.ifndef IO
.set IO, 1
.endif
.ifndef WS_BASE
.set WS_BASE, 0x2800000                # 40 MiB: up to 6144 pages below the identity map's end
.endif
# the alias: 16 MiB higher and PAGES pages on, so the two mappings of a page take different slots
# of the CPU's (direct-mapped) TLB instead of evicting each other
.set ALIAS_OFF, 0x1000000 + PAGES * PAGE
.set TAG, 0x5a000000
.set v_root, PROG_VARS + 0x00

# one pass over the working set through the register si: check every tag (and the alias's)
.macro CHECK_PASS si
.if BITS == 64
    mov rsi, BENCH_WIN
.else
    mov esi, BENCH_WIN
.endif
    xor ecx, ecx
hp_page_\@:
    lea edx, [ecx + TAG]
    cmp dword ptr [\si], edx
    jne hp_bad
.if ALIAS == 1
    cmp dword ptr [\si + ALIAS_OFF], edx
    jne hp_bad
.endif
.if IO == 1
    out 0x80, al
.endif
.if BITS == 64
    add rsi, PAGE
.else
    add esi, PAGE
.endif
    inc ecx
    cmp ecx, PAGES
    jb hp_page_\@
.endm

.macro TAG_PASS si
.if BITS == 64
    mov rsi, BENCH_WIN
.else
    mov esi, BENCH_WIN
.endif
    xor ecx, ecx
hp_tag_\@:
    lea edx, [ecx + TAG]
    mov dword ptr [\si], edx
.if BITS == 64
    add rsi, PAGE
.else
    add esi, PAGE
.endif
    inc ecx
    cmp ecx, PAGES
    jb hp_tag_\@
.endm

main:
    PUSHA_
    call pt_init
    call new_root
    mov dword ptr [v_root], eax
.if BITS == 64
    mov rdi, rax
    mov rsi, BENCH_WIN
.else
    mov edi, eax
    mov esi, BENCH_WIN
.endif
    mov eax, WS_BASE | PTE_P | PTE_W
    xor edx, edx
    mov ecx, PAGES
    call pt_map_range
.if ALIAS == 1
.if BITS == 64
    mov rsi, BENCH_WIN + ALIAS_OFF
.else
    mov esi, BENCH_WIN + ALIAS_OFF
.endif
    mov eax, WS_BASE | PTE_P | PTE_W
    xor edx, edx
    mov ecx, PAGES
    call pt_map_range
.endif
    mov eax, dword ptr [v_root]
    SET_CR3
.if BITS == 64
    TAG_PASS rsi
.else
    TAG_PASS esi
.endif
    xor ebx, ebx
hp_pass:
    cmp ebx, N
    jae hp_done
.if BITS == 64
    CHECK_PASS rsi
.else
    CHECK_PASS esi
.endif
    inc ebx
    jmp hp_pass
hp_done:
    POPA_
    PASS
    ret
hp_bad:
    FAILV 1, "host-pages: wrong tag (page index in ecx; the expected tag follows)", edx
