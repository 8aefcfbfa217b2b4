"""`plan_placement`: the page size and per-page placement that minimise the slowest rank's
modelled step cost under a per-rank memory budget.

For each candidate page size (powers of two, from the size that gives ``max_pages`` pages up to
an even split of the rows over the ranks):

1. the expected distinct rows each rank asks of every page per step (`laws`), and the rows of
   each page touched by any rank (what a mirrored page all-reduces);
2. for ``k`` = 0, 1, 2, 4, ... hottest pages mirrored on every rank (served locally to all,
   their gradient rows all-reduced), the other pages get one owner each: the hottest by
   longest-processing-time rounds (each round gives every rank one page, the heaviest to the
   least loaded), the rest dealt in serpentine order, then pairwise swaps between the most and
   least loaded ranks. Every rank ends with the same number of pages (+-1), so memory is
   balanced too, and a rank's load is the demand of the pages it owns: with every rank drawing
   from the same law, a rank that owns a fraction ``f`` of the demand serves ``(world - 1) f``
   of it and receives ``1 - f``, so balancing owned demand balances every term of the cost;
3. the loads of each rank give its modelled seconds (`model.CostModel`) and its memory
   (`model.MemoryModel`); plans that do not fit the budget are dropped.

The cheapest plan wins; plans within 0.2% of it are treated as equal, then those within 0.2% of
the smallest largest-rank memory among them (large pages make memory lumpy), and among those
the one with the fewest mirrored rows, then the largest page size (fewer pages: smaller
routing tables and checkpoint metadata) is kept. Nothing is allocated: a 1B-row table over
64 ranks plans in about half a minute with 0.45 GB resident (docs/planning.md).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..routing import TABLE_HEADER as _HEADER
from ..wire import wire_columns
from .laws import Counts, IdLaw, parse_law
from .model import OPTIMIZER_NAMES, CostModel, Loads, MemoryModel

__all__ = ["plan_placement", "predict_placement", "PlanningError", "TableLaw"]

_TIE = 0.002  # plans this close to the cheapest (in time, then in memory) count as equal
_MAX_PAGES = 1 << 18


class PlanningError(ValueError):
    """No placement fits (the message names the smallest world size that would)."""


@dataclass(frozen=True)
class TableLaw:
    """One table sharing the placement: its id law and the ids each rank looks up per step."""

    law: IdLaw
    batch_size: int


@dataclass
class Geometry:
    """Per-page demand of one page size (arrays ``[num_pages]``, one row per table)."""

    page_size: int
    num_pages: int
    rows: np.ndarray  # rows of each page
    demand: np.ndarray  # [tables, pages]: expected distinct rows one rank asks per step
    union: np.ndarray  # [tables, pages]: expected distinct rows all ranks touch per step


# ------------------------------------------------------------------------------ inputs
def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(value) -> float | None:
    """``None``, a number of bytes, or a string such as ``"80GB"``, ``"80 GiB"``, ``"512MiB"``."""
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_per_rank={value!r} is not understood: give bytes, or e.g. '80GB', '80GiB', "
                             "'512MiB'")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"memory_per_rank must be a positive number of bytes, got {value!r}")
    return float(value)


def _dtype(name, value, allow_none=False) -> torch.dtype | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = getattr(torch, value, None) if value.isidentifier() else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating point torch.dtype (or its name, e.g. 'float32'), got {value!r}")
    return value


def _optimizer(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("name")
    if value is None or value == "none":
        return None
    if value not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer={value!r} is not one of {list(OPTIMIZER_NAMES)} (a fused optimizer's name or "
                         "spec), or None: no fused optimizer (sparse gradients)")
    return value


def _law(value, num_rows: int) -> IdLaw:
    if isinstance(value, (IdLaw, str)):
        law = parse_law(value)
    else:
        law = Counts(_to_numpy(value))
    law.check(num_rows)
    return law


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _tables(num_rows, batch_size, counts, sample, law, tables) -> list[TableLaw]:
    given = [name for name, v in (("counts", counts), ("sample", sample), ("law", law)) if v is not None]
    if tables is not None:
        if given or batch_size is not None:
            extra = given + (["batch_size"] if batch_size is not None else [])
            raise ValueError(f"tables= replaces batch_size, counts, sample and law; got {extra} too")
        if isinstance(tables, (str, bytes)) or not isinstance(tables, Sequence) or not tables:
            raise ValueError("tables must be a non-empty list of (law, batch_size) pairs, one per table")
        out = []
        for i, entry in enumerate(tables):
            if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 2:
                raise ValueError(f"tables[{i}] must be a (law, batch_size) pair, got {entry!r}")
            out.append(TableLaw(_law(entry[0], num_rows), _positive_int(f"tables[{i}] batch_size", entry[1])))
        return out
    if len(given) != 1:
        raise ValueError("give the id law as exactly one of counts= (per-row counts), sample= (id batches) or "
                         f"law= ('zipf:1.05', 'uniform'); got {given or 'none'}")
    if batch_size is None:
        raise ValueError("batch_size (ids each rank looks up per step) is required")
    batch = _positive_int("batch_size", batch_size)
    if sample is not None:
        return [TableLaw(Counts.from_sample(sample, num_rows), batch)]
    return [TableLaw(_law(counts if counts is not None else law, num_rows), batch)]


# ------------------------------------------------------------------------------ evaluation
def geometry(num_rows: int, page_size: int, world: int, tables: list[TableLaw]) -> Geometry:
    num_pages = -(-num_rows // page_size)
    rows = np.full(num_pages, float(page_size))
    rows[-1] = num_rows - (num_pages - 1) * page_size
    demand = np.stack([t.law.distinct_per_page(num_rows, page_size, t.batch_size) for t in tables])
    union = np.stack([t.law.distinct_per_page(num_rows, page_size, world * t.batch_size) for t in tables])
    return Geometry(page_size, num_pages, rows, demand, union)


def owners_array(placement, num_pages: int, world: int) -> np.ndarray:
    """``[num_pages, max_replicas]`` int64 owners (padded -1) of a placement list or round robin."""
    if isinstance(placement, str):
        return (np.arange(num_pages) % world).reshape(-1, 1)
    width = max(len(e) if isinstance(e, tuple) else 1 for e in placement)
    out = np.full((num_pages, width), -1, dtype=np.int64)
    for p, e in enumerate(placement):
        e = e if isinstance(e, tuple) else (e,)
        out[p, : len(e)] = e
    return out


def loads_of(owners: np.ndarray, geo: Geometry, world: int, wire_row_bytes: int, row_bytes: int) -> list[Loads]:
    """Expected per-rank loads of each table's lookup under ``owners``, following the routing
    rule of `PagePlan.routing_table` (a holder serves itself, others go to replica
    ``(requester + page) % replicas``)."""
    nrep = (owners >= 0).sum(1)
    single = nrep == 1
    multi = np.nonzero(~single)[0]
    sub = owners[multi]
    sets = {tuple(sorted(int(r) for r in row if r >= 0)) for row in sub}
    out = []
    for d, u in zip(geo.demand, geo.union):
        owned = np.bincount(owners[single, 0], weights=d[single], minlength=world)
        total_single = d[single].sum()
        local, received, served = owned.copy(), total_single - owned, (world - 1) * owned
        largest = 0.0
        mirror, touched, replicas = np.zeros(world), np.zeros(world), np.ones(world)
        dm, um = d[multi], u[multi]
        for q in range(world):
            asked = owned.copy()
            asked[q] = 0.0
            if multi.size:
                held_mask = sub == q
                held = held_mask.any(1)
                choice = np.where(held, held_mask.argmax(1), (q + multi) % nrep[multi])
                dest = sub[np.arange(multi.size), choice]
                local[q] += dm[held].sum()
                received[q] += dm[~held].sum()
                extra = np.bincount(dest[~held], weights=dm[~held], minlength=world)
                served += extra
                asked += extra
                touched[q] += dm[held].sum()
                touched += extra
                mirror[q] = um[held].sum()
                if held.any():
                    replicas[q] = nrep[multi][held].max()
            largest = max(largest, float(asked.max()) if world > 1 else 0.0)
        loads = _with_bytes(local, received, served, mirror, largest, world, wire_row_bytes, len(sets))
        loads.mirror_bytes = _mirror_bytes(touched, mirror, replicas, row_bytes)
        out.append(loads)
    return out


def _mirror_bytes(touched, mirror, replicas, row_bytes) -> np.ndarray:
    """Estimated bytes a rank sends in the mirror sync: its touched ids (int64) to each other
    replica, and 2 (n - 1) / n of the summed rows (a ring all-reduce over n replicas)."""
    n = np.maximum(replicas, 1)
    return 8.0 * (n - 1) * touched + 2.0 * (n - 1) / n * mirror * row_bytes


def rows_held(owners: np.ndarray, geo: Geometry, world: int) -> np.ndarray:
    """Rows each rank stores."""
    valid = owners >= 0
    return np.bincount(owners[valid], weights=np.broadcast_to(geo.rows[:, None], owners.shape)[valid], minlength=world)


def _with_bytes(local, received, served, mirror, largest, world, wire_row_bytes, mirror_sets) -> Loads:
    ints = (world - 1) * (_HEADER + math.ceil(1.25 * largest)) if world > 1 else 0
    sent = 8.0 * ints + wire_row_bytes * (served + received)
    ids = np.zeros(world)
    return Loads(ids, local, received, served, mirror, sent, sent.copy(), mirror_sets)


def _fast_loads(owner: np.ndarray, mirrored: np.ndarray, geo: Geometry, world: int, wire_row_bytes: int,
                row_bytes: int) -> Loads:
    """Loads summed over the tables when ``mirrored`` pages sit on every rank and the others on
    ``owner`` (a rank per page, -1 for mirrored ones): the closed form of `loads_of` there."""
    d, u = geo.demand.sum(0), geo.union.sum(0)
    single = ~mirrored
    owned = np.bincount(owner[single], weights=d[single], minlength=world)
    local = owned + d[mirrored].sum()
    received = d[single].sum() - owned
    served = (world - 1) * owned
    mirror = np.full(world, u[mirrored].sum()) if world > 1 else np.zeros(world)
    if world == 1:
        local, received, served = np.full(1, d.sum()), np.zeros(1), np.zeros(1)
    loads = _with_bytes(local, received, served, mirror, float(owned.max()) if world > 1 else 0.0, world,
                        wire_row_bytes, int(mirrored.any() and world > 1))
    if world > 1:
        loads.mirror_bytes = _mirror_bytes(np.full(world, d[mirrored].sum()), mirror, np.full(world, world), row_bytes)
    return loads


# ------------------------------------------------------------------------------ assignment
def _assign(d: np.ndarray, pages: np.ndarray, world: int) -> np.ndarray:
    """Owner rank of each of ``pages`` (their demand ``d[pages]``): equal page counts (+-1) per
    rank, owned demand balanced (LPT rounds, serpentine, swaps)."""
    owner = np.full(d.shape[0], -1, dtype=np.int64)
    n = pages.shape[0]
    if n == 0:
        return owner
    order = pages[np.argsort(-d[pages], kind="stable")]
    load = np.zeros(world)
    head = min(n, 8 * world)
    for a in range(0, head, world):  # LPT rounds: heaviest page of the round to the least loaded rank
        take = order[a : min(a + world, head)]
        ranks = np.argsort(load, kind="stable")[: take.shape[0]]
        owner[take] = ranks
        load[ranks] += d[take]
    rest = order[head:]
    if rest.shape[0]:
        ranks = np.argsort(load, kind="stable")
        lap = np.concatenate([ranks, ranks[::-1]])
        owner[rest] = lap[np.arange(rest.shape[0]) % (2 * world)]
        load += np.bincount(owner[rest], weights=d[rest], minlength=world)
    _swap_until_balanced(d, owner, load, world, rounds=200 + n // 32)  # each swap moves one page pair
    return owner


def _swap_until_balanced(d, owner, load, world, rounds: int = 200) -> None:
    """Swap a page of the most loaded rank with a lighter page of one of the least loaded ranks
    while that lowers the larger of the two loads."""
    mean = load.mean()
    for _ in range(rounds):
        hi = int(np.argmax(load))
        if load[hi] - mean <= 1e-3 * mean:
            return
        a_pages = np.nonzero(owner == hi)[0]
        da = d[a_pages]
        done = False
        for lo in np.argsort(load)[:3]:
            lo = int(lo)
            gap = load[hi] - load[lo]
            if lo == hi or gap <= 0:
                break
            b_pages = np.nonzero(owner == lo)[0]
            if b_pages.shape[0] == 0:
                continue
            db = d[b_pages]
            idx = np.argsort(db)
            dbs = db[idx]
            # want da - db as close to gap / 2 as possible, in (0, gap)
            pos = np.clip(np.searchsorted(dbs, da - gap / 2), 0, dbs.shape[0] - 1)
            best = None
            for cand in (pos, np.clip(pos - 1, 0, dbs.shape[0] - 1)):
                delta = da - dbs[cand]
                score = np.where((delta > 0) & (delta < gap), np.abs(delta - gap / 2), np.inf)
                i = int(np.argmin(score))
                if np.isfinite(score[i]) and (best is None or score[i] < best[0]):
                    best = (score[i], i, int(cand[i]), delta[i])
            if best is not None:
                _, i, j, delta = best
                a, b = a_pages[i], b_pages[idx[j]]
                owner[a], owner[b] = lo, hi
                load[hi] -= delta
                load[lo] += delta
                done = True
                break
        if not done:
            return


# ------------------------------------------------------------------------------ the search
@dataclass
class Candidate:
    page_size: int
    mirrored: np.ndarray  # bool [pages]
    owner: np.ndarray  # int [pages], -1 where mirrored
    loads: Loads
    seconds: float
    memory: np.ndarray  # bytes per rank
    geometry: Geometry

    @property
    def mirrored_rows(self) -> float:
        return float(self.geometry.rows[self.mirrored].sum())

    def placement(self, world: int) -> list:
        every = tuple(range(world))
        return [every if m else int(o) for m, o in zip(self.mirrored.tolist(), self.owner.tolist())]


class Planner:
    """The inputs of one planning problem, and the search over page sizes and mirrors."""

    def __init__(self, num_rows, dim, world, tables, dtype, comm_dtype, optimizer, memory, cost_model, max_pages):
        self.num_rows, self.dim, self.world, self.tables = num_rows, dim, world, tables
        self.dtype, self.comm_dtype = dtype, comm_dtype
        self.optimizer, self.memory, self.cost = optimizer, memory, cost_model
        self.max_pages = max_pages
        self.mem = MemoryModel(dim, dtype.itemsize, (comm_dtype or dtype).itemsize, optimizer)
        self.wire_row = wire_columns(dim, dtype, comm_dtype) * (comm_dtype or dtype).itemsize  # as emb.stats() counts
        self.calls = len(tables)
        self._geometries: dict[int, Geometry] = {}

    def geometry(self, page_size: int) -> Geometry:
        """Page demand at ``page_size``: summed from the finest candidate's pages when it is a
        multiple of it (each law is evaluated once per row), else computed; remembered."""
        if page_size not in self._geometries:
            self._geometries[page_size] = self._geometry(page_size)
        return self._geometries[page_size]

    def _geometry(self, page_size: int) -> Geometry:
        fine = self.page_sizes()[0]
        if page_size % fine or page_size == fine:
            return geometry(self.num_rows, page_size, self.world, self.tables)
        g = self.geometry(fine)
        starts = np.arange(0, g.num_pages, page_size // fine)
        num_pages = starts.shape[0]
        rows = np.full(num_pages, float(page_size))
        rows[-1] = self.num_rows - (num_pages - 1) * page_size
        return Geometry(page_size, num_pages, rows, np.add.reduceat(g.demand, starts, axis=1),
                        np.add.reduceat(g.union, starts, axis=1))

    def page_sizes(self) -> list[int]:
        top = -(-self.num_rows // self.world)  # an even split
        low = max(1, -(-self.num_rows // self.max_pages))
        sizes, p = [], 1 << max(0, (low - 1).bit_length())
        while p < top:
            sizes.append(p)
            p *= 2
        return sizes + [top]

    def per_rank_memory(self, owner, mirrored, geo, loads_tables, world=None) -> np.ndarray:
        world = world or self.world
        rows = np.bincount(owner[~mirrored], weights=geo.rows[~mirrored], minlength=world) + geo.rows[mirrored].sum()
        per_row = (self.mem.row_bytes + self.mem.state_row_bytes) * len(self.tables)
        return rows * per_row + self.mem.workspace(loads_tables, world, geo.num_pages)

    def _tables_loads(self, owner, mirrored, geo) -> list[Loads]:
        out = []
        for t in range(len(self.tables)):
            one = Geometry(geo.page_size, geo.num_pages, geo.rows, geo.demand[t : t + 1], geo.union[t : t + 1])
            loads = _fast_loads(owner, mirrored, one, self.world, self.wire_row, self.mem.row_bytes)
            loads.ids = np.full(self.world, float(self.tables[t].batch_size))
            out.append(loads)
        return out

    def evaluate(self, geo: Geometry, k: int, order: np.ndarray) -> Candidate | None:
        world = self.world
        mirrored = np.zeros(geo.num_pages, dtype=bool)
        if world > 1 and k:
            mirrored[order[:k]] = True
        d = geo.demand.sum(0)
        owner = _assign(d, np.nonzero(~mirrored)[0], world)
        tables = self._tables_loads(owner, mirrored, geo)
        total = tables[0]
        for extra in tables[1:]:
            total = total + extra
        memory = self.per_rank_memory(owner, mirrored, geo, tables)
        if self.memory is not None and memory.max() > self.memory:
            return None
        seconds = self.cost.step_seconds(total, world, self.calls)
        return Candidate(geo.page_size, mirrored, owner, total, seconds, memory, geo)

    def search(self, page_size=None, mirrors=None) -> Candidate:
        best: list[Candidate] = []
        for size in [page_size] if page_size else self.page_sizes():
            geo = self.geometry(size)
            order = np.argsort(-geo.demand.sum(0), kind="stable")
            if mirrors is not None:
                ks = [min(mirrors, geo.num_pages)]
            elif self.world == 1:
                ks = [0]
            else:
                ks = [0] + [2**j for j in range(0, max(0, geo.num_pages - 1).bit_length()) if 2**j < geo.num_pages]
            worse = 0
            previous = None
            for k in ks:
                c = self.evaluate(geo, k, order)
                if c is None:
                    if k:  # more mirrors only need more memory
                        break
                    continue
                best.append(c)
                if previous is not None and c.seconds >= previous:
                    worse += 1
                    if worse >= 2:
                        break
                else:
                    worse = 0
                previous = c.seconds
        if not best:
            raise PlanningError(self._nothing_fits(page_size))
        fastest = min(c.seconds for c in best)
        near = [c for c in best if c.seconds <= fastest * (1 + _TIE)]
        smallest = min(float(c.memory.max()) for c in near)  # large pages make memory lumpy
        near = [c for c in near if c.memory.max() <= smallest * (1 + _TIE)]
        return min(near, key=lambda c: (c.mirrored_rows, -c.page_size))

    # -------------------------------------------------------------------------- no fit
    def _fits(self, world: int, geo: Geometry) -> bool:
        """Whether the search's unmirrored assignment over ``world`` ranks fits the budget."""
        mirrored = np.zeros(geo.num_pages, dtype=bool)
        saved, self.world = self.world, world
        try:
            owner = _assign(geo.demand.sum(0), np.arange(geo.num_pages), world)
            tables = self._tables_loads(owner, mirrored, geo)
            return bool(self.per_rank_memory(owner, mirrored, geo, tables, world).max() <= self.memory)
        finally:
            self.world = saved

    def _workspace_bound(self, geo: Geometry) -> float:
        """The most step workspace a rank can need at any world size: it serves and receives at
        most every distinct id of a batch."""
        loads = []
        for t, d in zip(self.tables, geo.demand):
            total = np.full(1, d.sum())
            zero = np.zeros(1)
            loads.append(Loads(np.full(1, float(t.batch_size)), zero, total, total, zero, zero, zero))
        return float(self.mem.workspace(loads, 1, geo.num_pages)[0])

    def _nothing_fits(self, page_size) -> str:
        per_row = (self.mem.row_bytes + self.mem.state_row_bytes) * len(self.tables)
        total = self.num_rows * per_row
        size = page_size or max(1, min(self.page_sizes()))
        geo = self.geometry(size)
        what = (f"{len(self.tables)} tables of " if len(self.tables) > 1 else "a table of ") + \
            f"{self.num_rows:,} x {self.dim} {str(self.dtype).replace('torch.', '')}"
        state = f" with {self.optimizer} state" if self.state_note() else ""
        head = (f"no placement fits: {what}{state} needs {_gb(total)} in all ({_gb(total / self.world)} per rank on "
                f"{self.world} ranks, plus each step's workspace), and each rank has {_gb(self.memory)}"
                f"{f' (page_size={page_size})' if page_size else ''}")
        workspace = self._workspace_bound(geo)
        if workspace + size * per_row >= self.memory:
            batches = ", ".join(f"{t.batch_size:,}" for t in self.tables)
            return (f"{head}. A step's workspace alone needs up to {_gb(workspace)} per rank ({batches} ids per rank "
                    "per step), so no number of ranks fits: lower batch_size or give each rank more memory")
        world = max(self.world + 1, math.ceil(total / (self.memory - workspace)))
        if self._fits(world, geo):  # the estimate is conservative: walk down while it still fits
            while world - 1 > self.world and self._fits(world - 1, geo):
                world -= 1
        else:
            step = 1
            while not self._fits(world + step, geo):
                step *= 2
            lo, hi = world + step // 2, world + step
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if self._fits(mid, geo) else (mid, hi)
            world = hi
        return f"{head}. The smallest world size that fits is {world} ranks of {_gb(self.memory)}; or give each " \
            "rank more memory"

    def state_note(self) -> bool:
        return self.mem.state_row_bytes > 0


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


