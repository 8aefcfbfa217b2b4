"""The lookup itself: vectors go from owners to requesters, gradients come back.

Forward (after `routing.route` has told every rank what to serve):
    owners:      served = weight[serve_rows]
    all ranks:   all_to_all_single(vectors)   served rows -> the ranks that asked for them
    requesters:  out = [answers from peers ; own rows][gather_index]

Backward (the adjoint of the forward, so the gradient is that of the SUM of all ranks' losses):
    requesters:  per-unique-id gradient = index_add of grad_out over duplicate ids
    all ranks:   all_to_all_single(gradients)  back to the ranks that served each row
    owners:      sum the rows asked by several ranks, then `MirrorSync` all-reduces the rows
                 of mirrored pages inside their replica set
    result:      a sparse COO gradient of the local storage (``sparse=True``) or a dense one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .mirrors import MirrorSync
from .routing import Routing

__all__ = ["Exchange", "ShardedLookup"]


@dataclass
class Exchange:
    """What the lookup needs to move rows over one process group."""

    group: object
    world: int
    mirrors: MirrorSync
    sparse: bool

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        if self.world > 1:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)


class ShardedLookup(torch.autograd.Function):
    """``out[i] = table[ids[i]]`` for this rank's ids, over the table's owners."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, routing: Routing, exchange: Exchange) -> torch.Tensor:
        num_remote = routing.num_remote
        served = weight.index_select(0, routing.serve_rows)
        gathered = weight.new_empty(routing.num_unique, weight.shape[1])
        exchange.all_to_all(gathered[:num_remote], served, routing.requested_counts, routing.served_counts)  # vectors
        torch.index_select(weight, 0, routing.self_rows, out=gathered[num_remote:])
        ctx.routing, ctx.exchange = routing, exchange
        ctx.storage_shape = weight.shape
        return gathered.index_select(0, routing.gather_index)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        routing: Routing = ctx.routing
        exchange: Exchange = ctx.exchange
        dim = grad_out.shape[-1]
        num_remote = routing.num_remote
        # Sum the gradient of duplicate ids: one row per unique id, in gathered order.
        per_unique = grad_out.new_zeros(routing.num_unique, dim)
        per_unique.index_add_(0, routing.gather_index, grad_out.reshape(-1, dim))
        from_peers = grad_out.new_empty(sum(routing.served_counts), dim)
        exchange.all_to_all(from_peers, per_unique[:num_remote], routing.served_counts, routing.requested_counts)  # gradients
        rows = torch.cat([routing.serve_rows, routing.self_rows])
        values = torch.cat([from_peers, per_unique[num_remote:]])
        rows, values = _sum_duplicate_rows(rows, values)
        rows, values = exchange.mirrors.all_reduce(rows, values)
        return _as_gradient(rows, values, ctx.storage_shape, exchange.sparse), None, None


def _sum_duplicate_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows asked by several ranks arrive several times: sum them into sorted unique rows."""
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    if unique.numel() == rows.numel():
        order = torch.empty_like(inverse)
        order[inverse] = torch.arange(inverse.numel(), device=inverse.device)
        return unique, values[order]
    summed = values.new_zeros(unique.numel(), values.shape[1])
    summed.index_add_(0, inverse, values)
    return unique, summed


def _as_gradient(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size, sparse: bool) -> torch.Tensor:
    if sparse:
        return torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False
        )
    grad = values.new_zeros(shape)
    grad.index_copy_(0, rows, values)
    return grad
