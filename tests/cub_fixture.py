"""The smallest valid CUB-200-2011 folder: two 8×6 images in two classes, two attributes, two parts.

Shared by the hostile-input tests (``tests/test_hostile_inputs.py``) and the fuzz harness (``bench/fuzz``),
which each replace one of :data:`CUB_FILES` with hostile bytes and expect ``import_cub`` to import or raise
``DatasetError``."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

CUB_GOOD = {
    "images.txt": "1 001.A/a.jpg\n2 002.B/b.jpg\n",
    "classes.txt": "1 001.A\n2 002.B\n",
    "image_class_labels.txt": "1 1\n2 2\n",
    "train_test_split.txt": "1 1\n2 0\n",
    "attributes.txt": "1 has_wing_color::red\n2 has_size::small_(5_-_9_in)\n",
    "attributes/image_attribute_labels.txt": "1 1 1 3 0.5\n2 2 1 4 1.0\n",
    "parts/parts.txt": "1 back\n2 beak\n",
    "parts/part_locs.txt": "1 1 2.0 3.0 1\n1 2 0 0 0\n2 1 1 1 1\n2 2 4 4 1\n",
    "bounding_boxes.txt": "1 0 0 4 3\n2 1 1 2 2\n",
}
CUB_FILES = list(CUB_GOOD)  # the annotation files, relative to the CUB_200_2011 folder


def write_tiny_cub(src: Path) -> Path:
    """Write (or restore) the folder at ``src`` (named like ``CUB_200_2011``): the images if missing, every
    annotation file always. Returns ``src``."""
    for i, rel in enumerate(["001.A/a.jpg", "002.B/b.jpg"], 1):
        path = src / "images" / rel
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 6), (i * 50, 0, 0)).save(path)
    for name, text in CUB_GOOD.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src
