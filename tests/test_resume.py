"""Training resume: a run stopped, or one that loses a rank under torchrun --max-restarts, ends
with exactly the tables of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ["train.epochs=2", "train.checkpoint_every=10", "evaluate=false", "train.log_every=10"]
TIMEOUT_S = 300


def _launch(out: Path, *overrides, restarts: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2", MAX_RESTARTS=str(restarts), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        ["bash", "launch/train.sh", f"out_dir={out}", f"hydra.run.dir={out / 'run'}", *RUN, *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=TIMEOUT_S)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen) -> None:
    marker = out / "checkpoints" / f"step_{step:09d}" / "COMPLETE"
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        assert proc.poll() is None, "the run ended before its checkpoint appeared"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def _final_tables(out: Path) -> tuple[str, dict]:
    """Both tables of the run's last checkpoint, read into plain tensors (plain .npy files)."""
    last = sorted(p for p in (out / "checkpoints").iterdir() if not p.name.endswith(".partial"))[-1]
    tables = {k: torch.from_numpy(np.load(last / f"{k}.npy")) for k in ("inputs.weight", "outputs.weight")}
    assert all(t.shape == (7978, 100) for t in tables.values())
    return last.name, tables


def _workers(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(kids)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(_launch(out))
    return _final_tables(out)


def test_stopped_and_resumed_run_ends_bitwise_equal(tmp_path, uninterrupted):
    out = tmp_path / "run"
    first = _launch(out)
    _wait_for_checkpoint(out, 20, first)
    first.send_signal(signal.SIGTERM)  # torchrun stops its workers
    said = first.communicate(timeout=TIMEOUT_S)[0]
    assert first.returncode == 128 + signal.SIGTERM, said[-3000:]
    # one line, not torchrun's SignalException traceback (nor the workers')
    assert "sharded_embedding.train: interrupted by SIGTERM: the workers were stopped" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    done = _finish(_launch(out, "train.resume=true"))
    assert "resumed from" in done
    name, tables = _final_tables(out)
    assert name == uninterrupted[0]
    # metrics.json says the run continued an earlier one (its words/s counts both runs' training)
    assert json.loads((out / "metrics.json").read_text())["resumed_at_step"] >= 20
    for key, table in tables.items():
        assert torch.equal(table, uninterrupted[1][key]), key


def test_lost_rank_is_restarted_and_the_run_ends_bitwise_equal(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _launch(out, "train.resume=true", restarts=1)
    _wait_for_checkpoint(out, 20, proc)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # a rank is lost in the middle of training
    done = _finish(proc)  # torchrun restarted the group; the job resumed and finished
    assert "resumed from" in done
    name, tables = _final_tables(out)
    assert name == uninterrupted[0]
    for key, table in tables.items():
        assert torch.equal(table, uninterrupted[1][key]), key
