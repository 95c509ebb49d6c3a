"""The Layers page: Network Dissection across layers (``layers`` stage), summary, chart and per-layer units."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lavise_core.api import build_hint
from lavise_core.explain.dissection.labels import IOU_MIN
from lavise_core.explain.dissection.layers import chart_order
from lavise_core.views.overlays import encode_jpeg, outline
from lavise_core.views.workspace import StageMissing, Workspace

__all__ = [
    "LAYER_SAMPLE",
    "UNIT_TOP",
    "LayersView",
    "UnitTops",
    "even_sample",
    "layer_tops",
    "layer_units",
    "layers_view",
    "merge_tops",
    "recorded_layer",
    "shown_layer_names",
    "top_per_unit",
    "unit_gallery",
    "unit_images",
    "unit_label",
]

#: probe images a layer's units are ranked on when the bundle stores no ranking for it (evenly spread)
LAYER_SAMPLE = 300
#: top images kept per unit
UNIT_TOP = 6


@dataclass
class LayersView:
    """``rows``: per layer ``{layer, units, interpretable, share, unique, <kind> units / unique ...,
    reinit_interpretable, reinit_share}``; ``layers`` their names; ``iou_min``; ``images`` dissected; ``kinds`` the
    concept kinds counted, in chart order (:func:`chart_order` of the stage's ``by_kind``: colour, texture, shape, part, background
    for a set that names its kinds, part, colour, pattern/shape, background for SynthBirds)."""

    rows: list[dict]
    layers: list[str]
    iou_min: float
    images: int
    sentences: list[str]
    kinds: tuple[str, ...] = ()


def shown_layer_names(ws: Workspace, recorded: list[str]) -> list[str]:
    """How the dashboard names each recorded layer: the explained layer by the bundle's name for it
    (``ws.bundle.layer``, as every other page says it), also where the ``layers`` stage recorded the same
    output under a child's name (the demo CNN's ``features.20`` is ``features``); other layers by their own."""
    if ws.bundle.layer in recorded:
        return list(recorded)
    from lavise_core.models.networks import output_aliases

    same = set(output_aliases(ws.model().model, ws.bundle.layer))
    return [ws.bundle.layer if name in same else name for name in recorded]


def layers_view(ws: Workspace) -> LayersView:
    """The ``layers`` stage's summary as table rows and one sentence per layer; :class:`StageMissing` if absent."""
    b = ws.bundle
    if not b.has("layers/summary.json"):
        raise StageMissing(
            "this bundle has no dissection across layers yet: build it with "
            f"`{build_hint(b).replace('lavise build', 'lavise build --stages layers', 1)}`"
        )
    summary = b.read_json("layers/summary")
    base = {r["layer"]: r for r in summary.get("reinitialised", [])}
    rows, sentences = [], []
    names = [r["layer"] for r in summary["trained"]]
    shown = dict(zip(names, shown_layer_names(ws, names), strict=True))
    kind_order = tuple(chart_order(list(summary["trained"][0]["by_kind"]))) if summary["trained"] else ()
    for r in summary["trained"]:
        row = {
            "layer": shown[r["layer"]],
            "units": r["units"],
            "interpretable": r["interpretable"],
            "share": round(r["interpretable"] / max(r["units"], 1), 3),
            "unique concepts": r["unique"],
        }
        for kind in kind_order:
            row[f"{kind} units"] = r["by_kind"][kind]["units"]
            row[f"{kind} concepts"] = r["by_kind"][kind]["unique"]
        if r["layer"] in base:
            row["re-initialised interpretable"] = base[r["layer"]]["interpretable"]
            row["re-initialised share"] = round(base[r["layer"]]["interpretable"] / max(r["units"], 1), 3)
        rows.append(row)
        kinds = ", ".join(f"{r['by_kind'][k]['units']} {k}" for k in kind_order if r["by_kind"][k]["units"])
        sentences.append(
            f"`{shown[r['layer']]}`: {r['interpretable']} of {r['units']} units interpretable, "
            f"{r['unique']} unique concepts" + (f" — {kinds}" if kinds else "")
        )
    info = b.manifest.get("stages", {}).get("layers", {})
    return LayersView(rows, [r["layer"] for r in rows], float(summary.get("iou_min", IOU_MIN)),
                      int(info.get("images", 0)), sentences, kind_order)  # fmt: skip


