"""Training-step throughput of ShardedEmbedding against baselines, on the same ids, in one run.

    python benchmarks/lookup.py                       # 1M x 64, 8192 ids per rank, 2 ranks
    python benchmarks/lookup.py --rows 10000000 --dim 128 --batch 16384

A step is: forward lookup of each rank's ids -> loss = (out * w).sum() -> backward ->
optimizer step. The driver runs every (system, distribution) pair one after another in its
own process(es): distributed systems under torchrun on gloo, single-process baselines with
plain python. It prints a table with each system's median step time, lookups/s over all
ranks, and the ratio to the single-process baseline measured in the same run.

Systems:
  ours_sgd      ShardedEmbedding (round robin pages, sparse gradients) + torch.optim.SGD
  single_sparse one process, the whole table: nn.Embedding(sparse=True) + torch.optim.SGD,
                looking up all ranks' ids each step (the no-communication limit)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DISTRIBUTED = {"ours_sgd"}
SINGLE = {"single_sparse"}
BASELINE = "single_sparse"


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8192, help="ids per rank per step")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dists", default="zipf,uniform")
    ap.add_argument("--systems", default="ours_sgd,single_sparse")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dist", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------- workers
def _worker_ours(a):
    import torch
    import torch.distributed as dist

    from sharded_embedding import ShardedEmbedding
    from workload import emit, make_ids, make_loss_weight, peak_rss_mib, summary, time_steps

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = make_ids(a.rows, a.batch, a.warmup + a.steps, rank, a.dist, seed=a.seed)
    w = make_loss_weight(a.batch, a.dim, rank, a.seed)
    t = time.perf_counter()
    emb = ShardedEmbedding(a.rows, a.dim, page_size=a.page_size)
    init_s = time.perf_counter() - t
    opt = torch.optim.SGD(emb.parameters(), lr=a.lr)

    def step(i):
        (emb(ids[i]) * w).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, a.warmup, a.steps, sync=dist.barrier)
    rss = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(rss, torch.tensor([peak_rss_mib()], dtype=torch.float64))
    rss = [round(float(t), 1) for t in rss]
    if rank == 0:
        emit(summary(times, world * a.batch, system="ours_sgd", dist=a.dist, world=world,
                     init_s=round(init_s, 2), peak_rss_mib_per_rank=rss))


def _worker_single(a):
    import torch

    from workload import emit, make_ids, make_loss_weight, peak_rss_mib, summary, time_steps

    n = a.warmup + a.steps
    per_rank = [make_ids(a.rows, a.batch, n, r, a.dist, seed=a.seed) for r in range(a.world)]
    ids = [torch.cat([per_rank[r][i] for r in range(a.world)]) for i in range(n)]
    w = torch.cat([make_loss_weight(a.batch, a.dim, r, a.seed) for r in range(a.world)])
    emb = torch.nn.Embedding(a.rows, a.dim, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=a.lr)

    def step(i):
        (emb(ids[i]) * w).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, a.warmup, a.steps)
    emit(summary(times, a.world * a.batch, system="single_sparse", dist=a.dist, world=1,
                 peak_rss_mib_per_rank=[round(peak_rss_mib(), 1)]))


# ---------------------------------------------------------------------------------- driver
def _run_one(a, system: str, dist: str) -> dict:
    common = [f"--rows={a.rows}", f"--dim={a.dim}", f"--batch={a.batch}", f"--world={a.world}",
              f"--page-size={a.page_size}", f"--steps={a.steps}", f"--warmup={a.warmup}", f"--lr={a.lr}",
              f"--seed={a.seed}", f"--worker={system}", f"--dist={dist}"]
    script = os.path.abspath(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if system in DISTRIBUTED:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.world}",
               script, *common]
    else:
        cmd = [sys.executable, script, *common]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return dict(system=system, dist=dist, failed=True, rc=done.returncode, error="\n".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    a = _args(argv)
    if a.worker:
        {"ours_sgd": _worker_ours, "single_sparse": _worker_single}[a.worker](a)
        if a.worker in DISTRIBUTED:
            from sharded_embedding import finish

            finish()
        return
    systems = a.systems.split(",")
    dists = a.dists.split(",")
    print(f"# {a.rows} x {a.dim} fp32, {a.batch} ids per rank, {a.world} ranks (gloo, 1 thread each), "
          f"page_size {a.page_size}, {a.steps} timed steps after {a.warmup}; "
          f"{time.strftime('%Y-%m-%d')}, torch {__import__('torch').__version__}", flush=True)
    results = []
    for dist in dists:
        for system in systems:
            r = _run_one(a, system, dist)
            r.update(rows=a.rows, dim=a.dim, batch=a.batch)
            results.append(r)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            print(f"  ran {system} / {dist}: " + ("FAILED" if r.get("failed") else f"{r['median_step_ms']} ms"),
                  file=sys.stderr, flush=True)
    print("\n| system | ids | median step ms | p10-p90 ms | M lookups/s | vs single process | peak RSS MiB per rank |")
    print("|---|---|---|---|---|---|---|")
    for dist in dists:
        base = next((r for r in results if r["system"] == BASELINE and r["dist"] == dist and not r.get("failed")), None)
        for r in (r for r in results if r["dist"] == dist):
            if r.get("failed"):
                print(f"| {r['system']} | {dist} | failed (rc {r['rc']}) | | | | |")
                print(r["error"], file=sys.stderr)
                continue
            ratio = f"{r['lookups_per_s'] / base['lookups_per_s']:.2f}x" if base else "-"
            print(f"| {r['system']} | {dist} | {r['median_step_ms']:.2f} | {r['p10_step_ms']:.2f}-{r['p90_step_ms']:.2f} "
                  f"| {r['lookups_per_s'] / 1e6:.2f} | {ratio} | {', '.join(map(str, r['peak_rss_mib_per_rank']))} |")


if __name__ == "__main__":
    main()
