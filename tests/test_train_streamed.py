"""The word2vec job through its streamed pipeline on a generated 200k-word corpus (the small
version of benchmarks/word2vec_scale.py): every export format reloads bit for bit, a run that
dies after training resumes straight to export, and the encoded corpus is reused."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB, TOKENS, DIM = 200_000, 600_000, 16
RUN = ["data.min_count=1", f"model.dim={DIM}", "train.epochs=1", "train.log_every=10", "sharding.page_size=4096",
       "evaluate_vocab=50000"]


def _generator():
    spec = importlib.util.spec_from_file_location("word2vec_scale", ROOT / "benchmarks" / "word2vec_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    _generator()(path, VOCAB, TOKENS, seed=1)
    return path


def _train(corpus: Path, out: Path, *overrides) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        ["bash", "launch/train.sh", f"data.path={corpus}", f"out_dir={out}", f"hydra.run.dir={out / 'run'}", *RUN,
         *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _final_inputs(out: Path) -> torch.Tensor:
    """The trained input table, from the job's final checkpoint (read in one process)."""
    last = sorted((out / "checkpoints").glob("step_*[0-9]"))[-1]
    return torch.from_numpy(np.load(last / "inputs.weight.npy"))


def _vocab_txt(out: Path) -> tuple[list[str], list[int]]:
    words, counts = zip(*(line.split(" ") for line in (out / "vocab.txt").read_text().splitlines()))
    return list(words), [int(c) for c in counts]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    done = _train(corpus, out, "export.format=all")
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_every_export_format_reloads_bit_for_bit(corpus, uninterrupted):
    from gensim.models import KeyedVectors

    out, table = uninterrupted, _final_inputs(uninterrupted)
    words, counts = _vocab_txt(out)
    assert len(words) == VOCAB and counts == sorted(counts, reverse=True)  # every word; most frequent first
    from collections import Counter

    want = Counter(corpus.read_text().split())
    assert dict(zip(words, counts)) == want
    assert all(a < b for (a, ca), (b, cb) in zip(zip(words, counts), zip(words[1:], counts[1:])) if ca == cb)

    npy = torch.from_numpy(np.load(out / "vectors.npy"))
    assert torch.equal(npy, table)
    binary = KeyedVectors.load_word2vec_format(str(out / "vectors.bin"), binary=True)
    assert binary.index_to_key == words and torch.equal(torch.from_numpy(binary.vectors), table)
    lines = (out / "vectors.txt").read_text().splitlines()
    assert lines[0] == f"{VOCAB} {DIM}" and [line.split(" ", 1)[0] for line in lines[1:]] == words
    values = np.array([line.split(" ")[1:] for line in lines[1:]], dtype=np.float64).astype(np.float32)
    assert torch.equal(torch.from_numpy(values), table)  # 9 significant digits: float32 exactly
    text = KeyedVectors.load_word2vec_format(str(out / "vectors.txt"))
    assert torch.equal(torch.from_numpy(text.vectors), table)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vocabulary"] == VOCAB and metrics["corpus_words"] == TOKENS
    assert metrics["exported"] == ["text", "binary", "npy"] and metrics["corpus_reused"] is False
    assert set(metrics["phases"]["seconds"]) == {"vocabulary", "encoding", "tables", "training", "checkpoint",
                                                   "export", "evaluation"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in metrics["phases"]["peak_rss_mib"].values())
    assert metrics["evaluation"]["vocabulary"] == 50_000  # the most frequent words only
    assert metrics["evaluation"]["wordsim353_spearman"] is None  # no evaluation word is in this vocabulary
    assert not list(out.glob("*.partial"))


def _import(path: str) -> torch.Tensor:
    from sharded_embedding import ShardedEmbedding

    emb = ShardedEmbedding(VOCAB, DIM, page_size=3000, placement="round_robin")
    emb.import_table(path)
    return emb.full_table()


def test_the_npy_export_imports_on_another_layout(uninterrupted):
    from tests.harness import run_ranks

    table = _final_inputs(uninterrupted)
    for got in run_ranks(3, _import, str(uninterrupted / "vectors.npy")):
        assert torch.equal(got, table)


def test_a_run_that_fails_after_training_resumes_straight_to_export(corpus, uninterrupted, tmp_path):
    out = tmp_path / "run"
    (out / "vectors.bin").mkdir(parents=True)  # the export cannot put its file there
    done = _train(corpus, out, "export.format=binary")
    assert done.returncode == 1  # a failure after training (the tables are saved)
    log = done.stdout + done.stderr
    assert log.count("the export failed after training") == 1
    saved = sorted((out / "checkpoints").glob("step_*[0-9]"))[-1]
    assert f"The trained tables are saved in {saved}" in log and "train.resume=true" in log
    assert not (out / "metrics.json").exists() and not list(out.glob("*.partial"))
    tokens = sorted((out / "corpus").glob("tokens-*.i32"))
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in tokens]

    (out / "vectors.bin").rmdir()
    done = _train(corpus, out, "export.format=binary", "train.resume=true")
    assert done.returncode == 0, done.stderr[-4000:]
    log = done.stdout + done.stderr
    assert "reusing the encoded corpus" in log and "(training was complete)" in log
    assert "training 1 epochs" not in log and "counting words" not in log  # nothing trained or counted again
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in tokens] == before
    assert (out / "vectors.bin").read_bytes() == (uninterrupted / "vectors.bin").read_bytes()
    assert json.loads((out / "metrics.json").read_text())["corpus_reused"] is True
