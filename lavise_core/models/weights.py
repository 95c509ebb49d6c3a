"""Pretrained weights for ``torchvision:NAME`` and ``timm:NAME``: where they live and an opt-in download.

:func:`~lavise_core.models.networks.load_model` never downloads; it reads the file :func:`weights_path` names
(the torch hub cache, ``$TORCH_HOME/hub/checkpoints/``, the same file torchvision and timm would use). This
module fetches that file when the user asks (``lavise fetch-weights SPEC``, ``--download``):

- streamed from the URL the library publishes (or from ``$LAVISE_WEIGHTS_URL/<file name>``, a mirror or a
  test server) into a temporary file next to the destination, with a tqdm bar and/or a byte callback;
- verified by SHA-256: a file name ``NAME-<hex>.pth`` carries the first hex digits of its hash (torch.hub's
  convention, used by every torchvision URL and most timm ones) and a mismatch is refused; a file with no
  published hash (timm weights on the Hugging Face hub only) is kept, its SHA-256 recorded next to it
  (``<file>.sha256``) and reported as not verified;
- moved into place with ``os.replace`` only once complete and verified: a failed, refused or interrupted
  download leaves nothing at the destination (its temporary file is removed).

Errors are :class:`WeightsError` (a ``ValueError``) with a plain message: what failed, why, what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "WEIGHTS_URL_ENV",
    "FetchedWeights",
    "WeightsError",
    "WeightsSource",
    "download_file",
    "ensure_weights",
    "fetch_weights",
    "hash_prefix",
    "missing_weights_message",
    "weights_path",
    "weights_source",
]

#: environment variable: a base URL (http://, https:// or file://) the weight files are fetched from instead
WEIGHTS_URL_ENV = "LAVISE_WEIGHTS_URL"
LIBRARIES = ("torchvision", "timm")
TIMEOUT_S = 30.0
CHUNK = 1 << 16
#: ``NAME-<hex>.ext``: the hex digits start the file's SHA-256 (torch.hub's rule; 8 or more digits here, so a
#: name such as ``efficientnet-b0.pth`` is not read as a hash)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")


class WeightsError(ValueError):
    """Weights could not be found, downloaded or verified; the message says why and what to do."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights of one spec come from and where they go.

    Attributes:
        spec: ``library:NAME`` (no query).
        url: the URL the library publishes.
        filename: the file name in the torch hub cache.
        sha256_prefix: the start of the file's SHA-256 published with it (from the file name), or None.
    """

    spec: str
    url: str
    filename: str
    sha256_prefix: str | None

    @property
    def path(self) -> Path:
        return hub_checkpoints() / self.filename

    def download_url(self, base_url: str | None = None) -> str:
        """``base_url/<filename>`` when a base URL is given (argument, else ``$LAVISE_WEIGHTS_URL``), else the
        published URL."""
        base = base_url if base_url is not None else os.environ.get(WEIGHTS_URL_ENV) or None
        return f"{base.rstrip('/')}/{self.filename}" if base else self.url


@dataclass(frozen=True)
class FetchedWeights:
    """What :func:`fetch_weights` did: the file, its SHA-256, whether it was verified and downloaded now."""

    spec: str
    path: Path
    url: str
    sha256: str
    verified: bool
    downloaded: bool
    size: int

    def summary(self) -> str:
        """A few plain lines for the command line."""
        what = f"downloaded {self.spec} from {self.url}" if self.downloaded else f"{self.spec} already here"
        lines = [f"{what}: {self.path} ({self.size / 1e6:.1f} MB)", f"SHA-256 {self.sha256}"]
        if self.verified:
            lines.append(
                f"verified: it starts with {hash_prefix(self.path.name)}, the hash published in its name"
            )
        else:
            lines.append(
                f"not verified: {self.spec.split(':')[0]} publishes no hash for this file; the SHA-256 "
                f"above is recorded in {self.path.name}.sha256, compare it with a copy you trust"
            )
        return "\n".join(lines)


def hash_prefix(filename: str) -> str | None:
    """The SHA-256 prefix a file name carries (``resnet18-f37072fd.pth`` -> ``f37072fd``), or None."""
    m = _HASH_IN_NAME.search(filename)
    return m.group(1) if m else None


def hub_checkpoints() -> Path:
    """The torch hub cache's checkpoint folder (``torch.hub.get_dir()/checkpoints``), read at each call."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _split(spec: str) -> tuple[str, str]:
    base = spec.partition("?")[0]
    library, sep, arch = base.partition(":")
    if not sep or library not in LIBRARIES or not arch:
        raise WeightsError(
            f"only torchvision:NAME and timm:NAME specs have weights to download, not {_clip(spec)} "
            "(`lavise models` lists the specs)"
        )
    return library, arch


