"""Tests of the LaViSE explainer: loss, attention, split, head, voting, queries, insight, the whole stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import HashEmbedder, build_stage
from torch import nn

from lavise_core.data.images import mask_weights
from lavise_core.explain.lavise.bias import dataset_insight
from lavise_core.explain.lavise.explainer import RECIPES, LaviseExplainer
from lavise_core.explain.lavise.head import (
    attention_pool,
    concept_split,
    cosine_margin_ranking_loss,
    load_head,
    multilabel_softmax_loss,
    save_head,
    train_head,
    training_targets,
)
from lavise_core.explain.lavise.index import ConceptIndex
from lavise_core.explain.lavise.labels import (
    dataset_prior_bias,
    labels_from_features,
    rank_phrases,
    vote_labels,
)
from lavise_core.explain.lavise.query import grounding_heatmap, query_concept
from lavise_core.explain.lavise.settings import LaviseError, LaviseSettings
from tests.conftest import wrap


def test_loss_exact_values():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[True, False, False], [False, True, True]])
    # pairs (0,0): hinge(0.5-1+0), hinge(0.5-1-1) = 0; (1,1): hinge(0.5-1+0) = 0; (1,2): hinge(0.5-0+0) = 0.5
    loss = cosine_margin_ranking_loss(pred, e, y, margin=0.5)
    assert loss.item() == pytest.approx(0.5 / 3)
    only = torch.tensor([False, True, True])  # column 0 not eligible as a negative
    assert cosine_margin_ranking_loss(pred, e, y, 0.5, only).item() == pytest.approx(0.0)
    assert cosine_margin_ranking_loss(pred, e, torch.zeros_like(y), 0.5).item() == 0.0


def test_loss_gradient_pulls_towards_positive():
    e = torch.eye(3)
    pred = torch.tensor([[0.2, 1.0, 0.1]], requires_grad=True)
    cosine_margin_ranking_loss(pred, e, torch.tensor([[True, False, False]]), 0.5).backward()
    assert pred.grad[0, 0] < 0 and pred.grad[0, 1] > 0  # descent raises e0, lowers e1


def test_multilabel_softmax_loss_exact_values():
    import math

    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    pred = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # cosines: row 0 (1, 0, -1), row 1 (0, 1, 0)
    y = torch.tensor([[True, False, False], [False, True, True]])
    tau = 0.5
    # row 0, positive 0 against negatives 1, 2; row 1: positives 1 and 2, each only against negative 0
    # (the other positive is not a competitor)
    p00 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    p11 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    p12 = -math.log(math.exp(0) / (math.exp(0) + math.exp(0)))
    loss = multilabel_softmax_loss(pred, e, y, temperature=tau)
    assert loss.item() == pytest.approx((p00 + p11 + p12) / 3, rel=1e-6)
    # column 2 not eligible as a negative: row 0 competes with column 1 only
    only = torch.tensor([True, True, False])
    p00b = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    assert multilabel_softmax_loss(pred, e, y, tau, only).item() == pytest.approx(
        (p00b + p11 + p12) / 3, rel=1e-6
    )
    assert multilabel_softmax_loss(pred, e, torch.zeros_like(y), tau).item() == 0.0
    # gradient pulls towards the positive
    q = torch.tensor([[0.2, 1.0, 0.1]], requires_grad=True)
    multilabel_softmax_loss(q, torch.eye(3), torch.tensor([[True, False, False]]), 0.1).backward()
    assert q.grad[0, 0] < 0 and q.grad[0, 1] > 0


def test_train_head_loss_choice():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((40, 6)).astype(np.float32)
    y = np.eye(2, dtype=bool)[rng.integers(0, 2, 40)]
    e = np.eye(2, 4, dtype=np.float32)
    assert LaviseSettings().loss == "softmax" and LaviseSettings().temperature == 0.1
    assert LaviseSettings().dataset_prior == 0.2 and LaviseSettings().top_s == 20
    st = LaviseSettings(epochs=1, batch_size=8, threads=1, val_fraction=0.0)
    _, log_soft = train_head(feats, y, e, st)
    _, log_margin = train_head(feats, y, e, LaviseSettings(**{**st.__dict__, "loss": "margin"}))
    assert log_soft["loss_kind"] == "softmax" and log_margin["loss_kind"] == "margin"
    assert log_soft["loss"][0] != pytest.approx(log_margin["loss"][0])  # a different objective
    with pytest.raises(LaviseError, match="loss"):
        train_head(feats, y, e, LaviseSettings(**{**st.__dict__, "loss": "hinge"}))


def _prior_index(n_dataset: int):
    """Phrases 0-1 the data set's, 2 a general phrase; a query with cos 0.85 to phrase 0, 0.9 to phrase 2."""
    e = np.zeros((3, 4), np.float32)
    e[0] = [0.85, np.sqrt(1 - 0.85**2), 0, 0]
    e[1] = [0, 0, 1, 0]
    e[2] = [0.9, -np.sqrt(1 - 0.9**2), 0, 0]
    idx = ConceptIndex(HashEmbedder(4), model_id="hash").build(["red breast", "blue tail", "orange paws"], e)
    idx.meta["n_dataset"] = n_dataset
    return idx


