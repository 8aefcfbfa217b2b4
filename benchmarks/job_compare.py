"""The training job's words/s under each value of one option (sharding, transport, ranks, ...), interleaved.

    python benchmarks/job_compare.py                                    # data=wiki_offline, 2 ranks, 3 reps
    python benchmarks/job_compare.py --reps 5 --shardings auto,round_robin,hot_mirrored
    python benchmarks/job_compare.py --vary model.transport=shared_memory,process_group --reps 5
    python benchmarks/job_compare.py --vary nproc=2,1 --reps 5          # two ranks against one process
    python benchmarks/job_compare.py --vary nproc=2,1x2 --reps 5        # ... against one process on 2 threads
    python benchmarks/job_compare.py --data data.path=/work/data/corpus_10m_40m.txt data.min_count=1 --reps 1

Runs ``python -m sharded_embedding.train`` (torchrun, ``--nproc`` ranks, one epoch, no
evaluation, text export off the clock) once per value of the option varied (``--vary
KEY=V1,V2,...``, a job option, or ``nproc``: the number of ranks, ``RxT`` for R ranks of T
intra-op threads each, one thread otherwise, R x T at most the CPUs when T > 1; by default
``sharding=auto,round_robin``, which ``--shardings`` sets) per
repetition, the order rotating from one repetition to the next so that a drift in the
machine's load does not favour one value. The corpus is encoded once (``data.cache_dir``
shared by every run), so the runs differ only in that option. Reports the job's own training
words/s (metrics.json: corpus words x epochs / training seconds) of every run, the median per
value, and the median over repetitions of its ratio to the first value's run of the same
repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import run_in_session  # noqa: E402


def ranks_and_threads(value: str) -> tuple[int, int] | None:
    """``--vary nproc``'s ``R`` or ``RxT`` as (ranks, threads per rank); None if it is neither."""
    found = re.fullmatch(r"([0-9]+)(?:x([0-9]+))?", value)
    if not found or int(found[1]) < 1 or (found[2] is not None and int(found[2]) < 1):
        return None
    return int(found[1]), int(found[2] or 1)


