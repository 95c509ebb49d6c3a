"""Oramas et al. in the dashboard: what each class relies on (Classes page), where it looks (Explain page)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lavise_core.api import ImageAnalysis
from lavise_core.views.overlays import overlay
from lavise_core.views.workspace import StageMissing, Workspace

__all__ = ["ClassReliance", "ReliedFeature", "class_reliance", "oramas_heatmap"]


@dataclass
class ReliedFeature:
    feature: int
    layer: str
    filter: int
    weight: float  # w_c of the μ-lasso
    label: str  # the part its top activations overlap most ("none")
    patch: Image.Image  # average of its top-activating patches
    dissection: str | None = None  # the bundle's dissection label (explained layer only)


@dataclass
class ClassReliance:
    cls: str
    mu: float
    features: list[ReliedFeature]
    counts: list[tuple[str, int]]  # (layer, number of relevant features)
    note: str | None = None
    mu_curve: list[dict] = field(default_factory=list)


def _relevant(ws: Workspace):
    from lavise_core.explain.oramas import RelevantFeatures

    rf, err = ws._once("oramas", lambda: RelevantFeatures.from_bundle(ws.bundle))
    if rf is None:
        raise StageMissing(err)
    return rf


def class_reliance(ws: Workspace, cls: str, n: int = 12) -> ClassReliance:
    """Class ``cls``'s relevant features (μ-lasso weight order) with their mean patch and part label."""
    from lavise_core.explain.oramas import OramasError

    rf = _relevant(ws)
    c = rf.classes.index(cls)
    info = ws.bundle.read_json("oramas/info")
    order = {j: i for i, j in enumerate(info["relevant"])}
    patches = ws.array("oramas/patches")
    counts = [(layer, int(k)) for layer, k in zip(rf.layers, rf.counts_by_layer()[c], strict=True) if k]
    try:
        idx = rf.relevant(c)
    except OramasError as e:
        return ClassReliance(cls, rf.mu, [], counts, str(e), info.get("mu_curve", []))
    dis = None
    if ws.has_dissection():
        dis = ws.shown_labels().labels
    top = rf.layers[-1] if ws.layer in ("features", rf.layers[-1]) else None  # the explained layer's filters
    out = []
    for j in idx[:n]:
        layer, k = rf.locate(int(j))
        label = dis[k] if dis is not None and layer == top else None
        out.append(
            ReliedFeature(
                int(j), layer, k, float(rf.weights[c, j]), rf.labels.get(int(j), "none"),
                Image.fromarray(np.asarray(patches[order[int(j)]])), label,
            )
        )  # fmt: skip
    return ClassReliance(cls, rf.mu, out, counts, None, info.get("mu_curve", []))


def oramas_heatmap(ws: Workspace, a: ImageAnalysis, target: str | None = None) -> tuple[Image.Image, str]:
    """Oramas et al.'s explanation of ``a``: the top 3 relevant features back-projected, pixel-wise max.

    Cached per image and target in the workspace: a rerun on the same image costs a lookup."""
    return ws.maps.get(("oramas", a.digest, target), lambda: _oramas_heatmap(ws, a, target))


def _oramas_heatmap(ws: Workspace, a: ImageAnalysis, target: str | None) -> tuple[Image.Image, str]:
    from lavise_core.explain.oramas import explain_oramas

    rf = _relevant(ws)
    lm = ws.model()
    x = lm.preprocess(a.image)[None]
    c = None if target is None else rf.classes.index(target)
    heat, feats, c = explain_oramas(lm, rf, x, target=c)
    parts = ", ".join(f"{rf.locate(j)[0]} #{rf.locate(j)[1]} ({rf.labels.get(j, 'none')})" for j, _ in feats)
    caption = (
        f"Oramas et al.: the {len(feats)} relevant features of “{rf.classes[c]}” most active here ({parts}), "
        "each back-projected to the image (guided backprop, strided-conv fix), combined by pixel-wise max."
    )
    return overlay(a.image, _for_display(heat), alpha=0.6, mask_below=0.1), caption


def _for_display(heat: np.ndarray, sigma: float = 1.5, q: float = 0.99) -> np.ndarray:
    """Back-projections are sparse (single pixels): blurred a little and scaled to their ``q`` quantile so the
    overlay shows where they are; the protocol scores the raw heatmap."""
    from scipy.ndimage import gaussian_filter

    h = gaussian_filter(np.asarray(heat, np.float32), sigma)
    top = float(np.quantile(h, q))
    return np.clip(h / top, 0, 1) if top > 0 else h
