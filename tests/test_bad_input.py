"""Bad input on any rank: every rank raises the same clear error in the same call, nothing is
updated, and the next call works. Never a hang (the harness would fail the test)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from sharded_embedding import ShardedEmbedding, initial_rows
from tests.harness import run_ranks
from tests.oracle import rank_world


def _lookups_still_work(emb, table):
    """A full training step after an error: forward, backward, SGD, all as expected."""
    rank, world = rank_world()
    ids = torch.tensor([0, emb.num_embeddings - 1, rank % emb.num_embeddings])
    out = emb(ids)
    assert torch.equal(out, table[ids])
    out.sum().backward()
    assert emb.weight.grad is not None
    emb.weight.grad = None


def _bad_dtype_on_one_rank(dtype):
    rank, world = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=6, placement=[0, (1, 0), 1, 0])
    before = emb.weight.detach().clone()
    ids = torch.tensor([1, 2]).to(dtype) if rank == 1 else torch.tensor([3, 4])
    with pytest.raises(TypeError, match=f"rank 1 passed indices of dtype {dtype}"):
        emb(ids)
    assert torch.equal(emb.weight, before) and emb.weight.grad is None
    _lookups_still_work(emb, initial_rows(0, 3, 0, 20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_ids_raise_type_error_everywhere(dtype):
    run_ranks(2, _bad_dtype_on_one_rank, dtype)


def _not_a_tensor():
    rank, _ = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=6)
    with pytest.raises(TypeError, match="rank 0 passed something that is not a tensor"):
        emb("ids" if rank == 0 else [1, 2])
    assert torch.equal(emb([[1, 2]]), initial_rows(0, 3, 0, 20)[torch.tensor([[1, 2]])])  # nested lists are fine


def test_non_tensor_input():
    run_ranks(2, _not_a_tensor)


def _ids_that_are_not_dense_on_one_rank(kind: str):
    """Sparse, nested or meta (no data) ids: torch raised on that rank alone (in reshape or
    aminmax) and its peers waited for the timeout. Refused on every rank, naming what was
    passed; nothing changes."""
    rank, _ = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=6)
    before = emb.weight.detach().clone()
    ids = torch.tensor([1, 2, 3])
    freed = torch.tensor([1, 2, 3], dtype=torch.int32)  # int32: the copy to int64 read it raw and crashed
    freed.untyped_storage().resize_(0)  # a shape, no values (data_ptr 0): the compiled routing read it raw
    freed_strided = torch.tensor([[1, 2], [3, 4]]).t()  # reshape copies it: read before any check, it crashed
    freed_strided.untyped_storage().resize_(0)
    shrunk_strided = torch.zeros(1 << 16, dtype=torch.int64)[::2]
    shrunk_strided.untyped_storage().resize_(8 * ((1 << 16) - 2))  # one element short: it read past the end
    bad = {"sparse": ids.to_sparse(), "nested": torch.nested.nested_tensor([ids, ids[:2]]),
           "meta": ids.to("meta"), "freed": freed, "freed_strided": freed_strided, "shrunk_strided": shrunk_strided}[kind]
    said = {"sparse": "a sparse tensor", "nested": "a nested tensor", "meta": "a tensor without data"}.get(
        kind, "a tensor whose values cannot be read")
    with pytest.raises(TypeError, match=f"must be a dense tensor .* rank 1 passed {said}"):
        emb(bad if rank == 1 else torch.tensor([3, 4]))
    assert torch.equal(emb.weight, before) and emb.weight.grad is None
    _lookups_still_work(emb, initial_rows(0, 3, 0, 20))


@pytest.mark.parametrize("kind", ["sparse", "nested", "meta", "freed", "freed_strided", "shrunk_strided"])
def test_ids_that_are_not_dense_on_one_rank(kind):
    run_ranks(2, _ids_that_are_not_dense_on_one_rank, kind)


def _vmapped_on_one_rank():
    """torch.func.vmap hands the table a wrapper without storage: its data pointer raised on
    that rank alone, and the other rank waited (a hang when the first carried on)."""
    rank, _ = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=6)
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="rank 1 passed a tensor whose values cannot be read"):
        if rank == 1:
            torch.func.vmap(emb)(torch.tensor([[1, 2], [3, 4]]))
        else:
            emb(torch.tensor([3, 4]))
    assert torch.equal(emb.weight, before) and emb.weight.grad is None
    _lookups_still_work(emb, initial_rows(0, 3, 0, 20))


def test_vmap_on_one_rank_raises_on_every_rank():
    run_ranks(2, _vmapped_on_one_rank)


def _negative_view_on_one_rank(native_setting: str):
    """A negative-bit view (torch._neg_view: values [-1, -2] over memory holding [1, 2]) is
    out of range on every rank whichever routing runs (the compiled one read the raw memory and
    looked up rows 1 and 2)."""
    saved = os.environ.get("SHARDED_EMBEDDING_NATIVE")
    os.environ["SHARDED_EMBEDDING_NATIVE"] = native_setting
    try:
        rank, _ = rank_world()
        emb = ShardedEmbedding(20, 3, page_size=6, fused_optimizer={"name": "sgd", "lr": 0.5})
        before = emb.weight.detach().clone()
        ids = torch._neg_view(torch.tensor([1, 2])) if rank == 1 else torch.tensor([3, 4])
        with pytest.raises(IndexError, match="index -2 on rank 1"):
            emb(ids)
        assert torch.equal(emb.weight, before)
        with torch.no_grad():
            assert torch.equal(emb(torch._neg_view(torch.tensor([-5, -6]))), initial_rows(0, 3, 0, 20)[[5, 6]])
            # zeros without memory are zeros, as nn.Embedding reads them, whichever routing runs
            zeros = torch._efficientzerotensor((2, 3), dtype=torch.int32)
            assert torch.equal(emb(zeros), initial_rows(0, 3, 0, 20)[torch.zeros(2, 3, dtype=torch.long)])
    finally:
        if saved is None:
            os.environ.pop("SHARDED_EMBEDDING_NATIVE", None)
        else:
            os.environ["SHARDED_EMBEDDING_NATIVE"] = saved


@pytest.mark.parametrize("native_setting", ["1", "0"])
def test_negative_bit_views_and_zero_tensors_are_read_as_their_values(native_setting):
    run_ranks(2, _negative_view_on_one_rank, native_setting)


def _out_of_range_on_one_rank(bad_rank, bad_value, transport="auto"):
    rank, world = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=6, placement=[(0, 1, 2), 1, 2, 0], transport=transport)
    opt = torch.optim.SGD(emb.parameters(), lr=1.0)
    before = emb.weight.detach().clone()
    ids = torch.tensor([5, bad_value, 7]) if rank == bad_rank else torch.arange(10)
    with pytest.raises(IndexError) as err:
        emb(ids)
    msg = str(err.value)
    assert f"index {bad_value} on rank {bad_rank}" in msg and "valid: 0..19" in msg, msg
    opt.step()  # nothing to apply: the failed call left no gradient
    assert torch.equal(emb.weight, before) and emb.weight.grad is None
    _lookups_still_work(emb, initial_rows(0, 3, 0, 20))
    return msg


@pytest.mark.parametrize("bad_rank, bad_value", [(0, 20), (2, -1), (1, 10**12)])
def test_out_of_range_raises_index_error_on_every_rank(bad_rank, bad_value):
    messages = run_ranks(3, _out_of_range_on_one_rank, bad_rank, bad_value)
    assert len(set(messages)) == 1  # every rank says the same thing


def _out_of_range_mid_training():
    """An error between good steps: the good steps' updates stand, the bad one adds nothing."""
    rank, world = rank_world()
    emb = ShardedEmbedding(12, 2, page_size=4, placement=[(0, 1), 0, 1])
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    table = initial_rows(0, 2, 0, 12)
    emb(torch.tensor([1, 5, 9])).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    table[[1, 5, 9]] -= 0.5 * world
    assert torch.allclose(emb.full_table(), table)
    with pytest.raises(IndexError):
        emb(torch.tensor([12]) if rank == 1 else torch.tensor([2]))
    opt.step()
    assert torch.allclose(emb.full_table(), table)
    both = [emb(torch.tensor([2])), emb(torch.tensor([], dtype=torch.int64))]
    (both[0].sum() + both[1].sum()).backward()
    opt.step()
    table[2] -= 0.5 * world
    assert torch.allclose(emb.full_table(), table)


