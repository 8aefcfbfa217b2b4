"""Bad input, bad construction and non-finite gradients in a ShardedEmbeddingBagCollection:
every rank raises the same clear error in the same call, nothing is updated, the next call works."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sharded_embedding import NonFiniteGradientError, ShardedEmbeddingBagCollection, TableConfig
from tests.harness import run_ranks
from tests.oracle import rank_world

SPECS = [
    TableConfig(name="items", num_embeddings=20, embedding_dim=4, page_size=3, feature_names=["item", "history"],
                fused_optimizer={"name": "adagrad", "lr": 0.5}),
    TableConfig(name="users", num_embeddings=30, embedding_dim=2, page_size=4, pooling="mean", feature_names=["user"],
                placement=[(0, 1)] + [p % 2 for p in range(1, 8)]),
    TableConfig(name="clicks", num_embeddings=10, embedding_dim=2, page_size=2, pooling=None, feature_names=["click"],
                fused_optimizer={"name": "sgd", "lr": 0.5}),
]


def _good(rank: int) -> dict:
    return {
        "item": (torch.tensor([1, 2, 19, 3]), torch.tensor([0, 1, 3])),
        "history": (torch.tensor([rank, 5, 5]), torch.tensor([0, 0, 2]), torch.tensor([0.5, 1.0, 2.0])),
        "user": (torch.tensor([29, 0, 7]), torch.tensor([0, 2, 2])),
        "click": (torch.tensor([9, 1]), torch.tensor([0, 1, 2])),
    }


def _bad(case: str, features: dict) -> dict:
    f = dict(features)
    v, o = f["user"]
    if case == "float_values":
        f["user"] = (v.float(), o)
    elif case == "int16_values":
        f["user"] = (v.to(torch.int16), o)
    elif case == "out_of_range":
        f["user"] = (torch.tensor([29, 30, 1]), o)
    elif case == "negative":
        f["click"] = (torch.tensor([-1, 1]), f["click"][1])
    elif case == "offsets_not_zero":
        f["user"] = (v, torch.tensor([1, 2, 2]))
    elif case == "offsets_decrease":
        f["user"] = (v, torch.tensor([0, 2, 1]))
    elif case == "offsets_past_end":
        f["user"] = (v, torch.tensor([0, 2, 4]))
    elif case == "float_offsets":
        f["user"] = (v, o.float())
    elif case == "lengths_negative":
        f["user"] = {"values": v, "lengths": torch.tensor([2, -1, 2])}
    elif case == "lengths_sum":
        f["user"] = {"values": v, "lengths": torch.tensor([2, 0, 2])}
    elif case == "offsets_and_lengths":
        f["user"] = {"values": v, "offsets": o, "lengths": torch.tensor([2, 0, 1])}
    elif case == "weights_shape":
        f["history"] = (*f["history"][:2], torch.tensor([1.0, 2.0]))
    elif case == "weights_dtype":
        f["history"] = (*f["history"][:2], torch.tensor([1, 2, 3]))
    elif case == "weights_float64":
        f["history"] = (*f["history"][:2], torch.ones(3, dtype=torch.float64))
    elif case == "list_values":
        f["user"] = ([1, 2, 3], o)
    elif case == "empty_list_values":
        f["user"] = ([], o)
    elif case == "weights_nan":
        f["history"] = (*f["history"][:2], torch.tensor([1.0, float("nan"), 3.0]))
    elif case == "weights_grad":
        f["history"] = (*f["history"][:2], torch.ones(3, requires_grad=True))
    elif case == "weights_on_mean":
        f["user"] = (v, o, torch.ones(3))
    elif case == "missing":
        del f["click"]
    elif case == "unknown":
        f["colour"] = (v, o)
    elif case == "batch_mismatch":
        f["item"] = (torch.tensor([1, 2]), torch.tensor([0, 1]))
    elif case == "not_a_mapping":
        return [f["item"]]
    elif case == "bad_tuple":
        f["user"] = (v,)
    elif case == "two_dim_values":
        f["user"] = (v.view(3, 1), o)
    elif case == "values_without_bags":
        f["user"] = (v, torch.tensor([], dtype=torch.int64))
    elif case in ("freed_values", "freed_offsets", "freed_weights"):  # a shape over 0 bytes: PyTorch's
        v, o, *w = f["history"]                                          # CPU kernels read it raw and crash
        v, o, w = v.clone(), o.clone(), w[0].clone()
        {"freed_values": v, "freed_offsets": o, "freed_weights": w}[case].untyped_storage().resize_(0)
        f["history"] = (v, o, w)
    elif case == "meta_values":  # no data to read: raised by torch on this rank alone, before
        f["user"] = (v.to("meta"), o)
    elif case == "malformed_kjt":  # a KeyedJaggedTensor whose own to_dict raises (lengths past the values)
        return _MalformedKJT(list(f))
    elif case == "kjt_repeated_keys":  # torchrec's to_dict keeps the last of a repeated key, silently
        return _RepeatedKeysKJT(f)
    else:
        raise ValueError(case)
    return f


CASES = [
    ("float_values", TypeError, "feature 'user': values of dtype torch.float32; they must be torch.int64 or "
                                "torch.int32"),
    ("int16_values", TypeError, "feature 'user': values of dtype torch.int16; they must be torch.int64 or "
                                "torch.int32 (what torch.nn.EmbeddingBag takes)"),
    ("out_of_range", IndexError, "feature 'user': index 30 is out of range for table 'users' of 30 rows (valid: 0..29)"),
    ("negative", IndexError, "feature 'click': index -1 is out of range for table 'clicks'"),
    ("offsets_not_zero", ValueError, "offsets must start at 0"),
    ("offsets_decrease", ValueError, "offsets must not decrease"),
    ("offsets_past_end", ValueError, "offsets go up to 4, past the 3 values"),
    ("float_offsets", TypeError, "offsets of dtype torch.float32"),
    ("lengths_negative", ValueError, "negative lengths"),
    ("lengths_sum", ValueError, "lengths add up to 4, but there are 3 values"),
    ("offsets_and_lengths", ValueError, "'offsets' or 'lengths' (one of them)"),
    ("weights_shape", ValueError, "one weight per value is (3,)"),
    ("weights_dtype", TypeError, "per_sample_weights of dtype torch.int64"),
    ("weights_float64", TypeError, "per_sample_weights of dtype torch.float64; they must be torch.float32"),
    ("list_values", TypeError, "feature 'user': values must be a torch.Tensor, got list"),
    ("empty_list_values", TypeError, "feature 'user': values must be a torch.Tensor, got list"),
    ("weights_nan", ValueError, "per_sample_weights hold inf or NaN"),
    ("weights_grad", ValueError, "pass weights.detach()"),
    ("weights_on_mean", ValueError, "table 'users' has pooling='mean': weights need pooling='sum'"),
    ("missing", ValueError, "features ['click'] are missing"),
    ("unknown", ValueError, "features ['colour'] are not read by any table"),
    ("batch_mismatch", ValueError, "different numbers of bags"),
    ("not_a_mapping", TypeError, "features must be a mapping"),
    ("bad_tuple", TypeError, "feature 'user': expected (values, offsets)"),
    ("two_dim_values", ValueError, "feature 'user': values must be 1-D, got shape (3, 1)"),
    ("values_without_bags", ValueError, "offsets are empty (no bags) but there are 3 values"),
    ("meta_values", ValueError, "the input could not be read: NotImplementedError"),
    ("freed_values", ValueError, "feature 'history': the values tensor's storage does not hold its values"),
    ("freed_offsets", ValueError, "feature 'history': the offsets tensor's storage does not hold its values"),
    ("freed_weights", ValueError, "feature 'history': the per_sample_weights tensor's storage does not hold"),
    ("malformed_kjt", ValueError, "the input could not be read: RuntimeError: split_with_sizes expects"),
    ("kjt_repeated_keys", ValueError, "the KeyedJaggedTensor repeats the keys ['item']: each feature once"),
]


class _RepeatedKeysKJT:
    """A KeyedJaggedTensor built with keys=["item", "item", ...]: its to_dict has each key once."""

    def __init__(self, features):
        self._features = features

    def keys(self):
        return ["item", *self._features]

    def to_dict(self):
        return dict(self._features)


class _MalformedKJT:
    """What torchrec's KeyedJaggedTensor does when its lengths add up to more than its values."""

    def __init__(self, keys):
        self._keys = keys

    def keys(self):
        return self._keys

    def lengths(self):
        return torch.tensor([3] * len(self._keys))

    def values(self):
        return torch.tensor([1, 2])

    def to_dict(self):
        raise RuntimeError("split_with_sizes expects split_sizes to sum exactly to 2 (input tensor's size at "
                           "dimension 0), but got split_sizes=[3, 3, 3, 3]")


