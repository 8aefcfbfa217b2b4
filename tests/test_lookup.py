"""ShardedEmbedding against the single-process nn.Embedding oracle, on 1-4 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from sharded_embedding import ShardedEmbedding, initial_rows
from tests.harness import run_ranks
from tests.oracle import (
    Oracle,
    assert_replicas_identical,
    local_rows_of,
    make_ids,
    make_loss_weight,
    make_optimizer,
    rank_world,
)


def train_against_oracle(
    num_embeddings,
    dim,
    page_size,
    placement="round_robin",
    num_devices=-1,
    *,
    steps=3,
    optimizer="sgd",
    sparse=True,
    batch=(16,),
    skew="uniform",
    index_dtype=torch.int64,
    shape=None,
    seed=0,
    lr=0.1,
    fused=None,
    rtol=1e-5,
    transport="auto",
):
    """Train the table for ``steps`` and compare, every step: outputs, gradient of the local
    storage, and the updated local rows with the oracle's. ``batch[r]`` is rank r's id count
    (the last entry repeats). With ``fused`` (a fused_optimizer spec) the update happens in
    the backward and is compared with the matching torch.optim optimizer, state included.
    Returns stats for the caller to check what was exercised."""
    rank, world = rank_world()
    emb = ShardedEmbedding(num_embeddings, dim, page_size=page_size, placement=placement,
                           num_devices=num_devices, seed=seed, sparse=sparse, fused_optimizer=fused,
                           transport=transport)
    if transport != "auto":
        assert emb.transport.name == transport or world == 1
    assert torch.equal(local_rows_of(emb, initial_rows(seed, dim, 0, num_embeddings)), emb.weight.detach())
    opt = make_optimizer(optimizer, emb.parameters(), lr) if optimizer and not fused else None
    if fused:  # the storage is the one parameter; its gradient is applied, never kept
        assert [p.data_ptr() for p in emb.parameters()] == [emb.weight.data_ptr()]
    oracle = Oracle(num_embeddings, dim, seed=seed, optimizer=optimizer, sparse=sparse, lr=lr, fused=fused)
    sizes = [batch[min(r, len(batch) - 1)] for r in range(world)]
    for step in range(steps):
        ids = [make_ids(num_embeddings, r, step, sizes[r], seed=seed, skew=skew,
                        shape=(shape if shape and sizes[r] else None)) for r in range(world)]
        ws = [make_loss_weight(i, dim, r, step, seed) for r, i in enumerate(ids)]
        want_out, want_grad = oracle.step(ids, ws)
        out = emb(ids[rank].to(index_dtype))
        assert out.shape == (*ids[rank].shape, dim)
        torch.testing.assert_close(out, want_out[rank], rtol=rtol, atol=rtol)
        (out * ws[rank]).sum().backward()
        grad = emb.weight.grad
        if fused:
            assert grad is None  # the update happened in the backward; nothing is kept
        else:
            assert grad is not None and grad.is_sparse == sparse
            torch.testing.assert_close(grad.to_dense() if sparse else grad, local_rows_of(emb, want_grad),
                                       rtol=rtol, atol=rtol)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            emb.weight.grad = None
        torch.testing.assert_close(emb.weight.detach(), local_rows_of(emb, oracle.table), rtol=rtol, atol=rtol)
        if fused:
            for key, state in _fused_state(emb).items():
                want = oracle.state(key)
                torch.testing.assert_close(state, local_rows_of(emb, want if want.dim() > 1 else want[:, None])
                                           .reshape(state.shape), rtol=rtol, atol=rtol)
    assert_replicas_identical(emb)
    for state in _fused_state(emb).values():
        assert_replicas_identical(emb, state)
    torch.testing.assert_close(emb.full_table(), oracle.table, rtol=rtol, atol=rtol)
    return {"local_rows": emb.weight.shape[0], "local_pages": sorted(emb.local_pages), "stats": emb.stats()}


def _fused_state(emb) -> dict:
    """A fused optimizer's per-row state tensors (not the step counter)."""
    if emb.optimizer is None:
        return {}
    return {k: v for k, v in emb.optimizer.named_buffers() if k != "step"}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_round_robin_matches_oracle(world):
    stats = run_ranks(world, train_against_oracle, 103, 8, 10)  # 11 pages, the last of 3 rows
    assert sum(s["local_rows"] for s in stats) == 103  # round robin stores each row exactly once


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "sparse_adam"])
def test_sparse_optimizers_with_mirrors_match_oracle(optimizer):
    placement = [(0, 1), 1, (2, 0, 1), 2, 0, (1, 2)]  # 6 pages of 10, the last of 7 rows
    run_ranks(3, train_against_oracle, 57, 6, 10, placement, steps=4, optimizer=optimizer, skew="zipf",
              batch=(40,))


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_dense_gradients_match_oracle(optimizer):
    run_ranks(2, train_against_oracle, 40, 4, 7, [(0, 1), 1, 0, 1, (1, 0), 0], sparse=False,
              optimizer=optimizer, steps=3)


def test_every_page_mirrored_on_every_rank():
    run_ranks(4, train_against_oracle, 30, 5, 8, [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)],
              skew="zipf", batch=(25,), optimizer="adagrad")


def test_some_ranks_hold_nothing_and_some_have_empty_batches():
    # num_devices=2 of 4: ranks 2 and 3 hold no page; ranks 1 and 3 look up nothing.
    stats = run_ranks(4, train_against_oracle, 50, 4, 10, num_devices=2, batch=(20, 0, 13, 0))
    assert [s["local_rows"] for s in stats] == [30, 20, 0, 0]


