"""The attribution methods equal the field's libraries (Captum, pytorch-grad-cam, torchcam) on real models.

Same model, same SynthBirds images, conventions aligned: signed gradients (Captum ``abs=False``), the same
SmoothGrad noise (same global seed; both draw one image-major ``(B*n, 3, H, W)`` block), Gauss–Legendre IG,
ReLU on Grad-CAM, bilinear upsampling then min–max normalisation for pytorch-grad-cam (it normalises
again after resizing, and a 16× bilinear resize does not reach the low-resolution maximum), min–max normalisation
for torchcam's CAM. Tolerance: max |ours - reference| <= 1e-5 of the reference map's range.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from lavise_core.explain.attribution.base import normalise_maps, upsample
from lavise_core.explain.attribution.cam import CAM, GradCAM, GradCAMPlusPlus
from lavise_core.explain.attribution.gradient import (
    Deconvnet,
    GuidedBackprop,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from lavise_core.explain.attribution.perturbation import Occlusion
from lavise_core.models.networks import load_model

captum_attr = pytest.importorskip("captum.attr")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
torchcam_methods = pytest.importorskip("torchcam.methods")

TOL = 1e-5


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ours, ref = torch.as_tensor(ours).detach().float(), torch.as_tensor(ref).detach().float()
    assert ours.shape == ref.shape
    span = float(ref.max() - ref.min())
    assert span > 0, "degenerate reference map"
    assert float((ours - ref).abs().max()) <= TOL * span


@pytest.fixture(scope="module", params=["synthbirds", "efficientnet_lite0"])
def case(request, tmp_path_factory):
    """(LoadedModel, x (2, 3, S, S) two SynthBirds images preprocessed for the model, targets (2,))."""
    from lavise_core.data.synthbirds import generate_synthbirds

    root = tmp_path_factory.getbasetemp() / "attribution_birds"
    if not (root / "dataset.json").exists():
        generate_synthbirds(root, n=2, seed=3, image_size=128, progress=False)
    from lavise_core.data.dataset import ProbeDataset

    ds = ProbeDataset.open(root)
    lm = load_model(request.param)
    x = torch.stack([lm.preprocess(ds.load_image(i)) for i in range(2)])
    if request.param == "efficientnet_lite0":
        x = torch.nn.functional.interpolate(x, size=96, mode="bilinear", align_corners=False)  # keep it fast
    with torch.no_grad():
        top2 = lm.model(x).topk(2, 1).indices
    return lm, x, torch.stack([top2[0, 0], top2[1, 1]])  # predicted class, and a runner-up class


def ref_input(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def test_gradient_methods_equal_captum(case) -> None:
    lm, x, t = case
    m = lm.model
    assert_close(
        Saliency(lm).attribute(x, t), captum_attr.Saliency(m).attribute(ref_input(x), target=t, abs=False)
    )
    ig = IntegratedGradients(lm, steps=6)
    ref = captum_attr.IntegratedGradients(m).attribute(ref_input(x), target=t, n_steps=6)
    assert_close(ig.attribute(x, t), ref)
    torch.manual_seed(7)
    ours = SmoothGrad(lm, n_samples=3, sigma=0.2).attribute(x, t)
    torch.manual_seed(7)
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(m))
    ref = nt.attribute(ref_input(x), target=t, nt_type="smoothgrad", nt_samples=3, stdevs=0.2, abs=False)
    assert_close(ours, ref)


def test_guided_backprop_and_deconvnet_equal_captum(case) -> None:
    lm, x, t = case
    m = lm.model
    relu_only = lm.name == "efficientnet_lite0"  # Captum modifies nn.ReLU only; Lite0 has nn.ReLU6
    kinds = ("relu",) if relu_only else ("relu", "relu6")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gb_ref = captum_attr.GuidedBackprop(m).attribute(ref_input(x), target=t)
        dc_ref = captum_attr.Deconvolution(m).attribute(ref_input(x), target=t)
    assert_close(GuidedBackprop(lm, rectifiers=kinds).attribute(x, t), gb_ref)
    assert_close(Deconvnet(lm, rectifiers=kinds).attribute(x, t), dc_ref)
    if relu_only:  # our default also guides the ReLU6s: a different (documented) map
        ours = GuidedBackprop(lm).attribute(x, t)
        assert float((ours - gb_ref).abs().max()) > 1e-3 * float(gb_ref.max() - gb_ref.min())


def test_occlusion_equals_captum(case) -> None:
    lm, x, t = case
    size = x.shape[-1]
    k, s = size // 4, size // 8
    ours = Occlusion(lm, window=k, stride=s).attribute(x, t)
    ref = captum_attr.Occlusion(lm.model).attribute(
        x,
        target=t,
        sliding_window_shapes=(3, k, k),
        strides=(3, s, s),
        baselines=0.0,
        perturbations_per_eval=64,
    )
    assert_close(ours, ref)


def test_cams_equal_captum_pytorch_grad_cam_and_torchcam(case) -> None:
    from pytorch_grad_cam import GradCAM as PgGradCAM
    from pytorch_grad_cam import GradCAMPlusPlus as PgGradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    lm, x, t = case
    m, layer = lm.model, lm.model.get_submodule(lm.default_layer)
    size = tuple(x.shape[-2:])
    targets = [ClassifierOutputTarget(int(i)) for i in t]
    gradcam = GradCAM(lm).attribute(x, t)
    ref = captum_attr.LayerGradCam(m, layer).attribute(x, target=t, relu_attributions=True)
    assert_close(gradcam, ref.squeeze(1))
    with PgGradCAM(model=m, target_layers=[layer]) as cam:
        ref = cam(input_tensor=ref_input(x), targets=targets)
    assert_close(normalise_maps(upsample(gradcam, size)), ref)  # it re-normalises after resizing
    with PgGradCAMPlusPlus(model=m, target_layers=[layer]) as cam:
        ref = cam(input_tensor=ref_input(x), targets=targets)
    assert_close(normalise_maps(upsample(GradCAMPlusPlus(lm).attribute(x, t), size)), ref)
    logging.disable(logging.WARNING)
    try:
        with torchcam_methods.CAM(m, target_layer=lm.default_layer, fc_layer=lm.classifier) as extractor:
            with torch.no_grad():
                scores = m(x)
            ref = extractor(t.tolist(), scores)[0]
    finally:
        logging.disable(logging.NOTSET)
    assert_close(normalise_maps(CAM(lm).attribute(x, t)), ref)
    # the models are left as found: no hooks, eval mode, frozen parameters
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert not m.training and not any(p.requires_grad for p in m.parameters())
