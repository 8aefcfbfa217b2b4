"""The click-model app: its generator, its metric, its model against an unsharded replica, and
the launch line end to end (torchrun + Hydra, progress, plot, DCP checkpoint, resume on
another world size, configuration errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharded_embedding.dlrm.data import DEFAULT_PAIRS, DEFAULT_TABLES, NUM_DENSE, ClickData, DataSpec
from sharded_embedding.dlrm.metrics import auc
from tests.harness import run_ranks
from tests.oracle import rank_world

ROOT = Path(__file__).resolve().parents[1]
TINY = DataSpec(tables=DEFAULT_TABLES, pairs=DEFAULT_PAIRS, scale=0.001, seed=3)


def test_auc_is_the_pairwise_probability():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 12, (300,), generator=g).double()  # many ties
    labels = (torch.rand(300, generator=g) < 0.4).double()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)
    soft = torch.rand(300, generator=g).double()  # soft labels: weights p as a positive, 1 - p as a negative
    s = scores[:, None] > scores[None, :]
    tie = scores[:, None] == scores[None, :]
    off = ~torch.eye(300, dtype=torch.bool)
    weight = soft[:, None] * (1 - soft[None, :])
    want = float((weight * (s + 0.5 * tie) * off).sum() / (weight * off).sum())
    assert auc(scores, soft) == pytest.approx(want, abs=2e-3)  # up to the self-pairs
    assert auc(torch.arange(10.0), (torch.arange(10) >= 5).double()) == 1.0
    assert auc(-torch.arange(10.0), (torch.arange(10) >= 5).double()) == 0.0


def test_the_generator_is_deterministic_criteo_shaped_and_has_a_known_bayes_auc():
    data = ClickData(TINY)
    a, b = data.batch(7, 3000), data.batch(7, 3000)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
    assert all(torch.equal(a.features[f][0], b.features[f][0]) for f in a.features)
    assert not torch.equal(a.labels, data.batch(8, 3000).labels)
    assert a.dense.shape == (3000, NUM_DENSE) and len(a.features) == 26
    for t in data.tables:
        for f in t.features:
            values, offsets = a.features[f]
            lengths = torch.diff(offsets, append=torch.tensor([values.numel()]))
            lo, hi = t.bag if f in t.bag_features else (1, 1)
            assert offsets.numel() == 3000 and int(lengths.min()) >= lo and int(lengths.max()) <= hi
            assert int(values.min()) >= 0 and int(values.max()) < data.rows[t.name]
    assert abs(float(a.labels.mean()) - TINY.ctr) < 0.03  # the bias was calibrated to the click rate
    bayes = data.bayes_auc(100_000)
    test = data.test_batch(0, 20_000)
    assert abs(auc(test.probability, test.labels) - bayes) < 0.01  # the planted probability is the best score
    noisy = torch.logit(test.probability) + torch.randn(20_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert auc(noisy, test.labels) < auc(test.probability, test.labels) - 0.02
    # ... and the planted logit is a function of what a model sees
    assert torch.allclose(torch.sigmoid(data.logit(test.dense, test.features)), test.probability, atol=1e-6)


def _dlrm_matches_an_unsharded_replica():
    from sharded_embedding.dlrm.model import DLRM
    from sharded_embedding import TableConfig

    rank, world = rank_world()
    data = ClickData(TINY)
    tables = [TableConfig(name=t.name, num_embeddings=data.rows[t.name], embedding_dim=4, page_size=5, pooling="mean",
                          feature_names=list(t.features), seed=i) for i, t in enumerate(data.tables)]
    torch.manual_seed(0)
    model = DLRM(tables, NUM_DENSE, [8], [8, 4])
    batches = [data.batch(r, 6) for r in range(world)]
    logits = model(batches[rank].dense, batches[rank].features)
    # The replica: one nn.EmbeddingBag(mean) per table with the same rows, the same MLPs.
    bags = {t.name: nn.EmbeddingBag.from_pretrained(model.sparse.tables[t.name].full_table(), mode="mean", freeze=False)
            for t in tables}
    b = batches[rank]
    d = model.dense(b.dense)
    pooled = [bags[data.table_of[f].name](*b.features[f]) for t in tables for f in t.feature_names]
    z = torch.stack([d, *pooled], 1)
    i, j = torch.triu_indices(z.shape[1], z.shape[1], offset=1)
    want = model.over(torch.cat([d, (z @ z.transpose(1, 2))[:, i, j]], 1)).squeeze(1)
    torch.testing.assert_close(logits, want)
    F.binary_cross_entropy_with_logits(logits, b.labels).backward()


def test_dlrm_matches_an_unsharded_replica():
    run_ranks(2, _dlrm_matches_an_unsharded_replica)


# --------------------------------------------------------------------------- the launch line
SMOKE = ["data.scale=0.001", "train.batch_size=256", "train.log_every=5", "train.eval_every=20",
         "data.test_samples=4000", "data.bayes_samples=20000", "optim.sparse_lr=0.1", "optim.dense_lr=0.01"]


def _launch(tmp_path, *overrides, nproc=2, run="run"):
    env = dict(os.environ, PYTHON=sys.executable, NPROC=str(nproc), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(["bash", "launch/dlrm.sh", f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / run}",
                           *SMOKE, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_short_run_trains_plots_checkpoints_and_resumes_on_another_world_size(tmp_path):
    done = _launch(tmp_path, "train.steps=40")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["world_size"] == 2
    assert [s for s, _ in metrics["auc_curve"]] == [20, 40]
    assert 0.6 < metrics["test_auc"] < metrics["bayes_auc_test_set"] + 0.02  # it learned, and no better than Bayes
    assert metrics["loss_curve"][-1][1] < metrics["loss_curve"][0][1]
    assert (tmp_path / "out" / "loss_auc.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "checkpoints" / "step_000000040").is_dir()
    assert out.count("test AUC") >= 1 and "step/s" in out  # progress on rank 0
    assert "terminate called" not in done.stderr
    # Resume on one rank with another page size: DCP reshards every table and its optimizer state.
    # The configured dense learning rate applies on resume (the loaded optimizer state would
    # bring back the checkpoint's).
    done = _launch(tmp_path, "train.steps=60", "train.resume=true", "model.page_size=3", "optim.dense_lr=0.02",
                   nproc=1, run="run2")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "resumed from" in out and "step_000000040 at step 40" in out
    assert "optim.dense_lr is 0.02 now (the checkpoint's run used 0.01)" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 60 and [s for s, _ in metrics["auc_curve"]] == [20, 40, 60]
    assert metrics["samples"] == 256 * (40 * 2 + 20 * 1)  # trained on 2 ranks, then on 1
    assert (tmp_path / "out" / "checkpoints" / "step_000000060").is_dir()
    # And back on two ranks, where each rank holds none of some tables (DCP used to fail there:
    # "Missing key in checkpoint state_dict: dense_optimizer.param_groups").
    done = _launch(tmp_path, "train.steps=70", "train.resume=true", run="run2b")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "step_000000060 at step 60" in out
    assert "optim.dense_lr is 0.01 now (the checkpoint's run used 0.02)" in out  # 0.02 was trained and saved
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 70 and metrics["samples"] == 256 * (40 * 2 + 20 * 1 + 10 * 2)
    # A resume with another dataset or model is refused, naming what differs; nothing is written.
    done = _launch(tmp_path, "train.steps=80", "train.resume=true", "model.dim=8", "data.seed=1", nproc=1, run="run3")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-4000:]
    assert out.count("cannot resume from ") == 1 and "data.seed=0 (now 1); model.dim=16 (now 8)" in out, out[-3000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 70
    assert not (tmp_path / "out" / "checkpoints" / "step_000000080").exists()


def test_the_configuration_checks_name_each_bad_value():
    """`validate` on composed configs (no launch): every bad value is named."""
    from sharded_embedding.dlrm.config import register, validate
    from sharded_embedding.hydra_app import compose

    assert validate(compose("dlrm", register, [])) == []
    cases = {
        "optim.sparse_lr=inf": "optim.sparse_lr must be a finite number > 0, got inf",
        "optim.dense_lr=0": "optim.dense_lr must be a finite number > 0, got 0.0",
        "data.scale=nan": "data.scale must be a finite number > 0, got nan",
        "data.interaction=-1": "data.interaction must be a finite number >= 0, got -1.0",
        "data.tables.0.zipf=0": "data.tables[0] (ad): zipf must be a finite number > 0, got 0.0",
        "data.tables.1.sigma=-0.5": "data.tables[1] (advertiser): sigma must be a finite number >= 0, got -0.5",
        "data.tables.1.features=[C1]": "data.tables[1] (advertiser): feature 'C1' is also read by table 'ad'",
        "data.tables.0.bag=[5,2]": "data.tables[0] (ad): bag must be [min, max] ids with 0 <= min <= max",
        "data.tables.0.name=a.b": "data.tables[0] (a.b): name must be a non-empty string without dots",
        "data.tables.0.name=''": "data.tables[0] (): name must be a non-empty string without dots",
        "data.test_samples=3": "data.test_samples must be >= 100, got 3: an AUC needs clicks and non-clicks",
        "data.bayes_samples=0": "data.bayes_samples must be >= 100, got 0",
        "data.tables.1.bag=[0,5]": "data.tables[1] (advertiser): bag=[0, 5] would change nothing",
        "model.comm_dtype=float8": "model.comm_dtype='float8' is not one of",
        "train.checkpoint_every=-1": "train.checkpoint_every must be >= 0, got -1",
        "train.batch_size=0": "train.batch_size must be >= 1, got 0",
        "train.steps=0": "train.steps must be >= 1, got 0",
        "data.pairs=[[C1,C99]]": "data.pairs: ['C1', 'C99'] must name two features of the tables",
        "train.resume=true": "train.resume=true needs out_dir",
        "optim.warmup_steps=-1": "optim.warmup_steps must be >= 0, got -1",
        "optim.decay_steps=-2": "optim.decay_steps must be >= 0, got -2",
        "optim.decay_start=-3": "optim.decay_start must be >= 0, got -3",
        "out_dir=/proc/nope": "out_dir=/proc/nope: cannot be created: /proc refuses new folders",
    }
    for override, message in cases.items():
        errors = validate(compose("dlrm", register, [override]))
        assert any(message in e for e in errors), (override, errors)


def test_the_schedule_checks_its_order_and_has_its_documented_shape():
    from sharded_embedding.dlrm.config import register, validate
    from sharded_embedding.dlrm.loop import lr_factor
    from sharded_embedding.hydra_app import compose

    errors = validate(compose("dlrm", register, ["optim.warmup_steps=10", "optim.decay_start=5",
                                                 "optim.decay_steps=4"]))
    assert errors == ["optim.decay_start=5 is inside the warmup (optim.warmup_steps=10): the decay starts after it"]
    assert validate(compose("dlrm", register, ["optim.warmup_steps=10"])) == []
    assert validate(compose("dlrm", register, ["optim.decay_start=5"])) == [
        "optim.decay_start=5 would change nothing without optim.decay_steps (the decay's length)"]
    got = [lr_factor(s, 4, 6, 4) for s in range(12)]
    assert got == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5625, 0.25, 0.0625, 0.0625, 0.0625]
    assert [lr_factor(s, 0, 0, 0) for s in range(3)] == [1.0, 1.0, 1.0]


def test_a_scheduled_run_resumes_its_schedule_on_another_world_size(tmp_path):
    """Both learning rates follow `lr_factor` at every step, through the dense optimizer and the
    tables' fused optimizers (`fused_optimizer` under torch's LambdaLR), and a resume on one rank
    continues the schedule where the checkpoint left it."""
    from sharded_embedding.dlrm.loop import lr_factor

    schedule = ["optim.warmup_steps=6", "optim.decay_start=10", "optim.decay_steps=8", "train.log_every=2",
                "train.eval_every=100"]
    done = _launch(tmp_path, "train.steps=12", *schedule)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    done = _launch(tmp_path, "train.steps=20", "train.resume=true", *schedule, nproc=1, run="run2")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "optim.dense_lr is" not in out  # the configured rate is the checkpoint's: nothing to say
    curve = json.loads((tmp_path / "out" / "metrics.json").read_text())["lr_curve"]
    assert [s for s, _, _ in curve] == list(range(2, 21, 2))
    for step, sparse, dense in curve:  # the rates of the step that ended at `step`
        f = lr_factor(step - 1, 6, 10, 8)
        assert sparse == pytest.approx(0.1 * f) and dense == pytest.approx(0.01 * f), (step, sparse, dense)


@pytest.mark.parametrize("overrides, message", [
    (["optim.sparse=lion"], "optim.sparse='lion' is not one of"),
    (["model.dimm=4"], "Key 'dimm' not in 'ModelCfg'"),
    (["+train.stepz=5"], "+train.stepz=5: not a key of this app's configuration"),
    (["model.dim=100000000000000"], "configuration error: the tables do not fit in this machine's memory"),
])
def test_configuration_errors_stop_every_rank_with_one_message(tmp_path, overrides, message):
    """Through the launch line: a schema error (Hydra's), a `validate` error (the others are
    checked in-process above), and tables no rank's memory holds."""
    done = _launch(tmp_path, *overrides)
    out = done.stdout + done.stderr
    assert out.count(message) == 1, out[-3000:]
    assert message in done.stderr  # errors on stderr, whatever Hydra's console logging does with stdout
    assert done.returncode == 2  # the configuration-error code, through the launcher
    assert "Traceback" not in out and "ChildFailedError" not in out  # no launcher noise after the message
    assert "failed (exitcode" not in out  # (torchrun's log line: the launcher's own line says it)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_checkpoint_that_fails_to_load_ends_the_run_with_exit_code_1(tmp_path):
    """torch's DCP raises CheckpointException, a BaseException: it escaped the app's handler,
    skipped the clean shutdown, and torchrun reported SIGABRT / SIGTERM (exit 143) instead of 1.
    Now one message names the checkpoint and what to do."""
    done = _launch(tmp_path, "train.steps=10", "train.eval_every=10")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (tmp_path / "out" / "checkpoints" / "step_000000010" / ".metadata").write_bytes(b"not a checkpoint")
    done = _launch(tmp_path, "train.steps=20", "train.eval_every=10", "train.resume=true", run="run2")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-4000:]
    assert out.count("cannot resume from ") == 1 and "step_000000010: it could not be read" in out, out[-4000:]
    assert "Remove it (or rename it" in out, out[-4000:]
    assert "terminate called" not in out and "signal" not in out, out[-4000:]
    assert "Traceback" not in out and "metadata is not found" not in out, out[-4000:]  # DCP's warnings held back
    # Renamed aside as the message says, it is no longer a checkpoint: the run starts afresh.
    ckpt = tmp_path / "out" / "checkpoints" / "step_000000010"
    ckpt.rename(ckpt.with_name("step_000000010.damaged"))
    done = _launch(tmp_path, "train.steps=10", "train.eval_every=10", "train.resume=true", run="run3")
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "no checkpoint in" in out, out[-4000:]