def layer_units(ws: Workspace, layer: str, iou_min: float = IOU_MIN) -> list[dict]:
    """Every unit of ``layer`` with its best concept, IoU, kind and the runner-up; ValueError for an unknown layer."""
    i = recorded_layer(ws, layer)
    iou = np.asarray(ws.bundle.array(f"layers/iou_{i}"), np.float32)
    concepts = ws.bundle.read_json("layers/concepts")
    kinds = ws.bundle.read_json("layers/kinds")
    order = np.argsort(-iou, axis=1, kind="stable")[:, :2]
    out = []
    for k in range(iou.shape[0]):
        j, j2 = int(order[k, 0]), int(order[k, 1])
        out.append(
            {
                "unit": k,
                "best concept": concepts[j],
                "IoU": round(float(iou[k, j]), 4),
                "kind": kinds[j],
                "interpretable": bool(iou[k, j] >= iou_min),
                "runner-up": f"{concepts[j2]} ({iou[k, j2]:.3f})",
            }
        )
    return out


def recorded_layer(ws: Workspace, layer: str) -> int:
    """The ``layers`` stage's index of ``layer`` (the shown name or the recorded one); ValueError if not recorded."""
    names = ws.bundle.read_json("layers/names")
    shown = shown_layer_names(ws, names)
    if layer in shown:  # the name the page shows (``features``); the recorded one (``features.20``) works too
        return shown.index(layer)
    if layer in names:
        return names.index(layer)
    raise ValueError(f"?layer={layer} was not dissected; dissected layers: {', '.join(shown)}")


def even_sample(total: int, n: int) -> np.ndarray:
    """``min(n, total)`` indices spread evenly over ``0..total-1`` (first and last included), ascending."""
    if total <= 0 or n <= 0:
        return np.zeros(0, np.int64)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))


