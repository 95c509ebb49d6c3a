"""Data set page: example images of each class (issue 25), exact picks on hand-built labels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from test_views import CLASSES, _bundle

from lavise_core import views
from lavise_core.views.dataset import class_example_indices


def test_class_example_indices_spread_evenly():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0, 0, 2, 0, -1])  # class 0 at 0 2 3 5 6 7 8 10
    assert class_example_indices(labels, 0, 4) == [0, 3, 7, 10]  # positions 0, 2, 5, 7 of 8
    assert class_example_indices(labels, 1, 4) == [1, 4]  # fewer images than asked: all of them
    assert class_example_indices(labels, 2, 1) == [9]
    assert class_example_indices(labels, 3, 4) == [] and class_example_indices(labels, 0, 0) == []


def test_class_examples_on_the_tiny_bundle(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))  # 4 images of 16 px, classes 0 0 1 1
    ex = views.class_examples(ws, per_class=4, tile=10)
    assert [(e.name, e.n_images, e.indices) for e in ex] == [(CLASSES[0], 2, [0, 1]), (CLASSES[1], 2, [2, 3])]
    strip = Image.open(io.BytesIO(ex[0].strip))
    assert strip.format == "JPEG" and strip.size == (4 * 10 + 5 * 2, 10 + 2 * 2)  # 4 tiles, 2 px padding
    assert views.class_examples(ws, per_class=4, tile=10)[0].strip is ex[0].strip  # cached
