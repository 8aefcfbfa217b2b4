"""Training the click model: every rank its own stream of generated batches, the dense arches
under DDP, the tables in one `ShardedEmbeddingBagCollection` with a fused optimizer.

A step: batch ``step * world + rank`` -> DLRM -> binary cross-entropy (mean over the rank's
batch) -> backward (the collection updates the touched rows inside it; DDP averages the dense
gradients) -> the dense optimizer steps. Every ``eval_every`` steps and at the end, every rank
scores its share of the fixed test set and rank 0 computes the AUC, beside the Bayes AUC of
the same test set (the planted probabilities as scores). Checkpoints are DCP checkpoints of the
model (every table's rows and optimizer state, resharding on load) and the dense optimizer.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..collection import TableConfig
from ..ddp import split_parameters
from ..fused_schedule import fused_optimizer
from ..distributed import agree_or_raise, all_gather_ragged, all_gather_strings, all_reduce_host, collective_device
from ..embedding import TableAllocationError
from ..hydra_app import lock_folder, stop
from .config import validate
from .data import NUM_DENSE, ClickBatch, ClickData, DataSpec
from .metrics import auc
from .model import DLRM

log = logging.getLogger("sharded_embedding.dlrm")


def build(cfg, world: int):
    """(the generator, the model wrapped in DDP, the dense optimizer), the same on every rank."""
    d = cfg.data
    data = ClickData(DataSpec(tables=[dict(t) for t in d.tables], pairs=[list(p) for p in d.pairs], seed=d.seed,
                              scale=d.scale, ctr=d.ctr, head=d.head, decay=d.decay, interaction=d.interaction,
                              dense=d.dense))
    fused = {"name": cfg.optim.sparse, "lr": cfg.optim.sparse_lr}
    tables = [TableConfig(name=t.name, num_embeddings=data.rows[t.name], embedding_dim=cfg.model.dim,
                          page_size=cfg.model.page_size, pooling="mean", feature_names=list(t.features),
                          fused_optimizer=fused, seed=cfg.train.seed * 1000 + i)
              for i, t in enumerate(d.tables)]
    torch.manual_seed(cfg.train.seed)  # the dense arches start alike everywhere (DDP would broadcast them anyway)
    comm_dtype = getattr(torch, cfg.model.comm_dtype) if cfg.model.comm_dtype else None
    model = DLRM(tables, NUM_DENSE, list(cfg.model.dense_arch), list(cfg.model.over_arch), comm_dtype=comm_dtype)
    model = DDP(model)  # the tables keep out of DDP by themselves
    _, dense = split_parameters(model)
    opt = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}[cfg.optim.dense]
    return data, model, opt(dense, lr=cfg.optim.dense_lr)


def lr_factor(step: int, warmup_steps: int, decay_start: int, decay_steps: int) -> float:
    """The learning rates' multiplier at ``step`` (0-based): ``(step + 1) / warmup_steps``
    during the warmup, then 1, then from ``decay_start`` ``((decay_steps - k) / decay_steps) ** 2``
    at the decay's ``k``-th step, held at its last value ``decay_steps ** -2`` afterwards (the
    warmup and quadratic decay of MLPerf DLRM's schedule, which never reaches 0 here)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps > 0 and step >= decay_start:
        k = min(step - decay_start, decay_steps - 1)
        return ((decay_steps - k) / decay_steps) ** 2
    return 1.0


