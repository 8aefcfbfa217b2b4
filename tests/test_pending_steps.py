"""A fused optimizer steps once per backward pass, when autograd completes it (`pending`).

Against nn.Embedding stepped by the matching torch optimizer after one backward: several
lookups of one table in one loss take one step with their summed gradient; a lookup
recomputed by activation checkpointing reads the rows its forward read; a backward pass
that raises anywhere changes no row or state; a GradScaler overflow in one lookup skips the
table's whole step.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as activation_checkpoint

from sharded_embedding import ShardedEmbedding, ShardedEmbeddingBagCollection, TableConfig, use_grad_scaler
from tests.harness import run_ranks
from tests.oracle import Oracle, local_rows_of, make_ids, make_loss_weight, rank_world

FUSED = [
    {"name": "sgd", "lr": 0.3},
    {"name": "adagrad", "lr": 0.2, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    {"name": "rowwise_adagrad", "lr": 0.2, "eps": 1e-8},
    {"name": "adam", "lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
]
N, DIM = 40, 4


def _state(emb) -> dict:
    return {k: v.clone() for k, v in emb.optimizer.named_buffers()}


def _three_lookups_one_loss(fused, checkpointed: bool):
    """Each rank looks the table up three times per step: once under activation
    checkpointing (first, so that its recomputation runs after the other lookups' backward),
    then twice directly; the loss is nonlinear in the checkpointed rows. The oracle looks up
    the same ids in one nn.Embedding and steps once."""
    rank, world = rank_world()
    placement = [0, (0, 1), 1, 0, 1] if world == 2 else "round_robin"
    emb = ShardedEmbedding(N, DIM, page_size=8, placement=placement, fused_optimizer=fused)
    oracle = Oracle(N, DIM, fused=fused)
    for step in range(4):
        ids = [[make_ids(N, r, 10 * step + k, 12, skew="zipf") for k in range(3)] for r in range(world)]
        ws = [[make_loss_weight(i, DIM, r, 10 * step + k) for k, i in enumerate(rank_ids)]
              for r, rank_ids in enumerate(ids)]

        def loss_of(lookup, rank_ids, rank_ws, recompute):
            first = recompute(lambda i: lookup(i).square(), rank_ids[0])
            return ((first * rank_ws[0]).sum() + (lookup(rank_ids[1]) * rank_ws[1]).sum()
                    + (lookup(rank_ids[2]) * rank_ws[2]).sum())

        recompute = ((lambda f, i: activation_checkpoint.checkpoint(f, i, use_reentrant=False)) if checkpointed
                     else (lambda f, i: f(i)))
        loss_of(emb, ids[rank], ws[rank], recompute).backward()
        sum(loss_of(oracle.emb, i, w, lambda f, x: f(x)) for i, w in zip(ids, ws)).backward()
        oracle.opt.step()
        oracle.opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(emb.weight.detach(), local_rows_of(emb, oracle.table), rtol=1e-5, atol=1e-6)
    assert int(emb.optimizer.step) == 4  # one step per backward pass, not per lookup
    for key in ("sum", "exp_avg", "exp_avg_sq"):
        if key in dict(emb.optimizer.named_buffers()):
            want = oracle.state(key)
            got = getattr(emb.optimizer, key)
            torch.testing.assert_close(got, local_rows_of(emb, want if want.dim() > 1 else want[:, None])
                                       .reshape(got.shape), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.full_table(), oracle.table, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", FUSED, ids=[f["name"] for f in FUSED])
def test_a_table_looked_up_several_times_in_one_loss_steps_once_as_nn_embedding(fused):
    run_ranks(2, _three_lookups_one_loss, fused, True)


def test_several_lookups_in_one_pass_on_one_rank_and_without_checkpointing():
    run_ranks(1, _three_lookups_one_loss, FUSED[2], False)


class _FailingBackward(torch.autograd.Function):
    """The identity, whose backward raises (a user's backward code that fails)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the user's backward failed")


def _tables_and_lookups(fused, through_collection: bool):
    """Two tables with a fused optimizer, looked up directly or through a collection: (the
    tables, a function from two id tensors to the two outputs)."""
    if through_collection:
        ebc = ShardedEmbeddingBagCollection([TableConfig(name=n, num_embeddings=N, embedding_dim=DIM, page_size=8,
                                                         pooling="sum", feature_names=[n], fused_optimizer=fused,
                                                         seed=s) for s, n in enumerate(("a", "b"))])

        def lookups(ids):
            out = ebc({n: (i, torch.arange(0, i.numel(), 3)) for n, i in zip(("a", "b"), ids)})
            return [out["a"], out["b"]]

        return [ebc.tables["a"], ebc.tables["b"]], lookups
    tables = [ShardedEmbedding(N, DIM, page_size=8, fused_optimizer=fused, seed=s) for s in range(2)]
    return tables, lambda ids: [t(i) for t, i in zip(tables, ids)]


def _a_failing_pass_changes_nothing(fused, through_collection: bool):
    """The loss's own node, made before the lookups, runs its backward after theirs: it
    raises once every table's gradient has been exchanged. No row or state of any table
    changes, twice over; the next clean step then equals a fresh model's first."""
    rank, world = rank_world()
    tables, lookups = _tables_and_lookups(fused, through_collection)
    before = [(t.weight.detach().clone(), _state(t)) for t in tables]
    x = torch.ones(3, requires_grad=True)
    ids = [make_ids(N, rank, k, 12) for k in range(2)]
    for attempt in range(2):
        guard = _FailingBackward.apply(x)
        loss = guard.sum() + sum((o * (k + 1.5)).sum() for k, o in enumerate(lookups(ids)))
        with pytest.raises(RuntimeError, match="the user's backward failed"):
            loss.backward()
        for t, (rows, state) in zip(tables, before):
            assert torch.equal(t.weight.detach(), rows)
            for key, value in _state(t).items():
                assert torch.equal(value, state[key]), key
    fresh, fresh_lookups = _tables_and_lookups(fused, through_collection)
    for run in (lookups, fresh_lookups):
        sum((o * (k + 1.5)).sum() for k, o in enumerate(run(ids))).backward()
    for t, f, (rows, _) in zip(tables, fresh, before):
        assert not torch.equal(t.weight.detach(), rows)
        assert torch.equal(t.weight.detach(), f.weight.detach())
        for key, value in _state(t).items():
            assert torch.equal(value, _state(f)[key]), key


@pytest.mark.parametrize("fused", [FUSED[0], FUSED[2]], ids=["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("through_collection", [False, True], ids=["tables", "collection"])
def test_a_backward_pass_that_raises_after_the_exchanges_changes_no_table(fused, through_collection):
    run_ranks(2, _a_failing_pass_changes_nothing, fused, through_collection)


def _overflow_in_one_of_two_lookups(inf_in_first: bool):
    """Under a GradScaler, one of two lookups of the table in one loss overflows on rank 1:
    nn.Embedding's gradient (their sum) holds inf, so scaler.step skips its whole step. The
    fused table skips its whole step too, whichever lookup's backward comes first."""
    rank, world = rank_world()
    fused = {"name": "adagrad", "lr": 0.2}
    emb = ShardedEmbedding(N, DIM, page_size=8, fused_optimizer=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    use_grad_scaler(emb, scaler)
    ref = Oracle(N, DIM, fused=fused)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    for step in range(3):
        ids = [[make_ids(N, r, 10 * step + k, 10) for k in range(2)] for r in range(world)]
        ws = [[make_loss_weight(i, DIM, r, 10 * step + k) for k, i in enumerate(rank_ids)]
              for r, rank_ids in enumerate(ids)]
        if step == 1:
            ws[1][0 if inf_in_first else 1][0, 0] = float("inf")
        scaler.scale(sum((emb(i) * w).sum() for i, w in zip(ids[rank], ws[rank]))).backward()
        scaler.update()
        ref_scaler.scale(sum((ref.emb(i) * w).sum() for rank_ids, rank_ws in zip(ids, ws)
                             for i, w in zip(rank_ids, rank_ws))).backward()
        ref_scaler.step(ref.opt)
        ref_scaler.update()
        ref.opt.zero_grad(set_to_none=True)
        assert scaler.get_scale() == ref_scaler.get_scale()
        torch.testing.assert_close(emb.weight.detach(), local_rows_of(emb, ref.table), rtol=1e-5, atol=1e-6)
    assert int(emb.optimizer.step) == 2
    return scaler.get_scale()


@pytest.mark.parametrize("inf_in_first", [True, False], ids=["first_lookup", "second_lookup"])
def test_an_overflow_in_one_lookup_skips_the_whole_step_of_the_pass(inf_in_first):
    assert run_ranks(2, _overflow_in_one_of_two_lookups, inf_in_first) == [512.0, 512.0]


def test_outside_a_backward_pass_a_step_applies_at_once():
    """`pending.defer` called outside autograd's backward (no graph task) applies at once."""
    from sharded_embedding import pending
    from sharded_embedding.optimizers import build_fused_optimizer

    weight = torch.zeros(4, 2)
    opt = build_fused_optimizer({"name": "sgd", "lr": 1.0}, weight)
    pending.defer(opt, weight, [(torch.tensor([1, 1]), torch.ones(2, 2))])
    assert torch.equal(weight[1], torch.tensor([2.0, 2.0])) and int(opt.step) == 1


def _reentrant_checkpointing(layout: str):
    """checkpoint(..., use_reentrant=True) runs a nested backward pass for its segment: the
    segment's lookups stepped when it ended, and the outer pass stepped the table again (two
    Adagrad steps per backward). The nested pass now steps with the outer one, whatever the
    order in which their lookups' backward passes run."""
    rank, world = rank_world()
    fused = {"name": "adagrad", "lr": 0.1}
    emb = ShardedEmbedding(N, DIM, page_size=8, fused_optimizer=fused)
    oracle = Oracle(N, DIM, fused=fused)
    x = torch.zeros(1, requires_grad=True)  # a reentrant segment needs an input that requires grad

    def loss_of(lookup, ids, recompute):
        segment = lambda i, x: lookup(i).pow(2).sum() + x  # noqa: E731
        if layout == "segment_first":
            return recompute(segment, ids[0], x).sum() + (lookup(ids[1]) * 1.5).sum()
        if layout == "segment_last":
            return (lookup(ids[1]) * 1.5).sum() + recompute(segment, ids[0], x).sum()
        return recompute(segment, ids[0], x).sum() + recompute(segment, ids[1], x).sum()  # two segments

    for step in range(3):
        ids = [[make_ids(N, r, 10 * step + k, 9, skew="zipf") for k in range(2)] for r in range(world)]
        loss_of(emb, ids[rank], lambda f, *a: activation_checkpoint.checkpoint(f, *a, use_reentrant=True)).backward()
        sum(loss_of(oracle.emb, i, lambda f, *a: f(*a)) for i in ids).backward()
        oracle.opt.step()
        oracle.opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(emb.full_table(), oracle.table, rtol=1e-5, atol=1e-6)
    assert int(emb.optimizer.step) == 3


@pytest.mark.parametrize("layout", ["segment_first", "segment_last", "two_segments"])
def test_reentrant_activation_checkpointing_steps_with_the_outer_pass(layout):
    run_ranks(2, _reentrant_checkpointing, layout)


def _lr_set_between_lookup_and_backward():
    """The ranks agree on the hyperparameters at the lookup; an lr set on one rank between the
    lookup and its backward was used by that rank's step alone (mirrored replicas diverged).
    The step uses the agreed values; the new one applies from the next lookup (which refuses
    while the ranks differ)."""
    rank, world = rank_world()
    fused = {"name": "adagrad", "lr": 0.1}
    emb = ShardedEmbedding(N, DIM, page_size=8, placement=[(0, 1), 0, 1, (1, 0), 0], fused_optimizer=fused)
    oracle = Oracle(N, DIM, fused=fused)
    ids = [make_ids(N, r, 0, 12) for r in range(world)]
    out = emb(ids[rank])
    if rank == 1:
        emb.optimizer.lr = 0.5
    out.sum().backward()
    sum(oracle.emb(i).sum() for i in ids).backward()
    oracle.opt.step()
    torch.testing.assert_close(emb.full_table(), oracle.table, rtol=1e-5, atol=1e-6)
    assert emb.optimizer.lr == (0.5 if rank == 1 else 0.1)
    with pytest.raises(RuntimeError, match="hyperparameters differ between ranks"):
        emb(ids[rank])
    return True


def test_a_learning_rate_set_between_a_lookup_and_its_backward_applies_from_the_next_lookup():
    assert run_ranks(2, _lr_set_between_lookup_and_backward) == [True, True]
