"""Colour maps, overlays and mosaics: exact values on hand-built inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lavise_core.views.overlays import (
    COLORMAPS,
    colorize,
    lut_colormap,
    minmax,
    mosaic,
    overlay,
    relative_to,
    upsample,
)


def test_lut_colormap_endpoints_and_midpoint():
    cmap = lut_colormap([(0.0, (0, 0, 0)), (1.0, (255, 255, 255))], n=256)
    out = cmap(np.array([[0.0, 1.0, np.nan]]))
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert (
        out[0, 0].tolist() == [0, 0, 0]
        and out[0, 1].tolist() == [255, 255, 255]
        and out[0, 2].tolist() == [0, 0, 0]
    )
    with pytest.raises(ValueError):
        lut_colormap([(0.1, (0, 0, 0)), (1.0, (1, 1, 1))])


def test_normalisers():
    assert minmax(np.array([[1.0, 3.0]])).tolist() == [[0.0, 1.0]]
    assert minmax(np.ones((2, 2))).sum() == 0
    assert relative_to(4.0)(np.array([-1.0, 2.0, 8.0])).tolist() == [0.0, 0.5, 1.0]


def test_upsample_and_overlay_blend():
    assert upsample(np.ones((2, 2)), (8, 6)).shape == (6, 8)
    img = Image.new("RGB", (8, 8), (100, 100, 100))
    heat = np.zeros((2, 2), np.float32)
    same = overlay(img, heat, alpha=0.0)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    full = overlay(
        img,
        np.ones((2, 2)),
        alpha=1.0,
        normalize=None,
        cmap=lut_colormap([(0.0, (0, 0, 0)), (1.0, (255, 0, 0))]),
    )
    assert np.asarray(full)[0, 0].tolist() == [255, 0, 0]
    masked = overlay(img, heat, alpha=1.0, normalize=None, mask_below=0.5)
    assert np.array_equal(np.asarray(masked), np.asarray(img))  # below the mask: untouched
    with pytest.raises(ValueError):
        overlay(img, heat, alpha=2.0)


def test_colorize_named_and_mosaic_size():
    assert colorize(np.zeros((3, 4)), "viridis").shape == (3, 4, 3)
    assert set(COLORMAPS) >= {"inferno", "viridis", "jet"}
    m = mosaic([Image.new("RGB", (5, 5))] * 3, cols=2, tile=10, pad=1)
    assert m.size == (2 * 10 + 3, 2 * 10 + 3)


def test_encode_jpeg_round_trip_and_bad_quality():
    import io

    from lavise_core.views.overlays import encode_jpeg

    data = encode_jpeg(Image.new("RGBA", (6, 4), (255, 0, 0, 128)))
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (6, 4) and img.mode == "RGB"
    assert abs(img.getpixel((2, 2))[0] - 255) <= 3  # alpha dropped, colour kept
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(img, quality=0)
