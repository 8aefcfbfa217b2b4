"""How rows travel between the ranks of a group: gloo/nccl, or shared memory on one machine.

`Transport.all_to_all` is the one primitive the lookup needs (``all_to_all_single`` with ragged
splits, rows along dim 0), split in two so that local work can overlap the transfer: it sends
and returns a function that receives. An exchange can carry one flag per rank beside the rows
(whether a rank's gradient rows hold inf/NaN, `amp`): the receiving function then returns the
ranks whose flag was set, the same list on every rank.

`ProcessGroupTransport` calls ``torch.distributed.all_to_all_single`` (async) on the group's
backend: any machines, any device.

`SharedMemoryTransport` is for a CPU group whose ranks all run on one machine (checked: same
host name and boot id). gloo moves a same-host all-to-all through loopback TCP sockets, with a
thread hand-off per message; here each rank has an *outbox*, an anonymous shared-memory file
(``memfd_create``) that the other ranks map through ``/proc/<pid>/fd``, and one exchange
(numbered ``k`` alike on every rank, since every rank makes the same calls in the same order) is:

1. wait until every peer has read this rank's outbox of exchange ``k - 1``;
2. copy the rows for every peer into the outbox, their byte offsets and sizes into its header,
   then store ``k`` as the header's *sent* number (x86-64 keeps stores in order, so a peer that
   reads ``k`` there reads the rows too: the transport is only offered on x86-64);
3. (the returned function) for each peer: wait until its sent number is ``k``, check the size
   it wrote for this rank against the split this rank expects (ranks that disagree raise
   instead of reading garbage), copy the rows out; then store ``k`` as *done*.

Arguments that ``all_to_all_single`` would refuse (splits that are not one int >= 0 per rank
summing to each tensor's rows, different dtypes or row shapes) are refused before step 2, since
the copies are raw ``memmove``s: the rank still takes exchange ``k``'s number and publishes a
header that says so, raises ValueError, and every peer raises TransportError in step 3.

A caller can build its input in the outbox itself: `Transport.send_buffer` waits for step 1
ahead of time and lends the outbox's bytes; an exchange whose input lies there publishes the
offsets it lies at instead of copying it (step 2 without the copy).

Waiting spins briefly, then yields the CPU, then sleeps in short steps; it raises
`TransportError` after ``timeout`` (like gloo's), or once a peer process has died (checked when a
wait has lasted 2 ms, then every 10 ms: a short wait never reads ``/proc``). Outboxes
grow as needed (``ftruncate``; peers remap what they see has grown). Nothing is named in
``/dev/shm``: the memory belongs to the processes and is freed when the last one exits,
whatever way they exit.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import operator
import os
import platform
import socket
import time
from abc import ABC, abstractmethod
from datetime import timedelta

import torch
import torch.distributed as dist

from .distributed import all_gather_strings
from .native import holds_data

__all__ = ["Transport", "ProcessGroupTransport", "SharedMemoryTransport", "TransportError", "make_transport",
           "same_host", "close_transports", "TRANSPORTS"]

TRANSPORTS = ("auto", "process_group", "shared_memory")

_SENT, _DONE, _CAPACITY, _PID, _FLAG, _TAG, _FIXED = 0, 1, 2, 3, 4, 5, 6  # header words; offsets[world], sizes[world]
_REFUSED = -1  # the tag word of a rank that could not take part in an exchange (bad arguments): peers raise
# What an exchange carries (`Transport.all_to_all`'s ``tag``): ranks in exchanges of different
# kinds (one in a lookup's request exchange, another in a backward's gradient exchange) are not
# making the same calls; the shared-memory transport tells them so on both sides.
TAGS = {"requests": 1, "overflow": 2, "vectors": 3, "gradients": 4}
_TAG_NAMES = {v: k for k, v in TAGS.items()}
_KINDS = 8  # a header's tag word: kind + _KINDS * the caller word (`lookup_word`)
_CALLERS = 1 << 24  # a caller word: the table's number + _CALLERS * its lookup's number
_SPIN, _YIELD = 2_000, 20_000  # polls before yielding, before sleeping
_CHECK_AFTER, _CHECK_EVERY = 0.002, 0.01  # seconds of waiting before the first liveness check, between checks
_CHECK_POLLS = 64  # polls between two looks at the clock (past the spin phase: ~64 us yielding, ~16 ms sleeping)


def _tag_word(tag: str | None, caller: int) -> int:
    """An exchange's kind and its table's number in one int64 (0: not tagged)."""
    return TAGS[tag] + _KINDS * caller if tag is not None else 0


def lookup_word(caller: int, call: int) -> int:
    """The caller word of an exchange of lookup ``call`` (counted per table, alike on every
    rank) of table or collection ``caller``: two lookups of one table whose backward passes
    would pair up across ranks (one rank skipped one) are told apart."""
    return caller % _CALLERS + _CALLERS * (call % (1 << 30))


def _describe(tag: int) -> str:
    kind, word = _TAG_NAMES.get(tag % _KINDS, "another"), tag // _KINDS
    caller, call = word % _CALLERS, word // _CALLERS
    if kind not in ("vectors", "gradients"):
        return f"a {kind} exchange"
    return f"a {kind} exchange of table #{caller}" + (f", lookup #{call}" if call else "")


def _out_of_step(k: int | None, places: list[tuple[int, int]]) -> str:
    """The error of ranks found in different exchanges (``places``: (rank, tag word))."""
    where = f"exchange {k}: " if k is not None else ""
    return (where + ", ".join(f"rank {r} is in {_describe(t)}" for r, t in places)
            + ": the ranks are not making the same calls (every rank must run the same lookups and the same "
            "backward passes, in the same order). Nothing was applied.")


class TransportError(RuntimeError):
    """A peer did not take part in an exchange in time, died, or sent what was not expected."""


class Transport(ABC):
    """``all_to_all(out, inp, out_splits, in_splits, flag=None, tag=None, caller=0)``: send
    ``inp``'s rows (``in_splits[q]`` of them to rank ``q``, in rank order), return a function
    that receives into ``out`` (``out_splits[q]`` rows from rank ``q``) and returns the ranks
    whose ``flag`` was set (``[]`` without flags). ``tag``: what the exchange carries (a key of
    `TAGS`), ``caller``: for which table or collection (its number on the group); a transport
    that can see its peers' tags raises `TransportError` on every rank whose peers are in
    another exchange. Collective; rows along dim 0."""

    name = ""

    @abstractmethod
    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   flag: torch.Tensor | None = None, tag: str | None = None, caller: int = 0):
        """See the class docstring."""

    @abstractmethod
    def send_buffer(self, nbytes: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """``nbytes`` bytes on ``device`` (uint8, contiguous, 64-byte aligned) to build the input of this
        rank's *next* exchange in: an exchange whose ``inp`` is (a view of) them sends it without
        a copy where the transport can. Valid until that exchange; its content is undefined
        after it. Local (no collective), but on the shared-memory transport it waits until
        every peer has read this rank's previous exchange (`TransportError` as an exchange)."""

    def close(self) -> None:
        pass


