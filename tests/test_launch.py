"""The launch script runs torchrun end to end and exits 0, every time.

torch 2.13's CPU build sometimes aborts a rank in static destructors after its work is done
("terminate called without an active exception"), which makes torchrun fail. Our entry
points leave through `sharded_embedding.finish` (flush, destroy the group, os._exit); these
repeated runs are the proof that the launch path is not flaky.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("run", range(3))
def test_demo_launch_exits_cleanly(run):
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2")
    done = subprocess.run(
        ["bash", "launch/demo.sh", "--rows", "20000", "--dim", "8", "--page-size", "1000", "--batch", "256",
         "--steps", "6"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "world 2 (gloo), table 20000 x 8 in 20 pages" in out
    assert "done: 6 steps" in out
    assert out.count("done:") == 1  # rank 0 alone prints
    assert "terminate called" not in done.stderr


@pytest.mark.parametrize("codes, want", [
    ({0: 2, 1: -15}, 2),    # rank 1 was stopped by torchrun after rank 0's configuration error
    ({0: -15, 1: 1}, 1),
    ({0: -9, 1: 1}, 137),   # a worker killed (out of memory) is the cause, whatever the others did
    ({0: -15, 1: -15}, 143),  # a SIGTERM from outside stopped every worker
    ({0: 3, 1: 2}, 3),
    ({0: -9, 1: -15}, 137),   # a worker killed from outside; torchrun stopped the other
    ({0: -15, 1: -11}, 139),
])
def test_the_launcher_exits_with_the_workers_code_not_torchruns_sigterm(monkeypatch, capsys, codes, want):
    """torchrun stops the surviving workers with SIGTERM once one has exited with a code: the
    job exited 143 ("interrupted by SIGTERM" in the docs) in 1 of 5 config-error runs."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from sharded_embedding import launch

    def failing(args):
        raise ChildFailedError("job", {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=c, error_file="")
                                       for r, c in codes.items()})

    monkeypatch.setattr(torchrun, "run", failing)
    assert launch.main(["--nproc_per_node=2", "-m", "x"]) == want
    assert "stopped (rank 0:" in capsys.readouterr().err


def test_torchruns_own_failure_and_stopping_lines_are_left_out():
    """The launcher's one line gives every rank's code or signal; torchrun's record of the first
    failure and its "Sending process ... closing signal SIGTERM" records (there or not, by a
    race: whether the other workers had exited when torchrun looked) are dropped; others pass."""
    import logging

    from sharded_embedding.launch import _FirstFailureLine

    def record(msg, *args):
        return logging.makeLogRecord({"msg": msg, "args": args, "levelno": logging.WARNING})

    keep = _FirstFailureLine().filter
    assert not keep(record("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", 1, 0, 7, "python"))
    assert not keep(record("Sending process %s closing signal %s", 2005, "SIGTERM"))
    assert keep(record("Starting elastic_operator with launch configs:"))
