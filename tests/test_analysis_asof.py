"""asof_prev (binary search over one (group, row) key) against the merge-and-carry
implementation it replaced, which it keeps for groups too wide for that key."""

from __future__ import annotations

import numpy as np
import pytest

from pkstrace.analysis.prep import _asof_prev_sorting, asof_prev


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_asof_prev_matches_merge_and_carry(seed: int, inclusive: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    nl, nr = int(rng.integers(1, 300)), int(rng.integers(1, 300))
    lo = int(rng.choice([0, -3, 1000]))  # CPUs, keys with -1, pids
    ng = int(rng.integers(1, 8))
    left_row = rng.integers(0, n, nl)
    right_row = rng.integers(0, n, nr)  # repeats: several right events on one row
    if seed % 2:  # the families' usual case: both sides in row order
        left_row.sort()
        right_row.sort()
    left_group = rng.integers(lo, lo + ng, nl)
    right_group = rng.integers(lo, lo + ng, nr)
    if seed % 3 == 0:
        right_row = right_row.astype(np.int32)  # p.rows() hands out int32 rows
    got = asof_prev(left_group, left_row, right_group, right_row, n, inclusive=inclusive)
    want = _asof_prev_sorting(left_group, left_row, right_group, right_row, inclusive)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_asof_prev_wide_groups_fall_back() -> None:
    # group keys too wide for group * (n + 1) + row: the merge-and-carry path answers
    g = np.array([1 << 61, 5, 1 << 61], dtype=np.int64)
    rows = np.array([0, 1, 2])
    got = asof_prev(g, rows, g, rows, 3)
    np.testing.assert_array_equal(got, [-1, -1, 0])


def test_asof_prev_with_a_prebuilt_right_index() -> None:
    # enclosing_handler() builds the right side's index once and passes it in
    from pkstrace.analysis.prep import _asof_index

    rng = np.random.default_rng(7)
    right_row = np.sort(rng.integers(0, 500, 200))
    right_group = rng.integers(0, 4, 200)
    left_row = np.sort(rng.integers(0, 500, 150))
    left_group = rng.integers(0, 4, 150)
    index = _asof_index(right_group, right_row, 500)
    got = asof_prev(left_group, left_row, right_group, right_row, 500, right_index=index)
    want = _asof_prev_sorting(left_group, left_row, right_group, right_row, False)
    np.testing.assert_array_equal(got, want)
