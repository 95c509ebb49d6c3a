"""Page-level view functions of the dashboard: pure (no streamlit), one call per page interaction.

A :class:`Workspace` wraps one opened bundle and lazily loads what the pages need (data set, textual
explainer, LaViSE explainer, model), each at most once and thread-safely, so one cached workspace is
shared by every browser session. Each ``*_view`` function takes the workspace and the widget values
and returns a small dataclass that the page renders.

A page that needs a stage the bundle lacks gets :class:`StageMissing` (a ``ValueError`` whose message
says which command builds it); pages show it with ``st.info`` instead of a traceback.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .bundle import Bundle, BundleError
from .dataset import DATASET_FILE, DatasetError, ProbeDataset
from .images import ImageLoadError, load_image
from .overlays import crop_to_view, encode_jpeg, mosaic, overlay, relative_to

__all__ = [
    "BIAS_CONFIRM_SHARE",
    "CONFIDENT_SCORE",
    "PAPER_NUMBERS",
    "ClassReport",
    "ConceptView",
    "DatasetReport",
    "EvaluationReport",
    "FilterDetail",
    "ImageAnalysis",
    "ImageExplanation",
    "Overview",
    "StageMissing",
    "Workspace",
    "analyse_image",
    "background_views",
    "build_bundle",
    "bundle_class_note",
    "class_report",
    "concept_choices",
    "concept_view",
    "confident_rule_short",
    "dataset_report",
    "evaluation_headlines",
    "evaluation_report",
    "explain_image",
    "filter_card_image",
    "filter_detail",
    "filter_table",
    "flatten_tables",
    "model_label",
    "overview",
    "select_filters",
]

#: a filter "has a confident concept" when its top LaViSE vote score (activation-weighted mean cosine of
#: the label over the filter's top images, 0 when the label is absent) reaches this value; for bundles
#: with only the textual stage, when its top p(t | f) is at least CONFIDENT_LIFT times the uniform 1 / T.
CONFIDENT_SCORE = 0.35
CONFIDENT_LIFT = 4.0
#: a background-bias flag is confirmed by the ground truth when one background holds this share of a class
BIAS_CONFIRM_SHARE = 0.5

#: the published numbers (METHODS.md) shown next to ours on the Evaluation page
PAPER_NUMBERS: dict[str, list[dict[str, Any]]] = {
    "Grounding PCK@α (Guo et al., CUB-200-2011, ResNet-50, top 50 attributes)": [
        {"method": "random", "α=0.1": 3.1, "α=0.2": 12.6, "α=0.3": 28.3},
        {"method": "constant p.d.f.", "α=0.1": 8.5, "α=0.2": 28.1, "α=0.3": 47.5},
        {"method": "proposed", "α=0.1": 12.2, "α=0.2": 38.7, "α=0.3": 60.9},
    ],
    "Attribute retrieval (Guo et al., CUB)": [
        {"recall %": 30.9, "true negative %": 92.9, "accuracy %": 27.9}
    ],
    "Sentence BLEU (Guo et al., CUB)": [{"correct": 0.415, "wrong": 0.381, "overall": 0.409}],
}


class StageMissing(ValueError):
    """The bundle lacks a stage a page needs; the message says how to build it."""


def model_label(spec: str) -> str:
    """A short name for a model spec (a checkpoint path becomes its file name)."""
    base = spec.split("?")[0]
    if base.startswith("checkpoint:"):
        return Path(base.split(":", 1)[1]).stem
    if base.endswith(".json"):
        return Path(base).stem
    return base


def bundle_class_note(ws: Workspace) -> str | None:
    """A warning when the probe images' classes are not the network's (e.g. an ImageNet model probed with
    SynthBirds): class-related views then show the network's classes, not the images' labels."""
    classes = ws.dataset_classes()
    if classes is None or list(classes) == list(ws.classes):
        return None
    shown = ", ".join(classes[:3]) + ("…" if len(classes) > 3 else "")
    return (
        f"The network was trained on other classes ({len(ws.classes)}, e.g. {', '.join(ws.classes[:3])}) than "
        f"the probe images show ({len(classes)}: {shown}). Class names below are the network's own "
        "classes; the filters are explained with images it was not trained on."
    )


def _build_hint(bundle: Bundle) -> str:
    m = bundle.manifest
    return f"lavise build --model {m['model']['spec']} --data {m['dataset']['root']}"


# =========================================================================== workspace
class _LRU:
    """A tiny thread-safe LRU cache (thumbnails, activation maps)."""

    def __init__(self, size: int) -> None:
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Any) -> bool:
        return key in self._d

    def peek(self, key: Any) -> Any:
        """The cached value or ``None`` (does not compute anything)."""
        with self._lock:
            return self._d.get(key)

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value


class Workspace:
    """One bundle and everything loaded from it, each piece at most once (thread-safe).

    Args:
        bundle: an opened (read-only) bundle.
        model_loader: ``() -> LoadedModel``; default ``bundle.load_model()``. The dashboard passes a
            ``st.cache_resource`` function so one model (with its ``.lock``) serves every session.
        lavise_loader: ``() -> LaviseExplainer``; default ``LaviseExplainer(bundle)``.
    """

    def __init__(
        self,
        bundle: Bundle,
        model_loader: Callable[[], Any] | None = None,
        lavise_loader: Callable[[], Any] | None = None,
    ) -> None:
        self.bundle = bundle
        self._model_loader = model_loader or bundle.load_model
        self._lavise_loader = lavise_loader
        self._lock = threading.RLock()
        self._cache: dict[str, Any] = {}
        self.thumbs = _LRU(2048)
        self.maps = _LRU(512)
        self.cards = _LRU(4096)  # JPEG bytes of filter cards, per (filter, n, tile)
        self.details = _LRU(256)  # FilterDetail per (filter, n_images): overlays rendered once
        self.queries = _LRU(128)  # ConceptView per (query text, n_filters, n_images)

    def _once(self, name: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            if name not in self._cache:
                try:
                    self._cache[name] = (make(), None)
                except (ValueError, OSError) as e:  # our errors carry user messages
                    self._cache[name] = (None, str(e))
            value, err = self._cache[name]
        return value, err

    # -- pieces
    @property
    def title(self) -> str:
        return self.bundle.summary()

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def channels(self) -> int:
        return int(self.bundle.manifest.get("channels") or self.array("probe/pooled").shape[1])

    def array(self, name: str) -> np.ndarray:
        return (
            self._once(f"array:{name}", lambda: self.bundle.array(name))[0] if self.bundle.has(name) else None
        )

    def class_weight(self) -> np.ndarray | None:
        """``W (K, C)`` when this layer feeds the classifier directly (else ``None``: no per-filter class weight)."""
        W = self.array("probe/classifier_weight")
        return W if W is not None and W.shape[1] == self.channels else None

    def require_probe(self) -> None:
        if not self.bundle.stage_done("probe"):
            raise StageMissing(
                f"this bundle has no probe pass yet: build it with `{_build_hint(self.bundle)}`"
            )

    def dataset(self) -> ProbeDataset | None:
        """The probe data set, or ``None`` (moved, changed: see :meth:`dataset_error`)."""
        return self._once("dataset", self.bundle.dataset)[0]

    def dataset_classes(self) -> list[str] | None:
        """The probe set's class names from its ``dataset.json`` (cheap: the image list is not read)."""
        import json

        def make() -> list[str]:
            root = Path(self.bundle.manifest["dataset"]["root"])
            classes = json.loads((root / DATASET_FILE).read_text(encoding="utf-8")).get("classes")
            if not isinstance(classes, list):
                raise ValueError(f"{root / DATASET_FILE} lists no classes")
            return [str(c) for c in classes]

        return self._once("dataset_classes", make)[0]

    def dataset_error(self) -> str | None:
        return self._once("dataset", self.bundle.dataset)[1]

    def textual(self):
        """The :class:`~lavise_core.textual.TextualExplainer` or raise :class:`StageMissing`."""
        if not self.bundle.stage_done("textual"):
            raise StageMissing(
                f"this bundle has no textual stage (attribute p.d.f.s) yet: build it with `{_build_hint(self.bundle)}`"
            )
        from .textual import TextualExplainer

        value, err = self._once("textual", lambda: TextualExplainer.from_bundle(self.bundle))
        if value is None:
            raise StageMissing(
                f"the textual stage could not be read ({err}); rebuild it with `{_build_hint(self.bundle)}`"
            )
        return value

    def phrases(self) -> list[str]:
        """The LaViSE vocabulary (``lavise/phrases.json``), read without loading the index."""
        import json

        def make() -> list[str]:
            return json.loads((Path(self.bundle.root) / "lavise" / "phrases.json").read_text())

        value, err = self._once("phrases", make)
        if value is None:
            raise StageMissing(
                f"the LaViSE vocabulary could not be read ({err}); rebuild with `{_build_hint(self.bundle)}`"
            )
        return value

    def label_table(self) -> tuple[np.ndarray, np.ndarray, list[str], set[str], set[str]] | None:
        """LaViSE labels read straight from the bundle (no torch, FAISS or encoder): ``ids (C, L)``,
        ``scores (C, L)``, the phrases, and the seen / unseen concept sets; ``None`` without the stage."""
        if not self.has_lavise() or not self.bundle.has("lavise/filter_label_ids"):
            return None

        def make():
            split = self.bundle.read_json("lavise/split")
            return (
                self.bundle.array("lavise/filter_label_ids"),
                self.bundle.array("lavise/filter_label_scores"),
                self.phrases(),
                set(split.get("seen", [])),
                set(split.get("unseen", [])),
            )

        value, err = self._once("label_table", make)
        if value is None:
            raise StageMissing(
                f"the LaViSE labels could not be read ({err}); rebuild with `{_build_hint(self.bundle)}`"
            )
        return value

    def filter_labels(self, k: int, n: int = 10) -> list[tuple[str, float, str]] | None:
        """Filter ``k``'s top-``n`` zero-shot labels ``[(phrase, vote score, seen | unseen | vocabulary)]``."""
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

    def filter_inside(self, k: int) -> float | None:
        """Share of filter ``k``'s activation on the object (``lavise/filter_inside``), if stored."""
        arr = self.array("lavise/filter_inside") if self.has_lavise() else None
        if arr is None or not np.isfinite(arr[k]):
            return None
        return float(arr[k])

    def has_textual(self) -> bool:
        return self.bundle.stage_done("textual")

    def has_lavise(self) -> bool:
        return self.bundle.stage_done("lavise")

    def lavise(self):
        """The :class:`~lavise_core.lavise.LaviseExplainer` or raise :class:`StageMissing`."""
        if not self.has_lavise():
            raise StageMissing(
                f"this bundle has no LaViSE stage (zero-shot concepts) yet: build it with `{_build_hint(self.bundle)}`"
            )

        def make():
            if self._lavise_loader is not None:
                return self._lavise_loader()
            from .lavise import LaviseExplainer

            return LaviseExplainer(self.bundle)

        value, err = self._once("lavise", make)
        if value is None:
            raise StageMissing(
                f"the LaViSE stage could not be read ({err}); rebuild it with `{_build_hint(self.bundle)}`"
            )
        return value

    def model(self):
        """The :class:`~lavise_core.networks.LoadedModel` that built the bundle (verified by hash)."""
        value, err = self._once("model", self._model_loader)
        if value is None:
            raise BundleError(f"the model of this bundle could not be loaded: {err}")
        return value

    # -- images
    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of a ``width × height`` image the network sees (mirrors ``LoadedModel.crop_box``)."""
        pre = self.bundle.manifest.get("preprocessing", {})
        size, resize = int(pre.get("input_size", 224)), int(pre.get("resize", 224))
        if resize == size:
            return (0.0, 0.0, float(width), float(height))
        s = resize / min(width, height)
        side = size / s
        x0, y0 = (width - side) / 2, (height - side) / 2
        return (x0, y0, x0 + side, y0 + side)

    def record_image(self, i: int, side: int = 192) -> Image.Image:
        """Probe image ``i`` cropped to the network's view and resized to at most ``side`` pixels."""

        def make() -> Image.Image:
            ds = self.dataset()
            if ds is None:
                return _placeholder(side, "data set missing")
            try:
                img = load_image(ds.image_path(int(i)), name=ds.records[int(i)].path)
            except ImageLoadError:
                return _placeholder(side, "unreadable")
            img = crop_to_view(img, self.view_box(*img.size))
            img.thumbnail((side, side), Image.BILINEAR)
            return img

        return self.thumbs.get((int(i), side), make)

    def record_maps(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """Layer maps ``(C, h, w)`` float16 of probe images (one batched forward pass for the uncached ones)."""
        out: dict[int, np.ndarray] = {}
        todo = []
        for i in indices:
            hit = self.maps.peek(int(i))
            if hit is not None:
                out[int(i)] = hit
            else:
                todo.append(int(i))
        if todo:
            ds = self.dataset()
            if ds is None:
                raise StageMissing(f"the probe images are not available: {self.dataset_error()}")
            imgs = []
            for i in todo:
                try:
                    imgs.append(load_image(ds.image_path(i)))
                except ImageLoadError:
                    imgs.append(Image.new("RGB", (8, 8)))
            maps, _ = _forward(self.model(), imgs, self.bundle.layer)
            for i, m in zip(todo, maps, strict=True):
                m16 = m.astype(np.float16)
                self.maps.get(i, lambda m16=m16: m16)
                out[i] = m16
        return out


def _placeholder(side: int, text: str) -> Image.Image:
    from PIL import ImageDraw

    img = Image.new("RGB", (side, side), (235, 235, 235))
    ImageDraw.Draw(img).text((6, side // 2 - 6), text, fill=(90, 90, 90))
    return img


def _forward(lm, images: Sequence[Image.Image], layer: str) -> tuple[np.ndarray, np.ndarray]:
    """``maps (B, C, h, w)`` float32 and ``logits (B, K)`` for PIL images, under the model's lock."""
    import torch

    from .networks import forward_maps

    x = torch.stack([lm.preprocess(im) for im in images])
    maps, logits = forward_maps(lm, x, layer)  # takes lm.lock
    return maps.float().cpu().numpy(), logits.float().cpu().numpy()


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
    if source.startswith("zero"):
        return f"zero-shot vote score ≥ {CONFIDENT_SCORE}"
    if source and source != "none":
        return f"top p(t | f) ≥ {CONFIDENT_LIFT:g}× uniform"
    return "no labels yet"


def overview(ws: Workspace) -> Overview:
    """Model accuracy, filter count, share of filters with a confident concept, concept word counts."""
    ws.require_probe()
    m = ws.bundle.manifest
    stages = {s: ws.bundle.stage_done(s) for s in ("probe", "textual", "lavise")}
    msgs = []
    labels, scores, source, confident = _filter_labels(ws)
    if source == "none":
        msgs.append(
            f"No concept labels yet: build the textual and LaViSE stages with `{_build_hint(ws.bundle)}`."
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
    if source.startswith("zero"):
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


# =========================================================================== filters
def filter_table(ws: Workspace) -> Any:
    """One row per filter: ``filter, label, score, confident, mean_activation, top_class, class_weight``.

    ``class_weight`` is ``max_c W[c, k] · mean phi_k`` (the largest mean contribution of filter k to a
    class logit); ``top_class`` is that class. Returns a ``pandas.DataFrame`` (cached by the workspace).
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
        labels, scores, source, confident = _filter_labels(ws)
        df = pd.DataFrame(
            {
                "filter": np.arange(ws.channels),
                "label": labels,
                "score": np.round(scores, 4),
                "confident": confident,
                "mean_activation": np.round(mean, 4),
                "top_class": [ws.classes[int(c)] if Wc is not None else "" for c in top_c],
                "class_weight": np.round(contrib.max(0), 4),
            }
        )
        df.attrs["source"] = source
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


def filter_card_image(ws: Workspace, k: int, n: int = 4, tile: int = 96) -> bytes:
    """JPEG of a 2 × 2 mosaic of filter ``k``'s top-``n`` images with its activation maps overlaid.

    All tiles share one scale (the largest activation in them), so a weak tile looks weak. Cached per
    ``(k, n, tile)`` in the workspace: the first call renders, later ones cost a dictionary lookup.
    """

    def make() -> bytes:
        idx = ws.array("probe/top_index")[k][:n]
        maps = np.asarray(ws.array("probe/top_maps")[k][:n], np.float32)
        norm = relative_to(max(float(maps.max()), 1e-6)) if maps.size else None
        tiles = []
        for i, a in zip(idx, maps, strict=True):
            if i < 0:
                tiles.append(_placeholder(tile, ""))
                continue
            img = ws.record_image(int(i), side=tile)
            tiles.append(overlay(img, a, alpha=0.6, normalize=norm, mask_below=0.2))
        return encode_jpeg(mosaic(tiles, cols=2, tile=tile, pad=1))

    return ws.cards.get((int(k), n, tile), make)


@dataclass
class FilterDetail:
    """Everything about one filter."""

    k: int
    label: str
    score: float
    top_images: list[tuple[bytes, int, float, str]]  # overlay (JPEG), record, phi_k, class
    attributes: list[tuple[str, float]] | None
    attributes_note: str | None
    labels: list[tuple[str, float, str]] | None  # phrase, score, seen/unseen/vocabulary
    labels_note: str | None
    classes: list[tuple[str, float]]  # class, W[c, k], most positive and most negative
    activations: np.ndarray  # (N_valid,) pooled phi_k over the probe set
    quantiles: list[tuple[float, float]]
    threshold: float | None
    inside: float | None = None


def filter_detail(ws: Workspace, k: int, n_images: int = 8, side: int = 192) -> FilterDetail:
    """Top images with overlays, attribute p.d.f., zero-shot labels, class weights, activation distribution.

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
    norm = relative_to(max(float(maps.max()), 1e-6))
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
        heat = overlay(img, a, alpha=0.6, normalize=norm, mask_below=0.15)
        tops.append((encode_jpeg(heat), int(i), float(v), cls))
    attrs, anote = None, None
    try:
        attrs = ws.textual().filter_top_attributes(k, 15)
    except StageMissing as e:
        anote = str(e)
    labs, lnote, inside = None, None, None
    labs = ws.filter_labels(k, 10)
    if labs is None:
        lnote = (
            "this bundle has no LaViSE stage (zero-shot concepts) yet: build it with "
            f"`{_build_hint(ws.bundle)}`"
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
    labels, scores, _, _ = _filter_labels(ws)
    return FilterDetail(
        k, labels[k], float(scores[k]), tops, attrs, anote, labs, lnote, classes, act, quant,
        float(thr[k]) if thr is not None else None, inside,
    )  # fmt: skip


# =========================================================================== concepts
@dataclass
class ConceptView:
    """Answer to a concept query, with grounding overlays."""

    text: str
    status: str
    suggestions: list[tuple[str, float]]
    filters: list[tuple[int, float, str, float]]  # filter, cosine, its best label, query's vote score
    images: list[tuple[bytes, int, float, str]]  # grounding overlay (JPEG), record, score, class


def concept_choices(ws: Workspace) -> list[tuple[str, str]]:
    """Data set concepts for the suggestion box: ``[(phrase, "seen" | "zero-shot")]``."""
    lv = ws.lavise()
    return [(p, "seen") for p in lv.seen] + [(p, "zero-shot") for p in lv.unseen]


def concept_view(
    ws: Workspace, text: str, n_filters: int = 8, n_images: int = 8, side: int = 180
) -> ConceptView:
    """Free text -> matching filters (cosine with their embeddings), images where they fire, grounding maps.

    ``images`` holds JPEG bytes ``side`` pixels wide. Cached per ``(text, n_filters, n_images, side)``.
    """
    key = (" ".join(str(text).split()).lower(), n_filters, n_images, side)
    return ws.queries.get(key, lambda: _concept_view(ws, text, n_filters, n_images, side))


def _concept_view(ws: Workspace, text: str, n_filters: int, n_images: int, side: int) -> ConceptView:
    from .lavise import grounding_heatmap

    lv = ws.lavise()
    res = lv.query(text, n_filters=n_filters, n_images=n_images)
    best = _filter_labels(ws)[0]
    filters = [
        (int(k), float(s), str(best[k]), float(ls))
        for k, s, ls in zip(res.filters, res.filter_scores, res.label_scores, strict=True)
    ]
    ds = ws.dataset()
    images = []
    if len(res.images):
        maps = ws.record_maps([int(i) for i in res.images])
        w = res.filter_weights()
        for i, s in zip(res.images, res.image_scores, strict=True):
            img = ws.record_image(int(i), side=side)
            heat = grounding_heatmap(maps[int(i)].astype(np.float32), res.filters, w)
            cls = ""
            if ds is not None and 0 <= ds.records[int(i)].label < len(ds.classes):
                cls = ds.classes[ds.records[int(i)].label]
            pic = overlay(img, heat, alpha=0.6, normalize=None, mask_below=0.15)
            images.append((encode_jpeg(pic), int(i), float(s), cls))
    status = {"unseen": "zero-shot (held out in training)", "seen": "seen in training"}.get(
        res.status, res.status
    )
    return ConceptView(res.text, status, res.suggestions, filters, images)


# =========================================================================== explain an image
@dataclass
class ImageAnalysis:
    """One forward pass of an image (cache it by :attr:`digest`)."""

    digest: str
    image: Image.Image  # what the network sees (cropped view)
    maps: np.ndarray  # (C, h, w)
    phi: np.ndarray  # (C,)
    logits: np.ndarray  # (K,)
    probs: np.ndarray  # (K,)


def analyse_image(
    ws: Workspace, source: bytes | Image.Image, name: str = "the uploaded file"
) -> ImageAnalysis:
    """Load (raises :class:`~lavise_core.images.ImageLoadError` with a user message) and run the model once."""
    if isinstance(source, Image.Image):
        img = source.convert("RGB")
        digest = hashlib.sha256(img.tobytes()).hexdigest()[:16]
    else:
        digest = hashlib.sha256(source).hexdigest()[:16]
        img = load_image(source, name=name)
    lm = ws.model()
    maps, logits = _forward(lm, [img], ws.bundle.layer)
    z = logits[0].astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    view = crop_to_view(img, lm.crop_box(*img.size))
    view.thumbnail((384, 384), Image.BILINEAR)
    return ImageAnalysis(digest, view, maps[0], maps[0].mean((1, 2)), logits[0], p.astype(np.float32))


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


def explain_image(
    ws: Workspace,
    a: ImageAnalysis,
    target: str | None = None,
    why_not: str | None = None,
    attribute: str | None = None,
    n_contrib: int = 10,
) -> ImageExplanation:
    """Explain ``a`` for class ``target`` (default: the prediction); ``why_not``: a contrast class."""
    classes = ws.classes
    order = np.argsort(-a.probs, kind="stable")[:5]
    preds = [(classes[int(j)], float(a.probs[j])) for j in order]
    c = int(order[0]) if not target else classes.index(target)
    Wc = ws.class_weight()
    if Wc is None:  # an inner layer: rank filters by activation instead
        contrib = a.phi.astype(np.float64)
        notes_w = [f"layer {ws.bundle.layer} does not feed the classifier: filters are ranked by activation"]
    else:
        contrib = a.phi.astype(np.float64) * np.asarray(Wc[c], np.float64)
        notes_w = []
    best = _filter_labels(ws)[0]
    top = np.argsort(-contrib, kind="stable")[:n_contrib]
    contributions = [(int(k), float(contrib[k]), str(best[k])) for k in top]
    notes: list[str] = list(notes_w)
    sentence = contrast = None
    attrs: list[tuple[str, float]] = []
    try:
        tx = ws.textual()
        exp = tx.explain(a.phi, class_index=c, top=5)
        sentence = exp.sentence
        attrs = [(t, float(s)) for t, s in exp.attributes]
        if why_not and why_not != classes[c]:
            contrast = tx.contrast(a.phi, c, why_not).sentence
    except StageMissing as e:
        notes.append(str(e))
    if attrs:
        attribute = attribute if attribute in {t for t, _ in attrs} else attrs[0][0]
        tx = ws.textual()
        heat = tx.ground(a.maps, attribute)
        learned = tx.part_learned is not None and bool(tx.part_learned[tx.column(attribute)])
        how = "w_kt fitted to the part annotations" if learned else "w_kt = specificity of p(t|f_k)"
        caption = f"Where the network sees “{attribute}” (yellow = strongest; eq. 9: Σ_k w_kt·A_k, {how})"
    else:
        attribute = None
        k = contributions[0][0]
        heat = np.asarray(a.maps[k], np.float32)
        caption = f"filter {k}, the largest contributor to {classes[c]}"
    zs = None
    try:
        lv = ws.lavise()
        zs = lv.explain_feature(a.phi[None, :].astype(np.float32), 8)[0]
    except StageMissing:
        pass
    hm = overlay(a.image, heat, alpha=0.6, mask_below=0.1)
    return ImageExplanation(
        preds, classes[int(order[0])], classes[c], sentence, contrast, attrs, attribute, hm, caption,
        contributions, zs, notes,
    )  # fmt: skip


# =========================================================================== classes & failures
@dataclass
class ClassReport:
    descriptions: list[tuple[str, str]] | None
    descriptions_note: str | None
    classes: list[str]
    confusion: np.ndarray | None  # (K', K') over the labelled classes shown
    confusion_classes: list[str]
    accuracy: float | None
    split: str
    errors: list[dict]
    confusing_attributes: list[tuple[str, int]]
    note: str | None = None


def class_report(ws: Workspace, max_errors: int = 24, split: str = "test") -> ClassReport:
    """Class descriptions (eq. 7–8), confusion matrix and explained errors (true vs predicted)."""
    ws.require_probe()
    classes = ws.classes
    desc, dnote = None, None
    try:
        tx = ws.textual()
        desc = [(classes[c], tx.describe_class(c).sentence) for c in range(len(classes))]
    except StageMissing as e:
        dnote = str(e)
    ds = ws.dataset()
    note = None
    if ds is None:
        return ClassReport(
            desc, dnote, classes, None, [], None, split, [], [], f"data set unavailable: {ws.dataset_error()}"
        )
    if list(ds.classes) != list(classes):
        note = (
            f"the data set's classes ({', '.join(ds.classes[:5])}{'…' if len(ds.classes) > 5 else ''}) are not the "
            f"model's {len(classes)} classes, so there is no confusion matrix; the table lists the predictions."
        )
        logits = np.asarray(ws.array("probe/logits"))
        pred = logits.argmax(1)
        errors = [
            {
                "index": i,
                "true": ds.classes[r.label] if r.label >= 0 else "?",
                "predicted": classes[int(pred[i])],
            }
            for i, r in enumerate(ds.records[:max_errors])
        ]
        return ClassReport(desc, dnote, classes, None, [], None, split, errors, [], note)
    labels = ds.labels()
    valid = ws.array("probe/valid")
    sel = (labels >= 0) & (np.asarray(valid, bool) if valid is not None else True)
    sp = ds.splits()
    if (sel & (sp == split)).any():
        sel &= sp == split
    else:
        split = "all"
    logits = np.asarray(ws.array("probe/logits"))
    pred = logits.argmax(1)
    K = len(classes)
    conf = np.zeros((K, K), np.int64)
    np.add.at(conf, (labels[sel], pred[sel]), 1)
    acc = float((pred[sel] == labels[sel]).mean()) if sel.any() else None
    errors: list[dict] = []
    confusing: list[tuple[str, int]] = []
    if desc is not None:
        from .textual import debug_misclassified

        idx = np.flatnonzero(sel)
        rep = debug_misclassified(
            np.asarray(tx.pdf), np.asarray(ws.array("probe/pooled"))[idx], logits[idx], labels[idx],
            np.asarray(tx.weight), classes, tx.vocabulary, max_items=max_errors,
        )  # fmt: skip
        confusing = rep.confusing_attributes[:15]
        for it in rep.items:
            errors.append(
                {
                    "index": int(idx[it.index]),
                    "true": classes[it.true_class],
                    "predicted": classes[it.predicted_class],
                    "true_sentence": it.true.sentence,
                    "predicted_sentence": it.predicted.sentence,
                    "confusing": [t for t, _ in it.confusing],
                }
            )
    else:
        for i in np.flatnonzero(sel & (pred != labels))[:max_errors]:
            errors.append({"index": int(i), "true": classes[labels[i]], "predicted": classes[int(pred[i])]})
    return ClassReport(desc, dnote, classes, conf, classes, acc, split, errors, confusing, note)


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


def background_views(ws: Workspace, ids: Sequence[int], size: int = 112) -> list[np.ndarray]:
    """Images ``ids`` with their object painted out, as the bias test saw them: ``(size, size, 3)`` uint8 each;
    unreadable images and images without a mask are skipped."""
    from .lavise import paint_out_object

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
        fnote = f"concept frequencies need the textual stage: build it with `{_build_hint(ws.bundle)}`"
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
        from .lavise import insight_for_bundle

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
    return DatasetReport(
        ds.name, len(ds), [(ds.classes[c], int(counts[c])) for c in range(K)], freq, names, fnote,
        bg, bg_names, spurious, bias, bnote,
    )  # fmt: skip


# =========================================================================== evaluation
@dataclass
class EvaluationReport:
    sections: dict[str, Any]  # "textual" / "lavise" -> the stored JSON
    missing: list[str]
    paper: dict[str, list[dict[str, Any]]]


def evaluation_report(ws: Workspace) -> EvaluationReport:
    """The stored evaluation results (``eval/textual.json``, ``eval/lavise.json``) and the papers' numbers."""
    sections, missing = {}, []
    for name in ("textual", "lavise"):
        if ws.bundle.has(f"eval/{name}.json") or (Path(ws.bundle.root) / "eval" / f"{name}.json").is_file():
            sections[name] = ws.bundle.read_json(f"eval/{name}")
        else:
            missing.append(
                f"no {name} evaluation yet: run `lavise evaluate {ws.bundle.root}"
                + ("" if name == "textual" else " --only lavise")
                + "`"
            )
    return EvaluationReport(sections, missing, PAPER_NUMBERS)


def _path(obj: Any, *keys: Any) -> Any:
    for k in keys:
        in_dict = isinstance(obj, dict) and k in obj
        in_list = isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj)
        if not (in_dict or in_list):
            return None
        obj = obj[k]
    return obj if isinstance(obj, int | float) and not isinstance(obj, bool) else None


def evaluation_headlines(name: str, obj: dict) -> list[dict[str, Any]]:
    """The few numbers of an evaluation JSON a non-expert needs, each with its baseline and a verdict.

    Rows: ``question, ours, baseline, baseline_name, paper, verdict`` (``None`` where not stored);
    ``higher`` is better for every row except the randomisation check (lower = explanations depend on
    the weights, as they should)."""
    rows: list[dict[str, Any]] = []

    def row(
        question: str, ours: Any, base: Any, base_name: str, paper: Any = None, higher: bool = True
    ) -> None:
        if ours is None:
            return
        verdict = "—"
        if base is not None:
            better = ours > base if higher else ours < base
            verdict = "better than the baseline" if better else "NOT better than the baseline"
        rows.append(
            {"question": question, "ours": round(float(ours), 3),
             "baseline": None if base is None else round(float(base), 3), "baseline is": base_name,
             "paper": paper, "verdict": verdict}
        )  # fmt: skip

    if name == "textual":
        parts = _path(obj, "grounding", "parts_cell_grid", 1)
        row(
            "Does an attribute's heatmap point at the right body part? (PCK@0.2, %"
            + (", weights fitted to the part annotations)" if parts is not None else ")"),
            parts if parts is not None else _path(obj, "grounding", "proposed", 1),
            _path(obj, "grounding", "constant", 1),
            "the same heatmap for every attribute",
            _path(obj, "paper", "pck", "proposed", 1),
        )
        row(
            "Are the attributes an explanation names really in the image? (precision, %)",
            _path(obj, "retrieval", "labels", "precision"),
            _path(obj, "retrieval", "labels", "random", "precision"),
            "random attributes",
        )
        row(
            "Share of the image's attributes the explanation finds (recall, %)",
            _path(obj, "retrieval", "labels", "recall"),
            _path(obj, "retrieval", "labels", "random", "recall"),
            "random attributes",
            _path(obj, "paper", "retrieval", "recall"),
        )
        row(
            "Sentences vs. the human captions (BLEU-4, 0–1)",
            _path(obj, "bleu", "overall"),
            None,
            "",
            _path(obj, "paper", "bleu", "overall"),
        )
        row("Do explanations change when the network's weights are randomised? (rank correlation; low = yes)",
            _path(obj, "randomization", "spearman_explanation"),
            _path(obj, "randomization", "spearman_explanation_control"), "the same network explained twice",
            higher=False)  # fmt: skip
    elif name == "lavise":
        # the labels rank the whole open vocabulary, so the fair baselines rank it too: the same head
        # without filter attention (the baseline) and random phrases of that vocabulary; the
        # 102-concept "oracle" numbers are in the full table
        for split, what in (("seen", "concepts seen in training"), ("unseen", "zero-shot concepts")):
            row(f"Filter labels that match the ground truth, {what} (recall@20)",
                _path(obj, "recall", f"{split}@20", "lavise"),
                _path(obj, "recall", f"{split}@20", "no_attention"),
                "the same head without filter attention")  # fmt: skip
    return rows


def flatten_tables(obj: Any, prefix: str = "") -> list[tuple[str, list[dict]]]:
    """Find the tables in an evaluation JSON: lists of dicts become tables, dicts of scalars one-row tables."""
    out: list[tuple[str, list[dict]]] = []
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        out.append((prefix or "results", obj))
    elif isinstance(obj, dict):
        scalars = {k: v for k, v in obj.items() if isinstance(v, int | float | str | bool) or v is None}
        if scalars:
            out.append((prefix or "summary", [scalars]))
        for k, v in obj.items():
            if isinstance(v, dict | list):
                out.extend(flatten_tables(v, f"{prefix} / {k}" if prefix else str(k)))
    return out


# =========================================================================== building
def build_bundle(
    model: str,
    data: str | Path,
    bundles: str | Path = "data/bundles",
    layer: str | None = None,
    stages: Sequence[str] = ("probe", "textual", "lavise"),
    report: Callable[[float, str], None] | None = None,
) -> Bundle:
    """Build (or finish) a bundle stage by stage, calling ``report(fraction, message)`` between stages."""
    from .networks import load_model
    from .probe import ProbeSettings, open_or_create_bundle, run_probe

    say = report or (lambda f, m: None)
    say(0.02, f"opening the data set {data}")
    try:
        ds = ProbeDataset.open(data)
    except DatasetError as e:
        raise ValueError(str(e)) from e
    say(0.05, f"loading the model {model}")
    lm = load_model(model)
    bundle = open_or_create_bundle(Path(bundles), lm, ds, layer)
    say(0.1, f"probe pass over {len(ds)} images (the longest step)")

    def probe_progress(done: int, total: int) -> None:
        say(0.1 + 0.45 * done / max(total, 1), f"probe pass: {done} / {total} images")

    run_probe(bundle, lm, ds, ProbeSettings(progress=False, num_workers=0), on_progress=probe_progress)
    if "textual" in stages:
        say(0.55, "textual stage: attributes from captions and the filter–attribute p.d.f.")
        from .grounding import build_grounding_stage
        from .textual import build_textual_stage

        build_textual_stage(bundle, ds, progress=False)
        say(0.62, "textual stage: grounding weights from the part annotations")
        build_grounding_stage(bundle, ds, lm, progress=False)
    if "lavise" in stages:
        say(0.7, "LaViSE stage: concept index, explainer head, filter labels")
        from .lavise import build_lavise_stage

        build_lavise_stage(bundle, ds, lm, progress=False)
    say(1.0, "done")
    return Bundle.open(bundle.root)
