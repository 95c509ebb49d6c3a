"""lavise_core.views on a hand-built bundle (3 filters, 4 solid-colour images, 2 classes): exact values."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lavise_core import views
from lavise_core.data.dataset import ImageRecord, write_dataset
from lavise_core.pipeline.bundle import Bundle

CLASSES = ["red bird", "blue bird"]
COLOURS = [(255, 0, 0), (200, 0, 0), (0, 0, 255), (0, 0, 200)]
PHRASES = ["red wing", "blue wing", "grass", "water"]


def _bundle(tmp_path, *, lavise: bool = True, data_classes: list[str] | None = None) -> Bundle:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    records = []
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (16, 16), c).save(data / "images" / f"{i}.png")
        records.append(
            ImageRecord(
                id=str(i), path=f"images/{i}.png", split="test", label=i // 2, meta={"background": "sky"}
            )
        )
    ds = write_dataset(data, name="tiny", source="test", classes=data_classes or CLASSES, records=records)
    manifest = {
        "key": "k0",
        "channels": 3,
        "classes": CLASSES,
        "layer": "features",
        "map_size": [2, 2],
        "model": {"spec": "checkpoint:/x/tiny_net.safetensors?arch=a"},
        "preprocessing": {"input_size": 16, "resize": 16},
        "dataset": {"root": str(data), "name": "tiny", "n": 4, "hash": ds.content_hash()},
    }
    b = Bundle.create(tmp_path / "bundle", manifest)
    pooled = np.array([[3, 0, 1], [2, 0, 1], [0, 4, 1], [0, 2, 1]], np.float32)  # (N=4, C=3)
    b.write_array("probe/pooled", pooled)
    b.write_array("probe/logits", np.array([[2, 0], [1, 0], [0, 3], [1, 0]], np.float32))  # image 3 wrong
    b.write_array("probe/valid", np.ones(4, bool))
    order = np.argsort(-pooled.T, axis=1, kind="stable")[:, :2]  # (C, k=2)
    b.write_array("probe/top_index", order.astype(np.int64))
    b.write_array("probe/top_value", np.take_along_axis(pooled.T, order, 1))
    maps = np.zeros((3, 2, 2, 2), np.float16)
    maps[:, :, 0, 0] = 1.0  # every filter fires in the top-left cell
    b.write_array("probe/top_maps", maps)
    b.write_array("probe/classifier_weight", np.array([[1, -1, 0], [-1, 1, 0]], np.float32))  # (K, C)
    b.write_array("probe/classifier_bias", np.zeros(2, np.float32))
    b.mark_stage("probe", {"accuracy": 0.75})
    if lavise:
        (b.root / "lavise").mkdir()
        (b.root / "lavise" / "phrases.json").write_text(json.dumps(PHRASES))
        b.write_json("lavise/split", {"seen": ["red wing"], "unseen": ["blue wing"]})
        b.write_array("lavise/filter_label_ids", np.array([[0, 2], [1, 3], [0, 1]], np.int64))
        b.write_array(
            "lavise/filter_label_scores", np.array([[0.5, 0.2], [0.4, 0.1], [0.1, 0.05]], np.float32)
        )
        b.write_array("lavise/filter_inside", np.array([0.9, np.nan, 0.25], np.float32))
        b.mark_stage("lavise", {})
    return Bundle.open(b.root)


def test_model_label():
    assert views.model_label("checkpoint:/a/b/net.safetensors?arch=x") == "net"
    assert views.model_label("models/card.json") == "card"
    assert views.model_label("efficientnet_lite0") == "efficientnet_lite0"


def test_overview_counts_labels_and_confident_share(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    ov = views.overview(ws)
    assert (ov.n_filters, ov.n_classes, ov.n_images, ov.accuracy) == (3, 2, 4, 0.75)
    assert ov.model == "tiny_net" and ov.layer == "features"
    # best labels: red wing (0.5), blue wing (0.4), red wing (0.1); confident = score >= 0.35
    assert ov.words == [("red wing", 2, pytest.approx(0.3)), ("blue wing", 1, pytest.approx(0.4))]
    assert ov.confident_share == pytest.approx(2 / 3)
    assert ov.confident_score == views.CONFIDENT_SCORE
    assert "0.10–0.50" in ov.confident_rule and "median 0.40" in ov.confident_rule
    # every default stage in build order; the on-request ones (attribution, siam_eval) only once built
    assert list(ov.stages)[:8] == [
        "probe",
        "textual",
        "textual_grounding",
        "dissection",
        "lavise",
        "evidence",
        "ood",
        "fidelity",
    ]
    assert {k for k, done in ov.stages.items() if done} == {"probe", "lavise"}
    assert "attribution" not in ov.stages and "featurevis" in ov.stages
    assert ov.class_note is None


def test_overview_without_labels_says_how_to_build(tmp_path):
    ov = views.overview(views.Workspace(_bundle(tmp_path, lavise=False)))
    assert ov.words == [] and ov.confident_share is None
    assert any("lavise build" in m for m in ov.messages)


def test_filter_labels_status_and_inside(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    assert ws.zero_shot_labels(0) == [("red wing", 0.5, "seen"), ("grass", pytest.approx(0.2), "vocabulary")]
    assert ws.zero_shot_labels(1, 1) == [("blue wing", pytest.approx(0.4), "unseen")]
    assert ws.filter_inside(0) == pytest.approx(0.9)
    assert ws.filter_inside(1) is None  # NaN: not measured
    assert views.Workspace(_bundle(tmp_path / "b", lavise=False)).zero_shot_labels(0) is None


def test_filter_table_and_select(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    t = views.filter_table(ws)
    assert t["label"].tolist() == ["red wing", "blue wing", "red wing"]
    assert t["mean_activation"].tolist() == [1.25, 1.5, 1.0]
    # class_weight = max_c W[c, k] * mean_k ; top_class its argmax
    assert t["class_weight"].tolist() == [1.25, 1.5, 0.0]
    assert t["top_class"].tolist() == ["red bird", "blue bird", "red bird"]
    assert t["confident"].tolist() == [True, True, False]
    assert views.select_filters(t, "label score")["filter"].tolist() == [0, 1, 2]
    assert views.select_filters(t, "mean activation")["filter"].tolist() == [1, 0, 2]
    assert views.select_filters(t, "filter number", concept="RED")["filter"].tolist() == [0, 2]
    assert views.select_filters(t, confident_only=True)["filter"].tolist() == [0, 1]
    assert views.select_filters(t, min_score=0.45)["filter"].tolist() == [0]
    assert views.select_filters(t, class_name="blue bird", ws=ws)["filter"].tolist() == [1]


def test_filter_detail_exact_and_cached(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    d = views.filter_detail(ws, 1, side=16)
    assert (d.k, d.label, d.score) == (1, "blue wing", pytest.approx(0.4))
    assert [(i, v, c) for _, i, v, c in d.top_images] == [(2, 4.0, "blue bird"), (3, 2.0, "blue bird")]
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b, *_ in d.top_images)
    assert d.classes == [("blue bird", 1.0), ("red bird", -1.0)]
    assert d.activations.tolist() == [0.0, 0.0, 4.0, 2.0]
    assert d.labels == [
        ("blue wing", pytest.approx(0.4), "unseen"),
        ("water", pytest.approx(0.1), "vocabulary"),
    ]
    assert d.attributes is None and "textual stage" in d.attributes_note
    assert views.filter_detail(ws, 1, side=16) is d  # the second opening is a cache hit
    with pytest.raises(ValueError, match="no filter 3"):
        views.filter_detail(ws, 3)


def test_filter_card_is_cached_jpeg(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    card = views.filter_card_image(ws, 0, n=2, tile=8)
    img = Image.open(io.BytesIO(card))
    assert img.format == "JPEG" and img.size == (2 * 8 + 3, 8 + 2)  # 2 tiles in a row, 1 px padding
    assert views.filter_card_image(ws, 0, n=2, tile=8) is card


def test_class_note_when_probe_classes_differ(tmp_path):
    ws = views.Workspace(_bundle(tmp_path, data_classes=["cat", "dog"]))
    note = views.bundle_class_note(ws)
    assert note is not None and "red bird" in note and "cat, dog" in note
    assert views.overview(ws).class_note == note


def test_class_report_confusion(tmp_path):
    rep = views.class_report(views.Workspace(_bundle(tmp_path)))
    assert rep.confusion.tolist() == [[2, 0], [1, 1]]
    assert rep.accuracy == 0.75 and rep.split == "test"
    assert [(e["index"], e["true"], e["predicted"]) for e in rep.errors] == [(3, "blue bird", "red bird")]


def test_view_box_centre_crop(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    assert ws.view_box(20, 10) == (0.0, 0.0, 20.0, 10.0)  # resize == input size: the whole image
    ws.bundle.manifest["preprocessing"] = {"input_size": 224, "resize": 256}
    x0, y0, x1, y1 = ws.view_box(512, 256)
    assert (x1 - x0, y1 - y0) == (224.0, 224.0) and (x0, y0) == (144.0, 16.0)


def test_evaluation_headlines_and_tables():
    obj = {
        "grounding": {"proposed": [1, 40.0, 2], "constant": [1, 30.0, 2]},
        "retrieval": {
            "labels": {"precision": 70.0, "recall": 20.0, "random": {"precision": 80.0, "recall": 3.0}}
        },
        "randomization": {"spearman_explanation": 0.1, "spearman_explanation_control": 0.7},
        "paper": {"pck": {"proposed": [12.2, 38.7, 60.9]}},
    }
    rows = views.evaluation_headlines("textual", obj)
    assert [(r["ours"], r["baseline"], r["verdict"].startswith("better")) for r in rows] == [
        (40.0, 30.0, True),
        (70.0, 80.0, False),  # precision below the random baseline is reported, not hidden
        (20.0, 3.0, True),
        (0.1, 0.7, True),  # lower is better for the randomisation check
    ]
    assert rows[0]["paper"] == 38.7
    lv = views.evaluation_headlines("lavise", {"recall": {"unseen@20": {"lavise": 0.1, "no_attention": 0.2}}})
    assert (
        len(lv) == 1
        and lv[0]["verdict"].startswith("NOT")
        and "without filter attention" in lv[0]["baseline is"]
    )
    # with part-supervised grounding the headline reports it (and says so)
    obj["grounding"]["parts_cell_grid"] = [5, 80.0, 9]
    row = views.evaluation_headlines("textual", obj)[0]
    assert row["ours"] == 80.0 and "part annotations" in row["question"]
    assert views.flatten_tables({"a": 1, "b": [{"m": "x", "v": 2}]}) == [
        ("summary", [{"a": 1}]),
        ("b", [{"m": "x", "v": 2}]),
    ]


def test_stage_missing_messages(tmp_path):
    ws = views.Workspace(_bundle(tmp_path, lavise=False))
    with pytest.raises(views.StageMissing, match="lavise build --model"):
        ws.lavise()
    with pytest.raises(views.StageMissing, match="textual stage"):
        ws.textual()


def test_fidelity_headlines_say_targets_and_baselines():
    obj = {
        "labels": {"dissection": 0.98, "zero_shot": 0.5, "random_concept": 0.07, "filters": 128,
                   "dissection_labelled_filters": 127},
        "search": {"seen": {"precision": 0.9, "random_filter": 0.14}, "held_out": {"precision": 0.3, "random_filter": 0.17},
                   "abstention": {"absent_confident": 0.02, "seen_detected_confident": 0.86}},
        "ood": {"ood_flagged": 1.0, "max_softmax_ood_flagged": 0.3, "test_flagged": 0.034},
        "sanity": {"labelled_filters": 0},
    }  # fmt: skip
    rows = {r["question"].split(" (")[0]: r for r in views.evaluation_headlines("fidelity", obj)}
    label = rows["Is a filter's label right?"]
    assert label["ours"] == 98.0 and label["baseline"] == 7.0 and label["verdict"].endswith("target met")
    assert rows["…with zero-shot labels"]["verdict"] == "better than the baseline; target 60 missed"
    absent = rows["Does the search say “no filter responds” to things absent from the data?"]
    assert absent["ours"] == 2.0 and absent["verdict"] == "better than the baseline; target met"
    assert rows["…and answer concepts the layer does detect?"]["verdict"] == "—; target 90 missed"
    sanity = next(r for q, r in rows.items() if q.startswith("Sanity"))
    assert (
        sanity["ours"] == 0 and sanity["baseline"] == 127 and sanity["verdict"] == "better than the baseline"
    )


def test_probe_images_deleted_after_the_build_leave_the_pages_working(tmp_path):
    b = _bundle(tmp_path)
    for p in (tmp_path / "data" / "images").glob("*.png"):
        p.unlink()
    ws = views.Workspace(b)
    table = views.filter_table(ws)  # numbers come from the bundle, not from the images
    assert list(table["label"]) == ["red wing", "blue wing", "red wing"]
    thumb = ws.record_image(0, side=64)
    assert thumb.size == (64, 64) and thumb.getpixel((1, 1)) == (235, 235, 235)  # the grey placeholder
    detail = views.filter_detail(ws, 0, n_images=2, side=64)
    assert [t[1] for t in detail.top_images] == [0, 1] and all(len(t[0]) > 0 for t in detail.top_images)


def test_the_why_not_row_says_why_it_has_no_share():
    from lavise_core.views.evaluation import sentence_rows

    def why_not(contrast):
        rows = sentence_rows({"contrast": contrast})
        return next(r["evidence (default)"] for r in rows if r["measure"].startswith("“why not”"))

    assert why_not({"differ": 0.925, "named_something": 1.0, "pairs": 40}) == "92.5%"
    assert why_not({"differ": None, "named_something": 0.0, "pairs": 41}) == "none (41 pairs)"
    assert why_not({}) == "—"


def test_a_layer_where_few_filters_carry_a_label_gets_their_accuracy_beside_the_share_of_all():
    labels = {"dissection": 0.032, "dissection_among_labelled": 0.872, "dissection_labelled_filters": 47,
              "filters": 1280, "random_concept": 0.04, "zero_shot": 0.33}  # fmt: skip
    rows = views.evaluation_headlines("fidelity", {"labels": labels})
    assert [r["ours"] for r in rows[:3]] == [3.2, 87.2, 33.0]
    assert rows[1]["question"].startswith("…of the 47 filters of 1280 that carry a dissection label")
    assert rows[1]["verdict"] == "better than the baseline; target 90 missed"
    demo = views.evaluation_headlines("fidelity", {"labels": {**labels, "dissection_labelled_filters": 1200}})
    assert not any("carry a dissection label" in r["question"] for r in demo)
