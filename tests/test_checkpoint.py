"""Checkpoints that reshard (DCP), table export/import without a gather, atomic step folders."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sharded_embedding import ShardedEmbedding
from sharded_embedding.checkpoint import CheckpointError, CheckpointManager
from tests.harness import run_ranks
from tests.oracle import assert_replicas_identical, make_ids, make_loss_weight, rank_world

N, D = 103, 6
SAVED_PLACEMENT = [(0, 1), 1, (2, 3, 0), 3, 0, (1, 2), 2, (3, 0), 1, 0, (2, 1)]  # 11 pages of 10 on 4 ranks
ADAGRAD = {"name": "adagrad", "lr": 0.3}


def _train_and_save(ckpt: str):
    """4 ranks, mirrored pages, fused Adagrad: train a few steps, save with plain DCP."""
    rank, world = rank_world()
    emb = ShardedEmbedding(N, D, page_size=10, placement=SAVED_PLACEMENT, fused_optimizer=ADAGRAD, seed=3)
    for step in range(3):
        ids = make_ids(N, rank, step, 40, skew="zipf")
        (emb(ids) * make_loss_weight(ids, D, rank, step)).sum().backward()
    dcp.save({"emb": emb.state_dict()}, checkpoint_id=ckpt)
    return emb.full_table(), emb._full(emb.optimizer.sum), int(emb.optimizer.step)


def _load(ckpt: str, page_size: int, placement):
    emb = ShardedEmbedding(N, D, page_size=page_size, placement=placement, fused_optimizer=ADAGRAD, seed=99)
    sd = {"emb": emb.state_dict()}
    dcp.load(sd, checkpoint_id=ckpt)
    emb.load_state_dict(sd["emb"])
    return emb.full_table(), emb._full(emb.optimizer.sum), int(emb.optimizer.step)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    table, state, step = run_ranks(4, _train_and_save, ckpt)[0]
    return ckpt, table, state, step


@pytest.mark.parametrize("world, page_size, placement", [
    (1, 7, "round_robin"),
    (2, 16, "round_robin"),
    (3, 4, "round_robin"),
    (3, 50, [(2, 0), 1, (0, 1, 2)]),
])
def test_dcp_checkpoint_reshards_bitwise(saved, world, page_size, placement):
    ckpt, table, state, step = saved
    for got_table, got_state, got_step in run_ranks(world, _load, ckpt, page_size, placement):
        assert torch.equal(got_table, table)
        assert torch.equal(got_state, state)  # Adagrad's accumulators travel with their rows
        assert got_step == step == 3


def _as_dtensor(emb, storage):
    """The state dict value the package may move to (docs/checkpointing.md): a DTensor of the
    global shape, Shard(0), whose local tensor is a LocalShardsWrapper of this rank's primary
    runs (TorchRec's form for uneven row-wise shards)."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    from sharded_embedding.checkpoint import _primary_runs, _run_rows

    slot_of = {p: s for s, p in enumerate(emb._local_page_ids)}
    shards, offsets = [], []
    for first, stop in _primary_runs(emb.plan, emb.rank):
        start, rows = _run_rows(emb.plan, first, stop)
        shards.append(storage[slot_of[first] * emb.page_size :][:rows])
        offsets.append((start, 0))
    mesh = init_device_mesh("cpu", (emb.world_size,))
    return DTensor.from_local(LocalShardsWrapper(shards, offsets), mesh, (Shard(0),), run_check=False,
                              shape=torch.Size([emb.num_embeddings, storage.shape[1]]), stride=(storage.shape[1], 1))


def _load_as_dtensor(ckpt: str):
    emb = ShardedEmbedding(N, D, page_size=4, fused_optimizer=ADAGRAD, seed=99)
    sd = {"emb.weight": _as_dtensor(emb, emb.weight.detach()), "emb.optimizer.sum": _as_dtensor(emb, emb.optimizer.sum)}
    dcp.load(sd, checkpoint_id=ckpt)
    return emb.full_table(), emb._full(emb.optimizer.sum)


def test_checkpoints_load_into_the_dtensor_form(saved):
    """A checkpoint of today's ShardedTensor state dict loads, resharded, into the DTensor
    (LocalShardsWrapper) form the state dict may move to: old checkpoints would stay readable."""
    ckpt, table, state, _ = saved
    for got_table, got_state in run_ranks(3, _load_as_dtensor, ckpt):
        assert torch.equal(got_table, table) and torch.equal(got_state, state)


def test_mirrored_rows_are_written_once(saved):
    meta = dcp.FileSystemReader(saved[0]).read_metadata()
    chunks = meta.state_dict_metadata["emb.weight"].chunks
    rows = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in chunks)
    assert sum(b - a for a, b in rows) == N  # every row once, mirrors included
    assert all(b == c for (_, b), (c, _) in zip(rows, rows[1:]))  # contiguous, no overlap


