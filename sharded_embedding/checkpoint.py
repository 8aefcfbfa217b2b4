"""Distributed checkpoints of sharded tables that load into any world size, placement or page size.

`ShardedEmbedding.state_dict()` describes the table (and its fused optimizer's state) as
``torch.distributed`` ShardedTensors of the *global* shape whose local shards are this rank's
primary pages, views of its storage, each at its global row offset. So
``torch.distributed.checkpoint`` (DCP) writes every row exactly once (mirrors are not written
twice) and, on load, reads for each rank exactly the rows its own pages cover, whatever plan
wrote them. Building the state dict needs no communication: every rank knows the plan.
After a load, mirrored pages are copied from their primary to the other replicas.

``torch.save`` of a state dict pickles each of these tensors as plain data (`TableShards`:
an ``OrderedDict`` of this rank's row ranges and their tensors), so a per-rank file loads with
``torch.load(weights_only=True)`` and back into a table of the same layout.

`CheckpointManager` keeps a training job's checkpoints: each table's rows (and per-row optimizer
state) as one ``.npy`` per tensor, written page by page by every rank in place
(`export.export_table`) and read back the same way into any layout; per-rank loop state in
small files. DCP would write one chunk per run of consecutive primary pages, and a round-robin
table has a run per page: about 2 ms each here, over a minute for the 39k pages a rank holds of
two 10M-word tables, against seconds for the page-wise files. Saves are atomic: a save goes to
``step_N.partial/`` and becomes ``step_N/`` (one rename, after every rank has written and a
``COMPLETE`` marker is on disk); a crash or kill mid-save never touches the last good one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import agree_or_raise, all_gather_strings, collective_device, group_ranks

log = logging.getLogger("sharded_embedding.checkpoint")

__all__ = ["sharded_rows", "loaded_rows_copier", "CheckpointManager", "CheckpointError", "ROWS_FORMAT"]

ROWS_FORMAT = "sharded_embedding.rows.v1"  # what a pickled TableShards becomes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, damaged, or from another kind of run."""


def _primary_runs(plan, rank: int):
    """Runs of consecutive pages whose primary is ``rank``: (first page, last page + 1)."""
    pages = plan.primary_pages(rank).tolist()
    runs, start = [], None
    for i, p in enumerate(pages):
        if start is None:
            start = p
        if i + 1 == len(pages) or pages[i + 1] != p + 1:
            runs.append((start, p + 1))
            start = None
    return runs


def _run_rows(plan, first: int, stop: int) -> tuple[int, int]:
    start = plan.page_start(first)
    return start, plan.page_start(stop - 1) + plan.page_rows(stop - 1) - start


