"""The training app's configuration: a structured schema Hydra checks the YAML against, and the
checks that need the world (ranks, files, the vocabulary's page count).

Hydra rejects unknown keys and wrong types when it composes the config (the schema is
registered as ``schema`` and listed first in ``configs/train.yaml``'s defaults). `validate`
then checks what YAML types cannot express. Both run before any training work, identically
on every rank, so every rank stops with the same message.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ..hydra_app import folder_problem
from .text import CorpusError

SHARDING_KINDS = ("round_robin", "explicit", "hot_mirrored", "auto")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
COMM_DTYPES = ("float32", "bfloat16", "float16")
DECODE_ERRORS = ("strict", "replace", "ignore")
EXPORT_FORMATS = ("auto", "text", "binary", "npy", "all")


class ConfigError(ValueError):
    """A configuration that cannot run; raised on every rank alike."""


@dataclass
class ShardingConfig:
    kind: str = "round_robin"
    page_size: Optional[int] = 512  # auto: null lets the planner choose; a number fixes it
    num_devices: int = -1  # round_robin: ranks 0..num_devices-1; -1: all
    hot_pages: int = 1  # hot_mirrored: the first pages, mirrored on every rank
    pages: Optional[List[Any]] = None  # explicit: one entry per page, a rank or a list of ranks
    memory_per_rank: Optional[str] = None  # auto: the budget per rank (e.g. 8GB) for both tables, state, workspace


@dataclass
class OptimizerConfig:
    name: str = "rowwise_adagrad"
    lr: float = 0.7
    eps: Optional[float] = None
    lr_decay: Optional[float] = None
    initial_accumulator_value: Optional[float] = None
    betas: Optional[List[float]] = None


@dataclass
class DataConfig:
    # A file (maybe .gz/.bz2/.xz) or a folder; null: `corpus`, else gensim's sample. Missing (???)
    # until a data option sets it: data=text leaves it for the command line.
    path: Optional[str] = MISSING
    corpus: Optional[str] = None  # a corpus built once from installed packages (corpora.CORPORA)
    corpus_dir: Optional[str] = None  # where built corpora are kept (default: corpora.default_cache_dir())
    min_count: int = 5
    sample: float = 1e-3
    max_vocab: Optional[int] = None
    lowercase: bool = False
    encoding: str = "utf-8"  # an ASCII-compatible encoding
    decode_errors: str = "strict"  # strict: stop at undecodable bytes; replace; ignore
    cache_dir: Optional[str] = None  # the encoded corpus; default <out_dir>/corpus


@dataclass
class ExportConfig:
    format: str = "auto"  # text | binary | npy | all | auto (binary above 1M words, else text)


@dataclass
class ModelConfig:
    dim: int = 100
    window: int = 5
    negatives: int = 5
    shared_negatives: int = 64
    block: int = 32
    comm_dtype: Optional[str] = None
    transport: str = "auto"  # how rows travel between ranks: auto | shared_memory | process_group


@dataclass
class LoopConfig:
    epochs: int = 10
    batch_centers: int = 4096
    min_lr_fraction: float = 1e-4
    seed: int = 0
    log_every: int = 20
    bind_cpus: bool = True
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    checkpoint_dir: Optional[str] = None  # default: <out_dir>/checkpoints
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint, if any


@dataclass
class TrainConfig:
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    out_dir: Optional[str] = None
    evaluate: bool = True
    evaluate_vocab: int = 300_000  # evaluate the most frequent words only (gensim's restrict_vocab)


def register() -> None:
    ConfigStore.instance().store(name="schema", node=TrainConfig)


def corpus_path(cfg) -> str:
    """The corpus file: ``data.path``; else the built corpus ``data.corpus`` (built into
    ``data.corpus_dir`` on first use, see `corpora`); else gensim's bundled sample.
    Raises corpora.CorpusError when ``data.corpus`` cannot be had."""
    if not OmegaConf.is_missing(cfg.data, "path") and cfg.data.path:
        return os.path.abspath(os.path.expanduser(str(cfg.data.path)))
    if cfg.data.corpus:
        from .corpora import cached_corpus

        return cached_corpus(cfg.data.corpus, cfg.data.corpus_dir)
    from gensim.test.utils import datapath

    return datapath("head500.noblanks.cor")


def validate(cfg, world_size: int) -> list[str]:
    """Problems with ``cfg`` for a run on ``world_size`` ranks (empty: fine)."""
    errors = []
    s, m, t, d, o = cfg.sharding, cfg.model, cfg.train, cfg.data, cfg.optimizer

    def positive(name, value):
        if value is None or value < 1:
            errors.append(f"{name} must be >= 1, got {value}")

    if not (s.kind == "auto" and s.page_size is None):  # auto's null: the planner chooses
        positive("sharding.page_size", s.page_size)
    for name, value in [("model.dim", m.dim), ("model.window", m.window),
                        ("model.negatives", m.negatives), ("model.shared_negatives", m.shared_negatives),
                        ("model.block", m.block), ("train.epochs", t.epochs), ("train.batch_centers", t.batch_centers),
                        ("train.log_every", t.log_every), ("data.min_count", d.min_count)]:
        positive(name, value)
    if t.checkpoint_every < 0:
        errors.append(f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    if t.keep_checkpoints < 1:
        errors.append(f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    if t.resume and not (cfg.out_dir or t.checkpoint_dir):
        errors.append("train.resume=true needs out_dir or train.checkpoint_dir: the default run folder is new "
                      "at every launch, so there would be nothing to resume from")
    if d.max_vocab is not None:
        positive("data.max_vocab", d.max_vocab)
    if d.sample < 0:
        errors.append(f"data.sample must be >= 0, got {d.sample}")
    if d.decode_errors not in DECODE_ERRORS:
        errors.append(f"data.decode_errors={d.decode_errors!r} is not one of {list(DECODE_ERRORS)}")
    if cfg.export.format not in EXPORT_FORMATS:
        errors.append(f"export.format={cfg.export.format!r} is not one of {list(EXPORT_FORMATS)}")
    positive("evaluate_vocab", cfg.evaluate_vocab)
    if not 0 < t.min_lr_fraction <= 1:
        errors.append(f"train.min_lr_fraction must be in (0, 1], got {t.min_lr_fraction}")
    if o.name not in OPTIMIZERS:
        errors.append(f"optimizer.name={o.name!r} is not one of {list(OPTIMIZERS)}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        errors.append(f"optimizer.lr must be a finite number > 0, got {o.lr}")
    for key in ("eps", "lr_decay", "initial_accumulator_value"):
        value = getattr(o, key, None)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            errors.append(f"optimizer.{key} must be a finite number >= 0, got {value}")
    if o.name in OPTIMIZERS and not errors:  # what the table will be built with (betas, keys of another optimizer)
        import torch

        from ..optimizers import build_fused_optimizer

        try:
            build_fused_optimizer(fused_optimizer(cfg), torch.empty(0, 1))
        except ValueError as e:
            text = str(e).replace("fused_optimizer ", "optimizer=")
            errors.append(f"optimizer: {text}" + (" (optimizer.<key>=null leaves a key unset)" if "does not take" in text
                                                  else ""))
    if isinstance(m.block, int) and isinstance(t.batch_centers, int) and m.block > t.batch_centers >= 1:
        errors.append(f"model.block={m.block} is more than train.batch_centers={t.batch_centers}: a block of centers "
                      "shares its negatives, and a batch has at most batch_centers centers")
    if m.comm_dtype is not None and m.comm_dtype not in COMM_DTYPES:
        errors.append(f"model.comm_dtype={m.comm_dtype!r} is not one of {list(COMM_DTYPES)} or null")
    from ..transport import TRANSPORTS

    if m.transport not in TRANSPORTS:
        errors.append(f"model.transport={m.transport!r} is not one of {list(TRANSPORTS)}")
    if s.kind not in SHARDING_KINDS:
        errors.append(f"sharding.kind={s.kind!r} is not one of {list(SHARDING_KINDS)}")
    elif s.kind == "round_robin" and not (s.num_devices == -1 or 1 <= s.num_devices <= world_size):
        errors.append(f"sharding.num_devices={s.num_devices} is out of range: -1 or 1..{world_size} (the world size)")
    elif s.kind == "hot_mirrored" and s.hot_pages < 0:
        errors.append(f"sharding.hot_pages must be >= 0, got {s.hot_pages}")
    elif s.kind == "auto" and s.memory_per_rank is not None:
        from ..planning.search import parse_bytes

        try:
            parse_bytes(s.memory_per_rank)
        except ValueError as e:
            errors.append(f"sharding.{e}")
    elif s.kind == "explicit":
        if not s.pages:
            errors.append("sharding.kind=explicit needs sharding.pages: one entry per page (a rank or a list of ranks)")
        else:
            for p, entry in enumerate(s.pages):
                ranks = list(entry) if isinstance(entry, (list, tuple)) or hasattr(entry, "__iter__") else [entry]
                if not ranks:
                    errors.append(f"sharding.pages[{p}] is an empty list: give a rank or a list of ranks")
                if len(set(map(str, ranks))) < len(ranks):
                    errors.append(f"sharding.pages[{p}] repeats a rank: {ranks}")
                for r in ranks:
                    if isinstance(r, bool) or not isinstance(r, int):
                        errors.append(f"sharding.pages[{p}] holds {r!r}, which is not a rank: ranks are integers")
                    elif not 0 <= r < world_size:
                        errors.append(f"sharding.pages[{p}] names rank {r!r}, but the world has ranks 0..{world_size - 1}")
    if s.kind in SHARDING_KINDS:  # keys another kind reads would be ignored silently
        used = {"round_robin": {"num_devices"}, "explicit": {"pages"}, "hot_mirrored": {"hot_pages"},
                "auto": {"memory_per_rank"}}
        for key, default in (("num_devices", -1), ("pages", None), ("hot_pages", 1), ("memory_per_rank", None)):
            value = getattr(s, key, default)
            if key not in used[s.kind] and value is not None and value != default and value != []:
                errors.append(f"sharding.{key}={value} is not read by sharding={s.kind} (it belongs to another "
                              "sharding kind): choose that kind (sharding=<kind>) or leave the key out")
    for key, folder in (("out_dir", cfg.out_dir), ("data.cache_dir", d.cache_dir),
                        ("train.checkpoint_dir", t.checkpoint_dir)):
        problem = folder_problem(folder)
        if problem:
            errors.append(f"{key}={folder}: {problem}")
    path = None
    if OmegaConf.is_missing(d, "path") and not d.corpus:
        errors.append("data=text needs the corpus: data.path=<a text file, a .gz/.bz2/.xz file or a folder>")
        return errors
    try:
        path = corpus_path(cfg)
    except CorpusError as e:
        errors.append(str(e))
    except ImportError:
        errors.append("data.path is not set and gensim (which ships the default corpus) is not installed")
    if path is not None and d.decode_errors in DECODE_ERRORS:  # (else said above)
        from .text import CorpusSpec

        try:
            CorpusSpec.resolve(path, d.encoding, d.decode_errors, d.lowercase)
        except CorpusError as e:
            errors.append(str(e))
    return errors


def data_order(cfg, world_size: int, corpus_files: list, vocabulary: str) -> dict:
    """The settings that decide which batches a run trains, in which order, and which word each
    row is: a resumed run must have the same (the tables alone reshard anywhere; see
    docs/checkpointing.md). ``corpus_files``: each file with its size and modification time;
    ``vocabulary``: a digest of the words and counts, row by row."""
    d, m, t = cfg.data, cfg.model, cfg.train
    return {"data.path": corpus_path(cfg), "corpus files (path, bytes, mtime)": corpus_files,
            "vocabulary (digest)": vocabulary, "data.min_count": d.min_count, "data.max_vocab": d.max_vocab,
            "data.sample": d.sample, "data.lowercase": d.lowercase, "data.encoding": d.encoding,
            "data.decode_errors": d.decode_errors, "model.window": m.window, "model.block": m.block,
            "model.shared_negatives": m.shared_negatives, "train.batch_centers": t.batch_centers,
            "train.seed": t.seed, "train.epochs": t.epochs, "world_size": world_size}


def placement(cfg, vocab_size: int, world_size: int):
    """The table placement for ``vocab_size`` words as configured (not for ``auto``: see
    `sharding`); ConfigError if an explicit list has the wrong number of pages."""
    s = cfg.sharding
    num_pages = math.ceil(vocab_size / s.page_size)
    if s.kind == "round_robin":  # over the first num_devices ranks (-1: all)
        if s.num_devices in (-1, world_size):
            return "round_robin"
        return [p % s.num_devices for p in range(num_pages)]
    if s.kind == "hot_mirrored":
        if s.hot_pages > num_pages:
            raise ConfigError(f"sharding.hot_pages={s.hot_pages}, but the tables have {num_pages} pages "
                              f"({vocab_size} words / page_size {s.page_size}, rounded up)")
        hot = s.hot_pages
        every = tuple(range(world_size))
        return [every if world_size > 1 else 0] * hot + [p % world_size for p in range(hot, num_pages)]
    pages = [tuple(e) if hasattr(e, "__iter__") else int(e) for e in s.pages]
    if len(pages) != num_pages:
        raise ConfigError(
            f"sharding.pages has {len(pages)} entries but the tables have {num_pages} pages "
            f"({vocab_size} words in the vocabulary / page_size {s.page_size}, rounded up)"
        )
    return pages


@dataclass
class Sharding:
    """How the job's two tables are paged and placed, and what that is predicted to cost."""

    page_size: int
    placement: Any
    plan: Any  # a sharded_embedding.PlacementPlan: the plan (auto) or the prediction of the placement given


