"""The compiled owner update (`native.bag_scatter_add`) against PyTorch's index_add_, its bad
inputs, and the collection trained with it and without it against nn.EmbeddingBag."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from sharded_embedding import native
from tests.harness import run_ranks
from tests.oracle import rank_world
from tests.test_collection import train_collection_against_oracle


def _oracle(weight, ids, first, weights, scale, grads):
    """The same update in PyTorch: each id's gradient row is its bag's, times weight and scale."""
    pair = torch.cumsum(first.long(), 0) - 1
    rows = grads[pair] * scale
    if weights is not None:
        rows = rows * weights[:, None]
    out = weight.clone()
    out.index_add_(0, ids.long(), rows)
    return out


def _case(rows, dim, n, bag_rate, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=g)
    ids = torch.randint(0, rows, (n,), generator=g, dtype=torch.int32)
    first = torch.rand(n, generator=g) < bag_rate
    if n:
        first[0] = True
    grads = torch.randn(int(first.sum()), dim, generator=g)
    weights = torch.rand(n, generator=g) * 2 - 0.5 if weighted else None
    return weight, ids, first, weights, grads


# Where the extension did not build (no C compiler), test_extension_is_built fails and says so;
# the tests of the kernels themselves have nothing to run.
needs_extension = pytest.mark.skipif(not native.built(), reason="sharded_embedding._scatter is not built")


@pytest.fixture(autouse=True)
def one_thread():
    """The library uses the compiled loops with one intra-op thread (as under torchrun)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_extension_is_built():
    """setup.py marks the extension optional (a machine without a C compiler still installs):
    here, where CI builds it, it must be there, or every test below would test the fallback."""
    assert native.built(), "sharded_embedding._scatter did not build (see pip's output)"
    assert native.available()


@needs_extension
def test_more_threads_leave_the_update_to_torchs_parallel_kernels():
    torch.set_num_threads(2)
    assert native.built() and not native.available() and not native.supports(torch.zeros(2, 2))
    weight = torch.zeros(4, 3)
    native.index_add_(weight, torch.tensor([1, 1]), torch.ones(2, 3))
    assert weight[1].tolist() == [2.0, 2.0, 2.0]


@needs_extension
@pytest.mark.parametrize("dim", [1, 3, 16, 32, 33, 64, 128])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bag_rate", [0.05, 1.0])
def test_matches_index_add(dim, weighted, bag_rate):
    weight, ids, first, weights, grads = _case(50, dim, 400, bag_rate, weighted, seed=dim)
    want = _oracle(weight, ids, first, weights, -0.3, grads)
    native.bag_scatter_add(weight, ids, first, weights, -0.3, grads)
    torch.testing.assert_close(weight, want, rtol=1e-6, atol=1e-6)


@needs_extension
def test_no_ids_changes_nothing():
    weight, ids, first, weights, grads = _case(10, 4, 0, 0.5, False, seed=1)
    before = weight.clone()
    native.bag_scatter_add(weight, ids, first, None, 1.0, grads)
    assert torch.equal(weight, before)


@needs_extension
@pytest.mark.parametrize("case", ["id_past_end", "negative_id", "no_first_start", "more_pairs", "fewer_pairs"])
def test_bad_indices_raise_before_writing(case):
    weight, ids, first, weights, grads = _case(20, 8, 30, 0.2, True, seed=3)
    if case == "id_past_end":
        ids[-1] = 20
    elif case == "negative_id":
        ids[5] = -1
    elif case == "no_first_start":
        first[0] = False
    elif case == "more_pairs":
        grads = torch.cat([grads, grads[:1]])
    else:
        grads = grads[:-1]
    before = weight.clone()
    with pytest.raises(ValueError, match="outside the table, or the bag starts do not match"):
        native.bag_scatter_add(weight, ids, first, weights, 1.0, grads)
    assert torch.equal(weight, before)


@needs_extension
@pytest.mark.parametrize("case", ["float64_table", "strided_table", "one_dim_table", "grads_width", "weights_length",
                                  "first_length", "int64_ids", "grads_alias_the_table"])
def test_layouts_it_does_not_take_raise_type_error(case):
    weight, ids, first, weights, grads = _case(20, 8, 30, 0.2, True, seed=4)
    if case == "float64_table":
        weight = weight.double()
    elif case == "strided_table":
        weight = weight.t()
    elif case == "one_dim_table":
        weight = weight.view(-1)
    elif case == "grads_width":
        grads = grads[:, :7]
    elif case == "weights_length":
        weights = weights[:-1]
    elif case == "first_length":
        first = first[:-1]
    elif case == "grads_alias_the_table":
        grads = weight[: grads.shape[0]]
    else:  # an int64 id past 2^32 must not wrap onto a row
        ids = ids.long()
        ids[0] += 2**32
    before = weight.clone()
    with pytest.raises(TypeError, match="bag_scatter_add"):
        native.bag_scatter_add(weight, ids, first, weights, 1.0, grads)
    assert torch.equal(weight, before)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SHARDED_EMBEDDING_NATIVE", "0")
    assert not native.built() and not native.available()
    weight, ids, first, weights, grads = _case(20, 8, 30, 0.2, False, seed=5)
    with pytest.raises(RuntimeError, match="not built"):
        native.bag_scatter_add(weight, ids, first, weights, 1.0, grads)