def run(cfg) -> int:
    """Train, evaluate, checkpoint, plot; returns the exit code (0; 2: a configuration error,
    found before any work; 1: a failure)."""
    from hydra.core.hydra_config import HydraConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    errors = validate(cfg)
    out = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    if not errors and rank == 0:
        busy = lock_folder(out / "checkpoints")
        if busy:
            errors.append(busy)
    problems = sorted({e for text in all_gather_strings("\n".join(errors)) for e in text.split("\n") if e})
    if problems:
        return stop("configuration error:\n  " + "\n  ".join(problems))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    try:
        data, model, dense_opt = build(cfg, world)
    except TableAllocationError as e:  # (raised on every rank together, before any training)
        return stop(f"configuration error: the tables do not fit in this machine's memory (model.dim and the "
                    f"tables' rows set their size):\n  {e}")
    training = ClickTraining(cfg, data, model, dense_opt, out)
    if cfg.train.resume:
        try:
            training.resume()
        except ResumeError as e:  # every rank read the same checkpoint and found the same
            return stop(f"configuration error: {e}")
        except UnreadableCheckpoint as e:  # DCP raises on every rank together
            return stop(str(e), code=1)
    training.train()
    training.finish()
    return 0



def _number(x: float | None) -> float | None:
    """``x``, or None where it is not finite: JSON has no NaN, and an AUC is undefined (nan)
    on a set without clicks or without non-clicks."""
    return x if x is None or math.isfinite(x) else None


