# aging/aging.asm -- a 32-bit kernel and one user process with a known hot set, for the host's aging.
# x86shadow: modes=32,pae
#
# docs/AGING.md, `x86shadow scenario aging` (x86shadow/aging_scenario.py), which passes the parameters
# below as symbols; the defaults let the file be assembled on its own.
#
#   NHOT      hot pages: touched in every pass                                  default 64
#   NCOLD     cold pages: touched in the warm-up only                           default 64
#   NSTREAM   stream pages per pass: each touched in its pass only (new memory)  default 8
#   NPASSES   passes after the warm-up                                          default 12
#   LAYOUT    0 multi: every data page is touched through the kernel's direct map and the
#               process's mapping of it, so its frame has two sptes (legacy shadow paging)
#             1 tdp: through the process's mapping only, one spte per frame (as under nested TDP)
#   FLUSH     1: a CR3 load before each pass (the switch to the process) drops every translation;
#             0: none, translations stay cached between passes
#   USTAT     guest-physical address of the statistics frame (the host reads it)
#
# Layout (guest-physical): the program, the firmware and the kernel's page tables below 32 MiB;
# the data pages from DATA_PA = 32 MiB: hot [0, NHOT), cold [NHOT, NHOT + NCOLD), then NPASSES
# slices of NSTREAM stream pages (slice p - 1 is pass p's). USTAT is its own frame.
# Virtual: the kernel's direct map is the identity of [0, 64 MiB) with large pages (supervisor);
# data page i is also at USER_BASE + i * 4 KiB (P|W|U, 4 KiB ptes); UCODE: the process's code
# (read-only), USTACK its stack, UVARS its view of the USTAT frame.
#
# Touch order (the host's ground truth follows it exactly): a touch is one dword read of the page,
# then `inc dword ptr [touches]` (the host reads the count; the increment comes after the read, so
# the count a host sees at the fill of a data page excludes the touch being filled).
#   pass 0 (warm-up): the process touches hot then cold pages; (multi) then the kernel the same
#   pass p >= 1: the process touches hot pages, then the stream slice of p; (multi) then the kernel
#   the same. Markers (MARKER_PORT, not an exit): (1 << 24) | p before pass p (before its CR3
#   load), (2 << 24) | p before the kernel's touches, (3 << 24) | NPASSES at the end.
# Exit codes: 1 the touch count is wrong.

.include "../lib/console.inc"
.include "../lib/paging.inc"
.include "../lib/idt.inc"
.include "../lib/main.inc"

.ifndef NHOT
.set NHOT, 64
.endif
.ifndef NCOLD
.set NCOLD, 64
.endif
.ifndef NSTREAM
.set NSTREAM, 8
.endif
.ifndef NPASSES
.set NPASSES, 12
.endif
.ifndef LAYOUT
.set LAYOUT, 0
.endif
.ifndef FLUSH
.set FLUSH, 1
.endif
.ifndef USTAT
.set USTAT, FREE_END - PAGE
.endif

.set DATA_PA, 0x2000000
.set STREAM0, NHOT + NCOLD
.set NDATA, NHOT + NCOLD + NSTREAM * NPASSES
.set DIRECT_END, 0x4000000             # the direct map: [0, 64 MiB)
.set USER_BASE, 0x40000000
.set UCODE, 0x08000000
.set USTACK, UCODE + 0x100000
.set USTACK_TOP, USTACK + PAGE
.set UVARS, UCODE + 0x200000
.if LAYOUT == 0
.set MAPPINGS, 2
.else
.set MAPPINGS, 1
.endif
.set TOUCHES, MAPPINGS * (NHOT + NCOLD + NPASSES * (NHOT + NSTREAM))

.if NHOT < 1 || NCOLD < 0 || NSTREAM < 0 || NPASSES < 1
.error "NHOT >= 1, NCOLD >= 0, NSTREAM >= 0, NPASSES >= 1"
.endif
.if DATA_PA + NDATA * PAGE > USTAT
.error "the data pages do not fit below USTAT"
.endif

# the statistics frame (USTAT; the process sees it at UVARS)
.set ST_TOUCHES, 0x00                  # touches so far (both mappings)
.set ST_PASS, 0x04                     # the pass running (0 = warm-up)
.set ST_MAGIC, 0x08                    # 0x61676521 once valid

# kernel variables
.set v_root, PROG_VARS + 0x00
.set v_ksp, PROG_VARS + 0x08
.set v_entry, PROG_VARS + 0x10

.macro MARK phase, reg
    push eax
    push edx
    mov eax, \reg
    or eax, \phase << 24
    mov dx, MARKER_PORT
    out dx, eax
    pop edx
    pop eax
.endm

main:
    MAIN_PROLOGUE
    call pt_init
    mov dword ptr [USTAT + ST_TOUCHES], 0
    mov dword ptr [USTAT + ST_PASS], 0

    # ---- the kernel's address space: the direct map
    call pt_alloc
    mov dword ptr [v_root], eax
    mov edi, eax
    xor esi, esi
