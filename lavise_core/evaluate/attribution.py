"""Which attribution map to believe: faithfulness of every method on held-out SynthBirds images.

For ``n_images`` test-split images (seeded draw), each method's map for the TRUE class is scored by

- **deletion / insertion AUC** (Petsiuk et al. 2018, RISE §4.1): pixels are removed (set to the baseline 0, the
  data set's mean colour) or revealed (on a blurred copy of the image, Gaussian ``sigma = 5`` px as RISE) in the
  map's order, most important first, in ``steps`` equal chunks; the curve is the softmax probability of the class,
  the AUC its trapezoid mean over the fraction of pixels. Deletion: lower is better; insertion: higher is better.
  Baseline: the same with a uniformly random pixel order. Ties in a map (Grad-CAM's zeros) are broken at random.
- **pointing game** (Zhang et al. 2016): is the map's maximum inside the mask of the species' *discriminative parts*
  (the parts named in its definition in ``dataset.meta["species"]``, e.g. crown, wing and tail of the
  scarlet-capped warbler) — and, for the species of one-part pairs, inside the ONE part that tells the pair apart
  (crown for scarlet- vs azure-capped warbler)? Baselines: a uniformly random pixel (hit rate = the mask's area
  share) and a random pixel ON the bird (the parts' share of the bird).
- **energy in the mask** (Wang et al. 2020, Score-CAM §5.2): ``sum_mask M / sum M``; baseline = the area share.
- **cascading randomisation** (Adebayo et al. 2018, §3.1): the layers are re-initialised from the top (the
  classifier, then each conv block with its BatchNorm) cumulatively; at each step the Spearman rank correlation
  of the map with the trained network's map (``sanity_images`` images, mean). A method that explains the model
  must lose its map as the weights go; a map that survives the re-initialisations shows the image, not the model.
  Summary: the mean correlation over the cascade (``sanity_mean``; lower = the map depends more on the weights;
  >= 0.5 is reported as failing the check).

:func:`evaluate_attribution` returns a dict (stored as ``eval/attribution.json`` by the ``attribution`` stage) and
names the winner per criterion; :func:`format_attribution` prints it for ``lavise evaluate --only attribution``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lavise_core.data.dataset import ProbeDataset
from lavise_core.explain.attribution.base import AttributionError
from lavise_core.explain.attribution.faithfulness import curve_auc, pixel_ranks, random_ranks
from lavise_core.explain.attribution.registry import METHODS, make_method
from lavise_core.explain.dissection.labels import label_map_crop
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "EVAL_OPTIONS",
    "RESULT_NAME",
    "AttributionEvalSettings",
    "build_attribution_stage",
    "build_stage",
    "cascading_layers",
    "deletion_insertion",
    "discriminative_parts",
    "evaluate_attribution",
    "format_attribution",
]

RESULT_NAME = "eval/attribution"

#: the evaluation's method settings (the dashboard's defaults; occlusion with 16 px windows, stride 16)
EVAL_OPTIONS: dict[str, dict] = {
    "smoothgrad": {"n_samples": 25},
    "integrated_gradients": {"steps": 32},
    "occlusion": {"window": 16, "stride": 16},
}


@dataclass(frozen=True)
class AttributionEvalSettings:
    """What :func:`evaluate_attribution` measures and on how much."""

    n_images: int = 32
    sanity_images: int = 4
    steps: int = 16
    methods: tuple[str, ...] = tuple(METHODS)
    seed: int = 0
    batch_size: int = 64
    options: dict[str, dict] = field(default_factory=lambda: copy.deepcopy(EVAL_OPTIONS))


def discriminative_parts(dataset: ProbeDataset, class_name: str) -> tuple[list[str], list[str]]:
    """``(definition parts, one-part-pair part)`` of a species from the data set's metadata.

    The definition parts are the parts of the slots that define the species (``"crown.colour" -> "crown"``);
    the pair part is the part of the single slot in which a one-part pair differs ([] if not in such a pair).
    """
    species = dataset.meta.get("species") or {}
    if class_name not in species:
        raise AttributionError(
            f"the data set defines no species {class_name!r}: no discriminative parts to score"
        )
    parts = sorted({slot.split(".")[0] for slot in species[class_name]})
    pair = sorted({p[2].split(".")[0] for p in dataset.meta.get("one_part_pairs", []) if class_name in p[:2]})
    return parts, pair


def _region_mask(label: np.ndarray, regions: Sequence[str], parts: Sequence[str]) -> np.ndarray:
    ids = [regions.index(p) + 1 for p in parts if p in regions]
    return np.isin(label, ids)


@torch.no_grad()
def deletion_insertion(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    ranks: torch.Tensor,
    steps: int = 16,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves ``(B, steps + 1)`` of the class probability, pixels taken in ``ranks`` order.

    Args:
        x: ``(B, 3, H, W)`` normalised images; target ``(B,)``; ranks ``(B, H*W)`` (0 = first removed/revealed).
    """
    b, _, h, w = x.shape
    blurred = _blur(x)
    cut = torch.round(torch.linspace(0, h * w, steps + 1)).long()  # pixels taken at each step
    dele, ins = np.zeros((b, steps + 1)), np.zeros((b, steps + 1))
    for i in range(b):
        taken = (ranks[i][None, :] < cut[:, None]).reshape(steps + 1, 1, h, w)  # (S+1, 1, H, W)
        d = torch.where(taken, torch.zeros_like(x[i]), x[i])
        n = torch.where(taken, x[i], blurred[i])
        batch = torch.cat([d, n])
        probs = torch.cat(
            [F.softmax(model(batch[s : s + batch_size]), 1) for s in range(0, len(batch), batch_size)]
        )
        p = probs[:, int(target[i])].double().cpu().numpy()
        dele[i], ins[i] = p[: steps + 1], p[steps + 1 :]
    return dele, ins