# ------------------------------------------------------------------------------ public
def plan_placement(num_embeddings: int, embedding_dim: int, world_size: int, *, batch_size: int | None = None,
                   counts=None, sample=None, law=None, dtype=torch.float32, optimizer=None, memory_per_rank=None,
                   tables=None, page_size: int | None = None, mirrors: int | None = None, comm_dtype=None,
                   cost_model=None, max_pages: int = _MAX_PAGES):
    """Plan the page size and placement of a table (or of several tables that share them).

    Args:
        num_embeddings, embedding_dim: the table's shape.
        world_size: ranks sharing the table.
        batch_size: ids each rank looks up per step (one lookup call).
        counts: per-row counts (``[num_embeddings]``, e.g. a vocabulary's word counts), or
        sample: id batches (a tensor/array of ids or a list of them) whose frequencies stand for
            the law, or
        law: ``"zipf:<s>"`` (row 0 hottest), ``"uniform"``, or an `IdLaw`. Exactly one of the three.
        dtype: storage dtype (torch.dtype or its name).
        optimizer: the fused optimizer's name or spec (``"rowwise_adagrad"``, ``{"name": "adam", ...}``),
            or None (sparse gradients): its state per row counts against memory.
        memory_per_rank: bytes (or ``"80GB"``, ``"80GiB"``) each rank may use for the table, its
            state and the step's workspace; None: no limit.
        tables: instead of batch_size/counts/sample/law, several tables of this shape sharing the
            placement, each looked up once per step: a list of ``(law or counts, batch_size)``.
        page_size: use this page size instead of searching; mirrors: mirror exactly this many of
            the hottest pages on every rank instead of searching.
        comm_dtype: dtype on the wire (`ShardedEmbedding`'s comm_dtype); cost_model: a
            `CostModel`, its coefficients (dict) or a JSON file (default: fitted on this
            project's machine); max_pages: most pages a candidate page size may give.

    Returns a `PlacementPlan`: ``.page_size`` and ``.placement`` go straight to
    ``ShardedEmbedding(num_embeddings, embedding_dim, page_size=plan.page_size,
    placement=plan.placement)``; ``.report()`` and ``.draw(path)`` explain it. Nothing is
    allocated and nothing is communicated (call it with the same arguments on every rank).

    Raises ValueError for bad arguments and `PlanningError` (a ValueError) when no placement
    fits ``memory_per_rank``, naming the smallest world size that would.
    """
    from .report import PlacementPlan

    n = _positive_int("num_embeddings", num_embeddings)
    dim = _positive_int("embedding_dim", embedding_dim)
    world = _positive_int("world_size", world_size)
    laws = _tables(n, batch_size, counts, sample, law, tables)
    dt = _dtype("dtype", dtype)
    wire = _dtype("comm_dtype", comm_dtype, allow_none=True)
    opt = _optimizer(optimizer)
    memory = parse_bytes(memory_per_rank)
    if page_size is not None:
        page_size = _positive_int("page_size", page_size)
    if mirrors is not None and (isinstance(mirrors, bool) or not isinstance(mirrors, numbers.Integral) or mirrors < 0):
        raise ValueError(f"mirrors must be an int >= 0 (hottest pages mirrored on every rank), got {mirrors!r}")
    max_pages = _positive_int("max_pages", max_pages)
    planner = Planner(n, dim, world, laws, dt, wire, opt, memory, CostModel.load(cost_model), max_pages)
    best = planner.search(page_size, mirrors)
    return PlacementPlan.from_candidate(planner, best)


