"""Shared helpers for the benchmarks: a reproducible image folder made from the bundled sample photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lavise_core.data.dataset import ImageRecord, ProbeDataset, write_dataset
from lavise_core.data.samples import SAMPLE_PHOTOS, sample_photo


def photo_crops_dataset(out: Path, n: int, size: int = 256, seed: int = 0) -> ProbeDataset:
    """``n`` JPEG crops (``size``²) of the scikit-image sample photos, deterministic from ``seed``."""
    if (out / "manifest.jsonl").is_file():
        ds = ProbeDataset.open(out)
        if len(ds) == n:
            return ds
    rng = np.random.default_rng(seed)
    photos = []
    for name in SAMPLE_PHOTOS:
        try:
            im = sample_photo(name)
        except (ValueError, OSError):
            continue
        if min(im.size) >= size:
            photos.append(im)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        im = photos[i % len(photos)]
        x = int(rng.integers(0, im.size[0] - size + 1))
        y = int(rng.integers(0, im.size[1] - size + 1))
        rel = f"images/{i:05d}.jpg"
        im.crop((x, y, x + size, y + size)).save(out / rel, quality=90)
        records.append(ImageRecord(id=f"{i:05d}", path=rel))
    return write_dataset(out, name=f"photo crops {n}", source="bench", classes=[], records=records)