def sharding(cfg, counts, world_size: int) -> Sharding:
    """The tables' page size and placement for a vocabulary with ``counts`` (frequency-sorted),
    with its `PlacementPlan`. ``sharding=auto`` plans them from the lookups a step makes (see
    `lookup_laws`); the other kinds are taken as configured and predicted. ConfigError if an
    explicit list has the wrong number of pages or no placement fits ``memory_per_rank``."""
    from ..planning import PlanningError, plan_placement, predict_placement

    vocab_size = len(counts)
    common = dict(tables=lookup_laws(cfg, counts), optimizer=cfg.optimizer.name, comm_dtype=cfg.model.comm_dtype,
                  memory_per_rank=cfg.sharding.memory_per_rank)
    if cfg.sharding.kind == "auto":
        try:
            plan = plan_placement(vocab_size, cfg.model.dim, world_size, page_size=cfg.sharding.page_size, **common)
        except PlanningError as e:  # (the planner's batch_size is the job's train.batch_centers)
            raise ConfigError(f"sharding=auto: {str(e).replace('batch_size', 'train.batch_centers')}") from None
        return Sharding(plan.page_size, plan.placement, plan)
    chosen = placement(cfg, vocab_size, world_size)
    plan = predict_placement(vocab_size, cfg.model.dim, world_size, page_size=cfg.sharding.page_size,
                             placement=chosen, **common)
    plan.label = f"sharding={cfg.sharding.kind}"
    return Sharding(cfg.sharding.page_size, chosen, plan)


def lookup_laws(cfg, counts) -> list:
    """What each table looks up per rank and step, as (expected draws per word, ids): the input
    table the batch's centers (subsampled words); the output table the centers with their
    2 x window context positions (subsampled words) and the block negatives (counts^0.75).
    Both parts of the output lookup are one call, so their expected draws add up per word."""
    import numpy as np

    from ..planning import Counts
    from .corpus import keep_probability

    c = np.asarray(counts, dtype=np.float64)
    kept = c * keep_probability(c, cfg.data.sample).numpy()
    kept /= kept.sum()
    negative = c**0.75
    negative /= negative.sum()
    centers = cfg.train.batch_centers
    context = centers + 2 * cfg.model.window
    negatives = math.ceil(centers / cfg.model.block) * cfg.model.shared_negatives
    return [(Counts(kept, "input table: centers (subsampled counts)"), centers),
            (Counts(kept * context + negative * negatives, "output table: contexts and negatives"), context + negatives)]


def fused_optimizer(cfg) -> dict:
    """The optimizer group as a `ShardedEmbedding` fused_optimizer spec (unset keys: defaults)."""
    spec = {k: v for k, v in dict(cfg.optimizer).items() if v is not None}
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    return spec
