"""The main job: skip-gram word vectors on sharded tables, configured by Hydra, run by torchrun.

    torchrun --standalone --nproc_per_node=2 -m sharded_embedding.train [overrides]
    bash launch/train.sh sharding=hot_mirrored optimizer=adagrad train.epochs=5

Hydra on several ranks: every rank composes the same config, but only rank 0 keeps Hydra's
output folder (``.hydra/``), its log file and console logging; the other ranks get
``hydra.output_subdir=null`` and disabled logging, and all ranks share one run folder that
rank 0 names and the others receive, so no per-rank folders appear. Configuration errors are
found before any work, on every rank alike, and reported once.

Outputs (rank 0, in the run folder or ``out_dir``): ``vectors.txt`` (word2vec text, written
by all ranks in place), ``metrics.json``, ``loss.png``, ``train.log``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import all_gather_strings, all_reduce_host, bind_local_cpus, finish, init_distributed

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("sharded_embedding.train")
EXIT = {"code": 0}


def _rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _stop(message: str) -> int:
    """Report a configuration error once (rank 0) and return its exit code on every rank.

    All ranks found the same error; they wait for rank 0's message to be out before any of
    them exits, because torchrun stops the other workers as soon as one has exited.
    """
    if _rank0():
        print(message, file=sys.stderr, flush=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return 2


def _compose(overrides: list[str]):
    """Compose the config the way hydra.main will, to reject bad keys/types before any work."""
    from hydra import compose, initialize_config_dir

    from .word2vec.config import register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _agreed_run_dir(overrides: list[str]) -> list[str]:
    """Hydra overrides that put every rank in one run folder, Hydra's files on rank 0 only."""
    extra = []
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        stamp = time.strftime("outputs/%Y-%m-%d/%H-%M-%S")
        if dist.get_world_size() > 1:
            stamp = all_gather_strings(stamp)[0]  # rank 0's
        extra.append(f"hydra.run.dir={stamp}")
    if dist.get_rank() != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("-") for a in argv):  # --help, --cfg job, ...: Hydra's own, on one process
        sys.argv = [sys.argv[0], *argv]
        _hydra_entry()
        return 0
    try:
        cfg = _compose(argv)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for bad configs
        cause = f"\n  {e.__cause__}" if e.__cause__ is not None else ""
        init_distributed()
        return _stop(f"configuration error: {e}{cause}")
    if cfg.train.bind_cpus:
        bind_local_cpus()
    init_distributed()
    sys.argv = [sys.argv[0], *argv, *_agreed_run_dir(argv)]
    _hydra_entry()
    return EXIT["code"]