def test_dataset_prior_wins_a_near_tie():
    assert dataset_prior_bias(4, 2, 0.2).tolist() == pytest.approx([-0.2, -0.2, 0.0, 0.0])
    z = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    idx = _prior_index(2)
    sc, ids = rank_phrases(z, idx, 3, dataset_prior=0.0)  # no prior: the general phrase first
    assert ids[0].tolist() == [2, 0, 1] and sc[0, 0] == pytest.approx(0.9, abs=1e-6)
    sc, ids = rank_phrases(z, idx, 3, dataset_prior=0.2)  # the data set's phrase wins the near tie
    assert ids[0].tolist() == [0, 2, 1]
    assert sc[0].tolist() == pytest.approx([1.05, 0.9, 0.2], abs=1e-6)
    sc, ids = rank_phrases(z, idx, 2, dataset_prior=0.04)  # a small prior does not turn a clear lead
    assert ids[0].tolist() == [2, 0]
    assert rank_phrases(z, _prior_index(0), 1, 0.2)[1][0].tolist() == [2]  # no data-set phrases known

    # through the stage's labeller: an identity head, two top images voting
    from lavise_core.explain.lavise.head import ExplainerHead

    head = ExplainerHead(4, 4, dropout=0.0)
    with torch.no_grad():
        for m in head.net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.eye(4))
                m.bias.zero_()
    head.eval()
    v = np.array([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]], np.float32)  # (K=1, p=2, C=4), ReLU-safe
    top_value = np.array([[3.0, 1.0]], np.float32)
    lab0 = labels_from_features(v, top_value, head, idx, top_s=2, n_labels=3, dataset_prior=0.0)
    lab = labels_from_features(v, top_value, head, idx, top_s=2, n_labels=3)  # default prior 0.2
    assert lab0.ids[0, 0] == 2 and lab.ids[0].tolist() == [0, 2, -1]
    assert lab.scores[0, 0] == pytest.approx(1.05, abs=1e-5)


def test_attention_pool_exact():
    maps = torch.tensor([[[1.0, 0.0, 3.0]], [[2.0, 4.0, -2.0]]])  # (C=2, h=1, w=3)
    v = attention_pool(maps, [0, 1])
    # k=0: A=[1,0,3]/4 -> [1*.25+3*.75, 2*.25-2*.75]; k=1: relu -> [2,4,0]/6 -> [1/3, 2/3+8/3]
    assert torch.allclose(v, torch.tensor([[2.5, -1.0], [1 / 3, 10 / 3]]))
    zero = torch.zeros(2, 1, 2)
    zero[1] = torch.tensor([[4.0, 2.0]])
    assert torch.allclose(attention_pool(zero, [0]), torch.tensor([[0.0, 3.0]]))  # all-zero map -> mean


