"""The stage registry: every piece of a bundle is made by one registered stage, built by one :func:`build_stages`.

A :class:`Stage` declares its name, the stages it needs, a recipe version and one function
``run(ctx: StageContext) -> dict | None``. :func:`build_stages` resolves the order (dependencies first),
skips stages the bundle already holds with the same recipe, redoes a stage whose recipe changed (and every
stage downstream of it), and reports progress through one callback. The CLI, the dashboard's build form
and the Python API (:func:`lavise_core.build`) all call it; the default stages are registered in
:mod:`lavise_core.stages`.

Adding a stage::

    from lavise_core.pipeline.stages import Stage
    REGISTRY.register(Stage("my_stage", needs=("probe",), recipe=1, run=my_stage, doc="what it makes"))
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lavise_core.data.dataset import ProbeDataset
from lavise_core.pipeline.bundle import Bundle, disk_error
from lavise_core.pipeline.executor import ExecutorSettings

__all__ = [
    "DATA_FACTS",
    "BuildProgress",
    "BuildSettings",
    "Stage",
    "StageContext",
    "StageError",
    "StageRegistry",
    "build_stages",
    "data_facts",
    "missing_data",
    "skip_reason",
]

#: what a stage can need of a data set, in plain words (what is missing) and what to do about it
DATA_FACTS: dict[str, tuple[str, str]] = {
    "masks": (
        "its images have no region masks",
        "import a data set with masks (CUB, COCO)",
    ),
    "attributes": ("its images have no annotated attributes", "add attributes to its manifest"),
    "text": (
        "its images have neither captions nor attributes",
        "add captions or attributes",
    ),
    "classes": ("it has fewer than two classes", "import a folder with one subfolder per class"),
    "test split": ("it has no test split to hold out", "import it with a test split (--test-fraction)"),
}


def data_facts(dataset: ProbeDataset) -> set[str]:
    """What ``dataset`` offers of :data:`DATA_FACTS`: ``{"masks", "attributes", "text", "classes", "test split"}``."""
    recs = dataset.records
    facts: set[str] = set()
    if any(r.mask for r in recs):
        facts.add("masks")
    if any(r.attributes for r in recs):
        facts |= {"attributes", "text"}
    if any(r.captions for r in recs):
        facts.add("text")
    if len({r.label for r in recs if r.label is not None and r.label >= 0}) >= 2:
        facts.add("classes")
    if len(recs) and (dataset.splits() == "test").any():
        facts.add("test split")
    return facts


def missing_data(stage: Stage, facts: set[str]) -> list[str]:
    """The data ``stage`` needs that the data set does not offer."""
    return [f for f in stage.requires if f not in facts]


def skip_reason(stage: Stage, missing: Sequence[str], data_name: str) -> str:
    """One plain sentence: why ``stage`` is not built on ``data_name`` and how to add what is missing."""
    what = "; ".join(DATA_FACTS[m][0] for m in missing)
    how = "; ".join(dict.fromkeys(DATA_FACTS[m][1] for m in missing))
    if stage.words:
        how += ", or name an annotated concept set with --concepts"
    return f"{stage.name} ({stage.doc or 'this stage'}) needs more than '{data_name}' has: {what}. To add it: {how}."


class StageError(ValueError):
    """An unknown stage, a dependency cycle, or a stage asked for without what it needs."""


@dataclass(frozen=True)
class BuildSettings:
    """How the image loops run (the probe pass and any later stage that reads images)."""

    device: str = "cpu"
    batch_size: int = 32
    top_k: int = 16
    workers: int = 0
    bars: bool = False  # tqdm progress bars on the terminal (the CLI); the callback is called either way
    executor: str = "local"  # "local" (this process) or "ray" (Ray Data batch inference; docs/ray.md)
    address: str | None = None  # Ray cluster address; None: the running Ray runtime or a local one
    ray_workers: int = 0  # actors holding the model; 0: one per GPU of the cluster, else one per CPU

    def executor_settings(self) -> ExecutorSettings:
        """Where a stage's image loop runs (:func:`~lavise_core.pipeline.executor.map_shards`)."""
        return ExecutorSettings(self.executor, self.address, self.ray_workers, progress=self.bars)


