"""Routing: turn one rank's ids into requests to the ranks that serve them.

Every rank of the group runs `Router.route` once per lookup call, in the same order:

1. validate the ids, translate them to (serving rank, local row on it) -- the requester
   knows the plan -- and deduplicate them with one sort, which also orders them by peer;
2. ``all_to_all_single`` of one int64 *request* per peer: a header (how many values follow,
   the most this rank sends any peer, the table's number) and a body -- this rank's error
   code and value and whether it will backpropagate through this lookup, then the rows it
   asks of that peer -- up to ``capacity`` values. Ranks looking up different tables, bad
   input on any rank (float ids, an id out of range), a lookup the table refuses on some rank
   (see `REFUSALS`), or ranks that disagree on running the backward (a collective) reach every
   rank in this exchange, and all ranks raise the same error together before anything else
   moves; the good path pays no extra collective for it;
3. only if some rank's body was longer than ``capacity`` (every rank can tell, from the
   headers): ``all_to_all_single`` of the values that did not fit, with ragged splits.

``capacity`` is the same on every rank: each derives it from the longest request of the last
call (all ranks see it in the headers), with headroom, so in steady state a lookup costs one
small exchange before the vectors move instead of TorchRec's two (splits, then ids). It is
shared by all the tables and collections of a group, so a request is as wide whatever a rank
calls. Requests for pages this rank holds never leave it. The vectors travel in `lookup`.

`RequestExchange` is steps 2-3 on their own (a header, then the caller's columns and int64
payload under the adaptive capacity): `Router` uses it for one table's lookups, and
`bag_routing` for all the tables of a `ShardedEmbeddingBagCollection` at once.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from . import native
from .placement import RoutingTable
from .rows import group
from .transport import Transport, TransportError
from .wire import FLOAT_DTYPES

__all__ = ["Routing", "Router", "RequestExchange", "Received"]

_OK, _OUT_OF_RANGE, _NOT_INTEGER, _NOT_TENSOR, _REFUSED = 0, 1, 2, 3, 4
_SPARSE, _NESTED, _NO_DATA, _UNREADABLE = 1, 2, 3, 4  # the value of a _NOT_TENSOR error: what the tensor is instead
_NOT_DENSE = {_SPARSE: "a sparse tensor (pass ids.to_dense() or its values)", _NESTED: "a nested tensor",
              _NO_DATA: "a tensor without data (the meta device)",
              _UNREADABLE: "a tensor whose values cannot be read (its storage freed or not allocated, or a "
                           "transform's wrapper such as torch.func.vmap's)"}
# The header `RequestExchange` puts before the body of a request: the body's length, the
# sender's longest body to any peer, the number of the table (or collection) being looked up,
# how many of the body's values are the caller's columns.
_COUNT, _LARGEST, _CALLER, _COLUMNS = 0, 1, 2, 3
_FIXED = 4
# A single table's own columns, first in the body (`Router._exchange`: error code, error value,
# grad mode), so a table's request has TABLE_HEADER int64 values before its rows (the planner's
# byte model reads it).
_TABLE_COLUMNS = 3
TABLE_HEADER = _FIXED + _TABLE_COLUMNS

# Lookups a table refuses on a rank (`Router.route(refusal=...)`), by code; every rank raises
# RuntimeError with the text. Codes are the error value carried in the header.
STORAGE_REPLACED, AUTOCAST_WITHOUT_SCALER_POLICY, STORAGE_RESHAPED, HOOK_ON_FUSED, STORAGE_FREED = 1, 2, 3, 4, 5
REFUSALS = {
    STORAGE_REPLACED: (
        "the table's storage parameter `weight` was replaced by another tensor (torch.distributed.fsdp's "
        "fully_shard or FullyShardedDataParallel, or an assignment to .weight): the pages must stay where "
        "the table put them. Leave the table out of FSDP: fully_shard(model, ignored_params="
        "set(sharded_embedding.table_parameters(model))), or shard only the dense sub-modules. "
        "The table's own rows are unchanged"
    ),
    STORAGE_RESHAPED: (
        "the table's storage no longer has the shape of its rows (FullyShardedDataParallel with "
        "use_orig_params=True flattens it into its own parameter): this rank's rows are no longer in the "
        "table. Rebuild the table (or load a checkpoint) and leave it out of FSDP: "
        "FullyShardedDataParallel(model, ignored_states=sharded_embedding.table_parameters(model)), "
        "fully_shard(model, ignored_params=set(sharded_embedding.table_parameters(model))), or shard only "
        "the dense sub-modules"
    ),
    STORAGE_FREED: (
        "the table's storage does not hold its rows any more (its memory was freed or shrunk: "
        "weight.untyped_storage().resize_(...), or a wrapper that frees parameters between uses): this rank's "
        "rows are gone. Rebuild the table (or load a checkpoint), and leave it out of wrappers that free "
        "parameters"
    ),
    HOOK_ON_FUSED: (
        "a table with a fused optimizer has a gradient hook on its weight (register_hook or "
        "register_post_accumulate_grad_hook): the table updates its rows inside the backward and never "
        "forms that gradient, so the hook would get None after the rows changed. Remove the hook "
        "(handle.remove()), or train the table without fused_optimizer and hook its gradient there"
    ),
    AUTOCAST_WITHOUT_SCALER_POLICY: (
        "a table with a fused optimizer is trained under torch.autocast, but nobody said whether a "
        "GradScaler scales the loss: its update happens inside the backward, so it must unscale the "
        "gradient itself and skip the steps the scaler skips. Call "
        "sharded_embedding.use_grad_scaler(model, scaler) with the torch.amp.GradScaler you step the "
        "other optimizers with, or sharded_embedding.use_grad_scaler(model, None) if the loss is not scaled"
    ),
}
# Every dtype torch names, by code (in one order on every rank running this torch), so that
# every rank can name the dtype a peer passed.
_INDEX_DTYPES = tuple(sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str))


@dataclass
class _Bags:
    """Positions of the ids grouped by unique id (``indices``), each group starting at
    ``offsets``: an embedding_bag over the output gradient sums each unique id's gradient."""

    indices: torch.Tensor
    offsets: torch.Tensor


