"""Outlines instead of heat overlays (issue 25): exact edges on hand-built masks, colours left as they are."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lavise_core.views.filters import region_level
from lavise_core.views.overlays import outline, region_edges


def test_region_edges_exact():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    inner, outer = region_edges(m)
    ring = m.copy()
    ring[2, 2] = False  # the 3 x 3 square's edge is all of it but its centre
    assert inner.tolist() == ring.tolist()
    want_outer = np.zeros((5, 5), bool)
    want_outer[0, 1:4] = want_outer[4, 1:4] = want_outer[1:4, 0] = want_outer[1:4, 4] = True  # no corners
    assert outer.tolist() == want_outer.tolist()
    full_inner, full_outer = region_edges(np.ones((3, 3), bool))  # the image border closes a region
    assert full_inner.sum() == 8 and not full_inner[1, 1] and not full_outer.any()
    with pytest.raises(ValueError):
        region_edges(np.zeros(4, bool))


def test_outline_changes_only_the_edges():
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 128  # a purple image: the colour must survive inside the region
    rgb[..., 2] = 200
    img = Image.fromarray(rgb)
    heat = np.zeros((6, 6), np.float32)
    heat[1:5, 1:5] = 2.0  # same size as the image: no upsampling
    out = np.asarray(outline(img, heat, 1.0))
    inner, outer = region_edges(heat >= 1.0)
    assert (out[inner] == [255, 255, 255]).all() and (out[outer] == [0, 0, 0]).all()
    untouched = ~(inner | outer)
    assert (out[untouched] == rgb[untouched]).all()
    assert out[2, 2].tolist() == [128, 0, 200] and untouched.sum() == 36 - 12 - 16
    # nothing reaches the level: the image unchanged; a normaliser puts the level in its units
    assert (np.asarray(outline(img, heat, 3.0)) == rgb).all()
    halved = np.asarray(outline(img, heat, 0.5, normalize=lambda a: a / 4.0, color=(1, 2, 3)))
    assert halved[1, 1].tolist() == [1, 2, 3] and halved[0, 1].tolist() == [0, 0, 0]


def test_outline_upsamples_small_maps_to_the_image():
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    heat = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    out = np.asarray(outline(img, heat, 0.5))
    changed = (out != [10, 20, 30]).any(-1)
    assert changed[:4, :4].any() and not changed[5:, 5:].any()


class _Arrays:
    def __init__(self, threshold):
        self.threshold = threshold

    def array(self, name):
        assert name == "probe/threshold"
        return self.threshold


def test_region_level_is_the_dissection_threshold():
    maps = np.array([[[1.0, 6.0]], [[2.0, 3.0]]], np.float32)
    assert region_level(_Arrays(np.array([4.5, 7.25], np.float32)), 1, maps) == 7.25
    assert region_level(_Arrays(None), 0, maps) == 3.0  # no threshold stored: half the largest value
    assert region_level(_Arrays(None), 0, np.zeros((0, 2, 2))) == 0.0
