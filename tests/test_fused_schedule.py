"""`fused_optimizer(model)`: torch's learning-rate schedulers drive the fused optimizers, with
the same tables as nn.Embedding / nn.EmbeddingBag under the same scheduler on their torch
counterparts; every bad use is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_embedding import (FusedOptimizers, ShardedEmbedding, ShardedEmbeddingBagCollection, TableConfig,
                               fused_optimizer, use_grad_scaler)
from tests.harness import run_ranks
from tests.oracle import Oracle, local_rows_of, make_ids, make_loss_weight, rank_world

SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=8),
    "warmup_then_step": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=2),
              torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)], milestones=[2]),
}


def _scheduled_like_nn_embedding(fused: dict, schedule: str):
    rank, world = rank_world()
    emb = ShardedEmbedding(40, 4, page_size=8, placement=[(0, 1), 0, 1, (1, 0), 1], fused_optimizer=fused)
    oracle = Oracle(40, 4, fused=fused)
    opt = fused_optimizer(emb)
    sched, want_sched = SCHEDULERS[schedule](opt), SCHEDULERS[schedule](oracle.opt)
    for step in range(5):
        ids = [make_ids(40, r, step, 12) for r in range(world)]
        weights = [make_loss_weight(i, 4, r, step) for r, i in enumerate(ids)]
        (emb(ids[rank]) * weights[rank]).sum().backward()
        opt.step()
        sched.step()
        oracle.step(ids, weights)
        want_sched.step()
        got, want = opt.param_groups[0], oracle.opt.param_groups[0]
        for key in type(emb.optimizer).defaults:
            assert got[key] == pytest.approx(want[key]) and getattr(emb.optimizer, key) == got[key], key
        torch.testing.assert_close(emb.weight.detach(), local_rows_of(emb, oracle.table), rtol=1e-5, atol=1e-5)
    return True


@pytest.mark.parametrize("fused,schedule", [
    ({"name": "sgd", "lr": 0.2}, "lambda"),
    ({"name": "sgd", "lr": 0.2}, "warmup_then_step"),
    ({"name": "rowwise_adagrad", "lr": 0.2}, "lambda"),
    ({"name": "adam", "lr": 0.05}, "one_cycle"),  # cycles Adam's beta1 too
])
def test_a_scheduled_fused_table_trains_as_nn_embedding_under_the_same_scheduler(fused, schedule):
    assert run_ranks(2, _scheduled_like_nn_embedding, fused, schedule) == [True, True]


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = ShardedEmbeddingBagCollection([
            TableConfig("items", 30, 4, 8, fused_optimizer={"name": "sgd", "lr": 0.1}),
            TableConfig("users", 20, 4, 8, fused_optimizer={"name": "rowwise_adagrad", "lr": 0.1}),
            TableConfig("plain", 20, 4, 8)])  # no fused optimizer: not in the groups
        self.dense = nn.Linear(8, 1)

    def forward(self, ids):
        out = self.ebc({"items": (ids, torch.tensor([0])), "users": (ids % 20, torch.tensor([0])),
                        "plain": (ids % 20, torch.tensor([0]))})
        return self.dense(torch.cat([out["items"], out["users"]], 1)).sum()


def _collection_under_ddp():
    rank, _ = rank_world()
    model = _Model()
    bare = fused_optimizer(model)
    assert [g["name"] for g in bare.param_groups] == ["ebc.tables.items", "ebc.tables.users"]
    ddp = DDP(model)
    opt = fused_optimizer(ddp)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, FusedOptimizers)
    assert [g["name"] for g in opt.param_groups] == ["ebc.tables.items", "ebc.tables.users"]  # no "module."
    assert opt.defaults == {"lr": 0.1}  # the hyperparameters every table has
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    items = model.ebc.tables["items"]
    for step in range(3):
        before = items.full_table()
        ddp(torch.tensor([1, 2, 3 + rank])).backward()
        assert not torch.equal(items.full_table(), before)
        opt.step()
        sched.step()
    assert items.optimizer.lr == model.ebc.tables["users"].optimizer.lr == pytest.approx(0.1 * 0.5 ** 3)
    assert bare.param_groups[0]["lr"] == items.optimizer.lr  # every view shows the tables' values
    # The scheduler's state and the hyperparameters go through the usual state dicts,
    # across wrappings: saved from the DDP-wrapped model, loaded into a view of the bare one.
    saved, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()
    items.optimizer.lr = 1.0
    assert opt.param_groups[0]["lr"] == bare.param_groups[0]["lr"] == 1.0  # set on the table: shows everywhere
    bare.load_state_dict(saved)
    resumed = torch.optim.lr_scheduler.StepLR(bare, step_size=1, gamma=0.5)
    resumed.load_state_dict(saved_sched)
    resumed.step()
    assert items.optimizer.lr == pytest.approx(0.1 * 0.5 ** 4)
    # A copy of the model has optimizers of its own: the views of the original do not show them.
    twin = copy.deepcopy(model)
    twin.ebc.tables["items"].optimizer.lr = 7.0
    assert opt.param_groups[0]["lr"] == items.optimizer.lr != 7.0
    assert fused_optimizer(twin).param_groups[0]["lr"] == 7.0
    return True


def test_a_collection_is_scheduled_through_ddp_and_its_state_dict_loads_across_wrappings():
    assert run_ranks(2, _collection_under_ddp) == [True, True]


def _refused():
    rank, _ = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=5, fused_optimizer={"name": "sgd", "lr": 0.1})
    other = ShardedEmbedding(20, 3, page_size=5, fused_optimizer={"name": "adam", "lr": 0.1})
    both = nn.ModuleDict({"emb": emb, "other": other})
    opt = fused_optimizer(both)
    for bad, message in ((-1, "lr must be a finite number >= 0, got -1.0"), ("x", "lr must be a number"),
                         (float("inf"), "lr must be a finite number >= 0, got inf")):
        with pytest.raises(ValueError, match=message):
            opt.param_groups[0]["lr"] = bad
        assert opt.param_groups[0]["lr"] == emb.optimizer.lr == 0.1
    with pytest.raises(ValueError, match="betas must be two numbers in"):
        opt.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(TypeError, match="holds the fused tables of the model it was built from"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    # load_state_dict checks every value before it sets any
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"], saved["param_groups"][1]["lr"] = 0.5, float("nan")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        opt.load_state_dict(saved)
    assert emb.optimizer.lr == other.optimizer.lr == 0.1
    with pytest.raises(ValueError, match=r"the state_dict's fused tables \['emb'\] are not this optimizer's "
                                         r"\['emb', 'other'\]"):
        opt.load_state_dict(fused_optimizer(nn.ModuleDict({"emb": emb})).state_dict())
    with pytest.raises(ValueError, match=r"the state_dict's fused tables \[None\] are not this optimizer's"):
        opt.load_state_dict(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9).state_dict())
    with pytest.raises(ValueError, match="not a FusedOptimizers state_dict"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(TypeError, match="expects an nn.Module holding ShardedEmbedding tables, got Tensor"):
        fused_optimizer(torch.zeros(1))
    with pytest.raises(ValueError, match="holds no ShardedEmbedding with a fused_optimizer"):
        fused_optimizer(ShardedEmbedding(20, 3, page_size=5))
    # A schedule stepped on one rank only: refused on every rank at the next lookup with
    # gradients, before any row changes; stepped alike again, the table trains.
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = emb.full_table()
    if rank == 1:
        sched.step()
    with pytest.raises(RuntimeError, match=r"the fused optimizer's hyperparameters differ between ranks"):
        emb(torch.tensor([1, 7, 12])).sum().backward()
    assert torch.equal(emb.full_table(), before)
    if rank == 0:
        sched.step()
    emb(torch.tensor([1, 7, 12])).sum().backward()
    assert not torch.equal(emb.full_table(), before)
    return True


def test_bad_values_other_tables_and_a_schedule_stepped_on_one_rank_are_refused_before_anything_changes():
    assert run_ranks(2, _refused) == [True, True]


def _group_edges(path):
    """Every way of writing a group reaches the table or is refused; the kinds of table must
    match on load; copies, pickling, GradScaler and torch.distributed.checkpoint's
    get_state_dict / set_state_dict (strict) work or refuse clearly. (Found by a fresh user:
    ``|=``, a replaced group, a deepcopy and a key of another optimizer went nowhere in
    silence; an Adam table's groups loaded into an SGD table's; set_state_dict raised "Missing
    optimizer state" after loading the model; scaler.step raised torch's bare assertion.)"""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = nn.ModuleDict({"emb": ShardedEmbedding(20, 3, page_size=5, fused_optimizer={"name": "sgd", "lr": 0.1}),
                           "adam": ShardedEmbedding(20, 3, page_size=5, fused_optimizer={"name": "adam", "lr": 0.1})})
    emb = model["emb"]
    opt = fused_optimizer(model)
    group = opt.param_groups[0]
    assert group["fused_optimizer"] == "sgd" and opt.param_groups[1]["fused_optimizer"] == "adam"
    group |= {"lr": 0.04}
    assert emb.optimizer.lr == 0.04
    group.update(lr=0.05)
    assert emb.optimizer.lr == 0.05
    for bad, message in ((lambda: opt.param_groups.__setitem__(0, dict(group)), "stays so"),
                         (lambda: opt.param_groups.append(dict(group)), "stays so"),
                         (lambda: opt.param_groups.pop(), "stays so"),
                         (lambda: setattr(opt, "param_groups", [dict(group)]), "stays so"),
                         (lambda: group.clear(), "clear is refused")):
        with pytest.raises(TypeError, match=message):
            bad()
    for bad, message in ((lambda: group.__setitem__("momentum", 0.9), "does not take 'momentum'"),
                         (lambda: group.__setitem__("betas", (0.9, 0.99)), "does not take 'betas'"),
                         (lambda: group.__delitem__("lr"), "cannot remove 'lr'"),
                         (lambda: group.pop("lr"), "cannot remove 'lr'"),
                         (lambda: group.__setitem__("name", "x"), "cannot change 'name'"),
                         (lambda: group.__setitem__("fused_optimizer", "adam"), "cannot change 'fused_optimizer'")):
        with pytest.raises(ValueError, match=message):
            bad()
    assert emb.optimizer.lr == group["lr"] == 0.05 and "momentum" not in group
    group["initial_lr"] = 0.05  # a scheduler's own key: kept as in any param group
    # load_state_dict: groups of another kind of optimizer, or without a hyperparameter
    swapped = opt.state_dict()
    swapped["param_groups"][0], swapped["param_groups"][1] = (
        {**swapped["param_groups"][1], "name": "emb"}, {**swapped["param_groups"][0], "name": "adam"})
    with pytest.raises(ValueError, match="table 'emb' was trained by fused_optimizer 'adam', this one by 'sgd'"):
        opt.load_state_dict(swapped)
    lacking = opt.state_dict()
    del lacking["param_groups"][1]["betas"]
    with pytest.raises(ValueError, match=r"table 'adam' lacks hyperparameters \['betas'\]"):
        opt.load_state_dict(lacking)
    assert emb.optimizer.lr == 0.05
    # A copy of the optimizer alone is one over copies of the tables; with the model, over its copy.
    alone = copy.deepcopy(opt)
    assert alone.param_groups[0]["lr"] == 0.05 and alone.param_groups[0]["initial_lr"] == 0.05
    alone.param_groups[0]["lr"] = 0.5
    assert emb.optimizer.lr == 0.05 and alone.param_groups[0]._table.optimizer.lr == 0.5
    twin_model, twin = copy.deepcopy((model, opt))
    twin.param_groups[0]["lr"] = 0.7
    assert twin_model["emb"].optimizer.lr == 0.7 and emb.optimizer.lr == 0.05
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    for thing in (opt, sched):
        with pytest.raises(TypeError, match="a FusedOptimizers cannot be pickled"):
            pickle.dumps(thing)
    pickle.loads(pickle.dumps(opt.state_dict()))  # its state dict pickles
    # torch.distributed.checkpoint's get_state_dict / dcp.save / dcp.load / set_state_dict with
    # a dense optimizer beside it and the default (strict) options: state for every parameter,
    # no fake first step (it would give each table a dense zero gradient), and the
    # hyperparameters come back.
    dense = nn.Linear(3, 1)
    dense_opt = torch.optim.Adam(dense.parameters(), lr=0.1)  # (plain SGD keeps no state: strict loads refuse it)
    holder = nn.ModuleDict({"tables": model, "dense": dense})
    dense(emb(torch.tensor([1, 7]))).sum().backward()
    dense_opt.step()
    models, optims = get_state_dict(holder, (opt, dense_opt))
    assert emb.weight.grad is None and model["adam"].weight.grad is None
    dcp.save({"model": models, "optim": optims}, checkpoint_id=path)
    emb.optimizer.lr = 0.9
    models, optims = get_state_dict(holder, (opt, dense_opt))
    state = {"model": models, "optim": optims}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(holder, (opt, dense_opt), model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert emb.optimizer.lr == group["lr"] == 0.05 and group["initial_lr"] == 0.05
    # GradScaler may step it (nothing to unscale) beside a dense optimizer.
    scaler = torch.amp.GradScaler("cpu")
    use_grad_scaler(model, scaler)
    scaler.scale(dense(emb(torch.tensor([1, 7]))).sum()).backward()
    scaler.step(dense_opt)
    scaler.step(opt)
    scaler.update()
    return True


def test_every_write_reaches_the_table_or_is_refused_and_copies_checkpoints_and_scalers_work(tmp_path):
    assert run_ranks(2, _group_edges, str(tmp_path / "ckpt")) == [True, True]
