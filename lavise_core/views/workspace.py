"""The shared workspace of the dashboard: one opened bundle, lazily loaded pieces, thread-safe.

A :class:`Workspace` wraps one opened bundle and lazily loads what the pages need (data set, textual
explainer, LaViSE explainer, model), each at most once and thread-safely, so one cached workspace is
shared by every browser session. A page that needs a stage the bundle lacks gets :class:`StageMissing`
(a ``ValueError`` whose message says which command builds it).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lavise_core.api import CONFIDENT_LIFT, CONFIDENT_SCORE, Explainer, build_hint
from lavise_core.data.dataset import DATASET_FILE
from lavise_core.data.images import ImageLoadError, load_image
from lavise_core.pipeline.bundle import Bundle, StageMissing
from lavise_core.views.overlays import crop_to_view

__all__ = [
    "BIAS_CONFIRM_SHARE",
    "CONFIDENT_LIFT",
    "CONFIDENT_SCORE",
    "StageMissing",
    "Workspace",
    "bundle_class_note",
    "bundle_label",
    "default_bundle",
    "model_label",
    "unique_bundle_labels",
]


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


def model_label(spec: str) -> str:
    """A short name for a model spec (a checkpoint path becomes its file name)."""
    base = spec.split("?")[0]
    if base.startswith("checkpoint:"):
        return Path(base.split(":", 1)[1]).stem
    if base.endswith(".json"):
        return Path(base).stem
    return base


#: the stages a bundle label lists, and that rank bundles for :func:`default_bundle`
LABEL_STAGES = ("probe", "textual", "lavise")
#: the model spec of the SynthBirds demo bundle, which the dashboard opens first
DEMO_MODEL_SPEC = "synthbirds"


def bundle_label(b: Bundle) -> str:
    """``data set · model · layer [stages done]``: how the bundle selector names a bundle."""
    m = b.manifest
    stages = [s for s in LABEL_STAGES if b.stage_done(s)]
    return f"{m['dataset'].get('name', '?')} · {model_label(m['model']['spec'])} · {m['layer']} [{', '.join(stages) or 'empty'}]"


def unique_bundle_labels(bundles: Sequence[Bundle]) -> dict[str, str]:
    """``{bundle path: label}``; labels shared by several bundles get the data folder, then the bundle folder.

    (The selectbox matches the chosen option by its label: two bundles with one label would be one choice.)
    """
    labels = {str(b.root): bundle_label(b) for b in bundles}
    for extra in (
        lambda b: Path(str(b.manifest["dataset"].get("root", "?"))).name,
        lambda b: Path(b.root).name,
    ):
        counts = Counter(labels.values())
        labels = {
            str(b.root): labels[str(b.root)] + (f" · {extra(b)}" if counts[labels[str(b.root)]] > 1 else "")
            for b in bundles
        }
    return labels


def default_bundle(bundles: Sequence[Bundle]) -> Bundle:
    """The bundle the dashboard opens first: among the SynthBirds demo bundles when there is one, else among
    all, the one with the most of :data:`LABEL_STAGES` done, the newest (``created``) of those.

    Raises ``ValueError`` on an empty list."""
    demo = [b for b in bundles if b.manifest["model"]["spec"] == DEMO_MODEL_SPEC]
    pool = demo or bundles
    return max(
        pool,
        key=lambda b: (sum(b.stage_done(s) for s in LABEL_STAGES), b.manifest.get("created", "")),
    )


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


# =========================================================================== workspace
class LRUCache:
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


class Workspace(Explainer):
    """The dashboard's :class:`~lavise_core.api.Explainer`: the same lazily loaded pieces, plus caches of
    rendered thumbnails, activation maps, filter cards, filter pages and query answers (thread-safe LRUs),
    so one cached workspace serves every browser session."""

    def __init__(
        self,
        bundle: Bundle,
        model_loader: Callable[[], Any] | None = None,
        lavise_loader: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(bundle, model_loader, lavise_loader)
        self.thumbs = LRUCache(2048)
        self.maps = LRUCache(512)
        self.cards = LRUCache(4096)  # JPEG bytes of filter cards, per (filter, n, tile)
        self.details = LRUCache(256)  # FilterDetail per (filter, n_images): overlays rendered once
        self.queries = LRUCache(128)  # ConceptView per (query text, n_filters, n_images)

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

    def phrases(self) -> list[str]:
        """The LaViSE vocabulary (``lavise/phrases.json``), read without loading the index."""
        table = self.label_table()
        if table is None:
            raise StageMissing(
                f"this bundle has no LaViSE vocabulary: build it with `{build_hint(self.bundle)}`"
            )
        return table[2]

    def filter_inside(self, k: int) -> float | None:
        """Share of filter ``k``'s activation on the object (``lavise/filter_inside``), if stored."""
        arr = self.array("lavise/filter_inside") if self.has_lavise() else None
        if arr is None or not np.isfinite(arr[k]):
            return None
        return float(arr[k])

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
                return placeholder_image(side, "data set missing")
            path = ds.image_path(int(i))
            if not path.is_file():  # deleted or moved after the build: the bundle's numbers still stand
                return placeholder_image(side, "image deleted")
            try:
                img = load_image(path, name=ds.records[int(i)].path)
            except ImageLoadError:
                return placeholder_image(side, "unreadable")
            img = crop_to_view(img, self.view_box(*img.size))
            img.thumbnail((side, side), Image.BILINEAR)
            return img

        return self.thumbs.get((int(i), side), make)

    def stored_maps(self) -> np.ndarray | None:
        """Every probe image's layer maps ``(N, C, h, w)`` (``probe/maps``, memory-mapped), or ``None``
        when the probe pass did not keep them (older bundles, or maps over ``ProbeSettings.maps_mib``)."""
        arr, valid = self.array("probe/maps"), self.array("probe/valid")
        if arr is None or valid is None or arr.ndim != 4 or arr.shape[:2] != (len(valid), self.channels):
            return None
        return arr

    def record_maps(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """Layer maps ``(C, h, w)`` float16 of probe images: read from :meth:`stored_maps`, else one batched forward
        pass for the uncached ones."""
        stored = self.stored_maps()
        if stored is not None:
            return {int(i): np.asarray(stored[int(i)], np.float16) for i in indices}
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
            maps, _ = self.forward(imgs)
            for i, m in zip(todo, maps, strict=True):
                m16 = m.astype(np.float16)
                self.maps.get(i, lambda m16=m16: m16)
                out[i] = m16
        return out


def placeholder_image(side: int, text: str) -> Image.Image:
    from PIL import ImageDraw

    img = Image.new("RGB", (side, side), (235, 235, 235))
    ImageDraw.Draw(img).text((6, side // 2 - 6), text, fill=(90, 90, 90))
    return img
