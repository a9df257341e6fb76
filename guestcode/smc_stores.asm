# smc_stores.asm -- code patched through another mapping: a routine runs through mapping A, then
# two stores into its page through the identity map (the loop bound, then the result), then a
# serializing CR3 reload; the next call must run the new code (both stores). Under the shadow MMU
# the second store's invalidation of translated code was once lost (cpu/vcpu.py _fill).
# x86shadow: modes=32,pae,64
.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/main.inc"
.if BITS == 64
.set A, 0x0000008000000000
.else
.set A, 0x40000000
.endif
.set v_root, PROG_VARS
.set v_f, PROG_VARS + 8
.set v_buf, PROG_VARS + 0x100
main:
    MAIN_PROLOGUE
    call pt_init
    call pt_alloc
    mov dword ptr [v_f], eax
    mov edi, eax
    mov esi, routine
    mov ecx, routine_end - routine
    cld
.if BITS == 64
    rep movsb byte ptr [rdi], byte ptr [rsi]
.else
    rep movsb byte ptr es:[edi], byte ptr [esi]
.endif
    NEW_ROOT v_root
.if BITS == 64
    mov rsi, A
.else
    mov esi, A
.endif
    mov eax, dword ptr [v_f]
    or eax, PTE_P
    xor edx, edx
    mov ecx, 1
    call pt_map
    LOAD_CR3 v_root
    mov ebx, 0x11111111
again:
.if BITS == 64
    mov rax, A
    call rax
.else
    mov eax, A
    call eax
.endif
    CHECK_EQ eax, ebx, 1, "routine result"
    cmp ebx, 0x11111115
    je done
    inc ebx
    mov eax, dword ptr [v_f]
    mov dword ptr [eax + routine_cnt - routine], 50    # first store: the loop bound (another TB)
    mov dword ptr [eax + routine_imm - routine], ebx   # second store: the result
    RELOAD_CR3                              # serializing
    jmp again
done:
    PASS
    MAIN_EPILOGUE
routine:
.if BITS == 64
    push rcx
.else
    push ecx
.endif
    xor ecx, ecx
r_loop:
    inc ecx
    cmp ecx, 0x100
routine_cnt_end:
    jb r_loop
.if BITS == 64
    pop rcx
.else
    pop ecx
.endif
    mov eax, 0x11111111
routine_imm_end:
    ret
routine_end:
.set routine_imm, routine_imm_end - 4
.set routine_cnt, routine_cnt_end - 4
