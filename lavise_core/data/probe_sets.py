"""The probe phrase sets shipped with the package (``lavise_core/evaluate/probe_sets/*.json``): paraphrases of
SynthBirds' concepts in words the data set never uses, and concepts absent from it (everyday objects, scenes,
textures). Several methods calibrate on them (the dissection search's and the zero-shot query's abstention) and
the evaluations report on them, so the loader lives here, below every method family.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PROBE_SETS", "absent_phrases", "probe_set"]

#: the folder of the JSON files (package data of ``lavise_core.evaluate``)
PROBE_SETS = Path(__file__).resolve().parents[1] / "evaluate" / "probe_sets"


def probe_set(name: str) -> dict:
    """A JSON file of ``lavise_core/evaluate/probe_sets/`` (``"paraphrases"``, ``"absent_concepts"``)."""
    return json.loads((PROBE_SETS / f"{name}.json").read_text(encoding="utf-8"))


def absent_phrases(half: str = "calibration") -> list[str]:
    """Concepts SynthBirds never draws (everyday objects, scenes, textures), ``half`` = ``"calibration"`` (tunes
    an abstention threshold) or ``"evaluation"`` (only reported): ``probe_set("absent_concepts")``."""
    return list(probe_set("absent_concepts")[half])