def _state(ebc) -> list[torch.Tensor]:
    out = []
    for name in ebc.tables:
        t = ebc.tables[name]
        out.append(t.weight.detach().clone())
        if t.optimizer is not None:
            out += [b.detach().clone() for b in t.optimizer.buffers()]
    return out


def _a_good_step_works(ebc, table_rows):
    """Forward matches nn.EmbeddingBag on the tables as they are; backward runs."""
    rank, _ = rank_world()
    features = _good(rank)
    out = ebc(features)
    items = nn.EmbeddingBag.from_pretrained(table_rows["items"], mode="sum")
    want = items(*features["item"])
    torch.testing.assert_close(out["item"], want)
    sum(v.sum() for v in out.values()).backward()
    ebc.tables["users"].weight.grad = None


def _bad_input_on_one_rank(case: str, bad_rank: int):
    rank, world = rank_world()
    ebc = ShardedEmbeddingBagCollection(SPECS)
    before = _state(ebc)
    rows = {name: ebc.tables[name].full_table() for name in ebc.tables}
    features = _bad(case, _good(rank)) if rank == bad_rank else _good(rank)
    expected = dict((c, (e, m)) for c, e, m in CASES)[case]
    with pytest.raises(expected[0]) as err:
        ebc(features)
    message = str(err.value)
    assert f"rank {bad_rank}: " in message and expected[1] in message, message
    assert "No rank looked anything up" in message
    assert all(torch.equal(a, b) for a, b in zip(before, _state(ebc)))
    assert all(ebc.tables[n].weight.grad is None for n in ebc.tables)
    _a_good_step_works(ebc, rows)
    return message


