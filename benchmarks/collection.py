"""Training-step throughput of ShardedEmbeddingBagCollection against TorchRec's row-wise
EmbeddingBagCollection and one ShardedEmbedding per table, on the same bags, in one run.

    python benchmarks/collection.py                          # the issue's workload, 2 ranks
    python benchmarks/collection.py --repeat 3 --markdown out.md
    python benchmarks/collection.py --scale 0.1 --steps 5     # a quick look at 1/10 of the rows and batch

The workload (`TABLES`, `FEATURES`): 8 tables of 100k-5M rows and 16-128 dims, 26 pooled (sum)
features over them (3-4 per table), bags of 1-50 ids (uniform), 2048 bags per feature per rank,
ids Zipf(1.05) over each table's rows (or --dist uniform). A step: every rank looks up its
bags -> loss = (pooled features side by side * w).sum() -> backward, with the update fused
into it (SGD lr 0.05, or --optimizer rowwise_adagrad) on every system:

  ours_collection            ShardedEmbeddingBagCollection, pooling site chosen per table by bytes
  ours_collection_requester  ... always pooled on the requester (deduplicated rows travel)
  ours_collection_owner      ... always pooled on the owners (partial sums per bag travel)
  ours_collection_pytorch    ours_collection with SHARDED_EMBEDDING_NATIVE=0: the owner's SGD
                             step in PyTorch's kernels (sort, per-row sums, index_add_) instead
                             of the compiled one-pass update (sharded_embedding.native)
  ours_per_table             one ShardedEmbedding per table: a lookup of the table's ids (three
                             exchanges each), then F.embedding_bag pooling of the looked-up rows
  torchrec_rw                TorchRec 1.8 EmbeddingBagCollection, ROW_WISE, FBGEMM fused
                             EXACT_SGD / EXACT_ROWWISE_ADAGRAD, gradient division off. Its sharder
                             offers ROW_WISE for CUDA only (EmbeddingBagCollectionSharder.
                             sharding_types on "cpu": data_parallel, table_wise, column_wise,
                             table_column_wise; the planner refuses row_wise); a subclass that
                             adds it on CPU is used here, and the CPU path then runs
  torchrec_tw                the same, TABLE_WISE (each table whole on one rank), which TorchRec
                             does offer on CPU

Each (system) run is its own torchrun on gloo (one thread per rank, pinned), one after another
(--repeat N interleaves N rounds and keeps each system's median run; --allocators default,tuned
runs each system under glibc's malloc as it comes and after `sharded_embedding.tune_malloc()`,
and compares within the same allocator). Bytes sent per rank and
step: ours from ``stats()``; TorchRec's measured at its torch.distributed collectives (the
bytes of the tensors it hands them, less what a rank sends itself). TorchRec needs the
optional extra: pip install -e '.[bench]' && pip install --no-deps torchrec==1.8.0
fbgemm-gpu-cpu==1.8.0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # workload.py, and the package of this checkout

from workload import allocator_env, apply_allocator, parse_allocators  # noqa: E402

# (name, rows, dim, features reading it)
TABLES = [
    ("t0", 5_000_000, 32, 4), ("t1", 2_000_000, 64, 4), ("t2", 1_000_000, 128, 3), ("t3", 1_000_000, 16, 3),
    ("t4", 500_000, 64, 3), ("t5", 300_000, 128, 3), ("t6", 200_000, 32, 3), ("t7", 100_000, 16, 3),
]
OURS = {"ours_collection": "auto", "ours_collection_requester": "requester", "ours_collection_owner": "owner",
        "ours_collection_pytorch": "auto"}
# systems run with the compiled owner update turned off (`sharded_embedding.native`)
WITHOUT_NATIVE = {"ours_collection_pytorch"}
TORCHREC = {"torchrec_rw": "row_wise", "torchrec_tw": "table_wise"}
SYSTEMS = [*OURS, "ours_per_table", *TORCHREC]
BASELINES = ["torchrec_rw", "torchrec_tw", "ours_per_table"]
TORCHREC_OPT = {"sgd": "EXACT_SGD", "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD"}


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2048, help="bags per feature per rank")
    ap.add_argument("--min-len", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every table's rows and the batch by this")
    ap.add_argument("--page-size", type=int, default=512)
    ap.add_argument("--hot-pages", type=int, default=0,
                    help="ours: mirror the first N pages of every table on every rank (the hottest ids under Zipf)")
    ap.add_argument("--dist", default="zipf", choices=["zipf", "uniform"])
    ap.add_argument("--spread-ids", action="store_true",
                    help="map each id through a fixed permutation of its table's rows (id * 1000003 mod rows), as "
                         "hashed feature ids are: the hot ids spread over the rows instead of sitting at the start "
                         "(where TorchRec's row-wise blocks put them all on rank 0)")
    ap.add_argument("--optimizer", default="sgd", choices=sorted(TORCHREC_OPT))
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--allocators", default="default",
                    help="comma separated, among default (glibc malloc as it comes), tuned "
                         "(sharded_embedding.tune_malloc() first), huge (glibc.malloc.hugetlb=1: what "
                         "malloc maps on transparent huge pages) and tuned_huge (both): every system runs "
                         "under each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json", default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--markdown", default=None, help="also write the result table to this file")
    ap.add_argument("--no-bind-cpus", dest="bind_cpus", action="store_false")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def tables(a) -> list[tuple[str, int, int, list[str]]]:
    """(name, rows, dim, feature names) of the workload at ``--scale``."""
    out, k = [], 0
    for name, rows, dim, count in TABLES:
        out.append((name, max(int(rows * a.scale), 1000), dim, [f"f{k + i}" for i in range(count)]))
        k += count
    return out


def batch_size(a) -> int:
    return max(int(a.batch * a.scale), 16)


# ---------------------------------------------------------------------------------- workload
def make_steps(a, rank: int):
    """Rank ``rank``'s bags for every step: a list of {feature: (values int64, lengths int64)}."""
    import numpy as np
    import torch

    rng = np.random.default_rng([a.seed, 4099, rank])
    steps, batch = [], batch_size(a)
    for _ in range(a.warmup + a.steps):
        bags = {}
        for _, rows, _, features in tables(a):
            for f in features:
                lengths = rng.integers(a.min_len, a.max_len + 1, batch)
                n = int(lengths.sum())
                if a.dist == "uniform":
                    values = rng.integers(0, rows, n)
                else:
                    parts, got = [], 0
                    while got < n:
                        y = rng.zipf(1.05, n) - 1
                        y = y[y < rows]
                        parts.append(y)
                        got += y.size
                    values = np.concatenate(parts)[:n]
                if a.spread_ids:  # a fixed permutation of the rows (1000003 is a prime; no table's size is a multiple)
                    values = values * 1_000_003 % rows
                bags[f] = (torch.from_numpy(values.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)))
        steps.append(bags)
    return steps


