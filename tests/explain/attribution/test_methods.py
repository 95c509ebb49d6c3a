"""Attribution mechanics: IG completeness, rectifier rules under module reuse / in-place / functional ReLU,
hooks removed after a raising forward, model state restored, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lavise_core.explain.attribution.base import AttributionError
from lavise_core.explain.attribution.cam import CAM, GradCAM, GradCAMPlusPlus
from lavise_core.explain.attribution.gradient import (
    Deconvnet,
    GuidedBackprop,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from lavise_core.explain.attribution.perturbation import Occlusion
from lavise_core.explain.attribution.registry import METHODS, make_method, pixel_maps
from lavise_core.models.networks import load_model


class Branchy(nn.Module):
    """Three rectifiers, two of them in parallel branches; ``mode`` picks how the rectifiers are written."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(3, 4, 1),
        )
        self.fc = nn.Linear(4, 3)
        self.mode = mode
        self.shared = nn.ReLU(inplace=mode == "reused_inplace")
        self.a1, self.a2, self.a3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "separate":
            a = self.a1(self.c1(x))
            b, c = self.a2(self.c2(a)), self.a3(self.c3(x))
        elif self.mode == "functional":
            a = F.relu(self.c1(x))
            b, c = torch.relu(self.c2(a)), self.c3(x).relu_()
        else:  # one module at three places (optionally in-place)
            a = self.shared(self.c1(x))
            b, c = self.shared(self.c2(a)), self.shared(self.c3(x))
        return self.fc((b * c).mean((2, 3)))  # the product's backward hands both branches a gradient at once


@pytest.mark.parametrize("method", [GuidedBackprop, Deconvnet])
@pytest.mark.parametrize("mode", ["reused", "reused_inplace", "functional"])
def test_rectifier_rules_hold_for_reused_inplace_and_functional_relu(method, mode) -> None:
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    truth = method(Branchy("separate").eval()).attribute(x, [1, 2])
    m = method(Branchy(mode).eval())
    got = m.attribute(x, [1, 2])
    assert m.last_calls == 3 * 1  # every rectifier call was rewritten (one batch)
    torch.testing.assert_close(got, truth, rtol=0, atol=1e-6)
    assert not torch.allclose(got, Saliency(Branchy("separate").eval()).attribute(x, [1, 2]))


def test_rectifier_rules_by_hand() -> None:
    """y = w · clamp(x, 0, 6) per pixel: guided keeps relu(w) on 0 < x < 6, deconvnet relu(w) everywhere."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU6(inplace=True)
            self.w = torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = (self.act(x + 0) * self.w).sum((1, 2, 3))  # in-place act on a non-leaf
            return torch.stack([y, -y], 1)

    x = torch.tensor([[[[-1.0, 2.0]], [[0.5, 0.5]], [[7.0, 3.0]]]]).repeat(1, 1, 2, 1)  # two equal rows

    def first_row(method: type, **kw: object) -> list[float]:
        return method(Tiny().eval(), **kw).attribute(x, 0)[0, :, 0].flatten().tolist()

    assert first_row(GuidedBackprop) == [0.0, 1.0, 0.0, 0.0, 0.0, 3.0]
    assert first_row(Deconvnet) == [1.0, 1.0, 0.0, 0.0, 3.0, 3.0]
    assert first_row(Saliency) == [0.0, 1.0, -2.0, -2.0, 0.0, 3.0]
    assert first_row(GuidedBackprop, rectifiers=("relu",)) == first_row(Saliency)  # Captum's convention


@pytest.fixture(scope="module")
def demo():
    lm = load_model("synthbirds")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    return lm, x


def test_integrated_gradients_completeness(demo) -> None:
    lm, x = demo
    attr, gap = IntegratedGradients(lm, steps=256).completeness(x, [0, 3])
    with torch.no_grad():
        delta = lm.model(x)[:, [0, 3]].diagonal() - lm.model(torch.zeros_like(x))[:, [0, 3]].diagonal()
    assert attr.shape == x.shape
    assert float(gap.abs().max()) <= 0.02 * float(delta.abs().max())
    _, coarse = IntegratedGradients(lm, steps=16).completeness(x, [0, 3])
    assert float(coarse.abs().max()) > 10 * float(gap.abs().max())  # the rule converges as steps grow
    # on a network without kinks (conv, mean, linear) the path integral is exact with any number of steps
    linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    base = torch.full((1, 3, 1, 1), 0.3)
    attr, gap = IntegratedGradients(linear, steps=1, baseline=base).completeness(x, [2, 0])
    assert float(gap.abs().max()) < 1e-5 and float(attr.abs().sum()) > 1e-3


def test_every_method_gives_nonnegative_maps_and_leaves_the_model_as_found(demo) -> None:
    lm, x = demo
    options = {
        "smoothgrad": {"n_samples": 2},
        "integrated_gradients": {"steps": 2},
        "occlusion": {"window": 16},
    }
    maps = pixel_maps(lm, x, list(METHODS), [1, 2], options)
    for name, m in maps.items():
        assert m.shape == (2, 64, 64), name
        assert torch.isfinite(m).all() and (m >= 0).all(), name
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in lm.model.modules())
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())


def test_batching_does_not_change_the_maps(demo) -> None:
    lm, x = demo
    for cls in (SmoothGrad, GradCAM, Occlusion):
        opts = {"n_samples": 3, "sigma": 0.1} if cls is SmoothGrad else {}
        a = cls(lm, batch_size=64, **opts)
        b = cls(lm, batch_size=1, **opts)
        torch.manual_seed(0)
        ma = a.attribute(x, 4)
        torch.manual_seed(0)
        mb = b.attribute(x, 4)
        # conv algorithms differ by batch size: about 1e-6
        torch.testing.assert_close(ma, mb, rtol=1e-4, atol=1e-5)


class Faulty(nn.Module):
    """Conv–ReLU–pool–linear whose forward raises after the hooked layer ran (``fail`` = True)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(4, 2)
        self.calls, self.fail = 0, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        f = self.features(x)
        if self.fail:
            raise RuntimeError("boom inside forward")
        return self.fc(f.mean((2, 3)))


