"""`ShardedEmbedding`: an embedding table paged over the ranks of a process group.

Each rank calls the module with its own batch of ids (data-parallel input, model-parallel
table). The ids travel to the ranks holding their pages and the vectors come back with
all-to-all exchanges (`routing`, `lookup`); gradients travel the reverse path, so after
``loss.backward()`` each rank's storage holds the gradient of the sum of all ranks' losses.
"""

from __future__ import annotations

import hashlib
import sys
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_parameter_registration_hook)

from .amp import ScalerLink
from .checkpoint import loaded_rows_copier, sharded_rows, sync_mirrors
from .distributed import agree_or_raise, check_agreement, collective_device, default_device, resolve_group
from .export import export_table, import_table, tensor_bytes
from .initializers import fill_initial_rows
from . import native, pending
from .lookup import Exchange, ShardedLookup
from .mirrors import MirrorSync
from .optim_state import register_table
from .optimizers import build_fused_optimizer
from .placement import PagePlan, plain_int
from .routing import (AUTOCAST_WITHOUT_SCALER_POLICY, HOOK_ON_FUSED, REFUSALS, STORAGE_FREED, STORAGE_REPLACED,
                      STORAGE_RESHAPED, Router)
from .stats import ExchangeStats
from .storage import allocate
from .transport import TRANSPORTS, make_transport
from .wire import FLOAT_DTYPES

__all__ = ["ShardedEmbedding", "TableAllocationError"]


class TableAllocationError(ValueError, MemoryError):
    """A rank could not allocate its shard (or its fused optimizer's state): raised on every
    rank of the group together, naming each rank that failed and how many rows it needed. A
    ValueError, as every construction error is, and a MemoryError."""


