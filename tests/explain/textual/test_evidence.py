"""Sentences from attribute detectors (issue 23): exact values on hand-built detectors, the fit on planted data,
grounding on a planted network, and the targets on the demo bundle's held-out measures."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lavise_core.explain.textual.evidence import (
    AttributeDetectors,
    _precision_threshold,
    describe_class,
    evidence_contrast,
    evidence_explanation,
    ground_pixels,
    image_features,
    top_region,
)


def hand_built(concepts: list[str], C: int = 4, exclusive: list[tuple[int, int]] = ()) -> AttributeDetectors:
    """Attribute ``j`` reads filter ``j``'s pooled activation with weight 1 and threshold 1 (mean 0, scale 1)."""
    A = len(concepts)
    w = np.zeros((A, 2 * C), np.float32)
    w[np.arange(A), np.arange(A)] = 1.0
    ex = np.zeros((A, A), bool)
    for a, b in exclusive:
        ex[a, b] = ex[b, a] = True
    return AttributeDetectors(
        concepts, w, np.zeros(A, np.float32), np.zeros(2 * C, np.float32), np.ones(2 * C, np.float32),
        np.ones(A, np.float32), ex, np.ones(C, bool), np.full(A, 0.98, np.float32), np.full(A, 0.5, np.float32),
    )  # fmt: skip


def feats(phi: list[float]) -> np.ndarray:
    return np.concatenate([np.asarray(phi, np.float32), np.zeros(len(phi), np.float32)])


def test_precision_threshold_is_the_lowest_score_at_the_precision() -> None:
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    y = np.array([1, 1, 1, 0, 1, 0], bool)
    assert _precision_threshold(score, y, 0.75, min_hits=1) == 0.5  # top 5: 4 of 5 = 0.8
    assert _precision_threshold(score, y, 1.0, min_hits=1) == 0.7
    assert _precision_threshold(score, y, 1.0, min_hits=4) == float("inf")


def test_image_features_are_pooled_mean_then_peak() -> None:
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 0, 0] = 4.0
    maps[1] = 1.0
    assert image_features(maps).tolist() == [1.0, 1.0, 4.0, 1.0]
    assert image_features(maps[None]).shape == (1, 4)


def test_sentence_names_present_attributes_that_add_to_the_class_largest_first() -> None:
    det = hand_built(["red crown", "black wing", "white belly", "forked tail"])
    W = np.array([1.0, 2.0, 1.5, -1.0])  # forked tail is present but pulls the class down: not named
    ex = evidence_explanation(det, feats([2.0, 1.5, 3.0, 5.0]), "white-bellied shrike", W, min_attributes=3)
    assert [a.phrase for a in ex.attributes] == ["white belly", "black wing", "red crown"]
    assert [a.contribution for a in ex.attributes] == [4.5, 3.0, 2.0]
    assert (
        ex.sentence
        == "This is a white-bellied shrike because it has a white belly, black wings, and a red crown."
    )
    assert (
        ex.complete
        and ex.attributes[0].filters == [(2, 3.0)]
        and ex.attributes[0].precision == pytest.approx(0.98)
    )


def test_sentence_says_less_rather_than_something_wrong() -> None:
    det = hand_built(["red crown", "black wing", "white belly", "forked tail"])
    W = np.ones(4)
    few = evidence_explanation(det, feats([2.0, 0.0, 0.0, 0.0]), "emerald sunbird", W)
    assert few.sentence == (
        "This is an emerald sunbird because it has a red crown (only 1 attribute could be confirmed in this image)."
    )
    assert not few.complete
    none = evidence_explanation(det, feats([0.5, 0.0, 0.0, 0.0]), "emerald sunbird", W)
    assert none.attributes == [] and "none of the attributes" in none.sentence


def test_of_two_exclusive_attributes_only_the_more_certain_is_present() -> None:
    det = hand_built(["brown tail", "purple tail", "red crown"], C=3, exclusive=[(0, 1)])
    assert det.present(feats([2.0, 3.0, 2.0])).tolist() == [False, True, True]
    assert det.present(feats([3.0, 2.0, 0.0])).tolist() == [True, False, False]


