import dataclasses

import numpy as np
import pytest
import torch
from conftest import COLOURS, IdentityCNN, wrap

from lavise_core.data.dataset import ProbeDataset
from lavise_core.pipeline.bundle import Bundle, BundleError
from lavise_core.pipeline.probe import (
    ProbeSettings,
    StreamingHistogram,
    TopKMaps,
    open_or_create_bundle,
    run_probe,
)

SETTINGS = ProbeSettings(top_k=3, batch_size=2, num_workers=0, progress=False, histogram_bins=256)


def _probe(tmp_path, lm, ds, settings=SETTINGS):
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    return run_probe(bundle, lm, ds, settings)


def test_probe_exact_values(tmp_path, identity_model, colour_dataset):
    b = _probe(tmp_path, identity_model, colour_dataset)
    expected = np.array([*COLOURS, (0, 0, 0)], dtype=np.float32) / 255.0
    np.testing.assert_allclose(b.array("probe/pooled"), expected, atol=1e-6)
    np.testing.assert_allclose(b.array("probe/logits"), expected, atol=1e-6)
    assert b.array("probe/valid").tolist() == [True] * 6 + [False]
    # top-3 images per filter, descending by pooled value
    order = np.argsort(-expected[:6], axis=0, kind="stable")[:3].T
    assert b.array("probe/top_index").tolist() == order.tolist()
    np.testing.assert_allclose(
        b.array("probe/top_value"), np.take_along_axis(expected[:6].T, order, 1), atol=1e-6
    )
    maps = b.array("probe/top_maps")
    assert maps.shape == (3, 3, 16, 16) and maps.dtype == np.float16
    np.testing.assert_allclose(maps[0, 0], np.full((16, 16), 1.0), atol=1e-3)
    failures = b.read_json("probe/failures")
    assert list(failures) == ["images/broken.png"]
    assert "not an image" in failures["images/broken.png"]
    info = b.manifest["stages"]["probe"]
    assert (info["images"], info["valid"], info["skipped"]) == (7, 6, 1)
    assert info["accuracy"] == 1.0  # each colour is labelled by its largest channel
    assert b.manifest["channels"] == 3 and b.manifest["map_size"] == [16, 16]


def test_probe_threshold_is_top_half_percent(tmp_path, identity_model, colour_dataset):
    b = _probe(tmp_path, identity_model, colour_dataset)
    levels = b.array("probe/quantile_levels").tolist()
    q = b.array("probe/quantiles")
    # red channel values over 6 images × 256 pixels: 255,0,0,200,10,128 (/255), each 256 times
    red = np.repeat(np.array([255, 0, 0, 200, 10, 128]) / 255.0, 256)
    for j, lvl in enumerate(levels):
        _assert_is_quantile(red, q[0, j], lvl, width=1.0 / 256 * 1.001)
    np.testing.assert_array_equal(b.array("probe/threshold"), q[:, levels.index(pytest.approx(0.995))])


def test_probe_skips_when_done_and_is_read_only(tmp_path, identity_model, colour_dataset):
    b = _probe(tmp_path, identity_model, colour_dataset)
    stamp = b.manifest["stages"]["probe"]["finished"]
    b2 = _probe(tmp_path, identity_model, colour_dataset)
    assert b2.manifest["stages"]["probe"]["finished"] == stamp
    ro = Bundle.open(b.root)
    with pytest.raises(ValueError, match="read-only"):
        ro.write_array("x", np.zeros(1))
    assert not ro.array("probe/pooled").flags.writeable


