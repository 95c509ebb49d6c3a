"""Evaluation: the metric tables of `lavise evaluate`, with the baselines and the papers' numbers."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views

st.title("How good are the explanations?")
st.caption(
    "Measured against the probe set's ground truth by `lavise evaluate`; the papers' numbers for reference."
)

ws = sh.workspace()
if ws is not None:
    with sh.guard("the Evaluation page"):
        rep = views.evaluation_report(ws)
        for msg in rep.missing:
            st.info(msg, icon=":material/construction:")
        for name, obj in rep.sections.items():
            st.subheader(
                {
                    "textual": "Textual explanations (Guo et al.)",
                    "lavise": "Zero-shot filter labels (LaViSE)",
                }.get(name, name)
            )
            for title, rows in views.flatten_tables(obj):
                st.markdown(f"**{title}**")
                st.dataframe(rows, hide_index=True)
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
        st.subheader("The papers' numbers")
        for title, rows in rep.paper.items():
            st.markdown(f"**{title}**")
            st.dataframe(rows, hide_index=True)
