"""LaViSE filter attention and zero-shot filter labels (METHODS.md §2).

For filter k and one of its top images, ``v = Σ_hw F · A_k / ||A_k||_1`` (``A_k`` clipped at 0; the L1
norm makes the attention a convex weighting of positions, exactly the scale of the masked mean the head
was trained on), ``z = g(v) / ||g(v)||``, top-s phrases of the index; votes over the top-p images weighted
by ``phi_k(x) / Σ phi_k``.

**Data-set prior** (``LaviseSettings.dataset_prior``, default 0.2): phrases are ranked by
``cos(z, e_t) + δ·[t is one of the data set's own phrases]`` (the first ``index.meta["n_dataset"]`` phrases,
names only, no masks: generalised zero-shot with known class names), so general phrases that sit next to every
head output ("orange paws" beside "orange breast") no longer crowd the data set's held-out concepts out. The
ranking is exact (one matrix product with the stored phrase embeddings; the same as a FAISS inner-product search
with ``-1`` appended to each query and ``bias_t = -δ·[t ∈ D]`` to each phrase vector). Vote scores include δ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lavise_core.data.dataset import ProbeDataset
from lavise_core.data.images import mask_weights
from lavise_core.explain.lavise.head import ExplainerHead, attention_pool
from lavise_core.explain.lavise.index import ConceptIndex
from lavise_core.explain.lavise.settings import LaviseError, LaviseSettings
from lavise_core.models.threads import torch_threads
from lavise_core.pipeline.probe import image_batches

__all__ = [
    "FilterLabels",
    "compute_filter_labels",
    "dataset_prior_bias",
    "filter_attention_features",
    "labels_from_features",
    "no_attention_labels",
    "rank_phrases",
    "vote_labels",
]


# ============================================================================ filter attention
@dataclass
class FilterLabels:
    """Zero-shot labels of every filter.

    Attributes:
        ids: ``(C, L)`` int64 vocabulary ids, best first (-1 = none).
        scores: ``(C, L)`` float32 vote scores.
        embeddings: ``(C, d)`` float32 unit mean head embedding of the filter (activation-weighted).
    """

    ids: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray


def vote_labels(
    scores: np.ndarray, ids: np.ndarray, weights: np.ndarray, n_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vote the per-image top-s phrases of one filter: ``score(t) = Σ_j w_j · cos_j(t) · [t ∈ top-s_j]``.

    Args:
        scores, ids: ``(p, s)`` cosine scores and vocabulary ids of each image's top-s phrases.
        weights: ``(p,)`` image weights (normalised activations).
    Returns:
        ``(ids (L,), scores (L,))`` best first, padded with -1 / 0.
    """
    acc: dict[int, float] = {}
    for srow, irow, w in zip(scores, ids, weights, strict=True):
        for s, j in zip(srow, irow, strict=True):
            if j >= 0:
                acc[int(j)] = acc.get(int(j), 0.0) + float(w) * float(s)
    best = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:n_labels]
    out_ids = np.full(n_labels, -1, np.int64)
    out_sc = np.zeros(n_labels, np.float32)
    for r, (j, s) in enumerate(best):
        out_ids[r], out_sc[r] = j, s
    return out_ids, out_sc


def _activation_weights(top_value: np.ndarray) -> np.ndarray:
    v = np.clip(np.asarray(top_value, np.float64), 0, None)
    s = v.sum(1, keepdims=True)
    uniform = np.full_like(v, 1.0 / v.shape[1])
    return np.where(s > 0, v / np.where(s > 0, s, 1), uniform).astype(np.float32)


def dataset_prior_bias(n_phrases: int, n_dataset: int, delta: float) -> np.ndarray:
    """``(T,)`` float32 bias to *subtract* from the cosine: ``-delta`` for the first ``n_dataset`` phrases, else 0."""
    b = np.zeros(n_phrases, np.float32)
    b[: max(0, min(int(n_dataset), n_phrases))] = -float(delta)
    return b


