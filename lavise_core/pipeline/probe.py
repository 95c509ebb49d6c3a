"""The streaming probe pass: one pass over a probe data set for a (model, layer).

Per image it keeps the pooled activation of every filter (row of the ``(N, C)`` matrix, written to a
memory-mapped file) and the logits; per filter the top-k images with their activation maps and a
streaming histogram of all spatial activations (for quantiles such as Network Dissection's top 0.5 %
threshold). Memory is bounded: ``N × C`` (on disk) plus ``C × k`` maps plus ``C × bins`` counts.

The pass checkpoints its state every few batches; an interrupted pass resumes where it stopped.
Unreadable images are reported and skipped (their row is marked invalid), never fatal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lavise_core.data.dataset import ProbeDataset, atomic_write_bytes
from lavise_core.data.images import ImageLoadError
from lavise_core.models.networks import LoadedModel, record_layer
from lavise_core.pipeline.bundle import Bundle, bundle_key
from lavise_core.pipeline.executor import ExecutorError, ExecutorSettings, WorkerDataError, map_shards
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "QUANTILE_LEVELS",
    "LayerStats",
    "ProbePartial",
    "ProbeSettings",
    "ProbeShardTask",
    "StreamingHistogram",
    "TopKMaps",
    "build_stage",
    "bundle_dir_for",
    "image_batches",
    "open_or_create_bundle",
    "run_probe",
    "run_probe_sharded",
    "stored_maps",
    "stored_stats",
]

QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)
DISSECTION_LEVEL = 0.995


@dataclass(frozen=True)
class ProbeSettings:
    """Settings of the probe pass (not part of the bundle key: they do not change per-image values)."""

    top_k: int = 16
    batch_size: int = 32
    num_workers: int = 1
    histogram_bins: int = 2048
    checkpoint_every: int = 20  # batches
    device: str = "cpu"
    progress: bool = True
    amp: bool = True  # mixed precision for the forward pass on a GPU (accumulation stays float32)
    maps_mib: int = 256  # keep every image's layer maps (probe/maps) when they fit in this many MiB; 0: never
    stats_layers: tuple[
        str, ...
    ] = ()  # layers whose per-image statistics are kept too (probe/stats, LayerStats)


# --------------------------------------------------------------------------------------- reducers
class StreamingHistogram:
    """Per-filter histogram of activations with bins that double in width as the range grows.

    ``counts (C, B)``; filter ``c``'s bin ``j`` covers ``[lo_c + j·w_c, lo_c + (j+1)·w_c)``. Values below
    ``lo_c`` (fixed by the first batch) fall in bin 0. Quantiles interpolate linearly inside a bin,
    so their error is at most one bin width = range / B.
    """

    def __init__(self, channels: int, bins: int = 2048) -> None:
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.counts = torch.zeros(channels, bins, dtype=torch.int64)
        self.lo: torch.Tensor | None = None
        self.width: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        """Add ``values (C, M)`` (all spatial positions of a batch, per filter)."""
        values = values.detach().float().cpu()
        vmax = values.max(dim=1).values
        if self.lo is None:
            self.lo = values.min(dim=1).values.double()
            span = (vmax.double() - self.lo).clamp_min(1e-6)
            self.width = span * (1 + 1e-6) / self.bins
        assert self.width is not None
        # double the bin width of filters whose range grew, merging pairs of bins
        while True:
            hi = self.lo + self.width * self.bins
            grow = vmax.double() >= hi
            if not bool(grow.any()):
                break
            self._double(grow)
        # bin index in float32 (exact enough for 2048 bins), offset per filter, one bincount for all
        lo32, inv32 = self.lo.float()[:, None], (1.0 / self.width).float()[:, None]
        idx = ((values - lo32) * inv32).floor_().clamp_(0, self.bins - 1).long()
        idx += torch.arange(values.shape[0])[:, None] * self.bins
        flat = torch.bincount(idx.view(-1), minlength=values.shape[0] * self.bins)
        self.counts += flat.view(-1, self.bins)

    def _double(self, rows: torch.Tensor) -> None:
        """Double the bin width of the filters ``rows (C,) bool``: bins ``2j`` and ``2j+1`` become bin ``j``."""
        c = self.counts[rows]
        merged = c[:, 0::2] + c[:, 1::2]
        self.counts[rows] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
        self.width[rows] *= 2

    @classmethod
    def starting_at(cls, lo: torch.Tensor, width: torch.Tensor, bins: int) -> StreamingHistogram:
        """An empty histogram with the origin ``lo (C,)`` and bin width ``width (C,)`` of another one (float64).

        Histograms that start at the same origin merge exactly (:meth:`merge`): a shard of a distributed
        pass starts at the origin the single-process pass takes from its first batch.
        """
        h = cls(lo.shape[0], bins)
        h.lo, h.width = lo.double().clone(), width.double().clone()
        return h

    def merge(self, other: StreamingHistogram) -> None:
        """Add the counts of ``other`` (same origin and bins; its widths ``width · 2^g``, g >= 0 or <= 0).

        Exact: counting a value at width ``2w`` equals counting it at ``w`` and merging bin pairs, so both sides
        are brought to the larger width per filter and added: the counts the single pass would have.
        """
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.width, self.counts = other.lo.clone(), other.width.clone(), other.counts.clone()
            return
        if other.bins != self.bins or not torch.equal(other.lo, self.lo):
            raise ValueError("histograms with different origins or bins cannot be merged exactly")
        counts = other.counts.clone()
        width = other.width.clone()
        while True:
            mine, theirs = self.width < width, width < self.width
            if not bool(mine.any() or theirs.any()):
                break
            if bool(mine.any()):
                self._double(mine)
            if bool(theirs.any()):
                c = counts[theirs]
                merged = c[:, 0::2] + c[:, 1::2]
                counts[theirs] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
                width[theirs] *= 2
        self.counts += counts

    def quantiles(self, levels: tuple[float, ...] | list[float]) -> np.ndarray:
        """``(C, Q)`` float32 quantiles at ``levels`` (each in [0, 1])."""
        if self.lo is None:
            raise ValueError("no values were added")
        counts = self.counts.double()
        cum = counts.cumsum(dim=1)
        total = cum[:, -1:]
        out = np.zeros((self.counts.shape[0], len(levels)), dtype=np.float32)
        for qi, q in enumerate(levels):
            target = q * total
            j = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp_(0, self.bins - 1)
            below = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(target))
            inbin = counts.gather(1, j)
            frac = ((target - below) / inbin.clamp_min(1e-12)).clamp(0, 1)
            val = self.lo[:, None] + (j.double() + frac) * self.width[:, None]
            out[:, qi] = val[:, 0].float().numpy()
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {
            "hist_counts": self.counts.numpy(),
            "hist_lo": self.lo.numpy(),
            "hist_width": self.width.numpy(),
        }

    def load_state(self, st: dict[str, np.ndarray]) -> None:
        self.counts = torch.from_numpy(np.array(st["hist_counts"]))
        self.lo = torch.from_numpy(np.array(st["hist_lo"]))
        self.width = torch.from_numpy(np.array(st["hist_width"]))


class TopKMaps:
    """The ``k`` images with the largest pooled activation per filter, with their maps.

    ``values (C, k)`` descending, ``index (C, k)`` image indices (-1 = empty), ``maps (C, k, h, w)``.
    """

    def __init__(self, channels: int, k: int, map_size: tuple[int, int]) -> None:
        self.k = k
        self.values = torch.full((channels, k), float("-inf"))
        self.index = torch.full((channels, k), -1, dtype=torch.long)
        self.maps = torch.zeros(channels, k, *map_size)

    def update(self, pooled: torch.Tensor, maps: torch.Tensor, index: torch.Tensor) -> None:
        """Merge a batch: ``pooled (B, C)``, ``maps (B, C, h, w)``, ``index (B,)`` ascending and after every index
        seen so far (invalid rows pre-set to -inf).

        Ties go to the earlier image (a stable sort of ``[kept, batch]``), so the result is the first ``k`` in the
        order (value descending, image index ascending, empty slots -1 first): independent of how the images
        were batched, which is what makes :meth:`merge` exact.
        """
        b = pooled.shape[0]
        vals = torch.cat([self.values, pooled.T.float()], dim=1)  # (C, k + B)
        idx = torch.cat([self.index, index[None, :].expand(self.values.shape[0], b)], dim=1)
        self._keep(vals, idx, torch.cat([self.maps, maps.permute(1, 0, 2, 3).float()], dim=1))

    def merge(self, values: torch.Tensor, index: torch.Tensor, maps: torch.Tensor) -> None:
        """Merge another top-k over other images: ``values (C, k')``, ``index (C, k')``, ``maps (C, k', h, w)``.

        Exact: same order as :meth:`update` (value descending, index ascending), in any merge order.
        """
        vals = torch.cat([self.values, values.float()], dim=1)
        idx = torch.cat([self.index, index.long()], dim=1)
        allmaps = torch.cat([self.maps, maps.float()], dim=1)
        by_index = idx.sort(dim=1, stable=True).indices  # index ascending (-1 first), then stable by value
        self._keep(vals.gather(1, by_index), idx.gather(1, by_index), _gather_maps(allmaps, by_index))

    def _keep(self, vals: torch.Tensor, idx: torch.Tensor, allmaps: torch.Tensor) -> None:
        order = vals.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values = vals.gather(1, order)
        self.index = idx.gather(1, order)
        self.maps = _gather_maps(allmaps, order)

    def state(self) -> dict[str, np.ndarray]:
        return {
            "top_values": self.values.numpy(),
            "top_index": self.index.numpy(),
            "top_maps": self.maps.numpy(),
        }

    def load_state(self, st: dict[str, np.ndarray]) -> None:
        self.values = torch.from_numpy(np.array(st["top_values"]))
        self.index = torch.from_numpy(np.array(st["top_index"]))
        self.maps = torch.from_numpy(np.array(st["top_maps"]))


class LayerStats:
    """Per-image statistics of other layers than the explained one, computed in the probe pass's forward, so the
    stages that need them (the upload check's early layers, Oramas' energies) make no pass of their own.

    For each layer ``l`` with ``C_l`` channels, ``probe/stats/<l> (N, 3, C_l)`` float32: the spatial mean, the
    spatial standard deviation (unbiased) and the spatial sum of squares ``Σ_{u,v} A²`` of every channel,
    computed from the float32 output inside a forward hook (before a later in-place op could change it), exactly
    as the stages compute them; unreadable images' rows are 0. Used as a context manager around the forward.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]) -> None:
        self.model, self.layers = model, list(layers)
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        def fn(_m: torch.nn.Module, _i: tuple, out: torch.Tensor) -> None:
            o = out.float()
            self.values[name] = torch.stack([o.mean(dim=(2, 3)), o.std(dim=(2, 3)), o.pow(2).sum((2, 3))], 1)

        return fn

    def __enter__(self) -> LayerStats:
        self._handles = [
            self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.layers
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def channels(self, device: torch.device, size: int) -> list[int]:
        """``C_l`` of every layer, from one forward pass of a blank image."""
        with torch.no_grad(), self:
            self.model(torch.zeros(1, 3, size, size, device=device))
        return [int(self.values[n].shape[2]) for n in self.layers]


def _gather_maps(maps: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``maps (C, M, h, w)`` picked by ``order (C, k)`` -> ``(C, k, h, w)``."""
    return maps.gather(1, order[:, :, None, None].expand(-1, -1, *maps.shape[2:]))


# --------------------------------------------------------------------------------------- data
class ProbeImages(Dataset):
    """Loads and preprocesses image ``i``; a bad image yields zeros and its error message."""

    def __init__(self, ds: ProbeDataset, lm: LoadedModel, start: int) -> None:
        self.ds, self.lm, self.start = ds, lm, start

    def __len__(self) -> int:
        return len(self.ds) - self.start

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor, str]:
        i = self.start + j
        try:
            img = self.ds.load_image(i)
            return i, self.lm.preprocess(img), ""
        except ImageLoadError as e:
            return i, torch.zeros(3, self.lm.input_size, self.lm.input_size), str(e)
        except Exception as e:  # a transform failing on a strange image must not end the pass
            return i, torch.zeros(3, self.lm.input_size, self.lm.input_size), f"{type(e).__name__}: {e}"


def collate_batch(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    idx = torch.tensor([b[0] for b in batch], dtype=torch.long)
    return idx, torch.stack([b[1] for b in batch]), [b[2] for b in batch]


# --------------------------------------------------------------------------------------- bundles
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def bundle_dir_for(
    bundles_root: Path, lm: LoadedModel, layer: str, ds: ProbeDataset, data_hash: str | None = None
) -> tuple[Path, str]:
    """Directory and key of the bundle for these inputs: ``<root>/<dataset>-<model>-<layer>-<key>``.

    ``data_hash`` is ``ds.content_hash()``, computed here when the caller has not already.
    """
    data_hash = data_hash or ds.content_hash()
    key = bundle_key(lm.weights_hash, layer, data_hash, lm.preprocessing_spec())
    model_slug = _slug(Path(lm.name).stem if lm.name.endswith(".json") else lm.name.split("?")[0])
    return Path(bundles_root) / f"{_slug(ds.name)}-{model_slug}-{_slug(layer)}-{key}", key


def open_or_create_bundle(
    bundles_root: Path, lm: LoadedModel, ds: ProbeDataset, layer: str | None = None
) -> Bundle:
    """The (possibly partly built) bundle for ``lm`` × ``layer`` × ``ds``, created if absent."""
    layer = lm.check_layer(layer or lm.default_layer)
    data_hash = ds.content_hash()
    root, key = bundle_dir_for(bundles_root, lm, layer, ds, data_hash)
    manifest = {
        "key": key,
        "layer": layer,
        "classes": lm.class_names,
        "model": {"spec": lm.name, "weights_hash": lm.weights_hash, "card": lm.card},
        "preprocessing": lm.preprocessing_spec(),
        "dataset": {
            "name": ds.name,
            "root": str(Path(ds.root).resolve()),
            "hash": data_hash,
            "n": len(ds),
        },
    }
    return Bundle.create(root, manifest)


# --------------------------------------------------------------------------------------- the pass
def prepare_device(lm: LoadedModel, device: torch.device) -> None:
    """Move the model; on a GPU in channels-last memory format (faster convolutions under autocast)."""
    lm.model.to(device)
    if device.type == "cuda":
        lm.model.to(memory_format=torch.channels_last)


def autocast_forward(device: torch.device, amp: bool):
    """Mixed precision for the forward pass on a GPU (bfloat16 where supported); a no-op on the CPU."""
    import contextlib

    if device.type != "cuda" or not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _forward(lm: LoadedModel, rec, x: torch.Tensor, device: torch.device, amp: bool):
    """One batch -> ``(maps (B, C, h, w) float32, logits (B, K) float32)``; reductions then run in float32."""
    if device.type == "cuda":
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
    else:
        x = x.to(device)
    with autocast_forward(device, amp):
        out = lm.model(x)
    return rec.output.float(), out.float()


def _shapes(lm: LoadedModel, layer: str, device: torch.device, n: int, top_k: int):
    """``(C, h, w, K, k)`` from one dummy forward pass; checks the class names."""
    with torch.no_grad(), lm.lock, record_layer(lm.model, layer) as rec:
        logits0 = lm.model(torch.zeros(1, 3, lm.input_size, lm.input_size, device=device))
    c, h, w = rec.output.shape[1:]
    k_cls = logits0.shape[1]
    if k_cls != len(lm.class_names):
        raise ValueError(f"the model outputs {k_cls} logits but has {len(lm.class_names)} class names")
    return int(c), int(h), int(w), int(k_cls), min(top_k, n)


def run_probe(
    bundle: Bundle,
    lm: LoadedModel,
    ds: ProbeDataset,
    settings: ProbeSettings = ProbeSettings(),
    on_progress: Callable[[int, int], None] | None = None,
    executor: ExecutorSettings | None = None,
) -> Bundle:
    """Run (or resume, or skip if done) the probe pass and store its arrays in ``bundle``.

    ``on_progress(done, total)`` is called after every batch (for progress bars outside a terminal).
    ``executor``: a Ray executor runs the pass sharded (:func:`run_probe_sharded`); same arrays.

    Writes ``probe/pooled (N, C)``, ``probe/logits (N, K)``, ``probe/valid (N,)``, ``probe/top_index (C, k)``,
    ``probe/top_value (C, k)``, ``probe/top_maps (C, k, h, w)`` float16, ``probe/quantile_levels (Q,)``,
    ``probe/quantiles (C, Q)``, ``probe/threshold (C,)``, ``probe/classifier_weight (K, C)``,
    ``probe/classifier_bias (K,)`` and ``probe/failures.json``; and ``probe/maps (N, C, h, w)`` float32, every
    image's layer maps, when they fit in ``settings.maps_mib`` (the dashboard draws a concept's heatmaps from
    them without a forward pass, and the grounding stage fits on them instead of a second pass over the images;
    unreadable images' rows are 0); and ``probe/stats/<layer> (N, 3, C_l)`` for ``settings.stats_layers``
    (:class:`LayerStats`; the single-process pass only).
    """
    if bundle.stage_done("probe"):
        return bundle
    if executor is not None and executor.kind != "local":
        return run_probe_sharded(bundle, lm, ds, settings, executor, on_progress)
    bundle.verify_model(lm)
    layer = bundle.layer
    device = torch.device(settings.device)
    prepare_device(lm, device)
    n = len(ds)
    if n == 0:
        raise ValueError(f"the data set at {ds.root} has no images")
    c, h, w, k_cls, top_k = _shapes(lm, layer, device, n, settings.top_k)

    work = bundle.root / "probe" / "_partial"
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.npz"
    (work / SHARDED_STATE).unlink(missing_ok=True)  # a sharded pass's rows are redone here, in order
    pooled, logits, valid, hist, top = _accumulators(work, n, c, k_cls, (h, w), top_k, settings)
    failures: dict[str, str] = {}
    done = 0
    if state_path.is_file():
        st = dict(np.load(state_path, allow_pickle=False))
        if tuple(st["top_maps"].shape) == (c, top_k, h, w) and int(st["n"]) == n:
            done = int(st["done"])
            top.load_state(st)
            if "hist_lo" in st:
                hist.load_state(st)
            failures = json.loads(str(st["failures"]))

    gpu = device.type == "cuda"
    loader = DataLoader(
        ProbeImages(ds, lm, done),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers or (min(4, os.cpu_count() or 1) if gpu else 0),
        collate_fn=collate_batch,
        shuffle=False,
        pin_memory=gpu,
    )
    all_maps = _maps_accumulator(work, (n, c, h, w), settings, fresh=not state_path.is_file())
    stats = LayerStats(lm.model, settings.stats_layers)
    stat_rows = _stats_accumulators(work, n, stats, device, lm.input_size, fresh=not state_path.is_file())
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=done, unit="img", desc="probe pass", disable=not settings.progress)
    with (
        torch.no_grad(),
        lm.lock,
        record_layer(lm.model, layer) as rec,
        stats if stat_rows else contextlib.nullcontext(),
        all_maps or contextlib.nullcontext(),
    ):
        for bi, (idx, x, errors) in enumerate(loader):
            maps, out = _forward(lm, rec, x, device, settings.amp)
            ok = torch.tensor([not e for e in errors])
            pooled_b = maps.mean(dim=(2, 3)).cpu()
            pooled_b[~ok] = 0.0
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            pooled[lo:hi] = pooled_b.numpy()
            logits[lo:hi] = np.where(ok.numpy()[:, None], out.cpu().numpy(), 0.0)
            valid[lo:hi] = ok.numpy()
            for i, e in zip(idx.tolist(), errors, strict=True):
                if e:
                    failures[ds.records[i].path] = e
                    bar.write(f"skipped {ds.records[i].path}: {e}")
            maps_cpu = maps.cpu()
            if all_maps is not None:
                all_maps.write(lo, np.where(ok.numpy()[:, None, None, None], maps_cpu.numpy(), 0.0))
            for name, rows in stat_rows.items():
                rows[lo:hi] = np.where(ok.numpy()[:, None, None], stats.values[name].cpu().numpy(), 0.0)
            if bool(ok.any()):
                okd = ok.to(maps.device)
                hist.update(maps[okd].permute(1, 0, 2, 3).reshape(c, -1))
                ranked = pooled_b.clone()
                ranked[~ok] = float("-inf")
                top.update(ranked, maps_cpu, idx)
            done = hi
            bar.update(hi - lo)
            if on_progress is not None:
                on_progress(done, n)
            if (bi + 1) % settings.checkpoint_every == 0 and done < n:
                if all_maps is not None:
                    all_maps.flush()
                for rows in stat_rows.values():
                    rows.flush()
                _checkpoint(state_path, pooled, logits, valid, top, hist, failures, done=done, n=n)
    bar.close()
    seconds = time.perf_counter() - t0
    if all_maps is not None:
        bundle.move_array("probe/maps", work / "maps.npy")
    for name, rows in stat_rows.items():
        bundle.write_array(f"probe/stats/{name}", np.asarray(rows))
    extra = {"stats_layers": list(stat_rows)} if stat_rows else None
    _finish(
        bundle,
        lm,
        ds,
        pooled,
        logits,
        valid,
        top,
        hist,
        failures,
        seconds,
        settings,
        device,
        (c, h, w),
        extra,
    )
    del stat_rows
    del pooled, logits, valid
    shutil.rmtree(work, ignore_errors=True)
    return bundle


def _finish(
    bundle: Bundle,
    lm: LoadedModel,
    ds: ProbeDataset,
    pooled,
    logits,
    valid,
    top: TopKMaps,
    hist: StreamingHistogram,
    failures: dict[str, str],
    seconds: float,
    settings: ProbeSettings,
    device: torch.device,
    chw: tuple[int, int, int],
    extra: dict | None = None,
) -> None:
    """Write the probe arrays and mark the stage (the same for every executor)."""
    n = len(ds)
    n_valid = int(np.asarray(valid).sum())
    if n_valid == 0:
        raise ValueError(
            f"none of the {n} images of {ds.root} could be read; first error: {next(iter(failures.values()))}"
        )
    c, h, w = chw
    quantiles = hist.quantiles(QUANTILE_LEVELS)
    wcls, bcls = lm.classifier_weights()
    bundle.write_array("probe/pooled", np.asarray(pooled))
    bundle.write_array("probe/logits", np.asarray(logits))
    bundle.write_array("probe/valid", np.asarray(valid))
    bundle.write_array("probe/top_index", top.index.numpy())
    bundle.write_array("probe/top_value", top.values.numpy().astype(np.float32))
    bundle.write_array("probe/top_maps", top.maps.numpy().astype(np.float16))
    bundle.write_array("probe/quantile_levels", np.asarray(QUANTILE_LEVELS, dtype=np.float32))
    bundle.write_array("probe/quantiles", quantiles)
    bundle.write_array("probe/threshold", quantiles[:, QUANTILE_LEVELS.index(DISSECTION_LEVEL)].copy())
    bundle.write_array("probe/classifier_weight", wcls)
    bundle.write_array("probe/classifier_bias", bcls)
    bundle.write_json("probe/failures", failures)
    bundle.manifest.update({"channels": int(c), "map_size": [int(h), int(w)], "top_k": int(top.k)})
    labels = ds.labels()
    preds = np.asarray(logits).argmax(1)
    known = np.asarray(valid) & (labels >= 0)
    k_cls = np.asarray(logits).shape[1]
    acc = float((preds[known] == labels[known]).mean()) if known.any() and k_cls == len(ds.classes) else None
    bundle.mark_stage(
        "probe",
        {
            "seconds": round(seconds, 2),
            "images": n,
            "valid": n_valid,
            "skipped": len(failures),
            "batch_size": settings.batch_size,
            "device": str(device),
            "accuracy": acc,
            **(extra or {}),
        },
    )


# --------------------------------------------------------------------------------------- sharded pass
#: a sharded pass's checkpoint in probe/_partial (the single-process one: state.npz)
SHARDED_STATE = "shards.npz"


@dataclass
class ProbePartial:
    """What one shard of the probe pass sends back: its rows and its own top-k and histogram."""

    rows: np.ndarray  # (n,) manifest rows
    pooled: np.ndarray  # (n, C) float32
    logits: np.ndarray  # (n, K) float32
    valid: np.ndarray  # (n,) bool
    failures: dict[int, str]  # row -> error
    top_values: np.ndarray  # (C, k) float32
    top_index: np.ndarray  # (C, k) int64
    top_maps: np.ndarray  # (C, k, h, w) float16 (stored as float16 anyway)
    hist_counts: np.ndarray  # (C, B) int64
    hist_width: np.ndarray  # (C,) float64
    hist_lo: np.ndarray  # (C,) float64


class ProbeShardTask:
    """The probe pass over one shard (whole batches), for :func:`~lavise_core.pipeline.executor.map_shards`.

    ``setup`` finds the histogram origin exactly as the single-process pass does: from the first batch of the
    manifest that has a readable image; every shard's histogram starts there, so the merge is exact.
    """

    def __init__(self, lm: LoadedModel, ds: ProbeDataset, layer: str, settings: ProbeSettings) -> None:
        self.lm, self.ds, self.layer, self.settings = lm, ds, layer, settings
        self.device = torch.device(settings.device)
        self.origin: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, device: str | None) -> None:
        if device is not None:
            self.device = torch.device(device)
        root = Path(self.ds.root)
        if not root.is_dir():
            raise WorkerDataError(
                f"the worker on {socket.gethostname()} cannot see the data set folder {root}: the images must "
                "be on a filesystem every Ray node mounts at the same path (see docs/ray.md)"
            )
        prepare_device(self.lm, self.device)
        n, bs = len(self.ds), self.settings.batch_size
        first_error = ""
        for start in range(0, n, bs):
            _, x, errors = collate_batch([self._item(i) for i in range(start, min(n, start + bs))])
            ok = torch.tensor([not e for e in errors])
            if not bool(ok.any()):
                first_error = first_error or errors[0]
                if start == 0 and all(("No such file" in e or "not found" in e.lower()) for e in errors):
                    raise WorkerDataError(
                        f"the worker on {socket.gethostname()} cannot read the images under {root} "
                        f"(first: {self.ds.records[0].path}: {errors[0]}); put them on a shared filesystem "
                        "or object store every node reads (see docs/ray.md)"
                    )
                continue
            with torch.no_grad(), self.lm.lock, record_layer(self.lm.model, self.layer) as rec:
                maps, _ = _forward(self.lm, rec, x, self.device, self.settings.amp)
            c = maps.shape[1]
            hist = StreamingHistogram(c, self.settings.histogram_bins)
            hist.update(maps[ok.to(maps.device)].permute(1, 0, 2, 3).reshape(c, -1))
            self.origin = (hist.lo, hist.width)
            return
        raise WorkerDataError(f"none of the {n} images of {root} could be read; first error: {first_error}")

    def _item(self, i: int) -> tuple[int, torch.Tensor, str]:
        return ProbeImages(self.ds, self.lm, 0)[i]

    def __call__(self, rows: np.ndarray) -> ProbePartial:
        assert self.origin is not None, "setup() first"
        bs = self.settings.batch_size
        c, k_top = int(self.origin[0].shape[0]), min(self.settings.top_k, len(self.ds))
        hist = StreamingHistogram.starting_at(*self.origin, self.settings.histogram_bins)
        top: TopKMaps | None = None
        pooled, logits, valid, failures = [], [], [], {}
        with torch.no_grad(), self.lm.lock, record_layer(self.lm.model, self.layer) as rec:
            for s in range(0, len(rows), bs):  # the single-process batches: shards start at multiples of bs
                idx, x, errors = collate_batch([self._item(int(i)) for i in rows[s : s + bs]])
                maps, out = _forward(self.lm, rec, x, self.device, self.settings.amp)
                if top is None:
                    top = TopKMaps(c, k_top, tuple(maps.shape[2:]))
                ok = torch.tensor([not e for e in errors])
                pooled_b = maps.mean(dim=(2, 3)).cpu()
                pooled_b[~ok] = 0.0
                pooled.append(pooled_b.numpy())
                logits.append(np.where(ok.numpy()[:, None], out.cpu().numpy(), 0.0).astype(np.float32))
                valid.append(ok.numpy())
                failures.update({int(i): e for i, e in zip(idx.tolist(), errors, strict=True) if e})
                if bool(ok.any()):
                    hist.update(maps[ok.to(maps.device)].permute(1, 0, 2, 3).reshape(c, -1))
                    ranked = pooled_b.clone()
                    ranked[~ok] = float("-inf")
                    top.update(ranked, maps.cpu(), idx)
        assert top is not None
        return ProbePartial(
            rows=np.asarray(rows, np.int64),
            pooled=np.concatenate(pooled),
            logits=np.concatenate(logits),
            valid=np.concatenate(valid),
            failures=failures,
            top_values=top.values.numpy(),
            top_index=top.index.numpy(),
            top_maps=top.maps.numpy().astype(np.float16),
            hist_counts=hist.counts.numpy(),
            hist_width=hist.width.numpy(),
            hist_lo=hist.lo.numpy(),
        )


def run_probe_sharded(
    bundle: Bundle,
    lm: LoadedModel,
    ds: ProbeDataset,
    settings: ProbeSettings = ProbeSettings(),
    executor: ExecutorSettings = ExecutorSettings(),
    on_progress: Callable[[int, int], None] | None = None,
) -> Bundle:
    """The probe pass as shards mapped by ``executor`` (Ray: batch inference in an actor pool), merged into the
    arrays :func:`run_probe` writes: pooled / logits / valid by row, top-k and histograms merged exactly
    (:meth:`TopKMaps.merge`, :meth:`StreamingHistogram.merge`), failures collected in manifest order. Every
    image's maps (``probe/maps``) are not kept: the dashboard runs a forward pass for a concept's images instead.

    Every ``settings.checkpoint_every`` batches' worth of merged shards, the merged state is checkpointed
    (``probe/_partial/shards.npz``: which rows are done, the top-k, the histogram, the failures; the memmaps
    flushed first). A pass that fails (a worker dead for good, an interrupt) keeps it, and the next sharded pass
    with the same batch size maps only the rows not done. Nothing is written to the bundle's arrays until every
    row is done.
    """
    if bundle.stage_done("probe"):
        return bundle
    bundle.verify_model(lm)
    layer = bundle.layer
    n = len(ds)
    if n == 0:
        raise ValueError(f"the data set at {ds.root} has no images")
    device = torch.device(settings.device)
    if executor.kind == "ray":  # the model travels to the workers from the CPU; they pick their device
        lm.model.to("cpu", memory_format=torch.contiguous_format)
    model_device = next(lm.model.parameters(), torch.zeros(0)).device
    c, h, w, k_cls, top_k = _shapes(lm, layer, model_device, n, settings.top_k)
    work = bundle.root / "probe" / "_partial"
    if (work / "state.npz").is_file():
        shutil.rmtree(work)  # a single-process checkpoint does not mix with shards
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / SHARDED_STATE
    pooled, logits, valid, hist, top = _accumulators(work, n, c, k_cls, (h, w), top_k, settings)
    finished = np.zeros(n, np.bool_)
    errors: dict[int, str] = {}
    if state_path.is_file():
        st = dict(np.load(state_path, allow_pickle=False))
        if (
            tuple(st["top_maps"].shape) == (c, top_k, h, w)
            and st["finished"].shape == (n,)
            and int(st["batch_size"]) == settings.batch_size
        ):
            finished = st["finished"].astype(np.bool_)
            top.load_state(st)
            if "hist_lo" in st:
                hist.load_state(st)
            errors = {int(k): v for k, v in json.loads(str(st["failures"])).items()}
    todo = np.flatnonzero(~finished)
    resumed = n - len(todo)
    t0 = time.perf_counter()
    merge_s, since_checkpoint, merging = 0.0, 0, False
    shards_open: Iterator | None = None
    try:
        task = ProbeShardTask(lm, ds, layer, settings)
        bar = tqdm(
            total=n,
            initial=resumed,
            unit="img",
            desc=f"probe pass ({executor.kind})",
            disable=not settings.progress,
        )
        if resumed:
            bar.write(f"resuming: {resumed} of {n} images came back from an earlier pass")
        # Ray: "cuda" on a cluster with GPUs (one per actor), else "cpu"; an explicit cuda:N is kept
        worker_device = None if executor.kind == "ray" and settings.device == "cpu" else settings.device
        shards_open = (
            map_shards(task, todo, settings.batch_size, executor, worker_device) if len(todo) else None
        )
        for rows, part in shards_open or ():
            tm = time.perf_counter()
            merging = True  # until the rows are marked finished, the merged state is not a checkpoint
            pooled[rows] = part.pooled
            logits[rows] = part.logits
            valid[rows] = part.valid
            errors.update(part.failures)
            top.merge(
                *(torch.from_numpy(np.asarray(a)) for a in (part.top_values, part.top_index, part.top_maps))
            )
            other = StreamingHistogram.starting_at(
                torch.from_numpy(part.hist_lo), torch.from_numpy(part.hist_width), settings.histogram_bins
            )
            other.counts = torch.from_numpy(np.array(part.hist_counts))
            hist.merge(other)
            finished[rows] = True
            merging = False
            since_checkpoint += len(rows)
            if since_checkpoint >= settings.checkpoint_every * settings.batch_size and not finished.all():
                _checkpoint(
                    state_path, pooled, logits, valid, top, hist, errors, finished=finished,
                    batch_size=settings.batch_size,
                )  # fmt: skip
                since_checkpoint = 0
            merge_s += time.perf_counter() - tm
            bar.update(len(rows))
            if on_progress is not None:
                on_progress(int(finished.sum()), n)
    except BaseException as e:  # keep what came back: the next sharded pass maps only the other rows
        if shards_open is not None:
            shards_open.close()  # stop the executor's iterator now (Ray: while its runtime is still up)
        if since_checkpoint and not merging:
            _checkpoint(
                state_path, pooled, logits, valid, top, hist, errors, finished=finished,
                batch_size=settings.batch_size,
            )  # fmt: skip
        elif not state_path.is_file():  # nothing came back: leave nothing behind
            del pooled, logits, valid
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, ExecutorError) and state_path.is_file():
            kept = int(np.load(state_path)["finished"].sum())
            raise ExecutorError(
                f"{e} The {kept} of {n} images that came back are kept: the same build maps only the rest."
            ) from e
        raise
    bar.close()
    if not finished.all():
        raise ExecutorError(f"the {executor.kind} executor returned {int(finished.sum())} of {n} rows")
    seconds = time.perf_counter() - t0
    failures = {ds.records[i].path: errors[i] for i in sorted(errors)}
    extra = {"executor": executor.kind, "merge_seconds": round(merge_s, 3), "resumed_rows": resumed}
    _finish(bundle, lm, ds, pooled, logits, valid, top, hist, failures, seconds, settings, device,
            (c, h, w), extra)  # fmt: skip
    del pooled, logits, valid
    shutil.rmtree(work, ignore_errors=True)
    return bundle


def _accumulators(
    work: Path, n: int, c: int, k_cls: int, map_size: tuple[int, int], top_k: int, settings: ProbeSettings
) -> tuple[np.memmap, np.memmap, np.memmap, StreamingHistogram, TopKMaps]:
    """What one probe pass fills, for either executor: pooled ``(N, C)``, logits ``(N, K)`` and valid ``(N,)``
    as memmaps in ``work`` (reopened when a checkpoint left them), the histogram and the top-k maps."""
    pooled = _open_memmap(work / "pooled.npy", (n, c))
    logits = _open_memmap(work / "logits.npy", (n, k_cls))
    valid = _open_memmap(work / "valid.npy", (n,), dtype=np.bool_)
    return pooled, logits, valid, StreamingHistogram(c, settings.histogram_bins), TopKMaps(c, top_k, map_size)


class _RowFile:
    """A ``.npy`` file of float32 rows written in place with ``pwrite``: unlike a memmap, the rows written do not
    stay in the writer's resident memory (a pass over N images would otherwise hold every map it wrote)."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        arr = _open_memmap(path, shape, np.float32)  # the header, and the file at its full size
        self.offset, self.row = arr.offset, int(np.prod(shape[1:])) * 4
        del arr
        self.fd = os.open(path, os.O_RDWR)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows (B, ...)`` as rows ``start … start + B - 1``."""
        data = np.ascontiguousarray(rows, np.float32).tobytes()
        if os.pwrite(self.fd, data, self.offset + start * self.row) != len(data):
            raise OSError(errno.ENOSPC, "short write of the probe maps (is the disk full?)")

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _RowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _maps_accumulator(
    work: Path, shape: tuple[int, int, int, int], settings: ProbeSettings, fresh: bool
) -> _RowFile | None:
    """Every image's maps ``(N, C, h, w)`` float32 in ``work/maps.npy``, or ``None`` when they exceed
    ``settings.maps_mib`` or a pass resumed without them (its first rows were never kept)."""
    path = work / "maps.npy"
    if int(np.prod(shape)) * 4 > settings.maps_mib * 2**20 or not (fresh or path.is_file()):
        path.unlink(missing_ok=True)
        return None
    return _RowFile(path, shape)


def _stats_accumulators(
    work: Path, n: int, stats: LayerStats, device: torch.device, size: int, fresh: bool
) -> dict[str, np.memmap]:
    """``{layer: (N, 3, C_l) memmap}`` in ``work`` for :class:`LayerStats`; empty without stats layers, or when a
    pass resumed without them (its first rows were never kept)."""
    paths = [work / f"stats-{j}.npy" for j in range(len(stats.layers))]
    if not stats.layers or not (fresh or all(p.is_file() for p in paths)):
        return {}
    sizes = stats.channels(device, size)
    return {name: _open_memmap(p, (n, 3, cl)) for name, p, cl in zip(stats.layers, paths, sizes, strict=True)}


def _open_memmap(path: Path, shape: tuple[int, ...], dtype: type = np.float32) -> np.memmap:
    if path.is_file():
        arr = np.lib.format.open_memmap(path, mode="r+")
        if arr.shape == shape and arr.dtype == dtype:
            return arr
        del arr
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _checkpoint(
    path: Path, pooled, logits, valid, top: TopKMaps, hist: StreamingHistogram, failures: dict, **position
) -> None:
    """Flush the memmaps, then atomically record the merged state and how far the pass got: ``done``, ``n``
    (single process: rows after ``done`` are redone) or ``finished (N,)``, ``batch_size`` (sharded pass). The
    histogram is left out while no image has reached it."""
    import io

    for arr in (pooled, logits, valid):
        arr.flush()
    buf = io.BytesIO()
    hist_state = hist.state() if hist.lo is not None else {}
    np.savez(buf, failures=json.dumps(failures), **position, **top.state(), **hist_state)
    atomic_write_bytes(path, buf.getvalue())


def stored_maps(bundle: Bundle, n_images: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The probe pass's maps of every image ``(N, C, h, w)`` float32 (memory-mapped) and which images it read
    ``(N,)`` bool, for a stage to read instead of a second pass over the images at the bundle's layer: the same
    numbers (a layer's maps do not depend on the batch), provided the pass ran in float32 on the CPU. ``None``
    for a bundle without them (maps over ``maps_mib``, a sharded pass, older bundles' float16 maps), or whose
    pass ran on a GPU (mixed precision)."""
    info = bundle.manifest.get("stages", {}).get("probe", {})
    if not bundle.has("probe/maps") or str(info.get("device", "cpu")) != "cpu":
        return None
    maps = bundle.array("probe/maps")
    if maps.dtype != np.float32 or maps.ndim != 4 or maps.shape[0] != n_images:
        return None
    return maps, np.asarray(bundle.array("probe/valid"), bool)


def stored_stats(bundle: Bundle, layers: Sequence[str], n_images: int) -> dict[str, np.ndarray] | None:
    """The probe pass's :class:`LayerStats` of ``layers``: ``{layer: (N, 3, C_l)}`` float32 (mean, std, sum of
    squares per channel), the same numbers as a second pass, under the conditions of :func:`stored_maps` (a
    float32 pass on the CPU). ``None`` unless every layer is there."""
    info = bundle.manifest.get("stages", {}).get("probe", {})
    if str(info.get("device", "cpu")) != "cpu" or not set(layers) <= set(info.get("stats_layers", ())):
        return None  # (no layers: {} for a CPU pass, whose pooled features and logits a stage may then read)
    out = {name: np.asarray(bundle.array(f"probe/stats/{name}")) for name in layers}
    if any(a.dtype != np.float32 or a.ndim != 3 or a.shape[:2] != (n_images, 3) for a in out.values()):
        return None
    return out


def image_batches(
    ds: ProbeDataset, lm, indices: Sequence[int], batch_size: int, preprocess: bool = True
) -> Iterator[tuple[list[int], torch.Tensor | None, list]]:
    """Yield ``(record indices, x (B, 3, H, W) preprocessed, PIL images)`` for the records ``indices``, in order;
    unreadable images are skipped (the probe pass records which). ``preprocess=False``: ``x`` is None (a stage
    that reads the probe pass's maps needs only the images)."""
    from lavise_core.data.images import ImageLoadError

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
        if preprocess:
            xs.append(lm.preprocess(img))
        if len(batch) == batch_size:
            yield batch, torch.stack(xs) if preprocess else None, images
            batch, xs, images = [], [], []
    if batch:
        yield batch, torch.stack(xs) if preprocess else None, images


def build_stage(ctx: StageContext) -> dict:
    """The ``probe`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`run_probe` with the build's settings and
    ``options['probe']``."""
    s = ctx.settings
    settings = ProbeSettings(
        top_k=s.top_k, batch_size=s.batch_size, num_workers=s.workers, device=s.device, progress=s.bars
    )
    settings = dataclasses.replace(settings, stats_layers=tuple(ctx.probe_stats_layers))
    settings = dataclasses.replace(settings, **ctx.options_for("probe"))  # e.g. {"histogram_bins": 512}
    run_probe(
        ctx.bundle, ctx.model, ctx.dataset, settings,
        on_progress=lambda done, total: ctx.report(done, total, f"probe pass: {done} / {total} images"),
        executor=s.executor_settings(),
    )  # fmt: skip
    return {}
