"""Home page: the bundle overview and each filter's best label."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lavise_core.api import SOURCE_DISSECTION, SOURCE_SIAM, SOURCE_ZERO_SHOT
from lavise_core.explain.dissection.labels import IOU_MIN
from lavise_core.views.overlays import encode_jpeg
from lavise_core.views.workspace import (
    CONFIDENT_LIFT,
    CONFIDENT_SCORE,
    Workspace,
    build_hint,
    bundle_class_note,
    model_label,
)

__all__ = [
    "Overview",
    "confident_rule_short",
    "overview",
    "sample_images",
    "split_accuracy",
    "word_cloud_html",
    "word_colour",
    "worked_example",
]

NEUTRAL = "#57534e"  # the colour of a word that names no colour


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
    accuracy: float | None  # on the test split where the data set has one (``accuracy_scope``)
    confident_share: float | None
    confident_rule: str
    words: list[tuple[str, int, float]]  # (concept, filters whose best label it is, mean score)
    stages: dict[str, bool]
    messages: list[str] = field(default_factory=list)
    label_source: str = "none"
    confident_score: float | None = None  # the score threshold behind ``confident_share`` (LaViSE labels)
    class_note: str | None = None
    accuracy_scope: str = "all"  # "test": held-out test images; "all": every probe image (no test split)
    accuracy_images: int = 0  # how many images ``accuracy`` is measured on
    accuracy_all: float | None = None  # on every probe image, training images included
    example: str = ""  # the first-visit path's worked example (:func:`worked_example`)


def confident_rule_short(source: str) -> str:
    """One line saying when a filter's label counts as confident, for the label ``source``."""
    if source == SOURCE_DISSECTION:
        return (
            f"where it fires overlaps the concept's annotated pixels enough. Enough: IoU ≥ {IOU_MIN:g} (Network "
            "Dissection)"
        )
    if source == SOURCE_SIAM:
        return "each SIAM map is trained to be one attribute"
    if source == SOURCE_ZERO_SHOT:
        return f"zero-shot vote score ≥ {CONFIDENT_SCORE}"
    if source and source != "none":
        return (
            f"its top attribute is at least {CONFIDENT_LIFT:g}× more likely than chance where it fires. Chance: "
            "1 / T over its T attributes, in Guo et al.'s p(t | f)"
        )
    return "no labels yet"


def split_accuracy(ws: Workspace, split: str = "test") -> tuple[float, int] | None:
    """The network's accuracy on the probe images of one ``split`` (argmax of ``probe/logits`` against the
    images' labels, valid and labelled images only) and how many images that is; ``None`` when the data set
    has no such image or its classes are not the network's outputs (the probe stage's rule)."""
    ds = ws.dataset()
    logits = ws.array("probe/logits")
    if ds is None or logits is None or np.shape(logits)[1] != len(ds.classes):
        return None
    labels = np.asarray(ds.labels())
    valid = ws.array("probe/valid")
    keep = np.asarray(valid, bool) if valid is not None else np.ones(len(labels), bool)
    keep = keep & (labels >= 0) & np.array([r.split == split for r in ds.records], bool)
    if not keep.any():
        return None
    preds = np.asarray(logits).argmax(1)
    return float((preds[keep] == labels[keep]).mean()), int(keep.sum())


def worked_example(classes: Sequence[str], sentences: Mapping[str, str] | None = None) -> str:
    """The first-visit path's example of an explanation, naming a real class of the bundle: the shortest of
    the class descriptions the sentence evaluation wrote (``eval/sentences``; ties by class name), else the
    first class's name, else no class at all."""
    if sentences:
        text = min(sentences.items(), key=lambda kv: (len(kv[1]), kv[0]))[1]
        return f"What it has learned about one class, in its own words: “{text}”"
    if classes:
        return f"The answer is one of its {len(classes)} classes, such as “{classes[0]}”."
    return ""


