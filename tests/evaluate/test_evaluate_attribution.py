"""Attribution faithfulness: exact deletion / insertion curves on a hand-built model, the discriminative parts
from the species definitions, the cascade order, and one small end-to-end run on SynthBirds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavise_core.evaluate.attribution import (
    AttributionEvalSettings,
    cascading_layers,
    deletion_insertion,
    discriminative_parts,
    evaluate_attribution,
    format_attribution,
)
from lavise_core.explain.attribution.base import AttributionError
from lavise_core.explain.attribution.faithfulness import curve_auc, pixel_ranks
from lavise_core.models.networks import load_model


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    from lavise_core.data.synthbirds import generate_synthbirds

    return generate_synthbirds(
        tmp_path_factory.mktemp("b") / "birds", n=40, seed=0, image_size=128, progress=False
    )


def test_deletion_and_insertion_curves_by_hand(identity_model) -> None:
    """IdentityCNN: logit k = mean of channel k (ReLU'd). A red square on black: deleting it in the map's order
    takes p(red) to the uniform 1/3 after exactly the square's pixels; insertion on a blurred canvas ends at p(x)."""
    x = torch.zeros(1, 3, 16, 16)
    x[0, 0, 4:8, 4:8] = 4.0
    importance = torch.zeros(1, 16, 16)
    importance[0, 4:8, 4:8] = 1.0
    gen = torch.Generator().manual_seed(0)
    d, n = deletion_insertion(
        identity_model.model, x, torch.tensor([0]), pixel_ranks(importance, gen), steps=16
    )
    p_x = float(torch.softmax(identity_model.model(x), 1)[0, 0])
    assert d[0, 0] == pytest.approx(p_x) and n[0, -1] == pytest.approx(p_x)
    assert d[0, 1:] == pytest.approx(np.full(16, 1 / 3))  # 16 px per step: the square is gone after step 1
    rd, rn = deletion_insertion(
        identity_model.model, x, torch.tensor([0]), pixel_ranks(torch.zeros(1, 16, 16), gen), 16
    )
    assert curve_auc(d)[0] < curve_auc(rd)[0] and curve_auc(n)[0] > curve_auc(rn)[0]


def test_ranks_put_the_largest_first_and_break_ties_at_random() -> None:
    m = torch.tensor([[[0.0, 3.0], [1.0, 0.0]]])
    r = pixel_ranks(m, torch.Generator().manual_seed(0))[0].tolist()
    assert r[1] == 0 and r[2] == 1 and sorted(r) == [0, 1, 2, 3]


def test_discriminative_parts_from_the_species_definitions(birds) -> None:
    assert discriminative_parts(birds, "scarlet-capped warbler") == (["crown", "tail", "wing"], ["crown"])
    assert discriminative_parts(birds, "emerald sunbird") == (["beak", "belly", "wing"], [])
    with pytest.raises(AttributionError, match="no species"):
        discriminative_parts(birds, "dodo")


def test_cascade_goes_top_down_with_each_norm_in_its_conv_group() -> None:
    groups = cascading_layers(load_model("synthbirds").model)
    assert groups[0] == ["classifier"] and groups[1] == ["features.18", "features.19"]
    assert groups[-1] == ["features.0", "features.1"] and len(groups) == 8


def test_evaluate_end_to_end_small(birds) -> None:
    lm = load_model("synthbirds")
    s = AttributionEvalSettings(n_images=3, sanity_images=1, steps=4, methods=("gradcam", "saliency"))
    res = evaluate_attribution(lm, birds, s)
    assert res["images"] == 3 and set(res["methods"]) == {"gradcam", "saliency"}
    for r in res["methods"].values():
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
        assert 0 <= r["pointing"] <= 1 and 0 <= r["energy"] <= 1
        assert len(r["sanity"]) == 8 and all(-1 <= v <= 1 for v in r["sanity"])
    assert 0 < res["baselines"]["pointing_uniform"] < res["baselines"]["pointing_on_bird"] < 1
    assert set(res["winners"]) >= {"deletion_auc", "insertion_auc", "sanity", "pointing"}
    assert "gradcam" in format_attribution(res)
    with pytest.raises(AttributionError, match="unknown"):
        evaluate_attribution(lm, birds, AttributionEvalSettings(methods=("lime",)))


def test_stage_writes_the_json_the_pages_read(tmp_path, identity_model, colour_dataset) -> None:
    """Through the stage registry on a data set without masks: deletion / insertion and the cascade only."""
    from conftest import build_stage

    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    b = open_or_create_bundle(tmp_path / "bundles", identity_model, colour_dataset)
    run_probe(
        b, identity_model, colour_dataset, ProbeSettings(top_k=2, batch_size=2, num_workers=0, progress=False)
    )
    info = build_stage(
        b, colour_dataset, "attribution", identity_model,
        n_images=3, sanity_images=1, steps=2, methods=("gradcam", "occlusion"),
    )  # fmt: skip
    assert set(info["winners"]) == {"deletion_auc", "insertion_auc", "sanity"}
    res = b.read_json("eval/attribution")
    # the seeded draw of 3 includes images/broken.png, which is skipped, not fatal
    assert res["images"] == 2 and "baselines" not in res and "pointing" not in res["methods"]["gradcam"]
    assert res["sanity_layers"] == ["classifier", "features.0"]
