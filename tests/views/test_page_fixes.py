"""What trying every page as a new user turned up (issue 25): the view rules behind each fix."""

from __future__ import annotations

from lavise_core import views


def test_a_clicked_map_dot_opens_its_image_in_every_return_shape() -> None:
    # recorded from Streamlit 1.67 in Chromium: px.scatter(custom_data=[index]) comes back as {"0": i}
    px_event = {"selection": {"points": [{"curve_number": 0, "point_number": 3, "point_index": 3, "x": 0.18,
                                          "y": 0.03, "customdata": {"0": 9}, "legendgroup": "0"}],
                              "point_indices": [3], "box": [], "lasso": []}}  # fmt: skip
    assert views.picked_image(px_event) == 9
    # go.Scattergl(customdata=index): the bare number
    go_event = {"selection": {"points": [{"point_index": 3, "customdata": 3}]}}
    assert views.picked_image(go_event) == 3
    assert views.picked_image({"selection": {"points": [{"customdata": [12]}]}}) == 12  # older Streamlit
    for nothing in (None, {}, {"selection": {"points": []}}, {"selection": {"points": [{"x": 1}]}}):
        assert views.picked_image(nothing) is None


def test_evaluation_tables_never_show_none_or_nan() -> None:
    stored = {
        "random": {"deletion_auc": 0.07, "insertion_auc": 0.64},
        "baselines": {"pointing_uniform": 0.05},  # no energy baseline: the data set has no part masks
        "methods": {"gradcam": {"deletion_auc": 0.05, "insertion_auc": 0.7, "pointing": 0.3, "energy": None,
                                "sanity_mean": float("nan"), "seconds_per_image": 0.004}},
    }  # fmt: skip
    rows = views.attribution_rows(stored)
    shown = [str(v) for r in rows for v in r.values()]
    assert "None" not in shown and "nan" not in shown and "—" in shown
    assert rows[-1]["s / image"] == "—" and rows[0]["energy in parts ↑"] == "—"
    assert views.table_rows([{"a": None, "b": float("nan"), "c": 0.5, "d": "x"}]) == [
        {"a": "—", "b": "—", "c": 0.5, "d": "x"}
    ]


def test_the_layers_page_names_the_explained_layer_as_every_other_page(tmp_path) -> None:
    import json
    from types import SimpleNamespace

    import numpy as np

    from lavise_core.models.demo_cnn import SynthBirdsCNN
    from lavise_core.models.networks import output_aliases

    net = SynthBirdsCNN(num_classes=12, width=16)
    assert output_aliases(net, "features") == ["features.20"]  # a Sequential's output is its last child's
    assert output_aliases(net, "features.17") == [] and output_aliases(net, "nope") == []

    class FakeBundle:  # what layers_view reads: the layers stage's files and the explained layer's name
        def __init__(self) -> None:
            self.layer, self.root, self.manifest = "features", tmp_path, {"stages": {"layers": {"images": 8}}}

        def has(self, name: str) -> bool:
            return True

        def read_json(self, name: str):
            return {
                "layers/summary": {"iou_min": 0.04, "trained": [
                    {"layer": n, "units": 4, "interpretable": 2, "unique": 1,
                     "by_kind": {k: {"units": 0, "unique": 0} for k in ("part", "colour", "pattern/shape", "background")}}
                    for n in ("features.17", "features.20")]},
                "layers/names": ["features.17", "features.20"],
                "layers/concepts": ["red breast", "wing"],
                "layers/kinds": ["colour", "part"],
            }[name]  # fmt: skip

        def array(self, name: str):
            return np.array([[0.1, 0.02], [0.01, 0.03]], np.float32)

    ws = SimpleNamespace(bundle=FakeBundle(), model=lambda: SimpleNamespace(model=net))
    v = views.layers_view(ws)
    assert v.layers == ["features.17", "features"] and "`features`: 2 of 4 units" in v.sentences[1]
    assert "features.20" not in json.dumps([v.rows, v.sentences])
    assert views.layer_units(ws, "features") == views.layer_units(ws, "features.20")  # old links still work


def test_the_bias_table_fits_and_drops_a_column_of_zeros() -> None:
    def cls(name: str, off: float | None) -> dict:
        return {"class": name, "background_auc": 0.51, "background_p": 0.35, "background_bias": False,
                "dominant_background": "sand", "ground_truth_share": 0.16, "off_object_share": off,
                "concepts": [{"phrase": p, "off_object": False} for p in ("red wing", "red breast", "wing", "tail")]}  # fmt: skip

    rows, note = views.bias_table([cls("a", 0.0), cls("b", 0.0)])  # the demo: every filter fires on the bird
    assert "off-object share" not in rows[0] and "no class leans on off-object filters" in note
    assert rows[0]["commonest background"] == "sand (16%)" and rows[0]["top concepts"].count(",") == 2
    assert len(rows[0]) <= 6  # narrow enough for the page
    rows, note = views.bias_table([cls("a", 0.25), cls("b", None)])
    assert rows[0]["off-object share"] == "25%" and rows[1]["off-object share"] == "—"
    assert note.startswith("Off-object share:")
    assert "None" not in str(views.bias_table([{**cls("c", None), "background_auc": None, "background_p": None,
                                                "dominant_background": None}])[0])  # fmt: skip


def test_the_word_cloud_colours_a_word_by_the_colour_it_names() -> None:
    # "red breast" was olive and "yellow breast" navy: colours went by position, not meaning (issue 25)
    assert views.word_colour("red breast") == "#e50000"  # the lexicon's (XKCD) red
    assert views.word_colour("yellow breast") == "#ffff14"
    assert views.word_colour("light blue crown") == views.word_colour("light blue")  # the longest name wins
    assert views.word_colour("spotted wing") is None and views.word_colour("wing") is None
    html = views.word_cloud_html(
        [("red breast", 13, 0.2), ("white breast", 2, 0.1), ("spotted wing", 6, 0.01)], 0.05
    )
    red, white, spotted = html.split("</span>")[:3]
    assert "color:#e50000" in red and "font-weight:600" in red
    assert "color:#ffffff" in white and "background:" in white  # a light colour sits on a dark chip
    assert f"color:{views.home.NEUTRAL}" in spotted and "opacity:0.6" in spotted  # no colour named; tentative
