"""A lookup's per-row kernels alone: the compiled loops (`native`) against PyTorch's, paired.

    python benchmarks/row_kernels.py                  # S's and M's sizes, 300 reps
    python benchmarks/row_kernels.py --cases 500000x64x4000 --expand '' --sums '' --reps 1000

**Gathers** (`native.index_select` against ``torch.index_select``).
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

**The backward's gradient sum** (`native.bag_sum` against what the lookup does without it:
``F.embedding_bag`` over the output gradient with the SGD scale as per-sample weights, a copy
of the peers' half of the sums into a send buffer, and the non-finite test's sum). ``--sums``
cases are ``LAWxDIMxN``: N ids drawn uniform or Zipf (s = 1.05) from 1M rows, a fresh output
gradient of N x DIM per call, half of the unique ids' sums going to the send buffer.

Reported: each kernel's median µs, and the median of the paired per-rep ratios compiled / torch.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # workload.py, and the package of this checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sharded_embedding import native  # noqa: E402
from sharded_embedding.storage import allocate  # noqa: E402
from workload import make_ids  # noqa: E402

DEFAULT_CASES = "500000x64x4000,5000000x128x8000"  # one rank's S and M shard, its peers' rows
DEFAULT_EXPAND = "8000x64x8192,14000x128x16384"  # S's and M's unique rows -> ids
DEFAULT_SUMS = "uniformx64x8192,zipfx64x8192,uniformx128x16384,zipfx128x16384"  # S's and M's backward
LAWS = ("uniform", "zipf")


def _cases(text: str, flag: str, ap, laws: bool = False) -> list[tuple]:
    """``ROWSxDIMxN`` (or ``LAWxDIMxN``) cases, comma separated."""
    cases = []
    for case in (c for c in text.split(",") if c):
        parts = case.split("x")
        try:
            head = parts[0] if laws else int(parts[0])
            numbers = [int(v) for v in parts[1:]]
        except ValueError:
            numbers = []
        if len(numbers) != 2 or min(numbers) < 1 or (head not in LAWS if laws else head < 1):
            what = "LAWxDIMxN (LAW uniform or zipf, DIM and N positive ints)" if laws else "ROWSxDIMxN of positive ints"
            ap.error(f"{flag} takes {what}, comma separated; got {text!r}")
        cases.append((head, *numbers))
    return cases


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="ROWSxDIMxN gathers from a shard ('' for none)")
    ap.add_argument("--expand", default=DEFAULT_EXPAND, help="ROWSxDIMxN gathers from a hot buffer ('' for none)")
    ap.add_argument("--sums", default=DEFAULT_SUMS, help="LAWxDIMxN gradient sums ('' for none)")
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    a.cases, a.expand = _cases(a.cases, "--cases", ap), _cases(a.expand, "--expand", ap)
    a.sums = _cases(a.sums, "--sums", ap, laws=True)
    if not native.built():
        ap.error("the compiled extension is not built (or SHARDED_EMBEDDING_NATIVE=0): nothing to compare")
    return a


def paired(kernels: dict, fresh, reps: int) -> dict:
    """Median seconds of each of the two ``kernels`` (called with ``fresh()``'s arguments, new
    for every call), in random order within each rep, and the median paired ratio compiled / torch."""
    times = {k: [] for k in kernels}
    for _ in range(reps):
        for name in random.sample(list(kernels), len(kernels)):
            args = fresh()
            start = time.perf_counter()
            kernels[name](*args)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(c / t for c, t in zip(times["compiled"], times["torch"]))
    return {k: statistics.median(v) * 1e6 for k, v in times.items()} | {"ratio": ratio}


def gathers(rows: int, dim: int, n: int, reps: int, hot: bool) -> dict:
    """Both gathers on one case."""
    table = torch.randn(rows, dim) if hot else allocate((rows, dim), torch.float32, torch.device("cpu"))
    if not hot:
        table.normal_()
    out = torch.empty(n, dim)

    def fresh():
        picked = torch.randint(0, rows, (n,))
        return (picked,) if hot else (picked.sort().values,)  # owner rows come sorted

    return paired({"torch": lambda r: torch.index_select(table, 0, r, out=out),
                   "compiled": lambda r: native.index_select(table, r, out=out)}, fresh, reps)


def sums(law: str, dim: int, n: int, reps: int) -> dict:
    """Both gradient sums on one case (fused SGD's scale, half the unique ids' rows sent)."""
    ids = make_ids(1_000_000, n, reps * 2, 0, law)
    draws = iter(ids)
    scale = -0.01

    def fresh():
        flat = next(draws)
        _, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
        perm = torch.argsort(inverse, stable=True)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]])
        bags = offsets.numel()
        send, own = torch.empty(bags // 2, dim), torch.empty(bags - bags // 2, dim)
        return torch.randn(n, dim), perm, offsets, send, own

    weights = torch.full((n,), scale)

    def in_torch(grad, perm, offsets, send, own):
        summed = F.embedding_bag(perm, grad, offsets, mode="sum", per_sample_weights=weights)
        send.copy_(summed[: send.shape[0]])
        return math.isfinite(summed.sum().item())

    return paired({"torch": in_torch,
                   "compiled": lambda grad, perm, offsets, send, own: native.bag_sum(grad, perm, offsets, scale, send,
                                                                                     own)}, fresh, reps)


def main(argv=None):
    a = _args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, {a.reps} reps\n")
    print("| kernel | case | PyTorch µs | compiled µs | compiled / PyTorch (paired median) |")
    print("|---|---|---|---|---|")
    for hot, cases in ((False, a.cases), (True, a.expand)):
        for rows, dim, n in cases:
            r = gathers(rows, dim, n, a.reps, hot)
            what = "expand to ids (hot buffer)" if hot else "gather from a shard"
            print(f"| {what} | {n:,} rows of {dim} from {rows:,} | {r['torch']:.1f} | {r['compiled']:.1f} | "
                  f"{r['ratio']:.3f}x |", flush=True)
    for law, dim, n in a.sums:
        r = sums(law, dim, n, a.reps)
        print(f"| gradient sum | {n:,} {law} ids x {dim} | {r['torch']:.1f} | {r['compiled']:.1f} | {r['ratio']:.3f}x |",
              flush=True)


if __name__ == "__main__":
    main()
