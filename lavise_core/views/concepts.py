"""Concepts page: free-text concept search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lavise_core.views.overlays import encode_jpeg, mute, outline
from lavise_core.views.workspace import Workspace

__all__ = ["GROUNDING_LEVEL", "WEAK_FADE", "WEAK_SCALE", "ConceptView", "concept_choices", "concept_view"]

#: the outline on a concept's images encloses where the grounding map reaches this share of its maximum
GROUNDING_LEVEL = 0.5
#: a weak answer's images are this fraction of the requested width and faded by :func:`mute` this much
WEAK_SCALE = 2 / 3
WEAK_FADE = 0.6


# =========================================================================== concepts
@dataclass
class ConceptView:
    """Answer to a concept query, with its images outlined where the matching filters fire together."""

    text: str
    status: str
    suggestions: list[tuple[str, float]]
    filters: list[tuple[int, float, str, float]]  # filter, match score, its best label, query's vote score
    images: list[tuple[bytes, int, float, str]]  # outlined image (JPEG), record, score, class
    confident: bool = True
    message: str = ""
    weak: bool = False
    method: str = "zero-shot"
    image_width: int = 180  # the pixels the images are rendered at (smaller for a weak answer)


def concept_choices(ws: Workspace) -> list[tuple[str, str]]:
    """Data set concepts for the suggestion box: ``[(phrase, "seen" | "zero-shot" | "annotated")]``."""
    if not ws.has_lavise() and ws.has_dissection():
        d = ws.dissection()
        return [(c, "annotated") for c, part in zip(d.concepts, d.is_part, strict=True) if not part]
    lv = ws.lavise()
    return [(p, "seen") for p in lv.seen] + [(p, "zero-shot") for p in lv.unseen]


def concept_view(
    ws: Workspace, text: str, n_filters: int = 8, n_images: int = 8, side: int = 180
) -> ConceptView:
    """Free text -> matching filters (cosine with their embeddings), images where they fire, grounding maps.

    ``images`` holds JPEG bytes ``side`` pixels wide, or, for a weak answer, ``WEAK_SCALE · side`` wide and
    faded by ``WEAK_FADE`` (:func:`~lavise_core.views.overlays.mute`), so a guess does not look like a finding.
    Cached per ``(text, n_filters, n_images, side)``.
    """
    key = (" ".join(str(text).split()).lower(), n_filters, n_images, side)
    return ws.queries.get(key, lambda: _concept_view(ws, text, n_filters, n_images, side))


def _concept_view(ws: Workspace, text: str, n_filters: int, n_images: int, side: int) -> ConceptView:
    from lavise_core.explain.lavise.query import grounding_heatmap

    res = ws.query(text, n=n_filters, n_images=n_images)
    best = ws.shown_labels().labels
    filters = [
        (int(k), float(s), str(best[k]), float(ls))
        for k, s, ls in zip(res.filters, res.scores, res.label_scores, strict=True)
    ]
    ds = ws.dataset()
    images = []
    width = round(side * WEAK_SCALE) if res.weak else side
    if len(res.images):
        maps = ws.record_maps([int(i) for i in res.images])
        w = res.weights
        for i, s in zip(res.images, res.image_scores, strict=True):
            img = ws.record_image(int(i), side=width)
            heat = grounding_heatmap(maps[int(i)].astype(np.float32), res.filters, w)
            cls = ""
            if ds is not None and 0 <= ds.records[int(i)].label < len(ds.classes):
                cls = ds.classes[ds.records[int(i)].label]
            pic = outline(img, heat, GROUNDING_LEVEL)
            images.append((encode_jpeg(mute(pic, WEAK_FADE) if res.weak else pic), int(i), float(s), cls))
    status = {"unseen": "zero-shot (held out in training)", "seen": "seen in training"}.get(
        res.status, res.status
    )
    return ConceptView(
        res.text,
        status,
        res.suggestions,
        filters,
        images,
        res.confident,
        res.message,
        res.weak,
        res.method,
        width,
    )
