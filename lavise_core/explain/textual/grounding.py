"""Part-supervised grounding weights for eq. 9 (an extension of Guo et al.; METHODS.md §1).

Eq. 9 grounds attribute t in image x as ``y = σ(Σ_k w_kt A_k(x))``. Guo et al. take ``w_kt = p(t | f_k)``,
learned from image-level captions; on SynthBirds that finds parts barely better than weighting every
filter alike (PCK@0.1 12.5 vs 10.2 %): attributes that occur in the same images cannot be told apart by
image-level statistics. When the probe set also marks *where* the parts are (part masks: SynthBirds,
COCO; part keypoints: CUB), the same linear form can be fitted to that:

- pairs (image i, attribute t) of the fit split where t is in i's attribute list and names a part
  (:func:`~lavise_core.data.parts.attribute_regions`, e.g. "red crown" -> crown);
- target ``q_it (h·w,)``: the part's share of each map cell (its mask area-averaged to the map, or the
  cell holding its keypoint), summing to 1;
- ``w_t = argmin Σ_i CE(q_it, softmax_cells(Σ_k w_kt Â_k(x_i))) + λ ||w_t||²`` with ``Â_k = A_k / max A_k``
  (maximum over the fit images), by Adam from zero;
- λ from :data:`LAMBDAS` (a warm-started path) by the held-out *pointing score* (target mass at the
  arg-max cell) on ``val_fraction`` of the fit images.

Only the fit split's masks / keypoints are used: the test keypoints stay for ``lavise evaluate``.
Attributes that name no part keep the specificity weights (:func:`~lavise_core.explain.textual.explainer.filter_specificity`).
Writes ``textual/grounding_weights (C, T)``, ``textual/grounding_learned (T,)`` and stage
``"textual_grounding"``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.pipeline.bundle import Bundle
    from lavise_core.pipeline.stages import StageContext

__all__ = [
    "LAMBDAS",
    "STAGE",
    "GroundingFit",
    "build_grounding_stage",
    "build_stage",
    "cell_targets",
    "fit_grounding_weights",
    "fit_part_grounding",
    "grounding_images",
    "pointing_score",
]

STAGE = "textual_grounding"
#: The λ path of the ridge penalty (fitted from the largest, warm-started); the held-out pointing score picks one.
LAMBDAS = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass
class GroundingFit:
    """Fitted part-supervised weights: ``weights (C, T)`` (zero where not learned), ``learned (T,)`` bool."""

    weights: np.ndarray
    learned: np.ndarray
    info: dict = field(default_factory=dict)


def cell_targets(
    regions_of: dict[int, list[str]],
    columns: Sequence[int],
    map_size: tuple[int, int],
    box: Sequence[float],
    label_map: np.ndarray | None,
    region_values: dict[str, int],
    keypoints: dict[str, Sequence[float]],
) -> dict[int, np.ndarray]:
    """Targets ``q (h·w,)`` (summing to 1) for the attribute ``columns`` of one image.

    ``regions_of[t]``: the part names attribute t refers to; a part's extent is its mask in ``label_map``
    (value ``region_values[name]``) area-averaged to ``map_size`` over the network's crop ``box``, else the
    cell holding its keypoint ``[x, y]`` (pixels). Columns with no located part are left out.
    """
    from lavise_core.data.images import mask_weights

    h, w = map_size
    x0, y0, x1, y1 = box
    cache: dict[str, np.ndarray | None] = {}

    def extent(name: str) -> np.ndarray | None:
        if name in cache:
            return cache[name]
        out = None
        val = region_values.get(name)
        if label_map is not None and val is not None and (label_map == val).any():
            out = mask_weights(label_map == val, (h, w), box).reshape(-1)
        elif name in keypoints:
            kx, ky = keypoints[name]
            u, v = int((kx - x0) / (x1 - x0) * w), int((ky - y0) / (y1 - y0) * h)
            if 0 <= u < w and 0 <= v < h:
                out = np.zeros(h * w, np.float32)
                out[v * w + u] = 1.0
        cache[name] = out
        return out

    targets = {}
    for t in columns:
        parts = [e for e in (extent(r) for r in regions_of.get(int(t), [])) if e is not None]
        if parts:
            q = np.sum(parts, axis=0)
            if q.sum() > 0:
                targets[int(t)] = (q / q.sum()).astype(np.float32)
    return targets


def _pair_slots(
    pair_image: np.ndarray, pair_column: np.ndarray, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's slot among its image's pairs ``(P,)``, and ``(N, K)`` the column in each slot (0 where unused;
    ``K`` = the most pairs of one image). The logits of pair p are then ``x[img_p] @ w[:, cols[img_p, slot_p]]``:
    ``N·K`` columns per step instead of every image × every attribute (``N·T``), the same products."""
    order = np.lexsort((pair_column, pair_image))
    run_start = np.searchsorted(pair_image[order], pair_image[order])
    slot = np.empty(len(order), np.int64)
    slot[order] = np.arange(len(order)) - run_start
    cols = np.zeros((n_images, int(slot.max(initial=-1)) + 1), np.int64)
    cols[pair_image, slot] = pair_column
    return torch.as_tensor(slot), torch.as_tensor(cols)


