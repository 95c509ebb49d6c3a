"""The opt-in weight download: served from 127.0.0.1 only, verified by SHA-256, atomic, plain messages."""

from __future__ import annotations

import http.server
import itertools

import pytest
import torch

from lavise_core.models.networks import ModelLoadError, load_model
from lavise_core.models.weights import (
    WEIGHTS_URL_ENV,
    WeightsError,
    download_file,
    ensure_weights,
    fetch_weights,
    hash_prefix,
    weights_path,
    weights_source,
)
from tests.weights_server import SPEC, closed_port, only_localhost, publish, serve, write_weights


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(file, sha256, state dict)`` of the hash-named weight file in a folder to serve."""
    return write_weights(tmp_path_factory.mktemp("served"))


@pytest.fixture
def hub(tmp_path, monkeypatch, served):
    """An empty torch hub cache, torchvision publishing the served file, no connection beyond 127.0.0.1."""
    only_localhost(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(WEIGHTS_URL_ENV, raising=False)
    publish(monkeypatch, served[0].name)
    return tmp_path / "hub" / "checkpoints"


def _left(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_hash_prefix_follows_torch_hub():
    assert hash_prefix("resnet18-f37072fd.pth") == "f37072fd"
    assert hash_prefix("resnet18_a1_0-d63eafa0.pth") == "d63eafa0"
    assert hash_prefix("efficientnet-b0.pth") is None and hash_prefix("vgg11.pth") is None


def test_sources_name_the_published_files():
    src = weights_source("torchvision:resnet18?layer=layer3")
    assert src.spec == "torchvision:resnet18" and src.filename == "resnet18-f37072fd.pth"
    assert src.sha256_prefix == "f37072fd" and src.url.startswith("https://download.pytorch.org/")
    timm_src = weights_source("timm:resnet18")
    assert timm_src.sha256_prefix == timm_src.filename.rsplit("-", 1)[1][:8]
    hf = weights_source("timm:vgg11")  # on the Hugging Face hub only: no published hash
    assert hf.filename == "vgg11.pth" and hf.sha256_prefix is None and "huggingface.co" in hf.url
    with pytest.raises(WeightsError, match="only torchvision:NAME and timm:NAME"):
        weights_source("synthbirds")
    with pytest.raises(WeightsError, match="no architecture 'not_a_net'"):
        weights_source("torchvision:not_a_net")


def test_missing_weights_say_what_to_do(hub):
    with pytest.raises(ModelLoadError) as e:
        load_model(SPEC)
    msg = str(e.value)
    assert f"the weights of {SPEC} are not on this machine" in msg
    assert f"`lavise fetch-weights {SPEC}` while online" in msg and "--download" in msg
    assert str(weights_path(SPEC).name) in msg


def test_download_verifies_and_the_model_loads(hub, served, monkeypatch):
    path, digest, state = served
    seen = []
    with serve(path.parent) as url:
        monkeypatch.setenv(WEIGHTS_URL_ENV, url)
        got = fetch_weights(SPEC, bar=False, on_bytes=lambda n, total: seen.append((n, total)))
    size = path.stat().st_size
    assert got.downloaded and got.verified and got.sha256 == digest and got.size == size
    assert got.path == hub / path.name and got.url == f"{url}/{path.name}"
    assert seen[-1] == (size, size) and all(a[0] < b[0] for a, b in itertools.pairwise(seen))
    assert "verified" in got.summary() and digest in got.summary()
    assert _left(hub) == [path.name]  # no temporary file left
    lm = load_model(SPEC)
    assert lm.weights_hash == digest and lm.classifier == "fc" and len(lm.class_names) == 1000
    loaded = lm.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    again = fetch_weights(SPEC, bar=False)  # a good copy is kept, nothing fetched (the server is gone)
    assert not again.downloaded and again.verified


def test_ensure_weights_fetches_only_what_is_missing(hub, served, monkeypatch):
    assert ensure_weights("synthbirds") is None and ensure_weights("checkpoint:w.pt?arch=resnet18") is None
    with serve(served[0].parent) as url:
        monkeypatch.setenv(WEIGHTS_URL_ENV, url)
        assert ensure_weights(SPEC, bar=False).downloaded
        assert ensure_weights(SPEC, bar=False) is None


def test_a_file_with_the_wrong_hash_is_refused(hub, served, tmp_path, monkeypatch):
    path = served[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (bad / path.name).write_bytes(bytes(data))
    with serve(bad) as url:
        monkeypatch.setenv(WEIGHTS_URL_ENV, url)
        with pytest.raises(WeightsError, match=r"is refused: its SHA-256 .* does not start with"):
            fetch_weights(SPEC, bar=False)
    assert _left(hub) == []  # nothing kept, no temporary file
    with pytest.raises(ModelLoadError, match="not on this machine"):
        load_model(SPEC)


def test_an_unreachable_server_gives_a_plain_message(hub, monkeypatch):
    port = closed_port()
    monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsError) as e:
        fetch_weights(SPEC, bar=False)
    msg = str(e.value)
    assert msg.startswith(f"the download from http://127.0.0.1:{port}/") and "failed" in msg
    assert "refused the connection" in msg and "Errno" not in msg
    assert _left(hub) == []


def test_http_errors_and_bad_addresses(hub, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "empty") as url:  # the file is not there: 404
        monkeypatch.setenv(WEIGHTS_URL_ENV, url)
        with pytest.raises(WeightsError, match="failed: the server answered HTTP 404"):
            fetch_weights(SPEC, bar=False)
    monkeypatch.setenv(WEIGHTS_URL_ENV, "ftp://127.0.0.1/models")
    with pytest.raises(WeightsError, match=rf"only http://, https:// and file:// .*{WEIGHTS_URL_ENV}"):
        fetch_weights(SPEC, bar=False)
    assert _left(hub) == []


class _Truncating(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 100, hangs up."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 100)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_broken_or_interrupted_download_leaves_nothing(hub, served, tmp_path, monkeypatch):
    with serve(tmp_path, handler=_Truncating) as url:
        monkeypatch.setenv(WEIGHTS_URL_ENV, url)
        with pytest.raises(WeightsError, match="failed: the connection"):
            fetch_weights(SPEC, bar=False)
    assert _left(hub) == []

    def interrupt(n, _total):
        if n > 100_000:
            raise KeyboardInterrupt

    with serve(served[0].parent) as url:
        monkeypatch.setenv(WEIGHTS_URL_ENV, url)
        with pytest.raises(KeyboardInterrupt):
            fetch_weights(SPEC, bar=False, on_bytes=interrupt)
    assert _left(hub) == []


def test_a_file_without_published_hash_is_kept_unverified_with_its_hash_recorded(tmp_path, monkeypatch):
    only_localhost(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "vgg11.pth").write_bytes(b"not checked here")
    with serve(tmp_path / "srv") as url:
        got = fetch_weights("timm:vgg11", base_url=url, bar=False)
    assert got.downloaded and not got.verified
    assert "not verified" in got.summary() and got.sha256 in got.summary()
    record = (tmp_path / "hub" / "checkpoints" / "vgg11.pth.sha256").read_text()
    assert record == f"{got.sha256}  vgg11.pth\n"


def test_download_file_reports_bytes_through_a_tqdm_bar(tmp_path, served, monkeypatch, capsys):
    only_localhost(monkeypatch)
    path = served[0]
    with serve(path.parent) as url:
        digest = download_file(f"{url}/{path.name}", tmp_path / "w.pth", sha256_prefix=hash_prefix(path.name))
    assert digest == served[1] and (tmp_path / "w.pth").read_bytes() == path.read_bytes()
    err = capsys.readouterr().err
    assert "w.pth" in err and "B" in err  # the bar, in bytes, named after the file