class ShardedEmbedding(nn.Module):
    """An ``nn.Embedding`` whose rows are cut into pages held by different ranks.

    Args:
        num_embeddings: rows of the table.
        embedding_dim: columns of the table.
        page_size: rows per page; the last page may be shorter.
        placement: ``"round_robin"`` (page ``p`` on rank ``p % num_devices``) or a list with
            one entry per page: a rank, or a tuple of ranks that mirror the page (the first
            is its primary).
        num_devices: round robin over ranks ``0..num_devices-1``; -1 means all ranks (with an
            explicit ``placement`` list, anything else is a ValueError).
        process_group: the ranks sharing the table (default: the world group). Ranks in
            ``placement`` are ranks of this group.
        device: where this rank's pages live (default: ``cuda:LOCAL_RANK`` under nccl, else cpu).
        dtype: storage dtype (default: torch.get_default_dtype(), as nn.Embedding).
        seed: the initial table is N(0, 1) and a pure function of ``(seed, row, embedding_dim)``,
            identical for every world size, placement and page size.
        sparse: gradients of the local storage are sparse COO tensors (touched rows only).
        fused_optimizer: ``{"name": "sgd" | "adagrad" | "rowwise_adagrad" | "adam", "lr": ...,
            ...}`` applies that optimizer inside the backward to the touched rows (see
            `optimizers`); no gradient is kept (``weight.grad`` stays None, so an optimizer
            given ``model.parameters()`` skips the table), and ``weight.requires_grad_(False)``
            (or the module's) freezes it as usual. ``emb.optimizer`` holds the hyperparameters
            (``emb.optimizer.lr = ...`` for a schedule) and the state.
        comm_dtype: dtype of the vectors and gradients on the wire (e.g. ``torch.bfloat16``
            halves the bytes exchanged); storage and updates keep ``dtype``. A dtype of narrower
            range than ``dtype`` (float16 for float32) sends each row with a power-of-two scale,
            so nothing finite overflows on the wire (`wire` gives the error bounds).
        transport: how rows travel between ranks (`transport`): ``"process_group"`` (the
            group's backend: gloo, nccl), ``"shared_memory"`` (a CPU group on one x86-64 Linux
            machine: copies through shared memory instead of loopback sockets; ValueError
            elsewhere), or ``"auto"``: shared memory where it can work, else the process group.
            A group of one rank exchanges nothing: its transport is ``"process_group"``
            whatever is asked (``emb.transport.name`` says which one a table got).
        init: the initial table: ``"normal"`` (N(0, 1), see ``seed``) or ``"zeros"``.

    nn.Embedding's ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq``,
    ``_weight`` and ``_freeze`` are not offered: passing one is a ValueError (on every rank)
    that says what to do instead. ``weight`` is this rank's pages ``[local rows,
    embedding_dim]``, not the whole table: tying it to another module is refused, and with a
    fused optimizer so is any gradient reaching it from outside the lookup.

    Construction is collective over the group: ranks check that they were given the same
    arguments and raise the same ValueError together otherwise. Each rank allocates only
    its own pages; a rank that cannot makes every rank raise `TableAllocationError`.

    Every rank must call ``forward`` the same number of times, in the same order, and
    backpropagate through every output (an empty batch is fine): each call and its
    backward are collectives.

    Around standard PyTorch machinery (docs/training-loop.md has the full table): DDP wrapping
    a model that holds the table leaves the table alone by itself (`ddp`); inference mode,
    no_grad, eval/train, autocast, ``copy.deepcopy`` and dtype conversions work as for
    ``nn.Embedding``; a GradScaler is declared with `use_grad_scaler`; an inf/NaN gradient row
    is never applied (`amp`); moving the table to another device, FSDP taking over its
    storage and pickling the module are refused with an error that says what to do instead.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        page_size: int,
        placement: str | Sequence = "round_robin",
        num_devices: int = -1,
        process_group=None,
        device=None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        sparse: bool = True,
        fused_optimizer: dict | None = None,
        comm_dtype: torch.dtype | None = None,
        transport: str = "auto",
        init: str = "normal",
        **unsupported,
    ):
        super().__init__()
        group, rank, world = resolve_group(process_group, "ShardedEmbedding")
        number = _table_number(group)  # tables are made in the same order on every rank
        error = plan = None
        fields: dict = {}
        try:  # every argument, on every rank; nothing is allocated before all ranks agree
            unsupported = {k: v for k, v in unsupported.items() if not _is_nn_embedding_default(k, v)}
            if unsupported:
                raise TypeError(_unsupported_message(unsupported))
            # (numpy's integers, as nn.Embedding takes them: ids.max() + 1)
            num_embeddings, embedding_dim, page_size, num_devices, seed = map(
                plain_int, (num_embeddings, embedding_dim, page_size, num_devices, seed))
            if torch.empty(0).is_meta:  # under `with torch.device("meta")`: deferred initialization
                raise ValueError("a ShardedEmbedding cannot be built on the meta device (deferred initialization): "
                                 "each rank allocates only its own pages at construction, a fraction of the table; "
                                 "build it outside `with torch.device('meta')` and the rest of the model inside")
            device = torch.device(device) if device is not None else default_device(group)
            dtype = dtype if dtype is not None else torch.get_default_dtype()  # as nn.Embedding
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={device} but CUDA is not available on this machine")
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device={device}: the pages live on the CPU or on a CUDA device")
            if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
                raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
            for name, value in (("dtype", dtype), ("comm_dtype", comm_dtype)):
                if not (value is None and name == "comm_dtype") and value not in FLOAT_DTYPES:
                    raise ValueError(f"{name} must be a floating point torch.dtype (torch.float32, float64, "
                                     f"float16 or bfloat16), got {value!r}")
            if fused_optimizer is not None:
                build_fused_optimizer(fused_optimizer, torch.empty(0, 1))  # validates the spec
            if transport not in TRANSPORTS:
                raise ValueError(f"transport={transport!r} is not one of {list(TRANSPORTS)}")
            if init not in ("normal", "zeros"):
                raise ValueError(f"init={init!r} is not one of ['normal', 'zeros']")
            plan = PagePlan.build(num_embeddings, page_size, world, placement, num_devices)
            partial = [s for s in plan.mirror_sets() if len(s) < world]
            if partial and world != dist.get_world_size():
                raise ValueError(
                    f"pages mirrored on {partial[0]}, a part of a process group that is not the world "
                    "group: torch creates the replica subgroups collectively over the whole world, "
                    "which ranks outside this group would never join. Use the world group, or mirror "
                    "pages on all ranks of this group"
                )
            fields = {
                "num_embeddings": num_embeddings, "page_size": page_size, "placement/num_devices": plan.describe(),
                "embedding_dim": embedding_dim, "dtype": str(dtype), "seed": seed, "sparse": sparse,
                "fused_optimizer": repr(sorted((k, float(v) if type(v) is int else v)  # 1 and 1.0 agree
                                                for k, v in dict(fused_optimizer).items())) if fused_optimizer else None,
                "comm_dtype": str(comm_dtype), "transport": transport, "init": init, "device": device.type,
                "table number": number,
            }
        except (ValueError, TypeError) as e:
            error = str(e)
        agree_or_raise(group, "ShardedEmbedding construction", fields, error)

        self.plan = plan
        self.embedding_dim = embedding_dim
        self.seed, self.init = seed, init
        self.sparse = sparse
        self.process_group = group
        self.rank, self.world_size = rank, world
        self._local_page_ids = plan.local_pages(rank).tolist()
        error = None
        try:  # what can still fail on one rank alone (memory) is agreed on before any collective
            storage = allocate((plan.local_rows(rank), embedding_dim), dtype, device)
            # With a fused optimizer the storage still requires grad: the lookup's backward,
            # where the optimizer works, runs only then, and freezing the table is
            # requires_grad_(False).
            self.weight = nn.Parameter(storage)
            self.__dict__["_storage"] = self.weight  # what the pages are, whatever replaces .weight
            # The fused optimizer is not a registered sub-module: its state is per-rank rows that
            # state_dict() exposes as sharded tensors itself, and DDP must never see it.
            self.__dict__["optimizer"] = (
                build_fused_optimizer(fused_optimizer, storage) if fused_optimizer is not None else None
            )
            self._mark_storage()
            self.reset_parameters()
        except (RuntimeError, MemoryError) as e:
            error = f"could not allocate its {plan.local_rows(rank):,} rows on {device}: {type(e).__name__}: {e}"
        agree_or_raise(group, "ShardedEmbedding construction", "allocated", error, exception=TableAllocationError)
        # DDP reads this on the model it wraps; `ddp` copies it up to every module holding us.
        self._ddp_params_and_buffers_to_ignore = ["weight"]
        self._table_id = number
        self._lookups = 0  # lookups so far, alike on every rank: tags each one's exchanges
        self.transport = make_transport(transport, group, device, _group_timeout(group, device))  # collective
        self._router = Router(
            plan.routing_table(rank),
            page_size=plan.page_size,
            num_embeddings=plan.num_embeddings,
            max_local_rows=max(plan.local_rows(r) for r in range(world)),
            rank=rank,
            world=world,
            transport=self.transport,
            device=device,
            table_id=self._table_id,
        )
        self._router.requests.names[self._table_id] = f"a ShardedEmbedding of {num_embeddings} x {embedding_dim}"
        self._exchange = Exchange(
            group=group,
            rank=rank,
            world=world,
            mirrors=MirrorSync(plan, rank, group, device),
            sparse=sparse,
            optimizer=self.optimizer,
            comm_dtype=comm_dtype,
            stats=ExchangeStats(world),
            transport=self.transport,
            caller=self._table_id,
        )
        register_table(self)  # a torch optimizer stepping this storage shards its state like the rows

    def __setattr__(self, name, value):
        """Refuse a DTensor in place of the storage where it is assigned: FSDP2's
        ``fully_shard`` assigns its sharded parameters with ``setattr`` on modules that
        override it, so this raises inside ``fully_shard``, before its first all-gather (which,
        with unequal row counts per rank, aborted the ranks in gloo before any lookup could
        refuse). Anything else set on the module goes as ``nn.Module`` sets it."""
        if name == "weight" and "torch.distributed.tensor" in sys.modules and "_storage" in self.__dict__ \
                and isinstance(value, sys.modules["torch.distributed.tensor"].DTensor):
            raise TypeError(f"ShardedEmbedding: {REFUSALS[STORAGE_REPLACED]}")
        super().__setattr__(name, value)

    def _mark_storage(self) -> None:
        """Mark the storage parameter as this table's: DDP's wrap check tells it apart in any
        container (`ddp`); registering it on another module (weight tying) is refused; with a
        fused optimizer, a gradient that reaches it from outside the lookup stops the backward
        (nothing would apply it, and it is one rank's pages' gradient, not nn.Embedding's)."""
        storage = self._storage
        storage.is_table_storage = True
        storage._table_owner = weakref.ref(self)
        if storage.numel():  # a new Parameter over the same rows (nn.Parameter(emb.weight)) is told by its memory
            _TABLE_MEMORY[storage.untyped_storage().data_ptr()] = self
        if self.optimizer is not None and getattr(storage, "_foreign_gradient_hook", None) is None:
            storage._foreign_gradient_hook = storage.register_hook(_refuse_foreign_gradient).id

    def _storage_refusal(self) -> int:
        """A `routing.REFUSALS` code if something took the storage over (0: it is the table's):
        its rows reshaped away (FSDP1's flat parameter), ``weight`` replaced (FSDP2), or its
        memory freed (the gathers would read it raw)."""
        if self._storage.shape != (self.plan.local_rows(self.rank), self.embedding_dim):
            return STORAGE_RESHAPED
        if self._parameters.get("weight") is not self._storage:
            return STORAGE_REPLACED
        return 0 if native.holds_data(self._storage) else STORAGE_FREED

    def _fused_refusal(self, needs_grad: bool) -> int:
        """A `routing.REFUSALS` code if this lookup's fused update could not be right (0: fine):
        gradient hooks on the weight (they would get None), or autocast without knowing
        whether a GradScaler scales the loss."""
        if not needs_grad or self.optimizer is None:
            return 0
        own = getattr(self._storage, "_foreign_gradient_hook", None)
        if any(k != own for k in self._storage._backward_hooks or ()) or \
                getattr(self._storage, "_post_accumulate_grad_hooks", None):
            return HOOK_ON_FUSED
        if self._exchange.scaler is None and torch.is_autocast_enabled(self._storage.device.type):
            return AUTOCAST_WITHOUT_SCALER_POLICY
        return 0

    # ------------------------------------------------------------------ sizes
    @property
    def num_embeddings(self) -> int:
        return self.plan.num_embeddings

    @property
    def page_size(self) -> int:
        return self.plan.page_size

    @property
    def num_pages(self) -> int:
        return self.plan.num_pages

    @property
    def device(self) -> torch.device:
        return self._storage.device

    def page_owners(self, page: int) -> tuple[int, ...]:
        """Ranks holding ``page``; the first is its primary."""
        return self.plan.page_owners(page)

    @property
    def local_pages(self) -> dict[int, torch.Tensor]:
        """Page id -> this rank's ``[rows_in_page, dim]`` view of that page."""
        ps = self.page_size
        return {
            p: self._storage[s * ps : s * ps + self.plan.page_rows(p)]
            for s, p in enumerate(self._local_page_ids)
        }

    def _local_ranges(self):
        """(global start, global stop, local view) of each local page, ascending."""
        for p, view in self.local_pages.items():
            start = self.plan.page_start(p)
            yield start, start + view.shape[0], view

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the local pages with the initial table (see ``seed`` and ``init``); no collective."""
        if self.init == "zeros":
            self._storage.data.zero_()
        else:
            fill_initial_rows(self.seed, self.embedding_dim, self._local_ranges())

    def sync_mirrors(self) -> None:
        """Make every replica of a mirrored page equal to its primary's (the page's first rank
        in the placement): rows and fused optimizer state. Call on every rank after changing
        rows in place outside the table, e.g. an ``nn.init`` loop over ``model.parameters()``,
        which draws each rank's rows on its own (with the fans of its local shard): replicas
        would differ for good, and a mirrored row would look up differently on each rank.
        Collective: one broadcast per mirror set and primary; none without mirrors."""
        with torch.no_grad():
            sync_mirrors(self, list(self._row_states().values()))

    # ------------------------------------------------------------------ lookup
    @torch.compiler.disable  # collectives and host-side checks: one graph break, not a trace of them
    def forward(self, indices) -> torch.Tensor:
        """Look up ``indices`` (int64 or int32, any shape) -> ``indices.shape + (embedding_dim,)``.

        Collective: the header and ids all-to-alls, then the vectors all-to-all; the backward
        runs the non-finite flags all-reduce, the gradients all-to-all (and the mirror
        all-reduces). Every rank raises together: TypeError/IndexError for bad ids on any rank;
        RuntimeError if any rank refuses the lookup (storage replaced by FSDP, a fused table
        under autocast without `use_grad_scaler`) or the ranks differ in whether they will run
        the backward or in the fused optimizer's hyperparameters; `NonFiniteGradientError` in
        the backward (see `amp`).
        """
        storage = self._storage
        needs_grad = torch.is_grad_enabled() and storage.requires_grad
        refusal = self._storage_refusal() or self._fused_refusal(needs_grad)
        digest = self.optimizer.digest() if needs_grad and self.optimizer is not None else 0
        routing = self._router.route(indices, refusal=refusal, needs_grad=needs_grad, dtype=storage.dtype,
                                     step_digest=digest)
        self.__dict__["_lookups"] = routing.call = self._lookups + 1  # (not Module.__setattr__: per call)
        if digest:
            routing.hyperparameters = self.optimizer.hyperparameters()
            pending.note_lookup()
        out = ShardedLookup.apply(storage, routing, self._exchange)
        return out.view(*routing.shape, self.embedding_dim)

    def use_grad_scaler(self, scaler) -> None:
        """Answer to ``scaler`` (a ``torch.amp.GradScaler``, or ``None``: the loss is not
        scaled) in the backward: see `amp` and `sharded_embedding.use_grad_scaler`, which does
        this for every table in a model. No communication; call it on every rank."""
        self._exchange.scaler = ScalerLink(scaler, self.device)

    def stats(self, reset: bool = False) -> dict:
        """What this rank's lookups moved since construction (or the last reset): calls, ids,
        unique ids, unique ids sent to each rank, rows served to each rank, bytes sent and
        received (all-to-alls; mirror all-reduces are counted in rows), ``exchanges`` (the
        all-to-alls: a call's requests and vectors, a backward's gradients) and
        ``request_overflows`` (calls whose requests outgrew the group's request capacity, which
        follows the longest recent requests, and took a second exchange). Calls and backward
        passes that raised are not counted. No communication."""
        out = self._exchange.stats.as_dict()
        if reset:
            self._exchange.stats = ExchangeStats(self.world_size)
        return out

    # ------------------------------------------------------------------ torch machinery
    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)``, ``.half()``, ``.double()`` convert the storage as for ``nn.Embedding``
        (a fused optimizer's state keeps its dtype, as a torch optimizer's does). Moving the
        table to another device is refused before anything changes: its pages, routing and
        process group were set up for the device it was built on."""
        storage = self._storage
        probe = fn(torch.empty((0, self.embedding_dim), dtype=storage.dtype, device=storage.device))
        if isinstance(probe, torch.Tensor) and probe.device != storage.device:
            raise ValueError(
                f"ShardedEmbedding: the table's pages live on {storage.device} and cannot move to "
                f"{probe.device} (its routing, workspaces and process group were set up for that device). "
                f"Build it there instead: ShardedEmbedding(..., device={str(probe.device)!r}) (the default "
                "is cuda:LOCAL_RANK under nccl). The table was not changed"
            )
        out = super()._apply(fn, recurse)
        # Conversions may put a new Parameter in place of the old one (torch.__future__ flags).
        self.__dict__["_storage"] = self._parameters["weight"]
        self._mark_storage()
        return out

    def __deepcopy__(self, memo):
        """An independent table with the same layout, rows and optimizer state, on the same
        process group (no communication): what ``copy.deepcopy(model)`` does for EMA/SWA
        copies. Like the original, every rank must call the copy's lookups; and, as tables are
        made, every rank must copy the same tables in the same order: the copy gets the next
        table number of the group, so that a rank calling the copy while another calls the
        original raises on every rank."""
        shared = [pg for _, pg in self._exchange.mirrors._sets]
        if self._exchange.scaler is not None and self._exchange.scaler.scaler is not None:
            shared.append(self._exchange.scaler.scaler)  # the copy answers to the same scaler
        new = copy_on_group(self, memo, [self.transport, *shared], f"a copy of table #{self._table_id}")
        new._exchange.caller = new._table_id
        new._mark_storage()
        register_table(new)
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a ShardedEmbedding cannot be pickled (torch.save(model), copy.copy): its rows are spread "
            "over the ranks of a process group. Save the state instead: torch.save(model.state_dict(), "
            "f'rank{rank}.pt') per rank (loads into the same layout), "
            "torch.distributed.checkpoint.save({'model': model.state_dict()}, ...) (loads into any "
            "layout), or emb.export_table(path)"
        )

    # ------------------------------------------------------------------ checkpoints
    def _row_states(self) -> dict[str, torch.Tensor]:
        """Per-row tensors laid out like the local rows: the table and the optimizer state."""
        states = {"weight": self._storage}
        if self.optimizer is not None:
            states.update({f"optimizer.{k}": v for k, v in self.optimizer.named_buffers() if k != "step"})
        return states

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The table and its fused optimizer's state as ShardedTensors of the global shape whose
        local shards are this rank's primary pages (views of the storage), ready for
        ``torch.distributed.checkpoint``: each row is saved once, and loads into any world
        size, placement or page size. No communication."""
        if args:  # the positional form nn.Module.state_dict still accepts
            destination, prefix, keep_vars = (list(args) + [None, "", False][len(args):])[:3]
        if destination is None:
            destination = OrderedDict()
        for name, tensor in self._row_states().items():
            destination[prefix + name] = sharded_rows(self, tensor.detach())
        if self.optimizer is not None:
            destination[prefix + "optimizer.step"] = self.optimizer.step
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Counterpart of `state_dict`. Accepts what `state_dict` made (possibly filled in place
        by DCP), what a per-rank ``torch.save`` of it loads back as (same layout), or full
        ``[num_embeddings, ...]`` tensors.

        Collective: the ranks first agree (one all-gather) that every rank's state fits and
        that the same keys are present (torch raises for missing keys only on the ranks that
        miss them); if not, every rank reports the same errors (so ``load_state_dict`` raises
        on every rank) and no row is changed. Then mirrored pages are copied from their
        primary to the other replicas."""
        copies, errors, missing = [], [], []
        for name, storage in self._row_states().items():
            key = prefix + name
            if key not in state_dict:
                missing.append(key)
                continue
            try:
                copies.append((storage.data, loaded_rows_copier(self, storage.data, state_dict[key], key)))
            except ValueError as e:
                errors.append(str(e))
        step = None
        if self.optimizer is not None:
            key = prefix + "optimizer.step"
            if key not in state_dict:
                missing.append(key)
            else:
                step = torch.as_tensor(state_dict[key])
                if step.numel() != 1:
                    errors.append(f"{key}: expected one number, got a tensor of shape {tuple(step.shape)}")
        missing_keys += missing
        ours = set(self._row_states()) | ({"optimizer.step"} if self.optimizer is not None else set())
        unexpected_keys += [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in ours]
        found, differ = check_agreement(self.process_group, ",".join(missing), "; ".join(errors) or None,
                                        collective_device(self.process_group))
        if found or differ:
            detail = "; ".join(f"rank {r}: {e}" for r, e in found) if found else "ranks were given different keys: " + \
                "; ".join(f"rank {r} misses [{f}]" for r, f in enumerate(differ)) + \
                " (torch's set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=" \
                "True)) hands the other ranks the model's parameters and buffers only, not a table's fused " \
                "optimizer state, which is not a registered buffer: give every rank its own sharded state dict " \
                "(dcp.load, or set_state_dict without full_state_dict))"
            error_msgs.append(f"{type(self).__name__} {prefix or '(root)'}: {detail}. No rank changed any row")
            return
        for _, copy_in in copies:
            copy_in()
        if step is not None:
            with torch.no_grad():
                self.optimizer.step.copy_(step.reshape(()))
        sync_mirrors(self, [storage for storage, _ in copies])

    def export_table(self, path) -> None:
        """Write the whole table to one ``.npy`` file ([num_embeddings, embedding_dim]) without
        gathering it: each rank writes its primary pages at their offsets (``pwrite``; see
        `export.write_pages`). Collective; the ranks must share the filesystem. Raises OSError
        on every rank if any rank cannot write, leaving no file."""
        export_table(self, str(path))

    def import_table(self, path) -> None:
        """Read a ``.npy`` table (as `export_table` writes): each rank reads only the rows it
        holds. Collective: a missing, truncated, damaged or foreign file, or values beyond this
        table's dtype, raise ValueError on every rank before any row changes."""
        import_table(self, str(path))

    # ------------------------------------------------------------------ whole table (small tables)
    @torch.no_grad()
    def full_table(self) -> torch.Tensor:
        """The whole table on every rank (collective: one all-gather). For small tables and tests."""
        return self._full(self._storage)

    def _full(self, storage: torch.Tensor) -> torch.Tensor:
        """A tensor laid out like the local rows (the table, or per-row optimizer state),
        assembled from every page's primary copy on every rank (collective)."""
        plan, tail = self.plan, storage.shape[1:]
        local = {p: s for s, p in enumerate(self._local_page_ids)}
        primary = [plan.primary_pages(r).tolist() for r in range(self.world_size)]
        counts = [sum(plan.page_rows(p) for p in pages) for pages in primary]
        buf = storage.new_empty(max(counts), *tail)
        at = 0
        for p in primary[self.rank]:
            n = plan.page_rows(p)
            buf[at : at + n] = storage[local[p] * plan.page_size : local[p] * plan.page_size + n]
            at += n
        every = [torch.empty_like(buf) for _ in range(self.world_size)]
        if self.world_size > 1:
            dist.all_gather(every, buf.contiguous(), group=self.process_group)
        else:
            every = [buf]
        table = storage.new_empty(self.num_embeddings, *tail)
        for r, pages in enumerate(primary):
            at = 0
            for p in pages:
                n, start = plan.page_rows(p), plan.page_start(p)
                table[start : start + n] = every[r][at : at + n]
                at += n
        return table

    @torch.no_grad()
    def load_full_table(self, table: torch.Tensor) -> None:
        """Copy the rows this rank holds from ``table`` ([num_embeddings, embedding_dim], any
        device). Collective (for small tables and tests): every rank must pass the same table,
        which the ranks check (shape and a digest of the values, one all-gather) before any
        row changes; ValueError on every rank otherwise."""
        expected = (self.num_embeddings, self.embedding_dim)
        error, digest = None, ""
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
            error = f"expected a table of shape {expected}, got {tuple(getattr(table, 'shape', ())) or type(table).__name__}"
        else:
            host = table.detach().to("cpu", torch.float64).contiguous()
            digest = hashlib.blake2b(tensor_bytes(host), digest_size=16).hexdigest()
        agree_or_raise(self.process_group, "load_full_table (every rank must pass the same table)", digest, error)
        with torch.no_grad():
            for start, stop, view in self._local_ranges():
                view.copy_(table[start:stop])

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, page_size={self.page_size}, "
            f"num_pages={self.num_pages}, local_pages={len(self._local_page_ids)}, "
            f"rank={self.rank}/{self.world_size}, sparse={self.sparse}"
            + (f", comm_dtype={self._exchange.comm_dtype}" if self._exchange.comm_dtype else "")
        )


