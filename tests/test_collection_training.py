"""A ShardedEmbeddingBagCollection in a training loop: input forms (lengths, final offsets,
int32, KeyedJaggedTensor), empty bags and batches, bf16/fp16 on the wire, DCP checkpoints
that reshard, and DDP for the dense part, each against the single-process oracle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig
from tests.bag_oracle import BagOracle, as_input, make_bags, table_configs
from tests.harness import run_ranks
from tests.oracle import assert_replicas_identical, rank_world, recording_backend
from tests.test_collection import MIXED, train_collection_against_oracle


@pytest.mark.parametrize("form", ["lengths", "last_offset", "int32"])
def test_every_input_form_matches_the_oracle(form):
    run_ranks(2, train_collection_against_oracle, MIXED, form=form, steps=2)


@pytest.mark.parametrize("pool_on", ["requester", "owner"])
def test_empty_bags_and_empty_batches(pool_on):
    # rank 0 has no bags at all, rank 1 many empty ones (bags of 0-2 ids), rank 2 a few
    run_ranks(3, train_collection_against_oracle, MIXED, batch=(0, 9, 2), max_len=2, pool_on=pool_on, steps=3)


def test_a_rank_with_nothing_in_any_bag():
    run_ranks(2, train_collection_against_oracle, MIXED, batch=(4,), max_len=0, steps=2)


# --------------------------------------------------------------------------- KeyedJaggedTensor
class StandInJaggedTensor:
    """TorchRec's JaggedTensor as the collection reads it (values, lengths, weights_or_none)."""

    def __init__(self, values, lengths, weights=None):
        self._v, self._l, self._w = values, lengths, weights

    def values(self):
        return self._v

    def lengths(self):
        return self._l

    def weights_or_none(self):
        return self._w


class StandInKeyedJaggedTensor(StandInJaggedTensor):
    """TorchRec's KeyedJaggedTensor as the collection reads it (keys, to_dict; values, lengths
    and weights_or_none of every key, one after the other)."""

    def __init__(self, keys, values, lengths, weights=None):
        super().__init__(values, lengths, weights)
        self._keys = list(keys)

    def keys(self):
        return self._keys

    def to_dict(self):
        if self._l.numel() == 0:  # as torchrec 1.8's does on an empty batch
            raise IndexError("tuple index out of range")
        out, at, stride = {}, 0, self._l.numel() // len(self._keys)
        for i, k in enumerate(self._keys):
            lengths = self._l[i * stride : (i + 1) * stride]
            n = int(lengths.sum())
            w = self._w[at : at + n] if self._w is not None else None
            out[k] = StandInJaggedTensor(self._v[at : at + n], lengths, w)
            at += n
        return out


def _kjt_classes() -> list[str]:
    try:
        import torchrec  # noqa: F401  (optional: the stand-in runs everywhere)
        return ["stand-in", "torchrec"]
    except ImportError:
        return ["stand-in"]


def _kjt_parts(kind: str, keys, bags):
    """(the KeyedJaggedTensor class of ``kind``, values, lengths) of ``bags`` ({key: (values,
    bag starts, weights)}), keys one after the other."""
    values = torch.cat([bags[f][0] for f in keys])
    lengths = torch.cat([torch.diff(torch.cat([bags[f][1], torch.tensor([bags[f][0].numel()])])) for f in keys])
    if kind == "torchrec":
        from torchrec import KeyedJaggedTensor
        return KeyedJaggedTensor, values, lengths
    return StandInKeyedJaggedTensor, values, lengths


