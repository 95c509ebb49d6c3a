"""The stage registry on a real bundle folder with small stages that count their runs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lavise_core.pipeline.bundle import Bundle
from lavise_core.pipeline.stages import BuildSettings, Stage, StageError, StageRegistry, build_stages

RUNS: Counter[str] = Counter()


def writer(name: str, value: float):
    def run(ctx) -> dict:
        RUNS[name] += 1
        ctx.report(1, 2, f"{name} half way")
        ctx.bundle.write_array(f"{name}/out", np.full(3, value, np.float32))
        return {"value": value, **ctx.options_for(name)}

    return run


def registry(recipe_b: int = 1) -> StageRegistry:
    return StageRegistry(
        [
            Stage("a", (), 1, writer("a", 1.0), "first"),
            Stage("b", ("a",), recipe_b, writer("b", 2.0), "second"),
            Stage("c", ("b",), 1, writer("c", 3.0), "third"),
            Stage("d", ("a",), 1, writer("d", 4.0), "beside", default=False),
        ]
    )


@pytest.fixture
def bundle(tmp_path) -> Bundle:
    RUNS.clear()
    return Bundle.create(tmp_path / "b", {"key": "k", "layer": "x", "classes": []})


def test_resolves_dependencies_and_skips_finished_stages(bundle) -> None:
    events = []
    out = build_stages(bundle, None, registry(), ["c"], progress=events.append, model_loader=lambda: None)
    assert out == {"a": "built", "b": "built", "c": "built"} and dict(RUNS) == {"a": 1, "b": 1, "c": 1}
    assert [e.stage for e in events if e.message.endswith(": done")] == ["a", "b", "c"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(e.message == "b half way" and e.done == 1 and e.total == 2 for e in events)
    assert bundle.manifest["stages"]["b"]["recipe"] == 1 and bundle.manifest["stages"]["b"]["value"] == 2.0
    again = build_stages(bundle, None, registry(), ["c"])
    assert again == {"a": "skipped", "b": "skipped", "c": "skipped"} and RUNS["a"] == 1


def test_default_stages_and_unknown_names(bundle) -> None:
    reg = registry()
    assert reg.defaults() == ["a", "b", "c"] and [s.name for s in reg.resolve(["d"])] == ["a", "d"]
    with pytest.raises(StageError, match="unknown stage 'x'; stages: a, b, c, d"):
        build_stages(bundle, None, reg, ["x"])
    with pytest.raises(StageError, match="registered twice"):
        reg.register(Stage("a", (), 1, writer("a", 0)))
    with pytest.raises(StageError, match="needs \\['zz'\\]"):
        reg.register(Stage("e", ("zz",), 1, writer("e", 0)))


def test_changed_recipe_redoes_the_stage_and_everything_built_on_it(bundle) -> None:
    build_stages(bundle, None, registry(), ["c", "d"])
    out = build_stages(bundle, None, registry(recipe_b=2), ["c", "d"])
    assert out["b"] == "redone (recipe 1 -> 2)" and out["c"] == "built"
    assert out["a"] == "skipped" and out["d"] == "skipped"
    assert dict(RUNS) == {"a": 1, "b": 2, "c": 2, "d": 1}
    assert bundle.manifest["stages"]["b"]["recipe"] == 2


def test_force_redoes_downstream_only(bundle) -> None:
    build_stages(bundle, None, registry(), ["c", "d"])
    out = build_stages(bundle, None, registry(), ["c", "d"], force=["b"], options={"b": {"note": "again"}})
    assert out == {"a": "skipped", "b": "built", "c": "built", "d": "skipped"}
    assert bundle.manifest["stages"]["b"]["note"] == "again"


def test_a_failing_stage_leaves_earlier_stages_done(bundle) -> None:
    def boom(ctx):
        raise ValueError("the data set has no captions")

    reg = StageRegistry([Stage("a", (), 1, writer("a", 1.0)), Stage("b", ("a",), 1, boom)])
    with pytest.raises(ValueError, match="no captions"):
        build_stages(bundle, None, reg, settings=BuildSettings())
    assert bundle.stage_done("a") and not bundle.stage_done("b")
    reopened = Bundle.open(bundle.root)
    assert reopened.stage_done("a") and np.asarray(reopened.array("a/out")).tolist() == [1.0, 1.0, 1.0]


def test_every_stage_is_its_methods_build_stage_and_every_method_reads_itself_back() -> None:
    from lavise_core.evaluate import fidelity
    from lavise_core.explain.dissection import DissectionTables
    from lavise_core.explain.lavise import LaviseExplainer
    from lavise_core.explain.ood import OODModel
    from lavise_core.explain.oramas import RelevantFeatures
    from lavise_core.explain.textual import TextualExplainer
    from lavise_core.stages import REGISTRY

    for stage in REGISTRY:
        assert stage.run.__name__ == "build_stage", stage.name
        assert stage.run.__module__.startswith(
            ("lavise_core.explain.", "lavise_core.evaluate.", "lavise_core.pipeline.")
        )
    assert fidelity.build_stage in [s.run for s in REGISTRY]
    for reader in (DissectionTables, LaviseExplainer, OODModel, RelevantFeatures, TextualExplainer):
        assert callable(getattr(reader, "from_bundle", None)), reader.__name__


def test_prefetch_starts_before_the_first_stage_only_for_stages_still_to_build(bundle) -> None:
    calls: list[tuple[str, int]] = []  # (stage, stages finished when it was called)

    def prefetch(name: str):
        return lambda ctx: calls.append((name, len(ctx.bundle.manifest.get("stages", {}))))

    reg = StageRegistry(
        [
            Stage("a", (), 1, writer("a", 1.0), prefetch=prefetch("a")),
            Stage("b", ("a",), 1, writer("b", 2.0), prefetch=prefetch("b")),
        ]
    )
    build_stages(bundle, None, reg, ["a"])
    calls.clear()
    build_stages(bundle, None, reg, ["b"])
    assert calls == [("b", 1)]  # a is built: no prefetch; b's starts before any stage of this build ran


def test_the_probe_stage_gets_the_layers_later_stages_of_its_build_read(bundle) -> None:
    """Stage.probe_stats of every stage still to build, in order and without repeats, reach the probe stage's
    context before it runs; a build without the probe stage asks for none."""
    seen: list[tuple[str, ...]] = []

    def probe(ctx) -> dict:
        seen.append(ctx.probe_stats_layers)
        return {}

    reg = StageRegistry(
        [
            Stage("probe", (), 1, probe),
            Stage("a", ("probe",), 1, writer("a", 1.0), probe_stats=lambda ctx: ["l1", "l2"]),
            Stage("b", ("probe",), 1, writer("b", 2.0), probe_stats=lambda ctx: ["l2", "l3"]),
            Stage("c", ("probe",), 1, writer("c", 3.0)),
        ]
    )
    build_stages(bundle, None, reg, ["a", "b", "c"])
    assert seen == [("l1", "l2", "l3")]
    build_stages(bundle, None, reg, ["b"], force=["probe"])  # a is not in this build: its layers are not kept
    assert seen[-1] == ("l2", "l3")
