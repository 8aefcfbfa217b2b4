"""What travels: reduced-precision communication and the exchange statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_embedding import ShardedEmbedding, initial_rows
from tests.harness import run_ranks
from tests.oracle import Oracle, make_ids, make_loss_weight, rank_world

# Rounding a float32 to bfloat16 (8 significant bits) or float16 (11) keeps it within
# half a unit in the last place: a relative error of at most 2^-8 or 2^-11.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _comm_dtype_error(comm_dtype):
    """Forward values are the table's rows rounded once to comm_dtype (rows served locally are
    exact); gradients arriving from peers are rounded once per unique row before summing."""
    rank, world = rank_world()
    n, d = 200, 16
    emb = ShardedEmbedding(n, d, page_size=10, comm_dtype=comm_dtype, fused_optimizer={"name": "sgd", "lr": 1.0})
    oracle = Oracle(n, d, optimizer="sgd", lr=1.0)
    u = UNIT_ROUNDOFF[comm_dtype]
    ids = [make_ids(n, r, 0, 300, skew="zipf") for r in range(world)]
    ws = [make_loss_weight(i, d, r, 0) for r, i in enumerate(ids)]
    want_out, want_grad = oracle.step(ids, ws)
    out = emb(ids[rank])
    rel = ((out - want_out[rank]).abs() / want_out[rank].abs().clamp_min(1e-30)).max().item()
    assert rel <= u, rel
    assert rel > 0  # rows from peers really did travel in comm_dtype
    (out * ws[rank]).sum().backward()
    # Each rank's per-row gradient sum is rounded once before it travels; the owner adds at most
    # `world` such terms: |error| <= u * sum over senders of |their partial sum| <= u * sum |w|.
    bound = torch.zeros(n, d)
    for r in range(world):
        bound.index_add_(0, ids[r], ws[r].abs())
    err = (emb.full_table() - oracle.table).abs()
    assert (err <= u * bound + 1e-6).all(), (err - u * bound).max()
    return rel


@pytest.mark.parametrize("comm_dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_communication_error_is_bounded(comm_dtype):
    run_ranks(2, _comm_dtype_error, comm_dtype)


def _wire_bound(comm_dtype) -> tuple[float, float]:
    """(u, a): a value x of a row whose largest magnitude is m arrives, scaled per row (see
    `sharded_embedding.wire`), within u |x| + a m. float16: (2^-11, 2^-39)."""
    info = torch.finfo(comm_dtype)
    top = math.frexp(info.max)[1] - 1  # the scaled row's largest lands in [2^(top-1), 2^top)
    half_subnormal = info.smallest_normal * info.eps / 2
    return info.eps / 2, half_subnormal * 2.0 ** (1 - top)


def _fp16_hot_rows():
    """Issue 14, case 2: rank 0 looks id 9 (on rank 1) up 20,000 times, rank 1 id 1 (on rank
    0); the loss is 4 * the sum, so each hot row's gradient is 80,000, beyond float16's 65504.
    It travels scaled and the fused Adagrad step equals nn.Embedding's; a table holding values
    near 2e5 comes back within float16's rounding, not inf."""
    rank, world = rank_world()
    fused = {"name": "adagrad", "lr": 0.05}
    emb = ShardedEmbedding(32, 4, page_size=8, comm_dtype=torch.float16, fused_optimizer=fused)
    oracle = Oracle(32, 4, fused=fused)
    ids = [torch.full((20_000,), 9), torch.full((20_000,), 1)]
    want_out, _ = oracle.step(ids, [torch.full((20_000, 4), 4.0)] * world)
    cap = emb._router.requests.capacity  # shared with the tables made before on this group
    out = emb(ids[rank])
    u, a = _wire_bound(torch.float16)
    x = want_out[rank]
    assert ((out - x).abs() <= u * x.abs() + a * x.abs().amax(1, keepdim=True)).all()
    (out * 4.0).sum().backward()
    # stats() counts what travelled: a request of a 4-int64 header and a body of 3 columns and the
    # asked row id (padded to the capacity), then the vector and the gradient of one row each way,
    # as 4 float16 values and the scale's exponent.
    want = (4 + max(cap, 3 + 1)) * 8 + 2 * (4 + 1) * 2
    assert emb.stats()["bytes_received"] == emb.stats()["bytes_sent"] == want
    table = emb.full_table()
    assert torch.isfinite(table).all() and torch.isfinite(emb._full(emb.optimizer.sum)).all()
    torch.testing.assert_close(table, oracle.table, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb._full(emb.optimizer.sum), oracle.state("sum"), rtol=2 * u, atol=0)
    big = 2e5 + 1e3 * initial_rows(1, 4, 0, 32)  # values near 2e5
    emb.load_full_table(big)
    with torch.no_grad():
        out = emb(torch.tensor([9, 1, 17, 30]))
    x = big[[9, 1, 17, 30]]
    assert ((out - x).abs() <= u * x.abs()).all(), (out, x)


