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
in between. The choice only changes speed, never results; it is made by each requester on its
own and travels in the request header, so ranks may choose differently.

The request exchange (`routing.RequestExchange`: one ``all_to_all_single`` in steady state)
carries, per peer: the input error kind of the sender (every rank raises together), its grad
signature (which tables will run a backward), then per table: the payload count, the rows to
send back, the pooling mode; then the payloads of every table, one after the other. A payload
value is a local row (pooled on the requester), or for pooling on the owner an id packed with
its weight: local row in the low 31 bits, bit 31 set on the first id of a bag, the float32
weight in the high 32 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .bags import InputError, TableBags
from .routing import RequestExchange, Router, _Bags

__all__ = ["BagRouter", "BagRouting", "TableRequest", "TableServe", "ON_REQUESTER", "ON_OWNER",
           "ON_OWNER_WEIGHTED", "REMEASURE", "decode"]

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

    def rows_from(self, q: int) -> list[int]:
        """Rows rank ``q`` sends this rank in the vector exchange, by table."""
        return [r.back[q] for r in self.requests]

    def rows_to(self, r: int) -> list[int]:
        """Rows this rank sends rank ``r`` in the vector exchange, by table."""
        return [s.back[r] for s in self.serves]


@dataclass
class PoolingChoice:
    """One table's pooling choice on this rank: the last measured ratio of unique to all
    remote ids, calls since, and what was chosen (reported by ``stats()``)."""

    ratio: float | None = None
    since: int = 0
    on_requester: int = 0
    on_owner: int = 0
    last: dict = field(default_factory=dict)


def decode(block: torch.Tensor, weighted: bool):
    """Payload values pooled on the owner -> (local rows int64, bag starts int64, weights or
    None)."""
    words = block.view(torch.int32).view(-1, 2)  # (low, high) words of each int64 (little-endian)
    low = words[:, 0]
    starts = torch.nonzero(low < 0).squeeze(1)
    weights = words[:, 1].view(torch.float32).contiguous() if weighted else None
    return (low & _ROW).long(), starts, weights


