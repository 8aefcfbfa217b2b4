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

from .distributed import agree_or_raise, all_gather_strings, bind_local_cpus, collective_device, finish, init_distributed

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("sharded_embedding.train")
EXIT = {"code": 0}


def _rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _stop(message: str, code: int = 2) -> int:
    """Report an error every rank found alike once (rank 0) and return its exit code (2: a
    configuration or data error) on every rank.

    All ranks found the same error; they wait for rank 0's message to be out before any of
    them exits, because torchrun stops the other workers as soon as one has exited.
    """
    if _rank0():
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():  # inside the job: the console and train.log
            log.error(message)
        else:
            print(message, file=sys.stderr, flush=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return code


def _compose(overrides: list[str]):
    """Compose the config the way hydra.main will, to reject bad keys/types before any work."""
    from hydra import compose, initialize_config_dir

    from .word2vec.config import register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a Hydra multirun (``-m``): one override list per combination."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _shared_out_dir(configs) -> str | None:
    """The out_dir several jobs of a sweep would share (their outputs would overwrite each
    other), if any; an out_dir with an interpolation (``${hydra:job.num}``) differs per job."""
    from omegaconf import OmegaConf

    raw = [OmegaConf.to_container(c, resolve=False).get("out_dir") for c in configs]
    fixed = [r for r in raw if r and "${" not in str(r)]
    return next((r for r in fixed if fixed.count(r) > 1), None)


def _agreed_run_dir(overrides: list[str], multirun: bool) -> list[str]:
    """Hydra overrides that put every rank in one run (or sweep) folder, Hydra's files and
    logs on rank 0 only."""
    key, pattern = ("hydra.sweep.dir", "multirun/%Y-%m-%d/%H-%M-%S") if multirun else \
        ("hydra.run.dir", "outputs/%Y-%m-%d/%H-%M-%S")
    extra = []
    if not any(o.startswith(key + "=") for o in overrides):
        stamp = time.strftime(pattern)
        if dist.get_world_size() > 1:
            stamp = all_gather_strings(stamp)[0]  # rank 0's
        extra.append(f"{key}={stamp}")
    if dist.get_rank() != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in overrides):  # --help, --cfg job, ...: Hydra's own, printed once
        if not _rank0():
            return 0
        sys.argv = [sys.argv[0], *argv]
        _hydra_entry()
        return 0
    try:  # every job's config, checked before any work
        configs = [_compose(job) for job in (_sweep(overrides) if multirun else [overrides])]
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for bad configs
        cause = f"\n  {e.__cause__}" if e.__cause__ is not None else ""
        init_distributed()
        return _stop(f"configuration error: {e}{cause}")
    shared = _shared_out_dir(configs) if multirun else None
    if shared:
        init_distributed()
        return _stop(f"configuration error: the jobs of this sweep would all write into out_dir={shared}: leave "
                     "out_dir unset (each job writes under hydra.sweep.dir) or make it differ per job, e.g. "
                     "out_dir=/data/sweep/${hydra:job.num}")
    if configs[0].train.bind_cpus:
        bind_local_cpus()
    init_distributed()
    # A multirun's jobs run one after another in these same processes (Hydra's basic
    # launcher), each in its own folder under the sweep folder.
    sys.argv = [sys.argv[0], *(["-m"] if multirun else []), *overrides, *_agreed_run_dir(overrides, multirun)]
    _hydra_entry()
    return EXIT["code"]


