"""A sharded table in one file, written and read without gathering it on one rank.

`write_pages` is the one mechanism every format uses: the file is a header followed by the
table's pages in page order, each page encoded by the caller (raw rows for ``.npy``, word2vec
rows in the training app). The ranks agree on every page's byte size (one all-reduce), rank 0
creates the file under a temporary name and reserves its whole size, every rank writes its
primary pages at their offsets with ``pwrite``, and rank 0 renames the file when every rank has
finished. So:

- nobody holds more than one page of it, so tables larger than one machine export as long as
  the ranks share the filesystem;
- a full disk or any I/O error is an ``OSError`` raised on every rank together (ordinary
  writes, never a memory map that would fault with SIGBUS), and what was written is removed;
- the file appears whole, under its name, or not at all.

`import_table` reads a ``.npy`` the same way: each rank ``pread``s only the rows it holds.
The ``.npy`` header is written and parsed here, so nothing is unpickled and numpy is not needed.
"""

from __future__ import annotations

import ast
import ctypes
import math
import os
import shutil
import zlib
from collections.abc import Callable

import torch

from .distributed import agree_or_raise, all_reduce_host

__all__ = ["export_table", "import_table", "npy_problem", "write_pages", "local_views", "tensor_bytes"]

_NPY_MAGIC = b"\x93NUMPY"
_DESCR = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2"}
_DTYPE = {v: k for k, v in _DESCR.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy. The view keeps ``t`` alive: a
    temporary (a page converted to float32, a CPU copy of a CUDA page) is not freed, and its
    memory reused, while its bytes are still being written."""
    if not (t.is_contiguous() and t.device.type == "cpu"):
        raise ValueError(f"tensor_bytes needs a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    buf = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    buf._tensor = t  # the memoryview holds buf, buf holds the tensor
    return memoryview(buf).cast("B")


def local_views(emb, storage: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Page id -> this rank's rows of that page in ``storage``, a tensor laid out like the local
    rows (default: the table itself; or per-row optimizer state)."""
    storage = emb.weight if storage is None else storage
    ps = emb.page_size
    return {p: storage[s * ps : s * ps + emb.plan.page_rows(p)] for s, p in enumerate(emb._local_page_ids)}


def write_pages(emb, path: str, header: bytes, page_size: Callable[[int], int],
                encode: Callable[[int, torch.Tensor], bytes | memoryview],
                progress: Callable[[int], None] = lambda rows: None, storage: torch.Tensor | None = None) -> list[int]:
    """Write ``header`` then every page of ``emb`` in page order to ``path`` (collective);
    returns every page's CRC-32 (zlib's, of the bytes written for it), the same on every rank.

    ``page_size(p)`` is the byte size of page ``p``; it is asked of the primary owner of each
    page. ``encode(p, rows)`` returns the bytes of page ``p`` from its local rows of
    ``storage`` (default: the table; a ``[rows_in_page, ...]`` view; on CUDA a CPU copy).
    ``progress(rows)`` is called after each page this rank writes.

    Raises ``OSError`` on every rank if any rank cannot write (e.g. no space left: checked
    before anything is written, and again by every write) or if a page's encoding is not the
    size promised for it, leaving no file behind.
    """
    plan, rank, group = emb.plan, emb.rank, emb.process_group
    mine = plan.primary_pages(rank).tolist()
    sizes = torch.zeros(plan.num_pages, dtype=torch.int64)
    for p in mine:
        sizes[p] = page_size(p)
    sizes = all_reduce_host(sizes, group=group)  # every page's size, on every rank
    offsets = (torch.cumsum(sizes, 0) - sizes + len(header)).tolist()
    total = len(header) + int(sizes.sum())
    partial = f"{path}.partial"

    error = _create(path, partial, header, total) if rank == 0 else None
    _agree(emb, "export: creating the file", error, partial)
    error = None
    crcs = torch.zeros(plan.num_pages, dtype=torch.int64)
    try:
        fd = os.open(partial, os.O_WRONLY)
        try:
            local = local_views(emb, storage)
            for p in mine:
                data = memoryview(encode(p, local[p].detach().cpu())).cast("B")
                crcs[p] = zlib.crc32(data)
                if data.nbytes != int(sizes[p]):  # it would overwrite the next page or leave a gap
                    error = (f"rank {rank}: page {p} was encoded to {data.nbytes} bytes, but {int(sizes[p])} were "
                             f"reserved for it in {partial}")
                    break
                _pwrite_all(fd, data, offsets[p])
                progress(plan.page_rows(p))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        error = f"rank {rank} could not write {partial}: {e}"
    _agree(emb, "export: writing the pages", error, partial)
    error = None
    if rank == 0:
        try:
            os.replace(partial, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            error = f"could not rename {partial} to {path}: {e}"
    _agree(emb, "export: completing the file", error, partial)
    return all_reduce_host(crcs, group=group).tolist()  # each page's from its primary owner


def _create(path: str, partial: str, header: bytes, total: int) -> str | None:
    """Rank 0: create the file, reserve ``total`` bytes, write the header. Returns an error."""
    if os.path.lexists(path) and not os.path.isfile(path):
        return f"{path} exists and is not a regular file (a folder, a device, a link?): it is left as it is"
    try:
        f = open(partial, "wb")  # first: a folder that takes no files says so (/proc has "0 free" too)
    except OSError as e:
        return f"cannot create {partial}: {e}"
    try:
        with f:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(partial))).free
            if free < total:
                return (f"not enough space for {partial}: it needs {total:,} bytes and the filesystem has "
                        f"{free:,} free")
            try:
                os.posix_fallocate(f.fileno(), 0, total)  # the blocks are ours, or ENOSPC now
            except OSError as e:
                if e.errno not in (95, 22):  # EOPNOTSUPP/EINVAL: the filesystem cannot reserve
                    raise
                f.truncate(total)
            f.write(header)
    except OSError as e:
        return f"cannot create {partial}: {e}"
    return None


