"""What one step of a ShardedEmbeddingBagCollection sends: three all-to-alls for any number of
tables, and each table's bags pooled where that sends fewer bytes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sharded_embedding import ShardedEmbeddingBagCollection
from sharded_embedding import distributed as se_distributed
from sharded_embedding import mirrors as se_mirrors
from sharded_embedding.transport import close_transports
from tests.bag_oracle import as_input, make_bags, table_configs
from tests.harness import run_ranks
from tests.oracle import rank_world
from tests.test_collection import train_collection_against_oracle

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
               "barrier", "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend", "irecv")


def _tables(num: int, mirrored: bool = False) -> list[dict]:
    specs = []
    for i in range(num):
        specs.append(dict(name=f"t{i}", num_embeddings=40 + 7 * i, embedding_dim=4 * (1 + i % 3), page_size=5,
                          pooling=("sum", "mean", None)[i % 3], feature_names=[f"a{i}", f"b{i}"],
                          fused_optimizer={"name": "sgd", "lr": 0.1} if i % 2 else None, seed=i))
    if mirrored:
        specs[0]["placement"] = [(0, 1)] + [p % 2 for p in range(1, 8)]
    return specs


class _Counter:
    """Counts `Transport.all_to_all` calls of one transport, and torch.distributed collectives
    made anywhere else, while active."""

    def __init__(self, transport):
        self.exchanges, self.others, self._inside, self.active = 0, [], False, False
        self.bytes_sent = 0  # to the other ranks, as the transport gets them (the wire dtype's)
        original = transport.all_to_all

        def all_to_all(out, inp, out_splits, in_splits, *args, **kwargs):
            if self.active:
                self.exchanges += 1
                row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
                self.bytes_sent += row * sum(n for q, n in enumerate(in_splits) if q != dist.get_rank())
            self._inside = True
            try:
                return original(out, inp, out_splits, in_splits, *args, **kwargs)
            finally:
                self._inside = False

        transport.all_to_all = all_to_all
        self._transport = transport  # cached per group and kept by later tests: restore() unwraps it
        self._saved = []
        # torch.distributed's collectives, and the all-gather our modules bound at import
        places = [(dist, name) for name in COLLECTIVES] + [(m, "all_gather_single") for m in (se_distributed, se_mirrors)]
        for module, name in places:
            fn = getattr(module, name)
            self._saved.append((module, name, fn))

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                if self.active and not self._inside:
                    self.others.append(_name)
                return _fn(*args, **kwargs)

            setattr(module, name, wrapper)

    def restore(self):
        del self._transport.all_to_all  # the class's method again
        for module, name, fn in self._saved:
            setattr(module, name, fn)


def _count_one_step(num_tables: int, transport: str, pool_on: str, mirrored: bool = False, comm_dtype=None):
    rank, world = rank_world()
    # The request capacity is shared by every table of a transport, and this pool's transports
    # outlive a test: start from new ones, so that the first call has no capacity yet.
    close_transports()
    configs = table_configs(_tables(num_tables, mirrored))
    ebc = ShardedEmbeddingBagCollection(configs, transport=transport, pool_on=pool_on, comm_dtype=comm_dtype)
    shared = ebc.tables["t0"].transport
    assert all(ebc.tables[c.name].transport is shared for c in configs)  # one transport for the group
    counter = _Counter(shared)
    try:
        features = {f: as_input(make_bags(c.num_embeddings, rank, 0, i, batch=8, max_len=6))
                    for i, c in enumerate(configs) for f in c.feature_names}
        counts = []
        for step in range(3):  # the first call sets the request capacity; then steady state
            counter.exchanges, counter.others, counter.bytes_sent = 0, [], 0
            counter.active = True
            out = ebc(features)
            sum(v.sum() for v in out.values()).backward()
            counter.active = False
            counts.append((counter.exchanges, list(counter.others)))
            # stats() counts every byte the transport sent (a float16 wire's scale column too),
            # and every all-to-all (the first call's second request exchange as an overflow)
            stats = ebc.stats(reset=True)
            assert stats["bytes_sent"] == counter.bytes_sent > 0
            assert stats["exchanges"] == counter.exchanges and stats["request_overflows"] == counter.exchanges - 3
        for c in configs:
            if c.fused_optimizer is None:
                ebc.tables[c.name].weight.grad = None
        return counts
    finally:
        counter.restore()


@pytest.mark.parametrize("num_tables", [1, 2, 8])
@pytest.mark.parametrize("transport", ["process_group", "shared_memory"])
def test_one_step_is_three_exchanges_for_any_number_of_tables(num_tables, transport):
    for pool_on in ("requester", "owner", "auto"):
        comm_dtype = torch.float16 if pool_on == "auto" else None  # rows scaled on the wire: as many exchanges
        for counts in run_ranks(2, _count_one_step, num_tables, transport, pool_on, False, comm_dtype):
            first, *steady = counts
            assert first[0] == 4  # no capacity yet: the header, then the ids, vectors, gradients
            for exchanges, others in steady:
                assert exchanges == 3, counts  # ids, vectors, gradients: all tables together
                assert others == [], others  # and no collective per table


def test_mirrored_pages_add_their_all_reduces_only():
    for exchanges, others in run_ranks(2, _count_one_step, 2, "shared_memory", "auto", True)[0][1:]:
        assert exchanges == 3
        # table t0 mirrors a page on both ranks: its touched rows' all-reduce (sizes, ids, sum)
        assert others == ["all_gather_single", "all_gather_single", "all_reduce"], others


# Two tables that call for different pooling: "wide" gets long bags of uniform ids over many
# rows (few duplicates: partial sums per bag are fewer bytes than the rows), "hot" short bags
# of a handful of ids (deduplicated rows are fewer bytes than the ids alone), ids 0-2 on pages
# of one row: some on each rank, so every rank sends some.
CHOICE = [
    dict(name="wide", num_embeddings=5000, embedding_dim=16, page_size=50, pooling="sum", feature_names=["w"],
         fused_optimizer={"name": "sgd", "lr": 0.05}),
    dict(name="hot", num_embeddings=60, embedding_dim=16, page_size=1, pooling="mean", feature_names=["h"],
         fused_optimizer={"name": "adagrad", "lr": 0.05}),
]


def test_each_table_is_pooled_where_it_sends_fewer_bytes():
    stats = run_ranks(2, train_collection_against_oracle, CHOICE, steps=20, batch=(40,), max_len=30, weighted=(),
                      skew={"h": "hot"}, pool_on="auto")
    for s in stats:
        wide, hot = s["tables"]["wide"], s["tables"]["hot"]
        assert wide["calls_pooled_on_owner"] == 20 and wide["last"]["pooled_on"] == "owner"
        assert wide["last"]["bytes_if_pooled_on_owner"] < wide["last"]["bytes_if_pooled_on_requester"]
        assert hot["calls_pooled_on_requester"] == 20 and hot["last"]["pooled_on"] == "requester"
        assert hot["last"]["bytes_if_pooled_on_requester"] <= hot["last"]["bytes_if_pooled_on_owner"]
        assert wide["last"]["unique_ids_measured"] is False  # counted every REMEASURE calls only


def test_a_call_served_here_alone_is_pooled_on_the_owner():
    # "hot" ids 0-2 are on page 0 (of 5 rows): one rank serves all its own ids, nothing
    # travels either way, and it pools on the owner (less work); the other rank's go by bytes.
    local = [dict(CHOICE[1], page_size=5)]
    stats = run_ranks(2, train_collection_against_oracle, local, steps=6, batch=(40,), max_len=30, weighted=(),
                      skew="hot", pool_on="auto")
    pooled = sorted((s["tables"]["hot"]["calls_pooled_on_owner"], s["tables"]["hot"]["calls_pooled_on_requester"])
                    for s in stats)
    assert pooled == [(0, 6), (6, 0)], pooled
    (alone,) = run_ranks(1, train_collection_against_oracle, CHOICE, steps=3, batch=(40,), max_len=30,
                         weighted=(), skew={"h": "hot"}, pool_on="auto")
    for name in ("wide", "hot"):
        assert alone["tables"][name]["calls_pooled_on_owner"] == 3, alone
        assert alone["tables"][name]["last"] == {"pooled_on": "owner", "bytes_if_pooled_on_requester": 0,
                                                 "bytes_if_pooled_on_owner": 0, "unique_ids_measured": False}


def _served_counts(pool_on: str):
    """``served_per_rank`` of each table: what each requester asked this rank for."""
    from sharded_embedding import ShardedEmbeddingBagCollection, TableConfig

    rank, world = rank_world()
    ebc = ShardedEmbeddingBagCollection([TableConfig(name="t", num_embeddings=40, embedding_dim=4, page_size=10,
                                                     feature_names=["f"])], pool_on=pool_on)
    ids = torch.tensor([0, 1, 1, 10, 11, 20, 35, 35]) if rank == 0 else torch.tensor([10, 30])
    ebc({"f": (ids, torch.tensor([0, 3]) if rank == 0 else torch.tensor([0]))})
    return ebc.stats()["tables"]["t"]


def test_stats_count_what_each_rank_served_to_each_requester():
    # pages 0, 2 on rank 0; 1, 3 on rank 1 (round robin). Rank 0 asks rank 0 for ids 0 1 1 20,
    # rank 1 for 10 11 35 35; rank 1 asks rank 0 for none, itself for 10 30.
    owner = run_ranks(2, _served_counts, "owner")
    assert [t["served_per_rank"] for t in owner] == [[4, 0], [4, 2]]  # ids, pooled on the owner
    requester = run_ranks(2, _served_counts, "requester")
    assert [t["served_per_rank"] for t in requester] == [[3, 0], [3, 2]]  # unique rows