@pytest.mark.parametrize("case", [c for c, _, _ in CASES])
def test_bad_input_on_one_rank_raises_on_every_rank(case):
    messages = run_ranks(2, _bad_input_on_one_rank, case, 1)
    assert messages[0] == messages[1]


def _different_errors_on_two_ranks():
    rank, _ = rank_world()
    ebc = ShardedEmbeddingBagCollection(SPECS)
    features = _bad("out_of_range" if rank == 0 else "float_values", _good(rank))
    with pytest.raises(TypeError) as err:  # the lowest kind wins: a type error before a range error
        ebc(features)
    return str(err.value)


def test_every_rank_names_every_rank_error():
    messages = run_ranks(2, _different_errors_on_two_ranks)
    assert messages[0] == messages[1]
    assert "rank 0: feature 'user': index 30" in messages[0] and "rank 1: feature 'user': values of dtype" in messages[0]


def _last_offset_mismatch():
    rank, _ = rank_world()
    ebc = ShardedEmbeddingBagCollection(SPECS, include_last_offset=True)
    features = {f: (v, torch.cat([o, torch.tensor([v.numel()])]), *w) for f, (v, o, *w) in _good(rank).items()}
    out = ebc(features)  # offsets with the final end are fine
    assert out["item"].shape == (3, 4)
    if rank == 0:
        features["user"] = (features["user"][0], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="must end with the number of values \\(3\\) under include_last_offset=True"):
        ebc(features)


