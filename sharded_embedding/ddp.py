"""Sharded tables beside a data-parallel (DDP) dense model.

A `ShardedEmbedding`'s gradient is already complete on the ranks that own each row when
backward returns, and every rank's storage has a different shape. DDP must therefore
leave it alone: `exclude_from_ddp` tells it to, before the model is wrapped. Optimizers
for the two parts usually differ (a sparse one for the tables, any for the dense part):
`split_parameters` separates them.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .embedding import ShardedEmbedding

__all__ = ["exclude_from_ddp", "split_parameters"]


def _table_state_names(module: nn.Module) -> list[str]:
    """Names of every parameter and buffer of the ShardedEmbeddings in ``module`` (the
    storage, and a fused optimizer's state): per-rank tensors DDP must never touch."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, ShardedEmbedding):
            for n, _ in [*sub.named_parameters(), *sub.named_buffers()]:
                names.append(f"{prefix}.{n}" if prefix else n)
    return names


def exclude_from_ddp(module: nn.Module) -> list[str]:
    """Mark the storage (and fused optimizer state) of every ShardedEmbedding inside
    ``module`` as ignored by DDP: neither all-reduced nor broadcast as buffers.

    Call before ``DistributedDataParallel(module)``; returns the names ignored.
    """
    names = _table_state_names(module)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


def split_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(table parameters, dense parameters) of ``module`` (DDP-wrapped or not)."""
    tables = {id(p) for sub in module.modules() if isinstance(sub, ShardedEmbedding) for p in sub.parameters()}
    params = list(module.parameters())
    return [p for p in params if id(p) in tables], [p for p in params if id(p) not in tables]
