"""Sentences from the best-measured evidence: attribute detectors read off labelled filters (issue 23).

Guo et al.'s sentence (eq. 5–6) names the attributes of ``p(t | x, c)``, a p.d.f. that puts a right attribute first
for about a quarter of filters. Here an attribute is named only when the filters say it is in *this* image:

1. **Detectors.** For each annotated attribute ``t`` (``"red crown"``), a logistic read-out of the filters whose
   labels are measured (Network Dissection: IoU ≥ its floor on the fit split), fed their pooled and peak
   activations ``x = [φ, max_hw A] (2C,)``, standardised:  ``s_t(x) = w_t · (x − μ) / σ + b_t``.
   All attributes are fitted at once (L2-regularised, L-BFGS) on one half of the fit split and thresholded on the
   other half at the lowest score whose precision reaches ``precision`` (both halves, the stricter threshold kept);
   the final weights are refitted on the whole fit split. An attribute without such a threshold gets no detector.
2. **Present** attributes: ``s_t(x) ≥ τ_t``; of two attributes never seen together in the fit split (two colours
   of one part), only the more certain is kept.
3. **Used by the network for this class:** the attribute's filters ``F_t`` (the three with the largest positive
   share ``w_tk x_k`` of its score) and their contribution to the class score ``Σ_{k∈F_t} φ_k W[c, k]``; an
   attribute is named when that contribution is positive, largest first, at most ``top``.
4. **Where**, at the input's resolution: gradient × input of the attribute's share of the class score,
   ``x ⊙ ∂(Σ_{k∈F_t} φ_k W[c, k]) / ∂x`` summed over colour channels, clipped at 0 and blurred (σ = 1/64 of the
   side); :data:`GROUND_AREA` of the pixels (its top) is the region the sentence grounds the attribute to. (The
   layer's maps are too coarse for that: on the demo CNN, 8 × 8.)

Fewer than ``min_attributes`` confirmed attributes: the sentence names those and says so; none: it says that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from lavise_core.explain.textual.explainer import article, join_items, merge_phrases
from lavise_core.models.networks import record_layer

if TYPE_CHECKING:  # pragma: no cover
    from lavise_core.pipeline.bundle import Bundle

__all__ = [
    "GROUND_AREA",
    "PREFIX",
    "AttributeDetectors",
    "ClassDescription",
    "EvidenceAttribute",
    "EvidenceExplanation",
    "describe_class",
    "evidence_contrast",
    "evidence_explanation",
    "ground_pixels",
    "image_features",
    "top_region",
]

PREFIX = "evidence"
MIN_POSITIVES = 20  # fit images an attribute needs (on each half) to get a detector
FILTERS_PER_ATTRIBUTE = 3
GROUND_AREA = 0.01  # share of the input's pixels an attribute is grounded to (about one bird part at 128 px)


def image_features(maps: np.ndarray) -> np.ndarray:
    """``maps (B, C, h, w)`` or ``(C, h, w)`` -> ``(B, 2C)`` / ``(2C,)``: pooled mean and spatial peak per filter."""
    m = np.asarray(maps, np.float32)
    return np.concatenate([m.mean((-1, -2)), m.max((-1, -2))], -1)


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Independent L2-regularised logistic regressions ``(N, D) -> (N, A)`` fitted at once -> ``W (A, D)``, ``b (A,)``."""
    if y.shape[1] == 0:
        return np.zeros((0, x.shape[1])), np.zeros(0)
    X = torch.from_numpy(np.ascontiguousarray(x, np.float64))
    Y = torch.from_numpy(np.ascontiguousarray(y, np.float64))
    W = torch.zeros(Y.shape[1], X.shape[1], dtype=torch.float64, requires_grad=True)
    prior = Y.mean(0).clamp(1e-3, 1 - 1e-3)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        z = X @ W.T + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, Y) + l2 * (W * W).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def _precision_threshold(score: np.ndarray, y: np.ndarray, precision: float, min_hits: int) -> float:
    """Lowest score whose top-scored set reaches ``precision`` with at least ``min_hits`` images, else +inf."""
    o = np.argsort(-score, kind="stable")
    hits = np.cumsum(y[o])
    n = np.arange(1, len(o) + 1)
    ok = np.flatnonzero((hits / n >= precision) & (n >= min_hits))
    return float(score[o][ok.max()]) if ok.size else float("inf")