def test_include_last_offset_checks_the_final_end():
    run_ranks(2, _last_offset_mismatch)


def _grad_modes_differ():
    rank, _ = rank_world()
    ebc = ShardedEmbeddingBagCollection(SPECS)
    before = _state(ebc)
    with pytest.raises(RuntimeError, match="the ranks differ in which tables will run the backward"):
        if rank == 0:
            with torch.no_grad():
                ebc(_good(rank))
        else:
            ebc(_good(rank))
    ebc.tables["items"].weight.requires_grad_(rank == 0)  # frozen on one rank only
    with pytest.raises(RuntimeError, match=r"ranks \[0\]: tables \['items', 'users', 'clicks'\]"):
        ebc(_good(rank))
    ebc.tables["items"].weight.requires_grad_(False)  # frozen everywhere: fine
    out = ebc(_good(rank))
    sum(v.sum() for v in out.values()).backward()
    assert torch.equal(ebc.tables["items"].weight, before[0])


def test_ranks_that_differ_in_grad_mode_raise_together():
    run_ranks(2, _grad_modes_differ)


def _storage_replaced_on_one_rank():
    rank, _ = rank_world()
    ebc = ShardedEmbeddingBagCollection(SPECS)
    if rank == 1:
        ebc.tables["clicks"].weight = nn.Parameter(torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="rank 1: table 'clicks': the table's storage parameter `weight` was replaced"):
        ebc(_good(rank))


def test_a_refused_lookup_raises_on_every_rank():
    run_ranks(2, _storage_replaced_on_one_rank)


def _bad_construction(case: str):
    rank, _ = rank_world()
    specs = [TableConfig(name="a", num_embeddings=10, embedding_dim=2, page_size=3, feature_names=["x", "y"]),
             TableConfig(name="b", num_embeddings=12, embedding_dim=2, page_size=3)]
    kwargs = {}
    if case == "dims_differ":
        specs[1] = TableConfig(name="b", num_embeddings=12, embedding_dim=2 + rank, page_size=3)
    elif case == "feature_twice":
        specs[1] = TableConfig(name="b", num_embeddings=12, embedding_dim=2, page_size=3, feature_names=["y"])
    elif case == "table_twice":
        specs[1] = TableConfig(name="a", num_embeddings=12, embedding_dim=2, page_size=3, feature_names=["z"])
    elif case == "pooling":
        specs[1] = TableConfig(name="b", num_embeddings=12, embedding_dim=2, page_size=3, pooling="max")
    elif case == "reserved_name":
        specs[1] = TableConfig(name="forward", num_embeddings=12, embedding_dim=2, page_size=3)
    elif case == "one_rank_bad" and rank == 1:
        specs[1] = TableConfig(name="b", num_embeddings=12, embedding_dim=2, page_size=3, feature_names=[""])
    elif case == "fused_unknown":
        specs[1] = TableConfig(name="b", num_embeddings=12, embedding_dim=2, page_size=3,
                               fused_optimizer={"name": "lion"})
    elif case == "no_tables":
        specs = []
    elif case == "pool_on":
        kwargs["pool_on"] = "nowhere"
    elif case == "comm_dtype_differs":
        kwargs["comm_dtype"] = torch.bfloat16 if rank == 0 else None
    with pytest.raises(ValueError) as err:
        ShardedEmbeddingBagCollection(specs, **kwargs)
    return str(err.value)


@pytest.mark.parametrize("case, message", [
    ("dims_differ", "ranks were given different arguments: tables[1] embedding_dim: rank 0: 2, rank 1: 3"),
    ("feature_twice", "feature 'y' is read by tables 'a' and 'b': a feature reads one table"),
    ("table_twice", "two tables are named 'a'"),
    ("pooling", "pooling='max' is not one of ['sum', 'mean', None]"),
    ("reserved_name", "table name 'forward' is taken by torch.nn.Module"),
    ("one_rank_bad", "rank 1: table 'b': feature name '' must be a non-empty string"),
    ("fused_unknown", "fused_optimizer name 'lion' is not one of"),
    ("no_tables", "tables must be a non-empty list of TableConfig"),
    ("pool_on", "pool_on='nowhere' is not one of ['auto', 'requester', 'owner']"),
    ("comm_dtype_differs", "ranks were given different arguments"),
])
def test_bad_construction_raises_on_every_rank(case, message):
    for m in run_ranks(2, _bad_construction, case):
        assert message in m, m