def fit_grounding_weights(
    features: torch.Tensor,
    pair_image: np.ndarray,
    pair_column: np.ndarray,
    pair_target: np.ndarray,
    n_columns: int,
    lambdas: Sequence[float] = LAMBDAS,
    steps: Sequence[int] = (80, 40, 40, 40),
    lr: float = 0.05,
) -> list[np.ndarray]:
    """Weights ``(C, T)`` minimising the cross-entropy of softmax-over-cells to the targets, plus ``λ Σ_t ||w_t||²``,
    for each λ of a decreasing path (each fit starts from the previous one; ``steps[j]`` Adam steps for the
    j-th λ, the last count repeating).

    Args:
        features: ``(N, h·w, C)`` float32 scaled maps Â of the fit images.
        pair_image, pair_column: ``(P,)`` image row and attribute column of each pair.
        pair_target: ``(P, h·w)`` targets, rows summing to 1.
    Each attribute's pairs are averaged, then attributes summed, so frequent ones do not dominate.
    Columns without pairs stay 0.
    """
    x = features
    used, pos = np.unique(np.asarray(pair_column, np.int64), return_inverse=True)
    img = torch.as_tensor(np.asarray(pair_image, np.int64))
    pos_t = torch.as_tensor(pos)
    q = torch.as_tensor(np.asarray(pair_target, np.float32))
    per_pair = 1.0 / torch.bincount(pos_t).float()[pos_t]
    slot, cols = _pair_slots(img.numpy(), pos, x.shape[0])
    w = torch.zeros(x.shape[2], len(used), requires_grad=True)
    out = []
    for j, lam in enumerate(sorted(lambdas, reverse=True)):
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps[min(j, len(steps) - 1)]):
            # (P, h·w) logits of each pair: each image against its own ≤ K attributes' weights only
            z = torch.bmm(x, torch.nn.functional.embedding(cols, w.T).transpose(1, 2))[img, :, slot]
            loss = (-(q * torch.log_softmax(z, dim=1)).sum(1) * per_pair).sum() + lam * (w**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        full = np.zeros((x.shape[2], n_columns), np.float32)
        full[:, used] = w.detach().numpy()
        out.append(full)
    return out


def pointing_score(
    features: torch.Tensor, weights: np.ndarray, pair_image: np.ndarray, pair_column: np.ndarray,
    pair_target: np.ndarray,
) -> float:  # fmt: skip
    """Mean target mass at the arg-max cell of each pair's heatmap (1 = always inside the part)."""
    if len(pair_image) == 0:
        return float("nan")
    img = torch.as_tensor(np.asarray(pair_image, np.int64))
    col = torch.as_tensor(np.asarray(pair_column, np.int64))
    with torch.no_grad():
        z = torch.einsum("phc,pc->ph", features[img], torch.as_tensor(weights).T[col])
    best = z.argmax(1).numpy()
    return float(np.asarray(pair_target)[np.arange(len(best)), best].mean())


def _parts_of(dataset: ProbeDataset, vocabulary: Sequence[str]) -> dict[int, list[str]]:
    """``{attribute column: the part names it refers to}`` for the attributes that name a part."""
    from lavise_core.data.parts import attribute_regions, part_names

    parts = part_names(dataset)
    regions_of = {t: attribute_regions(p, parts, {}) for t, p in enumerate(vocabulary)}
    return {t: r for t, r in regions_of.items() if r}


def _region_values(dataset: ProbeDataset) -> dict[str, int]:
    return {name: j + 1 for j, name in enumerate(dataset.regions)}


def _stored_batches(
    dataset: ProbeDataset, stored_maps: np.ndarray, valid: np.ndarray, indices: Sequence[int], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, int]]]]:
    """``(record indices, maps (B, C, h, w), image sizes)`` from the probe's stored maps, in order; an image's
    size is read from its file's header (nothing decoded). Images the probe could not read (``valid`` false) are
    skipped, as :func:`~lavise_core.pipeline.probe.image_batches` skips them."""
    from PIL import Image

    rows = [int(i) for i in indices if valid[int(i)]]
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
        sizes = []
        for i in batch:
            with Image.open(dataset.image_path(i)) as im:
                sizes.append(im.size)
        yield batch, torch.from_numpy(np.asarray(stored_maps[batch], np.float32)), sizes


