"""Textual explanations: filter–attribute p.d.f.s and template sentences (METHODS.md §1, Guo et al., seed 003).

Everything is array algebra over the probe arrays:

- ``P = filter_activation_probability(pooled)``            ``(N, C)``  p(f_k | x_i)          eq. 3
- ``pdf = filter_attribute_pdf(pooled, M, prior)``          ``(C, T)``  p(t_j | f_k)          eq. 1–4
- ``image_class_pdf(pdf, phi, W, c)``                       ``(T,)``    p(t_j | x, c)         eq. 5–6
- ``class_descriptions(pdf, W)``                            ``(K, T)``  p(t_j | c)            eq. 7–8
- ``ground_attribute(maps, pdf[:, j], size)``               ``(H, W)``  attribute heatmap     eq. 9

The paper leaves every "normalisation function σ" open; the choices made here are:

- eq. 3, over images: per filter, min–max over the probe images, then divide by the sum over images
  (``Σ_i p(f_k | x_i) = 1``). Invariant to each filter's activation scale and offset (filters differ by
  orders of magnitude after batch norm), keeps "stronger activation = more likely" linear, and works for
  layers with negative outputs; a softmax would need a per-filter temperature.
- eq. 4 / eq. 2: by default ``p(x_i | t_j)`` is the 0/1 indicator divided by ``D_t`` (the number of images
  having ``t_j``), i.e. a proper likelihood over images. With the bare indicator (the paper's literal
  eq. 4, ``likelihood="indicator"``) ``p(f | t)`` grows with ``D_t`` and every filter's p.d.f. collapses onto
  the most frequent phrases; with the normalised one ``p(t | f) ∝ p(t) · mean_{i: t ∈ x_i} p(f | x_i)``.
- eq. 6 and eq. 8, over filters: positive part, then divide by the sum over filters. ``phi_k(x) W[c, k]``
  is exactly filter k's contribution to the logit of class c, so ``p(f_k | x, c)`` is filter k's share of the
  positive evidence for c ("because it has ..."). If no filter contributes positively, a softmax over
  filters is used instead.
- eq. 9, over pixels: min–max to ``[0, 1]`` after bilinear upsampling.
- eq. 9, over filters: the literal eq. 9 weights filter k by ``p(t | f_k)``. For any attribute these
  weights are dominated by what all filters share (the prior, frequent attributes), so the literal heatmap
  is almost the constant-p.d.f. heatmap (all filters weighted 1/C). :func:`filter_specificity` instead
  weights a filter by how much *more* it says t than the average filter, the lift
  ``max(p(t | f_k) / mean_k' p(t | f_k') − 1, 0)`` (``weighting="specific"``); ``weighting="literal"`` keeps
  the paper's eq. 9. When the data set locates parts, :mod:`lavise_core.explain.textual.grounding` fits the weights to
  them (``weighting="learned"``); the default ``"auto"`` uses those where they exist, else "specific". Explanations (eq. 5–8) keep
  the literal p.d.f.: there, frequent true attributes are what the sentence should say.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lavise_core.data.dataset import fit_indices

if TYPE_CHECKING:  # pragma: no cover
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.explain.textual.attributes import AttributeTable
    from lavise_core.pipeline.bundle import Bundle
    from lavise_core.pipeline.stages import StageContext

__all__ = [
    "STAGE",
    "Contrast",
    "DebugItem",
    "DebugReport",
    "Explanation",
    "TextualError",
    "TextualExplainer",
    "article",
    "build_stage",
    "build_textual_stage",
    "class_descriptions",
    "contrastive_explanation",
    "debug_misclassified",
    "explanation_sentence",
    "filter_activation_probability",
    "filter_attribute_pdf",
    "filter_class_weights",
    "filter_specificity",
    "ground_attribute",
    "image_class_pdf",
    "join_items",
    "merge_phrases",
    "retrieve_by_attributes",
]

STAGE = "textual"
Likelihood = Literal["normalized", "indicator"]
Weighting = Literal["auto", "learned", "specific", "literal"]


class TextualError(ValueError):
    """Inputs to the textual explainer are inconsistent (shapes, unknown attribute, missing stage)."""


# =========================================================================== normalisations
def filter_activation_probability(pooled: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``p(f_k | x_i) = σ(phi_k(x_i))`` (eq. 3), σ = per-filter min–max over images, then sum to 1 over images.

    Args:
        pooled: ``(N, C)`` global-pooled activations ``phi_k(x_i)``.
        valid: optional ``(N,)`` bool; invalid rows get probability 0 and do not enter min/max.

    Returns:
        ``(N, C)`` float32, each column sums to 1 over the valid images. A filter that is constant over
        the images (dead) gets the uniform ``1 / N_valid``.
    """
    x = np.asarray(pooled, dtype=np.float64)
    if x.ndim != 2:
        raise TextualError(f"pooled must be (N, C), got shape {x.shape}")
    if valid is None:
        valid = np.ones(x.shape[0], dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (x.shape[0],):
        raise TextualError(f"valid must be ({x.shape[0]},), got {valid.shape}")
    if not valid.any():
        raise TextualError("no valid probe image: cannot normalise activations")
    if not np.isfinite(x[valid]).all():
        raise TextualError("pooled activations contain NaN or inf")
    xv = x[valid]
    lo, hi = xv.min(axis=0), xv.max(axis=0)
    span = hi - lo
    dead = span <= 1e-12 * np.maximum(1.0, np.abs(hi))
    z = (xv - lo) / np.where(dead, 1.0, span)
    z[:, dead] = 1.0
    z /= z.sum(axis=0, keepdims=True)
    out = np.zeros_like(x)
    out[valid] = z
    return out.astype(np.float32)


def _positive_share(scores: np.ndarray) -> np.ndarray:
    """σ over the last axis: positive part divided by its sum; softmax where nothing is positive."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.maximum(s, 0.0)
    tot = pos.sum(axis=-1, keepdims=True)
    soft = np.exp(s - s.max(axis=-1, keepdims=True))
    soft /= soft.sum(axis=-1, keepdims=True)
    return np.where(tot > 0, pos / np.where(tot > 0, tot, 1.0), soft)


def filter_class_weights(phi: np.ndarray | None, weight: np.ndarray, classes: Any) -> np.ndarray:
    """``p(f_k | x, c) = σ(phi_k(x) · W[c, k])`` (eq. 6), or ``p(f_k | c) = σ(W[c, k])`` (eq. 8) when ``phi`` is None.

    Args:
        phi: ``(C,)`` or ``(B, C)`` pooled activations, or ``None``.
        weight: ``(K, C)`` classifier weights.
        classes: class index (int) or ``(B,)`` indices (one per row of ``phi``), or ``None`` for all classes.

    Returns:
        ``(C,)``, ``(B, C)`` or ``(K, C)`` float64 rows summing to 1 (σ: positive share, see module doc).
    """
    w = np.asarray(weight)
    if w.ndim != 2:
        raise TextualError(f"classifier weight must be (K, C), got {w.shape}")
    rows = (w if classes is None else w[np.asarray(classes)]).astype(np.float64)  # select, then convert
    if phi is not None:
        p = np.asarray(phi, dtype=np.float64)
        if p.shape[-1] != w.shape[1]:
            raise TextualError(f"phi has {p.shape[-1]} channels, the classifier expects {w.shape[1]}")
        rows = rows * p
    return _positive_share(rows)


# =========================================================================== p.d.f.s
def filter_attribute_pdf(
    pooled: np.ndarray,
    attr_matrix: np.ndarray,
    prior: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    likelihood: Likelihood = "normalized",
) -> np.ndarray:
    """Filter–attribute p.d.f. ``p(t_j | f_k) ∝ p(t_j) Σ_i p(f_k | x_i) p(x_i | t_j)`` (eq. 1–4).

    Args:
        pooled: ``(N, C)`` pooled activations.
        attr_matrix: ``(N, T)`` 0/1: attribute ``t_j`` is in image ``x_i``'s list (eq. 4).
        prior: ``(T,)`` ``p(t_j)`` (normalised TF-IDF), non-negative.
        valid: optional ``(N,)`` bool mask of usable images.
        likelihood: ``"normalized"`` (default): ``p(x_i | t_j) = 1[t_j ∈ x_i] / D_j``; ``"indicator"``: the
            bare 0/1 of eq. 4. See the module docstring.

    Returns:
        ``(C, T)`` float32, each row sums to 1 (the posterior's normaliser ``p(f_k)``). A row with no
        evidence at all (the filter fires only on images without attributes) equals the prior.
    """
    m = np.asarray(attr_matrix, dtype=np.float32)
    pr = np.asarray(prior, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != np.shape(pooled)[0]:
        raise TextualError(f"attr_matrix must be (N, T) with N = {np.shape(pooled)[0]}, got {m.shape}")
    if pr.shape != (m.shape[1],):
        raise TextualError(f"prior must be ({m.shape[1]},), got {pr.shape}")
    if (pr < 0).any() or pr.sum() <= 0:
        raise TextualError("prior must be non-negative with a positive sum")
    p_fx = filter_activation_probability(pooled, valid)  # (N, C)
    if valid is not None:
        m = m * np.asarray(valid, dtype=np.float32)[:, None]
    evidence = (p_fx.T @ m).astype(np.float64)  # (C, T): Σ_i p(f|x_i) 1[t ∈ x_i]
    if likelihood == "normalized":
        d = m.sum(axis=0).astype(np.float64)
        evidence = evidence / np.where(d > 0, d, 1.0)
    elif likelihood != "indicator":
        raise TextualError(f"likelihood must be 'normalized' or 'indicator', got {likelihood!r}")
    post = evidence * pr[None, :]
    tot = post.sum(axis=1, keepdims=True)
    fallback = np.broadcast_to(pr / pr.sum(), post.shape)
    post = np.where(tot > 0, post / np.where(tot > 0, tot, 1.0), fallback)
    return post.astype(np.float32)


def image_class_pdf(pdf: np.ndarray, phi: np.ndarray, weight: np.ndarray, classes: Any) -> np.ndarray:
    """Image-class attribute p.d.f. ``p(t | x, c) = Σ_k p(t | f_k) σ(phi_k(x) W[c, k])`` (eq. 5–6).

    Args:
        pdf: ``(C, T)`` filter–attribute p.d.f.
        phi: ``(C,)`` pooled activations of one image, or ``(B, C)`` for a batch.
        weight: ``(K, C)`` classifier weights.
        classes: class index for ``(C,)``; for a batch an int (same class for all) or ``(B,)`` indices.

    Returns:
        ``(T,)`` or ``(B, T)`` float32, rows summing to 1.
    """
    pdf = np.asarray(pdf)
    phi = np.asarray(phi)
    if pdf.ndim != 2:
        raise TextualError(f"pdf must be (C, T), got {pdf.shape}")
    if phi.shape[-1] != pdf.shape[0]:
        raise TextualError(f"phi has {phi.shape[-1]} channels, the p.d.f. has {pdf.shape[0]} filters")
    if phi.ndim == 2 and np.ndim(classes) == 0:
        classes = np.full(phi.shape[0], int(classes))
    if phi.ndim == 2 and np.shape(classes) != (phi.shape[0],):
        raise TextualError(f"classes must be an int or ({phi.shape[0]},), got shape {np.shape(classes)}")
    if phi.ndim not in (1, 2):
        raise TextualError(f"phi must be (C,) or (B, C), got {phi.shape}")
    k = np.asarray(weight).shape[0]
    if np.any((np.asarray(classes) < 0) | (np.asarray(classes) >= k)):
        raise TextualError(f"class index out of range 0..{k - 1}")
    w = filter_class_weights(phi, weight, classes)  # (C,) or (B, C)
    # float32 product: the (C, T) p.d.f. may be a large memory map, converting it would copy it
    return w.astype(np.float32) @ pdf.astype(np.float32, copy=False)


def class_descriptions(
    pdf: np.ndarray, weight: np.ndarray, phi_scale: np.ndarray | None = None
) -> np.ndarray:
    """Class-level description ``p(t | c) = Σ_k p(t | f_k) σ(W[c, k])`` (eq. 7–8).

    Args:
        pdf: ``(C, T)``; weight: ``(K, C)``.
        phi_scale: optional ``(C,)`` typical activation of each filter (e.g. its mean pooled value): then
            ``σ(W[c, k] · phi_scale_k)``, the expected contribution to the logit, which accounts for
            filters whose activations differ in scale. ``None`` is the paper's ``σ(W[c, k])``.

    Returns:
        ``(K, T)`` float32, rows summing to 1.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != np.shape(pdf)[0]:
        raise TextualError(f"weight must be (K, C) with C = {np.shape(pdf)[0]}, got {w.shape}")
    p_fc = filter_class_weights(phi_scale, w, None)  # (K, C)
    return (p_fc @ np.asarray(pdf, dtype=np.float64)).astype(np.float32)


# =========================================================================== grounding
def filter_specificity(pdf: np.ndarray) -> np.ndarray:
    """Filter weights for grounding (eq. 9) that keep only what is specific to each attribute.

    ``s_kt = max(p(t | f_k) / mean_k' p(t | f_k') − 1, 0)``: the lift of filter k for t over the average
    filter, clipped at 0, so the part of ``p(t | f_k)`` that every filter shares (the prior ``p(t)``, the
    attribute's frequency) cancels and only filters that prefer t weigh in. A column where no filter is above
    the average (all equal, or all zero) gets the constant ``1 / C`` (the paper's constant-p.d.f. baseline).

    Args:
        pdf: ``(C, T)`` ``p(t | f_k)`` (or ``(C,)`` for one attribute).

    Returns:
        float32, same shape, non-negative, each column summing to 1.
    """
    p = np.asarray(pdf, dtype=np.float64)
    one = p.ndim == 1
    if one:
        p = p[:, None]
    if p.ndim != 2 or p.shape[0] == 0:
        raise TextualError(f"pdf must be (C, T) or (C,), got {np.shape(pdf)}")
    if (p < 0).any() or not np.isfinite(p).all():
        raise TextualError("pdf must be finite and non-negative")
    mean = p.mean(axis=0, keepdims=True)
    lift = np.maximum(p / np.where(mean > 0, mean, 1.0) - 1.0, 0.0)
    tot = lift.sum(axis=0, keepdims=True)
    out = np.where(tot > 0, lift / np.where(tot > 0, tot, 1.0), 1.0 / p.shape[0]).astype(np.float32)
    return out[:, 0] if one else out


def ground_attribute(maps: Any, pdf_col: np.ndarray, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Attribute heatmap ``y = σ(Σ_k p(t | f_k) A_k(x))`` (eq. 9), bilinearly upsampled, σ = min–max to [0, 1].

    Args:
        maps: ``(C, h, w)`` or ``(B, C, h, w)`` layer maps (numpy or torch).
        pdf_col: ``(C,)`` the column ``p(t | f_k)`` of one attribute, or ``(C, Q)`` for Q attributes at once.
        out_size: ``(H, W)`` output size (the network input / image size); ``None`` keeps ``(h, w)``.

    Returns:
        float32 ``(H, W)`` for ``(C, h, w)`` maps and a ``(C,)`` column; leading axes ``B`` and/or ``Q``
        are added in the order ``(B, Q, H, W)``. A constant map becomes all zeros.
    """
    import torch

    a = torch.as_tensor(maps).detach().float().cpu()
    single = a.dim() == 3
    if single:
        a = a.unsqueeze(0)
    if a.dim() != 4:
        raise TextualError(f"maps must be (C, h, w) or (B, C, h, w), got {tuple(a.shape)}")
    col = torch.as_tensor(np.asarray(pdf_col, dtype=np.float32))
    one_attr = col.dim() == 1
    if one_attr:
        col = col.unsqueeze(1)
    if col.dim() != 2 or col.shape[0] != a.shape[1]:
        raise TextualError(f"pdf_col must be (C,) or (C, Q) with C = {a.shape[1]}, got {tuple(col.shape)}")
    y = torch.einsum("bchw,cq->bqhw", a, col)
    if out_size is not None and tuple(out_size) != tuple(y.shape[-2:]):
        y = torch.nn.functional.interpolate(y, size=tuple(out_size), mode="bilinear", align_corners=False)
    flat = y.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    span = hi - lo
    flat = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    y = flat.view_as(y).numpy().astype(np.float32)
    if one_attr:
        y = y[:, 0]
    return y[0] if single else y


# =========================================================================== sentences
_PLURAL_NOUNS = {"wing", "leg", "foot", "eye", "feather", "claw", "tarsus", "spot", "stripe", "bar"}
_MASS_NOUNS = {"plumage", "coloring", "colouring", "color", "colour", "fur", "hair", "grass", "water"}
_IRREGULAR_PLURALS = {"foot": "feet", "tarsus": "tarsi"}


#: vowel letters read as "you" or "one" (a European gallinule, a unicycle, a one-way sign) and a silent h (an hour)
_A_BEFORE = ("eu", "uni", "use", "usu", "ute", "one", "once")
_AN_BEFORE = ("hour", "honest", "honour", "honor", "heir")


def article(word: str) -> str:
    """The article before ``word`` ("a" or "an"), by its sound where the first letter misleads."""
    w = word.lower()
    if w.startswith(_AN_BEFORE):
        return "an"
    if w.startswith(_A_BEFORE):
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


def join_items(items: Sequence[str]) -> str:
    """Join as ``a``, ``a and b``, ``a, b, and c`` (serial comma, as in the paper's template)."""
    items = list(items)
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def merge_phrases(phrases: Sequence[str]) -> list[str]:
    """Merge adjectives sharing a noun, in order of first appearance, with articles / plurals.

    ``["red crown", "black wing", "white wing"]`` -> ``["a red crown", "black and white wings"]``.
    Nouns of paired or repeated parts (wing, leg, eye, ...) are pluralised, mass nouns (plumage) take no
    article, others take "a"/"an". A phrase without a space is used as a bare noun ("a crest").
    """
    groups: dict[str, list[str]] = {}
    for ph in phrases:
        words = ph.split()
        noun, adj = (words[-1], " ".join(words[:-1])) if words else ("", "")
        adjs = groups.setdefault(noun, [])
        if adj and adj not in adjs:
            adjs.append(adj)
    out = []
    for noun, adjs in groups.items():
        desc = " ".join([join_items(adjs), noun]).strip() if adjs else noun
        if noun in _PLURAL_NOUNS:
            desc = " ".join([join_items(adjs), _plural(noun)]).strip()
        elif noun not in _MASS_NOUNS:
            desc = f"{article(desc)} {desc}"
        out.append(desc)
    return out


@dataclass
class Explanation:
    """Why the network calls an image class ``class_name``: top attributes with ``p(t | x, c)`` and a sentence."""

    class_name: str
    attributes: list[tuple[str, float]]
    sentence: str
    class_index: int | None = None

    def to_json(self) -> dict:
        return {
            "class": self.class_name,
            "class_index": self.class_index,
            "attributes": [[a, float(s)] for a, s in self.attributes],
            "sentence": self.sentence,
        }


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, descending (stable for ties: lower index first)."""
    s = np.asarray(scores)
    k = min(k, s.shape[-1])
    return np.argsort(-s, kind="stable")[:k]


def explanation_sentence(
    class_name: str,
    pdf_row: np.ndarray,
    vocabulary: Sequence[str],
    top: int = 5,
    class_index: int | None = None,
) -> Explanation:
    """Template sentence "This is a {class} because it has {a1}, {a2}, ..., and {a5}." (top of ``pdf_row``).

    Args:
        pdf_row: ``(T,)`` ``p(t | x, c)`` (or ``p(t | c)`` for a class description).
        vocabulary: ``(T,)`` phrases.
        top: number of attributes taken before merging adjectives per noun.
    """
    row = np.asarray(pdf_row)
    if row.shape != (len(vocabulary),):
        raise TextualError(f"pdf_row must be ({len(vocabulary)},), got {row.shape}")
    if top < 1:
        raise TextualError(f"top must be >= 1, got {top}")
    idx = _top(row, top)
    attrs = [(vocabulary[j], float(row[j])) for j in idx]
    items = merge_phrases([a for a, _ in attrs])
    sentence = f"This is {article(class_name)} {class_name} because it has {join_items(items)}."
    return Explanation(class_name, attrs, sentence, class_index)


@dataclass
class Contrast:
    """Why class A rather than B for one image: attributes favouring each, by ``p(t|x,A) − p(t|x,B)``."""

    class_a: str
    class_b: str
    for_a: list[tuple[str, float]]
    for_b: list[tuple[str, float]]
    sentence: str

    def to_json(self) -> dict:
        return {
            "class_a": self.class_a,
            "class_b": self.class_b,
            "for_a": [[a, float(s)] for a, s in self.for_a],
            "for_b": [[a, float(s)] for a, s in self.for_b],
            "sentence": self.sentence,
        }


def contrastive_explanation(
    pdf_a: np.ndarray,
    pdf_b: np.ndarray,
    vocabulary: Sequence[str],
    class_a: str,
    class_b: str,
    top: int = 3,
) -> Contrast:
    """Why A rather than B: the attributes with the largest ``p(t|x,A) − p(t|x,B)`` and vice versa.

    Args:
        pdf_a, pdf_b: ``(T,)`` image-class p.d.f.s of the same image for classes A and B (eq. 5).
        top: attributes listed on each side (only those with a strictly positive difference).
    """
    a, b = np.asarray(pdf_a, dtype=np.float64), np.asarray(pdf_b, dtype=np.float64)
    if a.shape != (len(vocabulary),) or b.shape != a.shape:
        raise TextualError(f"pdf_a and pdf_b must both be ({len(vocabulary)},), got {a.shape} and {b.shape}")
    d = a - b
    for_a = [(vocabulary[j], float(d[j])) for j in _top(d, top) if d[j] > 0]
    for_b = [(vocabulary[j], float(-d[j])) for j in _top(-d, top) if d[j] < 0]
    art_a, art_b = article(class_a), article(class_b)
    if for_a:
        s = f"It is {art_a} {class_a} rather than {art_b} {class_b} because it has {join_items(merge_phrases([t for t, _ in for_a]))}"
    else:
        s = f"Nothing favours {art_a} {class_a} over {art_b} {class_b}"
    if for_b:
        s += f"; {art_b} {class_b} would rather have {join_items(merge_phrases([t for t, _ in for_b]))}"
    return Contrast(class_a, class_b, for_a, for_b, s + ".")


# =========================================================================== retrieval / debugging
def retrieve_by_attributes(
    scores: np.ndarray,
    columns: int | Sequence[int],
    combine: Literal["product", "sum"] = "product",
    top: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank images by ``p(t | x, predicted class)`` for one or several query attributes.

    Args:
        scores: ``(N, T)`` image-class p.d.f.s at each image's predicted class (eq. 5).
        columns: attribute index or indices.
        combine: several attributes: ``"product"`` (default; ranks by ``Σ_j log p(t_j|x,c)``, an AND query:
            every attribute must be probable) or ``"sum"`` (``Σ_j p(t_j|x,c)``, an OR-like query).
        top: keep only the first ``top`` results.

    Returns:
        ``(order (R,), score (R,))``: image indices best first and the combined score (the product itself for
        ``"product"``).
    """
    s = np.asarray(scores, dtype=np.float64)
    cols = np.atleast_1d(np.asarray(columns, dtype=np.int64))
    if s.ndim != 2:
        raise TextualError(f"scores must be (N, T), got {s.shape}")
    if cols.size == 0 or cols.min() < 0 or cols.max() >= s.shape[1]:
        raise TextualError(f"attribute columns must lie in 0..{s.shape[1] - 1}")
    sub = s[:, cols]
    if combine == "product":
        key = np.log(np.maximum(sub, 1e-300)).sum(axis=1)
        value = np.prod(sub, axis=1)
    elif combine == "sum":
        key = value = sub.sum(axis=1)
    else:
        raise TextualError(f"combine must be 'product' or 'sum', got {combine!r}")
    order = np.argsort(-key, kind="stable")
    if top is not None:
        order = order[:top]
    return order, value[order]


@dataclass
class DebugItem:
    """One misclassified image: explanations for its true and its predicted class."""

    index: int
    true_class: int
    predicted_class: int
    true: Explanation
    predicted: Explanation
    confusing: list[tuple[str, float]]


@dataclass
class DebugReport:
    """All errors, and the attributes most often behind them (counted over errors)."""

    items: list[DebugItem]
    confusing_attributes: list[tuple[str, int]]
    confused_pairs: list[tuple[str, str, int]] = field(default_factory=list)


def debug_misclassified(
    pdf: np.ndarray,
    pooled: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    class_names: Sequence[str],
    vocabulary: Sequence[str],
    *,
    top: int = 5,
    n_confusing: int = 3,
    max_items: int | None = None,
) -> DebugReport:
    """Network debugging (paper, "Network Debugging"): explain every error for its true and predicted class.

    For each misclassified image i (``argmax logits[i] != labels[i]``, label >= 0), the "confusing" attributes
    are the ``n_confusing`` largest positive ``p(t|x_i, predicted) − p(t|x_i, true)``; the report counts them
    over all errors. Everything is computed in two batched matrix products.

    Args:
        pdf: ``(C, T)``; pooled: ``(N, C)``; logits: ``(N, K)``; labels: ``(N,)`` (-1 = unknown, skipped);
        weight: ``(K, C)``.
        max_items: keep only the first ``max_items`` items in the report (counts use every error).
    """
    pooled = np.asarray(pooled)
    labels = np.asarray(labels)
    pred = np.asarray(logits).argmax(axis=1)
    wrong = np.flatnonzero((labels >= 0) & (pred != labels))
    if wrong.size == 0:
        return DebugReport([], [])
    p_true = image_class_pdf(pdf, pooled[wrong], weight, labels[wrong])  # (E, T)
    p_pred = image_class_pdf(pdf, pooled[wrong], weight, pred[wrong])
    diff = p_pred.astype(np.float64) - p_true
    counter: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    items: list[DebugItem] = []
    for e, i in enumerate(wrong):
        t, p = int(labels[i]), int(pred[i])
        conf = [(vocabulary[j], float(diff[e, j])) for j in _top(diff[e], n_confusing) if diff[e, j] > 0]
        counter.update(a for a, _ in conf)
        pairs[(class_names[t], class_names[p])] += 1
        if max_items is None or len(items) < max_items:
            items.append(
                DebugItem(
                    int(i),
                    t,
                    p,
                    explanation_sentence(class_names[t], p_true[e], vocabulary, top, t),
                    explanation_sentence(class_names[p], p_pred[e], vocabulary, top, p),
                    conf,
                )
            )
    return DebugReport(
        items,
        counter.most_common(),
        [(a, b, n) for (a, b), n in pairs.most_common()],
    )


# =========================================================================== explainer
@dataclass
class TextualExplainer:
    """Bundle-level state of the textual explainer.

    Attributes:
        vocabulary: ``(T,)`` phrases; prior: ``(T,)``; pdf: ``(C, T)`` p(t|f); class_pdf: ``(K, T)`` p(t|c);
        weight: ``(K, C)`` classifier weights; class_names: ``(K,)``.
        part_weights: optional ``(C, T)`` part-supervised eq. 9 weights (:mod:`lavise_core.explain.textual.grounding`),
            valid for the columns where ``part_learned (T,)`` is true.
    """

    vocabulary: list[str]
    prior: np.ndarray
    pdf: np.ndarray
    class_pdf: np.ndarray
    weight: np.ndarray
    class_names: list[str]
    part_weights: np.ndarray | None = None
    part_learned: np.ndarray | None = None

    def __post_init__(self) -> None:
        t, (c, t2), (k, c2) = len(self.vocabulary), self.pdf.shape, self.weight.shape
        if t != t2 or c != c2 or self.class_pdf.shape != (k, t) or len(self.class_names) != k:
            raise TextualError(
                f"inconsistent textual state: vocabulary {t}, pdf {self.pdf.shape}, class_pdf "
                f"{self.class_pdf.shape}, weight {self.weight.shape}, {len(self.class_names)} class names"
            )
        self._col = {a: j for j, a in enumerate(self.vocabulary)}

    # --------------------------------------------------------------- construction
    @classmethod
    def from_arrays(
        cls,
        pooled: np.ndarray,
        table: AttributeTable,
        weight: np.ndarray,
        class_names: Sequence[str],
        *,
        valid: np.ndarray | None = None,
        likelihood: Likelihood = "normalized",
    ) -> TextualExplainer:
        """Fit from probe arrays: ``pooled (N, C)``, an :class:`AttributeTable` over the same N images, ``W (K, C)``."""
        pdf = filter_attribute_pdf(pooled, table.matrix, table.prior, valid=valid, likelihood=likelihood)
        scale = _mean_activation(pooled, valid)
        cpdf = class_descriptions(pdf, weight, phi_scale=scale)
        return cls(
            list(table.vocabulary), np.asarray(table.prior), pdf, cpdf, np.asarray(weight), list(class_names)
        )

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TextualExplainer:
        """Open the stored stage (``textual/*``) of a bundle; arrays stay memory-mapped."""
        if not bundle.stage_done(STAGE):
            raise TextualError(
                f"bundle {bundle.root} has no textual stage yet: run `lavise build` (stage {STAGE!r})"
            )
        vocab = bundle.read_json("textual/vocabulary")
        parts = bundle.has("textual/grounding_learned")
        return cls(
            list(vocab),
            bundle.array("textual/prior"),
            bundle.array("textual/pdf"),
            bundle.array("textual/class_pdf"),
            bundle.array("probe/classifier_weight"),
            list(bundle.classes),
            np.asarray(bundle.array("textual/grounding_weights")) if parts else None,
            np.asarray(bundle.array("textual/grounding_learned"), bool) if parts else None,
        )

    # --------------------------------------------------------------- queries
    def column(self, attribute: str | int) -> int:
        if isinstance(attribute, int | np.integer):
            if not 0 <= attribute < len(self.vocabulary):
                raise TextualError(f"attribute index {attribute} outside 0..{len(self.vocabulary) - 1}")
            return int(attribute)
        try:
            return self._col[attribute]
        except KeyError:
            raise TextualError(
                f"unknown attribute {attribute!r}; the vocabulary has {len(self.vocabulary)} phrases"
            ) from None

    def _class(self, c: int | str) -> int:
        if isinstance(c, str):
            if c not in self.class_names:
                raise TextualError(f"unknown class {c!r}")
            return self.class_names.index(c)
        if not 0 <= int(c) < len(self.class_names):
            raise TextualError(f"class index {c} outside 0..{len(self.class_names) - 1}")
        return int(c)

    def image_pdf(self, phi: np.ndarray, c: int | str) -> np.ndarray:
        """``(T,)`` p(t | x, c) (eq. 5–6)."""
        return image_class_pdf(self.pdf, phi, self.weight, self._class(c))

    def explain(
        self,
        phi: np.ndarray,
        logits: np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        top: int = 5,
        class_index: int | str | None = None,
    ) -> Explanation:
        """Explain the prediction for one image: ``phi (C,)``, ``logits (K,)`` (class = arg-max unless given)."""
        if class_index is None:
            if logits is None:
                raise TextualError("give logits or class_index")
            class_index = int(np.argmax(logits))
        c = self._class(class_index)
        names = list(class_names) if class_names is not None else self.class_names
        return explanation_sentence(names[c], self.image_pdf(phi, c), self.vocabulary, top, c)

    def contrast(self, phi: np.ndarray, class_a: int | str, class_b: int | str, top: int = 3) -> Contrast:
        """Why ``class_a`` rather than ``class_b`` for the image with pooled activations ``phi (C,)``."""
        a, b = self._class(class_a), self._class(class_b)
        return contrastive_explanation(
            self.image_pdf(phi, a), self.image_pdf(phi, b), self.vocabulary,
            self.class_names[a], self.class_names[b], top,
        )  # fmt: skip

    def describe_class(self, c: int | str, top: int = 5) -> Explanation:
        """Class-level description (eq. 7–8) as a sentence."""
        k = self._class(c)
        return explanation_sentence(self.class_names[k], self.class_pdf[k], self.vocabulary, top, k)

    def ground(
        self,
        maps: Any,
        attribute: str | int | Sequence[str | int],
        out_size: tuple[int, int] | None = None,
        weighting: Weighting = "auto",
    ) -> np.ndarray:
        """Heatmap(s) of attribute(s) on ``maps (C, h, w)`` (eq. 9); ``(H, W)`` or ``(Q, H, W)``.

        Filter weights (:meth:`grounding_weights`): ``"auto"`` (default) the part-supervised ones where
        the bundle has them, else ``"specific"`` (:func:`filter_specificity`); ``"literal"`` is ``p(t | f_k)``
        as the paper's eq. 9 (see the module docstring).
        """
        single = isinstance(attribute, str | int | np.integer)
        cols = [self.column(attribute)] if single else [self.column(a) for a in attribute]
        w = self.grounding_weights(cols, weighting)
        return ground_attribute(maps, w[:, 0] if single else w, out_size)

    def grounding_weights(self, columns: Sequence[int], weighting: Weighting = "auto") -> np.ndarray:
        """``(C, len(columns))`` filter weights of eq. 9 for these attribute columns.

        ``"learned"`` raises for a column without part-supervised weights; ``"auto"`` falls back to
        ``"specific"`` for it.
        """
        cols = list(columns)
        p = np.asarray(self.pdf)[:, cols]
        if weighting == "literal":
            return p.astype(np.float32)
        if weighting not in ("specific", "auto", "learned"):
            raise TextualError(
                f"weighting must be 'auto', 'learned', 'specific' or 'literal', got {weighting!r}"
            )
        out = filter_specificity(p)
        if weighting == "specific":
            return out
        has = np.zeros(len(cols), bool) if self.part_learned is None else np.asarray(self.part_learned)[cols]
        if weighting == "learned" and not has.all():
            missing = [self.vocabulary[c] for c, h in zip(cols, has, strict=True) if not h][:3]
            raise TextualError(
                f"no part-supervised grounding weights for {missing}: build stage 'textual_grounding'"
            )
        if has.any():
            out[:, has] = np.asarray(self.part_weights)[:, np.asarray(cols)[has]]
        return out

    def filter_top_attributes(self, k: int, top: int = 10) -> list[tuple[str, float]]:
        """The ``top`` attributes of filter ``k``'s p.d.f. ``p(t | f_k)``."""
        row = np.asarray(self.pdf[k])
        return [(self.vocabulary[j], float(row[j])) for j in _top(row, top)]


def _mean_activation(pooled: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    x = np.asarray(pooled, dtype=np.float64)
    if valid is not None:
        x = x[np.asarray(valid, dtype=bool)]
    return x.mean(axis=0)


def build_textual_stage(
    bundle: Bundle,
    dataset: ProbeDataset,
    *,
    source: Literal["auto", "captions", "labels"] = "auto",
    min_images: int = 2,
    likelihood: Likelihood = "normalized",
    nlp: Any = None,
    progress: bool = True,
) -> TextualExplainer:
    """Compute and store the textual stage of a bundle.

    Attributes come from captions (``source="auto"`` when any record has captions, as the paper) or from
    ground-truth labels. When the data set's ``meta["synonyms"]`` holds a synonym table (SynthBirds),
    caption phrases are mapped onto the canonical phrases of the labels ("scarlet chest" -> "red breast"). The table covers all N probe images; the p.d.f. is fitted on :func:`fit_indices`
    (train + val when the data set has them, so the test split stays held out for ``lavise evaluate``).

    Writes ``textual/vocabulary.json`` (T phrases), ``textual/prior`` (T,), ``textual/pdf`` (C, T),
    ``textual/class_pdf`` (K, T), ``textual/attribute_matrix`` (N, T) uint8, ``textual/doc_counts`` (T,),
    ``textual/stats.json``, and marks stage ``"textual"``.
    """
    import time

    from lavise_core.explain.textual.attributes import (
        attributes_from_labels,
        extract_attributes,
        synonym_canonicalizer,
    )

    if bundle.stage_done(STAGE):  # finished earlier: `lavise build --force textual` redoes it
        return TextualExplainer.from_bundle(bundle)
    t0 = time.perf_counter()
    pooled = bundle.array("probe/pooled")
    n = pooled.shape[0]
    if n != len(dataset):
        raise TextualError(f"bundle has {n} probe rows but the data set has {len(dataset)} images")
    valid = bundle.array("probe/valid") if bundle.has("probe/valid") else np.ones(n, dtype=bool)
    has_captions = any(r.captions for r in dataset.records)
    if source == "auto":
        source = "captions" if has_captions else "labels"
    if source == "captions":
        if not has_captions:
            raise TextualError(f"data set {dataset.name!r} has no captions; use source='labels'")
        synonyms = dataset.meta.get("synonyms")
        canonical = synonym_canonicalizer(synonyms) if isinstance(synonyms, dict) and synonyms else None
        table = extract_attributes(
            [r.captions for r in dataset.records],
            nlp,
            min_images=min_images,
            canonical=canonical,
            progress=progress,
        )
        table.stats["canonicalized"] = canonical is not None
    elif source == "labels":
        table = attributes_from_labels(dataset, min_images=min_images)
    else:
        raise TextualError(f"source must be 'auto', 'captions' or 'labels', got {source!r}")
    fit = np.zeros(n, dtype=bool)
    fit[fit_indices(dataset)] = True
    fit &= np.asarray(valid, dtype=bool)
    weight = bundle.array("probe/classifier_weight")
    explainer = TextualExplainer.from_arrays(
        pooled, table, weight, bundle.classes, valid=fit, likelihood=likelihood
    )
    bundle.write_json("textual/vocabulary", list(table.vocabulary))
    bundle.write_array("textual/prior", table.prior.astype(np.float32))
    bundle.write_array("textual/pdf", explainer.pdf)
    bundle.write_array("textual/class_pdf", explainer.class_pdf)
    bundle.write_array("textual/attribute_matrix", table.matrix.astype(np.uint8))
    bundle.write_array("textual/doc_counts", table.doc_counts)
    stats = {
        "source": table.source,
        "n_attributes": len(table.vocabulary),
        "n_images": n,
        "n_fit_images": int(fit.sum()),
        "min_images": min_images,
        "likelihood": likelihood,
        "normalisation": {
            "eq3": "per-filter min-max over images, then divided by the sum over images",
            "eq6_eq8": "positive part over filters, divided by its sum (softmax if none positive)",
            "eq8_scale": "W[c,k] * mean pooled activation of filter k",
            "eq9": "min-max to [0, 1] after bilinear upsampling",
            "eq9_weights": "lift over the mean filter, clipped at 0 (filter_specificity); 'literal' = p(t|f)",
        },
        "top_attributes": [
            [t, int(d), float(p)]
            for t, d, p in zip(table.vocabulary[:50], table.doc_counts[:50], table.prior[:50], strict=True)
        ],
        **{k: v for k, v in table.stats.items() if isinstance(v, int | float | str)},
    }
    bundle.write_json("textual/stats", stats)
    bundle.mark_stage(
        STAGE,
        {
            "seconds": round(time.perf_counter() - t0, 2),
            "n_attributes": len(table.vocabulary),
            "source": table.source,
        },
    )
    return explainer


def build_stage(ctx: StageContext) -> dict:
    """The ``textual`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_textual_stage` with the build's settings and
    ``options['textual']``."""
    build_textual_stage(ctx.bundle, ctx.dataset, progress=ctx.settings.bars, **ctx.options_for("textual"))
    return {}
