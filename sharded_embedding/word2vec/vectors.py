"""Word vectors out of the sharded input table, in bounded memory: word2vec text or binary, or a
``.npy`` table beside ``vocab.txt``.

Every format is written by every rank in place (`sharded_embedding.export.write_pages`): a
rank encodes one page at a time, its rows preceded by their words, which it takes from the
memory-mapped vocabulary. Nobody formats or holds more than a page.

- ``text``: ``"<rows> <dim>"``, then ``word v1 ... vdim`` per row. Values are written with 9
  significant digits (``%+.8e``), which is what a float32 needs to come back bit for bit
  (any reader, through float32 or float64), and makes every row's width known from its word
  alone.
- ``binary``: the original C tool's format: the same header, then ``word``, a space, ``dim``
  little-endian float32 and a newline per row (what ``KeyedVectors.load_word2vec_format(...,
  binary=True)`` reads); about 4x smaller than text.
- ``npy``: ``vectors.npy`` (`export_table`) and ``vocab.txt`` (``word count`` per line).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..export import export_table, write_pages
from .vocab import Vocabulary, _string_buffers

__all__ = ["FORMATS", "FILES", "choose_formats", "write_word2vec", "write_vocab_txt", "format_values",
           "load_vectors"]

FORMATS = ("text", "binary", "npy")
FILES = {"text": "vectors.txt", "binary": "vectors.bin", "npy": "vectors.npy"}
AUTO_BINARY_ABOVE = 1_000_000  # words: text files of larger vocabularies run to many GB
_WIDTH = 15  # characters of one value: sign, digit, point, 8 digits, e, sign, 2 digits


def choose_formats(setting: str, vocab_size: int) -> list[str]:
    """``auto`` (binary above `AUTO_BINARY_ABOVE` words, else text), ``all``, or one format."""
    if setting == "auto":
        return ["binary" if vocab_size > AUTO_BINARY_ABOVE else "text"]
    if setting == "all":
        return list(FORMATS)
    return [setting]


_POW10 = 10.0 ** np.arange(-50, 51)  # 10**e for the exponents of float32 values, looked up
_DIGITS4 = np.array([[ord(c) for c in f"{i:04d}"] for i in range(10_000)], dtype=np.uint8)


def format_values(rows: torch.Tensor) -> np.ndarray:
    """``[n, dim]`` finite values -> ``[n, 16 * dim - 1]`` uint8: each value as ``%+.8e``,
    separated by spaces. Vectorised; no Python loop over values."""
    v = rows.detach().float().cpu().numpy().astype(np.float64)
    a = np.abs(v)
    nonzero = a > 0
    e = np.floor(np.log10(np.where(nonzero, a, 1.0))).astype(np.int64)
    m = np.rint(a / _POW10[e + 50] * 1e8).astype(np.int64)
    for fix in (m >= 1_000_000_000, nonzero & (m < 100_000_000)):  # log10 rounded across a power of 10
        e[fix] += np.where(m[fix] >= 1_000_000_000, 1, -1)
        m[fix] = np.rint(a[fix] / _POW10[e[fix] + 50] * 1e8).astype(np.int64)
    e[~nonzero] = 0
    out = np.empty(v.shape + (_WIDTH + 1,), dtype=np.uint8)
    out[..., 0] = np.where(np.signbit(v), ord("-"), ord("+"))
    lead, rest = np.divmod(m, 100_000_000)
    out[..., 1] = ord("0") + lead
    out[..., 2] = ord(".")
    high, low = np.divmod(rest, 10_000)
    out[..., 3:7] = _DIGITS4[high]
    out[..., 7:11] = _DIGITS4[low]
    out[..., 11] = ord("e")
    out[..., 12] = np.where(e < 0, ord("-"), ord("+"))
    out[..., 13:15] = _DIGITS4[np.abs(e)][..., 2:]
    out[..., 15] = ord(" ")
    return out.reshape(v.shape[0], -1)[:, :-1]


def _rows(words: pa.Array, payload: np.ndarray) -> np.ndarray:
    """``word, b" ", payload row, b"\\n"`` for each row, as one uint8 array."""
    offsets, data = _string_buffers(words)
    lengths = np.diff(offsets)
    width = lengths + payload.shape[1] + 2
    starts = np.cumsum(width) - width
    out = np.empty(int(width.sum()), dtype=np.uint8)
    out[np.arange(int(lengths.sum())) + np.repeat(starts - (offsets[:-1] - offsets[0]), lengths)] = \
        data[offsets[0] : offsets[-1]]
    out[starts + lengths] = ord(" ")
    out[(starts + lengths + 1)[:, None] + np.arange(payload.shape[1])] = payload
    out[starts + width - 1] = ord("\n")
    return out


def write_word2vec(emb, vocab: Vocabulary, path: str, *, binary: bool,
                   progress: Callable[[int], None] = lambda rows: None) -> None:
    """Write ``emb`` (row ``i`` = word ``vocab.words[i]``) as word2vec text or binary (collective)."""
    if vocab.size != emb.num_embeddings:
        raise ValueError(f"write_word2vec: {vocab.size} words for a table of {emb.num_embeddings} rows")
    plan, dim = emb.plan, emb.embedding_dim
    payload_width = 4 * dim if binary else (_WIDTH + 1) * dim - 1

    def words(p: int) -> pa.Array:
        return vocab.words.slice(plan.page_start(p), plan.page_rows(p))

    def page_size(p: int) -> int:
        return int(pc.sum(pc.binary_length(words(p))).as_py()) + plan.page_rows(p) * (payload_width + 2)

    def encode(p: int, rows: torch.Tensor) -> np.ndarray:
        if binary:
            payload = rows.to(torch.float32).contiguous().numpy().astype("<f4").view(np.uint8)
        else:
            payload = format_values(rows)
        return _rows(words(p), payload.reshape(rows.shape[0], payload_width))

    header = f"{emb.num_embeddings} {dim}\n".encode()
    write_pages(emb, path, header, page_size, encode, progress)


def write_vocab_txt(vocab: Vocabulary, path: str, batch: int = 1 << 20) -> None:
    """``word count`` per line, in table order (one rank calls it; temporary name, then rename)."""
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        for a in range(0, vocab.size, batch):
            words = vocab.words.slice(a, batch)
            counts = pc.cast(pa.array(vocab.counts[a : a + batch]), pa.large_string())
            empty = pa.scalar("", pa.large_string())
            lines = pc.binary_join_element_wise(words, counts, pa.scalar(" ", pa.large_string()))
            lines = pc.binary_join_element_wise(lines, empty, pa.scalar("\n", pa.large_string()))
            offsets, data = _string_buffers(lines)
            f.write(memoryview(data)[offsets[0] : offsets[-1]])
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def write_vectors(fmt: str, emb, vocab: Vocabulary, directory: str, progress=lambda rows: None) -> str:
    """Write ``emb`` in format ``fmt`` into ``directory`` (collective); returns the vectors' path."""
    path = os.path.join(directory, FILES[fmt])
    if fmt == "npy":
        export_table(emb, path, progress)
        if emb.rank == 0:
            write_vocab_txt(vocab, os.path.join(directory, "vocab.txt"))
    else:
        write_word2vec(emb, vocab, path, binary=fmt == "binary", progress=progress)
    return path


def load_vectors(path: str, fmt: str, limit: int | None = None, vocab: Vocabulary | None = None):
    """The first ``limit`` vectors of an export (the most frequent words) as gensim KeyedVectors."""
    from gensim.models import KeyedVectors

    if fmt in ("text", "binary"):
        return KeyedVectors.load_word2vec_format(path, binary=fmt == "binary", limit=limit)
    table = np.load(path, mmap_mode="r")
    n = table.shape[0] if limit is None else min(limit, table.shape[0])
    kv = KeyedVectors(table.shape[1])
    kv.add_vectors(vocab.words.slice(0, n).to_pylist(), np.array(table[:n]))
    return kv
