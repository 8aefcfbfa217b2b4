"""`LargeEmbedding`: the 2017 single-process API, kept as a thin front over `ShardedEmbedding`.

The original placed page ``i`` on GPU ``i % num_devices`` (or ``device_list[i]``, a tuple
mirroring the page with nn.DataParallel) inside one process. Here the devices are ranks:
launch with at least as many ranks as the placement names (torchrun), and every rank
builds the module and calls it with its own batch. Outside torchrun a single-process group
is created, so ``LargeEmbedding(..., num_devices=1)`` works in a plain script too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import init_distributed
from .embedding import ShardedEmbedding

__all__ = ["LargeEmbedding"]


class LargeEmbedding(nn.Module):
    """``LargeEmbedding(n_words, dim_word, page_size, num_devices, use_cuda, device_list)``.

    Args:
        n_words: rows of the table.
        dim_word: columns of the table.
        page_size: rows per page; 0 or less means one page holding the whole table.
        num_devices: round robin over ranks ``0..num_devices-1`` (-1: all ranks); ignored
            when ``device_list`` is given.
        use_cuda: store pages on ``cuda:LOCAL_RANK`` (default: when CUDA is available).
        device_list: one entry per page, a rank or a tuple of ranks mirroring the page.
        sparse: sparse gradients; default ``not use_cuda``, as in the original.
        seed: see `ShardedEmbedding`.
    """

    def __init__(
        self,
        n_words: int,
        dim_word: int,
        page_size: int = 0,
        num_devices: int = -1,
        use_cuda: bool | None = None,
        device_list: Sequence | None = None,
        *,
        sparse: bool | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if use_cuda is not None and not isinstance(use_cuda, bool):
            raise TypeError(f"LargeEmbedding: use_cuda must be a bool or None, got {type(use_cuda).__name__} "
                            f"{use_cuda!r}; the signature is (n_words, dim_word, page_size, num_devices, use_cuda, "
                            "device_list): pass a page list as device_list=")
        if use_cuda is None:
            use_cuda = torch.cuda.is_available()
        elif use_cuda and not torch.cuda.is_available():
            raise ValueError("LargeEmbedding(use_cuda=True) but CUDA is not available here; pass use_cuda=False")
        init_distributed(None if use_cuda else "gloo")
        if page_size is None or page_size <= 0:
            page_size = n_words
        device = None if use_cuda else torch.device("cpu")
        self.table = ShardedEmbedding(
            n_words,
            dim_word,
            page_size=page_size,
            placement=list(device_list) if device_list is not None else "round_robin",
            num_devices=num_devices if device_list is None else -1,  # the list places every page
            device=device,
            sparse=(not use_cuda) if sparse is None else sparse,
            seed=seed,
        )
        self.n_words, self.dim_word, self.use_cuda = n_words, dim_word, use_cuda
        self.num_devices = num_devices

    @property
    def page_size(self) -> int:
        return self.table.page_size

    @property
    def num_pages(self) -> int:
        return self.table.num_pages

    @property
    def page_devices(self) -> list[int]:
        """The primary rank of each page (the original's ``page_devices``)."""
        return [int(r) for r in self.table.plan.owners[:, 0]]

    @property
    def embeddings(self) -> _Pages:
        """``embeddings[i]`` looks up rows of page ``i`` by their offset in the page, on a rank
        holding it (the original's per-page ``nn.Embedding`` list)."""
        return _Pages(self.table)

    def forward(self, indices) -> torch.Tensor:
        return self.table(indices)


class _Pages(Sequence):
    def __init__(self, table: ShardedEmbedding):
        self._table = table

    def __len__(self) -> int:
        return self._table.num_pages

    def __getitem__(self, page: int) -> _Page:
        if not isinstance(page, int):
            raise TypeError("pages are indexed by an int")
        if page < 0:
            page += len(self)
        if not 0 <= page < len(self):
            raise IndexError(f"page {page} is out of range [0, {len(self)})")
        return _Page(self._table, page)


class _Page:
    """One page, looked up locally by row offset within the page."""

    def __init__(self, table: ShardedEmbedding, page: int):
        self._table, self.page = table, page

    @property
    def weight(self) -> torch.Tensor:
        pages = self._table.local_pages
        if self.page not in pages:
            raise LookupError(
                f"page {self.page} is held by ranks {self._table.page_owners(self.page)}; "
                f"this is rank {self._table.rank}"
            )
        return pages[self.page]

    def __call__(self, offsets) -> torch.Tensor:
        weight = self.weight
        return F.embedding(torch.as_tensor(offsets, device=weight.device), weight)
