"""The training job at the scale it exists for, against gensim, on one generated corpus.

    python benchmarks/word2vec_scale.py                                  # 10M words, 40M tokens
    python benchmarks/word2vec_scale.py --vocab 200000 --tokens 2000000  # a quick run
    python benchmarks/word2vec_scale.py --systems ours --keep            # ours only; keep the outputs

1. Generates the corpus deterministically (``--seed``): ``--tokens`` tokens, 20 to a line;
   every one of ``--vocab`` distinct words at least once, the rest drawn from Zipf(1.0) over the
   words; each word 10 letters (about 11.6 bytes a token with its separator).
2. Runs, one after the other on that file: our job on ``--nproc`` ranks
   (``python -m sharded_embedding.train data.path=... data.min_count=1 model.dim=128
   train.epochs=1``, binary export) and gensim ``Word2Vec(sg=1, vector_size=128, window=5,
   negative=5, min_count=1, sample=1e-3, workers=2, epochs=1)`` in ``corpus_file=`` mode
   (``build_vocab``, ``train``, ``save_word2vec_format(binary=True)``).
3. Records each phase's wall time and each process's peak resident memory in it (ours: from the
   job's metrics.json, which measures every rank's per-phase peak; gensim: the same measurement
   in its process), and writes a markdown table and the raw JSON.
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


def generate(path: Path, vocab: int, tokens: int, seed: int = 0, per_line: int = 20) -> None:
    """Write the corpus (see the module docstring) in a few seconds, with numpy and Arrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if tokens < vocab:
        raise SystemExit("--tokens must be at least --vocab (every word occurs once)")
    # Word i: 10 letters, base 26 of (a * i + c) mod 26**10, a bijection (a is prime to 26).
    ids = np.arange(vocab, dtype=np.int64)
    code = (ids * 2654435761 + 12345) % (26**10)
    letters = np.empty((vocab, 10), dtype=np.uint8)
    for k in range(10):
        letters[:, 9 - k] = ord("a") + code % 26
        code //= 26
    words = pa.array(letters.view("S10").ravel()).cast(pa.string())
    rng = np.random.default_rng(seed)
    draws = np.minimum(np.floor(vocab ** rng.random(tokens - vocab)).astype(np.int64) - 1, vocab - 1)
    stream = np.concatenate([rng.permutation(vocab), draws])
    rng.shuffle(stream)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        step = per_line * 100_000
        for a in range(0, tokens, step):
            part = pa.concat_arrays(words.take(pa.array(stream[a : a + step])).chunks) if isinstance(words, pa.ChunkedArray) else words.take(pa.array(stream[a : a + step]))
            n = len(part)
            bounds = np.append(np.arange(0, n, per_line, dtype=np.int32), np.int32(n))
            lines = pc.binary_join(pa.ListArray.from_arrays(pa.array(bounds), part), " ")
            lines = pc.binary_join_element_wise(lines, "", "\n")
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
            f.write(memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]])
    os.replace(partial, path)


_GENSIM = r"""
import json, logging, sys, time
from gensim.models import Word2Vec
from gensim.models.word2vec import LineSentence

def peak():  # this phase's peak resident MiB, then reset the mark for the next phase
    hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
    open('/proc/self/clear_refs', 'w').write('5')
    return hwm / 1024

corpus, out, dim, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
phases, rss = {}, {}
peak()
t = time.perf_counter()
model = Word2Vec(sg=1, vector_size=dim, window=5, negative=5, min_count=1, sample=1e-3, workers=workers, epochs=1)
model.build_vocab(corpus_file=corpus)
phases['vocabulary'], rss['vocabulary'] = time.perf_counter() - t, peak()
t = time.perf_counter()
model.train(corpus_file=corpus, total_words=model.corpus_total_words, total_examples=model.corpus_count, epochs=1)
phases['training'], rss['training'] = time.perf_counter() - t, peak()
t = time.perf_counter()
model.wv.save_word2vec_format(out, binary=True)
phases['export'], rss['export'] = time.perf_counter() - t, peak()
print(json.dumps({'seconds': phases, 'peak_rss_mib': rss, 'words': model.corpus_total_words,
                  'vocabulary': len(model.wv)}))
"""