def test_fp16_on_the_wire_carries_what_float16_cannot_hold():
    run_ranks(2, _fp16_hot_rows)


def _scaled_wire_against_the_oracle(dtype, comm_dtype, row_exponents, weight_exponents, seed):
    """Rows of every magnitude (2^e times N(0, 1), e per row) and loss weights of every
    magnitude travel in a narrower comm_dtype: the forward is the table within u|x| + a m per
    row, and the SGD step is exact arithmetic's (the table minus every rank's partial gradient,
    in float64) within the same bound on each travelling partial gradient (own rows are exact),
    plus a few roundings; and the oracle's, allowing for its own roundings: torch.optim.SGD on
    nn.Embedding's sparse gradient adds each occurrence of a row on its own, one rounding at
    the row's magnitude each (a hypothesis example: 21 occurrences of a row near 2^-12 with
    gradients near 2^-30 left the oracle 5 float32 ulps from exact, ours within 1e-14)."""
    rank, world = rank_world()
    n, d = len(row_exponents), 5
    scale = torch.tensor([2.0**e for e in row_exponents], dtype=dtype).unsqueeze(1)
    table = initial_rows(seed, d, 0, n, dtype=dtype) * scale
    emb = ShardedEmbedding(n, d, page_size=3, dtype=dtype, comm_dtype=comm_dtype, seed=seed,
                           fused_optimizer={"name": "sgd", "lr": 1.0})
    emb.load_full_table(table)
    oracle = Oracle(n, d, fused={"name": "sgd", "lr": 1.0})
    oracle.emb.to(dtype)
    with torch.no_grad():
        oracle.emb.weight.copy_(table)
    ids = [make_ids(n, r, seed, 40, skew="zipf") for r in range(world)]
    ws = [make_loss_weight(i, d, r, seed).to(dtype) * torch.tensor([2.0**e for e in weight_exponents],
                                                                    dtype=dtype)[i].unsqueeze(1)
          for r, i in enumerate(ids)]
    want_out, _ = oracle.step(ids, ws)
    u, a = _wire_bound(comm_dtype)
    out = emb(ids[rank])
    x = want_out[rank]
    assert torch.isfinite(out).all()
    assert ((out - x).abs() <= u * x.abs() + a * x.abs().amax(1, keepdim=True)).all()
    (out * ws[rank]).sum().backward()
    bound = torch.zeros(n, d, dtype=dtype)
    mass = torch.zeros(n, d, dtype=torch.float64)  # sum of |terms| of each row's gradient
    exact = table.to(torch.float64)
    for r in range(world):  # each rank's partial gradient of each row, rounded once if it travels
        partial = torch.zeros(n, d, dtype=dtype).index_add_(0, ids[r], ws[r])
        bound += u * partial.abs() + a * partial.abs().amax(1, keepdim=True)
        mass.index_add_(0, ids[r], ws[r].to(torch.float64).abs())
        exact.index_add_(0, ids[r], ws[r].to(torch.float64), alpha=-1.0)  # lr 1.0
    eps = torch.finfo(dtype).eps
    slack = 4 * eps * (table.abs() + mass.to(dtype) + bound / u)
    ours = emb.full_table()
    err = (ours.to(torch.float64) - exact).abs().to(dtype)
    assert (err <= bound + slack).all(), (err - bound - slack).max()
    occurrences = sum(torch.bincount(i, minlength=n) for i in ids).to(dtype).unsqueeze(1)
    err = (ours - oracle.table).abs()
    assert (err <= bound + (occurrences + 4) * eps * (table.abs() + mass.to(dtype) + bound / u)).all(), \
        (err - bound).max()


