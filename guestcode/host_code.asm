# host_code.asm -- routines copied into code pages of their own, called through two address spaces.
# x86shadow: modes=32,pae,64
# For host swap / migration / KSM under guest RAM that must also hit code pages and guest page-table
# pages: K routines are copied (and patched) into fresh frames every round and reached through code
# windows that the program's two address spaces map differently (CR3 switches, ptes aged and
# rewritten); every call's id, sum and output dwords are checked, so a stale code page, a lost pte
# write or a lost data write shows up as a wrong routine or a wrong result.

.include "lib/console.inc"
.include "lib/paging.inc"
.include "lib/idt.inc"
.include "lib/main.inc"
.include "lib/pagecheck.inc"

# Routine slot s (0..K-1) of round r lives in a frame of its own, never used before, at offset
# off(s, r), the rest of the frame int3 (0xcc): a copy of `tmpl` whose three imm32 are patched before
# it first runs:
#     out[k] = (in[k] * MUL(s, r) + ADD(s, r)) ^ k  for k < 1024; returns eax = ID(s, r), edx = sum.
# (Fresh frames, not code patched in place: x86 allows patching through another linear address
# followed by a serializing instruction, but x86shadow's shadow MMU misses all but the first such
# store into a page that ran code through another mapping, so the program would fail today.)
# Address space a (two roots, the identity map shared, windows of 4 KiB ptes of their own):
#     CWIN page j -> the code frame of slot perm_a(j) (read-only); perm_0(j) = j, perm_1(j) = j + r
#     (mod K, rewritten every round); IWIN page j -> input frame j (read-only); OWIN page j -> output
#     frame out[a][j].
# Round r = 1..ROUNDS, in address space 0:
#   1 each input frame is checked against round r - 1's pattern, then gets round r's (through the
#     identity map);
#   2 every slot gets a fresh frame (int3 fill, copy, patch for round r, through the identity map);
#   3 the code ptes of address space 0 (invlpg of each page) and of address space 1 (perm_1) are
#     rewritten; the frames of round r - 1 are filled with int3;
#   4 for each page j, for each address space a: A (and D for the output) cleared in its three ptes
#     (a reclaim scan), CR3 := root a, check that output frame out[a][j] still holds round r - 1's
#     results, call CWIN page j on IWIN / OWIN page j, check the id, the sum and every output dword
#     (through the identity map);
#   5 CR3 := root 0, every output frame checked again.
# Exit codes: 1 wrong routine id, 2 wrong sum, 3 output dword after the call, 4 output dword at the end
# of the round or before the next call, 5 int3 executed (a stale or misdirected code page), 6 the
# template's encoding, 7 an input frame.

.set K, 8
.set KMASK, K - 1
.set ROUNDS, 12
.if BITS == 64
.set CWIN, 0x0000008000000000          # PML4E 1
.else
.set CWIN, 0x40000000                  # mode 32: PDE 256; PAE: PDPTE 1
.endif
.set IWIN, CWIN + 0x10000             # the three windows share one leaf table
.set OWIN, CWIN + 0x20000
.set TMUL0, 0x11111111                 # the template's immediates before patching
.set TADD0, 0x22222222
.set TID0, 0x33333333
.set INT3X4, 0xcccccccc
.set NOT_A, 0xffffffdf
.set NOT_AD, 0xffffff9f

