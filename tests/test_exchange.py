"""What travels: reduced-precision communication and the exchange statistics."""

from __future__ import annotations

import pytest
import torch

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


def _stats():
    rank, world = rank_world()
    # 4 pages of 5 rows on ranks 0, 1, 0, 1; rank r looks up [0, 0, 5, 6, 10, 15, 15, 15].
    emb = ShardedEmbedding(20, 3, page_size=5)
    ids = torch.tensor([0, 0, 5, 6, 10, 15, 15, 15])
    calls = []
    for _ in range(2):
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
    header = 5 * 8  # count, error code, error value, largest count, grad mode
    # First call: no capacity yet, so the header goes first and the ids follow it; then the
    # vectors (float32 rows of 3) and, backward, the gradients.
    assert calls[0]["bytes_sent"] == header + sent * 8 + served * 12 + sent * 12
    assert calls[0]["bytes_received"] == header + served * 8 + sent * 12 + served * 12
    # Then the ids ride in the header exchange, padded to a capacity of ceil(1.25 * 3) = 4.
    assert calls[1]["bytes_sent"] == header + 4 * 8 + served * 12 + sent * 12
    assert calls[1]["bytes_received"] == header + 4 * 8 + sent * 12 + served * 12
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
    return emb._router.requests.capacity


def test_request_capacity_grows_and_shrinks_with_the_batches():
    caps = run_ranks(3, _varying_batches)
    assert len(set(caps)) == 1  # every rank derived the same capacity
