"""`ShardedEmbeddingBagCollection`: many sharded tables, pooled bags of ids, one exchange.

The sparse half of a recommendation model (DLRM and its kin): tens of features, each a bag of
ids per sample, looked up in a handful of tables (several features may read one table) and
pooled into one vector per bag. TorchRec's ``EmbeddingBagCollection`` + ``KeyedJaggedTensor``
shape the API; each table is a `ShardedEmbedding` (pages, placement, mirrors, fused
optimizers, checkpoints as for one table), and the collection batches their exchanges: one
call moves every table's requests in one all-to-all, their vectors in another, and their
gradients in a third (`bag_routing`, `bag_lookup`), pooling each table's bags where that moves
fewer bytes.
"""

from __future__ import annotations

import json
import zlib

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import pending
from .bag_lookup import BagLookup
from .bag_routing import POOL_ON, BagRouter, BagRouting, signature_parts
from .bags import EXCEPTIONS, REFUSED, InputError, parse
from .distributed import agree_or_raise, all_gather_strings, default_device, resolve_group
from .embedding import ShardedEmbedding, _table_number, copy_on_group
from .lookup import Exchange
from .placement import plain_int
from .routing import REFUSALS, raise_if_step_digests_differ
from .stats import ExchangeStats
from .transport import TRANSPORTS

__all__ = ["ShardedEmbeddingBagCollection", "TableConfig"]

POOLINGS = ("sum", "mean", None)


