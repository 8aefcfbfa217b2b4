"""From the text to what training reads: the vocabulary and each rank's token file, built once
into a corpus folder and reused by later epochs and by resumed runs.

The folder holds ``vocab.arrow`` (`Vocabulary`), ``tokens-<rank>-of-<world>.i32`` (`TokenFile`)
and ``manifest.json``, written last, which names what the files were built from: the corpus
files (sizes, modification times), the decoding, ``min_count``, ``max_vocab`` and the world
size. A run whose settings match the manifest and whose token files are all there reuses them
(every rank checks its own file; all must agree); anything else rebuilds them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

from ..distributed import agree_or_raise, all_gather_ragged, all_reduce_host, collective_device
from .phases import Phases
from .text import CorpusError, CorpusSpec
from .tokens import TokenFile, encode_share
from .vocab import Vocabulary, build_vocabulary

__all__ = ["PreparedCorpus", "prepare_corpus"]

log = logging.getLogger("sharded_embedding.train")
FORMAT = 1  # bump when the files' layout changes


@dataclass
class PreparedCorpus:
    vocab: Vocabulary  # memory-mapped from the folder
    tokens: TokenFile  # this rank's
    corpus_words: int  # tokens in the whole corpus, out-of-vocabulary ones included
    directory: Path
    reused: bool


def prepare_corpus(spec: CorpusSpec, *, min_count: int, max_vocab: int | None, directory: Path, phases: Phases,
                   group=None) -> PreparedCorpus:
    """Reuse or build the corpus folder (collective). Raises CorpusError on every rank if the
    text cannot be read or no word is frequent enough."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    key = {"format": FORMAT, "corpus": spec.identity(), "min_count": min_count, "max_vocab": max_vocab,
           "world_size": world}
    manifest, tokens_path = directory / "manifest.json", directory / f"tokens-{rank}-of-{world}.i32"
    found = _matching(manifest, key, rank, tokens_path)
    if bool(all_reduce_host(torch.tensor([found], dtype=torch.int64), dist.ReduceOp.MIN, group)):
        log.info("reusing the encoded corpus in %s", directory)
        info = json.loads(manifest.read_text())
        return PreparedCorpus(Vocabulary.load(str(directory / "vocab.arrow")), TokenFile(str(tokens_path)),
                              info["corpus_words"], directory, reused=True)

    error = None
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            manifest.unlink(missing_ok=True)  # stale files must never look complete
        except OSError as e:
            error = f"cannot prepare {directory}: {e}"
    _agree(group, "corpus folder", error)

    with phases.phase("vocabulary", "counting words and merging the vocabulary"):
        bar = phases.progress(spec.share_bytes(rank, world), "B", "counting")

        def merging():
            bar.close()
            if rank == 0:
                log.info("merging the counts of %s ranks", world)

        try:
            vocab, _ = build_vocabulary(spec, min_count=min_count, max_vocab=max_vocab, group=group,
                                        progress=bar.update, merging=merging)
        finally:
            bar.close()
        error = None
        if rank == 0:
            try:
                vocab.save(str(directory / "vocab.arrow"))
            except OSError as e:
                error = f"cannot write {directory / 'vocab.arrow'}: {e}"
        _agree(group, "saving the vocabulary", error)
    log.info("vocabulary: %s words (min_count %s%s) of %s tokens", f"{vocab.size:,}", min_count,
             f", max_vocab {max_vocab:,}" if max_vocab else "", f"{vocab.total_words:,}")

    with phases.phase("encoding", "encoding the corpus into token files"):
        bar = phases.progress(spec.share_bytes(rank, world), "B", "encoding")
        error = None
        try:
            part = encode_share(spec, vocab.words, rank, world, str(tokens_path), bar.update)
        except (CorpusError, OSError) as e:
            error, part = str(e), None
        finally:
            bar.close()
        _agree(group, "encoding the corpus", error, CorpusError)
        counts = torch.tensor([[part.tokens, part.raw_words, part.sentences]], dtype=torch.int64)
        every, _ = all_gather_ragged(counts.to(collective_device(group)), group)
        every = every.cpu().tolist()
        error = None
        if rank == 0:
            info = {**key, "corpus_words": vocab.total_words, "vocabulary": vocab.size,
                    "tokens_per_rank": [t for t, _, _ in every], "sentences_per_rank": [s for _, _, s in every]}
            try:
                partial = manifest.with_name(manifest.name + ".partial")
                partial.write_text(json.dumps(info, indent=1))
                os.replace(partial, manifest)
            except OSError as e:
                error = f"cannot write {manifest}: {e}"
        _agree(group, "saving the corpus manifest", error)
    total = vocab.total_words
    del vocab  # the words now live in the memory-mapped file
    pa.default_memory_pool().release_unused()
    return PreparedCorpus(Vocabulary.load(str(directory / "vocab.arrow")), TokenFile(str(tokens_path)), total,
                          directory, reused=False)


def _matching(manifest: Path, key: dict, rank: int, tokens_path: Path) -> bool:
    try:
        info = json.loads(manifest.read_text())
        return (all(info.get(k) == json.loads(json.dumps(v)) for k, v in key.items())
                and os.path.getsize(tokens_path) == 4 * info["tokens_per_rank"][rank]
                and (manifest.parent / "vocab.arrow").is_file())
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def _agree(group, what: str, error: str | None, kind=OSError) -> None:
    """Every rank learns whether every rank succeeded; raises ``kind`` on all of them if not."""
    try:
        agree_or_raise(group, what, "ok", error, collective_device(group))
    except ValueError as e:
        raise kind(str(e)) from None
