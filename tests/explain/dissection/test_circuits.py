"""Circuits: a planted network's wired inputs come out first with hand-computed contributions; eq. 2 = eq. 3 on
a one-convolution path; the API names the layers stage when it is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lavise_core.explain.dissection.circuits import (
    LayerLabels,
    contributions,
    filter_inputs,
    lower_layers,
    single_conv_path,
)
from lavise_core.pipeline.bundle import StageMissing
from tests.conftest import build_stage, wrap
from tests.explain.dissection.test_layers import Planted, planted_dataset


class Wired(nn.Module):
    """features.0-1: 1×1 conv + ReLU copying the 3 input channels to filters 0-2, filter 3 = channel 0 + channel 1;
    features.2-3: 3×3 conv (padding 1) + ReLU whose filter 1 reads ONLY filter 0 (weight 2 at the kernel centre)
    and filter 2 (weight 0.5 at the bottom-right corner: it sees position (y+1, x+1)); every other weight of
    filter 1 is zero. Filters 0 and 2 of features.2 read everything (weight 1), as distractors."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(3, 2)
        with torch.no_grad():
            w1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
            self.features[0].weight.copy_(w1.view(4, 3, 1, 1))
            w2 = torch.ones(3, 4, 3, 3)
            w2[1] = 0
            w2[1, 0, 1, 1] = 2.0
            w2[1, 2, 2, 2] = 0.5
            self.features[2].weight.copy_(w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def solid(values: list[tuple[float, float, float]], side: int = 8) -> torch.Tensor:
    """``(B, 3, side, side)`` images of one value per channel."""
    return torch.tensor(values, dtype=torch.float32)[:, :, None, None].expand(-1, -1, side, side).contiguous()


def no_labels(layers: list[str], channels: int = 4) -> dict[str, LayerLabels]:
    return {n: LayerLabels(["crown"] * channels, np.zeros(channels, np.float32), 0) for n in layers}


def test_the_wired_filters_come_first_with_their_exact_contributions() -> None:
    lm = wrap(Wired(), size=8)
    x = solid([(0.2, 0.4, 0.6), (1.0, 0.0, 0.2)])
    labels = {"features.1": LayerLabels(["red crown", "crown", "wing", "sky background"], np.array([0.5, 0.02, 0.3, 0.1]), 12)}  # fmt: skip
    out = filter_inputs(lm, x, "features", 1, labels, n=4)
    # by hand: T_1 = mean_p (2 a_0(p) + 0.5 a_2(p + (1, 1))); a_2 is zero-padded, so 7 × 7 of the 8 × 8 positions
    # see it: input 0 gives 2 · mean(0.2, 1.0) = 1.2, input 2 gives 0.5 · 49/64 · mean(0.6, 0.2) = 0.153125
    assert [(f.layer, f.filter) for f in out[:2]] == [("features.1", 0), ("features.1", 2)]
    assert out[0].contribution == pytest.approx(1.2, abs=1e-6)
    assert out[1].contribution == pytest.approx(0.5 * 49 / 64 * 0.4, abs=1e-6)
    assert out[0].exact == pytest.approx(1.2, abs=1e-6) and out[1].exact == pytest.approx(0.153125, abs=1e-6)
    assert [f.contribution for f in out[2:]] == [0.0, 0.0]  # the unwired filters 1 and 3
    layer, k, _, label = out[0]  # iterable as the tuple
    assert (layer, k, label) == ("features.1", 0, "red crown") and "IoU 0.500" in out[0].evidence
    assert out[1].label == "wing" and tuple(out[2])[3] is None and "no label" in out[2].evidence


def test_gradient_times_activation_equals_the_exact_linear_contribution_through_bn_and_relu() -> None:
    """A random conv (stride 2) + folded BN + ReLU that blocks part of the map: eq. 2 = eq. 3 per image, and with the
    gated bias they add up to T_k (the path is linear once the gates are fixed)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, 2, 1, bias=True),
                        nn.BatchNorm2d(6), nn.ReLU())  # fmt: skip
    with torch.no_grad():
        bn = net[3]
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-0.3, 0.3)
    model = nn.Module()
    model.features = net
    model.forward = lambda x: net(x).mean((2, 3))  # type: ignore[method-assign]
    lm = wrap(model, size=12)
    path = single_conv_path(model, "features.1", "features")
    assert path is not None and path.relu and path.conv is net[2]
    x = torch.randn(3, 3, 12, 12)
    for k in range(6):
        target, (part,) = contributions(lm, x, "features", k, ["features.1"])
        assert part.exact is not None
        np.testing.assert_allclose(part.gradient, part.exact, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            out = net(x)[:, k]
            s = bn.weight[k] / torch.sqrt(bn.running_var[k] + bn.eps)
            bias = s * net[2].bias[k] + bn.bias[k] - s * bn.running_mean[k]
            gated_bias = ((out > 0).float() * bias).mean((1, 2)).double().numpy()
        np.testing.assert_allclose(part.exact.sum(1) + gated_bias, target, rtol=1e-5, atol=1e-6)
    assert 0 < (net(x) > 0).float().mean() < 1  # the gates matter here


def test_paths_layers_and_errors() -> None:
    lm = wrap(Wired(), size=8)
    assert lower_layers(lm.model, ["features.1", "features.3"], "features") == [
        "features.1"
    ]  # an alias is no input
    assert single_conv_path(lm.model, "features.0", "features") is None  # conv + ReLU + conv: not one conv
    assert single_conv_path(lm.model, "features.1", "features.2") is not None  # no BN, no ReLU
    x = solid([(0.2, 0.4, 0.6)])
    _, (part,) = contributions(lm, x, "features", 1, ["features.0"])
    assert part.exact is None and part.gradient.shape == (1, 4)
    with pytest.raises(ValueError, match="filter 7 out of range"):
        contributions(lm, x, "features", 7, ["features.1"])
    with pytest.raises(ValueError, match="no recorded layer lies below"):
        filter_inputs(lm, x, "features", 1, no_labels(["features.3"]))
    assert not lm.model.features[1]._forward_hooks and not lm.model.features[3]._forward_hooks


def test_the_api_lists_a_planted_filters_input_and_names_the_missing_stage(tmp_path) -> None:
    """Planted: features.3 = ReLU(identity(features.1)), so filter k's only input is features.1 filter k, with
    contribution = its mean activation over k's top images = the probe's top values, exactly."""
    from lavise_core.api import Explainer
    from lavise_core.pipeline.bundle import Bundle
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    ds = planted_dataset(tmp_path / "planted", n=16)
    lm = wrap(Planted(), size=32, classes=ds.classes)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=4, batch_size=8, num_workers=0, progress=False))
    ex = Explainer(Bundle.open(bundle.root), model_loader=lambda: lm)
    with pytest.raises(StageMissing, match=r"`layers` stage .* --stages layers"):
        ex.filters[0].inputs()
    build_stage(bundle, ds, "layers", lm, baseline_images=16, min_support=1)
    ex = Explainer(Bundle.open(bundle.root), model_loader=lambda: lm)
    want = ["red crown", "crown", "wing", "water background"]
    for k in range(4):
        f = ex.filters[k]
        first, *rest = f.inputs(n=4)
        assert (first.layer, first.filter, first.label) == ("features.1", k, want[k])
        assert first.contribution == pytest.approx(float(np.mean(f.top_values)), rel=1e-5)
        assert first.exact == pytest.approx(first.contribution, rel=1e-6, abs=1e-9)
        assert all(r.contribution == 0 for r in rest)
    from lavise_core.api import FilterInfo

    with pytest.raises(ValueError, match="not taken from an open bundle"):
        FilterInfo(0, [], np.zeros(0), np.zeros(0), []).inputs()


def test_a_bundle_without_masks_names_the_layers_stage(tmp_path, colour_dataset, identity_model) -> None:
    from lavise_core.api import Explainer
    from lavise_core.pipeline.bundle import Bundle
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    bundle = open_or_create_bundle(tmp_path / "bundles", identity_model, colour_dataset)
    run_probe(bundle, identity_model, colour_dataset, ProbeSettings(top_k=2, batch_size=4, num_workers=0, progress=False))  # fmt: skip
    ex = Explainer(Bundle.open(bundle.root), model_loader=lambda: identity_model)
    with pytest.raises(StageMissing, match="does not have yet: build it with `lavise build --model identity"):
        ex.filters[0].inputs()
    bundle.mark_stage("layers", {"skipped": "the data set has no region label maps"})
    ex = Explainer(Bundle.open(bundle.root), model_loader=lambda: identity_model)
    with pytest.raises(
        StageMissing, match=r"was skipped for this bundle \(the data set has no region label maps"
    ):
        ex.filters[0].inputs()


def test_the_filters_page_view_lists_the_nearest_layers_inputs_with_their_shares(tmp_path) -> None:
    from lavise_core.pipeline.bundle import Bundle
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe
    from lavise_core.views import filter_inputs_view
    from lavise_core.views.workspace import Workspace

    ds = planted_dataset(tmp_path / "planted", n=16)
    lm = wrap(Planted(), size=32, classes=ds.classes)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=4, batch_size=8, num_workers=0, progress=False))
    build_stage(bundle, ds, "layers", lm, baseline_images=16, min_support=1)
    ws = Workspace(Bundle.open(bundle.root), model_loader=lambda: lm)
    v = filter_inputs_view(ws, 2, n=3)
    assert (v.k, v.layer, v.layers, v.images) == (2, "features.1", ["features.1"], 4)
    first, *rest = v.rows
    assert (first["filter"], first["label"], first["share"]) == (2, "wing", 1.0)
    assert all(r["share"] == 0 for r in rest) and len(rest) == 2
    assert filter_inputs_view(ws, 2, "no such layer", n=3) is v  # an unknown layer: the nearest, cached
