"""Placement planning: which ranks hold which pages, and where a lookup of a page is sent.

The table's rows are cut into pages of ``page_size`` rows (the last page may be shorter).
A placement gives every page one or more owner ranks; several owners *mirror* the page.
A rank stores its pages back to back, in ascending page order, in one local tensor; page
``p`` held in local slot ``s`` occupies local rows ``[s * page_size, s * page_size + rows(p))``
(only the globally last page can be short, and it is always the last slot of its owners).

Everything here is pure metadata: no process group, no table storage. The plan is the
same on every rank, which is what `PagePlan.digest` lets ranks check at construction.
"""

from __future__ import annotations

import ctypes
import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["PagePlan", "RoutingTable"]

ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class RoutingTable:
    """Per-page routing of one requesting rank's lookups (tensors of length num_pages).

    ``dest_rank[p]`` is the rank that serves this rank's lookups of page ``p`` (itself if
    it holds the page) and ``dest_offset[p]`` the first local row of page ``p`` on that
    rank, so a global id ``i`` becomes local row ``dest_offset[p] + i - p * page_size``
    there without any translation on the serving side.
    """

    dest_rank: torch.Tensor
    dest_offset: torch.Tensor

    def to(self, device: torch.device) -> RoutingTable:
        return RoutingTable(self.dest_rank.to(device), self.dest_offset.to(device))


@dataclass(frozen=True, eq=False)
class PagePlan:
    """The page layout of a table and the owners of every page.

    ``owners`` is an int64 tensor ``[num_pages, max_replicas]``: row ``p`` lists the ranks
    holding page ``p`` (the first is its primary), padded with -1.
    Build it with `PagePlan.build`, which validates user input.
    """

    num_embeddings: int
    page_size: int
    world_size: int
    owners: torch.Tensor

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        num_embeddings: int,
        page_size: int,
        world_size: int,
        placement: str | Sequence = ROUND_ROBIN,
        num_devices: int = -1,
    ) -> PagePlan:
        """Validate the arguments and build the plan; ValueError names what is wrong."""
        _check_positive_int("num_embeddings", num_embeddings)
        _check_positive_int("page_size", page_size)
        _check_positive_int("world_size", world_size)
        num_pages = -(-num_embeddings // page_size)
        if isinstance(placement, str):
            if placement != ROUND_ROBIN:
                raise ValueError(
                    f"placement={placement!r} is not understood: use {ROUND_ROBIN!r} or a list "
                    f"with one entry per page (a rank, or a tuple of ranks that mirror the page)"
                )
            if isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral):
                raise ValueError(f"num_devices must be an int, got {num_devices!r}")
            if num_devices == -1:
                num_devices = world_size
            if not 1 <= num_devices <= world_size:
                raise ValueError(
                    f"num_devices={num_devices} is out of range: use -1 (all ranks) or "
                    f"1..{world_size} (the process group's size: ranks are counted within the group)"
                )
            owners = (torch.arange(num_pages, dtype=torch.int64) % int(num_devices)).unsqueeze(1)
            return cls(int(num_embeddings), int(page_size), int(world_size), owners)
        if num_devices != -1:
            raise ValueError(f"num_devices={num_devices!r} applies to placement={ROUND_ROBIN!r} only: an explicit "
                             "placement names every page's rank(s) itself; leave num_devices out")
        if not isinstance(placement, Sequence):
            raise ValueError(
                f"placement must be {ROUND_ROBIN!r} or a list with one entry per page, "
                f"got {type(placement).__name__}"
            )
        if len(placement) != num_pages:
            raise ValueError(
                f"placement has {len(placement)} entries but the table has {num_pages} pages "
                f"({num_embeddings} rows / page_size {page_size}, rounded up)"
            )
        if all(type(e) is int for e in placement):  # one rank per page: no per-page tensors
            owners = torch.tensor(list(placement), dtype=torch.int64).reshape(-1, 1)
            if num_pages == 0 or (int(owners.min()) >= 0 and int(owners.max()) < world_size):
                return cls(int(num_embeddings), int(page_size), int(world_size), owners)
        entries = [_parse_entry(p, e, world_size) for p, e in enumerate(placement)]
        width = max(len(e) for e in entries)
        owners = torch.full((num_pages, width), -1, dtype=torch.int64)
        for p, e in enumerate(entries):
            owners[p, : len(e)] = torch.tensor(e, dtype=torch.int64)
        return cls(int(num_embeddings), int(page_size), int(world_size), owners)

    # ----------------------------------------------------------------- page geometry
    @property
    def num_pages(self) -> int:
        return self.owners.shape[0]

    def page_start(self, page: int) -> int:
        return page * self.page_size

    def page_rows(self, page: int) -> int:
        return min(self.page_size, self.num_embeddings - page * self.page_size)

    def page_owners(self, page: int) -> tuple[int, ...]:
        if not 0 <= page < self.num_pages:
            raise IndexError(f"page {page} is out of range [0, {self.num_pages})")
        return tuple(int(r) for r in self.owners[page] if r >= 0)

    # ----------------------------------------------------------------- per-rank views
    @cached_property
    def _slots(self) -> torch.Tensor:
        """``[num_pages, max_replicas]``: the local slot of each (page, replica) on its rank."""
        flat = self.owners.reshape(-1)
        valid = flat >= 0
        page_of = torch.arange(self.owners.numel(), dtype=torch.int64) // self.owners.shape[1]
        # Order the (rank, page) entries; a page's slot on a rank is its rank among that rank's pages.
        key = torch.where(valid, flat * self.num_pages + page_of, torch.iinfo(torch.int64).max)
        order = torch.argsort(key)
        ranks_sorted = flat[order]
        first_of_rank = torch.searchsorted(ranks_sorted[: int(valid.sum())], ranks_sorted, right=False)
        slots = torch.full_like(flat, -1)
        slots[order] = torch.arange(flat.numel()) - first_of_rank
        slots[~valid] = -1
        return slots.view_as(self.owners)

    def local_pages(self, rank: int) -> torch.Tensor:
        """Ascending page ids held by ``rank`` (its local slot order)."""
        return torch.nonzero((self.owners == rank).any(1)).flatten()

    def local_rows(self, rank: int) -> int:
        """Rows ``rank`` holds (kept per rank: a table checks its storage's shape against it at
        every lookup)."""
        known = self._local_rows_of
        if rank not in known:
            pages = self.local_pages(rank)
            known[rank] = 0 if pages.numel() == 0 else \
                (pages.numel() - 1) * self.page_size + self.page_rows(int(pages[-1]))
        return known[rank]

    @cached_property
    def _local_rows_of(self) -> dict[int, int]:
        return {}

    def primary_pages(self, rank: int) -> torch.Tensor:
        """Pages whose primary (first) owner is ``rank``: each page has exactly one primary."""
        return torch.nonzero(self.owners[:, 0] == rank).flatten()

    def routing_table(self, requester: int) -> RoutingTable:
        """Where ``requester`` sends its lookups of each page.

        A page the requester holds is served locally. Otherwise the request goes to replica
        ``(requester + page) % num_replicas`` of the page, which spreads requesting ranks (and
        consecutive pages) over the mirrors.
        """
        valid = self.owners >= 0
        n_rep = valid.sum(1)
        pages = torch.arange(self.num_pages, dtype=torch.int64)
        held = self.owners == requester
        choice = torch.where(held.any(1), held.to(torch.int64).argmax(1), (requester + pages) % n_rep)
        dest_rank = self.owners.gather(1, choice.unsqueeze(1)).squeeze(1)
        dest_offset = self._slots.gather(1, choice.unsqueeze(1)).squeeze(1) * self.page_size
        return RoutingTable(dest_rank, dest_offset)

    def mirror_sets(self) -> tuple[tuple[int, ...], ...]:
        """Distinct sets of ranks that mirror at least one page, each sorted, in sorted order.

        The order is global, so ranks that walk these sets one after another never wait on
        each other in a cycle.
        """
        multi = (self.owners >= 0).sum(1) > 1
        sets = {tuple(sorted(int(r) for r in row if r >= 0)) for row in self.owners[multi]}
        return tuple(sorted(sets))

    # ----------------------------------------------------------------- identity
    def digest(self) -> str:
        """A fingerprint of the plan, equal on ranks that were given the same arguments."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.num_embeddings}/{self.page_size}/{self.world_size}/".encode())
        owners = self.owners.contiguous()
        h.update(ctypes.string_at(owners.data_ptr(), owners.numel() * owners.element_size()))
        return h.hexdigest()

    def describe(self) -> str:
        """A short text of the plan for error messages: pages per rank, mirrored pages, the
        first pages' owners and the `digest` (ranks given different placements differ here)."""
        held = [int((self.owners == r).any(1).sum()) for r in range(self.world_size)]
        mirrored = int(((self.owners >= 0).sum(1) > 1).sum())
        head = [self.page_owners(p) for p in range(min(self.num_pages, 4))]
        head = ", ".join(str(o[0]) if len(o) == 1 else str(o) for o in head)
        more = ", ..." if self.num_pages > 4 else ""
        return (f"{self.num_pages} pages on {self.world_size} ranks (pages held per rank {held}, {mirrored} "
                f"mirrored; owners of the first pages [{head}{more}]; digest {self.digest()[:12]})")