def _agree(emb, what: str, error: str | None, partial: str) -> None:
    """Every rank learns whether every rank succeeded; on failure rank 0 removes the file and
    every rank raises the same OSError."""
    try:
        agree_or_raise(emb.process_group, what, "ok", error, emb.device)
    except ValueError as e:
        if emb.rank == 0:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
        raise OSError(str(e)) from None


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- .npy
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header, padded so the data starts 64-byte aligned."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
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
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"{path}: damaged .npy header ({type(e).__name__}: {e})") from e
    if not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"{path}: damaged .npy header (shape {shape!r} is not a tuple of sizes)")
    if descr not in _DTYPE:
        raise ValueError(f"{path}: dtype {descr!r} is not a float table (expected one of {sorted(_DTYPE)})")
    if order:
        raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
    offset = start + size
    dtype = _DTYPE[descr]
    expected = offset + dtype.itemsize * math.prod(shape)
    if os.path.getsize(path) < expected:
        raise ValueError(f"{path} is truncated: its header promises {expected} bytes, the file has "
                         f"{os.path.getsize(path)}")
    return dtype, shape, offset


def export_table(emb, path: str, progress: Callable[[int], None] = lambda rows: None,
                 storage: torch.Tensor | None = None) -> list[int]:
    """Write ``emb``'s table (or ``storage``, per-row state laid out like the local rows) to
    ``path`` as one .npy of shape ``[num_embeddings, ...]`` (collective; see `write_pages`);
    returns each page's CRC-32. Dtypes .npy has no name for (bfloat16) are written as float32."""
    storage = emb.weight if storage is None else storage
    dtype = storage.dtype if storage.dtype in _DESCR else torch.float32
    tail = tuple(storage.shape[1:])
    row_bytes = math.prod(tail) * dtype.itemsize
    header = _npy_header(_DESCR[dtype], (emb.num_embeddings, *tail))
    return write_pages(emb, path, header, lambda p: emb.plan.page_rows(p) * row_bytes,
                       lambda p, rows: tensor_bytes(rows.to(dtype).contiguous()), progress, storage)


