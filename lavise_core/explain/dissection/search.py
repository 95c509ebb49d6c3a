"""Concept search with evidence and honest abstention (issue 16): which filters of the layer respond to a
free-text concept, measured on annotated probe regions, and a plain "none" when no filter does.

**Evidence.** The dissection stage simulates, on the fit split only, how the held-out ground-truth rule
(METHODS.md §6) would judge each (filter, concept): ``rate (C, T)`` = P(t ∈ G_k) over random subsets the
size of the test split, ``iou (C, T)`` = the expected top-10 IoU (:func:`~lavise_core.explain.dissection.labels.
subsampled_ground_truth`). :func:`build_query_index` stores them with the known concepts' sentence and word
embeddings (held-out concepts' columns can be dropped, for evaluation).

**Ranking** (:func:`rank_filters_for_query`):

- the query is first grounded in the vocabulary's words by a general lexicon (:mod:`lavise_core.explain.
  lexicon`: "ruby bosom" -> "red breast", "open ocean" -> "water background");
- *exact*: a query whose phrase cosine to a known concept is ≥ ``exact`` ranks filters by that concept's
  ``rate``; only filters whose rate passes ``floor_rate`` (chosen on the fit split by cross-fitting) are
  returned, so a concept that two filters detect returns two filters, not five;
- *composed* (otherwise): each content word picks the known concepts sharing a similar word and a filter
  scores the geometric mean over the words of their expected IoU ("red wing" never annotated -> filters
  that answer to "red …" AND to "… wing");
- *colour + part* (a query that is not a known concept and reads as "<colour> <part>" after the lexicon):
  filters are scored from PIXELS and part masks, never from the concept's attribute labels — the part's
  evidence (the part-name concept's expected IoU) ^ 0.5 × the share of the filter's firing pixels inside that
  part whose nearest basic colour is the query's (:mod:`lavise_core.explain.dissection.colour`); a unit that fires
  on red breasts answers "crimson chest" even when "red breast" was never annotated;
- ``confident``: exact -> some filter detects the concept (``rate ≥ min_rate``); otherwise the phrase
  cosine to the nearest *detected* concept is ≥ ``sim_threshold`` (calibrated on phrases absent from the data:
  objects, scenes and textures SynthBirds never draws). ``nearest`` lists the detected concepts closest to the
  query, for the "no filter of this layer responds" message.

Cost after :func:`embed_query` (one encoder call for the phrase and its unknown words): under 1 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lavise_core.data.probe_sets import absent_phrases, probe_set

__all__ = [
    "SEARCH_SETTINGS",
    "QueryAnswer",
    "QueryIndex",
    "absent_phrases",
    "abstention_threshold",
    "answer_query",
    "build_query_index",
    "embed_query",
    "probe_set",
    "query_words",
    "rank_filters_for_query",
    "search_index",
    "word_table",
]

STOPWORDS = frozenset(
    ("a", "an", "the", "of", "with", "on", "in", "and", "or", "its", "it", "to", "at", "by", "from")
)


def query_words(text: str) -> list[str]:
    """Content words of a query (lower case, split on spaces and hyphens, a few stop words dropped)."""
    w = [t for t in str(text).lower().replace("-", " ").split() if t and t not in STOPWORDS]
    return w or [str(text).strip().lower()]


def word_table(phrases: Sequence[str], embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """``{word: (d,) embedding}`` of the one-word phrases of a vocabulary (e.g. the bundle's LaViSE
    ``ConceptIndex``: ``index.phrases``, ``index.embeddings``), so query words need no encoder call."""
    return {p: np.asarray(embeddings[j], np.float32) for j, p in enumerate(phrases) if p and " " not in p}


def embed_query(
    text: str, embedder, words_table: dict[str, np.ndarray] | None = None, lexicon=None
) -> tuple[np.ndarray, np.ndarray]:
    """``(q (d,), words (J, d))``: the phrase embedding and its content words' embeddings.

    With ``lexicon`` (:func:`lavise_core.explain.dissection.lexicon.build_lexicon` over the index's concepts) the text is first
    grounded by :func:`lavise_core.explain.dissection.lexicon.rewrite_query` ("ruby bosom" -> "red breast"; words it cannot ground
    stay). Words found in ``words_table`` (:func:`word_table`) are looked up; the phrase and any other words go
    through ONE encoder call (``embedder``: ``lavise_core.models.text_encoder.TextEmbedder``, its LRU-cached
    short-text path: a repeated query does not run the encoder).
    """
    if lexicon is not None:
        from lavise_core.explain.dissection.lexicon import rewrite_query

        text = rewrite_query(text, lexicon)[0]
    words = query_words(text)
    table = words_table or {}
    missing = [w for w in words if w not in table]
    texts = [str(text).strip(), *missing]
    e = embedder.embed_queries(texts) if hasattr(embedder, "embed_queries") else embedder.embed(texts)
    new = dict(zip(missing, e[1:], strict=True))
    w = np.stack([table[x] if x in table else new[x] for x in words]).astype(np.float32)
    return e[0], w


@dataclass
class QueryIndex:
    """Per-bundle arrays for :func:`rank_filters_for_query` (what a bundle would store under ``dissection/``).

    Attributes:
        concepts: ``T`` known concept phrases (held-out concepts excluded).
        embeddings: ``(T, d)`` float32 unit rows, their sentence embeddings.
        word_embeddings: ``(T, L, d)`` float32, embeddings of each concept's content words (zero-padded).
        word_mask: ``(T, L)`` bool, which of the L word slots are used.
        rate: ``(T, C)`` float32, estimated probability that concept t is in G_k of filter k on a held-out
            split (:func:`subsampled_ground_truth` on the fit split).
        iou: ``(T, C)`` float32, expected top-p IoU (the G rule's statistic) on a held-out split.
        detects: ``(T,)`` bool, ``rate.max(1) >= min_rate``: some filter of the layer responds to t.
        sim_threshold: phrase cosine to the nearest detected known concept below which the answer abstains
            (calibrated on phrases absent from the data).
        exact: phrase cosine above which the query is taken as that known concept (its own evidence);
            below it, the query is composed word by word (``compose``) or mixed over ``top_m`` neighbours.
        hybrid: with ``compose``, rank by the geometric mean of the (max-normalised) composed score and the
            ``top_m`` neighbours' score.
        compose: rank by the geometric mean over the query's content words of the evidence of the concepts
            that share the word (soft, ``word_top`` concepts per word, softmax at ``temperature``).
        temperature, top_m, word_top: softmax settings.
        min_rate: detection floor on ``rate`` (0.25 = two of eight simulated held-out splits).
        floor_rate: exact path: only filters with ``rate >= floor_rate`` are RETURNED (chosen on the fit split);
            a float or ``(T,)`` float32 per known concept (e.g. one floor for part phrases, one for backgrounds).
        floor_score: composed / neighbour paths: only filters with score >= ``floor_score`` are returned.
        min_return: when the query is confident but no filter passes the floor, return this many best filters
            anyway (``QueryAnswer.weak`` = True); 0 = return none (then ``confident`` is False).
    """

    concepts: list[str]
    embeddings: np.ndarray
    word_embeddings: np.ndarray
    word_mask: np.ndarray
    rate: np.ndarray
    iou: np.ndarray
    detects: np.ndarray
    sim_threshold: float = 0.5
    exact: float = 0.9
    compose: bool = True
    hybrid: bool = False
    temperature: float = 0.05
    top_m: int = 1
    word_top: int = 8
    min_rate: float = 0.25
    floor_rate: float | np.ndarray = 0.0
    floor_score: float = 0.0
    min_return: int = 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to store in a bundle (``dissection/<name>``), besides ``concepts`` (json)."""
        names = ("embeddings", "word_embeddings", "word_mask", "rate", "iou", "detects")
        out = {k: getattr(self, k) for k in names}
        out["floor_rate"] = np.broadcast_to(np.float32(self.floor_rate), (len(self.concepts),)).astype(
            np.float32
        )
        return out


def build_query_index(
    concepts: Sequence[str],
    embeddings: np.ndarray,
    rate: np.ndarray,
    mean_iou: np.ndarray,
    known: np.ndarray | None = None,
    embedder=None,
    **settings,
) -> QueryIndex:
    """Precompute a :class:`QueryIndex`.

    Args:
        concepts: ``T0`` concept phrases (dissection concepts).
        embeddings: ``(T0, d)`` unit sentence embeddings of ``concepts``.
        rate, mean_iou: ``(C, T0)`` from :func:`subsampled_ground_truth` on the fit split.
        known: ``(T0,)`` bool, concepts whose annotations may be used (False for held-out concepts).
        embedder: ``TextEmbedder`` for the concepts' word embeddings (None: no word composition).
        settings: the :class:`QueryIndex` settings (``sim_threshold``, ``exact``, ``compose``, ...).
    """
    keep = np.ones(len(concepts), bool) if known is None else np.asarray(known, bool)
    names = [c for c, k in zip(concepts, keep, strict=True) if k]
    e = np.ascontiguousarray(np.asarray(embeddings, np.float32)[keep])
    words = [query_words(c) for c in names]
    lmax = max(len(w) for w in words) if words else 1
    we = np.zeros((len(names), lmax, e.shape[1]), np.float32)
    wm = np.zeros((len(names), lmax), bool)
    if embedder is not None:
        vocab = sorted({w for ws in words for w in ws})
        table = dict(zip(vocab, embedder.embed(vocab), strict=True))
        for t, ws in enumerate(words):
            for j, w in enumerate(ws):
                we[t, j], wm[t, j] = table[w], True
    else:
        settings = {**settings, "compose": False}
    r = np.ascontiguousarray(np.asarray(rate, np.float32)[:, keep].T)
    m = np.ascontiguousarray(np.asarray(mean_iou, np.float32)[:, keep].T)
    min_rate = float(settings.get("min_rate", 0.25))
    fr = settings.get("floor_rate")
    if fr is not None and np.ndim(fr) == 1:
        settings = {**settings, "floor_rate": np.asarray(fr, np.float32)[keep]}
    return QueryIndex(
        concepts=names, embeddings=e, word_embeddings=we, word_mask=wm, rate=r, iou=m,
        detects=r.max(1) >= min_rate, **settings,
    )  # fmt: skip


@dataclass
class QueryAnswer:
    """Answer of :func:`rank_filters_for_query`.

    Attributes:
        filters: ``(m,)`` int64 filter indices, best first, ``0 <= m <= n``: only the filters whose evidence
            passes the index's floor (``floor_rate`` exact, ``floor_score`` otherwise); empty when the query
            abstains (``confident`` False).
        ranked, ranked_scores: ``(n,)`` the unfloored top-n ranking (candidates to show as "weak", and P@n).
        weak: confident, but no filter passed the floor; ``filters`` holds the ``min_return`` best anyway.
        scores: ``(m,)`` float32 evidence (exact path: ≈ probability that the filter has the concept in its
            G_k; composed path: geometric mean of the words' expected IoUs).
        confident: whether some filter of the layer responds to the query.
        nearest: ``[(concept, cosine, best rate)]`` nearest known concepts that the layer detects.
        similarity: phrase cosine of the query to its nearest detected known concept.
        mode: ``"exact"``, ``"composed"`` or ``"neighbours"``.
    """

    filters: np.ndarray
    scores: np.ndarray
    confident: bool
    nearest: list[tuple[str, float, float]]
    similarity: float
    mode: str
    ranked: np.ndarray | None = None
    ranked_scores: np.ndarray | None = None
    weak: bool = False


def _softmax_top(s: np.ndarray, m: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    m = min(m, len(s))
    top = np.argpartition(-s, m - 1)[:m]
    z = np.exp((s[top] - s[top].max()) / max(temperature, 1e-6))
    return top, z / z.sum()


def _neighbour_score(qi: QueryIndex, top: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(C,)`` weighted ``rate`` rows of concepts ``top`` (+ 0.01 × normalised expected IoU, tie-break)."""
    iou = w @ qi.iou[top]
    return (w @ qi.rate[top] + 0.01 * iou / max(float(iou.max()), 1e-6)).astype(np.float32)


def _composed_score(qi: QueryIndex, q_words: np.ndarray) -> np.ndarray:
    """``(C,)`` geometric mean over query words j of ``Σ_t w_jt iou_tk`` (w_j: softmax of word matches)."""
    a = np.einsum("tld,jd->tjl", qi.word_embeddings, np.asarray(q_words, np.float32))
    a = np.where(qi.word_mask[:, None, :], a, -np.inf).max(2)  # (T, J) best word match per concept
    logs = np.zeros(qi.rate.shape[1], np.float64)
    for j in range(a.shape[1]):
        top, w = _softmax_top(a[:, j], qi.word_top, qi.temperature)
        logs += np.log(w @ qi.iou[top] + 1e-3)
    return np.exp(logs / a.shape[1]).astype(np.float32)


def rank_filters_for_query(
    q: np.ndarray, qi: QueryIndex, n: int = 5, q_words: np.ndarray | None = None, n_nearest: int = 5
) -> QueryAnswer:
    """Rank the layer's filters for a query -> :class:`QueryAnswer`.

    Args:
        q: ``(d,)`` unit phrase embedding of the query; q_words: ``(J, d)`` its content words' embeddings
            (:func:`embed_query`); without them the composed path is off.
        qi: the bundle's :class:`QueryIndex`.

    Ranking: when the phrase cosine to the nearest known concept is >= ``qi.exact``, that concept's ``rate``
    row (+ 0.01 × normalised expected IoU as a tie-break); otherwise, with ``qi.compose``, for each query word
    j the concepts are weighted by their best word cosine to j (softmax over the ``word_top`` best) and
    ``score_k = Π_j (Σ_t w_jt iou_tk)^(1/J)`` (a filter must answer to every word: "red" AND "wing");
    else a softmax mixture of the ``top_m`` nearest concepts' ``rate`` rows. ``confident``: the phrase cosine
    to the nearest known concept the layer detects (``detects``) is >= ``qi.sim_threshold``.
    Cost: a ``(T, d)`` mat-vec, a ``(T, L, d) × (J, d)`` product and ``(J, T) @ (T, C)`` (well under 1 ms).
    """
    q = np.asarray(q, np.float32).reshape(-1)
    sims = qi.embeddings @ q
    best = int(np.argmax(sims))
    composed = qi.compose and q_words is not None and len(q_words) > 0
    if sims[best] >= qi.exact:
        mode, score = "exact", _neighbour_score(qi, np.array([best]), np.ones(1, np.float32))
    elif composed and qi.hybrid:
        mode = "hybrid"
        a = _neighbour_score(qi, *_softmax_top(sims, qi.top_m, qi.temperature))
        b = _composed_score(qi, q_words)
        score = np.sqrt(a / max(float(a.max()), 1e-9) * b / max(float(b.max()), 1e-9)).astype(np.float32)
    elif composed:
        mode, score = "composed", _composed_score(qi, q_words)
    else:
        mode, score = "neighbours", _neighbour_score(qi, *_softmax_top(sims, qi.top_m, qi.temperature))
    nf = min(n, len(score))
    order = np.argpartition(-score, nf - 1)[:nf]
    order = order[np.argsort(-score[order], kind="stable")]
    det = np.flatnonzero(qi.detects)
    if len(det):
        near = det[np.argsort(-sims[det], kind="stable")[:n_nearest]]
        best_sim = float(sims[near[0]])
    else:
        near, best_sim = det, -1.0
    nearest = [(qi.concepts[int(t)], float(sims[t]), float(qi.rate[t].max())) for t in near]
    gate = bool(qi.detects[best]) if mode == "exact" else best_sim >= qi.sim_threshold
    if mode == "exact":
        floor = float(qi.floor_rate[best]) if np.ndim(qi.floor_rate) else float(qi.floor_rate)
    else:
        floor = qi.floor_score
    keep = order[score[order] >= floor] if gate else order[:0]
    weak = False
    if gate and len(keep) == 0 and qi.min_return > 0:
        keep, weak = order[: qi.min_return], True
    return QueryAnswer(
        keep.astype(np.int64), score[keep].astype(np.float32), bool(len(keep)), nearest, best_sim, mode,
        order.astype(np.int64), score[order].astype(np.float32), weak,
    )  # fmt: skip


#: the search settings' defaults. A bundle built by the dissection stage replaces ``min_rate`` and the floors by
#: its own cross-fitted values (:func:`~lavise_core.explain.dissection.labels.calibrate_search`,
#: ``dissection/search_calibration.json``) and ``sim_threshold`` by the 95th percentile over phrases absent
#: from the data (:func:`abstention_threshold`); the defaults are those of SynthBirds + the demo CNN, for
#: bundles from before.
SEARCH_SETTINGS: dict[str, float | int | bool] = {
    "compose": True,
    "exact": 0.9,
    "word_top": 4,
    "temperature": 0.1,
    "min_rate": 3 / 16,
    "sim_threshold": 0.499,
    "floor_score": 0.04,  # composed path: expected IoU below the G rule's own 0.04 is weak evidence
    "min_return": 1,
}
FLOOR_RATE_PART = 9 / 16
FLOOR_RATE_BACKGROUND = 15 / 16


def search_index(
    concepts: Sequence[str], rate: np.ndarray, mean_iou: np.ndarray, embedder, known: np.ndarray | None = None,
    calibration: dict | None = None, absent: Sequence[str] | None = None, **overrides,
) -> QueryIndex:  # fmt: skip
    """The :class:`QueryIndex` of a bundle's dissection tables (``rate, mean_iou (C, T)``) with the default
    :data:`SEARCH_SETTINGS`; ``known (T,)`` False drops concepts (held-out ones, for evaluation).

    ``calibration``: the bundle's ``dissection/search_calibration``
    (:func:`~lavise_core.explain.dissection.labels.calibrate_search`: ``min_rate``, ``floor_rate_part``,
    ``floor_rate_background``, cross-fitted on its fit split) instead of the defaults.
    ``absent``: phrases absent from the data (:func:`absent_phrases`); ``sim_threshold`` is then the 95th
    percentile of their cosine to the nearest concept the layer detects, so that about 5 % of such phrases are
    answered (:func:`abstention_threshold`)."""
    phrases = list(concepts)
    emb = np.asarray(embedder.embed(phrases), np.float32)
    is_bg = np.array([p.endswith(" background") for p in phrases])
    keep = np.ones(len(phrases), bool) if known is None else np.asarray(known, bool)
    cal = calibration or {}
    part = float(cal.get("floor_rate_part", FLOOR_RATE_PART))
    floor = np.where(is_bg, float(cal.get("floor_rate_background", FLOOR_RATE_BACKGROUND)), part)
    settings = {**SEARCH_SETTINGS, "floor_rate": floor.astype(np.float32)}
    if "min_rate" in cal:
        settings["min_rate"] = float(cal["min_rate"])
    settings.update(overrides)
    qi = build_query_index(phrases, emb, rate, mean_iou, known=keep, embedder=embedder, **settings)
    if absent and "sim_threshold" not in overrides:
        qi.sim_threshold = abstention_threshold(qi, embedder, absent)
    return qi


def abstention_threshold(qi: QueryIndex, embedder, absent: Sequence[str], quantile: float = 0.95) -> float:
    """``sim_threshold`` for ``qi``: the ``quantile`` of the phrase cosine of ``absent`` phrases (read through
    the lexicon, as a query is) to the nearest concept the layer detects. Phrases within ``qi.exact`` of a
    known concept are not absent from this data set and are left out; without detected concepts or absent
    phrases the index's threshold stays."""
    from lavise_core.explain.dissection.lexicon import build_lexicon, rewrite_query

    det = np.flatnonzero(qi.detects)
    if not len(det) or not absent:
        return qi.sim_threshold
    lex = build_lexicon(qi.concepts)
    q = np.asarray(embedder.embed([rewrite_query(t, lex)[0] for t in absent]), np.float32)
    sims = q @ qi.embeddings.T  # (A, T)
    truly_absent = sims.max(1) < qi.exact
    if not truly_absent.any():
        return qi.sim_threshold
    return float(np.quantile(sims[truly_absent][:, det].max(1), quantile))


#: colour path settings, chosen on the fit split with the seen colour + part concepts (floor: 90 % answered)
COLOUR_PATH = {"mode": "hist", "power": 0.5, "min_count": 20.0, "floor": 0.041}


def answer_query(
    text: str, qi: QueryIndex, lexicon, words_table: dict, embedder, colour: dict | None = None,
    regions: Sequence[str] = (), n: int = 5,
) -> tuple[QueryAnswer, str]:  # fmt: skip
    """The whole search for ``text`` -> ``(answer, the text as read by the lexicon)``: :func:`embed_query` +
    :func:`rank_filters_for_query`, and the colour path when ``colour`` (the dissection stage's ``hist``,
    ``count``, ``palette_lab``) is given and the query, not a known concept, reads as "<colour> <part>"."""
    from lavise_core.explain.dissection.colour import rank_colour_part
    from lavise_core.explain.dissection.lexicon import rewrite_query

    read_as = rewrite_query(text, lexicon)[0] if lexicon is not None else text
    q, qw = embed_query(text, embedder, words_table, lexicon=lexicon)
    a = rank_filters_for_query(q, qi, n=n, q_words=qw)
    if colour is None or a.mode == "exact" or not a.confident or not regions:
        return a, read_as
    part_ev = {r: qi.iou[qi.concepts.index(r)] for r in regions if r in qi.concepts}
    hit = rank_colour_part(
        read_as, [r for r in regions if r in part_ev], part_ev, colour, colour["palette_lab"], n=n,
        **{k: v for k, v in COLOUR_PATH.items()},
    )  # fmt: skip
    if hit is None:
        return a, read_as
    filters, scores, ranked = hit
    answer = QueryAnswer(
        filters, scores.astype(np.float32), bool(len(filters)), a.nearest, a.similarity, "colour+part", ranked,
        np.zeros(len(ranked), np.float32), False,
    )  # fmt: skip
    return answer, read_as
