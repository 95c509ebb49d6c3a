"""Network Dissection across layers: planted units get their concept, kinds, summary, re-initialised baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lavise_core.data.dataset import ImageRecord, ProbeDataset, write_dataset
from lavise_core.explain.dissection.layers import (
    MIN_SUPPORT,
    concept_kind,
    dissect_layers,
    dissection_layers,
    layer_summary,
    layer_thresholds,
    supported_concepts,
)
from lavise_core.models.networks import load_model
from tests.conftest import build_stage, wrap

RED, YELLOW, GREEN, CYAN, BLUE, GREY = (
    (255, 0, 0),
    (255, 255, 0),
    (0, 255, 0),
    (0, 255, 255),
    (0, 0, 255),
    (100,) * 3,
)


def planted_dataset(root: Path, n: int = 12, water: int | None = None) -> ProbeDataset:
    """32×32 images whose pixel colours encode the label map: crown red or yellow, wing green or cyan, background
    blue ("water") or grey ("sand"); crown and wing are random rectangles. Water is the background of images
    ``i % 4 < 2``, or of the first ``water`` images only when given (a rare concept)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        lab = np.zeros((32, 32), np.uint8)
        y, x = rng.integers(0, 12, 2)
        lab[y : y + 8, x : x + 10] = 1
        y2, x2 = rng.integers(18, 26, 2)
        lab[y2 : y2 + 6, x2 - 10 : x2] = 2
        crown, wing, bg = ("red", RED) if i % 2 else ("yellow", YELLOW), ("green", GREEN) if i % 3 else (
            "cyan", CYAN), ("water", BLUE) if (i < water if water is not None else i % 4 < 2) else ("sand", GREY)  # fmt: skip
        img = np.zeros((32, 32, 3), np.uint8)
        img[lab == 0], img[lab == 1], img[lab == 2] = bg[1], crown[1], wing[1]
        Image.fromarray(img).save(root / f"images/{i}.png")
        Image.fromarray(lab).save(root / f"images/{i}_mask.png")
        records.append(
            ImageRecord(
                id=str(i), path=f"images/{i}.png", split="train", label=i % 2, mask=f"images/{i}_mask.png",
                region_concepts={"crown": [f"{crown[0]} crown"], "wing": [f"{wing[0]} wing"]},
                meta={"background": bg[0]},
            )
        )  # fmt: skip
    return write_dataset(
        root, name="planted", source="test", classes=["a", "b"], records=records, regions=["crown", "wing"]
    )


