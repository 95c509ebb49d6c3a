"""Explain page, section "Where does it look?": attribution maps side by side, with their faithfulness.

:func:`where_it_looks` computes, for one analysed image, each chosen method's map for the predicted class and
one other class, puts both classes of a method on ONE colour scale (divided by the 99th percentile of the
method's values over both classes, clipped, so the weaker class looks weaker and sparse gradient maps stay visible), and attaches the method's numbers from ``eval/attribution.json`` (the
``attribution`` stage) when the bundle has them. :func:`parse_methods` / :func:`methods_param` turn the method
choice into the URL's ``methods`` query parameter and back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lavise_core.api import ImageAnalysis
from lavise_core.evaluate.attribution import EVAL_OPTIONS, deletion_insertion
from lavise_core.explain.attribution.base import AttributionError
from lavise_core.explain.attribution.faithfulness import curve_auc, pixel_ranks, random_ranks
from lavise_core.explain.attribution.registry import DEFAULT_METHOD, METHODS, make_method, method_labels
from lavise_core.views.layers import shown_layer_names
from lavise_core.views.overlays import colorize, lut_colormap, overlay
from lavise_core.views.workspace import Workspace

__all__ = [
    "DEFAULT_METHOD",
    "IG_BASELINES",
    "AttributionPanel",
    "AttributionSettings",
    "AttributionView",
    "ImageFaithfulness",
    "attribution_findings",
    "attribution_rows",
    "cam_layers",
    "colour_legend",
    "faithfulness_text",
    "image_faithfulness",
    "image_faithfulness_text",
    "method_labels",
    "method_options",
    "methods_param",
    "panel_faithfulness",
    "parse_methods",
    "sanity_rows",
    "signed_legend",
    "signed_overlay",
    "stored_attribution",
    "view_tensor",
    "where_it_looks",
]

#: colour 1 = this percentile of a method's values over both classes (Smilkov et al. clip at the 99th)
DISPLAY_PERCENTILE = 99.0
#: the dashboard's method options: exactly those the stored faithfulness numbers were measured with
PAGE_OPTIONS: dict[str, dict] = EVAL_OPTIONS
#: deletion / insertion steps for one image when the bundle stores none (the evaluation's default)
FAITHFULNESS_STEPS = 16
#: integrated gradients' baselines x': name -> what it is, in plain words
IG_BASELINES: dict[str, str] = {
    "mean": "the data set's mean colour (0 after normalisation)",
    "black": "a black image",
    "blurred": "the image blurred (Gaussian, sigma 5 px)",
}
#: signed maps: evidence for the class in red, against it in blue (each on its own ramp from transparent)
FOR_CLASS = lut_colormap([(0.0, (120, 0, 0)), (1.0, (255, 60, 40))])
AGAINST_CLASS = lut_colormap([(0.0, (0, 40, 120)), (1.0, (60, 140, 255))])


@dataclass(frozen=True)
class AttributionSettings:
    """The Explain page's attribution controls (Captum / torchcam demos offer the same). Defaults are the
    options the stored faithfulness numbers were measured with (:data:`PAGE_OPTIONS`), so they stay comparable.

    ``occlusion_window`` / ``occlusion_stride`` in network-input pixels; ``cam_layer`` None = the bundle's layer
    (the one feeding global pooling); ``signed``: show evidence for (red) and against (blue) the class."""

    ig_baseline: str = "mean"
    ig_steps: int = int(PAGE_OPTIONS.get("integrated_gradients", {}).get("steps", 32))
    smoothgrad_noise: float = 0.15
    smoothgrad_samples: int = int(PAGE_OPTIONS.get("smoothgrad", {}).get("n_samples", 25))
    occlusion_window: int = int(PAGE_OPTIONS.get("occlusion", {}).get("window", 16))
    occlusion_stride: int = int(PAGE_OPTIONS.get("occlusion", {}).get("stride", 16))
    cam_layer: str | None = None
    signed: bool = False

    def check(self, input_size: int) -> None:
        """Raise ValueError, in plain words, for a setting no method can use on ``input_size``-pixel inputs."""
        if self.ig_baseline not in IG_BASELINES:
            raise ValueError(f"unknown integrated-gradients baseline {self.ig_baseline!r}; choose from {', '.join(IG_BASELINES)}")  # fmt: skip
        if not 1 <= self.ig_steps <= 256:
            raise ValueError(f"integrated gradients needs 1 to 256 steps, not {self.ig_steps}")
        if not 0 <= self.smoothgrad_noise <= 1:
            raise ValueError(f"SmoothGrad's noise level is a share of the image's value range (0 to 1), not {self.smoothgrad_noise}")  # fmt: skip
        if not 1 <= self.smoothgrad_samples <= 200:
            raise ValueError(f"SmoothGrad needs 1 to 200 noisy samples, not {self.smoothgrad_samples}")
        if not 1 <= self.occlusion_window <= input_size:
            raise ValueError(f"the occlusion window must be 1 to {input_size} pixels (the network's input), not {self.occlusion_window}")  # fmt: skip
        if not 1 <= self.occlusion_stride <= self.occlusion_window:
            raise ValueError(f"the occlusion stride must be 1 to the window ({self.occlusion_window} pixels), not {self.occlusion_stride}")  # fmt: skip

    @property
    def stored_defaults(self) -> bool:
        """Whether the maps are made as the stored faithfulness numbers were (the signed view changes nothing)."""
        return dataclasses.replace(self, signed=False) == AttributionSettings()


def cam_layers(ws: Workspace) -> list[str]:
    """The layers offered to the CAMs: the bundle's layer first, then the ones the ``layers`` stage recorded."""
    recorded = ws.bundle.read_json("layers/names") if ws.bundle.has("layers/names.json") else []
    # the layers stage may record the bundle's layer under a child's name (features.20 = features): named once
    return list(dict.fromkeys([ws.bundle.layer, *shown_layer_names(ws, [str(n) for n in recorded])]))