direct_map:
    mov eax, esi
    or eax, PTE_P | PTE_W | PTE_A | PTE_D | PTE_PS
    xor edx, edx
    mov ecx, 2
    call pt_map
    add esi, LARGE_PAGE
    cmp esi, DIRECT_END
    jb direct_map

    # ---- the process: its mapping of the data pages, code, stack, UVARS
    mov edi, dword ptr [v_root]
    mov esi, USER_BASE
    mov eax, DATA_PA | PTE_P | PTE_W | PTE_U
    xor edx, edx
    mov ecx, NDATA
    call pt_map_range
    mov eax, user_code_start
    and eax, 0xfffff000
    mov ebx, eax
    mov ecx, user_code_end
    sub ecx, ebx
    add ecx, 0xfff
    shr ecx, 12
    mov esi, UCODE
    or eax, PTE_P | PTE_U
    xor edx, edx
    call pt_map_range
    mov eax, user_entry
    sub eax, ebx
    add eax, UCODE
    mov dword ptr [v_entry], eax
    call pt_alloc
    or eax, PTE_P | PTE_W | PTE_U
    mov esi, USTACK
    xor edx, edx
    mov ecx, 1
    call pt_map
    mov eax, USTAT | PTE_P | PTE_W | PTE_U
    mov esi, UVARS
    xor edx, edx
    mov ecx, 1
    call pt_map

    call idt_init
    SET_GATE 0x80, int80_handler, GATE_INT3
    mov eax, dword ptr [v_root]
    mov cr3, eax
    mov dword ptr [USTAT + ST_MAGIC], 0x61676521

    # ---- warm-up and passes
    xor ebx, ebx
pass_loop:
    MARK 1, ebx
    mov dword ptr [USTAT + ST_PASS], ebx
.if FLUSH
    mov eax, dword ptr [v_root]        # switch_mm: the CPU drops its translations
    mov cr3, eax
.endif
    call run_user
.if LAYOUT == 0
    MARK 2, ebx
    call kernel_touch
.endif
    inc ebx
    cmp ebx, NPASSES
    jbe pass_loop

    mov eax, NPASSES
    MARK 3, eax
    mov eax, dword ptr [USTAT + ST_TOUCHES]
    CHECK_EQ eax, TOUCHES, 1, "aging: wrong number of touches"
    PASS
    MAIN_EPILOGUE

# ------------------------------------------------------------------ the kernel's touches
# ebx = pass. The direct map: data page i is at DATA_PA + i * 4 KiB. Preserves ebx.
kernel_touch:
    push ebx
    mov esi, DATA_PA
    mov ecx, NHOT
    test ebx, ebx
    jnz kt_hot
    mov ecx, NHOT + NCOLD              # warm-up: hot and cold (contiguous)
kt_hot:
    call kt_range
    test ebx, ebx
    jz kt_done
.if NSTREAM
    lea eax, [ebx - 1]
    imul eax, eax, NSTREAM * PAGE
    lea esi, [eax + DATA_PA + STREAM0 * PAGE]
    mov ecx, NSTREAM
    call kt_range
.endif
kt_done:
    pop ebx
    ret

kt_range:                              # esi = first page, ecx = pages (> 0)
    mov eax, dword ptr [esi]
    inc dword ptr [USTAT + ST_TOUCHES]
    add esi, PAGE
    dec ecx
    jnz kt_range
    ret

# ------------------------------------------------------------------ the process
run_user:
    pushal
    mov dword ptr [v_ksp], esp
    mov ebx, dword ptr [v_entry]
    IRET_TO_CPL3
user_back:
    LOAD_DATA_SEGS SEL_KDATA
    popal
    ret

int80_handler:
    mov esp, dword ptr [v_ksp]         # ss is the kernel's (SS0 of the TSS)
    jmp user_back

# Runs at UCODE + (label - page of user_code_start): position independent.
.align 4096
user_code_start:
user_entry:
    mov ebx, dword ptr [UVARS + ST_PASS]
    mov esi, USER_BASE
    mov ecx, NHOT
    test ebx, ebx
    jnz u_hot
    mov ecx, NHOT + NCOLD
u_hot:
    mov eax, dword ptr [esi]
    inc dword ptr [UVARS + ST_TOUCHES]
    add esi, PAGE
    dec ecx
    jnz u_hot
    test ebx, ebx
    jz u_done
.if NSTREAM
    lea eax, [ebx - 1]
    imul eax, eax, NSTREAM * PAGE
    lea esi, [eax + USER_BASE + STREAM0 * PAGE]
    mov ecx, NSTREAM
u_stream:
    mov eax, dword ptr [esi]
    inc dword ptr [UVARS + ST_TOUCHES]
    add esi, PAGE
    dec ecx
    jnz u_stream
.endif
u_done:
    int 0x80
u_hang:
    jmp u_hang
user_code_end:
