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


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_make_demo_binds_localhost_only():
    """Issue 29: `make demo` serves this machine only; serving to others is `lavise serve` / `make serve`."""
    from pathlib import Path

    from lavise_core.cli.serve import demo_serve_command

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "lavise demo" in demo
    assert "lavise serve" in makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    args = build_parser().parse_args(["demo", "--port", "8602"])
    argv, env = demo_serve_command(args, {"LAVISE_SERVE": "read-only"})
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.port") + 1] == "8602"
    assert "LAVISE_SERVE" not in env  # this machine's own dashboard: local mode, builds allowed


def test_serve_is_read_only_unless_asked(tmp_path):
    from lavise_core.cli.serve import serve_command

    argv, env = serve_command(_serve_args("--host", "0.0.0.0", "--port", "8600", "--bundles", str(tmp_path)),
                              {"LAVISE_BUILD_TOKEN": "t"})  # fmt: skip
    assert argv[argv.index("--server.address") + 1] == "0.0.0.0"
    assert argv[argv.index("--server.port") + 1] == "8600"
    assert argv[argv.index("--client.showErrorDetails") + 1] == "none"
    assert env["LAVISE_SERVE"] == "read-only" and "LAVISE_BUILD_TOKEN" not in env
    assert env["LAVISE_BUNDLES"] == str(tmp_path.resolve())
    argv, env = serve_command(_serve_args("--allow-build"), {})  # on 127.0.0.1: no token needed
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert env["LAVISE_SERVE"] == "build" and env["LAVISE_BUILD_TOKEN_NEEDED"] == "0"


def test_serve_allow_build_on_a_network_address_needs_a_token(capsys, monkeypatch):
    from lavise_core.cli.serve import serve_command

    with pytest.raises(ValueError, match="LAVISE_BUILD_TOKEN"):
        serve_command(_serve_args("--host", "0.0.0.0", "--allow-build"), {})
    monkeypatch.delenv("LAVISE_BUILD_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--allow-build"]) == 2  # a message, no server started
    assert "needs a token" in capsys.readouterr().err
    _, env = serve_command(_serve_args("--host", "0.0.0.0", "--allow-build"), {"LAVISE_BUILD_TOKEN": "t"})
    assert env["LAVISE_SERVE"] == "build" and env["LAVISE_BUILD_TOKEN_NEEDED"] == "1"
