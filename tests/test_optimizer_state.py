"""A torch optimizer's state for a table in checkpoints: sharded like the table (issue 14, case 1)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sharded_embedding import ShardedEmbedding, shard_optimizer_state
from tests.harness import run_ranks
from tests.oracle import assert_replicas_identical, make_ids, make_loss_weight, rank_world

N, D = 64, 4


def _train(emb, opt, steps: range, rank: int):
    for step in steps:
        ids = make_ids(N, rank, step, 16, skew="zipf")
        (emb(ids) * make_loss_weight(ids, D, rank, step)).sum().backward()
        opt.step()
        opt.zero_grad()


def _state(emb, opt, key: str) -> torch.Tensor:
    """The optimizer's ``key`` state for the table, assembled in global row order (collective)."""
    return emb._full(opt.state[emb.weight][key])


def _resume(ckpt: str, how: str):
    """The issue's case: ShardedEmbedding(64, 4, page_size=8) trained 2 steps by torch Adagrad
    (lr 0.1), saved with DCP, loaded into a fresh table and optimizer, trained 2 more steps:
    the table must be the uninterrupted run's, bit for bit."""
    rank, _ = rank_world()
    emb = ShardedEmbedding(64, 4, page_size=8)
    opt = torch.optim.Adagrad(emb.parameters(), lr=0.1)  # hooked at its first step, by itself
    _train(emb, opt, range(2), rank)
    if how != "get_set_state_dict":
        dcp.save({"model": emb.state_dict(), "opt": opt.state_dict()}, checkpoint_id=ckpt)
    else:  # torch's get_state_dict / set_state_dict
        model_sd, opt_sd = get_state_dict(emb, opt)
        dcp.save({"model": model_sd, "opt": opt_sd}, checkpoint_id=ckpt)
    saved = (emb.full_table(), _state(emb, opt, "sum"))
    _train(emb, opt, range(2, 4), rank)
    uninterrupted = emb.full_table()

    emb2 = ShardedEmbedding(64, 4, page_size=8, seed=1)
    opt2 = torch.optim.Adagrad(emb2.parameters(), lr=0.1)
    if how == "fresh_optimizer_not_hooked":  # never stepped, not given to shard_optimizer_state
        with pytest.raises(CheckpointException, match="Size mismatch between saved torch.Size.*64, 4.* and current: "
                                            "torch.Size.*32, 4.*opt.state.0.sum"):
            dcp.load({"model": emb2.state_dict(), "opt": opt2.state_dict()}, checkpoint_id=ckpt)
        return None
    assert shard_optimizer_state(opt2) == 1
    if how == "dcp":
        sd = {"model": emb2.state_dict(), "opt": opt2.state_dict()}
        dcp.load(sd, checkpoint_id=ckpt)
        emb2.load_state_dict(sd["model"])
        opt2.load_state_dict(sd["opt"])
    else:
        model_sd, opt_sd = get_state_dict(emb2, opt2)
        sd = {"model": model_sd, "opt": opt_sd}
        dcp.load(sd, checkpoint_id=ckpt)
        set_state_dict(emb2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["opt"])
    assert torch.equal(emb2.full_table(), saved[0]) and torch.equal(_state(emb2, opt2, "sum"), saved[1])
    _train(emb2, opt2, range(2, 4), rank)
    assert torch.equal(emb2.full_table(), uninterrupted)
    return None


@pytest.mark.parametrize("how", ["dcp", "get_set_state_dict", "fresh_optimizer_not_hooked"])
def test_a_resumed_torch_optimizer_equals_the_uninterrupted_run(tmp_path, how):
    run_ranks(2, _resume, str(tmp_path / "ckpt"), how)


PLACEMENT = [(0, 1), 1, 0, (1, 0), 1, 0, 0, 1]  # 8 pages of 8, some mirrored


def _save_sparse_adam(ckpt: str):
    rank, _ = rank_world()
    emb = ShardedEmbedding(N, D, page_size=8, placement=PLACEMENT, seed=2)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.05)
    _train(emb, opt, range(3), rank)
    dcp.save({"model": emb.state_dict(), "opt": opt.state_dict()}, checkpoint_id=ckpt)
    return emb.full_table(), _state(emb, opt, "exp_avg"), _state(emb, opt, "exp_avg_sq"), float(
        opt.state[emb.weight]["step"])


def _load_sparse_adam(ckpt: str, page_size: int, placement):
    rank, world = rank_world()
    emb = ShardedEmbedding(N, D, page_size=page_size, placement=placement, seed=9)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.05)
    _train(emb, opt, range(world), rank)  # SparseAdam makes its state at its first step: have some to load into
    sd = {"model": emb.state_dict(), "opt": opt.state_dict()}
    dcp.load(sd, checkpoint_id=ckpt)
    emb.load_state_dict(sd["model"])
    opt.load_state_dict(sd["opt"])
    assert_replicas_identical(emb, opt.state[emb.weight]["exp_avg"])
    return emb.full_table(), _state(emb, opt, "exp_avg"), _state(emb, opt, "exp_avg_sq"), float(
        opt.state[emb.weight]["step"])


