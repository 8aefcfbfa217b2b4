"""A first look at the package: train a paged table on every rank for a few steps.

    torchrun --standalone --nproc_per_node=2 -m sharded_embedding.demo

Each rank draws Zipf-distributed ids (a frequency-sorted vocabulary: row 0 is the hottest),
looks them up in a table paged round robin over the ranks, with the hottest page mirrored
on every rank, and fits each looked-up row to a fixed target vector with sparse SGD.
Rank 0 prints the placement, the loss as it falls, and the lookup rate.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from . import ShardedEmbedding, finish, init_distributed


def _target(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """A fixed, id-dependent target vector for each row, in [-1, 1]."""
    freq = torch.arange(1, dim + 1, dtype=torch.float32, device=ids.device)
    return torch.sin(ids.unsqueeze(-1).float() * 1e-3 * freq)


def _zipf_ids(n: int, rows: int, g: torch.Generator) -> torch.Tensor:
    """Ids with density ~ 1/(id + 1) on [0, rows) by inverse transform."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return ((rows + 1) ** u - 1).floor().long().clamp_(0, rows - 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8192, help="ids per rank per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.5)
    a = ap.parse_args(argv)

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    num_pages = -(-a.rows // a.page_size)
    # Page 0 holds the most frequent ids: mirror it everywhere; the rest round robin.
    placement = [tuple(range(world))] + [p % world for p in range(1, num_pages)]
    t0 = time.perf_counter()
    try:
        emb = ShardedEmbedding(a.rows, a.dim, page_size=a.page_size, placement=placement)
    except ValueError as e:  # raised by every rank alike: say it once
        if rank == 0:
            print(f"demo: {e}", file=sys.stderr, flush=True)
        finish(2)
    init_s = time.perf_counter() - t0
    opt = torch.optim.SGD(emb.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(1234 + rank)
    if rank == 0:
        print(f"world {world} ({dist.get_backend()}), table {a.rows} x {a.dim} in {num_pages} pages of "
              f"{a.page_size} rows; page 0 mirrored on all ranks, the rest round robin")
        print(f"rank 0 holds {len(emb.local_pages)} pages ({emb.weight.numel() * emb.weight.element_size() / 2**20:.1f} MiB),"
              f" built in {init_s:.2f} s")
    step_times = []
    for step in range(a.steps):
        ids = _zipf_ids(a.batch, a.rows, g).to(emb.device)
        t = time.perf_counter()
        out = emb(ids)  # all-to-all: ids out, vectors back
        loss = ((out - _target(ids, a.dim)) ** 2).sum(1).mean()
        loss.backward()  # all-to-all: gradients back to the owners; mirrored page all-reduced
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % max(1, a.steps // 6) == 0 or step == a.steps - 1):
            print(f"step {step:4d}  loss {mean_loss.item() / world:8.4f}  step {step_times[-1] * 1e3:7.2f} ms")
    if rank == 0:
        median = sorted(step_times)[len(step_times) // 2]
        print(f"done: {a.steps} steps, median step {median * 1e3:.2f} ms, "
              f"{world * a.batch / median / 1e6:.2f} M lookups/s over {world} ranks")


if __name__ == "__main__":
    main()
    finish()
