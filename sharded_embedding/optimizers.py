"""Fused sparse optimizers: the update is applied inside the backward, to the touched rows only.

No gradient tensor is kept: the backward hands each owner the rows it serves and their
gradient, and the optimizer updates those rows (and their state) in place. State tensors
are buffers shaped like the rank's storage, so they live beside the pages they belong to,
mirrored pages included: replicas receive the same summed gradient rows, so their values
and state stay bitwise identical.

One step is applied per backward pass (`pending`): when autograd completes the pass, with the
summed gradient of every lookup of the table in it, as a torch optimizer's ``step()`` after
one ``backward()``.

| name              | torch counterpart              | hyperparameters (default)                          | state per rank |
|-------------------|--------------------------------|----------------------------------------------------|----------------|
| `sgd`             | `torch.optim.SGD`              | lr (0.01)                                          | none |
| `adagrad`         | `torch.optim.Adagrad`          | lr (0.01), lr_decay (0), eps (1e-10), initial_accumulator_value (0) | `sum` [rows, dim] |
| `rowwise_adagrad` | (FBGEMM EXACT_ROWWISE_ADAGRAD) | lr (0.01), eps (1e-10), initial_accumulator_value (0) | `sum` [rows]: mean of g^2 per row |
| `adam`            | `torch.optim.SparseAdam`       | lr (0.001), betas ((0.9, 0.999)), eps (1e-8)       | `exp_avg`, `exp_avg_sq` [rows, dim] |

A hyperparameter that is not a finite number >= 0 (betas: two numbers in [0, 1)) is a
ValueError naming it; so is one the optimizer does not take.
"""

from __future__ import annotations

import contextlib
import math
import weakref
import zlib
from abc import ABCMeta, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from . import native
from .rows import sum_duplicate_rows
from .storage import allocate

__all__ = ["FusedOptimizer", "build_fused_optimizer", "FUSED_OPTIMIZERS"]


