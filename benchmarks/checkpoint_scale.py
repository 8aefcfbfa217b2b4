"""What the job's checkpoint checksums cost at the size the package is for.

Two tables of ``--rows`` x ``--dim`` float32 with fused row-wise Adagrad (the word2vec job's
pair), saved with `CheckpointManager` and loaded back: the save (which computes a CRC-32 per
page as it writes), and the load with its checksum pass against the same load without it (the
marker's checksums removed), interleaved, ``--repeat`` times each. Peak RSS per rank.

    torchrun --nproc-per-node 2 benchmarks/checkpoint_scale.py --rows 10000000 --dim 128 \\
        --directory /tmp/ckpt-scale --repeat 2

Needs about 2 x rows x dim x 4 bytes of disk (10.3 GB at 10M x 128) and as much memory over
the ranks. Rank 0 prints one JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from sharded_embedding import ShardedEmbedding, finish, init_distributed  # noqa: E402
from sharded_embedding.checkpoint import CheckpointManager  # noqa: E402
from workload import peak_rss_mib  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=4096)
    p.add_argument("--directory", default="/tmp/ckpt-scale")
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    init_distributed()
    rank = dist.get_rank()
    spec = {"name": "rowwise_adagrad", "lr": 0.1}
    tables = {name: ShardedEmbedding(a.rows, a.dim, page_size=a.page_size, fused_optimizer=spec, seed=i)
              for i, name in enumerate(("inputs", "outputs"))}
    manager = CheckpointManager(a.directory, keep=1)

    def timed(what, fn):
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            print(json.dumps({"what": what, "seconds": round(seconds, 2)}), flush=True)
        return seconds, out

    save_s, path = timed("save (CRC-32 per page)", lambda: manager.save(1, tables, {}, {"world_size": 2}))
    marker = path / CheckpointManager.MARKER
    checked_text = marker.read_text()
    unchecked = json.loads(checked_text)
    unchecked.pop("checksums")
    unchecked_text = json.dumps(unchecked)
    times = {"checked": [], "unchecked": []}
    for _ in range(a.repeat):
        for kind, text in (("checked", checked_text), ("unchecked", unchecked_text)):
            if rank == 0:
                marker.write_text(text)
            dist.barrier()
            times[kind].append(timed(f"load ({kind})", lambda: manager.load(path, tables))[0])
    if rank == 0:
        marker.write_text(checked_text)
    rss = [None] * dist.get_world_size()
    dist.all_gather_object(rss, peak_rss_mib())
    if rank == 0:
        checked, plain = statistics.median(times["checked"]), statistics.median(times["unchecked"])
        print(json.dumps({"rows": a.rows, "dim": a.dim, "page_size": a.page_size, "save_s": round(save_s, 2),
                          "load_checked_s": times["checked"], "load_unchecked_s": times["unchecked"],
                          "checked_over_unchecked": round(checked / plain, 2),
                          "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir()),
                          "peak_rss_mib_per_rank": rss}), flush=True)
        shutil.rmtree(a.directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    finish(main())