def test_error_between_training_steps():
    run_ranks(2, _out_of_range_mid_training)


def _bad_construction(case):
    rank, world = rank_world()
    kwargs = dict(page_size=10, placement="round_robin", num_devices=-1)
    n, d = 30, 4
    if case == "placement_length":
        kwargs["placement"] = [0, 1]
    elif case == "unknown_rank":
        kwargs["placement"] = [0, 1, 3]
    elif case == "repeated_rank":
        kwargs["placement"] = [0, (1, 1), 0]
    elif case == "num_devices":
        kwargs["num_devices"] = 3
    elif case == "one_rank_bad":
        if rank == 1:
            kwargs["placement"] = [0, 1, 9]
    elif case == "placements_differ":
        kwargs["placement"] = [0, 1, 0] if rank == 0 else [0, 1, 1]
    elif case == "sizes_differ":
        n = 30 + rank
    elif case == "dims_differ":
        d = 4 + rank
    elif case == "bad_dim":
        d = 0
    elif case == "bad_dtype":
        kwargs["dtype"] = torch.int64
    elif case == "bad_comm_dtype":
        kwargs["comm_dtype"] = torch.int8
    elif case == "float8_comm_dtype":  # floating point, but no collective or scaled wire carries it
        kwargs["comm_dtype"] = torch.float8_e4m3fn
    elif case == "fused_unknown":
        kwargs["fused_optimizer"] = {"name": "lion", "lr": 0.1}
    elif case == "fused_bad_key":
        kwargs["fused_optimizer"] = {"name": "adagrad", "lr": 0.1, "momentum": 0.9}
    elif case == "fused_bad_lr":
        kwargs["fused_optimizer"] = {"name": "sgd", "lr": -1}
    elif case == "fused_differs":
        kwargs["fused_optimizer"] = {"name": "sgd", "lr": 0.1 * (rank + 1)}
    elif case == "fused_not_a_dict_on_one_rank":
        kwargs["fused_optimizer"] = "sgd" if rank == 1 else None
    elif case == "fused_lr_not_a_number":
        kwargs["fused_optimizer"] = {"name": "adagrad", "lr": "x"}
    elif case == "meta_device_on_one_rank":  # would fail to allocate on that rank alone
        kwargs["device"] = "meta" if rank == 1 else None
    elif case == "cuda_without_cuda":
        kwargs["device"] = "cuda"
    elif case == "nn_embedding_option_on_one_rank":  # Python's own TypeError came on that rank alone
        kwargs.update(padding_idx=None, max_norm=None, scale_grad_by_freq=False)  # the defaults are taken
        if rank == 1:
            kwargs.update(padding_idx=0, max_norm=1.0)
    elif case == "num_devices_with_a_list":
        kwargs.update(placement=[0, 1, 0], num_devices=1)
    with pytest.raises(ValueError) as err:
        ShardedEmbedding(n, d, **kwargs)
    # The world is intact: a good table can be built and used right after.
    emb = ShardedEmbedding(8, 2, page_size=3)
    emb(torch.tensor([7])).sum().backward()
    return str(err.value)


