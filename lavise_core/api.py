"""The public Python API: open or build a bundle, then ask it about filters, concepts and images.

>>> import lavise_core
>>> ex = lavise_core.open("data/bundles/synthbirds-...")        # read-only, memory-mapped
>>> ex.filters[7].labels[:3]                                     # [(phrase, score, source)]
>>> ex.query("red breast").filters                               # filter indices, best first
>>> ex.explain("bird.png").sentence                              # "This is a ... because it has ..."

The CLI and the dashboard's views use these same objects; the names below are a contract.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lavise_core.data.dataset import DatasetError, ProbeDataset
from lavise_core.data.images import crop_to_view, load_image, require_min_side
from lavise_core.models.threads import one_blas_thread
from lavise_core.pipeline.bundle import Bundle, BundleError, StageMissing
from lavise_core.pipeline.stages import BuildProgress, BuildSettings, build_stages

__all__ = [
    "ConceptAnswer",
    "Explainer",
    "FilterInfo",
    "ImageAnalysis",
    "ImageAnswer",
    "StageMissing",
    "build",
    "build_hint",
    "check_concept_sets",
    "open_bundle",
]

#: default label sources, in the order a filter card prefers them
SOURCE_DISSECTION = "dissection"
SOURCE_ZERO_SHOT = "zero-shot (LaViSE)"
SOURCE_PDF = "attribute p.d.f."
SOURCE_SIAM = "SIAM attribute (by design)"

#: a filter "has a confident concept" when its top LaViSE vote score (activation-weighted mean cosine of
#: the label over the filter's top images, 0 when the label is absent) reaches this value; for bundles
#: with only the textual stage, when its top p(t | f) is at least CONFIDENT_LIFT times the uniform 1 / T.
CONFIDENT_SCORE = 0.35
CONFIDENT_LIFT = 4.0


#: longest concept query :meth:`Explainer.query` accepts (characters)
QUERY_MAX_CHARS = 500


def build_hint(bundle: Bundle) -> str:
    """The command that builds (or finishes) ``bundle`` (with the concept sets its labels were composed from)."""
    m = bundle.manifest
    composed = m.get("stages", {}).get("dissection", {}).get("concept_data") or []
    sets = f" --concepts {' '.join(composed)}" if composed else ""
    return f"lavise build --model {m['model']['spec']} --data {m['dataset']['root']}{sets}"


# =========================================================================== results
@dataclass(frozen=True)
class FilterInfo:
    """One filter of the explained layer.

    Attributes:
        index: the filter ``k``.
        labels: ``[(phrase, score, source)]``: Network Dissection labels (score = IoU on the fit split, only those
            with IoU ≥ ``IOU_MIN``) first, then the zero-shot labels (score = vote score), else the p.d.f.'s top attributes.
        top_images: ``(k,)`` probe record indices where it fires most, strongest first.
        top_values: ``(k,)`` their pooled activations.
        pdf: ``[(attribute, p(t | f_k))]`` best first (empty without the textual stage).
        concept_sets: per label, the data set its word was measured on (a concept set, or the probe set); with
            several concept sets composed (``build(..., concepts=[A, B])``), each dissection label names its own.
    """

    index: int
    labels: list[tuple[str, float, str]]
    top_images: np.ndarray
    top_values: np.ndarray
    pdf: list[tuple[str, float]]
    _explainer: Explainer | None = field(default=None, repr=False, compare=False)
    concept_sets: list[str] = field(default_factory=list)

    @property
    def concept_set(self) -> str:
        """The data set the first label was measured on ("" without labels)."""
        return self.concept_sets[0] if self.concept_sets else ""

    def inputs(self, n: int = 5, layers: Sequence[str] | None = None) -> list:
        """The ``n`` filters of the lower recorded layers (``layers``; default all the ``layers`` stage recorded
        below this one) that drive this filter most: ``[FilterInput]``, each iterable as ``(layer, filter,
        contribution, label)``, with ``evidence`` and ``exact`` (see :mod:`lavise_core.explain.dissection.circuits`:
        gradient × activation of the spatial-mean activation over the top images). One forward and backward pass
        of the top images; raises :class:`StageMissing` without the ``layers`` stage."""
        from lavise_core.explain.dissection.circuits import top_image_inputs

        ex = self._explainer
        if ex is None:
            raise ValueError("this filter was not taken from an open bundle: use ex.filters[k].inputs()")
        return top_image_inputs(ex.bundle, ex.model, ex.dataset, self.index, n, layers, build_hint(ex.bundle))


@dataclass(frozen=True)
class ShownLabels:
    """The one label each filter shows (the Overview's word cloud, the filter table and every page):

    - a SIAM bundle: each map's attribute (by design);
    - with the dissection stage: the best concept when its IoU on the fit split reaches ``IOU_MIN``, else "";
    - else with the LaViSE stage: the best zero-shot label, confident at vote score ≥ :data:`CONFIDENT_SCORE`;
    - else with the textual stage: the top attribute of ``p(t | f)``, confident at ≥ :data:`CONFIDENT_LIFT` × uniform.

    Attributes: ``labels`` (C,) phrases ("" for none), ``scores`` (C,) float32, ``source`` (one of the
    ``SOURCE_*`` names), ``confident`` (C,) bool, ``concepts`` the data set the words were measured on,
    ``concept_sets`` (C,) per filter the set its label comes from when several concept sets are composed
    (``None`` otherwise: every label comes from ``concepts``).
    """

    labels: list[str]
    scores: np.ndarray
    source: str
    confident: np.ndarray
    concepts: str = (
        ""  # the data set the words were measured on (a concept set lent to this bundle, or its own)
    )
    concept_sets: list[str] | None = None

    @property
    def where(self) -> str:
        """``"dissection on SynthBirds"``: the source and the data it was measured on."""
        return f"{self.source} on {self.concepts}" if self.concepts else self.source

    @property
    def composed(self) -> bool:
        """Whether the labels come from several concept sets (each filter's from :meth:`concepts_of`)."""
        return self.concept_sets is not None

    def concepts_of(self, k: int) -> str:
        """The data set filter ``k``'s label was measured on (all of them, joined, for a filter without one)."""
        if self.concept_sets is not None and self.labels[k]:
            return self.concept_sets[k]
        return self.concepts


class FilterList(Sequence):
    """``Explainer.filters``: ``len()`` filters, ``filters[k]`` -> :class:`FilterInfo` (built on access)."""

    def __init__(self, ex: Explainer) -> None:
        self._ex = ex

    def __len__(self) -> int:
        return self._ex.channels

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(f"filter {k} out of range: the layer has {len(self)} filters")
        return self._ex.filter_info(k % len(self))


@dataclass
class ConceptAnswer:
    """Answer to a free-text concept query.

    Attributes:
        text: the query.
        filters: ``(F,)`` filter indices, best first; ``scores (F,)`` their match scores.
        confident: whether some filter of this layer responds to the concept (``message`` says why not).
        message: one plain sentence about the answer.
        images: ``(M,)`` probe record indices where the matched filters fire; ``image_scores (M,)``.
        status: ``"seen"``, ``"unseen"``, ``"vocabulary"`` or ``"not in vocabulary"``.
        suggestions: nearest vocabulary phrases ``[(phrase, cosine)]``.
        label_scores: ``(F,)`` the query's vote score in each matched filter's labels (0 when absent).
        weights: ``(F,)`` non-negative filter weights for grounding heatmaps (sum 1).
        method: ``"evidence"`` (ranked by annotated evidence: dissection) or ``"zero-shot"`` (LaViSE head only).
        read_as: the query as grounded in the data set's words ("ruby bosom" -> "red breast"), if rewritten.
        weak: confident, but no filter passed the evidence floor (``filters`` holds the best one anyway).
    """

    text: str
    filters: np.ndarray
    scores: np.ndarray
    confident: bool
    message: str
    images: np.ndarray
    image_scores: np.ndarray
    status: str
    suggestions: list[tuple[str, float]]
    label_scores: np.ndarray
    weights: np.ndarray
    method: str = "zero-shot"
    read_as: str | None = None
    weak: bool = False


@dataclass
class ImageAnalysis:
    """One forward pass of an image (cache it by :attr:`digest`)."""

    digest: str
    image: Image.Image  # what the network sees (cropped view, at most 384 px)
    maps: np.ndarray  # (C, h, w)
    phi: np.ndarray  # (C,)
    logits: np.ndarray  # (K,)
    probs: np.ndarray  # (K,)
    ood: Any = None  # OODVerdict (in_distribution, score, percentile, message) when the bundle has the check


#: the ways an image's sentence can be built (:meth:`Explainer.explain`'s ``method``)
METHODS = ("evidence", "guo")


@dataclass
class ImageAnswer:
    """An image's prediction explained: by default from the attribute detectors (``method="evidence"``, issue 23),
    else Guo et al.'s eq. 5–6 and 9 (``method="guo"``).

    Attributes:
        predicted: the network's class; ``target``: the class explained (the prediction unless asked).
        probabilities: ``(K,)`` softmax over the network's classes; ``predictions``: the top 5 ``[(class, p)]``.
        sentence: "This is a … because it has …" (``None`` without a stage to build it from, or when the image is
            unlike the probe images: then the guess is unreliable and no reason is given).
        contrast: why ``target`` rather than ``why_not`` (``None`` when not asked).
        attributes: ``[(attribute, score)]`` behind the sentence: the attribute's contribution to the class score
            (``"evidence"``) or ``p(t | x, c)`` (``"guo"``).
        evidence: ``"evidence"`` only: per attribute, its filters, detector margin and held-out precision.
        in_distribution: whether the image looks like the probe set's train images (the ``ood`` stage; ``None``
            without it). When ``False``, ``notes[0]`` says so in plain words.
        contributions: ``[(filter, phi_k · W[c, k])]`` largest first.
        zero_shot: nearest open-vocabulary phrases of the image's pooled feature (LaViSE), if built.
        notes: what could not be explained and why.
    """

    predicted: str
    target: str
    probabilities: np.ndarray
    predictions: list[tuple[str, float]]
    sentence: str | None
    contrast: str | None
    attributes: list[tuple[str, float]]
    in_distribution: bool | None
    contributions: list[tuple[int, float]]
    zero_shot: list[tuple[str, float]] | None
    notes: list[str] = field(default_factory=list)
    analysis: ImageAnalysis | None = field(default=None, repr=False)
    _explainer: Explainer | None = field(default=None, repr=False)
    method: str = "guo"
    evidence: list = field(default_factory=list)  # [EvidenceAttribute] for method "evidence"

    @property
    def reliable(self) -> bool:
        """False when the upload check flags the image as unlike the probe images."""
        return self.in_distribution is not False

    def heatmap(self, attribute: str | None = None) -> tuple[np.ndarray, str]:
        """``(map (h, w) in [0, 1], caption)``: where the network sees ``attribute`` (eq. 9; default: the
        first attribute of the sentence), or the largest contributing filter's map without attributes."""
        ex, a = self._explainer, self.analysis
        if ex is None or a is None:
            raise ValueError("this answer holds no activation maps")
        if self.evidence:
            from lavise_core.explain.textual.evidence import GROUND_AREA, ground_pixels

            names = [e.phrase for e in self.evidence]
            attribute = attribute if attribute in names else names[0]
            ev = self.evidence[names.index(attribute)]
            lm = ex.model()
            x = lm.preprocess(a.image)[None]
            W = ex.class_weight()
            heat = ground_pixels(
                lm, x, ex.layer, [k for k, _ in ev.filters], np.asarray(W[ex.classes.index(self.target)])
            )
            fl = ", ".join(f"#{k}" for k, _ in ev.filters)
            return (
                heat,
                f"Where the network sees “{attribute}”: the pixels that make filters {fl} add to the "
                f"{self.target} score (gradient × input; the brightest {GROUND_AREA:.0%} is where the sentence "
                "grounds it)",
            )
        if self.attributes:
            names = [t for t, _ in self.attributes]
            attribute = attribute if attribute is not None else names[0]
            tx = ex.textual()
            heat = tx.ground(a.maps, attribute)
            learned = tx.part_learned is not None and bool(tx.part_learned[tx.column(attribute)])
            how = "w_kt fitted to the part annotations" if learned else "w_kt = specificity of p(t|f_k)"
            return (
                heat,
                f"Where the network sees “{attribute}” (yellow = strongest; eq. 9: Σ_k w_kt·A_k, {how})",
            )
        k = self.contributions[0][0]
        m = np.clip(np.asarray(a.maps[k], np.float32), 0, None)
        m = m / m.max() if m.max() > 0 else m
        return m, f"filter {k}, the largest contributor to {self.target}"


def _concept_message(
    layer: str, shown: str, confident: bool, weak: bool, nearest: Sequence[str], why_none: str, found: str
) -> str:
    """The one wording of a concept query's answer, for every query method: no filter responds (``why_none``,
    then the ``nearest`` concepts the layer does detect), only weak evidence, or what was ``found``."""
    near = ", ".join(f"“{c}”" for c in nearest[:4])
    if not confident:
        return (
            f"No filter of layer {layer} responds to {shown}: {why_none}. Concepts this layer does detect that "
            f"come closest: {near}."
        )
    if weak:
        return (
            f"Only weak evidence for {shown}: no filter fires on it reliably; the one shown comes closest. "
            f"Closest concepts the layer detects: {near}."
        )
    return found


# =========================================================================== the explainer
class Explainer:
    """One bundle, opened read-only, and everything loaded from it at most once (thread-safe).

    Args:
        bundle: an opened bundle (or its folder).
        model_loader: ``() -> LoadedModel``; default ``bundle.load_model()`` (verified by hash). The
            dashboard passes a cached loader so one model (with its lock) serves every session.
        lavise_loader: ``() -> LaviseExplainer``; default ``LaviseExplainer.from_bundle(bundle)``.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        model_loader: Callable[[], Any] | None = None,
        lavise_loader: Callable[[], Any] | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self._model_loader = model_loader or self.bundle.load_model
        self._lavise_loader = lavise_loader
        self._lock = threading.RLock()
        self._cache: dict[str, Any] = {}
        self.built: dict[str, str] = {}  # {stage: "built" | "skipped" | "redone (…)"} after :func:`build`

    def __repr__(self) -> str:
        return f"Explainer({self.bundle.summary()}, stages={list(self.bundle.manifest.get('stages', {}))})"

    def _once(self, name: str, make: Callable[[], Any]) -> tuple[Any, str | None]:
        """``(value, None)`` or ``(None, error message)``; ``make`` runs at most once per name."""
        with self._lock:
            if name not in self._cache:
                try:
                    self._cache[name] = (make(), None)
                except (ValueError, OSError) as e:  # our errors carry user messages
                    self._cache[name] = (None, str(e))
            return self._cache[name]

    # ------------------------------------------------------------------ what the bundle holds
    @property
    def title(self) -> str:
        return self.bundle.summary()

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def layer(self) -> str:
        return self.bundle.layer

    @property
    def channels(self) -> int:
        return int(self.bundle.manifest.get("channels") or self.array("probe/pooled").shape[1])

    def array(self, name: str) -> np.ndarray | None:
        """A bundle array, memory-mapped once (``None`` when absent)."""
        if not self.bundle.has(name):
            return None
        return self._once(f"array:{name}", lambda: self.bundle.array(name))[0]

    def class_weight(self) -> np.ndarray | None:
        """``W (K, C)`` when this layer feeds the classifier directly (else ``None``)."""
        W = self.array("probe/classifier_weight")
        return W if W is not None and W.shape[1] == self.channels else None

    def require_probe(self) -> None:
        if not self.bundle.stage_done("probe"):
            raise StageMissing(
                f"this bundle has no probe pass yet: build it with `{build_hint(self.bundle)}`"
            )

    def has_textual(self) -> bool:
        return self.bundle.stage_done("textual")

    def has_lavise(self) -> bool:
        return self.bundle.stage_done("lavise")

    def has_dissection(self) -> bool:
        """Whether the bundle holds Network Dissection labels (a data set with region masks)."""
        return self.bundle.stage_done("dissection") and self.bundle.has("dissection/iou")

    def dissection(self):
        """The :class:`~lavise_core.explain.dissection.labels.DissectionTables`, or raise :class:`StageMissing`."""
        if not self.has_dissection():
            why = self.bundle.manifest.get("stages", {}).get("dissection", {}).get("skipped")
            raise StageMissing(
                f"no Network Dissection labels: {why}" if why else
                f"this bundle has no dissection stage yet: build it with `{build_hint(self.bundle)}`"
            )  # fmt: skip
        from lavise_core.explain.dissection.labels import DissectionTables

        value, err = self._once("dissection", lambda: DissectionTables.from_bundle(self.bundle))
        if value is None:
            raise StageMissing(f"the dissection stage could not be read ({err}); rebuild it")
        return value

    def dataset(self) -> ProbeDataset | None:
        """The probe data set, or ``None`` (moved, changed: see :meth:`dataset_error`)."""
        return self._once("dataset", self.bundle.dataset)[0]

    def dataset_error(self) -> str | None:
        return self._once("dataset", self.bundle.dataset)[1]

    def textual(self):
        """The :class:`~lavise_core.explain.textual.explainer.TextualExplainer`, or raise :class:`StageMissing`."""
        if not self.has_textual():
            raise StageMissing(
                "this bundle has no textual stage (attribute p.d.f.s) yet: build it with "
                f"`{build_hint(self.bundle)}`"
            )
        from lavise_core.explain.textual.explainer import TextualExplainer

        value, err = self._once("textual", lambda: TextualExplainer.from_bundle(self.bundle))
        if value is None:
            raise StageMissing(
                f"the textual stage could not be read ({err}); rebuild it with `{build_hint(self.bundle)}`"
            )
        return value

    def has_evidence(self) -> bool:
        return self.bundle.stage_done("evidence") and self.bundle.has("evidence/weight")

    def evidence(self):
        """The attribute detectors behind the default sentence (:class:`~lavise_core.explain.textual.evidence.
        AttributeDetectors`), or raise :class:`StageMissing`."""
        from lavise_core.explain.textual.evidence import AttributeDetectors

        if not self.has_evidence():
            raise StageMissing(
                "no attribute detectors in this bundle (the evidence stage needs annotated probe images); "
                f"build them with `{build_hint(self.bundle)}`"
            )
        return self._once("evidence", lambda: AttributeDetectors.from_bundle(self.bundle))[0]

    def describe_class(self, name: str):
        """What class ``name`` looks like to the network (:class:`~lavise_core.explain.textual.evidence.
        ClassDescription`: sentence, distinct and shared attributes, nearest classes), from the detectors."""
        from lavise_core.explain.textual.evidence import describe_class

        if name not in self.classes:
            raise ValueError(f"unknown class {name!r}; the network's classes are e.g. {self.classes[:3]}")
        det = self.evidence()
        rate = np.asarray(self.bundle.array("evidence/detection_rate"), np.float64)
        if len(rate) != len(self.classes):
            raise StageMissing(
                f"the attribute detectors come from the concept set '{self.concept_set('evidence')}', whose classes "
                "are not this network's: class descriptions need a concept set annotated with the network's classes"
            )
        support = (
            self.bundle.array("evidence/class_support") if self.bundle.has("evidence/class_support") else None
        )
        return describe_class(
            det, self.classes, self.classes.index(name), rate, np.asarray(self.class_weight()),
            support=None if support is None else np.asarray(support),
        )  # fmt: skip

    def lavise(self):
        """The :class:`~lavise_core.explain.lavise.explainer.LaviseExplainer`, or raise :class:`StageMissing`."""
        if not self.has_lavise():
            raise StageMissing(
                "this bundle has no LaViSE stage (zero-shot concepts) yet: build it with "
                f"`{build_hint(self.bundle)}`"
            )

        def make():
            if self._lavise_loader is not None:
                return self._lavise_loader()
            from lavise_core.explain.lavise.explainer import LaviseExplainer

            return LaviseExplainer.from_bundle(self.bundle)

        value, err = self._once("lavise", make)
        if value is None:
            raise StageMissing(
                f"the LaViSE stage could not be read ({err}); rebuild it with `{build_hint(self.bundle)}`"
            )
        return value

    def model(self):
        """The :class:`~lavise_core.models.networks.LoadedModel` that built the bundle (verified by hash)."""
        value, err = self._once("model", self._model_loader)
        if value is None:
            raise BundleError(f"the model of this bundle could not be loaded: {err}")
        return value

    # ------------------------------------------------------------------ filters
    @property
    def filters(self) -> FilterList:
        """``filters[k]`` -> :class:`FilterInfo`; ``len(filters)`` = C."""
        return FilterList(self)

    def label_table(self) -> tuple[np.ndarray, np.ndarray, list[str], set[str], set[str]] | None:
        """LaViSE labels read straight from the bundle (no torch, FAISS or encoder): ``ids (C, L)``,
        ``scores (C, L)``, the phrases, and the seen / unseen concept sets; ``None`` without the stage."""
        if not self.has_lavise() or not self.bundle.has("lavise/filter_label_ids"):
            return None

        def make():
            import json

            split = self.bundle.read_json("lavise/split")
            phrases = json.loads((Path(self.bundle.root) / "lavise" / "phrases.json").read_text())
            return (
                self.bundle.array("lavise/filter_label_ids"),
                self.bundle.array("lavise/filter_label_scores"),
                phrases,
                set(split.get("seen", [])),
                set(split.get("unseen", [])),
            )

        value, err = self._once("label_table", make)
        if value is None:
            raise StageMissing(
                f"the LaViSE labels could not be read ({err}); rebuild with `{build_hint(self.bundle)}`"
            )
        return value

    def shown_labels(self) -> ShownLabels:
        """:class:`ShownLabels`: the one label each filter shows, decided here only (computed once)."""
        value, err = self._once("shown_labels", self._compute_shown_labels)
        if value is None:
            raise StageMissing(err)
        return value

    def concept_set(self, stage: str) -> str:
        """The name of the data set ``stage``'s words were measured on: the concept set that lent them, or the
        bundle's own probe set."""
        return self.bundle.words_measured_on(stage)

    def _compute_shown_labels(self) -> ShownLabels:
        from lavise_core.explain.dissection.labels import IOU_MIN

        c = self.channels
        card = self.bundle.manifest.get("model", {}).get("card", {})
        if card.get("architecture") == "synthbirds_siam" and len(card.get("attributes", [])) == c:
            return ShownLabels(
                list(card["attributes"]), np.ones(c, np.float32), SOURCE_SIAM, np.ones(c, bool)
            )
        if self.has_dissection():  # ground-truth IoU on the fit split beats any word model
            d = self.dissection()
            sc = np.asarray(d.label_scores[:, 0], np.float32)
            labels = [
                d.concepts[int(j)] if s >= IOU_MIN else "" for j, s in zip(d.label_ids[:, 0], sc, strict=True)
            ]
            sets = [d.concept_set_of(int(j)) for j in d.label_ids[:, 0]] if d.composed else None
            return ShownLabels(
                labels, sc, SOURCE_DISSECTION, sc >= IOU_MIN, self.concept_set("dissection"), sets
            )
        table = self.label_table()
        if table is not None:
            # read the labels directly (no torch / FAISS / encoder import: keeps the first page fast)
            ids_all, sc_all, phrases, _, _ = table
            ids = np.asarray(ids_all[:, 0])
            sc = np.asarray(sc_all[:, 0], dtype=np.float32)
            labels = [phrases[int(j)] if 0 <= j < len(phrases) else "" for j in ids]
            return ShownLabels(
                labels, sc, SOURCE_ZERO_SHOT, sc >= CONFIDENT_SCORE, self.concept_set("lavise")
            )
        if self.has_textual():
            pdf = np.asarray(self.textual().pdf)
            j = pdf.argmax(1)
            top = pdf[np.arange(c), j]
            labels = [self.textual().vocabulary[int(t)] for t in j]
            return ShownLabels(
                labels,
                top.astype(np.float32),
                SOURCE_PDF,
                top * pdf.shape[1] >= CONFIDENT_LIFT,
                self.concept_set("textual"),
            )
        return ShownLabels([""] * c, np.zeros(c, np.float32), "none", np.zeros(c, bool))

    def zero_shot_labels(self, k: int, n: int = 10) -> list[tuple[str, float, str]] | None:
        """Filter ``k``'s top-``n`` zero-shot labels ``[(phrase, vote score, seen | unseen | vocabulary)]``,
        or None without the LaViSE stage."""
        table = self.label_table()
        if table is None:
            return None
        ids, scores, phrases, seen, unseen = table
        out = []
        for j, s in zip(ids[k][:n], scores[k][:n], strict=True):
            if 0 <= j < len(phrases):
                p = phrases[int(j)]
                out.append((p, float(s), "seen" if p in seen else "unseen" if p in unseen else "vocabulary"))
        return out

    def filter_info(self, k: int, n_labels: int = 10) -> FilterInfo:
        """:class:`FilterInfo` of filter ``k`` (see :attr:`filters`)."""
        from lavise_core.explain.dissection.labels import IOU_MIN

        self.require_probe()
        labels: list[tuple[str, float, str]] = []
        sets: list[str] = []
        if self.has_dissection():
            d = self.dissection()
            for (c, s), name in zip(d.labels(k, n_labels), d.label_sets(k, n_labels), strict=True):
                if s >= IOU_MIN:
                    labels.append((c, s, SOURCE_DISSECTION))
                    sets.append(name)
        zero_shot = [(p, s, SOURCE_ZERO_SHOT) for p, s, _ in self.zero_shot_labels(k, n_labels) or []]
        labels += zero_shot
        sets += [self.concept_set("lavise")] * len(zero_shot)
        pdf: list[tuple[str, float]] = []
        if self.has_textual():
            tx = self.textual()
            row = np.asarray(tx.pdf[k], np.float64)
            pdf = [(tx.vocabulary[int(t)], float(row[t])) for t in np.argsort(-row, kind="stable")]
            if not labels:
                labels = [(t, p, SOURCE_PDF) for t, p in pdf[:n_labels]]
                sets = [self.concept_set("textual")] * len(labels)
        return FilterInfo(
            k,
            labels,
            np.asarray(self.array("probe/top_index")[k]),
            np.asarray(self.array("probe/top_value")[k]),
            pdf,
            self,
            sets,
        )

    # ------------------------------------------------------------------ concepts
    def _search(self):
        """``(QueryIndex, Lexicon, word table, embedder)`` of the concept search, built once per bundle."""

        def make():
            from lavise_core.explain.dissection.lexicon import build_lexicon
            from lavise_core.explain.dissection.search import absent_phrases, search_index, word_table
            from lavise_core.models.text_encoder import shared_embedder

            d = self.dissection()
            emb = shared_embedder()
            qi = search_index(
                d.concepts, d.rate, d.mean_iou, emb, calibration=d.calibration, absent=absent_phrases()
            )
            table: dict = {}
            if self.has_lavise():
                ix = self.lavise().index
                table = word_table(ix.phrases, np.asarray(ix.embeddings))
            return qi, build_lexicon(qi.concepts), table, emb

        value, err = self._once("search", make)
        if value is None:
            raise StageMissing(f"the concept search could not be built ({err})")
        return value

    def _images_for(
        self, filters: np.ndarray, weights: np.ndarray, n_images: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probe images where ``filters`` fire most: ``Σ_k w_k phi_k(x) / max phi_k`` over valid images."""
        from lavise_core.explain.lavise.query import images_where_filters_fire

        return images_where_filters_fire(
            self.array("probe/pooled"), self.array("probe/top_value"), filters, weights, n_images,
            self.array("probe/valid"),
        )  # fmt: skip

    @one_blas_thread
    def query(self, text: str, n: int = 10, n_images: int = 12, method: str | None = None) -> ConceptAnswer:
        """Which filters encode ``text`` (any free text) and where they fire; see :class:`ConceptAnswer`.

        ``method="evidence"`` (the default where the dissection stage is built: a data set with region masks):
        filters are ranked by how often the concept lands in their annotated regions, only filters that pass the
        evidence floor are returned, and ``confident`` is False when no filter of the layer responds (with the
        nearest concepts it does detect). ``method="zero-shot"`` (the default otherwise): the LaViSE head ranks
        filters by embedding similarity, and the bundle's abstention rule (calibrated on concepts absent from the
        data when the LaViSE stage was built) says whether the text is near enough to a concept the layer's
        filters are labelled with: ``confident`` False (no filter shown) or ``weak`` (the best one shown), with the
        same wording. A bundle built before that rule answers every query and says so.
        """
        text = str(text).strip()
        if not text:
            raise ValueError("the query is empty: type a concept such as 'red wing'")
        if len(text) > QUERY_MAX_CHARS:  # a concept is a few words; a pasted document is a mistake
            raise ValueError(
                f"the query is too long ({len(text)} characters, at most {QUERY_MAX_CHARS}): type a short "
                "concept such as 'red wing'"
            )
        if method is None:
            method = "evidence" if self.has_dissection() else "zero-shot"
        if method == "evidence":
            if not self.has_dissection():
                raise StageMissing(
                    "this bundle has no dissection stage (evidence from annotated regions): query it with "
                    f"method='zero-shot', or build it with `{build_hint(self.bundle)}`"
                )
            return self._query_evidence(text, n, n_images)
        if method != "zero-shot":
            raise ValueError(f"unknown query method {method!r}: use 'evidence' or 'zero-shot'")
        return self._query_zero_shot(text, n, n_images)

    def _query_zero_shot(self, text: str, n: int, n_images: int) -> ConceptAnswer:
        lav = self.lavise()
        res = lav.query(text, n_filters=n, n_images=n_images)
        filters, scores, weights = res.filters, res.filter_scores, res.filter_weights()
        images, image_scores, label_scores = res.images, res.image_scores, res.label_scores
        if not res.confident or res.weak:  # none shown, or only the closest one
            keep = 0 if not res.confident else 1
            filters, scores, label_scores = filters[:keep], scores[:keep], label_scores[:keep]
            weights = np.ones(keep, np.float32)
            images, image_scores = self._images_for(filters, weights, n_images)
        found = (
            f"{len(filters)} filters of layer {self.layer} matched by the zero-shot explainer "
            f"(best cosine {float(scores[0]):.2f})"
            if len(filters)
            else f"layer {self.layer} has no filters"
        )
        if not res.calibrated and lav.abstention_note:
            found += (
                f". Not checked against concepts absent from the data: {lav.abstention_note}; "
                f"`{build_hint(self.bundle)} --force lavise` adds the check."
            )
        message = _concept_message(
            self.layer, f"“{text}”", res.confident, res.weak, [c for c, _ in res.nearest],
            "no filter's zero-shot embedding matches it better than filters match concepts absent from the probe "
            "images", found,
        )  # fmt: skip
        return ConceptAnswer(
            res.text, filters, scores, res.confident, message, images, image_scores,
            res.status if res.confident else "no filter responds", res.suggestions, label_scores, weights,
            "zero-shot", None, res.weak,
        )  # fmt: skip

    def _query_evidence(self, text: str, n: int, n_images: int) -> ConceptAnswer:
        from lavise_core.explain.dissection.search import answer_query

        qi, lex, table, emb = self._search()
        d = self.dissection()
        a, read_as = answer_query(text, qi, lex, table, emb, d.colour, d.regions, n=n)
        shown = f"“{text}”" + (f" (read as “{read_as}”)" if read_as.strip().lower() != text.lower() else "")
        how = {
            "exact": "its annotated regions",
            "colour+part": "the part's annotated regions and the colour of the pixels they fire on",
        }.get(a.mode, "the concepts that share its words")
        message = _concept_message(
            self.layer, shown, bool(a.confident), bool(a.weak), [c for c, _, _ in a.nearest],
            "nothing in the annotated probe images makes any filter fire on it",
            f"{len(a.filters)} filter{'s' if len(a.filters) != 1 else ''} of layer {self.layer} respond to "
            f"{shown}, judged by where they fire on {how} in the probe images.",
        )  # fmt: skip
        scores = np.clip(
            np.asarray(a.scores, np.float32), 0, 1
        )  # exact path: ≈ P(concept in the filter's G_k)
        w = np.clip(np.asarray(a.scores, np.float64), 0, None)
        w = (w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / max(len(w), 1))).astype(np.float32)
        images, image_scores = self._images_for(a.filters, w, n_images)
        status = {"exact": "annotated concept", "colour+part": "part masks + pixel colour"}.get(
            a.mode, "composed from annotated concepts"
        )
        if self.has_lavise() and a.mode == "exact":
            status = self.lavise().concept_status(read_as)
        if not a.confident:
            status = "no filter responds"
        return ConceptAnswer(
            text, a.filters, scores, bool(a.confident), message, images, image_scores, status,
            [(c, s) for c, s, _ in a.nearest], np.zeros(len(a.filters), np.float32), w, "evidence",
            read_as if read_as.strip().lower() != text.lower() else None, bool(a.weak),
        )  # fmt: skip

    # ------------------------------------------------------------------ images
    def ood_model(self):
        """The fitted upload check (:class:`~lavise_core.explain.ood.OODModel`), or ``None`` without the stage."""
        if not (self.bundle.stage_done("ood") and self.bundle.has("ood/bank")):
            return None
        from lavise_core.explain.ood import OODModel

        return self._once("ood", lambda: OODModel.from_bundle(self.bundle))[0]

    def forward(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """``maps (B, C, h, w)`` float32 and ``logits (B, K)`` for PIL images, under the model's lock."""
        import torch

        from lavise_core.models.networks import forward_maps

        lm = self.model()
        x = torch.stack([lm.preprocess(im) for im in images])
        maps, logits = forward_maps(lm, x, self.layer)  # takes lm.lock
        return maps.float().cpu().numpy(), logits.float().cpu().numpy()

    def analyse(
        self, image: Image.Image | bytes | str | os.PathLike, name: str | None = None
    ) -> ImageAnalysis:
        """Load ``image`` (raises :class:`~lavise_core.data.images.ImageLoadError` with a user message) and
        run the network once."""
        lm = self.model()
        if isinstance(image, Image.Image):
            require_min_side(image.size, lm.min_side, name or "the image")
            img = image.convert("RGB")
            digest = hashlib.sha256(img.tobytes()).hexdigest()[:16]
        else:
            if isinstance(image, str | os.PathLike):
                name = name or str(image)
                image = Path(image).read_bytes()
            digest = hashlib.sha256(image).hexdigest()[:16]
            img = load_image(image, name=name or "the uploaded file", min_side=lm.min_side)
        import torch

        from lavise_core.explain.ood import forward_with_ood

        ood = self.ood_model()
        x = torch.stack([lm.preprocess(img)])
        maps_t, logits_t, early = forward_with_ood(
            lm, x, self.layer, ood.early_layers if ood is not None else ()
        )
        maps, logits = maps_t.float().cpu().numpy(), logits_t.float().cpu().numpy()
        verdict = None
        if ood is not None:
            verdict = ood.verdict(maps[0].mean((1, 2)), None if early is None else early[0])
        z = logits[0].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        view = crop_to_view(img, lm.crop_box(*img.size))
        view.thumbnail((384, 384), Image.BILINEAR)
        return ImageAnalysis(
            digest, view, maps[0], maps[0].mean((1, 2)), logits[0], p.astype(np.float32), verdict
        )

    def explain(
        self,
        image: Image.Image | bytes | str | os.PathLike | ImageAnalysis,
        target: str | None = None,
        why_not: str | None = None,
        n_contributions: int = 10,
        method: str | None = None,
    ) -> ImageAnswer:
        """Explain the prediction for ``image`` (PIL image, bytes or path), for class ``target`` (default: the
        prediction); ``why_not``: a class to contrast with; ``method``: ``"evidence"`` (the default where the
        evidence stage is built: attribute detectors, measured best) or ``"guo"`` (eq. 5–6). See :class:`ImageAnswer`."""
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        method = method or ("evidence" if self.has_evidence() else "guo")
        a = image if isinstance(image, ImageAnalysis) else self.analyse(image)
        classes = self.classes
        if target is not None and target not in classes:
            raise ValueError(f"unknown class {target!r}; the network's classes are e.g. {classes[:3]}")
        if why_not is not None and why_not not in classes:
            raise ValueError(f"unknown class {why_not!r}; the network's classes are e.g. {classes[:3]}")
        order = np.argsort(-a.probs, kind="stable")
        preds = [(classes[int(j)], float(a.probs[j])) for j in order[:5]]
        c = int(order[0]) if not target else classes.index(target)
        notes: list[str] = []
        in_dist = None if a.ood is None else bool(a.ood.in_distribution)
        if a.ood is not None and not in_dist:
            notes.append(a.ood.message)
        W = self.class_weight()
        if W is None:  # an inner layer: rank filters by activation instead
            contrib = a.phi.astype(np.float64)
            notes.append(f"layer {self.layer} does not feed the classifier: filters are ranked by activation")
        else:
            contrib = a.phi.astype(np.float64) * np.asarray(W[c], np.float64)
        top = np.argsort(-contrib, kind="stable")[:n_contributions]
        sentence = contrast = None
        attrs: list[tuple[str, float]] = []
        evidence: list = []
        if in_dist is False:
            notes.append(
                f"The network's guess ({classes[c]}) is unreliable for this image, so no reason is given for it."
            )
        elif method == "evidence":
            from lavise_core.explain.textual.evidence import (
                evidence_contrast,
                evidence_explanation,
                image_features,
            )

            det = self.evidence()
            feats = image_features(a.maps)
            ex = evidence_explanation(det, feats, classes[c], None if W is None else np.asarray(W[c]))
            sentence, evidence = ex.sentence, ex.attributes
            attrs = [(e.phrase, e.contribution) for e in evidence]
            freq = np.asarray(self.bundle.array("evidence/class_frequency"), np.float64)
            if why_not and why_not != classes[c] and W is not None and len(freq) == len(classes):
                contrast = evidence_contrast(
                    det, feats, classes, c, classes.index(why_not), np.asarray(W), freq
                )[0]
        else:
            try:
                tx = self.textual()
                exp = tx.explain(a.phi, class_index=c, top=5)
                sentence = exp.sentence
                attrs = [(t, float(s)) for t, s in exp.attributes]
                if why_not and why_not != classes[c]:
                    contrast = tx.contrast(a.phi, c, why_not).sentence
            except StageMissing as e:
                notes.append(str(e))
        zero_shot = None
        if self.has_lavise():
            try:
                zero_shot = self.lavise().explain_feature(a.phi[None, :].astype(np.float32), 8)[0]
            except StageMissing as e:
                notes.append(str(e))
        return ImageAnswer(
            classes[int(order[0])], classes[c], a.probs, preds, sentence, contrast, attrs, in_dist,
            [(int(k), float(contrib[k])) for k in top], zero_shot, notes, a, self, method, evidence,
        )  # fmt: skip


# =========================================================================== entry points
def open_bundle(bundle_dir: str | os.PathLike) -> Explainer:
    """Open a built bundle read-only (arrays memory-mapped) -> :class:`Explainer`."""
    return Explainer(Bundle.open(bundle_dir))


def build(
    model: str | Any,
    data: str | os.PathLike,
    layer: str | None = None,
    stages: Sequence[str] | None = None,
    bundles: str | os.PathLike = "data/bundles",
    progress: Callable[[BuildProgress], None] | None = None,
    *,
    force: Sequence[str] = (),
    settings: BuildSettings = BuildSettings(),
    options: dict[str, dict[str, Any]] | None = None,
    executor: str | None = None,
    address: str | None = None,
    lock_timeout: float | None = None,
    concepts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> Explainer:
    """Build (or finish) the bundle of ``model`` × ``layer`` × ``data`` with the registered stages.

    ``model``: a model spec (``"synthbirds"``, ``"efficientnet_lite0"``, ``"torchvision:resnet18"``, …) or a
    :class:`~lavise_core.models.networks.LoadedModel` already loaded;
    ``data``: a probe data set folder; ``stages``: which stages (default: all default stages; what they need
    is added); ``force``: stages to redo; ``progress(BuildProgress)`` is called as the build goes;
    ``options``: keyword arguments per stage, e.g. ``{"lavise": {"settings": LaviseSettings(epochs=20)}}``.
    ``executor="ray"`` runs the image loops (probe pass, LaViSE region features) as Ray Data batch inference on
    the cluster at ``address`` (default: the running Ray runtime, else a local one); same bundle (docs/ray.md).
    Finished stages are skipped, so calling it again on a built bundle only opens it. A second build of
    the same bundle waits for the first (``lock_timeout=None``) or raises ``BundleBusy`` after
    ``lock_timeout`` seconds (``0``: at once).

    **Probe set and concept set.** Where the filters fire comes from ``data``; the words (dissection labels,
    the LaViSE head, the attribute detectors, the p.d.f.s, and their fidelity) come from a *concept set*, an
    annotated data set the same network is run over, built as its own bundle and lent to this one. An
    annotated ``data`` is its own concept set; a plain folder takes :data:`DEFAULT_CONCEPTS` (SynthBirds) unless
    ``concepts`` names another. A stage whose data is missing from both is not built, and ``ex.built`` says why
    in one sentence.

    **Several concept sets** (``concepts=[A, B, ...]``): the dissection stage is built on each set's own bundle
    and composed here (:mod:`lavise_core.explain.dissection.compose`): each filter's label is its best (highest
    IoU) over all the sets and names the set it comes from (``ex.filters[k].concept_sets``,
    ``ex.shown_labels().concepts_of(k)``). The other word stages (textual, LaViSE, evidence, fidelity, layers)
    come from the first set. Every set must have region masks when dissection is built; a set given twice, or
    the probe set itself among several, is refused.
    """
    import dataclasses

    from lavise_core.models.networks import load_model

    if executor is not None or address is not None:
        settings = dataclasses.replace(
            settings, executor=executor or settings.executor, address=address or settings.address
        )
        settings.executor_settings()  # an unknown executor fails before any work
    from lavise_core.pipeline.probe import open_or_create_bundle
    from lavise_core.stages import REGISTRY

    try:
        ds = ProbeDataset.open(data)
    except DatasetError as e:
        raise ValueError(str(e)) from e
    lm = load_model(model, device=settings.device) if isinstance(model, str) else model
    bundle = open_or_create_bundle(Path(bundles), lm, ds, layer)
    lent = _lend_words(
        bundle, ds, lm, REGISTRY, stages, concepts, Path(bundles), settings, progress, options, lock_timeout
    )
    outcome = build_stages(
        bundle,
        ds,
        REGISTRY,
        stages,
        force=force,
        settings=settings,
        model_loader=lambda: lm,
        progress=progress,
        options=options,
        lock_timeout=lock_timeout,
    )
    outcome.update(lent)
    ex = Explainer(Bundle.open(bundle.root), model_loader=lambda: lm)
    ex.built = outcome
    return ex


#: the concept set a plain folder of images takes its words from (``lavise synthbirds`` makes it)
DEFAULT_CONCEPTS = Path("data/synthbirds")


def _open_concepts(concepts: str | os.PathLike | None, ds: ProbeDataset) -> ProbeDataset:
    """The concept set: ``concepts``, else :data:`DEFAULT_CONCEPTS`; a plain message when it cannot serve."""
    from lavise_core.pipeline.stages import data_facts

    path = Path(concepts) if concepts is not None else DEFAULT_CONCEPTS
    try:
        cds = ProbeDataset.open(path)
    except DatasetError as e:
        if concepts is None:
            raise ValueError(
                f"'{ds.name}' has no annotations, so its words come from a concept set, and the default one "
                f"({DEFAULT_CONCEPTS}) is not on this machine: make it with `lavise synthbirds --out "
                f"{DEFAULT_CONCEPTS}`, or name an annotated set with --concepts FOLDER"
            ) from e
        raise ValueError(f"the concept set {path} cannot be opened: {e}") from e
    if not {"masks", "text"} & data_facts(cds):
        raise ValueError(
            f"the concept set '{cds.name}' has neither region masks nor captions or attributes, so it can give no "
            "words: use an annotated set (SynthBirds, CUB, COCO; see `lavise import-cub --help`)"
        )
    return cds


def _lend_words(
    bundle: Bundle, ds: ProbeDataset, lm, registry, stages, concepts, bundles: Path, settings, progress, options,
    lock_timeout,
) -> dict[str, str]:  # fmt: skip
    """Build the word stages that ``ds`` cannot make on the concept set's own bundle (same model and layer) and
    lend them to ``bundle`` -> ``{stage: outcome}``. With ``concepts`` given, every word stage comes from it;
    with several, see :func:`_compose_words`."""
    from lavise_core.pipeline.probe import open_or_create_bundle
    from lavise_core.pipeline.stages import data_facts, missing_data

    paths = _concept_paths(concepts)
    order = registry.resolve(list(stages) if stages is not None else registry.defaults())
    if paths is not None and len(paths) > 1:
        return _compose_words(
            bundle, ds, lm, registry, order, paths, bundles, settings, progress, options, lock_timeout
        )
    concepts = paths[0] if paths else None
    facts = data_facts(ds)
    words = [s for s in order if s.words and (concepts is not None or missing_data(s, facts))]
    lent_from = {
        s.name: bundle.manifest.get("stages", {}).get(s.name, {}).get("concept_bundle") for s in words
    }
    if concepts is None:
        words = [s for s in words if not bundle.stage_done(s.name)]
    if not words:
        return {}
    cds = _open_concepts(concepts, ds)
    if cds.root.resolve() == ds.root.resolve():
        return {}
    cfacts = data_facts(cds)
    names = [s.name for s in words if not missing_data(s, cfacts)]
    if not names:
        return {}
    cbundle = open_or_create_bundle(bundles, lm, cds, bundle.layer)
    # another concept set asked for: what an earlier one lent (or the probe set made) is replaced
    names = [n for n in names if not (bundle.stage_done(n) and lent_from[n] == str(cbundle.root))]
    if not names:
        return {}
    with bundle.build_lock(lock_timeout):
        _clear_words(bundle, registry, names)
    say = progress or (lambda event: None)
    say(BuildProgress(0.0, "concepts", f"words from the concept set '{cds.name}' ({cbundle.root.name})"))
    build_stages(
        cbundle, cds, registry, names, settings=settings, model_loader=lambda: lm, progress=progress,
        options=options, lock_timeout=lock_timeout,
    )  # fmt: skip
    with bundle.build_lock(lock_timeout):
        return _borrow_words(bundle, registry, names, cbundle, cds.name)


def _borrow_words(
    bundle: Bundle, registry, names: Sequence[str], source: Bundle, set_name: str
) -> dict[str, str]:
    """Lend ``bundle`` the stages ``names`` that the concept set's bundle ``source`` finished -> ``{stage: outcome}``
    (the caller holds ``bundle``'s build lock)."""
    out: dict[str, str] = {}
    for name in names:
        s = registry[name]
        if source.stage_done(name):
            bundle.borrow_stage(
                source, name, s.files, s.parts, concept_set=set_name, concept_bundle=str(source.root)
            )
            out[name] = f"from the concept set '{set_name}'"
    return out


def _clear_words(bundle: Bundle, registry, names: Sequence[str]) -> None:
    """Forget the stages ``names`` of ``bundle`` and the word stages built on them, before they are lent again;
    a composed stage's folder goes too (its extra files must not outlive it: a set lends only its own files)."""
    import shutil

    for n in names:
        for d in registry.downstream(n):
            if bundle.stage_done(d.name) and (d.words or d.name == n):
                if bundle.manifest["stages"][d.name].get("concept_sets"):
                    for rel in d.files:
                        shutil.rmtree(bundle.root / rel, ignore_errors=True)
                bundle.clear_stage(d.name)


def _concept_paths(concepts) -> list[Path] | None:
    """``concepts`` (one folder or several) as a list of paths; ``None`` when not given."""
    if concepts is None:
        return None
    if isinstance(concepts, (str, os.PathLike)):
        return [Path(concepts)]
    paths = [Path(c) for c in concepts]
    if not paths:
        raise ValueError("no concept set named: give one or more annotated data set folders with --concepts")
    return paths


def check_concept_sets(
    data: str | os.PathLike,
    concepts: Sequence[str | os.PathLike],
    stages: Sequence[str] | None = None,
) -> list[str]:
    """Check, without building anything, that :func:`build` would accept ``concepts`` for the probe set ``data``
    -> the names its labels would cite, in the order given. Raises ``ValueError`` with the same plain sentence
    as :func:`build` (a set that cannot be opened or gives no words; with several, one given twice, the probe set
    among them, one without region masks when the dissection stage is built). The build form calls it before its
    Build button is offered."""
    from lavise_core.explain.dissection.labels import STAGE as DISSECTION
    from lavise_core.stages import REGISTRY

    try:
        ds = ProbeDataset.open(data)
    except DatasetError as e:
        raise ValueError(str(e)) from e
    paths = _concept_paths(list(concepts))
    if len(paths) == 1:
        return [_open_concepts(paths[0], ds).name]
    order = REGISTRY.resolve(list(stages) if stages is not None else REGISTRY.defaults())
    wants_masks = any(s.name == DISSECTION for s in order)
    return _concept_names(_open_concept_sets(paths, ds, wants_masks))


def _concept_names(sets: Sequence[ProbeDataset]) -> list[str]:
    """The names a composed label cites: each set's name, with its folder where two sets share one."""
    names = [cds.name for cds in sets]
    return [f"{n} ({cds.root.name})" if names.count(n) > 1 else n for n, cds in zip(names, sets, strict=True)]


def _open_concept_sets(paths: Sequence[Path], ds: ProbeDataset, wants_masks: bool) -> list[ProbeDataset]:
    """Open several concept sets, refusing what cannot be composed, with the fix in the message."""
    from lavise_core.pipeline.stages import data_facts

    sets = [_open_concepts(p, ds) for p in paths]
    seen: dict[Path, Path] = {}
    hashes: dict[str, Path] = {}
    for p, cds in zip(paths, sets, strict=True):
        root = cds.root.resolve()
        if root == ds.root.resolve():
            raise ValueError(
                f"the concept set {p} is the probe set itself: with several concept sets, name only the other "
                "annotated sets (the probe set's own words come with a build without --concepts)"
            )
        if root in seen:
            raise ValueError(f"the concept set {p} is given twice (also as {seen[root]}): name each set once")
        digest = cds.content_hash()
        if digest in hashes:
            raise ValueError(
                f"the concept sets {hashes[digest]} and {p} hold the same data: name each set once"
            )
        seen[root], hashes[digest] = p, p
        if wants_masks and "masks" not in data_facts(cds):
            raise ValueError(
                f"the concept set '{cds.name}' ({p}) has no region masks, so it can give no dissection labels: "
                "leave it out of --concepts, or build without the dissection stage (--stages)"
            )
    return sets


def _compose_words(
    bundle: Bundle, ds: ProbeDataset, lm, registry, order, paths: Sequence[Path], bundles: Path, settings, progress,
    options, lock_timeout,
) -> dict[str, str]:  # fmt: skip
    """Words from several concept sets: the dissection stage built on each set's own bundle and composed into
    ``bundle`` (each filter's best label over all the sets, naming its set:
    :func:`~lavise_core.explain.dissection.compose.compose_dissection`); the other word stages lent by the
    first set, as with one. -> ``{stage: outcome}``."""
    from lavise_core.explain.dissection.compose import compose_dissection
    from lavise_core.explain.dissection.labels import STAGE as DISSECTION
    from lavise_core.pipeline.probe import open_or_create_bundle
    from lavise_core.pipeline.stages import data_facts, missing_data

    words = [s for s in order if s.words]
    if not words:
        return {}
    compose = any(s.name == DISSECTION for s in words)
    sets = _open_concept_sets(paths, ds, compose)
    names = _concept_names(sets)
    cbundles = [open_or_create_bundle(bundles, lm, cds, bundle.layer) for cds in sets]
    for cds, cb in zip(sets, cbundles, strict=True):
        if cb.manifest.get("stages", {}).get(DISSECTION, {}).get("concept_set"):
            raise ValueError(
                f"the bundle of the concept set '{cds.name}' ({cb.root}) holds dissection labels lent by another "
                "concept set, not measured on its own images: name that set directly, or rebuild this one "
                f"with `lavise build --data {cds.root} --force dissection`"
            )
    first, first_bundle = sets[0], cbundles[0]
    roots = [str(cb.root) for cb in cbundles]
    if compose and bundle.manifest.get("stages", {}).get(DISSECTION, {}).get("concept_bundles") == roots:
        compose = False  # composed from these very bundles already
    candidates = [s.name for s in words if s.name != DISSECTION and not missing_data(s, data_facts(first))]

    def to_lend() -> list[str]:  # the first set's stages not lent by its bundle yet
        stages_now = bundle.manifest.get("stages", {})
        return [
            n for n in candidates if stages_now.get(n, {}).get("concept_bundle") != str(first_bundle.root)
        ]

    if not compose and not to_lend():
        return {}
    with bundle.build_lock(lock_timeout):
        _clear_words(bundle, registry, [*to_lend(), *([DISSECTION] if compose else [])])
    lend = to_lend()  # and what the clearing took with it
    say = progress or (lambda event: None)
    quoted = ", ".join(f"'{n}'" for n in names)
    say(BuildProgress(0.0, "concepts", f"words from the concept sets {quoted}"))
    for i, (cds, cb) in enumerate(zip(sets, cbundles, strict=True)):
        todo = [*(lend if i == 0 else []), *([DISSECTION] if compose else [])]
        if todo:
            build_stages(
                cb, cds, registry, todo, settings=settings, model_loader=lambda: lm, progress=progress,
                options=options, lock_timeout=lock_timeout,
            )  # fmt: skip
    out: dict[str, str] = {}
    with bundle.build_lock(lock_timeout):
        if compose and all(cb.stage_done(DISSECTION) and cb.has("dissection/iou") for cb in cbundles):
            info = compose_dissection(bundle, list(zip(names, cbundles, strict=True)))
            data = [str(cds.root.resolve()) for cds in sets]
            bundle.mark_stage(DISSECTION, {**info, "concept_bundles": roots, "concept_data": data})
            out[DISSECTION] = f"from the concept sets {quoted} (each filter's best label)"
        out.update(_borrow_words(bundle, registry, lend, first_bundle, names[0]))
    return out
