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

import copy
import weakref

import torch
from torch import nn

from .ddp import unwrapped_path
from .embedding import ShardedEmbedding
from .optimizers import _SHOWN_IN, FUSED_OPTIMIZERS

__all__ = ["fused_optimizer", "FusedOptimizers"]

# Hyperparameter names of any fused or torch optimizer: a group takes only its own table's
# (group["momentum"] = 0.9 on an SGD table would do nothing, silently)
_OPTIMIZER_KEYS = frozenset(k for cls in FUSED_OPTIMIZERS.values() for k in cls.defaults) | {
    "momentum", "dampening", "nesterov", "weight_decay", "amsgrad", "maximize", "rho", "alpha", "lambd", "t0",
    "centered", "momentum_decay", "decoupled_weight_decay", "foreach", "fused", "capturable", "differentiable"}
_FIXED = ("params", "name", "fused_optimizer")  # a group's keys that say which table it is


class _Group(dict):
    """A param group whose hyperparameter keys are a table optimizer's attributes: writing one
    (``group[k] = v``, ``update``, ``|=``, ``setdefault``) sets and checks it there, and a value
    set there shows here. Removing one, or a key that is another optimizer's hyperparameter,
    is refused. Any other key (a scheduler's ``initial_lr``, ...) is kept as in any param
    group."""

    def __init__(self, table: ShardedEmbedding, name: str):
        opt = table.optimizer
        super().__init__(params=[table._storage], name=name, fused_optimizer=opt.name, **opt.hyperparameters())
        self._table, self._optimizer = table, opt
        shown = _SHOWN_IN.setdefault(opt, [])
        shown[:] = [ref for ref in shown if ref() is not None]
        shown.append(weakref.ref(self))

    def _refuse(self, key, what: str):
        opt = self._optimizer
        raise ValueError(f"param group {self['name']!r} (fused_optimizer {opt.name!r}, hyperparameters "
                         f"{sorted(opt.defaults)}): {what} {key!r}")

    def __setitem__(self, key, value):
        if key in type(self._optimizer).defaults:
            setattr(self._optimizer, key, value)  # checked there (ValueError); shows here through _SHOWN_IN
        elif key in _FIXED and key in self:
            same = (isinstance(value, (list, tuple)) and len(value) == 1 and value[0] is self["params"][0]) \
                if key == "params" else value == self[key]
            if not same:
                self._refuse(key, "cannot change")
        elif key in _OPTIMIZER_KEYS:
            self._refuse(key, "does not take")
        else:
            super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def _removable(self, key):
        if key in type(self._optimizer).defaults or key in _FIXED:
            self._refuse(key, "cannot remove")

    def __delitem__(self, key):
        self._removable(key)
        super().__delitem__(key)

    def pop(self, key, *default):
        self._removable(key)
        return super().pop(key, *default)

    def popitem(self):
        raise TypeError("a FusedOptimizers param group keeps its table's keys: popitem is refused")

    def clear(self):
        raise TypeError("a FusedOptimizers param group keeps its table's keys: clear is refused")


class _Groups(list):
    """``param_groups``: one `_Group` per table, fixed (replacing a group with a plain dict
    would cut it off from its table, in silence)."""

    @staticmethod
    def _refused(*_, **__):
        raise TypeError("FusedOptimizers.param_groups is one group per fused table and stays so: set keys of a "
                        "group (param_groups[i]['lr'] = x) instead of replacing, adding or removing groups")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = extend = insert = pop = remove = clear = sort = \
        reverse = _refused


