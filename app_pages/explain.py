"""Explain an image: predictions, the explanation sentence, "why not B?", attribute chips, contributing filters."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import _shared as sh
from app_pages._inversion import inversion_section
from lavise_core import views
from lavise_core.data.images import ImageLoadError
from lavise_core.data.samples import SAMPLE_PHOTOS, sample_photo

MAX_UPLOADS = 6
CACHE = "analyses"

st.title("Explain an image")
st.caption("The network names the image and says why, in words (attributes) and pictures (where it looks).")


def _analysis(ws: views.Workspace, key: str, make) -> views.ImageAnalysis:
    cache = st.session_state.setdefault(CACHE, {})
    full = (str(ws.bundle.root), key)
    if full not in cache:
        if len(cache) > 12:
            cache.pop(next(iter(cache)))
        cache[full] = make()
    return cache[full]


def render(ws: views.Workspace, a: views.ImageAnalysis, uid: str) -> None:
    classes = ws.classes
    c_img, c_txt = st.columns([2, 3])
    with c_txt:
        predicted = views.predicted_class(ws, a)  # cheap: the explanation below needs the contrast class
        why_not = st.selectbox(
            "Why not class…?",
            ["(choose a class)"] + [c for c in classes if c != predicted],
            key=f"whynot_{uid}",
        )
        attr_key = f"attr_{uid}"
        ex = views.explain_image(
            ws,
            a,
            why_not=None if why_not.startswith("(") else why_not,
            attribute=st.session_state.get(attr_key),
        )
        if ex.in_distribution is False:
            st.error(f"**Unlike the probe images.** {ex.ood_message}", icon=":material/warning:")
            st.markdown(
                f"The network's guess, **{ex.predicted}**, is unreliable here: no reason is given for it, "
                "because the attributes it would name were learnt on other images."
            )
        else:
            st.markdown(f"#### {ex.sentence or f'Predicted: {ex.predicted}'}")
            if ex.ood_message:
                st.caption(ex.ood_message)
        if ex.evidence:
            with st.expander("The evidence behind each attribute"):
                st.markdown("\n".join(f"- {line}" for line in ex.evidence))
        if ex.contrast:
            st.markdown(f"**Why not {why_not}?** {ex.contrast}")
        for n in ex.notes:
            st.info(n, icon=":material/construction:")
        fig = go.Figure(
            go.Bar(
                x=[p for _, p in ex.predictions][::-1],
                y=[c for c, _ in ex.predictions][::-1],
                orientation="h",
                marker_color="#4c78a8" if ex.in_distribution is not False else "#bbbbbb",
                text=[f"{p:.1%}" for _, p in ex.predictions][::-1],
                textposition="auto",
            )
        )
        fig.update_layout(
            title="Top-5 predictions" if ex.in_distribution is not False else "Top-5 guesses (unreliable)",
            height=230,
            margin={"l": 0, "r": 10, "t": 40, "b": 10},
            xaxis={"range": [0, 1], "tickformat": ".0%"},
        )
        st.plotly_chart(fig, width="stretch", key=f"pred_{uid}")
    with c_img:
        if ex.attributes:
            st.pills(
                "Attributes (click one to see where it is)",
                [t for t, _ in ex.attributes],
                default=ex.attribute,
                key=attr_key,
            )
        st.image(ex.heatmap, width="stretch")
        st.caption(ex.heatmap_caption)
        if ex.zero_shot:
            st.caption(
                "Zero-shot words for the whole image (LaViSE head): "
                + ", ".join(p for p, _ in ex.zero_shot[:6])
            )
        if ws.bundle.stage_done("oramas"):
            box = st.expander(
                "Where does it look? Oramas et al. (relevant features back-projected)",
                key=f"oramas_open_{uid}",
                on_change="rerun",
            )
            if box.open:  # computed when opened (a guided backprop pass), then cached per image
                with box, sh.guard("the Oramas et al. explanation"):
                    img, cap = views.oramas_heatmap(ws, a, ex.target)
                    st.image(img, width="stretch")
                    st.caption(cap)
    if views.is_siam_bundle(ws):
        with sh.guard("the SIAM explanation"):
            sv = views.siam_view(ws, a, ex.target)
            st.markdown(f"#### SIAM: {sv.sentence}")
            st.caption("What: " + ", ".join(f"{t} ({p:.2f})" for t, p in sv.present))
            wf = go.Figure(
                go.Waterfall(
                    x=["bias", *[t for t, _ in sv.waterfall], "score"],
                    y=[sv.bias, *[v for _, v in sv.waterfall], 0.0],
                    measure=["absolute", *["relative"] * len(sv.waterfall), "total"],
                    connector={"line": {"color": "#999"}},
                )
            )
            wf.update_layout(
                title=f"How much: the score of “{sv.target}” = bias + Σ attribute contributions ({sv.score:.2f})",
                height=320, margin={"l": 0, "r": 10, "t": 40, "b": 10},
            )  # fmt: skip
            st.plotly_chart(wf, width="stretch", key=f"siam_wf_{uid}")
            cols = st.columns(max(1, len(sv.where)))
            for col, (attr, v, img) in zip(cols, sv.where, strict=True):
                col.image(img, width="stretch")
                col.caption(f"Where: {attr} ({v:+.2f})")
    contrib = go.Figure(
        go.Bar(
            x=[f"#{k}" for k, _, _ in ex.contributions],
            y=[v for _, v, _ in ex.contributions],
            text=[lab for *_, lab in ex.contributions],
            marker_color="#f58518",
            hovertemplate="filter %{x}: %{y:.3f}<br>%{text}<extra></extra>",
        )
    )
    contrib.update_layout(
        title=f"Filters that contributed most to “{ex.target}”",
        height=300,
        margin={"l": 0, "r": 10, "t": 40, "b": 10},
        xaxis={"type": "category"},
    )
    st.plotly_chart(contrib, width="stretch", key=f"contrib_{uid}")
    st.caption(
        f"Each bar: how much the filter adds to the score of “{ex.target}” on this image. Open a filter: "
        + " · ".join(f"[#{k}](/filters?filter={k})" for k, _, _ in ex.contributions[:6])
        + ". (Bar = φ_k · W[c, k]: the filter's mean activation times its weight for the class.)"
    )
    one_filter(ws, a, ex, uid)
    where_it_looks(ws, a, uid, ex.predicted)


def one_filter(ws: views.Workspace, a: views.ImageAnalysis, ex: views.ImageExplanation, uid: str) -> None:
    """Section "Where does one filter fire?": a chosen filter's spatial map on this image (default: the top one)."""
    st.subheader("Where does one filter fire?")
    labels = ws.shown_labels().labels
    contrib = {k: v for k, v, _ in ex.contributions}

    def name(k: int) -> str:
        lab = f" “{labels[k]}”" if labels[k] else " (no label)"
        return f"#{k}{lab}" + (f" · contributes {contrib[k]:+.3f}" if k in contrib else "")

    k = st.selectbox(
        "Filter (the top contributing one first)",
        views.filter_choices(ws, ex),
        format_func=name,
        key=f"fmap_{uid}",
    )
    fm = views.filter_map(ws, a, k)
    c1, c2, c3 = st.columns([2, 2, 3])
    c1.image(a.image, caption="The image", width="stretch")
    c2.image(
        fm.overlay, caption=f"Filter #{fm.filter}" + (f" · {fm.label}" if fm.label else ""), width="stretch"
    )
    with c3:
        st.markdown(fm.caption)
        st.caption(f"[Open filter #{fm.filter}](/filters?filter={fm.filter}) to see its top probe images.")