def test_contrast_names_what_differs_between_the_classes() -> None:
    det = hand_built(["red crown", "blue crown", "forked tail"], C=3, exclusive=[(0, 1)])
    W = np.array([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    freq = np.array([[0.95, 0.0, 0.9], [0.0, 0.95, 0.9]])  # forked tail is shared: never named
    classes = ["scarlet-capped warbler", "azure-capped warbler"]
    sentence, pro, con = evidence_contrast(det, feats([3.0, 0.0, 3.0]), classes, 0, 1, W, freq)
    assert (pro, con) == (["red crown"], ["blue crown"])
    assert sentence == (
        "It is a scarlet-capped warbler rather than an azure-capped warbler because it has a red crown; "
        "an azure-capped warbler would have a blue crown."
    )


def test_class_description_puts_what_sets_it_apart_first() -> None:
    det = hand_built(["red breast", "purple breast", "brown wing", "spotted wing"], C=4)
    classes = ["crimson-breasted robin", "violet-breasted robin", "spotted-wing thrush"]
    rate = np.array([[0.9, 0.0, 0.95, 0.0], [0.0, 0.9, 0.95, 0.0], [0.0, 0.0, 0.2, 0.9]])
    d = describe_class(det, classes, 0, rate, np.zeros((3, 4)))
    assert (
        d.nearest[0] == "violet-breasted robin"
        and d.distinct == ["red breast"]
        and d.shared == ["brown wing"]
    )
    assert d.sentence == (
        "A crimson-breasted robin has a red breast, unlike the violet-breasted robin; like it, it has brown wings."
    )
    other = describe_class(det, classes, 1, rate, np.zeros((3, 4)))
    assert other.sentence != d.sentence and other.distinct == ["purple breast"]


def test_a_class_without_images_is_not_described_and_is_nobodys_nearest() -> None:
    """A network with classes of its own (ImageNet on SynthBirds): rows without fit images carry no evidence."""
    det = hand_built(["red breast", "purple breast", "brown wing", "spotted wing"], C=4)
    classes = ["crimson-breasted robin", "violet-breasted robin", "spotted-wing thrush"]
    rate = np.array([[0.9, 0.0, 0.95, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.9]])
    support = np.array([40, 0, 25])
    d = describe_class(det, classes, 0, rate, np.zeros((3, 4)), support=support)
    assert d.nearest == ["spotted-wing thrush"] and d.distinct == ["red breast", "brown wing"]
    assert (
        d.sentence
        == "A crimson-breasted robin has a red breast and brown wings, unlike the spotted-wing thrush."
    )
    none = describe_class(det, classes, 1, rate, np.zeros((3, 4)), support=support)
    assert (
        none.sentence.startswith("No probe image is classified as violet-breasted robin") and not none.nearest
    )
    alone = describe_class(det, classes, 0, rate, np.zeros((3, 4)), support=np.array([40, 0, 0]))
    assert (
        alone.sentence == "A crimson-breasted robin has brown wings and a red breast." and not alone.nearest
    )


def test_fit_finds_a_planted_attribute_and_refuses_an_unreadable_one() -> None:
    rng = np.random.default_rng(0)
    N, C = 600, 6
    phi = rng.random((N, C)).astype(np.float32)
    truth = np.zeros((N, 3), bool)
    truth[:, 0] = phi[:, 2] > 0.5  # read off filter 2
    truth[:, 1] = rng.random(N) > 0.5  # noise: no threshold reaches 97 % precision
    truth[:, 2] = ~truth[:, 0]  # never together with attribute 0
    features = np.concatenate([phi, phi], 1)
    det = AttributeDetectors.fit(features, truth, ["a", "noise", "not a"], np.ones(C, bool), np.arange(N))
    assert "noise" not in det.concepts and det.concepts[0] == "a"
    assert det.exclusive[det.concepts.index("a"), det.concepts.index("not a")]
    on = np.array([det.present(f)[0] for f in features])
    assert (truth[on, 0]).mean() >= 0.97 and on.mean() > 0.3  # precise, and it still finds most of them
    assert det.evidence_filters(features[np.argmax(phi[:, 2])], 0)[0][0] == 2


def test_fit_reads_only_the_measured_filters() -> None:
    rng = np.random.default_rng(1)
    phi = rng.random((400, 3)).astype(np.float32)
    truth = (phi[:, [0]] > 0.5).copy()
    features = np.concatenate([phi, phi], 1)
    det = AttributeDetectors.fit(features, truth, ["a"], np.array([False, True, True]), np.arange(400))
    assert det.concepts == [] or np.abs(det.weight[:, [0, 3]]).max() == 0.0


class Patch(nn.Module):
    """Filter 0 responds to red in the top-left quadrant only (a planted network for grounding)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0, 0] = 1.0
            self.features.weight[1, 2] = 1.0
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_grounding_lands_where_the_filter_adds_to_the_class() -> None:
    model = Patch().eval()
    lm = SimpleNamespace(model=model, lock=threading.Lock())
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, 4:12, 4:12] = 1.0  # red square top-left
    x[0, 2, 40:60, 40:60] = 1.0  # blue square elsewhere: filter 1, not asked about
    heat = ground_pixels(lm, x, "features", [0], np.array([1.0, 1.0]))
    region = top_region(heat, 0.01)
    ys, xs = np.nonzero(region)
    assert region.sum() == round(0.01 * 64 * 64)
    assert ys.max() < 14 and xs.max() < 14 and heat.max() == pytest.approx(1.0)
