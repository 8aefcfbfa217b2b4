"""CPU time of one ShardedEmbeddingBagCollection training step in one process (world 1, gloo):
the collection's own work (routing, pooling, the owner's reduction, the update) without the
waits of a shared machine's all-to-alls, for A/B comparisons of a change. The workload is
benchmarks/collection.py's (8 tables, 26 pooled features, Zipf bags of 1-50, fused SGD).

    python benchmarks/collection_step.py --pool-on owner --steps 8 --scale 0.5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pool-on", default="owner", choices=["auto", "owner", "requester"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.5, help="of benchmarks/collection.py's rows and batch")
    a = ap.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    import torch
    import torch.distributed as dist

    import collection as bench
    from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig, finish

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    b = bench._args([f"--scale={a.scale}", f"--steps={a.steps}", f"--warmup={a.warmup}", "--worker=ours_collection"])
    steps = bench.make_steps(b, 0)
    w = bench.loss_weight(b, 0)
    inputs = [{f: {"values": v, "lengths": n} for f, (v, n) in bags.items()} for bags in steps]
    configs = [TableConfig(name=name, num_embeddings=rows, embedding_dim=dim, page_size=b.page_size,
                           feature_names=features, fused_optimizer=bench._fused(b))
               for name, rows, dim, features in bench.tables(b)]
    ebc = ShardedEmbeddingBagCollection(configs, pool_on=a.pool_on)
    cpu = []
    for i in range(a.warmup + a.steps):
        c = time.process_time()
        (ebc.concat(ebc(inputs[i])) * w).sum().backward()
        cpu.append(time.process_time() - c)
    cpu = cpu[a.warmup:]
    print(f"cpu ms per step: median {1e3 * statistics.median(cpu):.1f} min {1e3 * min(cpu):.1f}", flush=True)
    finish()


if __name__ == "__main__":
    main()
