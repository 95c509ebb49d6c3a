"""The sentence encoder is loaded in the background once per server, and a query waits on that same load."""

from __future__ import annotations

import gc
import threading
import time

import streamlit as st
from app_bundles import ROOT
from streamlit.testing.v1 import AppTest

from lavise_core.models import text_encoder
from lavise_core.views.serving import WARM_UP_THREAD


class _Recorder:
    def __init__(self) -> None:
        self.queries: list[list[str]] = []
        self.threads: list[str] = []

    def embed_queries(self, texts):
        self.queries.append(list(texts))
        self.threads.append(threading.current_thread().name)


def test_app_starts_one_background_load(monkeypatch, tmp_path):
    rec = _Recorder()
    monkeypatch.setattr(text_encoder, "shared_embedder", lambda model_id=None: rec)
    monkeypatch.setenv("LAVISE_BUNDLES", str(tmp_path))  # no bundle: the app still starts the load
    monkeypatch.delenv("LAVISE_PRELOAD_ENCODER", raising=False)
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.run()  # a rerun (or a second session) starts no second load
    assert not at.exception
    for _ in range(200):
        if rec.queries:
            break
        time.sleep(0.01)
    time.sleep(0.1)
    assert rec.queries == [["a bird"]]
    assert rec.threads == [WARM_UP_THREAD]
    st.cache_resource.clear()


def test_preload_can_be_switched_off(monkeypatch, tmp_path):
    rec = _Recorder()
    monkeypatch.setattr(text_encoder, "shared_embedder", lambda model_id=None: rec)
    monkeypatch.setenv("LAVISE_BUNDLES", str(tmp_path))
    monkeypatch.setenv("LAVISE_PRELOAD_ENCODER", "0")
    st.cache_resource.clear()
    AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    time.sleep(0.2)
    assert rec.queries == []


def test_concurrent_first_uses_share_one_load(monkeypatch):
    """The page's query during the background load waits for it: the model is built once."""
    built: list[int] = []

    class SlowModel(list):
        def __init__(self, *a, **k) -> None:
            time.sleep(0.2)
            built.append(1)
            super().__init__()

    import sentence_transformers

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", SlowModel)
    emb = text_encoder.TextEmbedder(path=".")
    threads = [threading.Thread(target=emb.fast_path) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [1]


def test_warm_up_freezes_the_heap_when_done(monkeypatch, tmp_path):
    """After the encoder's first query, the server's heap is set aside from the garbage collector (the suite
    switches it off in conftest; a server has it on)."""
    rec = _Recorder()
    monkeypatch.setattr(text_encoder, "shared_embedder", lambda model_id=None: rec)
    monkeypatch.setenv("LAVISE_BUNDLES", str(tmp_path))
    monkeypatch.delenv("LAVISE_PRELOAD_ENCODER", raising=False)
    monkeypatch.setenv("LAVISE_GC_FREEZE", "1")
    st.cache_resource.clear()
    try:
        AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
        for thread in threading.enumerate():
            if thread.name == WARM_UP_THREAD:
                thread.join(30)
        assert rec.queries == [["a bird"]]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        st.cache_resource.clear()
