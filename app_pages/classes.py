"""Classes & failures: class descriptions, the confusion matrix, misclassified images explained both ways."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views

st.title("Classes & failures")

ws = sh.workspace()
if ws is not None:
    with sh.guard("the Classes page"):
        rep = views.class_report(ws)
        if rep.note:
            st.info(rep.note, icon=":material/info:")
        st.subheader("What the network thinks each class looks like")
        if rep.descriptions is not None:
            st.caption("Class-level description p(t | c) = Σ_k p(t | f_k) σ(W[c, k]) (Guo et al., eq. 7–8).")
            cls = st.selectbox("Class", ["(all)", *rep.classes], key="class_pick")
            shown = rep.descriptions if cls == "(all)" else [d for d in rep.descriptions if d[0] == cls]
            for _, sentence in shown[:60]:
                st.markdown(f"- {sentence}")
        else:
            st.info(rep.descriptions_note, icon=":material/construction:")
        if rep.confusion is not None:
            acc = "" if rep.accuracy is None else f" — accuracy {rep.accuracy:.1%}"
            st.subheader(f"Confusion matrix ({rep.split} split{acc})")
            names = rep.confusion_classes
            fig = go.Figure(
                go.Heatmap(
                    z=rep.confusion, x=names, y=names, colorscale="Blues", text=rep.confusion,
                    texttemplate="%{text}", hovertemplate="true %{y}<br>predicted %{x}: %{z}<extra></extra>",
                )
            )  # fmt: skip
            fig.update_layout(
                height=220 + 28 * len(names), xaxis_title="predicted", yaxis_title="true",
                yaxis={"autorange": "reversed"}, margin={"l": 0, "r": 0, "t": 10, "b": 0},
            )  # fmt: skip
            st.plotly_chart(fig, width="stretch", key="confusion")
        if rep.confusing_attributes:
            st.caption(
                "Attributes most often behind the errors: "
                + ", ".join(f"{a} ({n})" for a, n in rep.confusing_attributes[:10])
            )
        st.subheader(
            f"Misclassified images ({len(rep.errors)} shown)" if rep.confusion is not None else "Predictions"
        )
        if not rep.errors:
            st.success("No misclassified image in this split.")
        for e in rep.errors[:24]:
            with st.container(border=True):
                c1, c2 = st.columns([1, 4])
                c1.image(ws.record_image(e["index"], side=160), caption=f"#{e['index']}")
                c2.markdown(f"**true:** {e['true']} · **predicted:** {e['predicted']}")
                if "true_sentence" in e:
                    c2.markdown(f":green[:material/check:] *as the true class:* {e['true_sentence']}")
                    c2.markdown(f":red[:material/close:] *as the predicted class:* {e['predicted_sentence']}")
                    if e["confusing"]:
                        c2.caption("confusing attributes: " + ", ".join(e["confusing"]))

if ws is not None and ws.bundle.stage_done("oramas"):
    with sh.guard("the Classes page (Oramas et al.)"):
        st.subheader("What the network relies on (Oramas et al.)")
        st.caption(
            "The features each class relies on, found without annotations. Each feature is shown by the average "
            "of its top-activating patches and the part its activations overlap most. (Per class, a non-negative "
            "μ-lasso of the network's own predictions on every conv layer's filter energies Σ a².)"
        )
        pick = st.selectbox("Class", ws.classes, key="oramas_class")
        rel = views.class_reliance(ws, pick)
        if rel.note:
            st.warning(rel.note, icon=":material/warning:")
        st.caption(
            "Relevant features by layer: "
            + (", ".join(f"{layer} ({n})" for layer, n in rel.counts) or "none")
            + f". Lasso strength μ = {rel.mu:g}."
        )
        cols = st.columns(6)
        for i, f in enumerate(rel.features):
            with cols[i % 6]:
                st.image(f.patch, width="stretch")
                dis = f" · dissection: {f.dissection}" if f.dissection else ""
                st.caption(f"{f.layer} #{f.filter} · w = {f.weight:.2f} · part: {f.label}{dis}")

if ws is not None and views.is_siam_bundle(ws):
    with sh.guard("the Classes page (SIAM)"):
        st.subheader("Class attribute weights (SIAM)")
        st.caption(
            "A SIAM class score is linear in the attribute maps: each class's weight on each attribute."
        )
        pick = st.selectbox("Class", ws.classes, key="siam_class")
        wts = views.siam_class_weights(ws, pick)
        fig = go.Figure(
            go.Bar(
                x=[v for _, v in wts][::-1], y=[t for t, _ in wts][::-1], orientation="h",
                marker_color=["#4c78a8" if v > 0 else "#e45756" for _, v in wts][::-1],
            )
        )  # fmt: skip
        fig.update_layout(height=60 + 24 * len(wts), margin={"l": 0, "r": 10, "t": 10, "b": 10})
        st.plotly_chart(fig, width="stretch", key="siam_weights")
