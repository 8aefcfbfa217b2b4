"""`fused_optimizer(model)` at the size the package is for: what a scheduler costs a step, and
what torch.distributed.checkpoint's helpers allocate with it.

One ``--rows`` x ``--dim`` float32 table with fused row-wise Adagrad and a dense head under
DDP, ``--ids`` Zipf ids per rank and step. Timed: steps with a LambdaLR on
``fused_optimizer(model)`` (``sched.step()`` every step: a hyperparameter write, its check,
a new digest at the next lookup) against the same steps without one, in interleaved rounds of
``--steps`` steps, ``--rounds`` times. Then the resident memory before and after
``get_state_dict(model, (fused_optimizer(model), dense))`` (before this package gave the
optimizer state for each table, torch's helper ran a fake first step that gave each table a
dense zero gradient: a second copy of the shard). Peak RSS per rank.

    torchrun --nproc-per-node 2 benchmarks/fused_schedule_scale.py --rows 10000000 --dim 128

Rank 0 prints one JSON line per round and a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from sharded_embedding import ShardedEmbedding, finish, fused_optimizer, init_distributed  # noqa: E402
from workload import current_rss_mib, peak_rss_mib  # noqa: E402


class Model(nn.Module):
    def __init__(self, rows: int, dim: int, page_size: int):
        super().__init__()
        self.emb = ShardedEmbedding(rows, dim, page_size=page_size,
                                    fused_optimizer={"name": "rowwise_adagrad", "lr": 0.05})
        self.head = nn.Linear(dim, 1)

    def forward(self, ids):
        return self.head(self.emb(ids)).square().mean()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=512)
    p.add_argument("--ids", type=int, default=16384)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    init_distributed()
    torch.set_num_threads(1)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Model(a.rows, a.dim, a.page_size)
    ddp = DDP(model)
    dense = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    table_opt = fused_optimizer(ddp)
    sched = torch.optim.lr_scheduler.LambdaLR(table_opt, lambda s: 1.0 / (1.0 + 1e-3 * s))
    gen = torch.Generator().manual_seed(1 + rank)
    weights = 1.0 / torch.arange(1, a.rows + 1, dtype=torch.float64) ** 1.05
    batches = [torch.multinomial(weights, a.ids, replacement=True, generator=gen) for _ in range(8)]

    def run(steps: int, scheduled: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for i in range(steps):
            ddp(batches[i % len(batches)]).backward()
            dense.step()
            dense.zero_grad(set_to_none=True)
            table_opt.step()
            if scheduled:
                sched.step()
        dist.barrier()
        return (time.perf_counter() - start) / steps * 1e3

    run(3, True)  # warm up
    times = {"scheduled": [], "unscheduled": []}
    for r in range(a.rounds):
        for kind in (("scheduled", "unscheduled") if r % 2 == 0 else ("unscheduled", "scheduled")):
            ms = run(a.steps, kind == "scheduled")
            times[kind].append(ms)
            if rank == 0:
                print(json.dumps({"round": r, "kind": kind, "ms_per_step": round(ms, 2)}), flush=True)
    before = current_rss_mib()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    get_state_dict(ddp, (table_opt, dense))
    grown = current_rss_mib() - before
    no_grad = model.emb.weight.grad is None
    facts = torch.tensor([grown, peak_rss_mib(), float(no_grad)], dtype=torch.float64)
    every = [torch.zeros_like(facts) for _ in range(dist.get_world_size())]
    dist.all_gather(every, facts)
    if rank == 0:
        s, u = statistics.median(times["scheduled"]), statistics.median(times["unscheduled"])
        print(json.dumps({
            "rows": a.rows, "dim": a.dim, "ids_per_rank": a.ids, "rounds": a.rounds, "steps_per_round": a.steps,
            "scheduled_ms_median": round(s, 2), "unscheduled_ms_median": round(u, 2),
            "scheduled_over_unscheduled": round(s / u, 3),
            "get_state_dict_rss_growth_mib_per_rank": [round(float(f[0]), 1) for f in every],
            "table_grad_none_after_get_state_dict": [bool(f[2]) for f in every],
            "peak_rss_mib_per_rank": [round(float(f[1]), 1) for f in every]}), flush=True)
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
