"""Where one filter fires on an image (lavise_core.views.explain.filter_map): hand-built maps, exact numbers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lavise_core import views


def _ws(top_peak: float = 4.0, pooled=None, valid=None, labels=("red wing", "")):
    arrays = {
        "probe/top_maps": np.stack([np.full((1, 2, 2), 0, np.float32), np.full((1, 2, 2), 0, np.float32)]),
        "probe/pooled": pooled,
        "probe/valid": valid,
    }
    arrays["probe/top_maps"][0, 0, 1, 1] = top_peak
    return SimpleNamespace(
        channels=2,
        array=lambda name: arrays.get(name),
        shown_labels=lambda: SimpleNamespace(labels=list(labels)),
    )


def _analysis():
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 0, 0] = 2.0  # filter 0 fires in the top-left quarter at half its probe peak
    return SimpleNamespace(image=Image.new("RGB", (8, 8), (0, 0, 0)), maps=maps)


def test_filter_map_numbers_and_words():
    pooled = np.asarray([[0.1, 0], [0.2, 0], [0.9, 0], [5.0, 0]], np.float32)
    valid = np.asarray([True, True, True, False])
    fm = views.filter_map(_ws(pooled=pooled, valid=valid), _analysis(), 0)
    assert (fm.filter, fm.label, fm.peak, fm.reference, fm.mean) == (0, "red wing", 2.0, 4.0, 0.5)
    assert fm.percentile == pytest.approx(2 / 3)  # 0.1 and 0.2 < 0.5 among the three valid images
    assert "Filter #0 (“red wing”) fires strongly here: its peak is 50% of its peak" in fm.caption
    assert "higher than on 67% of the probe images" in fm.caption
    everyone = np.asarray([[0.1, 0], [0.2, 0]], np.float32)
    assert (
        "higher than on every probe image" in views.filter_map(_ws(pooled=everyone), _analysis(), 0).caption
    )
    px = np.asarray(fm.overlay)
    assert px.shape == (8, 8, 3)
    assert px[0, 0].sum() > 0 and px[7, 7].sum() == 0  # coloured where it fires only (black image)


def test_filter_map_weak_and_silent_filters():
    fm = views.filter_map(_ws(top_peak=20.0), _analysis(), 0)
    assert fm.percentile is None and "fires barely here: its peak is 10%" in fm.caption  # 2 / 20 < 15 %
    assert "fires weakly here: its peak is 25%" in views.filter_map(_ws(top_peak=8.0), _analysis(), 0).caption
    fm1 = views.filter_map(_ws(), _analysis(), 1)
    assert fm1.label == "" and "(no label) does not fire anywhere" in fm1.caption
    assert np.asarray(fm1.overlay).sum() == 0


def test_filter_map_rejects_a_bad_filter():
    with pytest.raises(ValueError, match=r"there is no filter 2: this layer has filters 0\.\.1"):
        views.filter_map(_ws(), _analysis(), 2)


def test_filter_choices_put_the_contributors_first():
    ws = SimpleNamespace(channels=5)
    ex = SimpleNamespace(contributions=[(3, 0.5, "a"), (1, 0.2, "b")])
    assert views.filter_choices(ws, ex) == [3, 1, 0, 2, 4]