def _kjt_matches_the_dict_form(kind: str):
    rank, _ = rank_world()
    configs = table_configs(MIXED)
    ebc = ShardedEmbeddingBagCollection(configs)
    table_of = {f: c for c in configs for f in c.feature_names}
    keys = ebc.feature_names
    bags = {f: make_bags(table_of[f].num_embeddings, rank, 0, i, batch=5, max_len=4, weighted=True)
            for i, f in enumerate(keys)}
    for f in keys:  # weights only where the table sums; ones elsewhere are dropped below
        if table_of[f].pooling != "sum":
            bags[f] = (bags[f][0], bags[f][1], None)
    KJT, values, lengths = _kjt_parts(kind, keys, bags)
    # A KeyedJaggedTensor has weights for every key or none: one without, one with weights
    # only on a table that sums.
    plain = KJT(keys=keys, values=values, lengths=lengths)
    with torch.no_grad():
        got = ebc(plain)
        want = ebc({f: as_input((b[0], b[1], None)) for f, b in bags.items()})
    for f in keys:
        torch.testing.assert_close(got[f], want[f])
    summed = [f for f in keys if table_of[f].pooling == "sum"]
    weights = torch.cat([bags[f][2] if f in summed else torch.ones(bags[f][0].numel()) for f in keys])
    sub = ShardedEmbeddingBagCollection(table_configs([dict(s, feature_names=[f for f in s["feature_names"] if f in summed])
                                                       for s in MIXED if s["pooling"] == "sum"]))
    sub_keys = sub.feature_names
    sub_values = torch.cat([bags[f][0] for f in sub_keys])
    sub_lengths = torch.cat([torch.diff(torch.cat([bags[f][1], torch.tensor([bags[f][0].numel()])])) for f in sub_keys])
    sub_weights = torch.cat([bags[f][2] for f in sub_keys])
    got = sub(KJT(keys=sub_keys, values=sub_values, lengths=sub_lengths, weights=sub_weights))
    oracle = BagOracle([c for c in sub.configs], optimizer=None)
    want = oracle.forward({f: bags[f] for f in sub_keys})
    for f in sub_keys:
        torch.testing.assert_close(got[f], want[f])
    sum(v.sum() for v in got.values()).backward()
    assert weights.numel() == values.numel()


@pytest.mark.parametrize("kind", _kjt_classes())
def test_keyed_jagged_tensor_input(kind):
    run_ranks(2, _kjt_matches_the_dict_form, kind)


def _empty_kjt_batch_on_one_rank(kind: str):
    """Rank 1's KeyedJaggedTensor holds no bags (an epoch's last, empty batch); torchrec's own
    ``to_dict`` raises IndexError on it, which used to stop that rank alone."""
    rank, _ = rank_world()
    configs = table_configs(MIXED)
    ebc = ShardedEmbeddingBagCollection(configs)
    table_of = {f: c for c in configs for f in c.feature_names}
    keys = ebc.feature_names
    batch = 4 if rank == 0 else 0
    bags = {f: make_bags(table_of[f].num_embeddings, rank, 0, i, batch=batch, max_len=3)
            for i, f in enumerate(keys)}
    KJT, values, lengths = _kjt_parts(kind, keys, bags)
    kjt = KJT(keys=keys, values=values, lengths=lengths)
    with torch.no_grad():
        want = ebc({f: as_input((b[0], b[1], None)) for f, b in bags.items()})
    got = ebc(kjt)
    for f in keys:
        assert got[f].shape == want[f].shape
        torch.testing.assert_close(got[f], want[f])
    sum(v.sum() for v in got.values()).backward()


@pytest.mark.parametrize("kind", _kjt_classes())
def test_an_empty_keyed_jagged_tensor_batch_on_one_rank(kind):
    run_ranks(2, _empty_kjt_batch_on_one_rank, kind)


# --------------------------------------------------------------------------- reduced precision
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _wire_rounding(comm_dtype, pool_on):
    """Each vector (a row, or a partial sum) is rounded once on the wire: a pooled output is
    within u * sum |w_i| |row_i| of the exact one (u: the wire dtype's unit roundoff)."""
    rank, _ = rank_world()
    specs = [s for s in MIXED if s["pooling"] == "sum"]
    configs = table_configs(specs)
    ebc = ShardedEmbeddingBagCollection(configs, comm_dtype=comm_dtype, pool_on=pool_on)
    oracle = BagOracle(configs, optimizer=None)
    table_of = {f: c for c in configs for f in c.feature_names}
    bags = {f: make_bags(table_of[f].num_embeddings, rank, 0, i, batch=7, max_len=6, weighted=True)
            for i, f in enumerate(ebc.feature_names)}
    want = oracle.forward(bags)
    u = UNIT_ROUNDOFF[comm_dtype]
    # Then every row times 2^17: values past float16's 65504 arrive within the same relative
    # bound (each row travels with a power-of-two scale), not as inf.
    for big in (1.0, 2.0**17):
        with torch.no_grad():
            for name in ebc.tables:
                ebc.tables[name].weight.mul_(big)
            out = ebc({f: as_input(b) for f, b in bags.items()})
        worst = 0.0
        for f, (v, o, w) in bags.items():
            table = oracle.table(table_of[f].name).abs() * big
            bound = F.embedding_bag(v, table, o, mode="sum", per_sample_weights=w.abs())
            err = (out[f] - want[f] * big).abs()
            assert torch.isfinite(out[f]).all() and (err <= u * bound + 1e-6 * big).all(), (err - u * bound).max()
            worst = max(worst, float(err.max()))
        assert worst > 0  # the vectors really travelled in comm_dtype


