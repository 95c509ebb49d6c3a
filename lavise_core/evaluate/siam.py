"""SIAM on the test split: accuracy, attribute AUC, where the attribute maps point, the exact decomposition and
the SIAM sentence's top-5 attribute precision (the measure Guo et al.'s explanations get in
:mod:`lavise_core.evaluate.textual`).

- **Pointing game**: the arg-max of an attribute's map (upsampled bilinearly to the input) falls on the pixels of
  the part it names (label map). **PCK@α**: the arg-max cell, placed at its receptive-field centre
  (:func:`~lavise_core.evaluate.textual.receptive_field_centres`) or on the uniform cell grid, lies within
  ``α · max(bbox side)`` of the part's keypoint (:func:`~lavise_core.evaluate.textual.pck`). Pairs: every test
  image × every true attribute whose part is visible. Baseline: a uniformly random point.
- **Top-5 precision**: share of the sentence's five attributes (largest positive contributions to the predicted
  class) that are true of the image; beside the five largest pooled maps ("what" alone), five random
  attributes and the five most frequent ones (a constant answer).

Stage ``siam_eval`` (a SIAM bundle only) writes ``eval/siam.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lavise_core.data.dataset import ProbeDataset
from lavise_core.data.parts import attribute_regions, part_names
from lavise_core.evaluate.textual import ALPHAS, heatmap_argmax_xy, pck, receptive_field_centres
from lavise_core.explain.siam import is_siam, siam_net
from lavise_core.models.networks import LoadedModel
from lavise_core.models.siam import check_attributes
from lavise_core.pipeline.bundle import Bundle
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "build_siam_eval_stage",
    "build_stage",
    "evaluate_siam_bundle",
    "top5_precision",
]


def top5_precision(scores: np.ndarray, truth: np.ndarray, positive_only: bool = True) -> float:
    """Mean over images of the share of the 5 highest-``scores`` attributes ``(N, A)`` that are in ``truth``
    ``(N, A)`` bool (with ``positive_only``, attributes scoring ≤ 0 are not said; an image saying none counts 0)."""
    s = np.asarray(scores, np.float64)
    out = []
    for row, t in zip(s, np.asarray(truth, bool), strict=True):
        top = np.argsort(-row, kind="stable")[:5]
        if positive_only:
            top = top[row[top] > 0]
        out.append(float(t[top].sum() / 5))
    return float(np.mean(out)) if out else float("nan")


def evaluate_siam_bundle(
    ds: ProbeDataset,
    lm: LoadedModel,
    split: str = "test",
    batch_size: int = 64,
    report: Callable[[int, int, str], None] | None = None,
    seed: int = 0,
    pairs_of: Sequence[str] | None = None,
) -> dict:
    """All the numbers of the module docstring for ``lm`` (a SIAM model) on ``ds``'s ``split``; ``pairs_of``:
    only these attributes make pointing / PCK pairs (e.g. the ones Guo et al.'s grounding was scored on)."""
    from sklearn.metrics import roc_auc_score

    from lavise_core.pipeline.probe import image_batches

    net = siam_net(lm)
    attrs = list(lm.card["attributes"])
    check_attributes(attrs, ds)
    idx = ds.indices(split)
    truth = ds.attribute_matrix(attrs)[idx] > 0
    regions = part_names(ds)
    S = lm.input_size
    grid = receptive_field_centres(net, "attributes", S, seed=seed)
    pooled = np.zeros((len(idx), len(attrs)), np.float32)
    contrib = np.zeros_like(pooled)
    pred = np.zeros(len(idx), np.int64)
    err = 0.0
    xy_rf, xy_cell, kps, sizes, rand, hits = [], [], [], [], [], []
    rng = np.random.default_rng(seed)
    pos = {int(i): j for j, i in enumerate(idx)}
    keep = np.array([pairs_of is None or t in set(pairs_of) for t in attrs])
    done = 0
    for batch, x, images in image_batches(ds, lm, idx, batch_size):
        with torch.no_grad(), lm.lock:
            maps = net.attributes(net.features(x))
            logits = net.classifier(net.evidence(maps))
            rows = [pos[i] for i in batch]
            p = logits.argmax(1)
            pred[rows] = p.numpy()
            pooled[rows] = maps.mean((2, 3)).numpy()
            for b, r in enumerate(rows):
                cb = net.contributions(maps[b : b + 1], int(p[b]))[0]
                contrib[r] = cb.numpy()
                for c in range(logits.shape[1]):  # the decomposition, every class
                    total = net.contributions(maps[b : b + 1], c).double().sum() + float(
                        net.classifier.bias[c]
                    )
                    err = max(err, abs(float(total) - float(logits[b, c])))
            up = F.interpolate(maps, size=(S, S), mode="bilinear", align_corners=False).numpy()
        for b, i in enumerate(batch):
            rec = ds.records[i]
            w, h = images[b].size
            box = lm.crop_box(w, h)  # keypoints are in image pixels
            mask = ds.load_mask(i)
            if mask is not None and mask.shape != (S, S):
                mask = np.asarray(Image.fromarray(mask).resize((S, S), Image.NEAREST))
            size = (
                float(max(rec.bbox[2] - rec.bbox[0], rec.bbox[3] - rec.bbox[1]))
                if rec.bbox
                else float(max(w, h))
            )
            for a in np.flatnonzero(truth[pos[i]] & keep):
                regs = attribute_regions(attrs[a], regions, rec.region_concepts)
                pts = [rec.keypoints[r] for r in regs if r in rec.keypoints]
                if not pts:
                    continue
                m = maps[b, a].numpy()
                xy_rf.append(heatmap_argmax_xy(m, box, grid))
                xy_cell.append(heatmap_argmax_xy(m, box))
                kps.append(pts)
                sizes.append(size)
                rand.append(box[:2] + rng.random(2) * (box[2] - box[0], box[3] - box[1]))
                if mask is not None:
                    v, u = np.unravel_index(int(up[b, a].argmax()), (S, S))
                    ids = [ds.regions.index(r) + 1 for r in regs if r in ds.regions]
                    hits.append(bool(np.isin(mask[v, u], ids)))
        done += len(batch)
        if report is not None:
            report(done, len(idx), f"SIAM evaluation: {done} / {len(idx)} images")
    labels = ds.labels()[idx]
    cols = [a for a in range(len(attrs)) if 0 < truth[:, a].sum() < len(idx)]
    auc = float(np.mean([roc_auc_score(truth[:, a], pooled[:, a]) for a in cols]))
    m = max(len(k) for k in kps) if kps else 1
    kp = np.full((len(kps), m, 2), np.nan)
    for q, k in enumerate(kps):
        kp[q, : len(k)] = k
    size_arr = np.asarray(sizes)
    freq = truth.mean(0)
    return {
        "split": split,
        "n_images": len(idx),
        "test_accuracy": float((pred == labels).mean()),
        "attribute_auc": auc,
        "n_auc_attributes": len(cols),
        "decomposition_max_error": err,
        "pointing_game": float(np.mean(hits)) if hits else None,
        "n_pairs": len(kps),
        "alphas": list(ALPHAS),
        "pck": pck(np.asarray(xy_rf).reshape(-1, 2), kp, size_arr).tolist(),
        "pck_cell_grid": pck(np.asarray(xy_cell).reshape(-1, 2), kp, size_arr).tolist(),
        "pck_random": pck(np.asarray(rand).reshape(-1, 2), kp, size_arr).tolist(),
        "top5_precision_sentence": 100 * top5_precision(contrib, truth),
        "top5_precision_pooled": 100 * top5_precision(pooled, truth, positive_only=False),
        "top5_precision_random": 100 * float(freq.mean()),
        "top5_precision_most_frequent": 100 * float(np.sort(freq)[::-1][:5].mean()),
        "variant": lm.card.get("variant"),
    }


def build_siam_eval_stage(
    bundle: Bundle, ds: ProbeDataset, lm: LoadedModel, report: Callable[[int, int, str], None] | None = None
) -> dict:
    """Write ``eval/siam.json``; a bundle of another model records why it was skipped."""
    if not is_siam(lm):
        out = {"skipped": f"{lm.name} is not a SIAM model"}
        bundle.write_json("eval/siam", out)
        return out
    out = evaluate_siam_bundle(ds, lm, report=report)
    bundle.write_json("eval/siam", out)
    return {k: out[k] for k in ("test_accuracy", "attribute_auc", "decomposition_max_error")}


def build_stage(ctx: StageContext) -> dict:
    """The ``siam_eval`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_siam_eval_stage` with the build's settings and
    ``options['siam_eval']``."""
    return build_siam_eval_stage(ctx.bundle, ctx.dataset, ctx.model, report=ctx.report)
