"""Network Dissection across layers (Bau et al. 2017, Fig. 5–6): how many units of each layer detect a concept.

Several layers are recorded in the same forward passes (:func:`~lavise_core.models.networks.record_layers`)
over a subset of the fit split (train + val) with region label maps, with memory bounded by ``C × T`` per layer
(never the maps, never per-image counts):

1. one pass for each unit's Network Dissection threshold ``thr_k`` (the 0.995 quantile of its spatial
   activations; :class:`~lavise_core.pipeline.probe.StreamingHistogram` per layer);
2. one pass accumulating, batch by batch, the sums of :func:`~lavise_core.explain.dissection.labels.iou_sums` from the
   same :func:`~lavise_core.explain.dissection.labels.region_overlap` the filter labels use, so
   ``IoU_kt = I_kt / (|T_k| + |M_t| - I_kt)`` is the same quantity as the ``dissection`` stage's table.

Each unit's best concept is :func:`~lavise_core.explain.dissection.labels.rank_labels` over the concepts (bare part
names included, as in Network Dissection) present in at least :data:`MIN_SUPPORT` (10) of the images dissected
(:func:`supported_concepts`; Broden likewise keeps only labels with enough images): a concept in a handful of
images reaches a high IoU by chance, with random weights too. A unit is *interpretable* when that IoU reaches
:data:`~lavise_core.explain.dissection.labels.IOU_MIN` (0.04). Per layer: "N of M units interpretable, K unique
concepts", by concept kind: the data set's own kinds where its ``dataset.json`` ``meta.concept_kinds`` names them
(ConceptShapes: colour, texture, shape; a Broden import: its categories, colour/texture/part/object/material, scenes
as background), else the rules of :func:`concept_kind` (SynthBirds: part, colour, pattern/shape, background). The stage also dissects a re-initialised
copy of the network on fewer images: the baseline (few interpretable units expected), with the concepts that have
the support in *its* images (the IoU of each dissection is only as reliable as the images it is summed over).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lavise_core.data.dataset import ProbeDataset
from lavise_core.explain.dissection.labels import (
    EVAL_SIZE,
    IOU_MIN,
    concept_incidence,
    dissection_concepts,
    iou_from_sums,
    iou_sums,
    label_map_crop,
    rank_labels,
    region_overlap,
)
from lavise_core.models.networks import record_layers, reinitialised, spatial_layers
from lavise_core.pipeline.probe import StreamingHistogram, image_batches
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "BRODEN_KINDS",
    "COLOUR_WORDS",
    "KINDS",
    "KIND_ORDER",
    "MIN_SUPPORT",
    "RULE_KINDS",
    "STAGE",
    "LayerDissection",
    "build_layers_stage",
    "build_stage",
    "chart_order",
    "concept_kind",
    "concept_kinds",
    "concept_support",
    "dissect_layers",
    "dissection_layers",
    "iou_over",
    "layer_summary",
    "layer_thresholds",
    "supported_concepts",
    "thresholds_over",
]

STAGE = "layers"
#: the fewest dissected images a concept must be present in to compete for a unit's label (Network Dissection's
#: Broden keeps labels with enough samples); below it a concept's IoU is chance as often as not
MIN_SUPPORT = 10
#: the kinds charted for a concept set that names its concepts' kinds (``meta.concept_kinds``: ConceptShapes, Broden)
KINDS = ("colour", "texture", "shape", "part", "background")
#: every kind in chart order (a Broden import adds object and material; rules give pattern/shape)
KIND_ORDER = ("colour", "texture", "shape", "part", "object", "material", "background", "pattern/shape")
#: the kinds :func:`concept_kind`'s rules give where a data set names none (SynthBirds), in chart order
RULE_KINDS = ("part", "colour", "pattern/shape", "background")
#: a Broden category -> the kind it charts as (``scene`` labels are whole-image context, as backgrounds are)
BRODEN_KINDS = {"color": "colour", "scene": "background"}
COLOUR_WORDS = frozenset(
    [
        "black",
        "blue",
        "brown",
        "green",
        "grey",
        "gray",
        "orange",
        "pink",
        "purple",
        "red",
        "teal",
        "white",
        "yellow",
        "olive",
        "buff",
        "iridescent",
        "rufous",
        "golden",
        "cream",
    ]
)


def concept_kind(concept: str, regions: Sequence[str]) -> str:
    """``"background"`` (``"<kind> background"``), ``"part"`` (a bare region name), ``"colour"`` (a colour word
    + part) or ``"pattern/shape"`` (any other attribute + part: striped, spotted, forked, curved ...)."""
    if concept.endswith(" background"):
        return "background"
    if concept in regions:
        return "part"
    return "colour" if concept.split()[0] in COLOUR_WORDS else "pattern/shape"


def concept_kinds(
    concepts: Sequence[str], regions: Sequence[str], named: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """``(kind of each concept, the kinds in chart order)``.

    With ``named`` (a data set's ``meta.concept_kinds``: concept -> kind, Broden's category names mapped by
    :data:`BRODEN_KINDS`) a concept it names takes that kind and the order is :data:`KIND_ORDER` (the five
    :data:`KINDS` always, others where present); a concept it does not name, or every concept without ``named``,
    takes :func:`concept_kind`'s rule, and the order is :data:`RULE_KINDS` (SynthBirds, unchanged)."""
    if not named:
        kinds = [concept_kind(c, regions) for c in concepts]
        return kinds, list(RULE_KINDS) + sorted(set(kinds) - set(RULE_KINDS))
    kinds = [
        BRODEN_KINDS.get(named[c], named[c]) if c in named else concept_kind(c, regions) for c in concepts
    ]
    order = [k for k in KIND_ORDER if k in KINDS or k in kinds]
    return kinds, order + sorted(set(kinds) - set(KIND_ORDER))


