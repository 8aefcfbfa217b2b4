"""The initial table: N(0, 1) rows that depend only on (seed, row, embedding_dim).

Rows are generated in fixed blocks of `BLOCK_ROWS` rows, each from its own CPU generator
seeded by a hash of ``(seed, block)``. A rank fills the pages it holds block by block, so
the values are identical for every world size, placement, page size and device (a run can
be resharded and compared), and no temporary larger than one block is ever allocated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["BLOCK_ROWS", "initial_rows", "fill_initial_rows"]

BLOCK_ROWS = 4096
_MASK64 = (1 << 64) - 1


def _block_seed(seed: int, block: int) -> int:
    """splitmix64 of (seed, block): decorrelated 63-bit generator seeds."""
    z = (seed * 0x9E3779B97F4A7C15 + block * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _block(seed: int, block: int, embedding_dim: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(_block_seed(seed, block))
    return torch.randn(BLOCK_ROWS, embedding_dim, generator=g, dtype=torch.float32)


def fill_initial_rows(
    seed: int, embedding_dim: int, ranges: Iterable[tuple[int, int, torch.Tensor]]
) -> None:
    """Write the initial values of global rows ``[start, stop)`` into ``out`` for each
    ``(start, stop, out)``; ranges must come in ascending order so each block is made once."""
    cached = (-1, None)
    for start, stop, out in ranges:
        row = start
        while row < stop:
            block, offset = divmod(row, BLOCK_ROWS)
            if cached[0] != block:
                cached = (block, _block(seed, block, embedding_dim))
            n = min(stop - row, BLOCK_ROWS - offset)
            dst = out[row - start : row - start + n]
            dst.copy_(cached[1][offset : offset + n])
            row += n


def initial_rows(seed: int, embedding_dim: int, start: int, stop: int, dtype=torch.float32) -> torch.Tensor:
    """The initial values of global rows ``[start, stop)`` as a new CPU tensor (the oracle's table)."""
    out = torch.empty(stop - start, embedding_dim, dtype=dtype)
    fill_initial_rows(seed, embedding_dim, [(start, stop, out)])
    return out