def _state_dict_round_trip():
    """load_state_dict takes another table's state dict of the same layout, or full tensors,
    and refuses what does not fit."""
    rank, world = rank_world()
    a = ShardedEmbedding(N, D, page_size=10, placement=[(0, 1)] * 11, seed=1)
    b = ShardedEmbedding(N, D, page_size=10, placement=[(0, 1)] * 11, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.full_table(), a.full_table())
    full = torch.arange(N * D, dtype=torch.float32).view(N, D)
    b.load_state_dict({"weight": full})
    assert torch.equal(b.full_table(), full)
    with pytest.raises(RuntimeError, match="expected shape"):
        b.load_state_dict({"weight": full[:5]})
    with pytest.raises(RuntimeError, match="Missing key"):
        b.load_state_dict({})


def test_state_dict_round_trip_and_errors():
    run_ranks(2, _state_dict_round_trip)


def _export(path: str):
    emb = ShardedEmbedding(N, D, page_size=10, placement=[(0, 2), 1, 2, (1, 0, 2), 0, 1, 2, 0, (2, 1), 1, 0], seed=5)
    emb.export_table(path)
    return emb.full_table()


def _export_bf16(path: str):
    emb = ShardedEmbedding(N, D, page_size=10, dtype=torch.bfloat16, seed=5)
    emb.export_table(path)
    return emb.full_table()


def test_a_bfloat16_table_exports_as_float32_exactly(tmp_path):
    """.npy has no bfloat16: the export widens to float32, which holds every bf16 value exactly."""
    import numpy as np

    path = str(tmp_path / "bf16.npy")
    table = run_ranks(2, _export_bf16, path)[0]
    saved = np.load(path)
    assert saved.dtype == np.float32 and torch.equal(torch.from_numpy(saved), table.float())


def _import(path: str):
    emb = ShardedEmbedding(N, D, page_size=13, placement=[(0, 1), 1, 0, 1, 0, (1, 0), 0, 1], seed=6)
    emb.import_table(path)
    return emb.full_table()


def test_export_on_three_ranks_import_on_two(tmp_path):
    import numpy as np

    path = str(tmp_path / "table.npy")
    table = run_ranks(3, _export, path)[0]
    assert torch.equal(torch.from_numpy(np.load(path)), table)  # a plain .npy
    for got in run_ranks(2, _import, path):
        assert torch.equal(got, table)


def _import_fails(path: str, message: str):
    emb = ShardedEmbedding(N, D, page_size=10)
    with pytest.raises(ValueError, match=message):
        emb.import_table(path)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is truncated: its header promises"),
    ("foreign", "is not a .npy file"),
    ("shape", r"holds a table of shape \(103, 5\)"),
    ("missing", "No such file"),
    ("damaged", r"damaged .npy header \(SyntaxError"),
    ("not_a_size", r"damaged .npy header \(shape \(103.0, 6\) is not a tuple of sizes\)"),
    ("integers", "dtype '<i4' is not a float table"),
    ("big_endian", "dtype '>f4' is not a float table"),
    ("fortran", "Fortran-ordered arrays are not supported"),
    ("version", "unsupported .npy format version 9"),
])
def test_import_of_a_bad_file_fails_on_every_rank(tmp_path, kind, message):
    import numpy as np

    path = tmp_path / "t.npy"
    table = np.zeros((N, D), dtype=np.float32)
    if kind == "truncated":
        np.save(path, table)
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "foreign":
        path.write_text("word 0.1 0.2\n")
    elif kind == "shape":
        np.save(path, np.zeros((N, 5), dtype=np.float32))
    elif kind in ("damaged", "not_a_size"):
        np.save(path, table)
        data = path.read_bytes()
        wrong = b"{'descr': '<f4', 'fortran_order': False, 'shape': (103" if kind == "damaged" else \
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (103.0, 6), }"
        path.write_bytes(data.replace(b"{'descr': '<f4', 'fortran_order': False, 'shape': (103, 6), }", wrong))
    elif kind == "integers":
        np.save(path, table.astype(np.int32))
    elif kind == "big_endian":
        np.save(path, table.astype(">f4"))
    elif kind == "fortran":
        np.save(path, np.asfortranarray(table))
    elif kind == "version":
        np.save(path, table)
        data = bytearray(path.read_bytes())
        data[6] = 9
        path.write_bytes(bytes(data))
    run_ranks(2, _import_fails, str(path), message)


