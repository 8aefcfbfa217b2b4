"""The row helpers against the torch calls they stand for: `stable_sort` is torch.sort(stable=True),
`sum_duplicate_rows` sums with torch.unique's inverse, bitwise, and neither changes its input."""

from __future__ import annotations

import pytest
import torch

from sharded_embedding.rows import stable_sort, sum_duplicate_rows


def _cases():
    g = torch.Generator().manual_seed(0)
    yield torch.zeros(0, dtype=torch.int64)
    yield torch.tensor([7])
    yield torch.tensor([3, 3, 3, 0, 3])
    yield torch.tensor([2**40, 5, 2**40, 0])  # large keys: fewer bits left for positions
    yield torch.tensor([2**62 - 1, 1, 2**62 - 1])  # no room to pack: torch.sort's path
    for n, hi in [(17, 3), (1000, 50), (8192, 10**6), (20000, 2**31 - 1)]:
        yield torch.randint(0, hi, (n,), generator=g)
        yield torch.randint(0, hi, (n,), generator=g).int()


@pytest.mark.parametrize("keys", list(_cases()), ids=lambda k: f"{k.dtype}-{k.numel()}")
def test_stable_sort_is_torch_stable_sort(keys):
    before = keys.clone()
    got_keys, got_perm = stable_sort(keys)
    want_keys, want_perm = torch.sort(keys, stable=True)
    assert got_keys.dtype == torch.int64 and got_perm.dtype == torch.int64
    assert torch.equal(got_keys, want_keys.long()) and torch.equal(got_perm, want_perm)
    assert torch.equal(keys, before)
    if keys.numel():
        bounded = stable_sort(keys, bound=int(keys.max()) + 1)
        assert torch.equal(bounded[0], want_keys.long()) and torch.equal(bounded[1], want_perm)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns (torch.equal takes -0.0 for +0.0)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _reference(rows, values, sort):
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    if unique.numel() == rows.numel():
        if not sort:
            return rows, values
        order = torch.empty_like(inverse)
        order[inverse] = torch.arange(inverse.numel())
        return unique, values[order]
    return unique, values.new_zeros(unique.numel(), values.shape[1]).index_add_(0, inverse, values)


@pytest.fixture(params=[1, 2], ids=["one_thread", "two_threads"])
def threads(request):
    """One intra-op thread: the compiled grouping (`native.dedup`) where it is built; two:
    the torch/numpy one."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("n, hi", [(0, 5), (1, 5), (40, 1000), (40, 10), (6000, 500_000), (6000, 3000)])
def test_sum_duplicate_rows_matches_torch_unique_bitwise(n, hi, sort, dtype, threads):
    from sharded_embedding import native

    assert native.available() == (threads == 1 and native.built())
    g = torch.Generator().manual_seed(n + hi)
    rows = torch.randint(0, hi, (n,), generator=g)
    values = (torch.randn(n, 8, generator=g) * torch.exp(4 * torch.randn(n, 1, generator=g))).to(dtype)
    values[values.abs() < 0.3] = -0.0  # signed zeros: a sum from +0 turns them positive
    before = rows.clone()
    got = sum_duplicate_rows(rows, values, sort=sort)
    want = _reference(rows, values, sort)
    assert torch.equal(got[0], want[0]) and torch.equal(_bits(got[1]), _bits(want[1]))
    assert torch.equal(rows, before)
