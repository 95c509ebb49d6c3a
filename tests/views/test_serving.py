"""Issue 29: the serving mode (one home: views/serving.py), escaping of visitor input, no server paths in
messages, and the bound on concurrent heavy work."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from lavise_core.views import serving
from lavise_core.views.serving import (
    ServeMode,
    ServerBusy,
    build_token_ok,
    escape_html,
    escape_markdown,
    freeze_warm_heap,
    heavy_slot,
    public_message,
    serve_mode,
)


def test_default_is_local_and_may_build() -> None:
    m = serve_mode({}, None)
    assert m.name == "local" and m.can_build and not m.read_only and not m.shared
    assert serve_mode({}, "127.0.0.1").name == "local"


def test_hand_started_server_on_a_network_address_is_read_only() -> None:
    m = serve_mode({}, "0.0.0.0")
    assert m.read_only and not m.can_build and m.shared


def test_modes_from_the_environment() -> None:
    assert serve_mode({"LAVISE_SERVE": "read-only"}).read_only
    assert serve_mode({"LAVISE_SERVE": "nonsense"}).read_only  # unknown: the safe side
    b = serve_mode({"LAVISE_SERVE": "build"})
    assert b.can_build and not b.token_needed and b.shared
    # a token is required but none is set: nobody may build
    assert serve_mode({"LAVISE_SERVE": "build", "LAVISE_BUILD_TOKEN_NEEDED": "1"}).read_only


def test_build_token() -> None:
    env = {"LAVISE_SERVE": "build", "LAVISE_BUILD_TOKEN_NEEDED": "1", "LAVISE_BUILD_TOKEN": "s3cret"}
    m = serve_mode(env)
    assert m.token_needed
    assert not build_token_ok(m, None, env)
    assert not build_token_ok(m, "wrong", env)
    assert build_token_ok(m, "s3cret", env)
    assert not build_token_ok(ServeMode("read-only"), "s3cret", env)
    assert build_token_ok(ServeMode("local"), None, {})


def test_escape_markdown_keeps_the_text_literal() -> None:
    name = "<img src=x onerror=alert(1)>.png"
    out = escape_markdown(name)
    assert "<" not in out and ">" not in out
    assert escape_markdown("**bold** [x](http://e)") == r"\*\*bold\*\* \[x\](http\://e)"
    assert escape_markdown("notes.txt") == "notes.txt"  # plain names stay as they are
    assert escape_markdown("- 1. x") == r"\- 1. x" and escape_markdown("12. x") == r"12\. x"
    assert escape_html('"><script>') == "&quot;&gt;&lt;script&gt;"


def test_public_message_names_no_server_path() -> None:
    shared = ServeMode("read-only")
    msg = "weights missing: expected /root/.cache/torch/hub/checkpoints/efficientnet.pth (run fetch-weights)"
    out = public_message(msg, shared)
    assert "/root" not in out and "efficientnet.pth" in out
    out = public_message("bundle /srv/lavise/data/bundles/demo-x is broken", shared,
                         {"/srv/lavise/data/bundles/demo-x": "demo-x"})  # fmt: skip
    assert out == "bundle demo-x is broken"
    assert public_message(msg, ServeMode("local")) == msg  # the operator's own machine: unchanged
    assert public_message("p(t | f) = 0.5 and/or 1/2", shared) == "p(t | f) = 0.5 and/or 1/2"


def test_heavy_slot_refuses_at_once_when_full() -> None:
    sem = threading.BoundedSemaphore(1)
    with heavy_slot("an inversion", sem), pytest.raises(ServerBusy, match="Busy"), heavy_slot("again", sem):
        pass
    with heavy_slot("an inversion", sem):  # released
        pass
    assert issubclass(ServerBusy, ValueError)
    assert serving._slots() >= 1


def test_heavy_views_say_busy_when_every_slot_is_taken(monkeypatch) -> None:
    from lavise_core import views

    full = threading.BoundedSemaphore(1)
    full.acquire()
    monkeypatch.setattr(serving, "_HEAVY", full)
    with pytest.raises(ServerBusy, match="inversion"):
        views.invert_image(None, None, "features")  # refused before any work (or model load) starts
    with pytest.raises(ServerBusy, match="visualisation"):
        views.compute_filter_visualisation(_NoProbe(), 0)


class _NoProbe:
    def require_probe(self) -> None:
        pass


class _Node:
    """An object the garbage collector tracks."""


def test_freeze_warm_heap_sets_the_live_heap_aside_and_frees_by_refcount() -> None:
    before = gc.get_freeze_count()
    assert before == 0  # conftest switches the server's freeze off for the suite
    alive = _Node()
    gone: list[int] = []
    weakref.finalize(alive, gone.append, 1)
    try:
        frozen = freeze_warm_heap({})
        assert frozen == gc.get_freeze_count() > 0
        assert all(alive is not o for o in gc.get_objects())  # the collector no longer walks it
        del alive  # a frozen object whose last reference goes is still freed
        assert gone == [1]
        young = _Node()
        assert any(young is o for o in gc.get_objects())  # made after the freeze: collected as usual
        assert freeze_warm_heap({}) > 0  # again: what came since is frozen too
        assert all(young is not o for o in gc.get_objects())
    finally:
        gc.unfreeze()


def test_freeze_warm_heap_can_be_switched_off() -> None:
    assert freeze_warm_heap({"LAVISE_GC_FREEZE": "0"}) == 0
    assert gc.get_freeze_count() == 0
