"""Several concept sets, one label per filter (issue 26): hand-written tables of two sets, composed exactly."""

from __future__ import annotations

import numpy as np
import pytest

from lavise_core.explain.dissection.compose import compose_tables, strictest_calibration
from lavise_core.explain.dissection.labels import DissectionTables, rank_labels


def tables(
    concepts: list[str], iou: list[list[float]], parts: set[str], calibration=None
) -> DissectionTables:
    """One set's tables as its dissection stage would store them (labels ranked by the one-set rule)."""
    iou_a = np.asarray(iou, np.float32)
    is_part = np.array([c in parts for c in concepts])
    ids, scores, _ = rank_labels(iou_a, concepts, n=int((~is_part).sum()), allowed=~is_part)
    return DissectionTables(
        concepts,
        iou_a,
        ids,
        scores,
        rate=iou_a * 2,
        mean_iou=iou_a / 2,
        is_part=is_part,
        calibration=calibration,
    )


# three filters; set A knows shapes, set B knows leaves; "red" is in both (measured on different images)
A = tables(
    ["red", "square", "striped"],
    [[0.30, 0.90, 0.05], [0.02, 0.00, 0.10], [0.00, 0.00, 0.00]],
    parts={"square"},
    calibration={"min_rate": 0.25, "floor_rate_part": 0.5, "floor_rate_background": 0.75},
)
B = tables(
    ["green leaf", "leaf", "red"],
    [[0.00, 0.00, 0.20], [0.12, 0.95, 0.00], [0.00, 0.00, 0.00]],
    parts={"leaf"},
    calibration={"min_rate": 0.5, "floor_rate_part": 0.25, "floor_rate_background": 0.75},
)


def test_each_filter_takes_its_best_label_over_both_sets_and_names_the_set() -> None:
    d = compose_tables([("ConceptShapes", A), ("SynthBirds", B)])
    assert d.concepts == ["red", "square", "striped", "green leaf", "leaf", "red"]
    assert d.concept_set_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.composed and d.concept_sets == ["ConceptShapes", "SynthBirds"]
    assert d.is_part.tolist() == [False, True, False, False, True, False]
    # filter 0: A's "red" 0.30 beats B's "red" 0.20 (the part "square", 0.90, is never a label)
    assert d.labels(0) == [
        ("red", pytest.approx(0.30)), ("red", pytest.approx(0.20)), ("striped", pytest.approx(0.05)),
        ("green leaf", 0.0),
    ]  # fmt: skip
    assert d.label_sets(0) == ["ConceptShapes", "SynthBirds", "ConceptShapes", "SynthBirds"]
    # filter 1: B's "green leaf" 0.12 beats A's "striped" 0.10
    assert [c for c, _ in d.labels(1)] == ["green leaf", "striped", "red", "red"]
    assert d.label_sets(1)[:2] == ["SynthBirds", "ConceptShapes"]
    # filter 2: nothing anywhere; the tie goes to the concept listed first, so to the set given first
    assert d.labels(2)[0] == ("red", 0.0) and d.label_sets(2)[0] == "ConceptShapes"
    np.testing.assert_array_equal(d.iou, np.concatenate([A.iou, B.iou], 1))
    np.testing.assert_array_equal(d.rate, np.concatenate([A.rate, B.rate], 1))
    np.testing.assert_array_equal(d.mean_iou, np.concatenate([A.mean_iou, B.mean_iou], 1))


def test_one_set_first_keeps_its_own_ranking() -> None:
    """The same rule as one set: composing a set with one that adds nothing better changes no label of it."""
    empty = tables(["blue"], [[0.0], [0.0], [0.0]], parts=set())
    d = compose_tables([("A", A), ("E", empty)])
    for k in range(3):
        assert d.labels(k)[:2] == A.labels(k)[:2]


def test_the_search_takes_the_strictest_calibration() -> None:
    cal = strictest_calibration([A.calibration, B.calibration, None])
    assert (cal["min_rate"], cal["floor_rate_part"], cal["floor_rate_background"]) == (0.5, 0.5, 0.75)
    assert strictest_calibration([None, None]) is None


def test_what_cannot_be_composed_is_refused() -> None:
    with pytest.raises(ValueError, match="at least two"):
        compose_tables([("A", A)])
    with pytest.raises(ValueError, match="names must differ"):
        compose_tables([("A", A), ("A", B)])
    other_layer = tables(["red"], [[0.1], [0.2]], parts=set())
    with pytest.raises(ValueError, match=r"different filter counts \[2, 3\]"):
        compose_tables([("A", A), ("B", other_layer)])
