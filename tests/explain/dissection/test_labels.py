"""Network Dissection on hand-built maps and label maps: exact counts and IoUs, planted units."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from lavise_core.explain.dissection.labels import (
    IOU_MIN,
    calibrate_search,
    concept_incidence,
    dissection_concepts,
    dissection_iou,
    ground_truth_matrix,
    part_names,
    rank_labels,
    region_overlap,
    subsampled_ground_truth,
)

REGIONS = ["crown", "breast"]


def record(crown: str, breast: str, background: str):
    return SimpleNamespace(
        region_concepts={"crown": [f"{crown} crown"], "breast": [f"{breast} breast"]},
        meta={"background": background},
    )


def labels() -> np.ndarray:
    """(1, 4, 4): crown = top-left 2×2 (value 1), breast = bottom row (value 2), the rest background (0)."""
    lab = np.zeros((1, 4, 4), np.int64)
    lab[0, :2, :2] = 1
    lab[0, 3, :] = 2
    return lab


def test_region_overlap_counts_exactly() -> None:
    maps = np.zeros((1, 2, 4, 4), np.float32)
    maps[0, 0, :2, :2] = 1.0  # filter 0 fires exactly on the crown
    maps[0, 1, 2:, :] = 1.0  # filter 1 on the two bottom rows: 4 breast pixels + 4 background
    inter, act, area = region_overlap(maps, labels(), np.array([0.5, 0.5]), 3)
    assert area.tolist() == [[8, 4, 4]]
    assert act.tolist() == [[4, 8]]
    assert inter[0, 0].tolist() == [0, 4, 0] and inter[0, 1].tolist() == [4, 0, 4]


def test_iou_labels_and_planted_units() -> None:
    recs = [record("red", "blue", "water"), record("red", "yellow", "sand")]
    concepts = dissection_concepts(recs, part_names=True, backgrounds=True, regions=REGIONS)
    assert concepts == sorted(
        [
            "red crown",
            "blue breast",
            "yellow breast",
            "crown",
            "breast",
            "water background",
            "sand background",
        ]
    )
    inc = concept_incidence(recs, REGIONS, concepts)
    assert inc.shape == (2, 3, len(concepts))
    assert inc[0, 1, concepts.index("red crown")] and inc[1, 0, concepts.index("sand background")]
    lab = np.concatenate([labels(), labels()])
    maps = np.zeros((2, 2, 4, 4), np.float32)
    maps[:, 0, :2, :2] = 1.0  # planted unit: exactly the crown mask in both images
    maps[0, 1, 3, :] = 1.0  # fires on the breast of image 0 only (blue breast)
    inter, act, area = region_overlap(maps, lab, np.array([0.5, 0.5]), 3)
    iou, _ = dissection_iou(inter, act, area, inc)
    assert iou[0, concepts.index("red crown")] == 1.0 and iou[0, concepts.index("crown")] == 1.0
    assert iou[1, concepts.index("blue breast")] == 1.0
    assert np.isclose(iou[1, concepts.index("breast")], 4 / 8)  # union: both images' breasts
    assert iou[1, concepts.index("yellow breast")] == 0.0
    allowed = np.array([c not in REGIONS for c in concepts])
    _, scores, names = rank_labels(iou, concepts, n=2, allowed=allowed)
    assert names[0][0] == ("red crown", 1.0) and names[1][0] == ("blue breast", 1.0)
    assert scores[:, 0].min() >= IOU_MIN
    # the held-out ground truth over each filter's top-1 image (by pooled activation)
    pooled = maps.mean((2, 3))
    G, _ = ground_truth_matrix(inter, act, area, inc, pooled, p=1)
    assert G[1, concepts.index("blue breast")] and not G[1, concepts.index("yellow breast")]
    rate, mean = subsampled_ground_truth(inter, act, area, inc, pooled, size=2, p=1, draws=3)
    assert rate[0, concepts.index("red crown")] == 1.0 and mean.shape == iou.shape


def _planted():
    """48 birds: unit 0 fires on the crown of every image (all crowns are red), unit 1 on the breast of the
    blue-breasted half only -> the concepts and ``(inter, act, area, incidence, pooled)``."""
    n = 48
    recs = [
        record("red", "blue" if i % 2 == 0 else "yellow", "water" if i % 3 == 0 else "sand") for i in range(n)
    ]
    concepts = dissection_concepts(recs, part_names=True, backgrounds=True, regions=REGIONS)
    inc = concept_incidence(recs, REGIONS, concepts)
    lab = np.concatenate([labels()] * n)
    maps = np.zeros((n, 2, 4, 4), np.float32)
    for i in range(n):
        maps[i, 0, :2, :2] = 1.0 + 1e-3 * i
        maps[i, 1, 3, :] = 1.0 + 1e-3 * i if i % 2 == 0 else 0.1
    inter, act, area = region_overlap(maps, lab, np.array([0.5, 0.5]), 3)
    return concepts, (inter, act, area, inc, maps.mean((2, 3)))


def test_search_calibration_on_planted_units() -> None:
    """Two units that detect their concept on every image: every judged-detected concept stays confident at
    the highest rate (min_rate 1), and their returned filters are right at the lowest floor (1 / draws)."""
    concepts, (inter, act, area, inc, pooled) = _planted()
    cal = calibrate_search(inter, act, area, inc, pooled, concepts, size=12, draws=8, folds=4, p=3)
    assert cal["min_rate"] == 1.0 and cal["floor_rate_part"] == 1 / 8
    assert cal["floor_rate_background"] == 1.0  # no unit detects a background: no floor reaches 90 %
    assert cal["folds"] == 4 and len(cal["curves"]["grid"]) == 8
    assert cal["curves"]["precision_part"] == [1.0] * 8
    again = calibrate_search(inter, act, area, inc, pooled, concepts, size=12, draws=8, folds=4, p=3)
    assert again == cal  # seeded


def test_part_names_follow_the_concept_set_s_own_kinds() -> None:
    """SynthBirds names no kinds: its region names are bare part names. ConceptShapes names its regions as
    textures and shapes: concepts of their own, labelled and searched."""
    concepts = ["circle", "red", "red circle", "striped", "wing"]
    regions = ["circle", "striped", "wing"]
    assert part_names(concepts, regions).tolist() == [True, False, False, True, True]
    kinds = {"circle": "shape", "striped": "texture", "red": "colour", "red circle": "shape", "wing": "part"}
    assert part_names(concepts, regions, kinds).tolist() == [False, False, False, False, True]


def test_search_calibration_over_the_concepts_that_are_not_part_names() -> None:
    """The calibration judges every concept but the part names and backgrounds. For a set that names no kinds
    (SynthBirds) its part names are its one-word concepts, so passing them changes nothing; when the region names
    are concepts of their own (ConceptShapes), "crown" and "breast" are judged too: the crown unit detects
    "crown" and the blue-breast unit's top images are all blue, so both hold at the lowest floor."""
    concepts, arrays = _planted()
    assert concepts == [
        "blue breast", "breast", "crown", "red crown", "sand background", "water background", "yellow breast"
    ]  # fmt: skip
    kw = dict(size=12, draws=8, folds=4, p=3)
    plain = calibrate_search(*arrays, concepts, **kw)
    assert calibrate_search(*arrays, concepts, **kw, is_part=part_names(concepts, REGIONS)) == plain
    named = part_names(concepts, REGIONS, {"crown": "shape", "breast": "shape"})
    assert not named.any()
    cal = calibrate_search(*arrays, concepts, **kw, is_part=named)
    assert (cal["min_rate"], cal["floor_rate_part"], cal["floor_rate_background"]) == (1.0, 1 / 8, 1.0)
    assert cal["curves"]["precision_part"] == [1.0] * 8
