"""Two bundles side by side (two layers of one model, or two models on one probe set) for the Overview."""

from __future__ import annotations

from dataclasses import dataclass

from lavise_core.views.home import Overview, overview
from lavise_core.views.workspace import Workspace

__all__ = ["Comparison", "compare_bundles"]


@dataclass
class Comparison:
    """What the Overview's compare section shows.

    Attributes:
        left, right: each bundle's :class:`Overview` (filters, interpretable share, label words, accuracy).
        rows: one row per measure: ``{"measure", left, right}`` (strings, ready for a table).
        words: the concepts either side labels, most frequent first: ``(concept, left count, right count)``.
        same_probe_set, same_model: whether the two differ only in layer / only in model.
        notes: caveats (e.g. different label sources make the interpretable shares incomparable).
    """

    left: Overview
    right: Overview
    rows: list[dict]
    words: list[tuple[str, int, int]]
    same_probe_set: bool
    same_model: bool
    notes: list[str]


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _accuracy(ov: Overview) -> str:
    """The overview's accuracy, saying when it is over every probe image (a data set with no test split)."""
    if ov.accuracy is None:
        return "n/a"
    return f"{ov.accuracy:.1%}" + ("" if ov.accuracy_scope == "test" else " (all probe images)")


def compare_bundles(a: Workspace, b: Workspace, n_words: int = 20) -> Comparison:
    """Side-by-side numbers of two bundles; label counts are per concept (how many filters it labels)."""
    oa, ob = overview(a), overview(b)
    ma, mb = a.bundle.manifest, b.bundle.manifest
    same_data = ma["dataset"].get("hash") == mb["dataset"].get("hash")
    same_model = ma["model"].get("weights_hash") == mb["model"].get("weights_hash")
    na, nb = len(oa.words), len(ob.words)
    rows = [
        {"measure": "model", "left": oa.model, "right": ob.model},
        {"measure": "layer", "left": oa.layer, "right": ob.layer},
        {"measure": "probe set", "left": f"{oa.dataset} ({oa.n_images})", "right": f"{ob.dataset} ({ob.n_images})"},
        {"measure": "filters", "left": str(oa.n_filters), "right": str(ob.n_filters)},
        {"measure": "interpretable share", "left": _share(oa.confident_share), "right": _share(ob.confident_share)},
        {"measure": "label source", "left": oa.label_source, "right": ob.label_source},
        {"measure": "distinct concepts", "left": str(na), "right": str(nb)},
        {"measure": "accuracy on test images", "left": _accuracy(oa), "right": _accuracy(ob)},
    ]  # fmt: skip
    ca = {w: n for w, n, _ in oa.words}
    cb = {w: n for w, n, _ in ob.words}
    words = sorted(set(ca) | set(cb), key=lambda w: (-(ca.get(w, 0) + cb.get(w, 0)), w))[:n_words]
    notes = []
    if oa.label_source != ob.label_source:
        notes.append(
            f"The labels come from different sources ({oa.label_source} vs {ob.label_source}): the "
            "interpretable shares follow different rules; build the same stages on both to compare them."
        )
    if not same_data:
        notes.append("The probe sets differ: accuracies and label counts are on different images.")
    if a.bundle.root == b.bundle.root:
        notes.append("Both sides are the same bundle.")
    return Comparison(
        oa, ob, rows, [(w, ca.get(w, 0), cb.get(w, 0)) for w in words], same_data, same_model, notes
    )