def _group_timeout(group, device: torch.device):
    """The group's collective timeout (the transport waits no longer), or None if unknown."""
    try:
        return group._get_backend(torch.device("cpu") if device.type == "cpu" else device).options._timeout
    except (AttributeError, RuntimeError):
        return None


_TABLES_MADE: dict[tuple, int] = {}


def copy_on_group(module, memo: dict, shared: list, description: str):
    """``copy.deepcopy`` of a table or collection (``module``) that shares ``shared``, its
    process group and its request exchange with the original (they belong to the group), and
    takes the group's next table number, as a module made now would (``description`` names it
    in mismatch errors). The caller retags what else carries the number."""
    import copy

    for obj in (module.process_group, module._router.requests, *shared):
        if obj is not None:
            memo[id(obj)] = obj
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    for key, value in module.__dict__.items():  # a collection's tables (in _modules) first
        new.__dict__[key] = copy.deepcopy(value, memo)
    new._table_id = new._router.table_id = _table_number(module.process_group)
    new._router.requests.names[new._table_id] = description
    return new


def _table_number(group) -> int:
    """How many tables this process made on ``group`` before this one: the same on every rank
    when every rank makes the same tables in the same order (construction checks it), so a
    lookup can tell which table each rank is calling."""
    key = (id(dist.group.WORLD), tuple(dist.get_process_group_ranks(group)))
    _TABLES_MADE[key] = _TABLES_MADE.get(key, -1) + 1
    return _TABLES_MADE[key]


