"""The transports under the lookup: shared memory against the process group (gloo), bit for bit,
the lookup against the oracle on both, and what happens when a rank dies or never comes."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from sharded_embedding import ShardedEmbedding
from sharded_embedding.transport import ProcessGroupTransport, SharedMemoryTransport, TransportError, make_transport
from tests.harness import run_ranks
from tests.test_bad_input import _out_of_range_on_one_rank
from tests.test_lookup import train_against_oracle

TRANSPORTS = ["process_group", "shared_memory"]


def _exchanges(trials):
    """Each trial: per-sender counts, a dtype and a row width; both transports must deliver the
    same bytes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shm = make_transport("shared_memory", dist.group.WORLD, torch.device("cpu"))
    pg = ProcessGroupTransport(dist.group.WORLD)
    assert isinstance(shm, SharedMemoryTransport)
    for counts, dtype, width, flags in trials:
        in_splits = counts[rank][:world]
        out_splits = [counts[q][rank] for q in range(world)]
        g = torch.Generator().manual_seed(rank * 1000 + sum(in_splits))
        inp = (torch.randn(sum(in_splits), *width, generator=g) * 1e3).to(dtype)
        a, b = torch.empty(sum(out_splits), *width, dtype=dtype), torch.empty(sum(out_splits), *width, dtype=dtype)
        flag = torch.tensor(bool(flags[rank])) if flags is not None else None
        got_a = shm.all_to_all(a, inp, out_splits, in_splits, flag)()
        got_b = pg.all_to_all(b, inp, out_splits, in_splits, flag)()
        assert torch.equal(a, b) and got_a == got_b
        assert got_a == ([r for r in range(world) if flags[r]] if flags is not None else [])
    return True


@given(world=st.integers(2, 4), data=st.data())
def test_shared_memory_delivers_what_gloo_delivers(world, data):
    trials = []
    for _ in range(data.draw(st.integers(1, 4))):
        counts = data.draw(st.lists(st.lists(st.sampled_from([0, 1, 3, 700, 40_000]), min_size=4, max_size=4),
                                    min_size=4, max_size=4))
        dtype = data.draw(st.sampled_from([torch.float32, torch.int64, torch.bfloat16, torch.uint8]))
        width = data.draw(st.sampled_from([(), (1,), (5,), (2, 3)]))
        flags = data.draw(st.none() | st.lists(st.booleans(), min_size=4, max_size=4))
        trials.append((counts, dtype, width, flags))
    run_ranks(world, _exchanges, trials)


def _outbox_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("sharded_embedding_outbox" in line for line in f)


def _zero_copy_exchanges(trials):
    """Each trial: the input built in each transport's send buffer (a smaller one asked for
    first: the second grows the outbox while the first is still held), sent without a copy on
    shared memory; the same bytes as an ordinary exchange of the same rows on gloo."""
    rank, world = dist.get_rank(), dist.get_world_size()
    fds, mappings = len(os.listdir("/proc/self/fd")), _outbox_mappings()
    shm = SharedMemoryTransport(dist.group.WORLD, timeout=timedelta(seconds=60))  # its own: it breaks below
    pg = ProcessGroupTransport(dist.group.WORLD)
    for counts, width, grow in trials:
        in_splits = counts[rank][:world]
        out_splits = [counts[q][rank] for q in range(world)]
        g = torch.Generator().manual_seed(rank * 1000 + sum(in_splits))
        rows = torch.randn(sum(in_splits), width, generator=g)
        expected = torch.empty(sum(out_splits), width)
        pg.all_to_all(expected, rows, out_splits, in_splits)()
        for transport in (shm, pg):
            held = transport.send_buffer(rows.numel() * 4)
            transport.send_buffer(rows.numel() * 4 * grow)  # a second call may grow the outbox: held stays valid
            inp = held.view(torch.float32).view(-1, width)
            inp.copy_(rows)
            out = torch.full((sum(out_splits), width), float("nan"))
            transport.all_to_all(out, inp, out_splits, in_splits)()
            assert torch.equal(out, expected), transport.name
            del held, inp
    # A view lent for an earlier exchange is refused (on every rank alike), not copied over itself.
    stale = shm.send_buffer(64)
    shm.all_to_all(torch.empty(0), torch.empty(0), [0] * world, [0] * world)()
    with pytest.raises(ValueError, match="send_buffer lent for this exchange"):
        shm.all_to_all(torch.empty(world, 4), stale.view(torch.float32)[: 4 * world].view(world, 4), [1] * world,
                       [1] * world)
    del stale
    # Bad splits: every rank raises, also when the rows are sent from the send buffer (the last
    # exchange: a transport that raised is not used again).
    inp = shm.send_buffer(2 * world * 16).view(torch.float32).view(-1, 4)
    inp.fill_(1)
    errors = []
    try:
        shm.all_to_all(torch.empty(world, 4), inp, [1] * world, [2] * world)()
    except (TransportError, ValueError) as e:
        errors.append(str(e))
    del inp
    retired = len(shm._retired) + len(shm._retiring)
    shm.close()
    return errors, retired, fds, len(os.listdir("/proc/self/fd")), mappings, _outbox_mappings()