class ProcessGroupTransport(Transport):
    """``torch.distributed.all_to_all_single`` on the group's backend (gloo, nccl)."""

    name = "process_group"

    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._send: dict[torch.device, torch.Tensor] = {}

    def send_buffer(self, nbytes, device=torch.device("cpu")):
        """A workspace reused across exchanges, grown as needed (the process group reads the
        input where it lies)."""
        buf = self._send.get(device)
        if buf is None or buf.numel() < nbytes:
            grown = buf.numel() * 3 // 2 if buf is not None else 0
            with torch.inference_mode(False):
                buf = self._send[device] = torch.empty(max(nbytes, grown, 64), dtype=torch.uint8, device=device)
        return buf[:nbytes]

    def all_to_all(self, out, inp, out_splits, in_splits, flag=None, tag=None, caller=0):
        flags = None
        if flag is not None:
            # One-hot rows of (flag, tag) summed beside the rows: every rank's non-finite flag, and
            # whether every rank moved the same table's rows (backward passes in another order
            # on another rank would swap tables' gradients where the byte counts agree; where
            # they differ, gloo aborts). Checked when the rows have arrived, before the caller
            # uses them: ranks that differ raise together. Untagged exchanges are not checked.
            flags = torch.zeros(self.world, 2, dtype=torch.int64, device=flag.device)
            flags[self.rank, 0] = flag.to(torch.int64)
            flags[self.rank, 1] = _tag_word(tag, caller)
            flag_work = dist.all_reduce(flags, group=self.group, async_op=True)  # flags and tags (SUM)
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)  # rows

        def receive() -> list[int]:
            work.wait()
            if flags is None:
                return []
            flag_work.wait()
            rows = flags.tolist()
            if tag is not None and len({t for _, t in rows}) > 1:
                raise TransportError(_out_of_step(None, [(r, t) for r, (_, t) in enumerate(rows)]))
            return [r for r, (f, _) in enumerate(rows) if f]

        return receive


