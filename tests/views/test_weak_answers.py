"""Weak concept answers look weak (issue 25): their images are smaller and faded; exact values."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lavise_core.views.concepts import WEAK_FADE, WEAK_SCALE, concept_view
from lavise_core.views.overlays import mute
from lavise_core.views.workspace import LRUCache


def test_mute_fades_towards_light_grey():
    img = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0], [255, 255, 255]]], np.uint8))
    assert np.asarray(mute(img, 0.0)).tolist() == np.asarray(img).tolist()
    # red: grey 76.245 -> pale 165.6225; 0.4 * (255, 0, 0) + 0.6 * 165.6225 = (201.37, 99.37, 99.37)
    assert np.asarray(mute(img, 0.6)).tolist() == [
        [[201, 99, 99], [76, 76, 76], [255, 255, 255]]
    ]  # black: 0.6 * 127.5 = 76.5, to even
    assert np.asarray(mute(img, 1.0))[0, 1].tolist() == [128, 128, 128]  # black -> mid grey (127.5)
    with pytest.raises(ValueError):
        mute(img, 1.5)


class _Ws:
    """A workspace stand-in answering every query with filter 0 and images 0 and 1."""

    def __init__(self, weak: bool):
        self.weak, self.queries, self.sides = weak, LRUCache(8), []
        recs = [SimpleNamespace(label=0), SimpleNamespace(label=-1)]
        self.ds = SimpleNamespace(records=recs, classes=["red bird"])

    def query(self, text, n, n_images):
        return SimpleNamespace(
            text=text, filters=np.array([0]), scores=np.array([0.4]), label_scores=np.array([0.2]),
            images=np.array([0, 1]), image_scores=np.array([1.0, 0.5]), weights=np.array([1.0]),
            suggestions=[], status="seen", confident=True, message="m", weak=self.weak, method="evidence",
        )  # fmt: skip

    def shown_labels(self):
        return SimpleNamespace(labels=["red breast"])

    def dataset(self):
        return self.ds

    def record_maps(self, idx):
        return {i: np.ones((1, 2, 2), np.float32) for i in idx}

    def record_image(self, i, side=192):
        self.sides.append(side)
        return Image.new("RGB", (side, side), (200, 0, 0))


@pytest.mark.parametrize("weak", [False, True])
def test_weak_answer_images_are_small_and_faded(weak):
    ws = _Ws(weak)
    res = concept_view(ws, "red", side=90)
    width = round(90 * WEAK_SCALE) if weak else 90
    assert (res.weak, res.image_width, ws.sides) == (weak, width, [width, width])
    assert [(i, s, c) for _, i, s, c in res.images] == [(0, 1.0, "red bird"), (1, 0.5, "")]
    pic = Image.open(io.BytesIO(res.images[0][0]))
    assert pic.size == (width, width)
    centre = np.asarray(pic.convert("RGB"), np.float32)[width // 2, width // 2]
    want = np.asarray(mute(Image.new("RGB", (1, 1), (200, 0, 0)), WEAK_FADE if weak else 0.0), np.float32)[
        0, 0
    ]
    assert np.abs(centre - want).max() <= 6  # JPEG; unfaded red (200, 0, 0) vs faded (~148, 68, 68)
    assert concept_view(ws, " RED ", side=90) is res  # cached per normalised text