def _import_narrowing(path: str, fits: bool):
    """A float64 file into a float32 table: rounded if every value fits float32's range; if one
    does not, it would become inf: every rank refuses before any row changes."""
    import numpy as np

    emb = ShardedEmbedding(N, D, page_size=10, seed=4)
    before = emb.full_table().clone()
    table = torch.from_numpy(np.load(path))
    if fits:
        emb.import_table(path)
        assert torch.equal(emb.full_table(), table.float())
        return
    with pytest.raises(ValueError, match=r"holds torch.float64 values beyond torch.float32's range .* row 97"):
        emb.import_table(path)
    assert torch.equal(emb.full_table(), before)


@pytest.mark.parametrize("fits", [True, False])
def test_an_import_that_would_overflow_the_tables_dtype_is_refused(tmp_path, fits):
    import numpy as np

    table = np.random.default_rng(0).standard_normal((N, D)) * 1e30
    if not fits:
        table[97, 2] = 1e39  # a finite float64 beyond float32's 3.4e38
    np.save(tmp_path / "t.npy", table)
    run_ranks(2, _import_narrowing, str(tmp_path / "t.npy"), fits)


def _export_encoding_the_wrong_size(path: str):
    """write_pages checks that every page is encoded to the bytes reserved for it (a text
    encoder whose numbers come out longer than promised would overwrite the next page)."""
    from sharded_embedding.export import write_pages

    rank, _ = rank_world()
    emb = ShardedEmbedding(N, D, page_size=10)

    def encode(p, rows):
        return b"x" * (emb.plan.page_rows(p) + (1 if rank == 1 and p == 5 else 0))

    with pytest.raises(OSError, match="rank 1: page 5 was encoded to 11 bytes, but 10 were reserved for it"):
        write_pages(emb, path, b"header", lambda p: emb.plan.page_rows(p), encode)
    dist.barrier()
    assert not os.path.exists(path) and not os.path.exists(path + ".partial")


def test_a_page_encoded_to_another_size_than_promised_fails_on_every_rank(tmp_path):
    run_ranks(2, _export_encoding_the_wrong_size, str(tmp_path / "t.bin"))