@given(world=st.integers(2, 4), data=st.data())
def test_rows_built_in_the_send_buffer_arrive_as_gloo_delivers_them(world, data):
    trials = []
    for _ in range(data.draw(st.integers(1, 4))):
        counts = data.draw(st.lists(st.lists(st.sampled_from([0, 1, 3, 700, 300_000]), min_size=4, max_size=4),
                                    min_size=4, max_size=4))
        trials.append((counts, data.draw(st.sampled_from([1, 4, 12])), data.draw(st.sampled_from([1, 2, 8]))))
    for errors, retired, fds_before, fds_after, maps_before, maps_after in run_ranks(world, _zero_copy_exchanges,
                                                                                       trials):
        assert len(errors) == 1 and ("do not match" in errors[0] or "to itself" in errors[0]), errors
        assert retired == 0  # outgrown mappings are unmapped once their exchange is over
        assert fds_after == fds_before and maps_after == maps_before, (fds_before, fds_after, maps_before, maps_after)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("world", [2, 3])
def test_lookups_match_the_oracle_on_both_transports(world, transport):
    stats = run_ranks(world, train_against_oracle, 103, 8, 10, transport=transport, skew="zipf", batch=(40, 0, 25))
    assert sum(s["local_rows"] for s in stats) == 103


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fused_rowwise_adagrad_with_mirrors_on_both_transports(transport):
    run_ranks(3, train_against_oracle, 60, 4, 8, [(0, 1), 1, (2, 0), 2, 0, (1, 2, 0), 1, 2],
              fused={"name": "rowwise_adagrad", "lr": 0.3}, transport=transport, skew="hot")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_input_on_one_rank_on_both_transports(transport):
    run_ranks(3, _out_of_range_on_one_rank, 1, 20, transport=transport)


def _auto_picks_shared_memory():
    emb = ShardedEmbedding(50, 4, page_size=5)
    forced = ShardedEmbedding(50, 4, page_size=5, transport="process_group")
    again = ShardedEmbedding(50, 4, page_size=5)
    return emb.transport.name, forced.transport.name, again.transport is emb.transport


def test_auto_is_shared_memory_on_one_cpu_machine_and_tables_share_it():
    for name, forced, shared in run_ranks(2, _auto_picks_shared_memory):
        assert (name, forced, shared) == ("shared_memory", "process_group", True)


def _many_tables_leak_nothing():
    def fds():
        return len(os.listdir("/proc/self/fd"))

    ShardedEmbedding(30, 4, page_size=5, transport="shared_memory")(torch.tensor([1, 2]))  # warm up
    before = fds()
    for _ in range(20):
        emb = ShardedEmbedding(30, 4, page_size=5, transport="shared_memory")
        emb(torch.tensor([0, 29])).sum().backward()
        del emb
    return before, fds()


def test_tables_made_and_dropped_leave_no_shared_memory_behind():
    shm_before = set(os.listdir("/dev/shm"))
    for before, after in run_ranks(2, _many_tables_leak_nothing):
        assert after <= before  # no file descriptor per table: the group's transport is shared
    assert set(os.listdir("/dev/shm")) <= shm_before  # nothing named: the memory is the processes'