# optimizer -> weak references to the param groups that show its hyperparameters
# (`fused_schedule.FusedOptimizers`); outside the module so that deepcopy / torch.save of a
# model never carries them
_SHOWN_IN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FusedOptimizer(nn.Module, metaclass=ABCMeta):
    """Base class: ``apply(weight, rows, grad)`` updates ``weight[rows]`` given their gradient.

    ``rows`` may repeat (a row asked by several ranks); optimizers whose update is not
    linear in the gradient first sum the repeats. ``step`` counts backward passes, as a
    torch optimizer counts ``step()`` calls.

    An optimizer whose update is a fixed multiple of the gradient (SGD) says so with
    ``linear_scale``: the backward then scales gradients while it sums them (for free),
    and applies the rows as they arrive, in any order and in several parts.
    """

    name = ""
    defaults: dict = {}
    linear_scale: float | None = None

    def __init__(self, weight: torch.Tensor, hparams: Mapping):
        super().__init__()
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"fused_optimizer {self.name!r} does not take {unknown}; it takes {sorted(self.defaults)}"
            )
        for key, default in self.defaults.items():
            setattr(self, key, hparams.get(key, default))  # checked by __setattr__
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=weight.device))

    def __setattr__(self, key, given):
        """Hyperparameters are checked whenever they are set (``emb.optimizer.lr = x`` in a
        schedule too): ValueError naming the bad value, the optimizer unchanged."""
        if key in type(self).defaults:
            given = self._checked(key, given)
            self.__dict__.pop("_digest", None)
            for ref in _SHOWN_IN.get(self, ()):  # param groups of `fused_schedule` show it
                group = ref()
                if group is not None:
                    dict.__setitem__(group, key, given)
        elif not key.startswith("_") and key != "training" and not hasattr(self, key):
            # emb.optimizer.momentum = 0.9 (or a typo of lr) would do nothing, silently
            raise AttributeError(f"fused_optimizer {self.name!r} has no hyperparameter {key!r}: it takes "
                                 f"{sorted(self.defaults)}")
        super().__setattr__(key, given)

    def _checked(self, key: str, given):
        if isinstance(given, bool) or (key == "betas" and isinstance(given, (tuple, list))
                                       and any(isinstance(b, bool) for b in given)):
            raise ValueError(f"fused_optimizer {self.name!r}: {key} must be a number, got {given!r}")
        try:
            value = tuple(float(b) for b in given) if key == "betas" else float(given)
        except (TypeError, ValueError):
            raise ValueError(f"fused_optimizer {self.name!r}: {key} must be a number, got {given!r}") from None
        if key == "betas":
            if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
                raise ValueError(f"fused_optimizer {self.name!r}: betas must be two numbers in [0, 1), got {value}")
        elif value < 0 or not math.isfinite(value):
            raise ValueError(f"fused_optimizer {self.name!r}: {key} must be a finite number >= 0, got {value}")
        return value

    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in self.defaults}

    @contextlib.contextmanager
    def hyperparameters_set(self, values: dict | None):
        """Within the block, the hyperparameters are ``values`` (as `hyperparameters` gave them,
        checked then; None: as they are): a pending step applies those its lookup agreed on."""
        if not values:
            yield
            return
        saved = self.hyperparameters()
        self.__dict__.update(values)  # checked when taken; the digest stays the current values'
        try:
            yield
        finally:
            self.__dict__.update(saved)

    def digest(self) -> int:
        """A 31-bit digest of the hyperparameters: every rank's lookups carry it, so that ranks
        that set them differently (a schedule stepped on some ranks only) raise together."""
        digest = self.__dict__.get("_digest")
        if digest is None:  # kept until a hyperparameter is set
            digest = self.__dict__["_digest"] = zlib.crc32(repr(sorted(self.hyperparameters().items())).encode()) \
                & 0x7FFFFFFF
        return digest

    @torch.no_grad()
    def apply(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One optimizer step on the given rows (counts a step)."""
        self.step.add_(1)  # in place: no Module.__setattr__ per step
        self.update(weight, rows, grad)

    @torch.no_grad()
    def apply_parts(self, weight: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step given the rows and their gradient in parts, ``[(rows, grad),
        ...]``: the same as `apply` of the parts concatenated, for an optimizer with a
        ``linear_scale`` only (its update of a row is a sum over the row's occurrences, and the
        parts are applied in order). A part may also be a `native.PooledGradient` (bags pooled
        on this owner), which adds its ids' rows to ``weight`` itself."""
        if self.linear_scale is None:
            raise TypeError(f"fused_optimizer {self.name!r} is not linear in the gradient: apply it in one part")
        self.step.add_(1)  # in place: no Module.__setattr__ per step
        for part in parts:
            if isinstance(part, tuple):
                self.update(weight, *part)
            else:
                part.add_to(weight)

    @torch.no_grad()
    def apply_pass(self, weight: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step from the gradient of one backward pass, in parts ``[(rows,
        grad), ...]`` (own and peers' rows, the lookups of the pass): an optimizer with a
        ``linear_scale`` applies them one after the other (`apply_parts`); any other joins
        them first, since its update of a row depends on the row's whole gradient."""
        if self.linear_scale is not None:
            self.apply_parts(weight, parts)
        elif len(parts) == 1:
            self.apply(weight, *parts[0])
        else:
            self.apply(weight, torch.cat([rows for rows, _ in parts]), torch.cat([grad for _, grad in parts]))

    @abstractmethod
    def update(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Apply ``grad`` (already multiplied by ``linear_scale`` if there is one) to ``rows``;
        does not count a step."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())


class FusedSGD(FusedOptimizer):
    """``w[r] -= lr * g[r]``; repeated rows simply add up."""

    name = "sgd"
    defaults = {"lr": 0.01}

    @property
    def linear_scale(self) -> float:
        return -self.lr

    def update(self, weight, rows, grad):
        native.index_add_(weight, rows, grad.to(weight.dtype))  # grad arrives as -lr * g


class FusedAdagrad(FusedOptimizer):
    """torch.optim.Adagrad's sparse update, on the touched rows."""

    name = "adagrad"
    defaults = {"lr": 0.01, "lr_decay": 0.0, "eps": 1e-10, "initial_accumulator_value": 0.0}

    def __init__(self, weight, hparams):
        super().__init__(weight, hparams)
        self.register_buffer("sum", allocate(weight.shape, weight.dtype, weight.device, self.initial_accumulator_value))

    def update(self, weight, rows, grad):
        rows, grad = sum_duplicate_rows(rows, grad, sort=False)
        clr = self.lr / (1 + (int(self.step) - 1) * self.lr_decay)
        acc = self.sum.index_select(0, rows).addcmul_(grad, grad)
        self.sum.index_copy_(0, rows, acc)
        native.index_add_(weight, rows, grad.div_(acc.sqrt_().add_(self.eps)).mul_(-clr).to(weight.dtype))


class FusedRowwiseAdagrad(FusedOptimizer):
    """One accumulator per row, the mean of the squared gradient row (FBGEMM's
    EXACT_ROWWISE_ADAGRAD): ``s[r] += mean(g[r]^2); w[r] -= lr * g[r] / (sqrt(s[r]) + eps)``."""

    name = "rowwise_adagrad"
    defaults = {"lr": 0.01, "eps": 1e-10, "initial_accumulator_value": 0.0}

    def __init__(self, weight, hparams):
        super().__init__(weight, hparams)
        self.register_buffer(
            "sum", allocate(weight.shape[:1], torch.float32, weight.device, self.initial_accumulator_value)
        )

    def update(self, weight, rows, grad):
        rows, grad = sum_duplicate_rows(rows, grad, sort=False)
        # (the mean square in float32 at least: half-precision rows accumulate in float32, float64 rows stay)
        norm = torch.linalg.vector_norm(grad, dim=1, dtype=torch.promote_types(grad.dtype, torch.float32))
        acc = self.sum.index_select(0, rows).add_(norm.square_().div_(grad.shape[1]))
        self.sum.index_copy_(0, rows, acc)
        scale = acc.sqrt_().add_(self.eps).reciprocal_().mul_(-self.lr)
        native.index_add_(weight, rows, grad.mul_(scale.unsqueeze(1).to(grad.dtype)).to(weight.dtype))


class FusedAdam(FusedOptimizer):
    """Lazy Adam exactly as torch.optim.SparseAdam: the moments of touched rows only are
    updated, and bias correction uses the global step (the count of backward passes)."""

    name = "adam"
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}

    def __init__(self, weight, hparams):
        super().__init__(weight, hparams)
        self.register_buffer("exp_avg", allocate(weight.shape, weight.dtype, weight.device, 0.0))
        self.register_buffer("exp_avg_sq", allocate(weight.shape, weight.dtype, weight.device, 0.0))

    def update(self, weight, rows, grad):
        rows, grad = sum_duplicate_rows(rows, grad, sort=False)
        if rows.numel() == 0:
            return
        beta1, beta2 = self.betas
        step = int(self.step)
        m = self.exp_avg.index_select(0, rows)
        v = self.exp_avg_sq.index_select(0, rows)
        m.add_(grad.sub(m).mul_(1 - beta1))
        v.add_(grad.pow(2).sub_(v).mul_(1 - beta2))
        self.exp_avg.index_copy_(0, rows, m)
        self.exp_avg_sq.index_copy_(0, rows, v)
        step_size = self.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        native.index_add_(weight, rows, m.div_(v.sqrt_().add_(self.eps)).mul_(-step_size).to(weight.dtype))


FUSED_OPTIMIZERS = {cls.name: cls for cls in (FusedSGD, FusedAdagrad, FusedRowwiseAdagrad, FusedAdam)}


def build_fused_optimizer(spec: Mapping, weight: torch.Tensor) -> FusedOptimizer:
    """``{"name": ..., hyperparameter: value, ...}`` -> the optimizer for ``weight``'s rows."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"fused_optimizer must be a dict with a 'name' among {sorted(FUSED_OPTIMIZERS)}, got {spec!r}")
    name = spec["name"]
    if name not in FUSED_OPTIMIZERS:
        raise ValueError(f"fused_optimizer name {name!r} is not one of {sorted(FUSED_OPTIMIZERS)}")
    return FUSED_OPTIMIZERS[name](weight, {k: v for k, v in spec.items() if k != "name"})