def run_gensim(corpus: Path, out: Path, a) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _GENSIM, str(corpus), str(out / "gensim.bin"), str(a.dim),
                           str(a.workers)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gensim failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    result["words_per_second"] = result["words"] / result["seconds"]["training"]
    return result


def run_ours(corpus: Path, out: Path, a) -> dict:
    overrides = [f"data.path={corpus}", "data.min_count=1", f"model.dim={a.dim}", "train.epochs=1",
                 f"export.format={a.format}", f"out_dir={out / 'ours'}", f"hydra.run.dir={out / 'ours' / 'run'}",
                 *a.override]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           "-m", "sharded_embedding.train", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"our job failed:\n{done.stderr[-5000:]}")
    m = json.loads((out / "ours" / "metrics.json").read_text())
    return {"seconds": m["phases"]["seconds"], "peak_rss_mib": m["phases"]["peak_rss_mib"], "wall_seconds": wall,
            "words": m["corpus_words"], "vocabulary": m["vocabulary"], "words_per_second": m["words_per_second"]}


def table(ours: dict | None, gensim: dict | None, a) -> str:
    """Phases side by side: seconds, and peak RSS per process (ours: one number per rank)."""
    rows = ["| phase | ours, {n} ranks: s | ours: peak RSS MiB per rank | gensim: s | gensim: peak RSS MiB |".format(
        n=a.nproc), "|---|---|---|---|---|"]
    mapping = [("vocabulary + encoding", ["vocabulary", "encoding"], ["vocabulary"]),
               ("tables", ["tables"], []), ("training", ["training"], ["training"]),
               ("checkpoint", ["checkpoint"], []), ("export", ["export"], ["export"]),
               ("evaluation", ["evaluation"], [])]
    for name, mine, theirs in mapping:
        s_o = sum(ours["seconds"].get(k, 0) for k in mine) if ours else None
        r_o = ([max(ours["peak_rss_mib"][k][r] for k in mine if k in ours["peak_rss_mib"])
                for r in range(a.nproc)] if ours and any(k in ours["peak_rss_mib"] for k in mine) else None)
        s_g = sum(gensim["seconds"][k] for k in theirs) if gensim and theirs else None
        r_g = max(gensim["peak_rss_mib"][k] for k in theirs) if gensim and theirs else None
        rows.append(f"| {name} | {'' if s_o is None else f'{s_o:.1f}'} | "
                    f"{'' if r_o is None else ', '.join(f'{v:.0f}' for v in r_o)} | "
                    f"{'' if s_g is None else f'{s_g:.1f}'} | {'' if r_g is None else f'{r_g:.0f}'} |")
    rows.append(f"| **whole run (wall)** | {ours['wall_seconds']:.1f} | | {gensim['wall_seconds']:.1f} | |"
                if ours and gensim else "")
    lines = "\n".join(r for r in rows if r)
    if ours and gensim:
        lines += (f"\n\nwords/s in training: ours {ours['words_per_second']:,.0f}, gensim "
                  f"{gensim['words_per_second']:,.0f} ({ours['words_per_second'] / gensim['words_per_second']:.2f}x); "
                  f"whole run: ours / gensim wall time {ours['wall_seconds'] / gensim['wall_seconds']:.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=10_000_000)
    ap.add_argument("--tokens", type=int, default=40_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, help="where the corpus is (generated if missing)")
    ap.add_argument("--workdir", type=Path, help="outputs (default: a temporary folder, removed)")
    ap.add_argument("--systems", default="ours,gensim")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--format", default="binary", help="our export.format")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for our job")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="w2v_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = a.corpus or work / f"corpus_{a.vocab}_{a.tokens}_{a.seed}.txt"
    if not corpus.exists():
        t = time.perf_counter()
        generate(corpus, a.vocab, a.tokens, a.seed)
        print(f"generated {corpus} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s",
              flush=True)
    systems = a.systems.split(",")
    ours = run_ours(corpus, work, a) if "ours" in systems else None
    gensim = run_gensim(corpus, work, a) if "gensim" in systems else None
    print(table(ours, gensim, a))
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "ours": ours,
                                      "gensim": gensim}, indent=1))


if __name__ == "__main__":
    main()