def _table_shards_class():
    """`TableShards`, defined on first use: torch.distributed._shard is imported only then."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    global _TABLE_SHARDS
    if _TABLE_SHARDS is None:

        class TableShards(ShardedTensor):
            """A ShardedTensor of a table's rows that pickles as plain data: an ``OrderedDict``
            ``{"format": ROWS_FORMAT, "size": [global shape], "row_ranges": int64 [k, 2] of
            (first row, rows), "shards": [k tensors]}`` of this rank's shards. So
            ``torch.save(model.state_dict())`` per rank gives a file that
            ``torch.load(weights_only=True)`` reads (the ShardedTensor class is not on its
            allow-list) and `ShardedEmbedding.load_state_dict` takes back on the same layout.
            The shards are views of the storage: torch.save writes that storage once."""

            def local_shards(self):
                # torch.distributed.checkpoint.state_dict's full_state_dict=True gathers a
                # ShardedTensor as if rank r held rows [r * c, (r + 1) * c) in its first shard
                # (`_all_gather_sharded_tensor`): with pages it returned wrong rows or broke gloo.
                # Every rank reaches it for the same key in the same order: refuse there, before
                # its all-gather.
                if sys._getframe(1).f_code.co_name == "_all_gather_sharded_tensor":
                    raise RuntimeError(FULL_STATE_DICT_REFUSED)
                return super().local_shards()

            def __reduce_ex__(self, protocol):
                shards = [sh for sh in self.local_shards() if sh.metadata.shard_sizes[0]]  # not the empty one
                ranges = torch.tensor([[sh.metadata.shard_offsets[0], sh.metadata.shard_sizes[0]] for sh in shards],
                                      dtype=torch.int64).reshape(-1, 2)
                items = [("format", ROWS_FORMAT), ("size", list(self.metadata().size)), ("row_ranges", ranges),
                         ("shards", [sh.tensor for sh in shards])]
                return (OrderedDict, (items,))

        _TABLE_SHARDS = TableShards
    return _TABLE_SHARDS


_TABLE_SHARDS = None

FULL_STATE_DICT_REFUSED = (
    "sharded-embedding: a table's state dict cannot be gathered with torch's "
    "StateDictOptions(full_state_dict=True): torch's gather assumes that rank r holds rows "
    "[r * c, (r + 1) * c) of every ShardedTensor, and a table's pages are laid out otherwise (it would "
    "return wrong rows). For full tensors use emb.full_table() (collective, every rank gets the table), "
    "or dcp.save the sharded state dict and read it with dcp.load(..., no_dist=True). Nothing was "
    "gathered."
)


def sharded_rows(emb, storage: torch.Tensor):
    """``storage`` (laid out like ``emb``'s local rows: ``[rows]`` or ``[rows, dim]``) as a
    ShardedTensor (`TableShards`) of the global shape, one shard per run of primary pages,
    each placed on the global rank of its owner (the table's group may be part of the world).
    A rank without primary rows holds one empty shard (0 rows, at the end): torch's DCP
    (2.13, `_flatten_sharded_tensors`) drops a ShardedTensor with no local shard from the
    rank's load plan, counts its key missing and retries with its pre-2.4 key format, which
    fails on any list in the state dict ("Missing key in checkpoint state_dict:
    optim.param_groups"; pytorch/pytorch#163480 proposed the fix there)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    plan, rank = emb.plan, emb.rank
    tail = list(storage.shape[1:])
    slot_of = {p: s for s, p in enumerate(emb._local_page_ids)}
    device = storage.device
    # The plan speaks of ranks of the table's group; a shard's placement names a global rank.
    global_rank = group_ranks(emb.process_group)
    shards_md, local = [], []
    for r in range(emb.world_size):
        where = f"rank:{global_rank[r]}/{device}" if r == rank else f"rank:{global_rank[r]}/{device.type}"
        runs = [(_run_rows(plan, first, stop), slot_of.get(first)) for first, stop in _primary_runs(plan, r)]
        # No primary rows: one empty shard, at the end (DCP keys a chunk by its offset: at row 0
        # it would stand for the real shard that starts there and drop it from the checkpoint).
        for (start, rows), slot in runs or [((plan.num_embeddings, 0), None)]:
            md = ShardMetadata(shard_offsets=[start] + [0] * len(tail), shard_sizes=[rows] + tail, placement=where)
            shards_md.append(md)
            if r == rank:
                at = slot * plan.page_size if rows else 0
                local.append(Shard(storage[at : at + rows], md))
    meta = ShardedTensorMetadata(
        shards_metadata=shards_md,
        size=torch.Size([plan.num_embeddings] + tail),
        tensor_properties=TensorProperties(dtype=storage.dtype, layout=torch.strided, requires_grad=False,
                                           memory_format=torch.contiguous_format, pin_memory=False),
    )
    st = ShardedTensor._init_from_local_shards_and_global_metadata(local, meta, process_group=emb.process_group)
    st.__class__ = _table_shards_class()  # torch builds a plain ShardedTensor whatever the class asked
    return st


def loaded_rows_copier(emb, storage: torch.Tensor, loaded, name: str):
    """Check a loaded state against ``storage`` (``emb``'s local layout) and return a function
    that copies it in; raises ValueError (nothing copied) if it does not fit. Accepts:
    a ShardedTensor whose shards are this rank's primary runs (what `sharded_rows` made and
    DCP filled, often in place already); what a pickled `TableShards` loads as (a per-rank
    ``torch.save`` file, same layout only); or a full ``[num_embeddings, ...]`` tensor."""
    plan = emb.plan
    slot_of = {p: s for s, p in enumerate(emb._local_page_ids)}
    want = (plan.num_embeddings, *storage.shape[1:])

    def target(start: int, rows: int) -> torch.Tensor:
        at = slot_of[start // plan.page_size] * plan.page_size
        return storage[at : at + rows]

    if hasattr(loaded, "local_shards"):
        if tuple(loaded.size()) != want:
            raise ValueError(f"{name}: a state of shape {tuple(loaded.size())} does not fit a table of {want}")
        parts = []
        for shard in loaded.local_shards():
            start, rows = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
            if rows == 0:  # a rank without primary rows holds an empty shard
                continue
            page = start // plan.page_size
            if page not in slot_of or plan.page_owners(page)[0] != emb.rank:
                raise ValueError(f"{name}: rows {start}.. are not a primary page of rank {emb.rank} here: "
                                 "load a state dict made by this table's state_dict()")
            parts.append((target(start, rows), shard.tensor))
    elif isinstance(loaded, Mapping) and loaded.get("format") == ROWS_FORMAT:
        size, ranges, tensors = list(loaded["size"]), torch.as_tensor(loaded["row_ranges"]).tolist(), loaded["shards"]
        if tuple(size) != want:
            raise ValueError(f"{name}: a state of shape {tuple(size)} does not fit a table of {want}")
        mine = [list(_run_rows(plan, first, stop)) for first, stop in _primary_runs(plan, emb.rank)]
        if ranges != mine:
            raise ValueError(
                f"{name}: this per-rank state (torch.save) holds rows {_ranges_text(ranges)}, but rank "
                f"{emb.rank} of this table holds the primary rows {_ranges_text(mine)}: a per-rank file "
                "loads only into the same world size, placement and page size, on the rank that saved it. "
                "Use torch.distributed.checkpoint (dcp.save / dcp.load) to load into another layout"
            )
        for (start, rows), t in zip(ranges, tensors):
            if tuple(t.shape) != (rows, *want[1:]):
                raise ValueError(f"{name}: rows {start}..{start + rows - 1} come with a tensor of shape "
                                 f"{tuple(t.shape)}")
        parts = [(target(start, rows), t) for (start, rows), t in zip(ranges, tensors)]
    else:
        try:
            full = torch.as_tensor(loaded)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name}: expected a tensor or a state made by state_dict(), got "
                             f"{type(loaded).__name__} ({e})") from e
        if tuple(full.shape) != want:
            raise ValueError(f"{name}: expected shape {want}, got {tuple(full.shape)}")
        parts = []
        for p, s in slot_of.items():
            start, rows = plan.page_start(p), plan.page_rows(p)
            parts.append((storage[s * plan.page_size : s * plan.page_size + rows], full[start : start + rows]))

    @torch.no_grad()
    def copy_in():
        for dst, src in parts:
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)

    return copy_in


def _ranges_text(ranges) -> str:
    return ", ".join(f"{a}..{a + n - 1}" for a, n in ranges) if ranges else "none"


def sync_mirrors(emb, storages: list[torch.Tensor]) -> None:
    """Copy every mirrored page from its primary to its other replicas (collective: one
    broadcast per mirror set and primary, in the plan's global order)."""
    from .distributed import subgroup

    plan = emb.plan
    slot_of = {p: s for s, p in enumerate(emb._local_page_ids)}
    for ranks in plan.mirror_sets():
        pg = subgroup(emb.process_group, ranks)
        if emb.rank not in ranks:
            continue
        pages = [p for p in range(plan.num_pages) if tuple(sorted(plan.page_owners(p))) == ranks]
        for primary in sorted({plan.page_owners(p)[0] for p in pages}):
            mine = [p for p in pages if plan.page_owners(p)[0] == primary]
            for storage in storages:
                parts = [storage[slot_of[p] * plan.page_size : slot_of[p] * plan.page_size + plan.page_rows(p)]
                         for p in mine]
                buf = torch.cat(parts)
                dist.broadcast(buf, src=dist.get_global_rank(emb.process_group, primary), group=pg)
                at = 0
                for part in parts:
                    part.copy_(buf[at : at + part.shape[0]])
                    at += part.shape[0]


class CheckpointManager:
    """Atomic step checkpoints in ``directory`` (collective: every rank of ``group`` calls)."""

    MARKER = "COMPLETE"

    def __init__(self, directory: str | os.PathLike, keep: int = 2, group=None):
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)

    def _steps(self) -> list[tuple[int, Path]]:
        found = []
        if self.directory.is_dir():
            for d in self.directory.iterdir():
                if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit() and (d / self.MARKER).exists():
                    found.append((int(d.name[5:]), d))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        steps = self._steps()
        return steps[-1][1] if steps else None

    def save(self, step: int, tables: dict, rank_state: dict, info: dict, progress=lambda rows: None) -> Path:
        """Write every `ShardedEmbedding` of ``tables`` (name -> table; its rows and fused
        optimizer state) and ``rank_state`` (plain tensors and numbers, one file per rank) as
        checkpoint ``step``; returns its folder. ``progress(rows)`` follows the table writes.
        Collective; raises on every rank alike."""
        from .export import export_table

        final = self.directory / f"step_{step:09d}"
        partial = final.with_name(final.name + ".partial")
        device, error = collective_device(self.group), None
        if self.rank == 0:
            try:
                shutil.rmtree(partial, ignore_errors=True)  # a save killed before
                partial.mkdir(parents=True)
            except OSError as e:
                error = f"cannot create {partial}: {e}"
        agree_or_raise(self.group, f"checkpoint {final.name}", "created", error, device)
        steps, checksums = {}, {}
        for name, emb in tables.items():
            for key, storage in emb._row_states().items():
                crcs = export_table(emb, str(partial / f"{name}.{key}.npy"), progress, storage.detach())  # raises everywhere
                checksums[f"{name}.{key}"] = {"page_size": emb.plan.page_size, "crc32": crcs}
            if emb.optimizer is not None:
                steps[name] = emb.optimizer.step.detach().cpu().clone()
        try:
            torch.save({"state": rank_state, "optimizer_steps": steps}, partial / f"rank{self.rank}.pt")
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: every rank must learn it
            error = f"rank {self.rank} could not write its state: {type(e).__name__}: {e}"
        agree_or_raise(self.group, f"checkpoint {final.name}", "written", error, device)  # every rank wrote
        error = None
        if self.rank == 0:
            try:
                self._finalize(partial, final, step, {**info, "checksums": checksums, "checksummed": True})
            except OSError as e:
                error = f"could not complete {final}: {e}"
        agree_or_raise(self.group, f"checkpoint {final.name}", "complete", error, device)
        return final

    def _finalize(self, partial: Path, final: Path, step: int, info: dict) -> None:
        """Rank 0: mark the checkpoint complete, make it appear atomically, prune old ones."""
        with open(partial / self.MARKER, "w") as f:
            json.dump({"step": step, **info}, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)  # the checkpoint appears whole or not at all
        _fsync_dir(self.directory)
        for _, old in self._steps()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob("step_*.partial"):  # left by saves that were killed
            shutil.rmtree(stale, ignore_errors=True)

    def info(self, path: Path) -> dict:
        """What the checkpoint's ``COMPLETE`` marker says (its step and the caller's info)."""
        try:
            info = json.loads((path / self.MARKER).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a complete checkpoint: its {self.MARKER} marker cannot be read "
                                  f"({e}){_ASIDE}") from e
        if not isinstance(info, dict) or type(info.get("step")) is not int:
            raise CheckpointError(f"{path} is not a complete checkpoint (its {self.MARKER} marker is not what a save "
                                  f"writes: {str(info)[:200]}){_ASIDE}")
        return info

    def load(self, path: Path, tables: dict) -> tuple[dict, dict]:
        """Fill the tables of ``tables`` (as given to `save`, any placement or page size) from
        checkpoint ``path``; returns (this rank's rank_state, the checkpoint's info). Nothing is
        unpickled: rank files load with ``weights_only=True``. A missing, truncated, damaged or
        foreign file raises CheckpointError on every rank, all files checked before any row
        changes: also every page's bytes against the CRC-32 written with it (each rank reads
        1/world of each file for that, whatever the layout loaded into)."""
        from .export import checksum_problem, import_table, npy_problem

        info = self.info(path)
        world = dist.get_world_size(self.group)
        if info.get("world_size") != world:
            raise CheckpointError(f"{path} was written by {info.get('world_size')} ranks; this run has {world}. "
                                  "Training state (data order, random streams) resumes on the same world size; "
                                  "the tables alone load anywhere (sharded_embedding.export.import_table)")
        state, steps, error = None, {}, ""  # the small rank files first: a bad one changes no row
        try:
            saved = torch.load(path / f"rank{self.rank}.pt", weights_only=True)
            if not isinstance(saved, dict):
                raise ValueError(f"holds a {type(saved).__name__}, not what a save writes")
            state = saved["state"]
            for name, emb in tables.items():
                if emb.optimizer is not None:
                    steps[name] = torch.as_tensor(saved["optimizer_steps"][name]).reshape(())
        except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign rank file
            first = (str(e).strip().splitlines() or [""])[0]  # (not torch's advice to unpickle anything)
            error = f"rank {self.rank}: rank{self.rank}.pt is damaged or foreign ({type(e).__name__}: {first})"
        errors = [e for e in all_gather_strings(error, self.group) if e]
        if errors:
            raise CheckpointError(f"checkpoint {path} has unreadable rank files: " + "; ".join(errors) + _ASIDE)
        problems = [npy_problem(emb, str(path / f"{name}.{key}.npy"), storage)
                    for name, emb in tables.items() for key, storage in emb._row_states().items()]
        problems = [e for e in all_gather_strings("; ".join(p for p in problems if p), self.group) if e]
        if problems:  # every file is checked before any row changes
            raise CheckpointError(f"checkpoint {path} could not be read: {problems[0]}{_ASIDE}")
        checksums = info.get("checksums") or {}  # (none in checkpoints written before them)
        if not info.get("checksummed") and self.rank == 0:
            log.warning("%s has no checksums (written before them, or its marker was edited): its pages load "
                        "unchecked", path)
        if info.get("checksummed"):  # written with checksums: every file's, every page's
            torn = [f"{name}.{key}" for name, emb in tables.items() for key in emb._row_states()
                    if not _whole(checksums.get(f"{name}.{key}"), emb.num_embeddings)]
            if torn:
                raise CheckpointError(f"checkpoint {path} could not be read: its {self.MARKER} marker lacks the "
                                      f"checksums of {torn}: the marker is damaged{_ASIDE}")
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        problems = [checksum_problem(str(path / f"{name}.{key}.npy"), checksums[f"{name}.{key}"], rank, world)
                    for name, emb in tables.items() for key in emb._row_states() if f"{name}.{key}" in checksums]
        problems = [e for e in all_gather_strings("; ".join(p for p in problems if p), self.group) if e]
        if problems:  # every page's bytes, each rank a share of them, before any row changes
            raise CheckpointError(f"checkpoint {path} could not be read: {problems[0]}{_ASIDE}")
        for name, emb in tables.items():
            for key, storage in emb._row_states().items():
                try:
                    import_table(emb, str(path / f"{name}.{key}.npy"), storage=storage.data)
                except ValueError as e:
                    raise CheckpointError(f"checkpoint {path} could not be read: {e}{_ASIDE}") from None
        with torch.no_grad():
            for name, step in steps.items():
                tables[name].optimizer.step.copy_(step)
        return state, info


def _whole(entry, rows: int) -> bool:
    """Whether ``entry`` (a file's checksums in a marker) has a CRC-32 for each page of ``rows``."""
    try:
        crcs = entry["crc32"]
        return len(crcs) == -(-rows // int(entry["page_size"])) and all(type(c) is int for c in crcs)
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return False


_ASIDE = (". Move that checkpoint folder away (or rename it to something other than step_<digits>) to resume "
          "from the one before it")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