def _non_finite_gradient(scaled: bool):
    """Rank 1's loss overflows: no rank changes any row; with a GradScaler the step is skipped
    on every rank and the scaler lowers its scale."""
    rank, _ = rank_world()
    ebc = ShardedEmbeddingBagCollection(SPECS)
    before = _state(ebc)
    out = ebc(_good(rank))
    loss = sum(v.sum() for v in out.values()) * (float("inf") if rank == 1 else 1.0)
    if not scaled:
        with pytest.raises(NonFiniteGradientError,
                           match=r"ShardedEmbeddingBagCollection: the gradient of one or more of its tables .* "
                                 r"rank\(s\) \[1\]"):
            loss.backward()
    else:
        from sharded_embedding import use_grad_scaler

        scaler = torch.amp.GradScaler("cpu", init_scale=1024)
        assert use_grad_scaler(ebc, scaler) == ["tables.items", "tables.users", "tables.clicks"]
        opt = torch.optim.SGD([ebc.tables["users"].weight], lr=0.1)
        scaler.scale(loss).backward()
        scaler.step(opt)  # the non-fused table's gradient is NaN on every rank: skipped
        scaler.update()
        assert scaler.get_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, _state(ebc)))


@pytest.mark.parametrize("scaled", [False, True])
def test_a_non_finite_gradient_changes_no_row(scaled):
    run_ranks(2, _non_finite_gradient, scaled)


def test_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedEmbeddingBagCollection(SPECS)


def _collections_called_out_of_order():
    rank, _ = rank_world()
    one = [TableConfig(name="t", num_embeddings=20, embedding_dim=3, page_size=5, feature_names=["f"])]
    a, b = ShardedEmbeddingBagCollection(one), ShardedEmbeddingBagCollection(one)
    before = (a.tables["t"].full_table(), b.tables["t"].full_table())
    features = {"f": (torch.tensor([3, 17, 1]), torch.tensor([0, 2]))}
    first = a if rank == 0 else b
    with pytest.raises(RuntimeError) as err:
        sum(v.sum() for v in first(features).values()).backward()
    assert torch.equal(a.tables["t"].full_table(), before[0]) and torch.equal(b.tables["t"].full_table(), before[1])
    assert a.tables["t"].weight.grad is None and b.tables["t"].weight.grad is None
    a(features), b(features)  # in the same order: fine again
    return str(err.value)


def test_ranks_calling_different_collections_raise_on_every_rank():
    messages = run_ranks(2, _collections_called_out_of_order)
    assert messages[0] == messages[1]
    # each collection is numbered after its table (a's table n, a n + 1, b's table n + 2, b n + 3;
    # n counts the tables this worker process made before)
    found = re.search(r"the ranks called the lookups of different tables \(rank 0: table #(\d+) \(a "
                      r"ShardedEmbeddingBagCollection of tables t\), rank 1: table #(\d+) \(a ShardedEmbeddingBag",
                      messages[0])
    assert found and int(found[2]) - int(found[1]) == 2, messages[0]
    assert "No rank looked anything up" in messages[0]