def where_it_looks(ws: views.Workspace, a: views.ImageAnalysis, uid: str, predicted: str) -> None:
    """Section "Where does it look?": attribution maps side by side; the method choice lives in the URL."""
    st.subheader("Where does it look?")
    labels = views.method_labels()
    chosen = st.multiselect(
        "Attribution methods",
        list(labels),
        default=views.parse_methods(st.query_params.get("methods")),
        format_func=labels.get,
        key=f"methods_{uid}",
    )
    st.query_params["methods"] = views.methods_param(chosen) or views.DEFAULT_METHOD
    others = [c for c in ws.classes if c != predicted]
    other = st.selectbox("Compare with class", ["(runner-up)", *others], key=f"attr_other_{uid}")
    other = None if other.startswith("(") else other
    settings = advanced_settings(ws, uid)
    try:  # this image's faithfulness is measured on request, below
        if len(chosen) > 2:  # several methods at once: heavy, bounded across sessions (busy = a message)
            with views.heavy_slot("the attribution maps"):
                view = views.where_it_looks(ws, a, chosen, other, faithfulness=False, settings=settings)
        else:
            view = views.where_it_looks(ws, a, chosen, other, faithfulness=False, settings=settings)
    except ValueError as e:  # a setting no method can use: say which, keep the rest of the page
        st.error(f"No attribution maps with these settings: {e}.", icon=":material/tune:")
        return
    st.image(
        view.legend, caption=("−1 → 0 → +1: " if settings.signed else "0 → 1: ") + view.scale_note, width=256
    )
    for n in view.notes:
        st.caption(sh.public(n))  # no server path in front of a visitor
    for p in view.panels:
        cols = st.columns([2, 2, 3])
        for col, c in zip(cols, view.classes, strict=False):
            col.image(p.overlays[c], caption=f"{p.label} · {c} (max {p.maxima[c]:.3g})", width="stretch")
        with cols[-1]:
            st.markdown(f"**{p.label}** · {p.seconds * 1000:.0f} ms")
            if p.faithfulness is not None:  # else the note above says how to measure it
                st.caption("Baseline, the stored summary: " + views.faithfulness_text(p.faithfulness))
    if view.panels:
        image_faithfulness(ws, a, view, uid)


