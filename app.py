"""lavise dashboard: what a CNN has learned, filter by filter, in words and pictures.

Run with ``make demo`` or ``streamlit run app.py``. Pages live in ``app_pages/`` (not ``pages/``: Streamlit would also treat that folder as old-style pages on a first visit to a page URL) (thin: read widgets, call one
``lavise_core.views`` function, render); this file only sets up navigation and the bundle choice.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import streamlit as st

from app_pages import _shared
from lavise_core.views.serving import WARM_UP_THREAD, freeze_warm_heap

# a local favicon: a ":material/…" page icon is fetched from an external font host by the browser, and the
# dashboard makes no request that leaves the machine (tests/app/test_browser.py checks every page)
st.set_page_config(
    page_title="lavise · what has this CNN learned?",
    page_icon=str(Path(__file__).parent / "app_pages" / "favicon.png"),
    layout="wide",
)


def _load_sentence_encoder() -> None:
    """Load the process's one sentence encoder and run one query through it (the first pass is slow too), then
    set the warmed-up heap aside from the garbage collector (``freeze_warm_heap``)."""
    try:
        from lavise_core.models.text_encoder import shared_embedder

        shared_embedder().embed_queries(["a bird"])
    except Exception:  # the Concepts page loads it again and shows the error where it is needed
        logging.getLogger("lavise").exception("loading the sentence encoder in the background failed")
    finally:
        freeze_warm_heap()


@st.cache_resource(show_spinner=False)
def warm_sentence_encoder() -> threading.Thread:
    """Start loading the sentence encoder in a daemon thread, once per server process (the first visit runs
    this file). The Concepts page asks the same ``shared_embedder`` instance, whose load is guarded by a lock:
    a query made while the load runs waits for it instead of starting a second one."""
    thread = threading.Thread(target=_load_sentence_encoder, name=WARM_UP_THREAD, daemon=True)
    thread.start()
    return thread


if os.environ.get("LAVISE_PRELOAD_ENCODER", "1") != "0":
    warm_sentence_encoder()

PAGES = [
    st.Page("app_pages/home.py", title="Overview", icon=":material/home:", default=True),
    st.Page("app_pages/filters.py", title="Filters", icon=":material/grid_view:", url_path="filters"),
    st.Page("app_pages/concepts.py", title="Concepts", icon=":material/search:", url_path="concepts"),
    st.Page("app_pages/explain.py", title="Explain an image", icon=":material/image:", url_path="explain"),
    st.Page("app_pages/classes.py", title="Classes & failures", icon=":material/label:", url_path="classes"),
    st.Page("app_pages/dataset.py", title="Data set", icon=":material/dataset:", url_path="dataset"),
    st.Page("app_pages/datamap.py", title="Map", icon=":material/scatter_plot:", url_path="map"),
    st.Page("app_pages/layers.py", title="Layers", icon=":material/layers:", url_path="layers"),
    st.Page(
        "app_pages/evaluation.py", title="Evaluation", icon=":material/monitoring:", url_path="evaluation"
    ),
]

nav = st.navigation(PAGES)
st.sidebar.title("lavise")
_shared.sidebar_bundle_choice()
st.sidebar.caption(
    "Explanations of one layer of a frozen CNN: Guo et al. attribute p.d.f.s and LaViSE zero-shot concepts."
)
nav.run()