class Payload:
    """Unpickling this would run code: a weights-only load must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/sharded_embedding_pwned",))


def _manager(directory: str, case: str):
    rank, world = rank_world()
    emb = ShardedEmbedding(N, D, page_size=10, fused_optimizer={"name": "rowwise_adagrad", "lr": 0.1})
    for step in range(2):
        ids = make_ids(N, rank, step, 30)
        (emb(ids) * make_loss_weight(ids, D, rank, step)).sum().backward()
    table, state = emb.full_table(), emb._full(emb.optimizer.sum)
    manager = CheckpointManager(directory, keep=2)
    first = manager.save(1, {"emb": emb}, {"x": torch.tensor([rank])}, {"world_size": world})
    assert manager.latest() == first and (first / "emb.weight.npy").exists() and (first / "emb.optimizer.sum.npy").exists()
    if case == "failed_save":
        with pytest.raises(Exception):  # a save that dies half way (here: an unpicklable rank state)
            manager.save(2, {"emb": emb}, {"x": lambda: 0}, {"world_size": world})
        assert manager.latest() == first  # the last good checkpoint is untouched
        assert (Path(directory) / "step_000000002.partial").exists()  # what the failed save left
        other = ShardedEmbedding(N, D, page_size=7, placement=[(0, 1)] + [r % world for r in range(1, 15)],
                                 fused_optimizer={"name": "rowwise_adagrad", "lr": 0.1}, seed=5)
        rank_state, info = manager.load(manager.latest(), {"emb": other})  # another page size and placement
        assert int(rank_state["x"]) == rank and info["step"] == 1
        assert torch.equal(other.full_table(), table) and torch.equal(other._full(other.optimizer.sum), state)
        assert int(other.optimizer.step) == 2
        assert_replicas_identical(other)
        for step in (3, 4, 5):
            manager.save(step, {"emb": emb}, {}, {"world_size": world})
        assert [p.name for p in sorted(Path(directory).iterdir())] == ["step_000000004", "step_000000005"]
    elif case == "malicious_rank_file":
        if rank == 1:
            with open(first / "rank1.pt", "wb") as f:
                pickle.dump(Payload(), f)
        dist.barrier()
        with pytest.raises(CheckpointError, match=r"rank 1: rank1.pt is damaged or foreign \(UnpicklingError"):
            manager.load(first, {"emb": emb})
        assert not os.path.exists("/tmp/sharded_embedding_pwned")
    elif case == "truncated_data":
        if rank == 0:
            data = first / "emb.weight.npy"
            data.write_bytes(data.read_bytes()[:200])
        dist.barrier()
        with pytest.raises(CheckpointError, match="could not be read: .* is truncated"):
            manager.load(first, {"emb": emb})
    elif case == "damaged_data":  # bytes changed inside the file: same size, readable, wrong rows
        if rank == 0:
            data = first / "emb.weight.npy"
            raw = bytearray(data.read_bytes())
            raw[-4 * D * 3 : -4 * D * 2] = bytes(4 * D)  # one row zeroed, in the last page
            data.write_bytes(bytes(raw))
        dist.barrier()
        other = ShardedEmbedding(N, D, page_size=7, fused_optimizer={"name": "rowwise_adagrad", "lr": 0.1})
        untouched = (emb.full_table(), other.full_table())
        for target in (emb, other):  # the saved layout, and another page size
            with pytest.raises(CheckpointError, match=r"rows [\d,]+-[\d,]+ do not match the checksum written with "
                                                      r"them: the file is damaged. Move that checkpoint folder"):
                manager.load(first, {"emb": target})
        assert torch.equal(emb.full_table(), untouched[0]) and torch.equal(other.full_table(), untouched[1])
        if rank == 0:  # the marker's checksums cut short, or gone: not taken for an old checkpoint
            marker = json.loads((first / "COMPLETE").read_text())
            marker["checksums"]["emb.weight"]["crc32"] = marker["checksums"]["emb.weight"]["crc32"][:2]
            (first / "COMPLETE").write_text(json.dumps(marker))
        dist.barrier()
        with pytest.raises(CheckpointError, match=r"marker lacks the checksums of \['emb.weight'\]"):
            manager.load(first, {"emb": emb})
        dist.barrier()
        if rank == 0:  # a value that is not a checksum: the marker is blamed, not the .npy
            marker["checksums"]["emb.optimizer.sum"]["crc32"][0] = None
            (first / "COMPLETE").write_text(json.dumps(marker))
        dist.barrier()
        with pytest.raises(CheckpointError, match=r"marker lacks the checksums of \['emb.weight', 'emb.optimizer.sum'\]"):
            manager.load(first, {"emb": emb})
    elif case == "missing_state":
        plain = ShardedEmbedding(N, D, page_size=10, fused_optimizer={"name": "adagrad", "lr": 0.1})
        untouched = plain.full_table().clone()
        with pytest.raises(CheckpointError, match="emb.optimizer.sum.npy"):  # Adagrad's sum is [N, D], not [N]
            manager.load(first, {"emb": plain})
        assert torch.equal(plain.full_table(), untouched)  # every file is checked before any row changes
    elif case in ("damaged_marker", "marker_not_a_dict"):
        if rank == 0:
            (first / "COMPLETE").write_text('{"step": 1, "wor' if case == "damaged_marker" else "[1]")
        dist.barrier()
        with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
            manager.load(manager.latest(), {"emb": emb})
    elif case == "rank_file_without_state":
        torch.save({"optimizer_steps": {"emb": torch.tensor(2)}}, first / f"rank{rank}.pt")
        untouched = emb.full_table().clone()
        with torch.no_grad():
            emb.weight.add_(1.0)
        changed = emb.full_table().clone()
        with pytest.raises(CheckpointError, match=r"unreadable rank files: rank 0: rank0.pt is damaged or foreign \(KeyError: 'state'\); rank 1: rank1.pt "
                           r"is damaged or foreign \(KeyError"):
            manager.load(first, {"emb": emb})
        assert torch.equal(emb.full_table(), changed) and not torch.equal(changed, untouched)
    elif case == "other_world":
        (first / "COMPLETE").write_text('{"step": 1, "world_size": 7}') if rank == 0 else None
        dist.barrier()
        with pytest.raises(CheckpointError, match="was written by 7 ranks; this run has 2"):
            manager.load(first, {"emb": emb})


@pytest.mark.parametrize("case", ["failed_save", "malicious_rank_file", "truncated_data", "damaged_data", "missing_state",
                                  "other_world", "damaged_marker", "marker_not_a_dict", "rank_file_without_state"])
def test_checkpoint_manager(tmp_path, case):
    run_ranks(2, _manager, str(tmp_path / "ckpts"), case)


def _export_fails(path: str, how: str):
    import errno
    import shutil

    import sharded_embedding.export as export

    rank, _ = rank_world()
    emb = ShardedEmbedding(4096, 16, page_size=512, seed=1)
    real_usage, real_pwrite, calls = shutil.disk_usage, os.pwrite, []

    def full_disk_usage(p):  # the filesystem has less free space than the table
        return real_usage(p)._replace(free=1000)

    def pwrite(fd, data, offset):  # the disk fills while this rank writes (another writer, say)
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    if how == "no_space" and rank == 0:
        export.shutil.disk_usage = full_disk_usage
    if how == "disk_fills" and rank == 1:
        export.os.pwrite = pwrite
    try:
        with pytest.raises(OSError) as caught:
            emb.export_table(path)
    finally:
        shutil.disk_usage, os.pwrite = real_usage, real_pwrite  # the rank pool lives on
    dist.barrier()
    assert not os.path.exists(path + ".partial")  # nothing half-written is left
    return str(caught.value)


@pytest.mark.parametrize("how, message", [
    ("no_space", r"export: creating the file: rank 0: not enough space for .*t\.npy\.partial: it needs 262,272 bytes "
                 r"and the filesystem has 1,000 free"),
    ("disk_fills", r"export: writing the pages: rank 1: rank 1 could not write .*: \[Errno 28\] No space left"),
])
def test_a_full_disk_is_one_error_on_every_rank_and_leaves_no_file(tmp_path, how, message):
    import re

    path = tmp_path / "t.npy"
    path.write_bytes(b"the previous export")  # an older file of that name stays as it was
    for text in run_ranks(2, _export_fails, str(path), how):
        assert re.search(message, text), text
    assert path.read_bytes() == b"the previous export"


SUBGROUPS = [(0, 1), (2, 3), (1, 3)]
GROUP_PLACEMENT = [(1, 0), 0, 1, (0, 1), 1, 0, 0, 1, 1, (1, 0), 0]  # group ranks; mirrors over the group


def _tables_on_two_groups(directory: str):
    """World of 4: table "a" on ranks [0, 1], table "b" on [2, 3] (mirrored pages, fused
    Adagrad). Both save with DCP (each in its group, and both in one world checkpoint), export
    and checkpoint with CheckpointManager; then load into other groups and layouts."""
    rank, world = rank_world()
    groups = {ranks: dist.new_group(list(ranks)) for ranks in SUBGROUPS}  # every rank, same order
    name, pg = ("a", groups[(0, 1)]) if rank < 2 else ("b", groups[(2, 3)])
    emb = ShardedEmbedding(N, D, page_size=10, placement=GROUP_PLACEMENT, process_group=pg,
                           fused_optimizer=ADAGRAD, seed=7 if name == "a" else 8)
    for step in range(2):
        ids = make_ids(N, rank, step, 30)
        (emb(ids) * make_loss_weight(ids, D, rank, step)).sum().backward()
    saved = {name: (emb.full_table(), emb._full(emb.optimizer.sum))}
    dcp.save({name: emb.state_dict()}, checkpoint_id=f"{directory}/{name}", process_group=pg)
    dcp.save({name: emb.state_dict()}, checkpoint_id=f"{directory}/both")  # the world: each rank its key
    emb.export_table(f"{directory}/{name}.npy")
    CheckpointManager(f"{directory}/manager-{name}", group=pg).save(1, {name: emb}, {}, {"world_size": 2})
    got = {}
    # Both tables into tables on the whole world, another page size and round robin.
    a, b = (ShardedEmbedding(N, D, page_size=4, fused_optimizer=ADAGRAD, seed=0) for _ in range(2))
    sd = {"a": a.state_dict(), "b": b.state_dict()}
    dcp.load(sd, checkpoint_id=f"{directory}/both")
    a.load_state_dict(sd["a"])
    b.load_state_dict(sd["b"])
    got["world"] = {k: (t.full_table(), t._full(t.optimizer.sum)) for k, t in (("a", a), ("b", b))}
    if rank in (1, 3):  # "b" into a table on [1, 3]: DCP, the .npy export, the manager's checkpoint
        pg13 = groups[(1, 3)]
        other = ShardedEmbedding(N, D, page_size=7, placement=[(1, 0)] + [p % 2 for p in range(1, 15)],
                                 process_group=pg13, fused_optimizer=ADAGRAD, seed=0)
        sd = {"b": other.state_dict()}
        dcp.load(sd, checkpoint_id=f"{directory}/b", process_group=pg13)
        other.load_state_dict(sd["b"])
        got["dcp"] = (other.full_table(), other._full(other.optimizer.sum))
        assert_replicas_identical(other)
        fresh = ShardedEmbedding(N, D, page_size=9, process_group=pg13, seed=0)
        fresh.import_table(f"{directory}/b.npy")
        got["npy"] = (fresh.full_table(),)
        manager = CheckpointManager(f"{directory}/manager-b", group=pg13)
        manager.load(manager.latest(), {"b": other})
        got["manager"] = (other.full_table(), other._full(other.optimizer.sum))
    return saved, got


def test_tables_on_two_process_groups_checkpoint_load_and_reshard(tmp_path):
    results = run_ranks(4, _tables_on_two_groups, str(tmp_path))
    want = {**results[0][0], **results[2][0]}
    assert not torch.equal(want["a"][0], want["b"][0])
    for rank, (_, got) in enumerate(results):
        for key, (table, state) in got["world"].items():
            assert torch.equal(table, want[key][0]) and torch.equal(state, want[key][1])
        if rank in (1, 3):
            for how in ("dcp", "npy", "manager"):
                for have, expected in zip(got[how], want["b"]):
                    assert torch.equal(have, expected), how


def _rank_without_pages(directory: str, reload: bool):
    """Table "a" lives whole on rank 1, so rank 0 holds none of it; the state dict beside it
    holds a torch optimizer's state (its ``param_groups`` list), as a training loop's does."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    rank, world = rank_world()
    torch.manual_seed(0)
    a = ShardedEmbedding(40, 4, page_size=10, placement=[1] * 4, fused_optimizer=ADAGRAD, seed=1 if reload else 5)
    b = ShardedEmbedding(30, 4, page_size=10, fused_optimizer=ADAGRAD, seed=2 if reload else 6)
    dense = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(dense.parameters(), lr=0.1 if reload else 0.2)
    if reload:  # train, save; then load into tables that start elsewhere
        ids = torch.arange(rank, 40, 3)
        (dense(a(ids) + b(ids % 30)).sum()).backward()
        opt.step()
    state = {"a": a.state_dict(), "b": b.state_dict(), "dense": dense.state_dict(),
             "opt": get_optimizer_state_dict(dense, opt)}
    if reload:
        dcp.save(state, checkpoint_id=directory)
        torch.save(a.state_dict(), f"{directory}.rank{rank}.pt")  # per-rank file: rank 0's holds no rows
    else:
        dcp.load(state, checkpoint_id=directory)
        a.load_state_dict(state["a"])
        b.load_state_dict(state["b"])
        set_optimizer_state_dict(dense, opt, optim_state_dict=state["opt"])
        c = ShardedEmbedding(40, 4, page_size=10, placement=[1] * 4, fused_optimizer=ADAGRAD, seed=7)
        c.load_state_dict(torch.load(f"{directory}.rank{rank}.pt", weights_only=True))
        assert torch.equal(c.full_table(), a.full_table())
    return a.full_table(), a._full(a.optimizer.sum), b.full_table(), opt.param_groups[0]["lr"]


