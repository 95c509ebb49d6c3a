"""Filters page: the filter table, cards and one filter's detail."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lavise_core.views.overlays import encode_jpeg, mosaic, outline
from lavise_core.views.workspace import StageMissing, Workspace, build_hint, placeholder_image

__all__ = [
    "LABEL_KINDS",
    "SORT_KEYS",
    "FilterDetail",
    "FilterInputs",
    "filter_card_image",
    "filter_detail",
    "filter_inputs_view",
    "filter_table",
    "label_accuracy",
    "region_level",
    "select_filters",
]


# =========================================================================== filters
def filter_table(ws: Workspace) -> Any:
    """One row per filter: ``filter, label, score, confident, concept_set, mean_activation, top_class,
    class_weight``.

    ``class_weight`` is ``max_c W[c, k] · mean phi_k`` (the largest mean contribution of filter k to a
    class logit); ``top_class`` is that class; ``concept_set`` the data set the label was measured on (with
    several concept sets composed, each filter's own: ``attrs["composed"]``). Returns a ``pandas.DataFrame``
    (cached by the workspace).
    """
    import pandas as pd

    def make():
        ws.require_probe()
        pooled = ws.array("probe/pooled")
        valid = ws.array("probe/valid")
        rows = np.asarray(valid, bool) if valid is not None else slice(None)
        mean = np.asarray(pooled[rows], np.float64).mean(0)
        Wc = ws.class_weight()
        W = np.asarray(Wc, np.float64) if Wc is not None else np.zeros((len(ws.classes), ws.channels))
        contrib = W * mean[None, :]  # (K, C)
        top_c = contrib.argmax(0)
        shown = ws.shown_labels()
        labels, scores, source, confident = shown.labels, shown.scores, shown.source, shown.confident
        df = pd.DataFrame(
            {
                "filter": np.arange(ws.channels),
                "label": labels,
                "score": np.round(scores, 4),
                "confident": confident,
                "concept_set": [shown.concepts_of(k) for k in range(ws.channels)],
                "mean_activation": np.round(mean, 4),
                "top_class": [ws.classes[int(c)] if Wc is not None else "" for c in top_c],
                "class_weight": np.round(contrib.max(0), 4),
            }
        )
        df.attrs["source"] = source
        df.attrs["composed"] = shown.composed
        df.attrs["concepts"] = shown.concepts
        return df

    ws.require_probe()
    table, err = ws._once("filter_table", make)
    if table is None:
        raise ValueError(err)
    return table


SORT_KEYS = {
    "label score": "score",
    "class importance": "class_weight",
    "mean activation": "mean_activation",
    "filter number": "filter",
}


def select_filters(
    table: Any,
    sort_by: str = "label score",
    concept: str = "",
    min_score: float = 0.0,
    class_name: str | None = None,
    confident_only: bool = False,
    ws: Workspace | None = None,
) -> Any:
    """Filter and sort the filter table (pure). ``class_name``: rank by ``W[c, k] · mean phi_k`` of that class."""
    df = table
    if concept.strip():
        df = df[df["label"].str.contains(concept.strip(), case=False, regex=False)]
    if min_score > 0:
        df = df[df["score"] >= min_score]
    if confident_only:
        df = df[df["confident"]]
    if class_name and ws is not None and ws.class_weight() is not None:
        c = ws.classes.index(class_name)
        W = np.asarray(ws.class_weight()[c], np.float64)
        contrib = W[df["filter"].to_numpy()] * df["mean_activation"].to_numpy()
        df = df.assign(class_weight=np.round(contrib, 4))
        df = df[df["class_weight"] > 0]
        return df.sort_values("class_weight", ascending=False, kind="stable")
    key = SORT_KEYS.get(sort_by, "score")
    return df.sort_values(key, ascending=key == "filter", kind="stable")


def region_level(ws: Workspace, k: int, maps: np.ndarray) -> float:
    """The activation level that outlines filter ``k``'s region on its top images: its Network-Dissection
    threshold (``probe/threshold``, the 0.995 quantile of its spatial activations over the probe set, the
    region the dissection and the label evaluation measure); without one, half the largest value in ``maps``."""
    thr = ws.array("probe/threshold")
    if thr is not None:
        return float(thr[k])
    return 0.5 * float(np.max(maps)) if np.size(maps) else 0.0


def filter_card_image(ws: Workspace, k: int, n: int = 4, tile: int = 96) -> bytes:
    """JPEG of a 2 × 2 mosaic of filter ``k``'s top-``n`` images, each with one outline around where the filter
    fires above :func:`region_level` (the image's own colours everywhere else).

    All tiles share that one level, so a weak tile shows a small outline or none. Cached per ``(k, n, tile)``
    in the workspace: the first call renders, later ones cost a dictionary lookup.
    """

    def make() -> bytes:
        idx = ws.array("probe/top_index")[k][:n]
        maps = np.asarray(ws.array("probe/top_maps")[k][:n], np.float32)
        level = region_level(ws, k, maps)
        tiles = []
        for i, a in zip(idx, maps, strict=True):
            if i < 0:
                tiles.append(placeholder_image(tile, ""))
                continue
            img = ws.record_image(int(i), side=tile)
            tiles.append(outline(img, a, level))
        return encode_jpeg(mosaic(tiles, cols=2, tile=tile, pad=1))

    return ws.cards.get((int(k), n, tile), make)


@dataclass
class FilterDetail:
    """Everything about one filter."""

    k: int
    label: str
    score: float
    top_images: list[tuple[bytes, int, float, str]]  # outlined image (JPEG), record, phi_k, class
    attributes: list[tuple[str, float]] | None
    attributes_note: str | None
    labels: list[tuple[str, float, str]] | None  # phrase, score, seen/unseen/vocabulary
    labels_note: str | None
    classes: list[tuple[str, float]]  # class, W[c, k], most positive and most negative
    activations: np.ndarray  # (N_valid,) pooled phi_k over the probe set
    quantiles: list[tuple[float, float]]
    threshold: float | None
    inside: float | None = None
    dissection: list[tuple[str, float]] | None = None  # concept, IoU with its annotated regions (fit split)
    dissection_note: str | None = None
    label_source: str = ""
    label_concepts: str = ""  # the data set the label was measured on (a lent concept set, or the probe set)
    #: with several concept sets composed: the set each row of ``dissection`` was measured on (else ``None``)
    dissection_sets: list[str] | None = None
    #: how often each label source is right on this bundle's held-out test images (eval/fidelity.json):
    #: {"dissection": share, "zero_shot": share, "pdf": share, "random": share}; empty without the fidelity stage
    accuracy: dict[str, float] = field(default_factory=dict)


#: plain words for the kind of a zero-shot label
LABEL_KINDS = {
    "seen": "annotated, trained on",
    "unseen": "annotated, held out",
    "vocabulary": "English word, never annotated",
}


def label_accuracy(ws: Workspace) -> dict[str, float]:
    """Share of filters whose label of each source is in their held-out ground truth (the fidelity stage)."""
    if not (Path(ws.bundle.root) / "eval" / "fidelity.json").is_file():
        return {}
    lab = ws.bundle.read_json("eval/fidelity").get("labels", {})
    keys = {
        "dissection": "dissection",
        "zero_shot": "zero_shot",
        "pdf": "pdf_top_attribute",
        "random": "random_concept",
    }
    return {k: float(lab[v]) for k, v in keys.items() if isinstance(lab.get(v), int | float)}


def filter_detail(ws: Workspace, k: int, n_images: int = 8, side: int = 192) -> FilterDetail:
    """Top images outlined where the filter fires (:func:`region_level`), attribute p.d.f., zero-shot labels, class weights, activation distribution.

    ``top_images`` holds JPEG bytes ``side`` pixels wide (shown at that width, so the page never re-encodes).
    Cached per ``(k, n_images, side)`` in the workspace: opening a filter again costs a lookup.
    """
    ws.require_probe()
    if not 0 <= k < ws.channels:
        raise ValueError(f"there is no filter {k}: this layer has filters 0..{ws.channels - 1}")
    return ws.details.get((int(k), n_images, side), lambda: _filter_detail(ws, int(k), n_images, side))


def _filter_detail(ws: Workspace, k: int, n_images: int, side: int) -> FilterDetail:
    idx = ws.array("probe/top_index")[k][:n_images]
    vals = ws.array("probe/top_value")[k][:n_images]
    maps = np.asarray(ws.array("probe/top_maps")[k][:n_images], np.float32)
    level = region_level(ws, k, maps)
    ds = ws.dataset()
    labels_all = ds.labels() if ds is not None else None
    tops = []
    for i, v, a in zip(idx, vals, maps, strict=True):
        if i < 0:
            continue
        img = ws.record_image(int(i), side=side)
        cls = ""
        if labels_all is not None and 0 <= labels_all[i] < len(ds.classes):
            cls = ds.classes[int(labels_all[i])]
        tops.append((encode_jpeg(outline(img, a, level)), int(i), float(v), cls))
    attrs, anote = None, None
    try:
        attrs = ws.textual().filter_top_attributes(k, 15)
    except StageMissing as e:
        anote = str(e)
    labs, lnote, inside = None, None, None
    labs = ws.zero_shot_labels(k, 10)
    if labs is None:
        lnote = (
            "this bundle has no LaViSE stage (zero-shot concepts) yet: build it with "
            f"`{build_hint(ws.bundle)}`"
        )
    else:
        inside = ws.filter_inside(k)
    classes: list[tuple[str, float]] = []
    if ws.class_weight() is not None:
        W = np.asarray(ws.class_weight()[:, k], np.float64)
        order = np.argsort(-W, kind="stable")
        pick = list(order[:8]) + [j for j in order[::-1][:4] if W[j] < 0 and j not in order[:8]]
        classes = [(ws.classes[int(j)], float(W[j])) for j in pick]
    valid = ws.array("probe/valid")
    act = np.asarray(ws.array("probe/pooled")[:, k], np.float32)
    if valid is not None:
        act = act[np.asarray(valid, bool)]
    q = ws.array("probe/quantiles")
    levels = ws.array("probe/quantile_levels")
    quant = [(float(lv_), float(v)) for lv_, v in zip(levels, q[k], strict=True)] if q is not None else []
    thr = ws.array("probe/threshold")
    shown = ws.shown_labels()
    labels, scores, source = shown.labels, shown.scores, shown.source
    dis, dnote, dsets = None, None, None
    try:
        d = ws.dissection()
        dis = d.labels(k, 10)
        dsets = d.label_sets(k, 10) if d.composed else None
    except StageMissing as e:
        dnote = str(e)
    return FilterDetail(
        k, labels[k], float(scores[k]), tops, attrs, anote, labs, lnote, classes, act, quant,
        float(thr[k]) if thr is not None else None, inside, dis, dnote, source, accuracy=label_accuracy(ws),
        label_concepts=shown.concepts_of(k), dissection_sets=dsets,
    )  # fmt: skip


# =========================================================================== what drives a filter
@dataclass(frozen=True)
class FilterInputs:
    """The filters of one lower layer that drive filter ``k`` most (issue 28's circuits).

    ``layer``: the layer they come from; ``layers``: every recorded layer below filter k's, nearest first;
    ``rows``: ``{filter, label, evidence, contribution, share, exact}`` strongest first, ``share`` = the
    contribution over the sum of the shown positive ones; ``images``: how many top images were averaged.
    """

    k: int
    layer: str
    layers: list[str]
    rows: list[dict[str, Any]]
    images: int


def filter_inputs_view(ws: Workspace, k: int, layer: str | None = None, n: int = 5) -> FilterInputs:
    """:meth:`~lavise_core.api.FilterInfo.inputs` of filter ``k`` from one lower recorded ``layer`` (default:
    the nearest below), cached per ``(k, layer, n)``; raises :class:`StageMissing` without the ``layers`` stage."""
    from lavise_core.explain.dissection.circuits import layer_labels, lower_layers

    def recorded_below() -> list[str]:  # nearest first; once per workspace, not on every rerun
        labels = layer_labels(ws.bundle, build_hint(ws.bundle))
        return lower_layers(ws.model().model, list(labels), ws.bundle.layer)[::-1]

    below = ws.details.get(("inputs", "layers below"), recorded_below)
    if not below:
        raise StageMissing(f"the `layers` stage recorded no layer below `{ws.bundle.layer}`")
    layer = layer if layer in below else below[0]

    def make() -> FilterInputs:
        found = ws.filters[k].inputs(n, layers=[layer])
        pos = sum(max(f.contribution, 0.0) for f in found) or 1.0
        rows = [
            {"filter": f.filter, "label": f.label or "", "evidence": f.evidence, "contribution": f.contribution,
             "share": max(f.contribution, 0.0) / pos, "exact": f.exact}
            for f in found
        ]  # fmt: skip
        top = np.asarray(ws.array("probe/top_index"))[k]
        return FilterInputs(k, layer, below, rows, int((top >= 0).sum()))

    return ws.details.get(("inputs", k, layer, n), make)
