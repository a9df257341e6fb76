# bench/cr3_switch.asm -- switching between processes: 8 address spaces (own roots sharing the
# identity map of the low 64 MiB, each with a private data page at BENCH_WIN); N rounds, each
# visiting every process: load its CR3, read its page, bump a counter in it. After the first round
# every root is cached in the shadow MMU (a CR3 load finds its shadow pages): each switch costs the
# exit, the root reload and the TLB refills (code, data, the private page). With SWITCH=0 the loop
# is the same without the CR3 loads (process 0's page throughout): the difference per CR3 load is
# the cost of a switch to a cached root, refills included.
# Check: every read returns the process's marker; each counter ends at N (SWITCH=0: page 0 at 8 N).
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "bench.inc"

.ifndef N
.set N, 3000
.endif
.ifndef SWITCH
.set SWITCH, 1
.endif
.set K, 8
.set v_roots, PROG_VARS + 0x00         # K quads
.set v_pages, PROG_VARS + 0x80         # K dwords: the private frames
.set MARK, 0x7c300000                  # + process number

.macro ROUNDS si, ax
    mov esi, BENCH_WIN
    mov ebp, N
cs_round_\@:
    xor ecx, ecx
cs_proc_\@:
.if SWITCH
.if BITS == 64
    mov rax, v_roots
    mov rax, qword ptr [rax + rcx * 8]
.else
    mov eax, dword ptr [v_roots + ecx * 8]
.endif
    SET_CR3
    lea edx, [ecx + MARK]
.else
    mov edx, MARK
.endif
    cmp dword ptr [\si], edx
    jne cs_bad
    inc dword ptr [\si + 4]
    inc ecx
    cmp ecx, K
    jb cs_proc_\@
    dec ebp
    jnz cs_round_\@
.endm

main:
    PUSHA_
    call pt_init
    xor ebx, ebx
cs_mk:
    call pt_alloc
    lea edx, [ebx + MARK]
    mov dword ptr [eax], edx
    mov dword ptr [eax + 4], 0
    mov dword ptr [v_pages + ebx * 4], eax
    or eax, PTE_P | PTE_W
    mov edx, eax
    call new_root
    mov dword ptr [v_roots + ebx * 8], eax
    mov dword ptr [v_roots + ebx * 8 + 4], 0
.if BITS == 64
    mov rdi, rax
.else
    mov edi, eax
.endif
    mov esi, BENCH_WIN
    mov eax, edx
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc ebx
    cmp ebx, K
    jb cs_mk
    mov eax, dword ptr [v_roots]
    SET_CR3
.if BITS == 64
    ROUNDS rsi, rax
.else
    ROUNDS esi, eax
.endif
    # check the counters (through the identity map)
    xor ebx, ebx
cs_check:
    mov eax, dword ptr [v_pages + ebx * 4]
    mov eax, dword ptr [eax + 4]
.if SWITCH
    CHECK_EQ eax, N, 2, "cr3-switch: a process counter is wrong"
.else
    test ebx, ebx
    jnz cs_check_rest
    CHECK_EQ eax, N * K, 3, "cr3-switch (no switch): counter of process 0 is wrong"
    jmp cs_check_next
cs_check_rest:
    CHECK_EQ eax, 0, 4, "cr3-switch (no switch): another process's counter moved"
cs_check_next:
.endif
    inc ebx
    cmp ebx, K
    jb cs_check
    POPA_
    PASS
    ret
cs_bad:
    FAILV 1, "cr3-switch: wrong marker in a process's private page (process in ecx)", ecx
