"""Several concept sets, one set of labels (issue 26): each filter's best Network Dissection label over all of them.

Each concept set is dissected in its own bundle (same model and layer: the dissection stage, unchanged). Their
tables are then put side by side: the concepts of the first set, then those of the second, ... with each
concept's IoU, search evidence and the set it comes from. A filter's labels are ranked over all the concepts by
the one-set rule (:func:`~lavise_core.explain.dissection.labels.rank_labels`: highest IoU, part names excluded,
ties to the concept listed first, so to the set given first), so its label is its best over all the sets and
names its set. A concept in two sets stays twice, once per set: the two IoUs were measured on different images.

What the composed stage stores, besides the one-set files (:func:`compose_dissection`):
``dissection/concept_set_ids (T,)`` and, in the stage's manifest record, ``concept_sets`` (their names, in the
order given) and ``concept_set`` (the names joined by " + "). The concept search reads the side-by-side tables
with the strictest of the sets' calibrations (each rate the highest of the sets'); the colour path keeps the
first set that has one.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import numpy as np

from lavise_core.explain.dissection.labels import IOU_MIN, N_LABELS, STAGE, DissectionTables, rank_labels

__all__ = ["COLOUR_FILES", "compose_dissection", "compose_tables", "strictest_calibration"]

#: the colour path's files of a dissection stage (npy arrays, then json), copied from one set as they are
COLOUR_FILES = ("colour_hist.npy", "colour_count.npy", "palette_lab.npy", "palette.json", "regions.json")


def strictest_calibration(calibrations: Sequence[dict | None]) -> dict | None:
    """The concept search's rates for tables of several sets: ``min_rate``, ``floor_rate_part`` and
    ``floor_rate_background`` each the highest of the sets' (a filter is asserted only where every set's rule
    would assert it); ``None`` when no set has a calibration (the search's defaults)."""
    known = [c for c in calibrations if c]
    if not known:
        return None
    out: dict = {"rule": "the strictest of the concept sets' calibrations (each rate the highest)"}
    for key in ("min_rate", "floor_rate_part", "floor_rate_background"):
        values = [float(c[key]) for c in known if key in c]
        if values:
            out[key] = max(values)
    out["sets"] = [
        {k: c.get(k) for k in ("min_rate", "floor_rate_part", "floor_rate_background")} for c in known
    ]
    return out


def compose_tables(
    parts: Sequence[tuple[str, DissectionTables]], n_labels: int = N_LABELS
) -> DissectionTables:
    """The tables of several concept sets side by side, each filter's labels ranked over all of them.

    Args:
        parts: ``[(name, tables)]`` in the order given, each measured on one set (``tables.iou (C, T_s)``, the
            same ``C`` filters), the names distinct.
        n_labels: ranked labels kept per filter (at most the number of non-part concepts).

    Returns:
        :class:`DissectionTables` with ``concepts`` (T = Σ T_s), ``iou / rate / mean_iou (C, T)`` and ``is_part``
        concatenated in that order, ``label_ids / label_scores (C, L)`` ranked by
        :func:`~lavise_core.explain.dissection.labels.rank_labels`, ``concept_sets`` the names and
        ``concept_set_ids (T,)``; the colour path and regions of the first set that has one; the strictest
        calibration (:func:`strictest_calibration`).
    """
    if len(parts) < 2:
        raise ValueError("composing concept sets needs at least two of them")
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"the concept sets' names must differ to say where a label comes from: {names}")
    channels = {int(np.asarray(d.iou).shape[0]) for _, d in parts}
    if len(channels) != 1:
        raise ValueError(
            f"the concept sets' tables have different filter counts {sorted(channels)}: another layer"
        )
    concepts = [c for _, d in parts for c in d.concepts]
    set_ids = np.concatenate([np.full(len(d.concepts), i, np.int64) for i, (_, d) in enumerate(parts)])
    iou = np.concatenate([np.asarray(d.iou, np.float32) for _, d in parts], axis=1)
    is_part = np.concatenate([np.asarray(d.is_part, bool) for _, d in parts])
    ids, scores, _ = rank_labels(iou, concepts, n=min(n_labels, int((~is_part).sum())), allowed=~is_part)
    colour = next(((d.colour, d.regions) for _, d in parts if d.colour is not None), (None, []))
    return DissectionTables(
        concepts=concepts,
        iou=iou,
        label_ids=ids,
        label_scores=scores,
        rate=np.concatenate([np.asarray(d.rate, np.float32) for _, d in parts], axis=1),
        mean_iou=np.concatenate([np.asarray(d.mean_iou, np.float32) for _, d in parts], axis=1),
        is_part=is_part,
        regions=list(colour[1]),
        colour=colour[0],
        calibration=strictest_calibration([d.calibration for _, d in parts]),
        concept_sets=names,
        concept_set_ids=set_ids,
    )


def compose_dissection(bundle, parts: Sequence[tuple[str, object]], n_labels: int = N_LABELS) -> dict:
    """Write the composed dissection stage of several concept sets' bundles into ``bundle``.

    ``parts``: ``[(name, source bundle)]``, each with its own finished dissection stage (same model and layer as
    ``bundle``). Replaces ``bundle``'s ``dissection/`` folder with :func:`compose_tables`' tables (the one-set
    files plus ``dissection/concept_set_ids``), copies the colour path's files (:data:`COLOUR_FILES`) from the
    first set that has them, and returns the stage's manifest record (the caller marks the stage):
    the first set's recipe, ``concept_sets``, ``concept_set``, per set how many filters take their label from it.
    """
    tables = compose_tables([(name, DissectionTables.from_bundle(b)) for name, b in parts], n_labels)
    folder = bundle.root / STAGE
    if folder.exists():  # what an earlier set lent (hard links: unlinking leaves the set's own bundle intact)
        shutil.rmtree(folder)
    colour_from = next((b for _, b in parts if b.has("dissection/colour_hist")), None)
    if colour_from is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in COLOUR_FILES:
            src = colour_from.root / STAGE / name
            if src.is_file():
                tmp = folder / f".{name}.compose"
                shutil.copyfile(src, tmp)
                tmp.replace(folder / name)
    if tables.calibration is not None:
        bundle.write_json("dissection/search_calibration", tables.calibration)
    bundle.write_json("dissection/concepts", tables.concepts)
    bundle.write_array("dissection/iou", tables.iou)
    bundle.write_array("dissection/label_ids", tables.label_ids)
    bundle.write_array("dissection/label_scores", tables.label_scores)
    bundle.write_array("dissection/rate", tables.rate)
    bundle.write_array("dissection/mean_iou", tables.mean_iou)
    bundle.write_array("dissection/is_part", tables.is_part)
    bundle.write_array("dissection/concept_set_ids", tables.concept_set_ids)
    best = tables.label_ids[:, 0]
    shown = tables.label_scores[:, 0] >= IOU_MIN
    from_set = tables.concept_set_ids[best]
    first = parts[0][1].manifest.get("stages", {}).get(STAGE, {})
    return {
        "recipe": first.get("recipe"),
        "concept_sets": list(tables.concept_sets),
        "concept_set": " + ".join(tables.concept_sets),
        "concepts": len(tables.concepts),
        "labelled_filters": int(shown.sum()),
        "labels_from": {n: int((shown & (from_set == i)).sum()) for i, n in enumerate(tables.concept_sets)},
        "unique_labels": len({int(j) for j in best[shown]}),
        "median_best_iou": round(float(np.median(tables.label_scores[:, 0])), 4),
    }
