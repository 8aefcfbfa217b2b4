"""Property tests: random sizes, page sizes, placements, world sizes, batches and optimizers,
each trained a few steps on gloo ranks and compared with the nn.Embedding oracle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import run_ranks
from tests.strategies import placements
from tests.test_lookup import train_against_oracle


@st.composite
def tables(draw):
    world = draw(st.integers(1, 4))
    n = draw(st.integers(1, 120))
    page_size = draw(st.integers(1, 40))
    placement, num_devices = draw(placements(world, -(-n // page_size)))
    return dict(
        world=world,
        args=(n, draw(st.integers(1, 6)), page_size, placement, num_devices),
        kwargs=dict(
            steps=2,
            batch=tuple(draw(st.lists(st.integers(0, 40), min_size=world, max_size=world))),
            skew=draw(st.sampled_from(["uniform", "zipf", "hot"])),
            optimizer=draw(st.sampled_from(["sgd", "adagrad", None])),
            sparse=draw(st.booleans()),
            seed=draw(st.integers(0, 2**31)),
        ),
    )


@settings(max_examples=40)
@given(tables())
def test_random_tables_match_the_oracle(case):
    run_ranks(case["world"], train_against_oracle, *case["args"], **case["kwargs"])
