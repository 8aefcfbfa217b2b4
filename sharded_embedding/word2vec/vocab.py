"""The shared vocabulary: counted per rank, merged across ranks in O(vocabulary) memory per rank.

1. **Count** (each rank, its share of the text): Arrow's hash kernels turn each chunk's tokens
   into (word, count) pairs; chunk results are summed as they come, so a rank holds one entry
   per distinct word it has seen, never one per token.
2. **Merge** (collective): word ``w`` belongs to rank ``hash(w) % world``. One
   ``all_to_all_single`` sends every (word, count) to its rank, which sums the counts of its
   words from every rank and keeps those reaching ``min_count`` (and its ``max_vocab`` most
   frequent, which contain the global top ``max_vocab``). One ragged all-gather then gives every
   rank the merged vocabulary. A rank never holds more than about one copy of the vocabulary
   (its own words, the words it merges, the merged vocabulary), whatever the world size; the
   old way, gathering every rank's whole counter on every rank, held ``world`` copies.
3. **Order**: by descending count, ties by word (UTF-8 byte order), so the most frequent words
   sit on the first pages; identical on every rank and deterministic for any world size.

The vocabulary is saved as an Arrow IPC file (``vocab.arrow``: ``word``, ``count``) that later
phases memory-map, so its words cost no anonymous memory while the tables train.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from ..distributed import agree_or_raise, all_gather_ragged, all_reduce_host, all_to_all_ragged, collective_device
from .text import CorpusError, CorpusSpec, read_chunks, tokenize

__all__ = ["Vocabulary", "count_words", "merge_counts", "build_vocabulary"]

_HASH_BATCH = 1 << 18  # words hashed at a time (bounds the temporaries)


@dataclass
class Vocabulary:
    """Words by descending count (ties by word), their counts, and the corpus's token count."""

    words: pa.Array  # large_string [size]
    counts: np.ndarray  # int64 [size]
    total_words: int  # tokens in the whole corpus, out-of-vocabulary ones included

    @property
    def size(self) -> int:
        return len(self.words)

    def digest(self) -> str:
        """A fingerprint of the words and counts in row order (blake2b)."""
        offsets, data = _string_buffers(self.words)
        h = hashlib.blake2b(digest_size=16)
        h.update(np.diff(offsets).astype("<i8").tobytes())
        h.update(memoryview(data)[offsets[0] : offsets[-1]])
        h.update(np.asarray(self.counts, dtype="<i8").tobytes())
        return h.hexdigest()

    def save(self, path: str) -> None:
        """Write ``path`` atomically (a temporary name, fsync, rename). One rank calls it."""
        table = pa.table({"word": self.words, "count": pa.array(self.counts, pa.int64())},
                         metadata={"total_words": str(self.total_words)})
        partial = f"{path}.partial"
        with pa.OSFile(partial, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str) -> Vocabulary:
        """Memory-map a saved vocabulary (the words stay in the file's pages)."""
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        total = int(table.schema.metadata[b"total_words"])
        return cls(table.column("word").combine_chunks(), table.column("count").to_numpy(), total)


def count_words(spec: CorpusSpec, rank: int, world: int, progress: Callable[[int], None] = lambda n: None):
    """This rank's words and counts: (words [large_string], counts [int64], tokens, lines)."""
    merged: tuple[pa.Array, np.ndarray] | None = None
    pending: list[tuple[pa.Array, np.ndarray]] = []
    pending_rows = tokens = lines = 0
    for chunk in read_chunks(spec, rank, world):
        flat, _ = tokenize(chunk.lines)
        encoded = pc.dictionary_encode(flat)
        pending.append((encoded.dictionary, np.bincount(encoded.indices.to_numpy(), minlength=len(encoded.dictionary))))
        pending_rows += len(encoded.dictionary)
        tokens, lines = tokens + len(flat), lines + len(chunk.lines)
        if pending_rows >= max(len(merged[0]) if merged else 0, 1 << 20):  # sum when it pays (amortised)
            merged = _sum_by_word(([merged] if merged else []) + pending)
            pending, pending_rows = [], 0
        progress(chunk.nbytes)
    words, counts = _sum_by_word(([merged] if merged else []) + pending)
    return words, counts, tokens, lines


def merge_counts(words: pa.Array, counts: np.ndarray, *, min_count: int, max_vocab: int | None,
                 group=None) -> tuple[pa.Array, np.ndarray, int]:
    """Every rank's (words, counts) -> the vocabulary, the same on every rank, and the count of
    the most frequent word (collective: ragged all-to-alls to the words' hash ranks, an
    all-reduce of the largest count, ragged all-gathers of the merged words)."""
    world = dist.get_world_size(group)
    if world > 1:
        owner = _hash_words(words) % world
        order = np.argsort(owner, kind="stable")
        words, counts = words.take(pa.array(order)), counts[order]
        per_rank = np.bincount(owner, minlength=world).tolist()
        words, counts = _exchange(words, counts, per_rank, group)
        words, counts = _sum_by_word([(words, counts)])
    top = int(all_reduce_host(torch.tensor([int(counts.max(initial=0))]), dist.ReduceOp.MAX, group))
    keep = counts >= min_count
    words, counts = words.filter(pa.array(keep)), counts[keep]
    words, counts = _by_frequency(words, counts, max_vocab)
    if world > 1:
        words, counts = _exchange(words, counts, [len(words)] * world, group, gather=True)
        words, counts = _by_frequency(words, counts, max_vocab)
    return words, counts, top


