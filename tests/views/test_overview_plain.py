"""The Overview for a non-expert (issue 25): test-split accuracy, a worked example naming a real class, sample
images; exact values on the hand-built bundle of test_views and on a hand-built data set with two splits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from PIL import Image
from test_views import CLASSES, _bundle

from lavise_core import views
from lavise_core.views.home import sample_images, split_accuracy, worked_example


class _TwoSplits:
    """A workspace stand-in: 6 images, classes 0 0 1 1 2 -1, splits train test test train test test."""

    def __init__(self, logits, valid=None):
        recs = [SimpleNamespace(split=s) for s in ("train", "test", "test", "train", "test", "test")]
        labels = np.array([0, 0, 1, 1, 2, -1])
        self.ds = SimpleNamespace(records=recs, classes=["a", "b", "c"], labels=lambda: labels)
        self.arrays = {"probe/logits": logits, "probe/valid": valid}
        self.shown: list[tuple[int, int]] = []

    def dataset(self):
        return self.ds

    def array(self, name):
        return self.arrays[name]

    def record_image(self, i, side=192):
        self.shown.append((i, side))
        return Image.new("RGB", (side, side), (i * 40, 0, 0))


def _logits(preds):
    out = np.zeros((len(preds), 3), np.float32)
    out[np.arange(len(preds)), preds] = 1.0
    return out


def test_split_accuracy_counts_only_that_split():
    # test images 1, 2, 4 (5 has no label): predictions 0 (right), 0 (wrong), 2 (right)
    ws = _TwoSplits(_logits([0, 0, 0, 1, 2, 1]))
    acc, n = split_accuracy(ws, "test")
    assert (round(acc, 6), n) == (round(2 / 3, 6), 3)
    assert split_accuracy(ws, "train") == (1.0, 2)
    valid = np.array([1, 1, 0, 1, 1, 1], bool)  # image 2 failed to load: not counted
    assert split_accuracy(_TwoSplits(_logits([0, 0, 0, 1, 2, 1]), valid), "test") == (1.0, 2)
    assert split_accuracy(ws, "val") is None  # no such image
    assert split_accuracy(_TwoSplits(np.zeros((6, 5), np.float32)), "test") is None  # other classes


def test_overview_accuracy_is_the_test_split(tmp_path):
    ov = views.overview(views.Workspace(_bundle(tmp_path)))
    # every image of the tiny bundle is a test image; image 3 is misclassified
    assert (ov.accuracy, ov.accuracy_scope, ov.accuracy_images, ov.accuracy_all) == (0.75, "test", 4, 0.75)
    assert ov.example == f"The answer is one of its 2 classes, such as “{CLASSES[0]}”."


def test_worked_example_names_a_real_class():
    sentences = {
        "red bird": "A red bird has a red wing, unlike the blue bird.",
        "blue bird": "A blue bird has blue wings.",
    }
    assert worked_example(["red bird", "blue bird"], sentences) == (
        "What it has learned about one class, in its own words: “A blue bird has blue wings.”"
    )
    assert worked_example(["x", "y"], {"y": "ab", "x": "cd"}) == (  # equal lengths: the first class name
        "What it has learned about one class, in its own words: “cd”"
    )
    assert worked_example(["red bird"]) == "The answer is one of its 1 classes, such as “red bird”."
    assert worked_example([]) == ""


def test_sample_images_one_test_image_per_class():
    ws = _TwoSplits(_logits([0] * 6))
    out = sample_images(ws, n=2, side=8)
    assert [c for _, c in out] == ["a", "b"] and ws.shown == [(1, 8), (2, 8)]
    assert all(jpg[:2] == b"\xff\xd8" for jpg, _ in out)
    ws = _TwoSplits(_logits([0] * 6))
    assert [c for _, c in sample_images(ws)] == ["a", "b", "c"] and [i for i, _ in ws.shown] == [1, 2, 4]
    for r in ws.ds.records:  # no test split: the first image of each class
        r.split = "train"
    ws.shown.clear()
    assert [c for _, c in sample_images(ws)] == ["a", "b", "c"] and [i for i, _ in ws.shown] == [0, 2, 4]