def image_faithfulness(
    ws: views.Workspace, a: views.ImageAnalysis, view: views.AttributionView, uid: str
) -> None:
    """This image's deletion and insertion per map, in an expander that measures them when opened (cached)."""
    box = st.expander(
        "Does each map find what drives the score on this image? (delete or reveal its most important pixels "
        "first)",
        key=f"faith_open_{uid}",
        on_change="rerun",
        icon=":material/checklist:",
    )
    if not box.open:  # measured when opened: a new upload shows its maps without waiting for these passes
        return
    with box, sh.guard("this image's faithfulness"):
        measured = [(p, views.panel_faithfulness(ws, a, view, p)) for p in view.panels]
        for p, f in measured:
            st.markdown(f"**{p.label}**")
            st.markdown(views.image_faithfulness_text(f))
        st.plotly_chart(faithfulness_curves(measured), width="stretch", key=f"faith_{uid}")


def advanced_settings(ws: views.Workspace, uid: str) -> views.AttributionSettings:
    """The "Advanced" expander: each method's parameters (defaults: those the stored numbers were measured with)."""
    d = views.AttributionSettings()
    size = int(ws.model().input_size)
    with st.expander("Advanced: method settings"):
        c1, c2, c3 = st.columns(3)
        with c1:
            st.markdown("**Integrated gradients**")
            base = st.selectbox(
                "Baseline (the image the path starts from)",
                list(views.IG_BASELINES),
                format_func=views.IG_BASELINES.get,
                key=f"ig_base_{uid}",
            )
            steps = st.number_input("Steps", 1, 256, d.ig_steps, key=f"ig_steps_{uid}")
            st.markdown("**SmoothGrad**")
            noise = st.slider("Noise (share of the value range)", 0.0, 0.5, d.smoothgrad_noise, 0.01, key=f"sg_noise_{uid}")  # fmt: skip
            samples = st.number_input("Samples", 1, 200, d.smoothgrad_samples, key=f"sg_n_{uid}")
        with c2:
            st.markdown(f"**Occlusion** (the network sees {size}×{size} pixels)")
            window = st.number_input(
                "Window (pixels)", 1, size, min(d.occlusion_window, size), key=f"occ_w_{uid}"
            )
            stride = st.number_input(
                "Stride (pixels)", 1, size, min(d.occlusion_stride, size), key=f"occ_s_{uid}"
            )
            st.markdown("**CAMs** (CAM, Grad-CAM, Grad-CAM++)")
            layers = views.cam_layers(ws)
            layer = st.selectbox("Target layer", layers, key=f"cam_layer_{uid}")
        with c3:
            st.markdown("**Sign**")
            signed = st.toggle(
                "Signed maps: evidence for (red) and against (blue) the class", key=f"signed_{uid}"
            )
            st.caption(
                "The defaults are the settings the stored faithfulness summary was measured with. CAM is defined "
                "only for the layer that feeds the classifier; at other layers use Grad-CAM."
            )
    return views.AttributionSettings(
        base, int(steps), float(noise), int(samples), int(window), int(stride),
        None if layer == layers[0] else layer, bool(signed),
    )  # fmt: skip