def test_mask_weights_area_average_and_crop():
    ind = np.zeros((4, 4), bool)
    ind[:2, :3] = True
    assert np.allclose(mask_weights(ind, (2, 2)), [[1.0, 0.5], [0.0, 0.0]])
    assert np.allclose(mask_weights(ind, (1, 2), crop_box=(0, 0, 2, 2)), [[1.0, 1.0]])


def test_concept_split_is_deterministic_and_disjoint():
    concepts = [f"c{i}" for i in range(20)]
    seen, unseen = concept_split(concepts, 0.5, seed=3)
    assert len(seen) == 10 and not set(seen) & set(unseen) and set(seen) | set(unseen) == set(concepts)
    assert concept_split([*reversed(concepts), "c1"], 0.5, 3) == (seen, unseen)
    assert concept_split(concepts, 0.5, 4) != (seen, unseen)
    with pytest.raises(LaviseError):
        concept_split(concepts, 0.0, 0)


def test_unseen_concepts_never_reach_training():
    regions = [["red wing", "striped wing"], ["blue tail"], ["red wing"], ["green crown", "blue tail"]]
    seen, unseen = ["blue tail", "red wing"], ["green crown", "striped wing"]
    rows, y, used = training_targets(regions, seen)
    assert used == ["blue tail", "red wing"] and rows.tolist() == [0, 1, 2, 3]
    assert y.tolist() == [[False, True], [True, False], [False, True], [True, False]]
    assert not set(used) & set(unseen)
    with pytest.raises(LaviseError, match="no region"):
        training_targets([["green crown"]], seen)
    # the loss only ever sees the used (seen) concepts' embeddings: train_head checks shapes
    e = np.eye(4, dtype=np.float32)[:2]
    feats = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with pytest.raises(LaviseError, match="disagree"):
        train_head(feats, y, np.eye(4, dtype=np.float32), LaviseSettings(epochs=1))
    _head, log = train_head(feats, y, e, LaviseSettings(epochs=2, batch_size=4, threads=1))
    assert log["concepts"] == 2 and log["epochs"] == 2


def test_head_learns_separable_regions_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 8)).astype(np.float32) * 3
    lab = rng.integers(0, 3, 300)
    feats = centers[lab] + rng.standard_normal((300, 8)).astype(np.float32) * 0.3
    y = np.eye(3, dtype=bool)[lab]
    e = np.linalg.qr(rng.standard_normal((16, 3)))[0].T.astype(np.float32)  # orthonormal (3, 16)
    st = LaviseSettings(epochs=15, batch_size=32, lr=3e-3, threads=1, margin=0.2, val_fraction=0.0)
    head, log = train_head(feats, y, e, st)
    assert log["loss"][-1] < log["loss"][0]
    z = head.embed(feats)
    assert ((z @ e.T).argmax(1) == lab).mean() > 0.95
    save_head(head, tmp_path, {"settings": {}, "trained_concepts": ["a", "b", "c"]})
    back, meta = load_head(tmp_path)
    assert meta["channels"] == 8 and meta["dim"] == 16 and np.allclose(back.embed(feats), z, atol=1e-6)
    assert isinstance(back.net[0], nn.BatchNorm1d) and isinstance(back.net[6], nn.Linear)


@pytest.mark.parametrize("normalise", ["standardise", "l2"])
def test_head_normaliser_exact_and_saved(tmp_path, normalise):
    from lavise_core.explain.lavise.head import ExplainerHead

    head = ExplainerHead(2, 3, normalise=normalise)
    head.fit_normaliser(torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]]))  # second channel constant
    assert head.feat_mean.tolist() == [3.0, 10.0] and head.feat_std[0].item() == pytest.approx(2.0)
    u = head.normalised(torch.tensor([[5.0, 10.0]]))
    expect = [1.0, 0.0] if normalise == "standardise" else [2**0.5, 0.0]  # l2: unit RMS over C = 2
    assert torch.allclose(u, torch.tensor([expect]), atol=1e-6)
    save_head(head, tmp_path, {})
    back, meta = load_head(tmp_path)
    assert meta["normalise"] == normalise and torch.equal(back.feat_mean, head.feat_mean)
    with pytest.raises(LaviseError, match="normalise"):
        ExplainerHead(2, 3, normalise="whiten")