@dataclass
class AttributeDetectors:
    """Fitted attribute detectors over a layer's filters.

    Attributes:
        concepts: ``(A,)`` attribute phrases; ``weight (A, 2C)``, ``bias (A,)``; ``mean``, ``scale`` ``(2C,)``;
        threshold: ``(A,)`` score at which the attribute is called present (held-out precision ≥ ``precision``);
        exclusive: ``(A, A)`` attributes never seen together in the fit split;
        filters: ``(C,)`` bool, the filters read (their labels are measured);
        fit_precision, fit_recall: ``(A,)`` on the held-out halves of the fit split.
    """

    concepts: list[str]
    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    threshold: np.ndarray
    exclusive: np.ndarray
    filters: np.ndarray
    fit_precision: np.ndarray
    fit_recall: np.ndarray
    precision: float = 0.97
    info: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return len(self.filters)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        truth: np.ndarray,
        concepts: list[str],
        filters: np.ndarray,
        fit_rows: np.ndarray,
        precision: float = 0.97,
        seed: int = 0,
    ) -> AttributeDetectors:
        """Fit detectors on ``fit_rows``.

        Args:
            features: ``(N, 2C)`` from :func:`image_features`; truth: ``(N, T)`` bool ground truth of ``concepts``;
            filters: ``(C,)`` bool, the filters whose labels are measured (the others are not read).
        """
        C = features.shape[1] // 2
        filters = np.asarray(filters, bool)
        cols = np.concatenate([filters, filters])
        x = np.asarray(features, np.float64)[fit_rows]
        mean, scale = x.mean(0), x.std(0) + 1e-6
        z = np.where(cols, (x - mean) / scale, 0.0)
        y = np.asarray(truth, bool)[fit_rows]
        rng = np.random.default_rng(seed)
        half = rng.permutation(len(fit_rows))
        a, b = half[: len(half) // 2], half[len(half) // 2 :]
        keep = np.flatnonzero((y[a].sum(0) >= MIN_POSITIVES) & (y[b].sum(0) >= MIN_POSITIVES))
        thr = np.full((2, len(keep)), np.inf)
        prec = np.zeros((2, len(keep)))
        rec = np.zeros((2, len(keep)))
        for h, (tr, va) in enumerate(((a, b), (b, a))):
            w, bias = _fit_logistic(z[tr], y[tr][:, keep])
            s = z[va] @ w.T + bias
            for j, t in enumerate(keep):
                thr[h, j] = _precision_threshold(s[:, j], y[va, t], precision, min_hits=10)
                on = s[:, j] >= thr[h, j]
                prec[h, j] = y[va, t][on].mean() if on.any() else 0.0
                rec[h, j] = (on & y[va, t]).sum() / max(int(y[va, t].sum()), 1)
        ok = np.isfinite(thr).all(0)
        keep, thr, prec, rec = keep[ok], thr[:, ok], prec[:, ok], rec[:, ok]
        w, bias = _fit_logistic(z, y[:, keep])
        # the final fit sees twice the rows: its scores run a little wider, so the stricter threshold is kept
        threshold = thr.max(0)
        together = y[:, keep].T.astype(np.int64) @ y[:, keep].astype(np.int64)
        exclusive = together == 0
        np.fill_diagonal(exclusive, False)
        return cls(
            [concepts[int(t)] for t in keep], w.astype(np.float32), bias.astype(np.float32),
            np.where(cols, mean, 0.0).astype(np.float32), np.where(cols, scale, 1.0).astype(np.float32),
            threshold.astype(np.float32), exclusive, filters, prec.mean(0).astype(np.float32),
            rec.mean(0).astype(np.float32), precision, {"n_fit": len(fit_rows), "channels": C},
        )  # fmt: skip

    # ------------------------------------------------------------------ scoring
    def standardise(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float32) - self.mean) / self.scale
        return np.where(np.concatenate([self.filters, self.filters]), z, 0.0).astype(np.float32)

    def margins(self, features: np.ndarray) -> np.ndarray:
        """``(B, A)`` (or ``(A,)``) score minus threshold: ≥ 0 means present (before exclusivity)."""
        return self.standardise(features) @ self.weight.T + self.bias - self.threshold

    def present(self, features: np.ndarray) -> np.ndarray:
        """``(A,)`` bool for one image ``(2C,)``: detected, and more certain than any exclusive rival detected."""
        m = self.margins(features)
        on = np.flatnonzero(m >= 0)
        kept: list[int] = []
        for t in on[np.argsort(-m[on], kind="stable")]:
            if not self.exclusive[t, kept].any():
                kept.append(int(t))
        out = np.zeros(len(self.concepts), bool)
        out[kept] = True
        return out

    def evidence_filters(
        self, features: np.ndarray, t: int, n: int = FILTERS_PER_ATTRIBUTE
    ) -> list[tuple[int, float]]:
        """Filter ``k`` and its share ``w_tk · z_k`` (pooled + peak) of attribute ``t``'s score, largest first."""
        z = self.standardise(features)
        C = self.channels
        share = self.weight[t, :C] * z[:C] + self.weight[t, C:] * z[C:]
        order = [int(k) for k in np.argsort(-share, kind="stable")[:n] if share[k] > 0]
        return [(k, float(share[k])) for k in order]

    # ------------------------------------------------------------------ storage
    def save(self, bundle: Bundle, prefix: str = PREFIX) -> None:
        for name in ("weight", "bias", "mean", "scale", "threshold", "fit_precision", "fit_recall"):
            bundle.write_array(f"{prefix}/{name}", np.asarray(getattr(self, name), np.float32))
        bundle.write_array(f"{prefix}/exclusive", self.exclusive.astype(np.uint8))
        bundle.write_array(f"{prefix}/filters", self.filters.astype(np.uint8))
        bundle.write_json(
            f"{prefix}/detectors", {"concepts": self.concepts, "precision": self.precision, "info": self.info}
        )

    @classmethod
    def from_bundle(cls, bundle: Bundle, prefix: str = PREFIX) -> AttributeDetectors:
        """The detectors the ``evidence`` stage stored (arrays fully loaded)."""
        meta = bundle.read_json(f"{prefix}/detectors")

        def arr(name: str, dtype=np.float32) -> np.ndarray:
            return np.array(bundle.array(f"{prefix}/{name}"), dtype)

        return cls(
            list(meta["concepts"]), arr("weight"), arr("bias"), arr("mean"), arr("scale"), arr("threshold"),
            arr("exclusive", bool), arr("filters", bool), arr("fit_precision"), arr("fit_recall"),
            float(meta.get("precision", 0.97)), dict(meta.get("info", {})),
        )  # fmt: skip