# nn.Embedding's options that a sharded table does not offer, and what to do instead
_NN_EMBEDDING_OPTIONS = {
    "padding_idx": "a row that stays zero and gets no gradient: give padding positions an id of their own and "
                   "mask their rows (out * mask), or drop them from the ids",
    "max_norm": "rows renormalized in place at lookup: renormalize the rows you look up (F.normalize on the output)",
    "norm_type": "the norm of max_norm",
    "scale_grad_by_freq": "gradients divided by the id's count in the batch",
    "_weight": "a given initial table: load it with emb.load_full_table(rows) or emb.import_table(path)",
    "_freeze": "a frozen table: emb.requires_grad_(False)",
}


_NN_EMBEDDING_DEFAULTS = {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
                          "_weight": None, "_freeze": False}


def _is_nn_embedding_default(key: str, value) -> bool:
    """nn.Embedding's options at their defaults change nothing, so they are taken (code that
    passes them explicitly works as with nn.Embedding)."""
    default = _NN_EMBEDDING_DEFAULTS.get(key, ...)
    return default is not ... and type(value) is type(default) and value == default


def _unsupported_message(given: dict) -> str:
    known = [f"{k} ({_NN_EMBEDDING_OPTIONS[k]})" for k in given if k in _NN_EMBEDDING_OPTIONS]
    other = [k for k in given if k not in _NN_EMBEDDING_OPTIONS]
    parts = []
    if known:
        parts.append("ShardedEmbedding does not offer nn.Embedding's " + "; ".join(known))
    if other:
        parts.append(f"ShardedEmbedding got unexpected keyword arguments {other}")
    return ". ".join(parts)


