"""The attribution methods by name: one registry for the dashboard, ``lavise evaluate`` and the benchmark.

``make_method(name, model, **options)`` builds one; ``pixel_maps(model, x, names, target)`` gives each
method's non-negative map ``(B, H, W)`` at the input resolution. Defaults are the dashboard's: SmoothGrad
with 25 samples at 15 % noise, integrated gradients with 32 Gauss–Legendre points, occlusion with a window
of 1/8 of the image and stride 1/16, CAMs at the model's default layer (the one feeding global pooling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lavise_core.explain.attribution.base import Attribution, AttributionError, Target
from lavise_core.explain.attribution.cam import CAM, GradCAM, GradCAMPlusPlus
from lavise_core.explain.attribution.gradient import (
    Deconvnet,
    GuidedBackprop,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from lavise_core.explain.attribution.perturbation import Occlusion
from lavise_core.models.networks import LoadedModel

__all__ = ["DEFAULT_METHOD", "METHODS", "make_method", "method_labels", "pixel_maps"]

#: name -> class, in the order the dashboard lists them
METHODS: dict[str, type[Attribution]] = {
    c.name: c
    for c in (
        GradCAM,
        GradCAMPlusPlus,
        CAM,
        Saliency,
        SmoothGrad,
        IntegratedGradients,
        GuidedBackprop,
        Deconvnet,
        Occlusion,
    )
}
#: the Explain page's default (one forward + a backward from the layer up: the cheapest)
DEFAULT_METHOD = "gradcam"


def method_labels() -> dict[str, str]:
    """``name -> label`` for display."""
    return {n: c.label for n, c in METHODS.items()}


def make_method(name: str, model: nn.Module | LoadedModel, **options: Any) -> Attribution:
    """The method registered as ``name`` on ``model`` (``options`` go to its constructor)."""
    cls = METHODS.get(name)
    if cls is None:
        raise AttributionError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}")
    factory: Callable[..., Attribution] = cls
    return factory(model, **options)


def pixel_maps(
    model: nn.Module | LoadedModel,
    x: torch.Tensor,
    names: Sequence[str],
    target: Target,
    options: dict[str, dict] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: (B, H, W)}`` non-negative maps of each method for class ``target`` of each image of ``x``."""
    options = options or {}
    return {n: make_method(n, model, **options.get(n, {})).pixel_map(x, target).detach() for n in names}