def _table_beside_its_collection(transport):
    """Rank 0 calls the collection, rank 1 one of its tables on its own, after both have been
    used (their requests had different widths when each kept its own capacity: gloo aborted
    rank 1, which received more than it expected)."""
    rank, _ = rank_world()
    tables = [TableConfig(name="a", num_embeddings=1000, embedding_dim=4, page_size=16, feature_names=["f"]),
              TableConfig(name="b", num_embeddings=500, embedding_dim=4, page_size=16, feature_names=["g"])]
    ebc = ShardedEmbeddingBagCollection(tables, transport=transport)
    big = torch.arange(0, 1000, 3)
    features = {"f": (big, torch.tensor([0, 100])), "g": (big % 500, torch.tensor([0, 7]))}
    ebc(features)
    ebc.tables["a"](torch.tensor([1, 2]))
    before = {n: ebc.tables[n].full_table() for n in ("a", "b")}
    with pytest.raises(RuntimeError) as err:
        if rank == 0:
            sum(v.sum() for v in ebc(features).values()).backward()
        else:
            ebc.tables["a"](torch.tensor([5, 900, 17])).sum().backward()
    assert all(torch.equal(ebc.tables[n].full_table(), before[n]) for n in before)
    out = ebc(features)  # the same call on every rank: the group goes on
    assert out["f"].shape == (2, 4)
    return str(err.value)


@pytest.mark.parametrize("transport", ["process_group", "shared_memory"])
def test_a_table_called_beside_its_collection_raises_on_every_rank(transport):
    messages = run_ranks(2, _table_beside_its_collection, transport)
    assert messages[0] == messages[1]
    assert "the ranks called the lookups of different tables" in messages[0], messages[0]
    found = re.search(r"rank 0: table #(\d+) \(a ShardedEmbeddingBagCollection of tables a, b\), "
                      r"rank 1: table #(\d+) \(table 'a' of collection #(\d+)\)", messages[0])
    assert found and found[1] == found[3], messages[0]


def _copy_beside_its_original(transport):
    """copy.deepcopy of a collection (an EMA copy) is a collection of its own on the group: a
    rank calling the copy while another calls the original raises on every rank, also after
    the original's requests outgrew the copy's; nothing changes and both go on."""
    rank, _ = rank_world()
    tables = [TableConfig(name="a", num_embeddings=1000, embedding_dim=4, page_size=16, feature_names=["f"],
                          fused_optimizer={"name": "sgd", "lr": 0.1})]
    ebc = ShardedEmbeddingBagCollection(tables, transport=transport)
    ema = copy.deepcopy(ebc)
    big = {"f": (torch.arange(0, 1000), torch.tensor([0, 600]))}
    sum(v.sum() for v in ebc(big).values()).backward()
    before = (ebc.tables["a"].full_table(), ema.tables["a"].full_table())
    small = {"f": (torch.tensor([1, 500, 999]), torch.tensor([0, 1]))}
    with pytest.raises(RuntimeError) as err:
        sum(v.sum() for v in (ebc if rank == 0 else ema)(small).values()).backward()
    assert torch.equal(ebc.tables["a"].full_table(), before[0]) and torch.equal(ema.tables["a"].full_table(), before[1])
    out = ema(small)["f"]  # the same call on every rank: fine again, the copy's own rows
    assert torch.equal(out, torch.stack([before[1][1], before[1][500] + before[1][999]]))
    return str(err.value)


@pytest.mark.parametrize("transport", ["process_group", "shared_memory"])
def test_a_copy_called_beside_its_original_raises_on_every_rank(transport):
    messages = run_ranks(2, _copy_beside_its_original, transport)
    assert messages[0] == messages[1]
    found = re.search(r"rank 0: table #(\d+) \(a ShardedEmbeddingBagCollection of tables a\), "
                      r"rank 1: table #(\d+) \(a copy of collection #(\d+)\)", messages[0])
    assert found and found[1] == found[3], messages[0]


def _equal_written_differently():
    rank = dist.get_rank()
    placement = [0, 1, 0, 1] if rank == 0 else (0, 1, 0, 1)
    fused = {"name": "sgd", "lr": 1} if rank == 0 else {"lr": 1.0, "name": "sgd"}
    specs = [TableConfig(name="a", num_embeddings=12, embedding_dim=2, page_size=3, placement=placement,
                         fused_optimizer=fused)]
    ShardedEmbeddingBagCollection(specs)
    return True


