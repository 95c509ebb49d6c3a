"""Classes page: class descriptions and failure patterns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lavise_core.views.workspace import StageMissing, Workspace

__all__ = ["ClassReport", "class_report"]


# =========================================================================== classes & failures
@dataclass
class ClassReport:
    descriptions: list[tuple[str, str]] | None
    descriptions_note: str | None
    classes: list[str]
    confusion: np.ndarray | None  # (K', K') over the labelled classes shown
    confusion_classes: list[str]
    accuracy: float | None
    split: str
    errors: list[dict]
    confusing_attributes: list[tuple[str, int]]
    note: str | None = None


def class_report(ws: Workspace, max_errors: int = 24, split: str = "test") -> ClassReport:
    """Class descriptions (eq. 7–8), confusion matrix and explained errors (true vs predicted)."""
    ws.require_probe()
    classes = ws.classes
    desc, dnote = None, None
    try:
        tx = ws.textual()
        desc = [(classes[c], tx.describe_class(c).sentence) for c in range(len(classes))]
    except StageMissing as e:
        dnote = str(e)
    ds = ws.dataset()
    note = None
    if ds is None:
        return ClassReport(
            desc, dnote, classes, None, [], None, split, [], [], f"data set unavailable: {ws.dataset_error()}"
        )
    if list(ds.classes) != list(classes):
        note = (
            f"the data set's classes ({', '.join(ds.classes[:5])}{'…' if len(ds.classes) > 5 else ''}) are not the "
            f"model's {len(classes)} classes, so there is no confusion matrix; the table lists the predictions."
        )
        logits = np.asarray(ws.array("probe/logits"))
        pred = logits.argmax(1)
        errors = [
            {
                "index": i,
                "true": ds.classes[r.label] if r.label >= 0 else "?",
                "predicted": classes[int(pred[i])],
            }
            for i, r in enumerate(ds.records[:max_errors])
        ]
        return ClassReport(desc, dnote, classes, None, [], None, split, errors, [], note)
    labels = ds.labels()
    valid = ws.array("probe/valid")
    sel = (labels >= 0) & (np.asarray(valid, bool) if valid is not None else True)
    sp = ds.splits()
    if (sel & (sp == split)).any():
        sel &= sp == split
    else:
        split = "all"
    logits = np.asarray(ws.array("probe/logits"))
    pred = logits.argmax(1)
    K = len(classes)
    conf = np.zeros((K, K), np.int64)
    np.add.at(conf, (labels[sel], pred[sel]), 1)
    acc = float((pred[sel] == labels[sel]).mean()) if sel.any() else None
    errors: list[dict] = []
    confusing: list[tuple[str, int]] = []
    if desc is not None:
        from lavise_core.explain.textual.explainer import debug_misclassified

        idx = np.flatnonzero(sel)
        rep = debug_misclassified(
            np.asarray(tx.pdf), np.asarray(ws.array("probe/pooled"))[idx], logits[idx], labels[idx],
            np.asarray(tx.weight), classes, tx.vocabulary, max_items=max_errors,
        )  # fmt: skip
        confusing = rep.confusing_attributes[:15]
        for it in rep.items:
            errors.append(
                {
                    "index": int(idx[it.index]),
                    "true": classes[it.true_class],
                    "predicted": classes[it.predicted_class],
                    "true_sentence": it.true.sentence,
                    "predicted_sentence": it.predicted.sentence,
                    "confusing": [t for t, _ in it.confusing],
                }
            )
    else:
        for i in np.flatnonzero(sel & (pred != labels))[:max_errors]:
            errors.append({"index": int(i), "true": classes[labels[i]], "predicted": classes[int(pred[i])]})
    return ClassReport(desc, dnote, classes, conf, classes, acc, split, errors, confusing, note)
