"""AppTest of the Layers and Map pages and the filter page's feature visualisation (issue 12), on a small bundle
with the new stages built (the shared test data and tiny ResNet-18 of app_bundles.py, its own bundle folder)."""

from __future__ import annotations

import pytest
from app_bundles import build_app_bundles
from test_app_pages import open_app, texts


@pytest.fixture(scope="module")
def stage_bundles(tmp_path_factory):
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.pipeline.probe import open_or_create_bundle
    from lavise_core.pipeline.stages import BuildSettings, build_stages
    from lavise_core.stages import REGISTRY

    shared = build_app_bundles()
    ds = ProbeDataset.open(shared.data)
    from lavise_core.pipeline.bundle import Bundle

    lm = Bundle.open(shared.full).load_model()
    root = tmp_path_factory.mktemp("issue12") / "bundles"
    b = open_or_create_bundle(root, lm, ds, "layer4")
    build_stages(
        b, ds, REGISTRY, ["probe", "datamap", "layers", "featurevis"], settings=BuildSettings(top_k=4),
        model_loader=lambda: lm, options={"layers": {"layers": ["layer3", "layer4"], "max_images": 48, "baseline_images": 16}},
    )  # fmt: skip
    return type("B", (), {"bundles": root, "bundle": b})


def test_layers_page_summary_chart_and_layer_url(monkeypatch, stage_bundles) -> None:
    at = open_app(monkeypatch, stage_bundles, "app_pages/layers.py", layer="layer3")
    t = texts(at)
    assert not at.error, [e.value for e in at.error]
    assert "units interpretable, " in t and "an overlap (IoU) of 0.04 or more" in t and "`layer4`" in t
    assert at.selectbox[0].value == "layer3" and len(at.dataframe) == 2


def test_map_page_colourings_and_an_opened_image(monkeypatch, stage_bundles) -> None:
    at = open_app(monkeypatch, stage_bundles, "app_pages/datamap.py", colour="filter", filter="3", image="5")
    t = texts(at)
    assert "#5 · class" in " ".join(str(i.caption) for i in at.get("imgs")) or "Its most active filters" in t
    at = open_app(monkeypatch, stage_bundles, "app_pages/datamap.py", colour="nonsense")
    assert "is not a colouring" in " ".join(e.value for e in at.error)


def test_filter_page_visualises_on_demand_when_not_precomputed(monkeypatch, stage_bundles) -> None:
    info = stage_bundles.bundle.manifest["stages"]["featurevis"]
    assert "skipped" in info  # 512 filters: on demand only
    import lavise_core.views.featurevis as fv

    monkeypatch.setattr(fv, "ON_DEMAND_STEPS", 16)  # the page's code path, fewer steps
    at = open_app(monkeypatch, stage_bundles, "app_pages/filters.py", filter="2")
    assert "not precomputed for this bundle" in texts(at)
    at.button(key="fv_2").click().run()
    assert not at.exception
    assert "Feature visualisation (16 steps, on demand)" in texts(at)
