"""Writing a sharded table to one file without gathering it on one rank.

Each page is written by its primary owner at its place in the file: the ranks agree on the
byte offset of every page (one all-reduce of per-page sizes), then each writes its own pages
with ``os.pwrite``. Rank 0 creates the file first. The ranks must share the filesystem the
path is on (one machine, or a network filesystem).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["write_word2vec"]


def _format_rows(words: list[str], rows: torch.Tensor) -> bytes:
    values = rows.detach().float().cpu().tolist()
    return "".join(f"{w} {' '.join(f'{x:.6g}' for x in v)}\n" for w, v in zip(words, values)).encode()


def write_word2vec(emb, words: list[str], path: str) -> None:
    """Write ``emb`` as word2vec text (``"<rows> <dim>"``, then ``word v1 v2 ...`` per row);
    ``words[i]`` names row ``i``. Collective over the table's group; every rank writes its
    primary pages, nobody holds the whole table."""
    if len(words) != emb.num_embeddings:
        raise ValueError(f"write_word2vec: {len(words)} words for a table of {emb.num_embeddings} rows")
    group, rank = emb.process_group, emb.rank
    plan = emb.plan
    local = emb.local_pages
    mine = {}
    for p in plan.primary_pages(rank).tolist():
        start = plan.page_start(p)
        mine[p] = _format_rows(words[start : start + plan.page_rows(p)], local[p])
    header = f"{emb.num_embeddings} {emb.embedding_dim}\n".encode()
    sizes = torch.zeros(plan.num_pages, dtype=torch.int64)
    for p, blob in mine.items():
        sizes[p] = len(blob)
    if rank == 0:
        with open(path, "wb") as f:
            f.write(header)
    if emb.world_size > 1:
        sizes = sizes.to(emb.device)
        dist.all_reduce(sizes, group=group)  # also orders the file's creation before the writes
        sizes = sizes.cpu()
    offsets = (torch.cumsum(sizes, 0) - sizes + len(header)).tolist()
    fd = os.open(path, os.O_WRONLY)
    try:
        for p, blob in mine.items():
            os.pwrite(fd, blob, offsets[p])
    finally:
        os.close(fd)
    if emb.world_size > 1:
        dist.barrier(group=group)  # the file is complete when any rank returns
