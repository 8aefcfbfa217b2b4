"""The placement planner against round robin: imbalance and step rate, measured, with predictions.

    python benchmarks/placement.py                        # 1M x 64, Zipf(1.05), 8192 ids per rank, 2 and 4 ranks
    python benchmarks/placement.py --worlds 2 --reps 5 --markdown out.md

For each world size, one torchrun launch builds `ShardedEmbedding` tables (fused row-wise
Adagrad) placed by:

- ``plan``: ``plan_placement(rows, dim, world, batch_size=batch, law="zipf:1.05",
  optimizer="rowwise_adagrad")`` (its page size and placement as is);
- ``round robin 512`` and ``round robin 50000``: the same table, round robin at those page sizes.

Every table is built and warmed up first; then ``--reps`` rounds each time ``--steps``
barrier-bracketed steps (the slowest rank's step) of every table in turn, the order rotating
from round to round, on the same frequency-sorted Zipf ids (benchmarks/workload.py). This fine
interleaving is what makes placements comparable on a machine whose load drifts. Reported per
placement: the median step over all rounds (and each round's), rows served per rank per step
(``emb.stats()`` after the warm-up), their imbalance (max/mean) measured and predicted, bytes
sent per rank per step measured and predicted, and the modelled step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's sharded_embedding, not an installed one


def _plans(a, world: int) -> list[tuple[str, object]]:
    """(name, PlacementPlan) of each placement: the plan, then the round robin baselines (predicted)."""
    from sharded_embedding.planning import plan_placement, predict_placement

    law = dict(law=f"zipf:{a.zipf}", batch_size=a.batch, optimizer="rowwise_adagrad")
    out = [("plan", plan_placement(a.rows, a.dim, world, **law))]
    for size in a.round_robin:
        out.append((f"round robin {size}", predict_placement(a.rows, a.dim, world, page_size=size, **law)))
    return out


def _worker(a) -> None:
    import torch.distributed as dist

    from sharded_embedding import ShardedEmbedding, finish, init_distributed
    from workload import emit, make_ids, make_loss_weight, time_steps

    init_distributed("gloo", bind_cpus=not a.no_bind_cpus)
    rank, world = dist.get_rank(), dist.get_world_size()
    plans = _plans(a, world)
    ids = make_ids(a.rows, a.batch, a.warmup + a.steps, rank, "zipf", zipf_s=a.zipf, seed=a.seed)
    w = make_loss_weight(a.batch, a.dim, rank, a.seed)
    tables = {}
    for name, plan in plans:  # every table is built (and warmed up) before any timing
        emb = ShardedEmbedding(a.rows, a.dim, page_size=plan.page_size, placement=plan.placement,
                               fused_optimizer={"name": "rowwise_adagrad", "lr": 0.05})
        for k in range(a.warmup):
            (emb(ids[k]) * w).sum().backward()
        emb.stats(reset=True)
        tables[name] = emb
    times = {name: [] for name, _ in plans}
    for rep in range(a.reps):
        shift = rep % len(plans)  # rotate the order, so that every placement runs first in some rounds
        for name, _ in plans[shift:] + plans[:shift]:
            emb = tables[name]
            step = lambda k: (emb(ids[a.warmup + k]) * w).sum().backward()  # noqa: E731
            times[name].append(time_steps(step, 0, a.steps, sync=dist.barrier))
    for name, _ in plans:
        st = tables[name].stats()
        every = [None] * world
        dist.all_gather_object(every, {k: st[k] for k in ("calls", "rows_served_per_rank", "bytes_sent",
                                                          "mirror_rows_reduced", "unique_ids")})
        if rank == 0:
            flat = [t for block in times[name] for t in block]
            emit(dict(world=world, name=name, median_step_ms=statistics.median(flat) * 1e3,
                      round_ms=[statistics.median(block) * 1e3 for block in times[name]], ranks=every))
    finish()


def _launch(a, world: int) -> list[dict]:
    from workload import launch_workers

    return launch_workers(__file__, ["--worker", *sys.argv[1:]], world, a.timeout, f"world {world}")


def _table(a, world: int, runs: list[dict]) -> str:
    import numpy as np

    plans = dict(_plans(a, world))
    head = ("| placement | page size | pages (mirrored) | median step ms (each round's) | M lookups/s | rows served per "
            "rank-step, measured | imbalance measured (predicted) | served: measured / predicted | MiB sent per "
            "rank-step, measured (predicted) | modelled step ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, plan in plans.items():
        run = next(r for r in runs if r["name"] == name)
        served = np.array([sum(s["rows_served_per_rank"]) / s["calls"] for s in run["ranks"]])
        sent = np.array([s["bytes_sent"] / s["calls"] for s in run["ranks"]])
        pred = plan.ranks
        each = ", ".join("%.1f" % ms for ms in run["round_ms"])
        lines.append(
            f"| {name} | {plan.page_size:,} | {plan.num_pages:,} ({len(plan.mirrored_pages)}) | "
            f"{run['median_step_ms']:.2f} ({each}) "
            f"| {world * a.batch / run['median_step_ms'] / 1e3:.3f} | {', '.join(f'{v:,.0f}' for v in served)} | "
            f"{served.max() / served.mean():.3f} ({plan.imbalance:.3f}) | "
            f"{', '.join(f'{m / p:.3f}' for m, p in zip(served, pred.rows_served))} | "
            f"{sent.mean() / 2**20:.2f} ({pred.bytes_sent.mean() / 2**20:.2f}) | {plan.step_seconds * 1e3:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8192, help="ids per rank per step")
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--round-robin", type=lambda s: [int(x) for x in s.split(",")], default=[512, 50_000],
                    help="round robin page sizes to compare")
    ap.add_argument("--reps", type=int, default=10, help="rounds")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per table per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bind-cpus", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None, help="append every run as a JSON line")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a)
        return
    import torch

    out = []
    for world in (int(w) for w in a.worlds.split(",")):
        runs = _launch(a, world)
        if a.json:
            with open(a.json, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in runs)
        title = (f"### {a.rows:,} x {a.dim} fp32, Zipf({a.zipf}) frequency-sorted, {a.batch} ids per rank, {world} ranks "
                 f"(gloo, 1 thread each{'' if a.no_bind_cpus else ', pinned'}), fused row-wise Adagrad; median of "
                 f"{a.reps} interleaved rounds of {a.steps} steps after {a.warmup}; {time.strftime('%Y-%m-%d')}, "
                 f"torch {torch.__version__}, {os.cpu_count()} CPUs")
        text = title + "\n\n" + _table(a, world, runs) + "\n"
        print(text, flush=True)
        out.append(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main()
