"""Routing: turn one rank's ids into requests to the ranks that serve them.

Every rank of the group runs `route` once per lookup call, in the same order:

1. validate and deduplicate the ids locally (sorted unique ids + inverse);
2. ``all_to_all_single`` of a ``[world, 3]`` int64 *header*: how many unique rows this rank
   asks of each peer, plus this rank's input-error code and value. Bad input on any rank
   (float ids, an id out of range) therefore reaches every rank in this one exchange, and
   all ranks raise the same error together before anything else is sent; the good path
   pays no extra collective for it;
3. ``all_to_all_single`` of the requested rows, already translated to the serving rank's
   local row numbers (the requester knows the plan), with the ragged splits from step 2.

Requests for pages this rank holds never leave it. The vectors travel in `lookup`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .placement import RoutingTable

__all__ = ["Routing", "route"]

_OK, _OUT_OF_RANGE, _NOT_INTEGER, _NOT_TENSOR = 0, 1, 2, 3
# Non-integer dtypes by code, so that every rank can name the dtype a peer passed.
_BAD_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool,
    torch.complex64, torch.complex128,
)


@dataclass
class Routing:
    """How the ids of one lookup call travel, built by `route` and used by `lookup`.

    The answers to this rank's unique ids are gathered in one buffer: first the rows asked
    of peers, in peer order (``requested_counts``), then the rows served locally
    (``self_rows``). ``gather_index[i]`` is the buffer row holding the answer for id ``i``.
    """

    shape: torch.Size
    gather_index: torch.Tensor
    requested_counts: list[int]
    served_counts: list[int]
    serve_rows: torch.Tensor
    self_rows: torch.Tensor

    @property
    def num_remote(self) -> int:
        return sum(self.requested_counts)

    @property
    def num_unique(self) -> int:
        return self.num_remote + self.self_rows.numel()


def route(
    indices,
    *,
    table: RoutingTable,
    page_size: int,
    num_embeddings: int,
    rank: int,
    world: int,
    group,
    device: torch.device,
) -> Routing:
    """Deduplicate ``indices``, tell every peer what this rank needs, and learn what it must serve.

    Collective over ``group``: two ``all_to_all_single`` calls (header, rows), or none when
    the group has a single rank. Raises TypeError/IndexError on every rank if any rank's
    input is bad.
    """
    flat, shape, code, value = _validate(indices, num_embeddings, device)
    if code == _OK:
        uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        page = torch.div(uniq, page_size, rounding_mode="floor")
        dest = table.dest_rank[page]
        rows = table.dest_offset[page] + (uniq - page * page_size)
        # Peers in rank order, this rank's own rows last (they are served locally).
        key = torch.where(dest == rank, world, dest)
        key, order = torch.sort(key, stable=True)
        counts = torch.bincount(key, minlength=world + 1)
        rows = rows[order]
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=device)
        gather_index = position[inverse]
    else:
        counts = torch.zeros(world + 1, dtype=torch.int64, device=device)
        rows = gather_index = torch.zeros(0, dtype=torch.int64, device=device)

    header = torch.empty(world, 3, dtype=torch.int64, device=device)
    header[:, 0] = counts[:world]
    header[:, 1] = code
    header[:, 2] = value
    peers = torch.empty_like(header)
    if world > 1:
        dist.all_to_all_single(peers, header, group=group)  # header: counts + input errors
    else:
        peers.copy_(header)
    host = torch.cat([counts[:world].unsqueeze(1), peers], dim=1).cpu()  # one device sync
    _raise_input_errors(host[:, 2].tolist(), host[:, 3].tolist(), num_embeddings)

    requested = host[:, 0].tolist()
    served = host[:, 1].tolist()
    num_remote = sum(requested)
    serve_rows = torch.empty(sum(served), dtype=torch.int64, device=device)
    if world > 1:
        dist.all_to_all_single(serve_rows, rows[:num_remote], served, requested, group=group)  # rows
    return Routing(
        shape=shape,
        gather_index=gather_index,
        requested_counts=requested,
        served_counts=served,
        serve_rows=serve_rows,
        self_rows=rows[num_remote:],
    )


def _validate(indices, num_embeddings: int, device: torch.device):
    """Flatten ``indices`` to int64 on ``device``; returns (flat, shape, error code, error value)."""
    if not isinstance(indices, torch.Tensor):
        try:
            indices = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError):
            return None, None, _NOT_TENSOR, 0
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        code = _BAD_DTYPES.index(indices.dtype) if indices.dtype in _BAD_DTYPES else -1
        return None, None, _NOT_INTEGER, code
    flat = indices.reshape(-1).to(device=device, dtype=torch.int64)
    if flat.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(flat)).tolist())
        if lo < 0:
            return None, None, _OUT_OF_RANGE, lo
        if hi >= num_embeddings:
            return None, None, _OUT_OF_RANGE, hi
    return flat, indices.shape, _OK, 0


def _raise_input_errors(codes: list[int], values: list[int], num_embeddings: int) -> None:
    """Raise the same error on every rank if any rank's input was bad (codes by rank)."""
    if not any(codes):
        return
    bad_type = [(r, v) for r, (c, v) in enumerate(zip(codes, values)) if c in (_NOT_INTEGER, _NOT_TENSOR)]
    if bad_type:
        parts = []
        for r, v in bad_type:
            if codes[r] == _NOT_TENSOR:
                parts.append(f"rank {r} passed something that is not a tensor of indices")
            else:
                name = str(_BAD_DTYPES[v]) if 0 <= v < len(_BAD_DTYPES) else "a non-integer dtype"
                parts.append(f"rank {r} passed indices of dtype {name}")
        raise TypeError(
            "ShardedEmbedding indices must be integers (torch.int64 or torch.int32): "
            + "; ".join(parts)
            + ". No rank looked anything up."
        )
    parts = [f"index {v} on rank {r}" for r, (c, v) in enumerate(zip(codes, values)) if c == _OUT_OF_RANGE]
    raise IndexError(
        f"index out of range for a table of {num_embeddings} rows (valid: 0..{num_embeddings - 1}): "
        + "; ".join(parts)
        + ". No rank looked anything up."
    )
