"""Inversion of a layer's representation (Mahendran & Vedaldi 2015): which image does the layer see?

Given the activation ``Φ0 = Φ_L(x0) (C, h, w)`` of an image ``x0`` at layer ``L``, find

    x* = argmin_x  ||Φ_L(x) - Φ0||² / ||Φ0||²  +  λ_TV · TV(x)                      (1)

with ``x`` in the feature-visualisation parameterisation (:func:`~lavise_core.explain.featurevis.visualisation.fourier_image`:
1/f-scaled spectrum, decorrelated colour, sigmoid; the natural-image prior) plus M&V's total variation
``TV(x) = mean |∇x|²`` (β = 2), optimised with Adam from a seeded random start. Reported: the relative feature
error ``||Φ_L(x*) - Φ0|| / ||Φ0||`` beside the same error of a mid-grey image (the baseline that knows nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lavise_core.explain.featurevis.visualisation import (
    FeatureVisError,
    FusedAdam,
    check_layer,
    folded_copy,
    fourier_image,
    frequency_scale,
)
from lavise_core.models.networks import LoadedModel

__all__ = ["Inversion", "invert", "relative_error"]


@dataclass
class Inversion:
    """``image (S, S, 3)`` uint8 the reconstruction; ``relative_error`` of eq. 1's data term at the end;
    ``baseline_error`` the same for a mid-grey image; ``history (steps,)`` the relative error while optimising."""

    image: np.ndarray
    relative_error: float
    baseline_error: float
    history: np.ndarray
    layer: str


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b|| / ||b||`` over everything but the batch axis -> ``(B,)``."""
    d = (a - b).flatten(1).norm(dim=1)
    return d / b.flatten(1).norm(dim=1).clamp_min(1e-12)


def invert(
    lm: LoadedModel, x0: torch.Tensor, layer: str | None = None, *, steps: int = 200, lr: float = 0.05,
    tv: float = 0.05, seed: int = 0, report: Callable[[int, int], None] | None = None,
) -> Inversion:  # fmt: skip
    """Reconstruct ``x0 (3, S, S)`` (preprocessed, as ``lm.preprocess`` returns) from its ``layer`` map (eq. 1).

    Raises :class:`~lavise_core.explain.featurevis.visualisation.FeatureVisError` for a layer without a spatial map or an
    input of the wrong shape.
    """
    layer, _ = check_layer(lm, layer)
    if x0.dim() != 3 or x0.shape[0] != 3 or x0.shape[1] != x0.shape[2]:
        raise FeatureVisError(f"the image must be a preprocessed (3, S, S) tensor, got {tuple(x0.shape)}")
    size = int(x0.shape[-1])
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    store: dict[str, torch.Tensor] = {}

    class _Stop(Exception):
        pass

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        store["maps"] = out
        raise _Stop

    def features(x: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(_Stop):
            net(x)
        return store.pop("maps")

    with lm.lock:  # a private copy (batch norms folded, channels-last): the model is free while we optimise
        net = folded_copy(lm.model)
    net.get_submodule(layer).register_forward_hook(hook)
    gen = torch.Generator().manual_seed(seed)
    scale = frequency_scale(size, 1.0)
    spectrum = (torch.randn(1, 3, size, size // 2 + 1, 2, generator=gen) * 0.01).requires_grad_()
    opt = FusedAdam(spectrum, lr)
    history = np.zeros(steps, np.float32)
    with torch.no_grad():
        target = features(x0[None].float()).detach().clone()
        grey = features((torch.full((1, 3, size, size), 0.5) - mean) / std)
        baseline = float(relative_error(grey, target)[0])
    for step in range(steps):
        spectrum.grad = None
        img = fourier_image(spectrum, scale)
        err = relative_error(features((img - mean) / std), target)[0]
        dx, dy = img[..., 1:, :] - img[..., :-1, :], img[..., :, 1:] - img[..., :, :-1]
        loss = err**2 + tv * (dx.pow(2).mean() + dy.pow(2).mean()) * size
        loss.backward()
        opt.step()
        history[step] = float(err.detach())
        if report is not None:
            report(step + 1, steps)
    with torch.no_grad():
        img = fourier_image(spectrum, scale)
        final = float(relative_error(features((img - mean) / std), target)[0])
    image = (img[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Inversion(image, final, baseline, history, layer)
