#!/usr/bin/env python3
"""Differential campaign: random page-table programs (x86shadow.fuzz.ptprog), each run under
--mmu native and under every policy with the audit on; prints each divergent program's seed and
first differences, and saves it (``--save DIR``) as a runnable .asm file.

    python tools/fuzz_pagetables.py --mode all --count 200 --save /tmp/fuzz-failures
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import random
import sys

from x86shadow.fuzz.differential import check_source
from x86shadow.fuzz.ptprog import compared_frames, random_spec, render


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", action="append", choices=("32", "pae", "64", "all"))
    ap.add_argument("--count", type=int, default=50, help="programs per mode")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--save", metavar="DIR", help="write each divergent program here")
    args = ap.parse_args(argv)
    faulthandler.enable()
    modes = args.mode or ["all"]
    if "all" in modes:
        modes = ["32", "pae", "64"]
    if args.save:
        os.makedirs(args.save, exist_ok=True)
    bad = 0
    try:
        for mode in modes:
            for seed in range(args.seed, args.seed + args.count):
                src = render(random_spec(random.Random(f"{mode}:{seed}"), mode, seed=seed))
                divs = check_source(src, mode, compared_frames(mode))
                if not divs:
                    continue
                bad += 1
                print(f"mode {mode} seed {seed}: {len(divs)} difference(s)")
                for d in divs[:6]:
                    print("   ", d)
                if args.save:
                    with open(os.path.join(args.save, f"pt_{mode}_{seed}.asm"), "w") as f:
                        f.write(src)
                sys.stdout.flush()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    total = len(modes) * args.count
    print(f"{bad} of {total} programs diverge")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