@pytest.mark.parametrize(
    "case, message",
    [
        ("placement_length", "placement has 2 entries but the table has 3 pages"),
        ("unknown_rank", "page 2: rank 3 does not exist"),
        ("repeated_rank", "page 1: rank 1 is repeated"),
        ("num_devices", "num_devices=3 is out of range"),
        ("nn_embedding_option_on_one_rank", "rank 1: ShardedEmbedding does not offer nn.Embedding's padding_idx (a row "
                                            "that stays zero"),
        ("num_devices_with_a_list", "num_devices=1 applies to placement='round_robin' only"),
        ("one_rank_bad", "rank 1: page 2: rank 9 does not exist"),
        ("placements_differ", "ranks were given different arguments: placement/num_devices: rank 0: 3 pages on 2 "
                              "ranks (pages held per rank [2, 1], 0 mirrored; owners of the first pages [0, 1, 0]; "
                              "digest "),
        ("sizes_differ", "ranks were given different arguments: num_embeddings: rank 0: 30, rank 1: 31"),
        ("dims_differ", "ranks were given different arguments: embedding_dim: rank 0: 4, rank 1: 5"),
        ("bad_dim", "embedding_dim must be a positive int"),
        ("bad_dtype", "dtype must be a floating point"),
        ("bad_comm_dtype", "comm_dtype must be a floating point"),
        ("float8_comm_dtype", "comm_dtype must be a floating point torch.dtype (torch.float32, float64, float16 or "
                              "bfloat16), got torch.float8_e4m3fn"),
        ("fused_unknown", "fused_optimizer name 'lion' is not one of"),
        ("fused_bad_key", "fused_optimizer 'adagrad' does not take ['momentum']"),
        ("fused_bad_lr", "lr must be a finite number >= 0"),
        ("fused_differs", "ranks were given different arguments: fused_optimizer: rank 0: [('lr', 0.1), ('name', 'sgd')], "
                          "rank 1: [('lr', 0.2), ('name', 'sgd')]"),
        ("fused_not_a_dict_on_one_rank", "rank 1: fused_optimizer must be a dict with a 'name'"),
        ("fused_lr_not_a_number", "fused_optimizer 'adagrad': lr must be a number, got 'x'"),
        ("meta_device_on_one_rank", "rank 1: device=meta: the pages live on the CPU or on a CUDA device"),
        ("cuda_without_cuda", "device=cuda but CUDA is not available on this machine"),
    ],
)
def test_bad_construction_raises_on_every_rank(case, message):
    messages = run_ranks(2, _bad_construction, case)
    for m in messages:
        assert message in m, m


