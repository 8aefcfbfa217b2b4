"""Ours against the single-process limit and the no-exchange bound, paired in one job.

    python benchmarks/limit_paired.py                      # S, zipf and uniform, SGD and row-wise Adagrad
    python benchmarks/limit_paired.py --workload M --blocks 12 --block-steps 20

The same three step kinds as `lookup.py`'s ``ours_fused_*``, ``single_fused_*`` and
``bound_no_exchange_*``, but in one torchrun job, so that the machine's drift (on a shared
machine, runs of one system differ by up to 40% from one to the next) hits all three alike:

- **ours**: a `ShardedEmbedding` over all ranks (shared memory), each rank its own ids;
- **limit**: rank 0 alone holding the whole table, looking up every rank's ids each step (the
  other ranks wait, idle, at the block's barrier), in each of `lookup.py`'s two single-process
  forms: ``fused``, our table in a group of one with the fused optimizer (``single_fused_*``),
  and ``sparse``, ``nn.Embedding(sparse=True)`` on huge pages with ``torch.optim.SGD`` or
  `lookup.RowwiseAdagrad` on the coalesced gradient (``single_sparse*``; SGD and row-wise
  Adagrad only); the limit is the fastest of them (``--limits`` picks them). ``--limit-threads
  1,2`` runs each form also with 2 intra-op threads on all the ranks' cores (the others idle at
  the barrier then): PyTorch's parallel kernels instead of the compiled one-thread loops, the
  single process's best use of the machine; kinds ``fused_2threads``, ``sparse_2threads``;
- **bound**: every rank a group of one holding 1/world of the rows, looking up its own ids
  (modulo its row count) while the others do the same: no routing, no exchange.

Blocks of steps of each alternate in a rotating order; reported per configuration: each one's
median block step time, and the medians of the per-block ratios limit / ours and limit / bound
(above 1: faster than one process), the limit being the fastest single process. The fused optimizer, ``tune_malloc()`` and
one pinned thread per rank are `lookup.py`'s. All tables live in the same processes, so caches
hold the others' rows too: absolute times are not `lookup.py`'s; the ratios are the point.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # workload.py, and the package of this checkout

from lookup import WORKLOADS  # noqa: E402
from workload import add_paired_args, check_paired_args, paired_sizes, run_paired, time_in_blocks  # noqa: E402

LIMITS = ("fused", "sparse")


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paired_args(ap, WORKLOADS)
    ap.add_argument("--limits", default="fused,sparse", help="single-process forms, comma separated: fused, sparse")
    ap.add_argument("--limit-threads", default="1",
                    help="intra-op threads of the single process, comma separated (e.g. 1,2): each form runs with each")
    a = ap.parse_args(argv)
    check_paired_args(ap, a)
    try:
        threads = [int(t) for t in a.limit_threads.split(",")]
    except ValueError:
        threads = []
    if not threads or any(not 1 <= t <= len(os.sched_getaffinity(0)) for t in threads) or len(set(threads)) < len(threads):
        ap.error(f"--limit-threads must be distinct counts from 1 to this process's {len(os.sched_getaffinity(0))} "
                 f"CPUs, got {a.limit_threads!r}")
    limits = a.limits.split(",")
    if not limits or any(x not in LIMITS for x in limits) or len(set(limits)) < len(limits):
        ap.error(f"--limits must name some of {list(LIMITS)}, each once")
    if "sparse" in limits and any(o not in ("sgd", "rowwise_adagrad") for o in a.optimizers.split(",")):
        ap.error("--limits sparse has SGD and row-wise Adagrad only: pass --limits fused for other optimizers")
    if paired_sizes(a, WORKLOADS)[0] < a.world:
        ap.error(f"--rows must be at least --world ({a.world}): the bound gives every rank 1/world of them")
    return a


def _worker(a) -> None:
    import torch
    import torch.distributed as dist

    import sharded_embedding
    from sharded_embedding import ShardedEmbedding
    from workload import make_ids, make_loss_weight

    if not sharded_embedding.tune_malloc():
        raise SystemExit("this C library has no mallopt")
    every_cpu = os.sched_getaffinity(0)  # before each rank is pinned to its share: the threaded limit's
    sharded_embedding.init_distributed("gloo", bind_cpus=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, dim, batch = paired_sizes(a, WORKLOADS)
    batches, fused = 200, {"name": a.optimizer, "lr": 0.05}
    alone = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    ids = make_ids(rows, batch, batches, rank, a.dist)
    w = make_loss_weight(batch, dim, rank)
    steps = {"ours": (ShardedEmbedding(rows, dim, page_size=512, fused_optimizer=fused, transport="shared_memory"),
                      ids, w)}
    part = rows // world
    steps["bound"] = (ShardedEmbedding(part, dim, page_size=512, fused_optimizer=fused, process_group=alone[rank]),
                      [x % part for x in ids], w)
    # every single-process kind: (the step it runs: a threaded form steps its one-thread form's table, threads)
    limit_kinds = {f"limit_{x}" + (f"_{t}threads" if t > 1 else ""): (f"limit_{x}", t)
                   for x in a.limits.split(",") for t in map(int, a.limit_threads.split(","))}
    limits = list(limit_kinds)
    if rank == 0:  # the limit: every rank's ids and loss weights, the whole table, one process
        everyone = [make_ids(rows, batch, batches, r, a.dist) for r in range(world)]
        all_ids = [torch.cat([everyone[r][i] for r in range(world)]) for i in range(batches)]
        all_w = torch.cat([make_loss_weight(batch, dim, r) for r in range(world)])
        if "fused" in a.limits.split(","):
            steps["limit_fused"] = (ShardedEmbedding(rows, dim, page_size=512, fused_optimizer=fused,
                                                     process_group=alone[0]), all_ids, all_w)
        if "sparse" in a.limits.split(","):
            from lookup import RowwiseAdagrad, _huge_page_weight

            table = torch.nn.Embedding(rows, dim, sparse=True, _weight=_huge_page_weight(rows, dim))
            opt = torch.optim.SGD(table.parameters(), lr=0.05) if a.optimizer == "sgd" else \
                RowwiseAdagrad(table.weight, lr=0.05)

            def sparse_step(batch_ids):
                out = table(batch_ids)
                opt.zero_grad(set_to_none=True)
                return out

            steps["limit_sparse"] = (sparse_step, all_ids, all_w, opt)
    kinds = ["ours", *limits, "bound"]

    def run(name: str, start: int, count: int) -> None:
        step, threads = limit_kinds.get(name, (name, 1))
        if step not in steps:  # (the limit, on the other ranks: wait at the barrier)
            return
        emb, batch_ids, weight, *opt = steps[step]
        if threads > 1:  # the single process on every rank's cores (rank 0 alone works in its blocks)
            mine = os.sched_getaffinity(0)
            os.sched_setaffinity(0, every_cpu)
            torch.set_num_threads(threads)
        for i in range(start, start + count):
            (emb(batch_ids[i % batches]) * weight).sum().backward()
            if opt:  # (nn.Embedding: the optimizer steps after the backward)
                opt[0].step()
        if threads > 1:
            torch.set_num_threads(1)
            os.sched_setaffinity(0, mine)

    times = time_in_blocks(run, kinds, a.blocks, a.block_steps)
    if rank == 0:
        med = {name: statistics.median(times[name]) for name in kinds}
        best = min(limits, key=med.get)  # the limit at its best
        vs_ours = statistics.median(lim / o for lim, o in zip(times[best], times["ours"]))
        vs_bound = statistics.median(lim / b for lim, b in zip(times[best], times["bound"]))
        others = ",".join(f"{x[len('limit_'):]}={med[x]:.3f}" for x in limits)
        print(f"RESULT {a.dist} {a.optimizer} {best[len('limit_'):]} {med[best]:.3f} {med['ours']:.3f} {vs_ours:.3f} "
              f"{med['bound']:.3f} {vs_bound:.3f} {others}", flush=True)
    sharded_embedding.finish()


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        _worker(a)
        return 0
    results = run_paired(a, __file__, ["--limits", a.limits, "--limit-threads", a.limit_threads])
    rows, dim, batch = paired_sizes(a, WORKLOADS)
    print(f"\n{rows:,} x {dim}, {batch} ids per rank, {a.world} ranks: median of {a.blocks} rotating blocks of "
          f"{a.block_steps} steps each\n")
    print("| ids | optimizer | limit (the fastest single process) | limit ms | ours ms | limit / ours (paired median) "
          "| bound ms | limit / bound (paired median) | every single process, ms |\n|---|---|---|---|---|---|---|---|---|")
    for d, o, form, lim, ours, vs_ours, bound, vs_bound, every in results:
        print(f"| {d} | {o} | {form} | {lim} | {ours} | {vs_ours}x | {bound} | {vs_bound}x | {every} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