def loss_weight(a, rank: int):
    import torch

    g = torch.Generator().manual_seed(a.seed * 1_000_003 + rank)
    width = sum(dim * len(features) for _, _, dim, features in tables(a))
    return torch.randn(batch_size(a), width, generator=g)


def _fused(a) -> dict:
    return {"name": a.optimizer, "lr": a.lr}


def placement(a, rows: int, world: int):
    """Round robin; with --hot-pages N the first N pages mirrored on every rank."""
    if not a.hot_pages:
        return "round_robin"
    pages = -(-rows // a.page_size)
    return [tuple(range(world)) if p < a.hot_pages else p % world for p in range(pages)]


# ---------------------------------------------------------------------------------- workers
def _setup(a):
    from workload import setup_distributed

    return setup_distributed(a.bind_cpus)


def _gather_floats(value: float) -> list[float]:
    from workload import gather_floats

    return gather_floats(value)


def _time(a, rank, world, build, step, after=lambda state: {}):
    import torch.distributed as dist

    from workload import emit, peak_rss_mib, summary, time_steps

    t = time.perf_counter()
    state = build()
    init_s = time.perf_counter() - t
    cpu = []

    def timed(i):
        c = time.process_time()
        step(state, i)
        cpu.append(time.process_time() - c)

    times = time_steps(timed, a.warmup, a.steps, sync=dist.barrier)
    info = after(state)
    sent = _gather_floats(info.pop("bytes_sent_per_step", 0.0))
    peak = _gather_floats(peak_rss_mib())
    cpu_ms = _gather_floats(1e3 * sorted(cpu[a.warmup:])[len(cpu[a.warmup:]) // 2])  # median CPU time of a step
    ids = sum(int(v.numel()) for v, _ in a._steps[0].values())
    if rank == 0:
        emit(summary(times, world * ids, system=a.worker, world=world, init_s=round(init_s, 2),
                     bytes_sent_per_rank_step=sent, cpu_ms_per_rank_step=cpu_ms, peak_rss_mib_per_rank=peak,
                     steps=a.steps, **info))


def _worker_collection(a):
    from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig

    rank, world = _setup(a)
    a._steps = make_steps(a, rank)
    w = loss_weight(a, rank)
    inputs = [{f: {"values": v, "lengths": n} for f, (v, n) in bags.items()} for bags in a._steps]

    def build():
        configs = [TableConfig(name=name, num_embeddings=rows, embedding_dim=dim, page_size=a.page_size,
                               placement=placement(a, rows, world), feature_names=features, fused_optimizer=_fused(a))
                   for name, rows, dim, features in tables(a)]
        return ShardedEmbeddingBagCollection(configs, pool_on=OURS[a.worker])

    def step(ebc, i):
        (ebc.concat(ebc(inputs[i])) * w).sum().backward()

    def after(ebc):
        s = ebc.stats()
        choice = {name: t["last"]["pooled_on"] for name, t in s["tables"].items()}
        return dict(bytes_sent_per_step=s["bytes_sent_per_call"], pooled_on=choice)

    _time(a, rank, world, build, step, after)


def _worker_per_table(a):
    import torch
    import torch.nn.functional as F

    from sharded_embedding import ShardedEmbedding

    rank, world = _setup(a)
    a._steps = make_steps(a, rank)
    w = loss_weight(a, rank)
    layout = tables(a)
    # Per table and step: its features' ids one after another, and the bag offsets over them.
    per_table = []
    for bags in a._steps:
        step = []
        for _, _, _, features in layout:
            values = torch.cat([bags[f][0] for f in features])
            lengths = torch.cat([bags[f][1] for f in features])
            step.append((values, torch.cumsum(lengths, 0) - lengths, torch.arange(values.numel())))
        per_table.append(step)

    def build():
        return [ShardedEmbedding(rows, dim, page_size=a.page_size, placement=placement(a, rows, world),
                                 fused_optimizer=_fused(a)) for _, rows, dim, _ in layout]

    def step(embs, i):
        pooled = []
        for emb, (_, _, dim, features), (values, offsets, positions) in zip(embs, layout, per_table[i]):
            rows = emb(values)  # one table's lookup: its own three exchanges
            bags = F.embedding_bag(positions, rows, offsets, mode="sum")  # [features * batch, dim]
            pooled += list(bags.split(batch_size(a)))
        (torch.cat(pooled, 1) * w).sum().backward()

    def after(embs):
        return dict(bytes_sent_per_step=sum(e.stats()["bytes_sent_per_call"] for e in embs))

    _time(a, rank, world, build, step, after)


def _count_bytes(world: int) -> dict:
    """Wrap torch.distributed's collectives to add up the bytes this rank hands them for
    others (TorchRec's traffic); returns the running total."""
    import torch.distributed as dist

    total = {"bytes": 0}

    def size(t):
        return t.numel() * t.element_size()

    def wrap(name, count):
        fn = getattr(dist, name)

        def wrapper(*args, **kwargs):
            total["bytes"] += count(*args, **kwargs)
            return fn(*args, **kwargs)

        setattr(dist, name, wrapper)

    def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **_):
        rank = dist.get_rank(group)
        if input_split_sizes:
            rows = input.shape[0] if input.dim() else 1
            per_row = size(input) // max(rows, 1)
            return (sum(input_split_sizes) - input_split_sizes[rank]) * per_row
        return size(input) * (world - 1) // world

    wrap("all_to_all_single", a2a)
    wrap("reduce_scatter_tensor", lambda output, input, *a, **k: size(input) * (world - 1) // world)
    wrap("all_gather_into_tensor", lambda output, input, *a, **k: size(input) * (world - 1))
    wrap("reduce_scatter", lambda output, inputs, *a, **k: sum(size(t) for t in inputs) * (world - 1) // world)
    wrap("all_gather", lambda outputs, input, *a, **k: size(input) * (world - 1))
    return total


def _worker_torchrec(a):
    import torch
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed.comm_ops import set_gradient_division
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    class CpuRowWiseSharder(EmbeddingBagCollectionSharder):
        """TorchRec 1.8 offers ROW_WISE for an EmbeddingBagCollection on CUDA only; add it on CPU."""

        def sharding_types(self, compute_device_type: str):
            types = super().sharding_types(compute_device_type)
            return types + ["row_wise"] if "row_wise" not in types else types

    rank, world = _setup(a)
    set_gradient_division(False)  # the summed gradient, as ours applies
    a._steps = make_steps(a, rank)
    w = loss_weight(a, rank)
    layout = tables(a)
    keys = [f for _, _, _, features in layout for f in features]
    kjts = [KeyedJaggedTensor(keys=keys, values=torch.cat([bags[f][0] for f in keys]),
                              lengths=torch.cat([bags[f][1] for f in keys]).int()) for bags in a._steps]
    counted = _count_bytes(world)

    def build():
        configs = [EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features)
                   for name, rows, dim, features in layout]
        module = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        fused = dict(optimizer=getattr(EmbOptimType, TORCHREC_OPT[a.optimizer]), learning_rate=a.lr, eps=1e-10)
        sharding = TORCHREC[a.worker]
        sharder = (CpuRowWiseSharder if sharding == "row_wise" else EmbeddingBagCollectionSharder)(fused_params=fused)
        constraints = {name: ParameterConstraints(sharding_types=[sharding],
                                                  compute_kernels=[EmbeddingComputeKernel.FUSED.value])
                       for name, _, _, _ in layout}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(module, [sharder], dist.group.WORLD)
        model = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                         device=torch.device("cpu"), plan=plan, sharders=[sharder])
        counted["start"] = counted["bytes"]
        return model

    def step(model, i):
        (model(kjts[i]).values() * w).sum().backward()

    def after(model):
        steps = a.warmup + a.steps
        return dict(bytes_sent_per_step=(counted["bytes"] - counted["start"]) / steps)

    _time(a, rank, world, build, step, after)


WORKERS = {**{s: _worker_collection for s in OURS}, "ours_per_table": _worker_per_table,
           **{s: _worker_torchrec for s in TORCHREC}}


# ---------------------------------------------------------------------------------- driver
def _run_one(a, system: str, allocator: str = "default") -> dict:
    argv = [f"--world={a.world}", f"--batch={a.batch}", f"--min-len={a.min_len}", f"--max-len={a.max_len}",
            f"--hot-pages={a.hot_pages}",
            f"--scale={a.scale}", f"--page-size={a.page_size}", f"--dist={a.dist}", f"--optimizer={a.optimizer}",
            f"--lr={a.lr}", f"--steps={a.steps}", f"--warmup={a.warmup}", f"--seed={a.seed}", f"--worker={system}"]
    if a.spread_ids:
        argv.append("--spread-ids")
    if not a.bind_cpus:
        argv.append("--no-bind-cpus")
    env = allocator_env(allocator, dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if system in WITHOUT_NATIVE:
        env["SHARDED_EMBEDDING_NATIVE"] = "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.world}",
           os.path.abspath(__file__), *argv]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return dict(system=system, failed=True, rc="timeout", error=f"over {a.timeout} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return dict(system=system, failed=True, rc=done.returncode, error="\n".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def _table(results: list[dict]) -> str:
    base = {(r.get("base_system", r["system"]), r.get("allocator", "default")): r
            for r in results if not r.get("failed")}
    head = ["system", "median step ms", "p10-p90 ms", "steps/s", *(f"ours / {b}" for b in BASELINES),
            "CPU ms per rank-step", "MiB sent per rank-step", "peak RSS MiB per rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("failed"):
            lines.append(f"| {r['system']} | failed ({r['rc']}) |" + " |" * (len(head) - 2))
            continue
        ratios = []
        for b in BASELINES:  # against the baseline under the same allocator
            key = (b, r.get("allocator", "default"))
            ok = r["system"].startswith("ours_collection") and key in base
            ratios.append(f"{base[key]['median_step_ms'] / r['median_step_ms']:.2f}x" if ok else "")
        sent = ", ".join(f"{v / 2**20:.1f}" for v in r["bytes_sent_per_rank_step"])
        cpu = ", ".join(f"{v:.0f}" for v in r["cpu_ms_per_rank_step"])
        lines.append(f"| {r['system']} | {r['median_step_ms']:.1f} | {r['p10_step_ms']:.1f}-{r['p90_step_ms']:.1f} | "
                     f"{1e3 / r['median_step_ms']:.2f} | " + "".join(f"{x} | " for x in ratios)
                     + f"{cpu} | {sent} | {', '.join(map(str, r['peak_rss_mib_per_rank']))} |")
    return "\n".join(lines)


def main(argv=None):
    a = _args(argv)
    if a.worker:
        apply_allocator()
        WORKERS[a.worker](a)
        from sharded_embedding import finish

        finish()
        return
    systems = [s.strip() for s in a.systems.split(",")]
    unknown = [s for s in systems if s not in WORKERS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {sorted(WORKERS)}")
    import torch

    layout = tables(a)
    title = (f"8 tables ({', '.join(f'{r // 1000}k x {d}' for _, r, d, _ in layout)}), "
             f"{sum(len(f) for *_, f in layout)} pooled features, bags of {a.min_len}-{a.max_len} {a.dist} ids"
             f"{' (spread over the rows by a fixed permutation)' if a.spread_ids else ''}, "
             f"{batch_size(a)} bags per feature per rank, {a.world} ranks (gloo, 1 thread each"
             f"{', pinned' if a.bind_cpus else ''}), page_size {a.page_size}"
             f"{f', first {a.hot_pages} pages of each table mirrored on every rank (ours)' if a.hot_pages else ''}, "
             f"fused {a.optimizer} lr {a.lr}; "
             f"{a.steps} timed steps after {a.warmup}; {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{os.cpu_count()} CPUs")
    print(title, flush=True)
    allocators = parse_allocators(a.allocators)
    labels = {(f"{s}@{al}" if allocators != ["default"] else s): (s, al) for s in systems for al in allocators}
    runs = {label: [] for label in labels}
    for _ in range(a.repeat):
        for label, (system, alloc) in labels.items():
            r = _run_one(a, system, alloc)
            r.update(system=label, base_system=system, allocator=alloc)
            runs[label].append(r)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            status = "FAILED " + str(r.get("error", ""))[-600:] if r.get("failed") else f"{r['median_step_ms']} ms"
            print(f"  ran {label}: {status}", file=sys.stderr, flush=True)
    picked = []
    for label in labels:
        ok = sorted((r for r in runs[label] if not r.get("failed")), key=lambda r: r["median_step_ms"])
        pick = ok[len(ok) // 2] if ok else runs[label][-1]
        if len(ok) > 1:
            pick["median_step_ms_of_runs"] = [r["median_step_ms"] for r in ok]
        picked.append(pick)
    table = _table(picked)
    choices = [f"{r['system']}: {r['pooled_on']}" for r in picked if r.get("pooled_on") and not r.get("failed")]
    print("\n" + table + "\n\n" + "\n".join(choices) + "\n", flush=True)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(title + "\n\n" + table + "\n\n" + "\n".join(f"- {c}" for c in choices) + "\n")


if __name__ == "__main__":
    main()