def _hydra_entry():
    import hydra

    from .word2vec.config import register

    register()

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def task(cfg) -> None:  # once per job: the worst exit code of a sweep is the process's
        try:
            code = run(cfg)
        except Exception:  # noqa: BLE001 - every failing rank reports (other ranks log nothing)
            if dist.get_rank() == 0:
                log.exception("training failed")
            else:
                print(f"[rank {dist.get_rank()}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            code = 1
        EXIT["code"] = max(EXIT["code"], code)

    task()


def run(cfg) -> int:
    """Prepare the corpus, train, save, export and evaluate; returns the exit code: 0, 2 for a
    configuration or data error (found before training), 1 for a failure after training (the
    trained tables are saved by then), 3 when training diverged."""
    from hydra.core.hydra_config import HydraConfig

    from .checkpoint import CheckpointError, CheckpointManager
    from .word2vec import config as C
    from .word2vec.corpus import keep_probability, unigram_cdf
    from .word2vec.loop import SkipGramTraining, TrainingDiverged
    from .word2vec.phases import Phases
    from .word2vec.prepare import prepare_corpus
    from .word2vec.skipgram import SkipGram
    from .word2vec.text import CorpusError, CorpusSpec

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
    phases = Phases(rank, world)
    path = C.corpus_path(cfg)
    try:
        spec = CorpusSpec.resolve(path, cfg.data.encoding, cfg.data.decode_errors, cfg.data.lowercase)
        corpus = prepare_corpus(spec, min_count=cfg.data.min_count, max_vocab=cfg.data.max_vocab,
                                directory=Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "corpus",
                                phases=phases)
        sharding = C.sharding(cfg, corpus.vocab.counts, world)
    except (CorpusError, C.ConfigError) as e:
        return _stop(f"data error: {e}" if isinstance(e, CorpusError) else f"configuration error:\n  {e}")
    vocab = corpus.vocab
    log.info("placement (sharding=%s):\n%s", cfg.sharding.kind, sharding.plan.report())

    with phases.phase("tables", "allocating the tables"):
        comm_dtype = getattr(torch, cfg.model.comm_dtype) if cfg.model.comm_dtype else None
        model = SkipGram(
            vocab.size, cfg.model.dim, page_size=sharding.page_size, placement=sharding.placement,
            fused_optimizer=C.fused_optimizer(cfg), window=cfg.model.window, negatives=cfg.model.negatives,
            shared_negatives=cfg.model.shared_negatives, block=cfg.model.block, comm_dtype=comm_dtype,
            seed=cfg.train.seed,
        )
    log.info("corpus %s: %s words; vocabulary %s words (min_count %s); %s ranks; %s pages of %s rows per table, %s",
             path, f"{corpus.corpus_words:,}", f"{vocab.size:,}", cfg.data.min_count, world, model.inputs.num_pages,
             sharding.page_size, cfg.sharding.kind)

    progress = _Progress(rank, cfg.train.epochs)
    directory = Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else out / "checkpoints"
    checkpoints = CheckpointManager(directory, keep=cfg.train.keep_checkpoints)
    training = SkipGramTraining(cfg, model, corpus.tokens, keep_probability(vocab.counts, cfg.data.sample),
                                unigram_cdf(vocab.counts), corpus.corpus_words, progress,
                                checkpoints, C.data_order(cfg, world, spec.identity()[0], vocab.digest()))
    try:
        if cfg.train.resume and training.resume() is None:
            log.info("no checkpoint in %s yet: starting from scratch", checkpoints.directory)
    except CheckpointError as e:
        return _stop(f"cannot resume: {e}")
    if not training.finished:
        with phases.phase("training", f"training {cfg.train.epochs} epochs"):
            try:
                training.run()
            except TrainingDiverged as e:
                progress.close()
                last = checkpoints.latest()
                return _stop(f"{e}. {'The last good checkpoint is ' + str(last) if last else 'No checkpoint was written'}"
                             "; nothing was exported.", code=3)
        progress.close()
        train_s = training.elapsed()
        with phases.phase("checkpoint", "saving the trained tables"):
            rows = sum(_primary_rows(t) * len(t._row_states()) for t in (model.inputs, model.outputs))
            bar = phases.progress(rows, "rows", "checkpoint")
            final = training.save(bar.update)  # before anything that can fail after training
            bar.close()
    else:
        final, train_s = checkpoints.latest(), training.state.elapsed
    state = training.state
    words_per_s = corpus.corpus_words * cfg.train.epochs / max(train_s, 1e-9)
    log.info("trained %s epochs in %.1f s: %s words/s, final loss %s", cfg.train.epochs, train_s,
             f"{words_per_s:,.0f}", f"{state.losses[-1][1]:.4f}" if state.losses else "n/a")

    from .word2vec.vectors import FILES, choose_formats, write_vectors

    formats = choose_formats(cfg.export.format, vocab.size)
    stage, evaluation = "export", None
    try:
        with phases.phase("export", f"writing the vectors ({', '.join(FILES[f] for f in formats)})"):
            written = []
            for fmt in formats:
                bar = phases.progress(_primary_rows(model.inputs), "rows", FILES[fmt])
                written.append(write_vectors(fmt, model.inputs, vocab, str(out), bar.update))
                bar.close()
        del model, training  # the tables are saved and exported: free them before evaluating
        if cfg.evaluate:
            stage = "evaluation"
            with phases.phase("evaluation", f"evaluating the {min(cfg.evaluate_vocab, vocab.size):,} most frequent words"):
                evaluation = _evaluate(written[0], formats[0], cfg.evaluate_vocab, vocab)
        stage = "metrics"
        _write_metrics(cfg, out, world, path, corpus, vocab, state, train_s, words_per_s, evaluation,
                       phases.report(), formats)
    except Exception as e:  # noqa: BLE001 - reported with what is safe, on every rank
        if rank == 0:
            log.error("the %s failed after training: %s: %s\nThe trained tables are saved in %s. Rerun with "
                      "train.resume=true and the same out_dir (or train.checkpoint_dir) to export again without "
                      "training.", stage, type(e).__name__, e, final)
        return 1
    if rank == 0:
        log.info("outputs in %s: %s, metrics.json, loss.png", out, ", ".join(FILES[f] for f in formats))
    return 0


def _primary_rows(emb) -> int:
    """Rows this rank writes when the table goes to a file (its primary pages)."""
    return sum(emb.plan.page_rows(p) for p in emb.plan.primary_pages(emb.rank).tolist())


def _evaluate(path: str, fmt: str, limit: int, vocab) -> dict | None:
    """Rank 0 scores the most frequent ``limit`` words; every rank learns if it failed."""
    from .word2vec.evaluation import evaluate_vectors, format_table
    from .word2vec.vectors import load_vectors

    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = evaluate_vectors(load_vectors(path, fmt, limit, vocab))
            log.info("evaluation of %s (%s most frequent words):\n%s", path, f"{result['vocabulary']:,}",
                     format_table(result))
        except Exception as e:  # noqa: BLE001 - every rank must learn it
            error = f"{type(e).__name__}: {e}"
    agree_or_raise(dist.group.WORLD, "evaluation", "ok", error, collective_device(dist.group.WORLD))
    return result


def _write_metrics(cfg, out: Path, world, path, corpus, vocab, state, train_s, words_per_s, evaluation, phases,
                   formats) -> None:
    """Rank 0 writes metrics.json (always valid JSON: non-finite numbers become null) and
    loss.png; every rank learns if that failed."""
    from .word2vec import config as C

    error = None
    if dist.get_rank() == 0:
        try:
            metrics = {
                "world_size": world, "corpus": path, "corpus_words": corpus.corpus_words,
                "vocabulary": vocab.size, "epochs": cfg.train.epochs, "steps": state.step,
                "train_seconds": round(train_s, 2), "words_per_second": round(words_per_s, 1),
                "final_loss": state.losses[-1][1] if state.losses else None, "loss_curve": state.losses,
                "sharding": cfg.sharding.kind, "optimizer": C.fused_optimizer(cfg), "exported": formats,
                "corpus_reused": corpus.reused, "phases": phases, "evaluation": evaluation,
            }
            (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2, allow_nan=False))
            _plot_loss(state.losses, out / "loss.png")
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
    agree_or_raise(dist.group.WORLD, "writing metrics", "ok", error, collective_device(dist.group.WORLD))


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Progress:
    """Rank 0's progress: a tqdm bar over epochs (loss, words/s, ETA), made at the first
    reading and closed at the end or on an error, so that no message lands on a half bar."""

    def __init__(self, rank: int, epochs: int):
        self.rank, self.epochs, self.bar = rank, epochs, None

    def __call__(self, done: float, loss: float, words_per_s: float) -> None:
        if self.rank != 0:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.epochs, unit="epoch", mininterval=1.0, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n:.2f}/{total} epochs [{elapsed}<{remaining}{postfix}]")
        self.bar.n = done
        self.bar.set_postfix_str(f"loss {loss:.4f}, {words_per_s:,.0f} words/s", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