def test_old_head_without_normaliser_loads(tmp_path):
    from safetensors.torch import save

    from lavise_core.explain.lavise.head import ExplainerHead

    head = ExplainerHead(4, 3)
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("feat_")}
    (tmp_path / "head.safetensors").write_bytes(save(state))
    (tmp_path / "head.json").write_text(json.dumps({"channels": 4, "dim": 3, "dropout": 0.1}))
    back, _ = load_head(tmp_path)
    assert back.normalise == "none" and back.feat_std.tolist() == [1.0] * 4


def test_early_stopping_holds_out_whole_images_and_keeps_best():
    from lavise_core.explain.lavise.head import _held_out_rows

    groups = np.repeat(np.arange(50), 3)
    held = _held_out_rows(len(groups), groups, 0.2, seed=0)
    assert held.sum() == 30 and all(held[groups == g].all() or not held[groups == g].any() for g in range(50))
    assert not _held_out_rows(len(groups), groups, 0.0, 0).any()
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, 150)
    feats = rng.standard_normal((150, 6)).astype(np.float32)  # pure noise: held-out loss stops improving
    e = np.eye(3, 8, dtype=np.float32)
    st = LaviseSettings(epochs=60, batch_size=16, val_fraction=0.2, patience=3, threads=1, dropout=0.0)
    _, log = train_head(feats, np.eye(3, dtype=bool)[lab], e, st, groups=groups)
    assert log["val_regions"] == 30 and log["regions"] == 120
    assert log["epochs"] < 60 and log["best_epoch"] == int(np.argmin(log["val_loss"])) + 1
    with pytest.raises(LaviseError, match="groups"):
        train_head(feats, np.eye(3, dtype=bool)[lab], e, st, groups=groups[:5])


def test_vote_labels_exact():
    ids, sc = vote_labels(
        np.array([[0.9, 0.5], [0.8, 0.7]]), np.array([[1, 2], [2, 3]]), np.array([0.75, 0.25]), 4
    )
    assert ids.tolist() == [1, 2, 3, -1]
    assert np.allclose(sc, [0.675, 0.575, 0.175, 0.0])


def test_grounding_heatmap_exact():
    maps = np.array([[[2.0, 1.0]], [[0.0, 4.0]]])
    h = grounding_heatmap(maps, [0, 1], [0.5, 0.5])
    assert np.allclose(h, [[2 / 3, 1.0]])
    up = grounding_heatmap(maps, [0, 1], [0.5, 0.5], out_size=(4, 8))
    assert up.shape == (4, 8) and up.max() == pytest.approx(1.0)


def _index(phrases):
    emb = HashEmbedder()
    return ConceptIndex(emb, model_id="hash").build(phrases, emb.embed(phrases)), emb


def test_query_out_of_vocabulary_text():
    idx, emb = _index(["red wing", "blue tail", "water"])
    text = "glittering plumage at dusk"
    q = emb.embed([text])[0]
    fe = np.stack([emb.embed(["water"])[0], -q, q]).astype(np.float32)  # filter 2 = the query direction
    top_index = np.array([[0, 1], [2, 3], [4, 5]])
    top_value = np.array([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]], np.float32)
    r = query_concept(text, idx, fe, top_index, top_value, n_filters=2, n_images=2, seen=["red wing"])
    assert r.status == "not in vocabulary" and r.filters[0] == 2 and r.filter_scores[0] == pytest.approx(1.0)
    assert r.images.tolist() == [4, 5] and len(r.suggestions) == 3
    pooled = np.zeros((6, 3), np.float32)
    pooled[1, 2] = 2.0
    pooled[3, 2] = 1.0
    r2 = query_concept(text, idx, fe, top_index, top_value, pooled=pooled, n_filters=1, n_images=2)
    assert r2.images.tolist() == [1, 3]
    assert query_concept("Red Wing", idx, fe, top_index, top_value, seen=["red wing"]).status == "seen"
    assert query_concept("water", idx, fe, top_index, top_value, unseen=["red wing"]).status == "vocabulary"
    with pytest.raises(LaviseError, match="empty"):
        query_concept("  ", idx, fe, top_index, top_value)


