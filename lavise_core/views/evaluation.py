"""Evaluation page: the stored evaluation results with their baselines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavise_core.views.workspace import PAPER_NUMBERS, Workspace, build_hint

__all__ = [
    "SENTENCE_COLUMNS",
    "EvaluationReport",
    "contrast_cell",
    "evaluation_headlines",
    "evaluation_report",
    "flatten_tables",
    "sentence_rows",
    "table_rows",
]


# =========================================================================== evaluation
@dataclass
class EvaluationReport:
    sections: dict[str, Any]  # "textual" / "lavise" -> the stored JSON
    missing: list[str]  # one short line per measurement not made yet: what it is and the command that adds it
    paper: dict[str, list[dict[str, Any]]]


def evaluation_report(ws: Workspace) -> EvaluationReport:
    """The stored evaluation results (``eval/sentences.json``, ``eval/fidelity.json`` from build stages,
    ``eval/attribution.json`` from the ``attribution`` stage that ``make demo`` builds, ``eval/textual.json`` and
    ``eval/lavise.json`` from ``lavise evaluate``) and the papers' numbers.

    What is not there is one plain line in ``missing`` ("not measured yet; run X to add it"), never an alarm:
    a bundle fresh from ``make demo`` has no ``lavise evaluate`` results, and that is normal."""
    root = Path(ws.bundle.root)
    sections, missing = {}, []
    if (root / "eval" / "sentences.json").is_file():
        sections["sentences"] = ws.bundle.read_json("eval/sentences")
    if (root / "eval" / "fidelity.json").is_file():
        sections["fidelity"] = ws.bundle.read_json("eval/fidelity")
    else:
        why = ws.bundle.manifest.get("stages", {}).get("fidelity", {}).get("skipped")
        missing.append(
            f"Are the words right? not measured: {why}"
            if why
            else f"Are the words right? not measured yet; run `{build_hint(ws.bundle)}` to add it."
        )
    protocols = [n for n in ("textual", "lavise") if (root / "eval" / f"{n}.json").is_file()]
    for name in protocols:
        sections[name] = ws.bundle.read_json(f"eval/{name}")
    todo = [n for n in ("textual", "lavise") if n not in protocols]
    if todo:
        what = {"textual": "Guo et al.'s (PCK, retrieval, BLEU)", "lavise": "LaViSE's (recall@s)"}
        only = "" if len(todo) == 2 else f" --only {todo[0]}"
        missing.append(
            f"The papers' own protocols, {' and '.join(what[n] for n in todo)}: not measured yet; run "
            f"`lavise evaluate {root}{only}` to add {'them' if len(todo) == 2 else 'it'}."
        )
    if (root / "eval" / "attribution.json").is_file():
        sections["attribution"] = ws.bundle.read_json("eval/attribution")
    else:
        missing.append(
            "Where does it look? (faithfulness of the attribution maps) not measured yet; run "
            f"`{build_hint(ws.bundle)} --stages attribution` to add it (about a minute)."
        )
    return EvaluationReport(sections, missing, PAPER_NUMBERS)


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` for a table: a missing value (``None``, NaN) shows as "—", never as "None" or "nan"."""
    return [
        {k: "—" if v is None or (isinstance(v, float) and v != v) else v for k, v in r.items()} for r in rows
    ]


def _path(obj: Any, *keys: Any) -> Any:
    for k in keys:
        in_dict = isinstance(obj, dict) and k in obj
        in_list = isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj)
        if not (in_dict or in_list):
            return None
        obj = obj[k]
    return obj if isinstance(obj, int | float) and not isinstance(obj, bool) else None