def run_job(key: str, value: str, work: Path, tag: str, a) -> dict:
    out = work / tag
    nproc, threads = ranks_and_threads(value) if key == "nproc" else (a.nproc, 1)
    varied = [] if key == "nproc" else [f"{key}={value}"]
    overrides = [*a.data, *varied, f"train.epochs={a.epochs}", "evaluate=false",
                 f"data.cache_dir={work / 'corpus'}", f"out_dir={out}", f"hydra.run.dir={out / 'run'}", *a.override]
    # (sharded_embedding.launch: torchrun, with the job's own message instead of torchrun's traceback)
    cmd = [sys.executable, "-m", "sharded_embedding.launch", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sharded_embedding.train", *overrides]
    done, _, err = run_in_session(cmd, dict(os.environ, OMP_NUM_THREADS=str(threads)), a.timeout, f"{key}={value}",
                                  cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{key}={value} failed (exit {done.returncode}):\n{err[-5000:]}")
    m = json.loads((out / "metrics.json").read_text())
    log = (out / "run" / "train.log").read_text() if (out / "run" / "train.log").exists() else ""
    pages = next((part for ln in log.splitlines() for part in ln.split("; ") if "pages of" in part), "")
    return {"option": f"{key}={value}", "value": value, "transport": m.get("transport"),
            "words_per_second": m["words_per_second"], "train_seconds": m["train_seconds"],
            "words": m["corpus_words"], "vocabulary": m["vocabulary"], "pages": pages.strip()}


def check_args(a) -> tuple[str, list[str]]:
    """(the key varied, its values), or SystemExit saying what is wrong -- before any job runs:
    each value's configuration is composed and validated here as the job would (a bad value
    would otherwise fail only after the runs before it)."""
    key, _, values = (a.vary or f"sharding={a.shardings}").partition("=")
    options = values.split(",")
    if not key or len(options) < 2 or "" in options:
        raise SystemExit(f"--vary {a.vary!r}: give KEY=V1,V2,... with two or more values")
    if len(set(options)) < len(options):
        raise SystemExit(f"--vary {key}={values}: a value is given twice")
    if a.reps < 1 or a.epochs < 1 or a.nproc < 1:
        raise SystemExit(f"--reps, --epochs and --nproc must be >= 1, got {a.reps}, {a.epochs}, {a.nproc}")
    if key == "nproc":
        if not all(ranks_and_threads(v) for v in options):
            raise SystemExit(f"--vary nproc={values}: each value is a number of ranks >= 1, or RxT: R ranks of T "
                             "threads each (T >= 1)")
        layouts = [ranks_and_threads(v) for v in options]
        if len(set(layouts)) < len(layouts):
            raise SystemExit(f"--vary nproc={values}: two values mean the same ranks and threads")
        cpus = len(os.sched_getaffinity(0))
        crowded = [v for v, (r, t) in zip(options, layouts) if t > 1 and r * t > cpus]
        if crowded:  # the job pins each rank to its share of the CPUs, and a rank's threads to that share
            raise SystemExit(f"--vary nproc={values}: {', '.join(crowded)} asks for more threads than this "
                             f"machine's {cpus} CPUs give the ranks (each rank gets {cpus} / R of them)")
    from sharded_embedding.hydra_app import compose
    from sharded_embedding.word2vec.config import register, validate

    for value in options:
        world = ranks_and_threads(value)[0] if key == "nproc" else a.nproc
        varied = [] if key == "nproc" else [f"{key}={value}"]
        try:
            problems = validate(compose("train", register, [*a.data, *varied, *a.override]), world)
        except Exception as e:  # noqa: BLE001 - Hydra's own errors (an unknown key, a value of the wrong type)
            problems = [str(e).splitlines()[0]]
        if problems:
            raise SystemExit(f"{key}={value}: the job would refuse it: " + "; ".join(problems))
    return key, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vary", default=None, help="KEY=V1,V2,...: the option whose values are compared "
                    "(default: sharding=<--shardings>)")
    ap.add_argument("--shardings", default="auto,round_robin", help="shorthand for --vary sharding=...")
    ap.add_argument("--data", nargs="+", default=["data=wiki_offline"], help="the job's data overrides")
    ap.add_argument("--override", nargs="*", default=[], help="more job overrides")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--json", default=None, help="append every run as a JSON line")
    a = ap.parse_args()
    key, options = check_args(a)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="job_compare_") as tmp:
        work = Path(tmp)
        for rep in range(a.reps):
            shift = rep % len(options)
            for value in options[shift:] + options[:shift]:
                r = run_job(key, value, work, f"{key}-{value}-{rep}".replace("/", "_"), a)
                r["rep"] = rep
                runs.append(r)
                print(json.dumps(r), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    first = {r["rep"]: r["words_per_second"] for r in runs if r["value"] == options[0]}
    ranks = "ranks as varied" if key == "nproc" else f"{a.nproc} ranks"
    print(f"\n### The job's training words/s by {key}: {' '.join(a.data)}, {ranks}, {a.epochs} epoch(s), "
          f"{a.reps} interleaved reps; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs\n")
    print(f"corpus {runs[0]['words']:,} words, vocabulary {runs[0]['vocabulary']:,}\n")
    print(f"| {key} | transport | pages | median words/s | each rep | vs {options[0]} (median of the reps' ratios) |\n"
          "|---|---|---|---|---|---|")
    for value in options:
        mine = sorted((r for r in runs if r["value"] == value), key=lambda r: r["rep"])
        med = statistics.median(r["words_per_second"] for r in mine)
        each = ", ".join(f"{r['words_per_second']:,.0f}" for r in mine)
        ratio = statistics.median(r["words_per_second"] / first[r["rep"]] for r in mine)
        print(f"| {value} | {mine[0]['transport']} | {mine[0]['pages']} | {med:,.0f} | {each} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
