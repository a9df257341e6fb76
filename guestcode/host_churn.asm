# host_churn.asm -- a working set whose every dword is checked against its (page, generation) pattern.
# x86shadow: modes=32,pae,64
# For host swap / migration / KSM under guest RAM: 64 data pages, each mapped twice (identity map and
# a CPL3 alias re-pointed every generation), are verified dword by dword and rewritten each
# generation, reading through the other mapping than the last write: a write the host loses, dates
# back or misdirects (or a stale spte after a host event) is seen. 16 pages start identical (8 zero):
# KSM fodder, written later one dword at a time (the COW break must keep the write).

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"
.include "lib/pagecheck.inc"

# N = 64 data frames at DATA, mapped by the identity map (supervisor large pages) and by the alias
# (P|W|U 4 KiB ptes, A and D clear). Pages: i < NU unique: pattern U(i, g) in every generation g.
# Group pages (ZERO: i in [NU, NU + 8), SAME: the next 8): the group pattern, never written, until
# generation tp(i) (ZERO: 2 + (i & 3), SAME: 3 + (i & 3)), which writes one dword (the poke: index
# pk(i), value pv(i)); from tp(i) + 1 on, U(i, g) like the others. Generation 0 fills every page
# through the identity map. Alias page j maps frame (j + rot(g)) mod N, rot(g) = 21 g mod N: each
# generation g = 1..GENS rewrites the 64 alias ptes, then
#   pass(g): for each page i: verify the state of generation g - 1, then write generation g, both
#            through the alias for odd g and the identity map for even g (so every check reads
#            through the other mapping than the last write went through); the alias page of page i
#            is invalidated (invlpg) before the check (odd g) or after the write (even g);
#   user(g): at CPL3 (int 0x80 back), pc_verify of every alias page against generation g.
# Exit codes: 1 kernel check through the identity map, 2 kernel check through the alias, 3 the CPL3
# check, 4 the CPL3 excursion came back wrongly, 5 a model error.

.set N, 64
.set NMASK, N - 1
.set NU, 48                            # unique pages
.set ZERO0, NU                         # first all-zero page
.set SAME0, NU + 8                     # first page of the group with equal contents
.set GENS, 10                          # generations after generation 0
.set ROT, 21
.set DATA, FREE_BASE + 0x80000         # the data frames (16.5 MiB: pt_alloc stays below, in one large page)
.if BITS == 64
.set ALIAS, 0x0000008000000000         # PML4E 1
.else
.set ALIAS, 0x40000000                 # mode 32: PDE 256; PAE: PDPTE 1
.endif
.set UCODE, ALIAS + 0x100000           # the user code pages (the alias's leaf table too)
.set UPARAM, UCODE + 0x10000           # user-readable: the expected pattern of each alias page
.set USTACK, UCODE + 0x11000
.set USTACK_TOP, USTACK + 0x1000
.set SAME_SEED, 0x5a5a1234
.set SAME_STEP, 0x00000101
.set U_MUL, 0x9e3779b1
.set G_MUL, 0x7f4a7c15
.set STEP0, 0x01000193
.set PTE_PWU, PTE_P | PTE_W | PTE_U

# variables
.set v_root, PROG_VARS + 0x00          # quad
.set v_ksp, PROG_VARS + 0x08           # quad: kernel stack pointer during the CPL3 excursion
.set v_apt, PROG_VARS + 0x10           # the alias leaf table
.set v_uparam, PROG_VARS + 0x14        # the frame of UPARAM
.set v_gen, PROG_VARS + 0x18
.set v_rot, PROG_VARS + 0x1c
.set v_ucode_page, PROG_VARS + 0x20    # quad
.set r_status, PROG_VARS + 0x28        # results of the CPL3 check (int 0x80): 0 ok, 1 mismatch
.set r_page, PROG_VARS + 0x2c          # alias page
.set r_off, PROG_VARS + 0x30
.set r_got, PROG_VARS + 0x34
.set r_exp, PROG_VARS + 0x38
.set r_count, PROG_VARS + 0x3c         # int 0x80 calls