# variables
.set v_roots, PROG_VARS + 0x000        # 2 quads
.set v_cur_as, PROG_VARS + 0x010       # the address space loaded
.set v_round, PROG_VARS + 0x014
.set v_seed, PROG_VARS + 0x018         # the pattern of the input being checked
.set v_step, PROG_VARS + 0x01c
.set v_mul, PROG_VARS + 0x020          # the immediates of the slot being checked
.set v_add, PROG_VARS + 0x024
.set v_j, PROG_VARS + 0x028
.set v_slot, PROG_VARS + 0x02c
.set v_sum, PROG_VARS + 0x030          # the sum the routine returned
.set v_entry, PROG_VARS + 0x038        # quad: the address called
.set v_cpte, PROG_VARS + 0x040         # 2 dwords: address space a's CWIN pte 0
.set v_ipte, PROG_VARS + 0x048         # 2 dwords: IWIN pte 0
.set v_opte, PROG_VARS + 0x050         # 2 dwords: OWIN pte 0
.set cur_frame, PROG_VARS + 0x100      # K dwords: the code frame of each slot
.set cur_off, PROG_VARS + 0x140        # K dwords: the routine's offset there
.set old_frame, PROG_VARS + 0x180      # K dwords: the frames of the round before
.set in_f, PROG_VARS + 0x1c0           # K dwords: input frames
.set out_f, PROG_VARS + 0x200          # [a * K + j] dwords: output frames

# ------------------------------------------------------------------ the template (copied, never called here)
# esi (rsi) = input page, edi (rdi) = output page -> eax = id, edx = sum of the outputs; ecx kept
tmpl:
.if BITS == 64
    push rcx
    xor ecx, ecx
    xor edx, edx
tmpl_loop:
    mov eax, dword ptr [rsi + rcx * 4]
    imul eax, eax, TMUL0
tmpl_mul:
    add eax, TADD0
tmpl_add:
    xor eax, ecx
    mov dword ptr [rdi + rcx * 4], eax
    add edx, eax
    inc ecx
    cmp ecx, 1024
    jb tmpl_loop
    pop rcx
.else
    push ecx
    xor ecx, ecx
    xor edx, edx
tmpl_loop:
    mov eax, dword ptr [esi + ecx * 4]
    imul eax, eax, TMUL0
tmpl_mul:
    add eax, TADD0
tmpl_add:
    xor eax, ecx
    mov dword ptr [edi + ecx * 4], eax
    add edx, eax
    inc ecx
    cmp ecx, 1024
    jb tmpl_loop
    pop ecx
.endif
    mov eax, TID0
tmpl_id:
    ret
tmpl_end:
.set T_MUL, tmpl_mul - tmpl - 4        # offsets of the imm32s in a copy
.set T_ADD, tmpl_add - tmpl - 4
.set T_ID, tmpl_id - tmpl - 4
.set T_SIZE, tmpl_end - tmpl

# ------------------------------------------------------------------ the model
# imms: ebp = slot, ecx = round -> eax = MUL, edx = ADD, edi = ID
imms:
    mov eax, ebp
    shl eax, 5
    sub eax, ebp                       # 31 s
    add eax, ecx
    lea eax, [eax + eax + 0x01000001]  # MUL = 0x01000001 + 2 (31 s + r): odd
    lea edx, [ebp + 1]
    imul edx, edx, 0x5bd1e995
    mov edi, ecx
    imul edi, edi, 0x10001
    add edx, edi                       # ADD = 0x5bd1e995 (s + 1) + 0x10001 r
    mov edi, ebp
    shl edi, 8
    add edi, ecx
    add edi, 0xc0de0000                # ID = 0xc0de0000 + 0x100 s + r
    ret

# in_pattern: ebx = input page, ecx = round -> eax = seed, edx = step
in_pattern:
    lea eax, [ebx + 1]
    imul eax, eax, 0x9e3779b1
    imul edx, ecx, 0x7f4a7c15
    xor eax, edx
    mov edx, ebx
    shl edx, 12
    PUSHR ecx, rcx
    shl ecx, 4
    add edx, ecx
    POPR ecx, rcx
    add edx, 0x01000193
    ret

# slot_of: eax = address space, ebx = window page, ecx = round -> ebp = slot
slot_of:
    mov ebp, ebx
    test eax, eax
    jz so_done
    add ebp, ecx
    and ebp, KMASK
so_done:
    ret

# code_off: ebp = slot, ecx = round -> eax = the routine's offset in its frame (<= 0xef0)
code_off:
    imul eax, ecx, 0x7c0
    PUSHR edx, rdx
    imul edx, ebp, 0x1d0
    add eax, edx
    POPR edx, rdx
    and eax, 0xef0
    ret

