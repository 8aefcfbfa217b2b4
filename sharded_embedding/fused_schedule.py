"""`fused_optimizer(model)`: the fused optimizers of a model's tables as one
``torch.optim.Optimizer``, so that ``torch.optim.lr_scheduler`` schedules them.

A table with a ``fused_optimizer`` steps inside the backward; its hyperparameters live on
``emb.optimizer`` (``emb.optimizer.lr = x``). PyTorch's learning-rate schedulers
(``StepLR``, ``LambdaLR``, ``OneCycleLR``, ``SequentialLR``, ...) only take a
``torch.optim.Optimizer`` and work by writing ``group["lr"]`` into its ``param_groups``, the
way TorchRec's ``DistributedModelParallel.fused_optimizer`` (a ``KeyedOptimizer``) is
scheduled. `FusedOptimizers` is that optimizer: one param group per fused table, whose
hyperparameter keys are the table optimizer's own (writing ``group["lr"]`` sets
``emb.optimizer.lr``, checked there; setting ``emb.optimizer.lr`` shows in the group), and a
``step()`` that changes nothing, since the rows already stepped in the backward.

Every rank builds it and steps its scheduler the same way; a schedule stepped on some ranks
only is refused at the next lookup with gradients, on every rank (the hyperparameters' digest
travels with each lookup).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .ddp import unwrapped_path
from .embedding import ShardedEmbedding
from .optimizers import _SHOWN_IN, FusedOptimizer

__all__ = ["fused_optimizer", "FusedOptimizers"]


class _Group(dict):
    """A param group whose hyperparameter keys are a table optimizer's attributes: writing one
    sets (and checks) it there. Any other key (a scheduler's ``initial_lr``, ...) is kept as
    in any param group."""

    def __init__(self, optimizer: FusedOptimizer, name: str, params: list):
        super().__init__(params=params, name=name, **optimizer.hyperparameters())
        self._optimizer = optimizer

    def __setitem__(self, key, value):
        if key in type(self._optimizer).defaults:
            setattr(self._optimizer, key, value)  # checked there (ValueError); shows here through _SHOWN_IN
        else:
            super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]


class FusedOptimizers(torch.optim.Optimizer):
    """The fused optimizers of a model's tables as a ``torch.optim.Optimizer`` (see the
    module docstring). ``param_groups[i]``: ``{"params": [the table's local rows], "name": the
    table's module path (without DDP's or torch.compile's wrapper names, so that a state dict
    loads across wrappings; the class name for a table on its own), <its hyperparameters>}``, tables in module order. ``step()`` returns
    the closure's loss (or None) and changes nothing; ``zero_grad()`` has nothing to clear.
    ``state_dict()`` holds the hyperparameters and the scheduler's keys (the optimizer state
    of the rows is the tables' own, in their ``state_dict()``); ``load_state_dict`` sets them
    back, checked, or raises ValueError before changing anything."""

    def __init__(self, tables: list[tuple[str, nn.Module]]):
        groups = []
        for name, table in tables:
            group = _Group(table.optimizer, name, [table._storage])
            shown = _SHOWN_IN.setdefault(table.optimizer, [])
            shown[:] = [ref for ref in shown if ref() is not None]
            shown.append(weakref.ref(group))
            groups.append(group)
        self._built = False
        super().__init__(groups, {})
        self._built = True
        # The hyperparameters every table has (schedulers look here: OneCycleLR cycles
        # "betas" only if the defaults have them), with the first table's values.
        shared = set.intersection(*(set(type(g._optimizer).defaults) for g in groups))
        self.defaults = {k: groups[0][k] for k in type(groups[0]._optimizer).defaults if k in shared}

    def add_param_group(self, param_group):
        if self._built:
            raise TypeError("FusedOptimizers holds the fused tables of the model it was built from; build another "
                            "with sharded_embedding.fused_optimizer(...) for other tables")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing to do: each table stepped inside its backward. Returns ``closure()`` if given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: a fused table keeps no gradient."""

    def load_state_dict(self, state_dict) -> None:
        """Hyperparameters (and schedulers' keys) of a `state_dict` of a `FusedOptimizers`
        over the same tables. ValueError, nothing changed, if the tables differ or a value is
        not valid for its optimizer."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or state_dict.get("state"):
            raise ValueError("not a FusedOptimizers state_dict: it has no param_groups, or has optimizer state")
        names = [g.get("name") for g in groups]
        ours = [g["name"] for g in self.param_groups]
        if names != ours:
            raise ValueError(f"the state_dict's fused tables {names} are not this optimizer's {ours}")
        for group, saved in zip(self.param_groups, groups):  # check every value before setting any
            opt = group._optimizer
            for key in type(opt).defaults:
                if key in saved:
                    opt._checked(key, saved[key])
        for group, saved in zip(self.param_groups, groups):
            for key, value in saved.items():
                if key not in ("params", "name"):
                    group[key] = value


def fused_optimizer(module: nn.Module) -> FusedOptimizers:
    """The fused optimizers of every `ShardedEmbedding` in ``module`` (itself, a
    `ShardedEmbeddingBagCollection`'s tables, or a model holding them, DDP or
    ``torch.compile`` wrapped or not) as one `FusedOptimizers`, for
    ``torch.optim.lr_scheduler``::

        sched = torch.optim.lr_scheduler.LambdaLR(sharded_embedding.fused_optimizer(model), lambda s: 0.9 ** s)
        ...
        loss.backward()          # the tables step here
        sched.step()             # their next learning rate

    No communication; build it on every rank. Raises TypeError for a non-module and
    ValueError if ``module`` holds no table with a fused optimizer."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fused_optimizer expects an nn.Module holding ShardedEmbedding tables, got "
                        f"{type(module).__name__}")
    tables = [(unwrapped_path(module, path) or type(m).__name__, m) for path, m in module.named_modules()
              if isinstance(m, ShardedEmbedding) and m.optimizer is not None]
    if not tables:
        raise ValueError(f"{type(module).__name__} holds no ShardedEmbedding with a fused_optimizer: "
                         "schedule a torch optimizer's learning rate the usual way")
    return FusedOptimizers(tables)
