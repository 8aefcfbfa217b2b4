"""Each rank's share of the corpus as word ids on disk: encoded once, read in chunks by every epoch.

File format (``tokens-<rank>-of-<world>.i32``): little-endian int32, one per in-vocabulary token
in text order; a token that starts a sentence (the first in-vocabulary token of a line) is
stored as ``~id`` (so it is negative). Four bytes a token, no per-token Python objects, and an
epoch reads it in chunks of `TokenFile.CHUNK` tokens, so a rank's memory for its corpus is a
few chunks whatever the corpus size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .text import CorpusSpec, read_chunks, tokenize

__all__ = ["TokenFile", "EncodedPart", "encode_share"]


@dataclass
class EncodedPart:
    """What encoding this rank's share found."""

    tokens: int  # in-vocabulary tokens written
    raw_words: int  # tokens read, out-of-vocabulary ones included
    sentences: int  # lines that kept at least one token


def encode_share(spec: CorpusSpec, words: pa.Array, rank: int, world: int, path: str,
                 progress: Callable[[int], None] = lambda n: None) -> EncodedPart:
    """Encode this rank's share of the corpus with the vocabulary ``words`` into ``path``
    (written under a temporary name, then renamed)."""
    partial = f"{path}.partial"
    tokens = raw = sentences = 0
    with open(partial, "wb") as f:
        for chunk in read_chunks(spec, rank, world):
            flat, line = tokenize(chunk.lines)
            ids = pc.index_in(flat, value_set=words)  # null: out of vocabulary
            known = ids.is_valid().to_numpy(zero_copy_only=False)
            line, kept = line.to_numpy()[known], ids.drop_null().to_numpy().astype(np.int32)
            first = np.ones(len(kept), dtype=bool)
            first[1:] = line[1:] != line[:-1]
            f.write(np.where(first, ~kept, kept).astype("<i4").tobytes())
            tokens, raw, sentences = tokens + len(kept), raw + len(known), sentences + int(first.sum())
            progress(chunk.nbytes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return EncodedPart(tokens, raw, sentences)


class TokenFile:
    """Read access to one rank's token file."""

    CHUNK = 1 << 20  # tokens an epoch reads at a time (4 MiB)

    def __init__(self, path: str):
        self.path = path
        self.num_tokens = os.path.getsize(path) // 4

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[start, stop)``: (word ids int64, starts-a-sentence bool)."""
        raw = np.fromfile(self.path, dtype="<i4", count=stop - start, offset=4 * start)
        if len(raw) != stop - start:
            raise OSError(f"{self.path} is shorter than its {self.num_tokens} tokens")
        raw = torch.from_numpy(raw.astype(np.int64))
        first = raw < 0
        return torch.where(first, ~raw, raw), first
