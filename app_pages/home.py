"""Overview: the chosen bundle at a glance, a concept word map, a first-visit path and bundle building."""

from __future__ import annotations

import streamlit as st

from app_pages import _overview_extras as _extras
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
        if ov.class_note:
            st.warning(ov.class_note, icon=":material/info:")
        if ov.words:
            st.subheader("The concepts this layer detects")
            st.caption(
                f"Each word labels one or more filters ({ov.label_source}); bigger = more filters. "
                "A word naming a colour is shown in that colour. Hover a word for its count and mean label "
                "score; bold = confident, faded = tentative."
            )
            st.html(views.word_cloud_html(ov.words[:45], ov.confident_score))

if ws is not None:
    _extras.export_section(ws)
    _extras.compare_section(ws)
_extras.build_section(ws)
