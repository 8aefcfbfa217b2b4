"""Process-group plumbing: start-up under torchrun, default devices, agreement checks, exit.

Collectives are where distributed code hangs, so every helper here is written so that all
ranks of a group make the same calls in the same order, and errors are raised on every
rank together rather than on the one rank that saw them.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "bind_local_cpus",
    "tune_malloc",
    "default_device",
    "agree_or_raise",
    "check_agreement",
    "group_ranks",
    "subgroup",
    "finish",
    "all_gather_single",
    "all_gather_strings",
    "all_reduce_host",
    "all_to_all_ragged",
    "all_gather_ragged",
    "collective_device",
]

# torch 2.13 renamed all_gather_into_tensor (now deprecated); the package supports both.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def init_distributed(
    backend: str | None = None, timeout: timedelta = timedelta(minutes=10), bind_cpus: bool = False,
    tune_malloc: bool = False,
) -> None:
    """Join the process group that torchrun describes in the environment, or make a
    single-process group when not launched by torchrun.

    The backend defaults to ``cpu:gloo,cuda:nccl`` when CUDA is available (tables on
    ``cuda:LOCAL_RANK`` exchange over nccl; small host-side agreements use gloo) and to gloo
    otherwise. ``bind_cpus`` first calls `bind_local_cpus` (only when joining: gloo's threads
    must inherit it). ``tune_malloc`` calls `tune_malloc` (process-wide, see there), also when
    the group already exists, and warns if it could not be applied. Otherwise does nothing if
    already joined.
    """
    if tune_malloc and not _tune_malloc():
        import warnings

        warnings.warn("init_distributed(tune_malloc=True): this C library has no mallopt, or refused a setting: "
                      "malloc keeps its defaults, or some of them (see sharded_embedding.tune_malloc)",
                      RuntimeWarning, stacklevel=2)
    if dist.is_initialized():
        return
    if bind_cpus:
        bind_local_cpus()
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def bind_local_cpus() -> list[int]:
    """Pin this process to its own share of the CPUs it may use: local rank ``i`` of ``n``
    gets the ``i``-th of ``n`` equal slices of ``os.sched_getaffinity``. Returns those CPUs.

    Call it before ``init_process_group`` so that gloo's threads inherit it. On CPU training
    with ranks sharing a machine this keeps each rank's communication threads on the rank's
    own cores: unpinned, a woken gloo thread can wait milliseconds behind another rank's
    compute, and every all-to-all pays for it. Does nothing with fewer CPUs than local ranks.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // local_world
    if share == 0:
        return cpus
    mine = cpus[local_rank * share : (local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), len(mine))))
    return mine


# glibc's mallopt parameters (malloc.h) and what `tune_malloc` sets them to
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))