def fit_part_grounding(
    lm,
    dataset: ProbeDataset,
    layer: str,
    vocabulary: Sequence[str],
    attr: np.ndarray,
    indices: Sequence[int],
    *,
    val_fraction: float = 0.2,
    lambdas: Sequence[float] = LAMBDAS,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    stored_maps: tuple[np.ndarray, np.ndarray] | None = None,
) -> GroundingFit | None:
    """Fit the part-supervised weights on images ``indices`` with network ``lm`` at ``layer`` (the module
    docstring); ``attr (N, T)`` bool is the attribute table of the data set. None when no pair is found.

    ``stored_maps``: the probe pass's maps of every image at ``layer`` and which images it read, ``((N, C, h, w)
    float32, (N,) bool)`` (``probe/maps``, ``probe/valid``), used instead of decoding the images and running the
    network again: the same numbers (the layer's maps do not depend on the batch)."""
    from tqdm.auto import tqdm

    from lavise_core.models.networks import forward_maps
    from lavise_core.models.threads import torch_threads
    from lavise_core.pipeline.probe import image_batches

    regions_of = _parts_of(dataset, vocabulary)
    values = _region_values(dataset)
    rng = np.random.default_rng(seed)
    feats: list[torch.Tensor] = []
    p_img: list[int] = []
    p_col: list[int] = []
    p_tgt: list[np.ndarray] = []
    with torch_threads(0):
        bar = tqdm(total=len(indices), desc="grounding fit (maps)", disable=not progress)
        if stored_maps is not None:
            batches = _stored_batches(dataset, *stored_maps, indices, batch_size)
        else:
            batches = (
                (batch, forward_maps(lm, x, layer)[0].float().cpu(), [im.size for im in images])
                for batch, x, images in image_batches(dataset, lm, indices, batch_size)
            )
        for batch, maps, sizes in batches:
            hw = tuple(maps.shape[-2:])
            for b, i in enumerate(batch):
                rec = dataset.records[i]
                lab = dataset.load_mask(i) if rec.mask else None
                w_img, h_img = sizes[b]
                tg = cell_targets(
                    regions_of, np.flatnonzero(attr[i]), hw, lm.crop_box(w_img, h_img), lab, values,
                    rec.keypoints,
                )  # fmt: skip
                if not tg:
                    continue
                row = len(feats)
                feats.append(maps[b].flatten(1).T.contiguous())  # (h·w, C)
                for t, q in tg.items():
                    p_img.append(row)
                    p_col.append(t)
                    p_tgt.append(q)
            bar.update(len(batch))
        bar.close()
        if not p_img:
            return None
        x = torch.stack(feats)  # (N, h·w, C)
        scale = x.amax((0, 1)).clamp_min(1e-6)  # (C,) max over the fit images
        x = x / scale
        img, col, tgt = np.asarray(p_img), np.asarray(p_col), np.stack(p_tgt)
        # whole images held out for the choice of λ; the weights of the best λ are kept as fitted
        n_img = x.shape[0]
        held = np.zeros(n_img, bool)
        held[rng.permutation(n_img)[: max(1, round(val_fraction * n_img))]] = True
        tr, va = ~held[img], held[img]
        lams = sorted(lambdas, reverse=True)
        path = fit_grounding_weights(x, img[tr], col[tr], tgt[tr], len(vocabulary), lams)
        scores = {
            lam: pointing_score(x, w, img[va], col[va], tgt[va]) for lam, w in zip(lams, path, strict=True)
        }
        best = max(lams, key=lambda v: (scores[v], v))
        w = path[lams.index(best)]
    learned = np.zeros(len(vocabulary), bool)
    learned[np.unique(col)] = True
    weights = (w / scale.numpy()[:, None]).astype(np.float32)  # act on raw maps A_k, not Â_k
    weights[:, ~learned] = 0.0
    info = {
        "images": int(n_img),
        "pairs": len(img),
        "attributes": int(learned.sum()),
        "lambda": best,
        "held_out_pointing": {str(k): round(v, 4) for k, v in scores.items()},
        "targets": "part masks" if any(dataset.records[i].mask for i in indices) else "part keypoints",
    }
    return GroundingFit(weights, learned, info)