def build_vocabulary(spec: CorpusSpec, *, min_count: int, max_vocab: int | None, group=None,
                     progress: Callable[[int], None] = lambda n: None,
                     merging: Callable[[], None] = lambda: None) -> tuple[Vocabulary, int]:
    """Count this rank's share, merge (collective). Returns (vocabulary, this rank's lines).

    ``progress(bytes)`` follows the counting; ``merging()`` is called when the merge starts.
    Raises CorpusError on every rank if any rank cannot read its share, or if no word occurs
    ``min_count`` times."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error, lines = None, 0
    try:
        words, counts, tokens, lines = count_words(spec, rank, world, progress)
    except (CorpusError, OSError) as e:
        error, words, counts, tokens = str(e), pa.array([], pa.large_string()), np.zeros(0, np.int64), 0
    try:
        agree_or_raise(group, "reading the corpus", "ok", error, collective_device(group))
    except ValueError as e:
        raise CorpusError(str(e)) from None
    merging()
    total = int(all_reduce_host(torch.tensor([tokens], dtype=torch.int64), group=group))
    words, counts, top = merge_counts(words, counts, min_count=min_count, max_vocab=max_vocab, group=group)
    if total == 0:
        raise CorpusError("the corpus holds no words (only whitespace, or nothing): check data.path")
    if len(words) == 0:
        raise CorpusError(
            f"the vocabulary is empty: no word of the corpus's {total:,} tokens occurs data.min_count={min_count} "
            f"times or more (the most frequent occurs {top} times). Lower data.min_count"
        )
    return Vocabulary(words, counts, total), lines


# ---------------------------------------------------------------------------- helpers
def _string_buffers(words: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1] int64 into data, data uint8) of a large_string array, without copies."""
    _, offsets, data = words.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[words.offset : words.offset + len(words) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets, data


def _from_buffers(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.large_string(), len(offsets) - 1,
                                 [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data)])


def _sum_by_word(parts: list[tuple[pa.Array, np.ndarray]]) -> tuple[pa.Array, np.ndarray]:
    """Sum the counts of equal words over ``parts`` -> (distinct words, counts)."""
    if not parts:
        return pa.array([], pa.large_string()), np.zeros(0, np.int64)
    words = pa.concat_arrays([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
    counts = np.concatenate([c for _, c in parts]) if len(parts) > 1 else parts[0][1]
    encoded = pc.dictionary_encode(words)
    summed = np.bincount(encoded.indices.to_numpy(), weights=counts, minlength=len(encoded.dictionary))
    return encoded.dictionary, summed.astype(np.int64)  # float64 sums of ints are exact below 2**53


def _by_frequency(words: pa.Array, counts: np.ndarray, limit: int | None) -> tuple[pa.Array, np.ndarray]:
    """Sorted by descending count, ties by word; the first ``limit`` kept."""
    table = pa.table({"count": pa.array(counts, pa.int64()), "word": words})
    order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("word", "ascending")])
    if limit is not None:
        order = order.slice(0, limit)
    return words.take(order), counts[order.to_numpy()]


def _hash_words(words: pa.Array) -> np.ndarray:
    """A 64-bit hash of each word's bytes, identical on every rank and run (unlike ``hash()``):
    a polynomial over the bytes, then splitmix64's finaliser. Returns int64 >= 0."""
    offsets, data = _string_buffers(words)
    lengths = np.diff(offsets)
    powers = np.cumprod(np.full(int(lengths.max(initial=1)), 0x100000001B3, dtype=np.uint64), dtype=np.uint64)
    out = np.empty(len(words), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in range(0, len(words), _HASH_BATCH):
            b = min(a + _HASH_BATCH, len(words))
            lo, starts = offsets[a], offsets[a:b] - offsets[a]
            n = lengths[a:b]
            position = np.arange(offsets[b] - lo) - np.repeat(starts, n)
            h = np.add.reduceat(data[lo : offsets[b]].astype(np.uint64) * powers[position], starts)
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            out[a:b] = h ^ (h >> np.uint64(31))
    return (out >> np.uint64(1)).astype(np.int64)


def _exchange(words: pa.Array, counts: np.ndarray, per_rank: list[int], group, gather: bool = False):
    """Send ``per_rank[r]`` consecutive (word, count) pairs to rank ``r`` (or, ``gather``, every
    pair to every rank); returns what arrived, in rank order. Collective: two ragged exchanges,
    (length, count) pairs as int64 and the words' bytes as uint8."""
    offsets, data = _string_buffers(words)
    lengths = np.diff(offsets)
    meta = torch.from_numpy(np.stack([lengths, counts]).T.copy())
    text = torch.from_numpy(data[offsets[0] : offsets[-1]].copy())
    if gather:
        meta, _ = all_gather_ragged(meta, group)
        text, _ = all_gather_ragged(text, group)
    else:
        bounds = np.concatenate([[0], np.cumsum(per_rank)])
        byte_counts = (offsets[bounds[1:]] - offsets[bounds[:-1]]).tolist()
        meta, _ = all_to_all_ragged(meta, per_rank, group)
        text, _ = all_to_all_ragged(text, byte_counts, group)
    meta = meta.numpy()
    arrived = np.concatenate([[0], np.cumsum(meta[:, 0])])
    return _from_buffers(arrived, text.numpy()), meta[:, 1].copy()
