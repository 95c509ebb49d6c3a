"""LaViSE explainer head (METHODS.md §2): region features, training targets, the head and its loss.

1. **Region features** (one streaming pass over the train split): for each annotated region r of an
   image, the region's indicator in the label map is cropped like the network input
   (:meth:`LoadedModel.crop_box`) and area-averaged to the map size ``h × w`` -> weights ``m (h, w)``;
   the region feature is the masked mean ``v_r = Σ_hw F · m / Σ_hw m``  ``(C,)``. Each row carries the
   region's full concept set (multi-label). With ``background_rows`` every image also gives one row for the
   pixels outside the object (label 0) with the concept ``"{kind} background"`` (``meta["background"]``).
2. **Explainer head** ``g``: BN → Dropout → Linear(C, C) → ReLU → BN → Dropout → Linear(C, d), trained on the
   *seen* concepts only with the multi-label softmax loss :func:`multilabel_softmax_loss` (default) or
   LaViSE's cosine margin-ranking loss :func:`cosine_margin_ranking_loss`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lavise_core.data.dataset import ProbeDataset, atomic_write_bytes, background_phrase
from lavise_core.data.images import mask_weights
from lavise_core.explain.lavise.settings import LaviseError, LaviseSettings
from lavise_core.models.threads import torch_threads
from lavise_core.pipeline.executor import ExecutorSettings, WorkerDataError, map_shards
from lavise_core.pipeline.probe import image_batches

__all__ = [
    "ExplainerHead",
    "RegionFeatures",
    "RegionShardTask",
    "attention_pool",
    "concept_split",
    "cosine_margin_ranking_loss",
    "extract_region_features",
    "load_head",
    "multilabel_softmax_loss",
    "paint_out_object",
    "save_head",
    "train_head",
    "training_targets",
]


# ============================================================================ masks and pooling
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


@dataclass
class _RegionPart:
    """The region rows of one shard (lists, in manifest order)."""

    features: list[np.ndarray]
    image: list[int]
    region: list[str]
    concepts: list[list[str]]
    background: list[np.ndarray]
    background_image: list[int]


class RegionShardTask:
    """Region features of a shard of images (:func:`~lavise_core.pipeline.executor.map_shards`)."""

    def __init__(
        self,
        lm,
        dataset: ProbeDataset,
        layer,
        batch_size,
        min_region_cells,
        background_rows,
        stored_maps=None,
    ) -> None:
        self.lm, self.dataset, self.layer = lm, dataset, layer
        self.batch_size, self.min_region_cells, self.background_rows = (
            batch_size,
            min_region_cells,
            background_rows,
        )
        # (N, C, h, w): the probe pass's maps of the intact images (a local pass only), or None
        self.stored_maps = stored_maps

    def setup(self, device: str | None) -> None:
        import socket

        if not Path(self.dataset.root).is_dir():
            raise WorkerDataError(
                f"the worker on {socket.gethostname()} cannot see the data set folder {self.dataset.root}: the "
                "images must be on a filesystem every Ray node mounts at the same path (see docs/ray.md)"
            )
        if device is not None:
            self.lm.model.to(device)

    def __call__(self, rows: np.ndarray, progress: bool = False) -> _RegionPart:
        from lavise_core.models.networks import forward_maps

        lm, dataset, layer = self.lm, self.dataset, self.layer
        out = _RegionPart([], [], [], [], [], [])
        bar = tqdm(total=len(rows), desc="region features", disable=not progress)
        stored = self.stored_maps
        ids = [int(i) for i in rows]
        for batch, x, images in image_batches(dataset, lm, ids, self.batch_size, preprocess=stored is None):
            if stored is not None:
                maps = torch.from_numpy(np.asarray(stored[batch], np.float32))
            else:
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
                    out.background_image.append(i)
                box = lm.crop_box(label_map.shape[1], label_map.shape[0])
                regions = [(name, _region_value(dataset, name), phrases)
                           for name, phrases in dataset.records[i].region_concepts.items()]  # fmt: skip
                bg = (
                    background_phrase(dataset.records[i].meta.get("background"))
                    if self.background_rows
                    else None
                )
                if bg is not None:
                    regions.append(("background", 0, [bg]))
                for name, val, phrases in regions:
                    if val is None or not phrases:
                        continue
                    m = mask_weights(label_map == val, hw, box)
                    area = float(m.sum())
                    if area < self.min_region_cells:
                        continue
                    f = (maps[b] * torch.from_numpy(m)).sum((1, 2)) / area
                    out.features.append(f.numpy())
                    out.image.append(i)
                    out.region.append(name)
                    out.concepts.append([p.strip().lower() for p in phrases])
            if painted:
                bg_maps, _ = forward_maps(lm, torch.stack(painted), layer)
                out.background.append(bg_maps.float().mean((2, 3)).cpu().numpy())
            bar.update(len(batch))
        bar.close()
        return out


def extract_region_features(
    lm,
    dataset: ProbeDataset,
    layer: str | None = None,
    split: str | None = "train",
    batch_size: int = 32,
    min_region_cells: float = 0.25,
    max_images: int | None = None,
    progress: bool = False,
    background_rows: bool = True,
    executor: ExecutorSettings | None = None,
    resume_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    stored_maps: np.ndarray | None = None,
) -> RegionFeatures:
    """One streaming pass: masked mean-pooled ``(R, C)`` features of every annotated region (METHODS §2).

    With ``background_rows``, each image with a background kind (``meta["background"]``) also gives one row
    for its pixels outside the object (label 0 of the intact image), region ``"background"``, concepts
    ``["{kind} background"]``. (The painted-out ``background`` features are separate: the bias test.)
    ``executor``: where the pass runs (a Ray executor maps shards of the images over its workers; same rows).
    ``resume_dir`` (sharded pass only): every shard that comes back is saved there (one ``.npz`` each, written
    atomically, in a sub-folder named by these settings); a pass that stops keeps them and the next one maps only
    the other images; removed when the pass completes. ``on_progress(images done, images)`` after each shard.
    ``stored_maps``: the probe pass's maps of every image at ``layer`` (:func:`~lavise_core.pipeline.probe.
    stored_maps`), read instead of the intact images' forward pass (the same numbers; a local pass only: the
    painted-out images still go through the network).
    """
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
    local = executor is None or executor.kind == "local"
    task = RegionShardTask(
        lm, dataset, layer, batch_size, min_region_cells, background_rows, stored_maps if local else None
    )
    if local:
        parts = [(np.asarray(idx), task(np.asarray(idx), progress))]
    else:  # shards on the workers (those an earlier pass saved are read back), put back in manifest order
        key = json.dumps([layer, split, batch_size, min_region_cells, max_images, background_rows])
        saved = resume_dir / f"shards-{hashlib.sha256(key.encode()).hexdigest()[:12]}" if resume_dir else None
        parts = _saved_parts(saved, set(idx)) if saved else []
        covered = {int(r) for rows, _ in parts for r in rows}
        todo = [i for i in idx if i not in covered]
        if on_progress is not None and covered:
            on_progress(len(covered), len(idx))
        shards = map_shards(task, todo, batch_size, executor) if todo else None
        try:
            for rows, part in shards or ():
                if saved is not None:
                    _save_part(saved, rows, part)
                parts.append((rows, part))
                covered.update(int(r) for r in rows)
                if on_progress is not None:
                    on_progress(len(covered), len(idx))
        finally:
            if shards is not None:
                shards.close()  # an interrupted pass stops the executor's iterator now (Ray: while it is up)
        parts.sort(key=lambda p: int(p[0][0]))
    if resume_dir is not None:  # done (a local pass also clears what an earlier sharded one left)
        shutil.rmtree(resume_dir, ignore_errors=True)
    for _, part in parts:
        feats += part.features
        rows_img += part.image
        rows_reg += part.region
        rows_con += part.concepts
        bg_feats += part.background
        bg_img += part.background_image
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


def _save_part(folder: Path, rows: np.ndarray, part: _RegionPart) -> None:
    """One shard's region rows as ``shard_<first image>.npz`` (no pickle), written atomically."""
    import io

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(
        buf,
        rows=np.asarray(rows, np.int64),
        features=np.stack(part.features) if part.features else np.zeros((0, 0), np.float32),
        image=np.asarray(part.image, np.int64),
        region=json.dumps(part.region),
        concepts=json.dumps(part.concepts),
        background=np.concatenate(part.background) if part.background else np.zeros((0, 0), np.float32),
        background_image=np.asarray(part.background_image, np.int64),
    )
    atomic_write_bytes(folder / f"shard_{int(rows[0]):09d}.npz", buf.getvalue())


def _saved_parts(folder: Path, images: set[int]) -> list[tuple[np.ndarray, _RegionPart]]:
    """The shards :func:`_save_part` left in ``folder`` whose images are all still to do (an unreadable file is
    skipped: its images are mapped again)."""
    parts = []
    for path in sorted(folder.glob("shard_*.npz")) if folder.is_dir() else ():
        try:
            with np.load(path, allow_pickle=False) as z:
                rows = z["rows"]
                part = _RegionPart(
                    features=list(z["features"]),
                    image=z["image"].tolist(),
                    region=json.loads(str(z["region"])),
                    concepts=json.loads(str(z["concepts"])),
                    background=[z["background"]] if len(z["background"]) else [],
                    background_image=z["background_image"].tolist(),
                )
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            continue
        if len(rows) and {int(r) for r in rows} <= images:
            parts.append((rows, part))
    return parts


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


def multilabel_softmax_loss(
    pred: torch.Tensor,
    concept_emb: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.1,
    negative_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-label softmax (InfoNCE) loss.

    ``s_ij = cos(g(v_i), e_j) / τ``; for every positive p of sample i, with N(i) its negatives (the candidate
    columns that are not positives of i): ``-log(exp(s_ip) / (exp(s_ip) + Σ_{n ∈ N(i)} exp(s_in)))``, averaged
    over all (i, p) pairs (the other positives are not competitors: a red, striped breast pulls toward both).

    Args:
        pred: ``(B, d)`` head outputs.
        concept_emb: ``(T, d)`` embeddings of the training (seen) concepts.
        targets: ``(B, T)`` bool multi-hot positives.
        temperature: τ.
        negative_columns: ``(T,)`` bool, the concepts eligible as negatives (default all).
    """
    s = nn.functional.normalize(pred, dim=1) @ nn.functional.normalize(concept_emb, dim=1).T / temperature
    if not bool(targets.any()):
        return pred.sum() * 0.0
    excluded = targets if negative_columns is None else targets | ~negative_columns[None, :]
    lse_neg = torch.logsumexp(s.masked_fill(excluded, float("-inf")), dim=1, keepdim=True)  # (B, 1)
    per = torch.logaddexp(s, lse_neg.expand_as(s)) - s  # -log softmax of each column against the negatives
    return per[targets].mean()


LOSSES = ("softmax", "margin")


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

    Loss: ``settings.loss``, :func:`multilabel_softmax_loss` (``"softmax"``, ``settings.temperature``) or
    :func:`cosine_margin_ranking_loss` (``"margin"``, ``settings.margin``).
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

    if settings.loss not in LOSSES:
        raise LaviseError(f"loss must be one of {LOSSES}, got {settings.loss!r}")

    def loss_fn(pred, e, yy, cols=None):
        if settings.loss == "softmax":
            return multilabel_softmax_loss(pred, e, yy, settings.temperature, cols)
        return cosine_margin_ranking_loss(pred, e, yy, settings.margin, cols)

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
                loss = loss_fn(head(x[b]), e, y[b], cols)
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
                    vl = float(loss_fn(head(x_val), e, y_val))
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
            "loss_kind": settings.loss,
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
