"""Map: the probe images on a 2-D map of what the network sees; colour by class, prediction, correctness, a concept
or a filter; click a point to open its image. Shareable: ?colour=…&concept=…&filter=K&image=I."""

from __future__ import annotations

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
import streamlit.components.v1 as components

from app_pages import _shared as sh
from lavise_core import views

st.title("A map of the data set")
st.caption(
    "Each dot is a probe image, placed by openTSNE so that images with similar pooled activations (what the "
    "classifier sees) lie close together. Hover a dot to see the image, its class and prediction; click it to open it."
)


def _int(name: str) -> int | None:
    raw = st.query_params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"?{name}={raw} is not a number") from None


ws = sh.workspace()
if ws is not None:
    with sh.guard("the Map page"):
        q = st.query_params
        colour_by = q.get("colour", "class")
        if colour_by not in views.COLOUR_BY:
            raise ValueError(
                f"?colour={colour_by} is not a colouring; choose one of: {', '.join(views.COLOUR_BY)}"
            )
        c1, c2, _ = st.columns([2, 2, 3])
        colour_by = c1.selectbox("Colour by", views.COLOUR_BY, index=views.COLOUR_BY.index(colour_by))
        concept, k = None, None
        if colour_by == "concept":
            concepts = views.map_concepts(ws)
            wanted = q.get("concept")
            concept = c2.selectbox(
                "Concept", concepts, index=concepts.index(wanted) if wanted in concepts else 0
            )
            q["concept"] = concept
        elif colour_by == "filter":
            k = c2.number_input("Filter", 0, ws.channels - 1, _int("filter") or 0)
            q["filter"] = str(k)
        q["colour"] = colour_by
        v = views.map_view(ws, colour_by, concept, k)
        if v.continuous:
            fig = go.Figure(
                go.Scattergl(
                    x=v.x, y=v.y, mode="markers", text=v.hover, hoverinfo="text", customdata=v.index,
                    marker={"size": 5, "color": v.colour, "colorscale": "Viridis", "showscale": True,
                            "colorbar": {"title": "activation"}},
                )
            )  # fmt: skip
        else:
            fig = px.scatter(
                x=v.x, y=v.y, color=v.colour, hover_name=v.hover, custom_data=[v.index],
                render_mode="webgl", labels={"color": v.title},
                # Tableau 10 + near-black + navy: 12 classes without two alike; Alphabet's 26 beyond
                color_discrete_sequence=[*px.colors.qualitative.T10, "#222222", "#1B3C8C"]
                if len(set(v.colour)) <= 12
                else px.colors.qualitative.Alphabet,
            )  # fmt: skip
            fig.update_traces(marker={"size": 5}, hovertemplate="%{hovertext}<extra></extra>")
        fig.update_layout(
            height=620, margin={"l": 0, "r": 0, "t": 30, "b": 0}, title=f"coloured by {v.title}",
            xaxis={"visible": False}, yaxis={"visible": False}, legend={"itemsizing": "constant"},
        )  # fmt: skip
        left, right = st.columns([3, 1])
        with left:
            event = st.plotly_chart(
                fig, width="stretch", key="map", on_select="rerun", selection_mode="points"
            )
            thumbs = views.map_thumbnails(ws)
            if thumbs is not None:  # hovering a dot shows its image
                components.html(views.hover_script(thumbs), height=0)
            if v.faithfulness:
                st.caption(v.faithfulness)
        picked = views.picked_image(event)
        if picked is not None:
            q["image"] = str(picked)
        with right:
            i = _int("image")
            if i is None:
                st.info("Click a dot to open its image.", icon=":material/touch_app:")
            else:
                m = views.map_image(ws, i)
                st.image(m.image, caption=m.caption, width="stretch")
                st.markdown("**Its most active filters**")
                for f, phi in m.filters:
                    st.page_link("app_pages/filters.py", label=f"filter {f} · activation {phi:.2f}",
                                 query_params={"filter": str(f)})  # fmt: skip
        st.caption("Share this view: the page URL keeps the colouring, concept, filter and opened image.")
