#!/usr/bin/env python3
"""Measurement: what the shadow table image (x86shadow/mmu/spt_image.py, direction 1 stage 2)
costs beside today's shadow MMU, on the bench workloads (docs/PERFORMANCE.md "Stage 2").

Each workload runs under the shadow MMU (UC_TLB_VIRTUAL, today's adapter) three ways,
alternating, medians of --rounds: ``plain`` (no image), ``attached`` (an image attached: every
spte write goes through the watched list, nothing synced) and ``synced`` (attached, and
``sync()`` at every exit, as the hardware-walk adapter must before entering the guest). For
the synced runs: exits, entries encoded per sync, seconds per sync, live slots at the end, and
one ``harvest_ad()`` over the final image with nothing to harvest (the scan every exit of the
hardware-walk adapter would pay). Run:

    python tools/probes/spt_image_cost.py [--rounds 3] [--mode 64] [--quick] [WORKLOAD ...]
"""
import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from x86shadow import bench as B  # noqa: E402
from x86shadow import events as ev  # noqa: E402
from x86shadow.machine import Machine  # noqa: E402
from x86shadow.mmu.spt_image import ShadowTableImage  # noqa: E402

DEFAULT = ["tlb-miss-heavy", "demand-paging", "pt-writes-fork", "fork", "cr3-switch", "fault-in",
           "pte-write"]


def run(w, mode, n, variant):
    prog, fw = B.assemble(w, mode, n, 128)
    m = Machine(mode, mmu="shadow", ram_mib=128)
    m.load(prog, fw)
    image = None
    st = {"syncs": 0, "entries": 0, "sync_s": 0.0}
    if variant != "plain":
        image = ShadowTableImage(m.vm_mmu)
    if variant == "synced":
        clock = time.perf_counter

        def on_exit(_k, _f):
            t0 = clock()
            st["entries"] += image.sync()
            st["sync_s"] += clock() - t0
            st["syncs"] += 1
        m.events.subscribe(on_exit, (ev.EXIT,))
    gc.collect()
    t0 = time.perf_counter()
    res = m.run()
    t = time.perf_counter() - t0
    if res.status != 0 or not bytes(m.output).endswith(b"PASS\n"):
        raise SystemExit(f"{w.name} {variant}: failed (status {res.status})")
    if image is not None:
        image.sync()
        st["slots"] = image.live_slots()
        t0 = time.perf_counter()
        image.harvest_ad()
        st["harvest_s"] = time.perf_counter() - t0
    st["exits"] = res.counters["exits"]
    return t, st


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", default="64")
    ap.add_argument("--quick", action="store_true", help="the bench's --quick sizes")
    ap.add_argument("workloads", nargs="*")
    a = ap.parse_args()
    names = a.workloads or DEFAULT
    print(f"mode {a.mode}, {'quick' if a.quick else 'full'} sizes, medians of {a.rounds} rounds")
    print(f"{'workload':16} {'plain s':>8} {'attached':>9} {'synced':>8} {'exits':>7} "
          f"{'ent/sync':>8} {'us/sync':>8} {'us/exit+':>8} {'slots':>6} {'harvest us':>10}")
    for name in names:
        w = B.BY_NAME[name]
        n = w.n_quick if a.quick else w.n_full
        times = {"plain": [], "attached": [], "synced": []}
        last = None
        for _ in range(a.rounds):
            for variant in times:
                t, st = run(w, a.mode, n, variant)
                times[variant].append(t)
                if variant == "synced":
                    last = st
        med = {k: statistics.median(v) for k, v in times.items()}
        exits = max(last["exits"], 1)
        per_sync = last["sync_s"] / max(last["syncs"], 1) * 1e6
        extra = (med["synced"] - med["plain"]) / exits * 1e6
        print(f"{name:16} {med['plain']:8.3f} {med['attached']:9.3f} {med['synced']:8.3f} "
              f"{last['exits']:7d} {last['entries'] / max(last['syncs'], 1):8.1f} "
              f"{per_sync:8.2f} {extra:8.2f} {last['slots']:6d} {last['harvest_s'] * 1e6:10.1f}")


if __name__ == "__main__":
    main()
