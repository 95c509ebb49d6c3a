"""LaViSE: latent visual-semantic filter attention (Yang, Kim & Joo, CVPR 2022; METHODS.md §2).

Pieces, in the order the stage runs them:

1. **Region features** (one streaming pass over the train split): for each annotated region r of an
   image, the region's indicator in the label map is cropped like the network input
   (:meth:`LoadedModel.crop_box`) and area-averaged to the map size ``h × w`` -> weights ``m (h, w)``;
   the region feature is the masked mean ``v_r = Σ_hw F · m / Σ_hw m``  ``(C,)``.
2. **Explainer head** ``g``: BN → Dropout → Linear(C, C) → ReLU → BN → Dropout → Linear(C, d), trained with
   the cosine margin-ranking loss :func:`cosine_margin_ranking_loss` on the *seen* concepts only.
3. **Filter attention**: for filter k and one of its top images, ``v = Σ_hw F · A_k / ||A_k||_1``
   (``A_k`` clipped at 0; the L1 norm makes the attention a convex weighting of positions, exactly the
   scale of the masked mean the head was trained on — with the L2 norm the scale of ``v`` would follow
   the peakiness of the map and leave the head's batch-norm statistics), ``z = g(v) / ||g(v)||``, top-s
   phrases of the index; votes over the top-p images weighted by ``phi_k(x) / Σ phi_k``.
4. **Queries**: free text -> embedding -> filters by cosine with their mean head embedding, images
   where those filters fire, grounding heatmaps ``Σ_k w_k A_k(x)``.
5. **Dataset insight**: concepts per class from class-weighted filter labels, on/off-object flags from
   the filters' activation mass inside the object mask, and a background-bias test.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .concepts import ConceptIndex
from .dataset import ProbeDataset, atomic_write_bytes

__all__ = [
    "ExplainerHead",
    "FilterLabels",
    "LaviseError",
    "LaviseExplainer",
    "LaviseSettings",
    "QueryResult",
    "RegionFeatures",
    "attention_pool",
    "background_association",
    "build_lavise_stage",
    "compute_filter_labels",
    "concept_split",
    "cosine_margin_ranking_loss",
    "dataset_insight",
    "extract_region_features",
    "filter_attention_features",
    "grounding_heatmap",
    "insight_for_bundle",
    "labels_from_features",
    "load_head",
    "mask_weights",
    "no_attention_labels",
    "paint_out_object",
    "query_concept",
    "save_head",
    "train_head",
    "training_targets",
    "vote_labels",
]


class LaviseError(ValueError):
    """LaViSE inputs are missing or inconsistent; the message says what to run or fix."""


@dataclass(frozen=True)
class LaviseSettings:
    """Settings of the LaViSE stage (stored in ``lavise/head.json`` and the stage info)."""

    seen_fraction: float = 0.5  # share of the data set's concepts used for supervision
    split_seed: int = 0
    dropout: float = 0.1
    # Margin and normalisation were compared on seen concepts only (4-fold split of the seen concepts,
    # held-out folds as pseudo-unseen): margin 1.2 won one single split but lost 3 of 4 folds to 0.2;
    # "standardise" was neutral and "l2" worse. Unseen concepts took no part in the choice.
    normalise: str = "standardise"  # feature normalisation inside the head: "none", "standardise", "l2"
    margin: float = 0.2  # m of the cosine margin-ranking loss
    n_negatives: int = 512  # negatives per batch (all seen concepts when fewer)
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.1  # share of training images held out for early stopping (seen concepts only)
    patience: int = 5  # epochs without held-out improvement before stopping
    max_seconds: float = 170.0  # head training stops after this wall time (target <= 3 min)
    seed: int = 0
    min_region_cells: float = 0.25  # regions covering less than this many map cells are skipped
    top_p: int = 10  # top images per filter used for attention
    top_s: int = 20  # phrases retrieved per image
    labels_per_filter: int = 20  # stored labels per filter
    image_batch: int = 32
    threads: int = (
        0  # torch threads for head training and filter attention; 0 = every core this process may use
    )


def cpu_threads(n: int) -> int:
    """``n`` torch threads, or with ``n = 0`` every core this process may use (its CPU affinity)."""
    if n > 0:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with :func:`cpu_threads` ``(n)`` torch threads, restoring the previous count after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# ============================================================================ masks and pooling
def mask_weights(
    indicator: np.ndarray,
    map_size: tuple[int, int],
    crop_box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Area-average a ``(H, W)`` 0/1 indicator (cropped to ``crop_box``) to ``map_size`` -> ``(h, w)`` in [0, 1]."""
    ind = np.asarray(indicator, dtype=np.float32)
    if crop_box is not None:
        x0, y0, x1, y1 = (round(v) for v in crop_box)
        H, W = ind.shape
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        ind = ind[y0:y1, x0:x1]
    t = torch.from_numpy(np.ascontiguousarray(ind))[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, map_size)[0, 0].numpy()