def _hydra_entry():
    import hydra

    from .word2vec.config import register

    register()

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def task(cfg) -> None:
        try:
            EXIT["code"] = run(cfg)
        except Exception:  # noqa: BLE001 - every failing rank reports (other ranks log nothing)
            if dist.get_rank() == 0:
                log.exception("training failed")
            else:
                print(f"[rank {dist.get_rank()}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            EXIT["code"] = 1

    task()


def run(cfg) -> int:
    """Train, export and evaluate; returns the exit code (0, or 2 for a configuration error)."""
    from hydra.core.hydra_config import HydraConfig

    from .word2vec import config as C
    from .checkpoint import CheckpointManager
    from .word2vec.corpus import build_vocabulary, encode_part, keep_probability, unigram_cdf
    from .word2vec.loop import SkipGramTraining
    from .word2vec.skipgram import SkipGram

    rank, world = dist.get_rank(), dist.get_world_size()
    for noisy in ("gensim", "matplotlib", "smart_open"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    errors = C.validate(cfg, world)
    # Files can differ between nodes: every rank learns every rank's findings.
    reports = all_gather_strings("\n".join(errors))
    problems = sorted({e for text in reports for e in text.split("\n") if e})
    if problems:
        return _stop("configuration error:\n  " + "\n  ".join(problems))
    out = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    path = C.corpus_path(cfg)

    t0 = time.perf_counter()
    vocab = build_vocabulary(path, cfg.data.min_count, cfg.data.max_vocab, cfg.data.lowercase)
    try:
        placement = C.placement(cfg, vocab.size, world)
    except C.ConfigError as e:
        return _stop(f"configuration error:\n  {e}")
    part = encode_part(path, vocab, cfg.data.lowercase)
    corpus_words = int(all_reduce_host(torch.tensor([part.raw_words], dtype=torch.int64)))
    comm_dtype = getattr(torch, cfg.model.comm_dtype) if cfg.model.comm_dtype else None
    model = SkipGram(
        vocab.size, cfg.model.dim, page_size=cfg.sharding.page_size, placement=placement,
        fused_optimizer=C.fused_optimizer(cfg), window=cfg.model.window, negatives=cfg.model.negatives,
        shared_negatives=cfg.model.shared_negatives, block=cfg.model.block, comm_dtype=comm_dtype,
        seed=cfg.train.seed,
    )
    log.info("corpus %s: %s words; vocabulary %s words (min_count %s); %s ranks; %s pages of %s rows per table, %s",
             path, f"{corpus_words:,}", f"{vocab.size:,}", cfg.data.min_count, world, model.inputs.num_pages,
             cfg.sharding.page_size, cfg.sharding.kind)
    setup_s = time.perf_counter() - t0

    checkpoints = None
    if cfg.train.checkpoint_every or cfg.train.resume:
        directory = Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else out / "checkpoints"
        checkpoints = CheckpointManager(directory, keep=cfg.train.keep_checkpoints)
    training = SkipGramTraining(cfg, model, part, keep_probability(vocab, cfg.data.sample), unigram_cdf(vocab),
                                corpus_words, _progress(rank, cfg.train.epochs), checkpoints)
    if cfg.train.resume and training.resume() is None:
        log.info("no checkpoint in %s yet: starting from scratch", checkpoints.directory)
    state = training.run()
    train_s = training.elapsed()
    epochs, losses = cfg.train.epochs, state.losses
    words_per_s = corpus_words * epochs / train_s
    log.info("trained %s epochs in %.1f s: %s words/s, final loss %.4f", epochs, train_s, f"{words_per_s:,.0f}",
             losses[-1][1] if losses else float("nan"))

    from .export import write_word2vec

    vectors = out / "vectors.txt"
    write_word2vec(model.inputs, vocab.words, str(vectors))
    if rank == 0:
        metrics = {
            "world_size": world,
            "corpus": path,
            "corpus_words": corpus_words,
            "vocabulary": vocab.size,
            "epochs": epochs,
            "steps": state.step,
            "setup_seconds": round(setup_s, 2),
            "train_seconds": round(train_s, 2),
            "words_per_second": round(words_per_s, 1),
            "final_loss": losses[-1][1] if losses else None,
            "loss_curve": losses,
            "sharding": cfg.sharding.kind,
            "optimizer": C.fused_optimizer(cfg),
        }
        if cfg.evaluate:
            from .word2vec.evaluation import evaluate_vectors, format_table

            metrics["evaluation"] = evaluate_vectors(str(vectors))
            log.info("evaluation of %s:\n%s", vectors, format_table(metrics["evaluation"]))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _plot_loss(losses, out / "loss.png")
        log.info("outputs in %s: vectors.txt, metrics.json, loss.png", out)
    if world > 1:
        dist.barrier()
    return 0


def _progress(rank: int, epochs: int):
    """Rank 0's progress: a tqdm bar over epochs (words/s, loss, ETA), or nothing elsewhere."""
    if rank != 0:
        return lambda *a: None
    from tqdm import tqdm

    bar = tqdm(total=epochs, unit="epoch", bar_format="{l_bar}{bar}| {n:.2f}/{total} epochs [{elapsed}<{remaining}{postfix}]",
               mininterval=1.0, file=sys.stderr)

    def update(done: float, loss: float, words_per_s: float) -> None:
        bar.n = done
        bar.set_postfix_str(f"loss {loss:.4f}, {words_per_s:,.0f} words/s", refresh=False)
        bar.refresh()
        if done >= epochs:
            bar.close()

    return update


def _plot_loss(losses, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if losses:
        ax.plot([e for e, _ in losses], [v for _, v in losses])
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per pair")
    ax.set_title("skip-gram negative-sampling loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    code = main()
    finish(code)