def test_a_rank_that_holds_none_of_a_table_saves_and_loads_beside_an_optimizer(tmp_path):
    """torch's DCP drops a ShardedTensor with no local shard from a rank's load plan, counts it
    missing, and falls back to its pre-2.4 key format, which fails on any list in the state
    ("Missing key in checkpoint state_dict: opt.param_groups"): the DLRM app's resume on 2 ranks
    failed so. A rank without pages of a table now holds an empty shard of it."""
    saved = run_ranks(2, _rank_without_pages, str(tmp_path / "ckpt"), True)
    loaded = run_ranks(2, _rank_without_pages, str(tmp_path / "ckpt"), False)
    for got in loaded:
        for have, want in zip(got[:3], saved[0][:3]):
            assert torch.equal(have, want)
        assert got[3] == 0.1


def _full_state_dict_is_refused():
    """torch's full_state_dict=True gathers a ShardedTensor as if rank r held rows [r*c, (r+1)*c):
    with pages it returned another table (or broke gloo). Refused on every rank, before its
    all-gather; the group keeps working."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, _ = rank_world()
    model = torch.nn.ModuleDict({"t": ShardedEmbedding(40, 3, page_size=20, placement=[1, 0], seed=4)})
    with pytest.raises(RuntimeError, match="cannot be gathered with torch's StateDictOptions"):
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    sharded = get_model_state_dict(model)  # the default (sharded) form still works
    assert set(sharded) == {"t.weight"}
    table = model["t"].full_table()
    assert torch.equal(model["t"](torch.tensor([0, 39])), table[[0, 39]])
    return table


def test_a_full_state_dict_of_a_table_is_refused_on_every_rank():
    tables = run_ranks(2, _full_state_dict_is_refused)
    assert torch.equal(tables[0], tables[1])



def _wrapped_model_resumes_with_set_state_dict(directory: str, wrapper: str, strict: bool):
    """torch's get_state_dict / set_state_dict on a DDP- or torch.compile-wrapped model with a
    fused, mirrored table: the fused state came back without the wrapper's prefix, so strict
    loads raised and strict=False left mirrored pages' state out of step (a fresh user's
    finding). Now the resumed table and state equal the saved ones on every replica."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from tests.oracle import assert_replicas_identical

    rank, _ = rank_world()
    torch.manual_seed(0)
    table = ShardedEmbedding(60, 4, page_size=10, placement=[0, (0, 1), 1, 0, (1, 0), 1],
                             fused_optimizer={"name": "adagrad", "lr": 0.3}, seed=2)
    inner = nn.ModuleDict({"femb": table, "dense": nn.Linear(4, 1)})
    if wrapper == "checkpoint_wrapper":  # activation checkpointing's wrapper, under DDP
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model = DDP(checkpoint_wrapper(inner))
    else:
        model = DDP(inner) if wrapper == "ddp" else torch.compile(inner)
    opt = torch.optim.Adam(inner["dense"].parameters(), lr=0.01)

    def step(i):
        ids = make_ids(60, rank, i, 20, skew="zipf")
        inner["dense"](table(ids)).sum().backward()
        opt.step()
        opt.zero_grad()

    step(0)
    saved = (table.full_table(), table._full(table.optimizer.sum))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    step(1)
    step(2)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=strict))
    assert torch.equal(table.full_table(), saved[0])
    assert torch.equal(table._full(table.optimizer.sum), saved[1])
    assert_replicas_identical(table)
    assert_replicas_identical(table, table.optimizer.sum)


@pytest.mark.parametrize("wrapper, strict", [("ddp", True), ("ddp", False), ("compile", True),
                                             ("checkpoint_wrapper", True), ("checkpoint_wrapper", False)])
def test_a_wrapped_model_resumes_with_torch_set_state_dict(tmp_path, wrapper, strict):
    run_ranks(2, _wrapped_model_resumes_with_set_state_dict, str(tmp_path / "ckpt"), wrapper, strict)
