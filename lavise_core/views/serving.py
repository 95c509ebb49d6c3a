"""How the dashboard is being served: the one home of "is this server read-only?" (issue 29).

``lavise serve`` (or ``make serve``) starts Streamlit with ``LAVISE_SERVE`` set; ``make demo`` binds 127.0.0.1
and leaves it unset. The modes:

- ``local`` (default, unset): the operator's own machine; everything is allowed, messages may name paths.
- ``read-only``: served to others; no build form, no model-spec or folder inputs, messages name no server
  path, compare only among the served bundles, exports only as downloads.
- ``build``: served with ``--allow-build``; the build form is shown. When the server is bound to a non-local
  address, ``lavise serve`` also requires ``LAVISE_BUILD_TOKEN`` and the form asks for it (``build_token``).

A server started by hand on a non-local ``--server.address`` without ``LAVISE_SERVE`` is read-only.

Also here: escaping of visitor input for markdown / HTML, scrubbing server paths from messages, the bound
on concurrent heavy work (:func:`heavy_slot`), and setting the server's warmed-up heap aside from the garbage
collector (:func:`freeze_warm_heap`).
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import html
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOCAL_ADDRESSES",
    "WARM_UP_THREAD",
    "ServeMode",
    "ServerBusy",
    "build_token_ok",
    "escape_html",
    "escape_markdown",
    "freeze_warm_heap",
    "heavy_slot",
    "public_message",
    "serve_mode",
]

ENV_MODE = "LAVISE_SERVE"
ENV_TOKEN = "LAVISE_BUILD_TOKEN"
ENV_TOKEN_NEEDED = "LAVISE_BUILD_TOKEN_NEEDED"
ENV_HEAVY = "LAVISE_HEAVY_SLOTS"
ENV_GC_FREEZE = "LAVISE_GC_FREEZE"
WARM_UP_THREAD = "lavise-sentence-encoder"  # app.py's background warm-up (bench/ui_latency.py waits for it)
MODES = ("local", "read-only", "build")
LOCAL_ADDRESSES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@dataclass(frozen=True)
class ServeMode:
    """``read_only``: nothing a visitor does writes to disk or names a server path. ``shared``: others may be
    looking (anything but ``local``): messages name no server path. ``token_needed``: the build form asks for
    ``LAVISE_BUILD_TOKEN``."""

    name: str
    token_needed: bool = False

    @property
    def read_only(self) -> bool:
        return self.name == "read-only"

    @property
    def shared(self) -> bool:
        return self.name != "local"

    @property
    def can_build(self) -> bool:
        return not self.read_only


def is_local_address(address: str | None) -> bool:
    """Whether ``address`` only reaches this machine (an empty address binds every interface: not local)."""
    return bool(address) and (address in LOCAL_ADDRESSES or str(address).startswith("127."))


def serve_mode(env: Mapping[str, str] | None = None, address: str | None = None) -> ServeMode:
    """The mode this server runs in, from ``LAVISE_SERVE`` (and the bound ``address`` when it is unset)."""
    env = os.environ if env is None else env
    name = (env.get(ENV_MODE) or "").strip().lower()
    if not name:
        # a hand-started server on a non-local address is read-only; empty = Streamlit's default
        return ServeMode("read-only" if address and not is_local_address(address) else "local")
    if name not in MODES:
        return ServeMode("read-only")  # unknown: the safe side
    if name == "build":
        needed = env.get(ENV_TOKEN_NEEDED, "") == "1"
        if needed and not env.get(ENV_TOKEN):
            return ServeMode("read-only")  # a token is required but there is none: nobody may build
        return ServeMode("build", token_needed=needed)
    return ServeMode(name)


def build_token_ok(mode: ServeMode, given: str | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether a build may start: allowed by the mode and, where a token is needed, ``given`` matches it."""
    if not mode.can_build:
        return False
    if not mode.token_needed:
        return True
    env = os.environ if env is None else env
    want = env.get(ENV_TOKEN) or ""
    return bool(want) and hmac.compare_digest(want.encode(), (given or "").encode())


_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~:$])")  # what starts markup anywhere (<, > and & are HTML-escaped)
_MD_LEADING = re.compile(r"^(\s*(?:\d+)?)([-+=.)])")  # what starts a list or a heading at the start


def escape_markdown(text: object) -> str:
    """``text`` as literal text inside Streamlit markdown: HTML escaped, markdown syntax backslash-escaped."""
    out = _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")
    return _MD_LEADING.sub(lambda m: m.group(1) + "\\" + m.group(2), out)


def escape_html(text: object) -> str:
    """``text`` as literal text inside HTML (attribute-safe)."""
    return html.escape(str(text), quote=True)


_ABS_PATH = re.compile(r"(?<![\w:/.])(?:~|\.{1,2})?/(?:[^\s/'\"`<>()]+/)*([^\s/'\"`<>(),;]*)")


def public_message(message: object, mode: ServeMode, roots: Mapping[str, str] | None = None) -> str:
    """``message`` as a visitor may see it: in a shared mode, each of ``roots`` (path → display name) is
    replaced by its display name and any other path by its last part."""
    text = str(message)
    if not mode.shared:
        return text
    for path, name in sorted((roots or {}).items(), key=lambda kv: -len(kv[0])):
        if path:
            text = text.replace(str(Path(path).resolve()), name).replace(str(path), name)
    return _ABS_PATH.sub(lambda m: m.group(1) or "…", text)


class ServerBusy(ValueError):
    """Every heavy-work slot is taken: the visitor is told to try again, nobody slows down."""


def _slots() -> int:
    try:
        return max(1, int(os.environ.get(ENV_HEAVY, "2")))
    except ValueError:
        return 2


_HEAVY = threading.BoundedSemaphore(_slots())


@contextlib.contextmanager
def heavy_slot(what: str, semaphore: threading.Semaphore | None = None) -> Iterator[None]:
    """Run the block in one of ``LAVISE_HEAVY_SLOTS`` (default 2) slots shared by every session, or raise
    :class:`ServerBusy` at once when all are taken."""
    sem = _HEAVY if semaphore is None else semaphore
    if not sem.acquire(blocking=False):
        raise ServerBusy(
            f"Busy: the server is already running its limit of heavy computations for other visitors, so "
            f"{what} is not started. Try again in a moment."
        )
    try:
        yield
    finally:
        sem.release()


def freeze_warm_heap(env: Mapping[str, str] | None = None) -> int:
    """Collect once, then move every object alive now into the garbage collector's permanent generation
    (:func:`gc.freeze`); returns how many objects are frozen in all (0 when ``LAVISE_GC_FREEZE=0``).

    The dashboard calls it when a bundle's workspace is opened and when the background load of the sentence
    encoder ends: the libraries, the model, the encoder and the bundle are about 730,000 tracked objects that
    live as long as the server, and every full collection walked all of them (0.4-0.55 s on the demo bundle,
    about once per 1,000 page reruns, landing on whichever visitor's rerun triggered it). Frozen objects are
    still freed when their reference count drops to zero; only a reference cycle among them would never be
    collected, which is why a collection runs first. Calling it again freezes what came since and walks only
    the unfrozen objects."""
    env = os.environ if env is None else env
    if env.get(ENV_GC_FREEZE, "1") == "0":
        return 0
    gc.collect()
    gc.freeze()
    # walks nothing frozen; without it the next full collection waits for a quarter of the whole heap's count
    # (about 180,000 new survivors) and then walks them all at once
    gc.collect()
    return gc.get_freeze_count()
