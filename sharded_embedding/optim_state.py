"""A torch optimizer's state for a table, in its ``state_dict()``, sharded like the table.

A ``torch.optim`` optimizer keeps per-parameter state shaped like the parameter (Adagrad's
``sum``, Adam's ``exp_avg`` and ``exp_avg_sq``, ...). A table's parameter is one rank's
storage, so that state is this rank's rows: every rank holds a different tensor under the same
key and shape. ``torch.distributed.checkpoint`` (DCP) takes a plain tensor to be replicated and
keeps one copy, so after a load every rank would resume with one rank's state.

`shard_optimizer_state(optimizer)` hooks the optimizer (``register_state_dict_post_hook``,
``register_load_state_dict_pre_hook``) so that:

- ``optimizer.state_dict()`` gives the per-row state of every table parameter as the table
  gives its rows (`checkpoint.sharded_rows`): a ShardedTensor of the global shape
  ``[num_embeddings, ...]`` whose shards are this rank's primary pages (views, no copy).
  ``dcp.save`` writes each row's state once; ``dcp.load`` fills, for any world size, placement
  or page size, the rows each rank holds; a per-rank ``torch.save`` pickles it as plain data.
  Scalars (``step``) stay as they are: every rank has the same.
- ``optimizer.load_state_dict(sd)`` takes that (or full ``[num_embeddings, ...]`` tensors) back
  into this rank's layout. Collective over each table's group: the ranks agree that every
  rank's state fits before any rank changes anything (or all raise the same ValueError), then
  mirrored pages' state is copied from their primary to the other replicas.

torch's ``get_state_dict`` / ``set_state_dict`` call these same methods, so they work too.

Every optimizer that steps a table's storage is hooked at its first ``step()`` (a global
optimizer step pre-hook, installed with the first table), so an optimizer that trained a table
never saves its state unsharded. An optimizer that has not stepped yet, e.g. a fresh one built
to load a checkpoint into, is hooked only by calling `shard_optimizer_state`; without it, its
unsharded state does not match the sharded checkpoint's shape and ``dcp.load`` raises (unless
the rank holds every row: its state is then the whole table's, in order, and loads right).

Per-row state is a tensor whose first dimension is the storage's rows. State of any other
shape (a per-column statistic, say) has no sharded form: ``state_dict()`` refuses it.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from itertools import chain

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .checkpoint import loaded_rows_copier, sharded_rows, sync_mirrors
from .distributed import check_agreement, collective_device

__all__ = ["shard_optimizer_state", "register_table"]

_TABLES: weakref.WeakSet = weakref.WeakSet()  # every live ShardedEmbedding in this process
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its hook handles
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> params seen at a step
_STEP_HOOK = None


def register_table(table) -> None:
    """Called by each `ShardedEmbedding` (and each copy of one): its storage is a table's."""
    global _STEP_HOOK
    _TABLES.add(table)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_pre_hook(_hook_on_first_step)


def _tables_by_storage() -> dict[int, object]:
    return {id(t._storage): t for t in list(_TABLES)}


def _table_of(param, tables: dict[int, object]):
    table = tables.get(id(param))
    return table if table is not None and table._storage is param else None


def _params(param_groups) -> list:
    return list(chain.from_iterable(g["params"] for g in param_groups))


def shard_optimizer_state(*optimizers: torch.optim.Optimizer) -> int:
    """Make each optimizer's ``state_dict()`` / ``load_state_dict()`` shard the state of its
    table parameters like the tables (see this module). Call it on every rank, once per
    optimizer (again does nothing), before saving or loading; optimizers that step a table
    are hooked at their first step anyway. Returns how many table parameters the optimizers
    hold. No communication."""
    found = 0
    tables = _tables_by_storage()
    for optimizer in optimizers:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"shard_optimizer_state expects torch.optim.Optimizer objects, got {type(optimizer).__name__}")
        found += sum(_table_of(p, tables) is not None for p in _params(optimizer.param_groups))
        if optimizer not in _HOOKED:
            _HOOKED[optimizer] = (optimizer.register_state_dict_post_hook(_shard_state),
                                  optimizer.register_load_state_dict_pre_hook(_unshard_state))
    return found


def _hook_on_first_step(optimizer, args, kwargs):
    """Global step pre-hook: hook an optimizer that holds a table's storage (checked again when
    its parameter count changes, e.g. after ``add_param_group``)."""
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    if optimizer in _HOOKED or _CHECKED.get(optimizer) == count:
        return None
    _CHECKED[optimizer] = count
    tables = _tables_by_storage()
    if any(_table_of(p, tables) is not None for p in _params(optimizer.param_groups)):
        shard_optimizer_state(optimizer)
    return None