# SGD tables pooled on their owners: plain, weighted, mean, and mirrored pages (which keep the
# per-row sums: replicas all-reduce them); one rowwise Adagrad table (never pooled form).
SGD_TABLES = [
    dict(name="items", num_embeddings=47, embedding_dim=8, page_size=5, pooling="sum",
         feature_names=["item", "history"], fused_optimizer={"name": "sgd", "lr": 0.1}, seed=1),
    dict(name="means", num_embeddings=31, embedding_dim=3, page_size=4, pooling="mean",
         feature_names=["user"], fused_optimizer={"name": "sgd", "lr": 0.2}, seed=2),
    dict(name="mirrored", num_embeddings=40, embedding_dim=12, page_size=7, pooling="sum",
         placement=[(0, 1), 1, 0, (1, 0), 0, 1], feature_names=["tag"], fused_optimizer={"name": "sgd", "lr": 0.3},
         seed=3),
    dict(name="rowwise", num_embeddings=23, embedding_dim=4, page_size=5, pooling="sum",
         feature_names=["geo"], fused_optimizer={"name": "rowwise_adagrad", "lr": 0.3}, seed=4),
]


@contextlib.contextmanager
def native_setting(value: str):
    """``SHARDED_EMBEDDING_NATIVE=value`` inside the block, the environment as it was after."""
    saved = os.environ.get("SHARDED_EMBEDDING_NATIVE")
    os.environ["SHARDED_EMBEDDING_NATIVE"] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ["SHARDED_EMBEDDING_NATIVE"]
        else:
            os.environ["SHARDED_EMBEDDING_NATIVE"] = saved


def _train_with(setting: str, **kwargs):
    """``setting``: "1" (the extension), "0" (turned off by the environment) or "missing" (as
    where it did not build: the module is None)."""
    module = native._scatter
    if setting == "missing":
        native._scatter = None
    try:
        with native_setting("1" if setting == "missing" else setting):
            return train_collection_against_oracle(SGD_TABLES, **kwargs)
    finally:
        native._scatter = module


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("setting", [pytest.param("1", marks=needs_extension), "0", "missing"])
def test_collection_with_and_without_the_extension_matches_the_oracle(world, setting):
    stats = run_ranks(world, _train_with, setting, pool_on="owner", weighted=("history", "tag"), skew="zipf",
                      max_len=9, batch=(7, 0, 5))
    for s in stats:
        tables = s["tables"]
        assert tables["rowwise"]["ids_stepped_pooled"] == 0
        # mirrored pages keep per-row sums (one rank: nothing is mirrored)
        assert (tables["mirrored"]["ids_stepped_pooled"] > 0) == (world == 1 and setting == "1")
        for name in ("items", "means"):
            if setting != "1":
                assert tables[name]["ids_stepped_pooled"] == 0
            else:
                assert tables[name]["ids_stepped_pooled"] > 0
    served = sum(s["tables"]["items"]["ids_stepped_pooled"] for s in stats)
    if setting == "1":  # every id of every rank's bags, summed over the owners
        assert served == sum(s["tables"]["items"]["ids"] for s in stats)


