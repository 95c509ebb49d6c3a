"""Importers on tiny fixtures written in the exact source formats (image folder, CUB-200-2011, COCO)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavise_core.cli.data import add_import_commands
from lavise_core.data.dataset import DatasetError, ProbeDataset
from lavise_core.data.importers import (
    CUB_PARTS,
    clean_class_name,
    cub_attribute_phrase,
    decode_coco_segmentation,
    decode_rle,
    encode_rle,
    import_coco,
    import_cub,
    import_image_folder,
    rasterize_polygons,
    rle_from_string,
    rle_to_string,
    safe_id,
)


def _save(path: Path, size: tuple[int, int] = (16, 12), color=(200, 30, 30), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ============================================================================ image folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "pets"
    for name in ("a.png", "b.jpg", "c.PNG", "d.png", "e.png"):
        _save(src / "cat" / name, fmt="PNG" if name.lower().endswith("png") else "JPEG")
    _save(src / "dog" / "x y.png", size=(20, 10))
    _save(src / "dog" / "sub" / "z.bmp", fmt="BMP")
    (src / "dog" / "broken.jpg").write_bytes(b"this is not an image")
    (src / "dog" / "half.jpg").write_bytes(_jpeg_bytes()[:400])
    (src / "dog" / "notes.md").write_text("not an image extension")
    _save(src / ".hidden" / "q.png")
    _save(src / "loose.png")
    (src / "cat" / "a.txt").write_text("a red cat\n\n a sleepy cat \n")
    return src


def test_folder_labels_ids_skips_and_split(folder: Path, tmp_path: Path) -> None:
    ds = import_image_folder(folder, tmp_path / "out", progress=False)
    assert ds.classes == ["cat", "dog"]
    by_id = {r.id: r for r in ds.records}
    assert sorted(by_id) == [
        "cat__a.png",
        "cat__b.jpg",
        "cat__c.PNG",
        "cat__d.png",
        "cat__e.png",
        "dog__sub__z.bmp",
        "dog__x_y.png",
        "loose.png",
    ]
    assert [by_id[i].label for i in ("cat__c.PNG", "dog__sub__z.bmp", "loose.png")] == [0, 1, -1]
    assert by_id["dog__x_y.png"].path == "images/dog/x y.png"
    assert by_id["dog__x_y.png"].meta == {"width": 20, "height": 10}
    assert by_id["cat__a.png"].captions == ["a red cat", "a sleepy cat"]
    # corrupt files are skipped and reported with a reason
    skipped = {s["path"]: s["reason"] for s in ds.meta["skipped"]}
    assert sorted(skipped) == ["dog/broken.jpg", "dog/half.jpg"]
    assert "not an image" in skipped["dog/broken.jpg"]
    assert "truncated" in skipped["dog/half.jpg"].lower()
    # stratified split: cat 5 -> 1 test; dog 2 -> round(0.4) = 0; unlabeled 1 -> 0
    tests = [r.id for r in ds.records if r.split == "test"]
    assert len(tests) == 1 and tests[0].startswith("cat__")
    assert ds.meta["unlabeled"] == 1
    # round trip, images reachable through the symlink
    back = ProbeDataset.open(tmp_path / "out")
    assert [r.to_json() for r in back.records] == [r.to_json() for r in ds.records]
    assert back.source == "folder" and (tmp_path / "out" / "images").is_symlink()
    assert all(back.image_path(i).is_file() for i in range(len(back)))


def test_folder_split_is_deterministic_and_seeded(folder: Path, tmp_path: Path) -> None:
    a = import_image_folder(folder, tmp_path / "a", test_fraction=0.6, progress=False)
    b = import_image_folder(folder, tmp_path / "b", test_fraction=0.6, progress=False)
    assert [r.split for r in a.records] == [r.split for r in b.records]
    n_test = {lab: sum(r.split == "test" for r in a.records if r.label == lab) for lab in (-1, 0, 1)}
    assert n_test == {-1: 1, 0: 3, 1: 1}  # round(0.6), round(3.0), round(1.2)
    splits = {
        tuple(
            r.split for r in import_image_folder(folder, tmp_path / f"s{s}", seed=s, progress=False).records
        )
        for s in range(6)
    }
    assert len(splits) > 1


def test_folder_flat_and_copy(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    _save(src / "one.png")
    _save(src / "two.jpg", fmt="JPEG")
    ds = import_image_folder(src, tmp_path / "out", link="copy", progress=False)
    assert ds.classes == []
    assert [(r.id, r.label) for r in ds.records] == [("one.png", -1), ("two.jpg", -1)]
    copied = tmp_path / "out" / "images" / "one.png"
    assert copied.is_file() and not copied.is_symlink()
    assert len(ProbeDataset.open(tmp_path / "out")) == 2


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        import_image_folder(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images in"):
        import_image_folder(tmp_path / "empty", tmp_path / "out", progress=False)
    _save(tmp_path / "src" / "c" / "a.png")
    with pytest.raises(DatasetError, match="inside the source"):
        import_image_folder(tmp_path / "src", tmp_path / "src" / "out", progress=False)


def test_safe_id() -> None:
    assert safe_id("cat/img 1.jpg") == "cat__img_1.jpg"
    assert safe_id("../weird/é.png") == "__weird___.png"
    assert safe_id(".hidden name") == "hidden_name"
    assert clean_class_name("001.Black_footed_Albatross") == "black footed albatross"
    assert clean_class_name("200.Common_Yellowthroat") == "common yellowthroat"


# ============================================================================ CUB

CUB_ATTRIBUTES = """\
1 has_bill_shape::curved_(up_or_down)
2 has_bill_shape::hooked
3 has_wing_color::red
4 has_wing_pattern::striped
5 has_crown_color::blue
6 has_size::small_(5_-_9_in)
7 has_tail_shape::forked_tail
"""

CUB_LABELS = """\
1 1 0 3 27.7
1 2 1 4 10.2
1 3 1 3 5.5
1 5 1 1 3.0
1 6 1 4 1.0
2 4 1 3 0 12.5
2 7 1 4 3.3
3 1 1 4 8.0
"""

CUB_IMAGES = [
    "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg",
    "001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg",
    "002.Laysan_Albatross/Laysan_Albatross_0001_545.jpg",
]


def _write_cub(root: Path) -> Path:
    src = root / "CUB_200_2011"
    src.mkdir(parents=True)
    for rel in CUB_IMAGES:
        _save(src / "images" / rel, size=(32, 24), fmt="JPEG")
    (src / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel in enumerate(CUB_IMAGES, 1)))
    (src / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (src / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (src / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (root / "attributes.txt").write_text(CUB_ATTRIBUTES)  # the official archive keeps it beside CUB_200_2011/
    (src / "attributes").mkdir()
    (src / "attributes" / "image_attribute_labels.txt").write_text(CUB_LABELS)
    (src / "parts").mkdir()
    (src / "parts" / "parts.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(CUB_PARTS, 1)))
    visible = {(1, 2): (10.0, 12.5), (1, 5): (20.0, 5.0), (1, 9): (30.0, 40.0), (2, 14): (3.0, 4.0)}
    locs = []
    for img in (1, 2, 3):
        for part in range(1, 16):
            x, y = visible.get((img, part), (0.0, 0.0))
            locs.append(f"{img} {part} {x} {y} {int((img, part) in visible)}\n")
    (src / "parts" / "part_locs.txt").write_text("".join(locs))
    (src / "bounding_boxes.txt").write_text("1 5.0 6.0 20.0 10.0\n2 0.0 0.0 32.0 24.0\n3 1.5 2.5 3.0 4.0\n")
    caps = root / "cvpr2016_cub" / "text_c10" / "001.Black_footed_Albatross"
    caps.mkdir(parents=True)
    (caps / "Black_Footed_Albatross_0001_796111.txt").write_text(
        "".join(f"caption {k} of one\n" for k in range(10))
    )
    (caps / "Black_Footed_Albatross_0002_55.txt").write_text("a bird with a striped wing\n\n")
    return src


def test_cub_attribute_phrases() -> None:
    cases = {
        "has_wing_color::red": "red wing",
        "has_bill_shape::hooked": "hooked bill",
        "has_crown_color::blue": "blue crown",
        "has_wing_pattern::striped": "striped wing",
        "has_bill_shape::curved_(up_or_down)": "curved bill",
        "has_bill_shape::all-purpose": "all-purpose bill",
        "has_tail_shape::fan-shaped_tail": "fan-shaped tail",
        "has_wing_shape::pointed-wings": "pointed wing",
        "has_size::very_large_(32_-_72_in)": "very large bird",
        "has_size::medium_(9_-_16_in)": "medium-sized bird",
        "has_shape::duck-like": "duck-like bird",
        "has_shape::perching-like": "perching bird",
        "has_upper_tail_color::grey": "grey upper tail",
        "has_under_tail_color::buff": "buff under tail",
        "has_primary_color::yellow": "yellow body",
        "has_bill_length::longer_than_head": "long bill",
        "has_head_pattern::eyering": "eye ring",
        "has_head_pattern::capped": "capped head",
        "has_breast_pattern::multi-colored": "multi-colored breast",
        "has_leg_color::black": "black leg",
        "has_eye_color::red": "red eye",
    }
    assert {k: cub_attribute_phrase(k) for k in cases} == cases


def test_cub_import(tmp_path: Path) -> None:
    src = _write_cub(tmp_path)
    out = tmp_path / "cub_out"
    ds = import_cub(src, out, captions=tmp_path / "cvpr2016_cub", progress=False)
    assert ds.classes == ["black footed albatross", "laysan albatross"]
    assert ds.regions == list(CUB_PARTS)
    r1, r2, r3 = ds.records
    assert [r.id for r in ds.records] == [
        "00001_Black_Footed_Albatross_0001_796111",
        "00002_Black_Footed_Albatross_0002_55",
        "00003_Laysan_Albatross_0001_545",
    ]
    assert [r.label for r in ds.records] == [0, 0, 1]
    assert [r.split for r in ds.records] == ["train", "test", "train"]
    assert r1.attributes == ["hooked bill", "red wing", "blue crown", "small bird"]
    assert r2.attributes == ["striped wing", "forked tail"]  # line with an extra column read
    assert r3.attributes == ["curved bill"]
    assert r1.keypoints == {"beak": [10.0, 12.5], "crown": [20.0, 5.0], "left wing": [30.0, 40.0]}
    assert r2.keypoints == {"tail": [3.0, 4.0]} and r3.keypoints == {}
    assert r1.region_concepts == {"beak": ["hooked bill"], "left wing": ["red wing"], "crown": ["blue crown"]}
    assert r2.region_concepts == {"tail": ["forked tail"]}
    assert [r.bbox for r in ds.records] == [
        [5.0, 6.0, 25.0, 16.0],
        [0.0, 0.0, 32.0, 24.0],
        [1.5, 2.5, 4.5, 6.5],
    ]
    assert r1.captions == [f"caption {k} of one" for k in range(10)]
    assert r2.captions == ["a bird with a striped wing"] and r3.captions == []
    assert all(r.mask is None for r in ds.records)
    assert r1.path == f"images/{CUB_IMAGES[0]}"
    assert ds.meta["attribute_names"]["red wing"] == "has_wing_color::red"
    back = ProbeDataset.open(out)
    assert [r.to_json() for r in back.records] == [r.to_json() for r in ds.records]
    assert back.image_path(2).is_file()
    assert back.attribute_vocabulary() == sorted(
        ["hooked bill", "red wing", "blue crown", "small bird", "striped wing", "forked tail", "curved bill"]
    )


def test_cub_certainty_segmentation_and_copy(tmp_path: Path) -> None:
    src = _write_cub(tmp_path)
    seg = tmp_path / "segmentations" / "001.Black_footed_Albatross"
    m = np.zeros((24, 32), dtype=np.uint8)
    m[2:7, 3:13] = 255  # 50 pixels
    m[10, 0:4] = 200  # 4 pixels, above 128
    m[20, 0:6] = 100  # soft, below 128
    seg.mkdir(parents=True)
    Image.fromarray(m).save(seg / "Black_Footed_Albatross_0001_796111.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(seg / "Black_Footed_Albatross_0002_55.png")  # wrong size
    out = tmp_path / "out"
    ds = import_cub(
        src, out, segmentations=tmp_path / "segmentations", min_certainty=2, link="copy", progress=False
    )
    assert ds.regions == [*CUB_PARTS, "bird"]
    r1, r2, r3 = ds.records
    assert r1.attributes == ["hooked bill", "red wing", "small bird"]  # blue crown had certainty 1
    assert r1.region_concepts["bird"] == ["small bird"]
    assert r1.mask == "masks/00001_Black_Footed_Albatross_0001_796111.png"
    lm = ProbeDataset.open(out).load_mask(0)
    assert lm.shape == (24, 32) and int((lm == 16).sum()) == 54 and int((lm > 0).sum()) == 54
    assert r2.mask is None and r3.mask is None
    reasons = {s["path"]: s["reason"] for s in ds.meta["skipped"]}
    assert (
        "differs from image size"
        in reasons["segmentations/001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.png"]
    )
    assert (
        "segmentation not found"
        in reasons["segmentations/002.Laysan_Albatross/Laysan_Albatross_0001_545.png"]
    )
    assert not (out / "images").is_symlink() and (out / "images" / CUB_IMAGES[2]).is_file()


def test_cub_errors(tmp_path: Path) -> None:
    src = _write_cub(tmp_path)
    (src / "image_class_labels.txt").write_text("1 1\n2 x\n3 2\n")
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt: line 2: 'x' is not an integer"):
        import_cub(src, tmp_path / "o", progress=False)
    (src / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (src / "parts" / "part_locs.txt").write_text("1 2 3.0\n")
    with pytest.raises(DatasetError, match=r"part_locs\.txt: line 1: expected at least 5 fields"):
        import_cub(src, tmp_path / "o", progress=False)
    (src / "images.txt").unlink()
    with pytest.raises(
        DatasetError, match=r"images\.txt is missing: it should contain '<image_id> <class folder>"
    ):
        import_cub(src, tmp_path / "o", progress=False)


def test_cub_missing_image_is_skipped(tmp_path: Path) -> None:
    src = _write_cub(tmp_path)
    (src / "images" / CUB_IMAGES[1]).unlink()
    ds = import_cub(src, tmp_path / "o", progress=False)
    assert len(ds) == 2
    assert ds.meta["skipped"] == [{"path": f"images/{CUB_IMAGES[1]}", "reason": "file not found"}]


# ============================================================================ COCO RLE / polygons


def test_compressed_rle_hand_computed() -> None:
    # counts [5, 3, 2, 3, 7]: from index 3 on, deltas to counts[i-2]: 3-3=0, 7-2=5 -> "5", "3", "2", "0", "5"
    assert rle_to_string([5, 3, 2, 3, 7]) == "53205"
    assert rle_from_string("53205") == [5, 3, 2, 3, 7]
    # 40 = 8 + 1*32 -> chunk 8|0x20 -> 'X', chunk 1 -> '1'; delta 1 - 40 = -39 -> chunks 25|0x20 -> 'i', 30 -> 'N'
    assert rle_to_string([0, 40, 2, 1]) == "0X12iN"
    assert rle_from_string("0X12iN") == [0, 40, 2, 1]
    mask = decode_coco_segmentation({"counts": "53205", "size": [4, 5]}, 4, 5)
    expected = np.array(
        [
            [0, 0, 0, 1, 0],
            [0, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 1, 1, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask, expected)
    assert encode_rle(expected) == [5, 3, 2, 3, 7]


def test_rle_round_trip_and_errors() -> None:
    rng = np.random.default_rng(1)
    m = rng.random((13, 7)) > 0.6
    m[0, 0] = True
    counts = encode_rle(m)
    assert counts[0] == 0
    np.testing.assert_array_equal(decode_rle(counts, [13, 7]), m)
    np.testing.assert_array_equal(decode_rle(rle_from_string(rle_to_string(counts)), [13, 7]), m)
    with pytest.raises(ValueError, match="sum to 5"):
        decode_rle([2, 3], [2, 2])
    with pytest.raises(ValueError, match="truncated"):
        rle_from_string("X")


def test_polygon_rasterisation() -> None:
    # pixel (i, j) is in iff its centre (i + .5, j + .5) is: the box x 1..4, y 1..3 covers 3 x 2 pixels
    m = rasterize_polygons([[1, 1, 4, 1, 4, 3, 1, 3]], 6, 8)
    assert int(m.sum()) == 6 and m[1:3, 1:4].all()
    # union of two polygons; the second lies partly outside the image and is clipped
    m = rasterize_polygons([[0, 0, 4, 0, 0, 4], [-3, 5, 2, 5, 2, 9, -3, 9]], 6, 8)
    expected = np.array(
        [
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(m, expected)
    # a circle of radius 20: pixel count within 1 % of pi r^2
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    circle = np.c_[32 + 20 * np.cos(t), 30 + 20 * np.sin(t)].ravel().tolist()
    assert abs(int(rasterize_polygons([circle], 64, 64).sum()) - np.pi * 400) < 0.01 * np.pi * 400
    # a sliver covering no pixel centre keeps its outline instead of vanishing
    assert int(rasterize_polygons([[2, 2, 2.2, 2, 2.2, 5]], 6, 8).sum()) == 4
    with pytest.raises(ValueError, match="even number"):
        rasterize_polygons([[0, 0, 1]], 4, 4)


# ============================================================================ COCO import


def _write_coco(root: Path) -> tuple[Path, Path, Path]:
    images = root / "val2017"
    _save(images / "000000000001.jpg", size=(8, 6), fmt="JPEG")
    _save(images / "000000000002.jpg", size=(5, 4), fmt="JPEG")
    _save(images / "000000000003.jpg", size=(7, 7), fmt="JPEG")
    image_list = [
        {"id": 2, "file_name": "000000000002.jpg", "height": 4, "width": 5},
        {"id": 1, "file_name": "000000000001.jpg", "height": 6, "width": 8},
        {"id": 3, "file_name": "000000000003.jpg", "height": 7, "width": 7},
        {"id": 4, "file_name": "000000000004.jpg", "height": 7, "width": 7},
    ]
    instances = {
        "images": image_list,
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        "annotations": [
            # polygon: box x 1..4, y 1..3 -> 3 x 2 = 6 pixels (x 1..3, y 1..2)
            {"id": 101, "image_id": 1, "category_id": 18, "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
             "area": 6.0, "bbox": [1, 1, 3, 2], "iscrowd": 0},
            # uncompressed RLE: columns 0 and 1 -> 12 pixels
            {"id": 102, "image_id": 1, "category_id": 1, "segmentation": {"counts": [0, 12, 36], "size": [6, 8]},
             "area": 12.0, "bbox": [0, 0, 2, 6], "iscrowd": 1},
            # compressed RLE "53205" on a 4x5 image -> 6 pixels
            {"id": 103, "image_id": 2, "category_id": 3, "segmentation": {"counts": "53205", "size": [4, 5]},
             "area": 6.0, "bbox": [1, 0, 3, 4], "iscrowd": 0},
        ],
    }  # fmt: skip
    captions = {
        "images": image_list,
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A dog and a person."},
            {"id": 5, "image_id": 1, "caption": "Person with dog \n"},
            {"id": 7, "image_id": 3, "caption": "An empty street."},
        ],
    }
    ann = root / "annotations"
    ann.mkdir()
    (ann / "instances_val2017.json").write_text(json.dumps(instances))
    (ann / "captions_val2017.json").write_text(json.dumps(captions))
    return images, ann / "captions_val2017.json", ann / "instances_val2017.json"


def test_coco_import(tmp_path: Path) -> None:
    images, caps, inst = _write_coco(tmp_path)
    out = tmp_path / "coco"
    ds = import_coco(images, out, captions_json=caps, instances_json=inst, split="val", progress=False)
    assert ds.classes == ["person", "car", "dog"] and ds.regions == ds.classes
    assert [r.id for r in ds.records] == ["000000000001", "000000000002", "000000000003"]
    assert ds.meta["skipped"] == [{"path": "000000000004.jpg", "reason": "file not found"}]
    r1, r2, r3 = ds.records
    assert all(r.split == "val" for r in ds.records)
    # image 1: the crowd person is larger, but non-crowd instances come first -> label dog
    assert r1.label == 2 and r1.bbox == [1.0, 1.0, 4.0, 3.0]
    assert r1.attributes == ["person", "dog"]
    assert r1.region_concepts == {"person": ["person"], "dog": ["dog"]}
    assert r1.captions == ["Person with dog", "A dog and a person."]
    assert [i["category"] for i in r1.meta["instances"]] == ["dog", "person"]
    assert r2.label == 1 and r2.bbox == [1.0, 0.0, 4.0, 4.0] and r2.captions == []
    assert r3.label == -1 and r3.mask is None and r3.bbox is None and r3.captions == ["An empty street."]
    back = ProbeDataset.open(out)
    assert [r.to_json() for r in back.records] == [r.to_json() for r in ds.records]
    lm1 = back.load_mask(0)
    # person (larger, value 1) drawn first, dog (value 3) over it: the 2 shared pixels go to the dog
    assert lm1.shape == (6, 8)
    assert {int(v): int((lm1 == v).sum()) for v in np.unique(lm1)} == {0: 48 - 16, 1: 10, 3: 6}
    assert (lm1[1:3, 1:4] == 3).all() and (lm1[:, 0] == 1).all()
    lm2 = back.load_mask(1)
    assert int((lm2 == 2).sum()) == 6 and int((lm2 > 0).sum()) == 6
    assert back.image_path(0).is_file()


def test_coco_largest_label_max_images_and_captions_only(tmp_path: Path) -> None:
    images, caps, inst = _write_coco(tmp_path)
    obj = json.loads(inst.read_text())
    obj["annotations"][1]["iscrowd"] = 0  # now the person is the largest non-crowd instance
    inst.write_text(json.dumps(obj))
    ds = import_coco(
        images, tmp_path / "a", captions_json=None, instances_json=inst, max_images=1, progress=False
    )
    assert len(ds) == 1 and ds.records[0].label == 0 and ds.records[0].bbox == [0.0, 0.0, 2.0, 6.0]
    assert ds.records[0].captions == []
    only = import_coco(images, tmp_path / "b", captions_json=caps, instances_json=None, progress=False)
    assert only.classes == [] and [r.label for r in only.records] == [-1, -1, -1]
    assert all(r.mask is None for r in only.records) and only.records[0].split == "train"


def test_coco_errors(tmp_path: Path) -> None:
    images, _, inst = _write_coco(tmp_path)
    with pytest.raises(DatasetError, match="captions-json and/or --instances-json"):
        import_coco(images, tmp_path / "o", captions_json=None, instances_json=None, progress=False)
    with pytest.raises(DatasetError, match=r"nope\.json is missing: it should be a COCO captions file"):
        import_coco(
            images, tmp_path / "o", captions_json=tmp_path / "nope.json", instances_json=None, progress=False
        )
    bad = tmp_path / "bad.json"
    bad.write_text('{\n"images": [,]\n}')
    with pytest.raises(DatasetError, match=r"bad\.json: line 2: not valid JSON"):
        import_coco(images, tmp_path / "o", captions_json=None, instances_json=bad, progress=False)
    obj = json.loads(inst.read_text())
    obj["annotations"][2]["segmentation"]["size"] = [9, 9]
    inst.write_text(json.dumps(obj))
    ds = import_coco(images, tmp_path / "o", captions_json=None, instances_json=inst, progress=False)
    reasons = {s["path"]: s["reason"] for s in ds.meta["skipped"]}
    assert "RLE size [9, 9] differs" in reasons["000000000002.jpg"]


# ============================================================================ CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavise")
    add_import_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "imgs"
    _save(src / "a" / "1.png")
    _save(src / "b" / "2.png")
    (src / "b" / "3.png").write_bytes(b"")
    args = _parser().parse_args(["import-folder", str(src), "--out", str(tmp_path / "f"), "--quiet"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "2 images, 2 classes" in captured.out and "b/3.png" in captured.err and "empty" in captured.err

    cub = _write_cub(tmp_path / "cubroot")
    args = _parser().parse_args(
        [
            "import-cub",
            str(cub),
            "--out",
            str(tmp_path / "c"),
            "--captions",
            str(tmp_path / "cubroot" / "cvpr2016_cub"),
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    assert len(ProbeDataset.open(tmp_path / "c").records[0].captions) == 10

    images, caps, inst = _write_coco(tmp_path / "cocoroot")
    argv = [
        "import-coco",
        "--images",
        str(images),
        "--captions-json",
        str(caps),
        "--instances-json",
        str(inst),
    ]
    args = _parser().parse_args([*argv, "--out", str(tmp_path / "k"), "--max-images", "2", "--quiet"])
    assert args.func(args) == 0
    assert len(ProbeDataset.open(tmp_path / "k")) == 2

    (cub / "images.txt").unlink()
    args = _parser().parse_args(["import-cub", str(cub), "--out", str(tmp_path / "c2"), "--quiet"])
    assert args.func(args) == 2
    assert "images.txt is missing" in capsys.readouterr().err
