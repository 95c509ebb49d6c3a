"""Perturbation-based attribution: occlusion (Zeiler & Fergus 2014, §4.2).

The family replaces regions of the input by a baseline and measures the drop of the class score:
``a(p) = 1/|P_p| sum_{m in P_p} ( f_t(x) - f_t(x with m replaced) )`` over the masks ``P_p`` covering pixel
``p`` (Captum's ``Occlusion`` convention: the drop of each window is spread over its pixels and averaged
over the windows that cover a pixel; pixels no window covers get 0). The variants differ in the masks only
(:meth:`PerturbationAttribution._masks`, the family's abstract method). The perturbed copies go through the
network ``batch_size`` at a time under ``torch.no_grad``.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from lavise_core.explain.attribution.base import Attribution, AttributionError, Target
from lavise_core.models.networks import LoadedModel

__all__ = ["Occlusion", "PerturbationAttribution"]


class PerturbationAttribution(Attribution):
    """Perturbation family: one abstract method, ``_masks(H, W) -> (P, H, W)`` bool (True = replaced).

    Args:
        baseline: the replacement value in normalised space (0 = the data set's mean colour).
    """

    def __init__(self, model: nn.Module | LoadedModel, baseline: float = 0.0, batch_size: int = 64) -> None:
        super().__init__(model, batch_size)
        self.baseline = float(baseline)

    @abc.abstractmethod
    def _masks(self, height: int, width: int) -> torch.Tensor:
        """The ``P`` regions to replace, ``(P, H, W)`` bool."""

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        masks = self._masks(h, w).to(x.device)
        if masks.dim() != 3 or masks.shape[0] == 0:
            raise AttributionError(f"no perturbation fits a {h}×{w} image")
        count = masks.sum(0).to(x.dtype)
        out = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            logits = self.model(x)
            self._check_classes(logits, target)
            base = logits.gather(1, target[:, None]).squeeze(1)
            for i in range(b):
                xi, ti = x[i], target[i]
                for s in range(0, masks.shape[0], self.batch_size):
                    m = masks[s : s + self.batch_size]
                    batch = torch.where(m[:, None], torch.full_like(xi, self.baseline), xi)
                    drop = base[i] - self.model(batch)[:, ti]
                    out[i] += (drop[:, None, None] * m).sum(0)
        out = torch.where(count > 0, out / count.clamp_min(1), torch.zeros_like(out))
        return out.unsqueeze(1).expand(-1, x.shape[1], -1, -1).contiguous()

    def pixel_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        return self.attribute(x, target)[:, 0].clamp_min(0)

    def signed_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """The mean score drop ``(B, H, W)``: > 0 where hiding the pixel lowers the score, < 0 where it raises it."""
        return self.attribute(x, target)[:, 0]


class Occlusion(PerturbationAttribution):
    """A square of ``window`` pixels slid with ``stride`` over the image, all channels at once.

    Args:
        window: side of the occluded square; default ``max(2, min(H, W) // 8)``.
        stride: step between windows; default ``window // 2`` (each pixel under up to 4 windows). Windows
            start at ``0, s, 2s, ...`` until the border is covered; the last one is cropped at the border.
    """

    name, label = "occlusion", "Occlusion"

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        window: int | None = None,
        stride: int | None = None,
        baseline: float = 0.0,
        batch_size: int = 64,
    ) -> None:
        super().__init__(model, baseline, batch_size)
        if (window is not None and window < 1) or (stride is not None and stride < 1):
            raise AttributionError("occlusion window and stride must be >= 1 pixel")
        self.window, self.stride = window, stride

    def geometry(self, height: int, width: int) -> tuple[int, int]:
        """``(window, stride)`` used for an ``height × width`` image."""
        window = self.window or max(2, min(height, width) // 8)
        if window > min(height, width):
            raise AttributionError(f"occlusion window {window} is larger than the {height}×{width} image")
        return window, self.stride or max(1, window // 2)

    def _masks(self, height: int, width: int) -> torch.Tensor:
        k, s = self.geometry(height, width)
        # ceil((H - k) / s) + 1 positions per axis; the last window is cropped at the border (as Captum)
        ys = range(0, -(-(height - k) // s) * s + 1, s)
        xs = range(0, -(-(width - k) // s) * s + 1, s)
        masks = torch.zeros(len(ys) * len(xs), height, width, dtype=torch.bool)
        for n, (y, x) in enumerate((y, x) for y in ys for x in xs):
            masks[n, y : y + k, x : x + k] = True
        return masks
