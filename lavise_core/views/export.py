"""Export a bundle: the filter table as CSV and a self-contained HTML report (images inlined).

The report follows Network Dissection's per-layer report (Bau et al. 2017): a header with the model, layer,
probe set and accuracy, the share of interpretable filters and the label distribution, then one card per
filter with its label, the label's source and score, the IoU where ground-truth regions exist, and its
top images with the activation map overlaid. Everything is in one file (JPEG as ``data:`` URIs), so it
opens offline and can be mailed. ``lavise report BUNDLE`` writes both from the command line.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import time

import numpy as np

from lavise_core.api import SOURCE_ZERO_SHOT
from lavise_core.views.filters import filter_card_image, filter_table
from lavise_core.views.home import overview
from lavise_core.views.workspace import StageMissing, Workspace

__all__ = ["filter_table_csv", "filter_table_rows", "report_html"]


def filter_table_rows(ws: Workspace, n_top: int = 8) -> list[dict]:
    """One dict per filter: label, its source, the data set it was measured on and its score, confident, IoU
    (dissection), the zero-shot label, the class it supports most, mean activation and the ids of its ``n_top``
    top probe images."""
    table = filter_table(ws)
    source = table.attrs.get("source", "")
    top_index = np.asarray(ws.array("probe/top_index"))[:, :n_top]
    ds = ws.dataset()
    ids = [r.id for r in ds.records] if ds is not None else None
    diss = ws.dissection() if ws.has_dissection() else None
    rows = []
    for k, row in enumerate(table.itertuples(index=False)):
        iou, dlab = "", ""
        if diss is not None:
            j, s = int(diss.label_ids[k, 0]), float(diss.label_scores[k, 0])
            dlab, iou = diss.concepts[j], round(s, 4)
        zs = ws.zero_shot_labels(k, 1) if source != SOURCE_ZERO_SHOT else None
        tops = [int(i) for i in top_index[k] if i >= 0]
        rows.append(
            {
                "filter": k,
                "label": row.label,
                "label_source": source,
                "concept_set": row.concept_set,
                "score": round(float(row.score), 4),
                "confident": bool(row.confident),
                "iou": iou,
                "dissection_label": dlab,
                "zero_shot_label": zs[0][0] if zs else "",
                "zero_shot_score": round(float(zs[0][1]), 4) if zs else "",
                "top_class": row.top_class,
                "class_weight": float(row.class_weight),
                "mean_activation": float(row.mean_activation),
                "top_image_ids": ";".join(
                    ids[i] if ids is not None and i < len(ids) else str(i) for i in tops
                ),
                "top_image_indices": ";".join(map(str, tops)),
            }
        )
    return rows


def filter_table_csv(ws: Workspace, n_top: int = 8) -> bytes:
    """:func:`filter_table_rows` as UTF-8 CSV (a header row, then one row per filter)."""
    rows = filter_table_rows(ws, n_top)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["filter"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _img(jpeg: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{margin:0 0 4px}
.meta{color:#555;margin-bottom:16px}.kpi{display:inline-block;margin:0 24px 12px 0}.kpi b{font-size:1.4em;display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:13px}.card img{width:100%}
.no{color:#999}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}"""


def report_html(ws: Workspace, max_filters: int | None = None, n_images: int = 4, tile: int = 96) -> str:
    """The bundle report as one HTML page (no external files). Filters sorted by label score, best first;
    ``max_filters`` keeps the first ones (``None``: all)."""
    ov = overview(ws)
    rows = filter_table_rows(ws)
    order = sorted(range(len(rows)), key=lambda k: (-float(rows[k]["score"]), k))
    if max_filters is not None:
        order = order[: max(0, int(max_filters))]
    esc = html.escape
    acc = f"{ov.accuracy:.1%}" if ov.accuracy is not None else "n/a"
    share = f"{ov.confident_share:.0%}" if ov.confident_share is not None else "n/a"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>lavise report: {esc(ov.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(ov.model)} · {esc(ov.layer)}</h1>",
        f"<div class='meta'>probe set {esc(ov.dataset)} ({ov.n_images} images, {ov.n_classes} classes) · "
        f"bundle {esc(ws.bundle.key)} · written {time.strftime('%Y-%m-%d %H:%M')}</div>",
        f"<div class='kpi'><b>{ov.n_filters}</b>filters</div>",
        f"<div class='kpi'><b>{share}</b>interpretable ({esc(ov.label_source)})</div>",
        f"<div class='kpi'><b>{acc}</b>accuracy on {'test' if ov.accuracy_scope == 'test' else 'all probe'} "
        "images</div>",
        f"<p class='meta'>Interpretable: {esc(ov.confident_rule)}</p>",
        "<h2>Label distribution</h2><table><tr><th>concept</th><th>filters</th><th>mean score</th></tr>",
        *(f"<tr><td>{esc(w)}</td><td>{n}</td><td>{s:.3f}</td></tr>" for w, n, s in ov.words[:30]),
        "</table>",
        f"<h2>Filters ({len(order)} of {len(rows)}, best label score first)</h2><div class='grid'>",
    ]
    for k in order:
        r = rows[k]
        try:
            pic = _img(filter_card_image(ws, k, n=n_images, tile=tile), f"filter {k} top images")
        except (StageMissing, ValueError, OSError) as e:
            pic = f"<div class='no'>no images: {esc(str(e))}</div>"
        label = esc(r["label"]) if r["label"] else "<span class='no'>no label</span>"
        if r["label_source"].startswith("dissection"):
            how = f"IoU {r['score']:.3f}"
        else:
            how = f"score {r['score']:.3f}" + (f" · IoU {r['iou']:.3f}" if r["iou"] != "" else "")
        mark = "✓" if r["confident"] else ""
        parts.append(
            f"<div class='card'>{pic}<div><b>#{k}</b> {label} {mark}</div>"
            f"<div class='meta'>{how} · supports {esc(str(r['top_class']))}</div></div>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts)
