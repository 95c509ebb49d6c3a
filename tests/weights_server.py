"""A weight file served from 127.0.0.1 for the download tests (``tests/models/test_weights.py``, the CLI test).

The file is a real state dict of torchvision's ``shufflenet_v2_x0_5`` (seeded, 5.6 MB), saved with
``torch.save`` and named ``shufflenet_v2_x0_5-<first 8 hex digits of its SHA-256>.pth``. :func:`publish`
makes torchvision's published URL name that file for the duration of a test, as if torchvision shipped it;
:func:`serve` runs a real ``http.server`` on 127.0.0.1 in a thread; :func:`only_localhost` refuses any
connection elsewhere, so no test can reach the internet.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

ARCH = "shufflenet_v2_x0_5"
SPEC = f"torchvision:{ARCH}"


def write_weights(folder: Path) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """Save a seeded ``shufflenet_v2_x0_5`` state dict in ``folder`` under its hash-named file name ->
    ``(path, sha256, state dict)``."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.get_model(ARCH, weights=None).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "weights.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{ARCH}-{digest[:8]}.pth"
    tmp.replace(path)
    return path, digest, state


def publish(monkeypatch, filename: str) -> None:
    """Make torchvision's default weights of ``ARCH`` point at ``filename`` (undone by ``monkeypatch``)."""
    import torchvision

    weights = torchvision.models.get_model_weights(ARCH).DEFAULT
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/{filename}")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path, handler: type[http.server.BaseHTTPRequestHandler] | None = None) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 in a thread -> its base URL ``http://127.0.0.1:PORT``."""
    make = handler or functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_localhost(monkeypatch) -> None:
    """Refuse every outgoing connection that is not to 127.0.0.1 / localhost."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        if address[0] not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"a test tried to reach {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
