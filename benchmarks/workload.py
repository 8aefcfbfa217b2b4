"""The benchmark workload: per-rank id streams, loss weights, step timing, memory.

Rank r's ids for step i depend only on (seed, r, i, distribution), so every system in a run
serves exactly the same lookups; single-process baselines concatenate all ranks' ids.

- uniform: ids uniform on [0, rows).
- zipf: truncated Zipf, P(k) ~ 1 / (k + 1)^s on [0, rows), by rejection from numpy's zipf
  (values >= rows are redrawn). Not permuted: row 0 is the hottest, as in a frequency-sorted
  vocabulary.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import statistics
import time

import numpy as np
import torch


# glibc malloc as it comes, or kept from handing big blocks back to the OS between steps by
# `sharded_embedding.tune_malloc()`, called first in each worker (otherwise every step takes
# fresh pages, page faults, for its multi-MiB temporaries, torch's and ours). A driver passes
# the environment of the allocator it wants to the workers it starts. "huge": glibc's own tunable
# (glibc >= 2.35) asking for transparent huge pages (madvise) on all it maps, so that a system that
# allocates its tables itself (TorchRec's FBGEMM) gets them on huge pages as our shards and the
# single process's table are.
_TUNE, _HUGE = "SHARDED_EMBEDDING_BENCH_TUNE_MALLOC", "glibc.malloc.hugetlb"
ALLOCATORS = {"default": (False, False), "tuned": (True, False), "huge": (False, True), "tuned_huge": (True, True)}


def allocator_env(name: str, base: dict) -> dict:
    """``base`` (a driver's environment) set for allocator ``name`` of `ALLOCATORS`: tune_malloc
    asked for or not, glibc's huge-page tunable added to or removed from ``GLIBC_TUNABLES`` (the
    caller's other tunables kept), whatever ``base`` held before."""
    tune, huge = ALLOCATORS[name]
    env = {k: v for k, v in base.items() if k != _TUNE}
    if tune:
        env[_TUNE] = "1"
    tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(_HUGE + "=")]
    tunables += [f"{_HUGE}=1"] if huge else []
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def parse_allocators(text: str) -> list[str]:
    """``--allocators`` (comma separated names of `ALLOCATORS`); SystemExit on an unknown one."""
    names = [x.strip() for x in text.split(",")]
    bad = [x for x in names if x not in ALLOCATORS]
    if bad:
        raise SystemExit(f"unknown allocators {bad}; known: {sorted(ALLOCATORS)}")
    return names


def apply_allocator() -> None:
    """In a worker, before anything else: `tune_malloc()` if its driver asked for "tuned"."""
    if os.environ.get(_TUNE):
        from sharded_embedding import tune_malloc

        if not tune_malloc():
            raise SystemExit("--allocators tuned: this C library has no mallopt")


def make_ids(rows: int, batch: int, steps: int, rank: int, dist: str, zipf_s: float = 1.05, seed: int = 0):
    if rows < 1 or batch < 0:
        raise ValueError(f"make_ids: rows must be >= 1 and batch >= 0, got rows={rows}, batch={batch}")
    rng = np.random.default_rng([seed, 7919, rank, 0 if dist == "uniform" else 1])
    out = []
    for _ in range(steps):
        if dist == "uniform":
            x = rng.integers(0, rows, batch, dtype=np.int64)
        elif dist == "zipf":
            parts, got = [], 0
            while got < batch:
                y = rng.zipf(zipf_s, batch) - 1
                y = y[y < rows]
                parts.append(y)
                got += y.size
            x = np.concatenate(parts)[:batch].astype(np.int64)
        else:
            raise ValueError(f"unknown distribution {dist!r}")
        out.append(torch.from_numpy(x))
    return out


