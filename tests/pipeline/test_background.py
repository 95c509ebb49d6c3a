"""The background build's progress file (issue 27): written as the build goes, read back by the dashboard."""

from __future__ import annotations

import json
import subprocess
import sys

from lavise_core.cli import build_parser, main
from lavise_core.cli.serve import demo_build_command
from lavise_core.data.samples import write_sample_photos
from lavise_core.pipeline.background import PROGRESS_FILE, ProgressWriter, read_build_status
from lavise_core.pipeline.bundle import find_bundles
from lavise_core.pipeline.stages import BuildProgress


def test_the_writer_follows_the_stages_as_build_stages_reports_them(tmp_path):
    path = tmp_path / PROGRESS_FILE
    w = ProgressWriter(path, ["probe", "textual", "oramas"], interval=0.0)
    assert read_build_status(tmp_path).state == "running" and read_build_status(tmp_path).finished == []
    w(BuildProgress(1 / 3, "probe", "probe: already built"))
    w(BuildProgress(1 / 3, "textual", "textual: p.d.f.s"))
    w(BuildProgress(0.5, "textual", "textual: 40 / 80 images", 40, 80))
    s = read_build_status(tmp_path)
    assert (s.state, s.stage, s.finished, s.message) == (
        "running",
        "textual",
        ["probe"],
        "textual: 40 / 80 images",
    )
    assert abs(s.fraction - 0.5) < 1e-9
    w(BuildProgress(2 / 3, "textual", "textual: done"))
    w(BuildProgress(1.0, "oramas", "not built: oramas needs two classes."))
    assert read_build_status(tmp_path).finished == ["probe", "textual", "oramas"]
    w.finish()
    s = read_build_status(tmp_path)
    assert (s.state, s.fraction, s.finished) == ("done", 1.0, ["probe", "textual", "oramas"])


def test_a_failed_or_vanished_build_says_so(tmp_path):
    w = ProgressWriter(tmp_path / PROGRESS_FILE, ["probe", "textual"])
    w(BuildProgress(0.0, "probe", "probe: the probe pass"))
    w.finish(error="the disk is full")
    s = read_build_status(tmp_path)
    assert (s.state, s.error, s.stage, s.finished) == ("failed", "the disk is full", "probe", [])

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    raw = json.loads((tmp_path / PROGRESS_FILE).read_text())
    raw.update(state="running", pid=int(gone.stdout))  # a build whose process is no more
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(raw))
    assert read_build_status(tmp_path).state == "stopped"

    (tmp_path / PROGRESS_FILE).write_text("{not json")
    assert read_build_status(tmp_path) is None
    assert read_build_status(tmp_path / "nowhere") is None


def test_lavise_build_keeps_a_progress_file(tmp_path, capsys):
    data = tmp_path / "photos"
    write_sample_photos(data)
    progress = tmp_path / "progress.json"
    argv = ["build", "--model", "efficientnet_lite0", "--data", str(data), "--bundles", str(tmp_path / "b"),
            "--stages", "probe", "--quiet", "--workers", "0", "--batch-size", "4", "--top-k", "3",
            "--progress-file", str(progress)]  # fmt: skip
    assert main(argv) == 0
    [b] = find_bundles(tmp_path / "b")
    assert b.stage_done("probe")
    raw = json.loads(progress.read_text())
    assert (raw["state"], raw["stages"], raw["finished"], raw["fraction"]) == (
        "done",
        ["probe"],
        ["probe"],
        1.0,
    )


def test_the_demo_builds_the_rest_behind_the_dashboard_with_a_progress_file(tmp_path):
    args = build_parser().parse_args(["demo", "--data", "d", "--bundles", str(tmp_path)])
    cmd = demo_build_command(args, ["textual", "attribution"], tmp_path / PROGRESS_FILE)
    assert cmd[1:4] == ["-m", "lavise_core.cli", "build"]
    assert cmd[cmd.index("--stages") + 1 : cmd.index("--progress-file")] == ["textual", "attribution"]
    assert cmd[cmd.index("--progress-file") + 1] == str(tmp_path / PROGRESS_FILE)
    assert "--quiet" in cmd
