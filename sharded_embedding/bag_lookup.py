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
                 fused optimizer or the storage's gradient. Fused SGD without mirrored pages
                 skips the sums: its step adds each id's gradient to its row in one compiled
                 pass (`native.bag_scatter_add`), as FBGEMM's fused SGD does for TorchRec.

Vectors of tables of different widths share one buffer of rows of ``unit`` elements, the
greatest common divisor of the widths: a table's block of ``n`` rows of width ``d`` is ``n *
d / unit`` buffer rows, so the all-to-all splits stay row counts. Peer ``q``'s part of a buffer
is its tables' blocks one after another, in table order. A ``comm_dtype`` of narrower range
(float16 for float32 tables) scales each buffer row by its own power of two (`wire`): one
more value per ``unit`` values on the wire.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

try:  # optional: a faster sort on the CPU (`_group_by_row`)
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with nearly every torch install
    _np = None

from . import native
from .amp import nonfinite_flag
from .bag_routing import ON_OWNER_WEIGHTED, ON_REQUESTER, BagRouting, TableRequest, TableServe, decode, flat_nonzero
from .lookup import Exchange, gradient_scales, once_differentiable, record_fused_steps, skip_nonfinite_step, update_rows
from .wire import finite_limit

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
        send_layout = _layout([routing.rows_to(r) for r in range(world)], dims, unit, rank)
        recv_layout = _layout([routing.rows_from(q) for q in range(world)], dims, unit, rank)
        send = wire.send_rows("bag_send", send_layout.total, unit, dtype, device)
        recv = ws.get("bag_recv", recv_layout.total, unit, dtype, device)
        for r, t, n, at in send_layout.blocks():  # owners: what each peer asked for, table after table
            _answer(storages[t], routing.serves[t], r, _rows(send, at, n, dims[t], unit))
        wait = wire.all_to_all(recv, send, recv_layout.per_peer, send_layout.per_peer, tag="vectors",
                                call=routing.call)  # vectors
        own = []
        for t, req in enumerate(routing.requests):  # own requests while they travel
            n, total = req.back[rank], sum(req.back)
            if req.mode == ON_REQUESTER:  # the tail of [peers' rows | own rows]
                buf = ws.get(f"bag_answers{t}", total, dims[t], dtype, device)[total - n :]
                if n:
                    _answer(storages[t], routing.serves[t], rank, buf)
            elif n:  # own partial sums, kept as embedding_bag made them
                buf = _answer(storages[t], routing.serves[t], rank)
            else:
                buf = torch.empty(0, dims[t], dtype=dtype, device=device)
            own.append(buf)
        wait()
        outputs = []
        for t, req in enumerate(routing.requests):
            from_peers = [(q, _rows(recv, at, n, dims[t], unit)) for q, tt, n, at in recv_layout.blocks() if tt == t]
            outputs.append(_pool(req, from_peers, own[t], rank, ws, t))
        row_bytes = wire.row_bytes(unit, dtype)  # a float16 wire's scale column included
        stats.record_vectors(routing, send_layout.total * row_bytes, recv_layout.total * row_bytes)
        ctx.routing, ctx.wire, ctx.exchanges, ctx.stats = routing, wire, exchanges, stats
        ctx.storages = storages
        return tuple(outputs)

    @staticmethod
    @once_differentiable("ShardedEmbeddingBagCollection")
    def backward(ctx, *grads):
        routing: BagRouting = ctx.routing
        wire: Exchange = ctx.wire
        world, rank, ws = wire.world, wire.rank, wire.workspace
        storages, exchanges = ctx.storages, ctx.exchanges
        live = [t for t, g in enumerate(routing.grad_tables) if g]
        dims = [s.shape[1] for s in storages]
        unit, dtype, device = math.gcd(*dims), grads[live[0]].dtype, grads[live[0]].device
        scales = {t: gradient_scales(exchanges[t]) for t in live}
        only = [[(routing.requests[t].back[q] if t in live else 0) for t in range(len(dims))] for q in range(world)]
        served = [[(routing.serves[t].back[r] if t in live else 0) for t in range(len(dims))] for r in range(world)]
        send_layout = _layout(only, dims, unit, rank)
        recv_layout = _layout(served, dims, unit, rank)
        send = wire.send_rows("bag_grad_send", send_layout.total, unit, dtype, device)
        recv = ws.get("bag_grad_recv", recv_layout.total, unit, dtype, device)
        # Requesters: the gradient of every row the owners sent, peers' parts straight into the
        # send buffer; own parts kept here.
        own = {t: _requester_grad(routing.requests[t], grads[t], scales[t][0], send, send_layout, dims[t], unit, t,
                                  rank) for t in live}
        # Every rank learns, with the gradients, whether any rank computed an inf/NaN row.
        # (A finite value that rounding to comm_dtype would carry to inf counts as inf.)
        flag = nonfinite_flag(send, send.shape[0], finite_limit(dtype, wire.comm_dtype))
        for t in live:
            flag |= nonfinite_flag(own[t], 0, None)
            if routing.requests[t].mode != ON_REQUESTER and dtype != torch.float16:  # the owners' sums of it
                flag |= _owner_sum_bound(routing.requests[t].bags, grads[t]) >= torch.finfo(dtype).max / world
        receive = wire.all_to_all(recv, send, recv_layout.per_peer, send_layout.per_peer, flag,
                                  tag="gradients", call=routing.call)  # gradients + flags
        row_bytes = wire.row_bytes(unit, dtype)
        ctx.stats.record_gradients(send_layout.total * row_bytes, recv_layout.total * row_bytes)
        bad = receive()
        # (one flag per rank covers every table: the message cannot name the table)
        if bad and skip_nonfinite_step([exchanges[t] for t in live], bad,
                                       "ShardedEmbeddingBagCollection: the gradient of one or more of its tables"):
            return (None,) * (4 + len(storages))  # skipped everywhere, like scaler.step skips it
        if not bad:
            record_fused_steps([exchanges[t] for t in live])
        blocks = {t: [None] * world for t in live}
        for t in live:
            blocks[t][rank] = own[t]
        for r, t, n, at in recv_layout.blocks():
            blocks[t][r] = _rows(recv, at, n, dims[t], unit)
        out = [None] * len(storages)
        for t in live:
            exchange = exchanges[t]
            if bad and exchange.optimizer is not None:
                continue  # this table's fused step is skipped (the scaler skips the others')
            counted = functools.partial(ctx.stats.record_pooled_step, t)  # once the step is applied
            rows, values, pooled = _owner_rows(routing.serves[t], blocks[t], scales[t][0], dims[t], dtype, device,
                                               scatter=not bad and _scatters(exchange, storages[t]), counted=counted)
            out[t] = update_rows(exchange, storages[t], rows, values, inv_scale=scales[t][1],
                                 storage_shape=storages[t].shape, poisoned=bool(bad),
                                 lend=(ws, "bag_grad_recv"),  # values may be views of `recv`
                                 hyperparameters=(routing.hyperparameters or {}).get(t), pooled=pooled)
        return (None, None, None, None, *out)


