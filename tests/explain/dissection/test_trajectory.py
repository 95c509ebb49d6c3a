"""Training trajectories: --save-every series, labels at the last checkpoint = a layers build, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lavise_core.data.dataset import ProbeDataset
from lavise_core.data.synthbirds import generate_synthbirds
from lavise_core.explain.dissection.labels import IOU_MIN, rank_labels
from lavise_core.explain.dissection.trajectory import ONE_CHECKPOINT, dissect_series, label_changes
from lavise_core.models import demo_cnn
from lavise_core.models.networks import load_model
from tests.conftest import build_stage

KW = dict(seed=3, epochs=3, progress=False, threads=1, width=16, batch_size=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProbeDataset, Path]:
    """A tiny SynthBirds set and a 3-epoch run of the demo CNN saved every epoch (two epoch files + the final)."""
    root = tmp_path_factory.mktemp("traj")
    ds = generate_synthbirds(root / "sb", n=36, image_size=48, progress=False)
    demo_cnn.train_demo(ds.root, root / "run", save_every=1, **KW)
    return ds, root / "run"


def series(run_dir: Path) -> list[str]:
    return [str(run_dir / f"synthbirds_cnn.epoch00{e}.json") for e in (1, 2)] + [
        str(run_dir / demo_cnn.CARD_FILE)
    ]


def test_save_every_writes_a_series_and_leaves_the_final_checkpoint_unchanged(run, tmp_path) -> None:
    ds, run_dir = run
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        f"synthbirds_cnn{s}.{x}" for s in (".epoch001", ".epoch002", "") for x in ("json", "safetensors")
    )
    card = json.loads((run_dir / demo_cnn.CARD_FILE).read_text())
    assert card["series"] == [Path(s).name for s in series(run_dir)]
    plain = demo_cnn.train_demo(ds.root, tmp_path / "plain", **KW)
    assert "series" not in plain
    final = (run_dir / demo_cnn.WEIGHTS_FILE).read_bytes()
    assert final == (tmp_path / "plain" / demo_cnn.WEIGHTS_FILE).read_bytes()
    assert json.loads((run_dir / "synthbirds_cnn.epoch002.json").read_text())["epoch"] == 2
    assert (run_dir / "synthbirds_cnn.epoch001.safetensors").read_bytes() != final
    with pytest.raises(ValueError, match="--save-every must be >= 1"):
        demo_cnn.train_demo(ds.root, tmp_path / "x", save_every=0, **KW)


def test_last_labels_equal_a_single_layers_build(run, tmp_path) -> None:
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    ds, run_dir = run
    r = dissect_series(series(run_dir), ds, min_support=1)  # 36 images: every concept competes
    assert [c["epoch"] for c in r["checkpoints"]] == [1, 2, 3] and r["note"] is None and r["skipped"] == []
    assert r["explained_layer"] == "features" and r["recorded_as"] == "features.20"
    last = r["checkpoints"][-1]
    lm = load_model(series(run_dir)[-1])
    bundle = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=2, batch_size=8, num_workers=0, progress=False))
    build_stage(bundle, ds, "layers", lm, baseline_images=4, min_support=1)
    names = bundle.read_json("layers/names")
    assert names == r["layers"]
    concepts = bundle.read_json("layers/concepts")
    iou = np.asarray(bundle.array(f"layers/iou_{names.index('features.20')}"))
    ids, sc, _ = rank_labels(iou, concepts, n=1)
    single = [concepts[int(j)] if s >= IOU_MIN else None for j, s in zip(ids[:, 0], sc[:, 0], strict=True)]
    assert last["labels"] == single and any(last["labels"])  # exact, and some filter has a label
    assert last["label_iou"] == [round(float(s), 4) for s in sc[:, 0]]
    trained = bundle.read_json("layers/summary")["trained"]
    assert [(x["interpretable"], x["unique"]) for x in last["layers"]] == [
        (x["interpretable"], x["unique"]) for x in trained
    ]
    # the accuracy on the test split is the trainer's own
    assert last["accuracy"] == round(
        json.loads((run_dir / demo_cnn.CARD_FILE).read_text())["test_accuracy"], 4
    )
    # every change is between consecutive checkpoints and matches the labels
    for c in r["changes"]:
        i, k = c["index"], c["filter"]
        assert (
            r["checkpoints"][i - 1]["labels"][k] == c["from"] != c["to"] == r["checkpoints"][i]["labels"][k]
        )


def test_label_changes_exact() -> None:
    got = label_changes(["a", "b", "c"], [["x", None], ["y", None], ["y", "z"]])
    assert got == [
        {"filter": 0, "checkpoint": "b", "index": 1, "from": "x", "to": "y"},
        {"filter": 1, "checkpoint": "c", "index": 2, "from": None, "to": "z"},
    ]


def test_bad_input(run, tmp_path) -> None:
    ds, run_dir = run
    specs = series(run_dir)
    # one checkpoint: dissected, and it says there is nothing to compare
    one = dissect_series(specs[-1:], ds)
    assert one["note"] == ONE_CHECKPOINT and one["changes"] == [] and len(one["checkpoints"]) == 1
    # a checkpoint that fails to load in the middle: reported and skipped, the rest kept
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(specs[0], bad / "synthbirds_cnn.epoch002.json")
    weights = (run_dir / "synthbirds_cnn.epoch002.safetensors").read_bytes()
    (bad / "synthbirds_cnn.epoch002.safetensors").write_bytes(weights[: len(weights) // 2])
    r = dissect_series([specs[0], str(bad / "synthbirds_cnn.epoch002.json"), specs[2]], ds)
    assert [c["checkpoint"] for c in r["checkpoints"]] == [specs[0], specs[2]]
    assert len(r["skipped"]) == 1 and "truncated" in r["skipped"][0]["error"]
    assert r["checkpoints"][-1]["labels"] == one["checkpoints"][0]["labels"]
    # another architecture in the series: refused, naming it
    demo_cnn.train_demo(ds.root, tmp_path / "wide", **(KW | {"epochs": 1, "width": 32}))
    odd = str(tmp_path / "wide" / demo_cnn.CARD_FILE)
    with pytest.raises(ValueError, match=rf"{odd} is not the same network as .*epoch001.*has shape"):
        dissect_series([specs[0], odd, specs[2]], ds)
    with pytest.raises(ValueError, match="none of the checkpoints could be loaded"):
        dissect_series([str(tmp_path / "missing.json")], ds)


def test_cli_trajectory(run, tmp_path, capsys) -> None:
    from lavise_core.cli.parser import main

    ds, run_dir = run
    out = tmp_path / "t.json"
    assert (
        main(["trajectory", *series(run_dir)[1:], "--data", str(ds.root), "--out", str(out), "--quiet"]) == 0
    )
    r = json.loads(out.read_text())
    assert len(r["checkpoints"]) == 2 and "changed their label" in capsys.readouterr().out
    assert main(["trajectory", series(run_dir)[0], "--data", str(ds.root), "--out", str(out), "--quiet"]) == 0
    assert "nothing to compare" in capsys.readouterr().out
