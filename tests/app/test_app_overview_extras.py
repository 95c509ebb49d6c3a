"""AppTest of the Overview's export, compare and build-form sections on the small real test bundles."""

from __future__ import annotations

import re

from test_app_pages import bundles, open_app  # noqa: F401  (bundles is a fixture)


def test_export_csv_and_html_report(monkeypatch, bundles):  # noqa: F811
    at = open_app(monkeypatch, bundles, bundle=bundles.full)
    csv_button = at.get("download_button")[0]
    assert csv_button.proto.label == "Filter table (CSV)"
    at.button(key="export_prepare").click().run()
    assert not at.exception, [e.value for e in at.exception]
    page = at.session_state[f"report_html::{bundles.full}"]
    assert len(re.findall(r"<b>#\d+</b>", page)) == 512 and "data:image/jpeg;base64," in page
    assert [b.proto.label for b in at.get("download_button")][1].startswith("HTML report (")


def test_compare_two_layers_of_one_model(monkeypatch, bundles):  # noqa: F811
    at = open_app(monkeypatch, bundles, bundle=bundles.full)
    assert not at.dataframe  # nothing is compared (or loaded) until a bundle is chosen
    at.selectbox(key="compare_with").set_value(str(bundles.probe_only)).run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert list(table["measure"])[:4] == ["model", "layer", "probe set", "filters"]
    assert list(table.iloc[1, 1:]) == ["layer4", "layer3"] and list(table.iloc[3, 1:]) == ["512", "256"]


def test_build_form_lists_models_layers_checks_data_and_reports_stages(monkeypatch, bundles, tmp_path):  # noqa: F811
    at = open_app(monkeypatch, bundles, bundle=bundles.full)
    at.toggle(key="build_open").set_value(True).run()
    model = at.selectbox(key="build_model")
    assert "synthbirds" in model.options[0] and model.options[-1].startswith("other")
    layer = at.selectbox(key="build_layer::synthbirds")
    assert layer.value == "features" and len(layer.options) > 5
    at.text_input(key="build_data").set_value(str(tmp_path)).run()
    assert "is not a probe data set" in at.error[0].value and at.button(key="build_go").disabled
    at.text_input(key="build_data").set_value(str(bundles.data)).run()
    assert at.success[0].value.startswith(f"{bundles.data.name}") or "images" in at.success[0].value
    monkeypatch.setenv("LAVISE_BUNDLES", str(tmp_path / "new"))
    at.multiselect(key="build_stages").set_value(["probe"]).run()
    at.button(key="build_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(s.value.startswith("Bundle ready:") for s in at.success)
    rows = at.dataframe[-1].value
    assert list(rows["stage"]) == ["probe"] and list(rows["state"]) == ["done"]