def test_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedEmbedding(10, 2, page_size=5)


def _mirrors_in_a_sub_group():
    rank, world = rank_world()
    sub = dist.new_group([0, 1, 2])
    if rank < 3:
        with pytest.raises(ValueError, match="not the world group"):
            ShardedEmbedding(20, 2, page_size=5, placement=[(0, 1), 1, 2, 0], process_group=sub)
        # Without mirrors (or mirrored on the whole sub-group) a sub-group works.
        emb = ShardedEmbedding(20, 2, page_size=5, placement=[(0, 1, 2), 1, 2, 0], process_group=sub)
        out = emb(torch.tensor([rank, 19 - rank]))
        assert torch.equal(out, initial_rows(0, 2, 0, 20)[[rank, 19 - rank]])
        out.sum().backward()


def test_sub_group_tables():
    run_ranks(4, _mirrors_in_a_sub_group)


def _tables_called_out_of_order():
    rank, _ = rank_world()
    a, b = ShardedEmbedding(20, 3, page_size=5, seed=1), ShardedEmbedding(20, 3, page_size=5, seed=2)
    before = (a.full_table(), b.full_table())
    first, second = (a, b) if rank == 0 else (b, a)
    with pytest.raises(RuntimeError) as err:
        first(torch.tensor([3, 17])).sum().backward()
    assert torch.equal(a.full_table(), before[0]) and torch.equal(b.full_table(), before[1])
    a(torch.tensor([1])), b(torch.tensor([2]))  # in the same order: fine again
    return str(err.value)