# ---------------------------------------------------------------------------- failures
def _rank(rank: int, world: int, port: int, how: str, zero_copy: bool, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=False, timeout=timedelta(seconds=30))
    # gloo's own timeout stays long (a loaded machine can take seconds to set the group up); the
    # transport under test has its own, short one.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    transport = SharedMemoryTransport(dist.group.WORLD, timeout=timedelta(seconds=3))
    inp, out = torch.ones(4, 2), torch.empty(4, 2)
    try:
        transport.all_to_all(out, inp, [2, 2], [2, 2])()  # one good exchange
    except TransportError as e:
        results.put((f"the first exchange failed on rank {rank}: {e}", 0.0))
        raise
    if rank == 1:
        if how == "dies":
            os.kill(os.getpid(), 9)  # SIGKILL: no goodbye
        time.sleep(30)  # never comes
    start = time.monotonic()
    try:
        if zero_copy:  # the rows built in the outbox (waits for the dead rank's reading of exchange 1: done)
            inp = transport.send_buffer(inp.numel() * 4).view(torch.float32).view(4, 2)
            inp.fill_(1)
        transport.all_to_all(out, inp, [2, 2], [2, 2])()
        results.put(("returned", 0.0))
    except TransportError as e:
        results.put((str(e), time.monotonic() - start))
    results.close()
    results.join_thread()  # the message is out before the process leaves
    os._exit(0)