@settings(max_examples=12)
@given(
    pair=st.sampled_from([(torch.float32, torch.float16, 40), (torch.float64, torch.float32, 300),
                          (torch.float64, torch.float16, 300)]),
    data=st.data(),
)
def test_a_narrower_comm_dtype_scales_rows_and_stays_within_its_bound(pair, data):
    dtype, comm_dtype, span = pair
    exponents = st.lists(st.integers(-span, span), min_size=12, max_size=12)
    run_ranks(2, _scaled_wire_against_the_oracle, dtype, comm_dtype, data.draw(exponents), data.draw(exponents),
              data.draw(st.integers(0, 1000)))


def _stats():
    rank, world = rank_world()
    # 4 pages of 5 rows on ranks 0, 1, 0, 1; rank r looks up [0, 0, 5, 6, 10, 15, 15, 15].
    emb = ShardedEmbedding(20, 3, page_size=5)
    ids = torch.tensor([0, 0, 5, 6, 10, 15, 15, 15])
    calls, capacities = [], []
    for _ in range(2):
        capacities.append(emb._router.requests.capacity)  # shared with the tables made before on this group
        emb(ids).sum().backward()
        calls.append(emb.stats(reset=True))
    for s in calls:
        assert s["calls"] == 1 and s["ids"] == 8 and s["unique_ids"] == 5
        if rank == 0:  # holds pages 0 and 2: ids 0, 10 are local; 5, 6, 15 are asked of rank 1
            assert s["local_unique_ids"] == 2 and s["unique_ids_sent_per_rank"] == [0, 3]
            assert s["rows_served_per_rank"] == [0, 2]  # rank 1 asks rank 0 for rows of 0 and 10
        else:
            assert s["local_unique_ids"] == 3 and s["unique_ids_sent_per_rank"] == [2, 0]
    sent = calls[0]["unique_ids_sent_per_rank"][1 - rank]
    served = calls[0]["rows_served_per_rank"][1 - rank]
    # A request is a header of 4 int64 (body length, longest body, table, columns) and a body of
    # 3 columns (error code, error value, grad mode) and the asked ids, padded to the capacity or
    # beyond it in a second exchange; then the vectors (float32 rows of 3) and, backward, the
    # gradients.
    for s, cap in zip(calls, capacities):
        assert s["bytes_sent"] == (4 + max(cap, 3 + sent)) * 8 + served * 12 + sent * 12, (s, cap)
        # requests, vectors, gradients; a second request exchange when the longest body (rank
        # 0's: 3 columns and 3 ids) outgrew the capacity
        assert s["request_overflows"] == int(cap < 6) and s["exchanges"] == 3 + s["request_overflows"], (s, cap)
        assert s["bytes_received"] == (4 + max(cap, 3 + served)) * 8 + sent * 12 + served * 12
    # After the first call the ids ride in the header exchange: capacity >= ceil(1.25 * 6)
    assert capacities[1] >= 8
    assert emb.stats()["calls"] == 0  # reset
    return calls[1]


def test_stats_count_ids_rows_and_bytes():
    stats = run_ranks(2, _stats)
    assert stats[0]["unique_ids_sent_per_rank"][1] == stats[1]["rows_served_per_rank"][0]


