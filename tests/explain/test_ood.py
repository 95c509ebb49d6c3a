"""The upload check: calibrated flag rate, far points flagged, bundle round trip, hooks removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavise_core.explain.ood import OODModel, fit_ood, forward_with_ood, save_ood
from lavise_core.pipeline.bundle import Bundle


def features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(1.0, 0.3, (n, 8))).astype(np.float32)


def test_flag_rate_and_far_points(tmp_path) -> None:
    model = fit_ood(features(600, 0), quantile=0.95, reference=features(200, 1))
    fresh = model.in_distribution(features(1000, 2))
    assert 0.88 <= fresh.mean() <= 0.99  # about 5 % of new in-distribution points flagged
    far = np.vstack([np.zeros((5, 8)), np.full((5, 8), 5.0), np.eye(8)[:5] * 3]).astype(np.float32)
    assert not model.in_distribution(far).any()
    v = model.verdict(far[0])
    assert not v.in_distribution and "does not look like" in v.message and v.percentile > 99
    b = Bundle.create(tmp_path / "b", {"key": "k", "layer": "x", "classes": []})
    save_ood(b, model)
    again = OODModel.from_bundle(Bundle.open(b.root))
    assert np.allclose(again.score(far), model.score(far)) and again.threshold == model.threshold


def test_forward_with_ood_removes_its_hooks(identity_model) -> None:
    lm = identity_model
    x = torch.rand(2, 3, 16, 16)
    layer = lm.default_layer
    maps, _, early = forward_with_ood(lm, x, layer, [layer])
    assert maps.shape[0] == 2 and early.shape == (2, 2 * maps.shape[1])
    assert all(not m._forward_hooks for m in lm.model.modules())
    with pytest.raises(RuntimeError):
        forward_with_ood(lm, torch.rand(2, 5, 16, 16), layer, [layer])  # wrong channel count: raises
    assert all(not m._forward_hooks for m in lm.model.modules())
