"""The README's Python API example runs, as written, on the default bundle (built by `make test`'s assets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_api_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_api_example_runs(monkeypatch, capsys) -> None:
    if not (ROOT / "data/synthbirds/manifest.jsonl").is_file():
        pytest.skip("the default data set is built by `make test` (make assets)")
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(readme_api_example(), "README.md", "exec"), namespace)
    ex, f, answer, why = namespace["ex"], namespace["f"], namespace["answer"], namespace["why"]
    assert len(ex.filters) == 128 and f.index == 7 and f.labels and len(f.top_images) == 16
    assert len(answer.filters) == 5 and isinstance(answer.confident, bool) and answer.message
    assert why.predicted in ex.classes and why.sentence.startswith("This is a")
    assert (
        why.contrast
        and namespace["heat"].ndim == 2
        and 0 <= namespace["heat"].min() <= namespace["heat"].max() <= 1
    )
    assert "bundle" not in capsys.readouterr().err


def test_the_api_names_are_exported() -> None:
    import lavise_core

    for name in ("open", "build", "Explainer", "ConceptAnswer", "ImageAnswer", "FilterInfo"):
        assert hasattr(lavise_core, name), name
