"""The Layers page's training section: a trajectory (``lavise trajectory``) of the bundle's network, if one exists.

The file is ``<bundle>/trajectory.json`` (``lavise trajectory ... --out <bundle>/trajectory.json``), the dict of
:func:`lavise_core.explain.dissection.trajectory.dissect_series`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavise_core.views.workspace import Workspace

__all__ = ["TRAJECTORY_FILE", "TrajectoryView", "trajectory_view"]

#: where the Layers page looks for a trajectory of the bundle's network
TRAJECTORY_FILE = "trajectory.json"


@dataclass(frozen=True)
class TrajectoryView:
    """One row per checkpoint and layer (``checkpoint, epoch, layer, interpretable, units, share, unique``), the
    accuracy per checkpoint (``checkpoint, epoch, accuracy``), the label changes of the explained layer's filters
    (``filter, epoch, from, to``), and a sentence saying what was dissected."""

    units: list[dict[str, Any]]
    accuracy: list[dict[str, Any]]
    changes: list[dict[str, Any]]
    summary: str


def _name(row: dict, i: int) -> str:
    return f"epoch {row['epoch']}" if row.get("epoch") is not None else f"checkpoint {i + 1}"


def trajectory_view(ws: Workspace) -> TrajectoryView | None:
    """The bundle's trajectory, or None when it has none (or the file cannot be read as one)."""
    path = Path(ws.bundle.root) / TRAJECTORY_FILE
    try:
        t = json.loads(path.read_text(encoding="utf-8"))
        rows = list(t["checkpoints"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not rows:
        return None
    names = [_name(r, i) for i, r in enumerate(rows)]
    units = [
        {"checkpoint": names[i], "epoch": r.get("epoch"), "layer": ly["layer"],
         "interpretable": int(ly["interpretable"]), "units": int(ly["units"]),
         "share": int(ly["interpretable"]) / max(int(ly["units"]), 1), "unique": int(ly.get("unique", 0))}
        for i, r in enumerate(rows) for ly in r["layers"]
    ]  # fmt: skip
    accuracy = [
        {"checkpoint": names[i], "epoch": r.get("epoch"), "accuracy": r.get("accuracy")}
        for i, r in enumerate(rows)
    ]
    changes = [
        {"filter": int(c["filter"]), "at": names[int(c["index"])], "from": c["from"] or "(no label)",
         "to": c["to"] or "(no label)"}
        for c in t.get("changes", [])
        if 0 <= int(c.get("index", -1)) < len(rows)
    ]  # fmt: skip
    skipped = t.get("skipped") or []
    summary = (
        f"{len(rows)} checkpoints of one training run, dissected against the same {t.get('images', '?')} probe "
        f"images; {len(changes)} label changes among the explained layer's filters"
        + (f"; {len(skipped)} checkpoint(s) could not be read and were skipped" if skipped else "")
        + "."
    )
    return TrajectoryView(units, accuracy, changes, summary)