def faithfulness_curves(measured: list) -> go.Figure:
    """This image's deletion (solid) and insertion (dashed) curves, one colour per method: ``measured`` holds
    ``(panel, its ImageFaithfulness)`` pairs."""
    fig = go.Figure()
    palette = [
        "#4c78a8",
        "#f58518",
        "#54a24b",
        "#e45756",
        "#b279a2",
        "#72b7b2",
        "#eeca3b",
        "#9d755d",
        "#bab0ac",
    ]
    for (p, f), colour in zip(measured, palette * 2, strict=False):
        xs = [i / (len(f.deletion) - 1) for i in range(len(f.deletion))]
        fig.add_scatter(x=xs, y=f.deletion, name=f"{p.label}: deletion", line={"color": colour})
        fig.add_scatter(
            x=xs, y=f.insertion, name=f"{p.label}: insertion", line={"color": colour, "dash": "dash"}
        )
    fig.update_layout(
        title=f"This image: probability of “{measured[0][1].target}” as its pixels are deleted (solid) or "
        "revealed (dashed), most important first",
        height=320, margin={"l": 0, "r": 10, "t": 40, "b": 10},
        xaxis={"title": "share of pixels taken", "tickformat": ".0%"},
        yaxis={"title": "probability", "range": [0, 1]},
    )  # fmt: skip
    return fig


ws = sh.workspace()
if ws is not None:
    with sh.guard("the Explain page"):
        ws.require_probe()
        note = views.bundle_class_note(ws)
        if note:
            st.info(note, icon=":material/info:")
        source = st.radio(
            "Image source", ["Upload", "Sample photo", "Probe-set test image"], horizontal=True, key="source"
        )
        items: list[tuple[str, str, object]] = []  # (uid, title, maker)
        if source == "Upload":
            files = st.file_uploader(
                "Upload one or more images (PNG, JPEG, GIF, BMP, TIFF, WebP)",
                accept_multiple_files=True,
                key="uploads",
            )
            for f in (files or [])[:MAX_UPLOADS]:
                data = f.getvalue()
                shown = views.escape_markdown(f.name)  # a visitor's file name is text, never markup
                items.append(
                    (
                        f.file_id or f.name,
                        shown,
                        lambda data=data, name=shown: views.analyse_image(ws, data, name),
                    )
                )
            if files and len(files) > MAX_UPLOADS:
                st.warning(f"Only the first {MAX_UPLOADS} images are explained.")
        elif source == "Sample photo":
            name = st.selectbox(
                "Sample photo",
                list(SAMPLE_PHOTOS),
                format_func=lambda n: f"{n} ({SAMPLE_PHOTOS[n]})",
                key="sample",
            )
            items.append((f"sample-{name}", name, lambda: views.analyse_image(ws, sample_photo(name))))
        else:
            ds = ws.dataset()
            if ds is None:
                st.error(sh.public(f"The probe set is unavailable: {ws.dataset_error()}"))
            else:
                i = st.selectbox(
                    "Test image",
                    views.probe_test_images(ds),
                    format_func=lambda i: views.probe_image_label(ds, i),
                    key="probe_image",
                )
                truth = views.probe_image_class(ds, i)
                if truth is not None:
                    st.caption(f"True class: **{truth}**")
                items.append((f"probe-{i}", f"#{i}", lambda: views.analyse_image(ws, ds.load_image(i))))
        if not items and source == "Upload":
            st.info("Upload an image, or switch to a sample photo.")
        tabs = st.tabs([t for _, t, _ in items]) if len(items) > 1 else [st.container()]
        for (uid, title, make), tab in zip(items, tabs, strict=False):
            with tab:
                if source == "Upload" and len(items) == 1:
                    st.caption(f":material/image: {title}")
                try:
                    a = _analysis(ws, uid, make)
                except ImageLoadError as e:
                    st.error(sh.public(f"{title}: {e}"))
                    continue
                with sh.guard(f"explaining {title}"):
                    render(ws, a, uid)
                with sh.guard(f"inverting {title}"):
                    inversion_section(ws, a, uid)
