"""A 2-D map of the probe set (openTSNE, Poličar et al. 2019) from the pooled activations ``phi (N, C)``.

The pooled activations are what the classifier sees, so images the network finds alike land together.
``phi`` is standardised per filter, reduced to at most 50 principal components (``numpy`` SVD), then
embedded with openTSNE (perplexity 30, PCA initialisation, Barnes–Hut gradients below 20,000 points — faster than FFT there —, seeded). How faithful
the map is: the share of each image's 10 nearest neighbours on the map that have its class, beside the same
share in the full ``C``-dimensional space and the chance level (the class frequencies).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from lavise_core.pipeline.stages import StageContext

__all__ = [
    "STAGE",
    "THUMB_TILE",
    "build_datamap_stage",
    "build_stage",
    "embed_pooled",
    "neighbour_agreement",
    "write_thumbnails",
]

STAGE = "datamap"
THUMB_TILE = 40  # px per thumbnail in the hover sprite


def embed_pooled(
    pooled: np.ndarray, *, seed: int = 0, perplexity: float = 30.0, n_jobs: int = 2, dims: int = 50,
    n_iter: int = 500,
) -> np.ndarray:  # fmt: skip
    """``pooled (N, C)`` -> ``(N, 2)`` float32 t-SNE coordinates (see module docstring)."""
    from openTSNE import TSNE

    x = np.asarray(pooled, np.float64)
    if x.ndim != 2 or len(x) < 4:
        raise ValueError(f"need at least 4 rows of pooled activations (N, C), got shape {x.shape}")
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    if x.shape[1] > dims:
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        x = u[:, :dims] * s[:dims]
    tsne = TSNE(
        n_components=2, perplexity=min(perplexity, (len(x) - 1) / 3), initialization="pca", random_state=seed,
        n_jobs=n_jobs, negative_gradient_method="bh" if len(x) < 20000 else "fft", neighbors="exact" if len(x) < 1000 else "annoy",
        n_iter=n_iter, verbose=False,
    )  # fmt: skip
    return np.asarray(tsne.fit(x), np.float32)


def neighbour_agreement(points: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's ``k`` nearest neighbours (Euclidean) with its label (``labels < 0`` ignored)."""
    from sklearn.neighbors import NearestNeighbors

    keep = labels >= 0
    p, y = np.asarray(points)[keep], labels[keep]
    k = min(k, len(p) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(p).kneighbors(p)
    return float((y[idx[:, 1:]] == y[:, None]).mean())


def write_thumbnails(bundle, dataset, tile: int = THUMB_TILE, quality: int = 70) -> dict:
    """One JPEG mosaic ``map/thumbs.jpg`` of every probe image (row-major, image ``i`` at column ``i % cols``, row
    ``i // cols``; what the network sees, ``tile`` px; unreadable images grey) for the map's hover previews."""
    import io

    from PIL import Image

    from lavise_core.data.dataset import atomic_write_bytes
    from lavise_core.data.images import ImageLoadError

    lm_box = bundle.manifest.get("preprocessing", {})
    size, resize = int(lm_box.get("input_size", 224)), int(lm_box.get("resize", 224))
    n = len(dataset)
    cols = int(np.ceil(np.sqrt(n)))
    sheet = Image.new("RGB", (cols * tile, int(np.ceil(n / cols)) * tile), (200, 200, 200))
    for i in range(n):
        try:
            im = dataset.load_image(i)
        except ImageLoadError:
            continue
        if resize != size:  # the centre crop the network sees
            w, h = im.size
            side = min(w, h) * size / resize
            im = im.crop(((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2))
        sheet.paste(
            im.convert("RGB").resize((tile, tile), Image.BILINEAR), ((i % cols) * tile, (i // cols) * tile)
        )
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=quality)
    atomic_write_bytes(bundle.root / "map" / "thumbs.jpg", buf.getvalue())
    return {"tile": tile, "cols": cols, "bytes": len(buf.getvalue())}


def build_datamap_stage(
    bundle,
    dataset=None,
    *,
    seed: int = 0,
    n_jobs: int = 2,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Writes ``map/xy (N, 2)`` float32 (NaN for unreadable images) and ``map/params.json``; returns timing and the
    map's faithfulness (:func:`neighbour_agreement` on the map, in the full space, and chance)."""
    t0 = time.perf_counter()
    pooled = np.asarray(bundle.array("probe/pooled"), np.float32)
    valid = np.asarray(bundle.array("probe/valid"), bool)
    if report is not None:
        report(0, 1, f"data map: t-SNE of {int(valid.sum())} images")
    xy = np.full((len(pooled), 2), np.nan, np.float32)
    xy[valid] = embed_pooled(pooled[valid], seed=seed, n_jobs=n_jobs)
    bundle.write_array("map/xy", xy)
    bundle.write_json(
        "map/params", {"method": "openTSNE", "perplexity": 30, "seed": seed, "input": "probe/pooled"}
    )
    info = {"seconds": round(time.perf_counter() - t0, 2), "images": int(valid.sum())}
    labels = dataset.labels() if dataset is not None else None
    if labels is not None and len(labels) == len(valid) and (labels[valid] >= 0).any():
        y = labels[valid]
        freq = np.bincount(y[y >= 0]) / max((y >= 0).sum(), 1)
        info.update(
            knn_class_agreement_map=round(neighbour_agreement(xy[valid], y), 3),
            knn_class_agreement_full=round(neighbour_agreement(pooled[valid], y), 3),
            knn_class_agreement_chance=round(float((freq**2).sum()), 3),
        )
    if dataset is not None and len(dataset) == len(valid):
        thumbs = write_thumbnails(bundle, dataset)
        bundle.write_json("map/thumbs", thumbs)
        info["thumbnail_bytes"] = thumbs["bytes"]
    if report is not None:
        report(1, 1, "data map: done")
    return info


def build_stage(ctx: StageContext) -> dict:
    """The ``datamap`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_datamap_stage` with the build's settings and
    ``options['datamap']``."""
    return build_datamap_stage(ctx.bundle, ctx.dataset, report=ctx.report, **ctx.options_for("datamap"))
