"""Signed maps (evidence for and against the class) of each family, exact on the identity CNN of conftest."""

from __future__ import annotations

import pytest
import torch

from lavise_core.explain.attribution.base import AttributionError
from lavise_core.explain.attribution.cam import GradCAM
from lavise_core.explain.attribution.gradient import IntegratedGradients, Saliency
from lavise_core.explain.attribution.perturbation import Occlusion


def _half_image() -> torch.Tensor:
    x = torch.zeros(1, 3, 16, 16)
    x[0, 0, :, :8] = 1.0  # channel 0: +1 on the left half, -1 on the right
    x[0, 0, :, 8:] = -1.0
    return x


def test_gradcam_signed_before_the_relu(identity_model):
    # at the conv before the ReLU, A = x; dy_0/dA_0 = [x_0 > 0] / 256, so w_0 = 0.5 / 256 and the CAM is w_0 · x_0
    m = GradCAM(identity_model, layer="features.0")
    x = _half_image()
    signed = m.signed_map(x, 0)[0]
    expected = 0.5 / 256 * x[0, 0]
    torch.testing.assert_close(signed, expected)
    torch.testing.assert_close(m.pixel_map(x, 0)[0], expected.clamp_min(0))
    assert not identity_model.model.features[0]._forward_hooks  # the hook came off


def test_gradient_signed_is_the_channel_sum(identity_model):
    x = _half_image()
    torch.testing.assert_close(Saliency(identity_model).signed_map(x, 0)[0], (x[0, 0] > 0).float() / 256)
    ig = IntegratedGradients(identity_model, steps=8)
    torch.testing.assert_close(ig.signed_map(x, 0), ig.attribute(x, 0).sum(1))


def test_occlusion_signed_shows_regions_that_raise_the_score(identity_model):
    # replacing the right half (relu(-1) = 0) by 1 raises class 0's mean by 64 / 256 per window: drop -0.25
    m = Occlusion(identity_model, window=8, stride=8, baseline=1.0)
    signed = m.signed_map(_half_image(), 0)[0]
    assert torch.all(signed[:, :8] == 0)
    torch.testing.assert_close(signed[:, 8:], torch.full((16, 8), -0.25))
    assert torch.all(m.pixel_map(_half_image(), 0) == 0)


def test_a_method_without_a_sign_says_so(identity_model):
    from lavise_core.explain.attribution.base import Attribution

    class NoSign(Attribution):
        name, label = "nosign", "No sign"

        def _attribute(self, x, target):
            return x

        def pixel_map(self, x, target):
            return x[:, 0]

    with pytest.raises(AttributionError, match="No sign has no signed map"):
        NoSign(identity_model).signed_map(_half_image(), 0)