def evaluation_headlines(name: str, obj: dict) -> list[dict[str, Any]]:
    """The few numbers of an evaluation JSON a non-expert needs, each with its baseline and a verdict.

    Rows: ``question, ours, baseline, baseline_name, paper, verdict`` (``None`` where not stored);
    ``higher`` is better for every row except the randomisation check (lower = explanations depend on
    the weights, as they should)."""
    rows: list[dict[str, Any]] = []

    def row(
        question: str, ours: Any, base: Any, base_name: str, paper: Any = None, higher: bool = True,
        target: float | None = None,
    ) -> None:  # fmt: skip
        if ours is None:
            return
        verdict = "—"
        if base is not None:
            better = ours > base if higher else ours < base
            verdict = "better than the baseline" if better else "NOT better than the baseline"
        if target is not None:
            met = ours >= target if higher else ours <= target
            verdict += "; target met" if met else f"; target {target:g} missed"
        rows.append(
            {"question": question, "ours": round(float(ours), 1 if name == "fidelity" else 3),
             "baseline": None if base is None else round(float(base), 1 if name == "fidelity" else 3),
             "baseline is": base_name,
             "paper": paper, "verdict": verdict}
        )  # fmt: skip

    if name == "fidelity":
        pct = lambda *k: None if _path(obj, *k) is None else 100 * _path(obj, *k)  # noqa: E731
        row("Is a filter's label right? (% of filters whose label is among the concepts its top test images "
            "show; Network Dissection labels)", pct("labels", "dissection"), pct("labels", "random_concept"),
            "a random concept", target=90)  # fmt: skip
        labelled, filters = (
            _path(obj, "labels", "dissection_labelled_filters"),
            _path(obj, "labels", "filters"),
        )
        if labelled is not None and filters and labelled < 0.9 * filters:  # most filters carry no label
            row(f"…of the {labelled} filters of {filters} that carry a dissection label (the others carry none)",
                pct("labels", "dissection_among_labelled"), pct("labels", "random_concept"), "a random concept",
                target=90)  # fmt: skip
        row("…with zero-shot labels (LaViSE: no annotation used, what data without masks gets)",
            pct("labels", "zero_shot"), pct("labels", "random_concept"), "a random concept", target=60)  # fmt: skip
        for key, what, target in (
            ("seen", "concepts it was fitted on", 85),
            ("held_out", "concepts whose annotations it never saw", 50),
            ("background", "background kinds (water, sand, …)", 50),
            ("paraphrases_development", "paraphrases in words the data set never uses (development set)", 60),
            ("paraphrases_held_out", "paraphrases (a second set, written before any result)", 60),
        ):
            asserted = pct("search", key, "asserted")
            if asserted:  # the precision of what the page asserts; the weak candidates are counted apart
                verb, field = "asserts", "precision"
                note = f"{asserted:.0f} % of answers assert filters, the others show one weak candidate"
            elif asserted == 0:  # nothing asserted: the weak candidates shown
                verb, field, note = "shows", "precision_with_weak", "every answer is one weak candidate"
            else:  # a result from before the two were counted apart
                verb, field, note = "shows", "precision", "weak candidates included"
            row(f"Do the filters a concept search {verb} fire on the concept? (precision %, {what}; {note})",
                pct("search", key, field), pct("search", key, "random_filter"), "a random filter",
                target=target)  # fmt: skip
        row("Does the search say “no filter responds” to things absent from the data? (% answered as if "
            "found; lower is better)", pct("search", "abstention", "absent_confident"), 100.0,
            "a search that always answers", higher=False, target=5)  # fmt: skip
        row("…and answer concepts the layer does detect? (% of detected seen concepts answered)",
            pct("search", "abstention", "seen_detected_confident"), None, "", target=90)  # fmt: skip
        row("Does the upload check flag images unlike the probe set? (% of photos, noise, flat colours, text, "
            "screenshots flagged)", pct("ood", "ood_flagged"), pct("ood", "max_softmax_ood_flagged"),
            "low max-softmax confidence, same false alarms", target=95)  # fmt: skip
        row("…while passing the probe set's own test images? (% wrongly flagged; lower is better)",
            pct("ood", "test_flagged"), None, "", higher=False, target=5)  # fmt: skip
        row("Sanity: a re-initialised network's filters that still get a dissection label (of "
            f"{_path(obj, 'labels', 'filters')}; lower is better)", _path(obj, "sanity", "labelled_filters"),
            _path(obj, "labels", "dissection_labelled_filters"), "the trained network", higher=False)  # fmt: skip
    elif name == "textual":
        parts = _path(obj, "grounding", "parts_cell_grid", 1)
        row(
            "Does an attribute's heatmap point at the right body part? (PCK@0.2, %"
            + (", weights fitted to the part annotations)" if parts is not None else ")"),
            parts if parts is not None else _path(obj, "grounding", "proposed", 1),
            _path(obj, "grounding", "constant", 1),
            "the same heatmap for every attribute",
            _path(obj, "paper", "pck", "proposed", 1),
        )
        row(
            "Are the attributes an explanation names really in the image? (precision, %)",
            _path(obj, "retrieval", "labels", "precision"),
            _path(obj, "retrieval", "labels", "random", "precision"),
            "random attributes",
        )
        row(
            "Share of the image's attributes the explanation finds (recall, %)",
            _path(obj, "retrieval", "labels", "recall"),
            _path(obj, "retrieval", "labels", "random", "recall"),
            "random attributes",
            _path(obj, "paper", "retrieval", "recall"),
        )
        row(
            "Sentences vs. the human captions (BLEU-4, 0–1)",
            _path(obj, "bleu", "overall"),
            None,
            "",
            _path(obj, "paper", "bleu", "overall"),
        )
        row("Do explanations change when the network's weights are randomised? (rank correlation; low = yes)",
            _path(obj, "randomization", "spearman_explanation"),
            _path(obj, "randomization", "spearman_explanation_control"), "the same network explained twice",
            higher=False)  # fmt: skip
    elif name == "lavise":
        # the labels rank the whole open vocabulary, so the fair baselines rank it too: the same head
        # without filter attention (the baseline) and random phrases of that vocabulary; the
        # 102-concept "oracle" numbers are in the full table
        for split, what in (("seen", "concepts seen in training"), ("unseen", "zero-shot concepts")):
            row(f"Filter labels that match the ground truth, {what} (recall@20)",
                _path(obj, "recall", f"{split}@20", "lavise"),
                _path(obj, "recall", f"{split}@20", "no_attention"),
                "the same head without filter attention")  # fmt: skip
    return rows


