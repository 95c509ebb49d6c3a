"""Layers: Network Dissection across layers (interpretable units per layer, by concept kind); ?layer=NAME opens one."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views
from lavise_core.explain.dissection import IOU_MIN

#: a colour per concept kind (the layers stage's kinds: general concept sets, Broden, SynthBirds' rules)
COLOURS = {
    "colour": "#f58518", "texture": "#54a24b", "shape": "#e45756", "part": "#4c78a8", "object": "#72b7b2",
    "material": "#9d755d", "background": "#b279a2", "pattern/shape": "#54a24b",
}  # fmt: skip

st.title("How is the network organised, layer by layer?")
st.caption(
    "Which concepts the units of several layers detect, recorded in one pass over annotated training images: a "
    "unit's best concept is the one whose annotated pixels overlap most with where it fires most, and the unit is "
    "interpretable when that overlap is large enough. The re-initialised network (same architecture, random "
    "weights) is the baseline. This is Network Dissection (Bau et al. 2017): the overlap is the IoU of the unit's "
    f"top-0.5 % region with the concept's pixels, large enough from {IOU_MIN:g}."
)


def open_units(ws: views.Workspace, layer: str, units: list[dict]) -> None:
    """Every unit of ``layer`` with its top probe images (as OpenAI Microscope), one opened in full."""
    st.subheader(f"The units of `{layer}` and the images they fire on")
    with st.spinner(f"Ranking the units of {layer} on the probe images (a few seconds, once per layer)…"):
        tops = views.layer_tops(ws, layer)
    how = (
        f"every one of the {tops.total} probe images"
        if tops.exact
        else f"{tops.ranked} of the {tops.total} probe images, spread evenly over the set (a sample: "
        "the explained layer is ranked on all of them)"
    )
    st.caption(
        f"Each unit's top image among {how}, outlined where the unit fires at half its peak or more; the label is "
        f'the unit\'s best concept when their overlap is large enough (else "no label"). Enough: IoU {IOU_MIN:g} '
        "or more."
    )
    wanted = st.query_params.get("unit")
    default = int(wanted) if wanted and wanted.isdigit() and int(wanted) < len(units) else 0
    unit = st.selectbox(
        "Open a unit",
        list(range(len(units))),
        index=default,
        format_func=lambda u: f"unit {u} · {views.unit_label(units[u])}",
        key=f"unit_{layer}",
    )
    if str(unit) != wanted:
        st.query_params["unit"] = str(unit)
    shots = views.unit_images(ws, tops, unit)
    st.markdown(f"**Unit {unit}** of `{layer}`: {views.unit_label(units[unit])}")
    cols = st.columns(max(1, len(shots)))
    for col, (jpeg, i, value) in zip(cols, shots, strict=False):
        col.image(jpeg, caption=f"probe image #{i} · peak {value:.2f}", width="stretch")
    with st.expander(
        f"All {len(units)} units of `{layer}`, each on its top image", expanded=len(units) <= 64
    ):
        gallery = views.unit_gallery(ws, tops)
        per_row = 8
        for start in range(0, len(gallery), per_row):
            cols = st.columns(per_row)
            for col, u in zip(cols, range(start, min(start + per_row, len(gallery))), strict=False):
                col.image(gallery[u], width="stretch")
                label = units[u]["best concept"] if units[u]["interpretable"] else "no label"
                col.caption(f"{u} · {label}")


ws = sh.workspace()
if ws is not None:
    with sh.guard("the Layers page"):
        v = views.layers_view(ws)
        st.markdown("\n".join(f"- {s}" for s in v.sentences))
        st.caption(
            "Interpretable: the unit's best concept overlaps where the unit fires enough. Enough: an overlap (IoU) "
            f"of {v.iou_min:g} or more."
        )
        left, right = st.columns(2)
        with left:
            fig = go.Figure(
                [
                    go.Bar(
                        name=k,
                        x=v.layers,
                        y=[r[f"{k} concepts"] for r in v.rows],
                        marker_color=COLOURS.get(k),
                    )
                    for k in v.kinds
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
                barmode="group", title="Share of units that detect a concept (interpretable)", height=360,
                margin={"l": 0, "r": 10, "t": 40, "b": 10}, yaxis_tickformat=".0%",
            )  # fmt: skip
            st.plotly_chart(fig, width="stretch", key="share")
        st.caption(f"{v.images} training images with part masks; the baseline uses a subset of them.")
        st.dataframe(  # one narrow table: the per-kind counts in one column, the rest as in the charts
            [
                {"layer": r["layer"], "units": r["units"], "interpretable": r["interpretable"],
                 "share": f"{r['share']:.0%}",
                 "re-initialised": "—" if r.get("re-initialised share") is None
                 else f"{r['re-initialised share']:.0%}",
                 "unique concepts": r["unique concepts"],
                 "interpretable units by kind": " · ".join(
                     f"{k} {r[f'{k} units']}" for k in v.kinds if r.get(f"{k} units")
                 ) or "—"}
                for r in v.rows
            ],
            hide_index=True,
        )  # fmt: skip
        chosen = st.query_params.get("layer")
        pick = st.selectbox(
            "Units of layer",
            v.layers,
            index=v.layers.index(chosen) if chosen in v.layers else len(v.layers) - 1,
        )
        if pick != chosen:
            st.query_params["layer"] = pick
        st.caption(f"Share this view: add `?layer={pick}` to the Layers page URL.")
        units = views.layer_units(ws, pick, v.iou_min)
        st.dataframe(units, hide_index=True)
        open_units(ws, pick, units)

    with sh.guard("the training trajectory"):
        t = views.trajectory_view(ws)
        st.subheader("How the detectors appeared during training")
        if t is None:
            st.caption(
                "No training trajectory for this network yet. Save checkpoints while training "
                "(`lavise train-demo --save-every 2`), then dissect them against the same images: `lavise "
                "trajectory models/synthbirds_cnn.epoch*.json models/synthbirds_cnn.json --data data/synthbirds "
                f"--out {ws.bundle.root}/trajectory.json`."
            )
        else:
            st.caption(t.summary)
            left, right = st.columns(2)
            with left:
                fig = go.Figure()
                recorded = list(dict.fromkeys(u["layer"] for u in t.units))
                for name, shown in zip(recorded, views.shown_layer_names(ws, recorded), strict=True):
                    rows = [u for u in t.units if u["layer"] == name]
                    fig.add_scatter(x=[u["checkpoint"] for u in rows], y=[u["share"] for u in rows], name=shown,
                                    mode="lines+markers")  # fmt: skip
                fig.update_layout(
                    title="Share of units that detect a concept (interpretable), per layer", height=340,
                    margin={"l": 0, "r": 10, "t": 40, "b": 10}, yaxis_tickformat=".0%",
                )  # fmt: skip
                st.plotly_chart(fig, width="stretch", key="trajectory_units")
            with right:
                xs, ys = [a["checkpoint"] for a in t.accuracy], [a["accuracy"] for a in t.accuracy]
                fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", marker_color="#4c78a8"))
                fig.update_layout(
                    title="Accuracy on the test images", height=340, margin={"l": 0, "r": 10, "t": 40, "b": 10},
                    yaxis_tickformat=".0%",
                )  # fmt: skip
                st.plotly_chart(fig, width="stretch", key="trajectory_accuracy")
            if t.changes:
                st.caption("Filters of the explained layer whose label changed, and when:")
                st.dataframe(t.changes, hide_index=True, height=240)
