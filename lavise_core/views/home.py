"""Home page: the bundle overview and each filter's best label."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lavise_core.views.workspace import (
    CONFIDENT_LIFT,
    CONFIDENT_SCORE,
    StageMissing,
    Workspace,
    build_hint,
    bundle_class_note,
    model_label,
)

__all__ = ["Overview", "confident_rule_short", "overview"]


# =========================================================================== overview
@dataclass
class Overview:
    """What the home page shows about one bundle."""

    title: str
    model: str
    layer: str
    dataset: str
    n_images: int
    n_classes: int
    n_filters: int
    accuracy: float | None
    confident_share: float | None
    confident_rule: str
    words: list[tuple[str, int, float]]  # (concept, filters whose best label it is, mean score)
    stages: dict[str, bool]
    messages: list[str] = field(default_factory=list)
    label_source: str = "none"
    confident_score: float | None = None  # the score threshold behind ``confident_share`` (LaViSE labels)
    class_note: str | None = None


def _filter_labels(ws: Workspace) -> tuple[list[str], np.ndarray, str, np.ndarray]:
    """Best label per filter, its score, the source, and the confident mask ``(C,)`` (computed once)."""
    value, err = ws._once("filter_labels", lambda: _compute_filter_labels(ws))
    if value is None:
        raise StageMissing(err)
    return value


def _compute_filter_labels(ws: Workspace) -> tuple[list[str], np.ndarray, str, np.ndarray]:
    c = ws.channels
    card = ws.bundle.manifest.get("model", {}).get("card", {})
    if card.get("architecture") == "synthbirds_siam" and len(card.get("attributes", [])) == c:
        return (
            list(card["attributes"]),
            np.ones(c, np.float32),
            "SIAM attribute (by design)",
            np.ones(c, bool),
        )
    if ws.has_dissection():  # ground-truth IoU on the fit split beats any word model
        from lavise_core.explain.dissection.labels import IOU_MIN

        d = ws.dissection()
        sc = np.asarray(d.label_scores[:, 0], np.float32)
        labels = [
            d.concepts[int(j)] if s >= IOU_MIN else "" for j, s in zip(d.label_ids[:, 0], sc, strict=True)
        ]
        return labels, sc, "dissection (IoU)", sc >= IOU_MIN
    table = ws.label_table()
    if table is not None:
        # read the labels directly (no torch / FAISS / encoder import: keeps the first page fast)
        ids_all, sc_all, phrases, _, _ = table
        ids = np.asarray(ids_all[:, 0])
        sc = np.asarray(sc_all[:, 0], dtype=np.float32)
        labels = [phrases[int(j)] if 0 <= j < len(phrases) else "" for j in ids]
        return labels, sc, "zero-shot (LaViSE)", sc >= CONFIDENT_SCORE
    if ws.has_textual():
        tx = ws.textual()
        pdf = np.asarray(tx.pdf)
        j = pdf.argmax(1)
        top = pdf[np.arange(c), j]
        lift = top * pdf.shape[1]
        return (
            [tx.vocabulary[int(t)] for t in j],
            top.astype(np.float32),
            "attribute p.d.f.",
            lift >= CONFIDENT_LIFT,
        )
    return [""] * c, np.zeros(c, np.float32), "none", np.zeros(c, bool)


def confident_rule_short(source: str) -> str:
    """One line saying when a filter's label counts as confident, for the label ``source``."""
    if source.startswith("dissection"):
        return "IoU ≥ 0.04 with the concept's annotated regions (Network Dissection)"
    if source.startswith("SIAM"):
        return "each SIAM map is trained to be one attribute"
    if source.startswith("zero"):
        return f"zero-shot vote score ≥ {CONFIDENT_SCORE}"
    if source and source != "none":
        return f"top p(t | f) ≥ {CONFIDENT_LIFT:g}× uniform"
    return "no labels yet"


def overview(ws: Workspace) -> Overview:
    """Model accuracy, filter count, share of filters with a confident concept, concept word counts."""
    ws.require_probe()
    m = ws.bundle.manifest
    from lavise_core.stages import REGISTRY

    # every stage a plain build makes, and the on-request ones this bundle has
    stages = {
        st.name: ws.bundle.stage_done(st.name)
        for st in REGISTRY
        if st.default or ws.bundle.stage_done(st.name)
    }
    msgs = []
    labels, scores, source, confident = _filter_labels(ws)
    if source == "none":
        msgs.append(
            f"No concept labels yet: build the textual and LaViSE stages with `{build_hint(ws.bundle)}`."
        )
    counts: Counter[str] = Counter()
    sums: dict[str, float] = {}
    for lab, s in zip(labels, scores, strict=True):
        if lab:
            counts[lab] += 1
            sums[lab] = sums.get(lab, 0.0) + float(s)
    words = [(w, n, sums[w] / n) for w, n in counts.most_common(60)]
    named = scores[np.array([bool(lab) for lab in labels], bool)] if len(labels) else scores
    spread = (
        f" On this layer the best-label scores range {named.min():.2f}–{named.max():.2f} "
        f"(median {np.median(named):.2f})."
        if named.size
        else ""
    )
    if source.startswith("dissection"):
        rule = (
            "the filter's map, thresholded at its top 0.5 % of activations, overlaps the concept's annotated "
            "regions with IoU ≥ 0.04 over the training images (Network Dissection; a re-initialised network "
            "reaches no such overlap)." + spread
        )
    elif source.startswith("zero"):
        rule = (
            f"the filter's best word has a zero-shot vote score ≥ {CONFIDENT_SCORE} (the activation-weighted "
            "mean similarity between the word and what the explainer sees in the filter's top images; "
            "0 = unrelated, about 0.5 = the best this explainer reaches)." + spread
        )
    elif source != "none":
        rule = (
            f"the filter's best attribute is at least {CONFIDENT_LIFT:g}× likelier than a uniform "
            "p.d.f. over the attributes would give." + spread
        )
    else:
        rule = "no labels yet"
    return Overview(
        title=ws.title,
        model=model_label(m["model"]["spec"]),
        layer=m["layer"],
        dataset=m["dataset"].get("name", "?"),
        n_images=int(m["dataset"].get("n", 0)),
        n_classes=len(ws.classes),
        n_filters=ws.channels,
        accuracy=m.get("stages", {}).get("probe", {}).get("accuracy"),
        confident_share=float(confident.mean()) if source != "none" else None,
        confident_rule=rule,
        words=words,
        stages=stages,
        messages=msgs,
        label_source=source,
        confident_score=CONFIDENT_SCORE if source.startswith("zero") else None,
        class_note=bundle_class_note(ws),
    )