@pytest.mark.parametrize("world, page_size, placement", [(1, 5, "round_robin"), (3, 6, [(2, 0), 1, 0, (0, 1, 2)] + [
    p % 3 for p in range(4, 11)])])
def test_optimizer_state_reshards_like_the_table(tmp_path, world, page_size, placement):
    ckpt = str(tmp_path / "ckpt")
    saved = run_ranks(2, _save_sparse_adam, ckpt)[0]
    for got in run_ranks(world, _load_sparse_adam, ckpt, page_size, placement):
        for a, b in zip(got[:3], saved[:3]):
            assert torch.equal(a, b)
        assert got[3] == saved[3] == 3.0


def _per_rank_files(directory: str):
    """A per-rank torch.save of the optimizer's state dict round-trips (weights_only) on the
    same layout; rank 0's file loaded on every rank is refused on every rank, nothing changed."""
    rank, _ = rank_world()
    emb = ShardedEmbedding(N, D, page_size=8, placement=PLACEMENT)
    opt = torch.optim.Adagrad(emb.parameters(), lr=0.1)
    _train(emb, opt, range(2), rank)
    torch.save(opt.state_dict(), f"{directory}/rank{rank}.pt")
    before = _state(emb, opt, "sum").clone()
    _train(emb, opt, range(2, 3), rank)
    after = _state(emb, opt, "sum").clone()
    dist.barrier()
    with pytest.raises(ValueError, match="rank 1: optimizer state 0.sum: this per-rank state .torch.save. holds rows"):
        opt.load_state_dict(torch.load(f"{directory}/rank0.pt", weights_only=True))
    assert torch.equal(_state(emb, opt, "sum"), after)
    opt.load_state_dict(torch.load(f"{directory}/rank{rank}.pt", weights_only=True))
    assert torch.equal(_state(emb, opt, "sum"), before)
    assert_replicas_identical(emb, opt.state[emb.weight]["sum"])


def test_per_rank_optimizer_files_round_trip_and_refuse_another_rank(tmp_path):
    run_ranks(2, _per_rank_files, str(tmp_path))


def _state_that_is_not_per_row():
    """Adafactor keeps a per-column statistic of a dense table gradient: it has no sharded form,
    and saved as it is it would be one rank's; state_dict() refuses it."""
    rank, _ = rank_world()
    emb = ShardedEmbedding(N, D, page_size=8, sparse=False)
    opt = torch.optim.Adafactor(emb.parameters(), lr=0.01)
    _train(emb, opt, range(1), rank)
    with pytest.raises(ValueError, match="state 'col_var' of a table parameter has shape .1, 4.: it is not per row"):
        opt.state_dict()


def test_optimizer_state_that_is_not_per_row_is_refused():
    run_ranks(2, _state_that_is_not_per_row)


def test_a_linear_update_in_parts_is_the_update_of_the_whole():
    """`FusedOptimizer.apply_parts` (the backward's SGD path: own rows, then peers' rows as they
    arrived) changes the rows bitwise as `apply` of the parts concatenated, rows repeated across
    parts included, and counts one step; an optimizer that is not linear refuses it."""
    from sharded_embedding.optimizers import build_fused_optimizer

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g)
    rows = [torch.randint(0, 50, (30,), generator=g), torch.randint(0, 50, (40,), generator=g)]
    grads = [torch.randn(30, 8, generator=g), torch.randn(40, 8, generator=g)]
    whole, parts = weight.clone(), weight.clone()
    a, b = build_fused_optimizer({"name": "sgd", "lr": 0.1}, whole), build_fused_optimizer({"name": "sgd", "lr": 0.1}, parts)
    a.apply(whole, torch.cat(rows), torch.cat(grads))
    b.apply_parts(parts, list(zip(rows, grads)))
    assert torch.equal(whole, parts) and int(a.step) == int(b.step) == 1
    adagrad = build_fused_optimizer({"name": "rowwise_adagrad"}, weight)
    with pytest.raises(TypeError, match="not linear"):
        adagrad.apply_parts(weight, list(zip(rows, grads)))


def _broadcast_from_rank0_with_fused_state():
    """torch's set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True) with a fused
    table's full optimizer tensors on rank 0: the other ranks get the parameters only. Refused
    on every rank before any row changes, and the message says why and what to use."""
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank, _ = rank_world()
    model = nn.Module()
    model.emb = ShardedEmbedding(36, 4, page_size=8, placement=[0, (1, 0), 1, 0, (0, 1)],
                                 fused_optimizer={"name": "adagrad", "lr": 0.1})
    before = model.emb.full_table()
    full = {"emb.weight": torch.arange(144.0).view(36, 4), "emb.optimizer.sum": torch.full((36, 4), 0.5),
            "emb.optimizer.step": torch.tensor(3)}
    with pytest.raises(RuntimeError, match=r"ranks were given different keys.*broadcast_from_rank0=True\)\) hands the "
                                           r"other ranks the model's parameters and buffers only"):
        set_model_state_dict(model, full if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    assert torch.equal(model.emb.full_table(), before)
    return True


def test_broadcast_from_rank0_with_fused_state_is_refused_naming_why():
    assert run_ranks(2, _broadcast_from_rank0_with_fused_state) == [True, True]
