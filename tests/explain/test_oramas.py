"""Oramas et al.: energies, μ-lasso, top features, back-projection (strided fix, guided rule), the stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_stage, wrap
from torch import nn

from lavise_core.explain import oramas as O
from lavise_core.pipeline.probe import open_or_create_bundle


def test_layer_energy_is_l1_normalised_sum_of_squares() -> None:
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # Σa² = 2
    maps[0, 1] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # 4
    maps[0, 2] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # 4
    np.testing.assert_allclose(O.layer_energy(maps).numpy(), [[0.2, 0.4, 0.4]], rtol=1e-7)
    np.testing.assert_allclose(
        O.l2_rows(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6
    )


def test_mu_lasso_on_an_orthonormal_design_is_soft_thresholding() -> None:
    # X has orthonormal columns: the constrained solution is max(Xᵀl − λ, 0) with Σ w = μ.
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    y = np.array([1.0, 0.5, 0.0])
    np.testing.assert_allclose(O.fit_mu_lasso(X, y, 1.0), [0.75, 0.25], atol=1e-6)  # λ = 0.25
    np.testing.assert_allclose(O.fit_mu_lasso(X, y, 0.4), [0.4, 0.0], atol=1e-6)  # λ = 0.6
    np.testing.assert_allclose(O.fit_mu_lasso(X, y, 5.0), [1.0, 0.5], atol=1e-9)  # inactive: least squares
    w = O.fit_mu_lasso(X, -y, 1.0)  # w >= 0: nothing correlates positively
    assert w.tolist() == [0.0, 0.0]
    with pytest.raises(O.OramasError, match="positive"):
        O.fit_mu_lasso(X, y, 0.0)


def test_choose_mu_takes_the_smallest_radius_near_the_best_agreement() -> None:
    rng = np.random.default_rng(0)
    pred = np.repeat([0, 1, 2], 20)
    X = O.l2_rows(np.eye(3)[pred] + 0.05 * rng.random((60, 3)))
    X[40:, 0] += 0.5  # class 2 looks like class 0 too: tiny radii confuse them
    X = O.l2_rows(X)
    mu, curve = O.choose_mu(X[::2], pred[::2], X[1::2], pred[1::2], 3, grid=(0.001, 1.0, 5.0))
    assert [c["mu"] for c in curve] == [0.001, 1.0, 5.0]
    best = max(c["agreement"] for c in curve)
    assert mu == min(c["mu"] for c in curve if c["agreement"] >= best - 0.01)
    W = O.fit_relevant(X, pred, 3, mu)
    assert (W.argmax(1) == [0, 1, 2]).all() and (W.sum(1) <= 1.0 + 1e-9).all()


def test_class_paths_skip_unpredicted_classes_and_do_not_depend_on_threads() -> None:
    rng = np.random.default_rng(1)
    X = O.l2_rows(rng.random((40, 6)))
    pred = rng.choice([0, 2, 5], 40)  # classes 1, 3, 4 and 6 are never predicted
    naive = [O.lasso_path_positive(X, (pred == c).astype(np.float64)) for c in range(7)]
    seen: list[tuple[int, int]] = []
    one = O.class_paths(X, pred, 7, threads=1, report=lambda d, t: seen.append((d, t)))
    two = O.class_paths(X, pred, 7, threads=2)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for c in range(7):
        assert one[c].shape == naive[c].shape == (6, 101)
        np.testing.assert_array_equal(one[c], naive[c])  # exactly: a zero target's path is all zeros
        np.testing.assert_array_equal(two[c], naive[c])
    assert not any(one[c].any() for c in (1, 3, 4, 6))


def test_top_features_and_the_feature_index() -> None:
    idx, r = O.top_features(np.array([0.5, 0.2, 0.1, 0.3]), np.array([1.0, 0.0, 3.0, 0.0]), n=3)
    assert idx.tolist() == [0, 2]
    np.testing.assert_allclose(r, [0.125, 0.075])
    W = np.array([[0.0, 2.0, 0.0, 1.0, 0.0], [0.0] * 5])
    rf = O.RelevantFeatures(["a", "b"], [2, 3], W, 1.5, ["x", "y"], {})
    assert rf.locate(1) == ("a", 1) and rf.locate(3) == ("b", 1)
    assert rf.relevant(0).tolist() == [1, 3]
    assert rf.counts_by_layer().tolist() == [[1, 1], [0, 0]]
    with pytest.raises(O.OramasError, match=r"'y' has no relevant feature at μ = 1\.5"):
        rf.relevant(1)
    with pytest.raises(IndexError):
        rf.locate(5)


class _Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 1, 1, stride=2, bias=False), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_strided_fix_fills_the_checkerboard() -> None:
    lm = wrap(_Strided(), size=4, classes=["a", "b"])
    x = (torch.arange(16.0) + 1).view(1, 1, 4, 4)  # A = [[1, 3], [9, 11]]
    fixed = O.backproject(lm, x, [("features", 0)])[0]
    expect = np.array([[1, 1, 3, 3], [1, 1, 3, 3], [9, 9, 11, 11], [9, 9, 11, 11]], np.float32)
    np.testing.assert_allclose(fixed, (expect - 1) / 10, atol=1e-6)
    plain = O.backproject(lm, x, [("features", 0)], strided_fix=False)[0]
    gaps = np.zeros((4, 4), np.float32)
    gaps[::2, ::2] = [[1, 3], [9, 11]]
    np.testing.assert_allclose(plain, gaps / 11, atol=1e-6)  # zeros in between: the checkerboard


class _TwoWay(nn.Module):
    """x -> ReLU(conv [1, 1]) -> conv [1, -1]: the plain gradient cancels, the guided one keeps channel 0."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(), nn.Conv2d(2, 1, 1, bias=False)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.ones(2, 1, 1, 1))
            self.features[2].weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_guided_rule_drops_negative_gradients() -> None:
    lm = wrap(_TwoWay(), size=2, classes=["a", "b"])
    x = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    # output map = x - x = 0 ... seed the backward with the map of the ReLU layer's channel 0 instead
    g = O.backproject(lm, x, [("features.1", 0)])[0]
    np.testing.assert_allclose(g, x[0, 0].numpy() / 3, atol=1e-6)  # seed = A_0 = x, weight 1
    with O.guided_backprop_hooks(lm.model), torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        out = lm.model.features(xx)
        out.sum().backward()
    assert xx.grad.tolist() == [[[[1.0, 1.0], [1.0, 0.0]]]]  # plain backprop would give 0 everywhere


