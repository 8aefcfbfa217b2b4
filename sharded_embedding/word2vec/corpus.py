"""The corpus as skip-gram sees it in an epoch: frequent words subsampled, a random window per
center, batches of consecutive centers, and negatives from the unigram^0.75 distribution.

An epoch streams this rank's `TokenFile` chunk by chunk. The random draws of chunk ``c``
(which tokens are kept, each kept token's window) come from a generator seeded by
``(seed, rank, epoch, c)``, so an epoch is the same however it is read: a first pass counts the
tokens kept (every rank must take the same number of steps), the second yields the batches,
and a resumed run redraws exactly what it skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import all_reduce_host
from ..initializers import _block_seed
from .tokens import TokenFile

__all__ = ["keep_probability", "unigram_cdf", "sample_negatives", "Batch", "EpochStream", "steps_per_epoch"]


def keep_probability(counts: np.ndarray, sample: float) -> torch.Tensor:
    """word2vec's subsampling: a word with count c is kept with probability
    ``(sqrt(c / t) + 1) * t / c`` (at most 1), where ``t = sample * total in-vocabulary words``."""
    counts = torch.from_numpy(np.asarray(counts, dtype=np.float64))
    if sample <= 0:
        return torch.ones_like(counts)
    threshold = sample * counts.sum()
    return ((counts / threshold).sqrt() + 1).mul(threshold / counts).clamp(max=1.0)


def unigram_cdf(counts: np.ndarray, power: float = 0.75) -> torch.Tensor:
    """Cumulative distribution of negatives: counts ** 0.75, normalised."""
    weights = torch.from_numpy(np.asarray(counts, dtype=np.float64)).pow(power)
    return torch.cumsum(weights, 0) / weights.sum()


def sample_negatives(cdf: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)


@dataclass
class Batch:
    """Centers ``[start, stop)`` of the subsampled token stream, with ``window`` tokens of
    context on either side (padding outside the stream has ``sentence == -1``)."""

    tokens: torch.Tensor  # int64 [centers + 2 * window], id 0 where padded
    sentence: torch.Tensor  # int64 [centers + 2 * window], -1 where padded
    reach: torch.Tensor  # int64 [centers]: each center's window this epoch, 1..window

    @property
    def num_centers(self) -> int:
        return self.reach.numel()


class EpochStream:
    """One epoch of one rank's tokens (see the module docstring)."""

    def __init__(self, tokens: TokenFile, keep: torch.Tensor, window: int, *, seed: int, rank: int, epoch: int,
                 chunk: int = TokenFile.CHUNK):
        self.tokens, self.keep, self.window, self.chunk = tokens, keep, window, chunk
        self._seed = _block_seed(seed, (rank << 40) + epoch)
        self.num_chunks = -(-tokens.num_tokens // chunk)

    def _draw(self, c: int, with_windows: bool):
        """Chunk ``c``: (kept ids, starts-a-sentence flags of all its tokens, kept mask, windows)."""
        ids, first = self.tokens.read(c * self.chunk, min((c + 1) * self.chunk, self.tokens.num_tokens))
        g = torch.Generator().manual_seed(_block_seed(self._seed, c))
        kept = torch.rand(ids.numel(), generator=g, dtype=torch.float64) < self.keep[ids]
        reach = torch.randint(1, self.window + 1, (int(kept.sum()),), generator=g) if with_windows else None
        return ids[kept], first, kept, reach

    def count(self) -> int:
        """Tokens this epoch keeps (reads the file once, draws only the subsampling)."""
        return sum(int(self._draw(c, False)[2].sum()) for c in range(self.num_chunks))

    def _pieces(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(ids, sentence numbers, windows) of the kept tokens, chunk by chunk."""
        sentences = 0
        for c in range(self.num_chunks):
            ids, first, kept, reach = self._draw(c, True)
            number = torch.cumsum(first, 0) + (sentences - 1)
            sentences += int(first.sum())
            yield ids, number[kept], reach

    def batches(self, centers: int, steps: int, num_kept: int) -> Iterator[Batch]:
        """Exactly ``steps`` batches of up to ``centers`` centers each (``num_kept`` from
        `count`); once this rank's text runs out, empty ones (every rank takes part in every
        step's lookups)."""
        w = self.window
        pieces = self._pieces()
        # The stream so far, from kept token `start - w` on: [ids, sentence numbers, windows].
        ids, sent, reach = torch.zeros(w, dtype=torch.int64), torch.full((w,), -1, dtype=torch.int64), torch.zeros(w, dtype=torch.int64)
        start, ended = 0, False
        for k in range(steps):
            a, b = min(k * centers, num_kept), min((k + 1) * centers, num_kept)
            if a == b:
                yield Batch(ids[:0], sent[:0], reach[:0])
                continue
            while start - w + ids.numel() < b + w and not ended:
                piece = next(pieces, None)
                if piece is None:  # the stream's end: w tokens of padding
                    piece, ended = (torch.zeros(w, dtype=torch.int64), torch.full((w,), -1, dtype=torch.int64),
                                    torch.zeros(w, dtype=torch.int64)), True
                ids, sent, reach = (torch.cat([x, y]) for x, y in zip((ids, sent, reach), piece))
            lo = a - w - (start - w)  # buffer position of kept token a - w
            yield Batch(ids[lo : lo + (b - a) + 2 * w], sent[lo : lo + (b - a) + 2 * w], reach[lo + w : lo + w + b - a])
            drop = b - start  # keep from token b - w on
            ids, sent, reach, start = ids[drop:], sent[drop:], reach[drop:], b


def steps_per_epoch(num_tokens: int, batch_centers: int, group=None) -> int:
    """The number of steps every rank takes this epoch: enough for the rank with the most
    text (one all-reduce)."""
    steps = torch.tensor([math.ceil(num_tokens / batch_centers)], dtype=torch.int64)
    return int(all_reduce_host(steps, dist.ReduceOp.MAX, group))
