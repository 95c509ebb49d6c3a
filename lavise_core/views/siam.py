"""SIAM bundles in the dashboard: what / where / how much on the Explain page, class attribute weights."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from lavise_core.api import ImageAnalysis
from lavise_core.views.overlays import overlay
from lavise_core.views.workspace import Workspace

__all__ = ["SiamView", "is_siam_bundle", "siam_class_weights", "siam_view"]


def is_siam_bundle(ws: Workspace) -> bool:
    """Whether the bundle was built from a SIAM model card (read from the manifest; no model load)."""
    return ws.bundle.manifest.get("model", {}).get("card", {}).get("architecture") == "synthbirds_siam"


@dataclass
class SiamView:
    sentence: str
    predicted: str
    target: str
    bias: float
    score: float
    waterfall: list[
        tuple[str, float]
    ]  # the largest |contributions|, then "other attributes" (sum of the rest)
    present: list[tuple[str, float]]
    where: list[tuple[str, float, Image.Image]]  # attribute, contribution, its map over the image


def siam_view(
    ws: Workspace, a: ImageAnalysis, target: str | None = None, n: int = 10, n_maps: int = 4
) -> SiamView:
    """What (attributes present), where (spatial contribution maps), how much (waterfall bias -> score)."""
    from lavise_core.explain.siam import explain_siam

    lm = ws.model()
    c = None if target is None else lm.class_names.index(target)
    ex = explain_siam(lm, lm.preprocess(a.image)[None], target=c, n_maps=n_maps)
    top = ex.contributions[:n]
    rest = sum(v for _, v in ex.contributions[n:])
    waterfall = [*top, ("other attributes", rest)] if len(ex.contributions) > n else list(top)
    where = [
        (attr, dict(ex.contributions)[attr], overlay(a.image, m.clip(min=0) if dict(ex.contributions)[attr] > 0
                                                     else (-m).clip(min=0), alpha=0.6, mask_below=0.1))
        for attr, m in ex.where.items()
    ]  # fmt: skip
    return SiamView(
        ex.sentence, ex.predicted, ex.target, ex.bias, ex.score, waterfall, ex.present[:12], where
    )


def siam_class_weights(ws: Workspace, cls: str, n: int = 12) -> list[tuple[str, float]]:
    """Class ``cls``'s ``n`` largest attribute weights (positive: evidence for, negative: against)."""
    import numpy as np

    from lavise_core.explain.siam import class_attribute_weights

    lm = ws.model()
    w = class_attribute_weights(lm)[lm.class_names.index(cls)]
    order = np.argsort(-np.abs(w), kind="stable")[:n]
    return [(lm.card["attributes"][a], float(w[a])) for a in order]
