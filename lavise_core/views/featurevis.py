"""The feature visualisation beside a filter's top images (Filters page): stored, or computed on demand."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lavise_core.views.serving import heavy_slot
from lavise_core.views.workspace import LRUCache, Workspace

__all__ = [
    "FilterVisualisation",
    "InversionView",
    "compute_filter_visualisation",
    "filter_visualisation",
    "inversion_layers",
    "invert_image",
]

ON_DEMAND_STEPS = 256


@dataclass
class FilterVisualisation:
    """``image`` PNG bytes; ``phi`` the filter's activation on it; ``top`` its top probe activation;
    ``ratio = phi / top``; ``others`` the mean of the other filters' activations on it, each scaled by their
    own top value (``None`` when computed on demand); ``source`` "stored" | "on demand"; ``steps``."""

    image: bytes
    phi: float
    top: float
    others: float | None
    source: str
    steps: int

    @property
    def ratio(self) -> float:
        return self.phi / max(self.top, 1e-6)


def _png(arr: np.ndarray, side: int) -> bytes:
    img = Image.fromarray(np.asarray(arr, np.uint8))
    if img.size[0] != side:
        img = img.resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # lossless either way; the default level took 2x as long
    return buf.getvalue()


def _cache(ws: Workspace) -> LRUCache:
    if not hasattr(ws, "_featurevis"):
        ws._featurevis = LRUCache(256)  # type: ignore[attr-defined]
    return ws._featurevis  # type: ignore[attr-defined]


def filter_visualisation(ws: Workspace, k: int, side: int = 192) -> FilterVisualisation | None:
    """Filter ``k``'s visualisation from the ``featurevis`` stage, or one computed earlier on demand, else ``None``."""
    ws.require_probe()
    if not 0 <= k < ws.channels:
        raise ValueError(f"there is no filter {k}: this layer has filters 0..{ws.channels - 1}")
    hit = _cache(ws).peek((int(k), side))
    if hit is not None:
        return hit
    if not ws.bundle.has("featurevis/images"):
        return None
    top = np.asarray(ws.array("probe/top_value")[:, 0], np.float32)
    acts = np.asarray(ws.array("featurevis/activations")[k], np.float32)
    norm = acts / np.maximum(top, 1e-6)
    others = float((norm.sum() - norm[k]) / max(len(norm) - 1, 1))
    steps = int(ws.bundle.read_json("featurevis/params").get("steps", 0))
    vis = FilterVisualisation(
        _png(ws.array("featurevis/images")[k], side), float(acts[k]), float(top[k]), others, "stored", steps
    )
    return _cache(ws).get((int(k), side), lambda: vis)


def compute_filter_visualisation(
    ws: Workspace, k: int, side: int = 192, report: Callable[[int, int], None] | None = None
) -> FilterVisualisation:
    """Visualise filter ``k`` now (:data:`ON_DEMAND_STEPS` steps at the model's input size), cached."""
    from lavise_core.explain.featurevis.visualisation import VisSettings, visualise

    ws.require_probe()
    with heavy_slot("this filter's visualisation"):  # bounded across sessions: busy = a message
        lm = ws.model()
        v = visualise(lm, int(k), ws.bundle.layer, settings=VisSettings(steps=ON_DEMAND_STEPS), report=report)
    top = np.asarray(ws.array("probe/top_value")[:, 0], np.float32)
    norm = v.activations[0] / np.maximum(top, 1e-6)
    others = float((norm.sum() - norm[k]) / max(len(norm) - 1, 1))
    vis = FilterVisualisation(
        _png(v.images[0], side), float(v.objective[0]), float(top[k]), others, "on demand", ON_DEMAND_STEPS
    )
    return _cache(ws).get((int(k), side), lambda: vis)


@dataclass
class InversionView:
    """The reconstruction of an image from one layer: ``image`` PNG, the relative feature error and its grey
    baseline, the layer."""

    image: bytes
    relative_error: float
    baseline_error: float
    layer: str


def inversion_layers(ws: Workspace) -> list[str]:
    """Layers of the bundle's model with a spatial map (the choices for an inversion), network order."""
    from lavise_core.models.networks import spatial_layers

    return list(spatial_layers(ws.model()))


def invert_image(
    ws: Workspace, image: Image.Image, layer: str, steps: int = 200, side: int = 256,
    report: Callable[[int, int], None] | None = None,
) -> InversionView:  # fmt: skip
    """Mahendran–Vedaldi inversion of ``image`` (what the network sees) from ``layer``'s map."""
    from lavise_core.explain.featurevis.inversion import invert

    with heavy_slot("the inversion"):  # bounded across sessions: busy = a message, not a slowdown
        lm = ws.model()
        inv = invert(lm, lm.preprocess(image), layer, steps=steps, report=report)
    return InversionView(_png(inv.image, side), inv.relative_error, inv.baseline_error, inv.layer)