def test_probe_resumes_after_interrupt(tmp_path, colour_dataset):
    settings = ProbeSettings(
        top_k=3, batch_size=2, num_workers=0, progress=False, checkpoint_every=1, histogram_bins=256
    )
    failing = wrap(IdentityCNN(fail_after=3))  # 1 shape probe + 2 batches, then fails
    bundle = open_or_create_bundle(tmp_path / "b", failing, colour_dataset)
    with pytest.raises(RuntimeError, match="simulated"):
        run_probe(bundle, failing, colour_dataset, settings)
    assert (bundle.root / "probe/_partial/state.npz").is_file()
    assert not bundle.stage_done("probe")
    failing.model.fail_after = None
    failing.model.calls = 0
    run_probe(bundle, failing, colour_dataset, settings)
    # only the remaining images were processed: 1 shape probe + 2 batches (images 4..6)
    assert failing.model.calls == 3
    clean = _probe(tmp_path / "clean", wrap(IdentityCNN()), colour_dataset, settings)
    for name in ("pooled", "logits", "valid", "top_index", "top_value", "top_maps", "quantiles"):
        np.testing.assert_array_equal(
            bundle.array(f"probe/{name}"), clean.array(f"probe/{name}"), err_msg=name
        )
    assert not (bundle.root / "probe/_partial").exists()


def test_probe_resumes_from_a_checkpoint_before_any_readable_image(tmp_path, colour_dataset):
    """The first batch has no readable image, so the histogram has no origin yet when the pass checkpoints and
    stops: the checkpoint leaves the histogram out, and the resumed pass equals a clean one."""
    import shutil

    root = tmp_path / "first-broken"
    shutil.copytree(colour_dataset.root, root)
    for i in (0, 1):
        (root / f"images/{i}.png").write_bytes(b"not an image")
    ds = ProbeDataset.open(root)
    settings = ProbeSettings(
        top_k=3, batch_size=2, num_workers=0, progress=False, checkpoint_every=1, histogram_bins=256
    )
    failing = wrap(IdentityCNN(fail_after=2))  # 1 shape probe + the unreadable batch, then fails
    bundle = open_or_create_bundle(tmp_path / "b", failing, ds)
    with pytest.raises(RuntimeError, match="simulated"):
        run_probe(bundle, failing, ds, settings)
    state = np.load(bundle.root / "probe/_partial/state.npz")
    assert int(state["done"]) == 2 and "hist_lo" not in state
    failing.model.fail_after = None
    run_probe(bundle, failing, ds, settings)
    clean = _probe(tmp_path / "clean", wrap(IdentityCNN()), ds, settings)
    for name in ("pooled", "valid", "top_index", "top_value", "quantiles"):
        np.testing.assert_array_equal(
            bundle.array(f"probe/{name}"), clean.array(f"probe/{name}"), err_msg=name
        )


def test_bundle_key_changes_with_inputs(tmp_path, identity_model, colour_dataset):
    a = open_or_create_bundle(tmp_path, identity_model, colour_dataset)
    other = wrap(IdentityCNN())
    with torch.no_grad():
        other.model.classifier.bias.fill_(0.5)
    b = open_or_create_bundle(tmp_path, wrap(other.model), colour_dataset)
    assert a.key != b.key
    c = open_or_create_bundle(tmp_path, identity_model, colour_dataset, layer="features.0")
    assert c.key != a.key


def test_stale_weights_detected(tmp_path, identity_model, colour_dataset):
    b = _probe(tmp_path, identity_model, colour_dataset)
    changed = IdentityCNN()
    with torch.no_grad():
        changed.classifier.bias.fill_(0.1)
    with pytest.raises(BundleError, match="weights of identity changed"):
        Bundle.open(b.root).verify_model(wrap(changed))


def test_all_images_unreadable(tmp_path, identity_model, colour_dataset):
    for r in colour_dataset.records:
        (colour_dataset.root / r.path).write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 7 images"):
        _probe(tmp_path, identity_model, colour_dataset)


def test_streaming_histogram_matches_numpy_quantiles():
    rng = np.random.default_rng(0)
    h = StreamingHistogram(2, bins=1024)
    chunks = [rng.normal(size=(2, 500)) * s for s in (1, 3, 10)]  # range grows: bins must double
    for c in chunks:
        h.update(torch.from_numpy(c).float())
    allv = np.concatenate(chunks, axis=1)
    q = h.quantiles([0.5, 0.9, 0.995])
    width = h.width.numpy()
    for k in range(2):
        for j, lvl in enumerate([0.5, 0.9, 0.995]):
            _assert_is_quantile(allv[k], q[k, j], lvl, width[k])
    assert h.counts.sum().item() == 3000


