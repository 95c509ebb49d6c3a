"""Where each filter fires: the pixels of its upsampled map above its threshold, found without upsampling
the maps that cannot fire (Network Dissection's ``T_k = {A_k↑ > thr_k}``, METHODS.md §5).

Shared by the dissection counts (:func:`lavise_core.explain.dissection.labels.region_overlap`) and the colour
path (:func:`lavise_core.explain.dissection.colour.part_colour_stats`), which read the same pixels.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["fired_pixels"]


@functools.cache
def _channel_lanes() -> int:
    """How many channels the CPU bilinear kernel computes together (8 with AVX2, 16 with AVX-512), found once
    by trying: those channels round differently from the last ``C mod lanes`` channels of a call, so
    :func:`fired_pixels` groups the maps it upsamples the way one call over every map would. 0: not found."""
    x = torch.randn(1, 64, 5, 5, generator=torch.Generator().manual_seed(0))
    up = functools.partial(
        torch.nn.functional.interpolate, size=(61, 61), mode="bilinear", align_corners=False
    )
    ref = up(x)
    for lanes in (1, 2, 4, 8, 16, 32, 64):
        if torch.equal(up(x[:, :lanes]), ref[:, :lanes]) and torch.equal(
            up(x[:, : 2 * lanes]), ref[:, : 2 * lanes]
        ):
            return lanes
    return 0


def _upsample(maps: torch.Tensor, channels: torch.Tensor, n_channels: int, size: int) -> torch.Tensor:
    """``(n, h, w)`` maps of channels ``channels (n,)`` of a ``(B, n_channels, h, w)`` batch -> ``(n, size, size)``,
    bilinear (``align_corners=False``), equal bit for bit to upsampling the whole batch in one call."""
    lanes = _channel_lanes()
    out = torch.empty(len(maps), size, size)
    interp = functools.partial(
        torch.nn.functional.interpolate, size=(size, size), mode="bilinear", align_corners=False
    )
    vec = channels < (n_channels // lanes) * lanes  # computed `lanes` at a time in a whole-batch call
    if vec.any():
        x = maps[vec]
        pad = -len(x) % lanes
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
        out[vec] = interp(x[None])[0, : int(vec.sum())]
    if (~vec).any():  # the last n_channels mod lanes channels: one at a time
        out[~vec] = interp(maps[~vec][:, None])[:, 0]
    return out


def fired_pixels(
    maps: np.ndarray | torch.Tensor, threshold: np.ndarray, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each filter fires: the pixels of its map, bilinearly upsampled to ``size × size``
    (``align_corners=False``), that exceed its threshold -> index tensors ``(b, c, p)`` (image, filter, pixel
    ``y·size + x``), sorted by ``(b, c, p)``.

    Only maps that can fire are upsampled: a bilinear value is a convex combination of four cells, so a map
    whose largest cell is below the threshold (with a margin for rounding) has no pixel above it. With a
    0.995-quantile threshold that skips most maps; the pixels found are exactly those of upsampling every map.
    """
    m = torch.as_tensor(np.asarray(maps, np.float32)) if not isinstance(maps, torch.Tensor) else maps.float()
    c = m.shape[1]
    thr = torch.tensor(np.asarray(threshold, np.float32)).view(1, c)
    if _channel_lanes():
        top = m.amax((2, 3))
        can = ~(top + 1e-5 * top.abs() + 1e-30 < thr)  # NaN maps count as "can fire", as before
    else:  # an unknown kernel: upsample every map
        can = torch.ones(m.shape[:2], dtype=torch.bool)
    bi, ci = can.nonzero(as_tuple=True)
    if len(bi) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, empty
    up = _upsample(m[bi, ci], ci, c, size)
    j, p = (up.view(len(bi), size * size) > thr[0, ci][:, None]).nonzero(as_tuple=True)
    return bi[j], ci[j], p
