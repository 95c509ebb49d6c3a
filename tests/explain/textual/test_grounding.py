"""Part-supervised grounding weights: targets, the fit, the stage on a real (tiny) bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lavise_core.explain.textual.grounding import (
    STAGE,
    _pair_slots,
    cell_targets,
    fit_grounding_weights,
    pointing_score,
)
from tests.conftest import build_stage, wrap


def test_cell_targets_from_masks_and_keypoints():
    lab = np.zeros((4, 4), np.uint8)
    lab[:2, :2] = 1  # crown: the top-left cell of a 2 × 2 map
    regions_of = {0: ["crown"], 1: ["tail"], 2: ["crown", "tail"], 3: ["leg"], 4: []}
    t = cell_targets(regions_of, [0, 1, 2, 3, 4], (2, 2), (0, 0, 4, 4), lab, {"crown": 1, "tail": 2},
                     {"tail": [3.5, 0.5], "leg": [9.0, 1.0]})  # fmt: skip
    np.testing.assert_allclose(t[0], [1, 0, 0, 0])  # the mask
    np.testing.assert_allclose(t[1], [0, 1, 0, 0])  # no tail in the mask: its keypoint's cell
    np.testing.assert_allclose(t[2], [0.5, 0.5, 0, 0])  # two parts, normalised
    assert set(t) == {0, 1, 2}  # the leg's keypoint lies outside the crop; column 4 names no part
    # a crop box: the network sees x in [2, 4) only, so the crown mask covers none of it
    t = cell_targets(regions_of, [0, 1], (2, 2), (2, 0, 4, 2), lab, {"crown": 1}, {"tail": [3.5, 0.5]})
    assert 0 not in t
    np.testing.assert_allclose(t[1], [0, 1, 0, 0])


def test_fit_finds_the_filter_that_marks_the_part():
    rng = np.random.default_rng(0)
    n, hw, c = 60, 9, 4
    part = rng.integers(0, hw, n)
    x = rng.random((n, hw, c)).astype(np.float32) * 0.5
    x[np.arange(n), part, 2] += 1.0  # filter 2 fires where the part is
    q = np.zeros((n, hw), np.float32)
    q[np.arange(n), part] = 1.0
    xt = torch.from_numpy(x)
    path = fit_grounding_weights(xt, np.arange(n), np.full(n, 1), q, 3, lambdas=(1e-1, 1e-3))
    assert len(path) == 2 and path[0].shape == (c, 3)
    w = path[-1]
    assert np.all(w[:, [0, 2]] == 0)  # columns without pairs stay 0
    assert w[2, 1] == w[:, 1].max() and w[2, 1] > 0
    assert pointing_score(xt, w, np.arange(n), np.full(n, 1), q) == 1.0
    # the stronger penalty shrinks the weights
    assert np.abs(path[0]).sum() < np.abs(path[1]).sum()
    assert np.isnan(pointing_score(xt, w, np.zeros(0), np.zeros(0), np.zeros((0, hw))))


def test_pair_slots_give_each_pair_its_own_logits_and_gradient():
    """The fit computes each image against only its own pairs' columns; the logits and the gradient equal the
    dense 'every image × every column, then pick the pairs' form (to float rounding of the reduction order)."""
    rng = np.random.default_rng(1)
    n, hw, c, t = 7, 5, 6, 4
    x = torch.from_numpy(rng.random((n, hw, c)).astype(np.float32))
    img = np.array([0, 0, 0, 2, 2, 5, 6, 6, 6, 6])  # images 1, 3, 4 have no pair; image 6 has four
    col = np.array([1, 3, 0, 3, 3, 2, 0, 1, 2, 3])  # image 2 twice with column 3 (two targets)
    slot, cols = _pair_slots(img, col, n)
    assert slot.tolist() == [1, 2, 0, 0, 1, 0, 0, 1, 2, 3]  # by column within each image
    assert cols.shape == (n, 4) and cols[6].tolist() == [0, 1, 2, 3] and cols[0, :3].tolist() == [0, 1, 3]
    w = torch.from_numpy(rng.standard_normal((c, t)).astype(np.float32)).requires_grad_(True)
    i, j = torch.as_tensor(img), torch.as_tensor(col)
    dense = torch.einsum("nhc,ct->nht", x, w)[i, :, j]
    paired = torch.bmm(x, torch.nn.functional.embedding(cols, w.T).transpose(1, 2))[i, :, slot]
    torch.testing.assert_close(paired, dense, rtol=1e-6, atol=1e-6)
    g_dense = torch.autograd.grad(dense.square().sum(), w)[0]
    g_paired = torch.autograd.grad(paired.square().sum(), w)[0]
    torch.testing.assert_close(g_paired, g_dense, rtol=1e-5, atol=1e-5)


class _Tiny(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, k)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_stage_on_a_tiny_bundle(tmp_path):
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.explain.textual.explainer import TextualError, TextualExplainer
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    ds = generate_synthbirds(tmp_path / "birds", n=40, seed=0, image_size=64, progress=False)
    lm = wrap(_Tiny(len(ds.classes)), size=64, classes=ds.classes)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=4, batch_size=16, num_workers=0, progress=False))
    build_stage(bundle, ds, "textual", lm, source="labels")
    info = build_stage(bundle, ds, "textual_grounding", lm)
    assert info["targets"] == "part masks" and info["images"] == len(ds.indices("train"))
    assert set(info["held_out_pointing"]) == {"0.1", "0.01", "0.001", "0.0001"}
    ex = TextualExplainer.from_bundle(bundle)
    learned = np.asarray(ex.part_learned)
    vocab = ex.vocabulary
    assert learned[vocab.index("red crown")] if "red crown" in vocab else learned.any()
    assert info["attributes"] == int(learned.sum()) and ex.part_weights.shape == (8, len(vocab))
    assert np.all(ex.part_weights[:, ~learned] == 0)
    j = int(np.flatnonzero(learned)[0])
    np.testing.assert_array_equal(ex.grounding_weights([j], "auto")[:, 0], ex.part_weights[:, j])
    np.testing.assert_array_equal(ex.grounding_weights([j], "learned"), ex.grounding_weights([j], "auto"))
    assert not np.array_equal(ex.grounding_weights([j], "specific"), ex.grounding_weights([j], "auto"))
    assert build_stage(bundle, ds, "textual_grounding", lm) == info  # finished: skipped
    unlearned = np.flatnonzero(~learned)
    if unlearned.size:
        with pytest.raises(TextualError, match="textual_grounding"):
            ex.grounding_weights([int(unlearned[0])], "learned")
    assert bundle.stage_done(STAGE)


def test_stage_without_parts_is_skipped(tmp_path):
    import json

    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.explain.textual.explainer import TextualExplainer
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    root = tmp_path / "birds"
    generate_synthbirds(root, n=16, seed=0, image_size=32, progress=False)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    rows = [json.loads(line) | {"mask": None, "keypoints": {}} for line in lines]  # no part locations
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ProbeDataset.open(root)
    lm = wrap(_Tiny(len(ds.classes)), size=32, classes=ds.classes)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=2, num_workers=0, progress=False))
    build_stage(bundle, ds, "textual", lm, source="labels", min_images=1)
    info = build_stage(bundle, ds, "textual_grounding", lm)
    assert "fewer than 10" in info["skipped"]
    assert TextualExplainer.from_bundle(bundle).part_learned is None  # grounding falls back to "specific"


def test_fit_on_the_probe_maps_equals_a_pass_over_the_images(tmp_path):
    """The stage fits on the probe pass's stored maps (no second pass over the images): the same weights, to the
    bit, as decoding the images and running the network again; an unreadable image is skipped either way."""
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.explain.textual.grounding import fit_part_grounding, grounding_images
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe, stored_maps

    ds = generate_synthbirds(tmp_path / "birds", n=40, seed=1, image_size=64, progress=False)
    (ds.image_path(3)).write_bytes(b"not an image")  # a train image the probe cannot read
    lm = wrap(_Tiny(len(ds.classes)), size=64, classes=ds.classes)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=4, batch_size=16, num_workers=0, progress=False))
    build_stage(bundle, ds, "textual", lm, source="labels")
    vocab = list(bundle.read_json("textual/vocabulary"))
    attr = np.asarray(bundle.array("textual/attribute_matrix")) > 0
    idx, why = grounding_images(bundle, ds, vocab, attr, 2000)
    assert why is None and 3 not in idx  # the stage leaves it out; fit_part_grounding skips it when given
    idx = sorted([*idx, 3])
    stored = stored_maps(bundle, len(ds))
    assert stored is not None and not stored[1][3]
    args = (lm, ds, bundle.layer, vocab, attr, idx)
    a = fit_part_grounding(*args, stored_maps=stored)
    b = fit_part_grounding(*args)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.info == b.info