class Planted(nn.Module):
    """features.0: 1×1 conv whose filter k is +5 exactly on concept k's pixels, -5 or less elsewhere:
    0 red crown (R - G - B), 1 crown (R), 2 wing (G - R), 3 water background (B - G - R); features.1 = ReLU
    (exactly 5 × the concept's mask); features.2-3 = identity conv + ReLU (the same masks, a second layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4, 2)
        w = torch.tensor([[1.0, -1, -1], [1, 0, 0], [-1, 1, 0], [-1, -1, 1]]) * 10
        with torch.no_grad():
            self.features[0].weight.copy_(w.view(4, 3, 1, 1))
            self.features[0].bias.fill_(-5.0)
            self.features[2].weight.copy_(torch.eye(4).view(4, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_planted_units_get_their_concept_in_every_recorded_layer(tmp_path) -> None:
    ds = planted_dataset(tmp_path / "planted")
    lm = wrap(Planted(), size=32, classes=ds.classes)
    layers = ["features.1", "features.3"]
    thr = {name: np.full(4, 2.5, np.float32) for name in layers}  # the maps are {0, 5}: halfway
    # 12 images, each concept in at most 6 of them: every concept competes (the stage asks for MIN_SUPPORT)
    d = dissect_layers(lm, ds, layers, range(len(ds)), batch_size=5, thresholds=thr, min_support=1)
    assert d.images == 12
    want = ["red crown", "crown", "wing", "water background"]
    for name in layers:
        ids, iou = d.best(name)
        assert [d.concepts[int(j)] for j in ids] == want
        assert np.all(iou >= 0.95), iou
    s = layer_summary(d)
    assert [r["interpretable"] for r in s] == [4, 4] and s[0]["unique"] == 4
    assert s[0]["by_kind"] == {
        "part": {"units": 2, "unique": 2},
        "colour": {"units": 1, "unique": 1},
        "pattern/shape": {"units": 0, "unique": 0},
        "background": {"units": 1, "unique": 1},
    }
    # the thresholds pass: the 0.995 quantile of a binary {0, 5} map lies in (0, 5]
    q = layer_thresholds(lm, ds, ["features.1"], range(len(ds)))["features.1"]
    assert q.shape == (4,) and np.all((q > 0) & (q <= 5.01))


def test_concept_kinds_and_layer_choice() -> None:
    regions = ["crown", "wing"]
    assert [concept_kind(c, regions) for c in ["crown", "red crown", "striped wing", "sky background"]] == [
        "part", "colour", "pattern/shape", "background",
    ]  # fmt: skip
    demo = load_model("synthbirds")
    assert dissection_layers(demo) == [f"features.{i}" for i in (2, 5, 8, 11, 14, 17, 20)]


def test_errors_and_the_stage_with_a_reinitialised_baseline(tmp_path) -> None:
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    ds = planted_dataset(tmp_path / "planted", n=16)
    lm = wrap(Planted(), size=32, classes=ds.classes)
    no_masks = [i for i, r in enumerate(ds.records) if not r.mask]
    with pytest.raises(ValueError, match="none of these images has a region label map"):
        dissect_layers(lm, ds, ["features.1"], no_masks)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=2, batch_size=8, num_workers=0, progress=False))
    info = build_stage(bundle, ds, "layers", lm, baseline_images=16, min_support=1)
    assert info["layers"] == 2 and info["images"] == 16  # dissection_layers: the two ReLUs
    summary = bundle.read_json("layers/summary")
    assert [r["interpretable"] for r in summary["trained"]] == [4, 4]
    # a re-initialised copy is a fresh random 1×1 conv: it leaves the planted model untouched
    from lavise_core.models.networks import reinitialised

    re = reinitialised(lm, seed=1)
    assert not torch.equal(re.model.features[0].weight, lm.model.features[0].weight)
    assert bundle.array("layers/iou_0").shape == (4, len(bundle.read_json("layers/concepts")))


#: the concepts of ``planted_dataset(n=24, water=6)`` in 10 or more of its images, with their counts
SUPPORTED = {
    "crown": 24,
    "wing": 24,
    "red crown": 12,
    "yellow crown": 12,
    "green wing": 16,
    "sand background": 18,
}


def test_a_rare_concept_cannot_make_a_unit_interpretable(tmp_path) -> None:
    # 24 images; water is the background of the first 6 only: unit 3 fires exactly on it, unit 0 on the red crowns
    ds = planted_dataset(tmp_path / "planted", n=24, water=6)
    lm = wrap(Planted(), size=32, classes=ds.classes)
    thr = {"features.1": np.full(4, 2.5, np.float32)}
    every = dissect_layers(lm, ds, ["features.1"], range(24), batch_size=8, thresholds=thr, min_support=0)
    assert dict(zip(every.concepts, every.support.tolist(), strict=True)) == {
        "crown": 24, "wing": 24, "red crown": 12, "yellow crown": 12, "cyan wing": 8, "green wing": 16,
        "sand background": 18, "water background": 6,
    }  # fmt: skip
    assert MIN_SUPPORT == 10
    kept = dissect_layers(lm, ds, ["features.1"], range(24), batch_size=8, thresholds=thr)
    assert kept.concepts == [c for c in every.concepts if c not in ("cyan wing", "water background")]
    assert dict(zip(kept.concepts, kept.support.tolist(), strict=True)) == SUPPORTED
    # the kept concepts' IoU is the same number: the rule removes columns, it changes no sum
    cols = [every.concepts.index(c) for c in kept.concepts]
    np.testing.assert_array_equal(kept.iou["features.1"], every.iou["features.1"][:, cols])
    ids, iou = every.best("features.1")
    assert [every.concepts[int(j)] for j in ids] == ["red crown", "crown", "wing", "water background"]
    assert np.all(iou >= 0.95), iou
    ids, iou = kept.best("features.1")
    assert [kept.concepts[int(j)] for j in ids[:3]] == ["red crown", "crown", "wing"] and np.all(
        iou[:3] >= 0.95
    )
    assert iou[3] == 0.0  # the water unit overlaps no concept with 10 images: not interpretable
    assert [r["interpretable"] for r in layer_summary(every)] == [4]
    s = layer_summary(kept)[0]
    assert (s["interpretable"], s["unique"]) == (3, 3) and s["by_kind"]["background"] == {
        "units": 0,
        "unique": 0,
    }
    with pytest.raises(ValueError, match="no concept is present in 25 or more of these 24 images"):
        dissect_layers(lm, ds, ["features.1"], range(24), thresholds=thr, min_support=25)
    with pytest.raises(ValueError, match="min_support must be >= 0"):
        supported_concepts(ds, range(24), -1)


def test_the_stage_records_the_support_rule_and_a_baseline_without_supported_concepts(tmp_path) -> None:
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    ds = planted_dataset(tmp_path / "planted", n=24, water=6)
    lm = wrap(Planted(), size=32, classes=ds.classes)
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=2, batch_size=8, num_workers=0, progress=False))
    info = build_stage(bundle, ds, "layers", lm, baseline_images=8)
    assert info["min_support"] == 10 and info["concepts"] == {"trained": 6, "reinitialised": 0}
    summary = bundle.read_json("layers/summary")
    assert [r["interpretable"] for r in summary["trained"]] == [3, 3] and summary["reinitialised"] == []
    assert summary["baseline_note"] == "no concept is present in 10 or more of the baseline's 8 images"
    concepts, support = bundle.read_json("layers/concepts"), bundle.read_json("layers/support")
    assert dict(zip(concepts, support, strict=True)) == SUPPORTED
    bundle2 = open_or_create_bundle(tmp_path / "bundles2", lm, ds)
    run_probe(bundle2, lm, ds, ProbeSettings(top_k=2, batch_size=8, num_workers=0, progress=False))
    info = build_stage(bundle2, ds, "layers", lm, min_support=30)
    assert info["skipped"].startswith("no concept is present in 30 or more of the 24 images dissected")
