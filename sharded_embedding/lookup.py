"""The lookup itself: vectors go from owners to requesters, gradients come back.

Forward (after `routing.route` has told every rank what to serve):
    owners:      served = weight[owner_rows[num_self:]]
    all ranks:   all-to-all(vectors)   served rows -> the ranks that asked for them
    requesters:  out = [answers from peers ; own rows][gather_index]

Backward (the adjoint of the forward, so the gradient is that of the SUM of all ranks' losses):
    requesters:  per-unique-id gradient = embedding_bag sum of grad_out over duplicate ids
    all ranks:   all-to-all(gradients + one flag per rank)  back to the ranks that served each
                 row, with whether the sender's rows hold inf/NaN (`amp`): if any rank's do,
                 no rank changes any row (an error, or a skipped step under a GradScaler)
    owners:      `MirrorSync` all-reduces the rows of mirrored pages inside their replica set;
                 then either a fused optimizer updates the rows in place (no gradient is kept)
                 or the rows become a sparse COO (``sparse=True``) or dense gradient.

Both directions use one buffer layout so nothing is concatenated: the backward work buffer
is ``[grads of rows asked of peers | grads of own rows | grads from peers]``, and its last two
parts line up with ``owner_rows`` (see `routing.Routing`). The all-to-alls go through the
table's `transport.Transport`: the process group's backend, or shared memory between the ranks
of one machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import wire
from .amp import NonFiniteGradientError, ScalerLink, nonfinite_flag, nonfinite_message
from .mirrors import MirrorSync
from .optimizers import FusedOptimizer
from .rows import sum_duplicate_rows
from .routing import Routing
from .stats import ExchangeStats
from .transport import Transport

__all__ = ["Exchange", "ShardedLookup"]


class Workspace:
    """Scratch tensors reused across calls, grown as needed and never shrunk.

    Large per-step temporaries (gathered vectors, gradient rows) otherwise come back as fresh
    pages from the OS each step, and the page faults cost as much as the copies themselves.
    A buffer is only ever used within one forward or one backward, which run one at a time.
    Buffers are always normal tensors, also when a lookup under ``torch.inference_mode`` grows
    them: an inference tensor could never be written again outside inference mode.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != dim or buf.dtype != dtype or buf.device != device:
            grow = buf.shape[0] if buf is not None and buf.shape[1] == dim and buf.dtype == dtype else 0
            with torch.inference_mode(False):
                buf = torch.empty(max(rows, grow + grow // 2, 64), dim, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:rows]


@dataclass
class Exchange:
    """What the lookup needs to move and apply rows over one process group."""

    group: object
    rank: int
    world: int
    mirrors: MirrorSync
    sparse: bool
    optimizer: FusedOptimizer | None
    comm_dtype: torch.dtype | None
    stats: ExchangeStats
    transport: Transport
    scaler: ScalerLink | None = None  # set by ShardedEmbedding.use_grad_scaler
    workspace: Workspace = field(default_factory=Workspace)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   flag: torch.Tensor | None = None):
        """Start a ragged all-to-all of rows (`transport`), in ``comm_dtype`` on the wire if one
        is set (float16 for float32 rows: with a power-of-two scale per row, see `wire`), with
        this rank's ``flag`` beside them; returns a function that waits for the rows (so local
        work can overlap the transfer) and returns the ranks whose flag was set."""
        if self.world == 1:
            return lambda: [0] if flag is not None and bool(flag) else []
        if self.comm_dtype is None or self.comm_dtype == inp.dtype:
            return self.transport.all_to_all(out, inp, out_splits, in_splits, flag)
        ws, scale = self.workspace, wire.scaled(inp.dtype, self.comm_dtype)
        width = wire.wire_columns(inp.shape[1], inp.dtype, self.comm_dtype)
        send = ws.get("wire_send", inp.shape[0], width, self.comm_dtype, inp.device)
        recv = ws.get("wire_recv", out.shape[0], width, self.comm_dtype, out.device)
        if scale:
            wire.encode(inp, send)
        else:
            send.copy_(inp)
        receive = self.transport.all_to_all(recv, send, out_splits, in_splits, flag)

        def finish():
            flagged = receive()
            if scale:
                wire.decode(recv, out)
            else:
                out.copy_(recv)
            return flagged

        return finish

    def row_bytes(self, dim: int, dtype: torch.dtype) -> int:
        return wire.wire_columns(dim, dtype, self.comm_dtype) * (self.comm_dtype or dtype).itemsize


class ShardedLookup(torch.autograd.Function):
    """``out[i] = table[ids[i]]`` for this rank's ids, over the table's owners.

    Inputs: the local storage (a parameter; with a fused optimizer it requires grad only so
    that the backward, where the optimizer works, runs), the routing and the exchange.
    """

    @staticmethod
    def forward(ctx, weight, routing: Routing, exchange: Exchange):
        num_remote, num_self = routing.num_remote, routing.num_self
        dim, ws = weight.shape[1], exchange.workspace
        served = ws.get("served", routing.num_served, dim, weight.dtype, weight.device)
        torch.index_select(weight, 0, routing.owner_rows[num_self:], out=served)
        gathered = ws.get("gathered", routing.num_unique, dim, weight.dtype, weight.device)  # [remote | own]
        wait = exchange.all_to_all(gathered[:num_remote], served, routing.requested_counts, routing.served_counts)  # vectors
        torch.index_select(weight, 0, routing.owner_rows[:num_self], out=gathered[num_remote:])  # while they travel
        wait()
        ctx.routing, ctx.exchange = routing, exchange
        ctx.weight = weight if exchange.optimizer is not None else None
        ctx.storage_shape = weight.shape
        exchange.stats.record_forward(routing.gather_index.numel(), routing, exchange.row_bytes(dim, weight.dtype))
        return gathered.index_select(0, routing.gather_index)

    @staticmethod
    def backward(ctx, grad_out):
        routing: Routing = ctx.routing
        exchange: Exchange = ctx.exchange
        optimizer, mirrors = exchange.optimizer, exchange.mirrors
        dim = grad_out.shape[-1]
        num_remote, num_unique, num_served = routing.num_remote, routing.num_unique, routing.num_served
        link = exchange.scaler
        inv_scale = link.inv_scale() if link is not None and optimizer is not None else 1.0
        scale = optimizer.linear_scale if optimizer is not None else None
        if scale is not None:
            scale *= inv_scale  # SGD: -lr / S, applied while the duplicates are summed
            inv_scale = 1.0
        # [grads of rows asked of peers | grads of own rows | grads received from peers]
        work = exchange.workspace.get("work", num_unique + num_served, dim, grad_out.dtype, grad_out.device)
        if num_unique:  # one bag per unique id sums the gradients of its duplicates
            bags = routing.bags
            weights = None if scale is None else grad_out.new_full((bags.indices.numel(),), scale)
            work[:num_unique] = F.embedding_bag(
                bags.indices, grad_out.reshape(-1, dim), bags.offsets, mode="sum", per_sample_weights=weights
            )
        # Every rank learns, with the gradients, whether any rank computed an inf/NaN row: no
        # row changes anywhere before that is known.
        flag = nonfinite_flag(work[:num_unique], num_remote, wire.finite_limit(work.dtype, exchange.comm_dtype))
        receive = exchange.all_to_all(work[num_unique:], work[:num_remote], routing.served_counts,
                                      routing.requested_counts, flag)  # gradients (+ non-finite flags)
        exchange.stats.record_backward(routing, exchange.row_bytes(dim, grad_out.dtype))
        bad = receive()
        if bad:
            if link is None or not link.active:
                raise NonFiniteGradientError(nonfinite_message(bad))
            link.record_overflow()  # scaler.update() lowers the scale on every rank
            if optimizer is not None:
                return None, None, None  # the step is skipped everywhere, like scaler.step skips it
        rows, values = routing.owner_rows, work[num_remote:]
        rows, values, mirror_rows = mirrors.all_reduce(rows, values)
        exchange.stats.mirror_rows_reduced += mirror_rows
        if optimizer is not None:
            if inv_scale != 1.0:
                values = values * inv_scale
            optimizer.apply(ctx.weight, rows, values)
            return None, None, None
        rows, values = sum_duplicate_rows(rows, values)  # new tensors: the workspace is not kept
        if bad:  # another rank overflowed: make this rank's scaler skip the table's step too
            values, rows = _poisoned(values, rows, ctx.storage_shape)
        return _as_gradient(rows, values, ctx.storage_shape, exchange.sparse), None, None


def _poisoned(values: torch.Tensor, rows: torch.Tensor, shape: torch.Size):
    """NaN gradient rows (at least one, where the storage has a row), so that any GradScaler's
    check of this rank's gradient finds what another rank found."""
    if rows.numel() == 0 and shape[0] > 0:
        rows = rows.new_zeros(1)
        values = values.new_empty(1, values.shape[1])
    return values.new_full(values.shape, float("nan")), rows


def _as_gradient(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size, sparse: bool) -> torch.Tensor:
    """Unique sorted rows -> the gradient of the local storage."""
    if sparse:
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False)
    grad = values.new_zeros(shape)
    grad.index_copy_(0, rows, values)
    return grad
