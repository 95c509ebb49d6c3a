"""Textual summarisation (Guo et al., AAAI 2019; METHODS.md §1): the filter–attribute p.d.f. and its sentences.

attributes.py (attributes from captions or labels; tag_rules.py applies spaCy's tag rules to the parsed
captions, indexed), explainer.py (eq. 1–8, the stage and :class:`TextualExplainer`), grounding.py (eq. 9 weights
fitted to part annotations), evidence.py (attribute detectors behind the default sentence).
"""

from lavise_core.explain.textual.attributes import AttributeTable, extract_attributes
from lavise_core.explain.textual.explainer import (
    Explanation,
    TextualError,
    TextualExplainer,
    build_textual_stage,
)
from lavise_core.explain.textual.grounding import build_grounding_stage

__all__ = [
    "AttributeTable",
    "Explanation",
    "TextualError",
    "TextualExplainer",
    "build_grounding_stage",
    "build_textual_stage",
    "extract_attributes",
]