# ------------------------------------------------------------------ patterns
# expect: ebx = page, ecx = generation -> eax = seed, edx = step, ecx = poke index (PC_NOPOKE),
# edi = poke value: what page ebx holds after generation ecx
expect:
    cmp ebx, NU
    jb ex_unique
    mov eax, ebx
    and eax, 3
    add eax, 2
    cmp ebx, SAME0
    jb ex_tp
    inc eax
ex_tp:                                 # eax = tp(page)
    cmp ecx, eax
    ja ex_unique
    mov edi, PC_NOPOKE
    jb ex_group
    imul edi, ebx, 37                  # the poke generation: pk = (37 i + 11) mod 1024
    add edi, 11
    and edi, 1023
ex_group:
    mov ecx, edi
    imul edi, ebx, 0x100
    add edi, 0xf00d005a                # pv = 0xf00d005a + 0x100 i (never a group value)
    xor eax, eax
    xor edx, edx
    cmp ebx, SAME0
    jb ex_done
    mov eax, SAME_SEED
    mov edx, SAME_STEP
    jmp ex_done
ex_unique:
    lea eax, [ebx + 1]
    imul eax, eax, U_MUL
    imul edx, ecx, G_MUL
    xor eax, edx                       # seed = (i + 1) * U_MUL ^ g * G_MUL
    mov edx, ebx
    shl edx, 12
    lea edx, [edx + ecx * 8]
    lea edx, [edx + ecx * 8]
    add edx, STEP0                     # step = STEP0 + 4096 i + 16 g (odd)
    mov ecx, PC_NOPOKE
    xor edi, edi
ex_done:
    ret

# action: ebx = page, ecx = generation (>= 1) -> eax = 0: not written, 1: whole page, 2: the poke
action:
    cmp ebx, NU
    jb ac_full
    mov eax, ebx
    and eax, 3
    add eax, 2
    cmp ebx, SAME0
    jb ac_tp
    inc eax
ac_tp:
    cmp ecx, eax
    ja ac_full
    je ac_poke
    xor eax, eax
    ret
ac_poke:
    mov eax, 2
    ret
ac_full:
    mov eax, 1
    ret

# ident_va / alias_va: ebx = page -> esi (rsi) = its address in the identity map / the alias
ident_va:
    PAGE_VA DATA, ebx
    ret

alias_va:
    PUSHR eax, rax
    mov eax, ebx
    sub eax, dword ptr [v_rot]
    and eax, NMASK
    PAGE_VA ALIAS, eax
    POPR eax, rax
    ret

# ------------------------------------------------------------------ the alias
# remap: ecx = generation: rot := ROT * g mod N; alias pte j := frame (j + rot) mod N (P|W|U, A/D
# clear). No flush: pass invalidates each alias page (invlpg) before it is next used.
remap:
    PUSHA_
    imul eax, ecx, ROT
    and eax, NMASK
    mov dword ptr [v_rot], eax
    mov ebx, dword ptr [v_apt]
    xor ecx, ecx
rm_pte:
    mov edx, ecx
    add edx, dword ptr [v_rot]
    and edx, NMASK
    shl edx, 12
    add edx, DATA | PTE_PWU
.if PAGING == 2
    mov dword ptr [ebx + ecx * 4], edx
.else
    mov dword ptr [ebx + ecx * 8 + 4], 0
    mov dword ptr [ebx + ecx * 8], edx
.endif
    inc ecx
    cmp ecx, N
    jb rm_pte
    POPA_
    ret

# ------------------------------------------------------------------ one generation
# pass: ecx = generation g >= 1: every page verified against g - 1 and written with g, through the
# alias (odd g: invlpg of its alias page first) or the identity map (even g: invlpg of its alias page
# after the write), so the exits are spread over the pass
pass:
    PUSHA_
    mov dword ptr [v_gen], ecx
    xor ebx, ebx
ps_page:
    mov ecx, dword ptr [v_gen]
    test ecx, 1
    jz ps_ident
    call alias_va
    INVLPG_SI
    jmp ps_va
ps_ident:
    call ident_va