def _insight_inputs(spurious: bool):
    """Six background kinds (clusters in feature space); with ``spurious`` class 1 is 90 % water."""
    rng = np.random.default_rng(1)
    K, C, M = 3, 8, 600
    labels = np.arange(M) % K
    kinds = ["sky", "water", "sand", "snow", "grass", "dusk"]
    centers = rng.standard_normal((6, C)) * 3
    kind = rng.integers(0, 6, M)
    if spurious:
        kind[np.nonzero(labels == 1)[0][:180]] = 1
    bg = centers[kind] + rng.standard_normal((M, C))
    return K, C, labels, bg, [kinds[k] for k in kind]


@pytest.mark.parametrize("spurious", [True, False])
def test_dataset_insight_finds_background_bias(spurious):
    K, C, labels, bg, names = _insight_inputs(spurious)
    W = np.zeros((K, C), np.float32)
    W[0, 0] = W[1, 1] = W[2, 2] = 1.0
    pooled = np.ones((len(labels), C), np.float32)
    label_ids = np.array([[0, 1]] * C)
    label_scores = np.array([[1.0, 0.5]] * C, np.float32)
    label_ids[1] = [2, -1]
    inside = np.array([0.4, 0.1, 0.2, 0.5, 0.5, 0.5, 0.5, 0.5], np.float32)
    area = np.full(C, 0.3, np.float32)  # filter 0 fires more on the object than a uniform map (0.4 > 0.3)
    out = dataset_insight(
        ["a", "b", "c"], W, pooled, labels, label_ids, label_scores, ["red wing", "blue tail", "water"],
        inside, bg, labels, names, area, np.arange(len(labels)) + 1000,
    )  # fmt: skip
    flagged = [o["class"] for o in out if o["background_bias"]]
    assert flagged == (["b"] if spurious else [])
    assert out[1]["concepts"][0] == {"phrase": "water", "score": 1.0, "inside": 0.1, "off_object": True}
    assert out[0]["concepts"][0]["off_object"] is False and out[1]["off_object_share"] == 1.0
    assert out[2]["concepts"][0]["off_object"] is True  # 0.2 < 0.3: on the object less than uniform
    assert all(len(o["background_examples"]) == 6 for o in out)
    if spurious:
        assert out[1]["dominant_background"] == "water" and out[1]["dominant_background_share"] > 0.85
        assert out[1]["background_auc"] > 0.8 and out[1]["background_p"] < 1e-10
        # the class's most typical backgrounds are water ones
        assert all(names[i - 1000] == "water" for i in out[1]["background_examples"])
    # without the objects' area the cutoff is 0.5: filter 0 (0.4) counts as off the object
    out = dataset_insight(
        ["a", "b", "c"],
        W,
        pooled,
        labels,
        label_ids,
        label_scores,
        ["red wing", "blue tail", "water"],
        inside,
    )
    assert out[0]["concepts"][0]["off_object"] is True and out[0]["background_auc"] is None


