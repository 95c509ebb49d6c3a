"""Evaluation of the textual explanations (Guo et al., seed 003, "Experiments"); stored as ``eval/textual.json``.

Measured on the held-out split (``test``) of the probe data set:

- **Grounding** (Table 1): PCK@α of the arg-max of the eq. 9 heatmap against the part keypoint of the
  attribute, for the 50 most frequent attributes that have a keypoint; vs the paper's two baselines
  (a uniformly random location in the image; a constant p.d.f., i.e. all filters weighted 1/C).
  A prediction is correct when it lies within ``α · object size`` of the keypoint, object size =
  ``max(bbox width, bbox height)`` (the paper only says "object size" and uses bounding-box-cropped
  images; without a box the image's larger side is used). Rows: the paper's eq. 9 with ``p(t | f_k)``
  weights ("eq. 9 literal") and the proposed specific weights (:func:`~lavise_core.explain.textual.explainer.filter_specificity`,
  the lift over the mean filter, clipped at 0), each located on the receptive-field centres of the map
  cells (:func:`receptive_field_centres`) and, for comparison, on the uniform cell grid that bilinear
  upsampling assumes ("cell grid"); heatmaps are arg-maxed at map resolution (the arg-max of a bilinearly
  upsampled map is a map cell). Where the bundle has them, also the part-supervised weights of
  :mod:`lavise_core.explain.textual.grounding` (fitted on the fit split's part masks / keypoints, never the test split's);
  they are trained on the cell grid, so that is their natural grid. The attribute's keypoints: the regions whose
  ``region_concepts`` list the phrase; else the regions named by the phrase's noun ("red wing" ->
  "left wing", "right wing"; "bill" -> "beak"; "head" -> "crown", "forehead"); the closest one counts.
- **Retrieval** (Table 2): for attribute t the method retrieves the images whose explanation (top-5 of
  ``p(t | x, predicted class)``) contains t (the paper: "return all the images that contain the query in
  the generated textual explanation sentence"); the ground truth are the images whose captions contain t
  ("ground-truth caption based retrieval"), and, where the data set has attribute labels, also those.
  Per attribute: recall = TP / (TP + FN), true negative rate = TN / (TN + FP); the paper's "accuracy" is
  not defined there; as it is below the recall (27.9 < 30.9) it cannot be (TP + TN) / N, so it is taken
  as precision = TP / (TP + FP); the Jaccard index TP / (TP + FP + FN) and (TP + TN) / N are reported too.
  Macro averages over the 50 most frequent attributes of the ground truth.
- **BLEU** (Table 3): sentence BLEU-4 (uniform weights, Chen & Cherry smoothing 1, ε = 0.1, the same as
  NLTK's ``SmoothingFunction().method1``) of the explanation sentence against the image's captions,
  lower-cased word tokens; mean over correct / wrong / all predictions.
- **Top-5 precision**: fraction of an explanation's 5 attributes that are true of the image (labels when
  the data set has them, else captions), on the correctly classified images and on all images.
- **Randomisation check** (Adebayo et al.): explanations of the same net with re-initialised weights
  must differ. Compared: per image, the explanation p.d.f. ``p(t | x, ĉ)`` (eq. 5–6) divided by its mean
  over the images (removes the network-independent prior / frequencies), Spearman over the attributes
  present in the images, with a positive control; the raw per-filter p.d.f. correlation is kept for
  reference (see :func:`randomization_check`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lavise_core.data.dataset import fit_indices
from lavise_core.data.parts import attribute_regions, part_names
from lavise_core.explain.textual.explainer import (
    TextualError,
    TextualExplainer,
    explanation_sentence,
    filter_attribute_pdf,
    filter_specificity,
    ground_attribute,
    image_class_pdf,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.models.networks import LoadedModel
    from lavise_core.pipeline.bundle import Bundle

__all__ = [
    "ALPHAS",
    "PAPER_BLEU",
    "PAPER_PCK",
    "PAPER_RETRIEVAL",
    "RESULT_NAME",
    "bleu_tokens",
    "evaluate_textual",
    "format_tables",
    "heatmap_argmax_xy",
    "pck",
    "randomization_check",
    "receptive_field_centres",
    "retrieval_metrics",
    "sentence_bleu",
    "spearman_rows",
    "top_k_mask",
]

RESULT_NAME = "eval/textual"
ALPHAS = (0.1, 0.2, 0.3)
#: Published CUB-200-2011 / ResNet-50 numbers (Guo et al., Tables 1-3), in percent / BLEU.
PAPER_PCK = {
    "random": (3.1, 12.6, 28.3),
    "constant": (8.5, 28.1, 47.5),
    "proposed": (12.2, 38.7, 60.9),
}
PAPER_RETRIEVAL = {"recall": 30.9, "true_negative": 92.9, "accuracy": 27.9}
PAPER_BLEU = {"correct": 0.415, "wrong": 0.381, "overall": 0.409}


# =========================================================================== pure metrics
def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """``(N, T)`` bool, True at each row's ``k`` largest scores (ties: lower index first)."""
    s = np.asarray(scores)
    k = min(k, s.shape[1])
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    out = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(out, idx, True, axis=1)
    return out