def test_ranks_calling_different_tables_raise_on_every_rank():
    for message in run_ranks(2, _tables_called_out_of_order):
        assert "the ranks called the lookups of different tables (rank 0: table #" in message, message
        assert "No rank looked anything up" in message


def _auto_and_explicit_transport_out_of_order():
    """transport="auto" shares the group's transport of the kind it chooses: a table built
    with "auto" and one built with that kind by name meet in one exchange, so calling them out
    of order raises on every rank (with a transport each, both waited until the timeout)."""
    from sharded_embedding.transport import make_transport

    rank, _ = rank_world()
    a = ShardedEmbedding(20, 3, page_size=5, seed=1, transport="auto")
    b = ShardedEmbedding(20, 3, page_size=5, seed=2, transport=a.transport.name)
    assert a.transport is b.transport
    assert make_transport("auto", dist.group.WORLD, torch.device("cpu")) is a.transport
    with pytest.raises(RuntimeError, match="the ranks called the lookups of different tables"):
        (a if rank == 0 else b)(torch.tensor([3, 17])).sum().backward()
    a(torch.tensor([1])), b(torch.tensor([2]))  # in the same order: fine again


def test_auto_and_the_kind_it_chooses_share_one_transport():
    run_ranks(2, _auto_and_explicit_transport_out_of_order)


def _narrow_integer_ids(dtype):
    emb = ShardedEmbedding(20, 3, page_size=5)
    with pytest.raises(TypeError) as err:
        emb(torch.tensor([1, 2], dtype=dtype))
    emb(torch.tensor([1, 2], dtype=torch.int32))  # what nn.Embedding takes works
    return str(err.value)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.uint64])  # (uint64: numpy's, named too)
def test_ids_of_other_integer_dtypes_are_refused_like_nn_embedding(dtype):
    for message in run_ranks(2, _narrow_integer_ids, dtype):
        assert ("must be a dense tensor of torch.int64 or torch.int32 (what nn.Embedding takes): rank 0 passed "
                f"indices of dtype {dtype}") in message, message


def _table_too_big_for_memory():
    from sharded_embedding import TableAllocationError

    # 4,096 rows on rank 0, 2,048 on rank 1, x 10^14 float32 columns: exabytes, more than any address space
    # holds (so the allocation fails at once, whatever the machine's overcommit setting)
    with pytest.raises(TableAllocationError) as err:
        ShardedEmbedding(4096 + 2048, 10**14, page_size=4096)
    assert isinstance(err.value, ValueError) and isinstance(err.value, MemoryError)
    emb = ShardedEmbedding(20, 3, page_size=5)  # the group still works: the next table is built
    assert emb(torch.tensor([0, 19])).shape == (2, 3)
    return str(err.value)


def test_a_table_no_memory_holds_raises_on_every_rank_naming_each_ranks_rows():
    for message in run_ranks(2, _table_too_big_for_memory):
        assert message.startswith("ShardedEmbedding construction: rank 0: could not allocate its 4,096 rows on cpu"), \
            message
        assert "; rank 1: could not allocate its 2,048 rows on cpu" in message, message


def _different_full_tables():
    rank, _ = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=5)
    before = emb.full_table()
    with pytest.raises(ValueError, match="load_full_table .every rank must pass the same table.: ranks were given"):
        emb.load_full_table(torch.full((20, 3), float(rank)))
    assert torch.equal(emb.full_table(), before)  # nothing changed on any rank
    emb.load_full_table(torch.ones(20, 3))
    assert torch.equal(emb.full_table(), torch.ones(20, 3))


def test_load_full_table_refuses_different_tables_on_different_ranks():
    run_ranks(2, _different_full_tables)