def _shown(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "n/a (the set holds no clicks or no non-clicks)"

class ResumeError(ValueError):
    """The newest checkpoint was trained with settings that differ from this run's."""


class UnreadableCheckpoint(RuntimeError):
    """The newest checkpoint could not be read (a damaged or partly deleted folder)."""


def _unreadable(done: list[Path], error: BaseException) -> str:
    """One message for a checkpoint that could not be read: which, why (the first line of the
    first cause DCP reports), and what to do."""
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: {rank: exception}
    cause = next(iter(failures.values()))[0] if failures else error  # (exception, traceback) by rank
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    then = f"resume from {done[-2].name}, the one before" if len(done) > 1 else "start afresh"
    return (f"cannot resume from {done[-1]}: it could not be read ({type(cause).__name__}: {first}). Remove it "
            f"(or rename it to something other than step_ and nine digits) to {then}, or use another out_dir")


class _held_dcp_warnings:
    """Holds back what torch's DCP logs to the root logger while it reads a checkpoint (on a
    damaged ``.metadata``: two warnings with full tracebacks, before it raises): dropped if
    the load fails (the app's one message names the cause), logged as usual if it succeeds."""

    def __enter__(self):
        self.held = []
        logging.getLogger().addFilter(self._hold)
        return self

    def _hold(self, record: logging.LogRecord) -> bool:
        if "torch/distributed/checkpoint" in record.pathname.replace("\\", "/"):
            self.held.append(record)
            return False
        return True

    def __exit__(self, kind, error, tb):
        root = logging.getLogger()
        root.removeFilter(self._hold)
        if kind is None:
            for record in self.held:
                root.handle(record)
        return False


# The settings a checkpoint's run must share with a run that resumes it: the dataset (the
# planted model and its batches) and the model's and optimizers' shapes. The world size, page
# size, batch size, steps and evaluation may change.
RESUME_KEYS = ("data.tables", "data.pairs", "data.seed", "data.scale", "data.ctr", "data.head", "data.decay",
               "data.interaction", "data.dense", "model.dim", "model.dense_arch", "model.over_arch", "optim.sparse",
               "optim.dense", "train.seed")


def resume_settings(cfg) -> dict:
    """``RESUME_KEYS`` of ``cfg`` as plain JSON values."""
    from omegaconf import OmegaConf

    out = {}
    for key in RESUME_KEYS:
        value = OmegaConf.select(cfg, key)
        out[key] = json.loads(json.dumps(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value))
    return out


class ClickTraining:
    """The loop's state: step, loss and AUC curves; checkpoints in ``out/checkpoints``."""

    def __init__(self, cfg, data: ClickData, model, dense_opt, out: Path):
        self.cfg, self.data, self.model, self.dense_opt, self.out = cfg, data, model, dense_opt, out
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.step = 0
        self.losses: list[tuple[int, float]] = []  # (step, mean loss over ranks since the last point)
        self.aucs: list[tuple[int, float]] = []  # (step, test AUC)
        self.lrs: list[tuple[int, float, float]] = []  # (step, sparse lr, dense lr) of the step before each loss point
        self.train_seconds = 0.0
        self.samples = 0  # trained, over all ranks (a resume on another world size changes the rate)
        self.bayes_test: float | None = None
        self.bar = None

    @property
    def sparse(self):
        return self.model.module.sparse

    # ------------------------------------------------------------------ training
    def _schedules(self) -> list:
        """LambdaLR by `lr_factor` on the dense optimizer and on the tables' fused optimizers
        (`fused_optimizer`), at ``self.step`` (from a resume too: the schedule is a function of
        the step and the configured rates); none when no schedule is configured."""
        o = self.cfg.optim
        if not (o.warmup_steps or o.decay_steps):
            return []
        factor = lambda step: lr_factor(step, o.warmup_steps, o.decay_start, o.decay_steps)  # noqa: E731
        schedules = []
        for opt, lr in ((self.dense_opt, o.dense_lr), (fused_optimizer(self.model), o.sparse_lr)):
            for group in opt.param_groups:
                group["initial_lr"] = lr
            schedules.append(torch.optim.lr_scheduler.LambdaLR(opt, factor, last_epoch=self.step - 1))
        return schedules

    def _lrs(self) -> tuple[float, float]:
        table = next(iter(self.sparse.tables))
        return self.sparse.tables[table].optimizer.lr, self.dense_opt.param_groups[0]["lr"]

    def train(self) -> None:
        cfg = self.cfg.train
        self._progress()
        schedules = self._schedules()
        total, count, t0 = 0.0, 0, time.perf_counter()
        while self.step < cfg.steps:
            batch = self.data.batch(self.step * self.world + self.rank, cfg.batch_size)
            logits = self.model(batch.dense, batch.features)
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
            self.dense_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.dense_opt.step()
            lrs = self._lrs()  # those of this step
            for schedule in schedules:
                if schedule.optimizer is not self.dense_opt:  # the tables': nothing to do (they stepped in
                    schedule.optimizer.step()  # the backward), but a scheduler warns without the call
                schedule.step()  # the next step's rates
            self.step += 1
            self.samples += cfg.batch_size * self.world
            total, count = total + float(loss.detach()), count + 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                mean = float(all_reduce_host(torch.tensor([total / count], dtype=torch.float64))) / self.world
                if not math.isfinite(mean):
                    raise FloatingPointError(f"the loss is {mean} at step {self.step}: lower optim.dense_lr / sparse_lr")
                self.losses.append((self.step, mean))
                self.lrs.append((self.step, *lrs))
                total, count = 0.0, 0
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self.train_seconds += time.perf_counter() - t0
                self.aucs.append((self.step, self.evaluate()))
                t0 = time.perf_counter()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.train_seconds += time.perf_counter() - t0
                self.save()
                t0 = time.perf_counter()
            self._show()
        if self.bar is not None:
            self.bar.close()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Test AUC (the same on every rank): each rank scores test batches ``rank, rank +
        world, ...`` (an empty batch where it has none left: lookups are collective), rank 0
        gathers the scores. Also sets the Bayes AUC of the test set (first call)."""
        size = self.cfg.train.batch_size
        batches = math.ceil(self.cfg.data.test_samples / size)
        rounds = math.ceil(batches / self.world)
        self.model.eval()
        rows = []
        for i in range(rounds):
            k = i * self.world + self.rank
            n = min(size, self.cfg.data.test_samples - k * size) if k < batches else 0
            batch = self.data.test_batch(k, n) if n > 0 else _empty(self.data)
            logits = self.model(batch.dense, batch.features)
            rows.append(torch.stack([torch.sigmoid(logits).double(), batch.labels.double(), batch.probability], 1))
        self.model.train()
        every, _ = all_gather_ragged(torch.cat(rows))  # [test samples, 3]: score, label, planted probability
        result = auc(every[:, 0], every[:, 1])
        if self.bayes_test is None:
            self.bayes_test = auc(every[:, 2], every[:, 1])
        return result

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"model": self.model.module.state_dict(),
                "dense_optimizer": get_optimizer_state_dict(self.model.module, self.dense_opt),
                "loop": {"step": torch.tensor(self.step), "train_seconds": torch.tensor(self.train_seconds,
                                                                                        dtype=torch.float64)}}

    def save(self) -> Path:
        """A DCP checkpoint in ``checkpoints/step_N`` (written to ``step_N.partial`` and renamed
        by rank 0 once every rank has written, so a crash never leaves a half checkpoint there)."""
        root = self.out / "checkpoints"
        final = root / f"step_{self.step:09d}"
        partial = final.with_name(final.name + ".partial")
        dcp.save(self._state(), checkpoint_id=str(partial))
        if self.rank == 0:
            (partial / "curves.json").write_text(json.dumps({"losses": self.losses, "aucs": self.aucs, "lrs": self.lrs,
                                                             "bayes_auc_test_set": self.bayes_test,
                                                             "samples": self.samples,
                                                             "dense_lr": self.cfg.optim.dense_lr,  # unscheduled
                                                             "settings": resume_settings(self.cfg)}))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        agree_or_raise(dist.group.WORLD, f"checkpoint {final.name}", "saved", None, collective_device(dist.group.WORLD))
        return final

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in ``checkpoints/`` (any world size or
        page size: DCP reshards the tables), if there is one. Raises `ResumeError` (before any
        state changes) if it was trained with other `RESUME_KEYS` settings."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        root = self.out / "checkpoints"
        # Complete checkpoints only (step_ and nine digits; not .partial, nor a folder renamed
        # aside), oldest first by step.
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d{9}", p.name)) \
            if root.is_dir() else []
        if not done:
            if self.rank == 0:
                log.info("no checkpoint in %s yet: starting from scratch", root)
            return
        try:
            curves = json.loads((done[-1] / "curves.json").read_text())
            if not (isinstance(curves, dict) and isinstance(curves.get("losses"), list)
                    and isinstance(curves.get("aucs"), list) and isinstance(curves.get("settings"), dict)):
                raise ValueError("curves.json is not the curves and settings this app writes")
        except (OSError, ValueError) as e:
            raise UnreadableCheckpoint(_unreadable(done, e)) from e
        saved, now = curves.get("settings", {}), resume_settings(self.cfg)
        differ = [k for k in RESUME_KEYS if saved.get(k) != now[k]]
        if differ:
            detail = "; ".join(f"{k}={json.dumps(saved.get(k))} (now {json.dumps(now[k])})" for k in differ)
            raise ResumeError(f"cannot resume from {done[-1]}: it was trained with other settings: {detail}. Use "
                              "the checkpoint's settings, or another out_dir to start afresh")
        state = self._state()
        try:
            with _held_dcp_warnings():
                dcp.load(state, checkpoint_id=str(done[-1]))  # collective: raises on every rank together
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise UnreadableCheckpoint(_unreadable(done, e)) from e
        self.model.module.load_state_dict(state["model"])
        set_optimizer_state_dict(self.model.module, self.dense_opt, optim_state_dict=state["dense_optimizer"])
        # The configured learning rate applies, as the tables' (their optimizer's lr is not
        # state): the loaded param_groups bring back the checkpoint's.
        lr = self.cfg.optim.dense_lr
        was = [curves["dense_lr"]] if isinstance(curves.get("dense_lr"), (int, float)) else \
            sorted({g["lr"] for g in self.dense_opt.param_groups})  # (older checkpoints: the saved rate)
        for group in self.dense_opt.param_groups:
            group["lr"] = lr
        if self.rank == 0 and was != [lr]:
            log.info("optim.dense_lr is %g now (the checkpoint's run used %s)", lr, ", ".join(f"{x:g}" for x in was))
        self.step = int(state["loop"]["step"])
        self.train_seconds = float(state["loop"]["train_seconds"])
        self.losses = [tuple(x) for x in curves["losses"]]
        self.aucs = [tuple(x) for x in curves["aucs"]]
        self.lrs = [tuple(x) for x in curves.get("lrs", [])]  # (checkpoints written before the curve: none)
        self.bayes_test = curves["bayes_auc_test_set"]
        # (checkpoints written before the count: as if every step ran at this world size)
        self.samples = int(curves.get("samples", self.step * self.cfg.train.batch_size * self.world))
        if self.rank == 0:
            log.info("resumed from %s at step %d", done[-1], self.step)

    # ------------------------------------------------------------------ outputs
    def finish(self) -> None:
        """Final checkpoint; rank 0 writes metrics.json and loss_auc.png."""
        final = self.save()
        cfg = self.cfg
        if self.rank == 0:
            samples = self.samples
            bayes = self.data.bayes_auc(cfg.data.bayes_samples)
            stats = self.sparse.stats()
            metrics = {
                "world_size": self.world, "steps": self.step, "batch_size_per_rank": cfg.train.batch_size,
                "samples": samples, "train_seconds": round(self.train_seconds, 2),
                "samples_per_second": round(samples / max(self.train_seconds, 1e-9), 1),
                "final_loss": self.losses[-1][1] if self.losses else None,
                "test_auc": _number(self.aucs[-1][1]) if self.aucs else None, "test_samples": cfg.data.test_samples,
                "bayes_auc_test_set": _number(self.bayes_test), "bayes_auc_generator": _number(bayes),
                "bayes_auc_generator_samples": cfg.data.bayes_samples,
                "loss_curve": self.losses, "auc_curve": [(s, _number(a)) for s, a in self.aucs],
                "lr_curve": self.lrs,
                "checkpoint": str(final),
                "tables": {name: {"rows": self.data.rows[name], **{k: t[k] for k in (
                    "calls_pooled_on_requester", "calls_pooled_on_owner")}} for name, t in stats["tables"].items()},
                "bytes_sent_per_step_rank0": stats["bytes_sent_per_call"],
            }
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
            _plot(self.losses, self.aucs, self.bayes_test, bayes, self.out / "loss_auc.png")
            log.info("test AUC %s after %d steps (%s samples, %.0f samples/s); Bayes AUC of the test set %s, of "
                     "the generator %s; outputs in %s", _shown(metrics["test_auc"]), self.step, f"{samples:,}",
                     metrics["samples_per_second"], _shown(metrics["bayes_auc_test_set"]),
                     _shown(metrics["bayes_auc_generator"]), self.out)
        dist.barrier()

    def _progress(self) -> None:
        if self.rank != 0:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=self.cfg.train.steps, initial=self.step, unit="step", file=sys.stderr, mininterval=1.0)

    def _show(self) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        parts = []
        if self.losses:
            parts.append(f"loss {self.losses[-1][1]:.4f}")
        if self.aucs:
            parts.append(f"test AUC {self.aucs[-1][1]:.4f} (Bayes {self.bayes_test:.4f})")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)


def _empty(data: ClickData) -> ClickBatch:
    empty = torch.zeros(0, dtype=torch.int64)
    return ClickBatch(torch.zeros(0, NUM_DENSE), {f: (empty, empty) for f in data.features}, torch.zeros(0),
                      torch.zeros(0, dtype=torch.float64))


def _plot(losses, aucs, bayes_test: float, bayes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        left.plot([s for s, _ in losses], [v for _, v in losses])
    left.set_xlabel("step")
    left.set_ylabel("binary cross-entropy")
    left.set_title("training loss (mean over ranks)")
    if aucs:
        right.plot([s for s, _ in aucs], [v for _, v in aucs], marker="o", label="DLRM, test set")
    right.axhline(bayes_test, color="tab:red", linestyle="--", label=f"Bayes, test set ({bayes_test:.4f})")
    right.axhline(bayes, color="tab:gray", linestyle=":", label=f"Bayes, generator ({bayes:.4f})")
    right.set_xlabel("step")
    right.set_ylabel("AUC")
    right.set_title("test AUC")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