@pytest.mark.parametrize("name", list(METHODS))
def test_hooks_and_state_restored_after_a_raising_forward(name) -> None:
    model = Faulty().eval()
    flags = [True, False]
    for p, f in zip(model.parameters(), flags * 2, strict=False):
        p.requires_grad_(f)
    before = [p.requires_grad for p in model.parameters()]
    opts = {"layer": "features"} if name in ("cam", "gradcam", "gradcam_pp") else {}
    if name == "cam":
        opts["classifier"] = "fc"
    method = make_method(name, model, **opts)
    with pytest.raises(RuntimeError, match="boom"):
        method.attribute(torch.randn(1, 3, 8, 8), 0)
    assert model.calls == 1
    assert all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == before and not model.training
    # no rectifier mode left active: plain gradients afterwards are ordinary gradients
    x = torch.randn(4, requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(x).sum() * -1, x)
    assert torch.equal(g, -(x > 0).float())


def test_clear_errors(demo) -> None:
    lm, x = demo
    with pytest.raises(AttributionError, match="out of range"):
        GradCAM(lm).attribute(x, 12)
    with pytest.raises(AttributionError, match="out of range"):
        Saliency(lm).attribute(x, [0, -1])
    bare = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).eval()
    for cls in (Saliency, Occlusion):
        with pytest.raises(AttributionError, match="out of range: the model has 3 classes"):
            cls(bare).attribute(x, 3)  # a bare module: checked against its logits
    with pytest.raises(AttributionError, match="out of range: the model has 3 classes"):
        GradCAM(bare, layer="0").attribute(x, [0, 7])
    with pytest.raises(AttributionError, match="1×1"):
        Saliency(lm).attribute(torch.zeros(1, 3, 1, 1), 0)
    with pytest.raises(AttributionError, match="not a spatial map"):
        GradCAM(lm, layer="pool").attribute(x, 0)
    with pytest.raises(AttributionError, match="not a spatial map"):
        GradCAMPlusPlus(lm, layer="classifier").attribute(x, 0)
    with pytest.raises(AttributionError, match="no layer"):
        GradCAM(lm, layer="features.99")
    with pytest.raises(AttributionError, match="global average pooling"):
        CAM(lm, layer="features.17").attribute(x, 0)  # a map that is not the pooled one
    no_linear = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(AttributionError, match=r"no nn\.Linear"):
        CAM(no_linear, layer="0")
    lm.model.train()
    try:
        with pytest.raises(AttributionError, match="training mode"):
            GradCAM(lm).attribute(x, 0)
    finally:
        lm.model.eval()
    assert not lm.model.training
    with pytest.raises(AttributionError, match="unknown attribution method"):
        make_method("lime", lm)
