"""Evaluation of textual explanations: metrics on hand-built cases and one run on a synthetic bundle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IdentityCNN, build_stage, wrap
from PIL import Image
from torch import nn

from lavise_core.data.dataset import ImageRecord, write_dataset
from lavise_core.data.parts import attribute_regions
from lavise_core.evaluate.textual import (
    bleu_tokens,
    evaluate_textual,
    format_tables,
    heatmap_argmax_xy,
    pck,
    randomization_check,
    receptive_field_centres,
    retrieval_metrics,
    sentence_bleu,
    spearman_rows,
    top_k_mask,
)
from lavise_core.explain.textual.explainer import (
    TextualError,
    TextualExplainer,
    filter_attribute_pdf,
)
from lavise_core.models.networks import forward_maps
from lavise_core.pipeline.bundle import Bundle


# ----------------------------------------------------------------------------- pure metrics
def test_retrieval_metrics_by_hand() -> None:
    r = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], bool)
    g = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], bool)
    m = retrieval_metrics(r, g)
    assert m["per_attribute"] == [[1, 1, 1, 1], [1, 1, 0, 2]]
    assert m["recall"] == pytest.approx(75.0)
    assert m["true_negative"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert m["precision"] == pytest.approx(50.0)
    assert m["jaccard"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert m["accuracy_tn"] == pytest.approx(62.5)


def test_top_k_mask() -> None:
    s = np.array([[0.1, 0.5, 0.5, 0.2], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(top_k_mask(s, 2), [[0, 1, 1, 0], [1, 1, 0, 0]])


def test_pck_on_synthetic_heatmaps() -> None:
    heat = np.zeros((2, 10, 10))
    heat[0, 2, 7] = 1.0
    heat[1, 2, 7] = 1.0
    xy = heatmap_argmax_xy(heat, (0, 0, 100, 100))
    np.testing.assert_allclose(xy, [[75, 25], [75, 25]])
    kps = np.array([[[75, 40], [np.nan, np.nan]], [[0, 0], [70, 25]]])  # distances 15 and 5 (nearest)
    np.testing.assert_allclose(pck(xy, kps, np.array([100.0, 100.0])), [50.0, 100.0, 100.0])
    # a crop box shifts and scales: a 10x10 heatmap over x in [20, 120], y in [0, 50]
    np.testing.assert_allclose(heatmap_argmax_xy(heat[0], (20, 0, 120, 50)), [95, 12.5])
    assert np.isnan(pck(np.zeros((0, 2)), np.zeros((0, 1, 2)), np.zeros(0))).all()


def test_sentence_bleu_known_values() -> None:
    assert sentence_bleu(["The cat is on the mat."], "the cat is on the mat") == pytest.approx(1.0)
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0 -> 0.1/3 (smoothing 1); equal lengths, BP = 1
    want = math.exp(0.25 * (math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)))
    got = sentence_bleu(["the cat is on the mat", "a dog"], "the cat sat on the mat")
    assert got == pytest.approx(want, rel=1e-12)
    # brevity penalty: hypothesis of 6 tokens, closest reference 8 tokens
    got_bp = sentence_bleu(["the cat is on the mat right now"], "the cat is on the mat")
    assert got_bp == pytest.approx(math.exp(1 - 8 / 6))
    assert sentence_bleu(["a b c"], "x y z") == 0.0
    assert sentence_bleu([], "a") == 0.0
    assert bleu_tokens("This is a Bird's crown, isn't it?") == [
        "this",
        "is",
        "a",
        "bird's",
        "crown",
        "isn't",
        "it",
    ]


def test_spearman_rows_matches_scipy() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.random((4, 9)), rng.random((4, 9))
    b[0] = a[0] * 3 + 1  # perfectly monotone
    got = spearman_rows(a, b)
    want = [spearmanr(a[i], b[i]).statistic for i in range(4)]
    np.testing.assert_allclose(got, want)
    assert got[0] == pytest.approx(1.0)


def test_randomization_check_identical_and_unrelated() -> None:
    rng = np.random.default_rng(0)
    n, c, t = 300, 6, 6
    attr = (rng.random((n, t)) < 0.3).astype(np.float32)
    pooled = attr * 2 + 0.1 * rng.random((n, c))
    prior = np.full(t, 1 / t)
    same = randomization_check(pooled, pooled, attr, prior)
    assert same["spearman_pdf"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    other = randomization_check(pooled, rng.random((n, c)), attr, prior)
    assert other["spearman_lift"] < 0.5 and other["top1_agreement"] < 0.5


def test_randomization_check_explanations() -> None:
    rng = np.random.default_rng(1)
    n, c, t, k = 200, 5, 6, 3
    attr = (rng.random((n, t)) < 0.4).astype(np.float32)
    attr[:, 5] = 0  # absent from the images: excluded from the lifted comparisons
    pooled = attr[:, :c] * 2 + 0.1 * rng.random((n, c))
    prior = np.full(t, 1 / t)
    w = rng.normal(size=(k, c))
    logits = pooled @ w.T
    same = randomization_check(
        pooled, pooled, attr, prior, weight=w, weight_random=w, logits=logits, logits_random=logits,
        reference_pdf=filter_attribute_pdf(pooled, attr, prior),
    )  # fmt: skip
    assert same["n_attributes_present"] == 5
    assert same["spearman_explanation"] == pytest.approx(1.0)
    assert same["top5_overlap_explanation"] == 1.0
    assert same["spearman_explanation_control"] == pytest.approx(1.0)
    assert same["spearman_filter_lift"] == pytest.approx(1.0)
    pr = rng.random((n, c))
    wr = rng.normal(size=(k, c))
    other = randomization_check(
        pooled, pr, attr, prior, weight=w, weight_random=wr, logits=logits, logits_random=pr @ wr.T
    )
    assert abs(other["spearman_explanation"]) < 0.5 and "spearman_explanation_control" not in other
    assert set(randomization_check(pooled, pr, attr, prior)) == {
        "spearman_pdf", "spearman_lift", "top1_agreement", "n_attributes_present", "spearman_filter_lift",
    }  # fmt: skip


def test_heatmap_argmax_xy_with_grid() -> None:
    heat = np.zeros((2, 3))
    heat[1, 2] = 1.0
    xy = heatmap_argmax_xy(heat, (10, 0, 110, 50), (np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.8])))
    np.testing.assert_allclose(xy, [100.0, 40.0])
    with pytest.raises(TextualError, match="grid"):
        heatmap_argmax_xy(heat, (0, 0, 1, 1), (np.zeros(2), np.zeros(2)))


def test_receptive_field_centres_exact() -> None:
    conv = nn.Conv2d(3, 2, 2, stride=2, bias=False)  # cell u sees pixels 2u, 2u + 1: centre 2u + 1
    nn.init.ones_(conv.weight)
    gx, gy = receptive_field_centres(nn.Sequential(conv), "0", 8)
    np.testing.assert_allclose(gx, [0.125, 0.375, 0.625, 0.875], atol=1e-12)
    np.testing.assert_allclose(gy, gx, atol=1e-12)
    conv3 = nn.Conv2d(3, 1, 3, stride=2, padding=1, bias=False)  # cell u on pixel 2u (index), 0-padded
    nn.init.ones_(conv3.weight)
    gx, _ = receptive_field_centres(nn.Sequential(conv3), "0", 8)
    # u = 0 sees pixels 0, 1 (one tap in the padding): centre 1.0; u >= 1 sees 2u-1..2u+1: centre 2u + 0.5
    np.testing.assert_allclose(gx * 8, [1.0, 2.5, 4.5, 6.5], atol=1e-12)


def test_attribute_regions() -> None:
    cub = [
        "back",
        "beak",
        "belly",
        "breast",
        "crown",
        "forehead",
        "left eye",
        "left wing",
        "right wing",
        "tail",
    ]
    assert attribute_regions("red wing", cub, {}) == ["left wing", "right wing"]
    assert attribute_regions("yellow bill", cub, {}) == ["beak"]
    assert attribute_regions("black head", cub, {}) == ["crown", "forehead"]
    assert attribute_regions("small bird", cub, {}) == []
    assert attribute_regions("striped wing", cub, {"tail": ["striped wing"]}) == ["tail"]


# ----------------------------------------------------------------------------- a synthetic bundle
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _bird_dataset(root: Path, n: int = 24, size: int = 32):
    """Black images with a 7×7 'crown' and a 5×5 'tail' square of two different colours, brightest at the centre.

    Label = crown colour, except two test images labelled with the tail colour (so the identity net is
    wrong on them). Keypoints at the squares' centres; captions name both parts.
    """
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    (root / "img").mkdir(parents=True)
    recs = []
    for i in range(n):
        c1, c2 = rng.choice(3, size=2, replace=False)
        while True:
            (y1, x1), (y2, x2) = rng.integers(0, size - 7, 2), rng.integers(0, size - 5, 2)
            if abs(x1 + 3 - x2 - 2) > 7 or abs(y1 + 3 - y2 - 2) > 7:
                break
        arr = np.zeros((size, size, 3), np.uint8)
        dim1, dim2 = ((np.array(COLOURS[names[c]]) * 0.6).astype(np.uint8) for c in (c1, c2))
        arr[y1 : y1 + 7, x1 : x1 + 7] = dim1
        arr[y1 + 3, x1 + 3] = COLOURS[names[c1]]
        arr[y2 : y2 + 5, x2 : x2 + 5] = dim2
        arr[y2 + 2, x2 + 2] = COLOURS[names[c2]]
        Image.fromarray(arr).save(root / f"img/{i}.png")
        split = "train" if i < 16 else "test"
        label = int(c2) if i in (16, 17) else int(c1)
        a1, a2 = f"{names[c1]} crown", f"{names[c2]} tail"
        recs.append(
            ImageRecord(
                id=str(i),
                path=f"img/{i}.png",
                split=split,
                label=label,
                attributes=[a1, a2],
                captions=[f"a bird with a {names[c1]} crown and a {names[c2]} tail", f"this bird has a {a1}"],
                region_concepts={"crown": [a1], "tail": [a2]},
                keypoints={"crown": [x1 + 3.5, y1 + 3.5], "tail": [x2 + 2.5, y2 + 2.5]},
                bbox=[0.0, 0.0, float(size), float(size)],
            )
        )
    return write_dataset(
        root, name="Squares", source="test", classes=names, records=recs, regions=["crown", "tail"]
    )


@pytest.fixture(scope="module")
def bird_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("textual_eval")
    ds = _bird_dataset(tmp / "ds")
    lm = wrap(IdentityCNN(), size=32)
    b = Bundle.create(
        tmp / "bundle",
        {
            "key": "test",
            "layer": "features",
            "classes": ds.classes,
            "model": {"spec": "identity", "weights_hash": lm.weights_hash},
            "dataset": {"name": ds.name, "root": str(ds.root), "hash": ds.content_hash(), "n": len(ds)},
        },
    )
    x = torch.stack([lm.preprocess(Image.open(ds.image_path(i))) for i in range(len(ds))])
    maps, logits = forward_maps(lm, x)
    b.write_array("probe/pooled", maps.mean(dim=(2, 3)).numpy())
    b.write_array("probe/logits", logits.numpy())
    b.write_array("probe/valid", np.ones(len(ds), bool))
    w, bias = lm.classifier_weights()
    b.write_array("probe/classifier_weight", w)
    b.write_array("probe/classifier_bias", bias)
    b.mark_stage("probe", {})
    build_stage(b, ds, "textual")
    return b, ds, lm


def test_build_textual_stage_and_from_bundle(bird_bundle) -> None:
    b, _, _ = bird_bundle
    assert b.stage_done("textual")
    stats = b.read_json("textual/stats")
    assert stats["source"] == "captions" and stats["n_fit_images"] == 16
    ex = TextualExplainer.from_bundle(b)
    assert set(ex.vocabulary) <= {f"{c} {p}" for c in COLOURS for p in ("crown", "tail")}
    assert ex.pdf.shape == (3, len(ex.vocabulary)) and ex.class_pdf.shape == (3, len(ex.vocabulary))
    # filter k (colour channel k) is explained by attributes of colour k
    for k, colour in enumerate(COLOURS):
        assert ex.filter_top_attributes(k, 1)[0][0].startswith(colour)
    e = ex.explain(np.array([0.2, 0.0, 0.05]), np.array([0.2, 0.0, 0.05]), top=2)
    assert e.class_name == "red" and e.attributes[0][0].startswith("red")


def test_evaluate_textual_end_to_end(bird_bundle) -> None:
    b, ds, lm = bird_bundle
    res = evaluate_textual(b, ds, lm=lm, randomization_images=16, batch_size=4, progress=False)
    assert res["n_images"] == 8
    assert res["classification_accuracy"] == pytest.approx(75.0)  # two deliberately wrong labels
    g = res["grounding"]
    assert g["n_pairs"] > 0
    # eq. 9 weighs filters by p(t | f_k), which is not normalised across filters: "blue tail" (a small
    # square) weighs the blue filter less than the filter of the big crown square, so 12 of 16 pairs hit
    assert g["proposed"] == [75.0, 75.0, 75.0]
    assert g["per_attribute"]["red crown"] == [100.0, 100.0, 100.0]
    assert g["constant"] == [50.0, 50.0, 50.0]  # the channel mean peaks on the first square in raster order
    assert g["literal"] == [75.0, 75.0, 75.0] and g["literal_cell_grid"] == [75.0, 75.0, 75.0]
    # identity "network": each map cell is exactly one input pixel, the measured grid is the cell grid
    np.testing.assert_allclose(g["receptive_field_grid"][0], (np.arange(32) + 0.5) / 32, atol=1e-4)
    assert g["random"][0] < g["random"][1] < g["random"][2] < 50
    assert set(res["retrieval"]) == {"captions", "labels"}
    assert 0 <= res["retrieval"]["captions"]["recall"] <= 100
    assert res["bleu"]["overall"] > 0 and res["bleu"]["wrong"] is not None
    assert res["top5_precision"]["labels"]["top5_precision_in_vocabulary"] > 0
    assert set(res["randomization"]) >= {"spearman_pdf", "spearman_lift", "top1_agreement"}
    assert res["randomization"]["spearman_explanation_control"] == pytest.approx(1.0)
    assert res["top5_precision"]["labels"]["n_correct"] == 6
    assert res["top5_precision"]["labels"]["top5_precision_correct"] == pytest.approx(100 / 3)
    assert b.read_json("eval/textual")["n_images"] == 8
    text = format_tables(res)
    assert "specific p.d.f. (lift)" in text and "eq. 9 literal" in text
    assert "12.2 / 38.7 / 60.9" in text and "0.409" in text


def test_part_supervised_grounding_from_keypoints(bird_bundle) -> None:
    b, ds, lm = bird_bundle
    info = build_stage(b, ds, "textual_grounding", lm)
    assert info["targets"] == "part keypoints" and info["images"] == 16 and info["pairs"] == 32
    ex = TextualExplainer.from_bundle(b)
    # each attribute leans on its own colour channel (the identity net: channel k = colour k)
    for t, phrase in enumerate(ex.vocabulary):
        if ex.part_learned[t]:
            k = list(COLOURS).index(phrase.split()[0])
            assert ex.part_weights[:, t].argmax() == k
    res = evaluate_textual(b, ds, lm=lm, randomization_images=16, batch_size=4, progress=False, save=False)
    g = res["grounding"]
    assert g["parts_cell_grid"] == [100.0, 100.0, 100.0] and g["parts"] == g["parts_cell_grid"]
    assert all(v == [100.0, 100.0, 100.0] for v in g["per_attribute_parts"].values())
    assert "parts_randomised_cell_grid" in g  # refitted on the re-initialised network's maps
    assert "part-supervised weights, re-initialised network" in format_tables(res)


def test_build_textual_stage_skips_when_done(bird_bundle) -> None:
    b, ds, _ = bird_bundle
    stamp = b.manifest["stages"]["textual"]["finished"]
    build_stage(b, ds, "textual")
    assert b.manifest["stages"]["textual"]["finished"] == stamp
