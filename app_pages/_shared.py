"""Streamlit glue shared by the pages: cached resources, the bundle selector, error display.

The rules behind the selector (which bundle opens first, the bundle labels) are plain functions in
:mod:`lavise_core.views.workspace`.

Everything heavy is a ``st.cache_resource`` (one copy per server process, shared by sessions, never
copied): the bundle (memory-mapped arrays), the model (a ``LoadedModel`` whose ``.lock`` guards every
hooked forward pass), the sentence-transformer, the concept index, and the page-level workspace.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import streamlit as st

from lavise_core import views
from lavise_core.data.images import ImageLoadError
from lavise_core.pipeline.bundle import Bundle, BundleError, find_bundles
from lavise_core.views.serving import ServeMode, ServerBusy, public_message, serve_mode
from lavise_core.views.workspace import StageMissing, Workspace, default_bundle, unique_bundle_labels

log = logging.getLogger("lavise.app")

BUNDLE_KEY = "bundle_path"


def bundles_root() -> Path:
    return Path(os.environ.get("LAVISE_BUNDLES", "data/bundles"))


def data_root() -> Path:
    """The folder the build form looks in for data sets (``LAVISE_DATA``, default ``data``)."""
    return Path(os.environ.get("LAVISE_DATA", "data"))


def mode() -> ServeMode:
    """How this server is served (local, read-only, build): decided in :func:`lavise_core.views.serve_mode`."""
    return serve_mode(address=st.get_option("server.address"))


def public(message: object) -> str:
    """``message`` as a visitor may see it: when shared, bundle paths become bundle names and no path is named."""
    m = mode()
    if not m.shared:
        return str(message)
    roots = {str(bundles_root()): "the bundles folder"}
    with contextlib.suppress(Exception):
        roots.update({str(b.root): b.root.name for b in available_bundles()})
    return public_message(message, m, roots)


# max_entries: a bundle built behind the dashboard changes its stamp at every stage; old copies go
@st.cache_resource(show_spinner="Opening the bundle…", max_entries=8)
def get_bundle(path: str, stamp: float) -> Bundle:
    """The bundle at ``path`` (``stamp``: mtime of its bundle.json, so a rebuilt bundle is reopened)."""
    return Bundle.open(path)


@st.cache_resource(show_spinner="Loading the network…", max_entries=8)
def get_model(path: str, stamp: float):
    return get_bundle(path, stamp).load_model()


@st.cache_resource(show_spinner="Loading the sentence encoder…")
def get_embedder(model_id: str):
    from lavise_core.models.text_encoder import shared_embedder

    return shared_embedder(model_id)


@st.cache_resource(show_spinner="Loading the concept index…", max_entries=4)
def get_lavise(path: str, stamp: float):
    from lavise_core.explain.lavise.explainer import LaviseExplainer
    from lavise_core.explain.lavise.index import ConceptIndex
    from lavise_core.models.text_encoder import DEFAULT_MODEL_ID

    bundle = get_bundle(path, stamp)
    index = ConceptIndex.load(Path(path) / "lavise", embedder=get_embedder(DEFAULT_MODEL_ID))
    return LaviseExplainer.from_bundle(bundle, index=index)


@st.cache_resource(show_spinner=False, max_entries=8)
def get_workspace(path: str, stamp: float) -> Workspace:
    ws = Workspace(
        get_bundle(path, stamp),
        model_loader=lambda: get_model(path, stamp),
        lavise_loader=lambda: get_lavise(path, stamp),
    )
    views.freeze_warm_heap()  # the libraries and this bundle live as long as the server: out of the GC's walk
    return ws


def _stamp(path: str) -> float:
    try:
        return (Path(path) / "bundle.json").stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner=False, max_entries=4)
def _bundles_at(root: str, stamps: tuple[tuple[str, float], ...]) -> list[Bundle]:
    """The bundles under ``root`` (``stamps``: each folder's bundle.json mtime, so a new or rebuilt one is read)."""
    return find_bundles(root)


def available_bundles() -> list[Bundle]:
    """The bundles under :func:`bundles_root`, their manifests read again only when a bundle.json changed
    (every rerun of every page asks; a stat per folder instead of parsing every manifest)."""
    root = bundles_root()
    try:
        stamps = tuple(sorted((d.name, _stamp(str(d))) for d in root.iterdir() if d.is_dir()))
    except OSError:  # no such folder yet: find_bundles says there is none
        stamps = ()
    return _bundles_at(str(root), stamps)


def sidebar_bundle_choice() -> str | None:
    """The bundle selector in the sidebar; returns the chosen bundle's path (or None when there is none)."""
    bundles = available_bundles()
    if not bundles:
        st.sidebar.warning(public(f"No bundle under `{bundles_root()}` yet."))
        return None
    paths = [str(b.root) for b in bundles]
    labels = unique_bundle_labels(bundles)
    wanted = st.query_params.get("bundle")
    current = st.session_state.get(BUNDLE_KEY)
    if wanted:
        match = [p for p in paths if Path(p).name == wanted]
        if match:
            current = match[0]
    if current not in paths:
        current = str(default_bundle(bundles).root)
    st.session_state[BUNDLE_KEY] = current
    choice = st.sidebar.selectbox(
        "Bundle (model × layer × probe set)",
        paths,
        index=paths.index(current),
        format_func=lambda p: labels[p],
        key="bundle_select",
    )
    if choice != current:
        st.session_state[BUNDLE_KEY] = choice
        st.query_params.pop("filter", None)
    return st.session_state[BUNDLE_KEY]


def workspace() -> Workspace | None:
    """The workspace of the chosen bundle, or ``None`` after telling the user how to get one."""
    path = st.session_state.get(BUNDLE_KEY)
    if not path:
        if mode().read_only:
            st.info("This server has no explanation bundle to show yet.")
            return None
        st.info(
            public(
                f"There is no explanation bundle under `{bundles_root()}` yet. Build the demo one with "
                "`make demo` (or `lavise build --model synthbirds --data data/synthbirds`), or use "
                "**Build a bundle** on the Overview page."
            )
        )
        return None
    background_build(path)
    try:
        return get_workspace(path, _stamp(path))
    except BundleError as e:
        st.error(public(e))
        return None


def background_build(path: str) -> None:
    """In the sidebar: the progress of a build running behind the dashboard (``lavise demo``), if any."""
    from lavise_core.pipeline.background import read_build_status

    status = read_build_status(path)
    note = views.background_build_note(status)
    if note is None or note.kind == "done":
        return
    if note.kind == "problem":
        st.sidebar.warning(note.text, icon=":material/construction:")
        return
    with st.sidebar:
        _watch_background_build(path, _stamp(path))


@st.fragment(run_every=3)
def _watch_background_build(path: str, stamp: float) -> None:
    """Every 3 s: the build's progress; the page reruns when a stage lands (it fills in) and when the build
    ends."""
    from lavise_core.pipeline.background import read_build_status

    status = read_build_status(path)
    note = views.background_build_note(status)
    landed = _stamp(path) != stamp
    if note is None or note.kind != "running" or landed:
        st.rerun()
    st.progress(note.fraction, text=note.text)


def building_now() -> bool:
    """Whether a build runs behind the dashboard for the chosen bundle (``lavise demo``)."""
    from lavise_core.pipeline.background import read_build_status

    path = st.session_state.get(BUNDLE_KEY)
    status = read_build_status(path) if path else None
    return status is not None and status.running


@contextlib.contextmanager
def guard(what: str = "this view") -> Iterator[None]:
    """Show our errors as messages, never as tracebacks; log the unexpected ones."""
    try:
        yield
    except StageMissing as e:
        if building_now():  # the command it names is already running: say what is missing, and that it comes
            what = str(e).split(": build", 1)[0].rstrip(".")
            st.info(
                f"{what[:1].upper()}{what[1:]}. It is being built in the background now: this page fills in when "
                "it is done.",
                icon=":material/hourglass_top:",
            )
        else:
            st.info(public(e), icon=":material/construction:")
    except ImageLoadError as e:
        st.error(public(e))
    except ServerBusy as e:
        st.warning(str(e), icon=":material/hourglass_top:")
    except ValueError as e:
        st.error(public(e))
    except Exception as e:  # the session must survive anything
        log.exception("unexpected error in %s", what)
        if mode().shared:  # a visitor sees neither the exception's type nor its text (paths, internals)
            st.error(f"Unexpected error in {what}. Details are in the server log.")
        else:
            st.error(f"Unexpected error in {what}: {type(e).__name__}: {e}. Details are in the server log.")
