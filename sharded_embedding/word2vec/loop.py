"""The skip-gram training loop, resumable bit for bit.

A checkpoint holds both tables with their optimizer state (through DCP) and, per rank, where
the loop stands: the epoch, the next batch, the random generator's state before the epoch's
subsampling/windows were drawn and its state now (negatives), the loss readings and the
time spent. Resuming rebuilds the epoch from the first state, skips the batches already
trained and continues with the second, so a run stopped at any checkpoint and resumed ends
with exactly the tables of a run never stopped (on CPU, where every kernel used here is
deterministic).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointManager
from ..distributed import all_reduce_host
from .corpus import EpochTokens, sample_negatives, steps_per_epoch

log = logging.getLogger("sharded_embedding.train")


@dataclass
class LoopState:
    epoch: int = 0
    next_batch: int = 0  # first batch of `epoch` not trained yet
    step: int = 0  # steps trained in all
    elapsed: float = 0.0  # training seconds before this process started
    losses: list = field(default_factory=list)  # (epoch progress, mean loss per pair)
    running: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    epoch_rng: torch.Tensor | None = None  # generator state before `epoch`'s tokens were drawn

    def to_rank_state(self, rng: torch.Tensor) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "step": self.step, "elapsed": self.elapsed,
                "losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2),
                "running": self.running.clone(), "epoch_rng": self.epoch_rng, "rng": rng}

    @classmethod
    def from_rank_state(cls, s: dict) -> tuple[LoopState, torch.Tensor]:
        state = cls(int(s["epoch"]), int(s["next_batch"]), int(s["step"]), float(s["elapsed"]),
                    [tuple(r) for r in s["losses"].tolist()], s["running"].clone(), s["epoch_rng"])
        return state, s["rng"]


class SkipGramTraining:
    """Runs the epochs of `SkipGram` over this rank's `Part`, with checkpoints and resume."""

    def __init__(self, cfg, model, part, keep, cdf, corpus_words: int, progress, checkpoints: CheckpointManager | None):
        self.cfg, self.model, self.part, self.keep, self.cdf = cfg, model, part, keep, cdf
        self.corpus_words, self.progress, self.checkpoints = corpus_words, progress, checkpoints
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + self.rank)
        self.state = LoopState()
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ checkpoints
    def _tables(self) -> dict:
        return {"inputs": self.model.inputs.state_dict(), "outputs": self.model.outputs.state_dict()}

    def resume(self):
        """Continue from the newest complete checkpoint, if there is one; returns its path."""
        path = self.checkpoints.latest() if self.checkpoints else None
        if path is None:
            return None
        tables = self._tables()
        rank_state, info = self.checkpoints.load(path, tables)
        self.model.inputs.load_state_dict(tables["inputs"])
        self.model.outputs.load_state_dict(tables["outputs"])
        self.state, rng = LoopState.from_rank_state(rank_state)
        self.gen.set_state(rng)
        log.info("resumed from %s: step %s, epoch %s, batch %s", path, self.state.step, self.state.epoch,
                 self.state.next_batch)
        return path

    def save(self) -> None:
        s = self.state
        saved = s.elapsed
        s.elapsed = saved + time.perf_counter() - self._started
        self.checkpoints.save(s.step, self._tables(), s.to_rank_state(self.gen.get_state()),
                              {"world_size": self.world, "epoch": s.epoch, "next_batch": s.next_batch})
        s.elapsed = saved

    # ------------------------------------------------------------------ the loop
    def elapsed(self) -> float:
        return self.state.elapsed + time.perf_counter() - self._started

    def run(self) -> LoopState:
        cfg, s, model = self.cfg, self.state, self.model
        epochs, lr0, shared = cfg.train.epochs, cfg.optimizer.lr, cfg.model.shared_negatives
        every = cfg.train.checkpoint_every
        for epoch in range(s.epoch, epochs):
            if s.epoch_rng is not None and epoch == s.epoch:  # resuming inside this epoch
                now = self.gen.get_state()
                self.gen.set_state(s.epoch_rng)
                tokens = EpochTokens(self.part, self.keep, cfg.model.window, self.gen)
                self.gen.set_state(now)
            else:
                s.epoch, s.next_batch, s.epoch_rng = epoch, 0, self.gen.get_state()
                tokens = EpochTokens(self.part, self.keep, cfg.model.window, self.gen)
            steps = steps_per_epoch(tokens.num_tokens, cfg.train.batch_centers)
            for i, batch in enumerate(tokens.batches(cfg.train.batch_centers, steps)):
                if i < s.next_batch:
                    continue  # trained before the checkpoint this run resumed from
                done = epoch + i / steps
                model.set_learning_rate(lr0 * max(cfg.train.min_lr_fraction, 1.0 - done / epochs))
                negatives = sample_negatives(self.cdf, model.num_blocks(batch.num_centers) * shared, self.gen)
                loss, num_pairs = model.loss(batch, negatives.view(-1, shared))
                loss.backward()  # the fused optimizers update both tables here
                s.running += torch.tensor([loss.item(), num_pairs], dtype=torch.float64)
                s.step, s.next_batch = s.step + 1, i + 1
                last = epoch == epochs - 1 and i == steps - 1
                if s.step % cfg.train.log_every == 0 or last:
                    self._read_loss(epoch + (i + 1) / steps)
                if every and (s.step % every == 0 or last):
                    self.save()
        return s

    def _read_loss(self, progress: float) -> None:
        s = self.state
        total = all_reduce_host(s.running)  # every rank gets the same reading
        mean = float(total[0] / max(total[1], 1))
        s.losses.append((progress, mean))
        s.running.zero_()
        self.progress(progress, mean, self.corpus_words * progress / self.elapsed())
