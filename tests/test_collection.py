"""ShardedEmbeddingBagCollection against one nn.EmbeddingBag per table, on 1-4 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from sharded_embedding import ShardedEmbeddingBagCollection, initial_rows
from tests.bag_oracle import BagOracle, as_input, loss_weights, make_bags, table_configs
from tests.harness import run_ranks
from tests.oracle import assert_replicas_identical, local_rows_of, rank_world

# Four tables: two features sharing a summed table, a mean table, a weighted sum with mirrors,
# and a sequence table; fused optimizers of every kind and one table left to torch.optim.SGD.
MIXED = [
    dict(name="items", num_embeddings=53, embedding_dim=8, page_size=6, pooling="sum",
         feature_names=["item", "history"], fused_optimizer={"name": "sgd", "lr": 0.1}, seed=1),
    dict(name="users", num_embeddings=31, embedding_dim=4, page_size=5, pooling="mean",
         feature_names=["user"], fused_optimizer={"name": "adagrad", "lr": 0.2}, seed=2),
    dict(name="tags", num_embeddings=40, embedding_dim=12, page_size=7, pooling="sum",
         placement=[(0, 1), 1, 0, (1, 0), 0, 1], feature_names=["tag"],
         fused_optimizer={"name": "rowwise_adagrad", "lr": 0.3}, seed=3),
    dict(name="clicks", num_embeddings=29, embedding_dim=4, page_size=4, pooling=None,
         feature_names=["click"], fused_optimizer={"name": "adam", "lr": 0.05}, seed=4),
    dict(name="plain", num_embeddings=17, embedding_dim=6, page_size=3, pooling="sum", feature_names=["geo"],
         seed=5),
]


def _specs_for(world: int, specs: list[dict]) -> list[dict]:
    """Placements given for 2 ranks mapped onto ``world`` ranks (mirrors over all of them)."""
    out = []
    for s in specs:
        s = dict(s)
        if isinstance(s.get("placement"), list):
            s["placement"] = [(tuple(range(world)) if world > 1 else 0) if isinstance(e, tuple) else p % world
                              for p, e in enumerate(s["placement"])]
        out.append(s)
    return out


def train_collection_against_oracle(specs, *, steps=3, batch=(6,), max_len=5, weighted=("tag",), skew="uniform",
                                    pool_on="auto", form="offsets", seed=0, lr=0.1, comm_dtype=None, rtol=1e-5,
                                    remap=True, in_place=False):
    """Train the collection ``steps`` steps against `BagOracle`: outputs, gradients of tables
    without a fused optimizer (SGD), rows and fused optimizer state after every step.
    ``skew``: of every feature's ids, or {feature: skew} (uniform for the others). ``remap``:
    the specs' explicit placements are for 2 ranks and are mapped onto the world (else: as given).
    ``in_place``: every output is doubled in place before the loss (the oracle's loss weights
    are doubled instead), as nn.EmbeddingBag's outputs can be."""
    rank, world = rank_world()
    configs = table_configs(_specs_for(world, specs) if remap else specs)
    ebc = ShardedEmbeddingBagCollection(configs, pool_on=pool_on, comm_dtype=comm_dtype,
                                        include_last_offset=form == "last_offset")
    for c in configs:
        table = ebc.tables[c.name]
        assert torch.equal(local_rows_of(table, initial_rows(c.seed, c.embedding_dim, 0, c.num_embeddings)),
                           table.weight.detach())
    plain = [ebc.tables[c.name].weight for c in configs if c.fused_optimizer is None]
    opt = torch.optim.SGD(plain, lr=lr) if plain else None
    oracle = BagOracle(configs, optimizer="sgd", lr=lr)
    features = [f for c in configs for f in c.feature_names]
    table_of = {f: c for c in configs for f in c.feature_names}
    sizes = [batch[min(r, len(batch) - 1)] for r in range(world)]
    for step in range(steps):
        bags = [{f: make_bags(table_of[f].num_embeddings, r, step, i, batch=sizes[r], max_len=max_len,
                              weighted=f in weighted, skew=skew.get(f, "uniform") if isinstance(skew, dict) else skew,
                              seed=seed)
                 for i, f in enumerate(features)} for r in range(world)]
        ws = []
        for r in range(world):
            rows = {f: (sizes[r] if table_of[f].pooling else bags[r][f][0].numel()) for f in features}
            ws.append({f: loss_weights(rows[f], table_of[f].embedding_dim, r, step, i, seed)
                       for i, f in enumerate(features)})
        want, want_grads = oracle.step(bags, [{f: w * 2 for f, w in x.items()} for x in ws] if in_place else ws)
        out = ebc({f: as_input(b, form) for f, b in bags[rank].items()})
        assert sorted(out) == sorted(features)
        for f in features:
            torch.testing.assert_close(out[f], want[rank][f], rtol=rtol, atol=rtol)
            if in_place:
                out[f].mul_(2)
        sum((out[f] * ws[rank][f]).sum() for f in features).backward()
        for c in configs:
            table = ebc.tables[c.name]
            if c.fused_optimizer is None:
                grad = table.weight.grad
                torch.testing.assert_close(grad.to_dense(), local_rows_of(table, want_grads[c.name]),
                                           rtol=rtol, atol=rtol)
            else:
                assert table.weight.grad is None
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for c in configs:
            table = ebc.tables[c.name]
            torch.testing.assert_close(table.weight.detach(), local_rows_of(table, oracle.table(c.name)),
                                       rtol=rtol, atol=rtol)
            if table.optimizer is not None:
                for key, state in table.optimizer.named_buffers():
                    if key == "step":
                        continue
                    want_state = oracle.state(c.name, key)
                    want_state = want_state if want_state.dim() > 1 else want_state[:, None]
                    torch.testing.assert_close(state, local_rows_of(table, want_state).reshape(state.shape),
                                               rtol=rtol, atol=rtol)
    for c in configs:
        table = ebc.tables[c.name]
        assert_replicas_identical(table)
        torch.testing.assert_close(table.full_table(), oracle.table(c.name), rtol=rtol, atol=rtol)
    return ebc.stats()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("pool_on", ["requester", "owner"])
