# bench/io_loop.asm -- N port writes (out 0x80, the POST diagnostic port, which nothing decodes):
# every one is an I/O exit (a UC_HOOK_INSN callback) under both MMUs.
# Check: the loop ran N times (counted in memory).
# x86shadow: modes=32,pae,64
.include "../lib/console.inc"

.ifndef N
.set N, 1000000
.endif
.set v_count, PROG_VARS + 0x00

main:
    mov dword ptr [v_count], 0
    mov ecx, N
    mov dx, 0x80
io_loop:
    mov eax, ecx
    out dx, al
    inc dword ptr [v_count]
    dec ecx
    jnz io_loop
    mov eax, dword ptr [v_count]
    CHECK_EQ eax, N, 1, "io-loop: wrong iteration count"
    PASS
    ret
