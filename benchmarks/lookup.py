"""Training-step throughput of ShardedEmbedding against baselines, on the same ids, in one run.

    python benchmarks/lookup.py                         # S: 1M x 64, 8192 ids per rank, 2 ranks
    python benchmarks/lookup.py --workload M            # M: 10M x 128, 16384 ids per rank
    python benchmarks/lookup.py --workload S,M --chart docs/benchmarks.png --markdown out.md
    python benchmarks/lookup.py --workload L --systems ours_fused_rowwise_adagrad --dists zipf
    python benchmarks/lookup.py --workload S,M --repeat 3 --transports shared_memory,process_group \
        --systems ours_fused_sgd,ours_fused_rowwise_adagrad,single_sparse,single_sparse_rowwise_adagrad

A step is: forward lookup of each rank's ids -> loss = (out * w).sum() -> backward ->
optimizer step (SGD lr 0.05 on the touched rows unless the system says otherwise). Every
(system, distribution) pair runs on its own, one after another: multi-process systems under
torchrun on gloo (one thread per rank, each rank pinned to its own core unless
--no-bind-cpus), single-process ones with plain python. Each prints one JSON line; the
driver prints a table with median step time, lookups/s over all ranks, bytes exchanged per
rank and step, peak RSS per rank, and the ratio of each of our systems to each baseline
measured in the same run, and a summary of each of our fused systems against the
single-process limit with the same optimizer, per transport (--transports).

Systems (--systems, comma separated):
  ours_sgd                    ShardedEmbedding, sparse gradients + torch.optim.SGD
  ours_fused_sgd              ShardedEmbedding, SGD fused into the backward
  ours_fused_rowwise_adagrad  ShardedEmbedding, row-wise Adagrad fused into the backward
  single_sparse               one process, the whole table, nn.Embedding(sparse=True) + SGD,
                              looking up all ranks' ids each step (the no-communication limit;
                              its weight on transparent huge pages, as our shards are)
  single_sparse_rowwise_adagrad   the same with row-wise Adagrad on the coalesced sparse
                              gradient
  single_fused_sgd, single_fused_rowwise_adagrad   ShardedEmbedding on one process (a group
                              of one: no exchange) holding the whole table, fused update,
                              looking up all ranks' ids each step
                              The single-process limit of each fused optimizer is the faster
                              of its two single-process systems in the run.
  bound_no_exchange_sgd, bound_no_exchange_rowwise_adagrad   not a system but a bound: every rank
                              a group of one (no exchange at all) holding 1/world of the rows,
                              looking up its own ids (modulo its row count) while the other
                              ranks do the same, pinned as our ranks are. The step time world
                              ranks would have if routing and every exchange cost nothing, on
                              this machine (the ranks still share its memory bandwidth and
                              caches): the limit table shows limit / bound, the most any
                              exchange could reach.
  dtensor_rowwise             nn.Embedding + RowwiseParallel (Shard(0) in and out) on a CPU
                              DeviceMesh, dense gradient of the local shard + SGD
  torchrec_rw_fused_sgd       TorchRec EmbeddingCollection, ROW_WISE, FBGEMM EXACT_SGD fused
  torchrec_rw_fused_rowwise_adagrad   the same with EXACT_ROWWISE_ADAGRAD

Our systems run once per transport in --transports (default: auto, what a table gets by
default); with more than one, or one other than auto, each is labelled system/shm or
system/gloo (shared_memory, process_group).

TorchRec needs the optional extra: pip install -e '.[bench]' && pip install --no-deps
torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0. Its gradient division is turned off so that every
system applies the same update (lr times the sum of all ranks' gradients).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # workload.py, and the package of this checkout

from workload import allocator_env, apply_allocator, parse_allocators  # noqa: E402

WORKLOADS = {
    "S": dict(rows=1_000_000, dim=64, batch=8192),
    "M": dict(rows=10_000_000, dim=128, batch=16384),
    "L": dict(rows=30_000_000, dim=128, batch=16384),  # 15.4 GB: more than one rank's share of 24 GiB
}
FUSED = {"ours_fused_sgd": "sgd", "ours_fused_rowwise_adagrad": "rowwise_adagrad"}
OURS = ["ours_sgd", *FUSED]
TORCHREC = {"torchrec_rw_fused_sgd": "EXACT_SGD", "torchrec_rw_fused_rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD"}
SINGLE = ["single_sparse", "single_sparse_rowwise_adagrad"]
# ShardedEmbedding itself on one process holding the whole table (no exchange): the other
# candidate for the single-process limit, since our fused update beats torch's coalesce
SINGLE_FUSED = {"single_fused_sgd": "sgd", "single_fused_rowwise_adagrad": "rowwise_adagrad"}
# world ranks, each a group of one with its share of the rows and its own ids: no exchange
NO_EXCHANGE = {"bound_no_exchange_sgd": "sgd", "bound_no_exchange_rowwise_adagrad": "rowwise_adagrad"}
LIMIT = {"sgd": ["single_sparse", "single_fused_sgd"],  # per fused optimizer: the faster is the limit
         "rowwise_adagrad": ["single_sparse_rowwise_adagrad", "single_fused_rowwise_adagrad"]}
BASELINES = [*SINGLE, *SINGLE_FUSED, "dtensor_rowwise", *TORCHREC]
TRANSPORT_LABELS = {"auto": "", "shared_memory": "shm", "process_group": "gloo"}
SLOW = {"dtensor_rowwise"}  # dense full-shard gradients: seconds per step at M, few steps suffice
DEFAULT_SYSTEMS = [*OURS, *BASELINES, *NO_EXCHANGE]


def _label(system: str, transport: str | None, transports: list[str], allocator: str = "default",
           allocators: tuple[str, ...] = ("default",)) -> str:
    """``system``, or ``system/shm`` etc. when the run compares transports, and ``@tuned`` etc.
    when it compares allocators."""
    label = system
    if transport is not None and transports != ["auto"]:
        label = f"{system}/{TRANSPORT_LABELS[transport] or transport}"
    return label if list(allocators) == ["default"] else f"{label}@{allocator}"


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="S", help="S, M or both (S,M); or give --rows/--dim/--batch")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="ids per rank per step")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--slow-steps", type=int, default=3, help="timed steps for the dense-gradient baselines")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dists", default="zipf,uniform")
    ap.add_argument("--systems", default=None,
                    help="comma separated (default: all; TorchRec's only when it is installed)")
    ap.add_argument("--transports", default="auto",
                    help="comma separated, among auto, shared_memory, process_group: our systems run once "
                         "per transport")
    ap.add_argument("--transport", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--allocators", default="default",
                    help="comma separated, among default (glibc malloc as it comes), tuned "
                         "(sharded_embedding.tune_malloc() first), huge (glibc.malloc.hugetlb=1: what "
                         "malloc maps on transparent huge pages) and tuned_huge (both): every system runs "
                         "under each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--markdown", default=None, help="also write the result table to this file")
    ap.add_argument("--chart", default=None, help="write a bar chart of lookups/s to this PNG (needs matplotlib)")
    ap.add_argument("--no-bind-cpus", dest="bind_cpus", action="store_false",
                    help="do not pin each rank of a multi-process system to its own cores")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds allowed per system run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every system this many times, interleaved, and keep the run with the median "
                         "step time (this machine's noise between runs exceeds many differences measured)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dist", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------- workers
def _setup_distributed(a):
    from workload import setup_distributed

    return setup_distributed(a.bind_cpus)


def _gather_floats(value: float) -> list[float]:
    from workload import gather_floats

    return gather_floats(value)


def _run_distributed(a, rank, world, build, step, **extra):
    """Time ``step`` (after ``build``) and report from rank 0."""
    import torch.distributed as dist

    from workload import current_rss_mib, emit, peak_rss_mib, summary, time_steps

    rss0 = current_rss_mib()
    t = time.perf_counter()
    state = build()
    init_s = time.perf_counter() - t
    rss_init = current_rss_mib()
    steps = a.slow_steps if a.worker in SLOW else a.steps
    warmup = 1 if a.worker in SLOW else a.warmup
    times = time_steps(lambda i: step(state, i), warmup, steps, sync=dist.barrier)
    info = extra.pop("after", lambda s: {})(state)
    peak = _gather_floats(peak_rss_mib())
    before = _gather_floats(rss0)
    after_init = _gather_floats(rss_init)
    if rank == 0:
        emit(summary(times, a.world * a.batch, system=a.worker, dist=a.dist, world=world, init_s=round(init_s, 2),
                     peak_rss_mib_per_rank=peak, rss_before_build_mib_per_rank=before,
                     rss_after_build_mib_per_rank=after_init, steps=steps, **info, **extra))


def _worker_ours(a):
    import torch

    from sharded_embedding import ShardedEmbedding
    from workload import make_ids, make_loss_weight

    rank, world = _setup_distributed(a)
    n = a.warmup + a.steps
    rows, group = a.rows, None
    if a.worker in SINGLE_FUSED:  # one process, every rank's ids and loss weights
        per_rank = [make_ids(a.rows, a.batch, n, r, a.dist, seed=a.seed) for r in range(a.world)]
        ids = [torch.cat([per_rank[r][i] for r in range(a.world)]) for i in range(n)]
        w = torch.cat([make_loss_weight(a.batch, a.dim, r, a.seed) for r in range(a.world)])
    else:
        ids = make_ids(a.rows, a.batch, n, rank, a.dist, seed=a.seed)
        w = make_loss_weight(a.batch, a.dim, rank, a.seed)
    if a.worker in NO_EXCHANGE:  # a group of one per rank (every rank makes every group), its share of the rows
        import torch.distributed as dist

        group = [dist.new_group([r]) for r in range(world)][rank]
        rows = a.rows // world
        ids = [x % rows for x in ids]
    opt_name = {**FUSED, **SINGLE_FUSED, **NO_EXCHANGE}.get(a.worker)
    fused = {"name": opt_name, "lr": a.lr} if opt_name else None

    def build():
        emb = ShardedEmbedding(rows, a.dim, page_size=a.page_size, fused_optimizer=fused, transport=a.transport,
                               process_group=group)
        opt = torch.optim.SGD(emb.parameters(), lr=a.lr) if fused is None else None
        return emb, opt

    def step(state, i):
        emb, opt = state
        (emb(ids[i]) * w).sum().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def after(state):
        emb, _ = state
        s = emb.stats()
        shard = emb.weight.numel() * emb.weight.element_size()
        opt_state = sum(b.numel() * b.element_size() for b in emb.optimizer.buffers()) if emb.optimizer else 0
        return dict(bytes_sent_per_step=round(s["bytes_sent_per_call"]), shard_mib=round(shard / 2**20, 1),
                    optimizer_state_mib=round(opt_state / 2**20, 1), page_size=a.page_size,
                    transport=emb.transport.name)

    _run_distributed(a, rank, world, build, step, after=after)


def _worker_dtensor(a):
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from workload import make_ids, make_loss_weight

    rank, world = _setup_distributed(a)
    ids = make_ids(a.rows, a.batch, max(a.warmup + a.steps, 1 + a.slow_steps), rank, a.dist, seed=a.seed)
    w = make_loss_weight(a.batch, a.dim, rank, a.seed)

    def build():
        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            emb = nn.Embedding(a.rows, a.dim)
        emb = parallelize_module(emb, mesh, RowwiseParallel(input_layouts=Shard(0), output_layouts=Shard(0)))
        emb.to_empty(device="cpu")
        with torch.no_grad():
            emb.weight.to_local().normal_()
        return emb, torch.optim.SGD(emb.parameters(), lr=a.lr)

    def step(state, i):
        emb, opt = state
        (emb(ids[i]) * w).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _run_distributed(a, rank, world, build, step)


def _worker_torchrec(a):
    import torch
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.distributed.comm_ops import set_gradient_division
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    from workload import make_ids, make_loss_weight

    rank, world = _setup_distributed(a)
    set_gradient_division(False)  # the summed gradient, as ours and the single process apply
    ids = make_ids(a.rows, a.batch, a.warmup + a.steps, rank, a.dist, seed=a.seed)
    w = make_loss_weight(a.batch, a.dim, rank, a.seed)
    lengths = torch.ones(a.batch, dtype=torch.int32)
    kjts = [KeyedJaggedTensor(keys=["f"], values=i, lengths=lengths) for i in ids]

    def build():
        table = EmbeddingConfig(name="t", embedding_dim=a.dim, num_embeddings=a.rows, feature_names=["f"])
        module = EmbeddingCollection(tables=[table], device=torch.device("meta"))
        fused = dict(optimizer=getattr(EmbOptimType, TORCHREC[a.worker]), learning_rate=a.lr, eps=1e-10)
        sharder = EmbeddingCollectionSharder(fused_params=fused)
        constraints = {"t": ParameterConstraints(sharding_types=["row_wise"],
                                                 compute_kernels=[EmbeddingComputeKernel.FUSED.value])}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(module, [sharder], dist.group.WORLD)
        return DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                        device=torch.device("cpu"), plan=plan, sharders=[sharder])

    def step(model, i):
        out = model(kjts[i])["f"].values()
        (out * w).sum().backward()

    _run_distributed(a, rank, world, build, step)


def _huge_page_weight(rows: int, dim: int):
    """nn.Embedding's N(0, 1) initial weight, but allocated on transparent huge pages as our
    shards are (`sharded_embedding.storage`): the limit at its best, so that a ratio to it
    measures the sharding, not the page size (huge pages alone make random row gathers and
    scatter-adds 20-40% faster on this machine)."""
    import torch

    from sharded_embedding.storage import allocate

    return allocate((rows, dim), torch.float32, torch.device("cpu")).normal_()


def _worker_single(a):
    import torch

    from workload import current_rss_mib, emit, make_ids, make_loss_weight, peak_rss_mib, summary, time_steps

    n = a.warmup + a.steps
    per_rank = [make_ids(a.rows, a.batch, n, r, a.dist, seed=a.seed) for r in range(a.world)]
    ids = [torch.cat([per_rank[r][i] for r in range(a.world)]) for i in range(n)]
    w = torch.cat([make_loss_weight(a.batch, a.dim, r, a.seed) for r in range(a.world)])
    rss0 = current_rss_mib()
    emb = torch.nn.Embedding(a.rows, a.dim, sparse=True, _weight=_huge_page_weight(a.rows, a.dim))
    if a.worker == "single_sparse":
        opt = torch.optim.SGD(emb.parameters(), lr=a.lr)
    else:
        opt = RowwiseAdagrad(emb.weight, lr=a.lr)

    def step(i):
        (emb(ids[i]) * w).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, a.warmup, a.steps)
    emit(summary(times, a.world * a.batch, system=a.worker, dist=a.dist, world=1,
                 peak_rss_mib_per_rank=[round(peak_rss_mib(), 1)], rss_before_build_mib_per_rank=[round(rss0, 1)]))


class RowwiseAdagrad:
    """Row-wise Adagrad (FBGEMM EXACT_ROWWISE_ADAGRAD, the math of our fused
    ``rowwise_adagrad``) on the sparse gradient of one ``nn.Embedding(sparse=True)``: coalesce
    (sum each row's duplicates, as the square needs), then
    ``s[r] += mean(g[r]^2); w[r] -= lr * g[r] / (sqrt(s[r]) + eps)``. torch has no row-wise
    Adagrad; this is the leanest single-process form of it."""

    def __init__(self, weight, lr: float, eps: float = 1e-10):
        import torch

        self.weight, self.lr, self.eps = weight, lr, eps
        self.sum = torch.zeros(weight.shape[0], dtype=torch.float32)

    def step(self):
        import torch

        with torch.no_grad():
            g = self.weight.grad.coalesce()
            rows, values = g.indices()[0], g.values()
            acc = self.sum.index_select(0, rows).add_(values.square().mean(1))
            self.sum.index_copy_(0, rows, acc)
            scale = acc.sqrt_().add_(self.eps).reciprocal_().mul_(-self.lr)
            self.weight.index_add_(0, rows, values * scale.unsqueeze(1))

    def zero_grad(self, set_to_none: bool = True):
        self.weight.grad = None


WORKERS = {**{s: _worker_ours for s in [*OURS, *SINGLE_FUSED, *NO_EXCHANGE]}, **{s: _worker_torchrec for s in TORCHREC},
           "dtensor_rowwise": _worker_dtensor, **{s: _worker_single for s in SINGLE}}


# ---------------------------------------------------------------------------------- driver
def _run_one(a, system: str, dist: str, transport: str | None = None, allocator: str = "default") -> dict:
    common = [f"--rows={a.rows}", f"--dim={a.dim}", f"--batch={a.batch}", f"--world={a.world}",
              f"--transport={transport or 'auto'}", f"--page-size={a.page_size}", f"--steps={a.steps}",
              f"--warmup={a.warmup}", f"--lr={a.lr}", f"--slow-steps={a.slow_steps}", f"--seed={a.seed}", f"--worker={system}", f"--dist={dist}"]
    if not a.bind_cpus:
        common.append("--no-bind-cpus")
    script = os.path.abspath(__file__)
    env = allocator_env(allocator, dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if system in SINGLE:
        cmd = [sys.executable, script, *common]
    else:
        procs = 1 if system in SINGLE_FUSED else a.world
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               script, *common]
    # its own session, so that a timeout ends torchrun's workers too (killing torchrun alone leaves them)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return dict(system=system, dist=dist, failed=True, rc="timeout", error=f"over {a.timeout} s")
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return dict(system=system, dist=dist, failed=True, rc=done.returncode,
                    error=_worker_error(done.stderr or done.stdout))
    return json.loads(lines[-1][len("RESULT "):])


_RAISED = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b.*)$")


def _worker_error(text: str) -> str:
    """The exception a failed worker raised (the last ``SomeError: ...`` line of its output,
    not torchrun's own ChildFailedError summary), else the output's last lines."""
    raised = [m.group(1) for m in map(_RAISED.match, text.splitlines())
              if m and "ChildFailedError" not in m.group(1)]
    return raised[-1] if raised else "\n".join(text.strip().splitlines()[-12:])


def _check_args(a, workloads: list[str], dists: list[str], systems: list[str]) -> None:
    """SystemExit naming the first argument no run could use (before any run starts)."""
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {sorted(WORKLOADS)} (with --rows/--dim/--batch "
                         "to change their sizes)")
    for name, values in (("--workload", workloads), ("--dists", dists), ("--systems", systems)):
        if len(set(values)) < len(values):
            raise SystemExit(f"{name} names an entry twice: {values}")
    if not (math.isfinite(a.lr) and a.lr >= 0):
        raise SystemExit(f"--lr must be a finite number >= 0, got {a.lr}")
    if a.seed < 0:
        raise SystemExit(f"--seed must be >= 0, got {a.seed}")
    for path in (a.json, a.markdown, a.chart):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise SystemExit(f"no folder {folder} to write {path} in")
    if a.chart and os.path.splitext(a.chart)[1].lower() not in (".png", ".svg", ".pdf"):
        raise SystemExit(f"--chart writes .png, .svg or .pdf, not {a.chart}")
    if any(s in TORCHREC for s in systems) and not _torchrec_installed():
        raise SystemExit("TorchRec's systems need it installed: pip install -e '.[bench]' && pip install --no-deps "
                         "torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0")
    bad_dists = [d for d in dists if d not in ("zipf", "uniform")]
    if bad_dists:
        raise SystemExit(f"unknown id distributions {bad_dists}; known: ['uniform', 'zipf']")
    for name, least in (("rows", 1), ("dim", 1), ("batch", 1), ("world", 1), ("page_size", 1), ("steps", 1),
                        ("warmup", 0), ("slow_steps", 1), ("repeat", 1), ("timeout", 1)):
        value = getattr(a, name)
        if value is not None and value < least:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if any(s in NO_EXCHANGE or s == "dtensor_rowwise" for s in systems):
        for w in workloads:
            rows = a.rows if a.rows is not None else WORKLOADS[w]["rows"]
            if rows < a.world:
                raise SystemExit(f"the no-exchange bound and dtensor_rowwise give each of the {a.world} ranks "
                                 f"rows // world rows: --rows {rows} leaves none (leave them out with --systems)")


def _torchrec_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torchrec", "fbgemm_gpu"))


def _bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 / 10 else f"{n / 2**10:.1f} KiB"


def _table(results: list[dict], dists: list[str], baselines: list[str]) -> str:
    head = "| " + " | ".join(["system", "ids", "median step ms", "p10-p90 ms", "M lookups/s",
                               *(f"ours / {b}" for b in baselines), "bytes sent per rank-step",
                               "peak RSS MiB per rank"]) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for dist in dists:
        base = {(r.get("base_system", r["system"]), r.get("allocator", "default")): r
                for r in results if r["dist"] == dist and not r.get("failed")}  # baselines: no transport
        for r in (r for r in results if r["dist"] == dist):
            if r.get("failed"):
                lines.append(f"| {r['system']} | {dist} | failed ({r['rc']}) |" + " |" * (len(baselines) + 4))
                continue
            ratios = []
            for b in baselines:  # against the baseline under the same allocator
                key = (b, r.get("allocator", "default"))
                ok = r["system"].startswith("ours") and key in base
                ratios.append(f"{r['lookups_per_s'] / base[key]['lookups_per_s']:.2f}x" if ok else "")
            sent = r.get("bytes_sent_per_step")
            lines.append(
                f"| {r['system']} | {dist} | {r['median_step_ms']:.2f} | {r['p10_step_ms']:.2f}-{r['p90_step_ms']:.2f} "
                f"| {r['lookups_per_s'] / 1e6:.3f} | " + "".join(f"{x} | " for x in ratios)
                + f"{_bytes(sent) if sent is not None else ''} "
                f"| {', '.join(map(str, r['peak_rss_mib_per_rank']))} |")
    return "\n".join(lines)


def _limit_table(results: list[dict], workload: str, dists: list[str], transports: list[str], repeat: int,
                 allocators: list[str] = ("default",)) -> str:
    """Each fused system of ours against the single-process limit with the same optimizer and
    allocator (limit step time / ours: above 1 is faster than one process), one column pair per
    transport, one row per allocator; and, where the run has it, the no-exchange bound with the
    same optimizer (limit / bound: the most any exchange could reach)."""
    by = {(r["base_system"], r.get("transport"), r.get("allocator", "default"), r["dist"]): r
          for r in results if not r.get("failed")}
    head = ["workload", "ids", "optimizer", "allocator", "single-process limit", "limit ms"]
    for t in transports:
        name = TRANSPORT_LABELS[t] or t
        head += [f"{name} ms", f"{name} / limit"]
    bounds = {opt: b for b, opt in NO_EXCHANGE.items()}
    head += ["no-exchange bound ms", "bound / limit"]
    lines = []
    for dist, (system, opt), alloc in ((d, f, al) for d in dists for f in FUSED.items() for al in allocators):
        candidates = [by[(c, None, alloc, dist)] for c in LIMIT[opt] if (c, None, alloc, dist) in by]
        limit = min(candidates, key=lambda r: r["median_step_ms"]) if candidates else None
        cells = [workload, dist, opt, alloc, limit["base_system"] if limit else "-",
                 f"{limit['median_step_ms']:.2f}" if limit else "-"]
        found = False
        for t in transports:
            r = by.get((system, t, alloc, dist))
            found |= r is not None
            cells.append(f"{r['median_step_ms']:.2f}" if r else "-")
            ok = r is not None and limit is not None
            cells.append(f"{limit['median_step_ms'] / r['median_step_ms']:.2f}x" if ok else "-")
        bound = by.get((bounds[opt], None, alloc, dist))
        cells.append(f"{bound['median_step_ms']:.2f}" if bound else "-")
        cells.append(f"{limit['median_step_ms'] / bound['median_step_ms']:.2f}x" if bound and limit else "-")
        if found and limit:
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    note = (f"Against the single-process limit (step ms: median step of the median of {repeat} interleaved "
            "runs; ratio = limit / ours, above 1x is faster than one process; bound / limit: the ratio ranks "
            "that exchanged nothing reach, the ceiling of ours):")
    return "\n".join([note, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines])


def _chart(path: str, results: list[dict], world: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["workload"], r["dist"]) for r in results})
    systems = list(dict.fromkeys(r["system"] for r in results))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.2), squeeze=False)
    for ax, (wl, dist) in zip(axes[0], groups):
        vals = []
        for s in systems:
            r = next((r for r in results if r["system"] == s and r["dist"] == dist and r["workload"] == wl), None)
            vals.append(r["lookups_per_s"] / 1e6 if r and not r.get("failed") else 0.0)
        colors = ["tab:blue" if s.startswith("ours") else "tab:gray" for s in systems]
        ax.barh(range(len(systems)), vals, color=colors)
        ax.set_yticks(range(len(systems)), systems if ax is axes[0][0] else [""] * len(systems), fontsize=8)
        ax.set_xscale("log")
        ax.set_title(f"{wl}, {dist} ids", fontsize=9)
        ax.set_xlabel("M lookups/s (log)")
        ax.invert_yaxis()
    fig.suptitle(f"Training-step lookups/s, {world} ranks (blue: ours)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    a = _args(argv)
    if a.worker:
        apply_allocator()
        WORKERS[a.worker](a)
        if a.worker not in SINGLE:
            from sharded_embedding import finish

            finish()
        return
    workloads = [w.strip() for w in a.workload.split(",")]
    if a.systems is None:
        systems = [s for s in DEFAULT_SYSTEMS if s not in TORCHREC or _torchrec_installed()]
        if len(systems) < len(DEFAULT_SYSTEMS):
            print("TorchRec is not installed: its systems are left out (pip install -e '.[bench]' && pip install "
                  "--no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0)", file=sys.stderr)
    else:
        systems = [s.strip() for s in a.systems.split(",")]
    unknown = [s for s in systems if s not in WORKERS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {sorted(WORKERS)}")
    transports = [t.strip() for t in a.transports.split(",")]
    bad = [t for t in transports if t not in TRANSPORT_LABELS]
    if bad:
        raise SystemExit(f"unknown transports {bad}; known: {sorted(TRANSPORT_LABELS)}")
    allocators = parse_allocators(a.allocators)
    for name, values in (("--transports", transports), ("--allocators", list(allocators))):
        if len(set(values)) < len(values):
            raise SystemExit(f"{name} names an entry twice: {values}")
    runs_of = [(_label(s, t, transports, al, allocators), s, t, al) for s in systems
               for t in (transports if s in OURS else [None]) for al in allocators]
    dists = [d.strip() for d in a.dists.split(",")]
    _check_args(a, workloads, dists, systems)
    import torch

    results, out, every_run = [], [], []
    for wl in workloads:
        sizes = dict(WORKLOADS[wl])
        for key in ("rows", "dim", "batch"):
            if getattr(a, key) is not None:
                sizes[key] = getattr(a, key)
        run = argparse.Namespace(**{**vars(a), **sizes})
        name = wl if sizes == WORKLOADS[wl] else f"{wl} resized"  # --rows/--dim/--batch changed it
        title = (f"## {name}: {run.rows:,} x {run.dim} fp32, {run.batch} ids per rank, {a.world} ranks "
                 f"(transports: {', '.join(transports)}; 1 thread each{', pinned' if a.bind_cpus else ''}), "
                 f"page_size {a.page_size}, "
                 f"{a.steps} timed steps after {a.warmup} ({a.slow_steps} after 1 for {', '.join(SLOW)}); "
                 f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} CPUs")
        print(title, flush=True)
        mine = []
        for dist in dists:
            runs = {label: [] for label, *_ in runs_of}
            for _ in range(a.repeat):
                for label, system, transport, alloc in runs_of:
                    r = _run_one(run, system, dist, transport, alloc)
                    r.update(system=label, base_system=system, transport=transport, allocator=alloc, dist=dist,
                             workload=name, rows=run.rows, dim=run.dim, batch=run.batch)
                    runs[label].append(r)
                    every_run.append(r)
                    if a.json:
                        with open(a.json, "a") as f:
                            f.write(json.dumps(r) + "\n")
                    failed = "FAILED " + str(r.get("error", ""))[-300:]
                    status = failed if r.get("failed") else f"{r['median_step_ms']} ms"
                    print(f"  ran {label} / {dist}: {status}", file=sys.stderr, flush=True)
            for label in runs:
                ok = sorted((r for r in runs[label] if not r.get("failed")), key=lambda r: r["median_step_ms"])
                pick = ok[len(ok) // 2] if ok else runs[label][-1]
                if len(ok) > 1:
                    pick["median_step_ms_of_runs"] = [r["median_step_ms"] for r in ok]
                mine.append(pick)
        table = _table(mine, dists, [b for b in BASELINES if b in systems])
        limits = _limit_table(mine, name, dists, transports, a.repeat, allocators)
        if limits:
            table += "\n\n" + limits
        print("\n" + table + "\n", flush=True)
        results += mine
        out.append(title + "\n\n" + table + "\n")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(out))
    if a.chart:
        _chart(a.chart, [r for r in results if not r.get("failed")], a.world)
    failed = sorted({f"{r['system']} / {r['dist']}" for r in every_run if r.get("failed")})
    if failed:
        print(f"failed: {', '.join(failed)} (the reasons are above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
