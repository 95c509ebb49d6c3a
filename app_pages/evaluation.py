"""Evaluation: the headline numbers of `lavise evaluate` against their baselines, then every table."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views

TITLES = {
    "sentences": "Is the sentence about an image right? (held-out test images the network classifies correctly)",
    "fidelity": "Are the words right? (held-out test images and concepts)",
    "textual": "Textual explanations (Guo et al.)",
    "lavise": "Zero-shot filter labels (LaViSE)",
    "attribution": "Where does it look? (attribution maps on held-out images)",
}

st.title("How good are the explanations?")
st.caption(
    "Measured against the probe set's ground truth on images and concepts the methods were not fitted on; each "
    "number next to a baseline that knows nothing (an explanation is only worth reading when it beats its "
    "baseline). The first sections are built with the bundle; the papers' own protocols come from "
    "`lavise evaluate`."
)


def tables(name: str, obj: dict) -> None:
    """Every table of one evaluation JSON, with a grouped bar chart where rows compare methods."""
    for title, rows in views.flatten_tables(obj):
        st.markdown(f"**{title}**")
        st.dataframe(views.table_rows(rows), hide_index=True)
        numeric = [
            k
            for k in rows[0]
            if all(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool) for r in rows)
        ]
        label_key = next((k for k in rows[0] if k not in numeric), None)
        if len(rows) > 1 and numeric and label_key:
            fig = go.Figure(
                [
                    go.Bar(name=k, x=[str(r[label_key]) for r in rows], y=[r[k] for r in rows])
                    for k in numeric[:6]
                ]
            )
            fig.update_layout(barmode="group", height=300, margin={"l": 0, "r": 0, "t": 10, "b": 0})
            st.plotly_chart(fig, width="stretch", key=f"ev_{name}_{title}")


ws = sh.workspace()
if ws is not None:
    with sh.guard("the Evaluation page"):
        rep = views.evaluation_report(ws)
        for name, obj in rep.sections.items():
            title = TITLES.get(name, name)
            # a network with classes of its own is judged on every test image
            if name == "sentences" and obj.get("split") == "test, every image":
                title = "Is the sentence about an image right? (every held-out test image)"
            st.subheader(title)
            if name == "sentences":
                st.dataframe(
                    views.sentence_rows(obj), hide_index=True, key="sentence_rows",
                    column_config={
                        "measure": st.column_config.TextColumn(width="large"),
                        **{c: st.column_config.TextColumn(width="small") for c in views.SENTENCE_COLUMNS[1:]},
                    },
                )  # fmt: skip
                st.caption(
                    f"{obj.get('images', 0)} images ({obj.get('split', 'test, correctly classified')}; "
                    f"classes: {obj.get('network_classes', 'the data set’s')}); the sentence names attributes found by "
                    f"{obj.get('detectors', 0)} attribute detectors read off the filters whose labels are measured "
                    "(a sentence names fewer, and says so, when fewer are confirmed). Baselines: the five attributes "
                    "most frequent in the predicted class, and Guo et al.'s p.d.f. sentence, which stays available "
                    'as `explain(..., method="guo")`.'
                )
                with st.expander("How the network describes each class"):
                    for cls, sentence in obj.get("descriptions", {}).get("sentences", {}).items():
                        st.markdown(f"- **{cls}**: {sentence}")
                continue
            if name == "attribution":
                for line in views.attribution_findings(obj):
                    st.markdown(f"- {line}")
                st.dataframe(views.attribution_rows(obj), hide_index=True, key="attr_rows")
                st.caption(
                    "Cascading randomisation: rank correlation with the trained map, layers re-initialised top down"
                )
                st.dataframe(views.sanity_rows(obj), hide_index=True, key="attr_sanity")
                continue
            head = views.evaluation_headlines(name, obj)
            if head and name == "fidelity":  # plain sentences, one per question, with a traffic light
                for r in head:
                    v = r["verdict"]
                    icon = (
                        ":red[:material/cancel:]"
                        if v.startswith("NOT")
                        else ":orange[:material/warning:]"
                        if "missed" in v
                        else ":green[:material/check_circle:]"
                    )
                    base = "" if r["baseline"] is None else f" · {r['baseline is']}: {r['baseline']:g}"
                    st.markdown(f"{icon} **{r['ours']:g}** — {r['question']}{base} · *{v.lstrip('—; ')}*")
                st.caption(
                    ":green[:material/check_circle:] better than its baseline and at its target · "
                    ":orange[:material/warning:] better than its baseline, short of its target · "
                    ":red[:material/cancel:] not better than its baseline. Ground truth: the test split's images, or "
                    "concepts the method never saw; see the README for the protocol."
                )
            elif head:
                st.dataframe(
                    views.table_rows(head),
                    hide_index=True,
                    column_config={"question": st.column_config.TextColumn(width="large")},
                    key=f"head_{name}",
                )
                weak = [r["question"] for r in head if r["verdict"].startswith("NOT")]
                if weak:
                    st.warning(
                        "Not better than its baseline on this bundle: "
                        + "; ".join(weak)
                        + ". Read these explanations with care.",
                        icon=":material/warning:",
                    )
            with st.expander(f"All {name} numbers", expanded=not head):
                tables(name, obj)
        for msg in rep.missing:  # normal after `make demo`: one muted line each, not an alarm
            st.caption(f":material/schedule: {msg}")
        st.subheader("The papers' numbers")
        for title, rows in rep.paper.items():
            st.markdown(f"**{title}**")
            st.dataframe(views.table_rows(rows), hide_index=True)
