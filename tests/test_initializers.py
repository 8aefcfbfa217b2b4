"""The initial table is a pure function of (seed, row, dim), whatever the paging."""

import torch

from sharded_embedding.initializers import BLOCK_ROWS, fill_initial_rows, initial_rows


def test_rows_do_not_depend_on_how_the_table_is_cut():
    whole = initial_rows(3, 5, 0, 3 * BLOCK_ROWS + 17)
    cuts = [0, 1, 100, BLOCK_ROWS - 1, BLOCK_ROWS + 5, 2 * BLOCK_ROWS, 3 * BLOCK_ROWS + 17]
    pieces = [torch.empty(b - a, 5) for a, b in zip(cuts, cuts[1:])]
    fill_initial_rows(3, 5, [(a, b, t) for a, b, t in zip(cuts, cuts[1:], pieces)])
    assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(initial_rows(3, 5, 4000, 4200), whole[4000:4200])


def test_seeds_and_blocks_differ_and_look_standard_normal():
    a, b = initial_rows(0, 16, 0, 2 * BLOCK_ROWS), initial_rows(1, 16, 0, 2 * BLOCK_ROWS)
    assert not torch.equal(a, b)
    assert not torch.equal(a[:BLOCK_ROWS], a[BLOCK_ROWS:])  # blocks have their own streams
    for t in (a, b):
        assert abs(t.mean().item()) < 0.02 and abs(t.std().item() - 1) < 0.02


def test_other_dtypes_are_rounded_from_the_same_values():
    assert torch.equal(initial_rows(0, 4, 0, 50, dtype=torch.bfloat16), initial_rows(0, 4, 0, 50).bfloat16())
