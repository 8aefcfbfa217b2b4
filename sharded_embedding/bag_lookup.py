"""The lookup of a `ShardedEmbeddingBagCollection`: every table's vectors in one all-to-all,
every table's gradients in one more.

Forward (after `bag_routing.BagRouter.route` told every rank what to serve):
    owners:      per requester and table: the rows asked for (pooled on the requester), or one
                 partial sum per (bag, owner) pair (``embedding_bag`` on the storage, pooled
                 on the owner)
    all ranks:   all-to-all(vectors)   one flat buffer for all tables
    requesters:  per table: pool the bags from the unique rows (``embedding_bag`` over them),
                 or add up each bag's partial sums

Backward (the adjoint, so every table gets the gradient of the SUM of all ranks' losses):
    requesters:  per table: each unique row's gradient summed over its bags (one
                 ``embedding_bag`` over the sort that deduplicated the ids), or each pair's
                 gradient (its bag's)
    all ranks:   all-to-all(gradients + one non-finite flag per rank)   one buffer, all tables
    owners:      per table: pairs' gradients spread over their ids and summed per row (one
                 sort, one ``embedding_bag``); then the table's `lookup.update_rows`: mirrors,
                 fused optimizer or the storage's gradient.

Vectors of tables of different widths share one buffer of rows of ``unit`` elements, the
greatest common divisor of the widths: a table's block of ``n`` rows of width ``d`` is ``n *
d / unit`` buffer rows, so the all-to-all splits stay row counts. Peer ``q``'s part of a buffer
is its tables' blocks one after another, in table order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .amp import nonfinite_flag
from .bag_routing import ON_OWNER_WEIGHTED, ON_REQUESTER, BagRouting, TableRequest, TableServe, decode
from .lookup import Exchange, gradient_scales, skip_nonfinite_step, update_rows

__all__ = ["BagLookup"]


class BagLookup(torch.autograd.Function):
    """Per table, its output rows (pooled bags, or a sequence table's rows) for this rank's
    input. Inputs: the routing, the collection's wire (`lookup.Exchange`: transport, wire
    dtype, workspace), the tables' exchanges (mirrors, optimizer, scaler), the collection's
    stats, then every table's storage."""

    @staticmethod
    def forward(ctx, routing: BagRouting, wire: Exchange, exchanges: list[Exchange], stats, *storages):
        world, rank, ws = wire.world, wire.rank, wire.workspace
        dims = [s.shape[1] for s in storages]
        unit, dtype, device = math.gcd(*dims), storages[0].dtype, storages[0].device
        rows_to = [routing.rows_to(r) for r in range(world)]
        rows_from = [routing.rows_from(q) for q in range(world)]
        send_units = [0 if r == rank else _units(rows_to[r], dims, unit) for r in range(world)]
        recv_units = [0 if q == rank else _units(rows_from[q], dims, unit) for q in range(world)]
        send = ws.get("bag_send", sum(send_units), unit, dtype, device)
        recv = ws.get("bag_recv", sum(recv_units), unit, dtype, device)
        at = 0
        for r in range(world):  # owners: what each peer asked for, table after table
            if r == rank:
                continue
            for t, (n, d) in enumerate(zip(rows_to[r], dims)):
                if n:
                    _answer(storages[t], routing.serves[t], r, send[at : at + n * d // unit].view(n, d))
                at += n * d // unit
        wait = wire.all_to_all(recv, send, recv_units, send_units)  # vectors
        answers = []
        for t, (req, d) in enumerate(zip(routing.requests, dims)):  # own requests while they travel
            total, own = sum(req.back), req.back[rank]
            buf = ws.get(f"bag_answers{t}", total, d, dtype, device)
            if own:
                _answer(storages[t], routing.serves[t], rank, buf[total - own :])
            answers.append(buf)
        wait()
        at, filled = 0, [0] * len(dims)
        for q in range(world):  # [rows from peers in rank order | own rows] per table
            if q == rank:
                continue
            for t, (n, d) in enumerate(zip(rows_from[q], dims)):
                if n:
                    answers[t][filled[t] : filled[t] + n] = recv[at : at + n * d // unit].view(n, d)
                filled[t] += n
                at += n * d // unit
        stats.record_vectors(routing, sum(send_units) * unit, sum(recv_units) * unit)
        ctx.routing, ctx.wire, ctx.exchanges, ctx.stats = routing, wire, exchanges, stats
        ctx.storages = storages
        return tuple(_pool(req, buf) for req, buf in zip(routing.requests, answers))

    @staticmethod
    def backward(ctx, *grads):
        routing: BagRouting = ctx.routing
        wire: Exchange = ctx.wire
        world, rank, ws = wire.world, wire.rank, wire.workspace
        storages, exchanges = ctx.storages, ctx.exchanges
        live = [t for t, g in enumerate(routing.grad_tables) if g]
        dims = [s.shape[1] for s in storages]
        unit, dtype, device = math.gcd(*dims), grads[live[0]].dtype, grads[live[0]].device
        scales = {t: gradient_scales(exchanges[t]) for t in live}
        # Requesters: the gradient of every row they were sent, [peers' rows | own rows] per table.
        mine = {t: _requester_grad(routing.requests[t], grads[t], scales[t][0]) for t in live}
        send_units = [0 if q == rank else _units([routing.requests[t].back[q] for t in live], [dims[t] for t in live],
                                                  unit) for q in range(world)]
        recv_units = [0 if r == rank else _units([routing.serves[t].back[r] for t in live], [dims[t] for t in live],
                                                  unit) for r in range(world)]
        send = ws.get("bag_grad_send", sum(send_units), unit, dtype, device)
        recv = ws.get("bag_grad_recv", sum(recv_units), unit, dtype, device)
        at, taken = 0, dict.fromkeys(live, 0)
        for q in range(world):
            if q == rank:
                continue
            for t in live:
                n, d = routing.requests[t].back[q], dims[t]
                if n:
                    send[at : at + n * d // unit].view(n, d).copy_(mine[t][taken[t] : taken[t] + n])
                taken[t] += n
                at += n * d // unit
        # Every rank learns, with the gradients, whether any rank computed an inf/NaN row.
        flag = nonfinite_flag(send, send.shape[0], wire.comm_dtype)
        for t in live:
            flag |= nonfinite_flag(mine[t][taken[t] :], 0, None)
        receive = wire.all_to_all(recv, send, recv_units, send_units, flag)  # gradients (+ non-finite flags)
        ctx.stats.record_gradients(sum(send_units) * unit, sum(recv_units) * unit)
        bad = receive()
        if bad and skip_nonfinite_step([exchanges[t] for t in live], bad):
            return (None,) * (4 + len(storages))  # skipped everywhere, like scaler.step skips it
        blocks = {t: [None] * world for t in live}
        at = 0
        for r in range(world):
            for t in live:
                n, d = routing.serves[t].back[r], dims[t]
                if r == rank:
                    blocks[t][r] = mine[t][taken[t] :]
                    continue
                blocks[t][r] = recv[at : at + n * d // unit].view(n, d)
                at += n * d // unit
        out = [None] * len(storages)
        for t in live:
            exchange = exchanges[t]
            if bad and exchange.optimizer is not None:
                continue  # this table's fused step is skipped (the scaler skips the others')
            rows, values = _owner_rows(routing.serves[t], blocks[t], scales[t][0])
            out[t] = update_rows(exchange, storages[t], rows, values, inv_scale=scales[t][1],
                                 storage_shape=storages[t].shape, poisoned=bool(bad))
        return (None, None, None, None, *out)


def _units(rows: list[int], dims: list[int], unit: int) -> int:
    return sum(n * d // unit for n, d in zip(rows, dims))


def _decoded(serve: TableServe, r: int):
    """Requester ``r``'s ids pooled here: (local rows, bag starts, weights or None), cached."""
    if r not in serve.decoded:
        serve.decoded[r] = decode(serve.blocks[r], serve.modes[r] == ON_OWNER_WEIGHTED)
    return serve.decoded[r]


def _answer(storage: torch.Tensor, serve: TableServe, r: int, out: torch.Tensor) -> None:
    """Owner: requester ``r``'s rows (pooled there) or partial sums (pooled here) into ``out``."""
    if serve.modes[r] == ON_REQUESTER:
        if out.dtype == storage.dtype:
            torch.index_select(storage, 0, serve.blocks[r], out=out)
        else:
            out.copy_(storage.index_select(0, serve.blocks[r]))
        return
    rows, starts, weights = _decoded(serve, r)
    weights = weights.to(storage.dtype) if weights is not None else None
    out.copy_(F.embedding_bag(rows, storage, starts, mode="sum", per_sample_weights=weights))


def _pool(req: TableRequest, answers: torch.Tensor) -> torch.Tensor:
    """Requester: the table's output rows from what the owners sent."""
    bags = req.bags
    if req.mode != ON_REQUESTER:  # each bag: the sum of its partial sums
        out = answers.new_zeros(bags.num_bags, answers.shape[1])
        return out.index_add_(0, req.pair_bag, answers)
    if not bags.pooled:
        return answers.index_select(0, req.gather_index)
    weights = bags.weights.to(answers.dtype) if bags.weights is not None else None
    return F.embedding_bag(req.gather_index, answers, bags.offsets[:-1], mode="sum", per_sample_weights=weights)


def _requester_grad(req: TableRequest, grad: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Requester: the gradient of each row the owners sent, ``[sum(back), dim]``: per unique
    row, its bags' gradients summed (one embedding_bag over the dedup sort's groups, times
    ``scale`` if the table's optimizer has one), or per (bag, owner) pair, its bag's."""
    grad = grad.contiguous()
    if req.mode != ON_REQUESTER:
        return grad.index_select(0, req.pair_bag)
    groups, bags = req.dedup, req.bags
    inputs = bags.bag_of()[groups.indices] if bags.pooled else groups.indices
    weights = bags.weights[groups.indices].to(grad.dtype) if bags.weights is not None else None
    if scale is not None:
        weights = weights * scale if weights is not None else grad.new_full((inputs.numel(),), scale)
    return F.embedding_bag(inputs, grad, groups.offsets, mode="sum", per_sample_weights=weights)


def _owner_rows(serve: TableServe, blocks: list[torch.Tensor], scale: float | None):
    """Owner: (local rows, gradient rows) of one table from every requester's block. Rows
    pooled on the requester arrive as they are (already scaled there); pairs pooled here are
    spread over their ids, weighted, scaled and summed per row (one sort, one embedding_bag)."""
    rows, values = [], []
    ids, pair_of, weights, pair_grads = [], [], [], []
    pairs_before = 0
    for r, block in enumerate(blocks):
        if serve.back[r] == 0:
            continue
        if serve.modes[r] == ON_REQUESTER:
            rows.append(serve.blocks[r])
            values.append(block)
            continue
        r_rows, starts, w = _decoded(serve, r)
        first = torch.zeros(r_rows.numel(), dtype=torch.int64, device=r_rows.device)
        first[starts] = 1
        ids.append(r_rows)
        pair_of.append(torch.cumsum(first, 0) + (pairs_before - 1))
        weights.append(w)
        pair_grads.append(block)
        pairs_before += serve.back[r]
    if ids:
        keys, perm = torch.sort(torch.cat(ids).int())  # local rows < 2^31: packing needs it
        unique, dups = torch.unique_consecutive(keys, return_counts=True)
        w = None
        if any(x is not None for x in weights):
            w = torch.cat([x if x is not None else torch.ones_like(i, dtype=torch.float32)
                           for x, i in zip(weights, ids)])[perm]
        grads = torch.cat(pair_grads) if len(pair_grads) > 1 else pair_grads[0]
        if w is not None:
            w = w.to(grads.dtype)
        if scale is not None:
            w = w * scale if w is not None else grads.new_full((perm.numel(),), scale)
        rows.append(unique.long())
        values.append(F.embedding_bag(torch.cat(pair_of)[perm], grads.contiguous(), torch.cumsum(dups, 0) - dups,
                                      mode="sum", per_sample_weights=w))
    if not rows:
        device, dim = blocks[0].device if blocks else torch.device("cpu"), blocks[0].shape[1]
        return torch.zeros(0, dtype=torch.int64, device=device), blocks[0].new_zeros(0, dim)
    return torch.cat(rows), torch.cat(values)
