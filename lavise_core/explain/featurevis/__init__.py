"""What a filter wants: feature visualisation (visualisation.py) and inversion of a layer's code (inversion.py)."""

from lavise_core.explain.featurevis.inversion import Inversion, invert
from lavise_core.explain.featurevis.visualisation import (
    FeatureVisError,
    VisSettings,
    Visualisation,
    build_featurevis_stage,
    visualise,
)

__all__ = [
    "FeatureVisError",
    "Inversion",
    "VisSettings",
    "Visualisation",
    "build_featurevis_stage",
    "invert",
    "visualise",
]
