"""Attribution maps ("where does the network look"): what every family shares.

A method answers, for a batch ``x (B, 3, H, W)`` (already normalised) and one class per image, which input
pixels carry the class score ``f_t(x)`` (the logit, before softmax). Three families, one module each, each
with one small abstract base class and a single abstract method per variant (STYLE rule 5):

- :mod:`.attribution_gradient`: gradient saliency, SmoothGrad, integrated gradients, guided backprop,
  deconvnet (``_attribute``: ``(B, 3, H, W)`` in input space);
- :mod:`.attribution_cam`: CAM, Grad-CAM, Grad-CAM++ (``_weights``: ``(B, C)`` channel weights of one layer);
- :mod:`.attribution_perturbation`: occlusion (``_masks``: the regions replaced by the baseline).

:mod:`.attribution_methods` registers them by name for the dashboard, the evaluation and the benchmark.

This module holds the common mechanics: :class:`AttributionError` (bad input, with a message a user can act
on), target and input validation, :func:`attribution_mode` (refuses a model in training mode, freezes the
parameters' ``requires_grad`` for the call and restores it, on success and on error), the reduction of a
method's raw output to a non-negative pixel map ``(B, H, W)`` and a min–max normalisation.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lavise_core.models.networks import LoadedModel

__all__ = [
    "Attribution",
    "AttributionError",
    "Target",
    "attribution_mode",
    "check_eval",
    "check_input",
    "check_target",
    "normalise_maps",
    "resolve_model",
    "upsample",
]

Target = int | Sequence[int] | torch.Tensor


class AttributionError(ValueError):
    """Bad input to an attribution method (layer, class index, image, model state)."""


def resolve_model(model: nn.Module | LoadedModel) -> tuple[nn.Module, LoadedModel | None]:
    """``(module, loaded)``: accepts a registry :class:`LoadedModel` or a bare ``nn.Module``."""
    if isinstance(model, LoadedModel):
        return model.model, model
    if isinstance(model, nn.Module):
        return model, None
    raise AttributionError(f"expected an nn.Module or a LoadedModel, got {type(model).__name__}")


def check_input(x: torch.Tensor) -> torch.Tensor:
    """Validate a normalised image batch ``(B, C, H, W)``; a single ``(C, H, W)`` image gets a batch axis."""
    if not isinstance(x, torch.Tensor):
        raise AttributionError(f"expected an image tensor (B, 3, H, W), got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise AttributionError(f"expected an image batch (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise AttributionError("the image batch is empty")
    if min(x.shape[-2:]) < 2:
        raise AttributionError(
            f"the image is {x.shape[-2]}×{x.shape[-1]} pixels: an attribution map needs at least 2×2 "
            "(preprocess the image to the model's input size first)"
        )
    if not x.is_floating_point():
        raise AttributionError(f"expected a float (normalised) image tensor, got {x.dtype}")
    return x


def check_target(target: Target, batch: int, num_classes: int) -> torch.Tensor:
    """One class index per image as a ``(B,)`` int64 tensor; an int is broadcast to the batch."""
    if isinstance(target, torch.Tensor):
        t = target.detach().to("cpu", torch.int64).reshape(-1)
    elif isinstance(target, int):
        t = torch.full((batch,), int(target), dtype=torch.int64)
    else:
        try:
            t = torch.tensor([int(v) for v in target], dtype=torch.int64)
        except (TypeError, ValueError) as e:
            raise AttributionError(
                f"target must be a class index or one index per image, got {target!r}"
            ) from e
    if t.numel() == 1 and batch > 1:
        t = t.expand(batch).clone()
    if t.numel() != batch:
        raise AttributionError(f"{t.numel()} target classes for a batch of {batch} images")
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise AttributionError(
            f"class index {int(bad[0])} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return t


def check_eval(model: nn.Module) -> None:
    """Raise :class:`AttributionError` if ``model`` is in training mode."""
    if model.training:
        raise AttributionError(
            f"the model ({type(model).__name__}) is in training mode: call model.eval() before computing "
            "attribution maps (BatchNorm would use batch statistics and Dropout would make the map random)"
        )


@contextmanager
def attribution_mode(model: nn.Module, params: Sequence[nn.Parameter] | None = None) -> Iterator[nn.Module]:
    """Run attributions on ``model``: refuse training mode; parameters frozen inside, restored on exit.

    Training mode is an error rather than silently switched: BatchNorm would use batch statistics (a map
    that depends on the other images in the batch) and update its running averages, Dropout would make
    the map random.
    """
    check_eval(model)
    saved = [(p, p.requires_grad) for p in (model.parameters() if params is None else params)]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def normalise_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min–max normalise each map of ``(B, ...)`` to [0, 1] (a constant map becomes 0)."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).reshape(maps.shape)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres, as OpenCV's ``INTER_LINEAR``) resize of ``(B, h, w)`` to ``(B, *size)``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


class Attribution(abc.ABC):
    """Root of the three families: ``attribute`` (raw output) and ``pixel_map`` (``(B, H, W)``, >= 0).

    Args:
        model: a :class:`LoadedModel` from the registry or an ``nn.Module`` in eval mode returning logits.
        batch_size: the most images (or perturbed copies) per forward pass.
    """

    #: registry name, e.g. ``"gradcam"``
    name: ClassVar[str] = ""
    #: a short label for the dashboard
    label: ClassVar[str] = ""

    def __init__(self, model: nn.Module | LoadedModel, batch_size: int = 64) -> None:
        self.model, self.loaded = resolve_model(model)
        if batch_size < 1:
            raise AttributionError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._params = list(self.model.parameters())  # listed once: walking the modules costs ~0.3 ms a call

    @property
    def device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _prepare(self, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``x`` on the model's device and the targets ``(B,)`` int64 on the same device.

        With a registry model the class range is checked here; with a bare module (K unknown until its
        logits exist) the families call :meth:`_check_classes` after their first forward pass.
        """
        x = check_input(x).detach().to(self.device)
        check_eval(self.model)
        k = self.loaded.num_classes if self.loaded is not None else 2**62
        t = check_target(target, x.shape[0], k)
        return x, t.to(x.device)

    def _check_classes(self, logits: object, target: torch.Tensor) -> None:
        """Raise :class:`AttributionError` unless ``logits`` is ``(B, K)`` and every target is below K."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = getattr(logits, "shape", type(logits).__name__)
            raise AttributionError(f"the model must return logits (B, K), got {shape}")
        k = int(logits.shape[1])
        if int(target.max()) >= k:
            raise AttributionError(
                f"class index {int(target.max())} is out of range: the model has {k} classes (0..{k - 1})"
            )

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """The method's raw attribution for class ``target`` of each image of ``x (B, 3, H, W)``."""
        return self._run(self._attribute, x, target)

    def _run(
        self, compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, target: Target
    ) -> torch.Tensor:
        """``compute(x, t)`` on validated inputs, under the model's lock, with frozen parameters."""
        lock = self.loaded.lock if self.loaded is not None else nullcontext()
        with lock:  # one shared model: every hooked / modified pass runs under its lock (STYLE rule 3)
            x, t = self._prepare(x, target)
            with torch.enable_grad(), attribution_mode(self.model, self._params):
                return compute(x, t)

    def signed_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """Evidence for (> 0) and against (< 0) the class, ``(B, H, W)`` at the input resolution.

        Each family defines its sign (gradient: the colour channels summed; CAM: the weighted sum before the
        ReLU; occlusion: the score drop, negative where hiding a region raises the score)."""
        raise AttributionError(f"{self.label or type(self).__name__} has no signed map")

    @abc.abstractmethod
    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Family hook: raw attribution of validated ``x``; ``target`` ``(B,)`` int64."""

    @abc.abstractmethod
    def pixel_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """Non-negative importance ``(B, H, W)`` at the input resolution (evidence FOR the class)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"
