"""Routing for a `ShardedEmbeddingBagCollection`: the requests of every table in one exchange,
and, per table, where its bags are pooled.

Each table's ids are translated by the table's own `routing.Router` into (serving rank, local
row there), as a `ShardedEmbedding` lookup does. Then, per table and call, this rank (the
requester) pools the table's bags in one of two places:

- **on the requester**: the ids are deduplicated (`Router.dedup`, one sort); each serving rank
  is asked once for each unique row and sends it back; the requester pools the bags from them
  (the backward sums each unique row's gradient over its bags and sends it once);
- **on the owners** (TorchRec's row-wise way): each serving rank gets the ids it holds, bag by
  bag and not deduplicated, with their weights, and sends back one partial sum per (bag,
  serving rank) pair, which the requester adds up (the backward sends each pair's gradient).

The choice is by the bytes each would send: on the requester, ``unique ids x (8 + row bytes)``
for the vectors (and as much again of gradients); on the owners, ``ids x 8 + pairs x row
bytes`` (and again for gradients). Ids and pairs are counted every call (O(ids)); unique ids
need the sort, so they are counted on every call pooled on the requester and, while a table is
pooled on its owners, every `REMEASURE` calls, with the ratio of unique to all ids assumed
in between. A call whose ids are all served by this rank (nothing travels either way: a group
of one, a table held here) pools on the owner, the way that computes less (no gather of the
unique rows; one process, the collection benchmark's workload: 127.2 against 149.8 ms per
step, median of 3 interleaved runs). The choice changes speed, and results only by rounding
(the order of a bag's additions); it is made by each requester on its own and travels in the
request header, so ranks may choose differently.

The request exchange (`routing.RequestExchange`: one ``all_to_all_single`` in steady state)
carries, per peer: the collection's number on the group (ranks calling different tables or
collections raise together), the input error kind of the sender (every rank raises
together), its grad signature (which tables will run a backward), then per table: the
payload count, the rows to send back, the pooling mode; then the payloads of every table,
one after the other. A payload
value is a local row (pooled on the requester), or for pooling on the owner an id packed with
its weight: local row in the low 31 bits, bit 31 set on the first id of a bag, the float32
weight in the high 32 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

try:  # optional: a faster stable argsort on the CPU (`_stable_order`)
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with nearly every torch install
    _np = None

from . import native
from .bags import InputError, TableBags
from .routing import RequestExchange, Router, _Bags

__all__ = ["BagRouter", "BagRouting", "TableRequest", "TableServe", "ON_REQUESTER", "ON_OWNER",
           "ON_OWNER_WEIGHTED", "REMEASURE", "decode", "flat_nonzero"]

ON_REQUESTER, ON_OWNER, ON_OWNER_WEIGHTED = 0, 1, 2  # pooling modes, as they travel in the header
REMEASURE = 16  # calls pooled on the owners between two counts of unique ids
POOL_ON = ("auto", "requester", "owner")  # "requester" / "owner": always there (for tests and benchmarks)
_FIXED = 2  # header columns before the per-table ones: error kind, grad signature
_PER_TABLE = 3  # count, rows back, mode
_FIRST = torch.iinfo(torch.int32).min  # bit 31 of the low word: the first id of a bag
_ROW = torch.iinfo(torch.int32).max


@dataclass
class TableRequest:
    """This rank's requests for one table in one call (the requester side).

    ``back[q]``: rows rank ``q`` sends back (``q`` = this rank: served locally); they arrive
    in one buffer ``[rows from ranks in order, this rank's last]``. Pooled on the requester,
    ``gather_index[i]`` is the buffer row of id ``i`` and ``dedup`` groups the ids by unique
    row (for the backward); pooled on the owner, ``pair_bag[j]`` is the output row that buffer
    row ``j`` (a partial sum) adds to. ``payload[q]``: the int64 values for rank ``q``.
    """

    mode: int
    bags: TableBags
    back: list[int]
    payload: list[torch.Tensor]
    gather_index: torch.Tensor | None = None
    dedup: _Bags | None = None
    pair_bag: torch.Tensor | None = None
    own: tuple | None = None  # pooled on the owner: this rank's own ids, unpacked (rows, first-of-bag, weights)


@dataclass
class TableServe:
    """What this rank serves for one table in one call (the owner side), by requester: the
    pooling mode, the payload values, the rows to send back. ``decoded`` caches the ids of
    requests pooled here (rows, first-of-bag flags, weights)."""

    modes: list[int]
    blocks: list[torch.Tensor]
    back: list[int]
    decoded: dict = field(default_factory=dict)


@dataclass
class BagRouting:
    """One call's routing for every table: requests and serves by table, the rows each rank
    sends to each other in the vector exchange (by peer and table), which tables' gradients
    travel back (the same on every rank), and the int64 values the request exchange moved."""

    requests: list[TableRequest]
    serves: list[TableServe]
    grad_tables: list[bool]
    ints_sent: int
    ints_received: int
    request_exchanges: int = 0  # all-to-alls the routing took: 1, 2 when a request outgrew the capacity (0 alone)
    call: int = 0  # the collection's lookup number (alike on every rank): tags its exchanges
    hyperparameters: dict | None = None  # table -> its fused step's, as every rank agreed at the lookup

    def rows_from(self, q: int) -> list[int]:
        """Rows rank ``q`` sends this rank in the vector exchange, by table."""
        return [r.back[q] for r in self.requests]

    def rows_to(self, r: int) -> list[int]:
        """Rows this rank sends rank ``r`` in the vector exchange, by table."""
        return [s.back[r] for s in self.serves]


@dataclass
class PoolingChoice:
    """One table's pooling choice on this rank: the last measured ratio of unique to all
    remote ids, calls since, what was chosen (reported by ``stats()``)."""

    ratio: float | None = None
    since: int = 0
    on_requester: int = 0
    on_owner: int = 0
    prefer_owner: bool = False
    last: dict = field(default_factory=dict)


def decode(block: torch.Tensor, weighted: bool):
    """Payload values pooled on the owner -> (local rows int32, first-of-bag flags bool,
    weights float32 or None). Rows stay int32 (they are below 2^31): the owner's sort and
    embedding_bags take them as they are."""
    words = block.view(torch.int32).view(-1, 2)  # (low, high) words of each int64 (little-endian)
    low = words[:, 0]
    weights = words[:, 1].view(torch.float32).contiguous() if weighted else None
    return low & _ROW, low < 0, weights


def _encode(rows: torch.Tensor, first: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(int32 local rows, first-of-bag flags, weights or None) -> the int64 payload `decode`
    reads: low word the row with bit 31 set on a bag's first id, high word the weight's bits
    (0 when unweighted). Contiguous int32/int64 passes only (strided word writes and a
    masked or-assignment were 4x slower)."""
    low = first.to(torch.int32).mul_(_FIRST).bitwise_or_(rows)
    if weights is None:
        return low.to(torch.int64).bitwise_and_(0xFFFFFFFF)
    words = torch.empty(rows.numel(), 2, dtype=torch.int32, device=rows.device)
    words[:, 0] = low
    words[:, 1] = weights.to(torch.float32).view(torch.int32)
    return words.view(torch.int64).view(-1)


class BagRouter:
    """Routes the lookups of a collection's tables (their `Router` s) over one group."""

    def __init__(self, routers: list[Router], dims: list[int], pooled: list[bool], *, rank: int, world: int,
                 transport, device: torch.device, pool_on: str = "auto", table_id: int = 0):
        if pool_on not in POOL_ON:
            raise ValueError(f"pool_on={pool_on!r} is not one of {list(POOL_ON)}")
        self.routers, self.dims, self.pooled, self.pool_on = routers, dims, pooled, pool_on
        self.rank, self.world, self.device, self.table_id = rank, world, device, table_id
        self.requests = RequestExchange.shared(transport, rank, world, device)
        self.choices = [PoolingChoice() for _ in routers]
        # Packing a row with its weight needs local rows below 2^31.
        self._packable = [r.stride <= 2**31 for r in routers]
        # Each page's serving rank (this rank as `world`), in a dtype a stable argsort sorts fast.
        dtype = torch.uint8 if world < 255 else torch.int32
        self._dest_of_page = [r.page_destinations().to(dtype) for r in routers]

    # ------------------------------------------------------------------ one call
    def route(self, bags: list[TableBags] | None, error: InputError | None, grad_tables: list[bool],
              wire_bytes: int, check, step_digest: int = 0) -> BagRouting:
        """Build every table's requests, exchange them with every peer, learn what to serve.

        ``bags``: this rank's input per table (None if ``error``). ``grad_tables``: which
        tables will run a backward from this rank. ``wire_bytes``: bytes of one vector element
        on the wire. ``step_digest``: 31 bits of the hyperparameters of the fused optimizers
        that will step (alike on every rank). ``check(kinds, signatures)`` gets every rank's
        header columns (`signature_parts` splits a signature) and raises on every rank alike. Collective: one request exchange (two when a request
        outgrew the capacity); none in a group of one."""
        world, rank, num = self.world, self.rank, len(self.routers)
        columns = torch.zeros(world, _FIXED + _PER_TABLE * num, dtype=torch.int64)
        columns[:, 1] = _signature(grad_tables, step_digest)
        requests = None
        if error is not None:
            columns[:, 0] = error.kind
        else:
            requests = self._requests(bags, wire_bytes, any(grad_tables))
            for t, req in enumerate(requests):
                columns[:, _FIXED + _PER_TABLE * t] = torch.tensor([p.numel() for p in req.payload])
                columns[:, _FIXED + _PER_TABLE * t + 1] = torch.tensor(req.back)
                columns[:, _FIXED + _PER_TABLE * t + 2] = req.mode
        if world == 1:
            check(columns[:, 0].tolist(), columns[:, 1].tolist())
            return BagRouting(requests, self._serves(requests, columns.tolist(), []), grad_tables, 0, 0)
        pieces = [[] if q == rank else [req.payload[q] for req in requests] for q in range(world)] \
            if requests is not None else [[] for _ in range(world)]
        got = self.requests.exchange(columns, pieces, caller=self.table_id,
                                     check=lambda h: check([c[0] for c in h], [c[1] for c in h]))
        serves = self._serves(requests, got.header, got.payload)
        return BagRouting(requests, serves, grad_tables, got.ints_sent, got.ints_received, got.exchanges)

    def _serves(self, requests: list[TableRequest], cols: list[list[int]],
                received: list[torch.Tensor]) -> list[TableServe]:
        """Cut what each peer sent into tables (``cols[r]``: rank ``r``'s header columns); this
        rank's own requests are served here too."""
        world, rank, num = self.world, self.rank, len(self.routers)
        serves = [TableServe([0] * world, [None] * world, [0] * world) for _ in range(num)]
        for r in range(world):
            at = 0
            for t in range(num):
                s = serves[t]
                if r == rank:
                    req = requests[t]
                    s.modes[r], s.blocks[r], s.back[r] = req.mode, req.payload[r], req.back[r]
                    if req.own is not None:
                        s.decoded[r] = req.own
                    continue
                count, back, mode = cols[r][_FIXED + _PER_TABLE * t : _FIXED + _PER_TABLE * (t + 1)]
                s.modes[r], s.blocks[r], s.back[r] = mode, received[r][at : at + count], back
                at += count
        return serves

    # ------------------------------------------------------------------ the requester side
    def _requests(self, bags: list[TableBags], wire_bytes: int, needs_grad: bool) -> list[TableRequest]:
        world = self.world
        dests, rows, counted = [], [], []
        compiled = self._compiled()
        for t, b in enumerate(bags):  # each id's serving rank and local row there; ids per rank
            router = self.routers[t]
            if compiled:  # the same in one pass
                dest, row, count = native.destinations(b.values, self._dest_of_page[t], router.page_shift,
                                                       router.page_size, world + 1)
            else:
                dest, row = router.destinations(b.values, self._dest_of_page[t])
                count = torch.bincount(dest, minlength=world + 1)
            dests.append(dest)
            rows.append(row)
            counted.append(count)
        if compiled or not counted:
            counts = counted
        else:
            counts = torch.stack(counted).tolist()  # one device sync for every table
        out = []
        for t, b in enumerate(bags):
            ids, choice, row_bytes = counts[t], self.choices[t], self.dims[t] * wire_bytes
            # (the owner's way packs each weight as float32 beside its row: not a float64 weight)
            owner_ok = self.pooled[t] and self._packable[t] and self.pool_on != "requester" and \
                (b.weights is None or b.weights.dtype != torch.float64)
            due = choice.ratio is None or choice.since + 1 >= REMEASURE
            local = sum(ids[:world]) == 0  # nothing travels either way: the owner's way computes less
            if owner_ok and (self.pool_on == "owner" or local or (choice.prefer_owner and not due)):
                req, pairs = self._pooled_on_owner(t, b, dests[t], rows[t], ids)
                if self.pool_on == "owner":
                    choice.last = {"pooled_on": "owner"}
                elif local:
                    choice.last = {"pooled_on": "owner", "bytes_if_pooled_on_requester": 0,
                                   "bytes_if_pooled_on_owner": 0, "unique_ids_measured": False}
                if self.pool_on == "owner" or local or not self._on_requester(t, ids, pairs, None, row_bytes,
                                                                               needs_grad):
                    choice.since += 1
                    choice.on_owner += 1
                    out.append(req)
                    continue
            # Pooled on the requester, or time to count unique ids again: deduplicate.
            keys = rows[t].add(dests[t].long(), alpha=self.routers[t].stride)
            dedup = self.routers[t].dedup(b.values, keys)
            unique = self._per_rank(t, dedup[2])
            remote = sum(ids[:world])
            choice.ratio, choice.since = (sum(unique[:world]) / remote if remote else 1.0), 0
            on_requester = True
            if owner_ok:
                pairs = self._pairs(b, dests[t]) if self.pool_on == "auto" else None
                on_requester = self.pool_on == "auto" and self._on_requester(t, ids, pairs, unique, row_bytes,
                                                                             needs_grad)
            elif self.pooled[t]:
                choice.last = {"pooled_on": "requester"}
            choice.prefer_owner = not on_requester
            if on_requester:
                choice.on_requester += 1
                out.append(self._pooled_on_requester(t, b, dedup, unique))
            else:
                choice.on_owner += 1
                out.append(self._pooled_on_owner(t, b, dests[t], rows[t], ids)[0])
        return out

    def _per_rank(self, t: int, keys: torch.Tensor) -> list[int]:
        """Sorted unique keys per serving rank (this rank's last)."""
        bounds = torch.arange(self.world + 2, device=keys.device) * self.routers[t].stride
        ends = torch.searchsorted(keys, bounds).tolist()
        return [ends[q + 1] - ends[q] for q in range(self.world + 1)]

    def _pairs(self, bags: TableBags, dest: torch.Tensor) -> list[int]:
        """(bag, serving rank) pairs per serving rank: the partial sums pooling on the owners sends."""
        if not bags.num_bags:
            return [0] * (self.world + 1)
        marks = torch.zeros(bags.num_bags, self.world + 1, dtype=torch.bool, device=self.device)
        marks[bags.bag_of(), dest.long()] = True
        return marks.sum(0).tolist()

    def _on_requester(self, t: int, ids: list[int], pairs: list[int], unique: list[int] | None, row_bytes: int,
                      needs_grad: bool) -> bool:
        """Whether pooling on the requester sends no more bytes than pooling on the owners
        (unique ids counted, or estimated from the last counted ratio); records both."""
        world, choice = self.world, self.choices[t]
        trips = 2 if needs_grad else 1  # vectors, and gradients back
        remote_ids, remote_pairs = sum(ids[:world]), sum(pairs[:world])
        remote_unique = sum(unique[:world]) if unique is not None else round(choice.ratio * remote_ids)
        on_requester = remote_unique * (8 + trips * row_bytes)
        on_owner = remote_ids * 8 + remote_pairs * trips * row_bytes
        choice.last = {"pooled_on": "requester" if on_requester <= on_owner else "owner",
                       "bytes_if_pooled_on_requester": on_requester, "bytes_if_pooled_on_owner": on_owner,
                       "unique_ids_measured": unique is not None}
        return on_requester <= on_owner

    def _pooled_on_requester(self, t: int, bags: TableBags, dedup, unique: list[int]) -> TableRequest:
        world, rank, stride = self.world, self.rank, self.routers[t].stride
        gather_index, groups, keys = dedup
        parts = list(torch.split(keys, unique))  # by serving rank, this rank's own last
        rows = [parts[q] - q * stride for q in range(world + 1)]
        payload = [rows[world] if q == rank else rows[q] for q in range(world)]
        back = [unique[world] if q == rank else unique[q] for q in range(world)]
        return TableRequest(ON_REQUESTER, bags, back, payload, gather_index=gather_index, dedup=groups)

    def _compiled(self) -> bool:
        """Whether this call's per-id routing loops run compiled (`native.available`, on the CPU)."""
        return self.device.type == "cpu" and native.available()

    def _pooled_on_owner(self, t: int, bags: TableBags, dest, row, ids: list[int]):
        """The ids by serving rank, bag by bag, packed with their weights; and the pairs
        (partial sums coming back) per serving rank."""
        world, rank = self.world, self.rank
        mode = ON_OWNER_WEIGHTED if bags.weights is not None else ON_OWNER
        if self._compiled():  # the same values in one compiled counting sort
            values, own, pairs, pair_bag = native.partition_bags(bags.offsets, dest, row, bags.weights, ids, world)
            parts = list(torch.split(values, ids[:world]))
            payload = [values.new_empty(0) if q == rank else parts[q] for q in range(world)]
            back = [pairs[world] if q == rank else pairs[q] for q in range(world)]
            return TableRequest(mode, bags, back, payload, pair_bag=pair_bag, own=own), pairs
        n = dest.numel()
        order = _stable_order(dest)  # by serving rank (own last), bags kept in order
        # (index_select: a gather several times faster than indexing with a tensor on the CPU)
        bag = bags.bag_of().index_select(0, order)
        first = torch.ones(n, dtype=torch.bool, device=self.device)  # a bag's first id at each serving rank
        if n > 1:
            torch.ne(bag[1:], bag[:-1], out=first[1:])
        ends, at = [], 0  # the end of each serving rank's ids (their first id starts a pair too)
        for c in ids:
            if c:
                first[at] = True
            at += c
            ends.append(at)
        weights = bags.weights.index_select(0, order) if bags.weights is not None else None
        rows = row.index_select(0, order).int()  # local rows < 2^31 (`_packable`)
        remote = n - ids[world]  # this rank's own ids come last and never travel: kept unpacked
        values = _encode(rows[:remote], first[:remote], weights[:remote] if weights is not None else None)
        pairs = torch.stack([first[e - c : e].sum() for c, e in zip(ids, ends)]).tolist() if n else [0] * (world + 1)
        parts = list(torch.split(values, ids[:world]))
        payload = [values.new_empty(0) if q == rank else parts[q] for q in range(world)]
        back = [pairs[world] if q == rank else pairs[q] for q in range(world)]
        own = (rows[remote:], first[remote:], weights[remote:] if weights is not None else None)
        return TableRequest(mode, bags, back, payload, pair_bag=bag.index_select(0, flat_nonzero(first)),
                            own=own), pairs


def _stable_order(dest: torch.Tensor) -> torch.Tensor:
    """The stable argsort of a uint8 / int32 vector (int64): numpy's on the CPU when numpy is
    there (a radix sort for 8-bit keys: measured 1.4-2.9 ms against torch's 2.5-4.9 ms for
    400k ids, one thread), else torch's."""
    if dest.device.type == "cpu" and _np is not None:
        return torch.from_numpy(_np.argsort(dest.numpy(), kind="stable"))
    return torch.argsort(dest, stable=True)


def flat_nonzero(mask: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The positions of a bool vector's True values, in ``dtype``: numpy's flatnonzero on the
    CPU when numpy is there (measured 0.6 ms against torch.nonzero's 2.2 ms for 700k flags,
    one thread), else torch.nonzero."""
    if mask.device.type == "cpu" and _np is not None:
        return torch.from_numpy(_np.flatnonzero(mask.numpy())).to(dtype)
    return torch.nonzero(mask).squeeze(1).to(dtype)


def _signature(grad_tables: list[bool], step_digest: int) -> int:
    """The tables that will run a backward and the digest of the fused optimizers'
    hyperparameters, as one int64 (equal on every rank or an error): bits, then the digest
    from bit 32, for up to 32 tables; a hash of both beyond."""
    if len(grad_tables) <= _SIGNATURE_TABLES:
        return sum(1 << t for t, g in enumerate(grad_tables) if g) | (step_digest << _SIGNATURE_TABLES)
    import hashlib

    return int(hashlib.blake2b(bytes(grad_tables) + step_digest.to_bytes(4, "little"), digest_size=7).hexdigest(), 16)


_SIGNATURE_TABLES = 32


def signature_parts(signature: int, num_tables: int) -> tuple[int | None, int | None]:
    """(grad table bits, step digest) of a `_signature` (None, None beyond 32 tables)."""
    if num_tables > _SIGNATURE_TABLES:
        return None, None
    return signature & ((1 << _SIGNATURE_TABLES) - 1), signature >> _SIGNATURE_TABLES

