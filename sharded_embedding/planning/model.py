"""What a placement costs: memory per rank, and the time of a training step from its loads.

Loads per rank and lookup call (the quantities ``emb.stats()`` measures):

- ``ids``: ids the rank looks up; ``unique``: its distinct ids (``local`` of them on pages it
  holds, the rest asked of peers: ``received`` rows);
- ``served``: rows it serves to peers (gathers, sends, and updates with their gradients);
- ``wire``: bytes it sends plus bytes it receives in the all-to-alls (requests, vectors,
  gradients); ``mirror``: rows of mirrored pages it all-reduces in the backward, and
  ``mirror_bytes``, an estimate of what that sync sends (not counted by ``emb.stats()``): its
  touched ids to every other replica, and ``2 (n - 1) / n`` of the summed rows (a ring all-reduce
  over ``n`` replicas).

`CostModel` turns a rank's loads into seconds. A step takes as long as its slowest rank, since
every exchange waits for all ranks (bulk-synchronous), so the step estimate is ``fixed +
max over ranks``. The coefficients were fitted on this project's machine by
``benchmarks/plan_calibration.py`` (docs/planning.md gives the fit, its residuals and how to
refit on other hardware: pass ``cost_model=CostModel(**fitted)`` to `plan_placement`).

Memory per rank (`MemoryModel`): the table rows it holds, its fused optimizer's state for those
rows (see `optimizers`: adagrad keeps ``[rows, dim]``, rowwise_adagrad ``[rows]`` float32,
adam ``2 x [rows, dim]``, sgd nothing; without a fused optimizer the sparse gradient of the
touched rows lives until the optimizer step), and the step's workspace (`lookup.Workspace`'s
buffers, which grow by 1.5x and are kept, the routing tensors, the forward output and its
gradient, optimizer temporaries, the mirror all-reduce buffers), with 1.5x headroom for the
allocator.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..routing import TABLE_HEADER as _HEADER  # int64 columns before the rows in a request

__all__ = ["CostModel", "MemoryModel", "Loads", "state_bytes_per_row", "OPTIMIZER_NAMES"]

OPTIMIZER_NAMES = ("sgd", "adagrad", "rowwise_adagrad", "adam")
_ALLOCATOR = 1.5  # headroom over the tensors' bytes (docs/planning.md: RSS growth over steps)


def state_bytes_per_row(optimizer: str | None, dim: int, itemsize: int) -> int:
    """Bytes of fused-optimizer state per table row (see `optimizers`)."""
    return {None: 0, "sgd": 0, "adagrad": dim * itemsize, "rowwise_adagrad": 4, "adam": 2 * dim * itemsize}[optimizer]


@dataclass
class Loads:
    """Expected per-rank loads of one lookup call (arrays ``[world]``)."""

    ids: np.ndarray
    local: np.ndarray
    received: np.ndarray
    served: np.ndarray
    mirror: np.ndarray
    bytes_sent: np.ndarray
    bytes_received: np.ndarray
    mirror_sets: int = 0  # replica sets this plan all-reduces over (each a sync per backward)
    mirror_bytes: np.ndarray | float = 0.0  # estimated bytes sent by the mirror sync (ids all-gather, ring all-reduce)

    @property
    def unique(self) -> np.ndarray:
        return self.local + self.received

    def __add__(self, other: Loads) -> Loads:
        return Loads(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class CostModel:
    """Seconds of one lookup call's forward + backward + fused update, per rank.

    ``rank_seconds = per_id * ids + per_unique * unique + per_owned_row * (local + served)
    + per_wire_byte * (bytes sent + received) + per_mirror_row * mirror``, and a step takes, per
    call, ``per_call + per_peer * (world - 1) + (mirror_sync if mirrors) + max over ranks``.
    """

    # Fitted by benchmarks/plan_calibration.py on this project's 2-core machine (docs/planning.md),
    # with the shared-memory transport between the ranks (main's default on one CPU machine).
    per_call: float = 0.000233  # fixed per call (Python, kernel launches), without collectives
    per_peer: float = 0.00727  # latency of a call's exchanges per peer
    per_id: float = 3.50e-07  # validate, sort, dedup, the output gather, the gradient bag: per id
    per_unique: float = 0.0  # per distinct id of the requester (the fit folds it into per_id and per_owned_row)
    per_owned_row: float = 2.60e-07  # gather + update of a row by its owner (local or served)
    per_wire_byte: float = 3.94e-09  # per byte sent + received in the all-to-alls
    per_mirror_row: float = 2.34e-06  # per row all-reduced over the mirrors (ids, sum, update)
    mirror_sync: float = 0.00794  # fixed per call with mirrors: 2 all_gathers + all_reduce
    source: str = "fitted on this project's 2-core CPU machine, 2026-11-30"

    def rank_seconds(self, loads: Loads) -> np.ndarray:
        wire = loads.bytes_sent + loads.bytes_received
        return (self.per_id * loads.ids + self.per_unique * loads.unique
                + self.per_owned_row * (loads.local + loads.served) + self.per_wire_byte * wire
                + self.per_mirror_row * loads.mirror)

    def fixed_seconds(self, world: int, calls: int, mirror_sets: int) -> float:
        return calls * (self.per_call + self.per_peer * (world - 1) + (self.mirror_sync if mirror_sets else 0.0))

    def step_seconds(self, loads: Loads, world: int, calls: int) -> float:
        return self.fixed_seconds(world, calls, loads.mirror_sets) + float(np.max(self.rank_seconds(loads)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, spec) -> CostModel:
        """A CostModel from an instance, a dict of coefficients, or a JSON file's path."""
        if spec is None:
            return DEFAULT_COST_MODEL
        if isinstance(spec, CostModel):
            return spec
        if isinstance(spec, str):
            with open(spec) as f:
                spec = json.load(f)
        if isinstance(spec, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"cost_model: unknown coefficients {unknown}; known: {sorted(known)}")
            return cls(**spec)
        raise ValueError(f"cost_model must be a CostModel, a dict of its coefficients or a JSON path, got {spec!r}")


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per rank: table rows, optimizer state, step workspace."""

    dim: int
    itemsize: int  # storage dtype
    wire_itemsize: int  # comm dtype on the wire
    optimizer: str | None

    @property
    def row_bytes(self) -> int:
        return self.dim * self.itemsize

    @property
    def state_row_bytes(self) -> int:
        return state_bytes_per_row(self.optimizer, self.dim, self.itemsize)

    def workspace(self, loads_per_table: list[Loads], world: int, num_pages: int) -> np.ndarray:
        """Step workspace per rank (bytes), summed over the tables (each has its own buffers),
        from the expected loads of each table's lookup (+10% for batch-to-batch variation,
        x1.5 for the workspace's growth steps)."""
        row, total = self.row_bytes, 0.0
        for loads in loads_per_table:
            unique, owned = loads.unique * 1.1, (loads.local + loads.served) * 1.1
            served, mirror = loads.served * 1.1, loads.mirror * 1.1
            buffers = 1.5 * row * (served + unique + unique + served)  # served, gathered, work
            if self.wire_itemsize != self.itemsize:
                buffers = buffers + 1.5 * self.dim * self.wire_itemsize * (served + unique)
            autograd = 2 * row * loads.ids  # the forward's output and its gradient
            routing = 12 * 8 * loads.ids + 2 * world * (_HEADER + 1.25 * unique) * 8
            update = 3 * row * owned if self.optimizer not in (None, "sgd") else row * owned
            if self.optimizer is None:  # a sparse gradient kept until opt.step(), and its coalesced copy
                update = update + 2 * row * owned
            mirrors = 2 * row * mirror + 8 * world * mirror
            total = total + buffers + autograd + routing + update + mirrors
        # x1.5 for the allocator (measured RSS growth over steps reached 1.36x the sum above), and
        # the routing tables and page owners (int64 per page)
        return _ALLOCATOR * total + 48.0 * num_pages * len(loads_per_table)


DEFAULT_COST_MODEL = CostModel()
