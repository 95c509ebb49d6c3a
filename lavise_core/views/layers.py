"""The Layers page: Network Dissection across layers (``layers`` stage), summary, chart and per-layer units."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lavise_core.api import build_hint
from lavise_core.explain.dissection.labels import IOU_MIN
from lavise_core.views.workspace import StageMissing, Workspace

__all__ = ["LayersView", "layer_units", "layers_view", "shown_layer_names"]

KIND_ORDER = ("part", "colour", "pattern/shape", "background")


@dataclass
class LayersView:
    """``rows``: per layer ``{layer, units, interpretable, share, unique, <kind> units / unique ...,
    reinit_interpretable, reinit_share}``; ``layers`` their names; ``iou_min``; ``images`` dissected."""

    rows: list[dict]
    layers: list[str]
    iou_min: float
    images: int
    sentences: list[str]


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
    for r in summary["trained"]:
        row = {
            "layer": shown[r["layer"]],
            "units": r["units"],
            "interpretable": r["interpretable"],
            "share": round(r["interpretable"] / max(r["units"], 1), 3),
            "unique concepts": r["unique"],
        }
        for kind in KIND_ORDER:
            row[f"{kind} units"] = r["by_kind"][kind]["units"]
            row[f"{kind} concepts"] = r["by_kind"][kind]["unique"]
        if r["layer"] in base:
            row["re-initialised interpretable"] = base[r["layer"]]["interpretable"]
            row["re-initialised share"] = round(base[r["layer"]]["interpretable"] / max(r["units"], 1), 3)
        rows.append(row)
        kinds = ", ".join(f"{r['by_kind'][k]['units']} {k}" for k in KIND_ORDER if r["by_kind"][k]["units"])
        sentences.append(
            f"`{shown[r['layer']]}`: {r['interpretable']} of {r['units']} units interpretable "
            f"(IoU ≥ {summary.get('iou_min', IOU_MIN):g}), {r['unique']} unique concepts"
            + (f" — {kinds}" if kinds else "")
        )
    info = b.manifest.get("stages", {}).get("layers", {})
    return LayersView(rows, [r["layer"] for r in rows], float(summary.get("iou_min", IOU_MIN)),
                      int(info.get("images", 0)), sentences)  # fmt: skip


def layer_units(ws: Workspace, layer: str, iou_min: float = IOU_MIN) -> list[dict]:
    """Every unit of ``layer`` with its best concept, IoU, kind and the runner-up; ValueError for an unknown layer."""
    names = ws.bundle.read_json("layers/names")
    shown = shown_layer_names(ws, names)
    if layer in shown:  # the name the page shows (``features``); the recorded one (``features.20``) works too
        i = shown.index(layer)
    elif layer in names:
        i = names.index(layer)
    else:
        raise ValueError(f"?layer={layer} was not dissected; dissected layers: {', '.join(shown)}")
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
