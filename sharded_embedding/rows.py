"""Helpers over (rows, values) pairs: the gradient rows an owner receives."""

from __future__ import annotations

import torch

__all__ = ["sum_duplicate_rows"]


def sum_duplicate_rows(
    rows: torch.Tensor, values: torch.Tensor, sort: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ``rows`` and the sum of the ``values`` of each (a row asked by several ranks
    arrives several times). ``sort=False``: rows need not come back sorted, and when none
    repeats the inputs come back as they are (no copy)."""
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    if unique.numel() == rows.numel():
        if not sort:
            return rows, values
        order = torch.empty_like(inverse)
        order[inverse] = torch.arange(inverse.numel(), device=inverse.device)
        return unique, values[order]
    summed = values.new_zeros(unique.numel(), values.shape[1])
    summed.index_add_(0, inverse, values)
    return unique, summed
