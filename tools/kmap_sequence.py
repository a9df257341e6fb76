#!/usr/bin/env python3
"""Per policy: decisions and counters for the kmap-style sequence of issue 3 --
"two 4-byte stores to a PAE pte, invlpg, lock btr $5 on a user pte through that mapping".

    python tools/kmap_sequence.py            # prints a markdown table

The fixmap pte lives in a shadowed kernel page table and is written through the kernel's identity
map (high half first, as PAE set_pte does); it is pointed at a shadowed user page table, whose
first pte then gets its accessed bit cleared through the fixmap address.
"""
from __future__ import annotations

import sys

from x86shadow.faultlab import FaultLab
from x86shadow.policies import POLICY_NAMES

USER_VA = 0x4000_0000        # a user page; its page table is the "highmem" user table
FIXMAP_VA = 0x4080_0000      # the fixmap slot (its page table: the kernel's fixmap table)
COUNTERS = ("exits", "wp_faults", "insn_emulation", "emulate_ahead", "mmu_unprotect",
            "mmu_pte_updated", "mmu_shadow_zapped", "mmu_flooded", "pf_fixed", "mmu_cache_miss")


def run(policy):
    lab = FaultLab("pae", policy=policy, ram_mib=64)
    lab.map(USER_VA, 0x0200_0000)
    lab.map(FIXMAP_VA + 0x1000, 0x0201_0000)        # another slot: shadows the fixmap table
    user_table = lab.table_addr(USER_VA)
    fix_pte = lab.pte_addr(FIXMAP_VA + 0x1000) - 8    # the slot below it
    user_pte_off = lab.pte_addr(USER_VA) & 0xFFF
    snippet = f"""
    mov dword ptr [{fix_pte + 4:#x}], 0
    mov dword ptr [{fix_pte:#x}], {user_table | 0x63:#x}
    invlpg [{FIXMAP_VA:#x}]
    lock btr dword ptr [{FIXMAP_VA + user_pte_off:#x}], 5
"""
    r = lab.run(snippet, shadow=[USER_VA, FIXMAP_VA + 0x1000])
    if r.status != 0:
        raise SystemExit(f"{policy}: guest failed\n{r.report}")
    return r


def main():
    print("| policy | decisions (in order) | " + " | ".join(COUNTERS) + " |")
    print("|---|---|" + "---|" * len(COUNTERS))
    for policy in POLICY_NAMES:
        r = run(policy)
        decisions = "; ".join(r.decisions + [f"[{e}]" for e in r.policy_events])
        print(f"| {policy} | {decisions} | " + " | ".join(str(r.counters[c]) for c in COUNTERS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
