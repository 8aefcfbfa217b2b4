"""Autocast, GradScaler and non-finite gradients, against nn.Embedding in the same code."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_embedding import NonFiniteGradientError, ShardedEmbedding, initial_rows, use_grad_scaler
from tests.harness import run_ranks
from tests.oracle import local_rows_of, make_ids, make_loss_weight, rank_world

BIG = 1e36  # times a scale of 1024: beyond float32


class TableAndHead(nn.Module):
    def __init__(self, n, dim, page_size, **table):
        super().__init__()
        self.emb = ShardedEmbedding(n, dim, page_size=page_size, **table)
        self.head = nn.Linear(dim, 1)

    def forward(self, bags):
        """(prediction, the looked-up vectors)."""
        out = self.emb(bags)
        return self.head(out.mean(1)).squeeze(1), out


def _batch(n, rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randint(0, n, (6, 3), generator=g), torch.randn(6, generator=g)


def _scaled_table_beside_a_head(fused: dict):
    """The issue's case: a fused table and a Linear head under bf16 autocast and a GradScaler
    (init_scale=1024), the head stepped by scaler.step. Step 1 overflows the whole loss on
    rank 1; step 3 overflows only the table's gradient (rank 0). The oracle: nn.Embedding with
    the matching torch optimizer and the head, both stepped by one GradScaler, on both ranks'
    losses (the table's gradient is the sum over ranks; DDP averages the head's)."""
    rank, world = rank_world()
    n, d = 32, 4
    torch.manual_seed(0)
    model = DDP(TableAndHead(n, d, 8, fused_optimizer=fused))  # no exclude_from_ddp: the table protects itself
    scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    assert use_grad_scaler(model, scaler) == ["module.emb"]
    head_opt = torch.optim.SGD(model.module.head.parameters(), lr=0.1)

    ref_table = nn.Embedding(n, d, sparse=True)
    with torch.no_grad():
        ref_table.weight.copy_(initial_rows(0, d, 0, n))
    ref_head = copy.deepcopy(model.module.head)
    spec = {k: v for k, v in fused.items() if k != "name"}
    ref_table_opt = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[fused["name"]](ref_table.parameters(), **spec)
    ref_head_opt = torch.optim.SGD(ref_head.parameters(), lr=0.1)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024)

    def ref_forward(bags):
        out = ref_table(bags)
        return ref_head(out.mean(1)).squeeze(1), out

    def loss_of(forward, r, step, bags, targets):
        pred, out = forward(bags)
        loss = F.mse_loss(pred, targets)
        if step == 1 and r == 1:
            loss = loss * BIG
        if step == 3 and r == 0:
            loss = loss + (out * BIG).sum()  # only the table's gradient overflows
        return loss

    scales = []
    for step in range(5):
        batches = [_batch(n, r, step) for r in range(world)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, rank, step, *batches[rank])  # through DDP: it averages the head's gradient
        scaler.scale(loss).backward()
        scaler.step(head_opt)
        scaler.update()
        head_opt.zero_grad()

        total = 0.0
        for r in range(world):  # one autocast region per rank, as on the ranks: autocast caches the
            with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 weight and would sum both in bf16
                total = total + loss_of(ref_forward, r, step, *batches[r])
        ref_scaler.scale(total).backward()
        for p in ref_head.parameters():
            p.grad /= world  # DDP's mean
        ref_scaler.step(ref_table_opt)
        ref_scaler.step(ref_head_opt)
        ref_scaler.update()
        ref_table_opt.zero_grad()
        ref_head_opt.zero_grad()

        assert scaler.get_scale() == ref_scaler.get_scale()
        torch.testing.assert_close(model.module.emb.full_table(), ref_table.weight.detach(), rtol=1e-5, atol=1e-6)
        for got, want in zip(model.module.head.parameters(), ref_head.parameters()):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
        scales.append(scaler.get_scale())
    assert torch.isfinite(model.module.emb.full_table()).all()
    return scales


@pytest.mark.parametrize("fused", [{"name": "sgd", "lr": 0.1}, {"name": "adagrad", "lr": 0.1}], ids=["sgd", "adagrad"])
def test_fused_table_under_grad_scaler_matches_nn_embedding(fused):
    scales = run_ranks(2, _scaled_table_beside_a_head, fused)
    assert scales[0] == scales[1] == [1024.0, 512.0, 512.0, 256.0, 256.0]  # both overflows skipped everywhere


def _sparse_table_under_grad_scaler():
    """A table without a fused optimizer, stepped by scaler.step(table_opt) on each rank. On
    step 1 only rank 1's own rows overflow: rank 0's shard of the gradient is finite, yet the
    table must skip the step on every rank, as nn.Embedding's single gradient would."""
    rank, world = rank_world()
    n, d = 32, 4
    emb = ShardedEmbedding(n, d, page_size=8)  # pages 1 and 3 (rows 8-15, 24-31) on rank 1
    scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    use_grad_scaler(emb, scaler)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    ref = nn.Embedding(n, d, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(initial_rows(0, d, 0, n))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    ids = [torch.tensor([0, 3, 17, 9]), torch.tensor([8, 12, 25, 30])]  # rank 1 asks only for its own rows
    for step in range(3):
        ws = [make_loss_weight(i, d, r, step) * (BIG if step == 1 and r == 1 else 1.0) for r, i in enumerate(ids)]
        scaler.scale((emb(ids[rank]) * ws[rank]).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ref_scaler.scale(sum((ref(i) * w).sum() for i, w in zip(ids, ws))).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad()
        assert scaler.get_scale() == ref_scaler.get_scale()
        torch.testing.assert_close(emb.weight.detach(), local_rows_of(emb, ref.weight.detach()))
    return scaler.get_scale()


def test_sparse_table_under_grad_scaler_skips_on_every_rank():
    assert run_ranks(2, _sparse_table_under_grad_scaler) == [512.0, 512.0]


def _autocast_fused_needs_a_scaler_policy():
    """A fused table trained under autocast refuses until told whether a scaler scales the
    loss: on every rank (here only rank 0 runs autocast), before any row changes."""
    rank, world = rank_world()
    n, d = 32, 4
    emb = ShardedEmbedding(n, d, page_size=8, fused_optimizer={"name": "sgd", "lr": 0.5})
    before = emb.full_table().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rank == 0):
        with pytest.raises(RuntimeError, match=r"refuses this lookup \(on ranks \[0\]\).*use_grad_scaler"):
            emb(torch.tensor([1, 9, 17]))
    assert torch.equal(emb.full_table(), before)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(emb(torch.tensor([1, 9])), before[[1, 9]])  # lookups that do not train are fine
    use_grad_scaler(emb, None)  # the loss is not scaled
    ids = [make_ids(n, r, 0, 10) for r in range(world)]
    ws = [make_loss_weight(i, d, r, 0) for r, i in enumerate(ids)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(ids[rank])
    (out * ws[rank]).sum().backward()
    want = before.clone()
    for i, w in zip(ids, ws):
        want.index_add_(0, i, w, alpha=-0.5)
    torch.testing.assert_close(emb.full_table(), want)


def test_autocast_with_a_fused_optimizer_needs_a_scaler_policy():
    run_ranks(2, _autocast_fused_needs_a_scaler_policy)


def _nonfinite_gradient_without_scaler(fused):
    """An inf/NaN in one rank's gradient: every rank raises in the backward, no row changes
    (nor the optimizer state), and the next step trains as if nothing had happened."""
    rank, world = rank_world()
    n, d = 32, 4
    emb = ShardedEmbedding(n, d, page_size=8, fused_optimizer=fused)
    opt = torch.optim.SGD(emb.parameters(), lr=0.5) if fused is None else None
    before = emb.full_table().clone()
    w = torch.ones(3, d)
    if rank == 1:
        w[1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"lookups of rank\(s\) \[1\].*use_grad_scaler"):
        (emb(torch.tensor([4, 5, 20]) if rank == 1 else torch.tensor([21])) * w[: 3 if rank == 1 else 1]).sum().backward()
    assert emb.weight.grad is None
    if opt is not None:
        opt.step()
    assert torch.equal(emb.full_table(), before)
    if fused is not None:
        assert int(emb.optimizer.step) == 0
    (emb(torch.tensor([rank, 9])) * 2.0).sum().backward()
    if opt is not None:
        opt.step()
    want = before.clone()
    for r in range(world):
        want[[r, 9]] -= 0.5 * 2.0 if fused is None or fused["name"] == "sgd" else 0.0
    if fused is None or fused["name"] == "sgd":
        torch.testing.assert_close(emb.full_table(), want)
    else:
        assert not torch.equal(emb.full_table(), before) and int(emb.optimizer.step) == 1


@pytest.mark.parametrize("fused", [None, {"name": "sgd", "lr": 0.5}, {"name": "adam", "lr": 0.5}],
                         ids=["sparse", "fused_sgd", "fused_adam"])
def test_nonfinite_gradient_raises_on_every_rank_and_changes_nothing(fused):
    run_ranks(2, _nonfinite_gradient_without_scaler, fused)


def _nonfinite_gradient_under_ddp(fused):
    """The same under DDP around the whole model (a fresh user's finding): the error was raised
    inside the backward pass, before DDP's reducer finished its reduction, and every later
    forward failed with DDP's "Expected to have finished reduction in the prior iteration". It
    is raised at the end of the pass now: the failed step changes no row, and the next steps
    train as DDP + nn.Embedding would have trained without the failed one."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = rank_world()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = ShardedEmbedding(32, 4, page_size=8, fused_optimizer=fused)
            self.head = nn.Linear(4, 1)

        def forward(self, ids):
            return self.head(self.emb(ids)).sum()

    torch.manual_seed(0)
    model = Model()
    ddp = DDP(model)
    dense = torch.optim.SGD(model.head.parameters(), lr=0.1)
    table_opt = torch.optim.SGD(model.emb.parameters(), lr=0.5) if fused is None else None
    before = model.emb.full_table().clone()
    ids = torch.tensor([rank, 9, 17])
    with pytest.raises(NonFiniteGradientError, match=r"lookups of rank\(s\) \[1\]"):
        (ddp(ids) * (float("nan") if rank == 1 else 1.0)).backward()
    assert torch.equal(model.emb.full_table(), before) and model.emb.weight.grad is None
    dense.zero_grad(set_to_none=True)
    for _ in range(2):  # DDP trains on
        ddp(ids).backward()
        dense.step()
        dense.zero_grad(set_to_none=True)
        if table_opt is not None:
            table_opt.step()
            table_opt.zero_grad(set_to_none=True)
    assert not torch.equal(model.emb.full_table(), before)
    head = [p.detach().clone() for p in model.head.parameters()]
    gathered = [torch.zeros_like(head[0]) for _ in range(world)]
    torch.distributed.all_gather(gathered, head[0])
    assert all(torch.equal(g, gathered[0]) for g in gathered)  # DDP kept the replicas equal
    return True


@pytest.mark.parametrize("fused", [None, {"name": "adam", "lr": 0.5}], ids=["sparse", "fused_adam"])
def test_nonfinite_gradient_under_ddp_leaves_ddp_able_to_train(fused):
    assert run_ranks(2, _nonfinite_gradient_under_ddp, fused) == [True, True]


def _autocast_without_fused_matches_nn_embedding():
    """bf16 autocast, no scaler, sparse gradients: outputs and updated rows as nn.Embedding's."""
    rank, world = rank_world()
    n, d = 40, 6
    torch.manual_seed(1)
    model = TableAndHead(n, d, 7)
    ref_table = nn.Embedding(n, d, sparse=True)
    with torch.no_grad():
        ref_table.weight.copy_(initial_rows(0, d, 0, n))
    ref_head = copy.deepcopy(model.head)
    opt = torch.optim.SGD(model.emb.parameters(), lr=0.2)
    ref_opt = torch.optim.SGD(ref_table.parameters(), lr=0.2)
    for step in range(3):
        batches = [_batch(n, r, step) for r in range(world)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batches[rank][0])[0]
        total = 0.0
        for b, t in batches:  # one autocast region per rank (see above)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                total = total + (ref_head(ref_table(b).mean(1)).squeeze(1) * t).sum()
        assert out.dtype == torch.bfloat16
        (out * batches[rank][1]).sum().backward()
        total.backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        torch.testing.assert_close(model.emb.full_table(), ref_table.weight.detach())


def test_autocast_sparse_table_matches_nn_embedding():
    run_ranks(2, _autocast_without_fused_matches_nn_embedding)


def _wire_rounding_past_float32(comm_dtype, weight: float, refused: bool):
    """A finite float32 gradient that rounding to comm_dtype would carry past float32's largest
    (bf16: from 3.39618e38; float16, scaled per row: from 3.40199e38) is refused on every rank
    before any row changes; just below, it arrives finite, as nn.Embedding's gradient."""
    rank, world = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=5, comm_dtype=comm_dtype)
    ids = torch.tensor([5 if rank == 0 else 0])  # a row the other rank holds: it travels
    out = emb(ids)
    if refused:
        with pytest.raises(NonFiniteGradientError):
            (out * weight).sum().backward()
        assert emb.weight.grad is None
        return
    (out * weight).sum().backward()
    grad = emb.weight.grad.to_dense()
    assert torch.isfinite(grad).all()
    want = torch.zeros(10, 3)
    want[0] = weight  # the other rank's lookup: global row 0 on rank 0, 5 on rank 1, local row 0 of each
    torch.testing.assert_close(grad, want, rtol=torch.finfo(comm_dtype).eps, atol=0)


@pytest.mark.parametrize("comm_dtype, weight, refused", [
    (torch.bfloat16, 3.3961e38, False), (torch.bfloat16, 3.3962e38, True),
    (torch.float16, 3.4019e38, False), (torch.float16, 3.4020e38, True),
])
def test_gradients_that_would_round_to_inf_on_the_wire_are_refused(comm_dtype, weight, refused):
    run_ranks(2, _wire_rounding_past_float32, comm_dtype, weight, refused)


def _nonfinite_reference(rows, num_wire, limit):
    bad = not bool(torch.isfinite(rows).all())
    if limit is not None and num_wire:
        bad |= bool((rows[:num_wire].double().abs() >= limit).any())
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nonfinite_flag_matches_an_elementwise_check(dtype):
    """The flag's sum test (CPU) falls back to the exact check whenever it cannot vouch: finite
    rows whose sum overflows are not flagged; inf, -inf with inf, NaN, and values at or past the
    wire limit (in either part, at any position) are."""
    from sharded_embedding.amp import nonfinite_flag
    from sharded_embedding.wire import finite_limit

    big = torch.finfo(dtype).max
    limit = finite_limit(dtype, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        rows = torch.randn(7, 5, generator=gen).to(dtype)
        kind = trial % 6
        at = (int(torch.randint(7, (), generator=gen)), int(torch.randint(5, (), generator=gen)))
        if kind == 1:
            rows.fill_(big)  # finite, the sum overflows
        elif kind == 2:
            rows[at] = float("inf")
        elif kind == 3:
            rows[0, 0], rows[at] = float("inf"), float("-inf")
        elif kind == 4:
            rows[at] = float("nan")
        elif kind == 5 and limit is not None:
            rows[at] = limit * (1 if trial % 4 else -1)
        num_wire = int(torch.randint(8, (), generator=gen))
        for lim in (None, limit):
            want = _nonfinite_reference(rows, num_wire if lim is not None else 0, lim)
            assert bool(nonfinite_flag(rows, num_wire, lim)) == want, (dtype, kind, num_wire, lim)


def _only_a_fused_table_under_grad_scaler():
    """A model whose only trainable part is a fused table has no optimizer to hand
    scaler.step: scaler.update() asserted ("No inf checks were recorded") after every step
    that did not overflow. Now it works, and matches nn.Embedding stepped by scaler.step
    (growth_interval=2: the scale also grows alike)."""
    rank, world = rank_world()
    n, d = 32, 4
    emb = ShardedEmbedding(n, d, page_size=8, fused_optimizer={"name": "sgd", "lr": 0.1})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024, growth_interval=2)
    use_grad_scaler(emb, scaler)
    ref = nn.Embedding(n, d, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(initial_rows(0, d, 0, n))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024, growth_interval=2)
    scales = []
    for step in range(5):
        batches = [_batch(n, r, step)[0] for r in range(world)]
        big = [BIG if (step == 1 and r == 1) else 1.0 for r in range(world)]
        scaler.scale((emb(batches[rank]) ** 2).sum() * big[rank]).backward()
        scaler.update()
        ref_scaler.scale(sum((ref(b) ** 2).sum() * k for b, k in zip(batches, big))).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad()
        assert scaler.get_scale() == ref_scaler.get_scale()
        torch.testing.assert_close(emb.full_table(), ref.weight.detach())
        scales.append(scaler.get_scale())
    return scales


def test_a_fused_table_alone_under_grad_scaler_matches_nn_embedding():
    scales = run_ranks(2, _only_a_fused_table_under_grad_scaler)
    assert scales[0] == scales[1] == [1024.0, 512.0, 512.0, 1024.0, 1024.0]