class _Layout:
    """Where each (peer, table) block of rows sits in a flat buffer of ``unit``-wide rows:
    peer after peer (this rank's own blocks never travel: size 0), tables in order."""

    def __init__(self, rows: list[list[int]], dims: list[int], unit: int, rank: int):
        self._blocks, self.per_peer, at = [], [], 0
        for q, by_table in enumerate(rows):
            start = at
            if q != rank:
                for t, (n, d) in enumerate(zip(by_table, dims)):
                    if n:
                        self._blocks.append((q, t, n, at))
                    at += n * d // unit
            self.per_peer.append(at - start)
        self.total = at

    def blocks(self):
        """(peer, table, rows, first buffer row) of every non-empty block."""
        return self._blocks


def _layout(rows, dims, unit, rank) -> _Layout:
    return _Layout(rows, dims, unit, rank)


def _rows(buf: torch.Tensor, at: int, n: int, dim: int, unit: int) -> torch.Tensor:
    """Rows ``[at, at + n * dim / unit)`` of a flat buffer as ``[n, dim]`` (a view)."""
    return buf[at : at + n * dim // unit].view(n, dim)


def _decoded(serve: TableServe, r: int):
    """Requester ``r``'s ids pooled here: (local rows, first-of-bag flags, weights or None),
    cached for the backward."""
    if r not in serve.decoded:
        serve.decoded[r] = decode(serve.blocks[r], serve.modes[r] == ON_OWNER_WEIGHTED)
    return serve.decoded[r]


def _answer(storage: torch.Tensor, serve: TableServe, r: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Owner: requester ``r``'s rows (pooled there) or partial sums (pooled here) into ``out``
    (returned), or, pooled here and without ``out``, as a new tensor."""
    if serve.modes[r] == ON_REQUESTER:
        if out.dtype == storage.dtype:
            native.index_select(storage, serve.blocks[r], out=out)
        else:
            out.copy_(storage.index_select(0, serve.blocks[r]))
        return out
    rows, first, weights = _decoded(serve, r)
    weights = weights.to(storage.dtype) if weights is not None else None
    starts = flat_nonzero(first, rows.dtype)  # embedding_bag takes one index dtype
    sums = F.embedding_bag(rows, storage, starts, mode="sum", per_sample_weights=weights)
    return sums if out is None else out.copy_(sums)


def _pool(req: TableRequest, from_peers: list, own: torch.Tensor, rank: int, ws, t: int) -> torch.Tensor:
    """Requester: the table's output rows from what the owners sent (``from_peers``: (rank,
    [rows, dim] view) in rank order) and what this rank served itself (``own``)."""
    bags, dim = req.bags, own.shape[1]
    if req.mode != ON_REQUESTER:  # each bag: the sum of its partial sums
        out = own.new_zeros(bags.num_bags, dim)
        at = 0
        for q, n in enumerate(req.back):
            if q == rank or n == 0:
                continue
            block = next(v for p, v in from_peers if p == q)
            native.index_add_(out, req.pair_bag[at : at + n], block)
            at += n
        if own.shape[0]:
            native.index_add_(out, req.pair_bag[at:], own)
        return out
    total = sum(req.back)
    answers = ws.get(f"bag_answers{t}", total, dim, own.dtype, own.device)  # [peers' rows | own rows]
    at = 0
    for q, block in from_peers:  # the own rows are in place already
        answers[at : at + block.shape[0]] = block
        at += block.shape[0]
    if not bags.pooled:
        return native.index_select(answers, req.gather_index)
    weights = bags.weights.to(answers.dtype) if bags.weights is not None else None
    return F.embedding_bag(req.gather_index, answers, bags.offsets[:-1], mode="sum", per_sample_weights=weights)


def _requester_grad(req: TableRequest, grad: torch.Tensor, scale: float | None, send: torch.Tensor, layout: _Layout,
                    dim: int, unit: int, t: int, rank: int) -> torch.Tensor:
    """Requester: the gradient of each row the owners sent: per unique row, its bags'
    gradients summed (one embedding_bag over the dedup sort's groups, times ``scale`` if the
    table's optimizer has one), or per (bag, owner) pair, its bag's. Peers' parts go into
    ``send`` (their blocks of ``layout``); returns this rank's own part."""
    grad = grad.contiguous()
    blocks = [(q, n, at) for q, tt, n, at in layout.blocks() if tt == t]
    if req.mode != ON_REQUESTER:
        at_pair = 0
        for q, n, at in blocks:  # pairs are in rank order, own last: the blocks' order
            torch.index_select(grad, 0, req.pair_bag[at_pair : at_pair + n], out=_rows(send, at, n, dim, unit))
            at_pair += n
        return grad.index_select(0, req.pair_bag[at_pair:])
    groups, bags = req.dedup, req.bags
    inputs = bags.bag_of().index_select(0, groups.indices) if bags.pooled else groups.indices
    weights = bags.weights.index_select(0, groups.indices).to(grad.dtype) if bags.weights is not None else None
    if scale is not None:
        weights = weights * scale if weights is not None else grad.new_full((inputs.numel(),), scale)
    rows = F.embedding_bag(inputs, grad, groups.offsets, mode="sum", per_sample_weights=weights)
    at_row = 0
    for q, n, at in blocks:
        _rows(send, at, n, dim, unit).copy_(rows[at_row : at_row + n])
        at_row += n
    return rows[at_row:]


def _owner_sum_bound(bags, grad: torch.Tensor) -> torch.Tensor:
    """A bound on what this rank's bags pooled on their owners add to any one row's gradient
    there: the sum over its bags of (sum of the bag's |weights|, or its length) times the
    bag's largest gradient magnitude (float64, 0-dim). The owners sum each row's gradient from
    finite parts after the non-finite check of the gradient exchange; where every rank's bound
    is below the table dtype's largest value over the world size, no such sum can overflow
    (a weight of 1e25 times a gradient of 1e19 is finite in neither part, only in the
    product). A bound, not the sums: it is one pass over the gradient and the weights, and
    raises the non-finite flag only for gradients within a few orders of the overflow."""
    if grad.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=grad.device)
    largest = grad.detach().abs().amax(dim=1).double()
    if bags.weights is None:
        mass = (bags.offsets[1:] - bags.offsets[:-1]).double()
    else:
        ends = torch.cat([bags.weights.new_zeros(1, dtype=torch.float64), bags.weights.abs().double().cumsum(0)])
        mass = ends[bags.offsets[1:]] - ends[bags.offsets[:-1]]
    return (mass * largest).sum()


