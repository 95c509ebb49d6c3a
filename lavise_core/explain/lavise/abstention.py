"""Abstention of the zero-shot concept query (issue 24): a free-text query is answered only when some filter of
the layer matches it better than filters match concepts absent from the data set.

**Score.** The score that ranks the filters: ``s(q) = max_k cos(e_q, f_k)``, ``f_k`` the filter's embedding (the
head's activation-weighted mean output over its top images; :func:`best_filter_scores`). When the query is not
answered, the message offers the concepts the layer detects, zero-shot, nearest to it: each filter's top LaViSE
label (what its card shows; :func:`detected_concepts`, :func:`nearest_detected`).

**Rule, calibrated per bundle** when the LaViSE stage is built (:func:`build_abstention`,
``lavise/abstention.json``), from text alone (no annotation is needed):

- ``threshold``: the query is answered when ``s > threshold``. Split conformal over the calibration half of
  the absent concepts (:func:`lavise_core.data.probe_sets.absent_phrases`; those within cosine
  :data:`SAME_CONCEPT` of one of the data set's own phrases are left out, they are not absent here): the
  ``⌈(1 − α)(n + 1)⌉``-th smallest of their ``n`` scores, so that a new absent concept is answered with
  probability at most ``α`` = :data:`ABSENT_SHARE` (5 %); with fewer than ``1/α − 1`` phrases, the largest.
- ``firm``: an answer below it is *weak* (the closest filter is shown, not asserted): the
  :data:`FIRM_QUANTILE` quantile of the data set's own phrases' scores (the median: half of its concepts are
  answered firmly), never below ``threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lavise_core.explain.lavise.index import ConceptIndex

__all__ = [
    "ABSENT_SHARE",
    "ABSTENTION_NAME",
    "FIRM_QUANTILE",
    "SAME_CONCEPT",
    "AbstentionRule",
    "abstention_rule",
    "best_filter_scores",
    "build_abstention",
    "calibrate_abstention",
    "conformal_threshold",
    "detected_concepts",
    "load_abstention",
    "nearest_detected",
]

#: the largest expected share of absent concepts answered
ABSENT_SHARE = 0.05
#: quantile of the data set's own phrases' scores below which an answer is weak
FIRM_QUANTILE = 0.5
#: an "absent" phrase this close to one of the data set's own phrases is one of its concepts, left out
SAME_CONCEPT = 0.9
#: where the stage stores the rule (``<bundle>/lavise/abstention.json``)
ABSTENTION_NAME = "lavise/abstention"


@dataclass(frozen=True)
class AbstentionRule:
    """``confident`` when ``score > threshold``; ``weak`` when also ``score < firm``."""

    threshold: float
    firm: float

    def verdict(self, score: float) -> tuple[bool, bool]:
        """``(confident, weak)`` for one query's score."""
        confident = bool(score > self.threshold)
        return confident, bool(confident and score < self.firm)


def detected_concepts(label_ids: np.ndarray) -> np.ndarray:
    """Vocabulary ids of the concepts the layer detects, zero-shot: each filter's top label (``label_ids (C, L)``,
    -1 = none), sorted, without repeats."""
    ids = np.asarray(label_ids)
    top = ids[:, 0] if ids.ndim == 2 and ids.shape[1] else np.zeros(0, np.int64)
    return np.unique(top[top >= 0]).astype(np.int64)


def best_filter_scores(q: np.ndarray, filter_embeddings: np.ndarray) -> np.ndarray:
    """``(Q,)``: each query's (``q (Q, d)`` unit rows) cosine to the best-matching filter (``(C, d)``);
    ``-inf`` for a layer without filters."""
    q = np.atleast_2d(np.asarray(q, np.float32))
    fe = np.asarray(filter_embeddings, np.float32)
    return (q @ fe.T).max(1) if len(fe) else np.full(len(q), -np.inf, np.float32)


def nearest_detected(q: np.ndarray, detected_embeddings: np.ndarray, n: int = 4) -> np.ndarray:
    """``(Q, n)``: the rows of ``detected_embeddings (D, d)`` nearest to each query (``q (Q, d)``), nearest first."""
    q = np.atleast_2d(np.asarray(q, np.float32))
    sims = q @ np.asarray(detected_embeddings, np.float32).reshape(-1, q.shape[1]).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :n].astype(np.int64)


