"""Browsing a recorded layer's units (lavise_core.views.layers): sampling, ranking and naming, exact values."""

from __future__ import annotations

import numpy as np
import pytest

from lavise_core import views


def test_even_sample_spreads_over_the_set():
    assert views.even_sample(10, 4).tolist() == [0, 3, 6, 9]
    assert views.even_sample(3, 10).tolist() == [0, 1, 2]
    assert views.even_sample(0, 5).tolist() == []


def test_top_per_unit_largest_first_ties_by_row():
    m = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 0.0]])
    assert views.top_per_unit(m, 2).tolist() == [[1, 2], [0, 1]]
    with pytest.raises(ValueError, match="expected maxima"):
        views.top_per_unit(np.zeros(3), 1)


def test_merge_tops_keeps_a_running_top_k_with_its_maps():
    # two units, 1×2 maps; the value is each unit's largest spatial activation
    b1 = np.array([[[[1, 0]], [[0, 9]]], [[[4, 0]], [[0, 2]]]], np.float32)  # images 10, 11
    b2 = np.array([[[[0, 3]], [[5, 0]]]], np.float32)  # image 12
    tops = views.merge_tops(None, np.array([10, 11]), b1, 2)
    tops = views.merge_tops(tops, np.array([12]), b2, 2)
    index, value, maps = tops
    assert index.tolist() == [[11, 12], [10, 12]]
    assert value.tolist() == [[4.0, 3.0], [9.0, 5.0]]
    assert maps[0, 0].tolist() == [[4.0, 0.0]] and maps[1, 1].tolist() == [[5.0, 0.0]]


def test_unit_label_says_when_the_match_is_weak():
    row = {"best concept": "red wing", "IoU": 0.0523, "interpretable": True}
    assert views.unit_label(row) == "red wing (overlap 0.052)"
    assert views.unit_label({**row, "interpretable": False}) == "no label (best: red wing, overlap 0.052)"
