"""The an8Flower protocol's pieces: discriminative parts, masks, IoU / Pearson, the label share."""

from __future__ import annotations

import numpy as np
import pytest

from lavise_core.evaluate.oramas import discriminative_parts, heatmap_scores, label_share, part_mask
from lavise_core.explain.oramas import OramasError, RelevantFeatures


def test_discriminative_parts_of_species() -> None:
    assert discriminative_parts(["scarlet-capped warbler", "speckled pipit"]) == [
        ["crown", "tail", "wing"],
        ["breast", "crown", "tail"],
    ]
    with pytest.raises(OramasError, match="not"):
        discriminative_parts(["red", "scarlet-capped warbler"])


def test_part_mask_and_scores_exact() -> None:
    labels = np.array([[0, 1, 1], [2, 2, 0], [3, 0, 0]])
    mask = part_mask(labels, ["crown", "eye", "beak"], ["crown", "beak", "tail"])
    assert mask.astype(int).tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    heat = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # mean 1/3: 3 pixels on
    iou, r = heatmap_scores(heat, mask)
    assert iou == 2 / 4  # on ∩ mask = 2, on ∪ mask = 4
    np.testing.assert_allclose(r, np.corrcoef(heat.ravel(), mask.ravel().astype(float))[0, 1])
    np.testing.assert_allclose(r, 0.5)  # 3 on, 3 in mask, 2 shared of 9: (2/9 - 1/9) / (2/9) = 0.5
    iou, r = heatmap_scores(np.ones((3, 3)), mask)
    assert iou == 0.0 and np.isnan(r)


def test_label_share_against_the_label_prior() -> None:
    W = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    rf = RelevantFeatures(["l"], [3], W, 2.0, ["a", "b"], {0: "crown", 1: "wing", 2: "crown"})
    out = label_share(rf, [["crown"], ["wing"]])
    assert out["per_class"] == {"a": 0.5, "b": 0.0}
    assert out["share"] == 0.25 and out["prior"] == (2 / 3 + 1 / 3) / 2