def rank_phrases(
    z: np.ndarray, index: ConceptIndex, k: int, dataset_prior: float = 0.0, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` phrases of unit queries ``z (Q, d)`` by ``cos + dataset_prior·[data-set phrase]``.

    Returns ``(scores (Q, k) float32, ids (Q, k) int64)``, best first (ties: lower id first). Without a prior
    (or without ``index.meta["n_dataset"]``) this is the index's own search.
    """
    n_ds = int(index.meta.get("n_dataset") or 0)
    if not dataset_prior or n_ds <= 0:
        return index.search(z, k)
    q = np.ascontiguousarray(np.atleast_2d(z), np.float32)
    emb = np.asarray(index.embeddings, np.float32)
    bias = dataset_prior_bias(len(emb), n_ds, dataset_prior)
    k = max(1, min(int(k), len(emb)))
    out_s = np.zeros((len(q), k), np.float32)
    out_i = np.zeros((len(q), k), np.int64)
    for a in range(0, len(q), chunk):
        s = q[a : a + chunk] @ emb.T - bias[None, :]
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.lexsort((part, -ps), axis=1)
        out_s[a : a + chunk] = np.take_along_axis(ps, order, 1)
        out_i[a : a + chunk] = np.take_along_axis(part, order, 1)
    return out_s, out_i


def _labels_from_embeddings(
    z: np.ndarray, weights: np.ndarray, index: ConceptIndex, top_s: int, n_labels: int,
    dataset_prior: float = 0.0,
) -> FilterLabels:  # fmt: skip
    """``z (C, p, d)`` unit head outputs per filter and image -> votes and mean embeddings."""
    c, p, d = z.shape
    sc, ids = rank_phrases(z.reshape(c * p, d), index, top_s, dataset_prior)
    sc, ids = sc.reshape(c, p, -1), ids.reshape(c, p, -1)
    out_ids = np.full((c, n_labels), -1, np.int64)
    out_sc = np.zeros((c, n_labels), np.float32)
    for k in range(c):
        out_ids[k], out_sc[k] = vote_labels(sc[k], ids[k], weights[k], n_labels)
    emb = (weights[:, :, None] * z).sum(1)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return FilterLabels(out_ids, out_sc, emb.astype(np.float32))


def filter_attention_features(
    lm,
    dataset: ProbeDataset,
    top_index: np.ndarray,
    p: int,
    layer: str | None = None,
    filters: Sequence[int] | None = None,
    image_batch: int = 32,
    threads: int = 2,
    progress: bool = False,
    object_fraction: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention-pooled features of every (filter, top image) pair (METHODS.md §2, filter attention).

    For each unique image among the filters' top-p images (``top_index (C, k)``), the full map F is
    computed once (batched); pair (k, j) gives ``v = attention_pool(F, k)``. The features do not
    depend on the head, so they can be reused for several heads or vocabularies.

    Returns:
        ``(v (K, p, C) float32, inside (K,), area (K,))``: ``inside[k]`` is the share of filter k's
        activation mass inside the object mask (label map > 0) over its top images, ``area[k]`` the share
        of those images' map cells the object covers (what a uniform map would put inside); NaN without
        masks.
    """
    from lavise_core.models.networks import forward_maps

    top_index = np.asarray(top_index)
    ks = np.arange(top_index.shape[0]) if filters is None else np.asarray(filters, np.int64)
    p = min(p, top_index.shape[1])
    ti = top_index[ks, :p]
    pairs: dict[int, list[tuple[int, int]]] = {}
    for r in range(len(ks)):
        for j in range(p):
            pairs.setdefault(int(ti[r, j]), []).append((r, j))
    v_all: np.ndarray | None = None
    mass_in = np.zeros(len(ks), np.float64)
    mass_all = np.zeros(len(ks), np.float64)
    area_sum = np.zeros(len(ks), np.float64)
    area_n = np.zeros(len(ks), np.float64)
    images = sorted(pairs)
    with torch_threads(threads):
        bar = tqdm(total=len(images), desc="filter attention", disable=not progress)
        for batch, x, _ in image_batches(dataset, lm, images, image_batch):
            maps, _ = forward_maps(lm, x, layer)
            maps = maps.float().cpu()
            hw = tuple(maps.shape[-2:])
            if v_all is None:
                v_all = np.zeros((len(ks), p, maps.shape[1]), np.float32)
            for b, i in enumerate(batch):
                rj = pairs[i]
                rows = torch.tensor([r for r, _ in rj])
                v = attention_pool(maps[b], torch.as_tensor(ks)[rows]).numpy()
                for (r, j), f in zip(rj, v, strict=True):
                    v_all[r, j] = f
                if object_fraction:
                    obj = _object_weights(dataset, i, lm, hw)
                    if obj is not None:
                        a = maps[b][torch.as_tensor(ks)[rows]].clamp_min(0).numpy()  # (K', h, w)
                        np.add.at(mass_in, rows.numpy(), (a * obj).sum((1, 2)))
                        np.add.at(mass_all, rows.numpy(), a.sum((1, 2)))
                        np.add.at(area_sum, rows.numpy(), float(obj.mean()))
                        np.add.at(area_n, rows.numpy(), 1.0)
            bar.update(len(batch))
        bar.close()
    if v_all is None:
        raise LaviseError("none of the filters' top images could be read: check the data set's image folder")
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = np.where(mass_all > 0, mass_in / mass_all, np.nan).astype(np.float32)
        area = np.where(area_n > 0, area_sum / area_n, np.nan).astype(np.float32)
    return v_all, inside, area


def labels_from_features(
    v: np.ndarray,
    top_value: np.ndarray,
    head: ExplainerHead,
    index: ConceptIndex,
    top_s: int,
    n_labels: int,
    dataset_prior: float = LaviseSettings.dataset_prior,
) -> FilterLabels:
    """Head + vote: ``v (K, p, C)`` attention features, ``top_value (K, p)`` activations -> :class:`FilterLabels`.

    ``dataset_prior``: added to the data set's own phrases in the ranking (see the module docstring).
    """
    k, p, c = v.shape
    z = head.embed(v.reshape(k * p, c)).reshape(k, p, -1)
    weights = _activation_weights(np.asarray(top_value)[:, :p])
    return _labels_from_embeddings(z, weights, index, top_s, n_labels, dataset_prior)


def compute_filter_labels(
    lm,
    dataset: ProbeDataset,
    top_index: np.ndarray,
    top_value: np.ndarray,
    head: ExplainerHead,
    index: ConceptIndex,
    settings: LaviseSettings = LaviseSettings(),
    layer: str | None = None,
    filters: Sequence[int] | None = None,
    progress: bool = False,
    object_fraction: bool = True,
) -> tuple[FilterLabels, np.ndarray, np.ndarray]:
    """Filter attention labels for every filter (METHODS.md §2).

    :func:`filter_attention_features` then :func:`labels_from_features`.

    Returns:
        ``(labels, inside (C,), area (C,))``: ``inside[k]`` is the share of filter k's activation mass
        inside the object mask over its top images, ``area[k]`` the object's share of those images (NaN
        without masks).
    """
    ks = np.arange(np.asarray(top_index).shape[0]) if filters is None else np.asarray(filters, np.int64)
    v, inside, area = filter_attention_features(
        lm, dataset, top_index, settings.top_p, layer, ks, settings.image_batch, settings.threads,
        progress, object_fraction,
    )  # fmt: skip
    labels = labels_from_features(
        v, np.asarray(top_value)[ks], head, index, settings.top_s, settings.labels_per_filter,
        settings.dataset_prior,
    )  # fmt: skip
    return labels, inside, area


def no_attention_labels(
    pooled: np.ndarray,
    top_index: np.ndarray,
    top_value: np.ndarray,
    head: ExplainerHead,
    index: ConceptIndex,
    settings: LaviseSettings = LaviseSettings(),
    filters: Sequence[int] | None = None,
) -> FilterLabels:
    """Baseline without attention: the head on the plain mean-pooled features ``pooled (N, C)`` of the top images."""
    ks = np.arange(top_index.shape[0]) if filters is None else np.asarray(filters, np.int64)
    p = min(settings.top_p, top_index.shape[1])
    ti = np.asarray(top_index)[ks, :p]
    uniq, inv = np.unique(ti, return_inverse=True)
    emb = head.embed(np.asarray(pooled[uniq], np.float32))
    z = emb[inv.reshape(ti.shape)]
    weights = _activation_weights(np.asarray(top_value)[ks, :p])
    return _labels_from_embeddings(
        z, weights, index, settings.top_s, settings.labels_per_filter, settings.dataset_prior
    )


def _object_weights(dataset: ProbeDataset, i: int, lm, hw: tuple[int, int]) -> np.ndarray | None:
    """``(h, w)`` share of each map cell covered by the object (label map > 0, else the bbox), or None."""
    rec = dataset.records[i]
    if rec.mask is not None:
        lab = dataset.load_mask(i)
        if lab is None:
            return None
        return mask_weights(lab > 0, hw, lm.crop_box(lab.shape[1], lab.shape[0]))
    if rec.bbox is not None:
        from PIL import Image

        with Image.open(dataset.image_path(i)) as im:
            w, h = im.size
        ind = np.zeros((h, w), np.float32)
        x0, y0, x1, y1 = (round(v) for v in rec.bbox)
        ind[max(0, y0) : y1, max(0, x0) : x1] = 1
        return mask_weights(ind, hw, lm.crop_box(w, h))
    return None