def test_mixed_tables_match_the_oracle(world, pool_on):
    stats = run_ranks(world, train_collection_against_oracle, MIXED, pool_on=pool_on)
    for s in stats:
        assert s["calls"] == 3
        for name, t in s["tables"].items():
            if name == "clicks" or pool_on == "requester":
                assert t["calls_pooled_on_requester"] == 3
            else:
                assert t["calls_pooled_on_owner"] == 3


def test_outputs_modified_in_place_train_as_nn_embedding_bag():
    """Features sharing a table (pooled and sequence) come out as slices of one tensor: each
    can be modified in place under autograd, as nn.EmbeddingBag's separate outputs can."""
    shared_sequence = dict(name="seq", num_embeddings=23, embedding_dim=4, page_size=5, pooling=None,
                           feature_names=["s1", "s2"], fused_optimizer={"name": "adagrad", "lr": 0.2}, seed=6)
    run_ranks(2, train_collection_against_oracle, [*MIXED, shared_sequence], steps=2, in_place=True)


def _round_robin_owners():
    """Page owners of each table of a collection of round robin tables (and one explicit)."""
    from sharded_embedding import TableConfig

    rank, world = rank_world()
    configs = [TableConfig(name=f"t{k}", num_embeddings=23, embedding_dim=4, page_size=5) for k in range(4)]
    configs.append(TableConfig(name="two", num_embeddings=23, embedding_dim=4, page_size=5, num_devices=2))
    configs.append(TableConfig(name="given", num_embeddings=23, embedding_dim=4, page_size=5,
                               placement=[0, 0, 0, 0, 0]))
    ebc = ShardedEmbeddingBagCollection(configs)
    return {c.name: [ebc.tables[c.name].page_owners(p) for p in range(5)] for c in configs}


@pytest.mark.parametrize("world", [2, 3])
def test_round_robin_starts_each_table_on_the_next_rank(world):
    """Table k's page p on rank (p + k) % num_devices: the tables' first pages (the hottest
    under skewed ids) spread over the ranks; an explicit placement stays as given."""
    owners = run_ranks(world, _round_robin_owners)
    assert all(o == owners[0] for o in owners)
    for k in range(4):
        assert owners[0][f"t{k}"] == [((p + k) % world,) for p in range(5)]
    assert owners[0]["two"] == [((p + 4) % 2,) for p in range(5)]
    assert owners[0]["given"] == [(0,)] * 5


@pytest.mark.parametrize("tagged", [True, False])
@pytest.mark.parametrize("with_numpy", [True, False])
def test_owner_grouping_by_row_with_and_without_numpy(monkeypatch, with_numpy, tagged):
    """The owner's grouping of ids by row (numpy's sort on the CPU when present, else
    torch.sort): rows ascending, ties in tag order, each row's first position."""
    from sharded_embedding import bag_lookup

    if not with_numpy:
        monkeypatch.setattr(bag_lookup, "_np", None)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int32) for n in (600, 1, 399)]
    ids[0][::7] = ids[2][3]  # ties, across requesters too
    ids[0][1] = 2**31 - 1  # the largest local row
    tags = [torch.randint(0, 2**31 - 1, (i.numel(),), generator=g, dtype=torch.int32) for i in ids] if tagged \
        else None
    unique, got_tags, starts = bag_lookup._group_by_row(ids, tags, 1000, torch.device("cpu"))
    rows = torch.cat(ids).long()
    tag = torch.cat(tags).long() if tagged else torch.arange(1000)
    order = torch.sort(rows * 2**32 + tag).indices
    want_unique, counts = torch.unique_consecutive(rows[order], return_counts=True)
    assert unique.dtype == torch.int64 and got_tags.dtype == torch.int32 and starts.dtype == torch.int32
    assert torch.equal(unique, want_unique) and torch.equal(got_tags.long(), tag[order])
    assert torch.equal(starts.long(), torch.cumsum(counts, 0) - counts)
