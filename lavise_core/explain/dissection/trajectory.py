"""Training trajectories: Network Dissection of a series of checkpoints of one run (Bau et al. 2017, §4.3).

NetDissect's answer to "how do the detectors appear during training?" was to dissect each snapshot
separately. Here the series shares everything that does not depend on the weights, loaded once:

- the probe images (the ``layers`` stage's seeded draw of ``max_images`` fit images with label maps),
  preprocessed once (every checkpoint of one run has the same preprocessing: checked);
- their label-map crops and concept incidence, and the concept list (those in at least ``min_support`` of the
  images, :func:`~.layers.supported_concepts`, as the stage);
- the test split's preprocessed images, for the accuracy.

Per checkpoint, three forward passes over the cached tensors, each recording every layer at once: the
per-unit 0.995-quantile thresholds (the first 512 images, :func:`~.layers.thresholds_over`), the IoU
sums (:func:`~.layers.iou_over`, as :func:`~.layers.dissect_layers`: same batches, so the last checkpoint's labels are
exactly those of a ``layers`` stage build of it), and the test accuracy. Per checkpoint and layer: units,
interpretable units and unique concepts (:func:`~.layers.layer_summary`); per explained-layer filter its label
(best concept when its IoU reaches :data:`~.labels.IOU_MIN`, else none); then which filters changed their label,
and at which checkpoint.

Bad input: checkpoints of another architecture (or preprocessing) than the first are refused, by name; a
checkpoint that fails to load is reported and skipped, the rest kept; a series of one is dissected and says
there is nothing to compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lavise_core.data.dataset import ProbeDataset, fit_indices
from lavise_core.explain.dissection.labels import (
    EVAL_SIZE,
    IOU_MIN,
    concept_incidence,
    label_map_crop,
)
from lavise_core.explain.dissection.layers import (
    MIN_SUPPORT,
    LayerDissection,
    concept_kinds,
    dissection_layers,
    iou_over,
    layer_summary,
    supported_concepts,
    thresholds_over,
)
from lavise_core.models.networks import ModelLoadError, load_model, output_aliases
from lavise_core.pipeline.probe import image_batches

__all__ = [
    "ONE_CHECKPOINT",
    "architecture_of",
    "dissect_series",
    "label_changes",
    "load_series",
]

#: what the result says when a series has a single checkpoint
ONE_CHECKPOINT = "a series of one checkpoint: nothing to compare (pass two or more checkpoints of one run)"


def architecture_of(lm) -> tuple:
    """What makes two checkpoints the same network: the card's architecture and every tensor's name and shape."""
    arch = (lm.card or {}).get("architecture")
    return arch, tuple((k, tuple(v.shape)) for k, v in lm.model.state_dict().items())


def _difference(a: tuple, b: tuple) -> str:
    if a[0] != b[0]:
        return f"architecture {b[0]!r}, not {a[0]!r}"
    sa, sb = dict(a[1]), dict(b[1])
    for k in sa:
        if k not in sb:
            return f"no tensor {k}"
        if sa[k] != sb[k]:
            return f"tensor {k} has shape {sb[k]}, not {sa[k]}"
    extra = next(k for k in sb if k not in sa)
    return f"an extra tensor {extra}"


def load_series(
    checkpoints: Sequence[str], load: Callable[[str], object] = load_model
) -> tuple[list[tuple[str, object]], list[dict]]:
    """Load every checkpoint -> ``([(spec, LoadedModel)] kept, [{checkpoint, error}] skipped)``.

    A checkpoint that fails to load (:class:`ModelLoadError`, a missing file) is skipped and reported. A checkpoint
    of another architecture or preprocessing than the first loaded one raises ``ValueError`` naming it.
    """
    if not checkpoints:
        raise ValueError("no checkpoints given: pass the checkpoints of one run, oldest first")
    kept: list[tuple[str, object]] = []
    skipped: list[dict] = []
    for spec in checkpoints:
        try:
            lm = load(str(spec))
        except (ModelLoadError, FileNotFoundError, OSError) as e:
            skipped.append({"checkpoint": str(spec), "error": str(e)})
            continue
        if kept:
            first_spec, first = kept[0]
            a, b = architecture_of(first), architecture_of(lm)
            if a != b:
                raise ValueError(
                    f"{spec} is not the same network as {first_spec}: it has {_difference(a, b)}. A trajectory "
                    "follows the checkpoints of one training run; leave this one out or dissect it on its own."
                )
            if lm.preprocessing_spec() != first.preprocessing_spec():
                raise ValueError(
                    f"{spec} preprocesses its input differently from {first_spec} ({lm.preprocessing_spec()} vs "
                    f"{first.preprocessing_spec()}): the checkpoints of one run share it; leave this one out."
                )
        kept.append((str(spec), lm))
    if not kept:
        raise ValueError(
            "none of the checkpoints could be loaded: "
            + "; ".join(f"{s['checkpoint']}: {s['error']}" for s in skipped)
        )
    return kept, skipped


def label_changes(names: Sequence[str], labels: Sequence[Sequence[str | None]]) -> list[dict]:
    """Every change of a filter's label between consecutive checkpoints ``names`` -> ``[{filter, checkpoint,
    index, from, to}]`` (``index`` of the checkpoint where the new label appears), by filter then checkpoint."""
    out = []
    if not labels:
        return out
    for k in range(len(labels[0])):
        for i in range(1, len(labels)):
            if labels[i][k] != labels[i - 1][k]:
                out.append(
                    {
                        "filter": k,
                        "checkpoint": names[i],
                        "index": i,
                        "from": labels[i - 1][k],
                        "to": labels[i][k],
                    }
                )
    return out


def _batches(
    ds: ProbeDataset, lm, indices: Sequence[int], batch_size: int
) -> list[tuple[list[int], torch.Tensor]]:
    return [(b, x) for b, x, _ in image_batches(ds, lm, indices, batch_size)]


def _epoch(spec: str, lm) -> int | None:
    e = (lm.card or {}).get("epoch")
    if (
        e is None
        and (lm.card or {}).get("epochs") is not None
        and Path(spec).name == f"{lm.card.get('name')}.json"
    ):
        return int(lm.card["epochs"])  # the final card of `lavise train-demo`
    return int(e) if e is not None else None


def dissect_series(
    checkpoints: Sequence[str], dataset: ProbeDataset, *, layers: Sequence[str] | None = None,
    max_images: int = 640, batch_size: int = 32, seed: int = 0, size: int = EVAL_SIZE,
    load: Callable[[str], object] = load_model, report: Callable[[str], None] | None = None,
    min_support: int = MIN_SUPPORT,
) -> dict:  # fmt: skip
    """Dissect the checkpoints of one run, oldest first, against the same concept set and probe images.

    ``max_images``, ``batch_size``, ``seed`` and ``min_support`` are the ``layers`` stage's (the same draw and batches). Returns a
    JSON-ready dict: ``checkpoints`` (per kept checkpoint: ``checkpoint``, ``epoch``, ``accuracy`` on the test
    split or ``None``, ``layers`` (:func:`layer_summary` rows), ``labels`` of the explained layer's filters,
    ``seconds``), ``changes`` (:func:`label_changes`), ``skipped``, ``layers``, ``explained_layer``,
    ``recorded_as``, ``images``, ``test_images``, ``iou_min``, ``min_support``, ``note``, ``seconds_shared``.
    """
    say = report or (lambda _m: None)
    t0 = time.perf_counter()
    if not dataset.regions or not any(r.mask for r in dataset.records):
        raise ValueError(
            f"{dataset.root} has no region label maps: a trajectory needs a data set with part masks"
        )
    kept, skipped = load_series(checkpoints, load)
    for s in skipped:
        say(f"skipped {s['checkpoint']}: {s['error']}")
    lm0 = kept[0][1]
    names = list(layers or dissection_layers(lm0))
    explained = lm0.default_layer
    recorded = explained if explained in names else next(
        (a for a in output_aliases(lm0.model, explained) if a in names), None
    )  # fmt: skip
    if recorded is None:
        names.append(explained)
        recorded = explained
    # the layers stage's draw, batches and concepts
    fit = np.array([int(i) for i in fit_indices(dataset) if dataset.records[int(i)].mask])
    pick = np.sort(np.random.default_rng(seed).choice(fit, min(max_images, len(fit)), replace=False))
    keep_idx = [int(i) for i in pick]
    concepts, support = supported_concepts(dataset, keep_idx, min_support)
    if not concepts:
        raise ValueError(
            f"no concept is present in {min_support} or more of the {len(keep_idx)} images: lower min_support"
        )
    kinds, kind_order = concept_kinds(concepts, dataset.regions, dataset.meta.get("concept_kinds"))
    n_slots = len(dataset.regions) + 1
    say(f"loading {len(keep_idx)} probe images with their label maps (once for the series)")
    thr_batches = _batches(dataset, lm0, keep_idx[:512], batch_size)
    iou_batches = []
    for batch, x in _batches(dataset, lm0, keep_idx, batch_size):
        labels = np.stack([label_map_crop(dataset, i, lm0, size) for i in batch])
        inc = concept_incidence([dataset.records[i] for i in batch], dataset.regions, concepts)
        iou_batches.append((batch, x, labels, inc))
    n_images = sum(len(b[0]) for b in iou_batches)
    test = [int(i) for i in dataset.indices("test")]
    test_batches = _batches(dataset, lm0, test, batch_size) if test else []
    y = dataset.labels()
    shared = time.perf_counter() - t0

    rows, all_labels = [], []
    for spec, lm in kept:
        t1 = time.perf_counter()
        thr = thresholds_over(lm, names, (x for _, x in thr_batches))
        iou, _ = iou_over(lm, names, iou_batches, thr, n_slots, len(concepts))
        correct = total = 0
        with torch.no_grad(), lm.lock:
            for batch, x in test_batches:
                pred = lm.model(x).argmax(1).numpy()
                correct += int((pred == y[batch]).sum())
                total += len(batch)
        diss = LayerDissection(names, concepts, kinds, iou, n_images, kind_order, support)
        ids, sc = diss.best(recorded)
        labels_k = [concepts[int(j)] if s >= IOU_MIN else None for j, s in zip(ids, sc, strict=True)]
        all_labels.append(labels_k)
        rows.append(
            {
                "checkpoint": spec,
                "epoch": _epoch(spec, lm),
                "accuracy": round(correct / total, 4) if total else None,
                "layers": layer_summary(diss),
                "labels": labels_k,
                "label_iou": [round(float(s), 4) for s in sc],
                "seconds": round(time.perf_counter() - t1, 3),
            }
        )
        say(
            f"{spec}: "
            + ", ".join(f"{r['layer']} {r['interpretable']}/{r['units']}" for r in rows[-1]["layers"])
        )
    return {
        "checkpoints": rows,
        "changes": label_changes([r["checkpoint"] for r in rows], all_labels),
        "skipped": skipped,
        "layers": names,
        "explained_layer": explained,
        "recorded_as": recorded,
        "images": n_images,
        "test_images": len(test),
        "iou_min": IOU_MIN,
        "min_support": min_support,
        "note": ONE_CHECKPOINT if len(rows) == 1 else None,
        "seconds_shared": round(shared, 3),
    }
