"""Attribution maps: where does the network look? Gradient, CAM and perturbation families behind one interface.

``make_method(name, model)`` builds any of :data:`METHODS`; each method's ``attribute(x, target)`` returns
``(B, H, W)`` maps (base.py holds the interface, cam.py / gradient.py / perturbation.py the families).
"""

from lavise_core.explain.attribution.base import Attribution, AttributionError, Target, upsample
from lavise_core.explain.attribution.cam import CAM, GradCAM, GradCAMPlusPlus
from lavise_core.explain.attribution.gradient import (
    Deconvnet,
    GuidedBackprop,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from lavise_core.explain.attribution.perturbation import Occlusion
from lavise_core.explain.attribution.registry import (
    DEFAULT_METHOD,
    METHODS,
    make_method,
    method_labels,
    pixel_maps,
)

__all__ = [
    "CAM",
    "DEFAULT_METHOD",
    "METHODS",
    "Attribution",
    "AttributionError",
    "Deconvnet",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "IntegratedGradients",
    "Occlusion",
    "Saliency",
    "SmoothGrad",
    "Target",
    "make_method",
    "method_labels",
    "pixel_maps",
    "upsample",
]
