"""Calibrate the planner's cost model (`sharded_embedding.planning.CostModel`) on this machine.

    python benchmarks/plan_calibration.py                      # fit, print, write the coefficients
    python benchmarks/plan_calibration.py --reps 3 --out docs/plan_calibration.json --json runs.jsonl

1. Real training steps of `ShardedEmbedding` (1M x 64 fp32, fused row-wise Adagrad) on 1 and 2
   ranks (gloo group, one per core, pinned; rows through the default transport: shared memory on one machine), over placements chosen to spread the loads the model
   uses: round robin at several page sizes (balanced to very lopsided), all pages on one rank,
   the hottest pages mirrored (0 to 64 pages), Zipf(1.05) and uniform ids, 2k-32k ids per rank.
   Configurations are interleaved over ``--reps`` repetitions; each run reports the median of
   ``--steps`` barrier-bracketed steps and every rank's ``emb.stats()`` per call.
2. A least-squares fit (scipy) of ``step = per_call + per_peer (world - 1) + (mirror_sync if
   mirrors) + max over ranks (per_id ids + per_unique unique + per_owned_row (local + served) +
   per_wire_byte bytes + per_mirror_row mirror rows)`` on the median of each configuration
   (``per_peer`` is what the collectives add from 1 to 2 ranks), relative residuals,
   coefficients >= 0. Prints every configuration's measured and fitted step, the coefficients
   as JSON (what `plan_placement(cost_model=...)` takes), and writes them to ``--out``.
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

ROWS, DIM = 1_000_000, 64


def _configs(world: int) -> list[dict]:
    """(name, page_size, placement kind, id law, batch) of each configuration for ``world``."""
    c = []
    if world == 1:
        for dist, batch in (("zipf", 2048), ("zipf", 8192), ("zipf", 32768), ("uniform", 2048), ("uniform", 8192),
                            ("uniform", 32768)):
            c.append(dict(page=512, kind="rr", dist=dist, batch=batch))
        return c
    for dist, batch in (("zipf", 2048), ("zipf", 8192), ("zipf", 32768), ("uniform", 8192), ("uniform", 32768)):
        c.append(dict(page=512, kind="rr", dist=dist, batch=batch))
    for page in (50_000, 250_000):
        c.append(dict(page=page, kind="rr", dist="zipf", batch=8192))
    c.append(dict(page=512, kind="one_owner", dist="zipf", batch=8192))
    c.append(dict(page=512, kind="one_owner", dist="uniform", batch=8192))
    for hot in (1, 8, 64):
        c.append(dict(page=512, kind=f"mirror{hot}", dist="zipf", batch=8192))
    c.append(dict(page=512, kind="mirror64", dist="uniform", batch=8192))
    return c


def _placement(cfg: dict, world: int):
    pages = -(-ROWS // cfg["page"])
    if cfg["kind"] == "rr":
        return "round_robin"
    if cfg["kind"] == "one_owner":  # rank 0 holds every page but the last: it serves everything
        return [0] * (pages - 1) + [world - 1]
    hot = int(cfg["kind"][len("mirror"):])
    every = tuple(range(world))
    return [every] * hot + [p % world for p in range(hot, pages)]


def _worker(a) -> None:
    import torch.distributed as dist

    from sharded_embedding import ShardedEmbedding, finish, init_distributed
    from workload import emit, make_ids, make_loss_weight, time_steps

    init_distributed("gloo", bind_cpus=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    configs = _configs(world)
    ids = {}
    for rep in range(a.reps):
        for i, cfg in enumerate(configs):
            key = (cfg["dist"], cfg["batch"])
            if key not in ids:
                ids[key] = make_ids(ROWS, cfg["batch"], a.warmup + a.steps, rank, cfg["dist"], seed=a.seed)
            w = make_loss_weight(cfg["batch"], DIM, rank, a.seed)
            emb = ShardedEmbedding(ROWS, DIM, page_size=cfg["page"], placement=_placement(cfg, world),
                                   fused_optimizer={"name": "rowwise_adagrad", "lr": 0.05})

            def step(k):
                (emb(ids[key][k]) * w).sum().backward()
                if k == a.warmup - 1:
                    emb.stats(reset=True)

            times = time_steps(step, a.warmup, a.steps, sync=dist.barrier)
            st = emb.stats()
            mine = {k: st[k] for k in ("calls", "ids", "unique_ids", "local_unique_ids", "rows_served_per_rank",
                                       "bytes_sent", "bytes_received", "mirror_rows_reduced")}
            every = [None] * world
            dist.all_gather_object(every, mine)
            if rank == 0:
                emit(dict(world=world, rep=rep, config=i, **cfg, median_step_ms=statistics.median(times) * 1e3,
                          ranks=every))
            emb = None  # free the table before the next configuration builds its own
    finish()


def _launch(a, world: int, worker: str) -> list[dict]:
    from workload import launch_workers

    args = [f"--worker={worker}", f"--reps={a.reps}", f"--steps={a.steps}", f"--warmup={a.warmup}", f"--seed={a.seed}"]
    return launch_workers(__file__, args, world, a.timeout, f"world {world} ({worker})")


def features(run: dict):
    """Per-rank features per call (ids, unique, owned, wire bytes, mirror rows), mirrors used."""
    import numpy as np

    out = []
    for st in run["ranks"]:
        calls = max(st["calls"], 1)
        served = sum(st["rows_served_per_rank"])
        out.append([st["ids"] / calls, st["unique_ids"] / calls, (st["local_unique_ids"] + served) / calls,
                    (st["bytes_sent"] + st["bytes_received"]) / calls, st["mirror_rows_reduced"] / calls])
    return np.array(out), run["kind"].startswith("mirror") and run["world"] > 1, run["world"]


def fit(runs: list[dict]) -> tuple[dict, list[tuple[dict, float]]]:
    """Least squares on relative residuals; returns the coefficients and (run, fitted ms)."""
    import numpy as np
    from scipy.optimize import least_squares

    feats = [features(r) for r in runs]
    measured = np.array([r["median_step_ms"] * 1e-3 for r in runs])
    scale = np.array([1e-3, 1e-3, 1e-7, 1e-7, 1e-7, 1e-7, 1e-10, 1e-7])  # seconds per unit, roughly

    def predict(x):
        per_call, mirror_sync, per_id, per_unique, per_owned, per_mirror, per_byte, per_peer = x * scale
        coef = np.array([per_id, per_unique, per_owned, per_byte, per_mirror])
        return np.array([per_call + per_peer * (w - 1) + (mirror_sync if m else 0.0) + float((f @ coef).max())
                         for f, m, w in feats])

    x0 = np.ones(len(scale))
    res = least_squares(lambda x: (predict(x) - measured) / measured, x0, bounds=(0, np.inf))
    p = res.x * scale
    coef = dict(per_call=p[0], per_peer=p[7], per_id=p[2], per_unique=p[3], per_owned_row=p[4],
                per_wire_byte=p[6], per_mirror_row=p[5], mirror_sync=p[1])
    fitted = predict(res.x)
    return coef, list(zip(runs, fitted * 1e3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json", default=None, help="append every run as a JSON line")
    ap.add_argument("--out", default=None, help="write the fitted coefficients (JSON) here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a)
        return
    import torch

    started = time.strftime("%Y-%m-%d %H:%M")
    runs = []
    for world in (1, 2):
        got = _launch(a, world, "steps")
        runs += got
        if a.json:
            with open(a.json, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in got)
    # The median of each configuration's repetitions.
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["world"], r["config"]), []).append(r)
    medians = [sorted(g, key=lambda r: r["median_step_ms"])[len(g) // 2] for g in groups.values()]
    coef, fitted = fit(medians)
    coef["source"] = f"fitted by benchmarks/plan_calibration.py on {started}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print("| world | ids | batch | page | placement | measured ms (median of reps) | fitted ms | fitted / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for run, ms in fitted:
        reps = sorted(r["median_step_ms"] for r in groups[(run["world"], run["config"])])
        print(f"| {run['world']} | {run['dist']} | {run['batch']} | {run['page']} | {run['kind']} | "
              f"{run['median_step_ms']:.2f} ({', '.join(f'{x:.2f}' for x in reps)}) | {ms:.2f} | "
              f"{ms / run['median_step_ms']:.2f} |")
    print("\n" + json.dumps(coef, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(coef, f, indent=2)


if __name__ == "__main__":
    main()