def sample_images(ws: Workspace, n: int = 6, side: int = 128) -> list[tuple[bytes, str]]:
    """A few probe images to show what the network sees: the first test image (the first image where the
    data set has no test split) of each of the first ``n`` classes that have one, as JPEG bytes at most
    ``side`` pixels, with the class name."""
    ds = ws.dataset()
    if ds is None:
        return []
    labels = np.asarray(ds.labels())
    has_test = any(r.split == "test" for r in ds.records)
    first: dict[int, int] = {}
    for i, r in enumerate(ds.records):
        c = int(labels[i])
        if c >= 0 and c not in first and (r.split == "test" or not has_test):
            first[c] = i
    picks = [(c, first[c]) for c in sorted(first)][:n]
    return [(encode_jpeg(ws.record_image(i, side=side)), str(ds.classes[c])) for c, i in picks]


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
    shown = ws.shown_labels()
    labels, scores, source, confident = shown.labels, shown.scores, shown.source, shown.confident
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
    if source == SOURCE_DISSECTION:
        rule = (
            "where the filter fires most (its top 0.5 % of activations) overlaps the concept's annotated pixels on "
            "the training images enough to name it (a re-initialised network reaches no such overlap). Enough: an "
            f"overlap (IoU, Network Dissection) of {IOU_MIN:g} or more." + spread
        )
    elif source == SOURCE_ZERO_SHOT:
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
    all_acc = m.get("stages", {}).get("probe", {}).get("accuracy")
    test = split_accuracy(ws, "test")
    sentences = None
    if (Path(ws.bundle.root) / "eval" / "sentences.json").is_file():
        sentences = ws.bundle.read_json("eval/sentences").get("descriptions", {}).get("sentences") or None
    return Overview(
        title=ws.title,
        model=model_label(m["model"]["spec"]),
        layer=m["layer"],
        dataset=m["dataset"].get("name", "?"),
        n_images=int(m["dataset"].get("n", 0)),
        n_classes=len(ws.classes),
        n_filters=ws.channels,
        accuracy=test[0] if test is not None else all_acc,
        confident_share=float(confident.mean()) if source != "none" else None,
        confident_rule=rule,
        words=words,
        stages=stages,
        messages=msgs,
        label_source=shown.where,
        confident_score=CONFIDENT_SCORE if source == SOURCE_ZERO_SHOT else None,
        class_note=bundle_class_note(ws),
        accuracy_scope="test" if test is not None else "all",
        accuracy_images=test[1]
        if test is not None
        else int(m.get("stages", {}).get("probe", {}).get("valid", 0)),
        accuracy_all=all_acc,
        example=worked_example(ws.classes, sentences),
    )


def word_colour(phrase: str) -> str | None:
    """The CSS colour (``#rrggbb``) of the colour a phrase names, or ``None`` when it names none: "red breast"
    is red, "yellow breast" yellow, "spotted wing" ``None``. The longest colour name in the phrase wins
    ("light blue crown" is light blue); names and their sRGB are the lexicon's (XKCD survey + CSS4)."""
    from lavise_core.explain.dissection.lexicon import COLOUR_TABLE

    words = phrase.lower().replace("-", " ").split()
    for n in range(min(3, len(words)), 0, -1):
        for i in range(len(words) - n + 1):
            rgb = COLOUR_TABLE.get(" ".join(words[i : i + n]))
            if rgb is not None:
                return "#{:02x}{:02x}{:02x}".format(*rgb)
    return None


def _lightness(css: str) -> float:
    from lavise_core.explain.dissection.lexicon import srgb_to_lab

    rgb = np.array([[int(css[j : j + 2], 16) for j in (1, 3, 5)]], np.float64)  # 0..255
    return float(srgb_to_lab(rgb)[0, 0])


def word_cloud_html(words: list[tuple[str, int, float]], confident: float | None) -> str:
    """The overview's word map as HTML (no chart library: the overview stays light to load): words sized by how
    many filters they label, each in the colour it names (:func:`word_colour`; neutral when it names none, a
    light colour such as white or yellow on a dark chip so it stays readable); tentative words are thinner
    and faded."""
    if not words:
        return ""
    top = max(n for _, n, _ in words)
    spans = []
    for w, n, score in words:
        size = 0.9 + 1.5 * (n / top) ** 0.7
        strong = confident is None or score >= confident
        colour = word_colour(w)
        chip = ""
        if colour is not None and _lightness(colour) > 80:
            chip = "background:#44403c;border-radius:.35rem;padding:0 .3rem;"
        tip = f"{w}: best label of {n} filter{'s' * (n != 1)}, mean score {score:.2f}"
        spans.append(
            f'<span title="{html.escape(tip)}" style="font-size:{size:.2f}rem;color:{colour or NEUTRAL};{chip}'
            f"font-weight:{600 if strong else 400};opacity:{1 if strong else 0.6};margin:0 .55rem;"
            f'white-space:nowrap;line-height:1.6">{html.escape(w)}</span>'
        )
    return (
        '<div style="text-align:center;padding:.4rem 0;font-family:sans-serif">' + " ".join(spans) + "</div>"
    )
