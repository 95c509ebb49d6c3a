"""The an8Flower protocol on SynthBirds for Oramas et al.'s explanations (METHODS.md §3), beside baselines.

Each SynthBirds species is defined by three part attributes (:data:`~lavise_core.data.synthbirds.SPECIES`),
so the mask of its discriminative parts is known for every image (the label map's pixels of those parts).
On the test split, each method's heatmap for the predicted class is scored against the true species' mask:
IoU of the heatmap binarised at its mean, and the Pearson correlation of heatmap and mask.

Every method is a function ``heatmap(x (1, 3, H, W), target) -> (H, W)``, all built in :func:`heatmap_methods`
(the one place to swap in other implementations of Grad-CAM or guided backprop). Also scored: the share of
relevant features whose part label names a discriminative part of their class, beside the share for all
relevant features matched against the same class (what the label distribution alone gives). Reference row
``bird_mask``: the whole bird's mask used as a heatmap (what "looks at the bird" alone scores).

Stage ``oramas_eval`` writes ``eval/oramas.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lavise_core.data.dataset import ProbeDataset
from lavise_core.explain.oramas import OramasError, RelevantFeatures, explain_oramas
from lavise_core.models.networks import LoadedModel, forward_maps
from lavise_core.pipeline.bundle import Bundle
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "HeatmapMethod",
    "build_oramas_eval_stage",
    "build_stage",
    "discriminative_parts",
    "heatmap_methods",
    "heatmap_scores",
    "label_share",
    "part_mask",
]

HeatmapMethod = Callable[[torch.Tensor, int], np.ndarray]


def discriminative_parts(class_names: Sequence[str]) -> list[list[str]]:
    """Per class, the parts named by its defining SynthBirds attributes (``"crown.colour"`` -> crown).

    Raises :class:`OramasError` when the classes are not SynthBirds species (no known parts).
    """
    from lavise_core.data.synthbirds import SPECIES

    unknown = [c for c in class_names if c not in SPECIES]
    if unknown:
        raise OramasError(
            f"the an8Flower protocol needs classes with known discriminative parts (SynthBirds species); "
            f"{', '.join(unknown[:3])} are not"
        )
    return [sorted({slot.split(".")[0] for slot in SPECIES[c]}) for c in class_names]


def part_mask(label_map: np.ndarray, regions: Sequence[str], parts: Sequence[str]) -> np.ndarray:
    """``(H, W)`` bool: pixels of ``parts`` in a label map whose value ``r`` means ``regions[r - 1]``."""
    ids = [regions.index(p) + 1 for p in parts if p in regions]
    return np.isin(label_map, ids)


def heatmap_scores(heat: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """``(IoU of heat > mean(heat) with mask, Pearson r of heat and mask)``; r is NaN for a constant input."""
    heat = np.asarray(heat, np.float64)
    mask = np.asarray(mask, bool)
    on = heat > heat.mean()
    union = (on | mask).sum()
    iou = float((on & mask).sum() / union) if union else 0.0
    h, m = heat.ravel(), mask.ravel().astype(np.float64)
    if h.std() == 0 or m.std() == 0:
        return iou, float("nan")
    return iou, float(np.corrcoef(h, m)[0, 1])


def heatmap_methods(lm: LoadedModel, rf: RelevantFeatures | None) -> dict[str, HeatmapMethod]:
    """``{name: heatmap(x, target) -> (H, W)}``: Oramas et al. and the baselines.

    Grad-CAM and guided backprop are the attribution toolbox's (:mod:`lavise_core.explain.attribution.cam`,
    :mod:`lavise_core.explain.attribution.gradient`; equal to captum's to 1e-5 of the range): Grad-CAM at the
    explained layer, ReLU, bilinear upsampling; guided backprop as ``|g|`` summed over colour channels.
    "activation" is the explained layer's channel sum, upsampled bilinearly.
    """
    from lavise_core.explain.attribution.cam import GradCAM
    from lavise_core.explain.attribution.gradient import GuidedBackprop

    gradcam = GradCAM(lm)
    gbp = GuidedBackprop(lm)

    def size(x: torch.Tensor) -> tuple[int, int]:
        return int(x.shape[-2]), int(x.shape[-1])

    def grad_cam(x: torch.Tensor, c: int) -> np.ndarray:
        return gradcam.pixel_map(x, [c])[0].detach().numpy()

    def guided_backprop(x: torch.Tensor, c: int) -> np.ndarray:
        return gbp.attribute(x, [c])[0].detach().abs().sum(0).numpy()

    def activation(x: torch.Tensor, c: int) -> np.ndarray:
        maps, _ = forward_maps(lm, x)
        up = F.interpolate(maps.sum(1, keepdim=True).float(), size(x), mode="bilinear", align_corners=False)
        return up[0, 0].numpy()

    out: dict[str, HeatmapMethod] = {}
    if rf is not None:
        out["oramas"] = lambda x, c: explain_oramas(lm, rf, x, target=c)[0]
    out.update({"grad_cam": grad_cam, "guided_backprop": guided_backprop, "activation": activation})
    return out


def label_share(rf: RelevantFeatures, parts: list[list[str]]) -> dict:
    """Share of each class's relevant features whose part label names one of its discriminative parts, beside
    the share among all relevant features (any class) matched against the same parts (the label prior)."""
    rel = np.flatnonzero((rf.weights > 0).any(0))
    per_class, prior = {}, {}
    for c, name in enumerate(rf.classes):
        own = np.flatnonzero(rf.weights[c] > 0)
        if own.size:
            per_class[name] = float(np.mean([rf.labels.get(int(j)) in parts[c] for j in own]))
        prior[name] = float(np.mean([rf.labels.get(int(j)) in parts[c] for j in rel])) if rel.size else 0.0
    return {
        "share": float(np.mean(list(per_class.values()))) if per_class else None,
        "prior": float(np.mean(list(prior.values()))),
        "per_class": per_class,
    }


def build_oramas_eval_stage(
    bundle: Bundle,
    ds: ProbeDataset,
    lm: LoadedModel,
    max_images: int | None = 240,
    split: str = "test",
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Score every method on (up to ``max_images``, evenly spaced) ``split`` images; write ``eval/oramas.json``."""
    from PIL import Image

    from lavise_core.pipeline.probe import image_batches

    rf = RelevantFeatures.from_bundle(bundle)
    try:
        parts = discriminative_parts(lm.class_names)
    except OramasError as e:
        bundle.write_json("eval/oramas", {"skipped": str(e)})
        return {"skipped": str(e)}
    idx = ds.indices(split)
    if max_images is not None and idx.size > max_images:
        idx = idx[np.linspace(0, idx.size - 1, max_images).round().astype(int)]
    methods = heatmap_methods(lm, rf)
    scores: dict[str, list[tuple[float, float]]] = {m: [] for m in [*methods, "bird_mask"]}
    no_feature = 0
    S = lm.input_size
    done = 0
    for batch, x, _ in image_batches(ds, lm, idx, 1):
        i = batch[0]
        done += 1
        if report is not None:
            report(done, len(idx), f"an8Flower protocol: {done} / {len(idx)} images")
        label_map = ds.load_mask(i)
        true = ds.records[i].label
        if label_map is None or true < 0:
            continue
        if label_map.shape != (S, S):
            label_map = np.asarray(Image.fromarray(label_map).resize((S, S), Image.NEAREST))
        mask = part_mask(label_map, list(ds.regions), parts[true])
        if not mask.any():
            continue
        _, logits = forward_maps(lm, x)
        c = int(logits[0].argmax())
        if not (rf.weights[c] > 0).any():
            no_feature += 1
            continue
        for name, fn in methods.items():
            scores[name].append(heatmap_scores(fn(x, c), mask))
        scores["bird_mask"].append(heatmap_scores((label_map > 0).astype(np.float32), mask))  # reference
    table = {}
    for name, s in scores.items():
        a = np.asarray(s, np.float64).reshape(-1, 2)
        table[name] = {
            "iou": float(np.mean(a[:, 0])) if len(a) else None,
            "pearson": float(np.nanmean(a[:, 1])) if len(a) else None,
            "n": len(a),
        }
    out = {
        "split": split,
        "n_images": len(idx),
        "skipped_no_relevant_feature": no_feature,
        "methods": table,
        "labels": label_share(rf, parts),
        "mu": rf.mu,
    }
    bundle.write_json("eval/oramas", out)
    return {"iou": table.get("oramas", {}).get("iou"), "n": len(idx)}


def build_stage(ctx: StageContext) -> dict:
    """The ``oramas_eval`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_oramas_eval_stage` with the build's settings and
    ``options['oramas_eval']``."""
    return build_oramas_eval_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("oramas_eval")
    )