@dataclass(frozen=True)
class TableConfig:
    """One table of a `ShardedEmbeddingBagCollection` and the features that read it.

    ``name``: the table's key in ``ebc.tables`` (no dots). ``num_embeddings``,
    ``embedding_dim``, ``page_size``, ``placement`` (``"round_robin"`` or one entry per page:
    a rank, or a tuple of ranks that mirror it; the ``k``-th table's round robin starts at
    rank ``k % num_devices``, which spreads the tables' first pages over the ranks),
    ``num_devices``, ``fused_optimizer`` and
    ``seed``: as for `ShardedEmbedding` (the initial rows are those of ``ShardedEmbedding(...,
    seed=seed)`` of the same shape). ``pooling``: ``"sum"``, ``"mean"`` (over each bag, as
    ``torch.nn.EmbeddingBag``) or ``None``, a sequence table: one output row per id.
    ``feature_names``: the features that read this table (default: the table's name); a
    feature reads one table, several features may read the same one.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    page_size: int
    placement: str | Sequence = "round_robin"
    pooling: str | None = "sum"
    feature_names: Sequence[str] | None = None
    fused_optimizer: Mapping | None = None
    seed: int = 0
    num_devices: int = -1

    def __post_init__(self):
        for key in ("num_embeddings", "embedding_dim", "page_size", "seed", "num_devices"):  # numpy's ints too
            object.__setattr__(self, key, plain_int(getattr(self, key)))
        names = self.feature_names if self.feature_names is not None else [self.name]
        object.__setattr__(self, "feature_names", tuple(names) if not isinstance(names, str) else (names,))


class Tables(nn.Module):
    """``ebc.tables``: the collection's `ShardedEmbedding` s by name (``tables[name]``, ``name
    in tables``, ``iter`` gives the names, ``len``). Not an ``nn.ModuleDict``, whose methods
    (``items``, ``keys``, ...) would forbid those table names."""

    def __getitem__(self, name: str) -> ShardedEmbedding:
        return self._modules[name]

    def __contains__(self, name) -> bool:
        return name in self._modules

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


@dataclass
class BagStats:
    """What a collection's calls moved on this rank, and where each table's bags were pooled."""

    world: int
    wire_bytes: int  # bytes of one vector element on the wire (the pooling choice weighs by it)
    calls: int = 0
    backward_calls: int = 0
    exchanges: int = 0  # all-to-alls: requests (2 when they outgrew the capacity), vectors, gradients
    request_overflows: int = 0  # calls whose requests outgrew the capacity
    bytes_sent: int = 0
    bytes_received: int = 0
    ids: dict = field(default_factory=dict)
    served: dict = field(default_factory=dict)  # table -> values served to each requester rank
    stepped_pooled: dict = field(default_factory=dict)  # table -> ids served here stepped in pooled form

    def record_requests(self, routing: BagRouting) -> None:
        self.calls += 1
        self.exchanges += routing.request_exchanges
        self.request_overflows += routing.request_exchanges > 1
        self.bytes_sent += routing.ints_sent * 8
        self.bytes_received += routing.ints_received * 8
        for serve, name in zip(routing.serves, self.ids):
            per_rank = self.served.setdefault(name, [0] * self.world)
            for r, block in enumerate(serve.blocks):
                if r in serve.decoded:  # this rank's own ids pooled here: kept unpacked, not in a payload
                    per_rank[r] += serve.decoded[r][0].numel()
                elif block is not None:
                    per_rank[r] += block.numel()

    def record_vectors(self, routing: BagRouting, sent: int, received: int) -> None:
        """``sent`` / ``received``: bytes of the vector all-to-all."""
        self.exchanges += self.world > 1
        self.bytes_sent += sent
        self.bytes_received += received
        for req, name in zip(routing.requests, self.ids):
            self.ids[name] += req.bags.values.numel()

    def record_gradients(self, sent: int, received: int) -> None:
        """``sent`` / ``received``: bytes of the gradient all-to-all."""
        self.backward_calls += 1
        self.exchanges += self.world > 1
        self.bytes_sent += sent
        self.bytes_received += received

    def record_pooled_step(self, table: int, ids: int) -> None:
        """``ids`` served here of table number ``table`` took their fused SGD step in pooled
        form (`native.bag_scatter_add`): called when the step is applied, not when it is
        handed over (a pass that raises applies none)."""
        name = list(self.ids)[table]
        self.stepped_pooled[name] = self.stepped_pooled.get(name, 0) + ids


class ShardedEmbeddingBagCollection(nn.Module):
    """Tables of pooled bags of ids, each paged over the ranks of a process group, looked up
    together with one exchange per step.

    Args:
        tables: `TableConfig` s; table and feature names must be unique (a feature reads one
            table).
        process_group: the ranks sharing the tables (default: the world).
        device: where this rank's pages live (default: ``cuda:LOCAL_RANK`` under nccl, else cpu).
        comm_dtype: dtype of vectors and gradients on the wire (e.g. ``torch.bfloat16``).
        include_last_offset: ``offsets`` end with the end of the last bag, as in
            ``torch.nn.EmbeddingBag(include_last_offset=True)``.
        sparse: tables without a fused optimizer get sparse COO gradients (else dense).
        transport: as for `ShardedEmbedding` (``"auto"``, ``"process_group"``, ``"shared_memory"``).
        pool_on: where bags are pooled: ``"auto"`` (per table and call, by the bytes each way
            sends: `bag_routing`), or always on the ``"requester"`` / the ``"owner"`` (pooled
            tables whose local rows fit in 31 bits), to compare them.

    ``ebc(features)``: ``features`` maps each feature name to ``(values, offsets)``,
    ``(values, offsets, per_sample_weights)``, ``{"values", "offsets" | "lengths", "weights"}``
    or a TorchRec ``JaggedTensor``; or is a TorchRec ``KeyedJaggedTensor`` (see `bags`).
    Returns ``{feature: tensor}``: ``[bags, dim]`` pooled (sum, mean, or weighted sum as
    ``torch.nn.EmbeddingBag``; an empty bag gives zeros), or ``[ids, dim]`` for a sequence
    table. ``ebc.concat(out)`` puts the pooled features side by side, ``[batch, sum of their
    dims]``, in table then feature order (`feature_names`).

    Collective, like a `ShardedEmbedding` lookup: every rank calls the collection the same
    number of times, in the same order, and backpropagates through its outputs (an empty batch
    is fine). A call costs one request all-to-all, one vector all-to-all and, in the backward,
    one gradient all-to-all for all tables (plus, per table, the all-reduces of mirrored
    pages). Every table receives the gradient of the sum of every rank's loss. Bad input on
    any rank (ids, offsets, lengths, weights, feature names) makes every rank raise the same
    TypeError / IndexError / ValueError in that call, before anything moves; nothing is
    updated. ``ebc.tables[name]`` is each table as a `ShardedEmbedding` (``full_table()``,
    ``local_pages``, ``state_dict()``, ...); the collection's ``state_dict()`` holds every
    table's rows and fused optimizer state as DCP-reshardable tensors.
    """

    def __init__(self, tables: Sequence[TableConfig], process_group=None, device=None, comm_dtype=None, *,
                 include_last_offset: bool = False, sparse: bool = True, transport: str = "auto",
                 pool_on: str = "auto"):
        super().__init__()
        group, rank, world = resolve_group(process_group, "ShardedEmbeddingBagCollection")
        tables = list(tables) if isinstance(tables, Sequence) and not isinstance(tables, str) else tables
        error, fields = None, {}
        try:  # every argument on every rank, before any table is made (each table then checks its own)
            device = torch.device(device) if device is not None else default_device(group)
            error = _check_configs(tables)
            if error is None and transport not in TRANSPORTS:
                error = f"transport={transport!r} is not one of {list(TRANSPORTS)}"
            if error is None and pool_on not in POOL_ON:
                error = f"pool_on={pool_on!r} is not one of {list(POOL_ON)}"
            if error is None:
                fields = {**_table_fields(tables), "include_last_offset": include_last_offset, "sparse": sparse,
                          "comm_dtype": str(comm_dtype), "transport": transport, "pool_on": pool_on,
                          "device": device.type}
        except (ValueError, TypeError, RuntimeError) as e:
            error = str(e)
        agree_or_raise(group, "ShardedEmbeddingBagCollection construction", fields, error)
        self.configs = tuple(tables)
        self.include_last_offset = include_last_offset
        self.process_group, self.rank, self.world_size = group, rank, world
        container = Tables()  # filled before it joins the collection, so DDP's ignore list sees every table
        for k, c in enumerate(self.configs):  # each construction is collective and checks its own arguments
            placement, num_devices = _spread(c, k, world)
            container.add_module(c.name, ShardedEmbedding(
                c.num_embeddings, c.embedding_dim, page_size=c.page_size, placement=placement,
                num_devices=num_devices, process_group=group, device=device, seed=c.seed, sparse=sparse,
                fused_optimizer=dict(c.fused_optimizer) if c.fused_optimizer is not None else None,
                comm_dtype=comm_dtype, transport=transport))
        self.tables = container
        first = self._table_list[0]
        # The collection's own number on the group, after its tables': a rank calling the
        # collection while another calls one of its tables (or another table) raises.
        self._table_id = _table_number(group)
        self._lookups = 0  # lookups so far, alike on every rank: tags each one's exchanges
        self._router = BagRouter([t._router for t in self._table_list], [c.embedding_dim for c in self.configs],
                                 [c.pooling is not None for c in self.configs], rank=rank, world=world,
                                 transport=first.transport, device=device, pool_on=pool_on,
                                 table_id=self._table_id)
        names = self._router.requests.names  # for errors: what each number of the group is
        names[self._table_id] = f"a ShardedEmbeddingBagCollection of tables {', '.join(c.name for c in self.configs)}"
        for c, t in zip(self.configs, self._table_list):
            names[t._table_id] = f"table {c.name!r} of collection #{self._table_id}"
        # The collection's wire: its all-to-alls (in comm_dtype) and their workspace.
        self._wire = Exchange(group=group, rank=rank, world=world, mirrors=None, sparse=sparse, optimizer=None,
                              comm_dtype=comm_dtype, stats=ExchangeStats(world), transport=first.transport,
                              caller=self._table_id)
        self._stats = self._new_stats()

    # ------------------------------------------------------------------ structure
    @property
    def _table_list(self) -> list[ShardedEmbedding]:
        return [self.tables[c.name] for c in self.configs]

    @property
    def feature_names(self) -> list[str]:
        """Every feature, in table then feature order (the order of `concat`)."""
        return [f for c in self.configs for f in c.feature_names]

    @property
    def pooled_feature_names(self) -> list[str]:
        """The features `concat` puts side by side (those of tables with pooling)."""
        return [f for c in self.configs if c.pooling is not None for f in c.feature_names]

    def embedding_dim(self, feature: str) -> int:
        """The width of ``feature``'s output rows."""
        for c in self.configs:
            if feature in c.feature_names:
                return c.embedding_dim
        raise KeyError(f"no table reads feature {feature!r}")

    # ------------------------------------------------------------------ lookup
    def __deepcopy__(self, memo):
        """An independent collection (its tables copied as `ShardedEmbedding.__deepcopy__`
        copies a table), numbered after its tables like a new one: every rank must copy in the
        same order, and a rank calling the copy while another calls the original raises."""
        new = copy_on_group(self, memo, [self._wire.transport], f"a copy of collection #{self._table_id}")
        new._wire.caller = new._table_id
        return new

    @torch.compiler.disable  # collectives and host-side checks: one graph break, not a trace of them
    def forward(self, features) -> dict[str, torch.Tensor]:
        """Look up every feature's bags; returns ``{feature: [bags, dim] or [ids, dim]}``.

        Collective: the request all-to-all, then the vectors all-to-all; the backward runs the
        gradients all-to-all (with every rank's non-finite flag) and each table's mirror
        all-reduces. Every rank raises together: TypeError / IndexError / ValueError for bad
        input on any rank; RuntimeError if any rank refuses the lookup (a table's storage
        replaced, a fused table under autocast without `use_grad_scaler`) or the ranks differ
        in which tables will run the backward; `NonFiniteGradientError` in the backward."""
        tables = self._table_list
        storages = [t._storage for t in tables]
        grad_tables = [torch.is_grad_enabled() and s.requires_grad for s in storages]
        error = self._refusal(tables, grad_tables)
        bags = None
        if error is None:
            try:
                bags = parse(features, self.configs, self.include_last_offset, self._router.device,
                             [t._storage.dtype for t in tables])
            except InputError as e:
                error = e
        text = error.text if error is not None else ""
        fused = [t.optimizer.digest() for t, g in zip(tables, grad_tables) if g and t.optimizer is not None]
        digest = zlib.crc32(repr(fused).encode()) & 0x7FFFFFFF if fused else 0
        routing = self._router.route(bags, error, grad_tables, self._stats.wire_bytes,
                                     lambda kinds, signatures: self._check(kinds, signatures, text), digest)
        self.__dict__["_lookups"] = routing.call = self._lookups + 1  # (not Module.__setattr__: per call)
        if fused:
            routing.hyperparameters = {k: t.optimizer.hyperparameters() for k, (t, g) in enumerate(zip(tables, grad_tables))
                                       if g and t.optimizer is not None}
            pending.note_lookup()
        self._stats.record_requests(routing)
        exchanges = [t._exchange for t in tables]
        if any(grad_tables):
            outputs = BagLookup.apply(routing, self._wire, exchanges, self._stats, *storages)
        else:
            with torch.no_grad():
                outputs = BagLookup.apply(routing, self._wire, exchanges, self._stats, *storages)
        out = {}
        for c, req, table_out in zip(self.configs, routing.requests, outputs):
            if len(c.feature_names) == 1:
                out[c.feature_names[0]] = table_out
                continue
            start = 0
            for f, n in zip(c.feature_names, req.bags.splits):
                # narrow, not torch.split: a single view can be modified in place under
                # autograd, as nn.EmbeddingBag's output can; split's views cannot
                out[f] = table_out.narrow(0, start, n)
                start += n
        return out

    def concat(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The pooled features of ``out`` (what `forward` returned) side by side:
        ``[batch, sum of their dims]``, in table then feature order (`pooled_feature_names`),
        e.g. for a DLRM interaction layer. No communication."""
        names = self.pooled_feature_names
        missing = [f for f in names if f not in out]
        if missing:
            raise KeyError(f"concat: features {missing} are not in the output given")
        return torch.cat([out[f] for f in names], dim=1)

    def _refusal(self, tables, grad_tables) -> InputError | None:
        """A lookup this rank refuses (carried like bad input, so every rank raises)."""
        dtypes = {c.name: t._storage.dtype for c, t in zip(self.configs, tables)}
        if len(set(dtypes.values())) > 1:  # one buffer carries every table's rows
            return InputError(REFUSED, f"its tables have different dtypes ({', '.join(f'{n}: {d}' for n, d in dtypes.items())}): "
                                       "convert the collection as a whole (ebc.double(), ebc.to(torch.bfloat16)), "
                                       "not one of its tables")
        for c, t, g in zip(self.configs, tables, grad_tables):
            code = t._storage_refusal() or t._fused_refusal(g)
            if code:
                return InputError(REFUSED, f"table {c.name!r}: {REFUSALS[code]}")
        return None

    def _check(self, kinds: list[int], signatures: list[int], text: str) -> None:
        """Every rank sees every rank's error kind and grad signature, and raises alike; the
        texts of the errors travel only then (an all-gather, on the error path alone)."""
        if any(kinds):
            texts = all_gather_strings(text, self.process_group) if self.world_size > 1 else [text]
            kind = min(k for k in kinds if k)
            detail = "; ".join(f"rank {r}: {texts[r]}" for r, k in enumerate(kinds) if k)
            raise EXCEPTIONS[kind](f"ShardedEmbeddingBagCollection: {detail}. No rank looked anything up.")
        if len(set(signatures)) > 1:
            names = [c.name for c in self.configs]
            split = [signature_parts(s, len(names)) for s in signatures]
            if split[0][0] is not None and len({bits for bits, _ in split}) == 1:
                raise_if_step_digests_differ([digest for _, digest in split], "ShardedEmbeddingBagCollection")
            groups: dict[int, list[int]] = {}
            for r, (s, (bits, _)) in enumerate(zip(signatures, split)):
                groups.setdefault(bits if bits is not None else s, []).append(r)
            parts = [f"ranks {ranks}: {_grad_tables_text(s, names)}" for s, ranks in groups.items()]
            raise RuntimeError(
                "ShardedEmbeddingBagCollection: the ranks differ in which tables will run the backward (a "
                f"collective): {'; '.join(parts)} (torch.no_grad / torch.inference_mode, or requires_grad of "
                f"the tables, differ between ranks{'; or the fused optimizers hyperparameters do' if split[0][0] is None else ''}"
                "). Every rank must do the same in each call. No rank looked anything up."
            )

    # ------------------------------------------------------------------ stats
    def _new_stats(self) -> BagStats:
        wire_dtype = self._wire.comm_dtype or self._table_list[0]._storage.dtype
        stats = BagStats(self.world_size, wire_dtype.itemsize)
        stats.ids = {c.name: 0 for c in self.configs}
        return stats

    def stats(self, reset: bool = False) -> dict:
        """What this rank's calls moved since construction (or the last reset), and where each
        table's bags were pooled. No communication.

        ``calls``, ``backward_calls``, ``exchanges`` (the all-to-alls the calls took: the
        requests, the vectors, the gradients) and ``request_overflows`` (calls whose requests
        outgrew the group's request capacity and took a second exchange), ``bytes_sent`` /
        ``bytes_received`` (requests, vectors and gradients of all tables), per call;
        ``tables[name]``: ``ids`` looked up, ``served_per_rank`` (what each
        requester rank, this one included, asked this rank for: ids pooled here, or unique rows
        sent; comparing ranks shows load imbalance), ``calls_pooled_on_requester`` /
        ``calls_pooled_on_owner``, and ``last``: the last call's choice (``pooled_on``) with the
        bytes each way would have sent (``bytes_if_pooled_on_requester``/``_owner``, 0 and 0
        when this rank served every id itself; unique ids are counted on calls pooled on the
        requester and every `bag_routing.REMEASURE` calls, estimated in between:
        ``unique_ids_measured``), and ``ids_stepped_pooled``: ids served here whose fused SGD
        step was added to their rows straight from their bag's gradient, with no per-row sums
        (the compiled `native.bag_scatter_add`; 0 where it is not built or does not apply).
        A sequence table's ids are always gathered on the requester.
        The collection's lookups are counted here, not in its tables' own ``stats()`` (which
        count lookups of a table called on its own); calls and backward passes that raised are
        not counted."""
        s = self._stats
        calls = max(s.calls, 1)
        tables = {}
        for c, choice in zip(self.configs, self._router.choices):
            last = dict(choice.last) if c.pooling is not None else {"pooled_on": "requester (sequence table)"}
            served = list(s.served.get(c.name, [0] * self.world_size))
            tables[c.name] = {"ids": s.ids[c.name], "served_per_rank": served,
                              "calls_pooled_on_requester": choice.on_requester,
                              "calls_pooled_on_owner": choice.on_owner, "last": last,
                              "ids_stepped_pooled": s.stepped_pooled.get(c.name, 0)}
        out = {"calls": s.calls, "backward_calls": s.backward_calls, "exchanges": s.exchanges,
               "request_overflows": s.request_overflows, "bytes_sent": s.bytes_sent,
               "bytes_received": s.bytes_received, "bytes_sent_per_call": s.bytes_sent / calls,
               "bytes_received_per_call": s.bytes_received / calls, "tables": tables}
        if reset:
            self._stats = self._new_stats()
            for choice in self._router.choices:
                choice.on_requester = choice.on_owner = 0
        return out

    def extra_repr(self) -> str:
        return f"features={self.feature_names}, rank={self.rank}/{self.world_size}"


def _spread(c: TableConfig, k: int, world: int):
    """(placement, num_devices) of the ``k``-th table: round robin starts at rank ``k % n``
    (``n``: ``num_devices``), so that the first pages of the tables, the hottest under the
    skewed id laws of recommendation data, are not all served by rank 0 (measured: 8 tables of
    Zipf ids on 2 ranks, 297/206 ms CPU per rank-step before). Anything else as given (and
    checked by `ShardedEmbedding`)."""
    n = world if c.num_devices == -1 else c.num_devices
    if not (isinstance(c.placement, str) and c.placement == "round_robin") or type(n) is not int \
            or not 1 <= n <= world or k % n == 0:
        return c.placement, c.num_devices
    if type(c.num_embeddings) is not int or type(c.page_size) is not int or c.num_embeddings < 1 \
            or c.page_size < 1:
        return c.placement, c.num_devices
    return [(p + k) % n for p in range(-(-c.num_embeddings // c.page_size))], -1


def _grad_tables_text(signature: int, names: list[str]) -> str:
    if len(names) > 32:
        return f"signature {signature}"
    tables = [n for t, n in enumerate(names) if signature >> t & 1]
    return f"tables {tables}" if tables else "no table"


def _check_configs(tables) -> str | None:
    """What is wrong with the table configs (None: fine)."""
    if not isinstance(tables, list) or not tables:
        return "tables must be a non-empty list of TableConfig"
    seen_tables, seen_features = set(), {}
    for c in tables:
        if not isinstance(c, TableConfig):
            return f"tables must be TableConfig, got {type(c).__name__}"
        if not isinstance(c.name, str) or not c.name or "." in c.name:
            return f"table name {c.name!r} must be a non-empty string without dots"
        if hasattr(Tables(), c.name):
            return f"table name {c.name!r} is taken by torch.nn.Module (an attribute of every module): rename the table"
        if c.name in seen_tables:
            return f"two tables are named {c.name!r}"
        seen_tables.add(c.name)
        if c.pooling not in POOLINGS:
            return f"table {c.name!r}: pooling={c.pooling!r} is not one of {list(POOLINGS)}"
        if not c.feature_names:
            return f"table {c.name!r} has no feature_names"
        for f in c.feature_names:
            if not isinstance(f, str) or not f:
                return f"table {c.name!r}: feature name {f!r} must be a non-empty string"
            if f in seen_features:
                return f"feature {f!r} is read by tables {seen_features[f]!r} and {c.name!r}: a feature reads one table"
            seen_features[f] = c.name
        if c.fused_optimizer is not None and not isinstance(c.fused_optimizer, Mapping):
            return f"table {c.name!r}: fused_optimizer must be a dict, got {type(c.fused_optimizer).__name__}"
    return None


def _table_fields(tables) -> dict:
    """The tables' arguments as ``{"tables[k] field": text}`` for the ranks' agreement check,
    so that an error names the field that differs and each rank's value. Equal arguments
    written differently compare equal: a placement list or tuple, an optimizer's keys in any
    order, ``1`` or ``1.0``."""
    import dataclasses
    import hashlib

    def number(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    def placement(p):
        if isinstance(p, str):
            return p
        entries = [list(e) if isinstance(e, (list, tuple)) else e for e in p]
        text = json.dumps(entries, default=str)
        if len(entries) <= 8:
            return text
        return f"{len(entries)} pages, starting {json.dumps(entries[:4], default=str)[:-1]}, ...] " \
               f"(digest {hashlib.blake2b(text.encode(), digest_size=6).hexdigest()})"

    out = {"number of tables": len(tables)}
    for k, c in enumerate(tables):
        for f in dataclasses.fields(c):
            v = getattr(c, f.name)
            if f.name == "placement":
                v = placement(v)
            elif f.name == "fused_optimizer" and v is not None:
                v = json.dumps({str(key): number(x) for key, x in sorted(dict(v).items())}, default=str)
            elif f.name == "feature_names" and v is not None:
                v = list(v)
            out[f"tables[{k}] {f.name}"] = v if isinstance(v, (int, float, str, list, type(None))) else repr(v)
    return out