# live_frame: ebp = slot -> eax = its code frame, edx = the routine's offset there
live_frame:
    mov eax, dword ptr [cur_frame + ebp * 4]
    mov edx, dword ptr [cur_off + ebp * 4]
    ret

# int3_fill: edi = frame: every byte 0xcc. Preserves the registers.
int3_fill:
    PUSHA_
    mov eax, INT3X4
    mov ecx, 1024
    cld
    rep stosd
    POPA_
    ret

# new_copy: ebp = slot, ecx = round: a fresh frame (int3), tmpl copied to off(s, r) and patched for
# round r; it becomes the slot's frame (the one before: old_frame)
new_copy:
    PUSHA_
    call pt_alloc
    mov edi, eax
    call int3_fill
    mov edx, dword ptr [cur_frame + ebp * 4]
    mov dword ptr [old_frame + ebp * 4], edx
    mov dword ptr [cur_frame + ebp * 4], eax
    mov ebx, eax
    call code_off
    mov dword ptr [cur_off + ebp * 4], eax
    add ebx, eax                       # the copy
    mov edi, ebx
    mov esi, tmpl
    PUSHR ecx, rcx
    mov ecx, T_SIZE
    cld
.if BITS == 64
    rep movsb byte ptr [rdi], byte ptr [rsi]
.else
    rep movsb byte ptr es:[edi], byte ptr [esi]
.endif
    POPR ecx, rcx
    call imms
    mov dword ptr [ebx + T_MUL], eax
    mov dword ptr [ebx + T_ADD], edx
    mov dword ptr [ebx + T_ID], edi
    POPA_
    ret

# set_pte: ebx = pte address, eax = value (high half 0), as the paging mode stores a pte
set_pte:
.if PAGING == 2
    mov dword ptr [ebx], eax
.else
    mov dword ptr [ebx + 4], 0
    mov dword ptr [ebx], eax
.endif
    ret

# map_code: edx = address space, ecx = round: its CWIN ptes := the live frames of perm_a (P)
map_code:
    PUSHA_
    xor ebx, ebx
mc_page:
    mov eax, edx
    call slot_of
    PUSHR ebx, rbx
    PUSHR edx, rdx
    call live_frame
    POPR edx, rdx
    or eax, PTE_P
    PUSHR edx, rdx
    mov edx, dword ptr [v_cpte + edx * 4]
    PTE_LEA ebx, edx, ebx
    POPR edx, rdx
    call set_pte
    POPR ebx, rbx
    inc ebx
    cmp ebx, K
    jb mc_page
    POPA_
    ret

# new_code: ecx = round: every slot gets its fresh copy, both address spaces' code ptes follow
# (address space 0 is loaded: invlpg of each page), the frames of the round before get int3
new_code:
    PUSHA_
    xor ebp, ebp
nc_slot:
    call new_copy
    inc ebp
    cmp ebp, K
    jb nc_slot
    xor edx, edx
    call map_code
    xor ebp, ebp
nc_flush:
    PAGE_VA CWIN, ebp
    INVLPG_SI
    inc ebp
    cmp ebp, K
    jb nc_flush
    mov edx, 1
    call map_code
    xor ebp, ebp
nc_old:
    mov edi, dword ptr [old_frame + ebp * 4]
    call int3_fill
    inc ebp
    cmp ebp, K
    jb nc_old
    POPA_
    ret

# age: eax = address space, ebx = window page: A cleared in its CWIN and IWIN ptes, A and D in its
# OWIN pte (the CR3 load that follows flushes them)
age:
    PUSHA_
    mov edx, dword ptr [v_cpte + eax * 4]
    PTE_LEA edx, edx, ebx
    lock and dword ptr [edx], NOT_A
    mov edx, dword ptr [v_ipte + eax * 4]
    PTE_LEA edx, edx, ebx
    lock and dword ptr [edx], NOT_A
    mov edx, dword ptr [v_opte + eax * 4]
    PTE_LEA edx, edx, ebx
    lock and dword ptr [edx], NOT_AD
    POPA_
    ret

