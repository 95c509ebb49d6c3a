"""The Explain page's pure rules (lavise_core.views.explain): which probe images it offers, how it names them,
and the predicted class it reads without explaining."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from PIL import Image

from lavise_core import views
from lavise_core.data.dataset import ImageRecord, write_dataset


def _dataset(tmp_path, splits: list[str], labels: list[int] | None = None):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    records = []
    for i, split in enumerate(splits):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / f"images/{i}.png")
        label = labels[i] if labels else i % 2
        records.append(ImageRecord(id=f"im{i}", path=f"images/{i}.png", label=label, split=split))
    return write_dataset(root, name="tiny", source="test", classes=["crow", "wren"], records=records)


def test_probe_test_images_are_the_test_split_in_order(tmp_path):
    ds = _dataset(tmp_path, ["train", "test", "val", "test", "train", "test"])
    assert views.probe_test_images(ds) == [1, 3, 5]
    assert views.probe_test_images(ds, limit=2) == [1, 3]


def test_probe_test_images_without_a_test_split_are_every_image(tmp_path):
    ds = _dataset(tmp_path, ["train", "val", "train"])
    assert views.probe_test_images(ds) == [0, 1, 2]


def test_probe_test_images_stop_at_the_limit(tmp_path):
    ds = _dataset(tmp_path, ["test"] * (views.PROBE_CHOICES + 5))
    assert views.probe_test_images(ds) == list(range(views.PROBE_CHOICES))


def test_probe_test_images_on_the_colour_fixture(colour_dataset):
    # every record is in the (default) test split; the unreadable one too: the choice opens no image
    assert views.probe_test_images(colour_dataset) == list(range(7))


def test_probe_image_label_and_class(tmp_path):
    ds = _dataset(tmp_path, ["test", "test"], labels=[1, -1])
    assert views.probe_image_class(ds, 0) == "wren"
    assert views.probe_image_label(ds, 0) == "#0 im0 (wren)"
    assert views.probe_image_class(ds, 1) is None  # unlabelled
    assert views.probe_image_label(ds, 1) == "#1 im1 (?)"


def test_predicted_class_is_the_first_best_class():
    ws = SimpleNamespace(classes=["a", "b", "c"])

    def analysis(probs):
        return SimpleNamespace(probs=np.asarray(probs, np.float32))

    assert views.predicted_class(ws, analysis([0.1, 0.7, 0.2])) == "b"
    assert views.predicted_class(ws, analysis([0.4, 0.2, 0.4])) == "a"  # ties: the first, as explain() does