def test_background_association_exact_and_null():
    from lavise_core.explain.lavise.bias import background_association

    labels = np.arange(40) % 2
    sep = np.where(labels[:, None] == 1, 1.0, -1.0) + 0.01 * np.arange(40)[:, None]  # fully separable
    auc, p, score = background_association(sep, labels, 2)
    assert auc.tolist() == [1.0, 1.0] and np.all(p < 1e-6) and score.shape == (40, 2)
    rng = np.random.default_rng(0)
    aucs = [background_association(rng.standard_normal((300, 5)), np.arange(300) % 3, 3)[0] for _ in range(5)]
    assert np.all(np.abs(np.concatenate(aucs) - 0.5) < 0.1)  # independent backgrounds: chance
    auc, _, _ = background_association(sep, np.r_[labels[:-3], 2, 2, 2], 3)
    assert np.isnan(auc[2])  # three images, five folds: not tested


def test_paint_out_object_exact():
    from PIL import Image

    from lavise_core.explain.lavise.head import paint_out_object

    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[:, :25] = (10, 20, 30)
    rgb[:, 25:] = (10, 20, 40)
    rgb[20:30, 20:30] = (255, 0, 0)  # the object
    rgb[:, :2] = (200, 200, 200)  # a strip that pulls the mean but not the median
    mask = np.zeros((50, 50), np.uint8)
    mask[20:30, 20:30] = 3
    out = np.asarray(paint_out_object(Image.fromarray(rgb), mask, dilate=0.04))  # 2 px around the object
    painted = np.zeros((50, 50), bool)
    painted[18:32, 18:32] = True
    assert (out[painted] == out[25, 25]).all() and not (out == (255, 0, 0)).all(-1).any()
    assert out[25, 25].tolist() in ([10, 20, 30], [10, 20, 35], [10, 20, 40])
    assert (out[~painted] == rgb[~painted]).all()
    full = np.ones((50, 50), np.uint8)
    assert paint_out_object(Image.fromarray(rgb), full) is None  # nothing left to show
    small = np.asarray(Image.fromarray(mask * 80).resize((25, 25), Image.NEAREST)) > 0  # coarser mask
    assert np.asarray(paint_out_object(Image.fromarray(rgb), small)).shape == (50, 50, 3)


def test_top1_in_gt_and_random_top1_exact():
    from lavise_core.evaluate.lavise import random_top1, top1_in_gt

    gt = [{"a": 0.5, "b": 0.1}, {"c": 0.2}, {}]
    assert top1_in_gt(gt, [["b", "x"], ["x", "c"], ["a"]]) == pytest.approx(1 / 3)
    assert random_top1(gt, 10) == pytest.approx((0.2 + 0.1 + 0.0) / 3)
    assert random_top1(gt, {"a", "c", "x", "y"}) == pytest.approx((0.25 + 0.25) / 3)


def test_ground_truth_includes_backgrounds(tiny_bundle):
    from lavise_core.evaluate.lavise import concept_ground_truth

    bundle, ds, lm, _, _ = tiny_bundle
    ti, tm, thr = (
        bundle.array("probe/top_index"),
        bundle.array("probe/top_maps"),
        bundle.array("probe/threshold"),
    )
    ks = range(ti.shape[0])
    gt = concept_ground_truth(ds, lm, ti, tm, thr, ks, 4, iou_min=0.0)
    plain = concept_ground_truth(ds, lm, ti, tm, thr, ks, 4, iou_min=0.0, backgrounds=False)
    assert any(t.endswith(" background") for g in gt for t in g)
    assert not any(t.endswith(" background") for g in plain for t in g)
    assert [{t: v for t, v in g.items() if not t.endswith(" background")} for g in gt] == plain


def test_random_recall_exact():
    from lavise_core.evaluate.lavise import random_recall

    gt = [{"a": 0.5, "b": 0.1}, {"c": 0.2}, {}]
    assert random_recall(gt, {"a", "b", "c"}, 100, 5) == pytest.approx(0.05)
    # pool holding only "a" and "x": filter 0 gets (2/2) * 1/2, filter 1 nothing
    assert random_recall(gt, {"a", "b", "c"}, {"a", "x"}, 1) == pytest.approx((0.25 + 0.0) / 2)
    assert np.isnan(random_recall(gt, {"z"}, 10, 5))