ps_va:
    dec ecx
    call expect
    call pc_verify
    cmp ecx, PC_NOPOKE
    je ps_ok
    mov edi, dword ptr [v_gen]
    test edi, 1
    jnz ps_fail_alias
    dec edi                            # report the generation whose state was checked
    PC_FAIL host_churn, 1, "generation g-1 read through the identity map"
ps_fail_alias:
    dec edi
    PC_FAIL host_churn, 2, "generation g-1 read through the user alias at CPL0"
ps_ok:
    mov ecx, dword ptr [v_gen]
    call action
    test eax, eax
    jz ps_next
    call expect
    cmp ecx, PC_NOPOKE
    jne ps_poke
    call pc_fill
    jmp ps_next
ps_poke:
.if BITS == 64
    mov dword ptr [rsi + rcx * 4], edi
.else
    mov dword ptr [esi + ecx * 4], edi
.endif
ps_next:
    test dword ptr [v_gen], 1
    jnz ps_flushed
    call alias_va
    INVLPG_SI
ps_flushed:
    inc ebx
    cmp ebx, N
    jb ps_page
    POPA_
    ret

# user_check: ecx = generation: the CPL3 code verifies every alias page against it
user_check:
    PUSHA_
.if BITS == 64
    push r12
    push r13
    push r14
    push r15
.endif
    mov dword ptr [v_gen], ecx
    # UPARAM[j] = (seed, step, pk, pv) of the frame alias page j maps
    mov ebp, dword ptr [v_uparam]
    xor ebx, ebx
uc_param:
    PUSHR ebx, rbx
    add ebx, dword ptr [v_rot]
    and ebx, NMASK
    mov ecx, dword ptr [v_gen]
    call expect
    POPR ebx, rbx
    mov dword ptr [ebp], eax
    mov dword ptr [ebp + 4], edx
    mov dword ptr [ebp + 8], ecx
    mov dword ptr [ebp + 12], edi
    add ebp, 16
    inc ebx
    cmp ebx, N
    jb uc_param
    mov dword ptr [r_status], 0xff
    mov eax, user_entry
    sub eax, dword ptr [v_ucode_page]
.if BITS == 64
    mov rbx, UCODE
    add rbx, rax
    mov rax, v_ksp
    mov qword ptr [rax], rsp
.else
    lea ebx, [eax + UCODE]
    mov dword ptr [v_ksp], esp
.endif
    IRET_TO_CPL3
uc_back:                               # from int80_handler, on the stack saved above
.if BITS == 64
    mov ax, SEL_KDATA
    mov ss, ax
.else
    LOAD_DATA_SEGS SEL_KDATA
.endif
    mov eax, dword ptr [r_count]
    mov edx, dword ptr [v_gen]
    inc edx
    cmp eax, edx
    je uc_count_ok
    mov ebx, 0
    mov edi, dword ptr [v_gen]
    xor ecx, ecx
    PC_FAIL host_churn, 4, "int 0x80 count (got) differs from the CPL3 excursions made (expected)"
uc_count_ok:
    mov eax, dword ptr [r_status]
    test eax, eax
    jz uc_ok
    cmp eax, 1
    je uc_mismatch
    mov edx, 0
    mov ebx, 0
    mov edi, dword ptr [v_gen]
    xor ecx, ecx
    PC_FAIL host_churn, 4, "the CPL3 check returned a bad status (got)"
uc_mismatch:
    mov ebx, dword ptr [r_page]
    add ebx, dword ptr [v_rot]
    and ebx, NMASK                     # the frame (page index) alias page r_page maps
    mov edi, dword ptr [v_gen]
    mov ecx, dword ptr [r_off]
    mov eax, dword ptr [r_got]
    mov edx, dword ptr [r_exp]
    PC_FAIL host_churn, 3, "read through the user alias at CPL3"
uc_ok:
.if BITS == 64
    pop r15
    pop r14
    pop r13
    pop r12
.endif
    POPA_
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    mov dword ptr [r_count], 0
    mov dword ptr [v_rot], 0
    mov eax, user_code_start
    and eax, 0xfffff000
    mov dword ptr [v_ucode_page], eax
    mov dword ptr [v_ucode_page + 4], 0
    call idt_init
    SET_GATE 0x80, int80_handler, GATE_INT3

    # ---- the address space: identity (supervisor, large pages), alias, user pages
    NEW_ROOT v_root
    xor ebx, ebx