def method_options(lm: Any, x: Any, settings: AttributionSettings) -> dict[str, dict]:
    """Constructor options of every method for ``settings`` on input ``x (B, 3, S, S)`` (ValueError if bad)."""
    import torch

    settings.check(int(lm.input_size))
    if settings.ig_baseline == "black":
        mean = torch.tensor(lm.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(lm.std, dtype=torch.float32)[:, None, None]
        baseline: Any = (0.0 - mean) / std
    elif settings.ig_baseline == "blurred":
        from torchvision.transforms.functional import gaussian_blur

        baseline = gaussian_blur(x, [21, 21], [5.0, 5.0])
    else:
        baseline = 0.0
    layer = {"layer": settings.cam_layer} if settings.cam_layer else {}
    return {
        "integrated_gradients": {"steps": settings.ig_steps, "baseline": baseline},
        "smoothgrad": {
            "n_samples": settings.smoothgrad_samples,
            "noise_level": settings.smoothgrad_noise,
            "generator": torch.Generator().manual_seed(0),
        },
        "occlusion": {"window": settings.occlusion_window, "stride": settings.occlusion_stride},
        "gradcam": dict(layer),
        "gradcam_pp": dict(layer),
        "cam": dict(layer),
    }


def parse_methods(raw: str | Sequence[str] | None) -> list[str]:
    """Known method names from the URL value ``"gradcam,smoothgrad"`` (unknown ones dropped; default Grad-CAM)."""
    if raw is None:
        return [DEFAULT_METHOD]
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    names = [p.strip() for p in parts if p.strip() in METHODS]
    return list(dict.fromkeys(names)) or [DEFAULT_METHOD]


def methods_param(methods: Sequence[str]) -> str:
    """The URL value for a method choice (inverse of :func:`parse_methods`)."""
    return ",".join(m for m in methods if m in METHODS)


def stored_attribution(ws: Workspace) -> dict | None:
    """``eval/attribution.json`` of the bundle, or None when the stage was not built."""
    if not (Path(ws.bundle.root) / "eval" / "attribution.json").is_file():
        return None
    obj = ws.bundle.read_json("eval/attribution")
    return obj if isinstance(obj, dict) else None


def attribution_rows(obj: dict) -> list[dict[str, Any]]:
    """One row per method of a stored evaluation (plus the random baseline row), for a table: numbers as text
    with three decimals, "—" where a measure does not apply (the baseline has no time per image)."""

    def num(v: Any, fmt: str = ".3f") -> str:
        return "—" if v is None or (isinstance(v, float) and v != v) else format(float(v), fmt)

    rows = []
    b = obj.get("baselines", {})
    for name, r in obj.get("methods", {}).items():
        rows.append(
            {
                "method": METHODS[name].label if name in METHODS else name,
                "deletion AUC ↓": num(r.get("deletion_auc")),
                "insertion AUC ↑": num(r.get("insertion_auc")),
                "pointing game ↑": num(r.get("pointing")),
                "energy in parts ↑": num(r.get("energy")),
                "rank corr. under re-init (mean) ↓": num(r.get("sanity_mean")),
                "s / image": num(r.get("seconds_per_image"), ".4f"),
            }
        )
    rnd = obj.get("random", {})
    rows.append(
        {
            "method": "baseline (random order / uniform map)",
            "deletion AUC ↓": num(rnd.get("deletion_auc")),
            "insertion AUC ↑": num(rnd.get("insertion_auc")),
            "pointing game ↑": num(b.get("pointing_uniform")),
            "energy in parts ↑": num(b.get("energy_uniform")),
            "rank corr. under re-init (mean) ↓": num(0.0),
            "s / image": "—",
        }
    )
    return rows


def _with_baselines(stored: dict | None, method: str) -> dict | None:
    if stored is None or method not in stored.get("methods", {}):
        return None
    return {
        **stored["methods"][method],
        "random": stored.get("random", {}),
        "baselines": stored.get("baselines", {}),
        "images": stored.get("images"),
    }


def faithfulness_text(f: dict | None) -> str:
    """One line of a method's stored faithfulness, each number beside its baseline (Markdown)."""
    if f is None:
        return "_No faithfulness numbers stored for this method._"
    r, b = f.get("random", {}), f.get("baselines", {})
    parts = [
        f"deletion AUC **{f['deletion_auc']:.3f}** (random order {r.get('deletion_auc', float('nan')):.3f}; lower is better)",
        f"insertion AUC **{f['insertion_auc']:.3f}** (random {r.get('insertion_auc', float('nan')):.3f}; higher is better)",
    ]
    if f.get("pointing") is not None:
        parts.append(
            f"pointing game **{f['pointing']:.2f}** on the discriminative parts (random pixel {b.get('pointing_uniform', 0):.2f}, "
            f"random pixel on the bird {b.get('pointing_on_bird', 0):.2f})"
        )
        parts.append(
            f"energy in those parts **{f['energy']:.2f}** (uniform map {b.get('energy_uniform', 0):.2f})"
        )
    s = f.get("sanity") or []
    if s and f.get("sanity_mean") is not None:
        verdict = "passes" if f["sanity_mean"] < 0.5 else "FAILS"
        parts.append(
            f"randomisation check: rank correlation with the trained map {s[0]:.2f} after re-initialising the "
            f"classifier, {s[-1]:.2f} after all layers, mean {f['sanity_mean']:.2f} — {verdict}"
        )
    return f"On {f.get('images', '?')} held-out test images: " + "; ".join(parts) + "."


def sanity_rows(obj: dict) -> list[dict[str, Any]]:
    """Cascading randomisation: one row per method, one column per re-initialised layer (top first)."""
    layers = obj.get("sanity_layers", [])
    rows = []
    for name, r in obj.get("methods", {}).items():
        row: dict[str, Any] = {"method": METHODS[name].label if name in METHODS else name}
        row.update({f"+{layer}": v for layer, v in zip(layers, r.get("sanity", []), strict=False)})
        rows.append(row)
    return rows


def attribution_findings(obj: dict) -> list[str]:
    """Plain sentences: which method wins each criterion, against its baseline, and who fails the sanity check."""
    m, w, b, rnd = (
        obj.get("methods", {}),
        obj.get("winners", {}),
        obj.get("baselines", {}),
        obj.get("random", {}),
    )

    def lab(name: str) -> str:
        return METHODS[name].label if name in METHODS else name

    out = []
    if "deletion_auc" in w:
        k = w["deletion_auc"]
        out.append(
            f"Deletion (lower is better): **{lab(k)}** {m[k]['deletion_auc']:.3f} vs random order "
            f"{rnd.get('deletion_auc', float('nan')):.3f}."
        )
    if "insertion_auc" in w:
        k = w["insertion_auc"]
        out.append(
            f"Insertion (higher is better): **{lab(k)}** {m[k]['insertion_auc']:.3f} vs random order "
            f"{rnd.get('insertion_auc', float('nan')):.3f}."
        )
    if "pointing" in w:
        k = w["pointing"]
        tied = " = ".join(f"**{lab(n)}**" for n, r in m.items() if r.get("pointing") == m[k]["pointing"])
        out.append(
            f"Pointing game on the species' discriminative parts: {tied} {m[k]['pointing']:.2f} vs a random "
            f"pixel {b.get('pointing_uniform', 0):.2f} (a random pixel on the bird {b.get('pointing_on_bird', 0):.2f})."
        )
    if "energy" in w:
        k = w["energy"]
        out.append(
            f"Energy inside those parts: **{lab(k)}** {m[k]['energy']:.2f} vs a uniform map {b.get('energy_uniform', 0):.2f}."
        )
    fails = [lab(k) for k, r in m.items() if r.get("sanity_mean") is not None and r["sanity_mean"] >= 0.5]
    passes = [lab(k) for k, r in m.items() if r.get("sanity_mean") is not None and r["sanity_mean"] < 0.5]
    if fails:
        out.append(
            "Randomisation check FAILED (mean rank correlation with the trained map >= 0.5 while the layers are "
            "re-initialised top down: the map shows the image more than the model): " + ", ".join(fails) + "."
        )
    if passes:
        out.append("Randomisation check passed: " + ", ".join(passes) + ".")
    return out


def view_tensor(lm: Any, image: Image.Image) -> Any:
    """The network input ``(1, 3, S, S)`` of an analysed image's view (already the network's crop)."""
    import torch

    s = lm.input_size
    arr = np.asarray(image.convert("RGB").resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(lm.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(lm.std, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std)[None]


def signed_legend(width: int = 256, height: int = 14) -> Image.Image:
    """The colour bar of signed maps: -1 (against the class, blue) on the left, 0 (black), +1 (for, red)."""
    half = np.linspace(1.0, 0.0, width // 2, dtype=np.float32)
    row = np.concatenate([AGAINST_CLASS(half), FOR_CLASS(half[::-1])], axis=0)
    row = (
        row * np.concatenate([half, half[::-1]])[:, None]
    )  # fade to black at 0, as the overlay fades to the image
    return Image.fromarray(np.tile(row[None].round().astype(np.uint8), (height, 1, 1)))


def colour_legend(width: int = 256, height: int = 14, cmap: str = "inferno") -> Image.Image:
    """The colour bar of the section's one scale: 0 (left) to the larger class maximum (right)."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return Image.fromarray(colorize(ramp, cmap))


@dataclass
class ImageFaithfulness:
    """Deletion and insertion of ONE image's pixels in a map's order (Petsiuk et al. 2018), for class ``target``.

    ``deletion`` / ``insertion``: ``(S+1,)`` class probability after taking ``0, 1/S, ..., 1`` of the pixels;
    the AUCs their trapezoid means; ``random_*``: the same image with a seeded random pixel order (the baseline).
    """

    target: str
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float


def image_faithfulness(
    lm: Any, x: Any, target: int, pixel_map: Any, steps: int = FAITHFULNESS_STEPS, seed: int = 0
) -> ImageFaithfulness:
    """Deletion / insertion curves of image ``x (1, 3, H, W)`` for class index ``target`` in the order of
    ``pixel_map (H, W)`` (most important first, ties at random), and the AUCs of a random order on the same image.
    Runs under the model's lock (one shared model: a hook another session put on it must not see these passes)."""
    import torch

    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, 3, H, W), got shape {tuple(x.shape)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    m = torch.as_tensor(pixel_map, dtype=torch.float32).reshape(1, -1)
    if m.shape[1] != h * w:
        raise ValueError(f"the map has {m.shape[1]} values, the image {h}×{w} pixels")
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.cat([pixel_ranks(m.reshape(1, h, w), gen), random_ranks(1, h * w, gen)])
    t = torch.full((2,), int(target), dtype=torch.int64)
    with lm.lock:
        d, n = deletion_insertion(lm.model, x.expand(2, -1, -1, -1), t, ranks, steps)
    da, na = curve_auc(d), curve_auc(n)
    return ImageFaithfulness(
        str(lm.class_names[int(target)]), d[0], n[0], float(da[0]), float(na[0]), float(da[1]), float(na[1])
    )


def image_faithfulness_text(f: ImageFaithfulness) -> str:
    """One line of plain words on one image's deletion and insertion, each beside the random order (Markdown)."""
    d_ok = f.deletion_auc < f.random_deletion_auc
    i_ok = f.insertion_auc > f.random_insertion_auc
    verdict = (
        "the map's order beats a random order on both"
        if d_ok and i_ok
        else "the map's order beats a random order on neither: this map does not find what drives the score"
        if not (d_ok or i_ok)
        else "the map's order beats a random order on one of the two only"
    )
    return (
        f"**This image**, class {f.target}: deleting its most important pixels first drops the probability "
        f"with AUC **{f.deletion_auc:.3f}** (random order {f.random_deletion_auc:.3f}; lower is better); "
        f"revealing them first on a blurred copy gives AUC **{f.insertion_auc:.3f}** "
        f"(random {f.random_insertion_auc:.3f}; higher is better) — {verdict}."
    )


@dataclass
class AttributionPanel:
    """One method: its overlays per class (same scale), the raw maxima, its stored faithfulness numbers."""

    method: str
    label: str
    overlays: dict[str, Image.Image]
    maxima: dict[str, float]
    seconds: float
    faithfulness: dict[str, Any] | None  # the stored summary over the evaluation's images (the baseline)
    image: ImageFaithfulness | None = None  # this image's own deletion / insertion for the predicted class
    pixel_map: np.ndarray | None = field(default=None, repr=False)  # (H, W) raw map of the predicted class


@dataclass
class AttributionView:
    classes: list[str]  # [predicted, other]
    panels: list[AttributionPanel]
    legend: Image.Image
    scale_note: str
    notes: list[str] = field(default_factory=list)


def where_it_looks(
    ws: Workspace,
    a: ImageAnalysis,
    methods: Sequence[str],
    other: str | None = None,
    faithfulness: bool = True,
    settings: AttributionSettings | None = None,
) -> AttributionView:
    """Each method's map for the predicted class and ``other`` (default: the runner-up), on one scale per method;
    with ``faithfulness``, each map's deletion / insertion on this image for the predicted class (cached per image
    in the workspace, with the maps)."""
    settings = settings or AttributionSettings()
    key = ("where_it_looks", a.digest, tuple(parse_methods(list(methods))), other, faithfulness, settings)
    return ws.maps.get(key, lambda: _where_it_looks(ws, a, methods, other, faithfulness, settings))


def _faithfulness_steps(ws: Workspace) -> int:
    """The deletion / insertion steps of the stored summary (so this image's numbers compare with it)."""
    stored = stored_attribution(ws)
    return int(stored.get("steps", FAITHFULNESS_STEPS)) if stored else FAITHFULNESS_STEPS


def panel_faithfulness(
    ws: Workspace, a: ImageAnalysis, view: AttributionView, panel: AttributionPanel
) -> ImageFaithfulness:
    """This image's deletion / insertion for ``view``'s predicted class in ``panel``'s map order, on request:
    what :func:`where_it_looks` with ``faithfulness=True`` puts in ``panel.image`` (same map, same steps, same
    seed), cached per image, method and map in the workspace."""
    if panel.image is not None:
        return panel.image
    if panel.pixel_map is None:
        raise ValueError(f"the {panel.label} panel keeps no map to measure")
    lm = ws.model()
    target = list(lm.class_names).index(view.classes[0])
    m = np.ascontiguousarray(panel.pixel_map, np.float32)
    key = ("faithfulness", a.digest, panel.method, target, hashlib.sha256(m.tobytes()).hexdigest()[:16])
    return ws.maps.get(
        key, lambda: image_faithfulness(lm, view_tensor(lm, a.image), target, m, _faithfulness_steps(ws))
    )


def _signed_top(signed: np.ndarray) -> float:
    top = float(np.percentile(np.abs(signed), DISPLAY_PERCENTILE))
    return top if top > 0 else float(np.abs(signed).max())


def signed_overlay(image: Image.Image, signed: np.ndarray, top: float) -> Image.Image:
    """``signed (h, w)`` on ``image``: values above 0 in red, below 0 in blue, both divided by ``top`` and clipped
    (two passes of :func:`overlay`, each leaving weak values uncoloured)."""
    top = top if top > 0 else 1.0
    pos = np.clip(signed / top, 0.0, 1.0)
    neg = np.clip(-signed / top, 0.0, 1.0)
    out = overlay(image, pos, cmap=FOR_CLASS, alpha=0.7, normalize=None, mask_below=0.05)
    return overlay(out, neg, cmap=AGAINST_CLASS, alpha=0.7, normalize=None, mask_below=0.05)


def _where_it_looks(
    ws: Workspace,
    a: ImageAnalysis,
    methods: Sequence[str],
    other: str | None,
    faithfulness: bool,
    settings: AttributionSettings,
) -> AttributionView:
    lm = ws.model()
    names = list(lm.class_names)
    order = np.argsort(-a.probs)
    predicted = names[int(order[0])]
    if other is None or other not in names or other == predicted:
        other = names[int(order[1])] if len(order) > 1 else predicted
    classes = [predicted] if other == predicted else [predicted, other]
    targets = [names.index(c) for c in classes]
    x = view_tensor(lm, a.image)
    options = method_options(lm, x, settings)
    stored = stored_attribution(ws)
    steps = _faithfulness_steps(ws)
    labels = method_labels()
    panels: list[AttributionPanel] = []
    failed: list[str] = []
    for m in parse_methods(list(methods)):
        t0 = time.perf_counter()
        try:
            method = make_method(m, lm, **options.get(m, {}))
        except AttributionError as e:
            failed.append(f"{labels[m]}: {e}")
            continue
        xb = x.expand(len(targets), -1, -1, -1)
        try:
            maps = method.pixel_map(xb, targets).float().cpu().numpy()
            signed = method.signed_map(xb, targets).float().cpu().numpy() if settings.signed else None
        except AttributionError as e:  # e.g. CAM at a layer that does not feed the classifier: say so, go on
            failed.append(f"{labels[m]}: {e}")
            continue
        seconds = time.perf_counter() - t0
        top = float(
            np.percentile(maps, DISPLAY_PERCENTILE)
        )  # pixel maps are sparse: the max alone hides them
        top = top if top > 0 else float(maps.max())
        scaled = np.clip(maps / top, 0.0, 1.0) if top > 0 else maps
        panels.append(
            AttributionPanel(
                m,
                labels[m],
                {
                    c: overlay(a.image, scaled[i], alpha=0.65, normalize=None, mask_below=0.05)
                    if signed is None
                    else signed_overlay(a.image, signed[i], _signed_top(signed))
                    for i, c in enumerate(classes)
                },
                {c: float(maps[i].max()) for i, c in enumerate(classes)},
                seconds,
                _with_baselines(stored, m),
                image_faithfulness(lm, x, targets[0], maps[0], steps) if faithfulness else None,
                maps[0],
            )
        )
    notes = [f"No map for {f}." for f in failed]
    if settings.signed:
        notes.append(
            "Signed maps: red = evidence for the class, blue = evidence against it, each divided by the 99th "
            "percentile of the map's absolute values over both classes. The faithfulness numbers use the "
            "unsigned map (evidence for the class)."
        )
    if stored is not None and not settings.stored_defaults:
        notes.append(
            "The advanced settings differ from those the stored summary was measured with: compare this image's "
            "numbers with it loosely."
        )
    if stored is None:
        notes.append(
            "No faithfulness numbers for this bundle yet: measure them with "
            f"`lavise evaluate {ws.bundle.root} --only attribution` (about 1.5 min on the demo CNN)."
        )
    if settings.signed:
        return AttributionView(
            classes,
            panels,
            signed_legend(),
            "One scale per method: blue = evidence against the class, red = evidence for it, each divided by the "
            "99th percentile of the map's absolute values over both classes, clipped (near 0 = the image shows).",
            notes,
        )
    return AttributionView(
        classes,
        panels,
        colour_legend(),
        "One scale per method: colour = the map divided by the 99th percentile of its values over both classes, "
        "clipped at 1 (0 = black/transparent, 1 = pale yellow); a fainter class map means less evidence for that "
        "class.",
        notes,
    )