def test_all_batches_empty():
    run_ranks(2, train_against_oracle, 20, 4, 5, batch=(0,))


def test_heavy_duplicates_and_int32_and_2d_indices():
    run_ranks(3, train_against_oracle, 64, 8, 16, [(0, 2), 1, 2, (1, 0)], skew="hot", batch=(60,),
              index_dtype=torch.int32, shape=(6, 10), optimizer="adagrad")


def test_page_size_larger_than_table_and_single_row_pages():
    run_ranks(2, train_against_oracle, 9, 3, 100, [(1, 0)])
    run_ranks(3, train_against_oracle, 9, 3, 1, skew="hot", batch=(12,))


def test_no_optimizer_gradients_accumulate_over_calls():
    run_ranks(2, _two_lookups_one_backward)


def _two_lookups_one_backward():
    """Two lookups before one backward: the sparse gradients of both calls add up."""
    rank, world = rank_world()
    emb = ShardedEmbedding(30, 4, page_size=7, placement=[0, (0, 1), 1, 0, (1, 0)])
    oracle = Oracle(30, 4, optimizer=None)
    a = [make_ids(30, r, 0, 9) for r in range(world)]
    b = [make_ids(30, r, 1, 5) for r in range(world)]
    wa = [make_loss_weight(i, 4, r, 0) for r, i in enumerate(a)]
    wb = [make_loss_weight(i, 4, r, 1) for r, i in enumerate(b)]
    ((emb(a[rank]) * wa[rank]).sum() + (emb(b[rank]) * wb[rank]).sum()).backward()
    _, grad = oracle.step(a + b, wa + wb)
    torch.testing.assert_close(emb.weight.grad.to_dense(), local_rows_of(emb, grad))


def test_initial_table_is_the_same_for_any_sharding():
    """The initial table depends on (seed, rows, dim) only, not on world size or paging."""
    want = initial_rows(5, 6, 0, 77)
    for world, page_size, placement in [(1, 77, "round_robin"), (2, 10, "round_robin"), (3, 4, "round_robin"),
                                        (2, 40, [(1, 0), 0])]:
        tables = run_ranks(world, _full_table, 77, 6, page_size, placement, 5)
        for t in tables:
            assert torch.equal(t, want)


def _full_table(n, d, page_size, placement, seed):
    return ShardedEmbedding(n, d, page_size=page_size, placement=placement, seed=seed).full_table()


def test_load_full_table_and_page_views():
    run_ranks(3, _load_and_views)


def _load_and_views():
    rank, world = rank_world()
    emb = ShardedEmbedding(25, 3, page_size=4, placement=[0, 1, 2, (0, 1), (2, 1, 0), 1, 0])
    table = torch.arange(75, dtype=torch.float32).view(25, 3)
    emb.load_full_table(table)
    assert torch.equal(emb.full_table(), table)
    for p, view in emb.local_pages.items():
        assert rank in emb.page_owners(p)
        assert torch.equal(view, table[4 * p : 4 * p + view.shape[0]])
        assert view.data_ptr() >= emb.weight.data_ptr()  # a view of the storage, not a copy
    assert emb.page_owners(4) == (2, 1, 0)
    assert emb.num_pages == 7 and emb.page_size == 4 and emb.num_embeddings == 25 and emb.embedding_dim == 3
    assert [p.data_ptr() for p in emb.parameters()] == [emb.weight.data_ptr()]
    out = emb(torch.tensor([24, 0, 13]))
    assert torch.equal(out, table[[24, 0, 13]])


FUSED = [
    {"name": "sgd", "lr": 0.3},
    {"name": "adagrad", "lr": 0.2, "lr_decay": 0.01, "eps": 1e-10, "initial_accumulator_value": 0.1},
    {"name": "rowwise_adagrad", "lr": 0.2, "eps": 1e-8},
    {"name": "adam", "lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
]


@pytest.mark.parametrize("fused", FUSED, ids=[f["name"] for f in FUSED])
def test_fused_optimizers_match_torch_optim_with_mirrors(fused):
    placement = [(0, 1), 1, (2, 0, 1), 2, 0, (1, 2)]
    run_ranks(3, train_against_oracle, 57, 6, 10, placement, steps=4, fused=fused, skew="zipf", batch=(40, 0, 25))


@pytest.mark.parametrize("fused", FUSED, ids=[f["name"] for f in FUSED])
def test_fused_optimizers_round_robin_one_and_two_ranks(fused):
    run_ranks(1, train_against_oracle, 30, 4, 8, steps=3, fused=fused, skew="hot", batch=(20,))
    run_ranks(2, train_against_oracle, 30, 4, 8, steps=3, fused=fused, batch=(20,))


def _fused_in_float64(name):
    """Every fused optimizer trains a float64 table as it trains a float32 one (row-wise Adagrad
    raised in every float64 backward: its norm was asked for in float32)."""
    rank, world = rank_world()
    tables = {dtype: ShardedEmbedding(45, 6, page_size=4, dtype=dtype, fused_optimizer={"name": name, "lr": 0.2})
              for dtype in (torch.float64, torch.float32)}
    for step in range(3):
        ids = make_ids(45, rank, step, 20, skew="zipf")
        w = make_loss_weight(ids, 6, rank, step, 0)
        for emb in tables.values():
            out = emb(ids)
            (out * w.to(out.dtype)).sum().backward()
    torch.testing.assert_close(tables[torch.float64].full_table().float(), tables[torch.float32].full_table(),
                               rtol=1e-5, atol=1e-5)
    return tables[torch.float64].weight.dtype


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_fused_optimizers_train_float64_tables(name):
    assert run_ranks(2, _fused_in_float64, name) == [torch.float64] * 2
