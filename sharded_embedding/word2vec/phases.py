"""The training job's phases: how long each took, each rank's peak resident memory in it, and
progress bars for the long ones (rank 0 prints; the other ranks stay quiet).

Peak memory per phase is exact on Linux: at a phase's start the kernel's high-water mark of
resident memory is reset (``/proc/self/clear_refs``, value 5) and at its end it is read back
(``VmHWM`` in ``/proc/self/status``). Where that is not allowed, the peak since the process
started is reported instead (``ru_maxrss``), and ``metrics.json`` says so.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager

import torch

from ..distributed import all_gather_ragged

__all__ = ["Phases"]

log = logging.getLogger("sharded_embedding.train")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phases:
    """Times and memory peaks of named phases, in order."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}
        self.exact = True

    @contextmanager
    def phase(self, name: str, what: str):
        """Time ``name`` and record this rank's peak memory in it; log ``what`` (rank 0)."""
        self.exact &= _reset_peak()
        if self.rank == 0:
            log.info("%s ...", what)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), _peak_mib())
        if self.rank == 0:
            log.info("%s: %.1f s", what, self.seconds[name])

    def progress(self, total: float, unit: str, desc: str, scale: float = 1.0):
        """A progress callback ``advance(n)`` (a tqdm bar on rank 0, nothing elsewhere)."""
        if self.rank != 0:
            return _Quiet()
        from tqdm import tqdm

        return tqdm(total=total * scale, unit=unit, desc=desc, unit_scale=True, mininterval=1.0, file=sys.stderr,
                    leave=False, delay=2.0)

    def report(self, group=None) -> dict:
        """For metrics.json: seconds per phase, and every rank's peak MiB per phase (collective:
        one all-gather)."""
        names = list(self.peak_mib)
        mine = torch.tensor([[self.peak_mib[n] for n in names]], dtype=torch.float64)
        every, _ = all_gather_ragged(mine, group)
        return {
            "seconds": {n: round(s, 2) for n, s in self.seconds.items()},
            "peak_rss_mib": {n: [round(float(v), 1) for v in every[:, i]] for i, n in enumerate(names)},
            "peak_rss_is_per_phase": self.exact,
        }


class _Quiet:
    def update(self, n=1):
        pass

    def close(self):
        pass
