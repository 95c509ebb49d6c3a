"""CAM-based attribution: CAM, Grad-CAM, Grad-CAM++ at any layer with a spatial map.

A CAM is ``M_t = act( sum_k w_k^t A_k )`` over the maps ``A (B, C, h, w)`` of one layer; the variants differ
only in the channel weights ``w (B, C)`` (:meth:`CamAttribution._weights`, the family's abstract method):

- :class:`CAM` (Zhou et al. 2016, eq. 2): ``w_k^t`` = the linear classifier's weight; needs the layer to feed
  global average pooling and the classifier directly (checked numerically on the batch). No ReLU (as torchcam).
- :class:`GradCAM` (Selvaraju et al. 2017, eq. 1–2): ``w_k = mean_ij dy_t / dA_k^ij``, then ReLU.
- :class:`GradCAMPlusPlus` (Chattopadhay et al. 2018, eq. 19 with the exponential-score closed form):
  ``w_k = sum_ij relu(g_ij) a_ij``, ``a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3 + eps)`` (``a = 0`` where
  ``g = 0``), then ReLU; the same arithmetic as pytorch-grad-cam.

:meth:`attribute` returns ``(B, h, w)`` at the layer's resolution, unnormalised. :meth:`pixel_map` upsamples
bilinearly (half-pixel centres, as OpenCV's ``INTER_LINEAR`` in pytorch-grad-cam) to the input size and
clamps at 0. The references normalise each map to [0, 1] (min–max); :func:`attribution.normalise_maps` does
that, and since min–max is affine it commutes with bilinear upsampling.

Mechanics: one forward hook on the layer (in a context manager, removed on success and error) replaces the
layer's output by a fresh leaf ``A`` (and a clone of it, so an in-place op downstream cannot change ``A``);
``dy/dA`` comes from ``autograd.grad(y, A)`` — nothing below the layer is differentiated, and ``x`` needs no
gradient.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from lavise_core.explain.attribution.base import Attribution, AttributionError, Target, upsample
from lavise_core.models.networks import LoadedModel

__all__ = ["CAM", "CamAttribution", "GradCAM", "GradCAMPlusPlus", "LayerCapture"]


class LayerCapture:
    """Context manager: the layer's output becomes a leaf ``activation`` (requires grad if ``grad``).

    The hook raises :class:`AttributionError` when the output is not a ``(B, C, h, w)`` map with ``h * w >= 2``
    or the module runs more than once per forward pass.
    """

    def __init__(self, model: nn.Module, layer: str, grad: bool) -> None:
        try:
            self.module = model.get_submodule(layer)
        except AttributeError as e:
            raise AttributionError(f"the model has no layer {layer!r}") from e
        self.layer, self.grad = layer, grad
        self.activation: torch.Tensor | None = None
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, _m: nn.Module, _i: tuple, out: object) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[-1] * out.shape[-2] < 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AttributionError(
                f"layer {self.layer!r} gives {shape}, not a spatial map (B, C, h, w) with h·w >= 2: "
                "choose a convolutional layer before the global pooling"
            )
        if self.activation is not None:
            raise AttributionError(
                f"layer {self.layer!r} runs more than once per forward pass: choose another"
            )
        leaf = out.detach().requires_grad_(self.grad)
        self.activation = leaf
        return leaf.clone()  # in-place ops downstream change the clone, not A

    def __enter__(self) -> LayerCapture:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class CamAttribution(Attribution):
    """CAM family: one abstract method, ``_weights(A, dy/dA, target) -> (B, C)``.

    Args:
        model: LoadedModel or nn.Module (eval mode).
        layer: module name; default the LoadedModel's ``default_layer`` (the map feeding global pooling).
    """

    #: whether ``_weights`` needs ``dy/dA`` (a backward pass)
    needs_gradient: ClassVar[bool] = True
    #: ReLU on the weighted sum (Grad-CAM eq. 2); CAM keeps the sign
    relu: ClassVar[bool] = True

    def __init__(
        self, model: nn.Module | LoadedModel, layer: str | None = None, batch_size: int = 64
    ) -> None:
        super().__init__(model, batch_size)
        if layer is None:
            if self.loaded is None:
                raise AttributionError("give the layer name (a bare nn.Module has no default layer)")
            layer = self.loaded.default_layer
        self.layer = layer
        LayerCapture(self.model, layer, False)  # validates the name now

    @abc.abstractmethod
    def _weights(
        self, activation: torch.Tensor, gradient: torch.Tensor | None, target: torch.Tensor
    ) -> torch.Tensor:
        """Channel weights ``(B, C)`` from ``A (B, C, h, w)``, ``dy_t/dA`` (or None) and targets ``(B,)``."""

    def _check_logits(self, logits: torch.Tensor, activation: torch.Tensor, target: torch.Tensor) -> None:
        """Family hook for extra checks on one chunk (CAM checks the pooling + linear structure)."""

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._cams(x, target, self.relu)

    def _signed(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._cams(x, target, False)

    def signed_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """``sum_k w_k A_k`` without the ReLU, upsampled to the input: > 0 for the class, < 0 against it."""
        return upsample(self._run(self._signed, x, target), (int(x.shape[-2]), int(x.shape[-1])))

    def _cams(self, x: torch.Tensor, target: torch.Tensor, relu: bool) -> torch.Tensor:
        maps = []
        for s in range(0, x.shape[0], self.batch_size):
            xi, ti = x[s : s + self.batch_size], target[s : s + self.batch_size]
            with (
                torch.set_grad_enabled(self.needs_gradient),
                LayerCapture(self.model, self.layer, self.needs_gradient) as cap,
            ):
                logits = self.model(xi)
            self._check_classes(logits, ti)
            act = cap.activation
            if act is None:
                raise AttributionError(f"layer {self.layer!r} did not run in the forward pass")
            self._check_logits(logits, act, ti)
            grad = None
            if self.needs_gradient:
                score = logits.gather(1, ti[:, None].to(logits.device)).sum()
                try:
                    (grad,) = torch.autograd.grad(score, act)
                except RuntimeError as e:
                    raise AttributionError(f"the class score does not depend on layer {self.layer!r}") from e
            with torch.no_grad():
                w = self._weights(act.detach(), grad, ti)
                cam = (w[:, :, None, None] * act.detach()).sum(1)
                maps.append(cam.clamp_min(0) if relu else cam)
        return torch.cat(maps)

    def pixel_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        return upsample(self.attribute(x, target), (int(x.shape[-2]), int(x.shape[-1]))).clamp_min(0)


class CAM(CamAttribution):
    """Class activation map (Zhou et al. 2016, eq. 2): ``M_t = sum_k w_k^t A_k`` with the classifier's weights.

    Args:
        classifier: module name of the final ``nn.Linear``; default the LoadedModel's ``classifier``.
    """

    name, label = "cam", "CAM"
    needs_gradient = False
    relu = False

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        layer: str | None = None,
        classifier: str | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(model, layer, batch_size)
        if classifier is None:
            classifier = self.loaded.classifier if self.loaded is not None else _last_linear(self.model)
        try:
            fc = self.model.get_submodule(classifier)
        except AttributeError as e:
            raise AttributionError(
                f"the model has no module {classifier!r} to use as CAM's classifier"
            ) from e
        if not isinstance(fc, nn.Linear):
            raise AttributionError(
                f"CAM needs a linear classifier after global pooling; {classifier!r} is a {type(fc).__name__} "
                "(use Grad-CAM, which needs only gradients)"
            )
        self.classifier, self.fc = classifier, fc

    def _check_logits(self, logits: torch.Tensor, activation: torch.Tensor, target: torch.Tensor) -> None:
        w, b = self.fc.weight, self.fc.bias
        if activation.shape[1] != w.shape[1] or logits.shape[1] != w.shape[0]:
            raise AttributionError(
                f"CAM needs layer {self.layer!r} ({activation.shape[1]} channels) to feed global pooling and the "
                f"linear classifier {self.classifier!r} ({w.shape[1]} inputs -> {w.shape[0]} classes) directly; "
                "use Grad-CAM for this layer"
            )
        with torch.no_grad():
            pooled = activation.mean((2, 3)) @ w.T + (b if b is not None else 0)
            gap = (pooled - logits).abs().max()
            scale = logits.abs().max().clamp_min(1.0)
        if gap > 1e-3 * scale:
            raise AttributionError(
                f"CAM needs layer {self.layer!r} -> global average pooling -> {self.classifier!r}, but the logits "
                f"differ from that by {float(gap):.3g}: something else sits in between; use Grad-CAM"
            )

    def _weights(
        self, activation: torch.Tensor, gradient: torch.Tensor | None, target: torch.Tensor
    ) -> torch.Tensor:
        return self.fc.weight.detach()[target.to(self.fc.weight.device)].to(activation.dtype)


class GradCAM(CamAttribution):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1–2): ``w_k = mean_ij dy_t/dA_k^ij``, ``M = relu(sum_k w_k A_k)``."""

    name, label = "gradcam", "Grad-CAM"

    def _weights(
        self, activation: torch.Tensor, gradient: torch.Tensor | None, target: torch.Tensor
    ) -> torch.Tensor:
        assert gradient is not None
        return gradient.mean((2, 3))


class GradCAMPlusPlus(CamAttribution):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19), pytorch-grad-cam's arithmetic (``eps = 1e-6``)."""

    name, label = "gradcam_pp", "Grad-CAM++"
    eps: ClassVar[float] = 1e-6

    def _weights(
        self, activation: torch.Tensor, gradient: torch.Tensor | None, target: torch.Tensor
    ) -> torch.Tensor:
        assert gradient is not None
        g2 = gradient**2
        g3 = g2 * gradient
        sum_a = activation.sum((2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + self.eps)
        alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
        return (gradient.clamp_min(0) * alpha).sum((2, 3))


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise AttributionError(
            "CAM needs a linear classifier after global pooling and this model has no nn.Linear; use Grad-CAM"
        )
    return names[-1]
