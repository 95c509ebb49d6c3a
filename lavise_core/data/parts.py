"""Which annotated part an attribute phrase names ("red crown" -> crown; "scarlet chest" -> breast).

Shared by the grounding fit (:mod:`lavise_core.explain.textual.grounding`) and the evaluation protocols: a caption
phrase names a part through its noun, directly or through :data:`NOUN_REGIONS`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lavise_core.data.dataset import ProbeDataset

__all__ = ["NOUN_REGIONS", "attribute_regions", "part_names"]

#: Nouns of captions that name a keypoint region under another word.
NOUN_REGIONS: dict[str, tuple[str, ...]] = {
    "bill": ("beak",),
    "head": ("crown", "forehead", "nape"),
    "cap": ("crown",),
    "foot": ("leg",),
    "feet": ("leg",),
    "tarsus": ("leg",),
    "claw": ("leg",),
    "talon": ("leg",),
    "chest": ("breast",),
    "stomach": ("belly",),
    "abdomen": ("belly",),
    "underbelly": ("belly",),
    "eyebrow": ("eye",),
    "eyering": ("eye",),
    "wingbar": ("wing",),
    "wingbars": ("wing",),
    "rump": ("tail",),
    "neck": ("nape", "throat"),
}


def attribute_regions(
    phrase: str, regions: Sequence[str], region_concepts: dict[str, list[str]]
) -> list[str]:
    """Regions (keypoint names) an attribute phrase refers to, see the module docstring."""
    direct = [r for r, concepts in region_concepts.items() if phrase in concepts]
    if direct:
        return direct
    noun = phrase.split()[-1] if phrase.split() else ""
    targets = (noun, *NOUN_REGIONS.get(noun, ()))
    return [r for r in regions if r.split()[-1] in targets or r in targets]


def part_names(ds: ProbeDataset) -> list[str]:
    """The data set's part names: its regions (label map values), else the names its keypoints use."""
    return list(ds.regions) or sorted({k for r in ds.records for k in r.keypoints})
