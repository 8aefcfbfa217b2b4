"""The main job: skip-gram word vectors on sharded tables, configured by Hydra, run by torchrun.

    torchrun --standalone --nproc_per_node=2 -m sharded_embedding.train [overrides]
    bash launch/train.sh sharding=hot_mirrored optimizer=adagrad train.epochs=5

Hydra on several ranks (`hydra_app`): one run folder, Hydra's files and logs on rank 0,
configuration errors found before any work and reported once.

Outputs (rank 0, in the run folder or ``out_dir``): ``vectors.txt`` (word2vec text, written
by all ranks in place), ``metrics.json``, ``loss.png``, ``train.log``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import hydra_app
from .distributed import agree_or_raise, all_gather_strings, collective_device, finish
from .hydra_app import stop as _stop

log = logging.getLogger("sharded_embedding.train")


def main(argv: list[str] | None = None) -> int:
    from .word2vec.config import register

    return hydra_app.main(argv, config_name="train", register=register, run=run,
                          bind_cpus=lambda cfg: cfg.train.bind_cpus, log=log, failed="training failed")


def run(cfg) -> int:
    """Prepare the corpus, train, save, export and evaluate; returns the exit code: 0, 2 for a
    configuration or data error (found before training), 1 for a failure after training (the
    trained tables are saved by then), 3 when training diverged."""
    from hydra.core.hydra_config import HydraConfig

    from .checkpoint import CheckpointError, CheckpointManager
    from .embedding import TableAllocationError
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
    out = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    directory = Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else out / "checkpoints"
    if not errors and rank == 0:
        busy = hydra_app.lock_folder(directory)
        if busy:
            errors.append(busy)
    if not errors and not cfg.train.resume:
        old = CheckpointManager(directory).latest()
        if old is not None:  # a fresh run would prune its own checkpoints, keeping the higher steps there
            errors.append(f"{directory} holds checkpoints of an earlier run (newest: {old.name}) and this run does not "
                          "resume: resume it with train.resume=true, or use another out_dir (or "
                          "train.checkpoint_dir), or move those checkpoints away")
    if not errors and cfg.train.resume:
        errors += _resume_refusal(cfg, directory, world)
    # Files can differ between nodes: every rank learns every rank's findings.
    reports = all_gather_strings("\n".join(errors))
    problems = sorted({e for text in reports for e in text.split("\n") if e})
    if problems:
        return _stop("configuration error:\n  " + "\n  ".join(problems))
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
        try:
            model = SkipGram(
                vocab.size, cfg.model.dim, page_size=sharding.page_size, placement=sharding.placement,
                fused_optimizer=C.fused_optimizer(cfg), window=cfg.model.window, negatives=cfg.model.negatives,
                shared_negatives=cfg.model.shared_negatives, block=cfg.model.block, comm_dtype=comm_dtype,
                seed=cfg.train.seed, transport=cfg.model.transport,
            )
        except TableAllocationError as e:  # (raised on every rank together, before any training)
            return _stop(f"configuration error: the tables do not fit in this machine's memory (model.dim, the "
                         f"vocabulary and the number of ranks set their size: see the placement report above):\n  {e}")
    log.info("corpus %s: %s words; vocabulary %s words (min_count %s); %s ranks; %s pages of %s rows per table, %s; "
             "rows travel over the %s transport", path, f"{corpus.corpus_words:,}", f"{vocab.size:,}",
             cfg.data.min_count, world, model.inputs.num_pages, sharding.page_size, cfg.sharding.kind,
             model.inputs.transport.name)
    transport = model.inputs.transport.name  # (the tables are freed before the metrics are written)

    progress = _Progress(rank, cfg.train.epochs)
    checkpoints = CheckpointManager(directory, keep=cfg.train.keep_checkpoints)
    training = SkipGramTraining(cfg, model, corpus.tokens, keep_probability(vocab.counts, cfg.data.sample),
                                unigram_cdf(vocab.counts), corpus.corpus_words, progress,
                                checkpoints, C.data_order(cfg, world, spec.identity()[0], vocab.digest()))
    try:
        if cfg.train.resume and training.resume() is None:
            log.info("no checkpoint in %s yet: starting from scratch", checkpoints.directory)
    except CheckpointError as e:
        return _stop(f"cannot resume: {e}")
    resumed_at = training.state.step  # 0 unless this run continues an earlier one's training
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
                       phases.report(), formats, transport, resumed_at)
    except Exception as e:  # noqa: BLE001 - reported with what is safe, on every rank
        if rank == 0:
            log.error("the %s failed after training: %s: %s\nThe trained tables are saved in %s. Rerun with "
                      "train.resume=true and the same out_dir (or train.checkpoint_dir) to export again without "
                      "training.", stage, type(e).__name__, e, final)
        return 1
    if rank == 0:
        files = [FILES[f] for f in formats] + (["vocab.txt"] if "npy" in formats else [])
        log.info("outputs in %s: %s, metrics.json, loss.png", out, ", ".join(files))
    return 0


def _resume_refusal(cfg, directory: Path, world: int) -> list[str]:
    """Why the newest checkpoint cannot be resumed, as far as its marker tells before the corpus
    is prepared (the vocabulary's digest is compared later): a refused resume writes nothing,
    not even the corpus cache."""
    from .checkpoint import CheckpointError, CheckpointManager
    from .word2vec import config as C
    from .word2vec.loop import check_resumable
    from .word2vec.text import CorpusError, CorpusSpec

    manager = CheckpointManager(directory)
    path = manager.latest()
    if path is None:
        return []
    try:
        files = CorpusSpec.resolve(C.corpus_path(cfg), cfg.data.encoding, cfg.data.decode_errors,
                                   cfg.data.lowercase).identity()[0]
    except CorpusError:
        return []  # validate has said so
    vocabulary = "vocabulary (digest)"
    try:
        check_resumable(path, manager.info(path), C.data_order(cfg, world, files, ""), cfg.optimizer.name,
                        unknown=(vocabulary,))
    except CheckpointError as e:
        return [f"cannot resume: {e}"]
    return []


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
                   formats, transport: str, resumed_at: int) -> None:
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
                "resumed_at_step": resumed_at,  # > 0: train_seconds includes earlier runs' training
                "sharding": cfg.sharding.kind, "transport": transport, "optimizer": C.fused_optimizer(cfg),
                "exported": formats,
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
