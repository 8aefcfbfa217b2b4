"""Paired A/B of two versions of the package on the same training step, in one job.

    python benchmarks/ab_trees.py --base HEAD~3                    # S, zipf and uniform, SGD and row-wise Adagrad
    python benchmarks/ab_trees.py --base /path/to/other/checkout --workload M --blocks 12 --block-steps 20
    python benchmarks/ab_trees.py --base v0.3 --batch 64 --block-steps 200   # the fixed cost per call

Why: on a shared machine two runs of one tree differ by more than a change of a few percent
(`lookup.py`'s runs of one system differed by up to 40% on 2026-12-01), so two trees timed in
separate runs cannot be told apart. Here both versions run in the same torchrun job: the
base version is extracted (``git archive``, or copied from a checkout), its C extension built,
and imported as ``sharded_embedding_base`` beside this checkout's ``sharded_embedding``; each
rank builds one table of each (same rows, same placement, its own shared-memory transport)
and the job alternates blocks of steps between them (ABBA order), so drift hits both alike.
Reported per configuration: the median block step time of each and the median of the paired
per-block ratios (this checkout / base; below 1: this checkout is faster). The base must be
recent enough to take the step as written here (`ShardedEmbedding`'s ``fused_optimizer=`` and
``transport=``, `tune_malloc`, `init_distributed`): a revision without them fails in its worker,
whose error is shown.

The step is `lookup.py`'s ``ours_fused_*`` step: ``(emb(ids) * w).sum().backward()`` with the
optimizer fused, ``tune_malloc()`` and one pinned thread per rank. Both tables live in one
process, so caches hold both: absolute times run higher than `lookup.py`'s; read the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # workload.py, and the package of this checkout

from lookup import WORKLOADS  # noqa: E402
from workload import add_paired_args, check_paired_args, paired_sizes, run_paired, time_in_blocks  # noqa: E402

BASE_NAME = "sharded_embedding_base"


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a git revision of this repository, or a checkout's directory")
    ap.add_argument("--base-dir", default=None, help=argparse.SUPPRESS)
    add_paired_args(ap, WORKLOADS)
    a = ap.parse_args(argv)
    check_paired_args(ap, a)
    return a


def prepare_base(base: str, into: str) -> str:
    """The base version as package ``sharded_embedding_base`` under ``into`` (its C extension
    built there); returns ``into``. ``base``: a checkout's directory or a git revision."""
    src, parts = os.path.join(into, "src"), ["sharded_embedding", "setup.py", "pyproject.toml"]
    if os.path.isdir(os.path.join(base, "sharded_embedding")):
        shutil.copytree(os.path.join(base, "sharded_embedding"), os.path.join(src, "sharded_embedding"),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        for name in parts[1:]:
            shutil.copy(os.path.join(base, name), src)
    else:
        os.makedirs(src)
        known = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"],
                               capture_output=True)
        if known.returncode:
            raise SystemExit(f"--base {base!r} is neither a checkout nor a revision of {ROOT}")
        archive = subprocess.run(["git", "-C", ROOT, "archive", base, *parts], capture_output=True)
        if archive.returncode:
            raise SystemExit(f"--base {base!r} does not hold {parts} (too old to compare): "
                             f"{archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, check=True,
                   capture_output=True)
    if not any(name.startswith("_scatter") and name.endswith(".so") for name in os.listdir(os.path.join(src, "sharded_embedding"))):
        raise SystemExit("the base version's C extension did not build: its steps would run PyTorch's kernels")
    shutil.move(os.path.join(src, "sharded_embedding"), os.path.join(into, BASE_NAME))
    return into


def _worker(a) -> None:
    import importlib

    import torch.distributed as dist

    sys.path.insert(0, a.base_dir)
    import sharded_embedding as ours
    from workload import make_ids, make_loss_weight

    base = importlib.import_module(BASE_NAME)
    if not ours.tune_malloc():
        raise SystemExit("this C library has no mallopt")
    ours.init_distributed("gloo", bind_cpus=True)
    rank = dist.get_rank()
    rows, dim, batch = paired_sizes(a, WORKLOADS)
    batches = 200
    ids = make_ids(rows, batch, batches, rank, a.dist)
    w = make_loss_weight(batch, dim, rank)
    fused = {"name": a.optimizer, "lr": 0.05}
    tables = {name: pkg.ShardedEmbedding(rows, dim, page_size=512, fused_optimizer=fused, transport="shared_memory")
              for name, pkg in (("base", base), ("ours", ours))}

    def run(name: str, start: int, steps: int) -> None:
        for i in range(start, start + steps):
            (tables[name](ids[i % batches]) * w).sum().backward()

    times = time_in_blocks(run, ["base", "ours"], a.blocks, a.block_steps)  # ABBA
    if rank == 0:
        ratios = [o / b for o, b in zip(times["ours"], times["base"])]
        print(f"RESULT {a.dist} {a.optimizer} {statistics.median(times['base']):.3f} "
              f"{statistics.median(times['ours']):.3f} {statistics.median(ratios):.3f}", flush=True)
    ours.finish()


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        _worker(a)
        return 0
    with tempfile.TemporaryDirectory(prefix="ab_trees_") as tmp:
        results = run_paired(a, __file__, ["--base", a.base, "--base-dir", prepare_base(a.base, tmp)])
    rows, dim, batch = paired_sizes(a, WORKLOADS)
    print(f"\n{rows:,} x {dim}, {batch} ids per rank, {a.world} ranks, base {a.base}: median of {a.blocks} ABBA blocks "
          f"of {a.block_steps} steps each\n")
    print("| ids | optimizer | base ms | this checkout ms | this / base (paired median) |\n|---|---|---|---|---|")
    for d, o, b, t, r in results:
        print(f"| {d} | {o} | {b} | {t} | {r}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
