"""The Filters page on a bundle whose labels compose two concept sets (issue 26): each card and each filter's page
say which set the word comes from (the fixture of tests/pipeline/test_composed_concept_sets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import lavise_core
from lavise_core.data.dataset import ImageRecord, write_dataset
from tests.conftest import IdentityCNN, wrap
from tests.pipeline.test_composed_concept_sets import SIDE, STAGES, masked_set

APP = str(Path(__file__).resolve().parents[2] / "app.py")


@pytest.fixture
def served(tmp_path, monkeypatch) -> Path:
    squares = masked_set(tmp_path / "squares", "Squares", ("red square", 0), ("green ring", 1))
    leaves = masked_set(tmp_path / "leaves", "Leaves", ("green leaf", 1), ("red berry", 0))
    (tmp_path / "probe" / "images").mkdir(parents=True)
    records = []
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)]):
        Image.new("RGB", (16, 16), c).save(tmp_path / f"probe/images/{i}.png")
        records.append(ImageRecord(str(i), f"images/{i}.png", "test", i % 3))
    probe = write_dataset(
        tmp_path / "probe", name="Colours", source="test", classes=["red", "green", "blue"], records=records
    )
    ex = lavise_core.build(
        wrap(IdentityCNN(), size=SIDE), probe.root, stages=STAGES, bundles=tmp_path / "bundles",
        concepts=[squares.root, leaves.root],
    )  # fmt: skip
    serve = tmp_path / "serve"  # the composed bundle alone (the sets' own bundles sit beside it)
    serve.mkdir()
    (serve / ex.bundle.root.name).symlink_to(ex.bundle.root)
    monkeypatch.setenv("LAVISE_BUNDLES", str(serve))
    return serve


def test_cards_and_the_filter_page_name_each_label_s_concept_set(served) -> None:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("app_pages/filters.py").run()
    assert not at.exception, [e.value for e in at.exception]
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert cards[0] == "**#0** · red square  \n<small>from Squares · dissection, overlap 1.00 · red</small>"
    assert cards[1] == "**#1** · green leaf  \n<small>from Leaves · dissection, overlap 1.00 · green</small>"
    assert cards[2] == "**#2** · —"
    assert "the best over the concept sets Squares + Leaves; each card names its set" in at.caption[0].value
    at.query_params["filter"] = "1"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    captions = "\n".join(c.value for c in at.caption)
    assert "the green leaf pixels annotated in Leaves's training images" in captions
    table = at.dataframe[0].value
    assert table["concept"].tolist()[:2] == ["green leaf", "green ring"]
    assert table["concept set"].tolist()[:2] == ["Leaves", "Squares"]
