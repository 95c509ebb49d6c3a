"""Export (CSV, HTML report), compare and the build form's helpers on the hand-built bundle of test_views."""

from __future__ import annotations

import base64
import csv
import io
import re

from test_views import _bundle

from lavise_core import cli, views
from lavise_core.pipeline.stages import BuildProgress


def test_filter_table_csv_exact_rows(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    rows = list(csv.DictReader(io.StringIO(views.filter_table_csv(ws, n_top=2).decode())))
    assert [r["label"] for r in rows] == ["red wing", "blue wing", "red wing"]
    assert {r["label_source"] for r in rows} == {"zero-shot (LaViSE)"}
    assert [r["score"] for r in rows] == ["0.5", "0.4", "0.1"]
    assert [r["confident"] for r in rows] == ["True", "True", "False"]  # CONFIDENT_SCORE = 0.35
    assert [r["iou"] for r in rows] == ["", "", ""]  # no annotated regions: no IoU
    # top images of filter 0: pooled[:, 0] = 3, 2, 0, 0 -> images 0 then 1; record ids are "0", "1"
    assert [r["top_image_ids"] for r in rows] == ["0;1", "2;3", "0;1"]
    assert rows[0]["top_class"] == "red bird" and rows[1]["top_class"] == "blue bird"


def test_report_is_one_self_contained_html_file(tmp_path):
    ws = views.Workspace(_bundle(tmp_path))
    page = views.report_html(ws)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing outside the file
    images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(b)[:2] == b"\xff\xd8" for b in images)  # JPEGs
    assert page.index("<b>#0</b>") < page.index("<b>#1</b>") < page.index("<b>#2</b>")  # best score first
    assert "67%</b>interpretable" in page  # 2 of 3 filters confident
    assert len(re.findall(r"<b>#\d+</b>", views.report_html(ws, max_filters=1))) == 1


def test_cli_report_writes_html_and_csv(tmp_path, capsys):
    b = _bundle(tmp_path)
    out, table = tmp_path / "r.html", tmp_path / "f.csv"
    assert cli.main(["report", str(b.root), "--out", str(out), "--csv", str(table)]) == 0
    assert "data:image/jpeg;base64," in out.read_text() and table.read_text().startswith("filter,label,")
    assert f"wrote {out}" in capsys.readouterr().out


def test_compare_two_bundles_side_by_side(tmp_path):
    a = views.Workspace(_bundle(tmp_path / "a"))
    b = views.Workspace(_bundle(tmp_path / "b", lavise=False))
    cmp = views.compare_bundles(a, b)
    rows = {r["measure"]: (r["left"], r["right"]) for r in cmp.rows}
    assert rows["filters"] == ("3", "3") and rows["accuracy on test images"] == ("75.0%", "75.0%")
    assert rows["interpretable share"] == ("67%", "n/a")
    assert cmp.words == [("red wing", 2, 0), ("blue wing", 1, 0)]
    assert any("different sources" in n for n in cmp.notes)


def test_build_tracker_estimates_time_left_per_stage():
    now = [0.0]
    t = views.BuildTracker(["probe", "textual"], clock=lambda: now[0])
    t.update(BuildProgress(0.0, "lock", "bundle b is being built by process 7; waiting for it to finish"))
    assert (
        t.waiting.startswith("bundle b is being built") and [r["state"] for r in t.rows()] == ["waiting"] * 2
    )
    t.update(BuildProgress(0.0, "probe", "probe: streaming"))
    now[0] = 10.0
    t.update(BuildProgress(0.125, "probe", "probe: 100/400", 100, 400))  # 10 s for 100 -> 30 s left
    assert t.left_total() == 30.0
    assert t.rows()[0] == {"stage": "probe", "state": "running", "progress": "100/400", "spent": "0:10",
                           "left": "0:30"}  # fmt: skip
    now[0] = 40.0
    t.update(BuildProgress(0.5, "probe", "probe: done"))
    t.update(BuildProgress(1.0, "textual", "textual: already built"))
    assert [r["state"] for r in t.rows()] == ["done", "skipped"] and t.rows()[0]["spent"] == "0:40"
    assert t.fraction == 1.0 and t.left_total() is None
    t.update(
        BuildProgress(
            1.0, "oramas", "not built: oramas needs more than 'mine' has: it has fewer than two classes."
        )
    )
    assert t.rows()[-1]["state"] == "not built" and t.rows()[-1]["why"].endswith("fewer than two classes.")


def test_check_data_folder(tmp_path, colour_dataset):
    ok = views.check_data_folder(colour_dataset.root)
    assert ok.ok and ok.message == "Colours: 7 images, 3 classes" and ok.missing == 0
    (colour_dataset.root / "images" / "0.png").unlink()
    assert "1 of the first 7 image files are missing" in views.check_data_folder(colour_dataset.root).message
    bad = views.check_data_folder(tmp_path)
    assert not bad.ok and "is not a probe data set" in bad.message and "lavise import-folder" in bad.message
    assert not views.check_data_folder("  ").ok
    for p in (colour_dataset.root / "images").iterdir():
        p.unlink()
    gone = views.check_data_folder(colour_dataset.root)
    assert not gone.ok and "were the images moved" in gone.message


def test_model_choices_and_layers():
    specs = [s for s, _ in views.model_choices()]
    assert "synthbirds" in specs
    layers, default = views.model_layers("synthbirds")
    assert default in layers and default == "features"
