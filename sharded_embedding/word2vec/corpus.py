"""The corpus side of skip-gram: each rank's part of the text, the shared vocabulary,
frequent-word subsampling, dynamic windows and batches of consecutive centers.

Each rank reads only its byte range of the file (cut at line starts), counts its words, and
the ranks merge their counts into one vocabulary sorted by frequency (ties by word), so
every rank numbers the words alike and the most frequent words land on the first pages.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed import all_gather_strings, all_reduce_host


def part_lines(path: str, rank: int, world: int, lowercase: bool = False):
    """The lines of ``path`` whose first byte lies in this rank's ``1/world`` byte range."""
    size = os.path.getsize(path)
    start, stop = size * rank // world, size * (rank + 1) // world
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line that began before our range; it belongs to a lower rank
        while f.tell() < stop:
            line = f.readline()
            if not line:
                break
            text = line.decode("utf-8", errors="replace")
            yield text.lower() if lowercase else text


@dataclass
class Vocabulary:
    words: list[str]  # by descending count, ties by word
    counts: torch.Tensor  # int64 [size]
    total_words: int  # tokens in the whole corpus, out-of-vocabulary ones included

    @property
    def size(self) -> int:
        return len(self.words)

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def build_vocabulary(path: str, min_count: int, max_vocab: int | None, lowercase: bool, group=None) -> Vocabulary:
    """Count this rank's part, merge every rank's counts (collective), keep words seen at
    least ``min_count`` times (at most ``max_vocab`` of them)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    counter: Counter = Counter()
    for line in part_lines(path, rank, world, lowercase):
        counter.update(line.split())
    merged: Counter = Counter()
    payload = "\n".join(f"{w}\t{c}" for w, c in counter.items())
    for text in all_gather_strings(payload, group):
        for row in filter(None, text.split("\n")):
            word, count = row.rsplit("\t", 1)
            merged[word] += int(count)
    total = sum(merged.values())
    kept = sorted(((w, c) for w, c in merged.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
    if max_vocab is not None:
        kept = kept[:max_vocab]
    return Vocabulary([w for w, _ in kept], torch.tensor([c for _, c in kept], dtype=torch.int64), total)


@dataclass
class Part:
    """This rank's text as word ids, with the line (sentence) each token came from."""

    tokens: torch.Tensor  # int64 [n], in-vocabulary tokens only
    sentence: torch.Tensor  # int64 [n]
    raw_words: int  # tokens read, out-of-vocabulary ones included


def encode_part(path: str, vocab: Vocabulary, lowercase: bool, group=None) -> Part:
    index = vocab.index()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ids: list[int] = []
    sentence: list[int] = []
    raw = 0
    for line_no, line in enumerate(part_lines(path, rank, world, lowercase)):
        words = line.split()
        raw += len(words)
        kept = [index[w] for w in words if w in index]
        ids += kept
        sentence += [line_no] * len(kept)
    return Part(torch.tensor(ids, dtype=torch.int64), torch.tensor(sentence, dtype=torch.int64), raw)


def keep_probability(vocab: Vocabulary, sample: float) -> torch.Tensor:
    """word2vec's subsampling: a word with count c is kept with probability
    ``(sqrt(c / t) + 1) * t / c`` (at most 1), where ``t = sample * total in-vocabulary words``."""
    if sample <= 0:
        return torch.ones(vocab.size, dtype=torch.float64)
    counts = vocab.counts.double()
    threshold = sample * counts.sum()
    return ((counts / threshold).sqrt() + 1).mul(threshold / counts).clamp(max=1.0)


def unigram_cdf(vocab: Vocabulary, power: float = 0.75) -> torch.Tensor:
    """Cumulative distribution of negatives: counts ** 0.75, normalised."""
    weights = vocab.counts.double().pow(power)
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


class EpochTokens:
    """One epoch of this rank's text as word2vec sees it: frequent words subsampled, and each
    center's window shrunk to a random 1..window. Batches are consecutive stretches of
    centers, so every (center, context) pair of the epoch is scored exactly once."""

    def __init__(self, part: Part, keep: torch.Tensor, window: int, generator: torch.Generator):
        kept = torch.rand(part.tokens.numel(), generator=generator, dtype=torch.float64) < keep[part.tokens]
        n = int(kept.sum())
        self.window, self.num_tokens = window, n
        pad = torch.full((window,), -1, dtype=torch.int64)
        self._sentence = torch.cat([pad, part.sentence[kept], pad])
        self._tokens = torch.cat([pad.clamp(min=0), part.tokens[kept], pad.clamp(min=0)])
        self._reach = torch.randint(1, window + 1, (n,), generator=generator, dtype=torch.int64)

    def batches(self, centers: int, steps: int):
        """Exactly ``steps`` batches of up to ``centers`` centers each; once this rank's text
        runs out, empty ones (every rank must take part in every step's lookups)."""
        w = self.window
        for k in range(steps):
            a, b = min(k * centers, self.num_tokens), min((k + 1) * centers, self.num_tokens)
            if a == b:
                yield Batch(self._tokens[:0], self._sentence[:0], self._reach[:0])
            else:
                yield Batch(self._tokens[a : b + 2 * w], self._sentence[a : b + 2 * w], self._reach[a:b])


def steps_per_epoch(num_tokens: int, batch_centers: int, group=None) -> int:
    """The number of steps every rank takes this epoch: enough for the rank with the most
    text (one all-reduce)."""
    steps = torch.tensor([math.ceil(num_tokens / batch_centers)], dtype=torch.int64)
    return int(all_reduce_host(steps, dist.ReduceOp.MAX, group))
