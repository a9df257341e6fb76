"""``--stats-interval SECONDS``: the counters while the guest runs, as ``kvm_stat`` shows KVM's.

On a terminal (stderr) a live table in place, ``kvm_stat``'s interactive view: every counter that
moved, its total, its share of all events and its rate over the last interval, busiest first. Not
on a terminal, ``kvm_stat -l``'s logging mode: a header line of counter names, then one line per
interval with what each counter did in that interval (plain text, one line each, easy to grep or
plot). The guest's serial output stays alone on stdout.

The counters are read from another thread while the guest runs (Unicorn releases the GIL while it
executes translated code); a reading is a copy of the counter dict, so an interval's numbers are
consistent to within the events of one exit.
"""
from __future__ import annotations

import threading
import time

# kvm_stat -l columns (the counters people watch); host-memory ones are added when host memory is on
LOG_FIELDS = ("exits", "pf_fixed", "pf_guest", "pf_emulate", "io_exits", "invlpg", "tlb_flush",
              "mmu_cache_miss", "mmu_shadow_zapped", "mmu_unsync")
HOST_FIELDS = ("pf_retry", "host_swap_out", "host_swap_in", "host_migrate",
               "mmu_notifier_zapped")
TOP = 20


class LiveStats:
    """Start with ``start()``, end with ``stop()`` (which prints the last, partial interval)."""

    def __init__(self, counters: dict, interval: float, out, tty: bool, host: bool = False):
        if not interval > 0:
            raise ValueError("--stats-interval must be more than 0 seconds")
        self.counters = counters
        self.interval = interval
        self.out = out
        self.tty = tty
        self.fields = LOG_FIELDS + (HOST_FIELDS if host else ())
        self._stop = threading.Event()
        self._thread = None
        self._last = dict(counters)
        self._t0 = self._tl = time.monotonic()
        self._live = None
        self.lines = 0                  # interval lines written (logging mode)

    # ------------------------------------------------------------------ one interval
    def _deltas(self):
        now = dict(self.counters)
        t = time.monotonic()
        dt = max(t - self._tl, 1e-9)
        d = {k: now.get(k, 0) - self._last.get(k, 0) for k in now}
        self._last, self._tl = now, t
        return now, d, dt, t - self._t0

    def _log_line(self, d, elapsed):
        if self.lines % 20 == 0:
            self.out.write(" " + " ".join(f"{f:>{max(len(f), 9)}}" for f in ("time",) + self.fields)
                           + "\n")
        cells = [f"{elapsed:>9.2f}"] + [f"{d.get(f, 0):>{max(len(f), 9)}}" for f in self.fields]
        self.out.write(" " + " ".join(cells) + "\n")
        self.out.flush()
        self.lines += 1

    def _table(self, now, d, dt, elapsed):
        from rich.table import Table
        total = sum(v for k, v in now.items() if k != "guest_insns") or 1
        rows = sorted(((k, v) for k, v in now.items() if v and k != "guest_insns"),
                      key=lambda kv: (-d.get(kv[0], 0), -kv[1], kv[0]))[:TOP]
        t = Table(title=f"x86shadow counters, {elapsed:.1f} s (interval {self.interval:g} s)",
                  title_justify="left")
        t.add_column("Event")
        t.add_column("Total", justify="right")
        t.add_column("%Total", justify="right")
        t.add_column("CurAvg/s", justify="right")
        for k, v in rows:
            t.add_row(k, f"{v}", f"{100 * v / total:.1f}", f"{d.get(k, 0) / dt:.0f}")
        return t

    def _tick(self):
        now, d, dt, elapsed = self._deltas()
        if self.tty:
            self._live.update(self._table(now, d, dt, elapsed), refresh=True)
        else:
            self._log_line(d, elapsed)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._tick()

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        if self.tty:
            from rich.console import Console
            from rich.live import Live
            now = dict(self.counters)
            self._live = Live(self._table(now, {}, 1.0, 0.0),
                              console=Console(file=self.out), auto_refresh=False,
                              transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._loop, name="x86shadow-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._tick()                    # the last (partial) interval
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
