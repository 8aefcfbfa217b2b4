"""Gradient clipping by the norm of the whole gradient, tables included.

``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` on one rank sees only that rank's
rows of a table, so each rank would compute a different norm (and clip by a different
factor) than ``nn.Embedding`` in the same code; with sparse gradients it fails outright.
`clip_grad_norm_` here computes the norm of the gradient of the whole model as one process
holding the whole table would: every table row once (a mirrored page counts on its primary
only), summed over the ranks with one all-reduce per process group, plus the dense
parameters, whose gradients DDP has made identical on every rank (counted once). Then every
gradient is multiplied by ``min(1, max_norm / (norm + 1e-6))``, as torch does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .distributed import agree_or_raise, collective_device
from .embedding import ShardedEmbedding

__all__ = ["clip_grad_norm_"]


def _primary_rows_grad(emb: ShardedEmbedding) -> torch.Tensor | None:
    """This rank's share of ``emb``'s gradient as a dense or values tensor: the rows of the
    pages whose primary is this rank (so that each row counts once over all ranks)."""
    grad = emb.weight.grad
    if grad is None:
        return None
    plan, ps = emb.plan, emb.page_size
    primary = torch.tensor([plan.page_owners(p)[0] == emb.rank for p in emb._local_page_ids], dtype=torch.bool)
    slot_primary = primary.to(grad.device)
    if grad.is_sparse:
        grad = grad.coalesce()
        rows = grad.indices()[0]
        return grad.values()[slot_primary[torch.div(rows, ps, rounding_mode="floor")]]
    keep = slot_primary.repeat_interleave(ps)[: grad.shape[0]]
    return grad[keep]


@torch.no_grad()
def clip_grad_norm_(module: nn.Module, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the gradients of ``module``'s parameters by the norm of the whole gradient, as
    ``torch.nn.utils.clip_grad_norm_`` would with every table held whole in one process.

    Args:
        module: the model (DDP-wrapped or not). Its dense parameters' gradients must be the
            same on every rank (DDP makes them so).
        max_norm: the largest norm allowed.
        norm_type: p of the p-norm, > 0 (``float("inf")`` for the largest absolute value).
        error_if_nonfinite: raise RuntimeError if the norm is inf or NaN (every rank alike).

    Returns the total norm (a float32 scalar tensor, the same on every rank).

    Collective over each table's process group (an agreement on the arguments, then one
    all-reduce per group; every rank must call it). Raises ValueError on every rank, before any
    gradient changes, if ``module`` holds a table with a fused optimizer: its gradient was
    applied inside the backward and cannot be clipped afterwards; if ``norm_type`` is not a
    number > 0 (torch also takes 0, a count of nonzeros, and -inf, the smallest magnitude:
    neither bounds a gradient) or ``max_norm`` not a number; or if the ranks were given
    different values (each would clip by another norm).
    """
    error = None
    try:
        norm_type, max_norm = float(norm_type), float(max_norm)
        if not norm_type > 0:
            error = f"clip_grad_norm_: norm_type must be > 0 (or inf), got {norm_type}; no gradient was changed"
    except (TypeError, ValueError):
        error = (f"clip_grad_norm_: norm_type and max_norm must be numbers, got {norm_type!r} and {max_norm!r}; "
                 "no gradient was changed")
    tables = [m for m in module.modules() if isinstance(m, ShardedEmbedding)]
    fused = [name or "(the module itself)" for name, m in module.named_modules()
             if isinstance(m, ShardedEmbedding) and m.optimizer is not None]
    if fused:
        raise ValueError(
            f"clip_grad_norm_: the tables {fused} have a fused optimizer, which applied their gradient inside "
            "the backward; it cannot be clipped afterwards (nor by torch.nn.utils.clip_grad_norm_, which does "
            "not see it). Clip only the dense part with torch.nn.utils.clip_grad_norm_, or give those tables "
            "no fused_optimizer and a torch optimizer. No gradient was changed"
        )
    groups_of_tables = {id(t.process_group): t.process_group for t in tables}
    for group in groups_of_tables.values():  # collective: a bad or different argument on one rank
        agree_or_raise(group, "clip_grad_norm_", {"norm_type": repr(norm_type), "max_norm": repr(max_norm)}, error)
    if error is not None:  # no table: nothing collective to meet in
        raise ValueError(error)
    table_params = {id(t.weight) for t in tables}
    dense = [p.grad for p in module.parameters() if id(p) not in table_params and p.grad is not None]

    def part(tensors: list[torch.Tensor]) -> torch.Tensor:
        """max |g| (inf-norm) or sum |g|^p of ``tensors``, in float64 for the sum over ranks."""
        out = torch.zeros((), dtype=torch.float64)
        for t in tensors:
            t = t.detach().to(torch.float64)
            if t.numel() == 0:
                continue
            if math.isinf(norm_type):
                out = torch.maximum(out, t.abs().max().cpu())
            else:
                out = out + t.abs().pow(norm_type).sum().cpu()
        return out

    total = part(dense)
    groups: dict[int, tuple[object, list[torch.Tensor]]] = {}
    for t in tables:
        g = _primary_rows_grad(t)
        groups.setdefault(id(t.process_group), (t.process_group, []))[1].append(g if g is not None else
                                                                                t.weight.new_empty(0))
    for group, grads in groups.values():
        share = part(grads)
        if dist.get_world_size(group) > 1:
            share = share.to(collective_device(group))
            op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
            dist.all_reduce(share, op=op, group=group)  # the tables' share of the norm, over the ranks
            share = share.cpu()
        total = torch.maximum(total, share) if math.isinf(norm_type) else total + share
    total_norm = (total if math.isinf(norm_type) else total.pow(1.0 / norm_type)).to(torch.float32)
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coef = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    for p in module.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device))
    return total_norm