def _export_onto(path: str, message: str = "exists and is not a regular file"):
    emb = ShardedEmbedding(20, 3, page_size=5)
    with pytest.raises(OSError, match=message):
        emb.export_table(path)


def test_export_onto_something_that_is_not_a_regular_file_leaves_it_alone(tmp_path):
    import stat

    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.npy"
    folder.mkdir()
    for target in (fifo, folder):
        run_ranks(2, _export_onto, str(target))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and folder.is_dir() and not list(folder.iterdir())
    # /proc takes no files and reports 0 bytes free: "not enough space" misled
    run_ranks(2, _export_onto, "/proc/t.npy", r"rank 0: cannot create /proc/t\.npy\.partial: \[Errno 2\]")


def _numpy_sizes():
    """Sizes as numpy integers (``ids.max() + 1``), on one rank only: nn.Embedding takes them;
    they raised 'int64 is not JSON serializable' on that rank while the other waited. Now the
    same table as with ints, and a TableConfig alike."""
    import numpy as np

    from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig

    rank, _ = rank_world()
    size = np.array([3, 41]).max() + 1 if rank == 1 else 42
    emb = ShardedEmbedding(size, np.int64(4) if rank == 1 else 4, page_size=np.int32(8) if rank == 1 else 8)
    assert type(emb.num_embeddings) is int and type(emb.embedding_dim) is int and emb.num_embeddings == 42
    torch.testing.assert_close(emb.full_table(), initial_rows(0, 4, 0, 42))
    config = TableConfig(name="t", num_embeddings=size, embedding_dim=4, page_size=np.int64(8), seed=np.int64(0))
    ebc = ShardedEmbeddingBagCollection([config])
    torch.testing.assert_close(ebc.tables["t"].full_table(), initial_rows(0, 4, 0, 42))


def test_numpy_integer_sizes_build_the_same_table():
    run_ranks(2, _numpy_sizes)


def _default_dtype():
    """Without dtype=, a table takes torch's default dtype, as nn.Embedding (it stayed float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        emb = ShardedEmbedding(20, 3, page_size=8)
        assert emb.weight.dtype == torch.float64 == torch.nn.Embedding(20, 3).weight.dtype
    finally:
        torch.set_default_dtype(before)
    assert ShardedEmbedding(20, 3, page_size=8).weight.dtype == torch.float32
    return True


def test_a_table_takes_torch_default_dtype_as_nn_embedding():
    assert run_ranks(2, _default_dtype) == [True, True]


def _meta_device():
    """Built under `with torch.device("meta")` (deferred initialization), a table failed inside
    torch's meta kernels; now one ValueError on every rank saying what to do."""
    with torch.device("meta"):
        with pytest.raises(ValueError, match="cannot be built on the meta device"):
            ShardedEmbedding(20, 3, page_size=8)
    assert ShardedEmbedding(20, 3, page_size=8).weight.device.type == "cpu"  # the group goes on
    return True


def test_a_table_on_the_meta_device_is_refused_on_every_rank():
    assert run_ranks(2, _meta_device) == [True, True]


def _converted_on_one_rank(transport):
    """A table converted on one rank only (emb.double() there) sent vectors of another width:
    gloo ended the job, shared memory raised about splits. Now every rank raises naming the
    dtypes, before anything travels; converted alike, it works."""
    rank, _ = rank_world()
    emb = ShardedEmbedding(40, 3, page_size=8, transport=transport)
    if rank == 0:
        emb.double()
    with pytest.raises(RuntimeError, match=r"different dtypes on the ranks \(rank 0: torch.float64, rank 1: "
                                           r"torch.float32\)"):
        emb(torch.tensor([1, 9, 17]))
    if rank == 1:
        emb.double()
    assert emb(torch.tensor([1, 9, 17])).dtype == torch.float64
    return True


