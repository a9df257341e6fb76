"""Where independent jobs run (``x86shadow fuzz``, ``x86shadow sweep``, ``x86shadow scenario kmap
--compare`` / ``scenario aging --compare``): ``local``, a
concurrent.futures process pool over this machine's cores (Unicorn's state is per process, so
jobs are processes, not threads), or ``ray``, tasks on a Ray cluster (the optional extra
``pip install 'x86shadow[ray]'``; ``address`` joins a running cluster, None starts a local Ray
instance for the command's lifetime).

Both give the same interface::

    with make_executor("local", jobs=4) as ex:
        for item, result in ex.imap_unordered(fn, items):
            ...

``fn`` must be a module-level function (it is pickled by reference) and items and results
picklable. Results come as they complete. Leaving the ``with`` block early (a ``break``, an
exception, Ctrl-C) cancels the jobs not yet finished: pending ones never start, running ones are
stopped (local: their worker processes are terminated; Ray: ``ray.cancel(force=True)``).
``fresh_process=True`` runs every job in a process of its own (a scenario's wall time and peak
RSS are then that run's own: local ``max_tasks_per_child=1``, Ray ``max_calls=1``).
"""
from __future__ import annotations

import os
import signal

EXECUTORS = ("local", "ray")


class ExecutorError(Exception):
    """The executor cannot be set up (a usage error: Ray missing, a cluster not reachable)."""


def default_jobs() -> int:
    """All the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:                      # not on Linux
        return os.cpu_count() or 1


def _worker_init():
    # Ctrl-C reaches the whole process group: only the parent handles it (it cancels the pool)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalExecutor:
    name = "local"

    def __init__(self, jobs: int, fresh_process: bool = False):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        self.jobs = jobs
        # spawn: a fresh interpreter per worker, no state (threads, Unicorn) copied by fork
        kw = {"max_tasks_per_child": 1} if fresh_process else {}
        self._pool = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init,
                                         mp_context=multiprocessing.get_context("spawn"), **kw)
        self._futures = ()

    def imap_unordered(self, fn, items):
        from concurrent.futures import as_completed
        futures = {self._pool.submit(fn, item): item for item in items}
        self._futures = futures
        for f in as_completed(futures):
            yield futures[f], f.result()

    def close(self, cancel: bool) -> None:
        if not cancel:
            self._pool.shutdown(wait=True)
            return
        for f in self._futures:
            f.cancel()
        # running jobs: stop their workers (ProcessPoolExecutor cannot cancel a running future)
        processes = list(getattr(self._pool, "_processes", {}).values())
        manager = getattr(self._pool, "_executor_manager_thread", None)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=5)
        # the pool's manager thread sees the workers gone and closes its wake-up pipe; wait for
        # it here: CPython 3.11's exit hook (concurrent.futures.process._python_exit) writes to
        # that pipe without the pool's lock, and racing the close it printed an OSError
        # traceback after a Ctrl-C
        if manager is not None:
            manager.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(cancel=exc_type is not None)
        return False


class RayExecutor:
    name = "ray"

    def __init__(self, jobs: int, address: str | None, fresh_process: bool = False):
        self._options = {"max_calls": 1} if fresh_process else {}
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray, which is not installed: "
                                "pip install 'x86shadow[ray]'") from None
        self._ray = ray
        self._refs = {}
        kwargs = dict(include_dashboard=False, logging_level="ERROR", configure_logging=True)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=jobs, **kwargs)
        except Exception as e:                      # noqa: BLE001 - Ray raises many kinds
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise ExecutorError(f"cannot {where}: {type(e).__name__}: {e}") from None
        self.jobs = jobs if not address else int(ray.cluster_resources().get("CPU", 1))

    def imap_unordered(self, fn, items):
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=0, **self._options)(fn)
        self._refs = refs = {remote.remote(item): item for item in items}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                result = ray.get(ref)
                yield refs.pop(ref), result

    def close(self, cancel: bool) -> None:
        ray = self._ray
        if cancel:
            for ref in list(self._refs):
                try:
                    ray.cancel(ref, force=True)
                except Exception:                   # noqa: BLE001 - already finished
                    pass
        ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(cancel=exc_type is not None)
        return False


def make_executor(kind: str, jobs: int | None = None, address: str | None = None, *,
                  fresh_process: bool = False):
    """An executor: ``kind`` "local" or "ray"; ``jobs`` workers (default: all cores; for Ray
    the CPUs of the local instance it starts); ``address``: a Ray cluster to join;
    ``fresh_process``: one process per job (module docstring)."""
    if kind not in EXECUTORS:
        raise ExecutorError(f"unknown executor {kind!r} (choose from {', '.join(EXECUTORS)})")
    if jobs is None:
        jobs = default_jobs()
    if jobs < 1:
        raise ExecutorError(f"--jobs {jobs}: must be at least 1")
    if address is not None and kind != "ray":
        raise ExecutorError("--address joins a Ray cluster: it needs --executor ray")
    if kind == "local":
        return LocalExecutor(jobs, fresh_process)
    return RayExecutor(jobs, address, fresh_process)


def add_executor_options(parser, default_jobs: int | None = None, jobs_help: str = "") -> None:
    """--executor, --jobs, --address (fuzz, sweep, scenario kmap / aging --compare).
    ``default_jobs``: --jobs when not given (None: all cores)."""
    g = parser.add_argument_group("where the jobs run")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: a process pool on this machine (default); ray: tasks on Ray "
                        "(pip install 'x86shadow[ray]')")
    g.add_argument("--jobs", type=int, default=default_jobs, metavar="N",
                   help=(jobs_help or "jobs at a time") + " (default: "
                        + ("all cores" if default_jobs is None else str(default_jobs))
                        + "; with --address the cluster decides)")
    g.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="with --executor ray: join this Ray cluster (default: start a local one)")


def executor_from_args(args, *, fresh_process: bool = False):
    return make_executor(args.executor, args.jobs, args.address, fresh_process=fresh_process)


def map_in_order(ex, fn, items, done=None) -> list:
    """``fn`` over ``items`` on executor ``ex``; the results in the order of ``items``.
    ``done(item, result)`` is called as each one completes (progress)."""
    items = list(items)
    index = {id(item): i for i, item in enumerate(items)}
    results = [None] * len(items)
    for item, result in ex.imap_unordered(fn, items):
        results[index[id(item)]] = result
        if done is not None:
            done(item, result)
    return results


class _InProcess:
    """No executor: the command runs its work itself (a scenario without --compare)."""
    name, jobs = "in-process", 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def compare_executor(args):
    """The executor of ``scenario kmap|aging --compare`` (one fresh process per run), or a
    stand-in that runs nothing when there is no --compare (then --executor ray / --address
    are usage errors, and --jobs is checked but unused)."""
    if args.compare:
        return executor_from_args(args, fresh_process=True)
    if args.executor != "local" or args.address is not None:
        raise ExecutorError("--executor / --address run the runs of --compare: they need "
                            "--compare")
    if args.jobs is not None and args.jobs < 1:
        raise ExecutorError(f"--jobs {args.jobs}: must be at least 1")
    return _InProcess()