def _one_rank_world_has_no_traffic():
    emb = ShardedEmbedding(20, 3, page_size=5, comm_dtype=torch.bfloat16)
    out = emb(torch.tensor([1, 19]))
    assert torch.equal(out, initial_rows(0, 3, 0, 20)[[1, 19]])  # nothing rounded: all local
    s = emb.stats()
    assert s["bytes_sent"] == 0 and s["bytes_received"] == 0
    emb(torch.tensor([3])).sum().backward()
    assert emb.stats()["exchanges"] == 0  # no all-to-all in a group of one


def test_single_rank_moves_nothing():
    run_ranks(1, _one_rank_world_has_no_traffic)


def _varying_batches():
    """Request sizes jump up and down between calls, differently on each rank, so the request
    exchange's capacity both overflows (a second exchange) and fits, across many calls."""
    rank, world = rank_world()
    n, d = 500, 4
    emb = ShardedEmbedding(n, d, page_size=7, placement=[(p % world, (p + 1) % world) if p % 5 == 0 else p % world
                                                         for p in range(72)])
    oracle = Oracle(n, d, optimizer="sgd", lr=0.1)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    for step in range(10):
        sizes = [[5, 300, 0, 40, 41, 400, 2, 2, 250, 0][(step + 3 * r) % 10] for r in range(world)]
        ids = [make_ids(n, r, step, sizes[r], skew="uniform" if step % 2 else "zipf") for r in range(world)]
        ws = [make_loss_weight(i, d, r, step) for r, i in enumerate(ids)]
        want_out, _ = oracle.step(ids, ws)
        out = emb(ids[rank])
        torch.testing.assert_close(out, want_out[rank])
        (out * ws[rank]).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(emb.full_table(), oracle.table, rtol=1e-5, atol=1e-5)
    s = emb.stats()
    assert s["calls"] == s["backward_calls"] == 10
    assert 0 < s["request_overflows"] < 10 and s["exchanges"] == 3 * 10 + s["request_overflows"], s
    return emb._router.requests.capacity


def test_request_capacity_grows_and_shrinks_with_the_batches():
    caps = run_ranks(3, _varying_batches)
    assert len(set(caps)) == 1  # every rank derived the same capacity