def chart_order(kinds: Sequence[str]) -> list[str]:
    """``kinds`` (a summary's ``by_kind`` keys, which JSON stores sorted) in chart order: :data:`RULE_KINDS`'s order
    when they are all rule kinds (SynthBirds), else :data:`KIND_ORDER`'s; unknown kinds last, sorted."""
    ref = RULE_KINDS if set(kinds) <= set(RULE_KINDS) else KIND_ORDER
    return [k for k in ref if k in kinds] + sorted(set(kinds) - set(ref))


def dissection_layers(lm) -> list[str]:
    """The layers to dissect: a timm-style ``blocks`` container's stages plus the explained layer, else every
    ReLU (or ReLU6) with a spatial output (the demo CNN's seven conv blocks)."""
    spatial = spatial_layers(lm)
    if hasattr(lm.model, "blocks") and isinstance(lm.model.blocks, nn.Sequential):
        names = [f"blocks.{i}" for i in range(len(lm.model.blocks))]
        return [n for n in [*names, lm.default_layer] if n in spatial]
    mods = dict(lm.model.named_modules())
    return [n for n in spatial if isinstance(mods[n], nn.ReLU | nn.ReLU6)] or [lm.default_layer]


def concept_support(dataset: ProbeDataset, indices: Sequence[int], concepts: Sequence[str]) -> np.ndarray:
    """``(T,)`` int: in how many of the images ``indices`` each concept is present (in any region or the
    background, :func:`~lavise_core.explain.dissection.labels.concept_incidence`)."""
    support = np.zeros(len(concepts), np.int64)
    for s in range(0, len(indices), 256):
        recs = [dataset.records[int(i)] for i in indices[s : s + 256]]
        support += concept_incidence(recs, dataset.regions, concepts).any(axis=1).sum(axis=0)
    return support


def supported_concepts(
    dataset: ProbeDataset, indices: Sequence[int], min_support: int = MIN_SUPPORT
) -> tuple[list[str], np.ndarray]:
    """``(concepts, support (T,))``: the dissection concepts of the images ``indices`` (bare part names and
    backgrounds included) present in at least ``min_support`` of them, in their usual order; ValueError for a
    negative ``min_support``."""
    if min_support < 0:
        raise ValueError(f"min_support must be >= 0 images, got {min_support}")
    recs = [dataset.records[int(i)] for i in indices]
    every = dissection_concepts(recs, part_names=True, backgrounds=True, regions=dataset.regions)
    support = concept_support(dataset, indices, every)
    keep = support >= min_support
    return [c for c, k in zip(every, keep, strict=True) if k], support[keep]


def layer_thresholds(
    lm, dataset: ProbeDataset, layers: Sequence[str], indices: Sequence[int], batch_size: int = 32,
    level: float = 0.995, bins: int = 1024,
) -> dict[str, np.ndarray]:  # fmt: skip
    """``{layer: (C,)}`` per-unit ``level`` quantile of the spatial activations over ``indices``, one pass."""
    batches = (x for _, x, _ in image_batches(dataset, lm, indices, batch_size))
    return thresholds_over(lm, layers, batches, level, bins)


def thresholds_over(
    lm, layers: Sequence[str], batches: Iterable[torch.Tensor], level: float = 0.995, bins: int = 1024
) -> dict[str, np.ndarray]:
    """:func:`layer_thresholds` over ready input ``batches (B, 3, S, S)`` (a series of checkpoints reuses them)."""
    hists: dict[str, StreamingHistogram] = {}
    with torch.no_grad(), lm.lock, record_layers(lm.model, list(layers)) as rec:
        for x in batches:
            lm.model(x)
            for name in layers:
                m = rec.outputs[name].float()
                hists.setdefault(name, StreamingHistogram(m.shape[1], bins))
                hists[name].update(m.permute(1, 0, 2, 3).reshape(m.shape[1], -1))
    return {name: h.quantiles([level])[:, 0].copy() for name, h in hists.items()}


