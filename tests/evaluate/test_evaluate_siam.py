"""SIAM evaluation: exact top-5 precision, the stage on a tiny trained SIAM, skips and mismatches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import ROOT

from lavise_core.evaluate.siam import build_siam_eval_stage, evaluate_siam_bundle, top5_precision
from lavise_core.models.siam import SiamError


def test_top5_precision_exact() -> None:
    scores = np.array([[5, 4, 3, 2, 1, 0, -1.0], [1, -1, -1, -1, -1, -1, -1.0]])
    truth = np.array([[1, 0, 1, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], bool)
    assert top5_precision(scores, truth) == (3 / 5 + 1 / 5) / 2  # row 2 says one attribute only
    assert top5_precision(scores, truth, positive_only=False) == (3 / 5 + 1 / 5) / 2


@pytest.fixture(scope="module")
def tiny_siam(tmp_path_factory):
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.models.networks import load_model
    from lavise_core.models.siam import train_siam

    tmp = tmp_path_factory.mktemp("siam_eval")
    ds = generate_synthbirds(tmp / "birds", n=24, seed=1, image_size=64, progress=False)
    train_siam(ds.root, tmp / "m", ROOT / "models/synthbirds_cnn.json", head_epochs=1, finetune_epochs=0,
               threads=1, progress=False, keep="frozen-templates")  # fmt: skip
    return ds, load_model(str(tmp / "m/synthbirds_siam.json"))


def test_evaluation_of_a_tiny_siam(tiny_siam, tmp_path) -> None:
    from lavise_core.explain.siam import class_attribute_weights, explain_siam

    ds, lm = tiny_siam
    out = evaluate_siam_bundle(ds, lm)
    assert out["decomposition_max_error"] < 1e-5 and len(out["pck"]) == 3 and out["n_pairs"] > 0
    assert 0 <= out["pointing_game"] <= 1 and 0 <= out["top5_precision_sentence"] <= 100
    ex = explain_siam(lm, lm.preprocess(ds.load_image(0))[None])
    assert abs(ex.bias + sum(v for _, v in ex.contributions) - ex.score) < 1e-5
    assert ex.sentence.startswith(f"This is a {ex.target}")
    assert class_attribute_weights(lm).shape == (12, len(lm.card["attributes"]))
    bad = dataclasses.replace(
        lm, card={**lm.card, "attributes": [*lm.card["attributes"][:-1], "glowing wing"]}
    )
    with pytest.raises(SiamError, match="not the data set's"):
        evaluate_siam_bundle(ds, bad)


def test_stage_skips_other_models(tmp_path, colour_dataset, identity_model) -> None:
    from lavise_core.explain.siam import siam_net
    from lavise_core.pipeline.probe import open_or_create_bundle

    b = open_or_create_bundle(tmp_path / "bundles", identity_model, colour_dataset)
    assert "not a SIAM model" in build_siam_eval_stage(b, colour_dataset, identity_model)["skipped"]
    with pytest.raises(SiamError, match="not a SIAM model"):
        siam_net(identity_model)


def test_siam_bundle_views(tiny_siam, tmp_path) -> None:
    from lavise_core import views
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    ds, lm = tiny_siam
    b = open_or_create_bundle(tmp_path / "bundles", lm, ds)
    run_probe(b, lm, ds, ProbeSettings(top_k=4, batch_size=16, num_workers=0, progress=False))
    ws = views.Workspace(b, model_loader=lambda: lm)
    assert views.is_siam_bundle(ws)
    assert ws.shown_labels().labels == lm.card["attributes"]  # each map is named by its attribute
    sv = views.siam_view(ws, ws.analyse(ds.load_image(0)), n=5)
    assert [t for t, _ in sv.waterfall][-1] == "other attributes" and len(sv.waterfall) == 6
    assert abs(sv.bias + sum(v for _, v in sv.waterfall) - sv.score) < 1e-5  # the waterfall ends at the score
    w = views.siam_class_weights(ws, ws.classes[0], n=4)
    assert len(w) == 4 and abs(w[0][1]) >= abs(w[-1][1])
