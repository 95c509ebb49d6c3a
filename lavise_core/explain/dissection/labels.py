"""Network Dissection labels (Bau et al. 2017; METHODS.md §5–6): which annotated concept each filter detects.

**Concepts.** For a data set with region label maps (pixel value ``r`` = ``regions[r - 1]``, 0 = outside every
region): every part + attribute phrase of ``record.region_concepts`` ("red breast") on its part's pixels, the
part name alone ("breast") on the same pixels, and one phrase per background kind (``"water background"``,
from ``record.meta["background"]``) on the pixels with label 0. A concept is attached to a *region slot* of an
image (slot 0 = outside, slot r = region r), so everything works on per-image, per-slot pixel counts and
never materialises per-concept masks:

- :func:`region_overlap`: maps ``(B, C, h, w)`` + label maps ``(B, S, S)`` -> ``inter (B, C, R+1)``,
  ``act (B, C)``, ``area (B, R+1)``, counted over the firing pixels only (:func:`fired_pixels`);
- :func:`concept_incidence`: ``A (N, R+1, T)`` = slot r of image i carries concept t;
- :func:`dissection_iou`: the data-set-wide IoU ``IoU_kt = Σ_i |T_ki ∩ M_ti| / Σ_i |T_ki ∪ M_ti|``
  (``T_ki`` = filter k's map on image i above its 0.995 activation quantile), or per filter over its own top-p
  images (the G_k rule of METHODS.md §6, used for ground truth on held-out images).

**The stage** (:func:`build_dissection_stage`) runs one forward pass over the fit split (train + val), keeps
only the pixel counts (memory ``N × C × (R+1)`` floats), and stores the IoU table, each filter's ranked labels
and the evidence the concept search needs (:func:`subsampled_ground_truth`). A label is shown when its IoU
reaches :data:`IOU_MIN` (0.04, Network Dissection's rule); a re-initialised network gets none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lavise_core.data.dataset import ProbeDataset, background_phrase
from lavise_core.data.images import crop_label_map
from lavise_core.explain.dissection.firing import fired_pixels
from lavise_core.models.networks import record_layer
from lavise_core.pipeline.probe import image_batches
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "IOU_MIN",
    "N_LABELS",
    "STAGE",
    "DissectionTables",
    "build_dissection_stage",
    "build_stage",
    "calibrate_search",
    "concept_incidence",
    "dissection_concepts",
    "dissection_iou",
    "ground_truth_matrix",
    "iou_from_sums",
    "iou_sums",
    "label_map_crop",
    "part_names",
    "rank_labels",
    "region_overlap",
    "split_overlaps",
    "subsampled_ground_truth",
    "top_images",
]

STAGE = "dissection"
EVAL_SIZE = 64  # label maps and upsampled activation maps are compared at 64 × 64 (as evaluate.lavise)
IOU_MIN = 0.04
N_LABELS = 10  # ranked labels kept per filter


# ----------------------------------------------------------------------------------------------- concepts


def dissection_concepts(
    records: Sequence, part_names: bool = True, backgrounds: bool = True, regions: Sequence[str] = ()
) -> list[str]:
    """Sorted concept phrases of ``records`` (:class:`ImageRecord`): part+attribute phrases, optionally the
    part names of ``regions`` present in some record, and ``"<kind> background"`` per ``meta["background"]``."""
    out: set[str] = set()
    for r in records:
        for name, phrases in r.region_concepts.items():
            out.update(p.strip().lower() for p in phrases if p.strip())
            if part_names and name in regions:
                out.add(name.strip().lower())
        if backgrounds and r.meta.get("background"):
            out.add(background_phrase(r.meta["background"]))
    return sorted(out)


def part_names(
    concepts: Sequence[str], regions: Sequence[str], kinds: dict[str, str] | None = None
) -> np.ndarray:
    """``(T,)`` bool: the concepts that are bare part names, left out of the labels and judged only through their
    phrases (SynthBirds' "wing": a filter is labelled "red wing", not "wing").

    A region's name is a part name unless the data set names it as a concept of another kind (``kinds``: its
    ``meta.concept_kinds``, concept -> kind): ConceptShapes' regions are its textures and shapes ("striped",
    "circle"), concepts in their own right, labelled and searched like any other."""
    named = kinds or {}
    return np.array([c in regions and named.get(c, "part") == "part" for c in concepts], bool)


def concept_incidence(
    records: Sequence, regions: Sequence[str], concepts: Sequence[str], part_names: bool = True
) -> np.ndarray:
    """``A (N, R+1, T)`` bool: slot ``r`` of image ``i`` carries concept ``t`` (slot 0 = outside the object).

    Slot r (1-based) carries the phrases of ``region_concepts[regions[r-1]]`` (and the part name when
    ``part_names`` and it is a concept); slot 0 carries ``"<meta['background']> background"`` when that is a
    concept. ``R = len(regions)``.
    """
    pos = {c: j for j, c in enumerate(concepts)}
    slot = {name: r + 1 for r, name in enumerate(regions)}
    a = np.zeros((len(records), len(regions) + 1, len(concepts)), bool)
    for i, rec in enumerate(records):
        for name, phrases in rec.region_concepts.items():
            r = slot.get(name)
            if r is None:
                continue
            for ph in phrases:
                j = pos.get(ph.strip().lower())
                if j is not None:
                    a[i, r, j] = True
            if part_names and name in pos:
                a[i, r, pos[name]] = True
        bg = rec.meta.get("background")
        if bg:
            j = pos.get(background_phrase(bg))
            if j is not None:
                a[i, 0, j] = True
    return a


# ------------------------------------------------------------------------------------------ overlaps / IoU
def region_overlap(
    maps: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    threshold: np.ndarray,
    n_slots: int,
    fired: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image pixel counts of thresholded maps against region slots.

    Args:
        maps: ``(B, C, h, w)`` activation maps (any float dtype).
        labels: ``(B, S, S)`` integer label maps at the evaluation size (0 = outside, r = region r).
        threshold: ``(C,)`` per-filter activation thresholds (e.g. ``probe/threshold``, 0.995 quantile).
        n_slots: ``R + 1``.
        fired: :func:`fired_pixels` of ``maps`` at size ``S``, when the caller already has it.

    Returns:
        ``inter (B, C, R+1)`` float32 = |{A_k↑ > thr_k} ∩ {label = r}|, ``act (B, C)`` float32 =
        |{A_k↑ > thr_k}|, ``area (B, R+1)`` float32 = |{label = r}|; ``A_k↑`` is the map bilinearly upsampled
        to ``S × S`` (``align_corners=False``, as ``evaluation_lavise.concept_ground_truth``).
    """
    b, c = maps.shape[:2]
    s = labels.shape[-1]
    bi, ci, p = fired if fired is not None else fired_pixels(maps, threshold, s)
    lab = torch.as_tensor(np.asarray(labels, np.int64)).reshape(b, s * s).clamp(0, n_slots - 1)
    inter = torch.bincount((bi * c + ci) * n_slots + lab[bi, p], minlength=b * c * n_slots)
    act = torch.bincount(bi * c + ci, minlength=b * c)
    area = torch.bincount((torch.arange(b)[:, None] * n_slots + lab).reshape(-1), minlength=b * n_slots)
    return (
        inter.view(b, c, n_slots).numpy().astype(np.float32),
        act.view(b, c).numpy().astype(np.float32),
        area.view(b, n_slots).numpy().astype(np.float32),
    )


