"""The owner's gather alone: `native.index_select` (compiled, prefetching) against torch.index_select.

    python benchmarks/gather.py                       # S's and M's shard sizes, 300 reps
    python benchmarks/gather.py --cases 500000x64x4000 --reps 1000

A lookup's owner copies the rows its requesters asked for out of its shard (one rank's half of
the table: rows at random places of a table far larger than the caches), and the requester
copies each id's row out of the gathered rows (a small buffer, in cache). Both were
``torch.index_select``; the compiled gather asks for each row 16 rows ahead, so that the
memory system fetches several rows at once where PyTorch's kernel waits for each in turn.

One process, pinned to one core, one intra-op thread (as a rank under torchrun). Each case is
``ROWSxDIMxN``: a float32 table of ROWS x DIM on huge pages (`storage.allocate`, as a shard),
N sorted random rows gathered into a reused ``out`` (as `lookup.ShardedLookup.forward` does).
Every call gets rows drawn afresh, so that neither kernel finds rows the other just read in
the caches; the two kernels alternate in random order within each rep. ``--expand`` cases
gather N rows out of a hot buffer of ROWS rows instead (the requester's expand to ids).
Reported: each kernel's median µs, and the median of the paired per-rep ratios compiled / torch.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the package of this checkout

import torch  # noqa: E402

from sharded_embedding import native  # noqa: E402
from sharded_embedding.storage import allocate  # noqa: E402

DEFAULT_CASES = "500000x64x4000,5000000x128x8000"  # one rank's S and M shard, its peers' rows
DEFAULT_EXPAND = "8000x64x8192,14000x128x16384"  # S's and M's unique rows -> ids


def _cases(text: str, flag: str, ap) -> list[tuple[int, int, int]]:
    try:
        cases = [tuple(int(v) for v in c.split("x")) for c in text.split(",") if c]
    except ValueError:
        cases = [()]
    if any(len(c) != 3 or min(c) < 1 for c in cases):
        ap.error(f"{flag} takes ROWSxDIMxN cases of positive ints, comma separated, got {text!r}")
    return cases


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="ROWSxDIMxN gathers from a shard (comma separated)")
    ap.add_argument("--expand", default=DEFAULT_EXPAND, help="ROWSxDIMxN gathers from a hot buffer ('' for none)")
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    a.cases, a.expand = _cases(a.cases, "--cases", ap), _cases(a.expand, "--expand", ap)
    if not native.built():
        ap.error("the compiled extension is not built (or SHARDED_EMBEDDING_NATIVE=0): nothing to compare")
    return a


def measure(rows: int, dim: int, n: int, reps: int, hot: bool) -> dict:
    """Both kernels on one case: median µs of each, median paired ratio compiled / torch."""
    table = torch.randn(rows, dim) if hot else allocate((rows, dim), torch.float32, torch.device("cpu"))
    if not hot:
        table.normal_()
    out = torch.empty(n, dim)
    kernels = {"torch": lambda r: torch.index_select(table, 0, r, out=out),
               "compiled": lambda r: native.index_select(table, r, out=out)}
    times = {k: [] for k in kernels}
    for _ in range(reps):
        for name in random.sample(list(kernels), len(kernels)):
            picked = torch.randint(0, rows, (n,))
            if not hot:
                picked = picked.sort().values  # owner rows come sorted
            start = time.perf_counter()
            kernels[name](picked)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(c / t for c, t in zip(times["compiled"], times["torch"]))
    return {k: statistics.median(v) * 1e6 for k, v in times.items()} | {"ratio": ratio}


def main(argv=None):
    a = _args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, {a.reps} reps\n")
    print("| gather | rows x dim | rows gathered | torch.index_select µs | compiled µs | compiled / torch (paired median) |")
    print("|---|---|---|---|---|---|")
    for hot, cases in ((False, a.cases), (True, a.expand)):
        for rows, dim, n in cases:
            r = measure(rows, dim, n, a.reps, hot)
            where = "hot buffer (expand)" if hot else "shard (owner)"
            print(f"| {where} | {rows:,} x {dim} | {n:,} | {r['torch']:.1f} | {r['compiled']:.1f} | {r['ratio']:.3f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