def make_loss_weight(batch: int, dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    """``w`` of the loss ``(out * w).sum()``: the gradient each looked-up row receives."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return torch.randn(batch, dim, generator=g)


def time_steps(step, warmup: int, steps: int, sync=None) -> list[float]:
    """Seconds per step for ``steps`` timed steps after ``warmup`` untimed ones, run back to
    back as a training loop runs them. With ``sync`` (a barrier; then collective) the ranks line
    up once before the timed steps, and the list returned (on every rank) is the slowest rank's:
    the rank whose median step is the longest. No barrier runs between steps: its own latency
    (a gloo barrier is 0.1-1 ms) would be counted in every step, and no training loop pays it.
    (Per step, the largest of the ranks' times would count each rank's jitter: ranks coupled
    by exchanges take turns at waiting for each other.)"""
    for i in range(warmup):
        step(i)
    if sync is not None:
        sync()
    times = []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    return _slowest_rank(times) if sync is not None else times


def _slowest_rank(times: list[float]) -> list[float]:
    """The ``times`` of the rank whose median is the largest (collective: one all-gather)."""
    import torch.distributed as dist

    from sharded_embedding.distributed import all_gather_single

    mine = torch.tensor(times, dtype=torch.float64)
    every = torch.zeros(dist.get_world_size() * mine.numel(), dtype=torch.float64)
    all_gather_single(every, mine)
    every = every.view(dist.get_world_size(), -1)
    return every[int(every.median(1).values.argmax())].tolist()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def summary(times: list[float], lookups_per_step: int, **extra) -> dict:
    med = statistics.median(times)
    # inclusive: within the times measured (the default method extrapolates past them on few steps)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [med] * 9
    return dict(
        median_step_ms=round(med * 1e3, 3),
        p10_step_ms=round(qs[0] * 1e3, 3),
        p90_step_ms=round(qs[-1] * 1e3, 3),
        lookups_per_s=round(lookups_per_step / med, 1),
        **extra,
    )


def launch_workers(script: str, args: list[str], world: int, timeout: float, label: str) -> list[dict]:
    """Run ``script args`` under torchrun on ``world`` local ranks (one thread each) and return
    the records its workers `emit`; SystemExit naming ``label`` with stderr's tail if none came."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.abspath(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    rows = [json.loads(ln[len("RESULT "):]) for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not rows:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return rows


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def setup_distributed(bind_cpus: bool) -> tuple[int, int]:
    """A benchmark worker's gloo group under torchrun: (rank, world size)."""
    import torch.distributed as dist

    from sharded_embedding import init_distributed

    init_distributed("gloo", bind_cpus=bind_cpus)
    return dist.get_rank(), dist.get_world_size()


def gather_floats(value: float) -> list[float]:
    """Every rank's ``value`` (collective), rounded to 0.1."""
    import torch.distributed as dist

    from sharded_embedding.distributed import all_gather_single

    out = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    all_gather_single(out, torch.tensor([value], dtype=torch.float64))
    return [round(float(v), 1) for v in out]


# ------------------------------------------------------------------ paired jobs (ab_trees.py, limit_paired.py)
def add_paired_args(ap, workloads: dict) -> None:
    """The arguments of a driver that times several step kinds in one torchrun job, in blocks."""
    import argparse

    ap.add_argument("--workload", default="S", choices=sorted(workloads))
    ap.add_argument("--rows", type=int, default=None, help="table rows (default: the workload's)")
    ap.add_argument("--dim", type=int, default=None, help="embedding dim (default: the workload's)")
    ap.add_argument("--batch", type=int, default=None, help="ids per rank per step (default: the workload's)")
    ap.add_argument("--dists", default="zipf,uniform")
    ap.add_argument("--optimizers", default="sgd,rowwise_adagrad", help="fused optimizers, comma separated")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=30, help="blocks of steps per kind")
    ap.add_argument("--block-steps", type=int, default=50)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds allowed per configuration")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dist", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default=None, help=argparse.SUPPRESS)


