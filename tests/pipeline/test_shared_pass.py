"""The stages that read the probe pass instead of passing over the images again (issue 27), on the demo bundle
(`make assets` builds it): the upload check's early-layer statistics and Oramas' energies equal, bit for bit, what
each stage's own forward pass over the same images gives."""

from __future__ import annotations

import numpy as np
import pytest

from tests.app.app_bundles import demo_bundle


@pytest.fixture(scope="module")
def demo():
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.models.networks import load_model
    from lavise_core.pipeline.bundle import Bundle

    root = demo_bundle()
    if root is None:
        pytest.skip("the demo bundle is built by `make assets` (make test does it first)")
    bundle = Bundle.open(root)
    return bundle, ProbeDataset.open(bundle.manifest["dataset"]["root"]), load_model("synthbirds")


def test_the_build_kept_the_layers_both_stages_read(demo) -> None:
    from lavise_core.explain import ood, oramas

    bundle, ds, lm = demo
    kept = bundle.manifest["stages"]["probe"]["stats_layers"]
    early, energy = ood.early_layers_for(ds, lm), oramas.energy_layers(lm)
    assert early == ["features.2", "features.5"] and len(energy) == 7
    assert kept == list(dict.fromkeys(early + energy))


def test_upload_check_features_equal_a_pass_of_its_own(demo) -> None:
    from lavise_core.explain.ood import early_layers_for, ood_features, stored_ood_features

    bundle, ds, lm = demo
    layers = early_layers_for(ds, lm)
    rows = [0, 1, 2, 3, 4, 5, 6, 4799]
    kept = stored_ood_features(bundle, layers, rows)
    own = ood_features(lm, (ds.load_image(i) for i in rows), bundle.layer, layers, batch=32)
    assert kept is not None and kept["early"].shape == (8, 2 * (16 + 32))
    for key in ("pooled", "logits", "early"):
        np.testing.assert_array_equal(kept[key], own[key])
    assert list(kept["early_layers"]) == list(own["early_layers"])


def test_oramas_energies_equal_a_pass_of_their_own(demo) -> None:
    from lavise_core.explain.oramas import collect_energies, energy_layers

    bundle, ds, lm = demo
    layers = energy_layers(lm)
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 4799])
    X, pred, valid, sizes = collect_energies(ds, lm, layers, stored=bundle)
    X_own, pred_own, valid_own, sizes_own = collect_energies(ds, lm, layers, indices=rows)
    assert X.shape == (len(ds), sum(sizes)) and sizes == sizes_own and valid.all() and valid_own.all()
    np.testing.assert_array_equal(X[rows], X_own)
    np.testing.assert_array_equal(pred[rows], pred_own)
    np.testing.assert_array_equal(bundle.array("oramas/energy"), X)  # what the stage stored


def test_dissection_counts_equal_a_pass_of_their_own(demo) -> None:
    from lavise_core.explain.dissection.colour import default_palette
    from lavise_core.explain.dissection.labels import split_overlaps
    from lavise_core.pipeline.probe import stored_maps

    bundle, ds, lm = demo
    maps, valid = stored_maps(bundle, len(ds))
    rows = [i for i in range(0, len(ds), 97) if ds.records[i].mask][:40]
    thr = np.asarray(bundle.array("probe/threshold"), np.float32)
    kept_colour, own_colour = ({"palette_lab": default_palette(["red", "blue"])[1]} for _ in range(2))
    kept = split_overlaps(lm, ds, bundle.layer, rows, thr, 16, colour=kept_colour, stored_maps=maps)
    own = split_overlaps(lm, ds, bundle.layer, rows, thr, 16, colour=own_colour)
    assert valid[rows].all() and len(kept[0]) == len(rows) and kept[1].sum() > 0
    for a, b in zip(kept, own, strict=True):
        np.testing.assert_array_equal(a, b)
    for key in ("count", "hist"):
        np.testing.assert_array_equal(kept_colour["stats"][key], own_colour["stats"][key])


def test_lavise_region_features_equal_a_pass_of_their_own(demo) -> None:
    from lavise_core.explain.lavise.head import extract_region_features
    from lavise_core.pipeline.probe import stored_maps

    bundle, ds, lm = demo
    maps, _ = stored_maps(bundle, len(ds))
    kept = extract_region_features(lm, ds, bundle.layer, "train", 16, max_images=24, stored_maps=maps)
    own = extract_region_features(lm, ds, bundle.layer, "train", 16, max_images=24)
    assert len(kept.region) == len(own.region) > 24 and kept.region == own.region
    np.testing.assert_array_equal(kept.features, own.features)
    np.testing.assert_array_equal(kept.background, own.background)
