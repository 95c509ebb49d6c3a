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


def _concept_folders(root):
    """Under ``root``: two tiny masked concept sets, a captioned set without masks, a plain image set (no words)
    and a folder that is no data set at all."""
    from PIL import Image

    from lavise_core.data.dataset import ImageRecord, write_dataset
    from tests.pipeline.test_composed_concept_sets import masked_set

    masked_set(root / "squares", "Squares", ("red square", 0), ("green ring", 1), n=4)
    masked_set(root / "leaves", "Leaves", ("green leaf", 1), ("red berry", 0), n=4)
    for name, caption in (("captions", ["a red square"]), ("plain", [])):
        (root / name / "images").mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 0, 0)).save(root / name / "images/0.png")
        write_dataset(root / name, name=name.title(), source="test", classes=["scene"],
                      records=[ImageRecord("0", "images/0.png", "train", 0, captions=caption)])  # fmt: skip
    (root / "junk").mkdir()


def test_build_form_names_several_concept_sets_and_says_why_it_refuses(monkeypatch, bundles, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    _concept_folders(data)
    monkeypatch.setenv("LAVISE_DATA", str(data))
    at = open_app(monkeypatch, bundles, bundle=bundles.full)
    at.toggle(key="build_open").set_value(True).run()
    at.text_input(key="build_data").set_value(str(bundles.data)).run()
    pick = at.multiselect(key="build_concepts")
    assert pick.options == [  # annotated folders only, sorted; the plain set and the junk folder are left out
        "Captions · 1 image · captions or attributes, no masks",
        "Leaves · 4 images · region masks",
        "Squares · 4 images · region masks",
    ]
    assert (
        any("the probe set's own annotations" in c.value for c in at.caption)
        and not at.button(key="build_go").disabled
    )

    def choose(picked: list[str], typed: str = "") -> str:
        at.multiselect(key="build_concepts").set_value([str(data / p) for p in picked])
        at.text_input(key="build_concepts_path").set_value(typed).run()
        assert not at.exception, [e.value for e in at.exception]
        shown = [e.value for e in at.error] or [s.value for s in at.success if "concept set" in s.value]
        return shown[-1]

    assert choose(["squares", "leaves"]) == (
        "words from the concept sets 'Squares' + 'Leaves': each filter's best label names its set"
    )
    assert not at.button(key="build_go").disabled
    assert choose(["squares"], str(data / "junk")).startswith(
        f"the concept set {data / 'junk'} cannot be opened"
    )
    assert choose(["squares"], str(data / "leaves" / ".." / "squares")).startswith(
        f"the concept set {data / 'leaves' / '..' / 'squares'} is given twice (also as {data / 'squares'})"
    )
    assert choose(["squares", "captions"]).startswith("the concept set 'Captions' (")
    assert "has no region masks, so it can give no dissection labels" in at.error[-1].value
    assert choose(["squares"], str(bundles.data)).startswith(
        f"the concept set {bundles.data} is the probe set itself"
    )
    assert choose([], str(data / "plain")).startswith("the concept set 'Plain' has neither region masks nor")
    assert at.button(key="build_go").disabled
    at.multiselect(key="build_stages").set_value(["probe", "textual"])
    # no dissection stage: a set without masks may lend the other words
    assert choose(["squares", "captions"]) == (
        "words from the concept sets 'Squares' + 'Captions': each filter's best label names its set"
    )

    monkeypatch.setenv("LAVISE_BUNDLES", str(tmp_path / "new"))
    at.multiselect(key="build_stages").set_value(["probe", "dissection"])
    choose(["squares", "leaves"])
    at.button(key="build_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    ready = [s.value for s in at.success if s.value.startswith("Bundle ready:")]
    assert len(ready) == 1
    from lavise_core.pipeline.bundle import Bundle

    built = Bundle.open(at.session_state["bundle_path"])
    assert built.manifest["stages"]["dissection"]["concept_set"] == "Squares + Leaves"