def test_missing_layers_are_named(identity_model) -> None:
    assert O.energy_layers(identity_model) == ["features"]
    with pytest.raises(O.OramasError, match="no layer\\(s\\) conv9"):
        O.energy_layers(identity_model, ["features", "conv9"])


def test_collect_energies_exact_on_solid_colours(colour_dataset, identity_model) -> None:
    X, pred, valid, sizes = O.collect_energies(colour_dataset, identity_model, ["features"])
    assert sizes == [3] and valid.tolist() == [True] * 6 + [False]
    np.testing.assert_allclose(X[0], [1, 0, 0], atol=1e-7)
    c = np.array([200.0, 100.0, 50.0]) ** 2  # Σa² ∝ c², L1 then L2 normalised
    np.testing.assert_allclose(X[3], c / np.linalg.norm(c), atol=1e-6)
    assert pred.tolist() == [0, 1, 2, 0, 2, 0, -1] and X[6].tolist() == [0, 0, 0]


def test_stage_on_solid_colours(tmp_path, colour_dataset, identity_model) -> None:
    b = open_or_create_bundle(tmp_path / "bundles", identity_model, colour_dataset)
    info = build_stage(b, colour_dataset, "oramas", lm=identity_model, layers=["features"], mu=0.5)
    assert info["mu"] == 0.5 and info["dim"] == 3
    rf = O.RelevantFeatures.from_bundle(b)
    assert rf.weights.shape == (3, 3) and (rf.weights.sum(1) <= 0.5 + 1e-9).all()
    assert [int(rf.relevant(c)[0]) for c in range(3)] == [0, 1, 2]  # each class relies on its own colour
    assert b.array("oramas/patches").shape[1:] == (48, 48, 3)
    heat, feats, c = O.explain_oramas(
        identity_model, rf, identity_model.preprocess(colour_dataset.load_image(0))[None]
    )
    assert c == 0 and feats[0][0] == 0 and heat.shape == (16, 16)


@pytest.fixture(scope="module")
def tiny_birds(tmp_path_factory):
    """48 SynthBirds at 64 px and a seeded, untrained demo-architecture CNN (strided convs, in-place ReLUs)."""
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.models.demo_cnn import build_synthbirds_cnn

    tmp = tmp_path_factory.mktemp("oramas")
    ds = generate_synthbirds(tmp / "birds", n=48, seed=0, image_size=64, progress=False)
    torch.manual_seed(0)
    lm = wrap(build_synthbirds_cnn(len(ds.classes), width=16), size=64, classes=ds.classes)
    lm.card = {"architecture": "synthbirds_cnn"}
    return open_or_create_bundle(tmp / "bundles", lm, ds), ds, lm


def test_stages_on_tiny_birds(tiny_birds) -> None:
    from lavise_core.evaluate.oramas import heatmap_methods

    b, ds, lm = tiny_birds
    info = build_stage(b, ds, "oramas", lm=lm, mu=50.0)
    assert info["dim"] == 5 * 8 + 2 * 16  # every conv block of the demo architecture (width 16)
    rf = O.RelevantFeatures.from_bundle(b)
    assert len(rf.layers) == 7 and set(rf.labels.values()) <= {*ds.regions, "none"}
    ev = build_stage(b, ds, "oramas_eval", lm=lm, max_images=4)
    rep = b.read_json("eval/oramas")
    assert ev["n"] == 4 and set(rep["methods"]) == {
        "oramas",
        "grad_cam",
        "guided_backprop",
        "activation",
        "bird_mask",
    }
    x = lm.preprocess(ds.load_image(0))[None]
    c = int(np.flatnonzero((rf.weights > 0).any(1))[0])  # untrained: not every class is ever predicted
    for name, fn in heatmap_methods(lm, rf).items():
        assert fn(x, c).shape == (64, 64), name


def test_views_on_tiny_birds(tiny_birds) -> None:
    from lavise_core import views

    b, ds, lm = tiny_birds
    if not b.stage_done("oramas"):
        build_stage(b, ds, "oramas", lm=lm, mu=50.0)
    ws = views.Workspace(b, model_loader=lambda: lm)
    rf = O.RelevantFeatures.from_bundle(b)
    has = [ds.classes[c] for c in range(len(ds.classes)) if (rf.weights[c] > 0).any()]
    rel = views.class_reliance(ws, has[0])
    assert rel.note is None and rel.features and rel.features[0].patch.size == (48, 48)
    assert sum(n for _, n in rel.counts) == int((rf.weights[ds.classes.index(has[0])] > 0).sum())
    none = [c for c in ds.classes if c not in has]
    if none:  # an untrained net never predicts some species: the view says so instead of failing
        assert "no relevant feature" in views.class_reliance(ws, none[0]).note
    a = ws.analyse(ds.load_image(0))
    img, caption = views.oramas_heatmap(ws, a, has[0])
    assert img.size == a.image.size and "back-projected" in caption
