"""lavise: what has this CNN learned, filter by filter, in words and pictures.

The public API (a contract: these names stay)::

    import lavise_core
    ex = lavise_core.build("synthbirds", "data/synthbirds")      # or lavise_core.open(bundle_dir)
    ex.filters[7].labels                                          # [(phrase, score, source)]
    ex.query("red breast")                                        # .filters .scores .confident .message .images
    ex.explain("bird.png", why_not="scarlet tanager")             # .predicted .sentence .contrast .heatmap()

Layers, each importing only those before it: ``data`` ← ``models`` ← ``pipeline`` ← ``explain`` ← ``evaluate``
← ``api`` / ``stages`` ← ``views`` ← ``cli``.
"""

from lavise_core.api import (
    ConceptAnswer,
    Explainer,
    FilterInfo,
    ImageAnswer,
    StageMissing,
    build,
    open_bundle,
)
from lavise_core.pipeline.stages import BuildProgress, BuildSettings

open = open_bundle  # ``lavise_core.open(bundle_dir)`` is the documented entry point

__all__ = [
    "BuildProgress",
    "BuildSettings",
    "ConceptAnswer",
    "Explainer",
    "FilterInfo",
    "ImageAnswer",
    "StageMissing",
    "build",
    "open",
    "open_bundle",
]
