"""Feature visualisation: determinism, the objective rises, bad input, the prior, the stage's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lavise_core.explain.featurevis.visualisation import (
    FeatureVisError,
    FusedAdam,
    VisSettings,
    _only_channels,
    featurevis_summary,
    folded_copy,
    fourier_image,
    gram_similarity,
    visualise,
)
from lavise_core.models.networks import load_model
from tests.conftest import build_stage, wrap

FAST = VisSettings(steps=24, size=64)


@pytest.fixture(scope="module")
def demo():
    return load_model("synthbirds")


def test_same_seed_same_image_other_seed_other_image(demo) -> None:
    a = visualise(demo, [0, 5], settings=VisSettings(steps=6, size=48, seed=3))
    b = visualise(demo, [0, 5], settings=VisSettings(steps=6, size=48, seed=3))
    c = visualise(demo, [0, 5], settings=VisSettings(steps=6, size=48, seed=4))
    assert a.images.shape == (2, 48, 48, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and np.array_equal(a.history, b.history)
    assert not np.array_equal(a.images, c.images)
    # the model is left as it was: no hook, no patched ReLU
    assert all("forward" not in m.__dict__ for m in demo.model.modules())
    assert not any(m._forward_hooks for m in demo.model.modules())


def test_folded_copy_and_channel_slice_give_the_same_maps(demo) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = demo.model.features(x)
        net = folded_copy(demo.model)
        folded = net.features(x)
        keep = np.array([3, 17, 100])
        only = _only_channels(net, "features", keep)
        assert only.active
        with only:
            sliced = net.features(x)
        after = net.features(x)
    # 7 batch norms folded into their convolutions, the names kept
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in demo.model.modules()) == 7
    assert [n for n, _ in net.named_modules()] == [n for n, _ in demo.model.named_modules()]
    assert not any(p.requires_grad for p in net.parameters())
    scale = float(full.abs().max())
    assert float((folded - full).abs().max()) < 1e-5 * scale
    assert sliced.shape == (2, 3, 4, 4)
    assert float((sliced - full[:, keep]).abs().max()) < 1e-5 * scale
    assert torch.equal(after, folded)  # the slice is undone on exit
    assert not _only_channels(net, "features.20", keep).active  # a lone ReLU: no convolution to slice
    assert not _only_channels(net, None, keep).active


def test_adam_matches_torch_adam() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, generator=gen).requires_grad_()
    b = a.detach().clone().requires_grad_()
    reference, ours = torch.optim.Adam([a], lr=0.05), FusedAdam(b, 0.05)
    for _ in range(40):
        g = torch.randn(4, 6, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        reference.step()
        ours.step()
    assert float((a - b).detach().abs().max()) < 1e-6


def test_objective_rises_for_filters_and_a_class(demo) -> None:
    v = visualise(demo, [1, 2], settings=FAST)
    start = visualise(demo, [1, 2], settings=VisSettings(steps=1, size=64, lr=0.0))
    assert np.all(v.objective > 5 * np.maximum(start.objective, 1e-3))
    assert v.activations.shape == (2, 128)
    assert np.array_equal(v.objective, v.activations[[0, 1], [1, 2]])
    c = visualise(demo, 3, kind="class", settings=VisSettings(steps=128, size=64))
    assert c.history[-1, 0] > c.history[0, 0] + 1.0
    assert c.activations.shape == (1, 12) and int(c.activations.argmax()) == 3


def test_bad_input_is_explained(demo) -> None:
    with pytest.raises(
        FeatureVisError, match=r"filter 128 is out of range: layer 'features' has 128 filters"
    ):
        visualise(demo, 128, settings=FAST)
    with pytest.raises(FeatureVisError, match=r"class 12 is out of range: the model has 12 classes"):
        visualise(demo, 12, kind="class", settings=FAST)
    with pytest.raises(FeatureVisError, match=r"no layer 'conv9'.*features\.19, features\.20, features"):
        visualise(demo, 0, "conv9", settings=FAST)
    with pytest.raises(
        FeatureVisError, match=r"layer 'pool' outputs \(128, 1, 1\), which has no spatial map"
    ):
        visualise(demo, 0, "pool", settings=FAST)
    with pytest.raises(FeatureVisError, match=r"layer 'classifier' outputs \(12,\)"):
        visualise(demo, 0, "classifier", settings=FAST)
    with pytest.raises(FeatureVisError, match="unknown objective"):
        visualise(demo, 0, kind="neuron", settings=FAST)


def test_earlier_layer_and_diversity(demo) -> None:
    v = visualise(demo, 3, "features.8", settings=FAST)
    assert v.layer == "features.8" and v.activations.shape == (1, 32) and v.objective[0] > 0.1
    same = visualise(demo, 7, facets=2, settings=FAST)
    div = visualise(demo, 7, facets=2, diversity=1.0, settings=FAST)
    assert list(div.units) == [7, 7]

    def sim(images: np.ndarray) -> float:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(demo.mean).view(1, 3, 1, 1)) / torch.tensor(demo.std).view(1, 3, 1, 1)
        with torch.no_grad():
            return float(gram_similarity(demo.model.features(x), 1))

    assert sim(div.images) < sim(same.images)


def test_fourier_image_and_gram_similarity_exact() -> None:
    from lavise_core.explain.featurevis.visualisation import frequency_scale

    z = torch.zeros(2, 3, 8, 5, 2)
    img = fourier_image(z, frequency_scale(8, 1.0))
    assert img.shape == (2, 3, 8, 8) and torch.allclose(img, torch.full_like(img, 0.5))
    a = torch.zeros(2, 2, 2, 2)
    a[0, 0] = 1.0  # gram = e00
    a[1, 1] = 1.0  # gram = e11: orthogonal
    assert float(gram_similarity(a, 1)) == 0.0
    assert float(gram_similarity(torch.ones(2, 2, 2, 2), 1)) == pytest.approx(1.0)
    assert float(gram_similarity(a, 2)) == 0.0  # one image per group: no pairs


def test_summary_on_hand_built_activations() -> None:
    acts = np.array([[4.0, 1.0, 0.0], [0.5, 1.0, 2.0], [1.0, 1.0, 3.0]], np.float32)
    s = featurevis_summary(acts, np.array([2.0, 2.0, 1.0], np.float32))
    assert s["_ratio"].tolist() == [2.0, 0.5, 3.0]
    assert s["beats_top_image"] == 2
    # normalised rows: [2, .5, 0] | [.25, .5, 2] | [.5, .5, 3] -> diag beats the others' mean for 0 and 2
    assert s["specific"] == 2
    # columns: filter 0 on others' images 0.75 < 4; filter 1: 1.0 vs 1.0 (not more); filter 2: 1.5 < 3
    assert s["beats_other_images"] == 2


def test_stage_on_a_tiny_bundle(tmp_path) -> None:
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    torch.manual_seed(0)
    net = nn.Sequential()
    net.features = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 5, 3, 2, 1), nn.ReLU())
    net.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ds = generate_synthbirds(tmp_path / "birds", n=12, seed=0, image_size=32, progress=False)
    net.classifier = nn.Linear(5, len(ds.classes))
    lm = wrap(net, size=32, classes=ds.classes)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=2, batch_size=8, num_workers=0, progress=False))
    info = build_stage(bundle, ds, "featurevis", lm, steps=16, batch=3)
    assert info["filters"] == 5 and bundle.array("featurevis/images").shape == (5, 32, 32, 3)
    assert bundle.array("featurevis/activations").shape == (5, 5)
    assert info["beats_top_image"] == int((np.asarray(bundle.array("featurevis/ratio")) > 1).sum())
    small = open_or_create_bundle(tmp_path / "other", lm, ds)
    run_probe(small, lm, ds, ProbeSettings(top_k=2, batch_size=8, num_workers=0, progress=False))
    assert "skipped" in build_stage(small, ds, "featurevis", lm, max_filters=4)


@pytest.mark.parametrize("size", [8, 9, 16])
def test_fourier_image_gradient_is_autograds(size: int) -> None:
    """The written-out backward of eq. 2 equals autograd's through irfft2, the colour mix and the sigmoid."""
    from lavise_core.explain.featurevis.visualisation import _COLOUR_MIX, frequency_scale

    gen = torch.Generator().manual_seed(size)
    z = torch.randn(2, 3, size, size // 2 + 1, 2, generator=gen, dtype=torch.float64).requires_grad_()
    scale = frequency_scale(size, 1.0).double()
    g = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    img = torch.fft.irfft2(torch.view_as_complex(z) * scale, s=(size, size), norm="ortho")
    ref = torch.sigmoid((_COLOUR_MIX.double() @ img.reshape(2, 3, -1)).reshape(2, 3, size, size))
    (g_ref,) = torch.autograd.grad(ref, z, g)
    mine = fourier_image(z, scale)
    (g_mine,) = torch.autograd.grad(mine, z, g)
    assert torch.allclose(mine, ref, atol=1e-12)
    assert torch.allclose(g_mine, g_ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: fourier_image(t, scale), (z,))


@pytest.mark.parametrize("top", [float("inf"), 6.0])
def test_leaky_backward_values_and_gradient(top: float) -> None:
    """Forward is clamp(x, 0, top); backward passes the gradient where the clamp is steep and leak · it elsewhere."""
    from lavise_core.explain.featurevis.visualisation import _LeakyBackward

    x = torch.tensor([-2.0, 0.0, 0.5, 5.0, 7.0], requires_grad=True)
    y = _LeakyBackward.apply(x, top, 0.1)
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert y.tolist() == [0.0, 0.0, 0.5, 5.0, 7.0 if math.isinf(top) else 6.0]
    inside_last = 5.0 if math.isinf(top) else 0.5
    assert x.grad.tolist() == pytest.approx([0.1, 0.2, 3.0, 4.0, inside_last])
