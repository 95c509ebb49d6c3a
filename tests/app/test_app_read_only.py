"""Issue 29 in AppTest: a read-only server has no build form and no path inputs, a build token is asked for
where needed, visitor input is shown as text, and messages name no server path or internals."""

from __future__ import annotations

import io

from PIL import Image
from test_app_pages import bundles, open_app  # noqa: F401  (bundles is a fixture)

EVIL = "<img src=x onerror=alert(1)>.png"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    return buf.getvalue()


def test_read_only_overview_has_no_build_form_and_no_path_input(monkeypatch, bundles):  # noqa: F811
    monkeypatch.setenv("LAVISE_SERVE", "read-only")
    at = open_app(monkeypatch, bundles, bundle=bundles.full)
    assert not [e for e in at.expander if "Build a bundle" in e.label]
    assert not at.text_input and not at.toggle  # no model spec, no data folder, no "set up a new build"
    csv = next(b.proto.label for b in at.get("download_button"))
    assert csv == "Filter table (CSV)"  # exports: downloads to the browser
    for page in ("app_pages/filters.py", "app_pages/explain.py", "app_pages/concepts.py"):
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        assert all(t.key in {"concept_filter", "concept_text"} for t in at.text_input), page


def test_local_server_keeps_the_build_form(monkeypatch, bundles):  # noqa: F811
    monkeypatch.delenv("LAVISE_SERVE", raising=False)
    at = open_app(monkeypatch, bundles, bundle=bundles.full)
    assert [e for e in at.expander if "Build a bundle" in e.label]


def test_shared_build_needs_the_token(monkeypatch, bundles):  # noqa: F811
    monkeypatch.setenv("LAVISE_SERVE", "build")
    monkeypatch.setenv("LAVISE_BUILD_TOKEN_NEEDED", "1")
    monkeypatch.setenv("LAVISE_BUILD_TOKEN", "s3cret")
    at = open_app(monkeypatch, bundles, bundle=bundles.full)
    at.toggle(key="build_open").set_value(True).run()
    at.text_input(key="build_data").set_value(str(bundles.data)).run()
    assert at.button(key="build_go").disabled
    at.text_input(key="build_token").set_value("wrong").run()
    assert at.button(key="build_go").disabled and "not this server's build token" in at.error[0].value
    at.text_input(key="build_token").set_value("s3cret").run()
    assert not at.button(key="build_go").disabled


def test_an_upload_name_is_text_not_markup(monkeypatch, bundles):  # noqa: F811
    monkeypatch.setenv("LAVISE_SERVE", "read-only")
    at = open_app(monkeypatch, bundles, page="app_pages/explain.py", bundle=bundles.full)
    at.file_uploader[0].upload(EVIL, _png(), "image/png").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [c.value for c in at.caption if "onerror" in c.value]
    assert shown and "<img" not in shown[0] and "&lt;img src=x onerror=alert(1)&gt;.png" in shown[0]


def test_a_concept_is_text_not_markup(monkeypatch, bundles):  # noqa: F811
    at = open_app(monkeypatch, bundles, page="app_pages/concepts.py", bundle=bundles.full)
    at.text_input(key="concept_text").set_value("<b onmouseover=alert(1)>red</b>").run()
    assert not at.exception, [e.value for e in at.exception]
    heading = [m.value for m in at.markdown if "onmouseover" in m.value]
    assert heading and all("<b " not in h for h in heading)


def test_unexpected_errors_show_no_internals_when_shared(monkeypatch, bundles):  # noqa: F811
    import streamlit as st

    from app_pages import _shared as sh

    shown: list[str] = []
    monkeypatch.setattr(st, "error", lambda msg, **kw: shown.append(str(msg)))
    monkeypatch.setenv("LAVISE_SERVE", "read-only")
    with sh.guard("the Filters page"):
        raise KeyError("/srv/secret/data/bundles/x in _private_helper")
    with sh.guard("the Filters page"):
        raise ValueError("cannot read /srv/secret/data/bundles/x/probe.npy")
    assert shown[0] == "Unexpected error in the Filters page. Details are in the server log."
    assert "/srv" not in shown[1] and "probe.npy" in shown[1]
