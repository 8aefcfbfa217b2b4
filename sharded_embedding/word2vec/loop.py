"""The skip-gram training loop, resumable bit for bit, stopped at the first sign of divergence.

A checkpoint holds both tables with their optimizer state (through DCP) and, per rank, where
the loop stands: the epoch, the next batch, the negatives' random generator, the loss readings
and the time spent. An epoch's tokens are redrawn identically from the seed (`EpochStream`),
so resuming skips the batches already trained and continues: a run stopped at any checkpoint
and resumed ends with exactly the tables of a run never stopped (on CPU, where every kernel used
here is deterministic). The settings that decide the data order are recorded in the checkpoint;
resuming with any of them changed is refused, naming them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..amp import NonFiniteGradientError
from ..checkpoint import CheckpointError, CheckpointManager
from ..distributed import all_reduce_host
from .corpus import EpochStream, sample_negatives, steps_per_epoch

log = logging.getLogger("sharded_embedding.train")

DIVERGED_FACTOR = 10.0  # a loss reading this many times the starting loss means the run diverged


class TrainingDiverged(RuntimeError):
    """The loss became non-finite or exploded; the tables are not worth keeping."""


@dataclass
class LoopState:
    epoch: int = 0  # the epoch in progress (== epochs once training is complete)
    next_batch: int = 0  # first batch of `epoch` not trained yet
    step: int = 0  # steps trained in all
    elapsed: float = 0.0  # training seconds before this process started
    losses: list = field(default_factory=list)  # (epoch progress, mean loss per pair)
    running: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))

    def to_rank_state(self, rng: torch.Tensor) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "step": self.step, "elapsed": self.elapsed,
                "losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2),
                "running": self.running.clone(), "rng": rng}

    @classmethod
    def from_rank_state(cls, s: dict) -> tuple[LoopState, torch.Tensor]:
        state = cls(int(s["epoch"]), int(s["next_batch"]), int(s["step"]), float(s["elapsed"]),
                    [tuple(r) for r in s["losses"].tolist()], s["running"].clone())
        return state, s["rng"]



def check_resumable(path, info: dict, data_order: dict, optimizer: str, unknown: tuple = ()) -> None:
    """Raise CheckpointError if the checkpoint ``path`` (its marker ``info``) cannot be resumed
    by a run with this ``data_order`` (`config.data_order`; keys in ``unknown`` are not known
    yet and not compared) and ``optimizer``. The run checks this before it prepares the corpus
    (without the vocabulary) and again before it loads, so that a refused resume changes nothing."""
    saved = {k: v for k, v in (info.get("data_order") or {}).items() if k not in unknown}
    now = {k: v for k, v in data_order.items() if k not in unknown}
    if info.get("data_order") is not None and saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise CheckpointError(
            f"{path} was trained with other settings that decide the data order: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in changed)
            + ". Resume with the checkpoint's values, or start a new run (another out_dir, and another "
            "train.checkpoint_dir if you set one)")
    saved_optimizer = info.get("optimizer")
    if saved_optimizer is not None and saved_optimizer != optimizer:  # its state fits that optimizer only
        raise CheckpointError(
            f"{path} was trained with optimizer={saved_optimizer} (now optimizer={optimizer}): its optimizer "
            "state loads only into the same optimizer. Resume with optimizer=" + saved_optimizer + " (its "
            "hyperparameters, such as optimizer.lr, may change), or start a new run (another out_dir, and another "
            "train.checkpoint_dir if you set one)")

class SkipGramTraining:
    """Runs the epochs of `SkipGram` over this rank's `TokenFile`, with checkpoints and resume."""

    def __init__(self, cfg, model, tokens, keep, cdf, corpus_words: int, progress,
                 checkpoints: CheckpointManager, data_order: dict):
        self.cfg, self.model, self.tokens, self.keep, self.cdf = cfg, model, tokens, keep, cdf
        self.corpus_words, self.progress, self.checkpoints = corpus_words, progress, checkpoints
        self.data_order = data_order
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + self.rank)
        self.state = LoopState()
        self._started = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.state.epoch >= self.cfg.train.epochs

    # ------------------------------------------------------------------ checkpoints
    def _tables(self) -> dict:
        return {"inputs": self.model.inputs, "outputs": self.model.outputs}

    def resume(self):
        """Continue from the newest complete checkpoint, if there is one; returns its path.
        Raises CheckpointError (every rank) if it was made with other data-order settings."""
        path = self.checkpoints.latest()
        if path is None:
            return None
        check_resumable(path, self.checkpoints.info(path), self.data_order, self.cfg.optimizer.name)
        rank_state, _ = self.checkpoints.load(path, self._tables())
        self.state, rng = LoopState.from_rank_state(rank_state)
        self.gen.set_state(rng)
        log.info("resumed from %s: step %s, epoch %s, batch %s%s", path, self.state.step, self.state.epoch,
                 self.state.next_batch, " (training was complete)" if self.finished else "")
        return path

    def save(self, progress=lambda rows: None):
        """Checkpoint the tables and where the loop stands (collective); returns the folder."""
        s = self.state
        saved = s.elapsed
        s.elapsed = saved + time.perf_counter() - self._started
        try:
            return self.checkpoints.save(s.step, self._tables(), s.to_rank_state(self.gen.get_state()),
                                         {"world_size": self.world, "epoch": s.epoch, "next_batch": s.next_batch,
                                          "finished": self.finished, "data_order": self.data_order,
                                          "optimizer": self.cfg.optimizer.name}, progress)
        finally:
            s.elapsed = saved

    # ------------------------------------------------------------------ the loop
    def elapsed(self) -> float:
        return self.state.elapsed + time.perf_counter() - self._started

    def run(self) -> LoopState:
        cfg, s, model = self.cfg, self.state, self.model
        epochs, lr0, shared = cfg.train.epochs, cfg.optimizer.lr, cfg.model.shared_negatives
        centers, every = cfg.train.batch_centers, cfg.train.checkpoint_every
        for epoch in range(s.epoch, epochs):
            if epoch != s.epoch:
                s.epoch, s.next_batch = epoch, 0
            stream = EpochStream(self.tokens, self.keep, cfg.model.window, seed=cfg.train.seed, rank=self.rank,
                                 epoch=epoch)
            kept = stream.count()
            steps = steps_per_epoch(kept, centers)
            for i, batch in enumerate(stream.batches(centers, steps, kept)):
                if i < s.next_batch:
                    continue  # trained before the checkpoint this run resumed from
                done = epoch + i / steps
                model.set_learning_rate(lr0 * max(cfg.train.min_lr_fraction, 1.0 - done / epochs))
                negatives = sample_negatives(self.cdf, model.num_blocks(batch.num_centers) * shared, self.gen)
                loss, num_pairs = model.loss(batch, negatives.view(-1, shared))
                try:
                    loss.backward()  # the fused optimizers update both tables here
                except NonFiniteGradientError:  # raised on every rank, before any row changed
                    raise TrainingDiverged(
                        f"training diverged at step {s.step + 1} (epoch {done:.2f}): the gradient holds inf or "
                        f"NaN. Lower optimizer.lr (now {cfg.optimizer.lr} with optimizer={cfg.optimizer.name})"
                    ) from None
                s.running += torch.tensor([loss.item(), num_pairs], dtype=torch.float64)
                s.step, s.next_batch = s.step + 1, i + 1
                last = epoch == epochs - 1 and i == steps - 1
                checkpoint = every and s.step % every == 0 and not last
                if s.step % cfg.train.log_every == 0 or last or checkpoint:
                    self._read_loss(epoch + (i + 1) / steps)  # never checkpoint a diverged table
                if checkpoint:
                    self.save()
        s.epoch, s.next_batch = epochs, 0
        return s

    def _read_loss(self, progress: float) -> None:
        s = self.state
        total = all_reduce_host(s.running)  # every rank gets the same reading
        pairs = float(total[1])
        mean = float(total[0]) / pairs if pairs else 0.0
        s.running.zero_()
        if not pairs:
            return
        start = self.model.initial_loss_per_pair
        if not math.isfinite(mean) or mean > DIVERGED_FACTOR * start:
            raise TrainingDiverged(
                f"training diverged at step {s.step} (epoch {progress:.2f}): the loss per pair is {mean:.4g}, "
                f"against {start:.4g} at the start. Lower optimizer.lr "
                f"(now {self.cfg.optimizer.lr} with optimizer={self.cfg.optimizer.name})")
        s.losses.append((progress, mean))
        self.progress(progress, mean, self.corpus_words * progress / self.elapsed())