def _partition_oracle(offsets, dest, rows, weights, world):
    """`native.partition_bags` by its definition, id by id."""
    buckets = [[] for _ in range(world + 1)]
    pair_bags = [[] for _ in range(world + 1)]
    for b in range(offsets.numel() - 1):
        seen = set()
        for i in range(int(offsets[b]), int(offsets[b + 1])):
            q = int(dest[i])
            first = q not in seen
            seen.add(q)
            if first:
                pair_bags[q].append(b)
            buckets[q].append((int(rows[i]), first, None if weights is None else float(weights[i])))
    payload = []
    for q in range(world):
        for row, first, w in buckets[q]:
            low = row | (1 << 31 if first else 0)
            high = 0 if w is None else int(torch.tensor([w], dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF
            word = low | high << 32
            payload.append(word - (1 << 64) if word >= 1 << 63 else word)
    own = buckets[world]
    return (payload, [r for r, _, _ in own], [f for _, f, _ in own], [w for _, _, w in own],
            [len(p) for p in pair_bags], [b for p in pair_bags for b in p])


@needs_extension
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dest_dtype", [torch.uint8, torch.int32])
def test_partition_bags_matches_its_definition(world, weighted, dest_dtype):
    g = torch.Generator().manual_seed(world * 7 + weighted)
    lengths = torch.randint(0, 6, (40,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    n = int(offsets[-1])
    dest = torch.randint(0, world + 1, (n,), generator=g).to(dest_dtype)
    rows = torch.randint(0, 2**31 - 1, (n,), generator=g)
    weights = torch.randn(n, generator=g) if weighted else None
    counts = torch.bincount(dest.long(), minlength=world + 1).tolist()
    payload, (own_rows, own_first, own_weights), pairs, pair_bag = native.partition_bags(offsets, dest, rows, weights,
                                                                                          counts, world)
    want = _partition_oracle(offsets, dest, rows, weights, world)
    assert payload.tolist() == want[0]
    assert own_rows.tolist() == want[1] and own_first.tolist() == want[2]
    assert (own_weights is None) == (not weighted)
    if weighted:
        assert own_weights.tolist() == want[3]
    assert pairs == want[4] and pair_bag.tolist() == want[5]


@needs_extension
@pytest.mark.parametrize("case", ["short_weights", "float_rows"])
def test_partition_bags_refuses_layouts_it_does_not_take(case):
    offsets, dest, rows = torch.tensor([0, 2, 5]), torch.tensor([0, 1, 1, 2, 0], dtype=torch.uint8), torch.arange(5)
    weights = torch.ones(1) if case == "short_weights" else None
    if case == "float_rows":
        rows = rows.float()
    with pytest.raises(TypeError, match="partition_bags"):
        native.partition_bags(offsets, dest, rows, weights, [2, 2, 1], 2)


@needs_extension
@pytest.mark.parametrize("case", ["dest_past_world", "row_past_31_bits", "counts", "counts_sum", "offsets_end"])
def test_partition_bags_refuses_bad_input(case):
    offsets = torch.tensor([0, 2, 5])
    dest = torch.tensor([0, 1, 1, 2, 0], dtype=torch.uint8)
    rows = torch.tensor([1, 2, 3, 4, 5])
    counts = [2, 2, 1]
    if case == "dest_past_world":
        dest[3] = 3
    elif case == "row_past_31_bits":
        rows[1] = 2**31
    elif case == "counts":
        counts = [2, 1, 2]
    elif case == "counts_sum":
        counts = [2, 2, 6]
    else:
        offsets = torch.tensor([0, 2, 4])
    with pytest.raises(ValueError, match="partition_bags"):
        native.partition_bags(offsets, dest, rows, None, counts, 2)


@needs_extension
@pytest.mark.parametrize("dim", [1, 5, 32, 130])
def test_index_add_is_torchs_bit_for_bit(dim):
    """Repeated rows add in order, as PyTorch's one-thread CPU kernel adds them: the same bits."""
    g = torch.Generator().manual_seed(dim)
    weight = torch.randn(30, dim, generator=g)
    rows = torch.randint(0, 30, (200,), generator=g)
    values = torch.randn(200, dim, generator=g) * 1e-3
    want = weight.clone().index_add_(0, rows, values)
    assert native.index_add_(weight, rows, values) is weight
    assert torch.equal(weight, want)


# Rows of a 4-row table that torch's row kernels refuse, each its own way.
BAD_ROWS = {"row_outside": [0, 4], "negative_row": [-9, 1], "float_rows": [0.0, 2.0]}


@needs_extension
@pytest.mark.parametrize("case", ["row_outside", "negative_row", "float_rows", "values_alias_the_table", "zero_width"])
def test_index_add_takes_refuses_and_raises_as_torch_does(case):
    weight, rows, values = torch.arange(12.0).view(4, 3), torch.tensor([0, 2]), torch.ones(2, 3)
    if case in BAD_ROWS:
        rows = torch.tensor(BAD_ROWS[case])
    elif case == "values_alias_the_table":
        values = weight[1:3]
    else:
        weight, values = torch.zeros(4, 0), torch.zeros(2, 0)
    want, got = weight.clone(), weight.clone()
    want_values, got_values = (want[1:3], got[1:3]) if case == "values_alias_the_table" else (values, values)
    try:
        want.index_add_(0, rows, want_values)
        raised = None
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the same must come out
        raised = type(e)
    if raised is None:
        native.index_add_(got, rows, got_values)
    else:
        with pytest.raises(raised):
            native.index_add_(got, rows, got_values)
    assert torch.equal(got, want)


def test_index_add_leaves_other_layouts_to_torch():
    weight = torch.zeros(4, 3, dtype=torch.float64)
    native.index_add_(weight, torch.tensor([1, 1]), torch.ones(2, 3, dtype=torch.float64))
    assert weight[1].tolist() == [2.0, 2.0, 2.0]


@needs_extension
@pytest.mark.parametrize("page_size", [1, 4, 7, 512])
@pytest.mark.parametrize("dest_dtype", [torch.uint8, torch.int32])
def test_destinations_match_their_definition(page_size, dest_dtype):
    g = torch.Generator().manual_seed(page_size)
    pages, buckets = 13, 4
    dest_of_page = torch.randint(0, buckets, (pages,), generator=g).to(dest_dtype)
    shift = torch.randint(-10_000, 10_000, (pages,), generator=g)
    ids = torch.randint(0, pages * page_size, (300,), generator=g)
    dest, rows, counts = native.destinations(ids.int(), dest_of_page, shift, page_size, buckets)
    page = ids // page_size
    assert dest.dtype == dest_dtype and torch.equal(dest, dest_of_page[page])
    assert torch.equal(rows, shift[page] + ids)
    assert counts == torch.bincount(dest_of_page[page].long(), minlength=buckets).tolist()


@needs_extension
def test_destinations_refuse_float_ids():
    with pytest.raises(TypeError, match="destinations: ids must be integers"):
        native.destinations(torch.tensor([0.0, 2.9]), torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64),
                            4, 1)


@needs_extension
@pytest.mark.parametrize("case", ["id_past_the_pages", "negative_id", "destination_past_buckets"])
def test_destinations_refuse_out_of_range(case):
    dest_of_page = torch.tensor([0, 1, 2], dtype=torch.uint8)
    shift, ids = torch.zeros(3, dtype=torch.int64), torch.tensor([0, 5, 11])
    if case == "id_past_the_pages":
        ids[2] = 12
    elif case == "negative_id":
        ids[0] = -1
    else:
        dest_of_page[1] = 3
    with pytest.raises(ValueError, match="destinations: an id or a destination is out of range"):
        native.destinations(ids, dest_of_page, shift, 4, 3)


@needs_extension
def test_writes_bump_the_version_counter_as_torch_in_place_ops_do():
    """A tensor autograd saved, then changed by the compiled kernels, must make its backward
    raise as after Tensor.index_add_ (not silently use the new values)."""
    weight = torch.randn(6, 4, requires_grad=True)
    table = weight.detach()  # shares the version counter, as a table's storage and its saved views do
    x = torch.randn(4, requires_grad=True)
    loss = (table @ x).sum()  # saves `table`
    native.index_add_(table, torch.tensor([1]), torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = (table @ x).sum()
    native.bag_scatter_add(table, torch.tensor([2], dtype=torch.int32), torch.tensor([True]), None, 1.0,
                           torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _pooled_steps_of_a_pass_that_raises():
    """The collection's fused SGD step is handed over in pooled form, then another table of the
    same loss has a NaN gradient on rank 1: the pass raises, no step is applied, and stats()
    counts none; the next pass counts its ids."""
    from sharded_embedding import NonFiniteGradientError, ShardedEmbedding, ShardedEmbeddingBagCollection, TableConfig

    rank, _ = rank_world()
    ebc = ShardedEmbeddingBagCollection([TableConfig("a", 60, 8, 5, pooling="sum", feature_names=["f"],
                                                     fused_optimizer={"name": "sgd", "lr": 0.1})], pool_on="owner")
    other = ShardedEmbedding(20, 4, page_size=5, fused_optimizer={"name": "sgd", "lr": 0.1})
    bags = {"f": (torch.arange(12) * 5 % 60, torch.tensor([0, 5, 9]))}
    before = ebc.tables["a"].weight.detach().clone()
    loss = ebc(bags)["f"].sum() + other(torch.arange(6)).sum() * (float("nan") if rank == 1 else 1.0)
    with pytest.raises(NonFiniteGradientError):
        loss.backward()
    assert torch.equal(ebc.tables["a"].weight.detach(), before)
    dropped = ebc.stats()["tables"]["a"]["ids_stepped_pooled"]
    ebc(bags)["f"].sum().backward()
    return dropped, ebc.stats()["tables"]["a"]["ids_stepped_pooled"]


@needs_extension
def test_stats_count_only_pooled_steps_that_were_applied():
    counts = run_ranks(2, _pooled_steps_of_a_pass_that_raises)
    assert [dropped for dropped, _ in counts] == [0, 0]
    assert sum(after for _, after in counts) == 2 * 12  # both ranks' ids, each applied by its owner


@needs_extension
def test_index_add_leaves_what_autograd_records_to_torch():
    leaf = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        native.index_add_(leaf, torch.tensor([1]), torch.ones(1, 3))
    assert not leaf.detach().any()
    values = torch.ones(2, 3, requires_grad=True)
    out = native.index_add_(torch.zeros(4, 3), torch.tensor([1, 1]), values)
    out.sum().backward()
    assert torch.equal(values.grad, torch.ones(2, 3))


# ----------------------------------------------------------------------------- routing
def _torch_route(router, ids):
    """`Router.route`'s PyTorch passes (the compiled loops off): gather_index, bag indices and
    offsets, rows (local rows with one rank) and the count per peer."""
    with native_setting("0"):
        gather_index, bags, keys = router.dedup(ids.reshape(-1).long())
    if router.world == 1:
        return gather_index, bags.indices, bags.offsets, keys, None
    peer, rows = router.split(keys)
    return gather_index, bags.indices, bags.offsets, rows, torch.bincount(peer, minlength=router.world + 1).tolist()


def _routers(n, page_size, world):
    from sharded_embedding.placement import PagePlan
    from sharded_embedding.routing import Router

    pages = -(-n // page_size)
    placements = ["round_robin", [(p * 5) % world for p in range(pages)]]
    if world > 1:
        placements.append([(0, 1) if p % 3 == 0 else p % world for p in range(pages)])
    for placement in placements:
        plan = PagePlan.build(n, page_size, world, placement)
        for rank in range(world):
            yield Router(plan.routing_table(rank), page_size=page_size, num_embeddings=n,
                         max_local_rows=max(plan.local_rows(r) for r in range(world)), rank=rank, world=world,
                         transport=None, device=torch.device("cpu"))


@needs_extension
@pytest.mark.parametrize("page_size", [1, 7, 16, 512])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_compiled_routing_equals_the_torch_passes(page_size, world, dtype):
    """`Router._route_compiled` (one compiled radix sort) gives the values of `Router.route`'s
    PyTorch passes, bit for bit: the stable order of each unique id's positions, the unique
    rows, the counts per peer, for every rank of round-robin, explicit and mirrored placements,
    ids of either dtype and any shape, duplicates, none and one."""
    n = 1000
    g = torch.Generator().manual_seed(world * 1000 + page_size)
    batches = [torch.cat([torch.arange(n), torch.randint(0, n, (700,), generator=g)]),
               torch.randint(0, 40, (13, 17), generator=g), torch.zeros(0, dtype=torch.int64),
               torch.tensor([n - 1]), torch.full((50,), 3)]
    for router in _routers(n, page_size, world):
        for ids in batches:
            ids = ids.to(dtype)
            shape, gather_index, bags, rows, counts = router._route_compiled(ids)
            want = _torch_route(router, ids)
            assert shape == ids.shape
            got = (gather_index, bags.indices, bags.offsets, rows, counts)
            for a, b in zip(got[:4], want[:4]):
                assert a.dtype == torch.int64 and torch.equal(a, b)
            assert counts == want[4]


@needs_extension
@pytest.mark.parametrize("bad", [-1, 1000, 2**40])
def test_compiled_routing_leaves_bad_ids_to_the_checks(bad):
    """An id outside the table: the compiled pass hands over (None) and `validate_ids` names it."""
    router = next(_routers(1000, 16, 2))
    ids = torch.tensor([3, bad, 5])
    assert router._route_compiled(ids) is None
    assert router._route_compiled(torch.tensor([3.0, 5.0])) is None  # float ids: TypeError from the checks


@needs_extension
def test_compiled_routing_is_not_used_with_more_threads_or_turned_off(monkeypatch):
    router = next(_routers(1000, 16, 2))
    torch.set_num_threads(2)
    assert router._route_compiled(torch.tensor([1, 2])) is None
    torch.set_num_threads(1)
    monkeypatch.setenv("SHARDED_EMBEDDING_NATIVE", "0")
    assert router._route_compiled(torch.tensor([1, 2])) is None


@needs_extension
@pytest.mark.parametrize("n", [0, 1, 2, 5000])
@pytest.mark.parametrize("bound", [1, 3, 2**11, 2**11 + 1, 1_500_003, 2**31])
def test_dedup_is_a_stable_sort_and_unique_consecutive(n, bound):
    g = torch.Generator().manual_seed(n + bound)
    keys = torch.randint(0, bound, (n,), generator=g, dtype=torch.int64)
    unique, perm, offsets, gather_index, counts = native.dedup(keys, bound)
    sorted_keys, want_perm = torch.sort(keys, stable=True)
    want_unique, dups = torch.unique_consecutive(sorted_keys, return_counts=True)
    assert torch.equal(unique, want_unique) and torch.equal(perm, want_perm) and counts is None
    assert torch.equal(offsets, torch.cumsum(dups, 0) - dups)
    assert torch.equal(unique[gather_index], keys)


@needs_extension
@pytest.mark.parametrize("case", ["negative", "at_bound", "past_limit", "page_past_table", "key_past_bound",
                                  "bucket_past_buckets", "float_ids", "two_dim", "bound_too_large", "int16_table",
                                  "a_list", "freed", "freed_strided", "page_size_past_int64",
                                  "stride_past_bound", "page_offset_a_list"])
def test_dedup_refuses_bad_input(case):
    ids, kwargs, error = torch.tensor([1, 4, 2]), dict(bound=10), ValueError
    if case == "negative":
        ids, error = torch.tensor([1, -1]), IndexError
    elif case == "at_bound":
        ids, error = torch.tensor([1, 10]), IndexError
    elif case == "past_limit":
        kwargs, error = dict(bound=10, limit=4), IndexError
    elif case == "page_past_table":  # 2 pages of 2 ids: id 4 is on no page
        kwargs, error = dict(bound=10, page_offset=torch.zeros(2, dtype=torch.int32), page_size=2), IndexError
    elif case == "key_past_bound":
        kwargs = dict(bound=10, page_offset=torch.tensor([0, 0, 8], dtype=torch.int32), page_size=2)
    elif case == "bucket_past_buckets":
        kwargs = dict(bound=10, stride=2, buckets=2)
    elif case == "float_ids":
        ids, error = ids.float(), TypeError
    elif case == "two_dim":
        ids, error = ids.reshape(1, 3), TypeError
    elif case == "bound_too_large":
        kwargs = dict(bound=2**31 + 1)
    elif case == "a_list":
        ids, error = [1, 4, 2], TypeError
    elif case == "freed":  # a shape over a storage of 0 bytes: never read raw
        ids.untyped_storage().resize_(0)
        error = TypeError
    elif case == "freed_strided":  # never copied either (a copy reads it)
        ids = torch.tensor([1, 9, 4, 9, 2])[::2]
        ids.untyped_storage().resize_(0)
        error = TypeError
    elif case == "page_size_past_int64":
        kwargs = dict(bound=10, page_offset=torch.zeros(3, dtype=torch.int32), page_size=2**63)
    elif case == "stride_past_bound":
        kwargs = dict(bound=10, stride=2**40, buckets=2)
    elif case == "page_offset_a_list":
        kwargs, error = dict(bound=10, page_offset=[0, 0, 0], page_size=2), TypeError
    else:
        kwargs, error = dict(bound=10, page_offset=torch.zeros(3, dtype=torch.int16), page_size=2), TypeError
    with pytest.raises(error):
        native.dedup(ids, **kwargs)


@needs_extension
def test_views_the_loops_would_misread_are_read_as_their_values():
    """A negative-bit view and an efficient zero tensor hold other bytes than their values:
    made real before the C loops read them; a freed storage is refused, never read."""
    unique, *_ = native.dedup(torch._neg_view(torch.tensor([-3, -1])), 10)
    assert unique.tolist() == [1, 3]
    unique, *_ = native.dedup(torch._efficientzerotensor(4, dtype=torch.int64), 10)
    assert unique.tolist() == [0]
    weight = torch.zeros(4, 2)
    native.index_add_(weight, torch._neg_view(torch.tensor([-1, -1])), torch.ones(2, 2))
    assert weight[1].tolist() == [2.0, 2.0] and weight.sum() == 4
    freed = torch.ones(2, 2)
    freed.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="storage does not hold"):  # PyTorch's kernel crashes on it
        native.index_add_(weight, torch.tensor([0, 1]), freed)
    assert weight.sum() == 4


@pytest.mark.parametrize("setting", ["compiled", "off", "two_threads"])
@pytest.mark.parametrize("freed", ["values", "weight"])
def test_index_add_refuses_freed_storage_whatever_runs(setting, freed, monkeypatch):
    """PyTorch's own index_add_ reads a freed storage raw and crashes the interpreter: refused
    before it runs, with the compiled loop, with the extension off and with more threads."""
    if setting == "off":
        monkeypatch.setenv("SHARDED_EMBEDDING_NATIVE", "0")
    elif setting == "two_threads":
        torch.set_num_threads(2)
    weight, values = torch.zeros(4, 2), torch.ones(2, 2)
    (values if freed == "values" else weight).untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="storage does not hold"):
        native.index_add_(weight, torch.tensor([0, 1]), values)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dim", [1, 3, 32, 64, 128, 130])
def test_index_select_is_torchs_bit_for_bit(dtype, index_dtype, dim):
    """Whole rows copied: the same bits as torch.index_select, into a new tensor or ``out``,
    rows repeated and in any order, for every row width (the 128/256/512-byte loops and the
    general one)."""
    g = torch.Generator().manual_seed(dim)
    table = torch.randn(300, dim, generator=g).to(dtype)
    rows = torch.randint(0, 300, (517,), generator=g).to(index_dtype)
    want = torch.index_select(table, 0, rows)
    assert torch.equal(native.index_select(table, rows), want)
    out = torch.full((517, dim), float("nan"), dtype=dtype)
    assert native.index_select(table, rows, out=out) is out
    assert torch.equal(out, want)
    assert native.index_select(table, rows[:0]).shape == (0, dim)


@needs_extension
def test_index_select_runs_the_compiled_loop_only_where_it_applies(monkeypatch):
    """The gather is the compiled one with one thread (the tensors plain memory), PyTorch's
    with more threads, with the extension turned off, for a table autograd records, and for
    layouts it does not take."""
    calls, real = [], native._scatter

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def gather(self, *args):
            calls.append(args)
            return real.gather(*args)

    monkeypatch.setattr(native, "_scatter", Spy())
    table, rows = torch.randn(10, 4), torch.tensor([3, 1, 3])
    want = table[rows]
    assert torch.equal(native.index_select(table, rows), want) and len(calls) == 1
    leaf = table.clone().requires_grad_()
    with torch.no_grad():
        assert torch.equal(native.index_select(leaf, rows), want) and len(calls) == 2
    others = [
        lambda: native.index_select(leaf, rows),  # autograd records it
        lambda: native.index_select(table.t().contiguous().t(), rows),  # not contiguous
        lambda: native.index_select(table.to(torch.int64), rows),  # a dtype it does not copy
        lambda: native.index_select(table, rows, out=torch.empty(4, 3).t()),  # out not contiguous
    ]
    for call in others:
        call()
    monkeypatch.setenv("SHARDED_EMBEDDING_NATIVE", "0")
    native.index_select(table, rows)
    monkeypatch.delenv("SHARDED_EMBEDDING_NATIVE")
    torch.set_num_threads(2)
    native.index_select(table, rows)
    assert len(calls) == 2
    assert native.index_select(leaf, rows).grad_fn is not None


@needs_extension
@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")  # torch's, for out_wrong_shape
@pytest.mark.parametrize("case", ["row_outside", "negative_row", "float_rows", "rows_2d", "out_aliases_the_table",
                                  "out_wrong_shape", "out_wrong_dtype", "zero_width"])
def test_index_select_takes_refuses_and_raises_as_torch_does(case):
    table, rows, out = torch.arange(12.0).view(4, 3), torch.tensor([0, 2]), torch.zeros(2, 3)
    if case in BAD_ROWS:
        rows = torch.tensor(BAD_ROWS[case])
    elif case == "rows_2d":
        rows = torch.tensor([[0, 2]])
    elif case == "out_aliases_the_table":
        out = table[1:3]
    elif case == "out_wrong_shape":
        out = torch.zeros(3, 3)
    elif case == "out_wrong_dtype":
        out = torch.zeros(2, 3, dtype=torch.float64)
    else:
        table, out = torch.zeros(4, 0), torch.zeros(2, 0)
    results = []
    for select in (lambda t, o: torch.index_select(t, 0, rows, out=o), lambda t, o: native.index_select(t, rows, o)):
        t = table.clone()
        o = t[1:3] if case == "out_aliases_the_table" else out.clone()
        try:
            select(t, o)
            results.append((None, t, o))
        except Exception as e:  # noqa: BLE001 - whatever torch raises, the same must come out
            results.append((type(e), t, o))
    (want_error, want_t, want_o), (got_error, got_t, got_o) = results
    assert got_error == want_error
    assert torch.equal(got_t, want_t) and got_o.shape == want_o.shape and torch.equal(got_o, want_o)


@needs_extension
def test_index_select_bumps_out_s_version():
    """Writing ``out`` counts as an in-place op for autograd (a saved ``out`` then raises in a
    backward, as after torch.index_select(out=))."""
    out = torch.zeros(2, 3)
    before = out._version
    native.index_select(torch.ones(4, 3), torch.tensor([0, 1]), out=out)
    assert out._version > before and out.sum() == 6


@pytest.mark.parametrize("setting", ["compiled", "off"])
@pytest.mark.parametrize("freed", ["table", "rows", "out"])
@pytest.mark.parametrize("shrink", [0, 8])
def test_index_select_never_reads_freed_storage(setting, freed, shrink, monkeypatch):
    """A tensor whose storage does not hold its elements (freed, or shrunk: PyTorch's own
    kernel read a shrunk table raw and crashed) is refused with RuntimeError, with the
    compiled loop available or not; nothing is read."""
    if setting == "off":
        monkeypatch.setenv("SHARDED_EMBEDDING_NATIVE", "0")
    tensors = {"table": torch.ones(400_000, 3), "rows": torch.tensor([0, 399_999]), "out": torch.zeros(2, 3)}
    tensors[freed].untyped_storage().resize_(shrink)
    with pytest.raises(RuntimeError):
        native.index_select(tensors["table"], tensors["rows"], out=tensors["out"])


# ----------------------------------------------------------------------------- the lookup's sums
def _lookup_with(setting: str, **kwargs) -> int:
    """`test_lookup.train_against_oracle` with the extension on ("1") or off ("0"); returns how
    many backward passes summed their gradients with `native.bag_sum`."""
    from tests.test_lookup import train_against_oracle

    real, calls = native.bag_sum, []

    def counted(*args):
        calls.append(1)
        return real(*args)

    native.bag_sum = counted
    try:
        with native_setting(setting):
            train_against_oracle(**kwargs)
    finally:
        native.bag_sum = real
    return len(calls)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("setting", [pytest.param("1", marks=needs_extension), "0"])
@pytest.mark.parametrize("training", ["fused_sgd", "fused_rowwise_adagrad", "sparse_sgd", "mirrored_adagrad"])
def test_lookup_with_and_without_the_extension_matches_the_oracle(world, setting, training):
    """The backward's gradient sum in one compiled pass (straight into the outbox) and in
    PyTorch's passes: both match nn.Embedding's training, whatever the optimizer, with
    duplicate ids (Zipf) and mirrored pages; the compiled pass runs exactly when it is on."""
    kwargs = dict(num_embeddings=45, dim=6, page_size=4, steps=3, skew="zipf", batch=(30, 17, 0))
    if training.startswith("fused"):
        kwargs["fused"] = {"name": training[len("fused_"):], "lr": 0.2}
        kwargs["optimizer"] = "rowwise_adagrad" if "rowwise" in training else "sgd"
    elif training == "mirrored_adagrad":
        kwargs["optimizer"] = "adagrad"
        if world > 1:
            kwargs["placement"] = [(p % world, (p + 1) % world) for p in range(12)]
    calls = run_ranks(world, _lookup_with, setting, **kwargs)
    if setting == "0":
        assert calls == [0] * world
    else:  # every backward on every rank (a rank without ids has no sums to make)
        assert calls == [3 if world == 1 or r < 2 else 0 for r in range(world)]


def _bags(n, unique, dim, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, unique, (n,), generator=g)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    perm = torch.argsort(inverse, stable=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]])
    return torch.randn(n, dim, generator=g), perm, offsets


@needs_extension
@pytest.mark.parametrize("dim", [1, 5, 16, 32, 64, 100, 128])
@pytest.mark.parametrize("split", ["none", "half", "all"])
def test_bag_sum_matches_embedding_bag(dim, split):
    grad, perm, offsets = _bags(300, 40, dim, dim)
    bags = offsets.numel()
    k = {"none": 0, "half": bags // 2, "all": bags}[split]
    first, rest = torch.full((k, dim), float("nan")), torch.full((bags - k, dim), float("nan"))
    for scale in (1.0, -0.25):
        assert native.bag_sum(grad, perm, offsets, scale, first, rest) is True
        want = torch.nn.functional.embedding_bag(perm, grad, offsets, mode="sum") * scale
        torch.testing.assert_close(torch.cat([first, rest]), want, rtol=1e-6, atol=1e-6)
    assert native.bag_sum(grad[:0], perm[:0], offsets[:0], 1.0, torch.zeros(0, dim), torch.zeros(0, dim)) is True


@needs_extension
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dim", [5, 16, 37])
def test_bag_sum_says_whether_every_value_is_finite(value, dim):
    """One inf or NaN anywhere (any column, the tail past a multiple of 16 included, a row of
    the first or of the rest part) is seen; so is a sum that overflows."""
    grad, perm, offsets = _bags(120, 30, dim, 1)
    first, rest = torch.empty(10, dim), torch.empty(offsets.numel() - 10, dim)
    for row, col in [(0, 0), (perm[-1], dim - 1), (perm[offsets[12]], dim // 2)]:
        bad = grad.clone()
        bad[row, col] = value
        assert native.bag_sum(bad, perm, offsets, 1.0, first, rest) is False
    huge = torch.full_like(grad, 3e38)
    assert native.bag_sum(huge, perm, offsets, 1.0, first, rest) is False  # bags of 2+ overflow
    assert native.bag_sum(grad, perm, offsets, 1.0, first, rest) is True


@needs_extension
def test_bag_sum_scales_each_term_as_embedding_bag_s_weights_do():
    """The terms are scaled before they are added, as the PyTorch path's per-sample weights
    scale them: sums that overflow only unscaled train alike with the compiled loops and
    without them (with more threads the lookup takes the PyTorch path)."""
    grad, perm, offsets = _bags(120, 30, 8, 4)
    grad = grad.abs() + 3e38  # finite, every sum of two or more overflows unscaled
    first, rest = torch.empty(10, 8), torch.empty(offsets.numel() - 10, 8)
    assert native.bag_sum(grad, perm, offsets, 1e-3, first, rest) is True
    want = torch.nn.functional.embedding_bag(perm, grad, offsets, mode="sum",
                                             per_sample_weights=torch.full((120,), 1e-3))
    torch.testing.assert_close(torch.cat([first, rest]), want, rtol=1e-6, atol=0)


@needs_extension
@pytest.mark.parametrize("case", ["perm_outside", "perm_negative", "offsets_not_increasing", "offsets_not_from_0",
                                  "offset_past_the_end", "no_bags_for_positions"])
def test_bag_sum_refuses_out_of_range_positions_writing_nothing(case):
    grad, perm, offsets = _bags(50, 10, 4, 2)
    if case == "perm_outside":
        perm = perm.clone()
        perm[7] = 50
    elif case == "perm_negative":
        perm = perm.clone()
        perm[0] = -1
    elif case == "offsets_not_increasing":
        offsets = offsets.clone()
        offsets[3] = offsets[2]
    elif case == "offsets_not_from_0":
        offsets = offsets.clone()
        offsets[0] = 1
    elif case == "offset_past_the_end":
        offsets = offsets.clone()
        offsets[-1] = 50
    else:
        offsets = offsets[:0]
    bags = offsets.numel()
    first, rest = torch.zeros(bags // 2, 4), torch.zeros(bags - bags // 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        native.bag_sum(grad, perm, offsets, 1.0, first, rest)
    assert first.abs().sum() == 0 and rest.abs().sum() == 0


@needs_extension
@pytest.mark.parametrize("case", ["grad_float64", "perm_int32", "rest_wrong_width", "parts_too_few_rows",
                                  "first_aliases_grad", "rest_aliases_perm", "first_aliases_offsets",
                                  "first_overlaps_rest", "first_is_rest", "rest_is_grad", "grad_not_contiguous",
                                  "freed_grad"])
def test_bag_sum_refuses_layouts_it_does_not_take(case):
    grad, perm, offsets = _bags(50, 10, 4, 3)
    bags = offsets.numel()
    first, rest = torch.zeros(2, 4), torch.zeros(bags - 2, 4)
    if case == "grad_float64":
        grad = grad.double()
    elif case == "perm_int32":
        perm = perm.int()
    elif case == "rest_wrong_width":
        rest = torch.zeros(bags - 2, 5)
    elif case == "parts_too_few_rows":
        rest = rest[1:]
    elif case == "first_aliases_grad":
        first = grad[:2]
    elif case == "rest_aliases_perm":  # (the loop would overwrite positions it still reads, then crash)
        rest = torch.zeros(64 * bags, dtype=torch.int64)
        perm = rest[:50]
        rest = rest.view(torch.float32)[: (bags - 2) * 4].view(bags - 2, 4)
    elif case == "first_aliases_offsets":
        first = offsets.view(torch.float32)[:8].view(2, 4)
    elif case == "first_overlaps_rest":
        both = torch.zeros(bags + 1, 4)
        first, rest = both[:2], both[1 : bags - 1]
    elif case == "first_is_rest":  # (one tensor passed twice: every bag would land in it)
        grad, perm, offsets = _bags(50, 50, 4, 3)
        first = rest = torch.zeros(offsets.numel() // 2, 4)
        offsets = offsets[: 2 * first.shape[0]]
    elif case == "rest_is_grad":  # (the sums would read rows they overwrote)
        grad, perm, offsets = torch.randn(6, 4), torch.arange(6), torch.arange(6)
        first, rest = torch.zeros(0, 4), grad
    elif case == "grad_not_contiguous":
        grad = torch.randn(4, 50).t()
    else:
        grad.untyped_storage().resize_(0)
    with pytest.raises(TypeError, match="bag_sum: expected"):
        native.bag_sum(grad, perm, offsets, 1.0, first, rest)