mk_alias:
    call alias_va
    mov eax, ebx
    shl eax, 12
    add eax, DATA | PTE_PWU
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc ebx
    cmp ebx, N
    jb mk_alias
    xor ebx, ebx
    call alias_va
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    mov dword ptr [v_apt], eax         # the alias pte of page 0: the leaf table's first entry
.if BITS == 64
    mov rsi, UCODE
.else
    mov esi, UCODE
.endif
    mov ecx, user_code_end
    sub ecx, dword ptr [v_ucode_page]
    add ecx, 0xfff
    shr ecx, 12
    mov eax, dword ptr [v_ucode_page]
    or eax, PTE_P | PTE_U
    xor edx, edx
    call pt_map_range
    call pt_alloc
    mov dword ptr [v_uparam], eax
    or eax, PTE_P | PTE_U
.if BITS == 64
    mov rsi, UPARAM
.else
    mov esi, UPARAM
.endif
    mov ecx, 1
    call pt_map
    call pt_alloc
    or eax, PTE_PWU
.if BITS == 64
    mov rsi, USTACK
.else
    mov esi, USTACK
.endif
    mov ecx, 1
    call pt_map
    LOAD_CR3 v_root

    # ---- generation 0: every page through the identity map, checked at CPL3
    xor ebx, ebx
g0_fill:
    call ident_va
    xor ecx, ecx
    call expect
    cmp ecx, PC_NOPOKE
    jne g0_bad
    call pc_fill
    inc ebx
    cmp ebx, N
    jb g0_fill
    xor ecx, ecx
    call user_check

    # ---- generations 1..GENS
    mov ecx, 1
gen_loop:
    call remap
    call pass
    call user_check
    inc ecx
    cmp ecx, GENS
    jbe gen_loop

    PASS
    MAIN_EPILOGUE
g0_bad:
    FAIL 5, "generation 0 has a poke"

# ------------------------------------------------------------------ int 0x80: back from CPL3
# eax = status (0 ok, 1 mismatch), ebx = alias page, ecx = byte offset, edx = expected, edi = got
int80_handler:
    mov dword ptr [r_status], eax
    mov dword ptr [r_page], ebx
    mov dword ptr [r_off], ecx
    mov dword ptr [r_exp], edx
    mov dword ptr [r_got], edi
    inc dword ptr [r_count]
.if BITS == 64
    mov rax, v_ksp
    mov rsp, qword ptr [rax]
.else
    mov esp, dword ptr [v_ksp]
.endif
    jmp uc_back

# ------------------------------------------------------------------ user code (CPL3)
# Runs at UCODE + (label - page of user_code_start): position independent, no absolute code refs.
.align 4096
user_code_start:
user_entry:
    xor ebx, ebx
u_page:
.if BITS == 64
    mov rbp, UPARAM
    mov eax, ebx
    shl eax, 4
    add rbp, rax
    mov rsi, ALIAS
    mov eax, ebx
    shl eax, 12
    add rsi, rax
    mov eax, dword ptr [rbp]
    mov edx, dword ptr [rbp + 4]
    mov ecx, dword ptr [rbp + 8]
    mov edi, dword ptr [rbp + 12]
.else
    mov ebp, ebx
    shl ebp, 4
    add ebp, UPARAM
    mov esi, ebx
    shl esi, 12
    add esi, ALIAS
    mov eax, dword ptr [ebp]
    mov edx, dword ptr [ebp + 4]
    mov ecx, dword ptr [ebp + 8]
    mov edi, dword ptr [ebp + 12]
.endif
    call pc_verify
    cmp ecx, PC_NOPOKE
    jne u_bad
    inc ebx
    cmp ebx, N
    jb u_page
    xor eax, eax
    int 0x80
u_spin:
    jmp u_spin
u_bad:
    mov edi, eax
    mov eax, 1
    int 0x80
    jmp u_spin

    PC_ROUTINES                        # pc_fill, pc_verify (lib/pagecheck.inc)
user_code_end:
