"""Standard PyTorch machinery around a model that holds a ShardedEmbedding: the same result as
nn.Embedding in the same code, or one clear error on every rank before anything changes.
docs/training-loop.md has the table of what works and what is refused; each row has a test
here (GradScaler, autocast and non-finite gradients: tests/test_amp.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_embedding import (
    ShardedEmbedding,
    clip_grad_norm_,
    exclude_from_ddp,
    initial_rows,
    split_parameters,
    table_parameters,
)
from tests.harness import run_ranks
from tests.oracle import (Oracle, RowwiseAdagradReference, local_rows_of, make_ids, make_loss_weight, rank_world,
                          recording_backend)


class TableAndHead(nn.Module):
    def __init__(self, n, dim, page_size, **table):
        super().__init__()
        self.emb = ShardedEmbedding(n, dim, page_size=page_size, **table)
        self.head = nn.Linear(dim, 1)

    def forward(self, ids):
        return self.head(self.emb(ids)).squeeze(-1)


def _reference(n, dim, seed=0, sparse=True):
    ref = nn.Embedding(n, dim, sparse=sparse)
    with torch.no_grad():
        ref.weight.copy_(initial_rows(seed, dim, 0, n))
    return ref


# ---------------------------------------------------------------- inference mode, no_grad, eval


def _train(emb, steps, validate, n, d, size=9, opt=None):
    """``steps`` training steps (a sparse SGD ``opt`` or a fused optimizer) on the ranks' own
    batches; with ``validate``, lookups under inference_mode, no_grad and eval() of a larger
    batch between them, which must return the stored rows and change nothing."""
    rank, world = rank_world()
    for step in range(steps):
        emb.train()
        ids = make_ids(n, rank, step, size, skew="zipf")
        (emb(ids) * make_loss_weight(ids, d, rank, step)).sum().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        if validate:
            emb.eval()
            big = make_ids(n, rank, 100 + step, 400)  # more unique ids than the workspaces held
            table = emb.full_table()
            with torch.inference_mode():
                assert torch.equal(emb(big), table[big])
            with torch.no_grad():
                assert torch.equal(emb(big), table[big])
    return emb.full_table()


def _inference_then_training():
    """The issue's case: one lookup of [[1, 7], [13, 39]] under inference_mode, then
    emb([[0, 5, 5]]).sum().backward() and training: the rows come back, and the table ends bit
    for bit where the same training without the inference lookups ends (and matches
    nn.Embedding + SGD, up to the order of float sums)."""
    rank, world = rank_world()
    emb, twin = ShardedEmbedding(40, 3, page_size=6), ShardedEmbedding(40, 3, page_size=6)
    with torch.inference_mode():
        out = emb(torch.tensor([[1, 7], [13, 39]]))
    assert torch.equal(out, initial_rows(0, 3, 0, 40)[torch.tensor([[1, 7], [13, 39]])])
    for table in (emb, twin):
        table(torch.tensor([[0, 5, 5]])).sum().backward()
        assert table.weight.grad is not None
        torch.optim.SGD(table.parameters(), lr=0.1).step()
        table.weight.grad = None
    got = _train(emb, 3, True, 40, 3, opt=torch.optim.SGD(emb.parameters(), lr=0.1))
    want = _train(twin, 3, False, 40, 3, opt=torch.optim.SGD(twin.parameters(), lr=0.1))
    assert torch.equal(got, want)
    oracle = Oracle(40, 3, optimizer="sgd", lr=0.1)
    oracle.step([torch.tensor([[0, 5, 5]])] * world, [torch.ones(1, 3, 3)] * world)
    for step in range(3):
        ids = [make_ids(40, r, step, 9, skew="zipf") for r in range(world)]
        oracle.step(ids, [make_loss_weight(i, 3, r, step) for r, i in enumerate(ids)])
    torch.testing.assert_close(got, oracle.table)


def test_inference_mode_lookup_then_training():
    run_ranks(2, _inference_then_training)


def _validate_under_inference_mode_while_training():
    """Fused row-wise Adagrad training, validated under inference_mode, no_grad and eval() on a
    larger batch after every step (Lightning's default), ends bit for bit where training
    without validation ends, and matches nn.Embedding + row-wise Adagrad."""
    rank, world = rank_world()
    n, d = 600, 4
    fused = {"name": "rowwise_adagrad", "lr": 0.3}
    emb = ShardedEmbedding(n, d, page_size=7, fused_optimizer=fused)
    twin = ShardedEmbedding(n, d, page_size=7, fused_optimizer=fused)
    got, want = _train(emb, 4, True, n, d, size=12), _train(twin, 4, False, n, d, size=12)
    assert torch.equal(got, want)
    assert torch.equal(emb._full(emb.optimizer.sum), twin._full(twin.optimizer.sum))
    oracle = Oracle(n, d, fused=fused)
    assert isinstance(oracle.opt, RowwiseAdagradReference)
    for step in range(4):
        ids = [make_ids(n, r, step, 12, skew="zipf") for r in range(world)]
        oracle.step(ids, [make_loss_weight(i, d, r, step) for r, i in enumerate(ids)])
    torch.testing.assert_close(got, oracle.table)


def test_validation_under_inference_mode_between_fused_steps():
    run_ranks(2, _validate_under_inference_mode_while_training)


def _grad_modes_differ():
    """One rank in no_grad, the other training: the backward is a collective, so every rank
    refuses the lookup together instead of hanging later; the next lookup works."""
    rank, world = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=5)
    with torch.set_grad_enabled(rank == 0):
        with pytest.raises(RuntimeError, match=r"ranks \[0\] look up with gradients .* ranks \[1\] without"):
            emb(torch.tensor([1, 2]))
    emb(torch.tensor([rank])).sum().backward()
    assert emb.weight.grad is not None


def test_ranks_that_disagree_on_grad_mode_raise_together():
    run_ranks(2, _grad_modes_differ)


# ---------------------------------------------------------------- DDP


def _ddp_without_exclude(kind: str):
    """The issue's case: DDP(model) around a table and a Linear, no exclude_from_ddp. The
    start-up broadcast leaves every rank's pages alone, the all-reduce averages only the head,
    and training matches one process with nn.Embedding (table: sum of the ranks' losses;
    head: DDP's mean)."""
    rank, world = rank_world()
    n, d = 64, 4
    table = {"sparse": {}, "dense": {"sparse": False}, "fused": {"fused_optimizer": {"name": "sgd", "lr": 0.1}}}[kind]
    torch.manual_seed(0)
    model = TableAndHead(n, d, 8, **table)
    before = model.emb.weight.detach().clone()
    ddp = DDP(model)
    assert torch.equal(model.emb.weight, before)  # the broadcast did not copy rank 0's pages
    assert ddp.parameters_to_ignore == {"emb.weight"}
    tables, dense = split_parameters(ddp)
    opts = [torch.optim.SGD(dense, lr=0.1)] + ([torch.optim.SGD(tables, lr=0.1)] if kind != "fused" else [])
    ref_table = _reference(n, d, sparse=kind != "dense")
    ref_head = copy.deepcopy(model.head)
    ref_opts = [torch.optim.SGD(ref_head.parameters(), lr=0.1), torch.optim.SGD(ref_table.parameters(), lr=0.1)]
    for step in range(3):
        batches = [(make_ids(n, r, step, 10), torch.randn(10, generator=torch.Generator().manual_seed(r + 10 * step)))
                   for r in range(world)]
        F.mse_loss(ddp(batches[rank][0]), batches[rank][1]).backward()
        for o in opts:
            o.step()
            o.zero_grad()
        sum(F.mse_loss(ref_head(ref_table(i)).squeeze(-1), t) for i, t in batches).backward()
        for p in ref_head.parameters():
            p.grad /= world
        for o in ref_opts:
            o.step()
            o.zero_grad()
        torch.testing.assert_close(model.emb.full_table(), ref_table.weight.detach())
        for got, want in zip(model.head.parameters(), ref_head.parameters()):
            torch.testing.assert_close(got.detach(), want.detach())


@pytest.mark.parametrize("kind", ["dense", "sparse", "fused"])
def test_ddp_wrapping_the_whole_model_leaves_the_table_alone(kind):
    run_ranks(2, _ddp_without_exclude, kind)


def _ddp_refuses_a_table_it_cannot_see():
    """A table put into a sub-module after that sub-module joined the model is not seen as the
    model is assembled: DDP(model) raises on every rank before it broadcasts anything;
    exclude_from_ddp(model) then makes it right."""
    rank, world = rank_world()
    model = nn.Sequential(nn.Linear(3, 3), nn.Module())
    model[1].emb = ShardedEmbedding(20, 3, page_size=5)
    before = model[1].emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"would manage the ShardedEmbedding storage \['1.emb.weight'\].*exclude_from_ddp"):
        DDP(model)
    assert torch.equal(model[1].emb.weight, before)
    assert exclude_from_ddp(model) == ["1.emb.weight"]
    DDP(model)
    assert torch.equal(model[1].emb.weight, before)
    model[1].emb = nn.Linear(3, 3)  # replacing the table: its name is no longer ignored
    assert "1.emb.weight" not in getattr(model[1], "_ddp_params_and_buffers_to_ignore")


def test_ddp_refuses_before_broadcasting_a_table_it_would_manage():
    run_ranks(2, _ddp_refuses_a_table_it_cannot_see)


def _model_and_oracle(n: int = 48, d: int = 4):
    """A TableAndHead (table of 8-row pages), nn.Embedding with its initial rows and a copy of its head."""
    torch.manual_seed(0)
    model = TableAndHead(n, d, 8)
    return model, _reference(n, d), copy.deepcopy(model.head)


def _train_beside_a_wrapper(wrapped, model, ref_table, ref_head, steps: int = 2):
    """Train ``wrapped`` (a data-parallel wrapper of ``model``, a TableAndHead whose table it
    leaves alone) with SGD on both parts, against nn.Embedding + the head on every rank's batch
    (the head's gradient averaged, as DDP and FSDP do); the tables must match at every step."""
    rank, world = rank_world()
    n = ref_table.num_embeddings
    opts = [torch.optim.SGD(table_parameters(model), lr=0.1),
            torch.optim.SGD([p for p in wrapped.parameters() if p is not model.emb.weight], lr=0.1)]
    ref_opts = [torch.optim.SGD(ref_table.parameters(), lr=0.1), torch.optim.SGD(ref_head.parameters(), lr=0.1)]
    for step in range(steps):
        ids = [make_ids(n, r, step, 8) for r in range(world)]
        wrapped(ids[rank]).sum().backward()
        sum(ref_head(ref_table(i)).sum() for i in ids).backward()
        for p in ref_head.parameters():
            p.grad /= world
        for o in opts + ref_opts:
            o.step()
            o.zero_grad()
        torch.testing.assert_close(model.emb.full_table(), ref_table.weight.detach())


def _replicate(ignore: bool):
    """torch's composable replicate() builds its DDP over a ParameterList of the model's
    parameters at the first forward: its broadcast copied rank 0's pages over the others'.
    Now that DDP refuses on every rank before broadcasting; with the tables as
    ignored_modules, training matches the oracle."""
    from torch.distributed._composable.replicate import replicate

    model, ref_table, ref_head = _model_and_oracle()
    rows = model.emb.weight.detach().clone()
    if not ignore:
        replicate(model)
        with pytest.raises(ValueError, match=r"replicate\(\) would manage a ShardedEmbedding.s storage.*ignored_modules"):
            model(torch.tensor([1, 2]))
        assert torch.equal(model.emb.weight.detach(), rows)  # nothing was broadcast
        return
    replicate(model, ignored_modules=[m for m in model.modules() if isinstance(m, ShardedEmbedding)])
    _train_beside_a_wrapper(model, model, ref_table, ref_head)
    for got, want in zip(model.head.parameters(), ref_head.parameters()):
        torch.testing.assert_close(got.detach(), want.detach())


@pytest.mark.parametrize("ignore", [False, True])
def test_composable_replicate_refuses_a_table_or_trains_beside_it(ignore):
    run_ranks(2, _replicate, ignore)


def _second_order():
    """A penalty on the table's own gradient (create_graph=True, then a backward through it)
    silently missed every term that crosses ranks; now it raises on every rank, rows
    unchanged. A penalty on the dense head's gradient (first order through the lookup) gives
    the table nn.Embedding's gradient."""
    rank, world = rank_world()
    n, d = 32, 3
    torch.manual_seed(0)
    model = TableAndHead(n, d, 8, sparse=False)
    ref_table, ref_head = _reference(n, d, sparse=False), copy.deepcopy(model.head)
    ids = [make_ids(n, r, 0, 6) for r in range(world)]
    rows = model.emb.weight.detach().clone()
    (g,) = torch.autograd.grad(model(ids[rank]).pow(3).sum(), [model.emb.weight], create_graph=True)
    with pytest.raises(RuntimeError, match="ShardedEmbedding: a gradient that a table's backward made cannot be "
                                           "differentiated again"):
        g.pow(2).sum().backward()
    # Asked for the head's part only, autograd pruned the error away and answered None.
    (g,) = torch.autograd.grad(model(ids[rank]).pow(3).sum(), [model.emb.weight], create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(g.pow(2).sum(), list(model.head.parameters()), allow_unused=True)
    assert torch.equal(model.emb.weight.detach(), rows) and model.emb.weight.grad is None

    def penalized(table, head, i):
        loss = head(table(i)).squeeze(-1).pow(2).sum()
        grads = torch.autograd.grad(loss, list(head.parameters()), create_graph=True)
        return loss + sum(x.pow(2).sum() for x in grads)

    penalized(model.emb, model.head, ids[rank]).backward()
    sum(penalized(ref_table, ref_head, i) for i in ids).backward()
    torch.testing.assert_close(model.emb.weight.grad, local_rows_of(model.emb, ref_table.weight.grad))


def test_second_order_gradients_through_a_table_raise_or_match_nn_embedding():
    run_ranks(2, _second_order)


# ---------------------------------------------------------------- FSDP2


def _fully_shard(ignore: bool, rows: int = 48):
    """fully_shard(model) would take the table's storage over (and mix the ranks' pages):
    refused inside fully_shard, on every rank, before FSDP's first all-gather (with unequal row
    counts per rank, 40 rows = 3 + 2 pages, that all-gather aborted the ranks in gloo before
    the lookup could refuse); the rows are unchanged. With the tables' parameters ignored,
    FSDP2 shards the head and training matches the oracle."""
    from torch.distributed.fsdp import fully_shard

    model, ref_table, ref_head = _model_and_oracle(rows)
    before = model.emb.weight.detach().clone()
    if not ignore:
        with pytest.raises(TypeError, match="storage parameter `weight` was replaced.*ignored_params"):
            fully_shard(model)
        assert model.emb._parameters["weight"] is model.emb._storage
        assert torch.equal(model.emb._storage.detach(), before)  # the pages are intact
        return
    fully_shard(model, ignored_params=set(table_parameters(model)))
    _train_beside_a_wrapper(model, model, ref_table, ref_head)  # (FSDP reduce-scatters the mean, as DDP)
    head_weight = model.head.weight.full_tensor()
    torch.testing.assert_close(head_weight, ref_head.weight.detach())


@pytest.mark.parametrize("ignore,rows", [(False, 48), (False, 40), (True, 48)],
                         ids=["refused", "refused_unequal_rows", "ignored_params"])
def test_fsdp2_fully_shard(ignore, rows):
    run_ranks(2, _fully_shard, ignore, rows)


def _fsdp1(mode: str):
    """FullyShardedDataParallel (FSDP1) flattens the table's storage into its own parameter
    when it wraps the model (use_orig_params=True: the storage itself becomes a flat shard).
    The refusal at the first lookup said the rows were unchanged, and came too late where the
    ranks hold different numbers of rows (FSDP1's all-gather ended the job). Now FSDP1's
    constructor refuses, saying what happened to the rows. With the tables as ignored_states,
    training matches the oracle."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model, ref_table, ref_head = _model_and_oracle()
    if mode in ("orig_params", "flat_params"):
        # 40 rows in pages of 8: 3 pages on rank 0, 2 on rank 1. FSDP1's first forward
        # all-gathered flat parameters of different sizes: gloo ended the job.
        model.emb = ShardedEmbedding(40, 4, page_size=8)
        with pytest.raises(ValueError, match=r"FullyShardedDataParallel has taken over the ShardedEmbedding storage "
                                             r"of \['emb'\]: .*" + ("no longer in the table" if mode == "orig_params" else
                                                                  "own rows are intact") + ".*ignored_states"):
            FSDP(model, device_id=torch.device("cpu"), use_orig_params=mode == "orig_params")
        return
    wrapped = FSDP(model, device_id=torch.device("cpu"), ignored_states=table_parameters(model))
    _train_beside_a_wrapper(wrapped, model, ref_table, ref_head)


@pytest.mark.parametrize("mode", ["orig_params", "flat_params", "ignored_states"])
def test_fsdp1_refuses_a_flattened_table_or_trains_beside_it(mode):
    run_ranks(2, _fsdp1, mode)


# ---------------------------------------------------------------- saving and loading state


def _torch_save_round_trip(tmp: str, fused):
    """The issue's case: torch.save(model.state_dict()) per rank, torch.load with the default
    weights_only=True, load_state_dict: bit for bit, optimizer state included. A file that
    does not fit (another layout, another rank's file) fails on every rank, nothing changed."""
    rank, world = rank_world()
    n, d = 64, 4
    placement = [(0, 1), 1, 0, 1, (1, 0), 0, 1, 0]
    model = TableAndHead(n, d, 8, placement=placement, fused_optimizer=fused)
    for step in range(2):
        ids = make_ids(n, rank, step, 12)
        model(ids).sum().backward()
    torch.save(model.state_dict(), f"{tmp}/rank{rank}.pt")
    table = model.emb.full_table().clone()
    state = {k: model.emb._full(v) for k, v in model.emb._row_states().items()}

    torch.manual_seed(123)
    fresh = TableAndHead(n, d, 8, placement=placement, fused_optimizer=fused)
    with torch.no_grad():
        fresh.emb.weight.zero_()
    loaded = torch.load(f"{tmp}/rank{rank}.pt")  # weights_only=True by default
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.emb.full_table(), table)
    for k, v in fresh.emb._row_states().items():
        assert torch.equal(fresh.emb._full(v), state[k])
    assert torch.equal(fresh.head.weight, model.head.weight)
    if fused:
        assert int(fresh.emb.optimizer.step) == 2

    # Lightning's DDP strategy saves rank 0's state only: every rank loading it must fail together.
    before = fresh.emb.full_table().clone()
    with pytest.raises(RuntimeError, match=r"rank 1: emb.weight: this per-rank state \(torch.save\) holds rows"):
        fresh.load_state_dict(torch.load(f"{tmp}/rank0.pt"))
    assert torch.equal(fresh.emb.full_table(), before)
    # Another layout: refused, pointing to DCP.
    round_robin = TableAndHead(n, d, 16, fused_optimizer=fused)
    with pytest.raises(RuntimeError, match="torch.distributed.checkpoint"):
        round_robin.load_state_dict(loaded)
    assert torch.equal(round_robin.emb.full_table(), initial_rows(0, d, 0, n))


@pytest.mark.parametrize("fused", [None, {"name": "adam", "lr": 0.1}], ids=["sparse", "fused_adam"])
def test_torch_save_state_dict_round_trips_with_weights_only(tmp_path, fused):
    run_ranks(2, _torch_save_round_trip, str(tmp_path), fused)


def _state_dict_in_a_parent():
    """state_dict / load_state_dict of a model holding the table: prefixed keys, strict and
    non-strict loads, copy.deepcopy(state_dict) as a 'best model' snapshot."""
    rank, world = rank_world()
    model = TableAndHead(30, 3, 4, fused_optimizer={"name": "adagrad", "lr": 0.5})
    keys = list(model.state_dict())
    assert keys == ["emb.weight", "emb.optimizer.sum", "emb.optimizer.step", "head.weight", "head.bias"]
    best = copy.deepcopy(model.state_dict())
    start = model.emb.full_table().clone()
    model(torch.tensor([rank, 29])).sum().backward()
    assert not torch.equal(model.emb.full_table(), start)
    model.load_state_dict(best)
    assert torch.equal(model.emb.full_table(), start)
    assert int(model.emb.optimizer.step) == 0
    partial = {k: v for k, v in best.items() if not k.startswith("emb.optimizer")}
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(partial)
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["emb.optimizer.sum", "emb.optimizer.step"]
    # A key missing on one rank only: every rank raises (strict), nothing is loaded.
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    moved = model.emb.full_table().clone()
    mine = dict(best) if rank == 0 else partial
    with pytest.raises(RuntimeError, match="No rank changed any row"):
        model.load_state_dict(mine)
    assert torch.equal(model.emb.full_table(), moved)


def test_state_dict_in_a_parent_module():
    run_ranks(2, _state_dict_in_a_parent)


# ---------------------------------------------------------------- copying, pickling


def _deepcopy_and_ema():
    """copy.deepcopy(model) is an independent table with the same rows, state and layout
    (EMA/SWA copies); torch.optim.swa_utils.AveragedModel averages each row as for nn.Embedding.
    Pickling the module (torch.save(model)) is refused with a pointer to the state dict."""
    rank, world = rank_world()
    n, d = 30, 3
    torch.manual_seed(0)  # the same head on every rank
    model = TableAndHead(n, d, 4, placement=[(0, 1)] + [0, 1] * 3 + [(1, 0)], fused_optimizer={"name": "sgd", "lr": 0.5})
    twin = copy.deepcopy(model)
    assert twin.emb.weight.data_ptr() != model.emb.weight.data_ptr()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
    ref = _reference(n, d)
    ref_ema = None
    for step in range(2):
        ids = [make_ids(n, r, step, 6) for r in range(world)]
        model(ids[rank]).sum().backward()
        twin(torch.tensor([], dtype=torch.int64)).sum().backward()  # the copy trains on nothing
        ema.update_parameters(model)
        grad = torch.zeros(n, d)
        for i in ids:
            grad.index_add_(0, i, model.head.weight.detach().expand(i.numel(), d))
        with torch.no_grad():
            ref.weight.sub_(0.5 * grad)
            # AveragedModel copies the first update, then averages: ema = 0.5 ema + 0.5 w
            ref_ema = ref.weight.detach().clone() if step == 0 else 0.5 * ref_ema + 0.5 * ref.weight.detach()
        torch.testing.assert_close(model.emb.full_table(), ref.weight.detach())
        torch.testing.assert_close(ema.module.emb.full_table(), ref_ema)
    assert torch.equal(twin.emb.full_table(), initial_rows(0, d, 0, n))
    # The copy is a table of its own on the group: a rank calling it while another calls the
    # original raises on every rank (it used to share the original's number and mix their rows),
    # also after the original's requests grew; nothing changes, and both go on.
    model(torch.arange(n).repeat(20)).sum().backward()
    before = (model.emb.full_table(), twin.emb.full_table())
    with pytest.raises(RuntimeError, match="the ranks called the lookups of different tables"):
        (model if rank == 0 else twin)(torch.arange(n)).sum().backward()
    assert torch.equal(model.emb.full_table(), before[0]) and torch.equal(twin.emb.full_table(), before[1])
    assert torch.equal(twin.emb(torch.arange(n)), before[1])
    with pytest.raises(TypeError, match=r"cannot be pickled.*state_dict"):
        pickle.dumps(model)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(model, "/dev/null")


def test_deepcopy_ema_and_pickling():
    run_ranks(2, _deepcopy_and_ema)


# ---------------------------------------------------------------- freezing, dtypes, devices


def _freeze(fused):
    """requires_grad_(False) on the model freezes the table, fused optimizer included; the
    head still trains. Then unfreezing trains the table again."""
    rank, world = rank_world()
    torch.manual_seed(0)
    model = TableAndHead(20, 3, 5, fused_optimizer=fused)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # a table without a gradient is skipped
    model.emb.requires_grad_(False)
    before, head = model.emb.full_table().clone(), model.head.weight.detach().clone()
    model(torch.tensor([rank, 7])).sum().backward()
    opt.step()
    opt.zero_grad()
    assert torch.equal(model.emb.full_table(), before) and not torch.equal(model.head.weight, head)
    model.requires_grad_(True)
    model(torch.tensor([rank, 7])).sum().backward()
    opt.step()
    assert not torch.equal(model.emb.full_table(), before)


@pytest.mark.parametrize("fused", [None, {"name": "rowwise_adagrad", "lr": 0.5}], ids=["sparse", "fused"])
def test_requires_grad_false_freezes_the_table(fused):
    run_ranks(2, _freeze, fused)


def _dtypes_and_devices():
    """.double() / .half() / .to(dtype) convert the table as nn.Embedding's; .to(another
    device) is refused before the table changes."""
    rank, world = rank_world()
    model = TableAndHead(20, 3, 5, fused_optimizer={"name": "adam", "lr": 0.1})
    model.double()
    assert model.emb.weight.dtype == torch.float64
    ids = torch.tensor([rank, 19])
    assert torch.equal(model.emb(ids), initial_rows(0, 3, 0, 20).double()[ids])
    model(ids).sum().backward()  # the fused Adam keeps its float32 state
    assert model.emb.weight.dtype == torch.float64 and model.emb.optimizer.exp_avg.dtype == torch.float32
    model.to(torch.bfloat16)
    assert model.emb(ids).dtype == torch.bfloat16
    before = model.emb.full_table().clone()
    with pytest.raises(ValueError, match="cannot move to meta.*device="):
        model.to("meta")
    assert torch.equal(model.emb.full_table(), before)
    model.float()
    assert model.emb(ids).dtype == torch.float32


def test_dtype_conversions_work_and_device_moves_are_refused():
    run_ranks(2, _dtypes_and_devices)


# ---------------------------------------------------------------- gradient utilities


def _clip(sparse: bool, norm_type: float):
    """sharded_embedding.clip_grad_norm_ over a model with a table equals
    torch.nn.utils.clip_grad_norm_ over the same model with nn.Embedding (mirrored pages count
    once); with a fused table it refuses, on every rank, before any gradient changes."""
    rank, world = rank_world()
    n, d = 30, 3
    torch.manual_seed(0)
    model = TableAndHead(n, d, 4, placement=[(0, 1), 0, 1, 0, (1, 0), 1, 0, 1], sparse=sparse)
    ref_table, ref_head = _reference(n, d, sparse=False), copy.deepcopy(model.head)
    ids = [make_ids(n, r, 0, 9) for r in range(world)]
    model(ids[rank]).pow(2).sum().backward()
    for p in model.head.parameters():  # what DDP would do: the head's gradient, the same on every rank
        dist.all_reduce(p.grad)
    sum(ref_head(ref_table(i)).pow(2).sum() for i in ids).backward()
    got = clip_grad_norm_(model, 0.5, norm_type)
    want = torch.nn.utils.clip_grad_norm_([ref_table.weight, *ref_head.parameters()], 0.5, norm_type)
    torch.testing.assert_close(got, want)
    grad = model.emb.weight.grad
    torch.testing.assert_close(grad.to_dense() if sparse else grad, local_rows_of(model.emb, ref_table.weight.grad))
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    fused = TableAndHead(n, d, 4, fused_optimizer={"name": "sgd", "lr": 0.1})
    fused(ids[rank]).sum().backward()
    head_grad = fused.head.weight.grad.clone()
    with pytest.raises(ValueError, match=r"tables \['emb'\] have a fused optimizer"):
        clip_grad_norm_(fused, 0.5)
    assert torch.equal(fused.head.weight.grad, head_grad)


@pytest.mark.parametrize("sparse, norm_type", [(True, 2.0), (False, 2.0), (True, float("inf"))])
def test_clip_grad_norm_over_the_whole_table(sparse, norm_type):
    run_ranks(2, _clip, sparse, norm_type)


def _clip_nonfinite_norm():
    """Finite gradients whose norm is beyond float32 (3e38 on rows of both ranks): with
    error_if_nonfinite every rank raises, as torch.nn.utils.clip_grad_norm_ does, and no
    gradient changes."""
    rank, world = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=5, sparse=False)
    (emb(torch.tensor([5 * rank])) * 3e38).sum().backward()  # each rank's own row: finite, exact
    grad = emb.weight.grad.clone()
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(emb, 1.0, error_if_nonfinite=True)
    assert torch.equal(emb.weight.grad, grad)
    # norm_type 0 (a count) raised ZeroDivisionError, -inf clipped by the largest magnitude
    for norm_type in (0, float("-inf"), float("nan"), -1):
        with pytest.raises(ValueError, match="norm_type must be > 0"):
            clip_grad_norm_(emb, 1.0, norm_type)
        assert torch.equal(emb.weight.grad, grad)
    # on one rank only, or a different value per rank: the other waited in the all-reduce for
    # the group's timeout, or each clipped by another (wrong) norm
    for mine, message in ((0, "rank 1: clip_grad_norm_: norm_type must be > 0"),
                          ("fro", "rank 1: clip_grad_norm_: norm_type and max_norm must be numbers"),
                          (1.0, "ranks were given different arguments: norm_type: rank 0: 2.0, rank 1: 1.0")):
        with pytest.raises(ValueError, match=message):
            clip_grad_norm_(emb, 1.0, mine if rank == 1 else 2.0)
        assert torch.equal(emb.weight.grad, grad)
    fused = ShardedEmbedding(20, 3, page_size=5, fused_optimizer={"name": "sgd", "lr": 0.1})
    with pytest.raises(ValueError, match=r"tables \['\(the module itself\)'\] have a fused optimizer"):
        clip_grad_norm_(fused, 1.0)


def test_clip_grad_norm_refuses_a_nonfinite_norm_on_every_rank():
    run_ranks(2, _clip_nonfinite_norm)


def _accumulate_and_zero_grad():
    """Two micro-batches before one optimizer step (gradient accumulation), zero_grad with
    set_to_none=False, and a checkpointed lookup (torch.utils.checkpoint re-runs the
    forward, a collective, in the backward): as nn.Embedding."""
    from torch.utils.checkpoint import checkpoint

    rank, world = rank_world()
    n, d = 40, 4
    emb = ShardedEmbedding(n, d, page_size=6)
    opt = torch.optim.SGD(emb.parameters(), lr=0.3)
    ref = _reference(n, d)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    for step in range(2):
        for micro in range(2):
            ids = [make_ids(n, r, 10 * step + micro, 7) for r in range(world)]
            ws = [make_loss_weight(i, d, r, micro) for r, i in enumerate(ids)]
            if micro == 0:
                out = checkpoint(emb, ids[rank], use_reentrant=False)
            else:
                out = emb(ids[rank])
            (out * ws[rank]).sum().backward()
            sum((ref(i) * w).sum() for i, w in zip(ids, ws)).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=False)
        ref_opt.zero_grad(set_to_none=False)
        torch.testing.assert_close(emb.full_table(), ref.weight.detach())


def test_gradient_accumulation_zero_grad_and_activation_checkpointing():
    run_ranks(2, _accumulate_and_zero_grad)


def _hooks_and_compile():
    """Forward hooks see and may change the lookup's output; torch.compile of a model holding
    the table runs it (the lookup is a graph break) and trains as in eager mode."""
    rank, world = rank_world()
    n, d = 30, 3
    seen = []
    torch.manual_seed(0)
    model = TableAndHead(n, d, 4)
    handle = model.emb.register_forward_hook(lambda mod, args, out: seen.append(out.shape) or out * 2)
    ids = torch.tensor([rank, 29, 3])
    torch.testing.assert_close(model.emb(ids), 2 * initial_rows(0, d, 0, n)[ids])
    handle.remove()
    assert seen == [torch.Size([3, d])]
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    for m in (compiled, eager):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(2):
            m(make_ids(n, rank, step, 5)).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(model.emb.full_table(), eager.emb.full_table())
    torch.testing.assert_close(model.head.weight, eager.head.weight)
    backend, traced = recording_backend()  # what of the package dynamo puts into graphs

    torch.compile(model, backend=backend)(make_ids(n, rank, 2, 5)).sum().backward()
    assert not traced, traced


def test_forward_hooks_and_torch_compile():
    run_ranks(2, _hooks_and_compile)


def _hook_on_a_fused_table():
    """A gradient hook on a fused table's weight was called with None, after the fused update
    had changed the rows (a clamp hook then raised AttributeError). Now the lookup is refused
    on every rank (hook on rank 1 only), nothing changes; without hooks (removed) it trains;
    lookups without gradients do not care."""
    from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig

    rank, _ = rank_world()
    emb = ShardedEmbedding(40, 4, page_size=8, fused_optimizer={"name": "sgd", "lr": 0.1})
    ebc = ShardedEmbeddingBagCollection([TableConfig("t", 40, 4, 8, fused_optimizer={"name": "sgd", "lr": 0.1})])
    for table, call in ((emb, lambda: emb(torch.tensor([1, 9]))),
                        (ebc.tables["t"], lambda: ebc({"t": (torch.tensor([1, 9]), torch.tensor([0]))})["t"])):
        weight, before, steps = table.weight, table.full_table(), int(table.optimizer.step)
        handles = []
        if rank == 1:
            handles = [weight.register_hook(lambda g: g.clamp(-1, 1)),
                       weight.register_post_accumulate_grad_hook(lambda p: None)]
        with pytest.raises(RuntimeError, match="fused optimizer has a gradient hook on its weight"):
            call().sum().backward()
        with torch.no_grad():
            call()
        assert torch.equal(table.full_table(), before) and int(table.optimizer.step) == steps
        for h in handles:
            h.remove()
        call().sum().backward()  # trains again
    return True


def test_gradient_hooks_on_a_fused_table_are_refused_before_any_row_changes():
    assert run_ranks(2, _hook_on_a_fused_table) == [True, True]


def _tying_and_direct_use_of_the_weight():
    """emb.weight is one rank's pages: tying it to another module (decoder.weight = emb.weight)
    gave that module a different shard per rank, and a gradient from a direct use of it (a
    penalty, F.embedding on it) was silently never applied by the fused optimizer. Both are
    refused on every rank, with nothing changed; the table then trains."""
    from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig

    rank, _ = rank_world()
    emb = ShardedEmbedding(40, 4, page_size=8, fused_optimizer={"name": "adagrad", "lr": 0.1})
    ebc = ShardedEmbeddingBagCollection([TableConfig("t", 40, 4, 8, fused_optimizer={"name": "sgd", "lr": 0.1})])
    ids = torch.tensor([1, 9, 30])
    for table, call in ((emb, lambda: emb(ids)), (ebc.tables["t"], lambda: ebc({"t": (ids, torch.tensor([0]))})["t"])):
        decoder = nn.Linear(4, 40)
        with pytest.raises(TypeError, match=r"cannot also be a parameter or buffer of Linear.weight \(weight tying"):
            decoder.weight = table.weight
        with pytest.raises(TypeError, match=r"cannot also be a parameter or buffer of Linear.weight \(weight tying"):
            decoder.weight = nn.Parameter(table.weight)  # a new Parameter over the same rows
        with pytest.raises(TypeError, match=r"cannot also be a parameter or buffer of Linear.rows \(weight tying"):
            decoder.register_buffer("rows", next(iter(table.local_pages.values())))  # a buffer over them
        assert decoder.weight is not table.weight
        before, state = table.full_table(), {k: v.clone() for k, v in table.optimizer.named_buffers()}
        for direct in (lambda: table.weight.pow(2).sum(), lambda: F.embedding(ids[:2], table.weight).sum()):
            with pytest.raises(RuntimeError, match="received a gradient from outside its lookup"):
                (call().sum() + direct()).backward()
            assert torch.equal(table.full_table(), before)
            assert all(torch.equal(v, state[k]) for k, v in table.optimizer.named_buffers())
            assert table.weight.grad is None
        call().sum().backward()  # trains
        assert not torch.equal(table.full_table(), before)
    return True


