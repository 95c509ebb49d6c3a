"""Natural sample photos shipped with scikit-image, usable offline as uploads or a tiny probe set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lavise_core.data.dataset import ImageRecord, ProbeDataset, write_dataset

__all__ = ["SAMPLE_PHOTOS", "sample_photo", "write_sample_photos"]

# scikit-image data function -> a short description
SAMPLE_PHOTOS = {
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee",
    "astronaut": "an astronaut",
    "rocket": "a rocket on its launch pad",
    "cat": "a cat (another photo)",
    "immunohistochemistry": "a stained tissue sample",
    "motorcycle_left": "a motorcycle",
    "hubble_deep_field": "a deep-space photo",
}


def sample_photo(name: str) -> Image.Image:
    """One of :data:`SAMPLE_PHOTOS` as an RGB PIL image (no download: shipped with scikit-image)."""
    from skimage import data

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"unknown sample {name!r}; choose from {', '.join(SAMPLE_PHOTOS)}")
    fn = getattr(data, name, None)
    if fn is None:
        raise ValueError(f"this scikit-image has no sample {name!r}")
    arr = fn()
    if isinstance(arr, tuple):  # stereo pairs return (left, right, disparity)
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def write_sample_photos(out: str | Path) -> ProbeDataset:
    """Write the available sample photos as a probe data set (one unlabeled class), for ImageNet demos."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for name in SAMPLE_PHOTOS:
        try:
            img = sample_photo(name)
        except (ValueError, OSError):
            continue  # not in this scikit-image release or its data files are missing
        rel = f"images/{name}.png"
        img.save(out / rel)
        records.append(ImageRecord(id=name, path=rel, split="test", captions=[SAMPLE_PHOTOS[name]]))
    return write_dataset(out, name="Sample photos", source="samples", classes=["photo"], records=records)
