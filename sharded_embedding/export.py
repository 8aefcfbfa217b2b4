"""A sharded table in one file, written and read without gathering it on one rank.

- ``.npy`` (`export_table`, `import_table`): rank 0 writes the header and sizes the file,
  then each rank writes its primary pages into a memory map of it at their row offsets; on
  import each rank maps the file and reads only the rows it holds (mirrors included). The
  header is parsed here, so nothing is unpickled and numpy is not needed.
- word2vec text (`write_word2vec`): lines have different lengths, so the ranks agree on each
  page's byte offset (one all-reduce of per-page sizes), then write their pages with pwrite.

The ranks must share the filesystem the path is on (one machine, or a network filesystem).
"""

from __future__ import annotations

import ast
import mmap
import os

import torch
import torch.distributed as dist

from .distributed import agree_or_raise

__all__ = ["export_table", "import_table", "write_word2vec"]

_NPY_MAGIC = b"\x93NUMPY"
_DESCR = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2"}
_DTYPE = {v: k for k, v in _DESCR.items()}


def _npy_header(descr: str, shape: tuple[int, int]) -> bytes:
    """A version 1.0 .npy header, padded so the data starts 64-byte aligned."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
    total = len(_NPY_MAGIC) + 2 + 2 + len(text) + 1
    text += " " * (-total % 64) + "\n"
    return _NPY_MAGIC + b"\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def _read_npy_header(path: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of a .npy file; ValueError saying what is wrong otherwise."""
    with open(path, "rb") as f:
        head = f.read(10)
        if len(head) < 10 or not head.startswith(_NPY_MAGIC):
            raise ValueError(f"{path} is not a .npy file (no NUMPY magic at its start)")
        major = head[6]
        if major == 1:
            size, start = int.from_bytes(head[8:10], "little"), 10
        elif major in (2, 3):
            size, start = int.from_bytes(head[8:10] + f.read(2), "little"), 12
        else:
            raise ValueError(f"{path}: unsupported .npy format version {major}")
        text = f.read(size).decode("latin1")
    try:
        meta = ast.literal_eval(text)  # a dict of literals: nothing is executed or unpickled
        descr, order, shape = meta["descr"], meta["fortran_order"], tuple(meta["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged .npy header ({e})") from e
    if descr not in _DTYPE:
        raise ValueError(f"{path}: dtype {descr!r} is not a float table (expected one of {sorted(_DTYPE)})")
    if order:
        raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
    offset = start + size
    dtype = _DTYPE[descr]
    expected = offset + dtype.itemsize * (shape[0] * shape[1] if len(shape) == 2 else 0)
    if len(shape) == 2 and os.path.getsize(path) < expected:
        raise ValueError(f"{path} is truncated: its header promises {expected} bytes, the file has "
                         f"{os.path.getsize(path)}")
    return dtype, shape, offset


def export_table(emb, path: str) -> None:
    """Write ``emb`` to ``path`` as a [num_embeddings, embedding_dim] .npy (collective)."""
    dtype = emb.weight.dtype if emb.weight.dtype in _DESCR else torch.float32
    shape = (emb.num_embeddings, emb.embedding_dim)
    header = _npy_header(_DESCR[dtype], shape)
    size = len(header) + shape[0] * shape[1] * dtype.itemsize
    error = None
    if emb.rank == 0:
        try:
            with open(path, "wb") as f:
                f.write(header)
                f.truncate(size)
        except OSError as e:
            error = f"cannot create {path}: {e}"
    agree_or_raise(emb.process_group, "export_table", "ok", error, emb.device)  # also: the file exists now
    plan, local = emb.plan, emb.local_pages
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mm:
        row_bytes = shape[1] * dtype.itemsize
        for p in plan.primary_pages(emb.rank).tolist():
            start, rows = plan.page_start(p), plan.page_rows(p)
            view = torch.frombuffer(mm, dtype=dtype, count=rows * shape[1], offset=len(header) + start * row_bytes)
            view.view(rows, shape[1]).copy_(local[p].detach())
            del view
        mm.flush()
    if emb.world_size > 1:
        dist.barrier(group=emb.process_group)  # the file is complete when any rank returns


def import_table(emb, path: str) -> None:
    """Load the rows this rank holds from the .npy at ``path`` (collective)."""
    error = None
    try:
        dtype, shape, offset = _read_npy_header(path)
        if shape != (emb.num_embeddings, emb.embedding_dim):
            raise ValueError(f"{path} holds a table of shape {shape}, this one is "
                             f"{(emb.num_embeddings, emb.embedding_dim)}")
    except (OSError, ValueError) as e:
        error = str(e)
    agree_or_raise(emb.process_group, "import_table", "ok", error, emb.device)
    plan = emb.plan
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm, torch.no_grad():
        row_bytes = shape[1] * dtype.itemsize
        for p, view in emb.local_pages.items():
            start, rows = plan.page_start(p), plan.page_rows(p)
            src = torch.frombuffer(mm, dtype=dtype, count=rows * shape[1], offset=offset + start * row_bytes)
            view.copy_(src.view(rows, shape[1]))
            del src


def _format_rows(words: list[str], rows: torch.Tensor) -> bytes:
    values = rows.detach().float().cpu().tolist()
    return "".join(f"{w} {' '.join(f'{x:.6g}' for x in v)}\n" for w, v in zip(words, values)).encode()


def write_word2vec(emb, words: list[str], path: str) -> None:
    """Write ``emb`` as word2vec text (``"<rows> <dim>"``, then ``word v1 v2 ...`` per row);
    ``words[i]`` names row ``i``. Collective over the table's group; every rank writes its
    primary pages, nobody holds the whole table."""
    if len(words) != emb.num_embeddings:
        raise ValueError(f"write_word2vec: {len(words)} words for a table of {emb.num_embeddings} rows")
    group, rank = emb.process_group, emb.rank
    plan = emb.plan
    local = emb.local_pages
    mine = {}
    for p in plan.primary_pages(rank).tolist():
        start = plan.page_start(p)
        mine[p] = _format_rows(words[start : start + plan.page_rows(p)], local[p])
    header = f"{emb.num_embeddings} {emb.embedding_dim}\n".encode()
    sizes = torch.zeros(plan.num_pages, dtype=torch.int64)
    for p, blob in mine.items():
        sizes[p] = len(blob)
    if rank == 0:
        with open(path, "wb") as f:
            f.write(header)
    if emb.world_size > 1:
        sizes = sizes.to(emb.device)
        dist.all_reduce(sizes, group=group)  # also orders the file's creation before the writes
        sizes = sizes.cpu()
    offsets = (torch.cumsum(sizes, 0) - sizes + len(header)).tolist()
    fd = os.open(path, os.O_WRONLY)
    try:
        for p, blob in mine.items():
            os.pwrite(fd, blob, offsets[p])
    finally:
        os.close(fd)
    if emb.world_size > 1:
        dist.barrier(group=group)  # the file is complete when any rank returns
