"""Filters: a sortable, filterable grid of filter cards; ?filter=K opens one filter (shareable URL)."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views
from lavise_core.explain.dissection import IOU_MIN

PER_PAGE = 24
COLS = 6
DETAIL_SIDE = 192


def _open(k: int | None) -> None:
    if k is None:
        st.query_params.pop("filter", None)
    else:
        st.query_params["filter"] = str(k)


def _bar(labels: list[str], values: list[float], title: str, color: str = "#4c78a8") -> go.Figure:
    fig = go.Figure(go.Bar(x=values[::-1], y=labels[::-1], orientation="h", marker_color=color))
    fig.update_layout(title=title, height=90 + 24 * len(labels), margin={"l": 0, "r": 10, "t": 40, "b": 10})
    return fig


def featurevis_panel(ws: views.Workspace, k: int) -> None:
    """The image the filter wants (feature visualisation), stored by the build or computed on request."""
    vis = views.filter_visualisation(ws, k, side=DETAIL_SIDE)
    if vis is None:
        st.caption("**What it wants** (feature visualisation): not precomputed for this bundle.")
        if st.button("Visualise this filter", key=f"fv_{k}", help="256 optimisation steps on this machine"):
            bar = st.progress(0.0, text="optimising the image…")
            with sh.guard("the feature visualisation"):  # busy server: a message here, the page stays
                vis = views.compute_filter_visualisation(
                    ws, k, side=DETAIL_SIDE, report=lambda i, n: bar.progress(i / n, text=f"step {i} / {n}")
                )
            bar.empty()
    if vis is not None:
        st.image(vis.image, width=DETAIL_SIDE, caption=f"what it wants · strength {vis.phi:.2f}")
        spec = f"; other filters reach {vis.others:.2f}× their top on it" if vis.others is not None else ""
        st.caption(
            f"Feature visualisation ({vis.steps} steps, {vis.source}): drives the filter to {vis.ratio:.1f}× "
            f"its top probe image{spec}."
        )


def inputs_panel(ws: views.Workspace, k: int) -> None:
    """What drives filter k: the filters of a lower layer it reads most, each opening its own card."""
    st.subheader("What drives it: filters of the layers below")
    if not st.toggle("Show the filters that drive it (about a second)", key=f"inputs_{k}"):
        st.caption(
            "A filter is built from the filters of the layers below it. This finds which of them feed it most on "
            "its top images, each with its own label, so you can walk down the network."
        )
        return
    with sh.guard("the inputs of this filter"):
        chosen = st.session_state.get(f"inputs_layer_{k}")
        v = views.filter_inputs_view(ws, k, chosen)
        pick, _ = st.columns([1, 2])
        pick.selectbox("From layer", v.layers, index=v.layers.index(v.layer), key=f"inputs_layer_{k}",
                     help="the layers the `layers` stage recorded below this one, nearest first")  # fmt: skip
        if not v.rows:
            st.info(f"No filter of `{v.layer}` feeds filter {k} on its top images.")
            return
        names = [
            f"{v.layer} #{r['filter']}" + (f" · {r['label']}" if r["label"] else " · no label")
            for r in v.rows
        ]
        fig = go.Figure(
            go.Sankey(
                node={"label": [*names, f"filter {k}"], "pad": 12, "thickness": 14,
                      "color": [*["#9ecae9" if r["label"] else "#d9d9d9" for r in v.rows], "#4c78a8"]},
                link={"source": list(range(len(v.rows))), "target": [len(v.rows)] * len(v.rows),
                      "value": [max(r["share"], 1e-3) for r in v.rows],
                      "color": ["rgba(76,120,168,0.35)" if r["contribution"] >= 0 else "rgba(228,87,86,0.35)"
                                for r in v.rows]},
            )
        )  # fmt: skip
        fig.update_traces(textfont={"size": 14, "color": "#262730"})
        fig.update_layout(height=80 + 56 * len(v.rows), margin={"l": 0, "r": 0, "t": 10, "b": 10})
        st.plotly_chart(fig, width="stretch", key=f"inputs_graph_{k}")
        st.caption(
            f"Width: each input's share of what these {len(v.rows)} inputs give filter {k} (its activation × how "
            f"much filter {k} changes with it, averaged over filter {k}'s {v.images} top images). Grey: no label. "
            "Open one to see its own top images."
        )
        cols = st.columns(len(v.rows))
        for c, r in zip(cols, v.rows, strict=True):
            c.page_link(
                "app_pages/layers.py", label=f"#{r['filter']} · {r['share']:.0%}", icon=":material/arrow_downward:",
                query_params={"layer": v.layer, "unit": str(r["filter"])}, help=r["evidence"],
            )  # fmt: skip


def detail(ws: views.Workspace, k: int) -> None:
    d = views.filter_detail(ws, k, side=DETAIL_SIDE)
    nav1, nav2, nav3, _ = st.columns([1, 1, 1, 5])
    nav1.button("← all filters", on_click=_open, args=(None,), key="back")
    nav2.button("‹ previous", on_click=_open, args=(max(k - 1, 0),), key="prev", disabled=k == 0)
    nav3.button(
        "next ›",
        on_click=_open,
        args=(min(k + 1, ws.channels - 1),),
        key="next",
        disabled=k >= ws.channels - 1,
    )
    st.header(f"Filter {k}" + (f" — “{d.label}”" if d.label else ""))
    st.caption(f"Share this filter: add `?filter={k}` to the Filters page URL.")
    st.subheader("Where it fires: its top images")
    st.caption(
        "The probe images that excite this filter most. The white outline marks where it fires most; inside "
        "and outside it the image keeps its own colours, so you can check the label by eye. An image with no "
        "outline excites the filter, but less than its strongest regions. The number is how strongly it fires."
    )
    with st.expander("How this is computed"):
        level = f" ({d.threshold:.3g} for this filter)" if d.threshold is not None else ""
        st.markdown(
            "The filter's activation map A_k(x) is upsampled (bilinear) to the image; the outline encloses where "
            f"it reaches the filter's Network-Dissection threshold{level}: the 0.995 quantile of its activations "
            "over all probe images, the region the labels are measured on. The number under each image is "
            "φ_k(x), the filter's mean activation on the image."
        )
    vis_col, top_col = st.columns([1, 4])
    with vis_col:
        featurevis_panel(ws, k)
    with top_col:
        st.image(
            [im for im, *_ in d.top_images],
            caption=[f"#{i} · {c} · {v:.2f}" if c else f"#{i} · {v:.2f}" for _, i, v, c in d.top_images],
            width=DETAIL_SIDE,
        )
    acc = d.accuracy

    def measured(source: str) -> str:
        return (
            f"right for {acc[source]:.0%} of this layer's filters on held-out images"
            if source in acc
            else "not measured yet"
        )

    if d.label and d.label_source.startswith("dissection"):
        st.caption(
            f"**“{d.label}”**: where it fires most overlaps the {d.label} pixels annotated in {d.label_concepts}'s "
            f"training images (overlap {d.score:.2f}; labels of this kind are {measured('dissection')}; "
            f"a random concept: {acc.get('random', float('nan')):.0%}). The other words below are other views "
            "of the same filter, less reliable. Overlap: Network Dissection's IoU of its top-0.5 % region with "
            "those pixels (1 = the same pixels)."
        )
    elif d.label:
        how = "zero-shot vote score" if d.label_source.startswith("zero") else "attribute probability"
        src = "zero_shot" if d.label_source.startswith("zero") else "pdf"
        st.caption(
            f"**“{d.label}” · {d.label_source} on {d.label_concepts}** ({how} {d.score:.2f}; labels of this kind "
            f"are {measured(src)})."
        )
    elif d.label_source.startswith("dissection"):
        st.caption(
            f"No label: no annotated concept of {d.label_concepts} overlaps where this filter fires enough "
            f"to name it. Enough: an overlap (IoU) of {IOU_MIN:g} or more."
        )
    lab_l, lab_r = st.columns(2)
    with lab_l:
        st.subheader("Network Dissection (annotations)")
        st.caption(f"The best-measured view: {measured('dissection')}.")
        if d.dissection is not None:
            st.dataframe(
                {
                    "concept": [c for c, _ in d.dissection],
                    **({"concept set": d.dissection_sets} if d.dissection_sets else {}),
                    "IoU": [round(s, 3) for _, s in d.dissection],
                    "evidence": [
                        f"detects (IoU ≥ {IOU_MIN:g})" if s >= IOU_MIN else "weak" for _, s in d.dissection
                    ],
                },
                hide_index=True,
            )
            st.caption(
                "How much the region where it fires most overlaps each concept's annotated pixels on the "
                "training images (1 = the same pixels). The number is the IoU of its top-0.5 % region; from "
                f"{IOU_MIN:g} on, it detects the concept."
            )
        else:
            st.info(d.dissection_note, icon=":material/construction:")
    with lab_r:
        st.subheader("Other view: zero-shot labels (LaViSE)")
        st.caption(f"Top word {measured('zero_shot')}.")
        if d.labels is not None:
            st.dataframe(
                {
                    "concept": [p for p, _, _ in d.labels],
                    "score": [round(s, 3) for _, s, _ in d.labels],
                    "kind": [views.LABEL_KINDS.get(t, t) for _, _, t in d.labels],
                },
                hide_index=True,
            )
            st.caption(
                "Vote score: mean similarity of the word to what the explainer sees; no annotation used. Kind: "
                "an annotated concept the explainer was trained on, one held out from its training (a zero-shot "
                "test), or a general English word that no probe image annotates."
            )
            if d.inside is not None:
                st.caption(
                    f"{d.inside:.0%} of its activation lies on the object (the rest on the background)."
                )
        else:
            st.info(d.labels_note, icon=":material/construction:")
    inputs_panel(ws, k)
    left, right = st.columns(2)
    with left:
        if d.attributes is not None:
            st.plotly_chart(
                _bar(
                    [a for a, _ in d.attributes],
                    [p for _, p in d.attributes],
                    "Other view: how likely each attribute is where it fires (Guo et al.)",
                ),
                width="stretch",
                key="pdf",
            )
            st.caption(
                f"Its top attribute is {measured('pdf')}: read it as a weak hint. (The attribute p.d.f. "
                "p(t | f) of Guo et al.)"
            )
        else:
            st.info(d.attributes_note, icon=":material/construction:")
    with right:
        note = views.bundle_class_note(ws)
        if note:
            st.caption(f":material/info: {note}")
        if not d.classes:
            st.info(
                f"Layer `{ws.bundle.layer}` does not feed the classifier directly, so filters have no class weights."
            )
        names = [c for c, _ in d.classes]
        w = [v for _, v in d.classes]
        if d.classes:
            fig = _bar(names, w, "Classes that weight it most (W[c, k])")
            fig.update_traces(marker_color=["#54a24b" if v >= 0 else "#e45756" for v in w[::-1]])
            st.plotly_chart(fig, width="stretch", key="classes")
        hist = go.Figure(go.Histogram(x=d.activations, nbinsx=40, marker_color="#72b7b2"))
        for lvl, v in d.quantiles:
            if lvl in (0.5, 0.99):
                hist.add_vline(x=v, line_dash="dot", annotation_text=f"q{lvl:g} (spatial)")
        hist.update_layout(
            title="How strongly it fires on each probe image",
            height=280,
            margin={"l": 0, "r": 10, "t": 40, "b": 10},
        )
        st.plotly_chart(hist, width="stretch", key="hist")
        if d.quantiles:
            st.caption(
                "Spatial activation quantiles: "
                + ", ".join(f"q{lvl:g} = {v:.3g}" for lvl, v in d.quantiles)
                + (f"; Network-Dissection threshold {d.threshold:.3g}" if d.threshold is not None else "")
            )


def grid(ws: views.Workspace) -> None:
    table = views.filter_table(ws)
    st.header(f"Filters of layer `{ws.bundle.layer}`")
    source = table.attrs.get("source", "none")
    if source == "none":
        source = "none yet: labels come with the textual, dissection or LaViSE stage"
    elif table.attrs.get("composed"):
        sets = views.escape_markdown(table.attrs["concepts"])
        source += f", the best over the concept sets {sets}; each card names its set"
    st.caption(
        f"{ws.channels} filters. Each card: the 4 images that excite the filter most, a white outline around "
        f"where it fires (the image's own colours inside), and its best label ({source}). Click **Open** for "
        "details."
    )
    note = views.bundle_class_note(ws)
    if note:
        st.caption(f":material/info: {note}")
    c1, c2, c3, c4, c5 = st.columns([2, 2, 2, 2, 1.4], vertical_alignment="bottom")
    sort_by = c1.selectbox("Sort by", list(views.SORT_KEYS), key="sort_by")
    concept = c2.text_input("Label contains", "", key="concept_filter", placeholder="e.g. wing")
    max_score = float(table["score"].max()) if len(table) else 0.0
    min_score = c3.slider("Minimum label score", 0.0, max(max_score, 0.01), 0.0, key="min_score")
    cls = c4.selectbox("Important for class", ["(any)", *ws.classes], key="class_filter")
    confident = c5.toggle(
        "Confident",
        key="confident_only",
        help=f"only filters whose best label is confident: {views.confident_rule_short(table.attrs.get('source', ''))}",
    )
    sel = views.select_filters(
        table, sort_by, concept, min_score, None if cls == "(any)" else cls, confident, ws=ws
    )
    n = len(sel)
    if n == 0:
        st.warning("No filter matches these settings.")
        return
    pages = (n + PER_PAGE - 1) // PER_PAGE
    page = 1
    if pages > 1:
        p1, _ = st.columns([1, 4])
        page = p1.number_input(f"Page (of {pages}; {n} filters match)", 1, pages, 1, key="grid_page")
    rows = sel.iloc[(page - 1) * PER_PAGE : page * PER_PAGE]
    cols = st.columns(COLS)
    for j, (_, r) in enumerate(rows.iterrows()):
        k = int(r["filter"])
        with cols[j % COLS].container(border=True):
            st.image(views.filter_card_image(ws, k), width="stretch")
            label = views.escape_markdown(r["label"]) if r["label"] else "—"  # labels may come from captions
            top_class = views.escape_html(r["top_class"])
            how = "dissection, overlap" if table.attrs.get("source", "").startswith("dissection") else "score"
            if table.attrs.get("composed"):  # several concept sets: say which one the word comes from
                how = f"from {views.escape_html(r['concept_set'])} · {how}"
            st.markdown(
                f"**#{k}** · {label}"
                + ("" if not r["label"] else f"  \n<small>{how} {r['score']:.2f} · {top_class}</small>"),
                unsafe_allow_html=True,
            )
            st.button("Open", key=f"open_{k}", on_click=_open, args=(k,), width="stretch")


ws = sh.workspace()
if ws is not None:
    with sh.guard("the Filters page"):
        ws.require_probe()
        raw = st.query_params.get("filter")
        if raw is not None:
            try:
                k = int(raw)
            except ValueError:
                raise ValueError(f"?filter={raw} is not a filter number") from None
            detail(ws, k)
        else:
            grid(ws)