# ------------------------------------------------------------------------------- the whole stage
class TinyCNN(nn.Module):
    def __init__(self, k: int = 12):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, k)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    tmp = tmp_path_factory.mktemp("lav")
    ds = generate_synthbirds(tmp / "birds", n=48, seed=0, image_size=64, progress=False)
    lm = wrap(TinyCNN(len(ds.classes)), size=64, classes=ds.classes)
    bundle = open_or_create_bundle(tmp / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=6, batch_size=16, num_workers=0, progress=False))
    emb = HashEmbedder()
    general = ["water", "sky", "red", "wing", "feather"]
    st = LaviseSettings(epochs=3, top_p=4, top_s=5, labels_per_filter=6, threads=1)
    info = build_stage(
        bundle, ds, "lavise", lm, settings=st, vocabulary=(general, emb.embed(general)), embedder=emb
    )
    return bundle, ds, lm, emb, info


def test_stage_writes_everything(tiny_bundle):
    bundle, ds, lm, emb, info = tiny_bundle
    c = bundle.manifest.get("channels", 16)
    assert bundle.array("lavise/filter_label_ids").shape == (c, 6)
    assert bundle.array("lavise/filter_label_scores").shape == (c, 6)
    assert bundle.array("lavise/filter_embeddings").shape == (c, 16)
    assert bundle.array("lavise/region_features").shape[1] == c
    split = bundle.read_json("lavise/split")
    head_meta = json.loads((bundle.root / "lavise/head.json").read_text())
    assert head_meta["trained_concepts"] and not set(head_meta["trained_concepts"]) & set(split["unseen"])
    assert set(head_meta["trained_concepts"]) <= set(split["seen"])
    assert info["unseen"] > 0 and bundle.stage_done("lavise")
    assert build_stage(bundle, ds, "lavise", lm, embedder=emb) == info  # finished: skipped
    ins = np.asarray(bundle.array("lavise/filter_inside"))
    assert np.all((ins[~np.isnan(ins)] >= 0) & (ins[~np.isnan(ins)] <= 1))
    area = np.asarray(bundle.array("lavise/filter_object_area"))
    assert area.shape == (c,) and np.all((area[~np.isnan(area)] > 0) & (area[~np.isnan(area)] < 1))
    bg_img = np.asarray(bundle.array("lavise/background_image"))
    assert len(bg_img) and bundle.array("lavise/background_features").shape == (len(bg_img), c)
    # a bundle from the older recipe (backgrounds pooled outside the mask) redoes those two parts only
    head_before = (bundle.root / "lavise/head.safetensors").read_bytes()
    bundle.manifest["stages"]["lavise_regions"].pop("recipe")
    bundle._save_manifest()
    again = build_stage(bundle, ds, "lavise", lm, embedder=emb)
    assert (
        again != info and bundle.manifest["stages"]["lavise_regions"]["recipe"] == RECIPES["lavise_regions"]
    )
    assert (bundle.root / "lavise/head.safetensors").read_bytes() == head_before


