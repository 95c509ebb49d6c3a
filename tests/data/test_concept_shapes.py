"""ConceptShapes: exact pixel labels on hand-checked scenes, determinism, every pixel labelled, the opened set."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from lavise_core.cli.data import add_concepts
from lavise_core.data import concept_shapes as cs
from lavise_core.data.dataset import DatasetError, ProbeDataset
from lavise_core.explain.dissection.labels import dissection_concepts

N, SIZE = 20, 64


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> ProbeDataset:
    return cs.generate_concept_shapes(
        tmp_path_factory.mktemp("cs") / "a", n=N, image_size=SIZE, progress=False
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _region(name: str) -> int:
    return cs.REGIONS.index(name) + 1


def test_circle_on_split_fields_exact_pixels() -> None:
    """8x8: left half plain red, right half striped blue (split at x = 4), a green circle r = 2 at (4, 4).

    Pixel centres are at +0.5: the circle holds the 4x4 block rows/cols 2..5 without its four corners
    ((x+.5-4)² + (y+.5-4)² < 4).
    """
    scene = cs.Scene(
        fields=(cs.Fill("red"), cs.Fill("blue", "thin vertical stripes")),
        shapes=(cs.ShapePlacement("circle", 4.0, 4.0, 2.0, cs.Fill("green")),),
        layout=("split", 4.0, 0.0, 0.0),
    )
    image, mask, rc = cs.render_scene(scene, 8)
    plain, striped, circle = _region("plain"), _region("striped"), _region("circle")
    want = np.full((8, 8), plain, np.uint8)
    want[:, 4:] = striped
    want[2:6, 2:6] = circle
    for y, x in ((2, 2), (2, 5), (5, 2), (5, 5)):
        want[y, x] = plain if x < 4 else striped
    np.testing.assert_array_equal(mask, want)
    assert rc == {
        "circle": ["circle", "green", "green circle"],
        "striped": ["striped", "blue", "thin stripes", "vertical stripes"],
        "plain": ["plain", "red"],
    }
    # plain regions are their exact colour; a striped one mixes the colour with its shade
    assert (image[mask == circle] == cs.BASIC_COLOURS["green"]).all()
    assert (image[mask == plain] == cs.BASIC_COLOURS["red"]).all()
    blue = np.asarray(cs.BASIC_COLOURS["blue"])
    tones = {tuple(p) for p in image[mask == striped]}
    assert tuple(blue) in tones and len(tones) == 2


def test_occlusion_later_shape_wins_and_hidden_shape_drops_out() -> None:
    """A square drawn after a circle covers it; a fully covered shape has no pixels and no concepts."""
    big = cs.ShapePlacement("square", 8.0, 8.0, 8.0, cs.Fill("yellow"))  # apothem 5.66: cols/rows 2..13
    small = cs.ShapePlacement("circle", 8.0, 8.0, 3.0, cs.Fill("red", "small dots"))
    _, mask, rc = cs.render_scene(cs.Scene(fields=(cs.Fill("white"),), shapes=(small, big)), 16)
    assert "circle" not in rc and (mask != _region("circle")).all()
    sq = mask == _region("square")
    ys, xs = np.nonzero(sq)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 13, 2, 13) and sq.sum() == 144
    _, mask2, rc2 = cs.render_scene(cs.Scene(fields=(cs.Fill("white"),), shapes=(big, small)), 16)
    assert rc2["circle"] == ["circle", "red", "red circle", "dotted", "small dots"]
    assert (mask2 == _region("circle")).sum() == 32  # r = 3 disc on pixel centres: 12 + 12 + 8
    assert set(np.unique(mask2)) == {_region("plain"), _region("square"), _region("circle")}


def test_fine_colour_carries_its_basic_term() -> None:
    _, _, rc = cs.render_scene(cs.Scene(fields=(cs.Fill("navy", "zigzag"),)), 8)
    assert rc == {"zigzag": ["zigzag", "blue", "navy"]}


def test_layout_and_every_pixel_labelled(small: ProbeDataset) -> None:
    assert small.source == cs.SOURCE and small.classes == list(cs.SHAPES)
    assert small.regions == list(cs.REGIONS) and len(small) == N
    assert {r.split for r in small.records} == {"train", "test"}
    for i, rec in enumerate(small.records):
        mask = small.load_mask(i)
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
        assert mask.min() >= 1  # no pixel outside every region
        present = {small.regions[v - 1] for v in np.unique(mask)}
        assert present == set(rec.region_concepts)
        assert small.classes[rec.label] == rec.meta["dominant_shape"]
        shape_px = {s: int((mask == _region(s)).sum()) for s in cs.SHAPES}
        assert max(shape_px, key=shape_px.get) == rec.meta["dominant_shape"]
        for name, phrases in rec.region_concepts.items():
            assert phrases[0] == name and all(p in cs.CONCEPT_KINDS for p in phrases)
        assert rec.captions and rec.attributes
        with small.load_image(i) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_concepts_list_for_dissection(small: ProbeDataset) -> None:
    concepts = dissection_concepts(small.records, regions=small.regions)
    kinds = {cs.CONCEPT_KINDS[c] for c in concepts}
    assert kinds == {"colour", "texture", "shape"}
    assert set(concepts) <= set(cs.CONCEPT_KINDS)
    assert not any(c.endswith(" background") for c in concepts)
    # the full vocabulary: 18 colour names, 22 texture families + 9 finer texture phrases, 10 shapes + 110 pairs
    kinds_all = list(cs.CONCEPT_KINDS.values())
    assert (kinds_all.count("colour"), kinds_all.count("texture"), kinds_all.count("shape")) == (18, 31, 120)
    assert len([t for t in cs.TEXTURES if t != "plain"]) >= 20
    assert set(cs.BASIC_COLOURS) == {
        "black", "white", "red", "green", "yellow", "blue", "brown", "orange", "pink", "purple", "grey",
    }  # fmt: skip


def test_same_seed_same_bytes_other_seed_differs(small: ProbeDataset, tmp_path: Path) -> None:
    again = cs.generate_concept_shapes(tmp_path / "b", n=N, image_size=SIZE, progress=False)
    assert _files(again.root) == _files(small.root)
    fewer = cs.generate_concept_shapes(tmp_path / "c", n=5, image_size=SIZE, progress=False)
    a, c = _files(small.root), _files(fewer.root)
    assert all(c[k] == a[k] for k in c if k.startswith(("images/", "masks/")))
    other = cs.generate_concept_shapes(tmp_path / "d", n=5, seed=1, image_size=SIZE, progress=False)
    assert _files(other.root)["images/000000.png"] != a["images/000000.png"]


def test_workers_give_the_same_bytes(small: ProbeDataset, tmp_path: Path) -> None:
    par = cs.generate_concept_shapes(tmp_path / "w", n=N, image_size=SIZE, progress=False, workers=2)
    assert _files(par.root) == _files(small.root)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be an integer >= 1"),
        ({"image_size": 16}, "image_size must be an integer >= 32"),
        ({"workers": 0}, "workers must be"),
        ({"seed": -1}, "seed must be a non-negative"),
        ({"test_fraction": 1.5}, "test_fraction must lie"),
    ],
)
def test_bad_arguments_are_plain_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cs.generate_concept_shapes(tmp_path / "x", progress=False, **kwargs)


def test_bad_scene_specs() -> None:
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        cs.Fill("mauve")
    with pytest.raises(ValueError, match="unknown texture"):
        cs.Fill("red", "paisley")
    with pytest.raises(ValueError, match="unknown shape"):
        cs.ShapePlacement("blob", 1, 1, 1, cs.Fill("red"))
    with pytest.raises(ValueError, match="distinct"):
        cs.Scene(
            fields=(cs.Fill("red", "small dots"), cs.Fill("blue", "large dots")), layout=("split", 1, 1, 0)
        )
    with pytest.raises(ValueError, match="makes 1 field"):
        cs.Scene(fields=(cs.Fill("red"), cs.Fill("blue", "grid")))


def test_refuses_to_overwrite_another_data_set(small: ProbeDataset, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dataset.json").write_text('{"source": "synthbirds"}')
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        cs.generate_concept_shapes(tmp_path / "other", n=2, image_size=SIZE, progress=False)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not an empty directory"):
        cs.generate_concept_shapes(tmp_path / "stuff", n=2, image_size=SIZE, progress=False)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_concepts(parser.add_subparsers())
    args = parser.parse_args(["concepts", "--out", str(tmp_path / "s"), "--n", "3", "--image-size", "48",
                              "--workers", "1", "--quiet"])  # fmt: skip
    assert args.func(args) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert len(ProbeDataset.open(tmp_path / "s")) == 3
