"""Explain page, the ML engineer's sections: one filter's map on the upload, per-image faithfulness, attribution
controls (AppTest on the small test bundles)."""

from __future__ import annotations

import pytest
from app_bundles import ROOT, build_app_bundles
from streamlit.testing.v1 import AppTest

APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def bundles():
    return build_app_bundles()


def _upload(monkeypatch, bundles, **query) -> AppTest:
    from lavise_core.data.dataset import ProbeDataset

    monkeypatch.setenv("LAVISE_BUNDLES", str(bundles.bundles))
    monkeypatch.setenv("LAVISE_PRELOAD_ENCODER", "0")
    at = AppTest.from_file(APP, default_timeout=180)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    at.switch_page("app_pages/explain.py").run()
    ds = ProbeDataset.open(bundles.data)
    at.file_uploader[0].upload(
        "bird.png", (bundles.data / ds.records[0].path).read_bytes(), "image/png"
    ).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_one_filter_map_defaults_to_the_top_filter_and_follows_the_choice(monkeypatch, bundles):
    at = _upload(monkeypatch, bundles)
    assert "Where does one filter fire?" in [h.value for h in at.subheader]
    box = next(s for s in at.selectbox if s.key.startswith("fmap_"))
    first = box.options[0]
    assert box.value == int(first.split()[0].lstrip("#")) or str(box.value) in first
    caption = next(m.value for m in at.markdown if m.value.startswith("Filter #"))
    assert caption.startswith(f"Filter #{box.value} ")
    other = box.options[-1]
    box.select_index(len(box.options) - 1).run()
    assert not at.exception
    k = other.split()[0].lstrip("#")
    assert any(m.value.startswith(f"Filter #{k} ") for m in at.markdown)


def _open_faithfulness(at: AppTest) -> str:
    """Open the upload's faithfulness expander (measured when opened); returns the upload's uid."""
    uid = next(s.key for s in at.selectbox if s.key.startswith("whynot_")).removeprefix("whynot_")
    at.session_state[f"faith_open_{uid}"] = True
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return uid


def test_faithfulness_is_computed_for_the_upload(monkeypatch, bundles):
    at = _upload(monkeypatch, bundles, methods="gradcam,saliency")
    assert not [m for m in at.markdown if m.value.startswith("**This image**")]  # closed: not measured yet
    assert not any(c.key.startswith("faith_") for c in at.get("plotly_chart"))
    assert any(e.label.startswith("Does each map find what drives the score") for e in at.expander)
    _open_faithfulness(at)
    mine = [m.value for m in at.markdown if m.value.startswith("**This image**")]
    assert len(mine) == 2  # one line per shown method, for this image
    assert all("AUC" in m and "random order" in m for m in mine)
    assert mine[0] != mine[1]
    stored = any(c.value.startswith("Baseline, the stored summary: On ") for c in at.caption)
    assert stored or any("No faithfulness numbers for this bundle yet" in c.value for c in at.caption)
    assert any(k.startswith("faith_") for k in (c.key for c in at.get("plotly_chart") if hasattr(c, "key")))


def test_faithfulness_on_request_equals_the_eager_measure(bundles):
    """The expander's numbers are those where_it_looks(faithfulness=True) computes: same map, steps and seed."""
    import numpy as np

    from lavise_core import views
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.pipeline.bundle import Bundle

    ws = views.Workspace(Bundle.open(bundles.full))
    ds = ProbeDataset.open(bundles.data)
    a = views.analyse_image(ws, (bundles.data / ds.records[0].path).read_bytes())
    eager = views.where_it_looks(ws, a, ["gradcam", "saliency"])
    lazy = views.where_it_looks(ws, a, ["gradcam", "saliency"], faithfulness=False)
    assert all(p.image is None for p in lazy.panels)
    for e, p in zip(eager.panels, lazy.panels, strict=True):
        f = views.panel_faithfulness(ws, a, lazy, p)
        assert np.array_equal(f.deletion, e.image.deletion) and np.array_equal(f.insertion, e.image.insertion)
        assert (f.deletion_auc, f.random_insertion_auc) == (
            e.image.deletion_auc,
            e.image.random_insertion_auc,
        )
        assert views.panel_faithfulness(ws, a, lazy, p) is f  # cached per image and map


def test_advanced_settings_reach_the_maps(monkeypatch, bundles):
    at = _upload(monkeypatch, bundles, methods="gradcam,integrated_gradients")
    uid = _open_faithfulness(at)
    before = [m.value for m in at.markdown if m.value.startswith("**This image**")]
    at.selectbox(key=f"ig_base_{uid}").select("black").run()
    at.number_input(key=f"ig_steps_{uid}").set_value(4).run()
    assert not at.exception and not at.error
    after = [m.value for m in at.markdown if m.value.startswith("**This image**")]
    assert after[0] == before[0] and after[1] != before[1]  # Grad-CAM unchanged, integrated gradients changed
    at.toggle(key=f"signed_{uid}").set_value(True).run()
    assert not at.exception
    assert any(c.value.startswith("Signed maps: red = evidence for the class") for c in at.caption)
    at.number_input(key=f"occ_w_{uid}").set_value(4).run()
    at.number_input(key=f"occ_s_{uid}").set_value(6).run()
    assert any("stride must be 1 to the window (4 pixels)" in e.value for e in at.error)
