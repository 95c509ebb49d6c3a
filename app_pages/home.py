"""Overview: the chosen bundle at a glance, a concept word map, a first-visit path and bundle building."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views

st.title("What has this network learned?")

with st.expander(
    ":material/waving_hand: First visit? Start here", expanded="first_visit_done" not in st.session_state
):
    st.markdown(
        "A convolutional network recognises images with thousands of small pattern detectors, called "
        "**filters**. This dashboard shows, for one layer, what each filter responds to, in pictures and words.\n\n"
        "1. **Filters**: each card shows the images that excite one filter most, with the exciting region "
        "highlighted, and the word that best describes it. Click a card to open it.\n"
        "2. **Concepts**: type a word (say *red wing*) and see which filters detect it, and where.\n"
        "3. **Explain an image**: upload a picture; the network names it and says *why*, "
        "e.g. “This is a Scarlet Finch because it has a red crown and a short beak”.\n"
        "4. **Classes & failures** and **Data set**: when it goes wrong, and whether the data set taught "
        "it a shortcut (such as recognising a bird by its background)."
    )
    c1, c2, c3 = st.columns(3)
    c1.page_link("app_pages/filters.py", label="1 · Browse the filters", icon=":material/grid_view:")
    c2.page_link("app_pages/concepts.py", label="2 · Search a concept", icon=":material/search:")
    c3.page_link("app_pages/explain.py", label="3 · Explain an image", icon=":material/image:")
    if st.button("Got it, hide this", key="hide_first_visit"):
        st.session_state["first_visit_done"] = True
        st.rerun()

ws = sh.workspace()
if ws is not None:
    with sh.guard("the overview"):
        ov = views.overview(ws)
        st.caption(
            f"**Model** `{ov.model}` · **layer** `{ov.layer}` · **probe set** {ov.dataset} ({ov.n_images} images)"
        )
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("Model accuracy on the probe set", "n/a" if ov.accuracy is None else f"{ov.accuracy:.1%}")
        m2.metric("Filters in this layer", f"{ov.n_filters}")
        m3.metric(
            "Filters with a confident concept",
            "n/a" if ov.confident_share is None else f"{ov.confident_share:.0%}",
            help=f"confident = {ov.confident_rule}",
        )
        m4.metric("Classes", f"{ov.n_classes}")
        st.caption(
            "Stages: "
            + " · ".join(
                f"{':material/check_circle:' if done else ':material/radio_button_unchecked:'} {name}"
                for name, done in ov.stages.items()
            )
        )
        for msg in ov.messages:
            st.info(msg, icon=":material/construction:")
        if ov.words:
            st.subheader("The concepts this layer detects")
            st.caption(
                "Word size = number of filters whose best label it is; hover for the mean label score."
            )
            words = ov.words[:45]
            n = len(words)
            rng = np.random.default_rng(0)
            cols = max(3, int(np.ceil(np.sqrt(n * 2.2))))
            xs = np.array([i % cols for i in range(n)], float) + rng.uniform(-0.2, 0.2, n)
            ys = -np.array([i // cols for i in range(n)], float) + rng.uniform(-0.15, 0.15, n)
            counts = np.array([c for _, c, _ in words], float)
            sizes = 13 + 26 * (counts / counts.max()) ** 0.7
            fig = go.Figure(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="text",
                    text=[w for w, _, _ in words],
                    textfont={
                        "size": sizes.tolist(),
                        "color": [f"hsl({(i * 47) % 360},55%,38%)" for i in range(n)],
                    },
                    hovertext=[f"{w}: {c} filters, mean score {s:.2f}" for w, c, s in words],
                    hoverinfo="text",
                )
            )
            fig.update_layout(
                height=110 + 55 * (n // cols + 1),
                margin={"l": 0, "r": 0, "t": 0, "b": 0},
                xaxis={"visible": False},
                yaxis={"visible": False},
                plot_bgcolor="rgba(0,0,0,0)",
            )
            st.plotly_chart(fig, width="stretch")
            st.dataframe(
                {
                    "concept": [w for w, _, _ in words],
                    "filters": [c for _, c, _ in words],
                    "mean score": [round(s, 3) for _, _, s in words],
                },
                hide_index=True,
                height=200,
            )

with st.expander(":material/build: Build a bundle", expanded=ws is None):
    st.caption(
        "Runs the probe pass and the explanation stages for a model × layer × probe set (finished stages are reused)."
    )
    with st.form("build"):
        model = st.text_input(
            "Model spec", "synthbirds", help="synthbirds, efficientnet_lite0, a card .json, timm:NAME …"
        )
        data = st.text_input("Probe data set folder", "data/synthbirds")
        layer = st.text_input("Layer (empty: the one feeding global pooling)", "")
        stages = st.multiselect(
            "Stages", ["probe", "textual", "lavise"], default=["probe", "textual", "lavise"]
        )
        go_build = st.form_submit_button("Build")
    if go_build:
        bar = st.progress(0.0, text="starting…")
        with sh.guard("the bundle build"):
            b = views.build_bundle(
                model.strip(),
                data.strip(),
                sh.bundles_root(),
                layer.strip() or None,
                stages,
                report=lambda f, msg: bar.progress(min(max(f, 0.0), 1.0), text=msg),
            )
            st.session_state[sh.BUNDLE_KEY] = str(b.root)
            st.success(f"Bundle ready: {b.summary()}")