def _group_by_row(ids: list[torch.Tensor], tags: list[torch.Tensor] | None, n: int, device):
    """Sort ids (int32 local rows, from every requester) by row, each with its tag (int32,
    >= 0; its position when ``tags`` is None): returns (unique rows int64, the tags in that
    order int32, each row's first position int32). One int64 per id, row in the high word and
    tag in the low one, sorted: ties keep the tags ascending (when the tags grow along the ids,
    the stable sort's order). On the CPU with numpy: contiguous numpy passes and numpy's sort
    (SIMD sorting networks: measured 13.6 ms against torch.sort's 20.7 ms for 1M ids, one
    thread; the whole grouping 10 ms against 14 ms with torch's unique_consecutive for 700k
    ids); else torch."""
    if device.type == "cpu" and _np is not None:
        packed = _np.concatenate([i.numpy() for i in ids]).astype(_np.int64) if len(ids) > 1 else \
            ids[0].numpy().astype(_np.int64)
        packed <<= 32
        if tags is None:
            packed |= _np.arange(n, dtype=_np.int64)
        else:
            packed |= _np.concatenate([t.numpy() for t in tags]) if len(tags) > 1 else tags[0].numpy()
        packed.sort()
        rows = packed >> 32
        starts = _np.empty(n, dtype=bool)
        starts[:1] = True
        _np.not_equal(rows[1:], rows[:-1], out=starts[1:])
        starts = _np.flatnonzero(starts)
        return (torch.from_numpy(rows[starts]), torch.from_numpy(packed.astype(_np.int32)),
                torch.from_numpy(starts.astype(_np.int32)))
    packed = torch.cat(ids).long().bitwise_left_shift_(32)
    packed |= torch.cat(tags) if tags is not None else torch.arange(n, device=device)
    packed = torch.sort(packed).values
    unique, dups = torch.unique_consecutive(packed >> 32, return_counts=True)
    return unique, packed.int(), (torch.cumsum(dups, 0) - dups).int()


