"""Layers: Network Dissection across layers (interpretable units per layer, by concept kind); ?layer=NAME opens one."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views
from lavise_core.explain.dissection import IOU_MIN

COLOURS = {"part": "#4c78a8", "colour": "#f58518", "pattern/shape": "#54a24b", "background": "#b279a2"}

st.title("How is the network organised, layer by layer?")
st.caption(
    "Network Dissection (Bau et al. 2017) of several layers, recorded in one pass over annotated training images: "
    "each unit's best concept by IoU of its top-0.5 % region with the concept's annotated pixels. A unit is "
    f"interpretable when that IoU reaches {IOU_MIN:g}. The re-initialised network (same architecture, random weights) is "
    "the baseline."
)

ws = sh.workspace()
if ws is not None:
    with sh.guard("the Layers page"):
        v = views.layers_view(ws)
        st.markdown("\n".join(f"- {s}" for s in v.sentences))
        left, right = st.columns(2)
        with left:
            fig = go.Figure(
                [
                    go.Bar(name=k, x=v.layers, y=[r[f"{k} concepts"] for r in v.rows], marker_color=c)
                    for k, c in COLOURS.items()
                ]
            )
            fig.update_layout(
                barmode="stack", title="Unique concepts detected per layer, by kind", height=360,
                margin={"l": 0, "r": 10, "t": 40, "b": 10}, yaxis_title="unique concepts",
            )  # fmt: skip
            st.plotly_chart(fig, width="stretch", key="unique")
        with right:
            fig = go.Figure(
                [
                    go.Bar(
                        name="trained", x=v.layers, y=[r["share"] for r in v.rows], marker_color="#4c78a8"
                    ),
                    go.Bar(
                        name="re-initialised",
                        x=v.layers,
                        y=[r.get("re-initialised share", 0) for r in v.rows],
                        marker_color="#bab0ac",
                    ),
                ]
            )
            fig.update_layout(
                barmode="group", title=f"Share of units interpretable (IoU ≥ {IOU_MIN:g})", height=360,
                margin={"l": 0, "r": 10, "t": 40, "b": 10}, yaxis_tickformat=".0%",
            )  # fmt: skip
            st.plotly_chart(fig, width="stretch", key="share")
        st.caption(f"{v.images} training images with part masks; the baseline uses a subset of them.")
        st.dataframe(v.rows, hide_index=True)
        chosen = st.query_params.get("layer")
        pick = st.selectbox(
            "Units of layer",
            v.layers,
            index=v.layers.index(chosen) if chosen in v.layers else len(v.layers) - 1,
        )
        if pick != chosen:
            st.query_params["layer"] = pick
        st.caption(f"Share this view: add `?layer={pick}` to the Layers page URL.")
        st.dataframe(views.layer_units(ws, pick, v.iou_min), hide_index=True)
