"""Overview sections: export (CSV, HTML report), compare two bundles, and the build form (thin: logic in
``lavise_core.views.build`` / ``export`` / ``compare``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import _shared as sh
from lavise_core import views

OTHER = "other (type a model spec)…"


@st.cache_data(ttl=300, show_spinner=False)
def _models() -> list[tuple[str, str]]:
    return views.model_choices()


@st.cache_data(show_spinner="Reading the model's layers…")
def _layers(spec: str) -> tuple[list[str], str]:
    return views.model_layers(spec)


def export_section(ws: views.Workspace) -> None:
    with st.expander(":material/download: Export the filter table and a report"):
        st.caption(
            "The filter table (label, its source and score, its overlap with annotated parts where they exist, top "
            "images' ids) as CSV, and the whole bundle as one HTML file with the images inlined (opens offline). "
            "The CSV's `iou` column is that overlap (Network Dissection's IoU)."
        )
        c1, c2 = st.columns(2)
        with sh.guard("the CSV export"):
            c1.download_button(
                "Filter table (CSV)", views.filter_table_csv(ws), f"{ws.bundle.root.name}-filters.csv",
                "text/csv", key="export_csv", icon=":material/table:",
            )  # fmt: skip
        key = f"report_html::{ws.bundle.root}"
        if key not in st.session_state:
            if c2.button("Prepare the HTML report", key="export_prepare", icon=":material/description:"):
                with sh.guard("the report"), st.spinner("Rendering every filter's top images…"):
                    st.session_state[key] = views.report_html(ws)
                    st.rerun()
        else:
            page = st.session_state[key]
            c2.download_button(
                f"HTML report ({len(page) / 1e6:.1f} MB)", page, f"{ws.bundle.root.name}-report.html",
                "text/html", key="export_html", icon=":material/description:",
            )  # fmt: skip


def compare_section(ws: views.Workspace) -> None:
    others = [b for b in sh.available_bundles() if b.root != ws.bundle.root]
    with st.expander(":material/compare: Compare with another bundle", expanded=False):
        if not others:
            st.caption(
                "Only one bundle is served here."
                if sh.mode().read_only
                else "Only one bundle is built: build another layer or model below to compare them."
            )
            return
        labels = {str(b.root): f"{views.model_label(b.manifest['model']['spec'])} · {b.layer} · "
                  f"{b.manifest['dataset']['name']}" for b in others}  # fmt: skip
        pick = st.selectbox("Compare with", list(labels), format_func=labels.get, key="compare_with",
                            index=None, placeholder="choose a bundle")  # fmt: skip
        if pick is None:  # nothing is loaded until a bundle is chosen: the overview stays light
            return
        with sh.guard("the comparison"):
            other = sh.get_workspace(pick, sh._stamp(pick))
            cmp = views.compare_bundles(ws, other)
            left, right = (
                f"this: {cmp.left.model} · {cmp.left.layer}",
                f"other: {cmp.right.model} · {cmp.right.layer}",
            )
            table = pd.DataFrame(cmp.rows).rename(columns={"left": left, "right": right})
            st.dataframe(table, hide_index=True, use_container_width=True)
            for note in cmp.notes:
                st.caption(f":material/info: {note}")
            if cmp.words:
                st.caption("Label distribution: how many filters each concept labels, on each side")
                words = pd.DataFrame(cmp.words, columns=["concept", left, right]).set_index("concept")
                st.bar_chart(words, horizontal=True, stack=False, height=28 * len(cmp.words) + 60)


@st.cache_data(ttl=60, show_spinner=False)
def _concept_sets(root: str) -> list[tuple[str, str]]:
    return views.concept_set_choices(root)


def concept_sets_input(data: str, stages: list[str]) -> list[str] | None:
    """The build form's concept sets: annotated folders found under the data folder, plus one typed path ->
    the folders in the order chosen (empty: the probe set's own words), or ``None`` when the build would
    refuse them (the reason is shown)."""
    found = dict(_concept_sets(str(sh.data_root())))
    picked = st.multiselect(
        "Concept sets (where the words come from)", list(found), format_func=lambda f: found.get(f, f),
        key="build_concepts", placeholder="none: the probe set's own annotations",
        help="annotated data sets whose images the same network is run over; with several, each filter's "
        "dissection label is its best over all of them and names its set (as `lavise build --concepts A B`)",
    )  # fmt: skip
    typed = st.text_input("Another concept set folder", "", key="build_concepts_path",
                          placeholder="e.g. data/concepts")  # fmt: skip
    concepts = [*picked, *([typed.strip()] if typed.strip() else [])]
    check = views.check_concepts(data, concepts, stages)
    if not concepts:
        st.caption(check.message)
        return []
    (st.success if check.ok else st.error)(check.message, icon=":material/dictionary:")
    return concepts if check.ok else None


def build_section(ws: views.Workspace | None) -> None:
    mode = sh.mode()
    if mode.read_only:  # served to others: no build form, no model-spec or folder inputs (issue 29)
        return
    with st.expander(":material/build: Build a bundle", expanded=ws is None):
        st.caption(
            "Runs the probe pass and the explanation stages for a model × layer × probe set (finished stages "
            "are reused; a second build of the same bundle waits for the first)."
        )
        if ws is not None and not st.toggle("Set up a new build", key="build_open"):
            return  # the model list and layers load only when asked for (they import torch)
        models = _models()
        names = {spec: f"{spec} — {desc}" for spec, desc in models}
        spec = st.selectbox(
            "Model", [*names, OTHER], format_func=lambda s: names.get(s, s), key="build_model"
        )
        if spec == OTHER:
            spec = st.text_input("Model spec", "", key="build_spec",
                                 help="timm:NAME, torchvision:NAME, checkpoint:PATH?arch=…, a card .json").strip()  # fmt: skip
        layer = None
        if spec:
            try:
                layers, default = _layers(spec)
            except ValueError as e:
                st.error(str(e), icon=":material/error:")
                return
            layer = st.selectbox("Layer", layers, index=layers.index(default), key=f"build_layer::{spec}",
                                 help="default: the layer feeding global pooling")  # fmt: skip
        data = st.text_input("Probe data set folder", "data/synthbirds", key="build_data")
        check = views.check_data_folder(data)
        (st.success if check.ok else st.error)(check.message, icon=":material/folder:")
        all_stages, default_stages = views.stage_choices()
        stages = st.multiselect("Stages (what they need is added)", all_stages, default=default_stages,
                                key="build_stages")  # fmt: skip
        concepts = concept_sets_input(data, stages)
        token = None
        if mode.token_needed:
            token = st.text_input("Build token", type="password", key="build_token",
                                  help="this server lets visitors build with the operator's token only")  # fmt: skip
        allowed = views.build_token_ok(mode, token)
        if token and not allowed:
            st.error("That is not this server's build token.", icon=":material/key_off:")
        ready = check.ok and concepts is not None and spec and allowed
        go = st.button("Build", key="build_go", disabled=not ready, type="primary")
        if not go or not views.build_token_ok(mode, token):
            return
        tracker = views.BuildTracker(stages)
        bar = st.progress(0.0, text="starting…")
        table = st.empty()

        def on_event(event) -> None:
            tracker.update(event)
            left = tracker.left_total()
            eta = f" · about {int(left) // 60}:{int(left) % 60:02d} left in this stage" if left else ""
            bar.progress(tracker.fraction, text=f"{event.message}{eta}")
            table.dataframe(pd.DataFrame(tracker.rows()), hide_index=True, use_container_width=True)

        with sh.guard("the bundle build"):
            b = views.build_bundle(
                spec,
                Path(data.strip()),
                sh.bundles_root(),
                layer,
                stages,
                on_event=on_event,
                concepts=concepts,
            )
            st.session_state[sh.BUNDLE_KEY] = str(b.root)
            st.success(f"Bundle ready: {b.summary()}")