@pytest.mark.parametrize("transport", ["shared_memory", "process_group"])
def test_a_table_converted_on_one_rank_only_is_refused_on_every_rank(transport):
    assert run_ranks(2, _converted_on_one_rank, transport) == [True, True]


def _storage_freed_on_one_rank(shrink):
    """A table whose memory was freed or shrunk on one rank: that rank raised PyTorch's own
    error (a partly shrunk storage crashed the process) while its peer waited in the exchange
    until the transport saw it die. Now every rank refuses the lookup together, nothing read."""
    rank, _ = rank_world()
    emb = ShardedEmbedding(4000, 8, page_size=100)
    if rank == 0:
        emb.weight.untyped_storage().resize_(shrink)
    with pytest.raises(RuntimeError, match=r"refuses this lookup \(on ranks \[0\]\).*does not hold its rows"):
        emb(torch.tensor([1, 3999, 150]))
    return True


@pytest.mark.parametrize("shrink", [0, 64])
def test_a_table_whose_memory_was_freed_on_one_rank_is_refused_on_every_rank(shrink):
    assert run_ranks(2, _storage_freed_on_one_rank, shrink) == [True, True]


def _hyperparameters_after_construction():
    """emb.optimizer.lr = x (a schedule) was not checked: -1 was taken, NaN raised a misleading
    NonFiniteGradientError, and an lr set on one rank only made mirrored replicas diverge in
    silence. A bad value is refused where it is set; ranks that differ raise together at the
    next lookup with gradients, nothing changed; set alike again, they train."""
    from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig

    rank, world = rank_world()
    emb = ShardedEmbedding(20, 3, page_size=5, placement=[(0, 1), 0, 1, (1, 0)],
                           fused_optimizer={"name": "adam", "lr": 0.1})
    ebc = ShardedEmbeddingBagCollection([TableConfig("t", 20, 3, 5, fused_optimizer={"name": "sgd", "lr": 0.1}),
                                         TableConfig("u", 20, 3, 5)])
    ids = torch.tensor([1, 7, 12])
    for table, call, what in ((emb, lambda: emb(ids), "ShardedEmbedding"),
                              (ebc.tables["t"], lambda: ebc({"t": (ids, torch.tensor([0])),
                                                             "u": (ids, torch.tensor([0]))})["t"],
                              "ShardedEmbeddingBagCollection")):
        opt = table.optimizer
        for bad, message in ((-1, "lr must be a finite number >= 0, got -1.0"),
                             (float("nan"), "lr must be a finite number >= 0, got nan"), ("x", "lr must be a number"),
                             (True, "lr must be a number, got True")):
            with pytest.raises(ValueError, match=message):
                opt.lr = bad
            assert opt.lr == 0.1
        if opt.name == "adam":
            with pytest.raises(ValueError, match="betas must be two numbers in"):
                opt.betas = (0.9, 1.0)
        with pytest.raises(AttributeError, match=f"fused_optimizer {opt.name!r} has no hyperparameter 'momentum'"):
            opt.momentum = 0.9  # did nothing, silently
        opt.lr = "0.2"  # a number, as construction takes it
        assert opt.lr == 0.2
        before = table.full_table()
        opt.lr = 0.3 if rank == 1 else 0.2
        with pytest.raises(RuntimeError, match=f"{what}: the fused optimizer's hyperparameters differ between "
                                               r"ranks \(ranks grouped by them: \[\[0\], \[1\]\]\)"):
            call().sum().backward()
        with torch.no_grad():
            call()  # without gradients no step is taken: nothing to agree on
        assert torch.equal(table.full_table(), before)
        opt.lr = 0.3
        call().sum().backward()
        assert not torch.equal(table.full_table(), before)
    return True


def test_fused_hyperparameters_set_after_construction_are_checked_here_and_across_ranks():
    assert run_ranks(2, _hyperparameters_after_construction) == [True, True]
