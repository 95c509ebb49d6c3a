"""fired_pixels finds exactly the pixels of upsampling every map in one call, while skipping the maps that
cannot fire."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavise_core.explain.dissection.firing import fired_pixels


def _reference(maps: torch.Tensor, thr: np.ndarray, size: int) -> tuple[torch.Tensor, ...]:
    up = torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    t = up > torch.tensor(thr).view(1, -1, 1, 1)
    return t.reshape(*maps.shape[:2], size * size).nonzero(as_tuple=True)


@pytest.mark.parametrize("channels", [1, 7, 24, 131])
def test_the_pixels_equal_one_call_over_every_map(channels: int) -> None:
    rng = np.random.default_rng(channels)
    maps = torch.tensor(np.maximum(rng.normal(0, 1, (5, channels, 7, 7)), 0).astype(np.float32))
    maps[1, 0] = float("nan")  # a broken map fires nowhere, as before
    up = torch.nn.functional.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)
    thr = np.nanquantile(up.numpy(), 0.99, axis=(0, 2, 3)).astype(np.float32)
    thr[0] = maps[0, 0].max().item()  # a threshold equal to a cell: the rounding margin decides
    got = fired_pixels(maps, thr, 32)
    want = _reference(maps, thr, 32)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_a_hand_built_map_fires_where_its_upsampled_values_pass() -> None:
    # one 2 x 2 map [[0, 0], [0, 4]] upsampled to 4 x 4: only the bottom-right pixel reaches 4, and
    # threshold 3 keeps it alone; a second filter's map is all zero and is never upsampled.
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0, 1, 1] = 4.0
    b, c, p = fired_pixels(maps, np.array([3.0, 0.5], np.float32), 4)
    assert b.tolist() == [0] and c.tolist() == [0] and p.tolist() == [15]