def iou_over(
    lm, layers: Sequence[str], batches: Iterable[tuple], thresholds: dict[str, np.ndarray], n_slots: int,
    n_concepts: int, report: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], int]:  # fmt: skip
    """``({layer: IoU (C, T)}, images)`` over ``batches`` of ``(records, x (B, 3, S, S), label maps, concept
    incidence)``: each unit's map above its threshold against every concept's regions, summed over the batches."""
    sums: dict[str, list] = {}
    m_t = np.zeros(n_concepts, np.float64)
    done = 0
    with torch.no_grad(), lm.lock, record_layers(lm.model, list(layers)) as rec:
        for batch, x, labels, inc in batches:
            lm.model(x)
            for name in layers:
                inter, act, area = region_overlap(rec.outputs[name], labels, thresholds[name], n_slots)
                i_ct, act_c, mt = iou_sums(inter, act, area, inc)
                if name not in sums:
                    sums[name] = [np.zeros_like(i_ct, np.float64), np.zeros_like(act_c, np.float64)]
                sums[name][0] += i_ct
                sums[name][1] += act_c
            m_t += mt
            done += len(batch)
            if report is not None:
                report(done)
    return {name: iou_from_sums(s[0], s[1], m_t) for name, s in sums.items()}, done


@dataclass
class LayerDissection:
    """``iou[layer] (C, T)`` data-set-wide IoU of every unit with every concept, ``concepts (T,)``, ``kinds
    (T,)``, ``images`` how many images went in, ``kind_order`` the kinds a summary counts, in chart order,
    ``support (T,)`` in how many of the images each concept is present (``None`` where not counted)."""

    layers: list[str]
    concepts: list[str]
    kinds: list[str]
    iou: dict[str, np.ndarray]
    images: int
    kind_order: list[str] = field(default_factory=lambda: list(RULE_KINDS))
    support: np.ndarray | None = None

    def best(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Each unit's best concept ``(ids (C,), IoU (C,))`` (the filter labels' :func:`rank_labels`)."""
        ids, scores, _ = rank_labels(self.iou[layer], self.concepts, n=1)
        return ids[:, 0], scores[:, 0]


def dissect_layers(
    lm, dataset: ProbeDataset, layers: Sequence[str], indices: Sequence[int], *, batch_size: int = 32,
    thresholds: dict[str, np.ndarray] | None = None, size: int = EVAL_SIZE,
    report: Callable[[int, int], None] | None = None, min_support: int = MIN_SUPPORT,
) -> LayerDissection:  # fmt: skip
    """Network Dissection of ``layers`` over the records ``indices`` that have a label map (see module doc),
    against the concepts present in at least ``min_support`` of them (:func:`supported_concepts`); ValueError when
    none has a label map or no concept has that support."""
    keep_idx = [int(i) for i in indices if dataset.records[int(i)].mask]
    if not keep_idx:
        raise ValueError("none of these images has a region label map: nothing to dissect")
    concepts, support = supported_concepts(dataset, keep_idx, min_support)
    if not concepts:
        raise ValueError(
            f"no concept is present in {min_support} or more of these {len(keep_idx)} images: dissect more "
            "images or lower min_support"
        )
    kinds, kind_order = concept_kinds(concepts, dataset.regions, dataset.meta.get("concept_kinds"))
    thr = thresholds or layer_thresholds(lm, dataset, layers, keep_idx[:512], batch_size)
    n_slots = len(dataset.regions) + 1

    def batches() -> Iterator[tuple]:
        for batch, x, _ in image_batches(dataset, lm, keep_idx, batch_size):
            labels = np.stack([label_map_crop(dataset, i, lm, size) for i in batch])
            yield (
                batch,
                x,
                labels,
                concept_incidence([dataset.records[i] for i in batch], dataset.regions, concepts),
            )

    say = None if report is None else (lambda done: report(done, len(keep_idx)))
    iou, done = iou_over(lm, layers, batches(), thr, n_slots, len(concepts), say)
    return LayerDissection(list(layers), concepts, kinds, iou, done, kind_order, support)


def layer_summary(diss: LayerDissection, iou_min: float = IOU_MIN) -> list[dict]:
    """Per layer: ``units``, ``interpretable`` (best IoU ≥ iou_min), ``unique`` concepts among them, and per
    kind of ``diss.kind_order`` the interpretable units and unique concepts (``by_kind``, in that order)."""
    out = []
    for name in diss.layers:
        ids, sc = diss.best(name)
        ok = sc >= iou_min
        by_kind = {}
        for kind in diss.kind_order:
            sel = ok & np.array([diss.kinds[int(j)] == kind for j in ids], bool)
            by_kind[kind] = {"units": int(sel.sum()), "unique": len({int(j) for j in ids[sel]})}
        out.append(
            {
                "layer": name,
                "units": len(ids),
                "interpretable": int(ok.sum()),
                "unique": len({int(j) for j in ids[ok]}),
                "median_best_iou": round(float(np.median(sc)), 4),
                "by_kind": by_kind,
            }
        )
    return out


def build_layers_stage(
    bundle, dataset: ProbeDataset, lm, *, layers: Sequence[str] | None = None, max_images: int = 640,
    baseline_images: int = 256, batch_size: int = 32, seed: int = 0, min_support: int = MIN_SUPPORT,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:  # fmt: skip
    """Dissect :func:`dissection_layers` on ``max_images`` fit images with label maps (a seeded draw), and a
    re-initialised copy on ``baseline_images`` of them, each against the concepts present in at least
    ``min_support`` of its images.

    Writes ``layers/names.json``, ``layers/concepts.json``, ``layers/kinds.json``, ``layers/support.json`` (images
    per concept), per layer ``i`` ``layers/iou_<i> (C_i, T)``, and ``layers/summary.json`` ``{"trained": [...],
    "reinitialised": [...], "iou_min", "min_support", "concepts": {"trained": T, "reinitialised": T'}}``
    (:func:`layer_summary`; the baseline's rows are empty, with a ``baseline_note``, where its images leave no
    concept with the support). Skipped, saying why, when the trained network's images leave none.
    """
    from lavise_core.data.dataset import fit_indices

    t0 = time.perf_counter()
    if not dataset.regions or not any(r.mask for r in dataset.records):
        return {"skipped": "the data set has no region label maps (SynthBirds masks, COCO instance masks)"}
    layers = list(layers or dissection_layers(lm))
    fit = np.array([int(i) for i in fit_indices(dataset) if dataset.records[int(i)].mask])
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(fit, min(max_images, len(fit)), replace=False))
    base_pick = pick[:baseline_images]
    if not supported_concepts(dataset, pick, min_support)[0]:
        return {
            "skipped": f"no concept is present in {min_support} or more of the {len(pick)} images dissected "
            "(lower the layers stage's min_support or use a larger data set)"
        }

    def tick(what: str, share: float, offset: float) -> Callable[[int, int], None]:
        def f(done: int, total: int) -> None:
            if report is not None:
                report(int(1000 * (offset + share * done / total)), 1000, f"{what}: {done} / {total} images")

        return f

    diss = dissect_layers(
        lm, dataset, layers, pick, batch_size=batch_size, report=tick("layers", 0.75, 0), min_support=min_support
    )  # fmt: skip
    trained, reinit, base_concepts, note = layer_summary(diss), [], 0, None
    if supported_concepts(dataset, base_pick, min_support)[0]:
        base = dissect_layers(
            reinitialised(lm, seed), dataset, layers, base_pick, batch_size=batch_size,
            report=tick("re-initialised baseline", 0.25, 0.75), min_support=min_support,
        )  # fmt: skip
        reinit, base_concepts = layer_summary(base), len(base.concepts)
    else:
        note = f"no concept is present in {min_support} or more of the baseline's {len(base_pick)} images"
    bundle.write_json("layers/names", layers)
    bundle.write_json("layers/concepts", diss.concepts)
    bundle.write_json("layers/kinds", diss.kinds)
    bundle.write_json("layers/support", [int(v) for v in diss.support])
    for i, name in enumerate(layers):
        bundle.write_array(f"layers/iou_{i}", diss.iou[name])
    summary = {
        "trained": trained, "reinitialised": reinit, "iou_min": IOU_MIN, "min_support": min_support,
        "concepts": {"trained": len(diss.concepts), "reinitialised": base_concepts},
    }  # fmt: skip
    if note:
        summary["baseline_note"] = note
    bundle.write_json("layers/summary", summary)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "images": diss.images,
        "layers": len(layers),
        "interpretable": {s["layer"]: f"{s['interpretable']}/{s['units']}" for s in trained},
        "reinitialised": {s["layer"]: f"{s['interpretable']}/{s['units']}" for s in reinit},
        "min_support": min_support,
        "concepts": summary["concepts"],
    }


def build_stage(ctx: StageContext) -> dict:
    """The ``layers`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_layers_stage` with the build's settings and
    ``options['layers']``."""
    return build_layers_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("layers")
    )  # fmt: skip