@dataclass
class Routing:
    """How the ids of one lookup call travel, built by `Router.route`, used by `lookup`.

    As a requester, this rank gathers the answers to its unique ids in one buffer: first the
    rows asked of peers, in peer order (``requested_counts``, ``num_remote`` in all), then the
    rows it serves itself (``num_self``). ``gather_index[i]`` is the buffer row of id ``i``.

    As an owner, ``owner_rows`` lists the local rows it reads: first its own ``num_self``
    rows, then the rows peers asked for, in peer order (``served_counts``, ``num_served``).
    So ``[requested | own | served]`` is one contiguous layout: the backward keeps its
    gradients in it and the last two parts line up with ``owner_rows``.
    """

    shape: torch.Size
    gather_index: torch.Tensor
    bags: _Bags
    requested_counts: list[int]
    served_counts: list[int]
    owner_rows: torch.Tensor
    ints_sent: int  # int64 values this rank sent / received while routing (headers, rows)
    ints_received: int
    request_exchanges: int = 0  # all-to-alls the routing took: 1, 2 when a request outgrew the capacity (0 alone)
    call: int = 0  # the table's lookup number (alike on every rank): tags its exchanges
    hyperparameters: dict | None = None  # the fused step's, as every rank agreed at the lookup

    @functools.cached_property  # (read several times per lookup; a Routing does not change)
    def num_remote(self) -> int:
        return sum(self.requested_counts)

    @functools.cached_property
    def num_served(self) -> int:
        return sum(self.served_counts)

    @functools.cached_property
    def num_self(self) -> int:
        return self.owner_rows.numel() - self.num_served

    @functools.cached_property
    def num_unique(self) -> int:
        return self.num_remote + self.num_self