# check_out: eax = address space, ebx = window page, ecx = round -> ecx = byte offset of the first
# wrong dword of the output frame out[a][j] (or PC_NOPOKE), eax = got, edx = expected, edi = the sum
# expected; [v_slot] = the slot. Preserves ebx, ebp.
check_out:
    PUSHR ebx, rbx
    PUSHR ebp, rbp
    PUSHR esi, rsi
    PUSHR eax, rax
    call slot_of
    mov dword ptr [v_slot], ebp
    call imms
    mov dword ptr [v_mul], eax
    mov dword ptr [v_add], edx
    call in_pattern
    mov dword ptr [v_seed], eax
    mov dword ptr [v_step], edx
    POPR eax, rax
    shl eax, 3                         # a * K
    add eax, ebx
    mov esi, dword ptr [out_f + eax * 4]
    mov ebx, dword ptr [v_seed]        # in[k]
    xor ecx, ecx
    xor edi, edi
co_loop:
    mov eax, ebx
    imul eax, dword ptr [v_mul]
    add eax, dword ptr [v_add]
    xor eax, ecx
    add edi, eax
    mov edx, eax
.if BITS == 64
    mov eax, dword ptr [rsi + rcx * 4]
.else
    mov eax, dword ptr [esi + ecx * 4]
.endif
    cmp eax, edx
    jne co_bad
    add ebx, dword ptr [v_step]
    inc ecx
    cmp ecx, 1024
    jb co_loop
    mov ecx, PC_NOPOKE
    jmp co_out
co_bad:
    shl ecx, 2
co_out:
    POPR esi, rsi
    POPR ebp, rbp
    POPR ebx, rbx
    ret

# where: print "host_code: address space <a> window page <j> slot <s> entry <addr>\n"
where:
    PUSHR eax, rax
    PRINT "host_code: address space "
    mov eax, dword ptr [v_cur_as]
    call putdec
    PRINT_DEC " window page ", ebx
    PRINT " slot "
    mov eax, dword ptr [v_slot]
    call putdec
    PRINT " entry "
.if BITS == 64
    mov rax, v_entry
    mov rax, qword ptr [rax]
    call puthex
.else
    mov eax, dword ptr [v_entry]
    call pc_puthex32
.endif
    PRINT "\n"
    POPR eax, rax
    ret

# run_one: eax = address space, ebx = window page, ecx = round: age, CR3 := root a, call, check
run_one:
    PUSHA_
    mov dword ptr [v_cur_as], eax
    mov dword ptr [v_j], ebx
    call age
    PUSHR ecx, rcx
    mov ecx, eax
    SWITCH_CR3 v_roots, v_cur_as
    POPR ecx, rcx
    cmp ecx, 2
    jb ro_fresh
    # the output frame must still hold the round before (it is about to be overwritten)
    PUSHR eax, rax
    PUSHR ecx, rcx
    dec ecx
    call check_out
    cmp ecx, PC_NOPOKE
    je ro_prev_ok
    call where
    mov edi, dword ptr [v_round]
    dec edi
    PC_FAIL host_code, 4, "output of the round before: checked just before the call overwrites it"
ro_prev_ok:
    POPR ecx, rcx
    POPR eax, rax
ro_fresh:
    call slot_of
    mov dword ptr [v_slot], ebp
    mov eax, dword ptr [cur_off + ebp * 4]
.if BITS == 64
    mov rdi, CWIN
    add rax, rdi
    mov edx, ebx
    shl edx, 12
    add rax, rdx
    mov rdi, v_entry
    mov qword ptr [rdi], rax
    mov rsi, IWIN
    add rsi, rdx
    mov rdi, OWIN
    add rdi, rdx
    call rax
.else
    add eax, CWIN
    mov edx, ebx
    shl edx, 12
    add eax, edx
    mov dword ptr [v_entry], eax
    lea esi, [edx + IWIN]
    lea edi, [edx + OWIN]
    call eax
