"""A concept's heatmaps come from the probe pass's stored maps (probe/maps), with no forward pass; a bundle
without them falls back to one (issue 25)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import IdentityCNN, wrap
from PIL import Image

from lavise_core.data.dataset import ImageRecord, write_dataset
from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe
from lavise_core.views.workspace import Workspace

SETTINGS = ProbeSettings(top_k=2, batch_size=2, num_workers=0, progress=False, histogram_bins=256)


@pytest.fixture
def noise(tmp_path):
    """Five 16×16 images of seeded noise: the identity CNN's maps are their pixels / 255."""
    rng = np.random.default_rng(0)
    (tmp_path / "noise" / "images").mkdir(parents=True)
    pixels, records = [], []
    for i in range(5):
        px = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(px).save(tmp_path / "noise" / f"images/{i}.png")
        pixels.append(px)
        records.append(ImageRecord(id=str(i), path=f"images/{i}.png", label=i % 3))
    ds = write_dataset(
        tmp_path / "noise", name="Noise", source="test", classes=["a", "b", "c"], records=records
    )
    return ds, np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # (N, C, h, w)


def _workspace(tmp_path, ds, settings):
    lm = wrap(IdentityCNN())
    bundle = run_probe(open_or_create_bundle(tmp_path / "bundles", lm, ds), lm, ds, settings)
    return Workspace(bundle, model_loader=lambda: lm), lm.model


def test_stored_maps_equal_the_forward_pass_and_need_none(tmp_path, noise):
    ds, want = noise
    ws, model = _workspace(tmp_path, ds, SETTINGS)
    calls = model.calls
    maps = ws.record_maps([3, 0, 4])
    assert model.calls == calls  # read from probe/maps: no forward pass
    assert list(maps) == [3, 0, 4] and all(m.dtype == np.float16 for m in maps.values())
    for i, m in maps.items():
        np.testing.assert_allclose(m.astype(np.float32), want[i], atol=1e-3)  # float16 of the pixels / 255
    ws.stored_maps = lambda: None
    forward = ws.record_maps([3, 0, 4])
    assert model.calls == calls + 1  # one batched pass
    for i in maps:
        np.testing.assert_array_equal(forward[i], maps[i])


def test_a_bundle_without_stored_maps_falls_back_to_one_forward_pass(tmp_path, noise):
    ds, want = noise
    ws, model = _workspace(tmp_path, ds, dataclasses.replace(SETTINGS, maps_mib=0))
    assert ws.stored_maps() is None and not ws.bundle.has("probe/maps")
    calls = model.calls
    maps = ws.record_maps([1, 2])
    assert model.calls == calls + 1
    for i, m in maps.items():
        np.testing.assert_allclose(m.astype(np.float32), want[i], atol=1e-3)
    ws.record_maps([2, 1])
    assert model.calls == calls + 1  # cached
