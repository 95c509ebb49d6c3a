import json

import numpy as np
import pytest

from lavise_core.data.dataset import DatasetError, ImageRecord, ProbeDataset, atomic_write_text, write_dataset


def _ds(tmp_path, records, classes=("a", "b")):
    return write_dataset(tmp_path, name="T", source="test", classes=list(classes), records=records)


def test_roundtrip_and_attribute_matrix(tmp_path):
    recs = [
        ImageRecord(id="x", path="x.png", split="train", label=0, attributes=["red crown", "long tail"]),
        ImageRecord(
            id="y", path="y.png", split="test", label=1, attributes=["long tail"], keypoints={"crown": [1, 2]}
        ),
    ]
    _ds(tmp_path, recs)
    ds = ProbeDataset.open(tmp_path)
    assert [r.to_json() for r in ds.records] == [r.to_json() for r in recs]
    assert ds.attribute_vocabulary() == ["long tail", "red crown"]
    np.testing.assert_array_equal(ds.attribute_matrix(["red crown", "long tail"]), [[1, 1], [0, 1]])
    assert ds.indices("test").tolist() == [1] and ds.labels().tolist() == [0, 1]


def test_content_hash_changes_with_manifest(tmp_path):
    ds = _ds(tmp_path, [ImageRecord(id="x", path="x.png", label=0)])
    h = ds.content_hash()
    _ds(tmp_path, [ImageRecord(id="x", path="x.png", label=1)])
    assert ProbeDataset.open(tmp_path).content_hash() != h


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(DatasetError, match="duplicate id 'x'"):
        _ds(tmp_path, [ImageRecord(id="x", path="a"), ImageRecord(id="x", path="b")])


def test_label_out_of_range(tmp_path):
    with pytest.raises(DatasetError, match=r"label 5 outside 0\.\.1"):
        _ds(tmp_path, [ImageRecord(id="x", path="a", label=5)])


def test_bad_manifest_line_names_file_and_line(tmp_path):
    _ds(tmp_path, [ImageRecord(id="x", path="a")])
    with open(tmp_path / "manifest.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(DatasetError, match=r"manifest.jsonl: line 2: not valid JSON"):
        ProbeDataset.open(tmp_path)


def test_unknown_field_and_bad_split(tmp_path):
    _ds(tmp_path, [ImageRecord(id="x", path="a")])
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "x", "path": "a", "colour": 1}) + "\n")
    with pytest.raises(DatasetError, match="unknown field"):
        ProbeDataset.open(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "x", "path": "a", "split": "dev"}) + "\n")
    with pytest.raises(DatasetError, match="split 'dev'"):
        ProbeDataset.open(tmp_path)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="not a probe data set"):
        ProbeDataset.open(tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "hello")
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def _two_images(tmp_path):
    from PIL import Image

    for name, colour in (("x.png", (200, 10, 10)), ("y.png", (10, 200, 10))):
        Image.new("RGB", (8, 6), colour).save(tmp_path / name)
    recs = [ImageRecord(id="x", path="x.png", label=0), ImageRecord(id="y", path="y.png", label=1)]
    return _ds(tmp_path, recs)


def _repaint(tmp_path, name, colour):
    from PIL import Image

    Image.new("RGB", (8, 6), colour).save(tmp_path / name)


def test_keep_decoded_decodes_each_image_once_and_hands_out_copies(tmp_path):
    import pickle

    from PIL import ImageDraw

    ds = _two_images(tmp_path)
    with ds.keep_decoded():
        first = ds.load_image(0)
        _repaint(tmp_path, "x.png", (0, 0, 255))  # the file changes on disk: the block keeps its first decode
        ImageDraw.Draw(first).rectangle((0, 0, 7, 5), fill=(0, 0, 0))  # a caller draws on what it got
        again = ds.load_image(0)
        assert again.getpixel((3, 3)) == (200, 10, 10)
        with ds.keep_decoded():  # nested: the same images; the inner exit frees nothing
            assert ds.load_image(0).getpixel((0, 0)) == (200, 10, 10)
        assert ds.load_image(0).getpixel((0, 0)) == (200, 10, 10)
        unpickled = pickle.loads(pickle.dumps(ds))  # carries no decoded images
        assert unpickled.load_image(0).getpixel((0, 0)) == (0, 0, 255)
    assert ds.load_image(0).getpixel((0, 0)) == (0, 0, 255)  # after the block: decoded from disk again


def test_keep_decoded_keeps_no_more_than_its_budget(tmp_path):
    ds = _two_images(tmp_path)
    with ds.keep_decoded(max_bytes=8 * 6 * 3):  # room for one 8 × 6 RGB image
        ds.load_image(0), ds.load_image(1)
        _repaint(tmp_path, "x.png", (1, 2, 3))
        _repaint(tmp_path, "y.png", (4, 5, 6))
        assert ds.load_image(0).getpixel((0, 0)) == (200, 10, 10)  # kept
        assert ds.load_image(1).getpixel((0, 0)) == (4, 5, 6)  # over the budget: decoded each time