def plain_int(value):
    """``value`` as a Python int if it is an integer of another kind (numpy's, a 0-d integer
    tensor's ``__index__`` is not taken: only ``numbers.Integral``), else as it is (a bool,
    a float, ...: the argument checks name it)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value) is not int:
        return int(value)
    return value


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _parse_entry(page: int, entry, world_size: int) -> tuple[int, ...]:
    """One placement entry: a rank, or a sequence of distinct ranks that mirror the page."""
    if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
        ranks = (int(entry),)
    elif isinstance(entry, Sequence) and not isinstance(entry, str):
        ranks = tuple(entry)
        if not ranks:
            raise ValueError(f"page {page}: empty list of ranks")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, numbers.Integral):
                raise ValueError(f"page {page}: {r!r} in {entry!r} is not a rank (an int)")
        ranks = tuple(int(r) for r in ranks)
        seen = set()
        for r in ranks:
            if r in seen:
                raise ValueError(f"page {page}: rank {r} is repeated in {tuple(ranks)}")
            seen.add(r)
    else:
        raise ValueError(f"page {page}: {entry!r} is neither a rank nor a tuple of ranks")
    for r in ranks:
        if not 0 <= r < world_size:
            raise ValueError(f"page {page}: rank {r} does not exist (process group of {world_size} ranks, 0..{world_size - 1}: "
                             "ranks are counted within the table's process group)")
    return ranks
