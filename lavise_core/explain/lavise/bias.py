"""Data-set insight: concepts per class from class-weighted filter labels, on/off-object flags from
the filters' activation mass inside the object mask, and a background-bias test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lavise_core.explain.lavise.settings import LaviseError

__all__ = ["background_association", "dataset_insight"]


# ============================================================================ dataset insight
def dataset_insight(
    classes: Sequence[str],
    classifier_weight: np.ndarray | None,
    pooled: np.ndarray,
    labels: np.ndarray,
    label_ids: np.ndarray,
    label_scores: np.ndarray,
    phrases: Sequence[str],
    inside: np.ndarray | None = None,
    background_features: np.ndarray | None = None,
    background_labels: np.ndarray | None = None,
    background_names: Sequence[str | None] | None = None,
    object_area: np.ndarray | None = None,
    background_ids: np.ndarray | None = None,
    n_concepts: int = 8,
    n_filters: int = 20,
    alpha: float = 0.01,
    min_auc: float = 0.64,
) -> list[dict]:
    """Which concepts dominate each class, which lie off the object, and whether the background gives the class away.

    - Filter importance for class c: ``imp_ck = max(0, W[c, k] · mean_{i ∈ c} phi_k(x_i))`` (its mean
      contribution to the logit), top ``n_filters``. With ``classifier_weight=None`` (a pretrained network
      whose classes are not the data set's, e.g. ImageNet on SynthBirds): ``max(0, (mean_c phi_k -
      mean phi_k) / std phi_k)``, the filters that fire more on class c than on the data set.
    - Concept score: ``Σ_k imp_ck · label_score_k(t) / Σ_k imp_ck`` over those filters' labels. A filter
      is *off-object* when its share of activation mass inside the object, ``inside (C,)``, is below the
      object's share of the same images, ``object_area (C,)``: it fires less on the object than a uniform
      map would (without ``object_area``: below 0.5). A concept's ``inside`` is the score-weighted mean
      over its filters.
    - Background bias: ``background_features (M, C)`` come from images with the object painted out
      (:func:`paint_out_object`), class ``background_labels (M,)``. :func:`background_association` gives
      the held-out AUC with which the background alone tells class c from the rest, and a p-value; a
      class is flagged when ``p < alpha / K`` (Bonferroni) and ``AUC >= min_auc`` (0.64 ⇔ Cohen's d = 0.5,
      a "medium" effect). The explainer head cannot name a background (it learned object parts), so a
      background is *shown*: ``background_examples`` are the class's images (``background_ids (M,)``,
      record indices) whose backgrounds score highest for it; ``background_names`` (image meta,
      optional) name the most frequent one.

    Returns one dict per class: ``class``, ``concepts`` [{phrase, score, off_object, inside}],
    ``off_object_share``, ``background_auc``, ``background_p``, ``background_bias`` (bool),
    ``background_examples`` (up to 6 record indices), ``dominant_background``, ``dominant_background_share``.
    """
    pooled = np.asarray(pooled, np.float32)
    labels = np.asarray(labels)
    K = len(classes)
    W = None if classifier_weight is None else np.asarray(classifier_weight, np.float32)
    if W is not None and W.shape[0] != K:
        raise LaviseError(
            f"classifier has {W.shape[0]} classes, the data set {K}: pass classifier_weight=None"
        )
    ok = labels >= 0
    mu_all = pooled[ok].mean(0) if ok.any() else np.zeros(pooled.shape[1], np.float32)
    sd_all = pooled[ok].std(0) + 1e-6 if ok.any() else np.ones(pooled.shape[1], np.float32)
    auc = p_val = bg_score = None
    if background_features is not None and background_labels is not None and len(background_features):
        auc, p_val, bg_score = background_association(background_features, background_labels, K)
        bg_ids = np.arange(len(background_labels)) if background_ids is None else np.asarray(background_ids)
    n_tested = 0 if auc is None else int((~np.isnan(auc)).sum())
    cutoff = (
        np.full(pooled.shape[1], 0.5)
        if object_area is None
        else np.where(np.isnan(object_area), 0.5, np.asarray(object_area, np.float64))
    )
    off_filter = None if inside is None else np.asarray(inside, np.float64) < cutoff
    out = []
    for c in range(K):
        rows = labels == c
        mean_phi = pooled[rows].mean(0) if rows.any() else np.zeros(pooled.shape[1], np.float32)
        if W is not None:
            imp = np.clip(W[c] * mean_phi, 0, None)
        else:  # the network's classes are not the data set's: filters that fire more on class c (z-score)
            imp = np.clip((mean_phi - mu_all) / sd_all, 0, None)
        top = np.argsort(-imp, kind="stable")[:n_filters]
        top = top[imp[top] > 0]
        tot = float(imp[top].sum()) or 1.0
        score: dict[int, float] = {}
        ins_num: dict[int, float] = {}
        off_num: dict[int, float] = {}
        ins_den: dict[int, float] = {}
        for k in top:
            measured = inside is not None and not np.isnan(inside[k])
            for j, s in zip(label_ids[k], label_scores[k], strict=True):
                if j < 0:
                    continue
                v = imp[k] * float(s) / tot
                score[int(j)] = score.get(int(j), 0.0) + v
                if measured:
                    ins_num[int(j)] = ins_num.get(int(j), 0.0) + v * float(inside[k])
                    off_num[int(j)] = off_num.get(int(j), 0.0) + v * float(off_filter[k])
                    ins_den[int(j)] = ins_den.get(int(j), 0.0) + v
        best = sorted(score.items(), key=lambda kv: -kv[1])[:n_concepts]
        concepts = []
        for j, s in best:
            den = ins_den.get(j)
            concepts.append(
                {
                    "phrase": phrases[j],
                    "score": round(s, 5),
                    "inside": round(ins_num[j] / den, 4) if den else None,
                    "off_object": bool(off_num[j] / den > 0.5) if den else None,
                }
            )
        off_share = None
        if off_filter is not None and len(top):
            measured = ~np.isnan(inside[top])
            if measured.any():
                off_share = float(
                    (imp[top][measured] * off_filter[top][measured]).sum() / imp[top][measured].sum()
                )
        a = None if auc is None or np.isnan(auc[c]) else float(auc[c])
        p = None if a is None else float(p_val[c])
        flagged = a is not None and p < alpha / max(n_tested, 1) and a >= min_auc
        examples = []
        if bg_score is not None:
            own = np.flatnonzero(np.asarray(background_labels) == c)
            examples = [int(bg_ids[j]) for j in own[np.argsort(-bg_score[own, c], kind="stable")[:6]]]
        dom, dom_share = None, None
        if background_names is not None and background_labels is not None:
            names = [n for n, lab in zip(background_names, background_labels, strict=True) if lab == c and n]
            if names:
                vals, counts = np.unique(names, return_counts=True)
                dom, dom_share = str(vals[counts.argmax()]), float(counts.max() / len(names))
        out.append(
            {
                "class": classes[c],
                "concepts": concepts,
                "off_object_share": off_share,
                "background_auc": a,
                "background_p": p,
                "background_bias": bool(flagged),
                "background_examples": examples,
                "dominant_background": dom,
                "dominant_background_share": dom_share,
            }
        )
    return out


def background_association(
    features: np.ndarray, labels: np.ndarray, K: int, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How well the background alone tells class c from the rest: held-out ``auc (K,)``, one-sided ``p (K,)``
    and the out-of-fold scores ``(M, K)``.

    ``features (M, C)`` are standardised on the training folds; a held-out image's score for class c is its
    projection on ``mean_c - median_c' mean_c'`` of the training folds (a linear discriminant with identity
    covariance, nothing to tune). The reference is the *median* class, not the rest: against the rest, a
    class would look "less watery" merely because another class sits on water. ``AUC_c = U / (n_c · n_rest)`` of the Mann–Whitney test of class-c scores
    against the rest, and ``p_c`` its one-sided p-value (AUC > 0.5). Every score is out of fold, so with
    class-independent backgrounds AUC ≈ 0.5 and p is uniform. NaN for classes with fewer than ``folds`` images.
    """
    from scipy.stats import mannwhitneyu

    f = np.asarray(features, np.float64)
    lab = np.asarray(labels)
    fold = np.random.default_rng(seed).permutation(len(f)) % folds
    score = np.zeros((len(f), K))
    for q in range(folds):
        tr, te = fold != q, fold == q
        mu, sd = f[tr].mean(0), f[tr].std(0) + 1e-6
        z, zt = (f[tr] - mu) / sd, (f[te] - mu) / sd
        present = [c for c in range(K) if (lab[tr] == c).any()]
        means = np.stack([z[lab[tr] == c].mean(0) for c in present])
        typical = np.median(means, axis=0)  # the typical class: one biased class does not move it
        for c, m in zip(present, means, strict=True):
            score[te, c] = zt @ (m - typical)
    auc, p = np.full(K, np.nan), np.full(K, np.nan)
    for c in range(K):
        own = lab == c
        if own.sum() < folds or (~own).sum() < folds:
            continue
        u = mannwhitneyu(score[own, c], score[~own, c], alternative="greater")
        auc[c] = u.statistic / (own.sum() * (~own).sum())
        p[c] = u.pvalue
    return auc, p, score