@dataclass(frozen=True)
class BuildProgress:
    """One progress report: ``fraction`` of the whole build in [0, 1], the stage, and a sentence."""

    fraction: float
    stage: str
    message: str
    done: int = 0
    total: int = 0


@dataclass
class StageContext:
    """What a stage function gets: the bundle (writable), the data set, the model (loaded on first use)."""

    bundle: Bundle
    dataset: ProbeDataset
    settings: BuildSettings
    model_loader: Callable[[], Any]
    report: Callable[[int, int, str], None] = field(default=lambda done, total, message: None)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe_stats_layers: tuple[str, ...] = ()  # the layers whose per-image statistics the probe pass keeps
    _model: Any = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        """The :class:`~lavise_core.models.networks.LoadedModel` that built the bundle (loaded once)."""
        if self._model is None:
            self._model = self.model_loader()
        return self._model

    def options_for(self, stage: str) -> dict[str, Any]:
        """Keyword arguments given for ``stage`` (``build(..., options={stage: {...}})``)."""
        return dict(self.options.get(stage, {}))


@dataclass(frozen=True)
class Stage:
    """A registered stage.

    Attributes:
        name: the key under ``bundle.json``'s ``stages``.
        needs: stages that must be finished first.
        recipe: bumped when the stage's output changes; a bundle holding an older recipe redoes the stage.
        run: ``run(ctx) -> dict | None``; the dict is recorded in the manifest with the recipe and seconds.
        doc: one line for ``lavise build --help`` and the README.
        parts: sub-stage marks the function keeps for resuming within the stage (cleared with it).
        default: built by a plain ``lavise build``; ``False`` for stages built only on request.
        stale: ``stale(bundle) -> bool`` for a stage that knows more than its recipe (e.g. a part of it
            written by an older recipe); a finished stage that is stale is run again (its function redoes
            only what is out of date).
        requires: what it needs of the data set (keys of :data:`DATA_FACTS`); without it the stage is skipped
            with one sentence saying why and how to add it.
        words: it makes words (labels, p.d.f.s, detectors) that are properties of the network, measured on
            annotated images: a probe set without what it needs takes them from a concept set's bundle.
        files: the bundle paths (folders or files) it writes, which a concept set's bundle lends.
        prefetch: ``prefetch(ctx)``, called before the build's first stage when this one is to be built: starts
            work that needs no other stage in the background (LaViSE: the vocabulary's embeddings), so it
            overlaps the stages before. It must not write to the bundle.
        probe_stats: ``probe_stats(ctx) -> layer names`` whose per-image statistics (mean, std and sum of squares
            per channel: :class:`~lavise_core.pipeline.probe.LayerStats`) the stage reads from the probe pass
            instead of a pass of its own, when both are built in one build (the upload check's early layers,
            Oramas' energies). The stage still works without them (a bundle probed before, a sharded pass).
    """

    name: str
    needs: tuple[str, ...]
    recipe: int
    run: Callable[[StageContext], dict | None]
    doc: str = ""
    parts: tuple[str, ...] = ()
    default: bool = True
    stale: Callable[[Bundle], bool] | None = None
    requires: tuple[str, ...] = ()
    words: bool = False
    files: tuple[str, ...] = ()
    prefetch: Callable[[StageContext], Any] | None = None
    probe_stats: Callable[[StageContext], Sequence[str]] | None = None