def test_routing_keys_widen_to_int64_when_they_would_pass_int32():
    """The requester packs (serving rank, local row) into rank * stride + row and sorts the keys
    as int32 when every key fits. A world of 3 ranks holding 2^30 rows each does not fit: the
    keys stay int64 and every id still reaches its row (no process group needed to sort)."""
    from sharded_embedding.placement import PagePlan
    from sharded_embedding.routing import Router

    n, page = 3 * 2**30, 2**30  # metadata only: one page per rank, nothing allocated
    plan = PagePlan.build(n, page, 3)
    router = Router(plan.routing_table(0), page_size=page, num_embeddings=n, max_local_rows=2**30, rank=0, world=3,
                    transport=None, device=torch.device("cpu"))
    assert router._key_dtype == torch.int64
    ids = torch.tensor([n - 1, 5, 2**30 + 7, 5, 2**31 + 1])
    gather_index, _, keys = router.dedup(ids)
    stride = 2**30 + 1
    decoded = [(int(k) // stride, int(k) % stride) for k in keys]
    assert decoded == [(1, 7), (2, 1), (2, 2**30 - 1), (3, 5)]  # peers in order; this rank (0) sorts last, as 3
    assert [decoded[i] for i in gather_index.tolist()] == [(2, 2**30 - 1), (3, 5), (1, 7), (3, 5), (2, 1)]


@pytest.mark.parametrize("page_size", [1, 7, 16, 512])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_int32_routing_keys_equal_the_int64_ones(page_size, world):
    """Where keys fit int32, `Router.dedup` makes them in int32 with one lookup per id (a shift
    for a power-of-two page size): the same keys as `Router.keys`, for every rank of round-robin
    and explicit placements, mirrored pages included."""
    from sharded_embedding.placement import PagePlan
    from sharded_embedding.routing import Router

    n = 1000
    pages = -(-n // page_size)
    placements = ["round_robin", [(p * 5) % world for p in range(pages)]]
    if world > 1:
        placements.append([(0, 1) if p % 3 == 0 else p % world for p in range(pages)])
    ids = torch.cat([torch.arange(n), torch.randint(0, n, (500,), generator=torch.Generator().manual_seed(world))])
    for placement in placements:
        plan = PagePlan.build(n, page_size, world, placement)
        for rank in range(world):
            router = Router(plan.routing_table(rank), page_size=page_size, num_embeddings=n,
                            max_local_rows=max(plan.local_rows(r) for r in range(world)), rank=rank, world=world,
                            transport=None, device=torch.device("cpu"))
            assert router._offset32 is not None
            keys32 = router._keys32(ids)
            assert keys32.dtype == torch.int32
            assert torch.equal(keys32.long(), router.keys(ids)), (placement, rank)


class _Delivers:
    """A transport of one peer that delivers ``rows`` whatever was sent (a peer in another kind
    of exchange, on a transport that cannot tell exchanges apart)."""

    def __init__(self, rows):
        self.rows = rows

    def send_buffer(self, nbytes, device=torch.device("cpu")):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def all_to_all(self, out, inp, out_splits, in_splits, flag=None, tag=None):
        out.copy_(self.rows.reshape(out.shape))
        return lambda: []


def test_what_is_not_a_request_is_refused_before_it_sets_the_capacity():
    """Gradient rows read as a request header (their bytes as int64) are refused with a
    TransportError, and the group's request capacity keeps its value (it used to become
    5.7e18, and every later lookup failed to allocate)."""
    from sharded_embedding.routing import RequestExchange
    from sharded_embedding.transport import TransportError

    grads = torch.tensor([[1.5e-3, -2.25, 7.0e5, 3.0, 1e-30, 2.0, 0.5, 8.0]], dtype=torch.float32)
    exchange = RequestExchange(_Delivers(grads.view(torch.int64)), rank=0, world=1, device=torch.device("cpu"))
    with pytest.raises(TransportError, match="not a request from ranks \\[0\\]"):
        exchange.exchange(torch.zeros(1, 0, dtype=torch.int64), [[]], caller=0)
    assert exchange.capacity == 0


def test_one_large_lookup_of_a_table_does_not_widen_the_others_requests_for_long():
    """The request width is the largest capacity of the callers seen lately: after one large
    lookup of table 1, table 0's steady calls bring it back down within a few calls (not the 64
    calls of the forgetting window), while tables called in turn keep their capacities (no
    overflow in steady state)."""
    from sharded_embedding.routing import RequestExchange

    ex = RequestExchange(None, rank=0, world=2, device=torch.device("cpu"))
    for _ in range(3):
        ex._remember([0, 0], [256, 200])
    assert ex.capacity == 320
    ex._remember([1, 1], [400_000, 350_000])  # one evaluation batch of table 1
    assert ex.capacity == 500_000
    calls = 0
    while ex.capacity > 320:
        ex._remember([0, 0], [256, 200])
        calls += 1
    assert calls <= 24, calls
    # steady rhythms (the calls of each step): three tables in turn; a small table called 4 or 8
    # times a step beside a large one called once; a large table every 5th step beside a small
    # one every step. After the first rounds every call's body fits the width (no second exchange)
    rhythms = [lambda step: [0, 1, 2], lambda step: [0] * 4 + [1], lambda step: [0] * 8 + [1],
               lambda step: [0, 2] if step % 5 == 0 else [0]]
    sizes = {0: 100, 1: 2000, 2: 20_000}
    for i, calls_of in enumerate(rhythms):
        ex = RequestExchange(None, rank=0, world=2, device=torch.device("cpu"))
        for step in range(60):
            for c in calls_of(step):
                if step >= 10:
                    assert ex.capacity >= sizes[c], (i, step, c, ex._capacities)
                ex._remember([c, c], [sizes[c], sizes[c] // 2])