.endif
    mov dword ptr [v_sum], edx
    mov ebp, dword ptr [v_slot]
    mov ecx, dword ptr [v_round]
    PUSHR eax, rax
    call imms                          # edi = the id expected
    POPR eax, rax
    cmp eax, edi
    je ro_id_ok
    call where
    mov edx, edi
    mov edi, ecx
    xor ecx, ecx
    PC_FAIL host_code, 1, "wrong routine id returned"
ro_id_ok:
    mov eax, dword ptr [v_cur_as]
    call check_out
    cmp ecx, PC_NOPOKE
    je ro_out_ok
    call where
    mov edi, dword ptr [v_round]
    PC_FAIL host_code, 3, "output dword right after the call"
ro_out_ok:
    mov eax, dword ptr [v_sum]
    cmp eax, edi
    je ro_sum_ok
    call where
    mov edx, edi
    mov edi, dword ptr [v_round]
    xor ecx, ecx
    PC_FAIL host_code, 2, "sum of the outputs returned"
ro_sum_ok:
    POPA_
    ret

# ------------------------------------------------------------------ main
main:
    MAIN_PROLOGUE
    call pt_init
    call idt_init
    SET_GATE 3, bp_handler
    mov dword ptr [v_round], 0
    mov dword ptr [v_slot], 0
    mov dword ptr [v_entry], 0
    mov dword ptr [v_entry + 4], 0
    # the template is encoded as the patching expects
    mov eax, dword ptr [tmpl + T_MUL]
    mov edx, TMUL0
    cmp eax, edx
    jne bad_tmpl
    mov eax, dword ptr [tmpl + T_ADD]
    mov edx, TADD0
    cmp eax, edx
    jne bad_tmpl
    mov eax, dword ptr [tmpl + T_ID]
    mov edx, TID0
    cmp eax, edx
    jne bad_tmpl
    mov eax, T_SIZE
    mov edx, 0x100                     # code_off's offsets leave 0x100 bytes
    cmp eax, edx
    ja bad_tmpl

    # ---- frames: inputs, outputs (2 per window page), the code of round 0
    xor ebx, ebx
mk_io:
    call pt_alloc
    mov dword ptr [in_f + ebx * 4], eax
    call pt_alloc
    mov dword ptr [out_f + ebx * 4], eax
    call pt_alloc
    mov dword ptr [out_f + K * 4 + ebx * 4], eax
    inc ebx
    cmp ebx, K
    jb mk_io
    xor ebp, ebp
    xor ecx, ecx
mk_code:
    call new_copy
    inc ebp
    cmp ebp, K
    jb mk_code

    # ---- two address spaces: the identity map shared, windows of their own
    NEW_ROOT v_roots, 0
    SHARED_ROOT v_roots, 1
    xor edx, edx                       # address space
mk_as:
    mov edi, dword ptr [v_roots + edx * 8]
    xor ebx, ebx
mk_win:
    PUSHR edx, rdx
    mov eax, dword ptr [in_f + ebx * 4]
    or eax, PTE_P
    PAGE_VA IWIN, ebx
    xor edx, edx
    mov ecx, 1
    call pt_map
    POPR edx, rdx
    PUSHR edx, rdx
    shl edx, 3
    add edx, ebx
    mov eax, dword ptr [out_f + edx * 4]
    or eax, PTE_P | PTE_W
    PAGE_VA OWIN, ebx
    xor edx, edx
    mov ecx, 1
    call pt_map
    mov eax, PTE_P                     # CWIN: a placeholder frame 0 pte (map_code fills it in)
    PAGE_VA CWIN, ebx
    mov ecx, 1
    call pt_map
    POPR edx, rdx
    inc ebx
    cmp ebx, K
    jb mk_win
    # the leaf tables' first ptes
    PUSHR edx, rdx
    mov ecx, edx
    xor ebx, ebx
    PAGE_VA CWIN, ebx
    mov edx, 1
    PUSHR ecx, rcx
    xor ecx, ecx
    call pt_entry
    POPR ecx, rcx
    mov dword ptr [v_cpte + ecx * 4], eax
    PAGE_VA IWIN, ebx
    PUSHR ecx, rcx
    xor ecx, ecx
    call pt_entry
    POPR ecx, rcx
    mov dword ptr [v_ipte + ecx * 4], eax
    PAGE_VA OWIN, ebx
    PUSHR ecx, rcx
    xor ecx, ecx
    call pt_entry
    POPR ecx, rcx
    mov dword ptr [v_opte + ecx * 4], eax
    POPR edx, rdx
    xor ecx, ecx
    call map_code
    inc edx
    cmp edx, 2
    jb mk_as
    xor ecx, ecx
    SWITCH_CR3 v_roots, v_cur_as

    # ---- the rounds
    mov ecx, 1