def flatten_tables(obj: Any, prefix: str = "") -> list[tuple[str, list[dict]]]:
    """Find the tables in an evaluation JSON: lists of dicts become tables, dicts of scalars one-row tables."""
    out: list[tuple[str, list[dict]]] = []
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        out.append((prefix or "results", obj))
    elif isinstance(obj, dict):
        scalars = {k: v for k, v in obj.items() if isinstance(v, int | float | str | bool) or v is None}
        if scalars:
            out.append((prefix or "summary", [scalars]))
        for k, v in obj.items():
            if isinstance(v, dict | list):
                out.extend(flatten_tables(v, f"{prefix} / {k}" if prefix else str(k)))
    return out


#: the columns of :func:`sentence_rows`
SENTENCE_COLUMNS = (
    "measure",
    "evidence (default)",
    "class's frequent attributes",
    "Guo et al. (eq. 5–6)",
    "target",
)


def contrast_cell(contrast: dict) -> str:
    """The "why not" cell: the share of pairs whose named attributes differ, or why there is none."""
    if contrast.get("differ") is not None:
        return f"{contrast['differ']:.1%}"
    if contrast.get("pairs"):
        return f"none ({contrast['pairs']} pairs)"
    return "—"


def sentence_rows(obj: dict) -> list[dict[str, Any]]:
    """The sentence measures (``eval/sentences.json``): ours beside its two baselines and the target, one row each."""

    def pct(section: str, key: str) -> str:
        v = (obj.get(section) or {}).get(key)
        return "—" if v is None else f"{v:.1%}"

    def num(section: str, key: str) -> str:
        v = (obj.get(section) or {}).get(key)
        return "—" if v is None else f"{v:.2f}"

    f, c, d = obj.get("faithfulness", {}), obj.get("contrast", {}), obj.get("descriptions", {})
    rows = [
        {"measure": "stated attributes true of the image", "evidence (default)": pct("evidence", "stated_true"),
         "class's frequent attributes": pct("baseline_frequent", "stated_true"),
         "Guo et al. (eq. 5–6)": pct("baseline_guo", "stated_true"), "target": "≥ 95 %"},
        {"measure": "sentences right in every attribute", "evidence (default)": pct("evidence", "fully_right"),
         "class's frequent attributes": pct("baseline_frequent", "fully_right"),
         "Guo et al. (eq. 5–6)": pct("baseline_guo", "fully_right"), "target": "≥ 80 %"},
        {"measure": "attributes per sentence", "evidence (default)": num("evidence", "mean_attributes"),
         "class's frequent attributes": num("baseline_frequent", "mean_attributes"),
         "Guo et al. (eq. 5–6)": num("baseline_guo", "mean_attributes"), "target": "≥ 3"},
        {"measure": "deleting the grounded region lowers the score more than a random one",
         "evidence (default)": "—" if f.get("lower_than_random") is None else f"{f['lower_than_random']:.1%}",
         "class's frequent attributes": "—", "Guo et al. (eq. 5–6)": "—", "target": "≥ 90 %"},
        {"measure": "“why not” pairs whose named attributes really differ between the classes",
         "evidence (default)": contrast_cell(c),
         "class's frequent attributes": "—", "Guo et al. (eq. 5–6)": "—", "target": "≥ 90 %"},
        {"measure": "class descriptions that differ from each other",
         "evidence (default)": f"{d.get('distinct', 0)} of {d.get('classes', 0)}",
         "class's frequent attributes": "—", "Guo et al. (eq. 5–6)": "—", "target": "all"},
    ]  # fmt: skip
    if "name_attribute" in d:
        rows.append({"measure": "class descriptions that name the attribute in the class's name",
                     "evidence (default)": f"{d['name_attribute']} of {d.get('classes', 0)}",
                     "class's frequent attributes": "—", "Guo et al. (eq. 5–6)": "—", "target": "all"})  # fmt: skip
    return rows
