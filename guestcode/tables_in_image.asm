# tables_in_image.asm -- page tables that live inside the program image, in the pages right after
# its code and beside a variable the code updates in a loop: the shadow MMU must keep a frame that
# is code, data and page table at once correct (write-protection traps, code/data page tracking).
# x86shadow: modes=pae
.include "lib/console.inc"

main:
    # identity map the first 1 GiB with 2 MiB pages, tables inside the program image
    lea edi, [pd]
    mov eax, 0x83
    mov ecx, 512
fill:
    mov dword ptr [edi], eax
    mov dword ptr [edi + 4], 0
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz fill
    lea eax, [pd]
    or eax, 1
    mov dword ptr [pdpt], eax
    lea eax, [pdpt]
    mov cr3, eax
    # a window at 1 GiB - 2 MiB .. re-point PDE 511 at 32 MiB and read a marker there
    mov dword ptr [0x2000000], 0x12345678
    mov dword ptr [pd + 511*8], 0x2000083
    invlpg [0x3fe00000]
    mov eax, dword ptr [0x3fe00000]
    cmp eax, 0x12345678
    jne bad
    mov dword ptr [counter], 0
    mov ecx, 1000
loop2:
    inc dword ptr [counter]
    dec ecx
    jnz loop2
    cmp dword ptr [counter], 1000
    jne bad
    PASS
    ret
bad:
    mov al, 3
    out 0xf4, al
counter:
    .long 0
    .align 4096
pd:
    .fill 4096, 1, 0
pdpt:
    .fill 32, 1, 0
