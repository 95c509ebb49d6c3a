"""Visual explanation by interpretation (Oramas, Wang & Tuytelaars, ICLR 2019; METHODS.md §3).

1. **Features.** For every layer in a range, each filter's spatial energy ``e_k(x) = Σ_{u,v} A_k(x)²``,
   L1-normalised within its layer; the layers concatenated into ``x ∈ R^D`` and L2-normalised.
2. **Relevant features, no annotation.** Per class ``c`` the non-negative μ-lasso
   ``min_w ‖X w − l_c‖²  s.t. ‖w‖₁ ≤ μ, w ≥ 0`` with ``l_c`` the one-hot of the network's own predictions.
   Solved with scikit-learn's coordinate-descent lasso path (``positive=True``): the penalised solution
   ``w_α`` is the constrained solution for ``μ = ‖w_α‖₁`` (KKT), so the path point with the largest
   ``‖w_α‖₁ ≤ μ`` is taken. ``μ`` is chosen on held-out train images (agreement of ``argmax_c X w_c`` with
   the network's predictions).
3. **Interpretation**: each relevant feature by the average of its top-activating patches and a part label.
4. **Explanation**: for the predicted class, the top 3 features by ``x ⊙ w_c / Σ w_c``, each one's map
   back-projected alone (guided-backprop ReLU rule; a strided conv is treated as stride 1 on a
   nearest-upsampled signal, so there is no checkerboard), min–max normalised, combined by pixel-wise max.

Bundle arrays (stage ``oramas``): ``oramas/energy`` ``(N, D)`` float32 (L2-normalised rows),
``oramas/weights`` ``(K, D)`` float32, ``oramas/patches`` ``(F, P, P, 3)`` uint8 and ``oramas/info.json``
(layers, sizes, μ, the held-out curve, relevant features with their layer, filter and part label).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lavise_core.data.dataset import ProbeDataset
from lavise_core.models.networks import LoadedModel, ModelLoadError, record_layer
from lavise_core.models.threads import cpu_threads
from lavise_core.pipeline.bundle import Bundle
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "MU_GRID",
    "OramasError",
    "RelevantFeatures",
    "backproject",
    "build_oramas_stage",
    "build_stage",
    "choose_mu",
    "class_paths",
    "collect_energies",
    "energies_of",
    "energy_layers",
    "explain_oramas",
    "fit_mu_lasso",
    "fit_relevant",
    "guided_backprop_hooks",
    "l2_rows",
    "lasso_path_positive",
    "layer_energy",
    "normalised_energy",
    "probe_stats",
    "select_radius",
    "top_features",
]

#: μ values tried on the held-out images (the authors used 5–50).
MU_GRID: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
#: EfficientNet-Lite0's documented range: the last three block stages and the head's output.
EFFICIENTNET_LAYERS: tuple[str, ...] = ("blocks.4", "blocks.5", "blocks.6", "bn2")


class OramasError(ValueError):
    """Bad input to the Oramas et al. method: missing layers, a class with no relevant feature, no stage."""


# =========================================================================== features (eq. e_k)
def energy_layers(lm: LoadedModel, layers: Sequence[str] | None = None) -> list[str]:
    """The layers whose energies make the feature vector.

    Default: every ReLU of the demo CNN's ``features`` (all its conv blocks), EfficientNet-Lite0's
    :data:`EFFICIENTNET_LAYERS`, else the explained layer alone. Raises :class:`OramasError` for a layer the
    model does not have.
    """
    names = {n for n, _ in lm.model.named_modules() if n}
    if layers is None:
        relus = [
            n for n, m in lm.model.named_modules() if n.startswith("features.") and isinstance(m, nn.ReLU)
        ]
        if lm.card.get("architecture") == "synthbirds_cnn" and relus:
            layers = relus
        elif all(n in names for n in EFFICIENTNET_LAYERS) and "efficientnet" in lm.name:
            layers = list(EFFICIENTNET_LAYERS)
        else:
            layers = [lm.default_layer]
    missing = [n for n in layers if n not in names]
    if missing or not layers:
        raise OramasError(
            f"the model {lm.name!r} has no layer(s) {', '.join(missing) or '(none given)'} for the Oramas "
            f"features; list its layers with `lavise layers {lm.name}`."
        )
    return list(layers)


def layer_energy(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C)``: ``Σ_{u,v} A_k²`` L1-normalised over the layer's C filters."""
    return normalised_energy(maps.float().pow(2).sum((2, 3)))


