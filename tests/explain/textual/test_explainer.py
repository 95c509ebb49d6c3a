"""Textual explanations: every equation on hand-computed fixtures (3 images, 2 filters, 3 attributes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lavise_core.explain.textual.attributes import AttributeTable
from lavise_core.explain.textual.explainer import (
    TextualError,
    TextualExplainer,
    article,
    class_descriptions,
    contrastive_explanation,
    debug_misclassified,
    explanation_sentence,
    filter_activation_probability,
    filter_attribute_pdf,
    filter_class_weights,
    filter_specificity,
    ground_attribute,
    image_class_pdf,
    join_items,
    merge_phrases,
    retrieve_by_attributes,
)

# phi_k(x_i): 3 images x 2 filters
POOLED = np.array([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]], dtype=np.float32)
# image 0: t0, t2; image 1: t0, t1; image 2: t1   -> D = [2, 2, 1]
ATTR = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=np.float32)
PRIOR = np.array([0.5, 0.25, 0.25])
VOCAB = ["red crown", "black wing", "long tail"]
# by hand (module docstring): p(f|x) columns = [0, 1/3, 2/3] and [2/3, 1/3, 0]
PDF_NORMALIZED = np.array([[2 / 5, 3 / 5, 0.0], [6 / 11, 1 / 11, 4 / 11]])
PDF_INDICATOR = np.array([[2 / 5, 3 / 5, 0.0], [6 / 9, 1 / 9, 2 / 9]])
W = np.array([[1.0, -1.0], [0.5, 0.5]])


# ----------------------------------------------------------------------------- eq. 3
def test_filter_activation_probability_by_hand() -> None:
    p = filter_activation_probability(POOLED)
    np.testing.assert_allclose(p, [[0, 2 / 3], [1 / 3, 1 / 3], [2 / 3, 0]], atol=1e-7)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-6)


def test_filter_activation_probability_scale_offset_invariant_and_negative_ok() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4))
    p1 = filter_activation_probability(x)
    p2 = filter_activation_probability(x * np.array([1e-3, 10.0, 5.0, 1e3]) - 7.0)
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    assert (p1 >= 0).all()


def test_filter_activation_probability_dead_filter_and_valid_mask() -> None:
    x = np.array([[1.0, 5.0], [2.0, 5.0], [100.0, 5.0], [3.0, 5.0]])
    valid = np.array([True, True, False, True])
    p = filter_activation_probability(x, valid)
    np.testing.assert_allclose(p[:, 0], [0, 1 / 3, 0, 2 / 3], atol=1e-7)  # 100 is ignored
    np.testing.assert_allclose(p[:, 1], [1 / 3, 1 / 3, 0, 1 / 3], atol=1e-7)  # dead: uniform
    with pytest.raises(TextualError, match="NaN"):
        filter_activation_probability(np.array([[np.nan, 1.0]]))
    with pytest.raises(TextualError, match="no valid"):
        filter_activation_probability(x, np.zeros(4, bool))


# ----------------------------------------------------------------------------- eq. 1-4
def test_filter_attribute_pdf_by_hand() -> None:
    pdf = filter_attribute_pdf(POOLED, ATTR, PRIOR)
    np.testing.assert_allclose(pdf, PDF_NORMALIZED, atol=1e-6)
    pdf_i = filter_attribute_pdf(POOLED, ATTR, PRIOR, likelihood="indicator")
    np.testing.assert_allclose(pdf_i, PDF_INDICATOR, atol=1e-6)
    assert pdf.dtype == np.float32


def test_filter_attribute_pdf_ignores_invalid_rows() -> None:
    pooled = np.vstack([POOLED, [[50.0, -3.0]]])
    attr = np.vstack([ATTR, [[1, 1, 1]]])
    valid = np.array([True, True, True, False])
    np.testing.assert_allclose(
        filter_attribute_pdf(pooled, attr, PRIOR, valid=valid), PDF_NORMALIZED, atol=1e-6
    )


def test_filter_attribute_pdf_no_evidence_row_is_prior() -> None:
    pooled = np.array([[0.0], [1.0]])  # all mass on image 1, which has no attribute
    attr = np.array([[1, 1], [0, 0]], dtype=np.float32)
    pdf = filter_attribute_pdf(pooled, attr, np.array([0.3, 0.7]))
    np.testing.assert_allclose(pdf, [[0.3, 0.7]], atol=1e-6)


def test_filter_attribute_pdf_recovers_planted_filters() -> None:
    """Filter k fires on images with attribute k; attribute 0 is in 90 % of images."""
    rng = np.random.default_rng(1)
    n, t = 400, 5
    attr = (rng.random((n, t)) < 0.2).astype(np.float32)
    attr[:, 0] = rng.random(n) < 0.9
    pooled = attr[:, 1:] * 3.0 + rng.random((n, t - 1))
    prior = np.full(t, 1 / t)
    pdf = filter_attribute_pdf(pooled, attr, prior)
    assert list(pdf.argmax(axis=1)) == [1, 2, 3, 4]
    pdf_ind = filter_attribute_pdf(pooled, attr, prior, likelihood="indicator")
    assert (pdf_ind[:, 0] > pdf[:, 0]).all()  # the bare indicator leans to the frequent attribute


def test_filter_attribute_pdf_shape_errors() -> None:
    with pytest.raises(TextualError, match=r"\(N, T\)"):
        filter_attribute_pdf(POOLED, ATTR[:2], PRIOR)
    with pytest.raises(TextualError, match="prior"):
        filter_attribute_pdf(POOLED, ATTR, PRIOR[:2])
    with pytest.raises(TextualError, match="likelihood"):
        filter_attribute_pdf(POOLED, ATTR, PRIOR, likelihood="bogus")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- eq. 5-6
def test_image_class_pdf_by_hand() -> None:
    phi = np.array([2.0, 1.0])
    # class 0: contributions [2, -1] -> weights [1, 0]
    np.testing.assert_allclose(image_class_pdf(PDF_NORMALIZED, phi, W, 0), PDF_NORMALIZED[0], atol=1e-6)
    # class 1: contributions [1, 0.5] -> weights [2/3, 1/3]
    expected = 2 / 3 * PDF_NORMALIZED[0] + 1 / 3 * PDF_NORMALIZED[1]
    np.testing.assert_allclose(image_class_pdf(PDF_NORMALIZED, phi, W, 1), expected, atol=1e-6)
    # batched: (B, C) with per-row classes, and one class for all rows
    batch = image_class_pdf(PDF_NORMALIZED, np.stack([phi, phi]), W, np.array([0, 1]))
    np.testing.assert_allclose(batch, [PDF_NORMALIZED[0], expected], atol=1e-6)
    np.testing.assert_allclose(
        image_class_pdf(PDF_NORMALIZED, np.stack([phi, phi]), W, 1), [expected] * 2, atol=1e-6
    )


def test_filter_class_weights_softmax_fallback() -> None:
    w = np.array([[-1.0, -1.0]])
    got = filter_class_weights(np.array([1.0, 2.0]), w, 0)  # contributions [-1, -2]: none positive
    e = np.array([math.exp(-1), math.exp(-2)])
    np.testing.assert_allclose(got, e / e.sum(), atol=1e-12)


def test_image_class_pdf_errors() -> None:
    with pytest.raises(TextualError, match="channels"):
        image_class_pdf(PDF_NORMALIZED, np.ones(3), W, 0)
    with pytest.raises(TextualError, match="out of range"):
        image_class_pdf(PDF_NORMALIZED, np.ones(2), W, 2)


# ----------------------------------------------------------------------------- eq. 7-8
def test_class_descriptions_by_hand() -> None:
    got = class_descriptions(PDF_NORMALIZED, W)
    np.testing.assert_allclose(got[0], PDF_NORMALIZED[0], atol=1e-6)  # σ([1, -1]) = [1, 0]
    np.testing.assert_allclose(got[1], PDF_NORMALIZED.mean(axis=0), atol=1e-6)  # σ([.5, .5])
    # with a per-filter scale: class 1 -> σ([0.5 * 1, 0.5 * 3]) = [1/4, 3/4]
    got_s = class_descriptions(PDF_NORMALIZED, W, phi_scale=np.array([1.0, 3.0]))
    np.testing.assert_allclose(got_s[1], 0.25 * PDF_NORMALIZED[0] + 0.75 * PDF_NORMALIZED[1], atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- eq. 9
def test_ground_attribute_by_hand() -> None:
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 0, 0] = 1.0
    maps[1, 1, 1] = 1.0
    y = ground_attribute(maps, np.array([0.75, 0.25]))
    np.testing.assert_allclose(y, [[1.0, 0.0], [0.0, 1 / 3]], atol=1e-6)
    up = ground_attribute(maps, np.array([0.75, 0.25]), out_size=(8, 8))
    assert up.shape == (8, 8) and up.min() == 0.0 and up.max() == pytest.approx(1.0)
    r, c = np.unravel_index(up.argmax(), up.shape)
    assert r < 4 and c < 4  # the peak stays in the top-left quadrant


def test_ground_attribute_batched_and_multi_attribute() -> None:
    import torch

    rng = np.random.default_rng(0)
    maps = rng.random((3, 2, 4, 5)).astype(np.float32)
    cols = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = ground_attribute(torch.from_numpy(maps), cols, out_size=(4, 5))
    assert y.shape == (3, 2, 4, 5)
    for b in range(3):
        for q in range(2):
            m = maps[b, q]
            np.testing.assert_allclose(y[b, q], (m - m.min()) / (m.max() - m.min()), atol=1e-6)
    assert ground_attribute(np.ones((2, 3, 3)), np.array([0.5, 0.5])).max() == 0.0  # constant -> zeros
    with pytest.raises(TextualError):
        ground_attribute(maps[0], np.ones(3))


# ----------------------------------------------------------------------------- sentences
def test_join_items() -> None:
    assert join_items([]) == ""
    assert join_items(["a"]) == "a"
    assert join_items(["a", "b"]) == "a and b"
    assert join_items(["a", "b", "c"]) == "a, b, and c"


def test_merge_phrases() -> None:
    got = merge_phrases(
        ["red crown", "black wing", "white wing", "orange eye", "brown plumage", "hooked beak"]
    )
    assert got == ["a red crown", "black and white wings", "orange eyes", "brown plumage", "a hooked beak"]
    assert merge_phrases(["yellow foot", "orange belly"]) == ["yellow feet", "an orange belly"]


def test_explanation_sentence() -> None:
    vocab = ["red crown", "black wing", "white wing", "long tail", "short beak", "orange eye"]
    row = np.array([0.3, 0.25, 0.2, 0.1, 0.09, 0.06])
    e = explanation_sentence("Cardinal", row, vocab)
    assert e.sentence == (
        "This is a Cardinal because it has a red crown, black and white wings, a long tail, and a short beak."
    )
    assert [a for a, _ in e.attributes] == vocab[:5]
    assert e.attributes[0][1] == pytest.approx(0.3)
    e2 = explanation_sentence("American Crow", row, vocab, top=1)
    assert e2.sentence == "This is an American Crow because it has a red crown."
    assert e2.to_json()["attributes"] == [["red crown", pytest.approx(0.3)]]
    with pytest.raises(TextualError):
        explanation_sentence("x", row[:3], vocab)


def test_contrastive_explanation() -> None:
    vocab = ["red crown", "blue crown", "long beak", "black wing"]
    a = np.array([0.4, 0.1, 0.3, 0.2])
    b = np.array([0.1, 0.5, 0.3, 0.1])
    c = contrastive_explanation(a, b, vocab, "Anna's Hummingbird", "Broad-tailed Hummingbird", top=3)
    assert [t for t, _ in c.for_a] == ["red crown", "black wing"]  # long beak: no difference
    assert c.for_a[0][1] == pytest.approx(0.3)
    assert [t for t, _ in c.for_b] == ["blue crown"]
    assert c.for_b[0][1] == pytest.approx(0.4)
    assert c.sentence == (
        "It is an Anna's Hummingbird rather than a Broad-tailed Hummingbird because it has a red crown and "
        "black wings; a Broad-tailed Hummingbird would rather have a blue crown."
    )


# ----------------------------------------------------------------------------- retrieval / debugging
def test_retrieve_by_attributes() -> None:
    s = np.array([[0.5, 0.1], [0.3, 0.3], [0.1, 0.6]])
    order, val = retrieve_by_attributes(s, [0, 1], "product")
    assert list(order) == [1, 2, 0]  # 0.09 > 0.06 > 0.05
    np.testing.assert_allclose(val, [0.09, 0.06, 0.05])
    order, val = retrieve_by_attributes(s, [0, 1], "sum", top=2)
    assert list(order) == [2, 0] and val == pytest.approx([0.7, 0.6])
    order, _ = retrieve_by_attributes(s, 0)
    assert list(order) == [0, 1, 2]
    with pytest.raises(TextualError):
        retrieve_by_attributes(s, [2])


def test_debug_misclassified() -> None:
    pooled = np.array([[2.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([1, 0, -1])  # image 0 wrong (true 1, predicted 0); image 1 right; image 2 unknown
    rep = debug_misclassified(
        PDF_NORMALIZED, pooled, logits, labels, W, ["A", "B"], VOCAB, top=2, n_confusing=1
    )
    assert len(rep.items) == 1
    it = rep.items[0]
    assert (it.index, it.true_class, it.predicted_class) == (0, 1, 0)
    assert it.predicted.sentence == "This is an A because it has black wings and a red crown."
    # p(t|x,A) - p(t|x,B) = (1/3) * (row0 - row1) = [-0.048, 0.170, -0.121]: "black wing"
    assert it.confusing[0][0] == "black wing"
    assert it.confusing[0][1] == pytest.approx((3 / 5 - 1 / 11) / 3, abs=1e-6)
    assert rep.confusing_attributes == [("black wing", 1)]
    assert rep.confused_pairs == [("B", "A", 1)]
    assert (
        debug_misclassified(PDF_NORMALIZED, pooled[1:2], logits[1:2], labels[1:2], W, ["A", "B"], VOCAB).items
        == []
    )


# ----------------------------------------------------------------------------- explainer
def _table() -> AttributeTable:
    return AttributeTable(
        VOCAB, ATTR.copy(), PRIOR.copy(), np.array([2, 2, 1]), np.array([2, 2, 1]), [[], [], []], "labels"
    )


def test_textual_explainer() -> None:
    ex = TextualExplainer.from_arrays(POOLED, _table(), W, ["A", "B"])
    np.testing.assert_allclose(ex.pdf, PDF_NORMALIZED, atol=1e-6)
    e = ex.explain(np.array([2.0, 1.0]), logits=np.array([0.0, 3.0]), top=2)
    assert e.class_name == "B" and e.class_index == 1
    assert e.sentence.startswith("This is a B because it has")
    assert ex.explain(np.array([2.0, 1.0]), class_index="A").attributes[0][0] == "black wing"
    c = ex.contrast(np.array([2.0, 1.0]), "A", "B")
    assert c.for_a[0][0] == "black wing"
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 0, 0] = 1.0
    assert ex.ground(maps, "black wing", (4, 4)).shape == (4, 4)  # column (3/5, 1/11)
    assert ex.ground(maps, ["red crown", 2]).shape == (2, 2, 2)
    assert ex.filter_top_attributes(1, top=1) == [("red crown", pytest.approx(6 / 11))]
    assert ex.describe_class(0).sentence.startswith("This is an A because")
    with pytest.raises(TextualError, match="unknown attribute"):
        ex.column("green crown")
    with pytest.raises(TextualError, match="unknown class"):
        ex.explain(np.ones(2), class_index="C")
    with pytest.raises(TextualError, match="inconsistent"):
        TextualExplainer(VOCAB, PRIOR, PDF_NORMALIZED, np.zeros((2, 2)), W, ["A", "B"])


# ----------------------------------------------------------------------------- eq. 9 weights
def test_filter_specificity_by_hand() -> None:
    # column 0: mean 0.3, lifts (1/3, 1/6, 0) -> (2/3, 1/3, 0); column 1: all equal -> constant 1/3
    pdf = np.array([[0.4, 0.2], [0.35, 0.2], [0.15, 0.2]])
    np.testing.assert_allclose(
        filter_specificity(pdf), [[2 / 3, 1 / 3], [1 / 3, 1 / 3], [0.0, 1 / 3]], atol=1e-7
    )
    np.testing.assert_allclose(filter_specificity(pdf[:, 0]), [2 / 3, 1 / 3, 0.0], atol=1e-7)
    np.testing.assert_allclose(filter_specificity(np.zeros((4, 1))), np.full((4, 1), 0.25))
    # the prior p(t) scales a whole column (every filter alike): the weights do not depend on it
    np.testing.assert_allclose(filter_specificity(pdf * [3.0, 0.5]), filter_specificity(pdf), atol=1e-7)
    with pytest.raises(TextualError, match="non-negative"):
        filter_specificity(-pdf)
    with pytest.raises(TextualError, match="must be"):
        filter_specificity(np.zeros((2, 2, 2)))


def test_textual_explainer_ground_weighting() -> None:
    ex = TextualExplainer.from_arrays(POOLED, _table(), W, ["A", "B"])
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 0, 0] = 1.0
    maps[1, 1, 1] = 1.0
    # "red crown": p(t|f) = (2/5, 6/11); literal -> [[2/5, 0], [0, 6/11]] / (6/11); specific -> (0, 1)
    np.testing.assert_allclose(
        ex.ground(maps, "red crown", weighting="literal"), [[11 / 15, 0], [0, 1]], atol=1e-6
    )
    np.testing.assert_allclose(ex.ground(maps, "red crown"), [[0, 0], [0, 1]], atol=1e-6)
    np.testing.assert_allclose(ex.grounding_weights([0, 2]), [[0, 0], [1, 1]], atol=1e-6)
    with pytest.raises(TextualError, match="weighting"):
        ex.ground(maps, "red crown", weighting="bayes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("European gallinule", "a"), ("unicycle", "a"), ("umbrella", "an"), ("hour glass", "an"),
        ("hornbill", "a"), ("emerald sunbird", "an"), ("one-way sign", "a"), ("ostrich", "an"),
    ],
)  # fmt: skip
def test_the_article_follows_the_sound_not_the_letter(word, expected):
    assert article(word) == expected
