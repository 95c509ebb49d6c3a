"""AppTest: the Layers page opens the units of any recorded layer with their top images (the small bundle of
test_app_layers_map.py: layer3 and layer4 recorded, layer4 explained)."""

from __future__ import annotations

from test_app_layers_map import stage_bundles  # noqa: F401  (the module's fixture)
from test_app_pages import open_app


def test_units_of_a_layer_other_than_the_explained_one(monkeypatch, stage_bundles) -> None:  # noqa: F811
    at = open_app(monkeypatch, stage_bundles, "app_pages/layers.py", layer="layer3", unit="1")
    assert not at.error, [e.value for e in at.error]
    assert "The units of `layer3` and the images they fire on" in [h.value for h in at.subheader]
    box = at.selectbox(key="unit_layer3")
    assert box.value == 1 and box.options[1].startswith("unit 1 · ")
    assert any(m.value.startswith("**Unit 1** of `layer3`: ") for m in at.markdown)
    assert any(c.value.startswith("Each unit's top image among ") for c in at.caption)
    gallery = [c.value for c in at.caption if c.value.split(" · ")[0].isdigit()]
    assert gallery and gallery[0].startswith("0 · ")  # one caption per unit under its top image
    box.select_index(2).run()
    assert not at.exception and at.query_params["unit"] in ("2", ["2"])


def test_the_explained_layer_uses_the_stored_ranking(monkeypatch, stage_bundles) -> None:  # noqa: F811
    at = open_app(monkeypatch, stage_bundles, "app_pages/layers.py", layer="layer4")
    assert not at.error
    assert any("among every one of the" in c.value for c in at.caption)
