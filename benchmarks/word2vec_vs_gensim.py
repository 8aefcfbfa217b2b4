"""Skip-gram word vectors: our job on 2 ranks against gensim's Word2Vec(sg=1, workers=2), in one run.

    python benchmarks/word2vec_vs_gensim.py                 # gensim's bundled Wikipedia sample
    python benchmarks/word2vec_vs_gensim.py --corpus text.txt --epochs 5 --markdown table.md

Both see the same corpus, dimension, window, negatives, min_count, sample and epochs. Speed is
corpus words x epochs / training seconds for both (gensim: ``train()``; ours: the training
loop, as metrics.json reports it; vocabulary building excluded for both). Both sets of vectors
are scored by the same code (WordSim-353 and SimLex-999 Spearman, analogy accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_gensim(a, path: str, out: Path) -> dict:
    from gensim.models import Word2Vec
    from gensim.models.word2vec import LineSentence

    from sharded_embedding.word2vec.evaluation import evaluate_vectors

    sentences = list(LineSentence(path))
    words = sum(len(s) for s in sentences)
    model = Word2Vec(sg=1, vector_size=a.dim, window=a.window, negative=a.negatives, min_count=a.min_count,
                     sample=a.sample, workers=a.workers, seed=a.seed)
    model.build_vocab(sentences)
    t = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=a.epochs)
    seconds = time.perf_counter() - t
    vectors = out / "gensim.txt"
    model.wv.save_word2vec_format(str(vectors))
    return dict(system=f"gensim Word2Vec(sg=1, workers={a.workers})", train_seconds=seconds,
                words_per_second=words * a.epochs / seconds, evaluation=evaluate_vectors(str(vectors)))


def run_ours(a, path: str, out: Path) -> dict:
    overrides = [
        f"data.path={path}", f"data.min_count={a.min_count}", f"data.sample={a.sample}",
        f"model.dim={a.dim}", f"model.window={a.window}", f"model.negatives={a.negatives}",
        f"train.epochs={a.epochs}", f"train.seed={a.seed}", f"out_dir={out / 'ours'}", f"hydra.run.dir={out / 'run'}",
        *a.override,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           "-m", "sharded_embedding.train", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"our job failed:\n{done.stderr[-3000:]}")
    m = json.loads((out / "ours" / "metrics.json").read_text())
    return dict(system=f"sharded_embedding.train, {a.nproc} ranks ({m['optimizer']['name']})",
                train_seconds=m["train_seconds"], words_per_second=m["words_per_second"], evaluation=m["evaluation"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="default: gensim's head500.noblanks.cor")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--sample", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2, help="gensim worker threads")
    ap.add_argument("--nproc", type=int, default=2, help="our ranks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for our job (repeatable)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    a = ap.parse_args(argv)
    if a.corpus is None:
        from gensim.test.utils import datapath

        a.corpus = datapath("head500.noblanks.cor")
    words = sum(len(line.split()) for line in open(a.corpus, encoding="utf-8", errors="replace"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        gensim = run_gensim(a, a.corpus, out)
        ours = run_ours(a, a.corpus, out)
    import torch

    head = (f"{Path(a.corpus).name}: {words:,} words; dim {a.dim}, window {a.window}, {a.negatives} negatives, "
            f"min_count {a.min_count}, sample {a.sample}, {a.epochs} epochs; {time.strftime('%Y-%m-%d')}, "
            f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    lines = [head, "", "| system | train s | words/s | WordSim-353 rho | SimLex-999 rho | analogy acc. |",
             "|---|---|---|---|---|---|"]
    for r in (gensim, ours):
        e = r["evaluation"]
        lines.append(f"| {r['system']} | {r['train_seconds']:.2f} | {r['words_per_second']:,.0f} | "
                     f"{e['wordsim353_spearman']:.3f} | {e['simlex999_spearman']:.3f} | {e['analogy_accuracy']:.3f} |")
    ratio = ours["words_per_second"] / gensim["words_per_second"]
    delta = ours["evaluation"]["wordsim353_spearman"] - gensim["evaluation"]["wordsim353_spearman"]
    lines += ["", f"ours / gensim words/s: {ratio:.2f}x; WordSim-353 rho ours - gensim: {delta:+.3f}"]
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
