"""Property tests: random collections (tables, shared features, page sizes, placements with
mirrors, poolings, weights, optimizers), random bags on 1-4 gloo ranks, both pooling sites,
trained a few steps against one nn.EmbeddingBag per table."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import run_ranks
from tests.strategies import placements
from tests.test_collection import train_collection_against_oracle

OPTIMIZERS = [None, {"name": "sgd", "lr": 0.1}, {"name": "adagrad", "lr": 0.1}, {"name": "rowwise_adagrad", "lr": 0.2},
              {"name": "adam", "lr": 0.05}]


@st.composite
def collections(draw):
    world = draw(st.integers(1, 4))
    specs, features = [], 0
    for t in range(draw(st.integers(1, 3))):
        n, page_size = draw(st.integers(1, 60)), draw(st.integers(1, 20))
        placement, num_devices = draw(placements(world, -(-n // page_size)))
        count = draw(st.integers(1, 2))
        specs.append(dict(name=f"t{t}", num_embeddings=n, embedding_dim=draw(st.integers(1, 6)), page_size=page_size,
                          placement=placement, num_devices=num_devices,
                          pooling=draw(st.sampled_from(["sum", "mean", None])),
                          feature_names=[f"f{features + i}" for i in range(count)],
                          fused_optimizer=draw(st.sampled_from(OPTIMIZERS)), seed=draw(st.integers(0, 1000))))
        features += count
    weighted = tuple(f for s in specs if s["pooling"] == "sum" for f in s["feature_names"] if draw(st.booleans()))
    return dict(world=world, specs=specs, kwargs=dict(
        steps=2, batch=tuple(draw(st.lists(st.integers(0, 6), min_size=world, max_size=world))),
        max_len=draw(st.integers(0, 8)), weighted=weighted, skew=draw(st.sampled_from(["uniform", "zipf", "hot"])),
        pool_on=draw(st.sampled_from(["auto", "requester", "owner"])), seed=draw(st.integers(0, 2**31)), remap=False))


@settings(max_examples=20)
@given(collections())
def test_random_collections_match_the_oracle(case):
    run_ranks(case["world"], train_collection_against_oracle, case["specs"], **case["kwargs"])
