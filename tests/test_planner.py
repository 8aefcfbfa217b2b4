"""The placement planner: id laws against brute force, plans that fit and balance, bad input,
the report and picture, and its predictions against emb.stats() after real steps."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from sharded_embedding import PagePlan, PlacementPlan, PlanningError, plan_placement
from sharded_embedding.planning import Counts, Uniform, Zipf, predict_placement
from tests.harness import run_ranks


def _brute_force(p: np.ndarray, page_size: int, draws: int) -> np.ndarray:
    per_row = 1.0 - (1.0 - p) ** draws
    pages = -(-p.size // page_size)
    return np.array([per_row[i * page_size : (i + 1) * page_size].sum() for i in range(pages)])


@pytest.mark.parametrize("s", [0.7, 1.0, 1.05, 1.6])
@pytest.mark.parametrize("page_size", [1, 333, 20_000, 70_000])
def test_zipf_closed_form_matches_the_sum_over_rows(s, page_size):
    n, draws = 150_000, 4096
    p = np.arange(1, n + 1, dtype=np.float64) ** -s
    p /= p.sum()
    got = Zipf(s).distinct_per_page(n, page_size, draws)
    want = _brute_force(p, page_size, draws)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_uniform_and_counts_laws():
    n, page, draws = 1000, 300, 100
    want = _brute_force(np.full(n, 1 / n), page, draws)
    np.testing.assert_allclose(Uniform().distinct_per_page(n, page, draws), want, rtol=1e-12)
    counts = np.arange(n, 0, -1)
    np.testing.assert_allclose(Counts(counts).distinct_per_page(n, page, draws),
                               _brute_force(counts / counts.sum(), page, draws), rtol=1e-12)
    sample = [torch.tensor([0, 0, 5]), torch.tensor([999])]
    law = Counts.from_sample(sample, n)
    np.testing.assert_allclose(law.counts[[0, 5, 999, 1]], [2, 1, 1, 0])


def test_a_billion_rows_plan_without_allocating():
    plan = plan_placement(10**9, 128, 64, batch_size=65_536, law="zipf:1.05", optimizer="rowwise_adagrad",
                          memory_per_rank="80GB")
    assert plan.fits() and plan.ranks.memory_bytes.max() <= 80e9
    assert len(plan.placement) == plan.num_pages == -(-10**9 // plan.page_size)
    # Every rank holds its share of the table plus the mirrors; row-wise Adagrad keeps 4 bytes a row.
    rows = plan.ranks.table_bytes / (128 * 4)
    assert rows.sum() >= 10**9 and np.allclose(plan.ranks.state_bytes, rows * 4)
    assert plan.imbalance <= 1.10 < plan.baselines["row_split"].imbalance
    assert "contiguous row split" in plan.report()


@pytest.mark.parametrize("world", [2, 4])
def test_plan_balances_a_frequency_sorted_zipf_table(world):
    plan = plan_placement(1_000_000, 64, world, batch_size=8192, law="zipf:1.05", optimizer="rowwise_adagrad")
    built = PagePlan.build(1_000_000, plan.page_size, world, plan.placement)  # what ShardedEmbedding takes
    assert built.num_pages == plan.num_pages
    assert plan.imbalance <= 1.10
    for page_size in (512, 50_000):
        rr = predict_placement(1_000_000, 64, world, page_size=page_size, law="zipf:1.05", batch_size=8192,
                               optimizer="rowwise_adagrad")
        assert plan.step_seconds <= rr.step_seconds
        assert plan.imbalance <= rr.imbalance
    # Memory is balanced too: page counts differ by at most one.
    pages = np.bincount(plan.page_owners[plan.page_owners >= 0], minlength=world)
    assert pages.max() - pages.min() <= 1 + len(plan.mirrored_pages)


def test_memory_budget_is_respected_and_optimizer_state_counts():
    kw = dict(batch_size=4096, law="zipf:1.05")
    sgd = plan_placement(2_000_000, 128, 4, optimizer="sgd", **kw)
    adam = plan_placement(2_000_000, 128, 4, optimizer="adam", **kw)
    assert sgd.ranks.state_bytes.max() == 0
    np.testing.assert_allclose(adam.ranks.state_bytes, 2 * adam.ranks.table_bytes)
    budget = 1.05 * adam.ranks.memory_bytes.max()
    tight = plan_placement(2_000_000, 128, 4, optimizer="adam", memory_per_rank=budget, **kw)
    assert tight.fits() and tight.ranks.memory_bytes.max() <= budget


def test_nothing_fits_names_the_smallest_world_that_does():
    kw = dict(batch_size=4096, law="zipf:1.05", optimizer="adagrad", memory_per_rank="1GB")
    with pytest.raises(PlanningError, match=r"smallest world size that fits is (\d+) ranks") as e:
        plan_placement(10_000_000, 128, 4, **kw)
    need = int(e.value.args[0].split("smallest world size that fits is ")[1].split()[0])
    assert "adagrad state" in str(e.value)
    plan = plan_placement(10_000_000, 128, need, **kw)
    assert plan.fits()
    with pytest.raises(PlanningError):
        plan_placement(10_000_000, 128, need - 1, **kw)


def test_a_budget_below_the_step_workspace_fits_no_world_size():
    with pytest.raises(PlanningError, match=r"A step's workspace alone needs up to .* \(4,096 ids per rank per step\), "
                                            "so no number of ranks fits: lower batch_size"):
        plan_placement(8000, 128, 4, batch_size=4096, law="zipf:1.05", memory_per_rank="1MB")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=10), "exactly one of counts="),
        (dict(batch_size=10, law="zipf:1.05", counts=[1] * 100), "exactly one of counts="),
        (dict(law="zipf:1.05"), "batch_size"),
        (dict(batch_size=0, law="uniform"), "batch_size must be a positive int"),
        (dict(batch_size=10, law="pareto"), "law 'pareto' is not understood"),
        (dict(batch_size=10, law="zipf:x"), "the Zipf exponent must be a number"),
        (dict(batch_size=10, law="zipf:-1"), "the Zipf exponent must be a finite number > 0"),
        (dict(batch_size=10, counts=[1] * 99), "counts has 99 entries but the table has 100 rows"),
        (dict(batch_size=10, counts=[-1] * 100), "counts must be finite and >= 0"),
        (dict(batch_size=10, counts=[0] * 100), "counts are all zero"),
        (dict(batch_size=10, sample=[torch.tensor([100])]), "sample holds id 100, outside"),
        (dict(batch_size=10, sample=[torch.tensor([1.5])]), "integer ids"),
        (dict(batch_size=10, law="uniform", optimizer="lamb"), "optimizer='lamb' is not one of"),
        (dict(batch_size=10, law="uniform", dtype=torch.int64), "dtype must be a floating point"),
        (dict(batch_size=10, law="uniform", memory_per_rank="lots"), "memory_per_rank='lots' is not understood"),
        (dict(batch_size=10, law="uniform", memory_per_rank=-5), "memory_per_rank must be a positive"),
        (dict(batch_size=10, law="uniform", mirrors=-1), "mirrors must be an int >= 0"),
        (dict(batch_size=10, law="uniform", page_size=0), "page_size must be a positive int"),
        (dict(batch_size=10, law="uniform", tables=[("uniform", 5)]), "tables= replaces"),
        (dict(tables=[("uniform",)]), r"tables\[0\] must be a \(law, batch_size\) pair"),
        (dict(batch_size=10, law="uniform", cost_model={"per_idd": 1}), "unknown coefficients"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(100, 8, 2, **kwargs)


@pytest.mark.parametrize("bad", [dict(num_embeddings=0), dict(embedding_dim=2.5), dict(world_size=True)])
def test_bad_shapes_raise_value_error(bad):
    args = dict(num_embeddings=100, embedding_dim=8, world_size=2)
    args.update(bad)
    with pytest.raises(ValueError, match="must be a positive int"):
        plan_placement(args["num_embeddings"], args["embedding_dim"], args["world_size"], batch_size=4, law="uniform")


def test_predict_placement_checks_the_placement_and_its_keywords():
    with pytest.raises(ValueError, match="placement has 2 entries but the table has 4 pages"):
        predict_placement(100, 8, 2, page_size=25, placement=[0, 1], law="uniform", batch_size=10)
    with pytest.raises(ValueError, match="page 1: rank 5 does not exist"):
        predict_placement(100, 8, 2, page_size=50, placement=[0, 5], law="uniform", batch_size=10)
    with pytest.raises(TypeError, match=r"unexpected keywords \['mirrorz'\]"):
        predict_placement(100, 8, 2, page_size=50, law="uniform", batch_size=10, mirrorz=1)
    given = predict_placement(100, 8, 2, page_size=50, placement=[(0, 1), 1], law="uniform", batch_size=10)
    assert given.mirrored_pages == [0] and given.ranks.mirror_rows.min() > 0


def test_counts_sample_and_tables_give_plans():
    counts = (np.arange(1, 50_001) ** -1.0 * 1e6).astype(np.int64) + 1
    by_counts = plan_placement(50_000, 32, 3, batch_size=2048, counts=counts)
    rng = np.random.default_rng(0)
    sample = [torch.from_numpy(rng.choice(50_000, 2048, p=counts / counts.sum())) for _ in range(20)]
    by_sample = plan_placement(50_000, 32, 3, batch_size=2048, sample=sample)
    two = plan_placement(50_000, 32, 3, tables=[(counts, 2048), ("uniform", 1024)])
    for plan in (by_counts, by_sample, two):
        assert isinstance(plan, PlacementPlan)
        PagePlan.build(50_000, plan.page_size, 3, plan.placement)
    assert two.ranks.table_bytes.sum() >= 2 * 50_000 * 32 * 4  # two tables
    assert "2 tables of" in two.report()


def test_world_of_one_puts_everything_on_rank_0():
    plan = plan_placement(10_000, 8, 1, batch_size=100, law="zipf:1.1")
    assert set(plan.placement) == {0} and plan.ranks.rows_served.tolist() == [0.0]


def test_report_and_picture(tmp_path):
    plan = plan_placement(200_000, 32, 4, batch_size=4096, law="zipf:1.05", optimizer="adagrad", mirrors=2,
                          page_size=1024, memory_per_rank="1GB")
    assert plan.page_size == 1024 and plan.mirrored_pages == [0, 1]
    assert plan.placement[0] == (0, 1, 2, 3) and all(isinstance(e, int) for e in plan.placement[2:])
    text = plan.report()
    for needle in ("memory: table + state", "imbalance of rows served max/mean", "rows served", "MB sent",
                   "round robin, page 1,024", "contiguous row split", "* pages 0-1 on every rank", "state GB",
                   "work GB", "of 1.0 GB"):
        assert needle in text, needle
    plan.draw(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- command line
def _cli(*overrides):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "sharded_embedding.plan", *overrides],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)


def test_command_line_prints_the_report_and_writes_picture_and_json(tmp_path):
    import json

    done = _cli("rows=100000000", "dim=128", "world=16", "batch=65536", "law=zipf:1.05",
                "fused_optimizer=rowwise_adagrad", "memory=80GB", f"draw={tmp_path / 'p.png'}",
                f"json={tmp_path / 'p.json'}", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Placement plan: 100,000,000 x 128 float32, optimizer rowwise_adagrad, 16 ranks, 80.0 GB" in done.stdout
    assert "contiguous row split" in done.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["plan"]["fits"] and summary["plan"]["imbalance_rows_served"] < summary["row_split"]["imbalance_rows_served"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.png"]  # nothing else written


@pytest.mark.parametrize("overrides, message, code", [
    (["rows=100000000", "dim=128", "world=2", "memory=4GB", "fused_optimizer=adam"],
     "planning error: no placement fits: a table of 100,000,000 x 128 float32 with adam state", 2),
    (["law=pareto"], "planning error: law 'pareto' is not understood", 2),
    (["tables=0"], "planning error: tables must be >= 1, got 0", 2),
    (["counts=/nonexistent/counts.npy"], "planning error: [Errno 2] No such file or directory", 2),
    (["dimm=3"], "Key 'dimm' not in 'PlanConfig'", 2),
    (["+dimm=3"], "configuration error: +dimm=3: not a key of the planner's configuration", 2),
    (["draw=/nonexistent/plan.png"], "planning error: draw=/nonexistent/plan.png: the folder /nonexistent does "
                                     "not exist", 2),
    (["counts=/etc/hostname"], "planning error: counts=/etc/hostname: not a .npy array of per-row counts", 2),
])
def test_command_line_errors(tmp_path, overrides, message, code):
    done = _cli(*overrides, f"hydra.run.dir={tmp_path}")
    assert done.returncode == code and message in done.stderr, done.stderr[-2000:]


# ---------------------------------------------------------------------------------- measured
def _zipf_ids(rows: int, batch: int, s: float, rng) -> torch.Tensor:
    parts, got = [], 0
    while got < batch:
        y = rng.zipf(s, batch) - 1
        y = y[y < rows]
        parts.append(y)
        got += y.size
    return torch.from_numpy(np.concatenate(parts)[:batch].astype(np.int64))


def _measure(rows, dim, batch, s, page_size, placement, steps):
    """Real steps on this rank's Zipf ids; emb.stats() per call after a warm-up call."""
    import torch.distributed as dist

    from sharded_embedding import ShardedEmbedding

    rank = dist.get_rank()
    rng = np.random.default_rng([11, rank])
    emb = ShardedEmbedding(rows, dim, page_size=page_size, placement=placement,
                           fused_optimizer={"name": "rowwise_adagrad", "lr": 0.1})
    for step in range(steps + 1):
        ids = _zipf_ids(rows, batch, s, rng)
        emb(ids).sum().backward()
        if step == 0:
            emb.stats(reset=True)  # the first call sizes the request capacity
    st = emb.stats()
    calls = st["calls"]
    return {"served": sum(st["rows_served_per_rank"]) / calls, "received": sum(st["unique_ids_sent_per_rank"]) / calls,
            "local": st["local_unique_ids"] / calls, "bytes_sent": st["bytes_sent"] / calls,
            "mirror": st["mirror_rows_reduced"] / calls}


@pytest.mark.parametrize("world, mirrors", [(2, None), (3, 2)])
def test_predictions_match_emb_stats_after_real_steps(world, mirrors):
    rows, dim, batch, s = 40_000, 16, 2048, 1.05
    plan = plan_placement(rows, dim, world, batch_size=batch, law=f"zipf:{s}", optimizer="rowwise_adagrad",
                          mirrors=mirrors, page_size=None if mirrors is None else 256)
    rr = predict_placement(rows, dim, world, page_size=5000, law=f"zipf:{s}", batch_size=batch)
    for p in (plan, rr):
        measured = run_ranks(world, _measure, rows, dim, batch, s, p.page_size, p.placement, 12)
        r = p.ranks
        for key, predicted in (("served", r.rows_served), ("received", r.rows_received), ("local", r.rows_local),
                               ("bytes_sent", r.bytes_sent), ("mirror", r.mirror_rows)):
            got = np.array([m[key] for m in measured])
            if predicted.max() == 0:
                assert got.max() == 0, (p.label, key)
                continue
            np.testing.assert_allclose(got, predicted, rtol=0.15, err_msg=f"{p.label}: {key}")
    assert mirrors is None or plan.ranks.mirror_rows.min() > 0