def grounding_images(
    bundle: Bundle,
    dataset: ProbeDataset,
    vocabulary: Sequence[str],
    attr: np.ndarray,
    max_images: int = 2000,
    max_values: int = 128_000_000,
    seed: int = 0,
) -> tuple[list[int], str | None]:
    """The fit-split images the weights are fitted on (seeded subset), or ``([], why)`` when there are none.

    ``attr (N, T)`` bool is the attribute table over ``vocabulary``. At most ``max_images`` images, fewer
    when their maps would exceed ``max_values`` floats (512 MB; EfficientNet-Lite0's 1280 × 7 × 7 maps:
    2,040)."""
    from lavise_core.data.dataset import fit_indices

    named = np.zeros(len(vocabulary), bool)
    named[list(_parts_of(dataset, vocabulary))] = True
    if not named.any():
        return [], "no attribute names a part of the data set"
    valid = np.asarray(bundle.array("probe/valid"), bool) if bundle.has("probe/valid") else None
    idx = [
        int(i)
        for i in fit_indices(dataset)
        if (valid is None or valid[i])
        and (dataset.records[i].mask or dataset.records[i].keypoints)
        and (attr[i] & named).any()
    ]
    if len(idx) < 10:
        return [], "fewer than 10 fit images with part masks or keypoints"
    cap = max_images
    if bundle.has("probe/top_maps"):
        c, _, h, w = bundle.array("probe/top_maps").shape  # (C, k, h, w)
        cap = max(10, min(max_images, max_values // (c * h * w)))
    if len(idx) > cap:
        idx = sorted(np.random.default_rng(seed).choice(idx, cap, replace=False).tolist())
    return idx, None


def build_grounding_stage(
    bundle: Bundle,
    dataset: ProbeDataset,
    lm=None,
    *,
    max_images: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fit (:func:`fit_part_grounding` on :func:`grounding_images`) and store the part-supervised grounding
    weights; skipped when done. A data set without part masks or keypoints is recorded as
    ``{"skipped": why}`` and the specificity weights stay in use."""
    if bundle.stage_done(STAGE):
        return bundle.manifest["stages"][STAGE]
    t0 = time.perf_counter()
    vocab = list(bundle.read_json("textual/vocabulary"))
    attr = np.asarray(bundle.array("textual/attribute_matrix")) > 0
    idx, why = grounding_images(bundle, dataset, vocab, attr, max_images, seed=seed)
    fit = None
    if not why:
        if lm is None:
            lm = bundle.load_model()
        from lavise_core.pipeline.probe import stored_maps

        stored = stored_maps(bundle, len(dataset))  # else a pass over the images
        fit = fit_part_grounding(
            lm, dataset, bundle.layer, vocab, attr, idx, seed=seed, progress=progress, stored_maps=stored
        )
        why = None if fit else "no fit image has a located part for its attributes"
    if fit is None:
        bundle.mark_stage(STAGE, {"skipped": why})
        return bundle.manifest["stages"][STAGE]
    bundle.write_array("textual/grounding_weights", fit.weights)
    bundle.write_array("textual/grounding_learned", fit.learned)
    bundle.mark_stage(STAGE, {"seconds": round(time.perf_counter() - t0, 2), **fit.info})
    return bundle.manifest["stages"][STAGE]


def build_stage(ctx: StageContext) -> dict:
    """The ``textual_grounding`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_grounding_stage` with the build's settings and
    ``options['textual_grounding']``."""
    return build_grounding_stage(
        ctx.bundle, ctx.dataset, ctx.model, progress=ctx.settings.bars, **ctx.options_for("textual_grounding")
    )
