"""Data set: concept frequencies per class, ground-truth backgrounds and the bias findings."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views

EXAMPLE_COLS = 3  # class strips per row


def _class_heatmap(z, x: list[str], class_counts: list, base_height: int, **trace) -> go.Figure:
    """A classes × columns heatmap (one row per class, in ``class_counts`` order)."""
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[c for c, _ in class_counts], **trace))
    fig.update_layout(
        height=base_height + 26 * len(class_counts),
        yaxis={"autorange": "reversed"},
        margin={"l": 0, "r": 0, "t": 10, "b": 0},
    )
    return fig


st.title("The probe data set and its biases")

ws = sh.workspace()
if ws is not None:
    with sh.guard("the Data set page"):
        rep = views.dataset_report(ws)
        st.caption(f"{rep.name}: {rep.n_images} images, {len(rep.class_counts)} classes.")
        st.subheader("What each class looks like")
        st.caption(
            "Four images of each class, picked evenly through the data set, with how many images it has."
        )
        examples = views.class_examples(ws)
        for start in range(0, len(examples), EXAMPLE_COLS):
            cols = st.columns(EXAMPLE_COLS)
            for col, ex in zip(cols, examples[start : start + EXAMPLE_COLS], strict=False):
                col.image(ex.strip, caption=f"{ex.name} · {ex.n_images} images", width="stretch")
        if rep.spurious is not None:
            sp = rep.spurious
            if sp.get("enabled"):
                st.warning(
                    f"This data set was generated **with a spurious correlation**: {sp.get('species', '?')} appears "
                    f"over the {sp.get('background', '?')} background in {sp.get('strength', 0):.0%} of its training "
                    "images. A network can learn the background instead of the bird; the findings below should reveal it.",
                    icon=":material/warning:",
                )
            else:
                st.caption("Generated without the spurious species–background correlation.")
        st.subheader("Bias findings (LaViSE dataset insight)")
        if rep.bias is not None:
            st.caption(
                "Can the network tell a class from the background alone? Each image is shown to it **with its "
                "object painted out**, and a class is flagged when its backgrounds alone give it away."
            )
            with st.expander("How this is computed"):
                st.markdown(
                    "A held-out linear test asks how well the painted-out images tell each class from a typical "
                    "class (AUC, 0.5 = not at all). A class is flagged when the AUC is at least 0.64 (a medium "
                    "effect) and significant (one-sided Mann–Whitney, Bonferroni p < 0.01 over the classes)."
                )
            flagged = [b for b in rep.bias if b["confirmed"]]
            refuted = [b for b in rep.bias if b["background_bias"] and not b["confirmed"]]
            if refuted:
                top = max(b["ground_truth_share"] for b in refuted)
                st.info(
                    f"The background test flags {len(refuted)} class(es) "
                    f"({', '.join(b['class'] for b in refuted[:4])}{'…' if len(refuted) > 4 else ''}), but the "
                    f"ground-truth backgrounds of those classes are mixed (the most common one covers at most "
                    f"{top:.0%} of a class's images), so these flags are false alarms on this data set.",
                    icon=":material/rule:",
                )
            for b in flagged:
                bg = (
                    f" Its most common annotated background is **{b['dominant_background']}** "
                    f"({b['dominant_background_share']:.0%} of the images tested)."
                    if b.get("dominant_background")
                    else ""
                )
                st.error(
                    f"**{b['class']}** can be recognised from the background alone: AUC "
                    f"{b['background_auc']:.2f}, p = {b['background_p']:.1e}.{bg} A network trained on this data "
                    "can learn the background instead of the object. Its most typical backgrounds:",
                    icon=":material/flag:",
                )
                pics = views.background_views(ws, b.get("background_examples", []))
                if pics:
                    st.image(pics, width=112)
            tested = any(b["background_auc"] is not None for b in rep.bias)
            if not tested:
                st.info(
                    "The background test needs object masks (SynthBirds, COCO, CUB with its segmentations): "
                    "this data set has none, so its backgrounds were not tested.",
                    icon=":material/info:",
                )
            elif not flagged and not refuted:
                st.success("No class can be told from its background alone.")
            rows, note = views.bias_table(rep.bias)
            st.dataframe(rows, hide_index=True, width="stretch", height=35 * (len(rows) + 1) + 3)
            if note:
                st.caption(note)
        else:
            st.info(rep.bias_note, icon=":material/construction:")
        if rep.background_share is not None:
            st.subheader("Ground truth: background per class")
            st.caption(
                "Share of each class's images on each background, coloured on a fixed 0–100 % scale. With no "
                f"bias every cell is near {rep.background_chance:.0f} % (one in {len(rep.background_names)}); "
                "a class photographed mostly on one background shows one dark cell."
            )
            fig = _class_heatmap(
                rep.background_share,
                rep.background_names,
                rep.class_counts,
                200,
                colorscale="Oranges",
                zmin=0,
                zmax=100,
                texttemplate="%{z:.0f} %",
                hovertemplate="%{y}<br>%{x}: %{z:.0f} % of its images<extra></extra>",
                colorbar={"title": "% of class", "ticksuffix": " %"},
            )
            st.plotly_chart(fig, width="stretch", key="bg")
        st.subheader("Concept frequencies per class")
        if rep.concept_freq is not None:
            st.caption(
                "Share of each class's images whose captions mention the concept (the concepts that vary most across classes)."
            )
            fig = _class_heatmap(
                rep.concept_freq,
                rep.concept_names,
                rep.class_counts,
                240,
                colorscale="Viridis",
                hovertemplate="%{y}<br>%{x}: %{z:.0%}<extra></extra>",
            )
            st.plotly_chart(fig, width="stretch", key="freq")
        else:
            st.info(rep.freq_note, icon=":material/construction:")
        st.caption("Images per class: " + ", ".join(f"{c} {n}" for c, n in rep.class_counts))
