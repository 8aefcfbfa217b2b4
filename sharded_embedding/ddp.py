"""Sharded tables beside a data-parallel (DDP) dense model.

A `ShardedEmbedding`'s gradient is already complete on the ranks that own each row when
backward returns, and every rank holds different rows. DDP must therefore leave it alone:
its start-up broadcast would copy rank 0's pages over every other rank's, and its gradient
all-reduce would average unrelated pages.

The table sees to that by itself. DDP skips the names listed in
``_ddp_params_and_buffers_to_ignore`` on the module it wraps; a table lists its storage
there, and a module registration hook (`torch.nn.modules.module.
register_module_module_registration_hook`) copies the names, prefixed, to every module a
table is placed into, at any depth, as the model is assembled. So ``DDP(model)`` ignores
every table. As a safeguard, when a DDP instance takes a model whose tables it would not
ignore (say, a table put into a sub-module after that sub-module was placed into the model),
the same hook makes ``DDP(model)`` raise before DDP broadcasts anything; `exclude_from_ddp`
then fixes it. Optimizers for the two parts usually differ (a sparse one for the tables, any
for the dense part): `split_parameters` separates them.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.nn.parallel import DistributedDataParallel

from .embedding import ShardedEmbedding

__all__ = ["exclude_from_ddp", "split_parameters", "table_parameters"]

_OURS = "_sharded_embedding_states"  # per module: names (relative to it) of the tables' states it holds


def _table_state_names(module: nn.Module) -> list[str]:
    """Names of every parameter and buffer of the ShardedEmbeddings in ``module`` (the
    storage): per-rank tensors DDP must never touch."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, ShardedEmbedding):
            for n, _ in [*sub.named_parameters(), *sub.named_buffers()]:
                names.append(f"{prefix}.{n}" if prefix else n)
    return names


def _states_of(module: nn.Module | None) -> list[str]:
    if isinstance(module, ShardedEmbedding):
        return list(module._ddp_params_and_buffers_to_ignore)
    return list(module.__dict__.get(_OURS, ())) if module is not None else []


_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"  # torch.distributed.algorithms._checkpoint's wrapper


def _is_wrapper(module: nn.Module, name: str) -> bool:
    """Whether ``name`` is the wrapped module of ``module``, a wrapper whose name
    torch.distributed.checkpoint.state_dict leaves out of the keys: DDP's ``module``,
    torch.compile's ``_orig_mod`` (OptimizedModule, told by name: importing torch._dynamo here
    costs seconds), activation checkpointing's ``_checkpoint_wrapped_module``."""
    return (name == "module" and isinstance(module, DistributedDataParallel)) or \
        (name == "_orig_mod" and type(module).__name__ == "OptimizedModule") or \
        name == _CHECKPOINT_WRAPPED


def unwrapped_path(root: nn.Module, path: str) -> str:
    """``path`` (of a sub-module of ``root``) without the wrappers' own names (`_is_wrapper`):
    the name the module has in the model's torch.distributed.checkpoint state dict."""
    bare, obj = [], root
    for part in path.split(".") if path else ():
        if not _is_wrapper(obj, part):
            bare.append(part)
        obj = obj._modules[part]
    return ".".join(bare)


def _restore_wrapper_prefix(wrapper: nn.Module, state_dict, prefix: str, *_) -> None:
    """Load pre-hook of a wrapper (`_is_wrapper`): give the fused optimizer state of its
    tables the wrapper's prefix back. torch.distributed.checkpoint.state_dict's ``set_*``
    strip the prefix on the way out and put it back only on parameters and buffers; a table's
    fused state (``optimizer.*``, not a registered module, so that DDP never sees it) came
    back without it, and loaded nowhere: strict loads raised after the rows had been loaded,
    and ``strict=False`` left mirrored pages' state out of step."""
    for path, table in wrapper.named_modules():
        if not isinstance(table, ShardedEmbedding) or table.optimizer is None:
            continue
        bare, kept, obj = [], [], wrapper
        for part in path.split("."):  # the path without the wrappers' own names
            if not _is_wrapper(obj, part):
                bare.append(part)
            if part != _CHECKPOINT_WRAPPED:  # that wrapper's own pre-hook adds its name itself
                kept.append(part)
            obj = obj._modules[part]
        full, stripped = f"{prefix}{'.'.join(kept)}.optimizer.", f"{prefix}{'.'.join(bare)}.optimizer."
        for key in [k for k in state_dict if k.startswith(stripped)]:
            if full + key[len(stripped):] not in state_dict:
                state_dict[full + key[len(stripped):]] = state_dict.pop(key)


def _on_register(parent: nn.Module, name: str, child: nn.Module | None):
    """Module registration hook: keep ``parent``'s DDP ignore list in step with the tables
    under it; refuse a DDP wrap that would touch a table; give every wrapper (`_is_wrapper`)
    the load pre-hook that puts its prefix back on the tables' fused state
    (`_restore_wrapper_prefix`). Returns None (keeps ``child``)."""
    if child is not None and _is_wrapper(parent, name) and not parent.__dict__.get("_sharded_embedding_prefix"):
        parent.__dict__["_sharded_embedding_prefix"] = True
        parent.register_load_state_dict_pre_hook(_restore_wrapper_prefix)
    if isinstance(parent, DistributedDataParallel):
        if name == "module" and child is not None:
            _check_ddp_wrap(parent, child)
        return None
    if name == "_fsdp_wrapped_module" and child is not None and type(parent).__name__ == "FullyShardedDataParallel":
        _check_fsdp1_wrap(child)
        return None
    if isinstance(parent, ShardedEmbedding):
        return None
    attrs = parent.__dict__  # not getattr: wrappers (torch.compile's) forward unknown names
    before = attrs.get(_OURS + "_by_child", {})
    if not _states_of(child) and name not in before:
        return None  # the common case: nothing of ours involved
    ours = dict(before)
    ours[name] = [f"{name}.{n}" for n in _states_of(child)]
    stale = {n for names in before.values() for n in names}
    fresh = [n for names in ours.values() for n in names]
    kept = [n for n in attrs.get("_ddp_params_and_buffers_to_ignore", ()) if n not in stale]
    parent.__dict__[_OURS + "_by_child"] = ours
    parent.__dict__[_OURS] = fresh
    parent.__dict__["_ddp_params_and_buffers_to_ignore"] = list(dict.fromkeys(kept + fresh))
    return None


