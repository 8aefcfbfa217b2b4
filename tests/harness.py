"""Multi-process test harness: pools of gloo ranks that run test bodies.

A pool is ``world`` spawned processes in one gloo group. They meet through a TCPStore
that the test process hosts on a port the OS picks, so tests never race for ports. Test
bodies are module-level functions (pickled by reference) run on every rank; what they
return comes back as a list indexed by rank, and an exception on any rank fails the test
with every rank's traceback.

Nothing can hang a test: every run has a deadline, a rank that dies is noticed within a
second, ranks that are left waiting after another rank failed get a short grace period,
and collectives inside the ranks time out on their own. A pool that failed in any way is
killed and a fresh one is spawned for the next test; healthy pools are reused, which is
what makes property tests over many examples affordable.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta

RUN_TIMEOUT_S = float(os.environ.get("SE_TEST_TIMEOUT", 180))
GRACE_S = 10.0  # how long the other ranks may take to finish once one rank failed
COLLECTIVE_TIMEOUT_S = 60.0


class RankFailure(AssertionError):
    """One or more ranks raised, hung or died."""


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything, including assertion errors
            results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()
    from sharded_embedding.distributed import finish

    finish(0)


class RankPool:
    """``world`` ranks in a gloo group, waiting for functions to run."""

    def __init__(self, world: int):
        import torch.distributed as dist

        self.world = world
        self._store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.SimpleQueue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world, self._store.port, self._tasks[r], self._results), daemon=True)
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        self.healthy = True

    def run(self, fn, *args, timeout: float = RUN_TIMEOUT_S, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; returns the values by rank."""
        assert self.healthy, "this pool failed before and was closed"
        for q in self._tasks:
            q.put((fn, args, kwargs))
        values: list = [None] * self.world
        failures: dict[int, str] = {}
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        dead: list[int] = []
        while len(done) < self.world:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, ok, payload = self._results.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in done]
                if dead:
                    break
                continue
            done.add(rank)
            if ok:
                values[rank] = payload
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + GRACE_S)
        if failures or len(done) < self.world:
            self.close(kill=True)
            parts = [f"--- rank {r} raised:\n{tb}" for r, tb in sorted(failures.items())]
            for r in range(self.world):
                if r not in done:
                    p = self._procs[r]
                    state = f"died with exit code {p.exitcode}" if r in dead else "did not finish (hung or slow)"
                    parts.append(f"--- rank {r} {state} within the run's deadline")
            raise RankFailure(f"{fn.__name__} failed on a {self.world}-rank pool:\n" + "\n".join(parts))
        return values

    def close(self, kill: bool = False) -> None:
        if not self.healthy:
            return
        self.healthy = False
        if not kill:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=20)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS: dict[int, RankPool] = {}


def pool(world: int) -> RankPool:
    """A healthy pool of ``world`` ranks, reused across tests."""
    p = _POOLS.get(world)
    if p is None or not p.healthy:
        p = _POOLS[world] = RankPool(world)
    return p


def run_ranks(world: int, fn, *args, **kwargs) -> list:
    """Run ``fn`` on ``world`` gloo ranks; values by rank. See `RankPool.run`."""
    return pool(world).run(fn, *args, **kwargs)


def close_pools() -> None:
    for p in _POOLS.values():
        p.close()
    _POOLS.clear()
