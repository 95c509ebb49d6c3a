"""What a filter wants: feature visualisation (visualise.py) and inversion of a layer's code (invert.py)."""

from lavise_core.explain.featurevis.invert import Inversion, invert
from lavise_core.explain.featurevis.visualise import (
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
