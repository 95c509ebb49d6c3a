"""Broden importer on a hand-built fixture in NetDissect's format: exact masks, phrases, scenes, bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavise_core.cli.data import add_import_commands
from lavise_core.data.dataset import DatasetError, ProbeDataset
from lavise_core.data.importers import broden_regions, import_broden

HEADER = "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture"
# label numbers: car is 300, so its PNG needs the green channel (300 = 44 + 256 * 1)
LABELS = """number,name,category,frequency,coverage,syns
0,-,,0,0,
1,red-c,color(2),2,0.5,
2,blue-c,color(1),1,0.5,
4,wheel,part(1),1,0.1,
5,street-s,scene(1),1,1.0,
6,striped,texture(1),1,1.0,
300,car,object(2);part(1),2,0.4,automobile
"""
CATEGORIES = """name,first,last,count,frequency
color,1,2,2,2
object,300,300,1,1
part,4,4,1,1
material,0,0,0,0
scene,5,5,1,1
texture,6,6,1,1
"""


def _seg(labels: np.ndarray) -> Image.Image:
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb)


def _photo(path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(path)


def make_broden(root: Path, extra_rows: str = "") -> Path:
    """a.png: car (300) on rows 0-3, a wheel (4) at rows 2-3 cols 0-1, red (1) on rows 0-3 cols 0-3, blue (2) on
    rows 4-7, scene street (5). b.png: whole-image texture striped (6) only."""
    img = root / "images"
    img.mkdir(parents=True)
    _photo(img / "a.png")
    _photo(img / "b.png")
    obj = np.zeros((8, 8), np.int64)
    obj[0:4] = 300
    part = np.zeros((8, 8), np.int64)
    part[2:4, 0:2] = 4
    col = np.zeros((8, 8), np.int64)
    col[0:4, 0:4] = 1
    col[4:8] = 2
    _seg(obj).save(img / "a_object.png")
    _seg(part).save(img / "a_part.png")
    _seg(col).save(img / "a_color.png")
    (root / "index.csv").write_text(
        f"{HEADER}\n"
        "a.png,train,8,8,8,8,a_color.png,a_object.png,a_part.png,,5,\n"
        f"b.png,val,8,8,8,8,,,,,,6\n{extra_rows}"
    )
    (root / "label.csv").write_text(LABELS)
    (root / "category.csv").write_text(CATEGORIES)
    for c in ("color", "object", "part", "material", "scene", "texture"):
        (root / f"c_{c}.csv").write_text("code,number,name,frequency,coverage\n")
    return root


def test_exact_masks_phrases_and_scene(tmp_path: Path) -> None:
    ds = import_broden(make_broden(tmp_path / "broden"), tmp_path / "out", progress=False)
    assert ds.source == "broden" and len(ds) == 2
    # regions: the used labels by number, red-c -> red, street-s -> street
    assert ds.regions == ["blue", "wheel", "striped", "car"]
    r = {name: i + 1 for i, name in enumerate(ds.regions)}
    want = np.full((8, 8), r["car"], np.uint8)
    want[2:4, 0:2] = r["wheel"]
    want[4:8] = r["blue"]
    np.testing.assert_array_equal(ds.load_mask(0), want)
    a = ds.records[0]
    assert a.split == "train" and ds.classes == ["street"] and a.label == 0
    # the wheel pixel also carries car and red (two labels besides its own on one pixel); red covers 12 of the
    # car's 28 pixels (< half), so it is not a car phrase
    assert a.region_concepts == {
        "wheel": ["wheel", "red", "car", "street"],
        "car": ["car", "street"],
        "blue": ["blue", "street"],
    }
    assert a.meta["scenes"] == ["street"] and a.meta["broden"]["scene"] == ["5"]
    b = ds.records[1]
    assert b.split == "val" and b.label == -1
    np.testing.assert_array_equal(ds.load_mask(1), np.full((8, 8), r["striped"], np.uint8))
    assert b.region_concepts == {"striped": ["striped"]}
    assert ds.meta["concept_kinds"]["car"] == "object" and ds.meta["concept_kinds"]["red"] == "color"
    with ds.load_image(0) as im:
        assert im.size == (8, 8)
    assert ProbeDataset.open(tmp_path / "out").regions == ds.regions


def test_bad_images_are_reported_and_skipped(tmp_path: Path) -> None:
    rows = (
        "c.png,train,8,8,8,8,c_color.png,,,,,\n"  # unreadable PNG
        "d.png,train,8,8,8,8,d_color.png,,,,,\n"  # unknown label number 999
        "e.png,train,8,8,8,8,e_color.png,,,,,\n"  # segmentation of the wrong size
        "../x.png,train,8,8,8,8,,,,,,6\n"  # escapes images/
    )
    root = make_broden(tmp_path / "broden", rows)
    for name in "cde":
        _photo(root / "images" / f"{name}.png")
    (root / "images" / "c_color.png").write_bytes(b"not a png")
    _seg(np.full((8, 8), 999)).save(root / "images" / "d_color.png")
    _seg(np.ones((4, 4), np.int64)).save(root / "images" / "e_color.png")
    ds = import_broden(root, tmp_path / "out", progress=False)
    assert len(ds) == 2
    reasons = {s["path"].split("(")[1].rstrip(")"): s["reason"] for s in ds.meta["skipped"]}
    assert "cannot be read" in reasons["c.png"]
    assert "[999] are not in label.csv" in reasons["d.png"]
    assert "4x4" in reasons["e.png"]
    assert "inside images/" in reasons["../x.png"]


def test_missing_index_and_bad_arguments(tmp_path: Path) -> None:
    root = make_broden(tmp_path / "broden")
    with pytest.raises(DatasetError, match="unknown Broden categor"):
        import_broden(root, tmp_path / "o1", categories=["colour"], progress=False)
    (root / "c_part.csv").unlink()
    with pytest.raises(DatasetError, match=r"c_part\.csv is missing"):
        import_broden(root, tmp_path / "o2", progress=False)
    (root / "index.csv").unlink()
    with pytest.raises(DatasetError, match=r"index\.csv is missing"):
        import_broden(root, tmp_path / "o3", progress=False)
    with pytest.raises(DatasetError, match="not a directory"):
        import_broden(tmp_path / "nowhere", tmp_path / "o4", progress=False)


def test_categories_filter_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_broden(tmp_path / "broden")
    parser = argparse.ArgumentParser()
    add_import_commands(parser.add_subparsers())
    args = parser.parse_args(["import-broden", str(root), "--out", str(tmp_path / "out"), "--categories",
                              "color,scene", "--quiet", "--link", "copy"])  # fmt: skip
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    ds = ProbeDataset.open(tmp_path / "out")
    assert len(ds) == 1  # b.png has only a texture label: reported and skipped
    assert "no labels in the categories" in ds.meta["skipped"][0]["reason"]
    # rows 0-3, cols 4-7 have no colour label: they take the scene's region
    rc = ds.records[0].region_concepts
    assert rc == {"red": ["red", "street"], "blue": ["blue", "street"], "street": ["street"]}
    assert (tmp_path / "out" / "images" / "a.png").is_file()


def test_regions_of_several_pngs_in_one_category() -> None:
    """Two part PNGs: the first wins a pixel, the second's label becomes a phrase where it covers >= half."""
    p1 = np.array([[4, 4], [0, 0]])
    p2 = np.array([[7, 0], [7, 7]])
    primary, concepts = broden_regions([("part", p1), ("part", p2)], [], {}, (2, 2))
    np.testing.assert_array_equal(primary, [[4, 4], [7, 7]])
    assert concepts == {4: [4, 7], 7: [7]}
