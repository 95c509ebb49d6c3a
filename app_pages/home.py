"""Overview: the chosen bundle at a glance, a concept word map, a first-visit path and bundle building."""

from __future__ import annotations

import streamlit as st

from app_pages import _overview_extras as _extras
from app_pages import _shared as sh
from lavise_core import views

st.title("What has this network learned?")

intro = st.container()  # the first-visit path sits on top but names a class of the chosen bundle
ws = sh.workspace()
ov = None
if ws is not None:
    with sh.guard("the overview"):
        ov = views.overview(ws)

with intro.expander(
    ":material/waving_hand: First visit? Start here", expanded="first_visit_done" not in st.session_state
):
    example = f" {ov.example}" if ov is not None and ov.example else ""
    st.markdown(
        "A convolutional network recognises images with thousands of small pattern detectors, called "
        "**filters**. This dashboard shows, for one layer, what each filter responds to, in pictures and words.\n\n"
        "1. **Filters**: each card shows the images that excite one filter most, with a white outline around "
        "the exciting region, and the word that best describes it. Click a card to open it.\n"
        "2. **Concepts**: type a word (say *red wing*) and see which filters detect it, and where.\n"
        "3. **Explain an image**: upload a picture; the network names it and says *why*."
        + views.escape_markdown(example)
        + "\n"
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

if ws is not None and ov is not None:
    with sh.guard("the overview"):
        st.caption(
            f"**Model** `{ov.model}` · **layer** `{ov.layer}` · **probe set** {ov.dataset} ({ov.n_images} images)"
        )
        m1, m2, m3, m4 = st.columns(4)
        if ov.accuracy_scope == "test":
            acc_label = "Accuracy on test images"
            acc_help = f"{ov.accuracy_images} probe images held out from the network's training" + (
                f"; on all {ov.n_images} probe images, training images included: {ov.accuracy_all:.1%}"
                if ov.accuracy_all is not None
                else ""
            )
        else:
            acc_label = "Accuracy on all probe images"
            acc_help = "this data set has no test split: training images are included"
        m1.metric(acc_label, "n/a" if ov.accuracy is None else f"{ov.accuracy:.1%}", help=acc_help)
        m2.metric("Filters in this layer", f"{ov.n_filters}")
        m3.metric(
            "Filters with a confident concept",
            "n/a" if ov.confident_share is None else f"{ov.confident_share:.0%}",
            help=f"confident = {ov.confident_rule}",
        )
        m4.metric("Classes", f"{ov.n_classes}")
        samples = views.sample_images(ws)
        if samples:
            st.subheader("What the network looks at")
            st.caption(f"A few of the {ov.n_images} probe images, one per class, with their class.")
            st.image([im for im, _ in samples], caption=[c for _, c in samples], width=128)
        if sh.building_now():  # what is missing is on its way: the sidebar shows the progress
            st.info(
                "The explanations are being built in the background (progress in the sidebar): filter labels, "
                "concept search, explanations of images and the evaluation appear here as their stages finish.",
                icon=":material/hourglass_top:",
            )
        else:
            for msg in ov.messages:
                st.info(msg, icon=":material/construction:")
        if ov.class_note:
            st.warning(ov.class_note, icon=":material/info:")
        if ov.words:
            st.subheader("The concepts this layer detects")
            st.caption(
                f"Each word labels one or more filters ({ov.label_source}); bigger = more filters. "
                "A word naming a colour is shown in that colour. Hover a word for its count and how sure the "
                "label is; bold = confident, faded = tentative."
            )
            st.html(views.word_cloud_html(ov.words[:45], ov.confident_score))
        with st.expander(":material/settings: Advanced: what this bundle has computed"):
            st.caption(
                "Build stages: "
                + " · ".join(
                    f"{':material/check_circle:' if done else ':material/radio_button_unchecked:'} `{name}`"
                    for name, done in ov.stages.items()
                )
            )

if ws is not None:
    _extras.export_section(ws)
    _extras.compare_section(ws)
_extras.build_section(ws)