def _assert_is_quantile(values: np.ndarray, q: float, level: float, width: float) -> None:
    """``q`` is a ``level`` quantile of ``values`` up to one histogram bin: F(q + w) >= level >= F(q - w)."""
    n = len(values)
    assert (values <= q + width).sum() / n >= level - 1e-9, (q, level)
    assert (values < q - width).sum() / n <= level + 1e-9, (q, level)


def test_topk_merge_keeps_largest_with_maps():
    t = TopKMaps(channels=1, k=2, map_size=(1, 1))
    t.update(torch.tensor([[1.0], [5.0]]), torch.tensor([1.0, 5.0]).view(2, 1, 1, 1), torch.tensor([0, 1]))
    t.update(torch.tensor([[3.0], [-1.0]]), torch.tensor([3.0, -1.0]).view(2, 1, 1, 1), torch.tensor([2, 3]))
    assert t.index.tolist() == [[1, 2]] and t.values.tolist() == [[5.0, 3.0]]
    assert t.maps.flatten().tolist() == [5.0, 3.0]


def test_progress_callback_and_file_permissions(tmp_path, identity_model, colour_dataset):
    seen = []
    bundle = open_or_create_bundle(tmp_path / "b", identity_model, colour_dataset)
    run_probe(bundle, identity_model, colour_dataset, SETTINGS, on_progress=lambda d, n: seen.append((d, n)))
    assert seen == [(2, 7), (4, 7), (6, 7), (7, 7)]
    mode = (bundle.root / "probe" / "pooled.npy").stat().st_mode & 0o777
    assert mode & 0o044 == 0o044  # readable by others, like any file the user writes


def test_probe_keeps_every_image_maps(tmp_path, identity_model, colour_dataset):
    """probe/maps (N, C, h, w) float32: the identity CNN's map of a solid image is its colour / 255 everywhere; the
    unreadable image's row is 0; over ``maps_mib`` the array is not written. stored_maps hands them to the
    stages with the valid rows, and refuses float16 maps (older bundles) and a pass run on a GPU."""
    from lavise_core.pipeline.probe import stored_maps

    b = _probe(tmp_path, identity_model, colour_dataset)
    maps = b.array("probe/maps")
    assert maps.shape == (7, 3, 16, 16) and maps.dtype == np.float32
    want = np.array([*COLOURS, (0, 0, 0)], np.float32) / 255.0
    np.testing.assert_array_equal(maps, np.broadcast_to(want[:, :, None, None], maps.shape))
    top = b.array("probe/top_index")
    np.testing.assert_array_equal(
        b.array("probe/top_maps"), maps[top, np.arange(3)[:, None]].astype(np.float16)
    )
    got, valid = stored_maps(b, 7)
    assert got is not None and valid.tolist() == [True] * 6 + [False]
    assert stored_maps(b, 8) is None  # another data set's size
    b.manifest["stages"]["probe"]["device"] = "cuda"
    assert stored_maps(b, 7) is None  # mixed precision on a GPU: not the stages' float32 numbers
    b.manifest["stages"]["probe"]["device"] = "cpu"
    b.write_array("probe/maps", np.asarray(maps, np.float16))
    assert stored_maps(b, 7) is None
    assert not (b.root / "probe/_partial").exists()
    small = dataclasses.replace(SETTINGS, maps_mib=0)
    assert not _probe(tmp_path / "off", identity_model, colour_dataset, small).has("probe/maps")