def test_weight_tying_and_direct_use_of_a_fused_tables_weight_are_refused():
    assert run_ranks(2, _tying_and_direct_use_of_the_weight) == [True, True]


def _init_loop_then_sync_mirrors():
    """The usual init loop (nn.init over model.parameters()) draws each rank's rows on its own:
    replicas of mirrored pages differ, and a mirrored row looks up differently per rank.
    sync_mirrors() makes them the primary's again (rows and fused state)."""
    rank, world = rank_world()
    emb = ShardedEmbedding(32, 4, page_size=8, placement=[(0, 1), 1, (1, 0), 0],
                           fused_optimizer={"name": "adagrad", "lr": 0.1})
    torch.manual_seed(rank)
    for p in emb.parameters():
        nn.init.xavier_uniform_(p)
    with torch.no_grad():
        emb.optimizer.sum.uniform_()

    def looked_up():
        with torch.no_grad():
            rows = emb(torch.tensor([3, 20]))
        gathered = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(gathered, rows)
        return gathered

    seen = looked_up()
    assert not torch.equal(seen[0], seen[1])  # the replicas differ
    emb.sync_mirrors()
    seen = looked_up()
    assert torch.equal(seen[0], seen[1])
    pages = emb.local_pages
    mine = {p: v.clone() for p, v in pages.items() if p in (0, 2)}
    theirs = [None] * world
    dist.all_gather_object(theirs, mine)
    for p in (0, 2):
        assert torch.equal(theirs[0][p], theirs[1][p])
    slots = {p: emb._local_page_ids.index(p) for p in (0, 2)}  # the mirrored pages' fused state
    state = {p: emb.optimizer.sum[8 * s : 8 * (s + 1)].clone() for p, s in slots.items()}
    every = [None] * world
    dist.all_gather_object(every, state)
    for p in (0, 2):
        assert torch.equal(every[0][p], every[1][p])
    return True


def test_sync_mirrors_after_an_init_loop_makes_the_replicas_equal():
    assert run_ranks(2, _init_loop_then_sync_mirrors) == [True, True]