def tune_malloc() -> bool:
    """Keep glibc's malloc from handing memory back to the OS between training steps.

    A training step allocates and frees tensors of several MiB (the looked-up rows, the loss,
    autograd's gradients, the exchanges' rows). Under glibc's default, adaptive thresholds such
    blocks keep going back to the OS and coming back as fresh pages, each page a fault: at
    10M x 128 and 16,384 ids per rank a rank of ours took 450-3,500 page faults and 1-5 ms of
    system time per 12-14 ms step, and its steps took 6-26% less time with this
    (docs/benchmarks.md, "The allocator").

    It calls glibc's ``mallopt``: blocks below 32 MiB come from the heap (``M_MMAP_THRESHOLD``),
    the heap keeps up to 1 GiB free at its top (``M_TRIM_THRESHOLD``) and grows 64 MiB at a time
    (``M_TOP_PAD``) -- what ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
    MALLOC_TOP_PAD_=67108864`` in the environment do before a process starts (this overrides
    those variables if set).

    Costs: process-wide, lasting and not undone; memory a process freed stays with it, so its
    resident size stays near its peak (per rank on a machine; the 1 GiB trim threshold bounds
    only the free top of the main heap: blocks freed below a live one, and other threads'
    arenas, stay too), and processes forked later (DataLoader workers) inherit the setting.
    Call it once, early (``init_distributed(tune_malloc=True)`` calls it, also when the group
    already exists).

    Returns True when glibc accepted all three settings; False where the C library has no
    ``mallopt`` (nothing changed) or refused one (the others stay applied). True says nothing
    about another allocator preloaded with ``LD_PRELOAD`` (jemalloc, tcmalloc): glibc's
    settings do not reach it; tune that allocator instead (jemalloc, e.g.:
    ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``). Local, no collective.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS])


_tune_malloc = tune_malloc  # for init_distributed, whose flag has the function's name


def resolve_group(process_group, owner: str):
    """(group, rank in it, its size) for a module built on ``process_group`` (None: the world).
    RuntimeError naming ``owner`` if torch.distributed is not initialised."""
    if not dist.is_initialized():
        raise RuntimeError(
            f"{owner} needs torch.distributed: call torch.distributed.init_process_group "
            "(or sharded_embedding.init_distributed()) first, e.g. under torchrun"
        )
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def default_device(group) -> torch.device:
    """``cuda:LOCAL_RANK`` when the group runs nccl, else the CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def collective_device(group) -> torch.device:
    """Where small host-side collectives of ``group`` run: the CPU when the group has gloo
    (alone or beside nccl), else the current CUDA device."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_host(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce a small CPU tensor on any backend; returns the result on the CPU."""
    if dist.get_world_size(group) == 1:
        return tensor
    moved = tensor.to(collective_device(group))
    dist.all_reduce(moved, op=op, group=group)
    return moved.cpu()


def all_to_all_ragged(send: torch.Tensor, send_counts: list[int], group=None) -> tuple[torch.Tensor, list[int]]:
    """Rows ``send[start_r : start_r + send_counts[r]]`` go to rank ``r`` (rows along dim 0, in
    rank order). Returns what arrived, in rank order, and how many rows came from each rank.

    Collective: ``all_to_all_single`` of the counts, then ``all_to_all_single`` of the rows with
    uneven splits. Runs where the group's host collectives run (`collective_device`).
    """
    world = dist.get_world_size(group)
    if world == 1:
        return send, [send.shape[0]]
    device = collective_device(group)
    counts = torch.tensor(send_counts, dtype=torch.int64, device=device)
    arriving = torch.empty_like(counts)
    dist.all_to_all_single(arriving, counts, group=group)  # counts
    recv_counts = arriving.tolist()
    recv = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype, device=device)
    dist.all_to_all_single(recv, send.to(device), recv_counts, list(send_counts), group=group)  # rows
    return recv.to(send.device), recv_counts