def test_stage_trains_on_background_rows(tiny_bundle):
    from lavise_core.data.dataset import background_phrase
    from lavise_core.explain.lavise.head import RegionFeatures
    from lavise_core.models.networks import forward_maps
    from lavise_core.pipeline.probe import image_batches

    bundle, ds, lm, emb, _ = tiny_bundle
    rf = RegionFeatures.load(bundle)
    split = bundle.read_json("lavise/split")
    bgs = sorted({background_phrase(r.meta["background"]) for r in ds.records})
    assert len(bgs) > 1 and split["backgrounds"] == bgs and set(bgs) <= set(split["seen"])
    assert not set(bgs) & set(split["unseen"])
    index = ConceptIndex.load(bundle.root / "lavise", embedder=emb)
    assert set(index.phrases[: index.meta["n_dataset"]]) >= set(bgs)  # among the data set's phrases
    is_bg = np.array([r == "background" for r in rf.region])
    train = [i for i in ds.indices("train") if ds.records[i].mask and ds.records[i].region_concepts]
    # exactly one background row per training image, with its kind's phrase, beside the part rows
    assert sorted(rf.image[is_bg].tolist()) == train and (~is_bg).sum() > is_bg.sum()
    for r in np.nonzero(is_bg)[0]:
        assert rf.concepts[r] == [background_phrase(ds.records[rf.image[r]].meta["background"])]
    # multi-label: a part row keeps every phrase of its region
    r = int(np.nonzero(~is_bg)[0][0])
    rec = ds.records[rf.image[r]]
    assert rf.concepts[r] == [p.strip().lower() for p in rec.region_concepts[rf.region[r]]]
    # the background row is the masked mean of the map over label 0 (the intact image)
    r = int(np.nonzero(is_bg)[0][0])
    i = int(rf.image[r])
    _, x, _ = next(iter(image_batches(ds, lm, [i], 1)))
    maps = forward_maps(lm, x, bundle.layer)[0].float()[0]
    lab = ds.load_mask(i)
    m = mask_weights(lab == 0, tuple(maps.shape[-2:]), lm.crop_box(lab.shape[1], lab.shape[0]))
    expect = (maps * torch.from_numpy(m)).sum((1, 2)) / m.sum()
    assert np.allclose(rf.features[r], expect.numpy(), atol=1e-4)
    head_meta = json.loads((bundle.root / "lavise/head.json").read_text())
    assert set(bgs) & set(head_meta["trained_concepts"]) and head_meta["settings"]["loss"] == "softmax"


def test_explainer_query_and_evaluation(tiny_bundle):
    bundle, ds, lm, emb, _ = tiny_bundle
    ex = LaviseExplainer.from_bundle(bundle, index=ConceptIndex.load(bundle.root / "lavise", embedder=emb))
    r = ex.query("a bird standing in shallow water")
    assert r.status == "not in vocabulary" and len(r.filters) == 10 and len(r.images) > 0
    assert ex.filter_labels(0, 3) and ex.concept_status(ex.seen[0]) == "seen"
    import lavise_core.explain.lavise.explainer as lav_mod
    from lavise_core.evaluate.lavise import evaluate_lavise, format_tables

    orig = lav_mod.ConceptIndex.load
    lav_mod.ConceptIndex.load = classmethod(lambda cls, d, embedder=None, mmap=True: orig(d, embedder=emb))
    try:
        res = evaluate_lavise(bundle, ds, lm, sanity=True, sanity_images=24, sanity_filters=8)
    finally:
        lav_mod.ConceptIndex.load = orig
    assert set(res["recall"]) == {"seen@5", "unseen@5", "seen@20", "unseen@20"}
    row = res["recall"]["seen@20"]
    assert row["random_vocabulary"] == pytest.approx(20 / res["vocabulary"])  # every concept is in V
    assert res["dataset_vocabulary"] < res["vocabulary"] and 0 <= row["lavise_oracle_vocabulary"] <= 1
    assert "randomised" in res["sanity"] and 0 <= res["sanity"]["top1_agreement"] <= 1
    assert "randomised_head_not_retrained" in res["sanity"]
    text = format_tables(res)
    assert "LaViSE recall@s" in text and "random phrases, same vocabulary" in text and "oracle" in text
    # backgrounds are concepts of the ground truth, reported apart; top-1 in G_k with its baselines
    assert res["backgrounds"] > 0 and set(res["recall_backgrounds"]) == {
        "background@5", "seen_with_backgrounds@5", "background@20", "seen_with_backgrounds@20"
    }  # fmt: skip
    t1 = res["top1_in_gt"]
    assert 0 <= t1["lavise"] <= 1 and 0 <= t1["random_dataset_concepts"] <= 1 and "Top-1 label in G_k" in text
    assert (bundle.root / "eval/lavise.json").is_file()
