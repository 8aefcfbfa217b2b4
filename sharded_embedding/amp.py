"""Mixed precision and non-finite gradients: a table's backward under ``torch.amp.GradScaler``.

A ``GradScaler`` multiplies the loss by its scale ``S`` before ``backward()``; ``scaler.step(opt)``
then divides the gradients of ``opt``'s parameters by ``S`` and skips ``opt.step()`` if any of
them is inf or NaN; ``scaler.update()`` lowers ``S`` after such a step. A table with a
fused optimizer updates its rows inside the backward, before any ``scaler.step``, and its
gradient is spread over the ranks, so it must do these three things itself, on every rank
alike. `use_grad_scaler` tells it which scaler to answer to:

- the fused update uses ``gradient / S`` (``S`` read from the scaler when the backward runs,
  the value ``scaler.scale(loss)`` used; ``1/S`` rounded to float32 as GradScaler does);
- if any rank's gradient rows hold inf or NaN, no rank updates any row and the scaler learns
  of it (through ``scaler.unscale_`` of a one-element probe optimizer, so ``scaler.update()``
  lowers the scale on every rank alike);
- a table without a fused optimizer leaves unscaling to ``scaler.step(table_optimizer)``;
  if another rank's gradient rows overflowed, its gradient here is set to NaN, so the scaler
  skips the table's step on every rank, as it would skip ``nn.Embedding``'s whole table.

Without a scaler, a non-finite gradient row is never applied either: every rank raises
`NonFiniteGradientError` in that backward, before any row changes.

The check: each rank looks at the gradient rows it computed (on the CPU one sum, and one
``aminmax`` pass only where the sum is not finite; see `nonfinite_flag`), also catching values that rounding to ``comm_dtype`` would carry past the dtype's largest, see
`wire.finite_limit`), and each rank's flag travels with its gradient rows in the gradient
exchange (`transport.Transport.all_to_all`'s ``flag``), so every rank knows every rank's flag
before any row changes, at no extra collective. What it does not see: finite rows from several ranks, or from several lookups of one
backward pass, whose sum overflows float32 at the owner (|g| near 1.7e38), which nn.Embedding
would see as inf.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["use_grad_scaler", "NonFiniteGradientError", "ScalerLink", "nonfinite_flag"]


class NonFiniteGradientError(FloatingPointError):
    """A table's gradient held inf or NaN and no GradScaler was there to skip the step.
    Raised on every rank of the table's group in the same backward; no row was changed."""


