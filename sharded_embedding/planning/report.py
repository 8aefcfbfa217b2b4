"""`PlacementPlan`: a planned (or given) placement with its predicted per-rank memory and
loads, as text (`report`) and as a picture (`draw`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .model import CostModel, Loads
from .search import Candidate, Geometry, Planner, loads_of, owners_array, rows_held

__all__ = ["PlacementPlan", "RankPrediction"]


@dataclass
class RankPrediction:
    """Per-rank predictions (arrays ``[world]``; rows and bytes per training step, summed over
    the tables sharing the placement)."""

    table_bytes: np.ndarray
    state_bytes: np.ndarray
    workspace_bytes: np.ndarray
    rows_served: np.ndarray  # rows this rank serves to peers (emb.stats(): sum of rows_served_per_rank)
    rows_received: np.ndarray  # distinct ids this rank asks of peers (sum of unique_ids_sent_per_rank)
    rows_local: np.ndarray  # distinct ids served from its own pages (local_unique_ids)
    mirror_rows: np.ndarray  # rows of mirrored pages all-reduced (mirror_rows_reduced)
    bytes_sent: np.ndarray  # all-to-all bytes sent (bytes_sent_per_call, summed over tables)
    bytes_received: np.ndarray
    mirror_bytes_sent: np.ndarray  # estimated bytes the mirror sync sends (not in emb.stats())
    seconds: np.ndarray  # modelled busy time of the rank in one step (without fixed latency)

    @property
    def bytes_sent_in_all(self) -> np.ndarray:
        return self.bytes_sent + self.mirror_bytes_sent

    @property
    def memory_bytes(self) -> np.ndarray:
        return self.table_bytes + self.state_bytes + self.workspace_bytes

    @staticmethod
    def imbalance(values: np.ndarray) -> float:
        """max / mean (1.0: perfectly even; nan when every rank's value is 0)."""
        mean = float(np.mean(values))
        return float(np.max(values)) / mean if mean > 0 else float("nan")


@dataclass
class PlacementPlan:
    """A placement and what it is predicted to cost. ``page_size`` and ``placement`` (one entry
    per page: a rank, or a tuple of ranks that mirror it) go straight to `ShardedEmbedding`."""

    num_embeddings: int
    embedding_dim: int
    world_size: int
    page_size: int
    placement: list | str
    ranks: RankPrediction
    step_seconds: float  # modelled step time on the calibrated machine
    per_table: list[Loads]  # each table's expected loads per lookup call (as emb.stats() counts them)
    laws: list  # [(law description, ids per rank per step)] per table
    dtype: str
    comm_dtype: str | None
    optimizer: str | None
    memory_per_rank: float | None
    cost_model: CostModel
    mirrored_pages: list[int]
    page_demand: np.ndarray  # expected distinct rows one rank asks of each page per step (all tables)
    page_owners: np.ndarray  # [pages, replicas] int64, -1 padded
    baselines: dict = field(default_factory=dict)  # name -> PlacementPlan, for comparison
    label: str = "plan"

    # ------------------------------------------------------------------ construction
    @classmethod
    def _build(cls, planner: Planner, geo: Geometry, owners: np.ndarray, placement, label: str) -> PlacementPlan:
        world = planner.world
        tables = loads_of(owners, geo, world, planner.wire_row, planner.mem.row_bytes)
        for t, loads in zip(planner.tables, tables):
            loads.ids = np.full(world, float(t.batch_size))
        total = tables[0]
        for extra in tables[1:]:
            total = total + extra
        nrep = (owners >= 0).sum(1)
        held = rows_held(owners, geo, world)
        ntab = len(planner.tables)
        mem = planner.mem
        ranks = RankPrediction(
            table_bytes=held * mem.row_bytes * ntab, state_bytes=held * mem.state_row_bytes * ntab,
            workspace_bytes=mem.workspace(tables, world, geo.num_pages), rows_served=total.served,
            rows_received=total.received, rows_local=total.local, mirror_rows=total.mirror,
            bytes_sent=total.bytes_sent, bytes_received=total.bytes_received,
            mirror_bytes_sent=np.broadcast_to(np.asarray(total.mirror_bytes, dtype=float), (world,)).copy(),
            seconds=planner.cost.rank_seconds(total))
        return cls(
            num_embeddings=planner.num_rows, embedding_dim=planner.dim, world_size=world, page_size=geo.page_size,
            placement=placement, ranks=ranks, step_seconds=planner.cost.step_seconds(total, world, planner.calls),
            per_table=tables, laws=[(t.law.describe(), t.batch_size) for t in planner.tables],
            dtype=str(planner.dtype).replace("torch.", ""),
            comm_dtype=str(planner.comm_dtype).replace("torch.", "") if planner.comm_dtype else None,
            optimizer=planner.optimizer, memory_per_rank=planner.memory, cost_model=planner.cost,
            mirrored_pages=np.nonzero(nrep > 1)[0].tolist(), page_demand=geo.demand.sum(0), page_owners=owners,
            label=label)

    @classmethod
    def from_candidate(cls, planner: Planner, c: Candidate) -> PlacementPlan:
        placement = c.placement(planner.world)
        owners = owners_array(placement, c.geometry.num_pages, planner.world)
        plan = cls._build(planner, c.geometry, owners, placement, "plan")
        plan.baselines = _baselines(planner, c.geometry)
        return plan

    @classmethod
    def from_placement(cls, planner: Planner, geo: Geometry, placement) -> PlacementPlan:
        owners = owners_array(placement, geo.num_pages, planner.world)
        return cls._build(planner, geo, owners, placement, "given placement")

    # ------------------------------------------------------------------ views
    @property
    def num_pages(self) -> int:
        return self.page_owners.shape[0]

    @property
    def imbalance(self) -> float:
        """max / mean of the rows each rank serves per step."""
        return RankPrediction.imbalance(self.ranks.rows_served)

    def fits(self) -> bool:
        return self.memory_per_rank is None or bool(self.ranks.memory_bytes.max() <= self.memory_per_rank)

    def summary(self) -> dict:
        """The headline numbers (JSON-friendly)."""
        r = self.ranks
        return {
            "label": self.label, "page_size": self.page_size, "num_pages": self.num_pages,
            "mirrored_pages": len(self.mirrored_pages), "memory_gb_max": float(r.memory_bytes.max() / 1e9),
            "table_gb_max": float(r.table_bytes.max() / 1e9), "state_gb_max": float(r.state_bytes.max() / 1e9),
            "workspace_gb_max": float(r.workspace_bytes.max() / 1e9),
            "rows_served_mean": float(r.rows_served.mean()), "rows_served_max": float(r.rows_served.max()),
            "imbalance_rows_served": self.imbalance, "bytes_sent_mean": float(r.bytes_sent.mean()),
            "bytes_sent_max": float(r.bytes_sent.max()), "mirror_rows_max": float(r.mirror_rows.max()),
            "mirror_bytes_sent_max": float(r.mirror_bytes_sent.max()),
            "bytes_sent_in_all_max": float((r.bytes_sent + r.mirror_bytes_sent).max()),
            "step_ms": self.step_seconds * 1e3, "fits": self.fits(),
        }

    # ------------------------------------------------------------------ text
    def report(self) -> str:
        """The plan as text: inputs, per-rank memory and loads, imbalance, where pages sit, and
        the same figures for round robin and an even contiguous split."""
        out = [self._header(), ""]
        columns = [self] + list(self.baselines.values())
        out += _comparison(columns)
        out += ["", *self._per_rank(), "", *self._pages()]
        out += ["", f"Rows and bytes are expectations per training step for ids drawn independently from the law; "
                f"times are the cost model ({self.cost_model.source}), a guide for comparing placements."]
        return "\n".join(out)

    def _header(self) -> str:
        tables = len(self.laws)
        laws = "; ".join(f"{batch:,} from {law}" for law, batch in self.laws)
        budget = f"{_fmt_bytes(self.memory_per_rank)} per rank" if self.memory_per_rank else "no memory limit"
        mirrors = (f"{len(self.mirrored_pages)} hottest mirrored on every rank ({_ranges(self.mirrored_pages)})"
                   if self.mirrored_pages else "none mirrored")
        return (f"Placement {self.label}: {'%d tables of ' % tables if tables > 1 else ''}{self.num_embeddings:,} x "
                f"{self.embedding_dim} {self.dtype}, optimizer {self.optimizer or 'none (sparse gradients)'}"
                f"{', ' + self.comm_dtype + ' on the wire' if self.comm_dtype else ''}, {self.world_size} ranks, {budget}\n"
                f"ids per rank per step: {laws}\n"
                f"page_size {self.page_size:,}: {self.num_pages:,} pages, {mirrors}; "
                f"modelled step {self.step_seconds * 1e3:.2f} ms")

    def _per_rank(self) -> list[str]:
        r, w = self.ranks, self.world_size
        head = (f"{'rank':>5} {'table GB':>9} {'state GB':>9} {'work GB':>8} {'total GB':>9} {'pages':>7} "
                f"{'served/step':>12} {'received':>10} {'local':>9} {'mirror':>9} {'MB a2a':>8} {'MB sync':>8} "
                f"{'model ms':>9}")
        valid = self.page_owners >= 0
        pages = np.bincount(self.page_owners[valid], minlength=w)
        ranks = range(w) if w <= 16 else sorted({int(np.argmax(r.seconds)), int(np.argmin(r.seconds)),
                                                int(np.argmax(r.memory_bytes)), 0})
        lines = [f"Per rank{'' if w <= 16 else ' (the busiest, the idlest, the fullest, rank 0; of ' + str(w) + ')'}:", head]
        for k in ranks:
            lines.append(f"{k:>5} {r.table_bytes[k] / 1e9:>9.3f} {r.state_bytes[k] / 1e9:>9.3f} "
                         f"{r.workspace_bytes[k] / 1e9:>8.3f} {r.memory_bytes[k] / 1e9:>9.3f} {pages[k]:>7,} "
                         f"{r.rows_served[k]:>12,.0f} {r.rows_received[k]:>10,.0f} {r.rows_local[k]:>9,.0f} "
                         f"{r.mirror_rows[k]:>9,.0f} {r.bytes_sent[k] / 1e6:>8.2f} {r.mirror_bytes_sent[k] / 1e6:>8.2f} "
                         f"{r.seconds[k] * 1e3:>9.2f}")
        if self.memory_per_rank:
            lines.append(f"largest rank memory {_fmt_bytes(r.memory_bytes.max())} of {_fmt_bytes(self.memory_per_rank)}"
                         f" ({100 * r.memory_bytes.max() / self.memory_per_rank:.0f}%)")
        return lines

    def _pages(self) -> list[str]:
        owners, w = self.page_owners, self.world_size
        lines = ["Pages (mirrored ones marked *):"]
        if self.num_pages <= 64:
            cells = []
            for p in range(self.num_pages):
                o = [int(x) for x in owners[p] if x >= 0]
                cells.append(f"{p}:{'*' + ','.join(map(str, o)) if len(o) > 1 else o[0]}")
            lines += ["  " + " ".join(cells[i : i + 16]) for i in range(0, len(cells), 16)]
            return lines
        if self.mirrored_pages:
            lines.append(f"  * pages {_ranges(self.mirrored_pages)} on every rank "
                         f"({sum(self.page_demand[self.mirrored_pages]):,.0f} of {self.page_demand.sum():,.0f} "
                         "distinct rows a rank asks per step)")
        single = (owners >= 0).sum(1) == 1
        show = range(w) if w <= 16 else np.argsort(-self.ranks.rows_served)[:4].tolist()
        for k in show:
            mine = np.nonzero(single & (owners[:, 0] == k))[0]
            hottest = mine[np.argsort(-self.page_demand[mine])[:4]] if mine.size else []
            lines.append(f"  rank {k}: {mine.size:,} pages owning {self.page_demand[mine].sum():,.0f} rows/step of "
                         f"demand; hottest {', '.join(str(int(p)) for p in hottest) or '-'}")
        if w > 16:
            lines.append(f"  ... (the 4 ranks serving most shown of {w})")
        return lines

    # ------------------------------------------------------------------ picture
    def draw(self, path) -> None:
        """Write a PNG: per-rank memory (table, state, workspace) against the budget; rows served
        and MB sent per step for the plan and the baselines; which pages sit where."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        w, r = self.world_size, self.ranks
        x = np.arange(w)
        ax = axes[0][0]
        bottom = np.zeros(w)
        for values, name, color in ((r.table_bytes, "table", "tab:blue"), (r.state_bytes, "optimizer state", "tab:orange"),
                                    (r.workspace_bytes, "step workspace", "tab:green")):
            ax.bar(x, values / 1e9, bottom=bottom / 1e9, label=name, color=color, width=0.8)
            bottom += values
        if self.memory_per_rank:
            ax.axhline(self.memory_per_rank / 1e9, color="red", linestyle="--", label="budget")
        ax.set(title="memory per rank", xlabel="rank", ylabel="GB")
        ax.legend(fontsize=8)
        plans = [self] + list(self.baselines.values())
        for ax, attr, scale, unit in ((axes[0][1], "rows_served", 1.0, "rows served per step"),
                                      (axes[1][0], "bytes_sent_in_all", 1e6,
                                                                         "MB sent per step (all-to-alls + mirror sync)")):
            width = 0.8 / len(plans)
            for i, p in enumerate(plans):
                values = getattr(p.ranks, attr) / scale
                ax.bar(x + (i - (len(plans) - 1) / 2) * width, values, width=width,
                       label=f"{p.label} (max/mean {RankPrediction.imbalance(values):.2f})")
            ax.set(title=unit, xlabel="rank")
            top = max(float(getattr(p.ranks, attr).max()) for p in plans)
            low = min(float(getattr(p.ranks, attr).min()) for p in plans)
            if low > 0 and top / low > 20:
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax = axes[1][1]
        owners = self.page_owners
        single = (owners >= 0).sum(1) == 1
        pages = np.arange(self.num_pages)
        demand = np.maximum(self.page_demand, 1e-3)
        sc = ax.scatter(pages[single] + 1, owners[single, 0], c=np.log10(demand[single]), s=6, marker="s",
                        cmap="viridis", vmin=np.log10(demand.min()), vmax=np.log10(demand.max()))
        for p in self.mirrored_pages:
            ax.scatter(np.full(w, p + 1), x, marker="x", color="red", s=10)
        if self.mirrored_pages:
            ax.scatter([], [], marker="x", color="red", label="mirrored on every rank")
            ax.legend(fontsize=8, loc="upper right")
        if self.num_pages > 50:
            ax.set_xscale("log")
        ax.set(title=f"pages ({self.num_pages:,} of {self.page_size:,} rows) by owner", xlabel="page + 1", ylabel="rank")
        fig.colorbar(sc, ax=ax, label="log10 rows asked per rank per step")
        fig.suptitle(self._header().split("\n")[0], fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _baselines(planner: Planner, geo: Geometry) -> dict:
    """Round robin at the plan's page size, and the even contiguous split (TorchRec row-wise)."""
    out = {}
    world = planner.world
    if world > 1:
        rr = PlacementPlan._build(planner, geo, owners_array("round_robin", geo.num_pages, world), "round_robin",
                                  f"round robin, page {geo.page_size:,}")
        out["round_robin"] = rr
        size = -(-planner.num_rows // world)
        split = planner.geometry(size)
        out["row_split"] = PlacementPlan._build(planner, split, owners_array("round_robin", split.num_pages, world),
                                                "round_robin", "contiguous row split")
    return out


def _comparison(plans: list[PlacementPlan]) -> list[str]:
    def row(name, fn, fmt):
        return f"  {name:<34}" + "".join(f"{fmt(fn(p)):>24}" for p in plans)

    lines = ["Compared (per rank per step; max over ranks unless said):",
             f"  {'':<34}" + "".join(f"{p.label[:23]:>24}" for p in plans)]
    mib = lambda v: f"{v / 1e9:,.3f} GB"  # noqa: E731
    lines += [
        row("page size / pages", lambda p: f"{p.page_size:,}/{p.num_pages:,}", str),
        row("memory: table + state", lambda p: (p.ranks.table_bytes + p.ranks.state_bytes).max(), mib),
        row("memory: step workspace", lambda p: p.ranks.workspace_bytes.max(), mib),
        row("memory: total", lambda p: p.ranks.memory_bytes.max(), mib),
        row("rows served (mean)", lambda p: p.ranks.rows_served.mean(), lambda v: f"{v:,.0f}"),
        row("rows served (max)", lambda p: p.ranks.rows_served.max(), lambda v: f"{v:,.0f}"),
        row("imbalance of rows served max/mean", lambda p: p.imbalance, lambda v: f"{v:.2f}"),
        row("rows received (max)", lambda p: p.ranks.rows_received.max(), lambda v: f"{v:,.0f}"),
        row("mirror rows all-reduced (max)", lambda p: p.ranks.mirror_rows.max(), lambda v: f"{v:,.0f}"),
        row("MB sent by all-to-alls (mean)", lambda p: p.ranks.bytes_sent.mean() / 1e6, lambda v: f"{v:,.2f}"),
        row("MB sent by all-to-alls (max)", lambda p: p.ranks.bytes_sent.max() / 1e6, lambda v: f"{v:,.2f}"),
        row("MB sent by mirror sync (est., max)", lambda p: p.ranks.mirror_bytes_sent.max() / 1e6, lambda v: f"{v:,.2f}"),
        row("MB sent in all (max)", lambda p: (p.ranks.bytes_sent + p.ranks.mirror_bytes_sent).max() / 1e6,
            lambda v: f"{v:,.2f}"),
        row("modelled step ms", lambda p: p.step_seconds * 1e3, lambda v: f"{v:,.2f}"),
    ]
    return lines


def _ranges(pages: list[int]) -> str:
    parts, start = [], None
    for i, p in enumerate(pages):
        if start is None:
            start = p
        if i + 1 == len(pages) or pages[i + 1] != p + 1:
            parts.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    text = ", ".join(parts)
    return text if len(text) < 120 else text[:117] + "..."


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


_ = math