def predict_placement(num_embeddings: int, embedding_dim: int, world_size: int, *, page_size: int,
                      placement="round_robin", **law_and_options):
    """The same report for a placement you give (``"round_robin"`` or a per-page list), e.g. to
    compare a hand-made placement or TorchRec's even contiguous row split
    (``page_size=ceil(rows / world)``, round robin) with a plan. Keywords as `plan_placement`
    (memory_per_rank is reported against, not enforced)."""
    from .report import PlacementPlan

    opts = dict(law_and_options)
    n = _positive_int("num_embeddings", num_embeddings)
    dim = _positive_int("embedding_dim", embedding_dim)
    world = _positive_int("world_size", world_size)
    page_size = _positive_int("page_size", page_size)
    laws = _tables(n, opts.pop("batch_size", None), opts.pop("counts", None), opts.pop("sample", None),
                   opts.pop("law", None), opts.pop("tables", None))
    planner = Planner(n, dim, world, laws, _dtype("dtype", opts.pop("dtype", torch.float32)),
                      _dtype("comm_dtype", opts.pop("comm_dtype", None), allow_none=True),
                      _optimizer(opts.pop("optimizer", None)), parse_bytes(opts.pop("memory_per_rank", None)),
                      CostModel.load(opts.pop("cost_model", None)), _MAX_PAGES)
    if opts:
        raise TypeError(f"predict_placement got unexpected keywords {sorted(opts)}")
    from ..placement import PagePlan

    PagePlan.build(n, page_size, world, placement)  # validates the placement
    geo = geometry(n, page_size, world, laws)
    return PlacementPlan.from_placement(planner, geo, placement)