class Router:
    """Routes one rank's lookups over ``group`` according to its `RoutingTable`."""

    def __init__(self, table: RoutingTable, *, page_size: int, num_embeddings: int, max_local_rows: int,
                 rank: int, world: int, transport: Transport, device: torch.device, table_id: int = 0):
        self.page_size, self.num_embeddings, self.table_id = page_size, num_embeddings, table_id
        self.rank, self.world, self.transport, self.device = rank, world, transport, device
        pages = torch.arange(table.dest_rank.numel(), dtype=torch.int64)
        # Per page: the sort key of its requests (the serving rank; this rank itself sorts
        # last, as its rows are served locally) and the shift from a global id to the
        # serving rank's local row.
        self._key = torch.where(table.dest_rank == rank, world, table.dest_rank).to(device)
        self._shift = (table.dest_offset - pages * page_size).to(device)
        # (serving rank, local row) packs into rank * stride + row. Where keys fit int32 (so do
        # the ids: num_embeddings < stride * world), `dedup` makes them in int32 with one table
        # lookup per id: page -> shift + rank * stride.
        self.stride = max_local_rows + 1
        fits32 = (world + 1) * self.stride < 2**31
        self._key_dtype = torch.int32 if fits32 else torch.int64
        self._offset32 = None
        if fits32 and num_embeddings < 2**31:
            offset = self._shift + (self._key * self.stride if world > 1 else 0)
            self._offset32 = offset.to(torch.int32)
        self._page_bits = page_size.bit_length() - 1 if page_size & (page_size - 1) == 0 else None
        self.requests = RequestExchange.shared(transport, rank, world, device)

    def route(self, indices, *, refusal: int = 0, needs_grad: bool = False,
              dtype: torch.dtype | None = None, step_digest: int = 0) -> Routing:
        """Deduplicate ``indices``, tell every peer what this rank needs, learn what to serve.

        ``refusal``: a `REFUSALS` code if this rank's table refuses the lookup. ``needs_grad``:
        this rank will backpropagate through the lookup (its backward is a collective too).
        ``dtype``: the table's rows (the vectors' width on the wire; alike on every rank).
        ``step_digest``: 31 bits of the fused optimizer's hyperparameters (`FusedOptimizer.digest`)
        when the lookup will run a fused step, else 0 (alike on every rank).

        Collective over the group: one ``all_to_all_single`` (two when a request outgrew the
        capacity), none in a group of one. Raises TypeError/IndexError on every rank if any
        rank's input is bad, RuntimeError if any rank refused or the ranks disagree on
        ``needs_grad``, ``dtype`` or ``step_digest``.
        """
        mode = int(needs_grad) | (_dtype_code(dtype) << 1) | (step_digest << 8)  # one header column for all
        compiled = None if refusal else self._route_compiled(indices)
        if compiled is not None:  # the same values as the passes below, in one compiled sort
            shape, gather_index, bags, rows, counts = compiled
            if self.world == 1:
                return Routing(shape, gather_index, bags, [0], [0], rows, 0, 0)
            return self._exchange(shape, gather_index, bags, rows, counts, _OK, 0, mode)
        if refusal:
            flat, shape, code, value = None, None, _REFUSED, refusal
        else:
            flat, shape, code, value = validate_ids(indices, self.num_embeddings, self.device)
        if code != _OK:
            if self.world == 1:
                _raise_input_errors([code], [value], self.num_embeddings)
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return self._exchange(shape, empty, None, empty, [0] * (self.world + 1), code, value, mode)
        gather_index, bags, keys = self.dedup(flat)
        if self.world == 1:
            return Routing(shape, gather_index, bags, [0], [0], keys, 0, 0)
        peer, rows = self.split(keys)
        counts = torch.bincount(peer, minlength=self.world + 1).tolist()  # one device sync
        return self._exchange(shape, gather_index, bags, rows, counts, _OK, 0, mode)

    def _route_compiled(self, indices):
        """`validate_ids`, `dedup`, `split` and the count per peer in one compiled pass
        (`native.dedup`), where it applies: the compiled loops `available`, CPU ids of int32 or
        int64 on a CPU table whose keys fit int32. Returns (shape, gather_index, bags, rows,
        counts per peer) -- with one rank, the local rows -- or None: the passes of `route` then
        do it, and find the bad input (an id out of range: ``dedup`` raised IndexError; ids it
        cannot read: TypeError)."""
        if not (self._offset32 is not None and type(indices) is torch.Tensor and native.available()
                and indices.dtype in (torch.int32, torch.int64) and indices.layout == torch.strided
                and indices.device.type == "cpu" and self.device.type == "cpu" and not indices.is_nested
                and indices.numel() < 2**31 and native.holds_data(indices)):  # (reshape may copy: read it)
            return None
        world = self.world
        try:
            unique, perm, offsets, gather_index, counts = native.dedup(
                indices.reshape(-1), (world + 1) * self.stride, limit=self.num_embeddings, page_offset=self._offset32,
                page_size=self.page_size, stride=self.stride if world > 1 else 0, buckets=world + 1)
        except (IndexError, TypeError):  # an id out of range, a storage that does not hold the ids
            return None
        return indices.shape, gather_index, _Bags(perm, offsets), unique, counts

    def keys(self, flat: torch.Tensor) -> torch.Tensor:
        """Each id of ``flat`` (int64, in range) as the int64 key ``serving rank * stride +
        its local row there``, where this rank itself counts as rank ``world`` (its rows sort
        last). The requester knows the plan, so owners only gather rows."""
        page = torch.div(flat, self.page_size, rounding_mode="floor")
        keys = flat + self._shift[page]  # the serving rank's local rows
        if self.world > 1:
            keys.add_(self._key[page], alpha=self.stride)
        return keys

    def _keys32(self, flat: torch.Tensor) -> torch.Tensor:
        """`keys` in int32 (where they fit): half the bytes per pass, one lookup per id, a shift
        for a power-of-two page size. The same values as `keys`."""
        ids = flat.to(torch.int32)
        if self._page_bits is not None:
            page = torch.bitwise_right_shift(ids, self._page_bits)
        else:
            page = torch.div(ids, self.page_size, rounding_mode="floor")
        return ids.add_(torch.index_select(self._offset32, 0, page))

    def split(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys -> (serving rank, ``world`` for this rank; local row there)."""
        peer = torch.div(keys, self.stride, rounding_mode="floor")
        return peer, keys - peer * self.stride

    def destinations(self, flat: torch.Tensor, dest_of_page: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(serving rank, local row there) of each id of ``flat``, the key of `keys` in two
        parts; ``dest_of_page`` is `page_destinations` in the dtype the caller wants."""
        ps = self.page_size  # ids are checked >= 0 by now: a power of two's floor division is a shift
        page = flat >> (ps.bit_length() - 1) if ps & (ps - 1) == 0 else torch.div(flat, ps, rounding_mode="floor")
        # index_select: several times faster than indexing with a tensor on the CPU
        return dest_of_page.index_select(0, page), self._shift.index_select(0, page).add_(flat)

    @property
    def page_shift(self) -> torch.Tensor:
        """Per page, the shift from a global id to its serving rank's local row (int64)."""
        return self._shift

    def page_destinations(self) -> torch.Tensor:
        """The serving rank of each page's lookups, this rank counted as ``world`` (int64)."""
        return self._key if self.world > 1 else torch.ones_like(self._key)

    def dedup(self, flat: torch.Tensor, keys: torch.Tensor | None = None):
        """One sort does it all. Each id becomes its key (`keys`; pass them if computed
        already), own rows last; equal keys are duplicate ids; the sorted order is peer-major,
        the layout the exchanges send; and the permutation groups each unique id's positions
        (the bags the backward sums). The sort is stable (`rows.group`): each bag lists
        its positions in order, so a unique id's gradient is the sum of its duplicates' in the
        order they were looked up. Returns (gather_index, bags, unique keys in sorted order,
        int64)."""
        if keys is None:
            keys = self._keys32(flat) if self._offset32 is not None else self.keys(flat)
        unique, perm, offsets, gather_index = group(keys, bound=(self.world + 1) * self.stride)
        return gather_index, _Bags(perm, offsets), unique

    def _exchange(self, shape, gather_index, bags, rows, counts: list[int], code: int, value: int,
                  mode: int) -> Routing:
        """Send each peer its request (header + rows, `RequestExchange`); own rows stay here."""
        world = self.world
        num_own = counts[world]
        num_asked = rows.numel() - num_own
        columns = [[code, value, mode]] * world  # (lists: read as they are, not a tensor)

        def check(header: list[list[int]]) -> None:  # every rank sees every rank's columns
            if header[0][0] == _OK and header.count(header[0]) == world:
                return  # (the common case: every rank's ids fine, the same mode everywhere)
            _raise_input_errors([h[0] for h in header], [h[1] for h in header], self.num_embeddings)
            modes = [h[2] for h in header]
            _raise_if_grad_modes_differ([m & 1 for m in modes])
            _raise_if_dtypes_differ([(m >> 1) & 0x7F for m in modes])
            raise_if_step_digests_differ([m >> 8 for m in modes], "ShardedEmbedding")

        asked = rows[:num_asked].split_with_sizes(counts[:world])  # peer-major: one piece per peer
        got = self.requests.exchange(columns, [[piece] for piece in asked], check=check,
                                     caller=self.table_id)
        owner_rows = torch.cat([rows[num_asked:], *got.payload])
        return Routing(shape, gather_index, bags, counts[:world], got.served, owner_rows, got.ints_sent,
                       got.ints_received, got.exchanges)


@dataclass
class Received:
    """What `RequestExchange.exchange` brought: each peer's header columns (``header[r]``: rank
    ``r``'s columns, a list of ints), its payload (device, one int64 tensor per peer, ``served[q]`` values from
    peer ``q``; views of the receive buffer), the int64 values this rank sent and received, and
    the all-to-alls it took (2 when some body outgrew the capacity)."""

    header: list[list[int]]
    payload: list[torch.Tensor]
    served: list[int]
    ints_sent: int
    ints_received: int
    exchanges: int = 1


class RequestExchange:
    """One ``all_to_all_single`` of an int64 request per peer: a fixed header (the body's
    length, the sender's longest body to any peer, the number of the table or collection it is
    looking up, how many of the body's values are the caller's columns), then the body -- the
    caller's columns and its payload -- up to ``capacity`` values; when some body outgrew the
    capacity (every rank can tell from the headers), a second, ragged all-to-all with the rest.

    Every table and collection of one transport (one process group) shares one exchange
    (`shared`), so a request has the same width whatever a rank is calling: a rank that calls
    one table while another calls a different table or a collection sends as many bytes as the
    others expect, and every rank raises the same RuntimeError from the headers. (With widths
    of their own, gloo aborted the process whose peer sent more than it expected.)

    ``capacity`` is the same on every rank: per caller, the longest body of its last call, seen
    by all in the headers, with 25% headroom, halving at most per call; the width is the
    largest of the callers seen in the last `_FORGET` calls. So in steady state a request
    costs one exchange, and the header rides with the payload. A caller left uncalled for
    twice its own period (the calls between its last two calls; for a caller seen once, the
    number of callers) halves its capacity at every further call: one large lookup of a table
    (an evaluation batch) no longer widens every other table's requests for `_FORGET` calls,
    while a table called in a steady rhythm, however many other calls come between, keeps its
    capacity; an evaluation's next large lookup takes the second exchange once.
    """

    _FORGET = 64

    @classmethod
    def shared(cls, transport: Transport | None, rank: int, world: int, device: torch.device) -> "RequestExchange":
        """The request exchange of ``transport`` on ``device`` (made on first use)."""
        if transport is None:  # a router built without a group (tests of its local steps)
            return cls(transport, rank, world, device)
        per_device = _SHARED.setdefault(transport, {})
        key = str(torch.device(device))
        if key not in per_device:
            per_device[key] = cls(transport, rank, world, device)
        return per_device[key]

    def __init__(self, transport: Transport | None, rank: int, world: int, device: torch.device):
        self.transport, self.rank, self.world, self.device = transport, rank, world, device
        # caller -> (body capacity, call it was last seen, calls between its last two calls or 0)
        self._capacities: dict[int, tuple[int, int, int]] = {}
        self._calls = 0
        self.names: dict[int, str] = {}  # caller -> what it is, for errors (set by the caller's owner)

    @property
    def capacity(self) -> int:
        """Body values every request row holds in the next call (the same on every rank)."""
        return max((c for c, _, _ in self._capacities.values()), default=0)

    def exchange(self, columns: torch.Tensor | list[list[int]], pieces: list[list[torch.Tensor]], *, check=None,
                 caller: int = 0) -> Received:
        """Send ``columns[q]`` (int64 ``[world, k]`` on the host, or ``world`` lists of ``k``
        ints) and the payload ``pieces[q]``
        (int64 tensors on the device, one after the other) to each peer ``q`` (``pieces[rank]``
        must be empty: a rank's own requests never travel). ``caller``: the number of the table
        (or collection) this rank is looking up; ranks that differ raise RuntimeError together,
        before any body is read. Then ``check(header)`` is called on every rank with every
        peer's columns (``header[r]``: rank ``r``'s ``k`` ints) before any payload is used: raise
        there and every rank raises together.

        The request is built in the transport's send buffer (the shared-memory outbox: it
        leaves without a copy), the headers and columns of all peers in one copy, and read back
        in one ``tolist``. Collective: one ``all_to_all_single``, two when a body outgrew the
        capacity."""
        world, device, cap = self.world, self.device, self.capacity
        width = _FIXED + cap
        if isinstance(columns, torch.Tensor):
            k, columns = columns.shape[1], columns.tolist()
        else:
            k = len(columns[0])
        counts = [k + sum(t.numel() for t in parts) for parts in pieces]
        largest = max(counts)
        request = self.transport.send_buffer(world * width * 8, device).view(torch.int64).view(world, width)
        # On the CPU the request is written and read through numpy views: the same bytes, at a
        # fraction of a torch call's dispatch per piece (this runs at every lookup).
        host = request.numpy() if request.device.type == "cpu" else None
        fit = min(k, cap)  # the columns that fit in the request (all of them but in a group's first calls)
        fixed = [[n, largest, caller, k, *c[:fit]] for n, c in zip(counts, columns)]
        if host is not None:
            host[:, : _FIXED + fit] = fixed
        else:
            request[:, : _FIXED + fit] = torch.tensor(fixed, dtype=torch.int64)
        rest = []  # what did not fit, peer after peer (the values past a body are left as they are)
        for q, parts in enumerate(pieces):  # each piece is copied once, into the request row
            if fit < k:
                rest.append(torch.tensor(columns[q][fit:], dtype=torch.int64, device=device))
            at = _FIXED + k
            for t in parts:
                n = t.numel()
                here = max(0, min(n, width - at))
                if here and host is not None:
                    host[q, at : at + here] = t[:here].numpy()
                elif here:
                    request[q, at : at + here] = t[:here]
                if here < n:
                    rest.append(t[here:])
                at += n
        received = torch.empty(world, width, dtype=torch.int64, device=device)
        self.transport.all_to_all(received, request, [1] * world, [1] * world, tag="requests")()  # header + values
        arrived = received.numpy() if host is not None else received
        head = arrived[:, : _FIXED + fit].tolist()  # one device sync: every rank's header and columns
        _raise_if_not_requests(head)
        sizes, largests, callers = ([h[i] for h in head] for i in (_COUNT, _LARGEST, _CALLER))
        self._remember(callers, largests)  # before raising: every rank alike
        _raise_if_tables_differ(callers, self.names)
        wire = (world - 1) * width  # int64s each way in the request exchange
        if max(largests) <= cap:
            payload = [torch.from_numpy(arrived[r, _FIXED + k : _FIXED + sizes[r]]) if host is not None
                       else received[r, _FIXED + k : _FIXED + sizes[r]] for r in range(world)]
            sent, got, exchanges = wire, wire, 1
        else:  # some body outgrew the capacity: the rest follows (splits known to all from the headers)
            extra_in = [max(c - cap, 0) for c in sizes]
            extra_out = [max(c - cap, 0) for c in counts]
            extra = torch.empty(sum(extra_in), dtype=torch.int64, device=device)
            send = torch.cat(rest) if rest else extra.new_empty(0)
            self.transport.all_to_all(extra, send, extra_in, extra_out, tag="overflow")()  # overflow
            at, bodies = 0, []
            for r in range(world):  # O(world), only on calls where the capacity grows
                first = received[r, _FIXED : _FIXED + min(sizes[r], cap)]
                bodies.append(torch.cat([first, extra[at : at + extra_in[r]]]) if extra_in[r] else first)
                at += extra_in[r]
            if fit < k:  # one device sync
                head = [h[:_FIXED] + c for h, c in zip(head, torch.stack([b[:k] for b in bodies]).tolist())]
            payload = [b[k:] for b in bodies]
            sent = wire + sum(n for q, n in enumerate(extra_out) if q != self.rank)  # what left this rank
            got = wire + sum(n for q, n in enumerate(extra_in) if q != self.rank)
            exchanges = 2
        header = [h[_FIXED:] for h in head]
        if check is not None:
            check(header)
        return Received(header, payload, [n - k for n in sizes], sent, got, exchanges)

    def _remember(self, callers: list[int], largest: list[int]) -> None:
        """Each caller's capacity after a call (from every rank's header: the same everywhere)."""
        self._calls += 1
        for c in set(callers):
            longest = max(largest) if callers.count(c) == len(callers) else \
                max(n for r, n in enumerate(largest) if callers[r] == c)
            before, seen, _ = self._capacities.get(c, (0, 0, 0))
            period = self._calls - seen if c in self._capacities else 0
            self._capacities[c] = (max(-(-longest * 5 // 4), before // 2), self._calls, period)
        callers_seen = len(self._capacities)
        for c, (capacity, seen, period) in list(self._capacities.items()):
            idle = self._calls - seen
            if idle >= self._FORGET:
                del self._capacities[c]
            elif idle >= 2 * (period or callers_seen):  # overdue by its own rhythm: let its width go
                self._capacities[c] = (capacity // 2, seen, period)


_SHARED: "weakref.WeakKeyDictionary[Transport, dict[str, RequestExchange]]" = weakref.WeakKeyDictionary()


def validate_ids(indices, num_embeddings: int, device: torch.device):
    """Flatten ``indices`` to int64 on ``device``; returns (flat, shape, error code, error value)."""
    if not isinstance(indices, torch.Tensor):
        try:
            indices = torch.as_tensor(indices)
        except Exception:  # noqa: BLE001 - whatever the object raises, on this rank alone
            return None, None, _NOT_TENSOR, 0
    # A tensor that is not dense or holds no data raises in reshape / aminmax: on this rank alone.
    kind = _NESTED if indices.is_nested else _SPARSE if indices.layout != torch.strided else \
        _NO_DATA if indices.is_meta else 0
    if kind:
        return None, None, _NOT_TENSOR, kind
    if indices.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
        code = _INDEX_DTYPES.index(indices.dtype) if indices.dtype in _INDEX_DTYPES else -1
        return None, None, _NOT_INTEGER, code
    if not native.holds_data(indices):  # PyTorch's kernels would read it raw; or a vmap wrapper (no storage)
        return None, None, _NOT_TENSOR, _UNREADABLE
    try:  # anything else that cannot be read raises here: on this rank alone
        flat = indices.reshape(-1).to(device=device, dtype=torch.int64)
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(flat)).tolist()) if flat.numel() else (0, 0)
    except Exception:  # noqa: BLE001 - told to every rank instead
        return None, None, _NOT_TENSOR, _UNREADABLE
    if flat.numel():
        if lo < 0:
            return None, None, _OUT_OF_RANGE, lo
        if hi >= num_embeddings:
            return None, None, _OUT_OF_RANGE, hi
    return flat, indices.shape, _OK, 0


def _raise_if_not_requests(header: list[list[int]]) -> None:
    """What arrived must be request headers (``header[r]``: rank ``r``'s fixed columns; a peer in
    another kind of exchange, which a transport that cannot tell exchanges apart delivers, sends
    rows): refuse values no request can hold before they set the group's capacity. Plain Python
    over the ranks: a handful of tensor ops on so few values cost more (measured)."""
    bad = [r for r, h in enumerate(header)
           if not (0 <= h[_COUNT] <= h[_LARGEST] < 2**40 and 0 <= h[_CALLER] < 2**31
                   and 0 <= h[_COLUMNS] <= min(1 << 16, h[_COUNT]))]
    if bad:
        raise TransportError(
            f"the request exchange received something that is not a request from ranks {bad}: the ranks are not "
            "making the same calls (every rank must run the same lookups and backward passes, in the same order)")


def _raise_if_tables_differ(tables: list[int], names: dict[int, str] | None = None) -> None:
    """Every rank must be looking up the same table in this exchange (the tables of a group
    share its transport, so a rank calling table A while another calls table B would otherwise
    mix their rows). ``names``: what each number is (the same on every rank: numbers follow
    construction, which every rank does alike)."""
    if len(set(tables)) > 1:
        names = names or {}
        by_rank = ", ".join(f"rank {r}: table #{t}" + (f" ({names[t]})" if t in names else "")
                            for r, t in enumerate(tables))
        raise RuntimeError(
            f"sharded-embedding: the ranks called the lookups of different tables ({by_rank}; tables are numbered "
            "in the order each rank made them on this process group, a ShardedEmbeddingBagCollection after its "
            "tables, a copy when it is made). Every rank must call the same tables in the same order. No rank "
            "looked anything up."
        )


def _raise_if_grad_modes_differ(needs_grad: list[int]) -> None:
    """Every rank must run this lookup's backward, or none: it is a collective."""
    if len(set(needs_grad)) > 1:
        with_grad = [r for r, g in enumerate(needs_grad) if g]
        without = [r for r, g in enumerate(needs_grad) if not g]
        raise RuntimeError(
            f"ShardedEmbedding: ranks {with_grad} look up with gradients (they will run the backward, a "
            f"collective) and ranks {without} without (torch.no_grad / torch.inference_mode, or "
            "requires_grad of the table, differ between ranks). Every rank must do the same in each "
            "lookup call. No rank looked anything up."
        )


_DTYPES = (None, *FLOAT_DTYPES)


def _dtype_code(dtype: torch.dtype | None) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _raise_if_dtypes_differ(codes: list[int]) -> None:
    """The rows' dtype sets the vectors' bytes on the wire: a table converted on some ranks only
    (``emb.double()`` on one) would send what its peers do not expect."""
    if len(set(codes)) > 1:
        names = ", ".join(f"rank {r}: {_DTYPES[c] if c < len(_DTYPES) else 'another'}" for r, c in enumerate(codes))
        raise RuntimeError(
            f"ShardedEmbedding: the table's rows have different dtypes on the ranks ({names}): convert it on every "
            "rank alike (.double(), .to(torch.bfloat16), ...). No rank looked anything up."
        )


def raise_if_step_digests_differ(digests: list[int], what: str) -> None:
    """A fused step with other hyperparameters on some ranks would update their pages (and
    mirrored replicas) differently: nn.Embedding has one learning rate."""
    if len(set(digests)) > 1:
        groups: dict[int, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        raise RuntimeError(
            f"{what}: the fused optimizer's hyperparameters differ between ranks (ranks grouped by them: "
            f"{list(groups.values())}), e.g. emb.optimizer.lr set, or a schedule stepped, on some ranks only: "
            "set them alike on every rank. No rank looked anything up."
        )


def _raise_input_errors(codes: list[int], values: list[int], num_embeddings: int) -> None:
    """Raise the same error on every rank if any rank's input was bad or any rank refused the
    lookup (codes and values by rank)."""
    if not any(codes):
        return
    refused = [(r, v) for r, (c, v) in enumerate(zip(codes, values)) if c == _REFUSED]
    if refused:
        reasons = sorted({v for _, v in refused})
        ranks = [r for r, _ in refused]
        text = "; ".join(REFUSALS.get(v, f"refusal {v}") for v in reasons)
        raise RuntimeError(f"ShardedEmbedding refuses this lookup (on ranks {ranks}): {text}. "
                           "No rank looked anything up.")
    bad_type = [(r, v) for r, (c, v) in enumerate(zip(codes, values)) if c in (_NOT_INTEGER, _NOT_TENSOR)]
    if bad_type:
        parts = []
        for r, v in bad_type:
            if codes[r] == _NOT_TENSOR:
                parts.append(f"rank {r} passed {_NOT_DENSE.get(v, 'something that is not a tensor of indices')}")
            else:
                name = str(_INDEX_DTYPES[v]) if 0 <= v < len(_INDEX_DTYPES) else "one this rank's torch does not name"
                parts.append(f"rank {r} passed indices of dtype {name}")
        raise TypeError(
            "ShardedEmbedding indices must be a dense tensor of torch.int64 or torch.int32 (what nn.Embedding "
            "takes): "
            + "; ".join(parts)
            + ". No rank looked anything up."
        )
    parts = [f"index {v} on rank {r}" for r, (c, v) in enumerate(zip(codes, values)) if c == _OUT_OF_RANGE]
    raise IndexError(
        f"index out of range for a table of {num_embeddings} rows (valid: 0..{num_embeddings - 1}): "
        + "; ".join(parts)
        + ". No rank looked anything up."
    )