def conformal_threshold(absent_scores: Sequence[float], share: float = ABSENT_SHARE) -> float:
    """The ``⌈(1 − share)(n + 1)⌉``-th smallest of ``n`` absent scores (the largest when that is past ``n``):
    a new absent phrase scores above it with probability at most ``share``. ``-inf`` without scores."""
    s = np.sort(np.asarray(absent_scores, np.float64))
    if not len(s):
        return -math.inf
    k = math.ceil((1.0 - share) * (len(s) + 1) - 1e-9)
    return float(s[min(max(k, 1), len(s)) - 1])


def abstention_rule(
    absent_scores: Sequence[float], own_scores: Sequence[float], share: float = ABSENT_SHARE,
    firm_quantile: float = FIRM_QUANTILE,
) -> AbstentionRule:  # fmt: skip
    """The rule from the scores of absent phrases and of the data set's own phrases (see the module docstring)."""
    threshold = conformal_threshold(absent_scores, share)
    own = np.asarray(own_scores, np.float64)
    firm = max(threshold, float(np.quantile(own, firm_quantile))) if len(own) else threshold
    return AbstentionRule(threshold, firm)


def calibrate_abstention(
    index: ConceptIndex, filter_embeddings: np.ndarray, absent: Sequence[str], share: float = ABSENT_SHARE,
    firm_quantile: float = FIRM_QUANTILE,
) -> tuple[AbstentionRule | None, dict]:  # fmt: skip
    """The rule of a bundle's index and filter embeddings ``(C, d)``, with the phrases ``absent`` from its data ->
    ``(rule or None, what was measured)``; ``None`` when the layer has no filter or no absent phrase is left.
    The data set's own phrases are the index's first ``index.meta["n_dataset"]``."""
    n_ds = int(index.meta.get("n_dataset", 0))
    info: dict = {"absent_given": len(absent), "dataset_phrases": n_ds}
    if not len(filter_embeddings) or not len(absent):
        why = "no absent phrase" if not len(absent) else "the layer has no filters"
        return None, {**info, "skipped": why}
    q = np.asarray(index.embed_text(list(absent)), np.float32)
    own = np.asarray(index.embeddings[:n_ds], np.float32)
    keep = (q @ own.T).max(1) < SAME_CONCEPT if n_ds else np.ones(len(q), bool)
    if not keep.any():
        return None, {**info, "skipped": "every absent phrase is one of the data set's concepts"}
    absent_scores = best_filter_scores(q[keep], filter_embeddings)
    own_scores = best_filter_scores(own, filter_embeddings) if n_ds else np.zeros(0, np.float32)
    rule = abstention_rule(absent_scores, own_scores, share, firm_quantile)
    return rule, {
        **info,
        "absent": int(keep.sum()),
        "absent_left_out": [str(t) for t, k in zip(absent, keep, strict=True) if not k],
        "absent_answered": float(np.mean(absent_scores > rule.threshold)),
        "own_answered": float(np.mean(own_scores > rule.threshold)) if n_ds else None,
        "own_firm": float(np.mean(own_scores >= rule.firm)) if n_ds else None,
    }


def build_abstention(bundle, index: ConceptIndex, absent: Sequence[str] | None = None) -> dict:
    """Calibrate the rule of ``bundle`` (its ``lavise/filter_embeddings``) on ``absent`` (default: the calibration
    half of the absent concepts) and write ``lavise/abstention.json`` -> what it recorded."""
    from lavise_core.data.probe_sets import absent_phrases

    absent = absent_phrases("calibration") if absent is None else list(absent)
    rule, info = calibrate_abstention(index, np.asarray(bundle.array("lavise/filter_embeddings")), absent)
    record = {
        "score": "cosine of the query to the best-matching filter's embedding (the score that ranks them)",
        "absent_share": ABSENT_SHARE,
        "firm_quantile": FIRM_QUANTILE,
        **info,
    }
    if rule is not None:
        record |= {"threshold": rule.threshold, "firm": rule.firm}
    bundle.write_json(ABSTENTION_NAME, record)
    return {k: v for k, v in record.items() if k not in ("score", "absent_left_out")}


def load_abstention(bundle) -> tuple[AbstentionRule | None, str | None]:
    """``(rule, None)`` as stored in ``bundle``, else ``(None, why not)``: built before it, or nothing to
    calibrate on."""
    if not bundle.has(f"{ABSTENTION_NAME}.json"):
        return None, "this bundle was built before the zero-shot query could abstain"
    rec = bundle.read_json(ABSTENTION_NAME)
    if "threshold" not in rec:
        return None, f"the zero-shot abstention could not be calibrated: {rec.get('skipped', 'no record')}"
    return AbstentionRule(float(rec["threshold"]), float(rec["firm"])), None