def normalised_energy(sum_sq: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` sums of squares ``Σ_{u,v} A_k²`` -> L1-normalised over the C filters (:func:`layer_energy`)."""
    return sum_sq / sum_sq.sum(1, keepdim=True).clamp_min(1e-12)


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


@contextlib.contextmanager
def _recording(model: nn.Module, layers: Sequence[str]) -> Iterator[list]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(record_layer(model, n)) for n in layers]


@torch.no_grad()
def energies_of(lm: LoadedModel, x: torch.Tensor, layers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: features ``(B, D)`` (L2-normalised) and logits ``(B, K)``."""
    device = next(lm.model.parameters()).device
    with lm.lock, _recording(lm.model, layers) as recs:
        logits = lm.model(x.to(device))
    feats = torch.cat([layer_energy(r.output) for r in recs], 1)
    return l2_rows(feats.cpu().numpy()), logits.float().cpu().numpy()


def collect_energies(
    ds: ProbeDataset,
    lm: LoadedModel,
    layers: Sequence[str],
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    report: Callable[[int, int], None] | None = None,
    stored: Bundle | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Energies of ``ds``'s images in one pass: ``X (N, D)``, predictions ``(N,)``, ``valid (N,)``, layer sizes.

    Memory is one float per filter per image. Unreadable images keep a zero row and ``valid`` False. With
    ``stored``, a bundle whose probe pass kept the layers' statistics (``probe/stats``), every image's energies
    are read from it: the same numbers, no pass.
    """
    from lavise_core.pipeline.probe import image_batches, stored_stats

    if stored is not None and indices is None:
        valid = np.asarray(stored.array("probe/valid"), bool)
        stats = stored_stats(stored, layers, len(valid)) if len(valid) == len(ds) else None
        if stats is not None:
            sumsq = [torch.from_numpy(np.ascontiguousarray(stats[name][:, 2])) for name in layers]
            e = torch.cat([normalised_energy(q) for q in sumsq], 1)
            X = np.where(valid[:, None], l2_rows(e.numpy()), np.float32(0))
            pred = np.where(valid, np.asarray(stored.array("probe/logits")).argmax(1), -1)
            return X, pred.astype(np.int64), valid, [int(q.shape[1]) for q in sumsq]

    idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
    sizes: list[int] = []
    X: np.ndarray | None = None
    pred = np.full(len(idx), -1, np.int64)
    valid = np.zeros(len(idx), bool)
    pos = {int(i): j for j, i in enumerate(idx)}
    done = 0
    for batch, x, _ in image_batches(ds, lm, idx, batch_size):
        if not sizes:
            with torch.no_grad(), lm.lock, _recording(lm.model, layers) as recs:
                lm.model(x[:1].to(next(lm.model.parameters()).device))
            sizes = [int(r.output.shape[1]) for r in recs]
            X = np.zeros((len(idx), sum(sizes)), np.float32)
        f, logits = energies_of(lm, x, layers)
        rows = [pos[i] for i in batch]
        X[rows] = f
        pred[rows] = logits.argmax(1)
        valid[rows] = True
        done += len(batch)
        if report is not None:
            report(done, len(idx))
    if X is None:
        raise OramasError("no readable image to compute the Oramas features on")
    return X, pred, valid, sizes


# =========================================================================== μ-lasso
def lasso_path_positive(X: np.ndarray, target: np.ndarray, n_alphas: int = 100) -> np.ndarray:
    """The non-negative lasso path ``(D, A + 1)`` of ``min (1/2N)‖X w − l‖² + α Σ w, w ≥ 0`` (scikit-learn,
    coordinate descent on the Gram matrix, no intercept) from the smallest α that keeps every weight at zero
    down to ``1e-4`` of it, then α = 0 (non-negative least squares, scipy)."""
    from scipy.optimize import nnls
    from sklearn.linear_model import lasso_path

    X = np.asarray(X, np.float64)
    y = np.asarray(target, np.float64)
    _, coefs, _ = lasso_path(X, y, alphas=n_alphas, eps=1e-4, positive=True, precompute=True)
    end, _ = nnls(X, y, maxiter=50 * X.shape[1])
    return np.concatenate([coefs, end[:, None]], 1)


def select_radius(coefs: np.ndarray, mu: float) -> np.ndarray:
    """The constrained solution for radius ``μ`` from a path ``(D, A)`` (penalty decreasing).

    Between the last path point inside the ball and the first outside, the path is linear in α unless the
    active set changes there, so the point on that segment with ``Σ w = μ`` is taken (exact between kinks);
    the path's end when even it lies inside the ball.
    """
    if mu <= 0:
        raise OramasError(f"μ must be positive, got {mu}")
    norms = coefs.sum(0)  # w >= 0: ‖w‖₁ = Σ w
    inside = np.flatnonzero(norms <= mu)
    if inside.size == 0:
        return np.zeros(coefs.shape[0])
    k = int(inside[-1])
    if k + 1 >= coefs.shape[1] or norms[k] == mu:
        w = coefs[:, k]
    else:
        t = (mu - norms[k]) / (norms[k + 1] - norms[k])
        w = coefs[:, k] + t * (coefs[:, k + 1] - coefs[:, k])
    return np.where(w > 0, w, 0.0)


def fit_mu_lasso(X: np.ndarray, target: np.ndarray, mu: float) -> np.ndarray:
    """``argmin_w ‖X w − l‖²  s.t. ‖w‖₁ ≤ μ, w ≥ 0`` -> ``w (D,)`` float64 (on the path's grid of radii)."""
    if mu <= 0:
        raise OramasError(f"μ must be positive, got {mu}")
    return select_radius(lasso_path_positive(X, target), mu)


def class_paths(
    X: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    n_alphas: int = 100,
    threads: int = 0,
    report: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """:func:`lasso_path_positive` of each class's one-hot ``pred == c`` -> ``K`` paths ``(D, A + 1)``.

    A class the network never predicts on these images has a zero target, whose path is all zeros (what the
    solver returns for it), so it is not solved: an ImageNet network predicts a few dozen of its 1,000 classes
    on a probe set. The others are solved in ``threads`` threads (0: every core; the coordinate descent runs
    without the GIL); each path is independent, so the result does not depend on the thread count.
    ``report(done, total)`` counts the classes solved.
    """
    from concurrent.futures import ThreadPoolExecutor

    pred = np.asarray(pred)
    zero = np.zeros((np.asarray(X).shape[1], n_alphas + 1))
    todo = [c for c in range(n_classes) if (pred == c).any()]
    paths = [zero] * n_classes
    with ThreadPoolExecutor(max_workers=min(cpu_threads(threads), max(len(todo), 1))) as pool:
        futures = {
            c: pool.submit(lasso_path_positive, X, (pred == c).astype(np.float64), n_alphas) for c in todo
        }
        for done, (c, f) in enumerate(futures.items(), 1):
            paths[c] = f.result()
            if report is not None:
                report(done, len(todo))
    return paths


def fit_relevant(
    X: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    mu: float,
    paths: list[np.ndarray] | None = None,
    report: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """One μ-lasso per class on the one-hot of ``pred`` -> ``W (K, D)``; ``W[c] > 0`` are c's relevant features."""
    paths = paths or class_paths(X, pred, n_classes, report=report)
    return np.stack([select_radius(p, mu) for p in paths])


def choose_mu(
    X_fit: np.ndarray,
    pred_fit: np.ndarray,
    X_held: np.ndarray,
    pred_held: np.ndarray,
    n_classes: int,
    grid: Sequence[float] = MU_GRID,
    tolerance: float = 0.01,
    report: Callable[[int, int], None] | None = None,
) -> tuple[float, list[dict]]:
    """The smallest μ whose held-out agreement (``argmax_c X w_c`` = the network's prediction) is within
    ``tolerance`` of the best; returns ``(μ, [{mu, agreement, features}, ...])``."""
    paths = class_paths(X_fit, pred_fit, n_classes, report=report)
    curve = []
    for mu in grid:
        W = fit_relevant(X_fit, pred_fit, n_classes, mu, paths)
        agree = float(((X_held @ W.T).argmax(1) == pred_held).mean())
        curve.append({"mu": float(mu), "agreement": agree, "features": int((W > 0).sum())})
    best = max(c["agreement"] for c in curve)
    mu = next(c["mu"] for c in curve if c["agreement"] >= best - tolerance)
    return mu, curve


@dataclass
class RelevantFeatures:
    """The fitted method: layer ranges, class weights ``W (K, D)`` and what each relevant feature is."""

    layers: list[str]
    sizes: list[int]
    weights: np.ndarray  # (K, D)
    mu: float
    classes: list[str]
    labels: dict[int, str]  # feature -> part label (relevant features only)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> RelevantFeatures:
        """The fitted method from a bundle; :class:`OramasError` when the ``oramas`` stage is not built."""
        if not bundle.has("oramas/weights"):
            raise OramasError(
                "this bundle has no Oramas et al. features; build them with `lavise build --stages oramas`"
            )
        info = bundle.read_json("oramas/info")
        return cls(
            info["layers"], info["sizes"], np.asarray(bundle.array("oramas/weights")), info["mu"], info["classes"],
            {int(k): v for k, v in info["labels"].items()},
        )  # fmt: skip

    def locate(self, j: int) -> tuple[str, int]:
        """Feature index -> ``(layer, filter)``."""
        off = 0
        for layer, n in zip(self.layers, self.sizes, strict=True):
            if j < off + n:
                return layer, j - off
            off += n
        raise IndexError(f"feature {j} is out of range (D = {off})")

    def relevant(self, c: int) -> np.ndarray:
        """Class ``c``'s relevant features, largest weight first; :class:`OramasError` when it has none."""
        w = self.weights[c]
        idx = np.flatnonzero(w > 0)
        if idx.size == 0:
            raise OramasError(
                f"class {self.classes[c]!r} has no relevant feature at μ = {self.mu:g}: the μ-lasso kept no "
                "weight (the network rarely predicts it); rebuild the stage with a larger μ "
                "(`lavise build --force oramas`, options {'oramas': {'mu': ...}})."
            )
        return idx[np.argsort(-w[idx], kind="stable")]

    def counts_by_layer(self) -> np.ndarray:
        """``(K, L)`` number of relevant features of each class in each layer."""
        bounds = np.cumsum([0, *self.sizes])
        return np.stack(
            [
                np.add.reduceat((self.weights[c] > 0).astype(np.int64), bounds[:-1])
                for c in range(len(self.weights))
            ]
        )


def top_features(x: np.ndarray, w: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n`` features of one image by intensity ``x ⊙ w / Σ w`` (positive entries only), largest first."""
    w = np.asarray(w, np.float64)
    s = w.sum()
    if s <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    r = np.asarray(x, np.float64) * w / s
    idx = np.flatnonzero(r > 0)
    idx = idx[np.argsort(-r[idx], kind="stable")][:n]
    return idx, r[idx]


# =========================================================================== back-projection
class _GuidedReLU(torch.autograd.Function):
    """Identity on a ReLU's output; backward keeps positive gradients where the unit was active."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, upper: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(y)
        ctx.upper = upper
        return y.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        active = (y > 0) & (y < ctx.upper)
        return g.clamp_min(0) * active, None


class _StridedConv(torch.autograd.Function):
    """A strided conv whose backward treats it as stride 1 on a nearest-upsampled signal (Oramas et al.'s fix)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape[-2:], padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        (h, w), pad, dil, groups = ctx.conf
        kh, kw = weight.shape[-2:]
        size = (h + 2 * pad[0] - dil[0] * (kh - 1), w + 2 * pad[1] - dil[1] * (kw - 1))  # stride-1 output
        g1 = F.interpolate(g, size=size, mode="nearest")
        gx = F.conv_transpose2d(g1, weight, None, 1, pad, 0, groups, dil)
        return gx, None, None, None, None, None, None


def _strided_hook(m: nn.Conv2d, inputs: tuple, _out: torch.Tensor) -> torch.Tensor:
    return _StridedConv.apply(inputs[0], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


@contextlib.contextmanager
def guided_backprop_hooks(model: nn.Module, strided_fix: bool = True) -> Iterator[None]:
    """Within the block, a backward pass follows the guided-backprop ReLU rule (ReLU, ReLU6) and, with
    ``strided_fix``, every strided zero-padded conv is undone as a stride-1 conv on a nearest-upsampled signal."""
    handles = []
    try:
        for m in model.modules():
            if isinstance(m, nn.ReLU | nn.ReLU6):
                upper = 6.0 if isinstance(m, nn.ReLU6) else float("inf")
                handles.append(m.register_forward_hook(lambda _m, _i, y, u=upper: _GuidedReLU.apply(y, u)))
            elif (
                strided_fix
                and isinstance(m, nn.Conv2d)
                and max(m.stride) > 1
                and not isinstance(m.padding, str)
                and m.padding_mode == "zeros"
            ):
                handles.append(m.register_forward_hook(_strided_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _normalise(h: torch.Tensor) -> np.ndarray:
    h = h.detach().float().cpu().numpy()
    lo, hi = float(h.min()), float(h.max())
    return ((h - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(h, np.float32)


def _seeded_grads(
    x: torch.Tensor, maps: dict[str, torch.Tensor], features: Sequence[tuple[str, int]]
) -> list:
    out = []
    for i, (layer, k) in enumerate(features):
        a = maps[layer][:, k]
        (g,) = torch.autograd.grad(a, x, grad_outputs=a.detach(), retain_graph=i < len(features) - 1)
        out.append(_normalise(g[0].abs().sum(0)))
    return out


def backproject(
    lm: LoadedModel, x: torch.Tensor, features: Sequence[tuple[str, int]], strided_fix: bool = True
) -> list[np.ndarray]:
    """Each ``(layer, filter)``'s map alone back-projected to the input ``x (1, 3, H, W)``.

    One forward pass; per feature a backward pass seeded with the map ``A_k`` itself; the input gradient's
    absolute value summed over colour channels, min–max normalised -> ``[(H, W) float32 in [0, 1]]``.
    """
    layers = list(dict.fromkeys(layer for layer, _ in features))
    device = next(lm.model.parameters()).device
    x = x.to(device).detach().clone().requires_grad_(True)
    with lm.lock, torch.enable_grad(), guided_backprop_hooks(lm.model, strided_fix):
        with _recording(lm.model, layers) as recs:
            lm.model(x)
        return _seeded_grads(x, {n: r.output for n, r in zip(layers, recs, strict=True)}, features)


def explain_oramas(
    lm: LoadedModel, rf: RelevantFeatures, x: torch.Tensor, target: int | None = None, n: int = 3
) -> tuple[np.ndarray, list[tuple[int, float]], int]:
    """Heatmap ``(H, W)`` in [0, 1] for ``x (1, 3, H, W)``: the top ``n`` relevant features of the predicted
    (or ``target``) class back-projected and combined by pixel-wise max; returns ``(heatmap, [(feature,
    intensity)], class)``. One forward pass gives the energies and the graph the back-projections use."""
    device = next(lm.model.parameters()).device
    x = x.to(device).detach().clone().requires_grad_(True)
    with lm.lock, torch.enable_grad(), guided_backprop_hooks(lm.model):
        with _recording(lm.model, rf.layers) as recs:
            logits = lm.model(x)
        feats = l2_rows(torch.cat([layer_energy(r.output.detach()) for r in recs], 1).cpu().numpy())
        c = int(logits[0].argmax()) if target is None else int(target)
        rf.relevant(c)  # raises when the class has none
        idx, r = top_features(feats[0], rf.weights[c], n)
        if idx.size == 0:
            return np.zeros(x.shape[-2:], np.float32), [], c
        maps = _seeded_grads(
            x,
            {n: rec.output for n, rec in zip(rf.layers, recs, strict=True)},
            [rf.locate(int(j)) for j in idx],
        )
    return np.max(np.stack(maps), 0), [(int(j), float(v)) for j, v in zip(idx, r, strict=True)], c


# =========================================================================== interpretation
def _part_iou(heat: np.ndarray, mask: np.ndarray, n_regions: int, top: float = 0.2) -> np.ndarray:
    """IoU of the top ``top`` share of ``heat``'s pixels with each region ``1..n_regions`` of ``mask``."""
    on = heat >= np.quantile(heat, 1 - top)
    out = np.zeros(n_regions)
    for r in range(n_regions):
        m = mask == r + 1
        u = (on | m).sum()
        out[r] = (on & m).sum() / u if u else 0.0
    return out


def _interpret(
    ds: ProbeDataset,
    lm: LoadedModel,
    layers: list[str],
    sizes: list[int],
    X: np.ndarray,
    rows: np.ndarray,
    feats: np.ndarray,
    n_top: int = 9,
    patch: int = 48,
    min_iou: float = 0.05,
) -> tuple[np.ndarray, dict[int, str], dict[int, list[float]]]:
    """Average top-activating patch ``(F, P, P, 3)`` uint8 and part label of each feature in ``feats``.

    The top ``n_top`` images of ``rows`` by the feature's energy; each one's patch is centred on the map's
    maximum (side ``4 × stride``, at least 16 px); the label is the part whose mask best overlaps the
    feature's top 20 % pixels, averaged over those images (``"none"`` below ``min_iou``).
    """
    from PIL import Image

    from lavise_core.pipeline.probe import image_batches

    offsets = np.cumsum([0, *sizes])
    tops = {int(j): rows[np.argsort(-X[rows, j], kind="stable")[:n_top]] for j in feats}
    need = sorted({int(i) for t in tops.values() for i in t})
    S = lm.input_size
    acc = {int(j): np.zeros((patch, patch, 3)) for j in feats}
    ious = {int(j): np.zeros(len(ds.regions)) for j in feats}
    cnt = dict.fromkeys(acc, 0)
    for batch, x, images in image_batches(ds, lm, need, 32):
        with torch.no_grad(), lm.lock, _recording(lm.model, layers) as recs:
            lm.model(x.to(next(lm.model.parameters()).device))
        for b, i in enumerate(batch):
            img = np.asarray(images[b].convert("RGB").resize((S, S), Image.BILINEAR))
            mask = ds.load_mask(i)
            if mask is not None and mask.shape != (S, S):
                mask = np.asarray(Image.fromarray(mask).resize((S, S), Image.NEAREST))
            for j, t in tops.items():
                if i not in t:
                    continue
                li = int(np.searchsorted(offsets, j, side="right") - 1)
                a = recs[li].output[b, j - offsets[li]].float()
                h, w = a.shape
                stride = S / h
                side = int(min(S, max(16, 4 * stride)))
                u, v = divmod(int(a.argmax()), w)
                cy, cx = int((u + 0.5) * stride), int((v + 0.5) * stride)
                y0, x0 = min(max(0, cy - side // 2), S - side), min(max(0, cx - side // 2), S - side)
                crop = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side]).resize(
                    (patch, patch), Image.BILINEAR
                )
                acc[j] += np.asarray(crop, np.float64)
                cnt[j] += 1
                if mask is not None and ds.regions:
                    up = F.interpolate(a[None, None], size=(S, S), mode="bilinear", align_corners=False)[0, 0]
                    ious[j] += _part_iou(up.numpy(), mask, len(ds.regions))
    patches = (
        np.stack([(acc[int(j)] / max(cnt[int(j)], 1)).round().astype(np.uint8) for j in feats])
        if len(feats)
        else np.zeros((0, patch, patch, 3), np.uint8)
    )
    labels: dict[int, str] = {}
    scores: dict[int, list[float]] = {}
    for j in feats:
        s = ious[int(j)] / max(cnt[int(j)], 1)
        scores[int(j)] = [round(float(v), 4) for v in s]
        labels[int(j)] = ds.regions[int(s.argmax())] if ds.regions and s.max() >= min_iou else "none"
    return patches, labels, scores


# =========================================================================== stage
def _held_out(train: np.ndarray, every: int = 5) -> tuple[np.ndarray, np.ndarray]:
    held = np.zeros(len(train), bool)
    held[::every] = True
    return train[~held], train[held]


def build_oramas_stage(
    bundle: Bundle,
    ds: ProbeDataset,
    lm: LoadedModel,
    layers: Sequence[str] | None = None,
    mu: float | None = None,
    grid: Sequence[float] = MU_GRID,
    batch_size: int = 64,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Energies of every image (one pass), μ chosen on held-out train images, per-class μ-lasso on the
    train split, top patches and part labels of the relevant features. Returns the manifest info."""
    try:
        layers = energy_layers(lm, layers)
    except ModelLoadError as e:
        raise OramasError(str(e)) from e
    say = report or (lambda d, t, m: None)
    X, pred, valid, sizes = collect_energies(
        ds,
        lm,
        layers,
        batch_size=batch_size,
        report=lambda d, t: say(d, t, f"Oramas energies: {d} / {t} images"),
        stored=bundle,
    )
    K = lm.num_classes
    train = ds.indices("train")
    train = train[valid[train]] if train.size else np.flatnonzero(valid)
    fit, held = _held_out(train)
    curve: list[dict] = []
    if mu is None:
        mu, curve = choose_mu(
            X[fit], pred[fit], X[held], pred[held], K, grid,
            report=lambda d, t: say(d, t, f"Oramas: choosing μ, class {d} of the {t} predicted"),
        )  # fmt: skip
    W = fit_relevant(
        X[train], pred[train], K, float(mu),
        report=lambda d, t: say(d, t, f"Oramas: μ-lasso, class {d} of the {t} predicted"),
    )  # fmt: skip
    rel = np.flatnonzero((W > 0).any(0))
    say(0, 1, f"Oramas: interpreting {rel.size} relevant features")
    patches, labels, part_iou = _interpret(ds, lm, layers, sizes, X, train, rel)
    bundle.write_array("oramas/energy", X)
    bundle.write_array("oramas/weights", W.astype(np.float32))
    bundle.write_array("oramas/patches", patches)
    info = {
        "layers": layers,
        "sizes": sizes,
        "mu": float(mu),
        "mu_curve": curve,
        "classes": list(lm.class_names),
        "relevant": [int(j) for j in rel],
        "labels": {str(j): labels[int(j)] for j in rel},
        "part_iou": {str(j): part_iou[int(j)] for j in rel},
        "regions": list(ds.regions),
        "n_train": int(train.size),
    }
    bundle.write_json("oramas/info", info)
    return {"mu": float(mu), "features": int(rel.size), "dim": int(X.shape[1])}


def probe_stats(ctx: StageContext) -> list[str]:
    """The layers whose statistics the ``oramas`` stage reads from the probe pass (its energy layers; none when
    they are wrong: the stage itself then says why)."""
    try:
        return energy_layers(ctx.model, ctx.options_for("oramas").get("layers"))
    except (OramasError, ModelLoadError):
        return []


def build_stage(ctx: StageContext) -> dict:
    """The ``oramas`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_oramas_stage` with the build's settings and
    ``options['oramas']``."""
    return build_oramas_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("oramas")
    )
