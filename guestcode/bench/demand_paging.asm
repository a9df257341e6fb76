# bench/demand_paging.asm -- guest page faults: N pages of a window read in turn, none mapped; each
# read raises #PF, the program's own handler maps the page (pt_map: allocates the page table on the
# first fault in each 2/4 MiB, writes the pte -- two 4-byte stores in PAE), irets, and the read is
# retried. Under the shadow MMU one round trip is: guest #PF exit + injection through the IDT, the
# handler's pte write (trapped and emulated once its page table is shadowed), the retry (a shadow
# page fault). Unicorn's own MMU: its walker raises #PF, x86shadow delivers it through the IDT.
# Own CR3 (low 64 MiB identity-mapped) and IDT. Page i -> frame F_(i mod 64) holding i mod 64.
# Check: every read returns its marker; the handler checks CR2 and the error code; N faults in all.
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "../lib/idt.inc"
.include "bench.inc"

.ifndef N
.set N, 6000
.endif
.set v_root, PROG_VARS + 0x00
.set pf_count, PROG_VARS + 0x08
.set v_frames, PROG_VARS + 0x100       # 64 dwords

.macro READS si
    mov esi, BENCH_WIN
    xor ecx, ecx
dp_read_\@:
    mov eax, dword ptr [\si]
    mov ebx, ecx
    and ebx, 63
    cmp eax, ebx
    jne dp_bad
    add esi, 0x1000
    inc ecx
    cmp ecx, N
    jb dp_read_\@
.endm

main:
    PUSHA_
    call pt_init
    mov dword ptr [pf_count], 0
    MARKED_FRAMES v_frames, 64
    call idt_init
    SET_GATE 14, pf_handler
    call new_root
    mov dword ptr [v_root], eax
    mov dword ptr [v_root + 4], 0
    SET_CR3
.if BITS == 64
    READS rsi
.else
    READS esi
.endif
    mov eax, dword ptr [pf_count]
    CHECK_EQ eax, N, 2, "demand-paging: wrong number of page faults"
    POPA_
    PASS
    ret
dp_bad:
    FAILV 1, "demand-paging: wrong marker (page index in ecx)", eax

# #PF: map the faulting page of the window
pf_handler:
    SAVE_ALL
.if BITS == 64
    mov eax, dword ptr [rsp + FRAME_ERR]
.else
    mov eax, dword ptr [esp + FRAME_ERR]
.endif
    CHECK_EQ eax, 0, 3, "demand-paging: #PF error code is not 0 (not-present read)"
.if BITS == 64
    mov rsi, cr2
    mov rax, rsi
    shr rax, 32
    CHECK_EQ eax, 0, 4, "demand-paging: CR2 above 4 GiB"
    mov rdi, qword ptr [v_root]
.else
    mov esi, cr2
    mov edi, dword ptr [v_root]
.endif
    mov eax, esi
    sub eax, BENCH_WIN
    shr eax, 12
    CHECK_NE eax, N, 5, "demand-paging: CR2 outside the window"
    cmp eax, N
    ja dp_cr2_bad
    and esi, 0xfffff000
    and eax, 63
    mov eax, dword ptr [v_frames + eax * 4]
    or eax, PTE_P | PTE_W
    xor edx, edx
    mov ecx, 1
    call pt_map
    inc dword ptr [pf_count]
    RESTORE_ALL
    IRET_ERR
dp_cr2_bad:
    FAILV 5, "demand-paging: CR2 outside the window", esi
