"""The lookup itself: vectors go from owners to requesters, gradients come back.

Forward (after `routing.route` has told every rank what to serve):
    owners:      served = weight[owner_rows[num_self:]]
    all ranks:   all-to-all(vectors)   served rows -> the ranks that asked for them
    requesters:  out = [answers from peers ; own rows][gather_index]

Backward (the adjoint of the forward, so the gradient is that of the SUM of all ranks' losses):
    requesters:  per-unique-id gradient = sum of grad_out over duplicate ids (`native.bag_sum`:
                 one compiled pass, peers' rows written straight into the outbox; else
                 embedding_bag)
    all ranks:   all-to-all(gradients + one flag per rank)  back to the ranks that served each
                 row, with whether the sender's rows hold inf/NaN (`amp`): if any rank's do,
                 no rank changes any row (an error, or a skipped step under a GradScaler)
    owners:      `MirrorSync` all-reduces the rows of mirrored pages inside their replica set;
                 then either the rows go to the fused optimizer, which updates them in place
                 when autograd completes the backward pass (`pending`; no gradient is kept),
                 or they become a sparse COO (``sparse=True``) or dense gradient.

Both directions follow one row layout so nothing is concatenated: the sums are
``[grads of rows asked of peers | grads of own rows]`` and the first part is sent as it is;
the owner's rows ``[own | from peers]`` line up with ``owner_rows`` (see `routing.Routing`).
A linear fused optimizer (SGD) takes the own part and the peers' part as they lie; otherwise
the own part is copied beside the received rows while they travel.
The all-to-alls go through the
table's `transport.Transport`: the process group's backend, or shared memory between the ranks
of one machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import native, pending, wire
from .amp import NonFiniteGradientError, ScalerLink, nonfinite_flag, nonfinite_message
from .mirrors import MirrorSync
from .optimizers import FusedOptimizer
from .rows import sum_duplicate_rows
from .routing import Routing
from .stats import ExchangeStats
from .transport import Transport, lookup_word

__all__ = ["Exchange", "ShardedLookup", "Workspace", "gradient_scales", "skip_nonfinite_step", "update_rows"]


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
        self._filled: dict[str, tuple] = {}

    def get(self, name: str, rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != dim or buf.dtype != dtype or buf.device != device:
            grow = buf.shape[0] if buf is not None and buf.shape[1] == dim and buf.dtype == dtype else 0
            with torch.inference_mode(False):
                buf = torch.empty(max(rows, grow + grow // 2, 64), dim, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:rows]

    def lend(self, name: str) -> torch.Tensor | None:
        """Hand the buffer ``name`` over to a pending step that keeps views of it (`pending`):
        `get` makes a new one until it comes back with `give_back`."""
        self._filled.pop(name, None)
        return self._buffers.pop(name, None)

    def give_back(self, name: str, buffer: torch.Tensor) -> None:
        """Take back a lent buffer (unless a new one was made meanwhile)."""
        self._buffers.setdefault(name, buffer)

    def filled(self, name: str, n: int, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``torch.full((n,), value)``, kept filled between calls (refilled when ``value``
        changes)."""
        buf = self.get(name, n, 1, dtype, device)
        whole = self._buffers[name]
        key = (value, whole.data_ptr(), whole.shape[0])
        if self._filled.get(name) != key:
            whole.fill_(value)
            self._filled[name] = key
        return buf[:, 0]


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
    caller: int = 0  # the table's (or collection's) number on the group: tags its exchanges

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   flag: torch.Tensor | None = None, tag: str | None = None, call: int = 0):
        """Start a ragged all-to-all of rows (`transport`), in ``comm_dtype`` on the wire if one
        is set (float16 for float32 rows: with a power-of-two scale per row, see `wire`), with
        this rank's ``flag`` beside them; returns a function that waits for the rows (so local
        work can overlap the transfer) and returns the ranks whose flag was set."""
        if self.world == 1:
            return lambda: [0] if flag is not None and bool(flag) else []
        if self.comm_dtype is None or self.comm_dtype == inp.dtype:
            return self.transport.all_to_all(out, inp, out_splits, in_splits, flag, tag, lookup_word(self.caller, call))
        ws, scale = self.workspace, wire.scaled(inp.dtype, self.comm_dtype)
        width = wire.wire_columns(inp.shape[1], inp.dtype, self.comm_dtype)
        send = ws.get("wire_send", inp.shape[0], width, self.comm_dtype, inp.device)
        recv = ws.get("wire_recv", out.shape[0], width, self.comm_dtype, out.device)
        if scale:
            wire.encode(inp, send)
        else:
            send.copy_(inp)
        receive = self.transport.all_to_all(recv, send, out_splits, in_splits, flag, tag, lookup_word(self.caller, call))

        def finish():
            flagged = receive()
            if scale:
                wire.decode(recv, out)
            else:
                out.copy_(recv)
            return flagged

        return finish

    def send_rows(self, name: str, rows: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
        """``[rows, width]`` of ``dtype`` to build an all-to-all's input in: the transport's send
        buffer (the shared-memory outbox: sent without a copy) when the rows travel as they
        are, else the workspace's ``name`` (a ``comm_dtype`` wire encodes them into its own
        buffer first). Valid until the next exchange."""
        if self.world > 1 and rows and (self.comm_dtype is None or self.comm_dtype == dtype):
            return self.transport.send_buffer(rows * width * dtype.itemsize, device).view(dtype).view(rows, width)
        return self.workspace.get(name, rows, width, dtype, device)

    def row_bytes(self, dim: int, dtype: torch.dtype) -> int:
        return wire.wire_columns(dim, dtype, self.comm_dtype) * (self.comm_dtype or dtype).itemsize


_TWICE = (
    "{what}: a gradient that a table's backward made cannot be differentiated again (a second-order "
    "gradient: backward or autograd.grad with create_graph=True, then a backward through the gradient it "
    "made, e.g. a penalty on the table's gradient). The backward exchanges rows between ranks outside "
    "autograd, so the result would be wrong; nn.Embedding would give it. Penalties on the dense part's "
    "gradients, and first-order gradients through the lookup, work."
)


def once_differentiable(what: str):
    """``torch.autograd.function.once_differentiable`` with a message naming ``what``: the
    backward runs under no_grad, and when its incoming gradients require grad
    (``create_graph=True``), its outputs raise this message if autograd ever differentiates
    them (otherwise a second-order gradient would silently miss every term that crosses
    ranks). Uses torch's own ``DelayedError`` node, as that decorator does."""
    from torch._C import _functions

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            live = [g for g in grads if isinstance(g, torch.Tensor) and g.requires_grad]
            if not torch.is_grad_enabled() or not live:
                return outputs
            # A zero that depends on the incoming gradients, through the error node: every
            # output adds it, so autograd cannot prune the error away when it is asked only
            # for the gradient of something upstream (autograd.grad(..., inputs=[head.weight])).
            anchor = sum(g.reshape(-1)[:1].sum() for g in live) * 0
            zero = _functions.DelayedError(_TWICE.format(what=what).encode(), 1)(anchor)

            def tied(o):
                if o is None:
                    return None
                if o.is_sparse:
                    o = o.coalesce()
                    return torch.sparse_coo_tensor(o.indices(), o.values().detach() + zero, o.shape, is_coalesced=True,
                                                   check_invariants=False)
                return o.detach() + zero

            return tuple(tied(o) for o in outputs)

        return wrapper

    return decorate


class ShardedLookup(torch.autograd.Function):
    """``out[i] = table[ids[i]]`` for this rank's ids, over the table's owners.

    Inputs: the local storage (a parameter; with a fused optimizer it requires grad only so
    that the backward, where the optimizer works, runs), the routing and the exchange.
    """

    @staticmethod
    def forward(ctx, weight, routing: Routing, exchange: Exchange):
        num_remote, num_self = routing.num_remote, routing.num_self
        dim, ws = weight.shape[1], exchange.workspace
        served = exchange.send_rows("served", routing.num_served, dim, weight.dtype, weight.device)
        native.index_select(weight, routing.owner_rows[num_self:], out=served)  # (torch.index_select, compiled)
        gathered = ws.get("gathered", routing.num_unique, dim, weight.dtype, weight.device)  # [remote | own]
        wait = exchange.all_to_all(gathered[:num_remote], served, routing.requested_counts, routing.served_counts,
                                   tag="vectors", call=routing.call)  # vectors
        native.index_select(weight, routing.owner_rows[:num_self], out=gathered[num_remote:])  # while they travel
        wait()
        ctx.routing, ctx.exchange = routing, exchange
        ctx.weight = weight if exchange.optimizer is not None else None
        ctx.storage_shape = weight.shape
        exchange.stats.record_forward(routing.gather_index.numel(), routing, exchange.row_bytes(dim, weight.dtype))
        return native.index_select(gathered, routing.gather_index)

    @staticmethod
    @once_differentiable("ShardedEmbedding")
    def backward(ctx, grad_out):
        routing: Routing = ctx.routing
        exchange: Exchange = ctx.exchange
        dim = grad_out.shape[-1]
        num_remote, num_self, num_served = routing.num_remote, routing.num_self, routing.num_served
        scale, inv_scale = gradient_scales(exchange)
        # [grads of own rows | grads received from peers], lined up with owner_rows
        owner = exchange.workspace.get("work", num_self + num_served, dim, grad_out.dtype, grad_out.device)
        # One row per unique id, [rows asked of peers | own rows]: one bag per unique id sums
        # the gradients of its duplicates. Every rank learns, with the gradients, whether any
        # rank computed an inf/NaN row: no row changes anywhere before that is known.
        grad_rows = grad_out.reshape(-1, dim)
        if _sums_in_one_pass(exchange, grad_rows, routing):  # peers' rows straight into the outbox
            send = exchange.send_rows("grad_send", num_remote, dim, grad_rows.dtype, grad_rows.device)
            bags = routing.bags
            finite = native.bag_sum(grad_rows, bags.indices, bags.offsets, 1.0 if scale is None else scale, send,
                                    owner[:num_self])
            flag, own = torch.tensor(not finite), None  # (own rows in place: owner[:num_self])
        else:
            summed = _sum_duplicates(routing, grad_rows, scale, exchange.workspace)
            flag = nonfinite_flag(summed, num_remote, wire.finite_limit(summed.dtype, exchange.comm_dtype))
            send, own = summed[:num_remote], summed[num_remote:]  # the peers' part is sent as it is
        receive = exchange.all_to_all(owner[num_self:], send, routing.served_counts, routing.requested_counts,
                                      flag, tag="gradients", call=routing.call)  # gradients (+ flags)
        exchange.stats.record_backward(routing, exchange.row_bytes(dim, grad_out.dtype))
        optimizer = exchange.optimizer
        in_parts = optimizer is not None and optimizer.linear_scale is not None and not exchange.mirrors.active
        if own is None:
            own = owner[:num_self]
        elif not in_parts:
            owner[:num_self] = own  # while the gradients travel
        bad = receive()
        if bad and skip_nonfinite_step([exchange], bad):
            return None, None, None  # the step is skipped everywhere, like scaler.step skips it
        record_fused_steps([exchange])
        lend = (exchange.workspace, "work")  # a pending step keeps views of `owner`
        if in_parts:  # a linear update takes own rows and peers' rows one after the other
            rows = routing.owner_rows
            pending.defer(optimizer, ctx.weight, [(rows[:num_self], own), (rows[num_self:], owner[num_self:])], lend,
                          routing.hyperparameters)
            return None, None, None
        grad = update_rows(exchange, ctx.weight, routing.owner_rows, owner, inv_scale=inv_scale,
                           storage_shape=ctx.storage_shape, poisoned=bool(bad), lend=lend,
                           hyperparameters=routing.hyperparameters)
        return grad, None, None


def _sums_in_one_pass(exchange: Exchange, grad_rows: torch.Tensor, routing: Routing) -> bool:
    """Whether the backward's gradient sum runs as `native.bag_sum` (the compiled loops
    `available`, float32 rows that travel as they are, CPU memory it can read)."""
    bags = routing.bags
    return (routing.num_unique > 0 and grad_rows.dtype == torch.float32 and exchange.comm_dtype in (None, torch.float32)
            and bags.indices.dtype == bags.offsets.dtype == torch.int64 and native.available()
            and native.plain_memory(grad_rows))


def _sum_duplicates(routing: Routing, grad_rows: torch.Tensor, scale: float | None, ws: Workspace) -> torch.Tensor:
    """``[num_unique, dim]``: each unique id's gradient (times ``scale``), in PyTorch: one bag
    per unique id, an embedding_bag over the output gradient rows."""
    if not routing.num_unique:
        return grad_rows.new_zeros(0, grad_rows.shape[1])
    bags = routing.bags
    weights = None if scale is None else ws.filled("scale", bags.indices.numel(), scale, grad_rows.dtype,
                                                   grad_rows.device)
    return F.embedding_bag(bags.indices, grad_rows, bags.offsets, mode="sum", per_sample_weights=weights)


def gradient_scales(exchange: Exchange) -> tuple[float | None, float]:
    """(scale, inv_scale) of a table's backward. ``scale``: for an optimizer whose update is a
    fixed multiple of the gradient (SGD: ``-lr / S``), applied while the requester sums
    duplicates, for free; else None. ``inv_scale``: ``1 / S`` of an attached GradScaler, left
    for `update_rows` to apply (1.0 when ``scale`` took it, or without a fused optimizer)."""
    optimizer, link = exchange.optimizer, exchange.scaler
    inv_scale = link.inv_scale() if link is not None and optimizer is not None else 1.0
    scale = optimizer.linear_scale if optimizer is not None else None
    if scale is not None:
        return scale * inv_scale, 1.0
    return None, inv_scale


def skip_nonfinite_step(exchanges: list[Exchange], bad: list[int], what: str | None = None) -> bool:
    """Some rank's gradient rows (``bad``: those ranks) hold inf/NaN. Without an enabled
    GradScaler on every table involved, end the backward pass with `NonFiniteGradientError`
    (`pending.fail`: every rank raises it when its pass completes, no row of any table changed)
    and return True (this backward gives no gradient). Otherwise tell each scaler (``scaler.update()``
    lowers the scale) and return whether fused updates must be skipped (always: like
    ``scaler.step``); tables without a fused optimizer then get a NaN gradient (`update_rows`
    with ``poisoned``) so that the scaler skips their optimizer's step too."""
    if any(e.scaler is None or not e.scaler.active for e in exchanges):
        pending.fail(NonFiniteGradientError(nonfinite_message(bad, what) if what else nonfinite_message(bad)))
        return True
    for e in exchanges:
        e.scaler.record_overflow()
        if e.optimizer is not None:  # the pass's whole step, other lookups' parts included
            pending.skip(e.optimizer)
    return all(e.optimizer is not None for e in exchanges)


def record_fused_steps(exchanges: list[Exchange]) -> None:
    """Tell the GradScaler of each fused table about to step that its step is finite, as
    ``scaler.step(optimizer)`` would (`amp.ScalerLink.record_step`): ``scaler.update()`` then
    works in a model with no optimizer of the user's."""
    for e in exchanges:
        if e.optimizer is not None and e.scaler is not None:
            e.scaler.record_step()


def update_rows(exchange: Exchange, weight: torch.Tensor | None, rows: torch.Tensor, values: torch.Tensor, *,
                inv_scale: float, storage_shape: torch.Size, poisoned: bool = False,
                lend: tuple | None = None, hyperparameters: dict | None = None,
                pooled: list | None = None) -> torch.Tensor | None:
    """The owner's part of a backward once the gradient rows have arrived: ``values[i]`` is
    (part of) the gradient of local row ``rows[i]`` (rows may repeat). Sums mirrored pages'
    rows over their replicas (`mirrors`), then either hands them to the fused optimizer's step
    on ``weight`` at the end of the backward pass (`pending.defer`; ``values`` already
    multiplied by its ``linear_scale`` if it has one, else by ``inv_scale`` here) and returns
    None, or returns the gradient of the local storage (sparse COO or dense; NaN where
    ``poisoned``). ``values`` may be a view of the workspace buffer ``lend`` names
    (``(workspace, name)``), which the pending step then borrows; ``hyperparameters``: those
    the ranks agreed on at the lookup, which the step uses. ``pooled``: more of the gradient as
    `native.PooledGradient` parts (already scaled), given only for a fused optimizer with a
    ``linear_scale`` and no mirrored pages (`bag_lookup`); they step with the rows."""
    rows, values, mirror_rows = exchange.mirrors.all_reduce(rows, values)
    exchange.stats.mirror_rows_reduced += mirror_rows
    if exchange.optimizer is not None:
        if inv_scale != 1.0:
            values = values * inv_scale
        pending.defer(exchange.optimizer, weight, [(rows, values), *(pooled or ())], lend, hyperparameters)
        return None
    rows, values = sum_duplicate_rows(rows, values)  # new tensors: the workspace is not kept
    if poisoned:  # another rank overflowed: make this rank's scaler skip the table's step too
        values, rows = _poisoned(values, rows, storage_shape)
    return _as_gradient(rows, values, storage_shape, exchange.sparse)


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
