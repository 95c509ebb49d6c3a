"""Data set page: concepts per class and background bias."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lavise_core.data.images import ImageLoadError
from lavise_core.views.overlays import encode_jpeg, mosaic
from lavise_core.views.workspace import BIAS_CONFIRM_SHARE, StageMissing, Workspace, build_hint

__all__ = [
    "ClassExamples",
    "DatasetReport",
    "background_views",
    "bias_table",
    "class_example_indices",
    "class_examples",
    "dataset_report",
]


# =========================================================================== data set
@dataclass
class DatasetReport:
    name: str
    n_images: int
    class_counts: list[tuple[str, int]]
    concept_freq: np.ndarray | None  # (K, T') share of class images with each concept
    concept_names: list[str]
    freq_note: str | None
    background: np.ndarray | None  # (K, B) counts of the ground-truth background per class
    background_names: list[str]
    spurious: dict | None  # the generator's switch, when the data set records it
    bias: list[dict] | None  # LaViSE dataset insight per class
    bias_note: str | None
    background_share: np.ndarray | None = None  # (K, B) % of each class's images on each background

    @property
    def background_chance(self) -> float | None:
        """The share (%) every cell of :attr:`background_share` would have with no class–background bias."""
        return None if not self.background_names else 100.0 / len(self.background_names)


def _shown(v: float | None, fmt: str) -> str:
    return "—" if v is None or v != v else format(v, fmt)


def bias_table(bias: list[dict]) -> tuple[list[dict], str | None]:
    """The bias findings as table rows narrow enough for the page, and a sentence for what a column left out
    would have said.

    The off-object share (of a class's most important filters, the share that fire less on the object than a
    uniform map would) is a column only where some class has one; where it is 0 for every class (the demo
    CNN: every filter fires at least 1.8× more on the bird than a uniform map) one sentence says so instead
    of a column of zeros. Missing values show as "—"."""
    offs = [b.get("off_object_share") for b in bias]
    measured = [v for v in offs if v is not None]
    show_off = any(v > 0 for v in measured)
    rows = []
    for b in bias:
        top = b.get("dominant_background")
        share = b.get("ground_truth_share")
        row = {
            "class": b["class"],
            "background AUC": _shown(b.get("background_auc"), ".2f"),
            "p": _shown(b.get("background_p"), ".2g"),
            "flagged": bool(b.get("background_bias")),
            "commonest background": "—" if not top else f"{top} ({_shown(share, '.0%')})",
        }
        if show_off:
            row["off-object share"] = _shown(b.get("off_object_share"), ".0%")
        row["top concepts"] = ", ".join(
            c["phrase"] + (" (off-object)" if c.get("off_object") else "") for c in b["concepts"][:3]
        )
        rows.append(row)
    if show_off:
        note = (
            "Off-object share: of the class's most important filters (by their contribution to its logit), the "
            "share that fire less on the object than a uniform map would."
        )
    elif measured:
        note = (
            "Every class's most important filters fire on the object itself (more than a uniform map would): "
            "no class leans on off-object filters."
        )
    else:
        note = None
    return rows, note


def background_views(ws: Workspace, ids: Sequence[int], size: int = 112) -> list[np.ndarray]:
    """Images ``ids`` with their object painted out, as the bias test saw them: ``(size, size, 3)`` uint8 each;
    unreadable images and images without a mask are skipped."""
    from lavise_core.explain.lavise.head import paint_out_object

    ds = ws.dataset()
    out = []
    for i in ids:
        try:
            lab = ds.load_mask(int(i))
            view = None if lab is None else paint_out_object(ds.load_image(int(i)), lab)
        except (ImageLoadError, OSError):
            continue
        if view is not None:
            out.append(np.asarray(view.resize((size, size))))
    return out


@dataclass
class ClassExamples:
    """A few images of one class of the probe set, as one strip."""

    name: str
    n_images: int  # how many images the class has
    strip: bytes  # JPEG: the examples side by side
    indices: list[int]  # the probe records shown


def class_example_indices(labels: np.ndarray, c: int, per_class: int) -> list[int]:
    """``per_class`` records of class ``c`` spread evenly over its images in data-set order (first and last
    included), so the examples are not the first few images the generator wrote; fewer when the class has fewer."""
    idx = np.flatnonzero(np.asarray(labels) == c)
    if idx.size == 0 or per_class < 1:
        return []
    if idx.size <= per_class:
        return [int(i) for i in idx]
    pos = np.linspace(0, idx.size - 1, per_class).round().astype(int)
    return [int(idx[p]) for p in pos]


def class_examples(ws: Workspace, per_class: int = 4, tile: int = 80) -> list[ClassExamples]:
    """For each class of the probe set (data-set order): :func:`class_example_indices` images as one strip of
    ``per_class`` tiles, each ``tile`` pixels square. The strips are cached in the workspace."""
    ds = ws.dataset()
    if ds is None:
        raise StageMissing(f"the probe data set of this bundle is unavailable: {ws.dataset_error()}")
    labels = np.asarray(ds.labels())
    out = []
    for c, name in enumerate(ds.classes):
        idx = class_example_indices(labels, c, per_class)
        if not idx:
            continue

        def make(idx: list[int] = idx) -> bytes:
            pics = [ws.record_image(i, side=tile) for i in idx]
            return encode_jpeg(mosaic(pics, cols=per_class, tile=tile, pad=2))

        strip = ws.cards.get(("class examples", c, per_class, tile), make)
        out.append(ClassExamples(str(name), int((labels == c).sum()), strip, idx))
    return out


def dataset_report(ws: Workspace, n_concepts: int = 20) -> DatasetReport:
    """Concept frequencies per class, ground-truth backgrounds, and the LaViSE bias findings."""
    ds = ws.dataset()
    if ds is None:
        raise StageMissing(f"the probe data set of this bundle is unavailable: {ws.dataset_error()}")
    labels = ds.labels()
    K = len(ds.classes)
    counts = np.bincount(labels[labels >= 0], minlength=K)
    freq, names, fnote = None, [], None
    if ws.bundle.has("textual/attribute_matrix"):
        A = np.asarray(ws.array("textual/attribute_matrix"), np.float32)
        vocab = ws.textual().vocabulary
        per = np.zeros((K, A.shape[1]), np.float32)
        for c in range(K):
            if counts[c]:
                per[c] = A[labels == c].mean(0)
        spread = per.max(0) - per.min(0)
        top = np.argsort(-spread, kind="stable")[:n_concepts]
        freq, names = per[:, top], [vocab[j] for j in top]
    else:
        fnote = f"concept frequencies need the textual stage: build it with `{build_hint(ws.bundle)}`"
    bgs = [r.meta.get("background") for r in ds.records]
    bg, bg_names = None, []
    if any(bgs):
        bg_names = sorted({b for b in bgs if b})
        bg = np.zeros((K, len(bg_names)), np.int64)
        pos = {b: j for j, b in enumerate(bg_names)}
        for lab, b in zip(labels, bgs, strict=True):
            if lab >= 0 and b:
                bg[lab, pos[b]] += 1
    spurious = ds.meta.get("spurious") if isinstance(ds.meta.get("spurious"), dict) else None
    bias, bnote = None, None
    try:
        from lavise_core.explain.lavise.explainer import insight_for_bundle

        lv = ws.lavise()
        bias = ws._once("insight", lambda: insight_for_bundle(ws.bundle, ds, lv))[0]
    except StageMissing as e:
        bnote = str(e)
    if bias is not None:
        bias = [dict(b) for b in bias]
        for b in bias:  # check each flag against the ground-truth backgrounds, when the data set has them
            b["ground_truth_share"], b["confirmed"] = None, bool(b.get("background_bias"))
            if bg is not None and b.get("class") in ds.classes:
                row = bg[ds.classes.index(b["class"])]
                share = float(row.max() / row.sum()) if row.sum() else 0.0
                b["ground_truth_share"] = share
                b["confirmed"] = bool(b.get("background_bias")) and share >= BIAS_CONFIRM_SHARE
    # bias rows also carry ``ground_truth_share`` (the class's most common true background) and
    # ``confirmed`` (flagged and that share ≥ BIAS_CONFIRM_SHARE; flagged when no ground truth exists)
    share = None
    if bg is not None:
        share = 100.0 * bg / np.maximum(bg.sum(1, keepdims=True), 1)
    return DatasetReport(
        ds.name, len(ds), [(ds.classes[c], int(counts[c])) for c in range(K)], freq, names, fnote,
        bg, bg_names, spurious, bias, bnote, share,
    )  # fmt: skip