_TIED = (
    "ShardedEmbedding: its storage `weight` holds this rank's pages only ({rows} of the table's {total} "
    "rows), so it cannot also be a parameter or buffer of {module}.{name} (weight tying, e.g. decoder.weight = "
    "emb.weight): that module would compute with a different shard on every rank, where a tied "
    "nn.Embedding's weight is the whole table. Nothing was changed. For an output layer over the "
    "vocabulary, look up the rows it needs with emb(ids) (negative sampling or a sampled softmax, as the "
    "word2vec job does), or give it a weight of its own"
)

_FOREIGN_GRADIENT = (
    "ShardedEmbedding: the storage `weight` of a table with a fused optimizer received a gradient from "
    "outside its lookup: an op used emb.weight directly (F.embedding(ids, emb.weight), emb.weight @ x, "
    "emb.weight[i], a penalty on emb.weight, ...). emb.weight holds this rank's pages only, not "
    "nn.Embedding's whole table, and the fused optimizer never applies such a gradient. The backward "
    "pass stopped and no row changed. Look rows up with emb(ids) and put penalties on the rows looked up; "
    "emb.full_table() gives the whole table (a copy, outside autograd)"
)


def _refuse_foreign_gradient(grad):
    """Gradient hook of a fused table's storage: its lookup never gives the storage a gradient."""
    if grad is not None:
        raise RuntimeError(_FOREIGN_GRADIENT)
    return grad


def _refuse_tying(module: nn.Module, name: str, param):
    """Global parameter- and buffer-registration hook: a table's rows registered on another module (not
    a ParameterList / ParameterDict, which only hold it: torch's replicate() builds one, and its
    own check says what to do)."""
    if isinstance(module, (nn.ParameterList, nn.ParameterDict)) or param is None:
        return None
    owner = getattr(param, "_table_owner", None)
    table = owner() if owner is not None else None
    if table is None and param.numel() and param.device.type != "meta":
        memory = param.untyped_storage().data_ptr()
        found = _TABLE_MEMORY.get(memory)
        if found is not None and found._storage.untyped_storage().data_ptr() == memory:  # not a stale entry
            table = found
    if table is not None and table is not module:
        raise TypeError(_TIED.format(rows=param.shape[0], total=table.num_embeddings, module=type(module).__name__,
                                     name=name))
    return None


_TABLE_MEMORY: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # storage address -> table
_TYING_HOOKS = (register_module_parameter_registration_hook(_refuse_tying),
                register_module_buffer_registration_hook(_refuse_tying))  # a buffer over the rows too
