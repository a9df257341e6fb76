#!/usr/bin/env python3
"""Growth sweep: how the shadow MMU's cost and memory grow with the working set (1k..256k mapped
pages), the number of shadow pages (one page table per page, 2 MiB apart) and the guest RAM size.

Same as `x86shadow bench --growth`; see x86shadow/bench.py (growth, mmu_memory). Prints a table
(and writes JSON with --json). Bytes per shadow page are counted with sys.getsizeof over every
object the shadow MMU holds (shadow pages with their sptes, children and parent links, roles, the
(gfn, role) hash, the rmap); --tracemalloc adds a cross-check of what a run keeps.

    tools/growth.py [--mode 64] [--quick] [--rounds N] [--json PATH] [--tracemalloc]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from x86shadow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--growth", *sys.argv[1:]]))
