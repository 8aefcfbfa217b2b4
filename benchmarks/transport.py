"""The exchange alone: one all-to-all on the shared-memory transport against gloo, paired in one job.

    python benchmarks/transport.py                                  # 2 ranks, 4 KiB-8 MiB per peer
    python benchmarks/transport.py --sizes 65536,1048576 --world 3 --blocks 40

What `docs/architecture.md` says of the two transports ("Why"), measured: every rank sends
``size`` bytes to every peer and to itself (rows of 64 float32, as `lookup.py`'s S vectors)
and receives as much, through `Transport.all_to_all` and its receive, on both transports of
one process group (`make_transport("shared_memory")` and `"process_group"`: gloo's
``all_to_all_single``), in blocks of exchanges that alternate between the two (ABBA), each
block between two barriers; `lookup.py`'s pinning (one core per rank, one thread). Reported
per size: each transport's median block time per exchange (the slowest rank's), and the
median of the paired per-block ratios gloo / shared memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # workload.py, and the package of this checkout

from workload import run_worker_job, time_in_blocks  # noqa: E402

ROW = 64 * 4  # bytes per row: 64 float32
KINDS = ("shared_memory", "process_group")


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,65536,262144,1048576,8388608",
                    help=f"bytes each rank sends each peer, comma separated (multiples of {ROW})")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=30, help="blocks of exchanges per transport and size")
    ap.add_argument("--block-steps", type=int, default=50, help="exchanges per block")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed for the job")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in a.sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(n < ROW or n % ROW for n in sizes):
        ap.error(f"--sizes must be byte counts, each a positive multiple of {ROW}, got {a.sizes!r}")
    if a.world < 2:
        ap.error("--world must be at least 2: a group of one exchanges nothing")
    for name in ("blocks", "block_steps", "timeout"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return a


def _worker(a) -> None:
    import torch
    import torch.distributed as dist

    import sharded_embedding
    from sharded_embedding.transport import make_transport

    sharded_embedding.init_distributed("gloo", bind_cpus=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    transports = {kind: make_transport(kind, dist.group.WORLD, torch.device("cpu")) for kind in KINDS}
    for size in map(int, a.sizes.split(",")):
        rows = size // ROW
        inp = torch.full((world * rows, 64), float(rank))
        out = torch.empty_like(inp)
        splits = [rows] * world

        def run(kind: str, start: int, count: int) -> None:
            exchange = transports[kind].all_to_all
            for _ in range(count):
                exchange(out, inp, splits, splits)()

        times = time_in_blocks(run, list(KINDS), a.blocks, a.block_steps)
        assert all(out[q * rows:(q + 1) * rows].eq(q).all() for q in range(world))  # every peer's rows arrived
        if rank == 0:
            shm, gloo = (statistics.median(times[k]) * 1e3 for k in KINDS)
            ratio = statistics.median(g / s for g, s in zip(times["process_group"], times["shared_memory"]))
            print(f"RESULT {size} {shm:.1f} {gloo:.1f} {ratio:.2f}", flush=True)
    sharded_embedding.finish()


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        _worker(a)
        return 0
    found = run_worker_job(__file__, a.world, ["--sizes", a.sizes, "--world", str(a.world), "--blocks", str(a.blocks),
                                               "--block-steps", str(a.block_steps)], a.timeout, "the exchange job")
    if len(found) != len(a.sizes.split(",")):
        raise SystemExit(f"the exchange job printed {len(found)} results for {len(a.sizes.split(','))} sizes")
    print(f"\n{a.world} ranks, one all-to-all (every rank sends each peer and itself the size below), median of "
          f"{a.blocks} ABBA blocks of {a.block_steps} exchanges\n")
    print("| bytes per peer | shared memory us | gloo us | gloo / shared memory (paired median) |\n|---|---|---|---|")
    for size, shm, gloo, ratio in found:
        print(f"| {int(size):,} | {shm} | {gloo} | {ratio}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