@pytest.mark.parametrize("first_kept", [True, False])
def test_probe_maps_after_a_resume(tmp_path, colour_dataset, first_kept):
    """A resumed pass keeps the maps when the interrupted one kept them (equal to a clean pass), and leaves them
    out when it did not (its first rows were never kept)."""
    settings = dataclasses.replace(SETTINGS, checkpoint_every=1, maps_mib=256 if first_kept else 0)
    failing = wrap(IdentityCNN(fail_after=3))
    bundle = open_or_create_bundle(tmp_path / "b", failing, colour_dataset)
    with pytest.raises(RuntimeError, match="simulated"):
        run_probe(bundle, failing, colour_dataset, settings)
    failing.model.fail_after = None
    run_probe(bundle, failing, colour_dataset, dataclasses.replace(settings, maps_mib=256))
    assert bundle.has("probe/maps") == first_kept
    if first_kept:
        clean = _probe(tmp_path / "clean", wrap(IdentityCNN()), colour_dataset, settings)
        np.testing.assert_array_equal(bundle.array("probe/maps"), clean.array("probe/maps"))


def test_probe_keeps_layer_statistics(tmp_path, identity_model, colour_dataset):
    """probe/stats/<layer> (N, 3, C): the identity CNN's conv output on a solid 16×16 image is its colour / 255
    everywhere, so per channel mean = c / 255, std = 0 and sum of squares = 256 (c / 255)²; the unreadable
    image's row is 0. stored_stats hands them out only for layers the pass kept, from a CPU pass."""
    from lavise_core.pipeline.probe import stored_stats

    settings = dataclasses.replace(SETTINGS, stats_layers=("features.0",))
    b = _probe(tmp_path, identity_model, colour_dataset, settings)
    st = b.array("probe/stats/features.0")
    assert st.shape == (7, 3, 3) and st.dtype == np.float32
    c = np.array([*COLOURS, (0, 0, 0)], np.float32) / 255.0
    np.testing.assert_allclose(st[:, 0], c, rtol=1e-6)
    np.testing.assert_array_equal(st[:, 1], 0.0)
    np.testing.assert_allclose(st[:, 2], 256 * c**2, rtol=1e-5)
    assert b.manifest["stages"]["probe"]["stats_layers"] == ["features.0"]
    got = stored_stats(b, ["features.0"], 7)
    assert got is not None and np.array_equal(got["features.0"], st)
    assert stored_stats(b, ["features.1"], 7) is None  # a layer the pass did not keep
    assert stored_stats(b, ["features.0"], 8) is None  # another data set's size
    b.manifest["stages"]["probe"]["device"] = "cuda"
    assert stored_stats(b, ["features.0"], 7) is None  # mixed precision on a GPU
    plain = _probe(tmp_path / "plain", identity_model, colour_dataset)
    assert not (plain.root / "probe/stats").exists() and stored_stats(plain, ["features.0"], 7) is None


@pytest.mark.parametrize("first_kept", [True, False])
def test_layer_statistics_after_a_resume(tmp_path, colour_dataset, first_kept):
    """A resumed pass keeps the statistics when the interrupted one kept them (equal to a clean pass), and leaves
    them out when it did not (its first rows were never kept)."""
    layers = ("features.0", "features.1")
    settings = dataclasses.replace(SETTINGS, checkpoint_every=1, stats_layers=layers if first_kept else ())
    failing = wrap(IdentityCNN(fail_after=3))
    bundle = open_or_create_bundle(tmp_path / "b", failing, colour_dataset)
    with pytest.raises(RuntimeError, match="simulated"):
        run_probe(bundle, failing, colour_dataset, settings)
    failing.model.fail_after = None
    run_probe(bundle, failing, colour_dataset, dataclasses.replace(settings, stats_layers=layers))
    assert bundle.has("probe/stats/features.1") == first_kept
    assert bundle.manifest["stages"]["probe"].get("stats_layers", []) == (list(layers) if first_kept else [])
    if first_kept:
        clean = _probe(tmp_path / "clean", wrap(IdentityCNN()), colour_dataset, settings)
        for name in layers:
            np.testing.assert_array_equal(
                bundle.array(f"probe/stats/{name}"), clean.array(f"probe/stats/{name}")
            )