def _check_ddp_wrap(ddp: DistributedDataParallel, model: nn.Module) -> None:
    """Raise if DDP is about to manage a table's storage. Runs when DDP's constructor assigns
    ``self.module``, before it verifies shapes or broadcasts anything. The storage is found
    inside tables and, by its mark, loose in a container: torch's composable ``replicate()``
    builds its DDP over an ``nn.ParameterList`` of the model's parameters, at the first forward."""
    ignored = ddp.__dict__.get("parameters_to_ignore")
    if ignored is None:
        ignored = set(model.__dict__.get("_ddp_params_and_buffers_to_ignore", ()))
    exposed = [n for n in _table_state_names(model) if n not in ignored]
    if not exposed:  # named as DDP names the parameters it takes (`_build_params_for_reducer`)
        exposed = [f"{m}.{n}" if m else n for m, sub in model.named_modules() for n, p in sub.named_parameters(recurse=False)
                   if getattr(p, "is_table_storage", False) and (f"{m}.{n}" if m else n) not in ignored]
    if exposed and isinstance(model, nn.ParameterList):  # torch's composable replicate(): its DDP, at the first forward
        raise ValueError(
            "torch.distributed._composable.replicate() would manage a ShardedEmbedding's storage (its DDP "
            f"takes the model's parameters as a list; entries {exposed}): its start-up broadcast would copy rank 0's "
            "pages over every other rank's. Pass the tables as ignored_modules: replicate(model, ignored_modules=[m "
            "for m in model.modules() if isinstance(m, ShardedEmbedding)]) (exclude_from_ddp does not reach "
            "replicate), on a model built afresh: replicate() cannot be undone. Nothing was changed"
        )
    if exposed:
        raise ValueError(
            f"DistributedDataParallel would manage the ShardedEmbedding storage {exposed}: its start-up "
            "broadcast would copy rank 0's pages over every other rank's, and its all-reduce would average "
            "unrelated pages. Call sharded_embedding.exclude_from_ddp(model) before DDP(model) (tables "
            "put into a sub-module after that sub-module joined the model are not seen otherwise), or "
            "wrap only the dense sub-modules. Nothing was changed"
        )


def _check_fsdp1_wrap(model: nn.Module) -> None:
    """Raise if FSDP1 (FullyShardedDataParallel) has flattened a table's storage into its own
    parameter. Runs when its constructor assigns the wrapped module, after the flattening (which
    happens first, out of reach) and before its first forward, whose all-gather of flat
    parameters of different sizes (ranks holding different numbers of rows) ended the job in
    gloo before the table could refuse."""
    from .routing import STORAGE_RESHAPED

    codes = {path or "(the model)": t._storage_refusal() for path, t in model.named_modules()
             if isinstance(t, ShardedEmbedding)}
    taken = {path: code for path, code in codes.items() if code}
    if taken:
        lost = any(code == STORAGE_RESHAPED for code in taken.values())
        raise ValueError(
            f"FullyShardedDataParallel has taken over the ShardedEmbedding storage of {sorted(taken)}: "
            + ("it flattened the rows into its own parameter (use_orig_params=True), so this rank's rows are no "
               "longer in the table: rebuild it (or load a checkpoint). " if lost else
               "it moved the storage into its flat parameter; the table's own rows are intact, but rebuild the "
               "model before wrapping it again. ")
            + "Leave the tables out of FSDP: FullyShardedDataParallel(model, ignored_states="
            "sharded_embedding.table_parameters(model)) (on CPU also device_id=torch.device('cpu')), or wrap only "
            "the dense sub-modules"
        )


_HOOK = register_module_module_registration_hook(_on_register)


def exclude_from_ddp(module: nn.Module) -> list[str]:
    """Mark the storage of every ShardedEmbedding inside ``module`` as ignored by DDP:
    neither all-reduced nor broadcast. Tables do this by themselves as a model is assembled
    (see this module's docstring); calling it is still right, e.g. after putting a table into
    a sub-module that was already part of ``module``.

    Call before ``DistributedDataParallel(module)``; returns the names ignored.
    """
    names = _table_state_names(module)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


def table_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The storage parameters of every ShardedEmbedding in ``module`` (DDP-wrapped or not),
    e.g. for ``fully_shard(model, ignored_params=set(table_parameters(model)))``."""
    seen, out = set(), []
    for sub in module.modules():
        if isinstance(sub, ShardedEmbedding):
            for p in sub.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def split_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(table parameters, dense parameters) of ``module`` (DDP-wrapped or not). A table with a
    fused optimizer needs no optimizer of yours: its parameter never gets a gradient."""
    tables = {id(p) for p in table_parameters(module)}
    params = list(module.parameters())
    return [p for p in params if id(p) in tables], [p for p in params if id(p) not in tables]
