"""The Explain page's attribution controls: settings -> method options, plain-words errors, signed overlays."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lavise_core import views


def _lm(size: int = 16):
    return SimpleNamespace(input_size=size, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))


def test_defaults_are_the_stored_evaluation_options():
    d = views.AttributionSettings()
    assert (d.ig_steps, d.smoothgrad_samples, d.occlusion_window, d.occlusion_stride) == (32, 25, 16, 16)
    assert d.stored_defaults and views.AttributionSettings(signed=True).stored_defaults
    assert not views.AttributionSettings(ig_steps=8).stored_defaults


def test_options_pass_every_setting_through():
    x = torch.zeros(1, 3, 16, 16)
    s = views.AttributionSettings(
        ig_baseline="black", ig_steps=7, smoothgrad_noise=0.3, smoothgrad_samples=5,
        occlusion_window=4, occlusion_stride=2, cam_layer="features.0",
    )  # fmt: skip
    o = views.method_options(_lm(), x, s)
    # black = pixel value 0, normalised: (0 - mean) / std per channel
    torch.testing.assert_close(
        o["integrated_gradients"]["baseline"].flatten(), torch.tensor([-1.0, -1.0, 0.0])
    )
    assert o["integrated_gradients"]["steps"] == 7
    assert (o["smoothgrad"]["n_samples"], o["smoothgrad"]["noise_level"]) == (5, 0.3)
    assert o["occlusion"] == {"window": 4, "stride": 2}
    assert o["gradcam"] == o["gradcam_pp"] == o["cam"] == {"layer": "features.0"}
    assert views.method_options(_lm(), x, views.AttributionSettings())["gradcam"] == {}
    assert (
        views.method_options(_lm(), x, views.AttributionSettings())["integrated_gradients"]["baseline"] == 0.0
    )


def test_blurred_baseline_is_the_image_blurred():
    x = torch.zeros(1, 3, 32, 32)
    x[..., 16, 16] = 1.0
    b = views.method_options(_lm(32), x, views.AttributionSettings(ig_baseline="blurred"))
    base = b["integrated_gradients"]["baseline"]
    assert base.shape == x.shape and 0 < float(base[0, 0, 16, 16]) < 1
    assert float(base.sum()) == pytest.approx(3.0, rel=1e-3)  # a blur keeps the mass


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ig_baseline": "white"}, "unknown integrated-gradients baseline 'white'"),
        ({"ig_steps": 0}, "1 to 256 steps"),
        ({"smoothgrad_noise": 2.0}, "share of the image's value range"),
        ({"smoothgrad_samples": 0}, "1 to 200 noisy samples"),
        ({"occlusion_window": 17}, "1 to 16 pixels (the network's input)"),
        ({"occlusion_window": 4, "occlusion_stride": 5}, "stride must be 1 to the window (4 pixels)"),
    ],
)
def test_bad_settings_are_refused_in_plain_words(change, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        views.method_options(_lm(), torch.zeros(1, 3, 16, 16), views.AttributionSettings(**change))


def test_signed_overlay_red_for_blue_against_untouched_at_zero():
    img = Image.new("RGB", (3, 1), (0, 0, 0))
    out = np.asarray(views.signed_overlay(img, np.asarray([[2.0, 0.0, -2.0]], np.float32), top=2.0))
    assert out[0, 0, 0] > out[0, 0, 2]  # red
    assert out[0, 1].tolist() == [0, 0, 0]  # zero: the image shows
    assert out[0, 2, 2] > out[0, 2, 0]  # blue


def test_cam_layers_put_the_bundle_layer_first():
    class B:
        layer = "features"

        def has(self, name):
            return name == "layers/names.json"

        def read_json(self, name):
            return ["features.5", "features", "features.20"]

    assert views.cam_layers(SimpleNamespace(bundle=B())) == ["features", "features.5", "features.20"]


def test_signed_legend_runs_blue_black_red():
    px = np.asarray(views.signed_legend(256, 2))
    assert px.shape == (2, 256, 3)
    assert px[0, 0, 2] > px[0, 0, 0] and px[0, -1, 0] > px[0, -1, 2]
    assert px[0, 127].sum() < 30 and px[0, 128].sum() < 30  # the middle (0) is dark
