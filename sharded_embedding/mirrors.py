"""Mirrored pages: one process group per distinct replica set, and the gradient all-reduce
that keeps the replicas of a page bitwise identical.

Lookups of a mirrored page are served by one replica each, so each replica receives only
part of the page's gradient. In the backward, for each replica set this rank belongs to,
in the plan's global order (so overlapping sets never wait on each other in a cycle):

1. ``all_gather`` (set)  how many rows of the set's pages each member's gradient touches;
2. ``all_gather`` (set)  those rows as global ids, padded to the largest count;
3. ``all_reduce`` (set, SUM)  the gradient of the union of those rows.

Every member then holds the same rows and the same summed values, so any deterministic
optimizer keeps the replicas identical. The cost is the touched rows of the mirrored
pages, never the whole pages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import all_gather_single, subgroup
from .rows import sum_duplicate_rows
from .placement import PagePlan

__all__ = ["MirrorSync"]


class MirrorSync:
    """Gradient all-reduce of the mirrored pages one rank holds."""

    def __init__(self, plan: PagePlan, rank: int, group, device: torch.device):
        self.page_size = plan.page_size
        pages = plan.local_pages(rank)
        self._local_pages = pages.to(device)
        self._sets = []
        slot_set = torch.full((pages.numel(),), -1, dtype=torch.int64)
        big = plan.world_size
        owners = plan.owners[pages]
        owners_sorted = torch.where(owners >= 0, owners, big).sort(dim=1).values
        for ranks in plan.mirror_sets():  # global order; every rank takes part in group creation
            pg = subgroup(group, ranks)
            if rank not in ranks:
                continue
            want = torch.full((owners.shape[1],), big, dtype=torch.int64)
            want[: len(ranks)] = torch.tensor(ranks)
            slot_set[(owners_sorted == want).all(1)] = len(self._sets)
            self._sets.append((ranks, pg))
        self._slot_set = slot_set.to(device)
        self._offset_of_page = plan.routing_table(rank).dest_offset.to(device)

    @property
    def active(self) -> bool:
        return bool(self._sets)

    def all_reduce(self, rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sum the gradient rows of mirrored pages over their replicas.

        ``rows`` (local rows, repeats allowed) with gradient ``values``. Returns (rows,
        values, mirrored rows reduced): rows of unmirrored pages pass through unchanged; the
        rows of each mirror set come back unique, summed over every replica, and include
        every row any replica touched, identically on all replicas.
        """
        if not self._sets:
            return rows, values, 0
        ps = self.page_size
        slot = torch.div(rows, ps, rounding_mode="floor")
        set_of_row = self._slot_set[slot]
        plain = set_of_row < 0
        out_rows, out_values, reduced = [rows[plain]], [values[plain]], 0
        for i, (_, pg) in enumerate(self._sets):
            mine = set_of_row == i
            mine_rows, mine_values = sum_duplicate_rows(rows[mine], values[mine], sort=False)
            gids = self._local_pages[torch.div(mine_rows, ps, rounding_mode="floor")] * ps + mine_rows % ps
            union = _all_gather_union(gids, pg)
            summed = values.new_zeros(union.numel(), values.shape[1])
            if union.numel():  # every member sees the same union: all skip together
                summed[torch.searchsorted(union, gids)] = mine_values
                dist.all_reduce(summed, group=pg)  # SUM over the replicas
            page = torch.div(union, ps, rounding_mode="floor")
            out_rows.append(self._offset_of_page[page] + union - page * ps)
            out_values.append(summed)
            reduced += union.numel()
        return torch.cat(out_rows), torch.cat(out_values), reduced


def _all_gather_union(ids: torch.Tensor, group) -> torch.Tensor:
    """Sorted union of every member's ``ids`` (two all-gathers: sizes, then padded ids)."""
    world = dist.get_world_size(group)
    size = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    sizes = torch.empty(world, dtype=torch.int64, device=ids.device)
    all_gather_single(sizes, size, group=group)
    longest = int(sizes.max())
    if longest == 0:
        return ids.new_empty(0)
    padded = torch.full((longest,), -1, dtype=torch.int64, device=ids.device)
    padded[: ids.numel()] = ids
    every = torch.empty(world * longest, dtype=torch.int64, device=ids.device)
    all_gather_single(every, padded, group=group)
    return torch.unique(every[every >= 0])
