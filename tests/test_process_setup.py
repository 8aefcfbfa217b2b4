"""Process set-up helpers: `tune_malloc` and `init_distributed(tune_malloc=True)`."""

import subprocess
import sys

import pytest
import torch.distributed as dist

from sharded_embedding import distributed as se_distributed


def _has_glibc_mallopt() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


@pytest.mark.skipif(not _has_glibc_mallopt(), reason="needs a C library with mallopt (glibc)")
def test_tune_malloc_is_accepted_by_glibc():
    """Every setting is one glibc accepts (mallopt returns 1; it returns 0 for, e.g., an mmap
    threshold above its 32 MiB maximum). In a fresh process: the setting is process-wide."""
    done = subprocess.run([sys.executable, "-c", "import sharded_embedding as se; print(se.tune_malloc())"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_tune_malloc_without_mallopt_changes_nothing(monkeypatch):
    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(se_distributed.ctypes, "CDLL", NoMallopt)
    assert se_distributed.tune_malloc() is False


def test_init_distributed_calls_tune_malloc_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(se_distributed, "_tune_malloc", lambda: calls.append(1) or True)
    assert not dist.is_initialized()
    try:
        se_distributed.init_distributed("gloo", tune_malloc=True)
        assert calls == [1] and dist.get_world_size() == 1
        se_distributed.init_distributed("gloo")  # already joined: nothing again
        assert calls == [1]
    finally:
        dist.destroy_process_group()


def test_init_distributed_warns_when_tune_malloc_cannot_apply(monkeypatch):
    monkeypatch.setattr(se_distributed, "_tune_malloc", lambda: False)
    assert not dist.is_initialized()
    try:
        with pytest.warns(RuntimeWarning, match="malloc keeps its defaults"):
            se_distributed.init_distributed("gloo", tune_malloc=True)
    finally:
        dist.destroy_process_group()