def test_equal_arguments_written_differently_agree():
    """A placement list or tuple, an optimizer's keys in another order, 1 or 1.0: the same
    collection on every rank, not 'different arguments' (a fresh user's report)."""
    assert run_ranks(2, _equal_written_differently) == [True, True]


def _converted_collection():
    """A collection converted with .double() took float32 per_sample_weights and refused
    float64 ones, and pooled means with float32 factors; one table converted alone raised on one
    rank and left the other waiting. Now: the table's dtype for weights and means, as
    nn.EmbeddingBag of that dtype (both pooling ways), and a mixed collection refused on every
    rank (converted on rank 1 only)."""
    from sharded_embedding import initial_rows

    rank, _ = rank_world()
    v, o = torch.tensor([1, 5, 9, 2, 13, 17, 3]), torch.tensor([0, 3])
    w = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for pool_on in ("requester", "owner"):
        ebc = ShardedEmbeddingBagCollection([TableConfig("t", 20, 4, 4), TableConfig("m", 20, 4, 4, pooling="mean",
                                                                                    seed=1)], pool_on=pool_on).double()
        refs = {}
        for name, mode, seed in (("t", "sum", 0), ("m", "mean", 1)):
            refs[name] = nn.EmbeddingBag(20, 4, mode=mode).double()
            with torch.no_grad():
                refs[name].weight.copy_(initial_rows(seed, 4, 0, 20).double())
        out = ebc({"t": (v, o, w), "m": (v, o)})
        torch.testing.assert_close(out["t"], refs["t"](v, o, per_sample_weights=w), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out["m"], refs["m"](v, o), rtol=1e-13, atol=1e-13)
        with pytest.raises(TypeError, match=r"per_sample_weights of dtype torch.float32; they must be torch.float64"):
            ebc({"t": (v, o, w.float()), "m": (v, o)})
    ebc = ShardedEmbeddingBagCollection([TableConfig("a", 20, 4, 4), TableConfig("b", 20, 4, 4)])
    if rank == 1:
        ebc.tables["b"].double()
    with pytest.raises(RuntimeError, match=r"tables have different dtypes \(a: torch.float32, b: torch.float64\): "
                                           r"convert the collection as a whole"):
        ebc({"a": (v, o), "b": (v, o)})
    return True


def test_a_converted_collection_pools_in_its_dtype_and_a_mixed_one_is_refused():
    assert run_ranks(2, _converted_collection) == [True, True]


def _overflow_in_the_owners_sum(pool_on: str, optimizer: str):
    """Rank 1's per-sample weight (1e25) and its bag's gradient (1e19) are both finite; their
    product, each id's gradient, is not. Pooled on the requester that product is summed there
    and checked; pooled on the owner it is formed there, after the exchange's check: the
    requester's bound must flag it, or the owner writes inf rows (as it did)."""
    rank, _ = rank_world()
    ebc = ShardedEmbeddingBagCollection([TableConfig("a", 1000, 32, 64, pooling="sum", feature_names=["f"],
                                                     fused_optimizer={"name": optimizer, "lr": 0.1})], pool_on=pool_on)
    values, offsets = torch.tensor([1, 2, 900, 3, 5, 700]), torch.tensor([0, 2, 4])
    weights = torch.ones(6)
    if rank == 1:
        weights[2] = 1e25
    before = ebc.tables["a"].full_table()
    out = ebc({"f": (values, offsets, weights)})
    with pytest.raises(NonFiniteGradientError, match=r"rank\(s\) \[1\]"):
        (out["f"] * 1e19).sum().backward()
    assert torch.equal(ebc.tables["a"].full_table(), before)
    out = ebc({"f": (values, offsets, torch.ones(6))})  # the next step trains
    out["f"].sum().backward()
    after = ebc.tables["a"].full_table()
    assert not torch.equal(after, before) and torch.isfinite(after).all()


@pytest.mark.parametrize("pool_on", ["owner", "auto", "requester"])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_an_overflow_formed_on_the_owner_changes_no_row(pool_on, optimizer):
    run_ranks(2, _overflow_in_the_owners_sum, pool_on, optimizer)