def check_paired_args(ap, a) -> None:
    """argparse errors for counts below 1 and unknown --dists/--optimizers, before any run."""
    for name in ("blocks", "block_steps", "world", "timeout", "rows", "dim", "batch"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    bad = [d for d in a.dists.split(",") if d not in ("zipf", "uniform")] + \
        [o for o in a.optimizers.split(",") if o not in ("sgd", "adagrad", "rowwise_adagrad", "adam")]
    if bad:
        ap.error(f"unknown --dists/--optimizers {bad}")


def paired_sizes(a, workloads: dict) -> tuple[int, int, int]:
    """(rows, dim, ids per rank) of a paired run: the workload's unless given."""
    sizes = workloads[a.workload]
    return a.rows or sizes["rows"], a.dim or sizes["dim"], a.batch or sizes["batch"]


def time_in_blocks(run, kinds: list[str], blocks: int, block_steps: int, warmup: int = 10) -> dict[str, list[float]]:
    """In a paired job's worker: ``run(kind, first_step, steps)`` for every kind, ``warmup``
    steps each, then ``blocks`` rounds of ``block_steps`` steps of each kind in a rotating order
    (two kinds: ABBA), each block between two barriers. Returns each kind's ms per step, block by
    block (the slowest rank's: the closing barrier waits for it). Collective: every rank calls
    ``run`` for every kind (a kind may do nothing on some ranks)."""
    import torch.distributed as dist

    for kind in kinds:
        dist.barrier()
        run(kind, 0, warmup)
    times = {kind: [] for kind in kinds}
    for block in range(blocks):
        for j in range(len(kinds)):
            kind = kinds[(block + j) % len(kinds)]
            dist.barrier()
            t = time.perf_counter()
            run(kind, block * block_steps, block_steps)
            dist.barrier()
            times[kind].append((time.perf_counter() - t) / block_steps * 1e3)
    return times


def run_in_session(cmd: list[str], env: dict, timeout: float, what: str, cwd=None):
    """Run ``cmd`` (a torchrun job) in its own session and process group; returns (the finished
    Popen, stdout, stderr). On ``timeout`` every process the job started is killed -- torchrun,
    and its workers, which torchrun starts in sessions of their own (so a kill of torchrun's
    group misses them, and they would keep the output pipes open) -- and SystemExit says so."""
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                           start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(job.pid)
        job.communicate()
        raise SystemExit(f"{what}: no result within --timeout {timeout} s (the job and its workers were stopped)") \
            from None
    return job, out, err


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant, wherever their sessions are
    (Linux: parents read from /proc). ``pid`` is stopped first, so that it starts no new child
    and its children are not handed to init before they are found."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    for _ in range(3):  # (a child may have been starting while the tree was read)
        for child in descendants(pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (read from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_worker_job(script: str, world: int, args: list[str], timeout: float, what: str) -> list[list[str]]:
    """Run ``script --worker *args`` under torchrun on ``world`` ranks (one thread each); returns
    the fields of every ``RESULT`` line it printed (its rank 0), in order. SystemExit when the
    job fails, prints none, or outlasts ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.abspath(script), "--worker", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    job, out, err = run_in_session(cmd, env, timeout, what)
    found = [line.split()[1:] for line in out.splitlines() if line.startswith("RESULT ")]
    if job.returncode or not found:
        raise SystemExit(f"{what} failed (exit {job.returncode}):\n{err[-3000:]}")
    return found


def run_paired(a, script: str, extra: list[str]) -> list[list[str]]:
    """Run ``script --worker`` under torchrun for every (dist, optimizer) of ``a``; returns the
    fields of each job's ``RESULT`` line (printed by its rank 0), in order. SystemExit when a
    job fails or outlasts ``a.timeout``."""
    results = []
    for dist_name in a.dists.split(","):
        for opt in a.optimizers.split(","):
            args = [*extra, "--workload", a.workload, "--dist", dist_name, "--optimizer", opt,
                    "--blocks", str(a.blocks), "--block-steps", str(a.block_steps)]
            args += [f"--{name}={getattr(a, name)}" for name in ("rows", "dim", "batch") if getattr(a, name) is not None]
            found = run_worker_job(script, a.world, args, a.timeout, f"{dist_name} {opt}")
            results.append(found[0])
            print(f"  {dist_name} {opt}: {' '.join(found[0][2:])}", flush=True)
    return results
