"""Explain page: an uploaded image's prediction explained (through :meth:`lavise_core.api.Explainer.explain`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lavise_core.api import ImageAnalysis
from lavise_core.data.dataset import ProbeDataset
from lavise_core.views.overlays import overlay, relative_to
from lavise_core.views.workspace import Workspace

__all__ = [
    "PROBE_CHOICES",
    "FilterMap",
    "ImageAnalysis",
    "ImageExplanation",
    "analyse_image",
    "explain_image",
    "filter_choices",
    "filter_map",
    "predicted_class",
    "probe_image_class",
    "probe_image_label",
    "probe_test_images",
]

#: at most this many probe images are offered to explain
PROBE_CHOICES = 300


def analyse_image(
    ws: Workspace, source: bytes | Image.Image, name: str = "the uploaded file"
) -> ImageAnalysis:
    """Load (raises :class:`~lavise_core.data.images.ImageLoadError` with a user message) and run the model once."""
    return ws.analyse(source, name=name)


def probe_test_images(ds: ProbeDataset, limit: int = PROBE_CHOICES) -> list[int]:
    """The probe images offered to explain: the first ``limit`` of the test split, in data set order
    (every image when the data set has no test split)."""
    test = [i for i, r in enumerate(ds.records) if r.split == "test"] or list(range(len(ds)))
    return test[:limit]


def probe_image_class(ds: ProbeDataset, i: int) -> str | None:
    """The true class name of probe image ``i`` (``None`` when its label is not one of the classes)."""
    label = ds.records[i].label
    return ds.classes[label] if 0 <= label < len(ds.classes) else None


def probe_image_label(ds: ProbeDataset, i: int) -> str:
    """``#i id (true class)``: how the probe image choice names image ``i``."""
    truth = probe_image_class(ds, i)
    return f"#{i} {ds.records[i].id} ({'?' if truth is None else truth})"


def predicted_class(ws: Workspace, a: ImageAnalysis) -> str:
    """The network's class for ``a`` (what :func:`explain_image` reports as ``predicted``), without explaining."""
    return ws.classes[int(np.argsort(-a.probs, kind="stable")[0])]


@dataclass
class ImageExplanation:
    """Predictions, sentence, contrast, attribute chips with the chosen grounding, contributing filters."""

    predictions: list[tuple[str, float]]
    predicted: str
    target: str
    sentence: str | None
    contrast: str | None
    attributes: list[tuple[str, float]]
    attribute: str | None
    heatmap: Image.Image
    heatmap_caption: str
    contributions: list[tuple[int, float, str]]  # filter, phi_k W[c, k], its label
    zero_shot: list[tuple[str, float]] | None
    notes: list[str] = field(default_factory=list)
    in_distribution: bool | None = None
    ood_message: str | None = None  # plain words: does the image look like the probe images?
    method: str = "guo"  # how the sentence was built ("evidence": attribute detectors; "guo": eq. 5–6)
    evidence: list[str] = field(default_factory=list)  # one line of plain words per attribute named


def explain_image(
    ws: Workspace,
    a: ImageAnalysis,
    target: str | None = None,
    why_not: str | None = None,
    attribute: str | None = None,
    n_contrib: int = 10,
) -> ImageExplanation:
    """Explain ``a`` for class ``target`` (default: the prediction); ``why_not``: a contrast class."""
    ans = ws.explain(a, target=target, why_not=why_not, n_contributions=n_contrib)
    best = ws.shown_labels().labels
    contributions = [(k, v, str(best[k])) for k, v in ans.contributions]
    names = {t for t, _ in ans.attributes}
    attribute = (attribute if attribute in names else ans.attributes[0][0]) if ans.attributes else None
    heat, caption = ans.heatmap(attribute)
    hm = overlay(a.image, heat, alpha=0.6, mask_below=0.1)
    # the page says both in its own words: the upload check's verdict and that the guess is unreliable
    notes = [
        n
        for n in ans.notes
        if (a.ood is None or n != a.ood.message) and (ans.reliable or "unreliable" not in n)
    ]
    evidence = [
        f"{e.phrase}: detected by filters {', '.join(f'#{k}' for k, _ in e.filters)} (this detector is right "
        f"{e.precision:.0%} of the time on held-out training images); they add {e.contribution:+.2f} to the "
        f"{ans.target} score"
        for e in ans.evidence
    ]
    return ImageExplanation(
        ans.predictions, ans.predicted, ans.target, ans.sentence, ans.contrast, ans.attributes, attribute, hm,
        caption, contributions, ans.zero_shot, notes, ans.in_distribution, None if a.ood is None else a.ood.message,
        ans.method, evidence,
    )  # fmt: skip


