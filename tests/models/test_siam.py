"""SIAM: the score decomposes exactly; training runs and is deterministic; the card loads; bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from lavise_core.models.siam import SiamError, build_siam, check_attributes, train_siam


@pytest.mark.parametrize("templates", [0, 2])
def test_score_is_the_sum_of_contributions_plus_bias(templates: int) -> None:
    torch.manual_seed(0)
    net = build_siam(num_classes=3, num_attributes=5, width=16, templates=templates).eval()
    with torch.no_grad():
        if templates:
            net.templates.uniform_(-0.5, 1.0)  # negative entries are clamped: still exact
        x = torch.randn(4, 3, 64, 64)
        maps = net.attributes(net.features(x))
        logits = net(x)
        for c in range(3):
            total = net.contributions(maps, c).double().sum(1) + float(net.classifier.bias[c])
            assert (total - logits[:, c].double()).abs().max() < 1e-5
            where = net.where(maps, c).double().sum((2, 3))  # the maps add up to the contributions
            np.testing.assert_allclose(where.numpy(), net.contributions(maps, c).double().numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_birds(tmp_path_factory):
    from lavise_core.data.synthbirds import generate_synthbirds

    tmp = tmp_path_factory.mktemp("siam")
    return generate_synthbirds(tmp / "birds", n=36, seed=0, image_size=64, progress=False), tmp


def test_training_is_deterministic_and_the_registry_loads_it(tiny_birds) -> None:
    from lavise_core.models.networks import load_model

    ds, tmp = tiny_birds
    kw = dict(head_epochs=1, finetune_epochs=1, threads=1, progress=False, keep="frozen-templates")
    a = train_siam(ds.root, tmp / "a", ROOT / "models/synthbirds_cnn.json", **kw)
    b = train_siam(ds.root, tmp / "b", ROOT / "models/synthbirds_cnn.json", **kw)
    assert a["variants"] == b["variants"] and set(a["variants"]) == {
        "frozen-linear", "frozen-templates", "finetuned-linear", "finetuned-templates"
    }  # fmt: skip
    assert all(v["decomposition_max_error"] < 1e-5 for v in a["variants"].values())
    assert (tmp / "a/synthbirds_siam.safetensors").read_bytes() == (
        tmp / "b/synthbirds_siam.safetensors"
    ).read_bytes()
    lm = load_model(str(tmp / "a/synthbirds_siam.json"))
    assert lm.default_layer == "attributes" and lm.class_names == list(ds.classes)
    assert lm.model(torch.zeros(1, 3, 64, 64)).shape == (1, 12)


def test_attribute_list_must_match_the_data(tiny_birds) -> None:
    ds, _ = tiny_birds
    check_attributes(ds.attribute_vocabulary(), ds)
    with pytest.raises(SiamError, match="missing from the data \\['glowing wing'\\]"):
        check_attributes([*ds.attribute_vocabulary()[:-1], "glowing wing"], ds)


def test_committed_card_matches_synthbirds() -> None:
    card = json.loads((ROOT / "models/synthbirds_siam.json").read_text())
    from lavise_core.data.dataset import ProbeDataset

    check_attributes(card["attributes"], ProbeDataset.open(ROOT / "data/synthbirds"))
    assert card["decomposition_max_error"] < 1e-5