def same_host(group) -> bool:
    """Whether every rank of ``group`` runs on this machine (host name and boot id agree;
    collective: two all-gathers)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    mine = f"{socket.gethostname()}/{boot}"
    return all(other == mine for other in all_gather_strings(mine, group))


_MADE: dict[tuple, Transport] = {}


def make_transport(kind: str, group, device: torch.device, timeout: timedelta | None = None) -> Transport:
    """The transport for ``group``: ``"process_group"``, ``"shared_memory"`` (raises ValueError
    where it cannot work) or ``"auto"`` (shared memory where it can work: a CPU group on one
    x86-64 Linux machine; else the process group). Collective over ``group`` the first time;
    the tables of a group share one transport of each kind (their exchanges are numbered in
    call order, the same on every rank), and ``"auto"`` shares the one of the kind it chose,
    so that a rank calling one table while another calls another meets it in the same
    exchange. (Tables of one group built with *different* kinds exchange over different
    transports: calling them out of step on different ranks waits until the timeout.)"""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport={kind!r} is not one of {list(TRANSPORTS)}")
    base = (id(dist.group.WORLD), tuple(dist.get_process_group_ranks(group)), device.type)
    if (*base, kind) in _MADE:
        return _MADE[(*base, kind)]
    concrete = _choose(kind, group, device)  # collective
    if (*base, concrete) not in _MADE:
        _MADE[(*base, concrete)] = (SharedMemoryTransport(group, timeout=timeout) if concrete == "shared_memory"
                                    else ProcessGroupTransport(group))
    _MADE[(*base, kind)] = _MADE[(*base, concrete)]
    return _MADE[(*base, kind)]


def close_transports() -> None:
    """Close every transport this process made (`distributed.finish` does, before leaving)."""
    for transport in {id(t): t for t in _MADE.values()}.values():  # "auto" shares a concrete one
        transport.close()
    _MADE.clear()


def _choose(kind: str, group, device: torch.device) -> str:
    """The kind of transport ``kind`` means for ``group``: ``"auto"`` resolved (collective:
    the host check), ``"shared_memory"`` checked (ValueError where it cannot work)."""
    world = dist.get_world_size(group)
    if kind == "process_group" or world == 1:
        return "process_group"
    reason = None
    if device.type != "cpu":
        reason = f"the table is on {device}"
    elif platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        reason = f"it needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    host_ok = same_host(group)  # collective: every rank takes part whatever its own findings
    if reason is None and not host_ok:
        reason = "the group's ranks are not all on this machine"
    if reason is not None:
        if kind == "shared_memory":
            raise ValueError(f"transport='shared_memory' cannot work here: {reason}")
        return "process_group"
    return "shared_memory"


class SharedMemoryTransport(Transport):
    """All-to-all between the ranks of a one-machine CPU group (see the module docstring)."""

    name = "shared_memory"

    def __init__(self, group, timeout: timedelta | None = None, capacity: int = 1 << 20):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.timeout = (timeout or timedelta(minutes=10)).total_seconds()
        self._header_bytes = -(-8 * (_FIXED + 2 * self.world) // 64) * 64
        self._fd = os.memfd_create(f"sharded_embedding_outbox_{self.rank}", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self._header_bytes + capacity)
        self._mine = _Mapping(self._fd, self._header_bytes + capacity, self._header_bytes)
        self._mine.words[_CAPACITY] = capacity
        self._mine.words[_PID] = os.getpid()
        self._step = 0
        self._lent: list[tuple[torch.Tensor, int]] = []  # outbox views lent for the next exchange, their base
        # Mappings of the outbox replaced by a bigger one while views of them were lent: unmapped
        # only once the exchange that sent from them is over (at the start of the next one).
        self._retired: list[_Mapping] = []
        self._retiring: list[_Mapping] = []
        # Every rank learns where the others' outboxes are (one exchange of strings), then maps them.
        where = all_gather_strings(f"{os.getpid()}:{self._fd}", group)
        self._pids = [int(w.split(":")[0]) for w in where]
        self._peers: list[_Mapping | None] = []
        for q, w in enumerate(where):
            if q == self.rank:
                self._peers.append(None)
                continue
            pid, fd = w.split(":")
            peer_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
            self._peers.append(_Mapping(peer_fd, os.fstat(peer_fd).st_size, self._header_bytes, owns_fd=True))
        dist.barrier(group=group)  # everyone has mapped everyone before the first exchange

    # ------------------------------------------------------------------ one exchange
    def send_buffer(self, nbytes, device=torch.device("cpu")):
        """The outbox's first ``nbytes`` data bytes, once every peer has read exchange ``k - 1``
        (grown if needed). Views lent for one exchange stay valid when a later call grows the
        outbox (the file keeps its bytes, the old mapping stays while they live)."""
        if (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cpu":
            raise ValueError(f"SharedMemoryTransport.send_buffer: the outbox is CPU memory, not {device}")
        self._unmap_retiring()
        self._wait_read(self._step)
        self._ensure_capacity(nbytes)
        view = self._mine.data[:nbytes]
        self._lent.append((view, self._mine.data.data_ptr()))
        return view

    def all_to_all(self, out, inp, out_splits, in_splits, flag=None, tag=None, caller=0):
        problem, in_splits, out_splits = self._refusal(out, inp, out_splits, in_splits)  # (read once: any iterable)
        lent = None
        if problem is None:
            row_bytes = math.prod(inp.shape[1:]) * inp.element_size()
            sizes = [n * row_bytes for n in in_splits]
            try:
                lent = self._in_outbox(inp, sum(sizes))
            except ValueError as e:
                problem = str(e)
        self._unmap_retiring()
        self._step += 1
        k, world, rank = self._step, self.world, self.rank
        self._wait_read(k - 1)  # 1. my outbox of exchange k - 1 has been read by everyone
        if problem is not None:  # take part without rows: every peer raises too, no one waits for me
            self._lent.clear()
            self._retiring, self._retired = self._retired, []
            words = self._mine.words
            words[_TAG], words[_DONE] = _REFUSED, k
            words[_SENT] = k
            raise ValueError(f"SharedMemoryTransport.all_to_all (exchange {k}): {problem}; nothing was exchanged, "
                             "and the other ranks raise too")
        own = (sum(sizes[:rank]), sizes[rank])
        # The input's bytes (as plain memory): copied into the outbox, and for the rows a rank sends itself.
        src = inp if inp.is_contiguous() and not inp.is_neg() else inp.resolve_neg().contiguous()
        words = self._mine.words
        if lent is not None:  # 2. built in the outbox: publish where each peer's rows lie
            offset = lent
            for q in range(world):
                words[_FIXED + q] = offset if q != rank else -1
                words[_FIXED + world + q] = sizes[q]
                offset += sizes[q]
        else:  # 2. rows for each peer, at offsets peers read from the header
            total = sum(sizes) - sizes[rank]
            self._ensure_capacity(total)
        self._lent.clear()
        self._retiring, self._retired = self._retired, []  # `src` may lie there: kept until the next exchange
        if lent is None:
            words, base = self._mine.words, self._mine.base
            offset = start = 0
            for q in range(world):
                n = sizes[q]
                if q != rank and n:  # (bounds: the outbox holds `total` bytes, `src` sum(sizes))
                    ctypes.memmove(base + offset, src.data_ptr() + start, n)
                words[_FIXED + q] = offset if q != rank else -1
                words[_FIXED + world + q] = n
                offset += n if q != rank else 0
                start += n
        mine = bool(flag) if flag is not None else False
        words[_FLAG] = int(mine)
        my_tag = words[_TAG] = _tag_word(tag, caller)
        words[_SENT] = k  # publish: after the rows, the flag and the tag (x86-64 store order)
        return functools.partial(self._receive, k, out, out_splits, src, own, flag is not None and mine,
                                 flag is not None, my_tag)

    def _receive(self, k: int, out: torch.Tensor, out_splits: list[int], src: torch.Tensor, own: tuple[int, int],
                 mine: bool, flags: bool, my_tag: int) -> list[int]:
        """3. of exchange ``k``: each peer's rows for this rank into ``out`` (own rows from ``src``,
        the input, at byte ``own[0]``, ``own[1]`` bytes); returns the ranks whose flag was set."""
        world, rank = self.world, self.rank
        dest = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
        out_row = math.prod(out.shape[1:]) * out.element_size()  # (checked in all_to_all: out holds the splits)
        at, flagged = dest.data_ptr(), []
        for q in range(world):  # 3. what each peer left for me
            n = out_splits[q] * out_row
            if q == rank:  # (n == own[1]: checked before sending, `_refusal`)
                if n:
                    ctypes.memmove(at, src.data_ptr() + own[0], n)
                if mine:
                    flagged.append(q)
            else:
                peer = self._peer(q, k)
                theirs = int(peer.words[_TAG])
                if theirs == _REFUSED:
                    self._mine.words[_DONE] = k  # abandoned, as below
                    raise TransportError(f"exchange {k}: rank {q} could not take part with the arguments it was "
                                         "given (it raised ValueError saying why); nothing was exchanged")
                if my_tag and theirs and theirs != my_tag:
                    self._mine.words[_DONE] = k  # abandoned, as below
                    raise TransportError(_out_of_step(k, sorted([(rank, my_tag), (q, theirs)])))
                wrote = int(peer.words[_FIXED + world + rank])
                if wrote != n:
                    # Abandoned here (the peer finds its own mismatch and raises too): mark it
                    # read, so that the group's next exchange does not wait for it forever.
                    self._mine.words[_DONE] = k
                    raise TransportError(
                        f"exchange {k}: rank {q} sent {wrote} bytes to rank {rank}, which expected {n}: the ranks "
                        "called the exchange with splits that do not match")
                if n:
                    start = int(peer.words[_FIXED + rank])
                    if not 0 <= start <= peer.capacity - n:  # (not what this package writes)
                        self._mine.words[_DONE] = k
                        raise TransportError(f"exchange {k}: rank {q}'s outbox header is corrupt")
                    ctypes.memmove(at, peer.base + start, n)
                if flags and peer.words[_FLAG]:
                    flagged.append(q)
            at += n
        if dest is not out:
            out.copy_(dest)
        self._mine.words[_DONE] = k
        return flagged

    # ------------------------------------------------------------------ helpers
    def _refusal(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits):
        """(why this rank cannot send ``inp`` and receive into ``out`` with these splits, or None;
        the in and out splits as lists of ints), checked before any byte moves: the copies read
        and write raw memory. The rules of ``all_to_all_single``: one split per rank, ints >= 0,
        summing to the rows of each tensor; and the same dtype and row shape on both sides (the
        transport moves bytes). The splits may be any iterables (read once)."""
        try:
            splits = [[operator.index(n) for n in s] for s in (in_splits, out_splits)]
        except TypeError:
            return f"the splits must be sequences of ints, got {in_splits!r} and {out_splits!r}", [], []
        return self._why_refused(out, inp, *splits), splits[0], splits[1]

    def _why_refused(self, out: torch.Tensor, inp: torch.Tensor, in_splits: list[int], out_splits: list[int]) -> str | None:
        """`_refusal`'s checks of int splits (None: none failed)."""
        splits = (in_splits, out_splits)
        if any(len(s) != self.world for s in splits):
            return f"the splits must hold one count per rank ({self.world}), got {in_splits!r} and {out_splits!r}"
        if any(n < 0 for s in splits for n in s):
            return f"the splits must be >= 0, got {in_splits!r} and {out_splits!r}"
        if inp.dim() == 0 or out.dim() == 0:
            return "inp and out must have rows (a dim 0)"
        if inp.dtype != out.dtype or inp.shape[1:] != out.shape[1:]:
            return (f"inp ({inp.dtype}, rows of shape {list(inp.shape[1:])}) and out ({out.dtype}, rows of shape "
                    f"{list(out.shape[1:])}) must hold the same kind of rows")
        for name, t, s in (("inp", inp, splits[0]), ("out", out, splits[1])):
            if sum(s) != t.shape[0]:
                return f"{name} holds {t.shape[0]} rows, its splits {s} count {sum(s)}"
        if splits[0][self.rank] != splits[1][self.rank]:
            return f"rank {self.rank} sends {splits[0][self.rank]} rows to itself but expects {splits[1][self.rank]}"
        if not (holds_data(inp) and holds_data(out)):
            return "a tensor's storage does not hold its elements (freed, or not allocated)"
        return None

    def _unmap_retiring(self) -> None:
        for mapping in self._retiring:
            mapping.close(keep_fd=True)
        self._retiring = []

    def _wait_read(self, k: int) -> None:
        """Until every peer has read this rank's outbox of exchange ``k``."""
        for q in range(self.world):
            if q != self.rank:
                self._wait(q, _DONE, k)

    def _in_outbox(self, inp: torch.Tensor, nbytes: int) -> int | None:
        """The outbox data offset of ``inp`` if it lies in a view lent for this exchange, else
        None; ValueError if it overlaps the outbox otherwise (a view lent for an earlier
        exchange, or reaching past the one lent): copying it into the outbox would overwrite it."""
        if not nbytes:
            return None
        ptr = inp.data_ptr()
        end = ptr + nbytes
        for view, base in self._lent:
            start = view.data_ptr()
            if start <= ptr and end <= start + view.numel() and inp.is_contiguous():
                return ptr - base
        data = self._mine.data
        if any(ptr < v.data_ptr() + v.numel() and v.data_ptr() < end for v in [data] + [v for v, _ in self._lent]):
            raise ValueError("SharedMemoryTransport: the input lies in the outbox but not in a send_buffer lent for "
                             "this exchange (a send buffer is valid for the next exchange only)")
        return None

    def _ensure_capacity(self, nbytes: int) -> None:
        if nbytes <= self._mine.words[_CAPACITY]:
            return
        capacity = max(nbytes, 2 * int(self._mine.words[_CAPACITY]))
        os.ftruncate(self._fd, self._header_bytes + capacity)  # grows; peers' mappings stay valid
        if self._lent:  # views of the old mapping are lent: it stays mapped while they may be used
            self._retired.append(self._mine)
            self._mine = _Mapping(self._fd, self._header_bytes + capacity, self._header_bytes)
        else:
            self._mine = _Mapping(self._fd, self._header_bytes + capacity, self._header_bytes, previous=self._mine)
        self._mine.words[_CAPACITY] = capacity

    def _peer(self, q: int, k: int) -> _Mapping:
        """Peer ``q``'s outbox once it has sent exchange ``k``, remapped if it grew."""
        self._wait(q, _SENT, k)
        peer = self._peers[q]
        if peer.words[_CAPACITY] + self._header_bytes > peer.size:
            self._peers[q] = peer = _Mapping(peer.fd, os.fstat(peer.fd).st_size, self._header_bytes, owns_fd=True,
                                             previous=peer)
        return peer

    def _wait(self, q: int, field: int, k: int) -> None:
        words = self._peers[q].words
        if words[field] >= k:
            return
        polls, now = 0, time.monotonic()
        check_at, deadline = now + _CHECK_AFTER, now + self.timeout
        while words[field] < k:
            polls += 1
            if polls < _SPIN:
                continue
            if polls < _YIELD:
                os.sched_yield()
            else:
                time.sleep(0.0002)
            # Is the peer alive (a read of /proc, ~20 us), is the timeout up: not in the short
            # waits of a training step, where the check would delay seeing the peer's rows.
            if polls % _CHECK_POLLS == 0 and time.monotonic() >= check_at:
                check_at = time.monotonic() + _CHECK_EVERY
                if not _alive(self._pids[q]):
                    if words[field] >= k:  # it did its part, then exited: its mapping is still ours to read
                        return
                    raise TransportError(f"rank {q} of the group (pid {self._pids[q]}) died during an exchange")
                if time.monotonic() > deadline:
                    raise TransportError(f"rank {q} did not take part in exchange {k} within {self.timeout:.0f} s")

    def close(self) -> None:
        self._lent.clear()
        for mapping in self._retired + self._retiring:
            mapping.close(keep_fd=True)
        for peer in self._peers:
            if peer is not None:
                peer.close()
        self._mine.close()
        os.close(self._fd)


class _Mapping:
    """A mapped outbox: its header words (int64) and its data (uint8 tensor)."""

    def __init__(self, fd: int, size: int, header_bytes: int, owns_fd: bool = False, previous: _Mapping | None = None):
        self.fd, self.size, self.owns_fd = fd, size, owns_fd
        self.mm = mmap.mmap(fd, size)
        self.words = memoryview(self.mm)[:header_bytes].cast("q")
        self.data = torch.frombuffer(self.mm, dtype=torch.uint8, offset=header_bytes, count=size - header_bytes)
        self.base, self.capacity = self.data.data_ptr(), size - header_bytes  # where the data bytes lie, how many
        if previous is not None:
            previous.close(keep_fd=True)

    def close(self, keep_fd: bool = False) -> None:
        self.words.release()
        self.data = None
        try:
            self.mm.close()
        except BufferError:  # a tensor view still alive: the mapping goes with it
            pass
        if self.owns_fd and not keep_fd:
            os.close(self.fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
