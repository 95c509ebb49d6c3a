"""Faithfulness of one attribution map (Petsiuk et al. 2018, RISE §4.1): the pixel order and the curve summary.

A map orders the pixels, most important first (:func:`pixel_ranks`; ties, such as Grad-CAM's zeros, broken by a
seeded random shuffle; the ``attribution`` evaluation uses the same functions); deleting or revealing pixels in that order gives a
curve of the class probability over the fraction of pixels taken, summarised by its trapezoid mean
(:func:`curve_auc`). The curves themselves come from :func:`lavise_core.evaluate.attribution.deletion_insertion`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["curve_auc", "pixel_ranks", "random_ranks"]


def pixel_ranks(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(B, H*W)`` int64 rank of each pixel of ``maps (B, H, W)``: 0 = the largest value (taken first).

    Equal values are ordered by a random permutation drawn from ``generator`` (one per map), so a flat map
    gives a random order rather than the raster order.
    """
    if maps.dim() < 2:
        raise ValueError(f"expected maps (B, H, W), got shape {tuple(maps.shape)}")
    flat = maps.detach().float().cpu().reshape(maps.shape[0], -1)
    perm = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(flat.shape[0])])
    shuffled = flat.gather(1, perm)
    order = perm.gather(1, torch.argsort(shuffled, dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return ranks


def random_ranks(batch: int, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, pixels)``: a uniformly random pixel order per image (the baseline of a map's order)."""
    return torch.stack([torch.randperm(pixels, generator=generator) for _ in range(batch)])


def curve_auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid mean of ``(B, S+1)`` curves sampled at ``0, 1/S, ..., 1`` -> ``(B,)``."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"expected curves (B, S+1) with S >= 1, got shape {c.shape}")
    return (c[:, 1:] + c[:, :-1]).mean(1) / 2
