"""The click model's configuration: the structured schema Hydra checks ``configs/dlrm.yaml``
against, and the checks that need more than types (run identically on every rank, before any
work)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from ..hydra_app import folder_problem

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
COMM_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TableCfg:
    name: str = "???"
    rows: int = 1000
    features: List[str] = field(default_factory=list)
    bag: List[int] = field(default_factory=lambda: [1, 1])  # ids per bag of the features in bag_features
    bag_features: List[str] = field(default_factory=list)
    zipf: float = 1.1
    sigma: float = 1.0


@dataclass
class DataCfg:
    tables: List[TableCfg] = field(default_factory=list)
    pairs: List[List[str]] = field(default_factory=list)
    seed: int = 0
    scale: float = 1.0
    ctr: float = 0.25
    head: float = 50.0
    decay: float = 0.5
    interaction: float = 0.6
    dense: float = 0.35
    test_samples: int = 200_000
    bayes_samples: int = 1_000_000


@dataclass
class ModelCfg:
    dim: int = 16
    dense_arch: List[int] = field(default_factory=lambda: [64, 32])
    over_arch: List[int] = field(default_factory=lambda: [128, 64])
    page_size: int = 512
    comm_dtype: Optional[str] = None


@dataclass
class OptimCfg:
    sparse: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    dense: str = "adam"
    dense_lr: float = 0.001
    # Both learning rates times `loop.lr_factor(step)`: linear warmup over the first
    # warmup_steps, then constant, then from decay_start a quadratic decay over decay_steps
    # (the shape of MLPerf DLRM's schedule); all 0: constant.
    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0


@dataclass
class LoopCfg:
    steps: int = 2000
    batch_size: int = 2048
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 0
    resume: bool = False
    bind_cpus: bool = True
    seed: int = 0


@dataclass
class DlrmCfg:
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: LoopCfg = field(default_factory=LoopCfg)
    out_dir: Optional[str] = None


MIN_AUC_SAMPLES = 100  # test and Bayes sample counts: below it an AUC is noise, or undefined


def register() -> None:
    ConfigStore.instance().store(name="dlrm_schema", node=DlrmCfg)


def validate(cfg) -> list[str]:
    """What is wrong with ``cfg`` (empty: fine)."""
    errors = []
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    if not d.tables:
        errors.append("data.tables is empty")
    names, features = set(), {}
    for i, tab in enumerate(d.tables):
        where = f"data.tables[{i}] ({tab.name})"
        if tab.name in names:
            errors.append(f"{where}: two tables are named {tab.name!r}")
        names.add(tab.name)
        if not tab.name or "." in tab.name:
            errors.append(f"{where}: name must be a non-empty string without dots (a table's key in state dicts)")
        if tab.rows < 1:
            errors.append(f"{where}: rows must be >= 1, got {tab.rows}")
        if not tab.features:
            errors.append(f"{where}: no features")
        for f in tab.features:
            if f in features:
                errors.append(f"{where}: feature {f!r} is also read by table {features[f]!r}")
            features[f] = tab.name
        extra = [f for f in tab.bag_features if f not in tab.features]
        if extra:
            errors.append(f"{where}: bag_features {extra} are not among its features {list(tab.features)}")
        if len(tab.bag) != 2 or not 0 <= tab.bag[0] <= tab.bag[1]:
            errors.append(f"{where}: bag must be [min, max] ids with 0 <= min <= max, got {list(tab.bag)}")
        elif list(tab.bag) != [1, 1] and not tab.bag_features:
            errors.append(f"{where}: bag={list(tab.bag)} would change nothing: it sets the bags of bag_features, "
                          "and the table has none (list them, or leave bag out)")
        if not (tab.zipf > 0 and math.isfinite(tab.zipf)):
            errors.append(f"{where}: zipf must be a finite number > 0, got {tab.zipf}")
        if not (tab.sigma >= 0 and math.isfinite(tab.sigma)):
            errors.append(f"{where}: sigma must be a finite number >= 0, got {tab.sigma}")
    for pair in d.pairs:
        unknown = [f for f in pair if f not in features]
        if len(pair) != 2 or unknown:
            errors.append(f"data.pairs: {list(pair)} must name two features of the tables (unknown: {unknown})")
    for key, value in (("data.scale", d.scale), ("data.head", d.head), ("optim.sparse_lr", o.sparse_lr),
                       ("optim.dense_lr", o.dense_lr)):
        if not (value > 0 and math.isfinite(value)):
            errors.append(f"{key} must be a finite number > 0, got {value}")
    for key, value in (("data.decay", d.decay), ("data.interaction", d.interaction), ("data.dense", d.dense)):
        if not (value >= 0 and math.isfinite(value)):
            errors.append(f"{key} must be a finite number >= 0, got {value}")
    if not 0 < d.ctr < 1:
        errors.append(f"data.ctr must be in (0, 1), got {d.ctr}")
    for key, value in (("model.dim", m.dim), ("model.page_size", m.page_size), ("train.steps", t.steps),
                       ("train.batch_size", t.batch_size), ("train.log_every", t.log_every),
                       ("train.eval_every", t.eval_every)):
        if value < 1:
            errors.append(f"{key} must be >= 1, got {value}")
    for key, value in (("data.test_samples", d.test_samples), ("data.bayes_samples", d.bayes_samples)):
        if value < MIN_AUC_SAMPLES:
            errors.append(f"{key} must be >= {MIN_AUC_SAMPLES}, got {value}: an AUC needs clicks and non-clicks, "
                          "and a few hundred samples to mean anything")
    if any(h < 1 for h in [*m.dense_arch, *m.over_arch]):
        errors.append("model.dense_arch and model.over_arch are layer sizes >= 1")
    if m.comm_dtype is not None and m.comm_dtype not in COMM_DTYPES:
        errors.append(f"model.comm_dtype={m.comm_dtype!r} is not one of {list(COMM_DTYPES)} (or null)")
    if o.sparse not in OPTIMIZERS:
        errors.append(f"optim.sparse={o.sparse!r} is not one of {list(OPTIMIZERS)}")
    if o.dense not in DENSE_OPTIMIZERS:
        errors.append(f"optim.dense={o.dense!r} is not one of {list(DENSE_OPTIMIZERS)}")
    for key in ("warmup_steps", "decay_start", "decay_steps"):
        if getattr(o, key) < 0:
            errors.append(f"optim.{key} must be >= 0, got {getattr(o, key)}")
    if o.decay_start and not o.decay_steps:
        errors.append(f"optim.decay_start={o.decay_start} would change nothing without optim.decay_steps "
                      "(the decay's length)")
    if o.decay_steps > 0 and o.decay_start < o.warmup_steps:
        errors.append(f"optim.decay_start={o.decay_start} is inside the warmup (optim.warmup_steps="
                      f"{o.warmup_steps}): the decay starts after it")
    if t.checkpoint_every < 0:
        errors.append(f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    if t.resume and not cfg.out_dir:
        errors.append("train.resume=true needs out_dir: the default run folder is new at every launch, so there "
                      "would be nothing to resume from")
    problem = folder_problem(cfg.out_dir)
    if problem:
        errors.append(f"out_dir={cfg.out_dir}: {problem}")
    return errors