def import_table(emb, path: str, storage: torch.Tensor | None = None) -> None:
    """Load the rows this rank holds from the .npy at ``path`` into the table (or into
    ``storage``, per-row state laid out like the local rows). Collective: a missing, truncated,
    damaged or foreign file, one of another shape, or one whose values the table's narrower
    dtype cannot hold (float64 beyond float32's range) raises ValueError on every rank, the
    checks before any row changes."""
    storage = emb.weight if storage is None else storage
    agree_or_raise(emb.process_group, "import_table", "ok", npy_problem(emb, path, storage), emb.device)
    dtype, shape, offset = _read_npy_header(path)
    if torch.finfo(dtype).max > torch.finfo(storage.dtype).max:
        # A narrowing cast (float64 file, float32 table): refuse values that would become inf
        # before any row changes; this costs a first reading pass, only in this case.
        error = None
        try:
            for p, _, rows in _read_pages(emb, storage, path, dtype, shape, offset):
                converted = rows.to(storage.dtype)
                if not torch.equal(torch.isfinite(converted), torch.isfinite(rows)):
                    row = int((torch.isfinite(rows) & ~torch.isfinite(converted)).any(-1).nonzero()[0, 0])
                    raise ValueError(
                        f"{path} holds {dtype} values beyond {storage.dtype}'s range (largest "
                        f"{torch.finfo(storage.dtype).max:.4g}), e.g. in row {emb.plan.page_start(p) + row}: "
                        f"they would become inf. No row was changed")
        except (OSError, ValueError) as e:
            error = f"rank {emb.rank}: {e}"
        agree_or_raise(emb.process_group, "import_table", "in range", error, emb.device)
    error = None
    try:
        with torch.no_grad():
            for _, view, rows in _read_pages(emb, storage, path, dtype, shape, offset):
                view.copy_(rows)
    except (OSError, ValueError) as e:
        error = f"rank {emb.rank}: {e}"
    agree_or_raise(emb.process_group, "import_table", "read", error, emb.device)


def checksum_problem(path: str, checksums: dict, part: int, parts: int) -> str | None:
    """Check part ``part`` of ``parts`` of the pages of the .npy at ``path`` against the CRC-32
    of each that `export_table` returned when it wrote them (``{"page_size": rows, "crc32":
    [...]}``): pages ``part, part + parts, ...``, whatever the layout they are loaded into (so
    ``parts`` ranks check a file together, each reading 1/parts of it). What is wrong, or None.
    No communication."""
    try:
        dtype, shape, offset = _read_npy_header(path)
        page_size, crcs = int(checksums["page_size"]), checksums["crc32"]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        with open(path, "rb") as f:
            for p in range(part, len(crcs), parts):
                first = p * page_size
                rows = min(page_size, shape[0] - first)
                data = os.pread(f.fileno(), rows * row_bytes, offset + first * row_bytes)
                if len(data) != rows * row_bytes or zlib.crc32(data) != crcs[p]:
                    return (f"{path}: rows {first:,}-{first + rows - 1:,} do not match the checksum written with them: "
                            "the file is damaged")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: its pages could not be checked: {e}"
    return None


def npy_problem(emb, path: str, storage: torch.Tensor | None = None) -> str | None:
    """What keeps the .npy at ``path`` from loading into ``emb`` (or ``storage``, laid out like
    its local rows): missing, truncated, damaged, foreign, another shape; None if nothing. No
    communication."""
    storage = emb.weight if storage is None else storage
    expected = (emb.num_embeddings, *storage.shape[1:])
    try:
        _, shape, _ = _read_npy_header(path)
        if shape != expected:
            raise ValueError(f"{path} holds a table of shape {shape}, this one is {expected}")
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _read_pages(emb, storage: torch.Tensor, path: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int):
    """(page, its view in ``storage``, its rows as stored in the file) for each page this rank
    holds, one at a time."""
    with open(path, "rb") as f:
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        for p, view in local_views(emb, storage).items():
            rows = torch.empty(view.shape, dtype=dtype)
            want = rows.numel() * dtype.itemsize
            got = os.preadv(f.fileno(), [tensor_bytes(rows)], offset + emb.plan.page_start(p) * row_bytes)
            if got != want:
                raise ValueError(f"{path} ended while reading page {p} (it changed while being read?)")
            yield p, view, rows
