"""Concept sets compose (issue 26): ``build(..., concepts=[A, B])`` dissects each set in its own bundle and gives
each filter its best label over both, naming the set it comes from.

The fixture: the identity CNN (filter k = colour channel k) at 64 px, and two tiny masked sets of 64 × 64 black
images. In "Squares" a red 4 × 4 square is exactly the region "red square", and a green 4 × 4 square fills half of
the 8 × 4 region "green ring"; in "Leaves" the roles swap ("green leaf" exact, "red berry" half). A colour covers
16 of 4,096 pixels, under the top 0.5 % the threshold keeps, so a filter fires exactly on its colour: IoU 1 with the
exact region and 0.5 with the half-filled one. Filter 0 (red) is best labelled from Squares, filter 1 (green) from
Leaves, filter 2 (blue) fires nowhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lavise_core
from lavise_core.api import build_hint
from lavise_core.data.dataset import ImageRecord, ProbeDataset, write_dataset
from tests.conftest import IdentityCNN, wrap

SIDE = 64
STAGES = ["probe", "dissection"]


def masked_set(
    root: Path, name: str, exact: tuple[str, int], half: tuple[str, int], n: int = 8
) -> ProbeDataset:
    """``n`` images: colour channel ``exact[1]`` exactly on region ``exact[0]`` (label 1), channel ``half[1]`` on
    the left half of region ``half[0]`` (label 2, 8 × 4 pixels)."""
    (root / "images").mkdir(parents=True)
    exact_region, half_region = exact[0].split()[1], half[0].split()[1]
    records = []
    for i in range(n):
        img = np.zeros((SIDE, SIDE, 3), np.uint8)
        lab = np.zeros((SIDE, SIDE), np.uint8)
        y, x = 4 + 6 * i, 4 + 3 * i
        img[y : y + 4, x : x + 4, exact[1]] = 255
        lab[y : y + 4, x : x + 4] = 1
        img[y : y + 4, x + 20 : x + 24, half[1]] = 255
        lab[y : y + 4, x + 20 : x + 28] = 2
        Image.fromarray(img).save(root / f"images/{i}.png")
        Image.fromarray(lab).save(root / f"images/{i}_mask.png")
        records.append(
            ImageRecord(
                id=str(i), path=f"images/{i}.png", split="train", label=0, mask=f"images/{i}_mask.png",
                region_concepts={exact_region: [exact[0]], half_region: [half[0]]},
            )
        )  # fmt: skip
    return write_dataset(
        root,
        name=name,
        source="test",
        classes=["scene"],
        records=records,
        regions=[exact_region, half_region],
    )


@pytest.fixture
def sets(tmp_path) -> tuple[ProbeDataset, ProbeDataset]:
    squares = masked_set(tmp_path / "squares", "Squares", ("red square", 0), ("green ring", 1))
    leaves = masked_set(tmp_path / "leaves", "Leaves", ("green leaf", 1), ("red berry", 0))
    return squares, leaves


@pytest.fixture
def model():
    return wrap(IdentityCNN(), size=SIDE)


def test_each_filter_gets_its_best_label_from_either_set_and_names_it(
    sets, model, colour_dataset, tmp_path
) -> None:
    squares, leaves = sets
    bundles = tmp_path / "bundles"
    ex = lavise_core.build(
        model, colour_dataset.root, stages=STAGES, bundles=bundles, concepts=[squares.root, leaves.root]
    )
    assert ex.built["dissection"] == "from the concept sets 'Squares', 'Leaves' (each filter's best label)"
    shown = ex.shown_labels()
    assert shown.labels == ["red square", "green leaf", ""]
    assert shown.scores.tolist() == [1.0, 1.0, 0.0]
    assert shown.concept_sets == ["Squares", "Leaves", "Squares"] and shown.composed
    assert [shown.concepts_of(k) for k in range(3)] == ["Squares", "Leaves", "Squares + Leaves"]
    assert shown.where == "dissection on Squares + Leaves"
    f0, f1, f2 = ex.filters[0], ex.filters[1], ex.filters[2]
    assert f0.labels == [("red square", 1.0, "dissection"), ("red berry", 0.5, "dissection")]
    assert f0.concept_sets == ["Squares", "Leaves"] and f0.concept_set == "Squares"
    assert f1.labels == [("green leaf", 1.0, "dissection"), ("green ring", 0.5, "dissection")]
    assert f1.concept_sets == ["Leaves", "Squares"]
    assert f2.labels == [] and f2.concept_set == ""
    record = ex.bundle.manifest["stages"]["dissection"]
    assert record["concept_sets"] == ["Squares", "Leaves"] and record["concept_set"] == "Squares + Leaves"
    assert record["labels_from"] == {"Squares": 1, "Leaves": 1} and record["labelled_filters"] == 2
    # a stage still missing is built by a command that keeps the composition
    assert build_hint(ex.bundle).endswith(f"--concepts {squares.root.resolve()} {leaves.root.resolve()}")
    # second computation: each set's own bundle, dissected alone; the composed table is the two side by side
    own = [ProbeDataset.open(r) for r in (squares.root, leaves.root)]
    alone = [lavise_core.build(model, ds.root, stages=STAGES, bundles=bundles) for ds in own]
    assert [a.built["dissection"] for a in alone] == ["skipped", "skipped"]  # built once, by the composition
    d = ex.dissection()
    assert d.concepts == [c for a in alone for c in a.dissection().concepts]
    np.testing.assert_array_equal(d.iou, np.concatenate([a.dissection().iou for a in alone], 1))
    assert [a.shown_labels().labels[:2] for a in alone] == [
        ["red square", "green ring"],
        ["red berry", "green leaf"],
    ]
    again = lavise_core.build(
        model, colour_dataset.root, stages=STAGES, bundles=bundles, concepts=[squares.root, leaves.root]
    )
    assert again.built["dissection"] == "skipped"
    # the other order: the same labels, each still naming its set; ties (filter 2) go to the set given first
    swapped = lavise_core.build(
        model, colour_dataset.root, stages=STAGES, bundles=bundles, concepts=[leaves.root, squares.root]
    )
    assert swapped.shown_labels().labels == ["red square", "green leaf", ""]
    assert swapped.shown_labels().concept_sets == ["Squares", "Leaves", "Leaves"]


def test_one_set_keeps_today_s_lent_stage_and_files(sets, model, colour_dataset, tmp_path) -> None:
    squares, leaves = sets
    bundles = tmp_path / "bundles"
    composed = lavise_core.build(
        model, colour_dataset.root, stages=STAGES, bundles=bundles, concepts=[squares.root, leaves.root]
    )
    assert composed.bundle.has("dissection/concept_set_ids")
    one = lavise_core.build(
        model, colour_dataset.root, stages=STAGES, bundles=bundles, concepts=[squares.root]
    )
    assert one.built["dissection"] == "from the concept set 'Squares'"
    record = one.bundle.manifest["stages"]["dissection"]
    assert record["concept_set"] == "Squares" and "concept_sets" not in record
    own = lavise_core.build(model, squares.root, stages=STAGES, bundles=bundles).bundle
    assert record["concept_bundle"] == str(own.root)
    lent = sorted(p.relative_to(one.bundle.root) for p in (one.bundle.root / "dissection").rglob("*"))
    assert lent == sorted(p.relative_to(own.root) for p in (own.root / "dissection").rglob("*"))
    for rel in lent:  # hard links of the set's own files, as before composition existed
        assert (one.bundle.root / rel).read_bytes() == (own.root / rel).read_bytes()
    shown = one.shown_labels()
    assert shown.labels == ["red square", "green ring", ""] and shown.scores.tolist() == [1.0, 0.5, 0.0]
    assert shown.concept_sets is None and shown.concepts_of(0) == "Squares"
    assert "--concepts" not in build_hint(one.bundle)  # as before
    assert one.filters[1].concept_sets == ["Squares"]


def test_what_cannot_be_composed_is_refused_in_plain_words(sets, model, colour_dataset, tmp_path) -> None:
    squares, leaves = sets
    bundles = tmp_path / "bundles"

    def build(*concepts):
        return lavise_core.build(
            model, colour_dataset.root, stages=STAGES, bundles=bundles, concepts=concepts
        )

    with pytest.raises(ValueError, match=r"the concept set .*nowhere cannot be opened"):
        build(squares.root, tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"squares is given twice \(also as .*squares\): name each set once"):
        build(squares.root, leaves.root, squares.root)
    copy = tmp_path / "copy of squares"
    shutil.copytree(squares.root, copy)
    with pytest.raises(ValueError, match="hold the same data: name each set once"):
        build(squares.root, copy)
    captioned = tmp_path / "captioned"
    (captioned / "images").mkdir(parents=True)
    shutil.copy(squares.image_path(0), captioned / "images/0.png")
    write_dataset(
        captioned, name="Captioned", source="test", classes=["scene"],
        records=[ImageRecord("0", "images/0.png", "train", 0, captions=["a red square"])],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"'Captioned' .* has no region masks, so it can give no dissection labels"
    ):
        build(squares.root, captioned)
    with pytest.raises(ValueError, match="is the probe set itself"):
        lavise_core.build(
            model, squares.root, stages=STAGES, bundles=bundles, concepts=[squares.root, leaves.root]
        )
    assert not any(bundles.glob("*/dissection"))  # nothing built or lent before the refusal


def test_the_cli_takes_several_concept_sets() -> None:
    from lavise_core.cli import build_parser

    args = build_parser().parse_args(
        ["build", "--data", "mine", "--concepts", "data/concepts", "data/synthbirds"]
    )
    assert args.concepts == [Path("data/concepts"), Path("data/synthbirds")]
    assert build_parser().parse_args(["build"]).concepts is None


def test_the_filters_page_views_name_each_label_s_set(sets, model, colour_dataset, tmp_path) -> None:
    import csv
    import io

    from lavise_core import views
    from lavise_core.pipeline.bundle import Bundle

    squares, leaves = sets
    ex = lavise_core.build(
        model,
        colour_dataset.root,
        stages=STAGES,
        bundles=tmp_path / "b",
        concepts=[squares.root, leaves.root],
    )
    ws = views.Workspace(Bundle.open(ex.bundle.root), model_loader=lambda: model)
    table = views.filter_table(ws)
    assert table["label"].tolist() == ["red square", "green leaf", ""]
    assert table["concept_set"].tolist() == ["Squares", "Leaves", "Squares + Leaves"]
    assert table.attrs["composed"] and table.attrs["concepts"] == "Squares + Leaves"
    d = views.filter_detail(ws, 1)
    assert (d.label, d.label_concepts) == ("green leaf", "Leaves")
    assert d.dissection[:2] == [("green leaf", 1.0), ("green ring", 0.5)]
    assert d.dissection_sets[:2] == ["Leaves", "Squares"]
    rows = list(csv.DictReader(io.StringIO(views.filter_table_csv(ws).decode())))
    assert [r["concept_set"] for r in rows] == ["Squares", "Leaves", "Squares + Leaves"]