def _state_keys(optimizer, state_dict) -> dict:
    """Key of each parameter in ``state_dict`` (an index, or a name under torch's
    ``get_state_dict``) -> the optimizer's parameter, in the order torch's load uses."""
    return dict(zip(_params(state_dict["param_groups"]), _params(optimizer.param_groups)))


def _shard_state(optimizer, state_dict):
    """state_dict post-hook: per-row state of table parameters -> sharded tensors."""
    tables = _tables_by_storage()
    state = dict(state_dict["state"])  # the values are the optimizer's own dicts: never change them
    for key, param in _state_keys(optimizer, state_dict).items():
        table = _table_of(param, tables)
        if table is None or key not in state:
            continue
        rows = table._storage.shape[0]
        shaped = {}
        for name, value in state[key].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape[0] != rows:
                    raise ValueError(
                        f"{type(optimizer).__name__} state {name!r} of a table parameter has shape "
                        f"{tuple(value.shape)}: it is not per row (this rank's storage has {rows} rows), so it "
                        "cannot be saved sharded like the table, and saved as it is it would be one rank's "
                        "copy. Use an optimizer whose state is per row (SGD, Adagrad, Adam, SparseAdam, ...) "
                        "for the table, or a fused_optimizer"
                    )
                value = sharded_rows(table, value.detach().contiguous())
            shaped[name] = value
        state[key] = shaped
    return {**state_dict, "state": state}


def _unshard_state(optimizer, state_dict):
    """load_state_dict pre-hook: the per-row state of table parameters, as `_shard_state`
    made it (filled by DCP, possibly resharded), a per-rank pickle of it, or full tensors,
    -> tensors laid out like this rank's storage. Collective per table group."""
    tables = _tables_by_storage()
    state = dict(state_dict.get("state", {}))
    for key in [k for k in state if isinstance(k, int) and str(k) in state]:
        # dcp.load puts loaded non-tensor values (SparseAdam's int ``step``) of a state dict
        # keyed by parameter index under the index as a string: take them from there.
        state[key] = {**state[key], **state.pop(str(key))}
    per_group: dict[int, tuple[object, list[str], list[str], list]] = {}
    for key, param in _state_keys(optimizer, state_dict).items():
        table = _table_of(param, tables)
        if table is None:
            continue
        _, keys, errors, done = per_group.setdefault(id(table.process_group), (table, [], [], []))
        if key not in state:
            keys.append(f"{key}:-")
            continue
        local, dtype = {}, param.dtype  # torch's load casts floating state to the parameter's dtype
        for name, value in state[key].items():
            keys.append(f"{key}:{name}")
            if isinstance(value, torch.Tensor) and value.dim() == 0 or not _per_row(value):
                local[name] = value
                continue
            tail = _tail(value)
            target = torch.empty((table._storage.shape[0], *tail), dtype=dtype, device=table.device)
            try:
                done.append((table, target, loaded_rows_copier(table, target, value, f"optimizer state {key}.{name}")))
            except ValueError as e:
                errors.append(str(e))
            local[name] = target
        state[key] = local
    for table, keys, errors, done in per_group.values():
        found, differ = check_agreement(table.process_group, ",".join(keys), "; ".join(errors) or None,
                                        collective_device(table.process_group))
        if found or differ:
            detail = "; ".join(f"rank {r}: {e}" for r, e in found) if found else (
                "ranks hold state for different parameters: " + "; ".join(f"rank {r}: [{k}]" for r, k in enumerate(differ)))
            raise ValueError(f"{type(optimizer).__name__}.load_state_dict: {detail}. No rank changed any state")
    for table, keys, errors, done in per_group.values():
        by_table: dict[int, tuple[object, list]] = {}
        for t, target, copy_in in done:
            copy_in()
            by_table.setdefault(id(t), (t, []))[1].append(target)
        for t, targets in by_table.values():
            sync_mirrors(t, targets)  # mirror sets: broadcast from each page's primary
    return {**state_dict, "state": state}


def _per_row(value) -> bool:
    return hasattr(value, "local_shards") or isinstance(value, torch.Tensor) or (
        isinstance(value, Mapping) and "row_ranges" in value)


def _tail(value) -> tuple[int, ...]:
    if isinstance(value, Mapping):
        return tuple(value["size"][1:])
    return tuple(value.size()[1:]) if hasattr(value, "local_shards") else tuple(value.shape[1:])