def weights_source(spec: str) -> WeightsSource:
    """The published weights of ``torchvision:NAME`` / ``timm:NAME`` (a ``?query`` is ignored).

    Raises:
        WeightsError: not such a spec, an unknown architecture, or one without published weights.
    """
    library, arch = _split(spec)
    base = f"{library}:{arch}"
    if library == "torchvision":
        import torchvision

        try:
            url = torchvision.models.get_model_weights(arch).DEFAULT.url
        except (ValueError, KeyError, AttributeError):
            raise WeightsError(
                f"torchvision has no architecture {_clip(arch)} with pretrained weights "
                "(`python -c 'import torchvision; print(torchvision.models.list_models())'` lists them)"
            ) from None
        filename = os.path.basename(urlsplit(url).path)
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
        if cfg is None:
            raise WeightsError(f"timm has no architecture {_clip(arch)} (`timm.list_models()` lists them)")
        if cfg.url:
            url = cfg.url
            filename = os.path.basename(urlsplit(url).path)
        elif cfg.hf_hub_id:  # weights on the Hugging Face hub only: timm's own state dict, no hash published
            url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/pytorch_model.bin"
            filename = f"{arch}.pth"
        else:
            raise WeightsError(f"timm publishes no pretrained weights for {_clip(arch)}")
    return WeightsSource(spec=base, url=url, filename=filename, sha256_prefix=hash_prefix(filename))


def weights_path(spec: str) -> Path:
    """Where :func:`~lavise_core.models.networks.load_model` looks for the weights of ``spec``."""
    return weights_source(spec).path


def _home(path: Path) -> str:
    """``path`` with the home folder written ``~``."""
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if home not in ("", "/") and text.startswith(home + os.sep) else text


def missing_weights_message(spec: str, path: Path) -> str:
    """What to do when the weights of ``spec`` are not at ``path``."""
    base = spec.partition("?")[0]
    return (
        f"the weights of {base} are not on this machine (looked for {_home(path)}); run "
        f"`lavise fetch-weights {base}` while online, or pass --download to the command that needs them "
        f"(in Python: lavise_core.models.weights.fetch_weights({base!r})); or copy the file there yourself"
    )


# --------------------------------------------------------------------------------------- download
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _why(e: BaseException, host: str) -> str:
    """A network or disk error in plain words."""
    if isinstance(e, urllib.error.HTTPError):
        return f"the server answered HTTP {e.code} {e.reason}".rstrip()
    if isinstance(e, urllib.error.URLError):
        reason = e.reason
        if isinstance(reason, BaseException):
            return _why(reason, host)
        return f"{reason}"
    if isinstance(e, ConnectionRefusedError):
        return f"{host} refused the connection (no server is listening there)"
    if isinstance(e, socket.gaierror):
        return f"the name {host} could not be resolved (is this machine offline?)"
    if isinstance(e, TimeoutError):
        return f"{host} did not answer within {TIMEOUT_S:.0f} s"
    if isinstance(e, ssl.SSLError | ssl.CertificateError):
        return f"the secure connection to {host} failed ({getattr(e, 'reason', None) or e})"
    if isinstance(e, http.client.IncompleteRead):
        return f"the connection broke after {len(e.partial)} bytes"
    if isinstance(e, ConnectionResetError):
        return f"{host} reset the connection"
    if isinstance(e, http.client.HTTPException | ConnectionError):
        return f"the connection to {host} broke ({e or type(e).__name__})"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


