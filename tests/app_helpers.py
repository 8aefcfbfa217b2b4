"""Helpers for the apps' launch tests."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held_lock(folder: Path, holder: str = "12345"):
    """Hold ``folder/.lock`` as a running job's rank 0 does (`hydra_app.lock_folder`), naming
    ``holder`` as its process, for the length of the block."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(holder)
        held.flush()
        yield