@pytest.mark.parametrize("comm_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool_on", ["requester", "owner"])
def test_reduced_precision_on_the_wire_is_bounded(comm_dtype, pool_on):
    run_ranks(2, _wire_rounding, comm_dtype, pool_on)


# --------------------------------------------------------------------------- DCP checkpoints
CKPT = [
    dict(name="items", num_embeddings=61, embedding_dim=4, page_size=5, placement=[(0, 1), 1, (2, 3), 3] * 3 + [0],
         feature_names=["item", "history"], fused_optimizer={"name": "adagrad", "lr": 0.2}, seed=7),
    dict(name="users", num_embeddings=23, embedding_dim=6, page_size=4, pooling="mean", feature_names=["user"],
         fused_optimizer={"name": "rowwise_adagrad", "lr": 0.3}, seed=8),
    dict(name="clicks", num_embeddings=17, embedding_dim=2, page_size=3, pooling=None, feature_names=["click"],
         fused_optimizer={"name": "adam", "lr": 0.1}, seed=9),
]


def _train_and_save(path: str):
    rank, world = rank_world()
    configs = table_configs(CKPT)
    ebc = ShardedEmbeddingBagCollection(configs)
    for step in range(3):
        features = {f: as_input(make_bags(c.num_embeddings, rank, step, i, batch=6, max_len=4))
                    for i, c in enumerate(configs) for f in c.feature_names}
        sum(v.sum() for v in ebc(features).values()).backward()
    dcp.save({"ebc": ebc.state_dict()}, checkpoint_id=path)
    return _everything(ebc)


def _everything(ebc) -> dict:
    out = {}
    for name in ebc.tables:
        t = ebc.tables[name]
        out[f"{name}.weight"] = t.full_table()
        for key, buf in t.optimizer.named_buffers():
            out[f"{name}.{key}"] = buf.clone() if key == "step" else t._full(buf)
    return out


def _load(path: str, page_sizes: list[int]):
    configs = [TableConfig(**{**s, "page_size": p, "placement": "round_robin", "seed": 99})
               for s, p in zip(CKPT, page_sizes)]
    ebc = ShardedEmbeddingBagCollection(configs)
    state = {"ebc": ebc.state_dict()}
    dcp.load(state, checkpoint_id=path)
    ebc.load_state_dict(state["ebc"])
    for name in ebc.tables:
        assert_replicas_identical(ebc.tables[name])
    return _everything(ebc)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    return path, run_ranks(4, _train_and_save, path)[0]


@pytest.mark.parametrize("world, page_sizes", [(1, [7, 3, 2]), (2, [16, 5, 4]), (3, [4, 9, 1])])
def test_dcp_checkpoint_of_every_table_reshards(saved, world, page_sizes):
    path, saved = saved
    assert set(saved) == {"items.weight", "items.sum", "items.step", "users.weight", "users.sum", "users.step",
                          "clicks.weight", "clicks.exp_avg", "clicks.exp_avg_sq", "clicks.step"}
    for loaded in run_ranks(world, _load, path, page_sizes):
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), key


# --------------------------------------------------------------------------- beside DDP
class TwoTowers(nn.Module):
    """A dense tower (DDP) beside the collection: score = <dense(x), pooled item> + mean user."""

    def __init__(self):
        super().__init__()
        self.sparse = ShardedEmbeddingBagCollection(table_configs([
            dict(name="items", num_embeddings=40, embedding_dim=4, page_size=6, feature_names=["item", "history"],
                 fused_optimizer={"name": "sgd", "lr": 0.05}, seed=1),
            dict(name="users", num_embeddings=25, embedding_dim=4, page_size=4, pooling="mean",
                 feature_names=["user"], seed=2),
        ]))
        self.dense = nn.Linear(3, 4)

    def forward(self, x, features):
        pooled = self.sparse.concat(self.sparse(features))  # [batch, 12]
        return (self.dense(x) * (pooled[:, :4] + pooled[:, 4:8])).sum(1) + pooled[:, 8:].sum(1)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(97 * rank + step)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    bags = {f: make_bags(n, rank, step, i, batch=5, max_len=3) for i, (f, n) in
            enumerate([("item", 40), ("history", 40), ("user", 25)])}
    return x, y, bags