round_loop:
    mov dword ptr [v_round], ecx
    xor ebx, ebx
rl_in:
    mov esi, dword ptr [in_f + ebx * 4] # (identity map: the frame's own address)
    cmp ecx, 1
    je rl_in_fill
    PUSHR ecx, rcx
    dec ecx
    call in_pattern                    # the input of the round before, still there
    mov ecx, PC_NOPOKE
    call pc_verify
    cmp ecx, PC_NOPOKE
    jne rl_in_bad
    POPR ecx, rcx
rl_in_fill:
    call in_pattern
    call pc_fill
    inc ebx
    cmp ebx, K
    jb rl_in
    call new_code
    xor ebx, ebx
rl_call:
    xor eax, eax
    call run_one
    mov eax, 1
    call run_one
    inc ebx
    cmp ebx, K
    jb rl_call
    PUSHR ecx, rcx
    xor ecx, ecx
    SWITCH_CR3 v_roots, v_cur_as
    POPR ecx, rcx
    # every output frame again
    xor edx, edx
rl_sweep_as:
    xor ebx, ebx
rl_sweep:
    PUSHR ecx, rcx
    PUSHR edx, rdx
    mov eax, edx
    call check_out
    cmp ecx, PC_NOPOKE
    jne rl_sweep_bad
    POPR edx, rdx
    POPR ecx, rcx
    inc ebx
    cmp ebx, K
    jb rl_sweep
    inc edx
    cmp edx, 2
    jb rl_sweep_as
    inc ecx
    cmp ecx, ROUNDS
    jbe round_loop

    PASS
    MAIN_EPILOGUE

rl_sweep_bad:
    POPR ebp, rbp                      # the address space
    PUSHR eax, rax
    PRINT_DEC "host_code: address space ", ebp
    PRINT_DEC " window page ", ebx
    PRINT " (output frame checked at the end of the round)\n"
    POPR eax, rax
    mov edi, dword ptr [v_round]
    PC_FAIL host_code, 4, "output dword at the end of the round"
rl_in_bad:
    mov edi, dword ptr [v_round]
    dec edi
    PC_FAIL host_code, 7, "input frame of the round before: checked before it is rewritten"
bad_tmpl:
    mov ebx, 0
    mov edi, 0
    mov ecx, 0
    PC_FAIL host_code, 6, "the template: an imm32 not where the patching expects it or more than 0x100 bytes"

# ------------------------------------------------------------------ #BP: int3 executed
bp_handler:
    SAVE_ALL frame=1
.if BITS == 64
    mov rax, qword ptr [rbp + FRAME_IP - FRAME_NOERR]
.else
    mov eax, dword ptr [ebp + FRAME_IP - FRAME_NOERR]
.endif
    dec eax                            # the int3's own address (low 32 bits)
    mov ebx, dword ptr [v_j]
    call where
    mov edx, 0
    mov edi, dword ptr [v_round]
    xor ecx, ecx
    PC_FAIL host_code, 5, "int3 executed: a stale or misdirected code page (got: its address)"

    PC_ROUTINES                        # pc_fill, pc_verify (lib/pagecheck.inc)