class FusedOptimizers(torch.optim.Optimizer):
    """The fused optimizers of a model's tables as a ``torch.optim.Optimizer`` (see the
    module docstring). ``param_groups[i]``: ``{"params": [the table's local rows], "name": the
    table's module path (without DDP's or torch.compile's wrapper names, so that a state dict
    loads across wrappings; the class name for a table on its own), "fused_optimizer": its
    kind, <its hyperparameters>}``, tables in module order; the groups are fixed and write
    through (`_Group`). ``defaults``: the hyperparameters every table has (schedulers look
    there: OneCycleLR and CyclicLR cycle ``betas`` only if they are there; with other tables
    give them ``cycle_momentum=False``).

    ``step()`` changes nothing (each table stepped inside its backward) and returns the
    closure's loss or None; a ``GradScaler`` may step it (nothing to unscale). ``state``: per
    table ``{"step": the table's fused step count}``, so that torch.distributed.checkpoint's
    ``get_state_dict`` / ``set_state_dict`` find state for every parameter (and never run
    their fake first step, which would give each table a dense zero gradient).
    ``state_dict()`` holds the hyperparameters and the schedulers' keys (the rows' optimizer
    state is the tables' own, in their ``state_dict()``); ``load_state_dict`` checks every key
    and value first and raises ValueError, nothing set, if the tables or their kinds differ.
    ``copy.deepcopy`` gives one over copies of the tables (with the model in the same
    ``deepcopy``: over the copied model's); pickling is refused (save ``state_dict()``)."""

    _step_supports_amp_scaling = True  # GradScaler.step(it): nothing of it to unscale or skip

    def __init__(self, tables: list[tuple[str, ShardedEmbedding]]):
        groups = [_Group(table, name) for name, table in tables]
        self._built = False
        super().__init__(groups, {})
        self.param_groups = _Groups(self.param_groups)
        self._built = True
        for group in groups:
            self.state[group["params"][0]] = {"step": group._optimizer.step}
        shared = set.intersection(*(set(type(g._optimizer).defaults) for g in groups))
        self.defaults = {k: groups[0][k] for k in type(groups[0]._optimizer).defaults if k in shared}

    def __setattr__(self, name, value):
        if name == "param_groups" and getattr(self, "_built", False):
            _Groups._refused()
        super().__setattr__(name, value)

    def add_param_group(self, param_group):
        if self._built:
            raise TypeError("FusedOptimizers holds the fused tables of the model it was built from; build another "
                            "with sharded_embedding.fused_optimizer(...) for other tables")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None, **_):
        """Nothing to do: each table stepped inside its backward. Returns ``closure()`` if given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def load_state_dict(self, state_dict) -> None:
        """Hyperparameters (and schedulers' keys) of a `state_dict` of a `FusedOptimizers`
        over the same tables with the same kinds of optimizer: every key and value checked
        before any is set (ValueError, nothing changed). Its ``state`` (the step counts) is
        the tables' own and loads with them."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("not a FusedOptimizers state_dict: it has no list of param_groups")
        names = [g.get("name") for g in groups]
        ours = [g["name"] for g in self.param_groups]
        if names != ours:
            raise ValueError(f"the state_dict's fused tables {names} are not this optimizer's {ours}")
        for group, saved in zip(self.param_groups, groups):  # check every key and value before setting any
            opt = group._optimizer
            if saved.get("fused_optimizer") != opt.name:
                raise ValueError(f"the state_dict's table {group['name']!r} was trained by fused_optimizer "
                                 f"{saved.get('fused_optimizer')!r}, this one by {opt.name!r}")
            missing = sorted(set(opt.defaults) - set(saved))
            foreign = sorted((set(saved) & _OPTIMIZER_KEYS) - set(opt.defaults))
            if missing or foreign:
                raise ValueError(f"the state_dict's table {group['name']!r} lacks hyperparameters {missing} or has "
                                 f"others' {foreign} (fused_optimizer {opt.name!r} takes {sorted(opt.defaults)})")
            for key in opt.defaults:
                opt._checked(key, saved[key])
        for group, saved in zip(self.param_groups, groups):
            for key, value in saved.items():
                if key not in _FIXED:
                    group[key] = value

    def __deepcopy__(self, memo):
        twin = FusedOptimizers([(g["name"], copy.deepcopy(g._table, memo)) for g in self.param_groups])
        memo[id(self)] = twin
        for group, mine in zip(twin.param_groups, self.param_groups):
            for key, value in mine.items():
                if key not in _FIXED:
                    group[key] = copy.deepcopy(value, memo)
        kept = ("param_groups", "state", "defaults", "_built")
        twin.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in kept})
        return twin

    def __reduce_ex__(self, protocol):
        raise TypeError("a FusedOptimizers cannot be pickled (torch.save(opt), or a scheduler holding it): it "
                        "refers to tables spread over the ranks. Save opt.state_dict() (and the scheduler's) instead")


def fused_optimizer(module: nn.Module) -> FusedOptimizers:
    """The fused optimizers of every `ShardedEmbedding` in ``module`` (itself, a
    `ShardedEmbeddingBagCollection`'s tables, or a model holding them, DDP or
    ``torch.compile`` wrapped or not) as one `FusedOptimizers`, for
    ``torch.optim.lr_scheduler``::

        table_opt = sharded_embedding.fused_optimizer(model)
        sched = torch.optim.lr_scheduler.LambdaLR(table_opt, lambda s: 0.9 ** s)
        ...
        loss.backward()          # the tables step here
        table_opt.step()         # nothing to do, but schedulers expect it before their step
        sched.step()             # the next learning rate

    Every `FusedOptimizers` over a table shows the table's values: schedulers on two of them
    (``fused_optimizer(model)`` called twice) compound, as two schedulers on one torch optimizer
    do. No communication; build it on every rank. Raises TypeError for a
    non-module and ValueError if ``module`` holds no table with a fused optimizer."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fused_optimizer expects an nn.Module holding ShardedEmbedding tables, got "
                        f"{type(module).__name__}")
    tables = [(unwrapped_path(module, path) or type(m).__name__, m) for path, m in module.named_modules()
              if isinstance(m, ShardedEmbedding) and m.optimizer is not None]
    if not tables:
        raise ValueError(f"{type(module).__name__} holds no ShardedEmbedding with a fused_optimizer: "
                         "schedule a torch optimizer's learning rate the usual way")
    return FusedOptimizers(tables)