def _scatters(exchange: Exchange, storage: torch.Tensor) -> bool:
    """Whether the table's bags pooled here step in pooled form (`native.PooledGradient`: the
    compiled one-pass SGD update): a fused optimizer linear in the gradient (SGD), no mirrored
    pages (their replicas all-reduce per-row sums), and a storage the extension takes."""
    optimizer = exchange.optimizer
    return (optimizer is not None and optimizer.linear_scale is not None and not exchange.mirrors.active
            and native.supports(storage))


def _owner_rows(serve: TableServe, blocks: list[torch.Tensor], scale: float | None, dim: int, dtype, device,
                scatter: bool = False, counted=None):
    """Owner: (local rows, gradient rows, pooled parts) of one table from every requester's
    block. Rows pooled on the requester arrive as they are (already scaled there). The pairs
    pooled here, from every requester at once, are spread over their ids, weighted, scaled and
    summed per row: one sort of all their ids, one embedding_bag over the pairs' gradients
    (which are few: one per bag and owner), so each row comes out once, whichever requesters
    asked for it. With ``scatter`` (`_scatters`), they are not summed: each requester's pairs
    come back as a `native.PooledGradient` that the SGD step adds to the rows id by id (pooled
    parts: a list, else None; ``counted(ids)`` is called as each is applied)."""
    rows, values, pooled = [], [], [] if scatter else None
    ids, pair_of, weights, grads, at = [], [], [], [], 0
    for r, block in enumerate(blocks):
        if serve.back[r] == 0:
            continue
        if serve.modes[r] == ON_REQUESTER:
            rows.append(serve.blocks[r])
            values.append(block)
            continue
        r_ids, first, w = _decoded(serve, r)
        if scatter:
            pooled.append(native.PooledGradient(r_ids, first, w, scale, block, counted))
            continue
        ids.append(r_ids)
        pair_of.append(torch.cumsum(first, 0, dtype=torch.int32).sub_(1 - at))  # each id's pair, of all requesters
        weights.append(w)
        grads.append(block)
        at += block.shape[0]
    if ids:
        w = None
        if any(x is not None for x in weights):  # weighted requests beside unweighted ones: ones for those
            w = torch.cat([x if x is not None else torch.ones(i.numel(), device=device) for x, i in zip(weights, ids)])
        n = sum(i.numel() for i in ids)
        grads = grads[0].contiguous() if len(grads) == 1 else torch.cat(grads)
        # The ids grouped by row. The tag is the id's pair when unweighted (pairs only grow
        # along the ids, so this is the stable sort's order and no permutation is gathered),
        # else its position (the permutation, to gather weights and pairs).
        unique, tags, starts = _group_by_row(ids, pair_of if w is None else None, n, device)
        if w is not None:
            w = w.index_select(0, tags).to(dtype)
            tags = (torch.cat(pair_of) if len(pair_of) > 1 else pair_of[0]).index_select(0, tags)
        if scale is not None and w is not None:
            w = w * scale
        elif scale is not None:  # scale the pairs' gradients, fewer than the ids
            grads = grads * scale
        rows.append(unique)
        values.append(F.embedding_bag(tags, grads, starts, mode="sum", per_sample_weights=w))
    if not rows:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dim, dtype=dtype, device=device), pooled
    if len(rows) == 1:
        return rows[0], values[0], pooled
    return torch.cat(rows), torch.cat(values), pooled

