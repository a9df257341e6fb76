"""Guest-physical layout shared by the firmware, the loader and the machine (docs/GUEST_CONTRACT.md).

Everything the firmware keeps lies below 16 MiB; 16 MiB..64 MiB is free for the program.
These constants are handed to the firmware and to every guest program as assembler
symbols (``.set NAME, value``), so guest code and host code cannot disagree.
"""

MiB = 1 << 20

FW_BASE = 0x0010_0000          # firmware image (code + data); the CPU starts here
FW_UNHANDLED = FW_BASE + 0x10  # target of every firmware IDT gate: "unhandled exception" (crash report)
FW_AP_ENTRY = FW_BASE + 0x18   # where vCPU n > 0 starts (docs/SMP.md)
FW_DATA = 0x0018_0000          # firmware GDT / IDT / TSS (see FW_* below)
FW_GDT = FW_DATA + 0x0000      # 16 descriptors
FW_IDT = FW_DATA + 0x1000      # 256 gates (16 bytes each in 64-bit mode, 8 in 32-bit)
FW_TSS = FW_DATA + 0x2000      # 32-bit or 64-bit TSS
FW_PT_BASE = 0x0020_0000       # firmware identity-map page tables (2 MiB of room)
FW_PT_END = 0x0040_0000
TSS_STACK_TOP = 0x0008_8000    # ESP0/RSP0 kernel stack, 16 KiB: 0x84000..0x88000
STACK_TOP = 0x000A_0000        # main's stack, 64 KiB: 0x90000..0xA0000
PROG_BASE = 0x0040_0000        # programs are assembled for, loaded at and run at this address
PROG_LIMIT = 0x0100_0000       # program image must end below 16 MiB
FREE_BASE = 0x0100_0000        # 16 MiB..64 MiB: free for the program
FREE_END = 0x0400_0000
# Several vCPUs (docs/SMP.md): vCPU 0 keeps STACK_TOP / TSS_STACK_TOP / FW_GDT / FW_TSS; vCPU
# n >= 1 has the 32 KiB area VCPU_STACKS + (n - 1) * VCPU_AREA: its TSS (ESP0/RSP0) stack in the
# first 8 KiB, its main stack (24 KiB) above it; its TSS at FW_TSS + n * TSS_STRIDE and its own
# copy of the GDT (TSS descriptor 0x28 = SEL_TSS pointing at its TSS) in the FW_SMP page
MAX_VCPUS = 8
VCPU_STACKS = 0x001C_0000      # 0x1C0000..0x1F8000: the areas of vCPUs 1..7
VCPU_AREA = 0x8000
VCPU_TSS_STACK = 0x2000
TSS_STRIDE = 0x80
FW_SMP = FW_DATA + 0x3000      # a page: the vCPU count (dword, stored by the machine), the other
                               # vCPUs' GDTRs (+0x110..) and GDTs (+0x400..)
MIN_IDENTITY = 64 * MiB        # the firmware identity-maps at least this much (all of RAM, in fact)

SERIAL_PORT = 0x3F8
EXIT_PORT = 0xF4
MARKER_PORT = 0xF5             # instrumentation: a write records (value, counters so far) in
                               # Machine.markers; not counted as an exit

SEL_KCODE = 0x08
SEL_KDATA = 0x10
SEL_UCODE = 0x18 | 3
SEL_UDATA = 0x20 | 3
SEL_TSS = 0x28


def vcpu_stack_top(n: int) -> int:
    """Top of vCPU n's main stack (docs/GUEST_CONTRACT.md)."""
    return STACK_TOP if n == 0 else VCPU_STACKS + n * VCPU_AREA


def vcpu_tss_stack_top(n: int) -> int:
    """Top of vCPU n's TSS (ESP0/RSP0) stack."""
    return TSS_STACK_TOP if n == 0 else VCPU_STACKS + (n - 1) * VCPU_AREA + VCPU_TSS_STACK

# Guest physical addresses above RAM that the Unicorn adapter uses (never guest RAM):
ALIAS_BASE = 1 << 36           # read-only alias of RAM: writes to tracked page tables trap here
HOLE_BASE = 1 << 37            # unmapped: a fault parked here reveals the exact byte offset
SPT_ARENA_BASE = 0xC000_0000   # the shadow table image (mmu/spt_image.py): below 4 GiB (a PAE
                               # root's CR3 has 32 bits), above RAM, below the MMIO pages


def asm_symbols(mode: str, ram_size: int) -> dict:
    """The ``.set`` symbols every guest source (firmware and programs) is assembled with."""
    paging = {"32": 2, "pae": 3, "64": 4}[mode]
    return {
        "BITS": 64 if mode == "64" else 32,
        "PAGING": paging,             # 2 = 2-level 32-bit, 3 = PAE, 4 = 4-level
        "RAM_SIZE": ram_size,
        "PROG_BASE": PROG_BASE,
        "PROG_LIMIT": PROG_LIMIT,
        "FREE_BASE": FREE_BASE,
        "FREE_END": FREE_END,
        "STACK_TOP": STACK_TOP,
        "TSS_STACK_TOP": TSS_STACK_TOP,
        "FW_BASE": FW_BASE,
        "FW_UNHANDLED": FW_UNHANDLED,
        "FW_AP_ENTRY": FW_AP_ENTRY,
        "FW_DATA": FW_DATA,
        "FW_GDT": FW_GDT,
        "FW_IDT": FW_IDT,
        "FW_TSS": FW_TSS,
        "FW_PT_BASE": FW_PT_BASE,
        "FW_PT_END": FW_PT_END,
        "SERIAL_PORT": SERIAL_PORT,
        "EXIT_PORT": EXIT_PORT,
        "MARKER_PORT": MARKER_PORT,
        "SEL_KCODE": SEL_KCODE,
        "SEL_KDATA": SEL_KDATA,
        "SEL_UCODE": SEL_UCODE,
        "SEL_UDATA": SEL_UDATA,
        "SEL_TSS": SEL_TSS,
        "MAX_VCPUS": MAX_VCPUS,
        "VCPU_STACKS": VCPU_STACKS,
        "VCPU_AREA": VCPU_AREA,
        "VCPU_TSS_STACK": VCPU_TSS_STACK,
        "TSS_STRIDE": TSS_STRIDE,
        "FW_SMP": FW_SMP,
        **{f"STACK_TOP_{n}": vcpu_stack_top(n) for n in range(MAX_VCPUS)},
        **{f"TSS_STACK_TOP_{n}": vcpu_tss_stack_top(n) for n in range(MAX_VCPUS)},
    }