def all_gather_ragged(tensor: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``tensor`` (any number of rows along dim 0) concatenated in rank order, and
    the row count of each. Collective: an all-to-all of counts and one of rows (`all_to_all_ragged`,
    each rank sending its rows to every rank: no padding to the largest)."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor, [tensor.shape[0]]
    return all_to_all_ragged(tensor.repeat(world, *([1] * (tensor.dim() - 1))), [tensor.shape[0]] * world, group)


def group_ranks(group) -> list[int]:
    """Global ranks of ``group``'s members, in group-rank order."""
    return dist.get_process_group_ranks(group)


_SUBGROUPS: dict[tuple[int, tuple[int, ...]], dist.ProcessGroup] = {}


def subgroup(parent, ranks: tuple[int, ...]):
    """The process group of ``ranks`` (group ranks of ``parent``), created once per process.

    Collective over the WORLD group when the set is new: torch's ``new_group`` must be
    called by every rank of the world, members or not, and in the same order; callers walk
    `PagePlan.mirror_sets`, whose order is global. (``use_local_synchronization=True`` would
    spare non-members, but in torch 2.13 it names groups by the count of groups each rank
    already made, so members with different histories wait on each other forever.)
    Returns ``None`` on ranks outside the set. A set equal to the parent is the parent.
    """
    members = group_ranks(parent)
    if len(ranks) == len(members):
        return parent
    global_ranks = tuple(members[r] for r in ranks)
    key = (id(dist.group.WORLD), global_ranks)  # a new world (re-init) gets new subgroups
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = dist.new_group(list(global_ranks))
    return _SUBGROUPS[key] if dist.get_rank() in global_ranks else None


def check_agreement(group, fingerprint: str, error: str | None,
                    device: torch.device) -> tuple[list[tuple[int, str]], list[str] | None]:
    """Did every rank of ``group`` reach the same ``fingerprint`` with no error?

    Returns ``([], None)`` if so, else every rank's errors as ``(rank, text)`` and, if there
    are none but the fingerprints differ, every rank's fingerprint: the same answer on every
    rank. One all-gather on the good path; one or two more, taken by all ranks together,
    otherwise.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return ([(0, error)] if error is not None else []), None
    digest = int(hashlib.blake2b(fingerprint.encode(), digest_size=7).hexdigest(), 16) if error is None else -1
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_single(every, mine, group=group)
    digests = every.tolist()
    if all(d == digests[0] and d != -1 for d in digests):
        return [], None
    reports = all_gather_strings(error if error is not None else "", group, device)
    errors = [(r, e) for r, e in enumerate(reports) if e]
    if errors:
        return errors, None
    return [], all_gather_strings(fingerprint, group, device)


def agree_or_raise(group, what: str, fingerprint: str | dict, error: str | None,
                   device: torch.device | None = None, exception: type[ValueError] = ValueError) -> None:
    """Check that every rank of ``group`` reached the same ``fingerprint`` with no error
    (`check_agreement`); otherwise every rank raises the same ValueError (``exception``, a
    subclass, where some rank had an ``error``). A dict fingerprint (argument name -> text) lets
    the error name the arguments that differ and each rank's value. ``device``: where the
    check's tensors go (default: `collective_device`)."""
    device = device if device is not None and device.type in ("cpu", "cuda") else collective_device(group)
    named = fingerprint if isinstance(fingerprint, dict) else None
    text = json.dumps(named, sort_keys=True) if named is not None else fingerprint
    errors, fingerprints = check_agreement(group, text, error, device)
    if errors:
        if dist.get_world_size(group) == 1:
            raise exception(errors[0][1])
        texts = {e for _, e in errors}
        if len(errors) == dist.get_world_size(group) and len(texts) == 1:
            raise exception(f"{what}: {texts.pop()}")  # every rank found the same
        detail = "; ".join(f"rank {r}: {e}" for r, e in errors)
        raise exception(f"{what}: {detail}")
    if fingerprints is not None:
        if named is not None:
            every = [json.loads(f) for f in fingerprints]
            differ = [k for k in sorted(set().union(*every)) if len({str(f.get(k)) for f in every}) > 1]
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}: {f.get(k)}" for r, f in enumerate(every))
                               for k in differ)
        else:
            detail = ", ".join(f"rank {r}: {f}" for r, f in enumerate(fingerprints))
        raise ValueError(f"{what}: ranks were given different arguments: {detail}")


def all_gather_strings(text: str, group=None, device: torch.device | None = None) -> list[str]:
    """Every rank's ``text`` (collective: two all-gathers). Plain UTF-8 bytes in tensors:
    nothing is unpickled, and unlike ``all_gather_object`` it needs no numpy."""
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return [text]
    device = device if device is not None else collective_device(group)
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_single(sizes, size, group=group)
    sizes = sizes.tolist()
    padded = torch.zeros(max(max(sizes), 1), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data.to(device)
    every = torch.empty(world * padded.numel(), dtype=torch.uint8, device=device)
    all_gather_single(every, padded, group=group)
    rows = every.cpu().view(world, -1)
    return [ctypes.string_at(rows[r].data_ptr(), n).decode() for r, n in enumerate(sizes)]


def finish(exit_code: int = 0) -> None:
    """End a torchrun worker cleanly: flush, leave the process group, and exit at once.

    torch 2.13's CPU build can abort in static destructors at interpreter exit
    ("terminate called without an active exception", SIGABRT) after all work is done,
    which makes torchrun report a failure. Flushing our outputs and leaving through
    ``os._exit`` skips that teardown; everything the program wrote is already on disk.
    """
    try:
        _SUBGROUPS.clear()
        from .transport import close_transports

        close_transports()
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