def _encode(rows: torch.Tensor, first: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    words = torch.zeros(rows.numel(), 2, dtype=torch.int32, device=rows.device)
    words[:, 0] = torch.where(first, rows.int() | _FIRST, rows.int())
    if weights is not None:
        words[:, 1] = weights.to(torch.float32).view(torch.int32)
    return words.view(torch.int64).view(-1)


class BagRouter:
    """Routes the lookups of a collection's tables (their `Router` s) over one group."""

    def __init__(self, routers: list[Router], dims: list[int], pooled: list[bool], *, rank: int, world: int,
                 transport, device: torch.device, pool_on: str = "auto"):
        if pool_on not in POOL_ON:
            raise ValueError(f"pool_on={pool_on!r} is not one of {list(POOL_ON)}")
        self.routers, self.dims, self.pooled, self.pool_on = routers, dims, pooled, pool_on
        self.rank, self.world, self.device = rank, world, device
        self.requests = RequestExchange(transport, rank, world, device)
        self.choices = [PoolingChoice() for _ in routers]
        # Packing a row with its weight needs local rows below 2^31.
        self._packable = [r.stride <= 2**31 for r in routers]
        self._dest_dtype = torch.uint8 if world < 255 else torch.int32  # a stable argsort of uint8 is fastest

    # ------------------------------------------------------------------ one call
    def route(self, bags: list[TableBags] | None, error: InputError | None, grad_tables: list[bool],
              wire_bytes: int, check) -> BagRouting:
        """Build every table's requests, exchange them with every peer, learn what to serve.

        ``bags``: this rank's input per table (None if ``error``). ``grad_tables``: which
        tables will run a backward from this rank. ``wire_bytes``: bytes of one vector element
        on the wire. ``check(kinds, grad signatures)`` gets every rank's header columns and
        raises on every rank alike. Collective: one request exchange (two when a request
        outgrew the capacity); none in a group of one."""
        world, rank, num = self.world, self.rank, len(self.routers)
        signature = _signature(grad_tables)
        if error is not None:
            requests = None
            columns = torch.zeros(world, _FIXED + _PER_TABLE * num, dtype=torch.int64)
            columns[:, 0] = error.kind
            columns[:, 1] = signature
            payload, counts = torch.zeros(0, dtype=torch.int64, device=self.device), [0] * world
        else:
            requests = self._requests(bags, wire_bytes, any(grad_tables))
            columns = torch.zeros(world, _FIXED + _PER_TABLE * num, dtype=torch.int64)
            columns[:, 1] = signature
            for t, req in enumerate(requests):
                columns[:, _FIXED + _PER_TABLE * t] = torch.tensor([p.numel() for p in req.payload])
                columns[:, _FIXED + _PER_TABLE * t + 1] = torch.tensor(req.back)
                columns[:, _FIXED + _PER_TABLE * t + 2] = req.mode
            counts = [0 if q == rank else sum(req.payload[q].numel() for req in requests) for q in range(world)]
            pieces = [req.payload[q] for q in range(world) if q != rank for req in requests]
            payload = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64, device=self.device)
        if world == 1:
            check(columns[:, 0].tolist(), columns[:, 1].tolist())
            header, received, served, sent, got_ints = columns, payload, [0], 0, 0
        else:
            got = self.requests.exchange(columns.to(self.device), payload, counts,
                                         check=lambda h: check(h[:, 0].tolist(), h[:, 1].tolist()))
            header, received, served, sent, got_ints = got.header, got.payload, got.served, got.ints_sent, \
                got.ints_received
        serves = self._serves(requests, header, received, served)
        return BagRouting(requests, serves, grad_tables, sent, got_ints)

    def _serves(self, requests: list[TableRequest], header: torch.Tensor, received: torch.Tensor,
                served: list[int]) -> list[TableServe]:
        """Cut what each peer sent into tables; this rank's own requests are served here too."""
        world, rank, num = self.world, self.rank, len(self.routers)
        cols = header.tolist()
        serves = [TableServe([0] * world, [None] * world, [0] * world) for _ in range(num)]
        at = 0
        for r in range(world):
            for t in range(num):
                s = serves[t]
                if r == rank:
                    req = requests[t]
                    s.modes[r], s.blocks[r], s.back[r] = req.mode, req.payload[r], req.back[r]
                    continue
                count, back, mode = cols[r][_FIXED + _PER_TABLE * t : _FIXED + _PER_TABLE * (t + 1)]
                s.modes[r], s.blocks[r], s.back[r] = mode, received[at : at + count], back
                at += count
        return serves

    # ------------------------------------------------------------------ the requester side
    def _requests(self, bags: list[TableBags], wire_bytes: int, needs_grad: bool) -> list[TableRequest]:
        world = self.world
        keys, dests, counted = [], [], []
        for t, b in enumerate(bags):  # ids and (bag, serving rank) pairs per serving rank: O(ids)
            k = self.routers[t].keys(b.values)
            if world == 1:  # a Router of one rank leaves out its own key: this rank is `world`, 1
                k += self.routers[t].stride
            dest = torch.div(k, self.routers[t].stride, rounding_mode="floor")
            keys.append(k)
            dests.append(dest)
            ids = torch.bincount(dest, minlength=world + 1)
            if self.pooled[t] and b.num_bags:
                marks = torch.zeros(b.num_bags, world + 1, dtype=torch.bool, device=self.device)
                marks[b.bag_of(), dest] = True
                pairs = marks.sum(0)
            else:
                pairs = torch.zeros_like(ids)
            counted.append(torch.stack([ids, pairs]))
        counts = torch.stack(counted).tolist() if counted else []  # one device sync for every table
        out, row_bytes = [], [d * wire_bytes for d in self.dims]
        dedups = {}
        for t, b in enumerate(bags):
            ids, pairs = counts[t]
            choice = self.choices[t]
            can_pool_on_owner = self.pooled[t] and self._packable[t]
            measure = (not can_pool_on_owner or choice.ratio is None or choice.since + 1 >= REMEASURE
                       or self.pool_on == "requester"
                       or self._on_requester(t, ids, pairs, None, row_bytes[t], needs_grad))
            if measure:
                dedups[t] = self.routers[t].dedup(b.values, keys[t])
        uniques = {}
        if dedups:  # one more device sync for the tables deduplicated
            every = torch.stack([torch.bincount(torch.div(d[2], self.routers[t].stride, rounding_mode="floor"),
                                                minlength=world + 1) for t, d in dedups.items()]).tolist()
            uniques = dict(zip(dedups, every))
        for t, b in enumerate(bags):
            ids, pairs = counts[t]
            unique = uniques.get(t)
            choice = self.choices[t]
            on_requester = (not (self.pooled[t] and self._packable[t])
                            or self._on_requester(t, ids, pairs, unique, row_bytes[t], needs_grad))
            if on_requester and t not in dedups:
                dedups[t] = self.routers[t].dedup(b.values, keys[t])
                unique = torch.bincount(torch.div(dedups[t][2], self.routers[t].stride, rounding_mode="floor"),
                                        minlength=world + 1).tolist()
            if unique is not None:
                remote = sum(ids[:world])
                choice.ratio, choice.since = (sum(unique[:world]) / remote if remote else 1.0), 0
            else:
                choice.since += 1
            if on_requester:
                choice.on_requester += 1
                out.append(self._pooled_on_requester(t, b, dedups[t], unique))
            else:
                choice.on_owner += 1
                out.append(self._pooled_on_owner(t, b, keys[t], dests[t], ids, pairs))
        return out

    def _on_requester(self, t: int, ids: list[int], pairs: list[int], unique: list[int] | None, row_bytes: int,
                      needs_grad: bool) -> bool:
        """Whether pooling on the requester sends no more bytes than pooling on the owners
        (unique ids measured, or estimated from the last measured ratio); records both.
        ``pool_on`` other than "auto" overrides the answer (the bytes are still recorded)."""
        world, choice = self.world, self.choices[t]
        trips = 2 if needs_grad else 1  # vectors, and gradients back
        remote_ids, remote_pairs = sum(ids[:world]), sum(pairs[:world])
        if unique is not None:
            remote_unique = sum(unique[:world])
        elif choice.ratio is not None:
            remote_unique = round(choice.ratio * remote_ids)
        else:
            remote_unique = remote_ids
        on_requester = remote_unique * (8 + trips * row_bytes)
        on_owner = remote_ids * 8 + remote_pairs * trips * row_bytes
        choice.last = {"pooled_on": "requester" if on_requester <= on_owner else "owner",
                       "bytes_if_pooled_on_requester": on_requester, "bytes_if_pooled_on_owner": on_owner,
                       "unique_ids_measured": unique is not None}
        if self.pool_on != "auto":
            choice.last["pooled_on"] = self.pool_on
            return self.pool_on == "requester"
        return on_requester <= on_owner

    def _pooled_on_requester(self, t: int, bags: TableBags, dedup, unique: list[int]) -> TableRequest:
        world, rank = self.world, self.rank
        gather_index, groups, keys = dedup
        rows = keys - torch.div(keys, self.routers[t].stride, rounding_mode="floor") * self.routers[t].stride
        parts = list(torch.split(rows, unique))  # by serving rank, this rank's own last
        payload = [parts[world] if q == rank else parts[q] for q in range(world)]
        back = [unique[world] if q == rank else unique[q] for q in range(world)]
        return TableRequest(ON_REQUESTER, bags, back, payload, gather_index=gather_index, dedup=groups)

    def _pooled_on_owner(self, t: int, bags: TableBags, keys, dest, ids: list[int], pairs: list[int]) -> TableRequest:
        world, rank = self.world, self.rank
        order = torch.argsort(dest.to(self._dest_dtype), stable=True)  # by serving rank, bags kept in order
        dest_sorted = dest[order]
        rows = keys[order] - dest_sorted * self.routers[t].stride
        bag = bags.bag_of()[order]
        first = torch.ones(order.numel(), dtype=torch.bool, device=self.device)
        if order.numel() > 1:
            first[1:] = (bag[1:] != bag[:-1]) | (dest_sorted[1:] != dest_sorted[:-1])
        weights = bags.weights[order] if bags.weights is not None else None
        values = _encode(rows, first, weights)
        parts = list(torch.split(values, ids))
        payload = [parts[world] if q == rank else parts[q] for q in range(world)]
        back = [pairs[world] if q == rank else pairs[q] for q in range(world)]
        mode = ON_OWNER_WEIGHTED if weights is not None else ON_OWNER
        return TableRequest(mode, bags, back, payload, pair_bag=bag[first])


def _signature(grad_tables: list[bool]) -> int:
    """The tables that will run a backward, as one int64 (equal on every rank or an error)."""
    if len(grad_tables) <= 62:
        return sum(1 << t for t, g in enumerate(grad_tables) if g)
    import hashlib

    return int(hashlib.blake2b(bytes(grad_tables), digest_size=7).hexdigest(), 16)