def top_per_unit(maxima: np.ndarray, k: int) -> np.ndarray:
    """``(C, min(k, N))`` rows of ``maxima (N, C)`` with each unit's largest values, largest first (ties: lower
    row first)."""
    m = np.asarray(maxima, np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected maxima (N images, C units), got shape {m.shape}")
    return np.argsort(-m, axis=0, kind="stable")[:k].T


@dataclass
class UnitTops:
    """Every unit's top images in one recorded layer.

    ``index (C, k)``: probe image indices (-1: none), ``value (C, k)``: the unit's largest activation on each,
    ``maps (C, k, h, w)``: its spatial maps there; ``ranked``: how many probe images were ranked, of ``total``
    (all of them for the explained layer, whose ranking the bundle stores; an even sample for the others)."""

    layer: str
    index: np.ndarray
    value: np.ndarray
    maps: np.ndarray
    ranked: int
    total: int

    @property
    def exact(self) -> bool:
        return self.ranked >= self.total


def layer_tops(ws: Workspace, layer: str, n_images: int = LAYER_SAMPLE, k: int = UNIT_TOP) -> UnitTops:
    """Top-``k`` probe images of every unit of a layer the ``layers`` stage recorded (cached in the workspace).

    The explained layer uses the probe stage's ranking over every probe image; another layer is ranked by
    each unit's largest spatial activation on ``n_images`` probe images spread over the set (one forward pass
    with a hook on that layer, keeping a running top-``k`` with the maps)."""
    i = recorded_layer(ws, layer)
    recorded = ws.bundle.read_json("layers/names")[i]
    shown = shown_layer_names(ws, ws.bundle.read_json("layers/names"))[i]
    return ws.maps.get(
        ("layer_tops", recorded, n_images, k), lambda: _layer_tops(ws, recorded, shown, n_images, k)
    )


def _layer_tops(ws: Workspace, recorded: str, shown: str, n_images: int, k: int) -> UnitTops:
    ws.require_probe()
    ds = ws.dataset()
    if ds is None:
        raise ValueError(f"the probe set is unavailable: {ws.dataset_error()}")
    if shown == ws.bundle.layer and ws.array("probe/top_index") is not None:
        index = np.asarray(ws.array("probe/top_index")[:, :k], np.int64)
        value = np.asarray(ws.array("probe/top_value")[:, :k], np.float32)
        maps = np.asarray(ws.array("probe/top_maps")[:, :k], np.float32)
        return UnitTops(shown, index, value, maps, len(ds), len(ds))
    import torch

    from lavise_core.models.networks import record_layer
    from lavise_core.pipeline.probe import image_batches

    lm = ws.model()
    idx = even_sample(len(ds), n_images)
    tops: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    seen = 0
    with lm.lock, torch.no_grad(), record_layer(lm.model, recorded) as rec:  # a hooked pass: under the lock
        for batch, x, _ in image_batches(ds, lm, idx, 32):
            lm.model(x.to(next(lm.model.parameters()).device))
            out = rec.output.float().cpu().numpy()  # (B, C, h, w)
            tops = merge_tops(tops, np.asarray(batch, np.int64), out, k)
            seen += len(batch)
    if tops is None:
        raise ValueError("none of the probe images could be read")
    index, value, maps = tops
    return UnitTops(shown, index, value, maps, seen, len(ds))


def merge_tops(
    tops: tuple[np.ndarray, np.ndarray, np.ndarray] | None, images: np.ndarray, out: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Running top-``k`` per unit: ``(index (C, k), value (C, k), maps (C, k, h, w))`` merged with a batch
    ``out (B, C, h, w)`` of the probe images ``images (B,)``; value = a unit's largest spatial activation, ties
    kept in arrival order (the earlier image first)."""
    value_b = out.max(axis=(2, 3)).T  # (C, B)
    index_b = np.broadcast_to(images[None, :], value_b.shape)
    maps_b = out.transpose(1, 0, 2, 3)  # (C, B, h, w)
    if tops is not None:
        index_b = np.concatenate([tops[0], index_b], 1)
        value_b = np.concatenate([tops[1], value_b], 1)
        maps_b = np.concatenate([tops[2], maps_b], 1)
    order = np.argsort(-value_b, axis=1, kind="stable")[:, :k]
    return (
        np.take_along_axis(index_b, order, 1).astype(np.int64),
        np.take_along_axis(value_b, order, 1).astype(np.float32),
        np.take_along_axis(maps_b, order[:, :, None, None], 1).astype(np.float32),
    )


def unit_images(
    ws: Workspace, tops: UnitTops, unit: int, side: int = 160, n: int | None = None
) -> list[tuple[bytes, int, float]]:
    """``[(JPEG, probe image, activation)]`` of ``unit``'s top images, each outlined where the unit fires at
    half its largest activation over those images or more (the image's own colours everywhere else)."""
    if not 0 <= unit < tops.index.shape[0]:
        raise ValueError(
            f"there is no unit {unit}: layer {tops.layer} has units 0..{tops.index.shape[0] - 1}"
        )
    maps = tops.maps[unit]
    level = 0.5 * float(maps.max()) if maps.size and maps.max() > 0 else float("inf")
    out = []
    for i, v, m in list(zip(tops.index[unit], tops.value[unit], maps, strict=True))[:n]:
        if i < 0:
            continue
        img: Image.Image = ws.record_image(int(i), side=side)
        out.append((encode_jpeg(outline(img, m, level)), int(i), float(v)))
    return out


def unit_label(row: dict) -> str:
    """How a unit is named from its :func:`layer_units` row: its best concept when interpretable, else "no label"
    with the best concept's overlap (its IoU), so a weak match does not read as a label."""
    if row["interpretable"]:
        return f"{row['best concept']} (overlap {row['IoU']:.3f})"
    return f"no label (best: {row['best concept']}, overlap {row['IoU']:.3f})"


def unit_gallery(ws: Workspace, tops: UnitTops, side: int = 96) -> list[bytes]:
    """Each unit's top image, outlined as in :func:`unit_images`, as JPEG (cached in the workspace)."""

    def make() -> list[bytes]:
        return [unit_images(ws, tops, u, side, n=1)[0][0] for u in range(tops.index.shape[0])]

    return ws.maps.get(("unit_gallery", tops.layer, tops.ranked, side), make)