def dissection_iou(
    inter: np.ndarray,
    act: np.ndarray,
    area: np.ndarray,
    incidence: np.ndarray,
    images: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Network Dissection IoU of every filter with every concept.

    Args:
        inter, act, area: from :func:`region_overlap`, ``(N, C, R+1)``, ``(N, C)``, ``(N, R+1)``.
        incidence: ``(N, R+1, T)`` from :func:`concept_incidence`.
        images: ``None`` -> data-set-wide IoU over all N images (one image set for all filters);
            ``(C, p)`` int row indices -> IoU of filter k over its own images ``images[k]`` (top-p rule).

    Returns:
        ``iou (C, T)`` float32 and ``intersection (C, T)`` float32 (pixel counts, for evidence weighting).
    """
    a = incidence.astype(np.float32)
    if images is None:
        i_ct, act_c, m_t = iou_sums(inter, act, area, a)
        return iou_from_sums(i_ct, act_c, m_t), i_ct.astype(np.float32)
    c = inter.shape[1]
    out = np.zeros((c, a.shape[2]), np.float32)
    inter_out = np.zeros_like(out)
    for k in range(c):
        idx = np.asarray(images[k])
        i_t = np.einsum("nr,nrt->t", inter[idx, k], a[idx])
        m_t = np.einsum("nr,nrt->t", area[idx], a[idx])
        u = act[idx, k].sum() + m_t - i_t
        out[k] = i_t / np.maximum(u, 1e-9)
        inter_out[k] = i_t
    return out, inter_out


def iou_sums(
    inter: np.ndarray, act: np.ndarray, area: np.ndarray, incidence: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sums behind the data-set-wide IoU, additive over images (so a pass can accumulate them batch by
    batch): ``I (C, T) = Σ_i |T_ki ∩ M_ti|``, ``|T_k| (C,) = Σ_i |T_ki|``, ``|M_t| (T,) = Σ_i |M_ti|``."""
    a = incidence.astype(np.float32)
    i_ct = np.einsum("ncr,nrt->ct", inter, a, optimize=True)
    m_t = np.einsum("nr,nrt->t", area, a, optimize=True)
    return i_ct, act.sum(0), m_t


def iou_from_sums(i_ct: np.ndarray, act_c: np.ndarray, m_t: np.ndarray) -> np.ndarray:
    """``IoU_kt = I_kt / (|T_k| + |M_t| - I_kt)`` ``(C, T)`` float32 from :func:`iou_sums`."""
    u = act_c[:, None] + m_t[None, :] - i_ct
    return (i_ct / np.maximum(u, 1e-9)).astype(np.float32)


def top_images(pooled: np.ndarray, p: int) -> np.ndarray:
    """``(C, p)`` row indices of each filter's top-p images by pooled activation ``pooled (N, C)`` (stable)."""
    return np.argsort(-np.asarray(pooled, np.float32), axis=0, kind="stable")[:p].T.copy()


def ground_truth_matrix(
    inter: np.ndarray, act: np.ndarray, area: np.ndarray, incidence: np.ndarray, pooled: np.ndarray,
    p: int = 10, iou_min: float = IOU_MIN,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """G (METHODS.md §6) on a held-out split: ``G (C, T)`` bool = IoU over filter k's top-p images > iou_min.

    Inputs as :func:`dissection_iou` (computed on the held-out images) and their ``pooled (N, C)``.
    Returns ``(G, iou)``.
    """
    iou, _ = dissection_iou(inter, act, area, incidence, top_images(pooled, p))
    return iou > iou_min, iou


def subsampled_ground_truth(
    inter: np.ndarray, act: np.ndarray, area: np.ndarray, incidence: np.ndarray, pooled: np.ndarray,
    size: int, p: int = 10, draws: int = 8, iou_min: float = IOU_MIN, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """How the G_k rule would judge each (filter, concept) on a held-out split of ``size`` images, estimated
    on the fit split: ``draws`` random subsets of ``size`` fit images, the G rule (top-p images, IoU) on each.

    Inputs as :func:`ground_truth_matrix` (fit split). Returns ``rate (C, T)`` float32 = share of draws with
    IoU > iou_min (an estimate of P(t ∈ G_k)) and ``mean_iou (C, T)`` float32 = mean top-p IoU over draws.
    """
    rng = np.random.default_rng(seed)
    n = len(pooled)
    size = min(size, n)
    rate = np.zeros((inter.shape[1], incidence.shape[2]), np.float32)
    mean = np.zeros_like(rate)
    for _ in range(draws):
        rows = np.sort(rng.choice(n, size, replace=False))
        iou, _ = dissection_iou(inter, act, area, incidence, rows[top_images(pooled[rows], p)])
        rate += iou > iou_min
        mean += iou
    return rate / draws, mean / draws


def calibrate_search(
    inter: np.ndarray, act: np.ndarray, area: np.ndarray, incidence: np.ndarray, pooled: np.ndarray,
    concepts: Sequence[str], size: int, *, draws: int = 64, folds: int = 4, p: int = 10,
    keep_detected: float = 0.95, precision: float = 0.90, seed: int = 0, is_part: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """The exact path's two rates, chosen on the fit split alone by cross-fitting (nothing from the test split).

    Each of ``folds`` random halvings of the fit images gives evidence on one half (``rate`` by
    :func:`subsampled_ground_truth`, ``draws`` subsets of ``size`` images) and
    a judge on the other (the G rule, METHODS.md §6, on ``size`` of its images), then the roles swap. Over the
    attribute concepts (every concept but the bare part names ``is_part (T,)`` of :func:`part_names` and the
    backgrounds; without ``is_part``, the phrases of several words) the judge finds in some filter:

    - ``min_rate`` (when a concept counts as detected: ``confident``): the highest multiple of ``1/draws`` at
      which at least ``keep_detected`` of them stay confident;
    - ``floor_rate_part`` / ``floor_rate_background`` (which filters are RETURNED): the lowest multiple of
      ``1/draws`` at which the returned filters (``rate >= floor``, best 5) are in the judge's G_k with mean
      precision >= ``precision`` (1.0 when no floor reaches it).

    Inputs as :func:`ground_truth_matrix` (fit split). Returns the three rates
    and the cross-fitted curves behind them (``curves``: per grid value, detected share and precision).
    """
    rng = np.random.default_rng(seed)
    n = len(pooled)
    is_bg = np.array([c.endswith(" background") for c in concepts])
    parts = (
        np.array([len(c.split()) == 1 for c in concepts]) if is_part is None else np.asarray(is_part, bool)
    )
    is_attr = ~parts & ~is_bg
    grid = np.arange(1, draws + 1) / draws
    detected_share = np.zeros((0, len(grid)))
    prec = {"part": np.zeros((0, len(grid))), "background": np.zeros((0, len(grid)))}
    half = n // 2
    judge_size = min(size, n - half)
    for fold in range(max(1, folds // 2)):
        perm = rng.permutation(n)
        for ev, judge in ((perm[:half], perm[half:]), (perm[half:], perm[:half])):
            rate, _ = subsampled_ground_truth(
                inter[ev], act[ev], area[ev], incidence[ev], pooled[ev], size=min(size, len(ev)), p=p,
                draws=draws, seed=seed + fold,
            )  # fmt: skip
            j = np.sort(rng.choice(judge, judge_size, replace=False))
            G, _ = ground_truth_matrix(inter[j], act[j], area[j], incidence[j], pooled[j], p=p)
            best, judged = rate.max(0), G.any(0)  # (T,) each: best evidence, detected by the judge
            det_attr = np.flatnonzero(is_attr & judged)
            if len(det_attr):
                detected_share = np.vstack([detected_share, [(best[det_attr] >= g).mean() for g in grid]])
            for kind, mask in (("part", is_attr), ("background", is_bg)):
                targets = np.flatnonzero(mask & judged)
                rows = []
                for g in grid:
                    hits = []
                    for t in targets:
                        ret = np.flatnonzero(rate[:, t] >= g - 1e-6)
                        ret = ret[np.argsort(-rate[ret, t], kind="stable")][:5]
                        if len(ret):
                            hits.append(G[ret, t].mean())
                    rows.append(np.mean(hits) if hits else np.nan)
                prec[kind] = np.vstack([prec[kind], rows])
    share = detected_share.mean(0) if len(detected_share) else np.ones(len(grid))
    ok = np.flatnonzero(share >= keep_detected - 1e-9)
    min_rate = float(grid[ok.max()]) if len(ok) else float(grid[0])

    def nanmean(m: np.ndarray) -> np.ndarray:  # a grid value no fold could judge stays NaN, without a warning
        counts = (~np.isnan(m)).sum(0)
        return np.where(counts > 0, np.nansum(m, 0) / np.maximum(counts, 1), np.nan)

    def floor_for(kind: str) -> float:
        curve = nanmean(prec[kind]) if len(prec[kind]) else np.full(len(grid), np.nan)
        good = np.flatnonzero(curve >= precision)
        return float(grid[good.min()]) if len(good) else 1.0

    return {
        "min_rate": min_rate,
        "floor_rate_part": floor_for("part"),
        "floor_rate_background": floor_for("background"),
        "draws": draws,
        "folds": 2 * max(1, folds // 2),
        "rule": f"min_rate: highest rate keeping {keep_detected:.0%} of the judged-detected attribute concepts "
        f"confident; floors: lowest rate whose returned filters reach precision {precision:.0%} on the judge half",
        "curves": {
            "grid": grid.round(4).tolist(),
            "detected_share": np.round(share, 4).tolist(),
            **{
                f"precision_{k}": [None if np.isnan(v) else round(float(v), 4) for v in nanmean(m)]
                for k, m in prec.items()
                if len(m)
            },
        },
    }


def rank_labels(iou: np.ndarray, concepts: Sequence[str], n: int = 10, allowed: np.ndarray | None = None):
    """Per filter, its ``n`` best ``(concept, IoU)`` by ``iou (C, T)`` (``allowed (T,)`` bool restricts the
    candidates). Returns ``(ids (C, n) int64, scores (C, n) float32, names list[list[(str, float)]])``."""
    x = np.where(allowed[None, :], iou, -np.inf) if allowed is not None else iou
    ids = np.argsort(-x, axis=1, kind="stable")[:, :n]
    sc = np.take_along_axis(iou, ids, 1).astype(np.float32)
    names = [
        [(concepts[int(j)], float(s)) for j, s in zip(r, q, strict=True)]
        for r, q in zip(ids, sc, strict=True)
    ]
    return ids.astype(np.int64), sc, names


# ------------------------------------------------------------------------------------------- the pass
def label_map_crop(dataset: ProbeDataset, i: int, lm, size: int = EVAL_SIZE) -> np.ndarray | None:
    """``(size, size)`` network-input crop of record ``i``'s label map (:func:`crop_label_map`), or ``None``."""
    lab = dataset.load_mask(int(i))
    if lab is None:
        return None
    return crop_label_map(lab, lm.crop_box(lab.shape[1], lab.shape[0]), size)


def activation_thresholds(
    lm, dataset: ProbeDataset, layer: str, indices: Sequence[int], level: float = 0.995, batch_size: int = 64,
    max_images: int = 512,
) -> np.ndarray:  # fmt: skip
    """``(C,)`` per-filter ``level`` quantile of the spatial activations over (up to ``max_images`` of) the
    records ``indices``: the Network Dissection threshold, for a network that has no probe pass (a
    re-initialised copy in the sanity check)."""
    idx = np.asarray(indices)[:max_images]
    maps = []
    with torch.no_grad(), lm.lock, record_layer(lm.model, layer) as rec:
        for _, x, _ in image_batches(dataset, lm, idx, batch_size):
            lm.model(x)
            m = rec.output.float()
            maps.append(m.permute(1, 0, 2, 3).reshape(m.shape[1], -1))
    return torch.quantile(torch.cat(maps, 1), level, dim=1).numpy().astype(np.float32)


def split_overlaps(
    lm, dataset: ProbeDataset, layer: str, indices: Sequence[int], threshold: np.ndarray,
    batch_size: int = 64, size: int = EVAL_SIZE, report: Callable[[int, int], None] | None = None,
    colour: dict | None = None, stored_maps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """One forward pass over the records ``indices`` -> ``(rows (N,), inter (N, C, R+1), act (N, C),
    area (N, R+1), pooled (N, C))`` for the images that have a label map (the others are left out).

    ``colour``: a dict with ``"palette_lab" (P, 3)``; the pixel colours of each filter's firing region per part
    slot are then summed into it (:func:`~lavise_core.explain.dissection.colour.part_colour_stats`: ``count``,
    ``lab_sum``, ``hist``), for the colour path of the concept search.
    ``stored_maps``: the probe pass's maps of every image at ``layer`` ``(N_all, C, h, w)``
    (:func:`~lavise_core.pipeline.probe.stored_maps`): read instead of the forward pass, the same numbers.
    Memory: the counts only (``N × C × (R+1)`` float32), never the maps.
    """
    from lavise_core.explain.dissection.colour import add_stats, images_to_lab, part_colour_stats

    n_slots = len(dataset.regions) + 1
    thr = np.asarray(threshold, np.float32)
    rows, inter, act, area, pooled = [], [], [], [], []
    done, total = 0, len(indices)
    with torch.no_grad(), lm.lock, record_layer(lm.model, layer) as rec:
        for batch, x, images in image_batches(dataset, lm, indices, batch_size, stored_maps is None):
            done += len(batch)
            labels = [label_map_crop(dataset, i, lm, size) for i in batch]
            keep = [j for j, lab in enumerate(labels) if lab is not None]
            if keep and stored_maps is not None:
                m = torch.from_numpy(np.asarray(stored_maps[[batch[j] for j in keep]], np.float32))
            elif keep:
                lm.model(x[keep])
                m = rec.output.float()
            if keep:
                lab = np.stack([labels[j] for j in keep])
                fired = fired_pixels(m, thr, lab.shape[-1])
                i_, a_, r_ = region_overlap(m, lab, thr, n_slots, fired)
                rows.extend(batch[j] for j in keep)
                inter.append(i_)
                act.append(a_)
                area.append(r_)
                pooled.append(m.mean((2, 3)).numpy())
                if colour is not None:
                    kept = [images[j] for j in keep]
                    lab64 = images_to_lab(kept, [lm.crop_box(*im.size) for im in kept], size)
                    stats = part_colour_stats(m, lab, lab64, thr, n_slots, colour["palette_lab"], fired=fired)
                    colour["stats"] = add_stats(colour.get("stats"), stats)
            if report is not None:
                report(done, total)
    if not rows:
        c = len(thr)
        return (np.zeros(0, np.int64), np.zeros((0, c, n_slots), np.float32), np.zeros((0, c), np.float32),
                np.zeros((0, n_slots), np.float32), np.zeros((0, c), np.float32))  # fmt: skip
    return (np.asarray(rows, np.int64), np.concatenate(inter), np.concatenate(act), np.concatenate(area),
            np.concatenate(pooled).astype(np.float32))  # fmt: skip


# ------------------------------------------------------------------------------------------- the stage
@dataclass
class DissectionTables:
    """What the dissection stage stored in a bundle (memory-mapped): ``concepts`` (T,), ``iou (C, T)``,
    ``label_ids / label_scores (C, L)`` (labels: part+attribute and background phrases, not bare part
    names), ``rate / mean_iou (C, T)`` (evidence for the concept search), ``is_part (T,)``; ``colour``: the
    colour path's evidence (``dissection.colour``) when stored, with its ``regions``; ``calibration``: the
    concept search's rates, cross-fitted on the fit split (None for a bundle from before: defaults).

    ``concept_sets``: the data sets the concepts were measured on, ``concept_set_ids (T,)`` which one each
    concept comes from: one set (the bundle's own probe set, or the concept set that lent the stage), or several
    when the stage composes concept sets (:mod:`lavise_core.explain.dissection.compose`)."""

    concepts: list[str]
    iou: np.ndarray
    label_ids: np.ndarray
    label_scores: np.ndarray
    rate: np.ndarray
    mean_iou: np.ndarray
    is_part: np.ndarray
    regions: list[str] = field(default_factory=list)
    colour: dict | None = None
    calibration: dict | None = None
    concept_sets: list[str] = field(default_factory=list)
    concept_set_ids: np.ndarray | None = None

    @classmethod
    def from_bundle(cls, bundle) -> DissectionTables:
        """The dissection stage of ``bundle`` (arrays memory-mapped)."""
        record = bundle.manifest.get("stages", {}).get(STAGE, {})
        concepts = list(bundle.read_json("dissection/concepts"))
        sets = list(record.get("concept_sets") or [])
        if len(sets) > 1:  # composed: each concept's set is stored with the stage
            set_ids = np.asarray(bundle.array("dissection/concept_set_ids"), np.int64)
        else:
            sets, set_ids = [bundle.words_measured_on(STAGE)], np.zeros(len(concepts), np.int64)
        colour, regions = None, []
        if bundle.has("dissection/colour_hist"):
            colour = {
                "hist": np.asarray(bundle.array("dissection/colour_hist"), np.float64),
                "count": np.asarray(bundle.array("dissection/colour_count"), np.float64),
                "palette_lab": np.asarray(bundle.array("dissection/palette_lab"), np.float64),
            }
            regions = list(bundle.read_json("dissection/regions"))
        has_cal = (bundle.root / "dissection" / "search_calibration.json").is_file()
        return cls(
            concepts=concepts,
            iou=bundle.array("dissection/iou"),
            label_ids=bundle.array("dissection/label_ids"),
            label_scores=bundle.array("dissection/label_scores"),
            rate=bundle.array("dissection/rate"),
            mean_iou=bundle.array("dissection/mean_iou"),
            is_part=np.asarray(bundle.array("dissection/is_part"), bool),
            regions=regions,
            colour=colour,
            calibration=bundle.read_json("dissection/search_calibration") if has_cal else None,
            concept_sets=sets,
            concept_set_ids=set_ids,
        )

    @property
    def composed(self) -> bool:
        """Whether the concepts come from several concept sets."""
        return len(self.concept_sets) > 1

    def concept_set_of(self, j: int) -> str:
        """The name of the data set concept ``j`` was measured on ("" when unknown)."""
        if self.concept_set_ids is None or not self.concept_sets:
            return ""
        return self.concept_sets[int(self.concept_set_ids[int(j)])]

    def labels(self, k: int, n: int = N_LABELS) -> list[tuple[str, float]]:
        """Filter ``k``'s best ``n`` labels ``[(concept, IoU)]`` (IoU below :data:`IOU_MIN` included: check)."""
        return [
            (self.concepts[int(j)], float(s))
            for j, s in zip(self.label_ids[k][:n], self.label_scores[k][:n], strict=True)
        ]

    def label_sets(self, k: int, n: int = N_LABELS) -> list[str]:
        """The data set each of :meth:`labels` ``(k, n)`` was measured on, in the same order."""
        return [self.concept_set_of(int(j)) for j in self.label_ids[k][:n]]


def build_dissection_stage(
    bundle,
    dataset: ProbeDataset,
    lm,
    *,
    batch_size: int = 64,
    n_labels: int = N_LABELS,
    draws: int = 64,
    p: int = 10,
    report: Callable[[int, int, str], None] | None = None,
    progress: bool = False,
) -> dict:
    """Network Dissection of the bundle's layer on the fit split (train + val); see the module docstring.

    Writes ``dissection/concepts.json`` (T), ``dissection/iou (C, T)``, ``dissection/label_ids`` and
    ``label_scores (C, L)``, ``dissection/rate`` and ``mean_iou (C, T)`` (:func:`subsampled_ground_truth`
    with ``draws`` subsets the size of the test split), ``dissection/search_calibration.json`` (the search's
    detection and return rates, cross-fitted on the fit split: :func:`calibrate_search`),
    ``dissection/is_part (T,)``, and the colour path's
    ``dissection/colour_hist (C, R+1, P)``, ``colour_count (C, R+1)``, ``palette_lab (P, 3)``. A data set without
    region label maps is recorded as ``{"skipped": why}``.
    """
    from tqdm import tqdm

    from lavise_core.data.dataset import fit_indices

    t0 = time.perf_counter()
    if not dataset.regions or not any(r.mask for r in dataset.records):
        return {"skipped": "the data set has no region label maps (SynthBirds masks, COCO instance masks)"}
    fit = [int(i) for i in fit_indices(dataset) if dataset.records[int(i)].mask]
    bar = tqdm(total=len(fit), unit="img", desc="dissection", disable=not progress)

    def tick(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if report is not None:
            report(done, total, f"dissection: {done} / {total} images")

    from lavise_core.explain.dissection.colour import default_palette

    thr = np.asarray(bundle.array("probe/threshold"), np.float32)
    fit_recs = [dataset.records[i] for i in fit]
    words = {w for c in dissection_concepts(fit_recs, regions=dataset.regions) for w in c.split()}
    palette_names, palette_lab = default_palette(sorted(words))
    colour = {"palette_lab": palette_lab}
    from lavise_core.pipeline.probe import stored_maps

    kept = stored_maps(bundle, len(dataset))
    rows, inter, act, area, pooled = split_overlaps(
        lm, dataset, bundle.layer, fit, thr, batch_size, report=tick, colour=colour,
        stored_maps=None if kept is None else kept[0],
    )  # fmt: skip
    bar.close()
    recs = [dataset.records[int(i)] for i in rows]
    concepts = dissection_concepts(recs, part_names=True, backgrounds=True, regions=dataset.regions)
    inc = concept_incidence(recs, dataset.regions, concepts)
    iou, _ = dissection_iou(inter, act, area, inc)
    is_part = part_names(concepts, dataset.regions, dataset.meta.get("concept_kinds"))
    ids, scores, _ = rank_labels(iou, concepts, n=min(n_labels, int((~is_part).sum())), allowed=~is_part)
    n_test = int((dataset.splits() == "test").sum()) or max(1, len(rows) // 4)
    rate, mean = subsampled_ground_truth(inter, act, area, inc, pooled, size=n_test, p=p, draws=draws)
    calibration = calibrate_search(
        inter, act, area, inc, pooled, concepts, n_test, draws=draws, p=p, is_part=is_part
    )
    bundle.write_json("dissection/search_calibration", calibration)
    bundle.write_json("dissection/concepts", concepts)
    bundle.write_array("dissection/iou", iou.astype(np.float32))
    bundle.write_array("dissection/label_ids", ids)
    bundle.write_array("dissection/label_scores", scores)
    bundle.write_array("dissection/rate", rate.astype(np.float32))
    bundle.write_array("dissection/mean_iou", mean.astype(np.float32))
    bundle.write_array("dissection/is_part", is_part)
    if "stats" in colour:
        bundle.write_array("dissection/colour_hist", colour["stats"]["hist"].astype(np.float32))
        bundle.write_array("dissection/colour_count", colour["stats"]["count"].astype(np.float32))
        bundle.write_array("dissection/palette_lab", palette_lab.astype(np.float32))
        bundle.write_json("dissection/palette", palette_names)
        bundle.write_json("dissection/regions", list(dataset.regions))
    labelled = int((scores[:, 0] >= IOU_MIN).sum())
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "images": len(rows),
        "concepts": len(concepts),
        "labelled_filters": labelled,
        "unique_labels": len({int(j) for j, s in zip(ids[:, 0], scores[:, 0], strict=True) if s >= IOU_MIN}),
        "median_best_iou": round(float(np.median(scores[:, 0])), 4),
    }


def build_stage(ctx: StageContext) -> dict:
    """The ``dissection`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_dissection_stage` with the build's settings and
    ``options['dissection']``."""
    return build_dissection_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, progress=ctx.settings.bars,
        **ctx.options_for("dissection"),
    )  # fmt: skip
