"""The layers stage on a general concept set: planted units over a tiny generated ConceptShapes set get their
colour / texture / shape labels and the kinds ``dataset.json`` names; sets without named kinds keep the rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lavise_core.data.concept_shapes import generate_concept_shapes
from lavise_core.explain.dissection.labels import concept_incidence, label_map_crop
from lavise_core.explain.dissection.layers import (
    KIND_ORDER,
    KINDS,
    RULE_KINDS,
    chart_order,
    concept_kinds,
    dissect_layers,
    layer_summary,
)
from lavise_core.pipeline.probe import image_batches
from tests.conftest import wrap

#: the planted units: unit k fires exactly on the annotated pixels of PLANTED[k]
PLANTED = [
    ("red", "colour"),
    ("zigzag", "texture"),
    ("dotted", "texture"),
    ("circle", "shape"),
    ("star", "shape"),
]


class PlantedUnits(nn.Module):
    """``features`` → ``(B, K, 64, 64)``: unit k is 5 on the pixels annotated with concept ``PLANTED[k]`` in the
    input's label map, 0 elsewhere. The image is recognised as the nearest of the stored preprocessed inputs
    ``refs (N, 3·H·W)``, whose concept masks ``masks (N, K, 64, 64)`` are set by :func:`plant`."""

    def __init__(self) -> None:
        super().__init__()
        self.refs = torch.zeros(0)
        self.masks = torch.zeros(0)
        self.features = nn.Identity()
        self.classifier = nn.Linear(len(PLANTED), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.cdist(x.flatten(1), self.refs).argmin(1)
        maps = self.features(5.0 * self.masks[idx])
        return self.classifier(maps.mean((2, 3)))


def plant(lm, ds) -> None:
    """Store every image's preprocessed input and its planted concept masks at the evaluation size (64)."""
    concepts = [c for c, _ in PLANTED]
    inc = concept_incidence(ds.records, ds.regions, concepts)  # (N, R+1, K)
    xs, masks = [], []
    for batch, x, _ in image_batches(ds, lm, range(len(ds)), 8):
        xs.append(x.flatten(1))
        for i in batch:
            lab = label_map_crop(ds, i, lm)
            masks.append(np.moveaxis(inc[i][lab], -1, 0))
    lm.model.refs = torch.cat(xs)
    lm.model.masks = torch.as_tensor(np.stack(masks), dtype=torch.float32)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_concept_shapes(tmp_path_factory.mktemp("cs"), n=24, seed=3, image_size=64, progress=False)


def test_planted_units_get_their_colour_texture_and_shape_labels(shapes) -> None:
    ds = shapes
    concepts = [c for c, _ in PLANTED]
    present = {p for r in ds.records for ps in r.region_concepts.values() for p in ps} | {
        name for r in ds.records for name in r.region_concepts
    }
    assert set(concepts) <= present, set(concepts) - present
    lm = wrap(PlantedUnits(), size=64, classes=ds.classes)
    plant(lm, ds)
    thr = {"features": np.full(len(PLANTED), 2.5, np.float32)}
    d = dissect_layers(lm, ds, ["features"], range(len(ds)), batch_size=8, thresholds=thr, min_support=1)
    ids, iou = d.best("features")
    assert [d.concepts[int(j)] for j in ids] == concepts
    assert np.all(iou >= 0.99), iou
    assert [d.kinds[int(j)] for j in ids] == [k for _, k in PLANTED]
    s = layer_summary(d)[0]
    assert s["interpretable"] == 5 and s["unique"] == 5
    assert s["by_kind"] == {
        "colour": {"units": 1, "unique": 1},
        "texture": {"units": 2, "unique": 2},
        "shape": {"units": 2, "unique": 2},
        "part": {"units": 0, "unique": 0},
        "background": {"units": 0, "unique": 0},
    }
    # every concept of the set takes the kind dataset.json names: none falls back to "part" or the rules
    assert set(d.kinds) == {"colour", "texture", "shape"}
    assert dict(zip(d.concepts, d.kinds, strict=True))["red circle"] == "shape"


def test_kinds_named_by_the_data_set_else_the_rules() -> None:
    regions = ["crown", "circle"]
    concepts = ["circle", "crown", "red crown", "sky background", "striped"]
    # no named kinds (SynthBirds): the rules and their order, as before
    kinds, order = concept_kinds(concepts, regions)
    assert kinds == ["part", "part", "colour", "background", "pattern/shape"] and order == list(RULE_KINDS)
    # named kinds win; a concept the set does not name falls back to the rules
    kinds, order = concept_kinds(
        concepts, regions, {"circle": "shape", "striped": "texture", "red crown": "colour"}
    )
    assert kinds == ["shape", "part", "colour", "background", "texture"] and order == list(KINDS)
    # Broden's categories: color -> colour, scene -> background; object and material charted where present
    broden = {"car": "object", "red": "color", "street": "scene", "wood": "material", "wheel": "part"}
    kinds, order = concept_kinds(list(broden), [], broden)
    assert kinds == ["object", "colour", "background", "material", "part"]
    assert order == ["colour", "texture", "shape", "part", "object", "material", "background"]


def test_chart_order_from_a_summary_s_sorted_keys() -> None:
    # summary.json stores by_kind with sorted keys; the chart shows them in the kinds' own order
    assert chart_order(sorted(RULE_KINDS)) == list(RULE_KINDS)
    assert chart_order(sorted(KINDS)) == list(KINDS)
    assert chart_order(sorted([*KINDS, "object", "zebra"])) == [
        *[k for k in KIND_ORDER if k in (*KINDS, "object")],
        "zebra",
    ]