def _blur(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(H, W)`` (replicate padding)."""
    r = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=m.dtype) ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    x = torch.nn.functional.pad(m[None, None], (r, r, 0, 0), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    x = torch.nn.functional.pad(x, (0, 0, r, r), mode="replicate")
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))[0, 0]


def ground_pixels(
    lm, x: torch.Tensor, layer: str, filters: list[int], class_weight: np.ndarray
) -> np.ndarray:
    """Where the attribute is: ``(H, W)`` in [0, 1], gradient × input of ``Σ_{k∈filters} φ_k W[c, k]`` for one
    preprocessed image ``x (1, 3, H, W)`` (summed over channels, clipped at 0, blurred, max-normalised)."""
    w = torch.as_tensor(np.asarray(class_weight, np.float32)[filters])
    xg = x.detach().clone().requires_grad_(True)
    with lm.lock, torch.enable_grad(), record_layer(lm.model, layer) as rec:
        lm.model(xg)
        share = (rec.output[0, filters].float().mean((1, 2)) * w).sum()
        (g,) = torch.autograd.grad(share, xg)
    sal = (g * x.detach())[0].sum(0).clamp_min(0).float()
    sal = _blur(sal, max(1.0, x.shape[-1] / 64))
    top = float(sal.max())
    return (sal / top).numpy() if top > 0 else np.zeros(sal.shape, np.float32)


def top_region(heat: np.ndarray, area: float = GROUND_AREA) -> np.ndarray:
    """``(H, W)`` bool: the ``area`` share of pixels where ``heat`` is largest (the grounded region)."""
    n = max(1, round(area * heat.size))
    region = np.zeros(heat.shape, bool)
    region.flat[np.argsort(-heat, axis=None, kind="stable")[:n]] = True
    return region


# =========================================================================== sentences
@dataclass
class EvidenceAttribute:
    """One attribute named in a sentence, with its evidence."""

    phrase: str
    contribution: float  # Σ_{k∈filters} φ_k W[c, k]: how much its filters add to the class score
    margin: float  # detector score − threshold (≥ 0)
    precision: float  # the detector's held-out precision on the fit split
    filters: list[tuple[int, float]]  # (filter, share of the detector score), largest first


@dataclass
class EvidenceExplanation:
    """The sentence about one image and what stands behind each attribute it names."""

    class_name: str
    sentence: str
    attributes: list[EvidenceAttribute]
    complete: bool  # at least ``min_attributes`` attributes were confirmed


def _because(class_name: str, phrases: list[str]) -> str:
    return f"This is {article(class_name)} {class_name} because it has {join_items(merge_phrases(phrases))}."


def evidence_explanation(
    det: AttributeDetectors,
    features: np.ndarray,
    class_name: str,
    class_weight: np.ndarray | None,
    top: int = 5,
    min_attributes: int = 3,
) -> EvidenceExplanation:
    """The sentence for one image ``features (2C,)`` and class weights ``W[c] (C,)`` (None: an inner layer, the
    attributes are ranked by detector margin)."""
    C = det.channels
    phi = np.asarray(features, np.float32)[:C]
    margin = det.margins(features)
    named: list[EvidenceAttribute] = []
    for t in np.flatnonzero(det.present(features)):
        fl = det.evidence_filters(features, int(t))
        if class_weight is None:
            contribution = float(margin[t])
        else:
            contribution = float(sum(phi[k] * class_weight[k] for k, _ in fl))
        if fl and contribution > 0:
            named.append(EvidenceAttribute(det.concepts[t], contribution, float(margin[t]),
                                           float(det.fit_precision[t]), fl))  # fmt: skip
    named.sort(key=lambda a: -a.contribution)
    named = named[:top]
    phrases = [a.phrase for a in named]
    if not named:
        sentence = (
            f"The network says {class_name}, but none of the attributes its filters detect could be confirmed "
            "in this image."
        )
    elif len(named) < min_attributes:
        n = len(named)
        sentence = _because(class_name, phrases)[:-1] + (
            f" (only {n} attribute{'s' if n > 1 else ''} could be confirmed in this image)."
        )
    else:
        sentence = _because(class_name, phrases)
    return EvidenceExplanation(class_name, sentence, named, len(named) >= min_attributes)


def evidence_contrast(
    det: AttributeDetectors,
    features: np.ndarray,
    class_names: list[str],
    a: int,
    b: int,
    weight: np.ndarray,
    class_frequency: np.ndarray,
    top: int = 3,
    differ: float = 0.5,
) -> tuple[str, list[str], list[str]]:
    """Why class ``a`` rather than ``b``: ``(sentence, attributes for a, attributes b would have)``.

    Attributes for ``a``: present in the image, pushing ``a``'s score above ``b``'s (``Σ_{k∈F_t} φ_k (W[a,k] −
    W[b,k]) > 0``), and at least ``differ`` more frequent in class ``a`` than in ``b`` (``class_frequency (K, A)``,
    the fit split's share of each class's images with each attribute). Attributes ``b`` would have: at least
    ``differ`` more frequent in ``b``, and not present.
    """
    C = det.channels
    phi = np.asarray(features, np.float32)[:C]
    present = det.present(features)
    gap = class_frequency[a] - class_frequency[b]
    pro: list[tuple[float, str]] = []
    for t in np.flatnonzero(present & (gap >= differ)):
        fl = det.evidence_filters(features, int(t))
        push = float(sum(phi[k] * (weight[a, k] - weight[b, k]) for k, _ in fl))
        if push > 0:
            pro.append((push, det.concepts[t]))
    pro.sort(key=lambda p: -p[0])
    con = [det.concepts[t] for t in np.argsort(gap, kind="stable") if gap[t] <= -differ and not present[t]][
        :top
    ]
    for_a = [p for _, p in pro[:top]]
    na, nb = class_names[a], class_names[b]
    if for_a and con:
        sentence = (
            f"It is {article(na)} {na} rather than {article(nb)} {nb} because it has "
            f"{join_items(merge_phrases(for_a))}; {article(nb)} {nb} would have {join_items(merge_phrases(con))}."
        )
    elif for_a:
        sentence = f"It is {article(na)} {na} rather than {article(nb)} {nb} because it has {join_items(merge_phrases(for_a))}."
    elif con:
        sentence = (
            f"No detected attribute sets {article(na)} {na} apart from {article(nb)} {nb} here; "
            f"{article(nb)} {nb} would have {join_items(merge_phrases(con))}."
        )
    else:
        sentence = f"No detected attribute tells {article(na)} {na} from {article(nb)} {nb} in this image."
    return sentence, for_a, con


@dataclass
class ClassDescription:
    """What a class looks like to the network: ``distinct`` (what sets it apart from ``nearest``) then
    ``shared`` (what it has in common with them)."""

    class_name: str
    sentence: str
    distinct: list[str]
    shared: list[str]
    nearest: list[str]


def describe_class(
    det: AttributeDetectors,
    class_names: list[str],
    c: int,
    detection_rate: np.ndarray,
    weight: np.ndarray,
    n_nearest: int = 2,
    typical: float = 0.6,
    differ: float = 0.5,
    top: int = 5,
    support: np.ndarray | None = None,
) -> ClassDescription:
    """The description of class ``c``.

    Args:
        detection_rate: ``(K, A)`` share of each class's correctly classified fit images on which the detector
            finds the attribute (the network's evidence, not the annotations).
        weight: ``(K, C)`` classifier weights; the nearest classes are those whose detection rates are closest.
        support: ``(K,)`` fit images behind each row of ``detection_rate`` (None: every class has some). A class
            without images has no description and is never anyone's nearest class.
    """
    rate = np.asarray(detection_rate, np.float64)
    name = class_names[c]
    if support is not None and support[c] == 0:
        return ClassDescription(
            name, f"No probe image is classified as {name}, so there is no evidence of what it looks like.",
            [], [], [],
        )  # fmt: skip
    dist = np.abs(rate - rate[c]).sum(1)
    dist[c] = np.inf
    if support is not None:
        dist[np.asarray(support) == 0] = np.inf
    nearest = [int(j) for j in np.argsort(dist, kind="stable")[:n_nearest] if np.isfinite(dist[j])]
    mine = np.flatnonzero(rate[c] >= typical)
    if not nearest:  # no other class to compare with
        shared = [det.concepts[t] for t in mine[np.argsort(-rate[c, mine], kind="stable")][:top]]
        sentence = (
            f"{article(name).capitalize()} {name} has {join_items(merge_phrases(shared))}."
            if shared else f"No attribute is detected on most {name} images."
        )  # fmt: skip
        return ClassDescription(name, sentence, [], shared, [])
    gap = rate[c, mine] - rate[nearest[0], mine]  # what sets it apart from its nearest class
    order = np.lexsort((-rate[c, mine], -(rate[c, mine] - rate[nearest][:, mine].mean(0)), -gap))
    distinct = [det.concepts[mine[i]] for i in order if gap[i] >= differ]
    shared = [det.concepts[mine[i]] for i in order if gap[i] < differ]
    distinct, shared = distinct[:top], shared[: max(0, top - len(distinct))]
    near = class_names[nearest[0]]
    if distinct:
        sentence = f"{article(name).capitalize()} {name} has {join_items(merge_phrases(distinct))}, unlike the {near}"
        sentence += f"; like it, it has {join_items(merge_phrases(shared))}." if shared else "."
    elif shared:
        sentence = (
            f"{article(name).capitalize()} {name} has {join_items(merge_phrases(shared))}, as the {near} does; "
            "no detected attribute sets it apart."
        )
    else:
        sentence = f"No attribute is detected on most {name} images."
    return ClassDescription(name, sentence, distinct, shared, [class_names[j] for j in nearest])