def _blur(x: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    k = int(2 * round(2 * sigma) + 1)
    return gaussian_blur(x, [k, k], [sigma, sigma])


def cascading_layers(model: torch.nn.Module) -> list[list[str]]:
    """Groups of module names to re-initialise, top first: each Conv/Linear with the norms that follow it."""
    groups: list[list[str]] = []
    for name, mod in model.named_modules():
        if not any(True for _ in mod.parameters(recurse=False)) or not callable(
            getattr(mod, "reset_parameters", None)
        ):
            continue
        if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear) or not groups:
            groups.append([name])
        else:
            groups[-1].append(name)
    return groups[::-1]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def _load(lm: Any, dataset: ProbeDataset, idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The readable records of ``idx`` and their network inputs ``(n, 3, S, S)`` (unreadable files skipped)."""
    from lavise_core.data.images import ImageLoadError

    kept, xs = [], []
    for i in idx:
        try:
            xs.append(lm.preprocess(dataset.load_image(int(i))))
        except ImageLoadError:
            continue
        kept.append(int(i))
    if not kept:
        raise AttributionError("none of the held-out test images could be read")
    return np.asarray(kept), torch.stack(xs)


def evaluate_attribution(
    lm: Any,
    dataset: ProbeDataset,
    settings: AttributionEvalSettings | None = None,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Faithfulness of each method (see the module docstring) on held-out test images -> a JSON-ready dict."""
    s = settings or AttributionEvalSettings()
    say = report or (lambda done, total, message: None)
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise AttributionError(f"unknown attribution methods {unknown}; choose from {', '.join(METHODS)}")
    test = dataset.indices("test")
    if len(test) == 0:
        raise AttributionError("the data set has no test split to hold out")
    rng = np.random.default_rng(s.seed)
    idx = np.sort(rng.choice(test, size=min(s.n_images, len(test)), replace=False))
    idx, x = _load(lm, dataset, idx)
    y = torch.as_tensor(dataset.labels()[idx])
    size = x.shape[-1]
    regions = list(dataset.regions)
    labels = [label_map_crop(dataset, int(i), lm, size=size) for i in idx]
    has_masks = all(lab is not None for lab in labels) and bool(dataset.meta.get("species"))
    with torch.no_grad():
        pred = lm.model(x).argmax(1)
    res: dict[str, Any] = {
        "images": len(idx),
        "split": "test",
        "target": "the true class",
        "accuracy": float((pred == y).float().mean()),
        "steps": s.steps,
        "options": {m: s.options.get(m, {}) for m in s.methods},
        "methods": {},
    }
    gen = torch.Generator().manual_seed(s.seed)
    total = len(s.methods) + 2
    say(0, total, "random-order baseline")
    rand_ranks = random_ranks(len(idx), size * size, gen)
    d, n = deletion_insertion(lm.model, x, y, rand_ranks, s.steps, s.batch_size)
    res["random"] = {"deletion_auc": float(curve_auc(d).mean()), "insertion_auc": float(curve_auc(n).mean())}
    masks = pair_masks = bird = None
    if has_masks:
        names = list(lm.class_names)
        masks, pair_masks, bird = [], [], []
        for lab, c in zip(labels, y.tolist(), strict=True):
            parts, pair = discriminative_parts(dataset, names[c])
            masks.append(_region_mask(lab, regions, parts))
            pair_masks.append(_region_mask(lab, regions, pair) if pair else None)
            bird.append(lab > 0)
        area = np.array([m.mean() for m in masks])
        share = np.array([m.sum() / max(1, b.sum()) for m, b in zip(masks, bird, strict=True)])
        res["baselines"] = {
            "pointing_uniform": float(area.mean()),
            "pointing_on_bird": float(share.mean()),
            "energy_uniform": float(area.mean()),
            "pair_area": float(np.mean([p.mean() for p in pair_masks if p is not None])),
        }
    sanity_idx = slice(0, min(s.sanity_images, len(idx)))
    groups = cascading_layers(lm.model)
    res["sanity_layers"] = [g[0] for g in groups]
    for k, name in enumerate(s.methods):
        say(k + 1, total, f"{name}: maps, deletion / insertion, pointing, randomisation")
        opts = dict(s.options.get(name, {}))
        t0 = time.perf_counter()
        maps = make_method(name, lm, batch_size=s.batch_size, **opts).pixel_map(x, y).float()
        seconds = (time.perf_counter() - t0) / len(idx)
        d, n = deletion_insertion(lm.model, x, y, pixel_ranks(maps, gen), s.steps, s.batch_size)
        row: dict[str, Any] = {
            "deletion_auc": float(curve_auc(d).mean()),
            "insertion_auc": float(curve_auc(n).mean()),
            "seconds_per_image": round(seconds, 4),
        }
        if masks is not None:
            row.update(_pointing(maps.numpy(), masks, pair_masks))
        row["sanity"] = _cascade(lm, name, opts, x[sanity_idx], y[sanity_idx], maps[sanity_idx], groups, s)
        row["sanity_mean"] = round(float(np.mean(row["sanity"])), 4) if row["sanity"] else None
        res["methods"][name] = row
    res["winners"] = _winners(res)
    say(total, total, "done")
    return res


def _pointing(maps: np.ndarray, masks: list, pair_masks: list) -> dict:
    hit, energy, pair_hit, pair_energy = [], [], [], []
    for m, mask, pair in zip(maps, masks, pair_masks, strict=True):
        top = np.unravel_index(int(np.argmax(m)), m.shape)
        tot = float(m.sum())
        if mask.any():
            hit.append(bool(mask[top]) if tot > 0 else False)
            energy.append(float(m[mask].sum()) / tot if tot > 0 else 0.0)
        if pair is not None and pair.any():
            pair_hit.append(bool(pair[top]) if tot > 0 else False)
            pair_energy.append(float(m[pair].sum()) / tot if tot > 0 else 0.0)
    return {
        "pointing": float(np.mean(hit)) if hit else None,
        "energy": float(np.mean(energy)) if energy else None,
        "pointing_pair": float(np.mean(pair_hit)) if pair_hit else None,
        "energy_pair": float(np.mean(pair_energy)) if pair_energy else None,
        "pair_images": len(pair_hit),
    }


def _cascade(
    lm: Any,
    name: str,
    opts: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    trained: torch.Tensor,
    groups: list[list[str]],
    s: AttributionEvalSettings,
) -> list[float]:
    """Mean Spearman correlation with the trained map after re-initialising groups ``0..j`` (top down)."""
    from lavise_core.models.networks import reinitialize

    model = copy.deepcopy(lm.model)
    fresh = reinitialize(lm.model, s.seed)
    layer_lm = dataclasses.replace(lm, model=model) if dataclasses.is_dataclass(lm) else model
    out = []
    for group in groups:
        with torch.no_grad():
            for mod_name in group:
                model.get_submodule(mod_name).load_state_dict(fresh.get_submodule(mod_name).state_dict())
        maps = make_method(name, layer_lm, batch_size=s.batch_size, **opts).pixel_map(x, y).float().numpy()
        out.append(
            round(float(np.mean([_spearman(a, b) for a, b in zip(maps, trained.numpy(), strict=True)])), 4)
        )
    return out


def _winners(res: dict) -> dict:
    m = res["methods"]
    if not m:
        return {}
    out = {
        "deletion_auc": min(m, key=lambda k: m[k]["deletion_auc"]),
        "insertion_auc": max(m, key=lambda k: m[k]["insertion_auc"]),
        "sanity": min(m, key=lambda k: m[k]["sanity_mean"] if m[k]["sanity_mean"] is not None else 1.0),
    }
    for key in ("pointing", "energy", "pointing_pair"):
        scored = {k: v[key] for k, v in m.items() if v.get(key) is not None}
        if scored:
            out[key] = max(scored, key=scored.get)
    return out


def format_attribution(res: dict) -> str:
    """A plain-text table of :func:`evaluate_attribution`'s result."""
    head = (
        f"Attribution faithfulness: {res['images']} {res['split']} images, map of {res['target']} "
        f"(network accuracy on them {res['accuracy']:.2f})"
    )
    cols = f"{'method':22s} {'del AUC↓':>9s} {'ins AUC↑':>9s} {'point↑':>7s} {'energy↑':>8s} {'pair pt':>8s} {'rand r mean':>11s} {'s/img':>7s}"
    lines = [head, cols]

    def f(v: Any, w: int) -> str:
        return f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}s}"

    for name, r in res["methods"].items():
        lines.append(
            f"{name:22s} {f(r['deletion_auc'], 9)} {f(r['insertion_auc'], 9)} {f(r.get('pointing'), 7)} "
            f"{f(r.get('energy'), 8)} {f(r.get('pointing_pair'), 8)} {f(r.get('sanity_mean'), 11)} "
            f"{r['seconds_per_image']:7.3f}"
        )
    b = res.get("baselines", {})
    lines.append(
        f"{'random order / area':22s} {f(res['random']['deletion_auc'], 9)} {f(res['random']['insertion_auc'], 9)} "
        f"{f(b.get('pointing_uniform'), 7)} {f(b.get('energy_uniform'), 8)} {f(b.get('pair_area'), 8)}"
    )
    if b:
        lines.append(f"random pixel on the bird hits the discriminative parts {b['pointing_on_bird']:.3f}")
    lines.append("cascading randomisation (Spearman with the trained map; top layer first):")
    lines.append("  layers: " + ", ".join(res["sanity_layers"]))
    for name, r in res["methods"].items():
        lines.append(f"  {name:20s} " + " ".join(f"{v:5.2f}" for v in r["sanity"]))
    lines.append("winners: " + ", ".join(f"{k} = {v}" for k, v in res["winners"].items()))
    return "\n".join(lines)


def build_attribution_stage(
    bundle: Any,
    dataset: ProbeDataset,
    lm: Any,
    *,
    report: Callable[[int, int, str], None] | None = None,
    save: bool = True,
    **options: Any,
) -> dict:
    """The ``attribution`` stage: :func:`evaluate_attribution` -> ``eval/attribution.json``."""
    if not (dataset.splits() == "test").any():
        return {"skipped": "the data set has no test split to hold out"}
    t0 = time.perf_counter()
    settings = AttributionEvalSettings(**options)
    res = evaluate_attribution(lm, dataset, settings, report=report)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    if save:
        bundle.write_json(RESULT_NAME, res)
    return {"seconds": res["seconds"], "winners": res["winners"]}


def build_stage(ctx: StageContext) -> dict:
    """The ``attribution`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_attribution_stage` with the build's settings and
    ``options['attribution']``."""
    return build_attribution_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("attribution")
    )
