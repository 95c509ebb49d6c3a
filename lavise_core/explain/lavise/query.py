"""Free-text concept queries: text -> embedding -> filters, images where they fire, and grounding
heatmaps ``Σ_k w_k A_k(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lavise_core.explain.lavise.abstention import AbstentionRule, nearest_detected
from lavise_core.explain.lavise.index import ConceptIndex
from lavise_core.explain.lavise.settings import LaviseError
from lavise_core.models.threads import one_blas_thread

__all__ = ["QueryResult", "grounding_heatmap", "images_where_filters_fire", "query_concept"]


# ============================================================================ queries
@dataclass
class QueryResult:
    """Answer to a free-text concept query.

    Attributes:
        text: the query as given.
        status: ``"seen"`` (trained on), ``"unseen"`` (data set concept held out), ``"vocabulary"``
            (general vocabulary phrase) or ``"not in vocabulary"``.
        suggestions: nearest vocabulary phrases ``[(phrase, cosine)]``.
        filters: ``(F,)`` filters ranked by cosine(query, filter embedding).
        filter_scores: ``(F,)`` those cosines.
        label_scores: ``(F,)`` the query phrase's vote score in each filter's labels (0 if absent).
        images: ``(M,)`` record indices where the matched filters fire most.
        image_scores: ``(M,)``.
        embedding: ``(d,)`` the query embedding.
        nearest: the concepts the layer detects (filters' top labels) nearest the query ``[(phrase, cosine)]``.
        confident: some filter of the layer responds (the best filter's cosine passes the bundle's abstention
            rule; always ``True`` without a rule); ``weak``: it does, but below the rule's firm level.
        calibrated: whether an abstention rule decided ``confident`` and ``weak``.
    """

    text: str
    status: str
    suggestions: list[tuple[str, float]]
    filters: np.ndarray
    filter_scores: np.ndarray
    label_scores: np.ndarray
    images: np.ndarray
    image_scores: np.ndarray
    embedding: np.ndarray = field(repr=False)
    nearest: list[tuple[str, float]] = field(default_factory=list)
    confident: bool = True
    weak: bool = False
    calibrated: bool = False

    def filter_weights(self) -> np.ndarray:
        """``(F,)`` non-negative weights of the matched filters (for :func:`grounding_heatmap`)."""
        w = np.clip(self.filter_scores, 0, None)
        return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / max(len(w), 1), np.float32)


@one_blas_thread
def query_concept(
    text: str,
    index: ConceptIndex,
    filter_embeddings: np.ndarray,
    top_index: np.ndarray,
    top_value: np.ndarray,
    pooled: np.ndarray | None = None,
    label_ids: np.ndarray | None = None,
    label_scores: np.ndarray | None = None,
    seen: Sequence[str] = (),
    unseen: Sequence[str] = (),
    n_filters: int = 10,
    n_suggestions: int = 10,
    n_images: int = 12,
    valid: np.ndarray | None = None,
    detected: np.ndarray | None = None,
    abstention: AbstentionRule | None = None,
) -> QueryResult:
    """Free-text concept query (works for any text: it is embedded itself, not looked up).

    Filters are ranked by ``cos(emb(text), filter_embeddings (C, d))``; images by
    ``Σ_k w_k phi_k(x) / max phi_k`` over the matched filters using ``pooled (N, C)`` (else the
    filters' ``top_index (C, k)`` lists weighted by ``top_value``). ``abstention`` judges the best filter's cosine
    (``confident``, ``weak``; the ranking is returned either way, the caller shows what the verdict allows);
    ``detected``: vocabulary ids of the concepts the layer detects
    (:func:`~lavise_core.explain.lavise.abstention.detected_concepts`), the ``nearest`` of which are offered.
    """
    text = str(text).strip()
    if not text:
        raise LaviseError("the query is empty: type a concept such as 'red wing'")
    q = index.embed_text([text])  # (1, d)
    sc, ids = index.search(q, n_suggestions)
    suggestions = [(index.phrases[j], float(s)) for s, j in zip(sc[0], ids[0], strict=True) if j >= 0]
    low = text.lower()
    pos = index.position(low)
    if low in seen:
        status = "seen"
    elif low in unseen:
        status = "unseen"
    elif pos is not None:
        status = "vocabulary"
    else:
        status = "not in vocabulary"
    fe = filter_embeddings
    if not (isinstance(fe, np.ndarray) and fe.dtype == np.float32 and fe.flags.c_contiguous):
        fe = np.ascontiguousarray(fe, dtype=np.float32)
    cos = fe @ q[0]
    nf = min(n_filters, len(cos))
    order = np.argsort(-cos, kind="stable")[:nf]
    lab = np.zeros(nf, np.float32)
    if label_ids is not None and label_scores is not None and pos is not None:
        for r, k in enumerate(order):
            hit = np.nonzero(np.asarray(label_ids[k]) == pos)[0]
            if hit.size:
                lab[r] = float(label_scores[k][hit[0]])
    w = np.clip(cos[order], 0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(nf, 1.0 / max(nf, 1))
    top_value = np.asarray(top_value)
    scale = np.maximum(top_value[order, 0], 1e-12)
    if pooled is not None:
        img, img_sc = images_where_filters_fire(pooled, top_value, order, w, n_images, valid)
    else:
        acc: dict[int, float] = {}
        for r, k in enumerate(order):
            for i, v in zip(top_index[k], top_value[k], strict=True):
                acc[int(i)] = acc.get(int(i), 0.0) + w[r] * float(v) / scale[r]
        best = sorted(acc.items(), key=lambda kv: -kv[1])[:n_images]
        img = np.array([i for i, _ in best], np.int64)
        img_sc = np.array([s for _, s in best], np.float32)
    nearest: list[tuple[str, float]] = []
    if detected is not None and len(detected):
        det = np.asarray(detected, np.int64)
        e = np.asarray(index.embeddings[det], np.float32)
        nearest = [(index.phrases[int(det[j])], float(e[j] @ q[0])) for j in nearest_detected(q[:1], e)[0]]
    confident, weak = True, False
    if abstention is not None:
        confident, weak = abstention.verdict(float(cos[order[0]]) if nf else -np.inf)
    return QueryResult(
        text, status, suggestions, order.astype(np.int64), cos[order].astype(np.float32), lab,
        img.astype(np.int64), np.asarray(img_sc, np.float32), q[0], nearest, confident, weak,
        abstention is not None,
    )  # fmt: skip


def images_where_filters_fire(
    pooled: np.ndarray, top_value: np.ndarray, filters: np.ndarray, weights: np.ndarray, n_images: int,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Probe images where ``filters (F,)`` fire most -> ``(records (M,), scores (M,))``: ``Σ_k w_k phi_k(x) /
    max phi_k`` over ``pooled (N, C)``, each filter scaled by its top activation ``top_value[k, 0]``; invalid
    images (``valid (N,)`` False) never rank."""
    filters = np.asarray(filters, np.int64)
    if not len(filters):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scale = np.maximum(np.asarray(top_value)[filters, 0], 1e-12)
    s = np.asarray(pooled[:, filters], np.float32) @ (np.asarray(weights) / scale).astype(np.float32)
    if valid is not None:
        s = np.where(np.asarray(valid, bool), s, -np.inf)
    order = np.argsort(-s, kind="stable")[:n_images]
    return order.astype(np.int64), s[order].astype(np.float32)


def grounding_heatmap(
    maps: np.ndarray | torch.Tensor,
    filters: Sequence[int],
    weights: Sequence[float],
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Grounding of a concept in one image: ``Σ_k w_k A_k(x)`` over ``maps (C, h, w)``, each ``A_k`` divided
    by its maximum, clipped at 0, scaled to [0, 1] and bilinearly upsampled to ``out_size (H, W)``."""
    m = torch.as_tensor(np.asarray(maps, np.float32))
    idx = torch.as_tensor(np.asarray(filters, np.int64))
    a = m[idx].clamp_min(0)
    a = a / a.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    h = (torch.as_tensor(np.asarray(weights, np.float32))[:, None, None] * a).sum(0)
    if out_size is not None:
        h = nn.functional.interpolate(h[None, None], size=out_size, mode="bilinear", align_corners=False)[
            0, 0
        ]
    mx = float(h.max())
    return (h / mx if mx > 0 else h).numpy().astype(np.float32)