@pytest.mark.parametrize("how, message, within", [
    ("dies", "rank 1 of the group (pid ", 2.0),  # noticed at once, not after the timeout
    ("never_comes", "rank 1 did not take part in exchange 2 within 3 s", 10.0),
])
@pytest.mark.parametrize("zero_copy", [False, True])
def test_a_rank_that_dies_or_never_comes_raises_on_the_others(how, message, within, zero_copy):
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, store.port, how, zero_copy, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        text, seconds = results.get(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.join(5)
    assert message in text and seconds < within, (text, seconds)


class _Flips:
    """Header words that read ``k - 1`` for the first ``reads`` reads, then ``k``: a peer that
    sends while this rank sleeps in `_wait`."""

    def __init__(self, k: int, reads: int):
        self.k, self.reads = k, reads

    def __getitem__(self, field):
        self.reads -= 1
        return self.k - 1 if self.reads >= 0 else self.k


class _Waiter:
    def __init__(self, words):
        self._peers = [None, type("Peer", (), {"words": words})()]
        self._pids = [0, 2**22 + 12345]  # no such process: the peer has exited
        self.timeout = 5.0


def test_a_peer_that_sent_and_then_exited_is_not_called_dead(monkeypatch):
    """The peer sends exchange k and exits while this rank sleeps between two polls: the
    liveness check finds it gone, but its rows are there (its outbox stays mapped here), so
    the wait returns instead of raising 'died' (a new user's script lost its last update)."""
    import sharded_embedding.transport as transport_module

    monkeypatch.setattr(transport_module, "_alive", lambda pid: False)
    monkeypatch.setattr(transport_module, "_SPIN", 0)  # the first check at poll _CHECK_POLLS, whatever the time
    monkeypatch.setattr(transport_module, "_CHECK_AFTER", 0.0)
    polls = transport_module._CHECK_POLLS
    # k - 1 read before the loop and at polls 1.._CHECK_POLLS: sent while the check ran
    SharedMemoryTransport._wait(_Waiter(_Flips(7, reads=1 + polls)), 1, 0, 7)
    with pytest.raises(TransportError, match="died during an exchange"):
        SharedMemoryTransport._wait(_Waiter(_Flips(7, reads=10**9)), 1, 0, 7)  # never sent: dead


def _next_exchange_works(shm, rank: int, width: int = 2, tag: str | None = None) -> None:
    """A well-formed 2-rank exchange after a failed one: each rank's rows arrive where they belong."""
    inp, out = torch.full((4, width), float(rank)), torch.empty(4, width)
    shm.all_to_all(out, inp, [2, 2], [2, 2], tag=tag)()
    assert out[:2].eq(0).all() and out[2:].eq(1).all()


def _mismatch_then_recover():
    """Ranks disagree on the splits of one exchange (rank 0 expects more than rank 1 sends, and
    the other way round): both raise, and the next, agreeing exchange works (no rank waits
    forever for the abandoned one to be read)."""
    rank = dist.get_rank()
    shm = make_transport("shared_memory", dist.group.WORLD, torch.device("cpu"))
    width = 11 if rank == 0 else 6  # like a collection's request beside a table's
    inp, out = torch.ones(2 * width, dtype=torch.int64), torch.empty(2 * width, dtype=torch.int64)
    with pytest.raises(TransportError, match="splits that do not match"):
        shm.all_to_all(out, inp, [width, width], [width, width])()
    _next_exchange_works(shm, rank, width=3)
    return True


def test_splits_that_do_not_match_raise_on_both_ranks_and_the_group_goes_on():
    assert run_ranks(2, _mismatch_then_recover) == [True, True]


# (rank 0's arguments, the ValueError it raises): the shared-memory transport copies raw bytes,
# so what all_to_all_single would refuse is refused before any byte moves.
BAD_ARGUMENTS = [
    ((torch.empty(4, 2), torch.ones(3, 2), [2, 2], [2, 2]), r"inp holds 3 rows, its splits \[2, 2\] count 4"),
    ((torch.empty(3, 2), torch.ones(4, 2), [2, 2], [2, 2]), r"out holds 3 rows, its splits \[2, 2\] count 4"),
    ((torch.empty(4, 2), torch.ones(4, 2), [2, 2], [1, 3]), "sends 1 rows to itself but expects 2"),
    ((torch.empty(4, 2), torch.ones(4, 2), [-1, 5], [-1, 5]), "must be >= 0"),
    ((torch.empty(4, 2), torch.ones(4, 2), [4], [4]), "one count per rank"),
    ((torch.empty(4, 2), torch.ones(4, 2), [2.0, 2.0], [2, 2]), "sequences of ints"),
    ((torch.empty(4, 2, dtype=torch.int32), torch.ones(4, 2), [2, 2], [2, 2]), "same kind of rows"),
    ((torch.empty(2, 4), torch.ones(4, 2), [1, 1], [2, 2]), "same kind of rows"),
]


def _bad_arguments_on_one_rank_then_recover():
    """Arguments no all-to-all can take (on rank 0 alone, then on both): ValueError on the rank
    that passed them, TransportError on the other, no byte copied, and the group's next exchange
    works."""
    rank = dist.get_rank()
    shm = make_transport("shared_memory", dist.group.WORLD, torch.device("cpu"))
    for args, message in BAD_ARGUMENTS:
        if rank == 0:
            with pytest.raises(ValueError, match=message):
                shm.all_to_all(*args)
        else:
            with pytest.raises(TransportError, match="rank 0 could not take part"):
                shm.all_to_all(torch.empty(4, 2), torch.ones(4, 2), [2, 2], [2, 2])()
        _next_exchange_works(shm, rank)
    out = torch.empty(4, 2)  # splits as one-time iterables (as all_to_all_single takes them): read once
    shm.all_to_all(out, torch.full((4, 2), float(rank)), iter([2, 2]), (n for n in (2, 2)))()
    assert out[:2].eq(0).all() and out[2:].eq(1).all()
    with pytest.raises(ValueError, match="must be >= 0"):  # both ranks: both raise their own error
        shm.all_to_all(torch.empty(4, 2), torch.ones(4, 2), [-1, 5], [-1, 5])
    _next_exchange_works(shm, rank)
    return True


def test_bad_arguments_raise_on_every_rank_before_any_byte_moves():
    assert run_ranks(2, _bad_arguments_on_one_rank_then_recover) == [True, True]


def _kinds_differ_then_recover():
    """Rank 0 is in a gradient exchange while rank 1 is in a request exchange of the same byte
    count (a rank that skipped a backward): both raise, naming both, before anything is read,
    and the next exchange of one kind works."""
    rank = dist.get_rank()
    shm = make_transport("shared_memory", dist.group.WORLD, torch.device("cpu"))
    inp, out = torch.ones(4, 2), torch.empty(4, 2)
    with pytest.raises(TransportError) as err:
        shm.all_to_all(out, inp, [2, 2], [2, 2], tag="gradients" if rank == 0 else "requests")()
    _next_exchange_works(shm, rank, width=3, tag="vectors")
    return str(err.value)


def test_exchanges_of_different_kinds_raise_on_both_ranks_and_the_group_goes_on():
    for message in run_ranks(2, _kinds_differ_then_recover):
        assert "rank 0 is in a gradients exchange of table #0, rank 1 is in a requests exchange" in message, message
        assert "not making the same calls" in message


def _one_rank_skips_its_backward():
    """The "skip a step whose loss is NaN" pattern done on one rank only: its next lookup
    meets the other rank's backward; on shared memory both raise in that call, naming both
    exchanges, before any row changes."""
    rank = dist.get_rank()
    emb = ShardedEmbedding(40, 4, page_size=5, transport="shared_memory", fused_optimizer={"name": "sgd", "lr": 0.1})
    before = emb.full_table()
    ids = torch.arange(40)
    out = emb(ids)
    with pytest.raises(TransportError, match="not making the same calls"):
        if rank == 0:
            out.sum().backward()  # rank 1 skips it and looks up again
        else:
            emb(ids)
    assert torch.equal(emb.full_table(), before)
    return True


def test_a_rank_that_skips_its_backward_raises_on_both_ranks():
    assert run_ranks(2, _one_rank_skips_its_backward) == [True, True]


def _backward_order_differs(fused, transport):
    """Two tables, both looked up; rank 0 runs A's backward first, rank 1 B's (same sizes: the
    byte counts agree). Both raise in the first backward, naming both tables, before any
    gradient is applied (both transports used to exchange A's gradients for B's silently)."""
    rank = dist.get_rank()
    opt = {"name": "sgd", "lr": 0.1} if fused else None
    a, b = (ShardedEmbedding(200, 4, page_size=8, transport=transport, fused_optimizer=opt) for _ in range(2))
    ids = torch.tensor([0, 1, 100, 150 + rank])
    before = (a.full_table(), b.full_table())
    oa, ob = a(ids), b(ids)
    with pytest.raises(TransportError, match=r"gradients exchange of table #\d+, lookup #1, rank 1 is in a gradients "
                                             r"exchange of table #\d+, lookup #1: the ranks are not making the same "
                                             r"calls"):
        (oa if rank == 0 else ob).sum().backward()
    assert torch.equal(a.full_table(), before[0]) and torch.equal(b.full_table(), before[1])
    assert a.weight.grad is None and b.weight.grad is None
    return True


@pytest.mark.parametrize("transport", ["shared_memory", "process_group"])
@pytest.mark.parametrize("fused", [False, True], ids=["sparse", "fused_sgd"])
def test_backward_passes_in_another_order_raise_on_both_ranks(fused, transport):
    assert run_ranks(2, _backward_order_differs, fused, transport) == [True, True]


def _one_of_two_lookups_skipped(transport):
    """Two lookups of one table; rank 1 detaches the second (its backward skips it). Rank 0's
    gradients of lookup 2 met rank 1's of lookup 1: rows moved on both ranks, and the next
    exchange said "Nothing was applied". Now each lookup's exchanges carry its number: both
    raise in that backward, naming both lookups, before any row changes."""
    rank = dist.get_rank()
    emb = ShardedEmbedding(40, 4, page_size=8, transport=transport, fused_optimizer={"name": "sgd", "lr": 1.0})
    before = emb.full_table()
    a, b = emb(torch.tensor([1, 9])), emb(torch.tensor([3, 11]))
    with pytest.raises(TransportError, match=r"rank 0 is in a gradients exchange of table #\d+, lookup #2, rank 1 is "
                                             r"in a gradients exchange of table #\d+, lookup #1"):
        (a.sum() + (b.sum() if rank == 0 else b.detach().sum())).backward()
    assert torch.equal(emb.full_table(), before)
    return True


@pytest.mark.parametrize("transport", ["shared_memory", "process_group"])
def test_a_lookup_skipped_by_one_ranks_backward_raises_before_any_row_changes(transport):
    assert run_ranks(2, _one_of_two_lookups_skipped, transport) == [True, True]