def attention_pool(maps: torch.Tensor, filters: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Filter attention pooling ``v_k = Σ_hw F · A_k / ||A_k||_1`` for one image.

    Args:
        maps: ``(C, h, w)`` feature map F of one image.
        filters: ``(K,)`` filter indices k.
    Returns:
        ``(K, C)``: one attention-pooled feature per filter. ``A_k`` is clipped at 0; an all-zero map
        falls back to the plain spatial mean.
    """
    idx = torch.as_tensor(filters, dtype=torch.long)
    a = maps[idx].clamp_min(0).flatten(1)  # (K, hw)
    s = a.sum(1, keepdim=True)
    uniform = torch.full_like(a, 1.0 / a.shape[1])
    w = torch.where(s > 0, a / s.clamp_min(1e-12), uniform)
    return w @ maps.flatten(1).T  # (K, C)


# ============================================================================ region features
@dataclass
class RegionFeatures:
    """Masked mean-pooled features of annotated regions.

    Attributes:
        features: ``(R, C)`` float32.
        image: ``(R,)`` int64 record index.
        region: region name per row.
        concepts: concept phrases per row.
        background: ``(M, C)`` float32 features of each image with its object painted out
            (:func:`paint_out_object`), mean-pooled over the whole map (for the dataset-bias test).
        background_image: ``(M,)`` int64 record index of each background row.
    """

    features: np.ndarray
    image: np.ndarray
    region: list[str]
    concepts: list[list[str]]
    background: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    background_image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def save(self, bundle) -> None:
        bundle.write_array("lavise/region_features", self.features.astype(np.float32))
        bundle.write_array("lavise/region_image", self.image.astype(np.int64))
        bundle.write_array("lavise/background_features", self.background.astype(np.float32))
        bundle.write_array("lavise/background_image", self.background_image.astype(np.int64))
        bundle.write_json("lavise/regions", {"region": self.region, "concepts": self.concepts})

    @classmethod
    def load(cls, bundle) -> RegionFeatures:
        meta = bundle.read_json("lavise/regions")
        return cls(
            np.asarray(bundle.array("lavise/region_features", mmap=False)),
            np.asarray(bundle.array("lavise/region_image", mmap=False)),
            meta["region"],
            meta["concepts"],
            np.asarray(bundle.array("lavise/background_features", mmap=False)),
            np.asarray(bundle.array("lavise/background_image", mmap=False)),
        )


def _image_batches(
    ds: ProbeDataset, lm, indices: Sequence[int], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, list]]:
    """Yield ``(record indices, x (B, 3, H, W), PIL images)``; unreadable images are skipped."""
    from .images import ImageLoadError

    batch: list[int] = []
    xs: list[torch.Tensor] = []
    images: list = []
    for i in indices:
        try:
            img = ds.load_image(int(i))
        except ImageLoadError:
            continue
        batch.append(int(i))
        images.append(img)
        xs.append(lm.preprocess(img))
        if len(batch) == batch_size:
            yield batch, torch.stack(xs), images
            batch, xs, images = [], [], []
    if batch:
        yield batch, torch.stack(xs), images


def paint_out_object(img, label_map: np.ndarray, dilate: float = 0.04, min_background: float = 0.1):
    """The image with its object removed, for background features: ``label_map > 0`` dilated by ``dilate`` ×
    the shorter side (anti-aliased edges, shadows) and filled with the median colour of the rest.

    Deep cells see far beyond their own position, so features pooled *outside* the mask of the intact
    image still describe the bird (on SynthBirds they tell the species apart at 95 % purity); painted
    out, they do not (species accuracy of a linear probe on them: 8 %, chance 8.3 %).

    Returns a ``PIL.Image`` of the same size, or None when less than ``min_background`` of it is left.
    """
    from PIL import Image
    from scipy import ndimage

    rgb = np.array(img.convert("RGB"))
    obj = np.asarray(label_map) > 0
    if obj.shape != rgb.shape[:2]:
        obj = np.asarray(Image.fromarray(obj.astype(np.uint8) * 255).resize(img.size, Image.NEAREST)) > 0
    r = max(1, round(dilate * min(obj.shape)))
    if r > 0 and obj.any():
        obj = ndimage.binary_dilation(obj, structure=np.ones((3, 3), bool), iterations=r)
    if (~obj).mean() < min_background:
        return None
    rgb[obj] = np.median(rgb[~obj], axis=0).astype(np.uint8)
    return Image.fromarray(rgb)


def _region_value(ds: ProbeDataset, name: str) -> int | None:
    try:
        return ds.regions.index(name) + 1
    except ValueError:
        return None


def extract_region_features(
    lm,
    dataset: ProbeDataset,
    layer: str | None = None,
    split: str | None = "train",
    batch_size: int = 32,
    min_region_cells: float = 0.25,
    max_images: int | None = None,
    progress: bool = False,
) -> RegionFeatures:
    """One streaming pass: masked mean-pooled ``(R, C)`` features of every annotated region (METHODS §2)."""
    from .networks import forward_maps

    idx = [
        int(i)
        for i in dataset.indices(split)
        if dataset.records[i].mask is not None and dataset.records[i].region_concepts
    ]
    if max_images is not None:
        idx = idx[:max_images]
    if not idx:
        raise LaviseError(
            f"the data set {dataset.name!r} has no {split or 'any'} images with region masks and region "
            "concepts: LaViSE needs annotated regions (SynthBirds, CUB parts, COCO instances) to train its head"
        )
    feats: list[np.ndarray] = []
    rows_img: list[int] = []
    rows_reg: list[str] = []
    rows_con: list[list[str]] = []
    bg_feats: list[np.ndarray] = []
    bg_img: list[int] = []
    bar = tqdm(total=len(idx), desc="region features", disable=not progress)
    for batch, x, images in _image_batches(dataset, lm, idx, batch_size):
        maps, _ = forward_maps(lm, x, layer)
        maps = maps.float().cpu()
        hw = tuple(maps.shape[-2:])
        painted: list[torch.Tensor] = []
        for b, i in enumerate(batch):
            label_map = dataset.load_mask(i)
            if label_map is None:
                continue
            view = paint_out_object(images[b], label_map)
            if view is not None:
                painted.append(lm.preprocess(view))
                bg_img.append(i)
            box = lm.crop_box(label_map.shape[1], label_map.shape[0])
            for name, phrases in dataset.records[i].region_concepts.items():
                val = _region_value(dataset, name)
                if val is None or not phrases:
                    continue
                m = mask_weights(label_map == val, hw, box)
                area = float(m.sum())
                if area < min_region_cells:
                    continue
                f = (maps[b] * torch.from_numpy(m)).sum((1, 2)) / area
                feats.append(f.numpy())
                rows_img.append(i)
                rows_reg.append(name)
                rows_con.append([p.strip().lower() for p in phrases])
        if painted:
            bg_maps, _ = forward_maps(lm, torch.stack(painted), layer)
            bg_feats.append(bg_maps.float().mean((2, 3)).cpu().numpy())
        bar.update(len(batch))
    bar.close()
    if not feats:
        raise LaviseError("no region was large enough at the layer's resolution; try an earlier layer")
    c = feats[0].shape[0]
    return RegionFeatures(
        np.stack(feats).astype(np.float32),
        np.array(rows_img, np.int64),
        rows_reg,
        rows_con,
        np.concatenate(bg_feats).astype(np.float32) if bg_feats else np.zeros((0, c), np.float32),
        np.array(bg_img, np.int64),
    )


# ============================================================================ split and targets
def concept_split(concepts: Sequence[str], seen_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split of ``concepts`` into (seen, unseen), both sorted; independent of input order."""
    if not 0.0 < seen_fraction <= 1.0:
        raise LaviseError(f"seen_fraction must be in (0, 1], got {seen_fraction}")
    uniq = sorted(set(concepts))
    perm = np.random.default_rng(seed).permutation(len(uniq))
    n_seen = max(1, round(seen_fraction * len(uniq))) if uniq else 0
    seen = sorted(uniq[j] for j in perm[:n_seen])
    unseen = sorted(uniq[j] for j in perm[n_seen:])
    return seen, unseen


def training_targets(
    region_concepts: Sequence[Sequence[str]], seen: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Multi-hot targets over the seen concepts only.

    Returns ``(rows (R',) int64 regions with >= 1 seen concept, targets (R', T) bool, concepts (T,))``;
    the concept list is the sorted seen concepts that occur — unseen phrases appear nowhere.
    """
    seen_set = set(seen)
    used = sorted({p for cs in region_concepts for p in cs if p in seen_set})
    col = {p: j for j, p in enumerate(used)}
    rows, targets = [], []
    for r, cs in enumerate(region_concepts):
        js = [col[p] for p in cs if p in col]
        if js:
            t = np.zeros(len(used), bool)
            t[js] = True
            rows.append(r)
            targets.append(t)
    if not rows:
        raise LaviseError("no region carries a seen concept: raise seen_fraction or check region_concepts")
    return np.array(rows, np.int64), np.stack(targets), used


# ============================================================================ head and loss
class ExplainerHead(nn.Module):
    """g: [feature normalisation] → BN → Dropout → Linear(C, C) → ReLU → BN → Dropout → Linear(C, d) (METHODS.md §2).

    ``normalise`` (applied to every input, region features and attention-pooled features alike):
    ``"none"``; ``"standardise"``: ``(v - μ) / σ`` per channel; ``"l2"``: standardise, then scale each
    row to unit RMS, ``u / (||u||₂ / √C)``, so that only the direction of the feature matters (the
    attention-pooled features of a peaky filter have a larger norm than the region means the head is
    trained on). ``μ, σ (C,)`` are buffers computed on the training regions (:meth:`fit_normaliser`)
    and saved with the head.
    """

    NORMALISE = ("none", "standardise", "l2")

    def __init__(self, channels: int, dim: int, dropout: float = 0.1, normalise: str = "none"):
        super().__init__()
        if normalise not in self.NORMALISE:
            raise LaviseError(f"normalise must be one of {self.NORMALISE}, got {normalise!r}")
        self.channels, self.dim, self.dropout, self.normalise = channels, dim, dropout, normalise
        self.register_buffer("feat_mean", torch.zeros(channels))
        self.register_buffer("feat_std", torch.ones(channels))
        self.net = nn.Sequential(
            nn.BatchNorm1d(channels),
            nn.Dropout(dropout),
            nn.Linear(channels, channels),
            nn.ReLU(),
            nn.BatchNorm1d(channels),
            nn.Dropout(dropout),
            nn.Linear(channels, dim),
        )

    def fit_normaliser(self, features: torch.Tensor) -> None:
        """Set ``μ, σ`` from the training features ``(R, C)`` (σ floored at 1e-3 of its median)."""
        f = torch.as_tensor(features, dtype=torch.float32)
        sd = f.std(0)
        floor = max(float(sd.median()) * 1e-3, 1e-8)
        self.feat_mean.copy_(f.mean(0))
        self.feat_std.copy_(sd.clamp_min(floor))

    def normalised(self, v: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` -> ``(B, C)`` after the head's feature normalisation."""
        if self.normalise == "none":
            return v
        u = (v - self.feat_mean) / self.feat_std
        if self.normalise == "l2":
            u = u * (self.channels**0.5) / u.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return u

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` pooled features -> ``(B, d)`` (not normalised)."""
        return self.net(self.normalised(v))

    @torch.no_grad()
    def embed(self, v: np.ndarray | torch.Tensor, batch: int = 4096) -> np.ndarray:
        """Eval-mode ``g(v) / ||g(v)||``: ``(B, C)`` -> ``(B, d)`` float32 unit rows."""
        was = self.training
        self.eval()
        try:
            t = torch.as_tensor(np.asarray(v, np.float32))
            out = [nn.functional.normalize(self(t[i : i + batch]), dim=1) for i in range(0, len(t), batch)]
            return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)
        finally:
            self.train(was)


def cosine_margin_ranking_loss(
    pred: torch.Tensor,
    concept_emb: torch.Tensor,
    targets: torch.Tensor,
    margin: float,
    negative_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine margin-ranking loss of LaViSE.

    ``s_ij = cos(g(v_i), e_j)``; for every positive p of sample i and every negative n (a concept of the
    candidate columns that is not a positive of i): ``max(0, m - s_ip + s_in)``; averaged over the
    negatives of each (i, p) pair, then over all pairs.

    Args:
        pred: ``(B, d)`` head outputs.
        concept_emb: ``(T, d)`` embeddings of the training (seen) concepts.
        targets: ``(B, T)`` bool multi-hot positives.
        margin: m.
        negative_columns: ``(T,)`` bool, the concepts eligible as negatives (default all).
    """
    s = nn.functional.normalize(pred, dim=1) @ nn.functional.normalize(concept_emb, dim=1).T  # (B, T)
    bi, pj = targets.nonzero(as_tuple=True)
    if bi.numel() == 0:
        return pred.sum() * 0.0
    sp = s[bi, pj]  # (P,)
    neg = ~targets[bi]  # (P, T)
    if negative_columns is not None:
        neg = neg & negative_columns[None, :]
    hinge = (margin - sp[:, None] + s[bi]).clamp_min(0) * neg
    per_pair = hinge.sum(1) / neg.sum(1).clamp_min(1)
    return per_pair.mean()


def _held_out_rows(n: int, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """``(n,)`` bool: rows held out for early stopping, whole groups (images) at a time, seeded."""
    out = np.zeros(n, bool)
    if fraction <= 0 or n < 20:
        return out
    g = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(g)
    if len(uniq) < 5:
        return out
    rng = np.random.default_rng(seed + 7919)
    held = rng.choice(uniq, size=max(1, round(fraction * len(uniq))), replace=False)
    return np.isin(g, held)


def train_head(
    features: np.ndarray,
    targets: np.ndarray,
    concept_emb: np.ndarray,
    settings: LaviseSettings = LaviseSettings(),
    progress: bool = False,
    groups: np.ndarray | None = None,
) -> tuple[ExplainerHead, dict]:
    """Train g on ``features (R, C)`` with multi-hot ``targets (R, T)`` over ``concept_emb (T, d)``.

    Negatives: all T seen concepts when ``T <= n_negatives``, else a fresh uniform sample of
    ``n_negatives`` concept columns per batch. Early stopping: ``val_fraction`` of the regions, whole
    images at a time (``groups (R,)``, the image of each region), are held out; after each epoch the
    loss on them (all T negatives, eval mode) is measured and the head of the best epoch is kept;
    training stops after ``patience`` epochs without improvement. Only the seen concepts given here
    are involved: unseen concepts play no part in training or in the choice of the epoch.
    The feature normaliser (``settings.normalise``) is fitted on the training rows.
    Returns the head (eval mode) and a log dict.
    """
    import copy

    torch.manual_seed(settings.seed)
    with torch_threads(settings.threads):
        x = torch.as_tensor(np.asarray(features, np.float32))
        y = torch.as_tensor(np.asarray(targets, bool))
        e = torch.as_tensor(np.asarray(concept_emb, np.float32))
        if x.shape[0] != y.shape[0] or y.shape[1] != e.shape[0]:
            raise LaviseError(
                f"features {tuple(x.shape)}, targets {tuple(y.shape)}, concepts {tuple(e.shape)} disagree"
            )
        if groups is not None and len(groups) != x.shape[0]:
            raise LaviseError(f"groups has {len(groups)} entries for {x.shape[0]} regions")
        held = torch.from_numpy(_held_out_rows(x.shape[0], groups, settings.val_fraction, settings.seed))
        x_val, y_val = x[held], y[held]
        x, y = x[~held], y[~held]
        head = ExplainerHead(x.shape[1], e.shape[1], settings.dropout, settings.normalise)
        head.fit_normaliser(x)
        # fused: one kernel per step instead of ~10 per parameter (51 -> 31 ms a step for C = 1280, one thread)
        opt = torch.optim.AdamW(
            head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, settings.epochs))
        gen = torch.Generator().manual_seed(settings.seed)
        t_start, losses, val_losses, epochs_run = time.perf_counter(), [], [], 0
        best, best_epoch, best_state = float("inf"), 0, None
        n, t = x.shape[0], e.shape[0]
        bs = min(settings.batch_size, n)
        for epoch in tqdm(range(settings.epochs), desc="explainer head", disable=not progress):
            head.train()
            perm = torch.randperm(n, generator=gen)
            tot, cnt = 0.0, 0
            for i in range(0, n - bs + 1 if n >= 2 * bs else n, bs):
                b = perm[i : i + bs]
                if len(b) < 2:
                    continue
                cols = None
                if t > settings.n_negatives:
                    cols = torch.zeros(t, dtype=torch.bool)
                    cols[torch.randperm(t, generator=gen)[: settings.n_negatives]] = True
                loss = cosine_margin_ranking_loss(head(x[b]), e, y[b], settings.margin, cols)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot, cnt = tot + loss.item() * len(b), cnt + len(b)
            sched.step()
            epochs_run += 1
            losses.append(tot / max(cnt, 1))
            if len(x_val):
                head.eval()
                with torch.no_grad():
                    vl = float(cosine_margin_ranking_loss(head(x_val), e, y_val, settings.margin))
                val_losses.append(vl)
                if vl < best - 1e-5:
                    best, best_epoch, best_state = vl, epoch + 1, copy.deepcopy(head.state_dict())
                elif epoch + 1 - best_epoch >= settings.patience:
                    break
            if time.perf_counter() - t_start > settings.max_seconds:
                break
        if best_state is not None:
            head.load_state_dict(best_state)
        head.eval()
        log = {
            "epochs": epochs_run,
            "best_epoch": best_epoch if best_state is not None else epochs_run,
            "loss": losses,
            "val_loss": val_losses,
            "seconds": round(time.perf_counter() - t_start, 2),
            "regions": int(n),
            "val_regions": len(x_val),
            "concepts": int(t),
        }
        return head, log


def save_head(head: ExplainerHead, directory: str | os.PathLike, info: dict) -> None:
    """``head.safetensors`` + ``head.json`` (channels, dim, dropout, settings, log) in ``directory``."""
    from safetensors.torch import save

    d = Path(directory)
    atomic_write_bytes(
        d / "head.safetensors", save({k: v.contiguous() for k, v in head.state_dict().items()})
    )
    meta = {
        "channels": head.channels,
        "dim": head.dim,
        "dropout": head.dropout,
        "normalise": head.normalise,
        **info,
    }
    atomic_write_bytes(d / "head.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())


def load_head(directory: str | os.PathLike) -> tuple[ExplainerHead, dict]:
    """Read a head written by :func:`save_head` (eval mode)."""
    from safetensors.torch import load

    d = Path(directory)
    if not (d / "head.safetensors").is_file() or not (d / "head.json").is_file():
        raise LaviseError(f"no explainer head in {d}: run the LaViSE stage (`lavise lavise BUNDLE`)")
    meta = json.loads((d / "head.json").read_text())
    head = ExplainerHead(
        meta["channels"], meta["dim"], meta.get("dropout", 0.1), meta.get("normalise", "none")
    )
    state = load((d / "head.safetensors").read_bytes())
    if "feat_mean" not in state:  # heads saved before the normaliser existed
        state |= {"feat_mean": head.feat_mean, "feat_std": head.feat_std}
    head.load_state_dict(state)
    head.eval()
    return head, meta


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


def _labels_from_embeddings(
    z: np.ndarray, weights: np.ndarray, index: ConceptIndex, top_s: int, n_labels: int
) -> FilterLabels:
    """``z (C, p, d)`` unit head outputs per filter and image -> votes and mean embeddings."""
    c, p, d = z.shape
    sc, ids = index.search(z.reshape(c * p, d), top_s)
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
    from .networks import forward_maps

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
        for batch, x, _ in _image_batches(dataset, lm, images, image_batch):
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
) -> FilterLabels:
    """Head + vote: ``v (K, p, C)`` attention features, ``top_value (K, p)`` activations -> :class:`FilterLabels`."""
    k, p, c = v.shape
    z = head.embed(v.reshape(k * p, c)).reshape(k, p, -1)
    weights = _activation_weights(np.asarray(top_value)[:, :p])
    return _labels_from_embeddings(z, weights, index, top_s, n_labels)


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
        v, np.asarray(top_value)[ks], head, index, settings.top_s, settings.labels_per_filter
    )
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
    return _labels_from_embeddings(z, weights, index, settings.top_s, settings.labels_per_filter)


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

    def filter_weights(self) -> np.ndarray:
        """``(F,)`` non-negative weights of the matched filters (for :func:`grounding_heatmap`)."""
        w = np.clip(self.filter_scores, 0, None)
        return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / max(len(w), 1), np.float32)


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
) -> QueryResult:
    """Free-text concept query (works for any text: it is embedded itself, not looked up).

    Filters are ranked by ``cos(emb(text), filter_embeddings (C, d))``; images by
    ``Σ_k w_k phi_k(x) / max phi_k`` over the matched filters using ``pooled (N, C)`` (else the
    filters' ``top_index (C, k)`` lists weighted by ``top_value``).
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
        s_img = np.asarray(pooled[:, order], np.float32) @ (w / scale)
        if valid is not None:
            s_img = np.where(np.asarray(valid, bool), s_img, -np.inf)
        img = np.argsort(-s_img, kind="stable")[:n_images]
        img_sc = s_img[img]
    else:
        acc: dict[int, float] = {}
        for r, k in enumerate(order):
            for i, v in zip(top_index[k], top_value[k], strict=True):
                acc[int(i)] = acc.get(int(i), 0.0) + w[r] * float(v) / scale[r]
        best = sorted(acc.items(), key=lambda kv: -kv[1])[:n_images]
        img = np.array([i for i, _ in best], np.int64)
        img_sc = np.array([s for _, s in best], np.float32)
    return QueryResult(
        text, status, suggestions, order.astype(np.int64), cos[order].astype(np.float32), lab,
        img.astype(np.int64), np.asarray(img_sc, np.float32), q[0],
    )  # fmt: skip


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


# ============================================================================ the explainer as a whole
class LaviseExplainer:
    """Everything LaViSE stored in a bundle, loaded once: index, head, labels, embeddings, split."""

    def __init__(self, bundle, index: ConceptIndex | None = None):
        self.bundle = bundle
        lav = Path(bundle.root) / "lavise"
        self.index = index or ConceptIndex.load(lav)
        self.head, self.head_info = load_head(lav)
        split = bundle.read_json("lavise/split")
        self.seen, self.unseen = list(split["seen"]), list(split["unseen"])
        self.label_ids = bundle.array("lavise/filter_label_ids")
        self.label_scores = bundle.array("lavise/filter_label_scores")
        # (C, d) unit rows, loaded once as contiguous float32: the query path multiplies by it directly
        self.filter_embeddings = np.ascontiguousarray(bundle.array("lavise/filter_embeddings"), np.float32)
        self.inside = bundle.array("lavise/filter_inside") if bundle.has("lavise/filter_inside") else None
        self.object_area = (
            bundle.array("lavise/filter_object_area") if bundle.has("lavise/filter_object_area") else None
        )
        self._query_arrays: dict | None = None

    def filter_labels(self, k: int, n: int = 10) -> list[tuple[str, float]]:
        """Filter ``k``'s top-``n`` zero-shot labels ``[(phrase, score)]``."""
        return [
            (self.index.phrases[int(j)], float(s))
            for j, s in zip(self.label_ids[k][:n], self.label_scores[k][:n], strict=True)
            if j >= 0
        ]

    def concept_status(self, phrase: str) -> str:
        p = phrase.strip().lower()
        if p in self.seen:
            return "seen"
        if p in self.unseen:
            return "unseen"
        return "vocabulary" if self.index.position(p) is not None else "not in vocabulary"

    def query(self, text: str, **kw) -> QueryResult:
        """:func:`query_concept` against this bundle."""
        if self._query_arrays is None:  # memory-mapped once, not per query
            b = self.bundle
            self._query_arrays = {
                "top_index": b.array("probe/top_index"),
                "top_value": b.array("probe/top_value"),
                "pooled": b.array("probe/pooled"),
                "valid": b.array("probe/valid") if b.has("probe/valid") else None,
                "seen": frozenset(self.seen),
                "unseen": frozenset(self.unseen),
            }
        a = self._query_arrays
        return query_concept(
            text, self.index, self.filter_embeddings, a["top_index"], a["top_value"], pooled=a["pooled"],
            label_ids=self.label_ids, label_scores=self.label_scores, seen=a["seen"], unseen=a["unseen"],
            valid=a["valid"], **kw,
        )  # fmt: skip

    def explain_feature(self, v: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """Nearest phrases of the head output of pooled features ``v (B, C)``."""
        sc, ids = self.index.search(self.head.embed(np.atleast_2d(v)), k)
        return [
            [(self.index.phrases[j], float(s)) for s, j in zip(sr, ir, strict=True)]
            for sr, ir in zip(sc, ids, strict=True)
        ]

    def settings(self) -> dict:
        return dict(self.head_info.get("settings", {}))


def settings_dict(s: LaviseSettings) -> dict:
    return asdict(s)


# ============================================================================ the stage
SUBSTAGES = ("lavise_index", "lavise_regions", "lavise_head", "lavise_filters")


def _region_concept_phrases(dataset: ProbeDataset) -> list[str]:
    return sorted(
        {p.strip().lower() for r in dataset.records for cs in r.region_concepts.values() for p in cs}
    )


#: Recipe version of the LaViSE sub-stages whose outputs changed; a bundle with an older one redoes them.
#: 2: background features from painted-out images; the objects' area share per filter.
RECIPES = {"lavise_regions": 2, "lavise_filters": 2}


def build_lavise_stage(
    bundle,
    dataset: ProbeDataset,
    lm=None,
    settings: LaviseSettings = LaviseSettings(),
    vocabulary=None,
    embedder=None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """Vocabulary + index, region features, head training, filter attention; finished parts are skipped.

    Writes under ``lavise/``: ``index.faiss``, ``phrases.json``, ``embeddings.npy``, ``index.json``,
    ``split.json``, ``region_features``, ``region_image``, ``regions.json``, ``background_features``,
    ``background_image``, ``head.safetensors``, ``head.json``, ``filter_label_ids (C, L)``,
    ``filter_label_scores (C, L)``, ``filter_embeddings (C, d)``, ``filter_inside (C,)``,
    ``filter_object_area (C,)``.
    ``vocabulary``: a :class:`~lavise_core.concepts.VocabularySettings` (default recipe), or a tuple
    ``(phrases, embeddings (T, d))`` used as the general vocabulary as is.
    """
    from .concepts import build_vocabulary, dataset_concepts, load_general_vocabulary, shared_embedder

    for stage, recipe in RECIPES.items():  # written by an older recipe: redo that part (and finish again)
        if bundle.stage_done(stage) and bundle.manifest["stages"][stage].get("recipe", 1) != recipe:
            bundle.clear_stage(stage)
            bundle.clear_stage("lavise")
    if bundle.stage_done("lavise"):
        return bundle.manifest["stages"]["lavise"]
    lav = Path(bundle.root) / "lavise"
    layer = bundle.layer
    timings: dict[str, float] = {}
    emb_model = embedder or shared_embedder()

    t = time.perf_counter()
    if not bundle.stage_done("lavise_index"):
        if isinstance(vocabulary, tuple):  # (phrases, embeddings) given directly (tests, benchmarks)
            general, gemb = list(vocabulary[0]), np.asarray(vocabulary[1], np.float32)
        else:
            general, gemb = load_general_vocabulary(vocabulary, emb_model, cache_dir, progress)
        phrases, emb, n_ds = build_vocabulary(dataset_concepts(dataset), general, gemb, emb_model)
        index = ConceptIndex(emb_model)
        index.meta["n_dataset"] = n_ds
        index.build(phrases, emb)
        index.save(lav)
        seen, unseen = concept_split(
            _region_concept_phrases(dataset), settings.seen_fraction, settings.split_seed
        )
        bundle.write_json(
            "lavise/split",
            {
                "seen": seen,
                "unseen": unseen,
                "seed": settings.split_seed,
                "seen_fraction": settings.seen_fraction,
            },
        )
        bundle.mark_stage(
            "lavise_index", {"phrases": len(phrases), "dataset_phrases": n_ds, "kind": index.kind}
        )
    index = ConceptIndex.load(lav, embedder=emb_model)
    split = bundle.read_json("lavise/split")
    timings["index"] = time.perf_counter() - t

    t = time.perf_counter()
    if lm is None and not (bundle.stage_done("lavise_regions") and bundle.stage_done("lavise_filters")):
        lm = bundle.load_model()
    if not bundle.stage_done("lavise_regions"):
        has_train = any(r.split == "train" and r.mask for r in dataset.records)
        rf = extract_region_features(
            lm, dataset, layer, "train" if has_train else None, settings.image_batch,
            settings.min_region_cells, progress=progress,
        )  # fmt: skip
        rf.save(bundle)
        bundle.mark_stage(
            "lavise_regions",
            {
                "regions": len(rf.region),
                "backgrounds": len(rf.background_image),
                "seconds": round(time.perf_counter() - t, 2),
                "recipe": RECIPES["lavise_regions"],
            },
        )
    timings["regions"] = time.perf_counter() - t

    t = time.perf_counter()
    if not bundle.stage_done("lavise_head"):
        rf = RegionFeatures.load(bundle)
        rows, y, used = training_targets(rf.concepts, split["seen"])
        pos = [index.position(p) for p in used]
        if any(p is None for p in pos):
            raise LaviseError(
                "a seen concept is missing from the index; rebuild the lavise stage with --force lavise"
            )
        e = np.asarray(index.embeddings[np.array(pos)], np.float32)
        head, log = train_head(rf.features[rows], y, e, settings, progress, groups=rf.image[rows])
        save_head(
            head, lav, {"settings": asdict(settings), "log": log, "trained_concepts": used, "layer": layer}
        )
        bundle.mark_stage(
            "lavise_head", {k: v for k, v in log.items() if k != "loss"} | {"final_loss": log["loss"][-1]}
        )
    head, _ = load_head(lav)
    timings["head"] = time.perf_counter() - t

    t = time.perf_counter()
    if not bundle.stage_done("lavise_filters"):
        labels, inside, area = compute_filter_labels(
            lm, dataset, bundle.array("probe/top_index"), bundle.array("probe/top_value"), head, index,
            settings, layer, progress=progress,
        )  # fmt: skip
        bundle.write_array("lavise/filter_label_ids", labels.ids)
        bundle.write_array("lavise/filter_label_scores", labels.scores)
        bundle.write_array("lavise/filter_embeddings", labels.embeddings)
        bundle.write_array("lavise/filter_inside", inside)
        bundle.write_array("lavise/filter_object_area", area)
        bundle.mark_stage(
            "lavise_filters",
            {"seconds": round(time.perf_counter() - t, 2), "recipe": RECIPES["lavise_filters"]},
        )
    timings["filters"] = time.perf_counter() - t
    info = {
        "seconds": round(sum(timings.values()), 2),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "phrases": len(index),
        "seen": len(split["seen"]),
        "unseen": len(split["unseen"]),
    }
    bundle.mark_stage("lavise", info)
    return bundle.manifest["stages"]["lavise"]


def insight_for_bundle(
    bundle, dataset: ProbeDataset, explainer: LaviseExplainer | None = None, **kw
) -> list[dict]:
    """:func:`dataset_insight` with the bundle's arrays (probe pooled / classifier, LaViSE labels, backgrounds).

    Classes are the data set's; the classifier weights are used only when the network's classes are the same.
    """
    ex = explainer or LaviseExplainer(bundle)
    labels = dataset.labels()
    valid = (
        np.asarray(bundle.array("probe/valid")) if bundle.has("probe/valid") else np.ones(len(labels), bool)
    )
    bg_img = (
        np.asarray(bundle.array("lavise/background_image")) if bundle.has("lavise/background_image") else None
    )
    bg = names = bg_labels = None
    if bg_img is not None and len(bg_img):
        bg = np.asarray(bundle.array("lavise/background_features"), np.float32)
        bg_labels = labels[bg_img]
        names = [dataset.records[i].meta.get("background") for i in bg_img]
    same = list(bundle.classes) == list(dataset.classes)
    return dataset_insight(
        dataset.classes, bundle.array("probe/classifier_weight") if same else None,
        np.where(valid[:, None], bundle.array("probe/pooled"), 0), np.where(valid, labels, -1),
        ex.label_ids, ex.label_scores, ex.index.phrases, ex.inside,
        bg, bg_labels, names, ex.object_area, bg_img, **kw,
    )  # fmt: skip
