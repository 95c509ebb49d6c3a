import subprocess
import sys

import numpy as np
import pytest

from lavise_core.cli import build_parser, main
from lavise_core.data.samples import write_sample_photos
from lavise_core.pipeline.bundle import Bundle, find_bundles


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"probe", "build", "evaluate", "models", "layers", "info", "import-folder"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.format_help().startswith("usage: lavise " + name)


def test_entry_point_installed():
    out = subprocess.run(
        [sys.executable, "-m", "lavise_core.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "probe" in out.stdout


def test_probe_command_on_sample_photos(tmp_path, capsys):
    data = tmp_path / "photos"
    ds = write_sample_photos(data)
    rc = main(
        [
            "probe",
            "--model",
            "efficientnet_lite0",
            "--data",
            str(data),
            "--bundles",
            str(tmp_path / "b"),
            "--quiet",
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--top-k",
            "3",
        ]
    )
    assert rc == 0
    [b] = find_bundles(tmp_path / "b")
    assert b.array("probe/pooled").shape == (len(ds), 1280)
    assert b.array("probe/top_maps").shape == (1280, 3, 7, 7)
    chelsea = [r.id for r in ds.records].index("chelsea")
    pred = int(np.argmax(b.array("probe/logits")[chelsea]))
    assert b.classes[pred] in {"tabby", "tiger cat", "Egyptian cat"}
    assert "probe:" in capsys.readouterr().out
    assert Bundle.open(b.root).key == b.key


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["probe", "--data", str(tmp_path), "--model", "efficientnet_lite0"]) == 2
    err = capsys.readouterr().err
    assert "not a probe data set" in err and "Traceback" not in err


@pytest.mark.parametrize("spec", ["nonsense", "torchvision:not_a_net"])
def test_bad_model_spec(spec, capsys):
    assert main(["layers", spec]) == 2
    assert "error" in capsys.readouterr().err


def test_weights_are_fetched_only_on_request(tmp_path, monkeypatch, capsys):
    """`lavise layers` without the weights says what to do; --download and fetch-weights fetch them from
    127.0.0.1 (a served fixture file, never the internet), verified by the hash in the file name."""
    import torch

    from tests.weights_server import SPEC, only_localhost, publish, serve, write_weights

    only_localhost(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path, digest, _ = write_weights(tmp_path / "served")
    publish(monkeypatch, path.name)
    assert main(["layers", SPEC]) == 2
    err = capsys.readouterr().err
    assert f"run `lavise fetch-weights {SPEC}` while online, or pass --download" in err
    assert "Traceback" not in err
    with serve(path.parent) as url:
        monkeypatch.setenv("LAVISE_WEIGHTS_URL", url)
        assert main(["layers", SPEC, "--download"]) == 0
        out = capsys.readouterr().out
        assert f"SHA-256 {digest}" in out and "verified" in out and "conv5  <- default" in out
        assert main(["fetch-weights", SPEC, "--quiet", "--force"]) == 0
        assert f"downloaded {SPEC} from {url}/{path.name}" in capsys.readouterr().out
    monkeypatch.setenv("LAVISE_WEIGHTS_URL", url)  # the server is gone
    assert main(["fetch-weights", SPEC, "--force", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lavise fetch-weights: error: the download from") and "refused" in err
    assert "Traceback" not in err and (tmp_path / "hub" / "checkpoints" / path.name).is_file()