def _ddp_beside_the_collection():
    rank, world = rank_world()
    torch.manual_seed(0)
    model = DDP(TwoTowers())  # the tables protect themselves from DDP
    assert model.parameters_to_ignore == {"sparse.tables.items.weight", "sparse.tables.users.weight"}
    dense_opt = torch.optim.SGD(model.module.dense.parameters(), lr=0.1)
    users_opt = torch.optim.SGD([model.module.sparse.tables["users"].weight], lr=0.05)
    ref_dense = copy.deepcopy(model.module.dense)
    oracle = BagOracle(model.module.sparse.configs, optimizer="sgd", lr=0.05)
    ref_dense_opt = torch.optim.SGD(ref_dense.parameters(), lr=0.1)
    for step in range(4):
        batches = [_batch(r, step) for r in range(world)]
        x, y, bags = batches[rank]
        loss = F.mse_loss(model(x, {f: as_input(b) for f, b in bags.items()}), y)
        loss.backward()  # the tables get the gradient of the sum of the ranks' losses, the dense part the mean
        dense_opt.step()
        users_opt.step()
        dense_opt.zero_grad()
        users_opt.zero_grad()
        total = 0
        for xr, yr, br in batches:
            out = oracle.forward(br)
            pooled = torch.cat([out["item"], out["history"], out["user"]], 1)
            pred = (ref_dense(xr) * (pooled[:, :4] + pooled[:, 4:8])).sum(1) + pooled[:, 8:].sum(1)
            total = total + F.mse_loss(pred, yr)
        total.backward()
        for p in ref_dense.parameters():
            p.grad /= world  # DDP's mean
        for opt in [ref_dense_opt, *oracle.opts.values()]:
            opt.step()
            opt.zero_grad()
        for name in ("items", "users"):
            torch.testing.assert_close(model.module.sparse.tables[name].full_table(), oracle.table(name),
                                       rtol=1e-5, atol=1e-6)
        for got, want in zip(model.module.dense.parameters(), ref_dense.parameters()):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)


def test_beside_ddp_for_the_dense_part():
    run_ranks(2, _ddp_beside_the_collection)


def _compiled_model_trains_as_eager():
    """torch.compile of a model holding the collection: its lookup is one graph break (dynamo
    traced into the input checks before, recompiling frames: ~30 s for 4 small steps); the
    compiled model trains as the eager one."""
    rank, _ = rank_world()
    configs = table_configs(MIXED)
    table_of = {f: c for c in configs for f in c.feature_names}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = ShardedEmbeddingBagCollection(configs)
            self.head = nn.Linear(sum(table_of[f].embedding_dim for f in self.ebc.pooled_feature_names), 1)

        def forward(self, features):
            return self.head(self.ebc.concat(self.ebc(features)))

    backend, traced = recording_backend()  # what of the package dynamo puts into graphs

    torch.manual_seed(0)
    eager = Model()
    torch.manual_seed(0)
    model = Model()
    compiled = torch.compile(model, backend=backend)
    for m, inner in ((compiled, model), (eager, eager)):
        opt = torch.optim.SGD(inner.head.parameters(), lr=0.1)
        for step in range(3):
            bags = {f: make_bags(table_of[f].num_embeddings, rank, step, i, batch=4, max_len=3)
                    for i, f in enumerate(inner.ebc.feature_names)}
            m({f: as_input((b[0], b[1], None)) for f, b in bags.items()}).sum().backward()
            opt.step()
            opt.zero_grad()
    for name in model.ebc.tables:
        torch.testing.assert_close(model.ebc.tables[name].full_table(), eager.ebc.tables[name].full_table())
    torch.testing.assert_close(model.head.weight, eager.head.weight)
    assert traced <= {"collection.py"}, traced  # concat only: the lookup itself is not traced


def test_a_compiled_model_trains_as_eager():
    run_ranks(2, _compiled_model_trains_as_eager)
