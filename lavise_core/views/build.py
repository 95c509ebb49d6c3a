"""Building a bundle from the dashboard: :func:`lavise_core.api.build` with a ``report(fraction, message)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from lavise_core.api import build
from lavise_core.pipeline.bundle import Bundle
from lavise_core.pipeline.stages import BuildProgress, BuildSettings

__all__ = ["build_bundle", "stage_choices"]


def build_bundle(
    model: str,
    data: str | Path,
    bundles: str | Path = "data/bundles",
    layer: str | None = None,
    stages: Sequence[str] | None = None,
    report: Callable[[float, str], None] | None = None,
) -> Bundle:
    """Build (or finish) a bundle through the stage registry, calling ``report(fraction, message)`` as it goes."""
    say = report or (lambda f, m: None)

    def progress(event: BuildProgress) -> None:
        say(min(1.0, event.fraction), event.message)

    ex = build(model, data, layer=layer, stages=stages, bundles=bundles, progress=progress,
               settings=BuildSettings(workers=0))  # fmt: skip
    say(1.0, "done")
    return ex.bundle


def stage_choices() -> tuple[list[str], list[str]]:
    """``(every registered stage, the default ones)`` for the build form."""
    from lavise_core.stages import REGISTRY

    return REGISTRY.names(), REGISTRY.defaults()