def retrieval_metrics(retrieved: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Per-attribute retrieval counts and their macro averages (percent).

    Args:
        retrieved: ``(N, A)`` bool: image i is retrieved for attribute a.
        truth: ``(N, A)`` bool: image i truly has attribute a.

    Returns:
        ``recall``, ``true_negative``, ``precision`` (the paper's "accuracy"), ``jaccard``, ``accuracy_tn``
        ((TP+TN)/N), macro-averaged over the attributes where each is defined, plus ``per_attribute``
        count rows ``[tp, fp, fn, tn]``.
    """
    r = np.asarray(retrieved, dtype=bool)
    g = np.asarray(truth, dtype=bool)
    if r.shape != g.shape or r.ndim != 2:
        raise TextualError(f"retrieved {r.shape} and truth {g.shape} must be equal (N, A) shapes")
    tp = (r & g).sum(0).astype(np.float64)
    fp = (r & ~g).sum(0).astype(np.float64)
    fn = (~r & g).sum(0).astype(np.float64)
    tn = (~r & ~g).sum(0).astype(np.float64)

    def macro(num: np.ndarray, den: np.ndarray) -> float:
        ok = den > 0
        return float(100.0 * np.mean(num[ok] / den[ok])) if ok.any() else float("nan")

    return {
        "recall": macro(tp, tp + fn),
        "true_negative": macro(tn, tn + fp),
        "precision": macro(tp, tp + fp),
        "jaccard": macro(tp, tp + fp + fn),
        "accuracy_tn": macro(tp + tn, tp + fp + fn + tn),
        "per_attribute": np.stack([tp, fp, fn, tn], axis=1).astype(int).tolist(),
    }


def heatmap_argmax_xy(
    heatmaps: np.ndarray,
    box: Sequence[float],
    grid: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Arg-max of ``(..., H, W)`` heatmaps as ``(..., 2)`` ``[x, y]`` image pixels.

    ``box`` = ``(x0, y0, x1, y1)``: the image region the ``H × W`` heatmap covers (the network's crop,
    :meth:`LoadedModel.crop_box`). Without ``grid`` cell centres map to ``x0 + (u + 0.5) (x1 - x0) / W``
    (a uniform grid, what bilinear upsampling with ``align_corners=False`` assumes); ``grid = (gx (W,),
    gy (H,))`` gives each column's / row's position as a fraction of the network input (e.g.
    :func:`receptive_field_centres`), mapped to ``x0 + gx[u] (x1 - x0)``.
    """
    h = np.asarray(heatmaps)
    hh, ww = h.shape[-2:]
    flat = h.reshape(-1, hh * ww).argmax(axis=1)
    v, u = np.divmod(flat, ww)
    x0, y0, x1, y1 = box
    if grid is None:
        fx, fy = (u + 0.5) / ww, (v + 0.5) / hh
    else:
        gx, gy = (np.asarray(g, dtype=np.float64) for g in grid)
        if gx.shape != (ww,) or gy.shape != (hh,):
            raise TextualError(f"grid must be ({ww},) and ({hh},) fractions, got {gx.shape} and {gy.shape}")
        fx, fy = gx[u], gy[v]
    xy = np.stack([x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)], axis=1)
    return xy.reshape((*h.shape[:-2], 2))


def receptive_field_centres(
    model: torch.nn.Module, layer: str, input_size: int, n_probe: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Where each cell of ``layer``'s ``h × w`` map looks in the input, as fractions of the input side.

    The centre of a cell's receptive field is not the cell's centre on a uniform grid: a 3×3 convolution
    with stride 2 and padding 1 maps output cell u to input pixel 2u (not 2u + 0.5), so after four of them
    cell u of an 8×8 map sits on pixel 16u, 7.5 pixels up-left of ``(u + 0.5) · 16``. Measured, not
    derived (any architecture): the centroid of ``|∂ Σ_c A_c[v, u] / ∂ x|`` over ``n_probe`` seeded
    Gaussian inputs, pixel centres at ``+0.5``, averaged over rows (for x) and columns (for y).

    Returns:
        ``(gx (w,), gy (h,))`` float64 fractions in ``[0, 1]`` of the input width / height.
    """
    import torch

    from lavise_core.models.networks import record_layer

    gen = torch.Generator().manual_seed(seed)
    p0 = next(model.parameters(), None)
    device = p0.device if p0 is not None else torch.device("cpu")
    x = torch.randn(n_probe, 3, input_size, input_size, generator=gen).to(device).requires_grad_(True)
    with torch.enable_grad(), record_layer(model, layer) as rec:
        model(x)
        out = rec.output
        if out is None or out.dim() != 4:
            raise TextualError(f"layer {layer!r} gives no (B, C, h, w) map")
        h, w = out.shape[-2:]
        cx = np.zeros((h, w))
        cy = np.zeros((h, w))
        pix = (torch.arange(input_size, dtype=torch.float64) + 0.5) / input_size
        for v in range(h):
            for u in range(w):
                (g,) = torch.autograd.grad(out[:, :, v, u].sum(), x, retain_graph=True)
                m = g.abs().sum(dim=(0, 1)).double().cpu()  # (S, S)
                tot = float(m.sum())
                if tot <= 0:
                    cx[v, u], cy[v, u] = (u + 0.5) / w, (v + 0.5) / h
                    continue
                cx[v, u] = float((m.sum(0) * pix).sum()) / tot
                cy[v, u] = float((m.sum(1) * pix).sum()) / tot
    return cx.mean(axis=0), cy.mean(axis=1)


def pck(
    pred_xy: np.ndarray, keypoints: np.ndarray, object_size: np.ndarray, alphas: Sequence[float] = ALPHAS
) -> np.ndarray:
    """PCK@α in percent: share of predictions within ``α · object_size`` of the nearest allowed keypoint.

    Args:
        pred_xy: ``(P, 2)`` predicted locations.
        keypoints: ``(P, M, 2)`` allowed keypoints per prediction, NaN-padded.
        object_size: ``(P,)``.

    Returns:
        ``(len(alphas),)`` float64 percentages.
    """
    p = np.asarray(pred_xy, dtype=np.float64)
    k = np.asarray(keypoints, dtype=np.float64)
    s = np.asarray(object_size, dtype=np.float64)
    if p.shape[0] == 0:
        return np.full(len(alphas), np.nan)
    d = np.sqrt(((k - p[:, None, :]) ** 2).sum(-1))
    d = np.where(np.isnan(d), np.inf, d).min(axis=1)
    return np.array([100.0 * np.mean(d <= a * s) for a in alphas])


_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def bleu_tokens(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped."""
    return _TOKEN.findall(text.lower())


def sentence_bleu(references: Sequence[str], hypothesis: str, max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al.), NLTK's ``sentence_bleu`` on :func:`bleu_tokens`: uniform weights over
    1..``max_n``-grams, smoothing method 1 (Chen & Cherry 2014: an order with no match counts ``0.1 / count``),
    brevity penalty against the closest reference length. 0 for an empty hypothesis or no references."""
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

    hyp = bleu_tokens(hypothesis)
    refs = [r for r in (bleu_tokens(x) for x in references) if r]
    if not hyp or not refs:
        return 0.0
    weights = tuple(1.0 / max_n for _ in range(max_n))
    return float(nltk_sentence_bleu(refs, hyp, weights, smoothing_function=SmoothingFunction().method1))


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (``(R, T)`` -> ``(R,)``)."""
    from scipy.stats import rankdata

    ra = rankdata(np.asarray(a, dtype=np.float64), axis=1)
    rb = rankdata(np.asarray(b, dtype=np.float64), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _image_lift(expl: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(n, T)`` explanations divided by their mean over the images, on columns ``cols``."""
    e = np.asarray(expl, dtype=np.float64)[:, cols]
    mean = e.mean(axis=0, keepdims=True)
    return e / np.where(mean > 0, mean, 1.0)


def randomization_check(
    pooled: np.ndarray,
    pooled_random: np.ndarray,
    attr_matrix: np.ndarray,
    prior: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    weight_random: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    logits_random: np.ndarray | None = None,
    reference_pdf: np.ndarray | None = None,
) -> dict[str, float]:
    """Randomisation sanity check (Adebayo et al.): explanations of a net vs the same net re-initialised.

    Filter k of a random net has nothing to do with filter k of the trained one, and both p.d.f.s share a
    component that does not depend on the network at all (the prior ``p(t)``; attributes absent from the
    probe images get 0 in both), so the raw per-filter correlation (``spearman_pdf``, kept for reference)
    measures that shared part, not the network. What must differ are the *explanations the method
    outputs*: ``spearman_explanation`` compares, per image, ``p(t | x, ĉ)`` (eq. 5–6, each net with its own
    classifier and predicted class ĉ) divided by that net's mean explanation over the images (the
    image-independent component: prior, attribute frequencies), over the attributes present in the images.
    ``spearman_filter_lift`` is the per-filter ``p(t | f_k) / p(t)`` over the same attributes.
    ``spearman_explanation_control`` is the positive control: the trained net's explanation lift with the
    p.d.f. fitted on these images vs ``reference_pdf`` (fitted on all fit images); it must stay high.

    Args:
        pooled, pooled_random: ``(N, C)`` pooled activations of the same N images under both nets.
        attr_matrix: ``(N, T)``; prior: ``(T,)``.
        weight, weight_random: ``(K, C)`` classifier weights of both nets; logits, logits_random: ``(N, K)``.
            The explanation comparisons are computed when all four are given.
        reference_pdf: ``(C, T)`` the trained net's stored p.d.f. (for the control).

    Returns:
        ``spearman_pdf``, ``spearman_lift`` (raw rows / prior, all attributes), ``top1_agreement`` (share of
        filters with the same top attribute), ``n_attributes_present``, ``spearman_filter_lift`` and, with
        the classifiers, ``spearman_explanation``, ``top5_overlap_explanation`` (share of the 5 top lifted
        attributes in common), ``spearman_explanation_control`` (with ``reference_pdf``).
    """
    pdf = filter_attribute_pdf(pooled, attr_matrix, prior)
    pdf_r = filter_attribute_pdf(pooled_random, attr_matrix, prior)
    pr = np.asarray(prior, dtype=np.float64)
    keep = pr > 0
    lift, lift_r = pdf[:, keep] / pr[keep], pdf_r[:, keep] / pr[keep]
    present = np.flatnonzero(keep & (np.asarray(attr_matrix).sum(axis=0) > 0))
    out = {
        "spearman_pdf": float(np.nanmean(spearman_rows(pdf, pdf_r))),
        "spearman_lift": float(np.nanmean(spearman_rows(lift, lift_r))),
        "top1_agreement": float(np.mean(pdf.argmax(1) == pdf_r.argmax(1))),
        "n_attributes_present": int(present.size),
        "spearman_filter_lift": float(
            np.nanmean(spearman_rows(pdf[:, present] / pr[present], pdf_r[:, present] / pr[present]))
        ),
    }
    if weight is None or weight_random is None or logits is None or logits_random is None:
        return out
    pred = np.asarray(logits).argmax(axis=1)
    pred_r = np.asarray(logits_random).argmax(axis=1)
    e = _image_lift(image_class_pdf(pdf, pooled, weight, pred), present)
    e_r = _image_lift(image_class_pdf(pdf_r, pooled_random, weight_random, pred_r), present)
    out["spearman_explanation"] = float(np.nanmean(spearman_rows(e, e_r)))
    top_a, top_b = top_k_mask(e, 5), top_k_mask(e_r, 5)
    out["top5_overlap_explanation"] = float(np.mean((top_a & top_b).sum(axis=1) / top_a.sum(axis=1)))
    if reference_pdf is not None:
        e_ref = _image_lift(image_class_pdf(reference_pdf, pooled, weight, pred), present)
        out["spearman_explanation_control"] = float(np.nanmean(spearman_rows(e, e_ref)))
    return out


# =========================================================================== the evaluation
def _batches(idx: np.ndarray, size: int) -> list[np.ndarray]:
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def _load_batch(
    ds: ProbeDataset, lm: LoadedModel, idx: Sequence[int]
) -> tuple[Any, list[tuple[int, int]], list[bool]]:
    import torch

    from lavise_core.data.images import ImageLoadError, load_image

    xs, sizes, ok = [], [], []
    for i in idx:
        try:
            img = load_image(ds.image_path(int(i)), name=ds.records[int(i)].path)
            xs.append(lm.preprocess(img))
            sizes.append(img.size)
            ok.append(True)
        except ImageLoadError:
            xs.append(torch.zeros(3, lm.input_size, lm.input_size))
            sizes.append((1, 1))
            ok.append(False)
    return torch.stack(xs), sizes, ok


def _grounding(
    ex: TextualExplainer,
    lm: LoadedModel,
    ds: ProbeDataset,
    idx: np.ndarray,
    attr: np.ndarray,
    vocab: list[str],
    layer: str,
    n_attributes: int,
    alphas: Sequence[float],
    batch_size: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from lavise_core.models.networks import forward_maps

    # candidate attributes: most frequent (vocabulary order) with a keypoint region in the data set
    regions = part_names(ds)
    has_kp = any(r.keypoints for r in ds.records)
    if not has_kp:
        return {"skipped": "the data set has no keypoints"}
    freq = attr[idx].sum(0)
    in_region_concepts = {t for r in ds.records for cs in r.region_concepts.values() for t in cs}
    chosen: list[int] = []
    for j in np.argsort(-freq, kind="stable"):
        if freq[j] == 0 or len(chosen) >= n_attributes:
            break
        if vocab[j] in in_region_concepts or attribute_regions(vocab[j], regions, {}):
            chosen.append(int(j))
    if not chosen:
        return {"skipped": "no frequent attribute maps onto a keypoint region"}
    cols = np.asarray(chosen)
    pdf_cols = np.asarray(ex.pdf)[:, cols]  # (C, A)
    c = pdf_cols.shape[0]
    # filter weights of eq. 9 per method: (C, A) or (C, 1) for the constant p.d.f.
    weights = {
        "constant": np.full((c, 1), 1.0 / c, dtype=np.float32),
        "literal": pdf_cols.astype(np.float32),
        "proposed": filter_specificity(pdf_cols),
    }
    if ex.part_learned is not None and np.asarray(ex.part_learned)[cols].any():
        weights["parts"] = ex.grounding_weights(
            cols, "auto"
        )  # part-supervised (lavise_core.explain.textual.grounding)
    grid = receptive_field_centres(lm.model, layer, lm.input_size, seed=seed)
    rng = np.random.default_rng(seed)
    preds: dict[str, list[np.ndarray]] = {f"{m}{g}": [] for m in weights for g in ("", "_cell_grid")}
    rand: list[np.ndarray] = []
    kps_all: list[np.ndarray] = []
    sizes_all: list[float] = []
    attr_of: list[int] = []
    use = [i for i in idx if ds.records[int(i)].keypoints and attr[int(i), cols].any()]
    n_rand = 32
    for b in tqdm(
        _batches(np.asarray(use, dtype=np.int64), batch_size), disable=not progress, desc="grounding"
    ):
        x, sizes, ok = _load_batch(ds, lm, b)
        maps, _ = forward_maps(lm, x, layer)
        for bi, i in enumerate(b):
            if not ok[bi]:
                continue
            rec = ds.records[int(i)]
            w, h = sizes[bi]
            box = lm.crop_box(w, h)
            present = [a for a in range(len(cols)) if attr[int(i), cols[a]] > 0]
            pairs = []
            for a in present:
                regs = attribute_regions(vocab[cols[a]], regions, rec.region_concepts)
                pts = [rec.keypoints[r] for r in regs if r in rec.keypoints]
                if pts:
                    pairs.append((a, np.asarray(pts, dtype=np.float64)))
            if not pairs:
                continue
            sel = [a for a, _ in pairs]
            # the arg-max of a bilinearly upsampled map is a map cell: work at map resolution
            for name, wts in weights.items():
                heat = ground_attribute(maps[bi], wts if wts.shape[1] == 1 else wts[:, sel])  # (Q', h, w)
                for suffix, g in (("", grid), ("_cell_grid", None)):
                    xy = heatmap_argmax_xy(heat, box, g)
                    preds[name + suffix].extend(xy[0] if len(xy) == 1 else xy[q] for q in range(len(pairs)))
            size = (
                float(max(rec.bbox[2] - rec.bbox[0], rec.bbox[3] - rec.bbox[1]))
                if rec.bbox
                else float(max(w, h))
            )
            for a, pts in pairs:
                rand.append(rng.random((n_rand, 2)) * np.array([w, h]))
                kps_all.append(pts)
                sizes_all.append(size)
                attr_of.append(a)
    if not kps_all:
        return {"skipped": "no test image has a keypoint for its attributes"}
    m = max(len(k) for k in kps_all)
    kp = np.full((len(kps_all), m, 2), np.nan)
    for q, k in enumerate(kps_all):
        kp[q, : len(k)] = k
    size = np.asarray(sizes_all)
    out: dict[str, Any] = {
        "n_pairs": len(kps_all),
        "n_attributes": len(cols),
        "alphas": list(alphas),
        "receptive_field_grid": [np.round(grid[0], 4).tolist(), np.round(grid[1], 4).tolist()],
    }
    for key, xy_list in preds.items():
        out[key] = pck(np.asarray(xy_list), kp, size, alphas).tolist()
    rnd = np.asarray(rand)  # (P, n_rand, 2): average PCK over the random draws
    out["random"] = np.mean([pck(rnd[:, d], kp, size, alphas) for d in range(rnd.shape[1])], axis=0).tolist()
    attr_of_a = np.asarray(attr_of)
    for key in ("proposed", "literal", "parts"):
        if key not in preds:
            continue
        xy = np.asarray(preds[key])
        out[f"per_attribute_{key}" if key != "proposed" else "per_attribute"] = {
            vocab[cols[a]]: pck(xy[attr_of_a == a], kp[attr_of_a == a], size[attr_of_a == a], alphas).tolist()
            for a in range(len(cols))
            if (attr_of_a == a).any()
        }
    return out


def evaluate_textual(
    bundle: Bundle,
    dataset: ProbeDataset,
    lm: LoadedModel | None = None,
    *,
    split: str = "test",
    n_attributes: int = 50,
    alphas: Sequence[float] = ALPHAS,
    top: int = 5,
    grounding: bool = True,
    randomization: bool = True,
    randomization_images: int = 256,
    batch_size: int = 16,
    max_images: int | None = None,
    seed: int = 0,
    save: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The textual part of ``lavise evaluate``: grounding PCK, retrieval, BLEU, top-5 precision, randomisation.

    Args:
        bundle: a bundle whose ``probe`` and ``textual`` stages are done.
        dataset: its probe data set.
        split: evaluated split (all images when it is empty).
        n_attributes: the "top 50 attributes" of the paper's grounding and retrieval.
        lm: the bundle's model (loaded with ``bundle.load_model()`` when needed and not given).
        grounding, randomization: run the two parts that need forward passes.
        randomization_images: fit images used for the re-initialised net.
        max_images: evaluate only the first images of the split (quick runs).
        save: write ``eval/textual.json`` when the bundle is writable.

    Returns:
        A JSON-able dict (see :func:`format_tables`).
    """
    t0 = time.perf_counter()
    ex = TextualExplainer.from_bundle(bundle)
    vocab = ex.vocabulary
    n = len(dataset)
    attr = np.asarray(bundle.array("textual/attribute_matrix")) > 0  # (N, T) caption / label truth
    if attr.shape != (n, len(vocab)):
        raise TextualError(f"textual/attribute_matrix has shape {attr.shape}, expected ({n}, {len(vocab)})")
    pooled = bundle.array("probe/pooled")
    logits = bundle.array("probe/logits")
    valid = (
        np.asarray(bundle.array("probe/valid"), dtype=bool) if bundle.has("probe/valid") else np.ones(n, bool)
    )
    idx = dataset.indices(split)
    if idx.size == 0:
        idx = np.arange(n)
    idx = idx[valid[idx]]
    if max_images is not None:
        idx = idx[:max_images]
    if idx.size == 0:
        raise TextualError(f"no valid image in split {split!r} to evaluate")
    labels = dataset.labels()[idx]
    pred = np.asarray(logits[idx]).argmax(1)
    correct = pred == labels
    known = labels >= 0
    scores = image_class_pdf(ex.pdf, np.asarray(pooled[idx]), ex.weight, pred)  # (n, T)
    top_mask = top_k_mask(scores, top)
    stats = bundle.read_json("textual/stats") if bundle.has("textual/stats.json") else {}
    source = stats.get("source", "captions") if isinstance(stats, dict) else "captions"
    results: dict[str, Any] = {
        "split": split,
        "n_images": int(idx.size),
        "n_attributes_vocabulary": len(vocab),
        "attribute_source": source,
        "classification_accuracy": float(100.0 * correct[known].mean()) if known.any() else None,
        "alphas": list(alphas),
        "paper": {"pck": PAPER_PCK, "retrieval": PAPER_RETRIEVAL, "bleu": PAPER_BLEU},
    }

    # ---- truths: captions (stored table) and labels (ground-truth attributes) where available
    truths: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    truths[source] = (attr[idx], np.ones(len(vocab), bool))
    if source != "labels" and any(r.attributes for r in dataset.records):
        label_vocab = set(dataset.attribute_vocabulary())
        in_vocab = np.array([t in label_vocab for t in vocab])
        truths["labels"] = (dataset.attribute_matrix(vocab)[idx] > 0, in_vocab)

    # ---- retrieval (Table 2) and top-5 precision
    retrieval: dict[str, Any] = {}
    precision: dict[str, Any] = {}
    for name, (g, in_vocab) in truths.items():
        freq = g.sum(0) * in_vocab
        cols = [int(j) for j in np.argsort(-freq, kind="stable")[:n_attributes] if freq[j] > 0]
        if not cols:
            retrieval[name] = {"skipped": "no attribute of the vocabulary occurs in this truth"}
            continue
        m = retrieval_metrics(top_mask[:, cols], g[:, cols])
        base = g[:, cols].mean(0)
        m["random"] = {
            "recall": 100.0 * top / len(vocab),
            "true_negative": 100.0 * (1 - top / len(vocab)),
            "precision": float(100.0 * base.mean()),
        }
        m["attributes"] = [vocab[j] for j in cols]
        retrieval[name] = m
        hits = (top_mask & g).sum(1)
        counted = (top_mask & in_vocab[None, :]).sum(1)
        ok = correct & known
        precision[name] = {
            "top5_precision": float(100.0 * np.mean(hits / top)),
            "top5_precision_correct": float(100.0 * np.mean(hits[ok] / top)) if ok.any() else None,
            "n_correct": int(ok.sum()),
            "top5_precision_in_vocabulary": float(100.0 * np.mean(hits[counted > 0] / counted[counted > 0]))
            if (counted > 0).any()
            else None,
            "in_vocabulary_share": float(100.0 * in_vocab.mean()),
        }
    results["retrieval"] = retrieval
    results["top5_precision"] = precision

    # ---- BLEU (Table 3)
    bleu = np.full(idx.size, np.nan)
    for q, i in enumerate(idx):
        caps = dataset.records[int(i)].captions
        if not caps:
            continue
        sent = explanation_sentence(ex.class_names[pred[q]], scores[q], vocab, top).sentence
        bleu[q] = sentence_bleu(caps, sent)
    has = ~np.isnan(bleu)
    if has.any():
        results["bleu"] = {
            "correct": float(np.mean(bleu[has & correct])) if (has & correct).any() else None,
            "wrong": float(np.mean(bleu[has & ~correct & known])) if (has & ~correct & known).any() else None,
            "overall": float(np.mean(bleu[has])),
            "n": int(has.sum()),
        }
    else:
        results["bleu"] = {"skipped": "no captions"}

    # ---- grounding (Table 1) and the randomisation check need forward passes
    if (grounding or randomization) and lm is None:
        lm = bundle.load_model()
    if grounding:
        assert lm is not None
        results["grounding"] = _grounding(
            ex, lm, dataset, idx, attr, vocab, bundle.layer, n_attributes, alphas, batch_size, seed, progress
        )
    if randomization:
        assert lm is not None
        rng = np.random.default_rng(seed)
        fit = fit_indices(dataset)
        fit = fit[valid[fit]]
        sub = np.sort(rng.choice(fit, size=min(randomization_images, fit.size), replace=False))
        from lavise_core.models.networks import reinitialize

        rand_model = reinitialize(lm.model, seed)
        pr, lr = _forward_pooled_layer(lm, rand_model, bundle.layer, dataset, sub, batch_size, progress)
        wr = rand_model.get_submodule(lm.classifier).weight.detach().float().cpu().numpy()
        prior = np.asarray(bundle.array("textual/prior"), dtype=np.float64)
        results["randomization"] = {
            "n_images": int(sub.size),
            **randomization_check(
                np.asarray(pooled[sub]),
                pr,
                attr[sub].astype(np.float32),
                prior,
                weight=np.asarray(ex.weight),
                weight_random=wr,
                logits=np.asarray(logits[sub]),
                logits_random=lr,
                reference_pdf=np.asarray(ex.pdf),
            ),
        }
        g = results.get("grounding", {})
        if grounding and ex.part_learned is not None and "parts" in g:
            # the part-supervised weights refitted on the re-initialised network's maps: how much of their
            # PCK comes from the trained features rather than from the annotations they were fitted to
            from dataclasses import replace

            from lavise_core.explain.textual.grounding import fit_part_grounding, grounding_images

            lm_r = replace(lm, model=rand_model)
            g_idx, _ = grounding_images(bundle, dataset, vocab, attr, seed=seed)
            fit_r = fit_part_grounding(
                lm_r, dataset, bundle.layer, vocab, attr, g_idx, seed=seed, progress=progress
            )
            if fit_r is not None:
                ex_r = replace(ex, part_weights=fit_r.weights, part_learned=fit_r.learned)
                gr = _grounding(
                    ex_r, lm_r, dataset, idx, attr, vocab, bundle.layer, n_attributes, alphas, batch_size, seed,
                    progress,
                )  # fmt: skip
                for key in ("parts", "parts_cell_grid"):
                    if key in gr:
                        g[f"{key.replace('parts', 'parts_randomised')}"] = gr[key]
    results["seconds"] = round(time.perf_counter() - t0, 2)
    if save and getattr(bundle, "writable", False):
        bundle.write_json(RESULT_NAME, _jsonable(results))
    return results


def _forward_pooled_layer(
    lm: LoadedModel,
    model: Any,
    layer: str,
    ds: ProbeDataset,
    idx: np.ndarray,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled activations (spatial mean of ``layer``) ``(len(idx), C)`` and logits ``(len(idx), K)`` of ``model``."""
    import torch
    from tqdm.auto import tqdm

    from lavise_core.models.networks import record_layer

    out, logits = [], []
    device = next(lm.model.parameters()).device
    for b in tqdm(_batches(idx, batch_size), disable=not progress, desc="randomised net"):
        x, _, _ = _load_batch(ds, lm, b)
        with torch.no_grad(), record_layer(model, layer) as rec:
            logits.append(model(x.to(device)).float().cpu().numpy())
        assert rec.output is not None
        out.append(rec.output.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out), np.concatenate(logits)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# =========================================================================== report
def _f(x: Any, nd: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_tables(results: dict[str, Any]) -> str:
    """Markdown tables of :func:`evaluate_textual` results beside the paper's CUB numbers."""
    lines: list[str] = []
    alphas = results.get("alphas", list(ALPHAS))
    head = " | ".join(f"PCK@{a}" for a in alphas)
    g = results.get("grounding", {})
    lines += [
        f"### Attribute grounding (PCK %, {g.get('n_pairs', 0)} pairs, {g.get('n_attributes', 0)} attributes)",
        "",
    ]
    lines += [f"| method | {head} | paper (CUB) |", "|---" * (len(alphas) + 2) + "|"]
    if "skipped" in g or not g:
        lines.append(f"| skipped: {g.get('skipped', 'not run')} |" + " |" * (len(alphas) + 1))
    else:
        rows = (
            ("random", "random location", "random"),
            ("constant_cell_grid", "constant p.d.f., cell grid", "constant"),
            ("constant", "constant p.d.f.", "constant"),
            ("literal_cell_grid", "eq. 9 literal p(t \\| f), cell grid", "proposed"),
            ("literal", "eq. 9 literal p(t \\| f)", "proposed"),
            ("proposed_cell_grid", "specific p.d.f. (lift), cell grid", None),
            ("proposed", "specific p.d.f. (lift)", None),
            ("parts_cell_grid", "part-supervised weights, cell grid", None),
            ("parts", "part-supervised weights", None),
            (
                "parts_randomised_cell_grid",
                "part-supervised weights, re-initialised network, cell grid",
                None,
            ),
            ("parts_randomised", "part-supervised weights, re-initialised network", None),
        )
        for key, label, paper_key in rows:
            if key not in g:
                continue
            ours = " | ".join(_f(v) for v in g[key])
            paper = " / ".join(_f(v) for v in PAPER_PCK[paper_key]) if paper_key else ""
            lines.append(f"| {label} | {ours} | {paper} |")
    lines.append("")
    lines += ["### Attribute-based retrieval (%, macro over the top attributes)", ""]
    lines += [
        "| truth | recall | true negative | accuracy (= precision) | Jaccard | (TP+TN)/N |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results.get("retrieval", {}).items():
        if "skipped" in m:
            lines.append(f"| {name} | skipped: {m['skipped']} | | | | |")
            continue
        lines.append(
            f"| {name} | {_f(m['recall'])} | {_f(m['true_negative'])} | {_f(m['precision'])} | "
            f"{_f(m['jaccard'])} | {_f(m['accuracy_tn'])} |"
        )
        r = m["random"]
        lines.append(
            f"| {name}, random | {_f(r['recall'])} | {_f(r['true_negative'])} | {_f(r['precision'])} | | |"
        )
    p = PAPER_RETRIEVAL
    lines.append(f"| paper (CUB, captions) | {p['recall']} | {p['true_negative']} | {p['accuracy']} | | |")
    lines.append("")
    b = results.get("bleu", {})
    lines += [
        "### Sentence BLEU-4 of explanations vs captions",
        "",
        "| | correct | wrong | overall |",
        "|---|---|---|---|",
    ]
    if "skipped" in b:
        lines.append(f"| skipped: {b['skipped']} | | | |")
    else:
        lines.append(
            f"| ours | {_f(b.get('correct'), 3)} | {_f(b.get('wrong'), 3)} | {_f(b.get('overall'), 3)} |"
        )
    lines.append(
        f"| paper (CUB) | {PAPER_BLEU['correct']} | {PAPER_BLEU['wrong']} | {PAPER_BLEU['overall']} |"
    )
    lines.append("")
    tp = results.get("top5_precision", {})
    if tp:
        lines += [
            "### Top-5 attribute precision (%)",
            "",
            "| truth | correctly classified | all images | all, those in the truth's vocabulary |",
            "|---|---|---|---|",
        ]
        for name, m in tp.items():
            lines.append(
                f"| {name} | {_f(m.get('top5_precision_correct'))} | {_f(m['top5_precision'])} | "
                f"{_f(m['top5_precision_in_vocabulary'])} |"
            )
        lines.append("")
    rnd = results.get("randomization")
    if rnd:
        lines += [
            f"### Randomisation check ({rnd['n_images']} images, re-initialised weights)",
            "",
            "| compared | Spearman | |",
            "|---|---|---|",
            f"| explanation p(t \\| x, ĉ) / its mean over images (per image) | "
            f"{_f(rnd.get('spearman_explanation'), 3)} | top-5 overlap "
            f"{_f(100 * rnd['top5_overlap_explanation'] if 'top5_overlap_explanation' in rnd else None)} % |",
            f"| control: trained net, p.d.f. from these images vs stored | "
            f"{_f(rnd.get('spearman_explanation_control'), 3)} | |",
            f"| filter p.d.f. / prior, {rnd.get('n_attributes_present', '?')} attributes present | "
            f"{_f(rnd.get('spearman_filter_lift'), 3)} | |",
            f"| raw filter p.d.f. (all attributes; shares the prior) | {_f(rnd['spearman_pdf'], 3)} | "
            f"same top attribute {_f(100 * rnd['top1_agreement'])} % |",
            f"| raw filter p.d.f. / prior (all attributes; absent ones tie) | {_f(rnd['spearman_lift'], 3)} | |",
            "",
        ]
    return "\n".join(lines)
