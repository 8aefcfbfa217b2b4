"""PagePlan: page geometry, validation of placements, routing tables (no processes needed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sharded_embedding import PagePlan
from tests.strategies import placements


def test_round_robin_geometry():
    plan = PagePlan.build(50_000, 10_000, 2)
    assert plan.num_pages == 5
    assert [plan.page_owners(p) for p in range(5)] == [(0,), (1,), (0,), (1,), (0,)]
    assert plan.local_pages(1).tolist() == [1, 3] and plan.local_rows(0) == 30_000
    # Word 10000 is row 0 of page 1; word 30100 is row 100 of page 3 (the original README).
    t = plan.routing_table(0)
    assert (t.dest_rank[1], t.dest_offset[1]) == (1, 0)
    assert (t.dest_rank[3], t.dest_offset[3]) == (1, 10_000)  # page 3 is rank 1's second page


def test_partial_last_page_and_num_devices():
    plan = PagePlan.build(23, 5, 4, num_devices=3)
    assert plan.num_pages == 5 and plan.page_rows(4) == 3
    assert plan.local_pages(3).numel() == 0 and plan.local_rows(3) == 0
    assert plan.local_rows(1) == 5 + 3  # pages 1 and 4


def test_mirrors_route_to_self_or_spread_over_replicas():
    plan = PagePlan.build(40, 10, 4, placement=[(0, 1), 2, (3, 2, 1), 0])
    assert plan.mirror_sets() == ((0, 1), (1, 2, 3))
    assert plan.primary_pages(3).tolist() == [2]
    for r in range(4):
        t = plan.routing_table(r)
        for p in range(4):
            owners = plan.page_owners(p)
            d = int(t.dest_rank[p])
            assert d in owners and (d == r or r not in owners)
    # Ranks 2 and 3 do not hold page 0: they spread over its two replicas.
    assert {int(plan.routing_table(r).dest_rank[0]) for r in (2, 3)} == {0, 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(placement=[0, 1]), "placement has 2 entries but the table has 3 pages"),
        (dict(placement=[0, 1, 4]), "page 2: rank 4 does not exist"),
        (dict(placement=[0, (1, 1), 2]), r"page 1: rank 1 is repeated in \(1, 1\)"),
        (dict(placement=[0, (), 2]), "page 1: empty list of ranks"),
        (dict(placement=[0, 1, -1]), "page 2: rank -1 does not exist"),
        (dict(placement=[0, 1.5, 2]), "page 1: 1.5 is neither a rank nor a tuple of ranks"),
        (dict(placement=[0, (1, "a"), 2]), "page 1: 'a' in"),
        (dict(placement=[0, True, 2]), "page 1: True is neither"),
        (dict(placement="rows"), "placement='rows' is not understood"),
        (dict(placement=7), "placement must be 'round_robin' or a list"),
        (dict(num_devices=5), "num_devices=5 is out of range"),
        (dict(num_devices=0), "num_devices=0 is out of range"),
        (dict(placement=[0, 1, 2], num_devices=2), "num_devices=2 applies to placement='round_robin' only"),
    ],
)
def test_bad_placements_name_page_and_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagePlan.build(30, 10, 4, **kwargs)


@pytest.mark.parametrize("n, ps", [(0, 10), (10, 0), (-3, 1), (10, 2.5), (True, 1)])
def test_bad_sizes(n, ps):
    with pytest.raises(ValueError, match="must be a positive int"):
        PagePlan.build(n, ps, 2)


def test_digest_tells_plans_apart():
    a = PagePlan.build(30, 10, 2, placement=[0, 1, (0, 1)])
    assert a.digest() == PagePlan.build(30, 10, 2, placement=[0, 1, [0, 1]]).digest()
    assert a.digest() != PagePlan.build(30, 10, 2, placement=[0, 1, (1, 0)]).digest()
    assert a.digest() != PagePlan.build(29, 10, 2, placement=[0, 1, (0, 1)]).digest()
    assert a.digest() != PagePlan.build(30, 10, 3, placement=[0, 1, (0, 1)]).digest()


@st.composite
def plans(draw):
    world = draw(st.integers(1, 6))
    n = draw(st.integers(1, 300))
    ps = draw(st.integers(1, 80))
    placement, num_devices = draw(placements(world, -(-n // ps)))
    return PagePlan.build(n, ps, world, placement=placement, num_devices=num_devices)


@given(plans())
def test_routing_reaches_the_right_row_on_an_owner(plan):
    """For every requester and every global row: the serving rank holds the row's page and
    the local row it is sent to is where that rank stores it."""
    # Where each rank stores each page: its slot among the rank's pages, in ascending order.
    storage = {r: {int(p): s for s, p in enumerate(plan.local_pages(r))} for r in range(plan.world_size)}
    assert sum(plan.local_rows(r) for r in range(plan.world_size)) == sum(
        plan.page_rows(p) * len(plan.page_owners(p)) for p in range(plan.num_pages))
    rows = torch.arange(plan.num_embeddings)
    page = rows // plan.page_size
    for r in range(plan.world_size):
        t = plan.routing_table(r)
        dest = t.dest_rank[page]
        local = t.dest_offset[page] + rows - page * plan.page_size
        for i in range(0, plan.num_embeddings, max(1, plan.num_embeddings // 50)):
            p, d = int(page[i]), int(dest[i])
            assert d in plan.page_owners(p)
            if r in plan.page_owners(p):
                assert d == r
            assert int(local[i]) == storage[d][p] * plan.page_size + i - p * plan.page_size
            assert int(local[i]) < plan.local_rows(d)
    # Every page has one primary, and primaries partition the pages.
    prim = torch.cat([plan.primary_pages(r) for r in range(plan.world_size)]).sort().values
    assert prim.tolist() == list(range(plan.num_pages))