def test_dcp_warnings_are_held_back_while_a_checkpoint_loads(caplog):
    """What DCP logs during a load is dropped if the load fails and logged if it succeeds;
    other records pass as usual."""
    import logging

    from sharded_embedding.dlrm.loop import _held_dcp_warnings

    def dcp_warning(text):
        logging.getLogger().handle(logging.makeLogRecord(
            {"name": "root", "levelno": logging.WARNING, "levelname": "WARNING", "msg": text,
             "pathname": "/x/torch/distributed/checkpoint/state_dict_loader.py"}))

    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError):
        with _held_dcp_warnings():
            dcp_warning("dropped")
            logging.getLogger("app").info("passes")
            raise RuntimeError("load failed")
    with _held_dcp_warnings():
        dcp_warning("kept")
        assert "kept" not in caplog.text  # held until the load is over
    assert "dropped" not in caplog.text and "passes" in caplog.text and "kept" in caplog.text


def test_a_checkpoint_folder_in_use_by_a_running_job_is_refused(tmp_path):
    """The click model takes the same lock on its checkpoint folder as the word2vec job."""
    from tests.app_helpers import held_lock

    with held_lock(tmp_path / "out" / "checkpoints", "12345"):
        done = _launch(tmp_path, "train.steps=10", "train.resume=true")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert out.count("is in use by another run (its rank 0 is process 12345, still running)") == 1, out[-3000:]