def download_file(
    url: str,
    dest: Path,
    *,
    sha256_prefix: str | None = None,
    bar: bool = True,
    on_bytes: Callable[[int, int | None], None] | None = None,
    timeout: float = TIMEOUT_S,
) -> str:
    """Stream ``url`` to ``dest`` -> the file's SHA-256 (hex).

    The bytes go to a temporary file in ``dest``'s folder; a tqdm bar (``bar``) and ``on_bytes(received,
    total or None)`` follow them. Only a complete file whose SHA-256 starts with ``sha256_prefix`` (when
    given) is moved to ``dest`` (``os.replace``, atomic); on any failure, or an interrupt, the temporary
    file is removed and ``dest`` is left as it was.

    Raises:
        WeightsError: unreachable server, HTTP error, truncated transfer, hash mismatch, unwritable folder.
    """
    from tqdm.auto import tqdm

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "file"):
        raise WeightsError(
            f"cannot download from {_clip(url)}: only http://, https:// and file:// addresses are supported "
            f"(check {WEIGHTS_URL_ENV} if you set it)"
        )
    host = parts.netloc or "this machine"
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise WeightsError(f"cannot write the weights to {dest.parent}: {_why(e, host)}") from None
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    received = 0
    total: int | None = None
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "lavise"})
            try:
                resp = urllib.request.urlopen(request, timeout=timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                raise WeightsError(f"the download from {url} failed: {_why(e, host)}") from None
            with resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                    disable=not bar, leave=False,
                ) as progress:  # fmt: skip
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (http.client.HTTPException, OSError, ValueError) as e:
                            raise WeightsError(f"the download from {url} failed: {_why(e, host)}") from None
                        if not chunk:
                            break
                        try:
                            out.write(chunk)
                        except OSError as e:
                            raise WeightsError(
                                f"cannot write the weights to {dest.parent}: {_why(e, host)}"
                            ) from None
                        h.update(chunk)
                        received += len(chunk)
                        progress.update(len(chunk))
                        if on_bytes is not None:
                            on_bytes(received, total)
            if total is not None and received != total:
                raise WeightsError(
                    f"the download from {url} failed: the connection closed after {received} of {total} bytes"
                )
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if sha256_prefix and not digest.startswith(sha256_prefix):
            raise WeightsError(
                f"the file downloaded from {url} is refused: its SHA-256 {digest[:16]}... does not start "
                f"with {sha256_prefix}, the hash published in its name (a corrupted or altered file); "
                "nothing was kept. Try again; if it persists, the server or a proxy serves a different file"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def fetch_weights(
    spec: str,
    *,
    base_url: str | None = None,
    force: bool = False,
    bar: bool = True,
    on_bytes: Callable[[int, int | None], None] | None = None,
    timeout: float = TIMEOUT_S,
) -> FetchedWeights:
    """Make sure the weights of ``torchvision:NAME`` / ``timm:NAME`` are in the torch hub cache.

    A file already there whose name's hash it matches (or that has no published hash) is kept unless
    ``force``; otherwise it is downloaded (:func:`download_file`) from ``base_url/<file>``,
    ``$LAVISE_WEIGHTS_URL/<file>`` or the published URL, in that order. A file without a published hash gets
    its SHA-256 written next to it (``<file>.sha256``, ``sha256sum -c`` format).

    Raises:
        WeightsError: not a downloadable spec, or the download failed or was refused.
    """
    src = weights_source(spec)
    dest = src.path
    url = src.download_url(base_url)
    if dest.is_file() and not force:
        digest = _sha256_file(dest)
        if not src.sha256_prefix or digest.startswith(src.sha256_prefix):
            return FetchedWeights(
                spec=src.spec, path=dest, url=url, sha256=digest, verified=bool(src.sha256_prefix),
                downloaded=False, size=dest.stat().st_size,
            )  # fmt: skip
    digest = download_file(
        url, dest, sha256_prefix=src.sha256_prefix, bar=bar, on_bytes=on_bytes, timeout=timeout
    )
    if not src.sha256_prefix:
        with contextlib.suppress(OSError):  # the hash is still returned and printed
            dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n", encoding="utf-8")
    return FetchedWeights(
        spec=src.spec, path=dest, url=url, sha256=digest, verified=bool(src.sha256_prefix), downloaded=True,
        size=dest.stat().st_size,
    )  # fmt: skip


def ensure_weights(
    spec: str, *, bar: bool = True, on_bytes: Callable[[int, int | None], None] | None = None
) -> FetchedWeights | None:
    """``--download``: fetch the weights of a ``torchvision:`` / ``timm:`` spec if they are not on this
    machine -> what was fetched, or None when nothing was needed (already there, or a spec with no weights to
    download: a model card, a checkpoint, ``synthbirds``, ``efficientnet_lite0``)."""
    if spec.partition(":")[0] not in LIBRARIES:
        return None
    if weights_source(spec).path.is_file():
        return None
    return fetch_weights(spec, bar=bar, on_bytes=on_bytes)


def _clip(text: str, n: int = 80) -> str:
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"
