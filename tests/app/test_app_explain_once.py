"""The Explain page explains each image once per rerun: ``views.explain_image`` (the expensive call: textual
explanation, zero-shot words, heat map) is counted by wrapping the real function."""

from __future__ import annotations

import pytest
from app_bundles import ROOT, build_app_bundles
from streamlit.testing.v1 import AppTest

from lavise_core import views
from lavise_core.data.dataset import ProbeDataset
from lavise_core.data.synthbirds import SPECIES

APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def bundles():
    return build_app_bundles()


@pytest.fixture
def calls(monkeypatch, bundles):
    """The arguments of every ``views.explain_image`` call (the real function still runs)."""
    monkeypatch.setenv("LAVISE_BUNDLES", str(bundles.bundles))
    real = views.explain_image
    seen: list[dict] = []

    def counted(ws, a, *args, **kwargs):
        seen.append(kwargs)
        return real(ws, a, *args, **kwargs)

    monkeypatch.setattr(views, "explain_image", counted)
    return seen


def _png(bundles, i: int = 0) -> bytes:
    ds = ProbeDataset.open(bundles.data)
    return (bundles.data / ds.records[i].path).read_bytes()


def _explain_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("app_pages/explain.py").run()
    assert not at.exception
    return at


def test_one_explanation_per_image_and_rerun(bundles, calls):
    at = _explain_page()
    calls.clear()
    at.file_uploader[0].upload("bird.png", _png(bundles), "image/png").run()
    assert not at.exception and not at.error
    assert len(calls) == 1 and calls[0]["why_not"] is None
    uid = next(s.key for s in at.selectbox if s.key.startswith("whynot_")).removeprefix("whynot_")
    box = at.selectbox(key=f"whynot_{uid}")
    sentence = next(m.value for m in at.markdown if "because it has" in m.value)
    (missing,) = set(SPECIES) - set(box.options)  # the predicted class is not offered
    assert box.options[0] == "(choose a class)" and missing in sentence
    other = box.options[1]
    calls.clear()
    box.select(other).run()
    assert len(calls) == 1 and calls[0]["why_not"] == other
    assert any(m.value.startswith(f"**Why not {other}?**") for m in at.markdown)
    chips = at.get("button_group")[0].options
    calls.clear()
    at.get("button_group")[0].set_value(chips[1].content if hasattr(chips[1], "content") else chips[1]).run()
    assert len(calls) == 1 and calls[0]["why_not"] == other and calls[0]["attribute"] is not None


def test_one_explanation_per_image_with_several_images(bundles, calls):
    at = _explain_page()
    calls.clear()
    at.file_uploader[0].set_value(
        [("a.png", _png(bundles, 0), "image/png"), ("b.png", _png(bundles, 1), "image/png")]
    ).run()
    assert not at.exception and len(at.tabs) == 2
    assert len(calls) == 2
    calls.clear()
    at.radio(key="source").set_value("Probe-set test image").run()
    assert not at.exception and len(calls) == 1