@dataclass
class FilterMap:
    """Where filter ``k`` fires on an analysed image.

    ``overlay``: the filter's spatial map ``A_k (h, w)`` on the image, coloured on the filter's own scale (1 =
    its peak on its strongest probe image, so weak firing looks weak); ``peak``: ``max A_k`` here; ``reference``:
    that probe peak; ``mean``: ``phi_k`` (the spatial mean the classifier reads); ``percentile``: share of probe
    images with a lower ``phi_k`` (None without pooled probe activations); ``caption``: plain words.
    """

    filter: int
    label: str
    overlay: Image.Image
    peak: float
    reference: float
    mean: float
    percentile: float | None
    caption: str


def filter_choices(ws: Workspace, ex: ImageExplanation) -> list[int]:
    """The filters offered for :func:`filter_map`: the contributing ones first (the top one is the default),
    then every other filter of the layer in index order."""
    first = [int(k) for k, _, _ in ex.contributions]
    return first + [k for k in range(ws.channels) if k not in set(first)]


def filter_map(ws: Workspace, a: ImageAnalysis, k: int) -> FilterMap:
    """Filter ``k``'s spatial map over ``a.image`` with its label and how strongly it fires (ValueError for a bad
    filter index)."""
    maps = np.asarray(a.maps, np.float32)
    if maps.ndim != 3:
        raise ValueError(f"the image's activations are not spatial maps (C, h, w): shape {maps.shape}")
    if not 0 <= int(k) < maps.shape[0]:
        raise ValueError(f"there is no filter {k}: this layer has filters 0..{maps.shape[0] - 1}")
    k = int(k)
    heat = maps[k]
    peak, mean = float(heat.max()), float(heat.mean())
    top = ws.array("probe/top_maps")
    reference = float(np.asarray(top[k][0], np.float32).max()) if top is not None else 0.0
    if not reference > 0:
        reference = peak if peak > 0 else 1.0
    pooled = ws.array("probe/pooled")
    percentile = None
    if pooled is not None:
        col = np.asarray(pooled[:, k], np.float32)
        valid = ws.array("probe/valid")
        if valid is not None:
            col = col[np.asarray(valid, bool)]
        percentile = float((col < mean).mean()) if col.size else None
    label = str(ws.shown_labels().labels[k])
    img = overlay(a.image, heat, alpha=0.65, normalize=relative_to(reference), mask_below=0.1)
    name = f"Filter #{k}" + (f" (“{label}”)" if label else " (no label)")
    if peak <= 0:
        words = "does not fire anywhere on this image"
    else:
        share = peak / reference
        strength = "strongly" if share >= 0.5 else "weakly" if share >= 0.15 else "barely"
        words = f"fires {strength} here: its peak is {share:.0%} of its peak on its strongest probe image"
    tail = ""
    if percentile is not None:
        tail = (
            "; its mean activation is higher than on every probe image"
            if percentile >= 1
            else f"; its mean activation is higher than on {percentile:.0%} of the probe images"
        )
    caption = f"{name} {words}{tail}. Colour: 0 (transparent) to that probe peak (pale yellow); below 10 % uncoloured."
    return FilterMap(k, label, img, peak, reference, mean, percentile, caption)