class StageRegistry:
    """Stages by name, in registration order."""

    def __init__(self, stages: Iterable[Stage] = ()) -> None:
        self._stages: dict[str, Stage] = {}
        for s in stages:
            self.register(s)

    def register(self, stage: Stage) -> Stage:
        if stage.name in self._stages:
            raise StageError(f"stage {stage.name!r} is registered twice")
        missing = [n for n in stage.needs if n not in self._stages]
        if missing:
            raise StageError(f"stage {stage.name!r} needs {missing}, which are not registered before it")
        self._stages[stage.name] = stage
        return stage

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._stages[name]
        except KeyError:
            raise StageError(f"unknown stage {name!r}; stages: {', '.join(self._stages)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def __iter__(self):
        return iter(self._stages.values())

    def names(self) -> list[str]:
        return list(self._stages)

    def defaults(self) -> list[str]:
        return [s.name for s in self if s.default]

    def resolve(self, targets: Sequence[str]) -> list[Stage]:
        """``targets`` and everything they need, dependencies first (registration order otherwise)."""
        want: set[str] = set()

        def visit(name: str) -> None:
            if name not in want:
                want.add(name)
                for dep in self[name].needs:
                    visit(dep)

        for t in targets:
            visit(t)
        return [s for s in self if s.name in want]  # registration order is a topological order

    def downstream(self, name: str) -> list[Stage]:
        """``name`` and every stage that needs it, directly or not."""
        out = {name}
        for s in self:
            if any(d in out for d in s.needs):
                out.add(s.name)
        return [s for s in self if s.name in out]


def _recorded_recipe(bundle: Bundle, name: str) -> int | None:
    info = bundle.manifest.get("stages", {}).get(name)
    return None if info is None else int(info.get("recipe", 1))  # bundles from before recipes: 1


def _clear(bundle: Bundle, stage: Stage) -> None:
    for part in (*stage.parts, stage.name):
        bundle.clear_stage(part)


def build_stages(
    bundle: Bundle,
    dataset: ProbeDataset,
    registry: StageRegistry,
    stages: Sequence[str] | None = None,
    *,
    force: Sequence[str] = (),
    settings: BuildSettings = BuildSettings(),
    model_loader: Callable[[], Any] | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    lock_timeout: float | None = None,
) -> dict[str, str]:
    """Build ``stages`` (default: the registry's defaults) and what they need into ``bundle``.

    A stage already recorded with the same recipe is skipped; one recorded with another recipe, or named in
    ``force``, is redone together with every stage downstream of it. Returns ``{stage: "built" | "skipped" |
    "redone (recipe N -> M)"}``. ``progress`` gets a :class:`BuildProgress` at each stage's start and end and
    whenever a stage reports (the probe pass after every batch). ``options``: keyword arguments per stage
    (``{"textual": {"source": "labels"}}``), passed on to the stage's function.

    While anything is written the bundle's build lock is held (:meth:`Bundle.build_lock`): a second build
    of the same bundle waits for the first (``lock_timeout=None``), or raises
    :class:`~lavise_core.pipeline.bundle.BundleBusy` after ``lock_timeout`` seconds (``0``: at once). A full
    disk or a read-only folder raises :class:`~lavise_core.pipeline.bundle.BundleError` with a message;
    the stage that was running is not recorded, so the same call resumes there.
    """
    order = registry.resolve(list(stages) if stages is not None else registry.defaults())
    if not force and all(_up_to_date(bundle, s) for s in order):
        return _build_unlocked(
            bundle, dataset, registry, order, (), settings, model_loader, progress, options
        )

    def waiting(message: str) -> None:
        if progress is None:
            print(message, file=sys.stderr, flush=True)
        else:
            progress(BuildProgress(0.0, "lock", message))

    keep = dataset.keep_decoded() if dataset is not None else contextlib.nullcontext()
    with bundle.build_lock(lock_timeout, on_wait=waiting), keep:  # the stages decode each image once
        return _build_unlocked(
            bundle, dataset, registry, order, force, settings, model_loader, progress, options
        )


def _up_to_date(bundle: Bundle, s: Stage) -> bool:
    """Finished with the same recipe and not stale: nothing to write."""
    return _recorded_recipe(bundle, s.name) == s.recipe and not (s.stale is not None and s.stale(bundle))


def _build_unlocked(
    bundle: Bundle,
    dataset: ProbeDataset,
    registry: StageRegistry,
    order: list[Stage],
    force: Sequence[str],
    settings: BuildSettings,
    model_loader: Callable[[], Any] | None,
    progress: Callable[[BuildProgress], None] | None,
    options: dict[str, dict[str, Any]] | None,
) -> dict[str, str]:
    for name in force:
        for s in registry.downstream(registry[name].name):
            _clear(bundle, s)
    outcome: dict[str, str] = {}
    for s in order:  # a changed recipe invalidates the stage and everything built on it
        old = _recorded_recipe(bundle, s.name)
        if old is not None and old != s.recipe:
            for d in registry.downstream(s.name):
                _clear(bundle, d)
            outcome[s.name] = f"redone (recipe {old} -> {s.recipe})"
        elif old is not None and s.stale is not None and s.stale(bundle):
            for d in registry.downstream(s.name):
                bundle.clear_stage(d.name)  # parts stay: the function redoes what is out of date
            outcome[s.name] = "redone (part of it out of date)"
    say = progress or (lambda event: None)
    for name in options or {}:
        registry[name]  # an unknown stage name fails early
    ctx = StageContext(
        bundle, dataset, settings, model_loader or bundle.load_model, options=dict(options or {})
    )
    n = len(order)
    facts = data_facts(dataset) if dataset is not None else set(DATA_FACTS)  # no data set: nothing to check
    not_built: set[str] = set()
    to_build = [s for s in order if not bundle.stage_done(s.name) and not missing_data(s, facts)]
    for s in to_build:
        if s.prefetch is not None:
            s.prefetch(ctx)
    if any(s.name == "probe" for s in to_build):  # the stages after it read these layers' statistics from it
        wanted = (layer for s in to_build if s.probe_stats is not None for layer in s.probe_stats(ctx))
        ctx.probe_stats_layers = tuple(dict.fromkeys(wanted))
    for i, s in enumerate(order):
        if bundle.stage_done(s.name):
            outcome.setdefault(s.name, "skipped")
            say(BuildProgress((i + 1) / n, s.name, f"{s.name}: already built"))
            continue
        lacking = missing_data(s, facts)
        after = [d for d in s.needs if d in not_built]
        if lacking or after:
            not_built.add(s.name)
            why = (
                skip_reason(s, lacking, dataset.name if dataset is not None else "the data set")
                if lacking
                else f"{s.name} needs {', '.join(after)}, which {'was' if len(after) == 1 else 'were'} not built."
            )
            outcome[s.name] = f"not built: {why}"
            say(BuildProgress((i + 1) / n, s.name, outcome[s.name]))
            continue
        say(BuildProgress(i / n, s.name, f"{s.name}: {s.doc or 'building'}"))

        def report(done: int, total: int, message: str, i: int = i, name: str = s.name) -> None:
            say(BuildProgress((i + done / max(total, 1)) / n, name, message, done, total))

        ctx.report = report
        t0 = time.perf_counter()
        try:
            info = s.run(ctx) or {}
            recorded = dict(bundle.manifest.get("stages", {}).get(s.name, {}))
            recorded.pop("finished", None)
            recorded.update({k: v for k, v in info.items() if k != "finished"})
            recorded.setdefault("seconds", round(time.perf_counter() - t0, 2))
            bundle.mark_stage(s.name, {**recorded, "recipe": s.recipe})
        except OSError as e:  # a full disk or a folder turned read-only: say so, keep what is finished
            raise disk_error(e, bundle.root, f"building stage {s.name!r}") or e from e
        outcome.setdefault(s.name, "built")
        say(BuildProgress((i + 1) / n, s.name, f"{s.name}: done"))
    return outcome
