"""The Layers page's training section, read from a bundle's trajectory.json (issue 28)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from lavise_core.views import TRAJECTORY_FILE, trajectory_view


def _layer(name: str, units: int, ok: int, unique: int) -> dict:
    return {"layer": name, "units": units, "interpretable": ok, "unique": unique, "by_kind": {}}


def test_the_trajectory_becomes_rows_per_checkpoint_and_layer(tmp_path):
    ws = SimpleNamespace(bundle=SimpleNamespace(root=tmp_path))  # the view reads only the bundle's folder
    assert trajectory_view(ws) is None
    (tmp_path / TRAJECTORY_FILE).write_text("{not json")
    assert trajectory_view(ws) is None
    t = {
        "images": 320,
        "checkpoints": [
            {"checkpoint": "a.json", "epoch": 1, "accuracy": 0.5, "layers": [_layer("f.2", 16, 4, 3), _layer("f", 8, 2, 2)]},
            {"checkpoint": "b.json", "epoch": None, "accuracy": 0.9, "layers": [_layer("f.2", 16, 8, 5), _layer("f", 8, 6, 4)]},
        ],
        "changes": [{"filter": 3, "checkpoint": "b.json", "index": 1, "from": None, "to": "red breast"}],
        "skipped": [{"checkpoint": "c.json", "error": "unreadable"}],
    }  # fmt: skip
    (tmp_path / TRAJECTORY_FILE).write_text(json.dumps(t))
    v = trajectory_view(ws)
    assert [(u["checkpoint"], u["layer"], u["interpretable"], u["share"]) for u in v.units] == [
        ("epoch 1", "f.2", 4, 0.25), ("epoch 1", "f", 2, 0.25), ("checkpoint 2", "f.2", 8, 0.5), ("checkpoint 2", "f", 6, 0.75),
    ]  # fmt: skip
    assert [a["accuracy"] for a in v.accuracy] == [0.5, 0.9]
    assert v.changes == [{"filter": 3, "at": "checkpoint 2", "from": "(no label)", "to": "red breast"}]
    assert v.summary == (
        "2 checkpoints of one training run, dissected against the same 320 probe images; 1 label changes among "
        "the explained layer's filters; 1 checkpoint(s) could not be read and were skipped."
    )
