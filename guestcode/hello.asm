# hello.asm -- the smallest program: print a greeting, then PASS (uses the firmware's page tables).
# x86shadow: modes=32,pae,64
.include "lib/console.inc"

main:
    PRINT "hello from x86shadow\n"
    PASS
    ret