class ScalerLink:
    """The GradScaler a table's backward answers to (or ``None``: the loss is not scaled)."""

    def __init__(self, scaler, device: torch.device):
        if scaler is not None and not all(hasattr(scaler, m) for m in ("get_scale", "unscale_", "is_enabled")):
            raise TypeError(f"use_grad_scaler expects a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.scaler = scaler
        self._device = device
        self._probes = {}  # one-element probe optimizers: "inf" and "finite"

    @property
    def active(self) -> bool:
        """A scaler is attached and enabled: it scales the loss and can skip steps."""
        return self.scaler is not None and self.scaler.is_enabled()

    def inv_scale(self) -> float:
        """``1 / S`` in float32, as ``GradScaler.unscale_`` computes it (1.0 without a scaler)."""
        if not self.active:
            return 1.0
        return float(torch.tensor(1.0 / self.scaler.get_scale(), dtype=torch.float32))

    def record_overflow(self) -> None:
        """Make ``scaler.update()`` see an inf/NaN this iteration (lower the scale), as if an
        optimizer's gradients had overflowed. Uses only the scaler's public ``unscale_``."""
        self._record("inf")

    def record_step(self) -> None:
        """Make ``scaler.update()`` see a finite step this iteration, as ``scaler.step`` of an
        optimizer would: a model whose only trainable part is a fused table has no optimizer
        to hand ``scaler.step``, and ``update()`` asserts that some inf check was recorded. (A
        finite record beside an overflow record still lowers the scale: update() adds them.)"""
        self._record("finite")

    def _record(self, kind: str) -> None:
        if not self.active:
            return
        if kind not in self._probes:
            self._probes[kind] = torch.optim.SGD([nn.Parameter(torch.zeros(1, device=self._device))], lr=0.0)
        probe = self._probes[kind]
        param = probe.param_groups[0]["params"][0]
        param.grad = torch.full_like(param, float("inf") if kind == "inf" else 0.0)
        try:
            self.scaler.unscale_(probe)
        except RuntimeError as e:  # already recorded since the last update(): nothing to add
            if "already been called" not in str(e):
                raise


def use_grad_scaler(module: nn.Module, scaler) -> list[str]:
    """Tell every `ShardedEmbedding` in ``module`` which ``torch.amp.GradScaler`` scales the loss
    (``None``: no scaler). Call it once, before training, on every rank, with the scaler you
    step the other optimizers with. Returns the names of the tables it reached.

    Needed for a table with a fused optimizer trained under ``torch.autocast`` (it refuses to
    train there until told), and for any table whose gradient may overflow under a scaler:
    see this module's docstring for what the table then does.
    """
    from .embedding import ShardedEmbedding

    names = []
    for name, sub in module.named_modules():
        if isinstance(sub, ShardedEmbedding):
            sub.use_grad_scaler(scaler)
            names.append(name)
    return names


def nonfinite_flag(rows: torch.Tensor, num_wire: int, wire_limit: float | None) -> torch.Tensor:
    """Whether the gradient rows a requester computed hold inf or NaN, or, among its first
    ``num_wire`` rows (those that travel), a magnitude of at least ``wire_limit``, which would
    arrive as inf after rounding to ``comm_dtype`` (`wire.finite_limit`). A 0-dim bool tensor
    on ``rows``' device.

    The exact check is one ``aminmax`` pass (NaN propagates into both ends, an inf shows in
    one, and the largest magnitude is one of the ends), with no host sync. On the CPU a
    cheaper test goes first and the exact check runs only where it fails: the sum of a part
    is finite only if every value is (an inf or NaN makes the sum inf or NaN), and a computed
    sum of magnitudes is at least the largest of them (rounding is monotone), so a sum of
    magnitudes below ``wire_limit`` clears the limit too. A finite part whose sum overflows
    just takes the exact path."""
    flag = torch.zeros((), dtype=torch.bool, device=rows.device)
    parts = [(rows[:num_wire], wire_limit), (rows[num_wire:], None)] if wire_limit is not None else [(rows, None)]
    for part, limit in parts:
        if not part.numel() or (rows.device.type == "cpu" and _surely_finite(part, limit)):
            continue
        ends = torch.stack(torch.aminmax(part))
        bad = ~torch.isfinite(ends).all()
        flag |= bad if limit is None else bad | (ends.abs() >= limit).any()
    return flag


def _surely_finite(part: torch.Tensor, limit: float | None) -> bool:
    """The sum test of `nonfinite_flag` (True: every value is finite and, with ``limit``, of a
    smaller magnitude; False: take the exact check). Half-precision sums accumulate in float32."""
    acc = torch.float32 if part.element_size() < 4 else None
    if limit is None:  # (a Python float: torch.isfinite on a 0-dim tensor costs more than the sum)
        return math.isfinite(part.sum(dtype=acc).item())
    return torch.linalg.vector_norm(part, 1, dtype=acc).item() < limit


def nonfinite_message(ranks: list[int], what: str = "ShardedEmbedding: the gradient of the table") -> str:
    return (
        f"{what} holds inf or NaN (from the lookups of rank(s) {ranks}); "
        "no rank updated any row. The loss or its gradient overflowed: lower the learning rate, "
        "or look for inf/NaN in the loss. Under torch.autocast with a torch.amp.GradScaler, attach the "
        "scaler so that overflowing steps are skipped on every rank, as scaler.step skips them: "
        "sharded_embedding.use_grad_scaler(model, scaler)"
    )
