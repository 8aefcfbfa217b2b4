"""Capacity planning from the command line: the placement plan of a table, without allocating it.

    python -m sharded_embedding.plan rows=1000000000 dim=128 world=64 batch=65536 law=zipf:1.05 \\
        fused_optimizer=rowwise_adagrad memory=80GB draw=plan.png

Hydra overrides of the schema below (configs/plan.yaml); unknown keys and wrong types are
rejected. Prints `PlacementPlan.report`; ``draw=`` writes the picture, ``json=`` the headline
numbers of the plan and of the baselines. No process group, no table: it runs anywhere.
Exit code 2 for arguments the planner refuses or a table that fits nowhere (the message names
the smallest world size that would hold it).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class PlanConfig:
    rows: int = 1_000_000  # rows of the table
    dim: int = 64  # columns
    world: int = 2  # ranks
    batch: int = 8192  # ids each rank looks up per step
    law: str = "zipf:1.05"  # zipf:<s> (row 0 hottest) | uniform
    counts: Optional[str] = None  # a .npy of per-row counts (replaces law), e.g. a vocabulary's
    tables: int = 1  # tables of this shape and law sharing the placement
    dtype: str = "float32"
    comm_dtype: Optional[str] = None  # e.g. bfloat16 on the wire
    fused_optimizer: Optional[str] = None  # sgd | adagrad | rowwise_adagrad | adam | null (sparse gradients)
    memory: Optional[str] = None  # per rank, e.g. 80GB or 80GiB; null: no limit
    page_size: Optional[int] = None  # null: searched
    mirrors: Optional[int] = None  # hottest pages mirrored on every rank; null: searched
    max_pages: int = 1 << 18
    cost_model: Optional[str] = None  # a JSON of CostModel coefficients (benchmarks/plan_calibration.py --out)
    draw: Optional[str] = None  # write the picture (PNG) here
    json: Optional[str] = None  # write the headline numbers here


def register() -> None:
    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def plan_from_config(cfg):
    """The `PlacementPlan` for a composed config (ValueError for what the planner refuses)."""
    import numpy as np

    from .planning import plan_placement

    law = cfg.law
    if cfg.counts:
        try:
            law = np.load(cfg.counts, allow_pickle=False)
        except ValueError:
            raise ValueError(f"counts={cfg.counts}: not a .npy array of per-row counts (numpy.save of a 1-D "
                             "numeric array; object arrays are not read)") from None
    for key in ("draw", "json"):  # before planning, not after printing the report
        target = cfg[key]
        folder = os.path.dirname(os.path.abspath(str(target))) if target else None
        if folder and not os.path.isdir(folder):
            raise ValueError(f"{key}={target}: the folder {folder} does not exist")
    common = dict(dtype=cfg.dtype, comm_dtype=cfg.comm_dtype, optimizer=cfg.fused_optimizer, memory_per_rank=cfg.memory,
                  page_size=cfg.page_size, mirrors=cfg.mirrors, max_pages=cfg.max_pages, cost_model=cfg.cost_model)
    if cfg.tables < 1:
        raise ValueError(f"tables must be >= 1, got {cfg.tables}")
    if cfg.tables > 1:
        return plan_placement(cfg.rows, cfg.dim, cfg.world, tables=[(law, cfg.batch)] * cfg.tables, **common)
    key = "counts" if cfg.counts else "law"
    return plan_placement(cfg.rows, cfg.dim, cfg.world, batch_size=cfg.batch, **{key: law}, **common)


def main() -> None:
    import hydra

    from .hydra_app import compose, unknown_added_keys

    register()
    overrides = sys.argv[1:]
    if not any(a.startswith("-") for a in overrides):  # --help, --cfg: Hydra's own
        try:  # the schema's errors (unknown keys, wrong types) as one line and exit 2, like the apps
            compose("plan", register, overrides)
            added = unknown_added_keys("plan", register, overrides)
        except Exception as e:  # noqa: BLE001 - Hydra raises several types for bad overrides
            hint = str(e).split("\nTo append")[0]  # Hydra's '+key' hint: added keys are refused here
            cause = f"\n  {e.__cause__}" if e.__cause__ is not None else ""
            print(f"configuration error: {hint}{cause}", file=sys.stderr, flush=True)
            sys.exit(2)
        if added:
            print(f"configuration error: {', '.join(added)}: not a key of the planner's configuration",
                  file=sys.stderr, flush=True)
            sys.exit(2)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="plan")
    def run(cfg) -> None:
        try:
            plan = plan_from_config(cfg)
        except (ValueError, OSError) as e:
            print(f"planning error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        print(plan.report(), flush=True)
        if cfg.draw:
            plan.draw(cfg.draw)
            print(f"picture: {cfg.draw}")
        if cfg.json:
            summary = {"plan": plan.summary(), **{k: b.summary() for k, b in plan.baselines.items()}}
            Path(cfg.json).write_text(json.dumps(summary, indent=2))

    run()


if __name__ == "__main__":
    main()
