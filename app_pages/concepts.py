"""Concepts: free text -> the filters that detect it, the images where they fire, grounding heatmaps."""

from __future__ import annotations

import streamlit as st

from app_pages import _shared as sh
from lavise_core import views

st.title("Search a concept")
st.caption(
    "Type any words. Where the probe images are annotated, filters are ranked by how often they fire on the "
    "concept's annotated regions (words the data set never uses are read through a sentence encoder and a "
    "colour / bird-anatomy lexicon); the page says so when no filter of this layer responds."
)


def _use(phrase: str) -> None:
    st.session_state["concept_text"] = phrase


ws = sh.workspace()
if ws is not None:
    with sh.guard("the Concepts page"):
        choices = views.concept_choices(ws)
        c1, c2 = st.columns([3, 2])
        text = c1.text_input("Concept", key="concept_text", placeholder="e.g. red wing, striped tail, grass")
        options = ["(pick one)"] + [f"{p} — {kind}" for p, kind in choices]
        picked = c2.selectbox(f"…or a data-set concept ({len(choices)})", options, key="concept_pick")
        query = text.strip() or ("" if picked == "(pick one)" else picked.split(" — ")[0])
        if not query:
            st.info("Type a concept or pick one to see the filters that detect it.")
        else:
            res = views.concept_view(ws, query)
            sure = res.confident and not res.weak  # a weak or absent answer gets no green (or violet) badge
            badge = (
                f":{'green' if sure else 'gray'}-badge[seen]"
                if res.status.startswith("seen")
                else f":{'violet' if sure else 'gray'}-badge[zero-shot]"
                if res.status.startswith("zero")
                else ":gray-badge[open vocabulary]"
            )
            st.markdown(  # the concept is the visitor's text: escaped, never markup
                f"### “{views.escape_markdown(res.text)}” {badge} <small>{views.escape_html(res.status)}</small>",
                unsafe_allow_html=True,
            )
            message = (
                res.message.replace(res.text, views.escape_markdown(res.text)) if res.text else res.message
            )
            if not res.confident:
                st.warning(message, icon=":material/search_off:")
            elif res.weak:
                st.warning(message, icon=":material/help:")
            else:
                st.success(message, icon=":material/check_circle:")
            st.caption(
                "Concepts this layer detects that come closest (click to search):"
                if res.method == "evidence"
                else "Nearest phrases in the vocabulary (click to search):"
            )
            sug = [p for p, _ in res.suggestions if p != res.text][:8]
            scols = st.columns(max(len(sug), 1))
            for i, p in enumerate(sug):
                scols[i].button(p, key=f"sug_{i}", on_click=_use, args=(p,), width="stretch")
            if res.filters:
                st.subheader(
                    "Filters that detect it" if not res.weak else "The closest filter (weak evidence)"
                )
                table = {
                    "filter": [k for k, *_ in res.filters],
                    ("evidence" if res.method == "evidence" else "similarity"): [
                        round(s, 3) for _, s, _, _ in res.filters
                    ],
                    "filter's best label": [lab for _, _, lab, _ in res.filters],
                    "vote for this concept": [round(v, 3) for *_, v in res.filters],
                    "open": [f"/filters?filter={k}" for k, *_ in res.filters],
                }
                if (
                    res.method == "evidence"
                ):  # evidence = estimated chance the concept is in the filter's regions
                    table.pop("vote for this concept")
                st.dataframe(
                    table,
                    column_config={"open": st.column_config.LinkColumn("open", display_text="open filter")},
                    hide_index=True,
                )
                if res.weak:
                    st.subheader("Images it fires on: a guess, not a finding")
                    st.markdown(
                        ":orange-badge[weak] No filter of this layer reliably detects "
                        f"“{views.escape_markdown(res.text)}”. These are the images where the closest filter "
                        "fires, shown small and faded: they may have nothing to do with the concept."
                    )
                else:
                    st.subheader("Where those filters fire")
                    st.caption(
                        "The images these filters respond to most. The white outline marks where they fire "
                        "together; the image keeps its own colours, so you can check the concept by eye. The "
                        "number is how strongly they fire on the image (higher = stronger)."
                    )
                with st.expander("How this is computed"):
                    st.markdown(
                        "Grounding map Σ_k w_k A_k(x) over the filters above (each map A_k divided by its maximum, "
                        "w_k the filter's weight for the concept), upsampled to the image; the outline encloses "
                        f"where it reaches {views.GROUNDING_LEVEL:.0%} of its maximum on that image. The number under an "
                        "image is Σ_k w_k φ_k(x) / max φ_k, φ_k(x) being filter k's mean activation on it."
                        + (
                            " A weak answer's images are faded towards grey and shown smaller."
                            if res.weak
                            else ""
                        )
                    )
                if res.images:
                    st.image(
                        [im for im, *_ in res.images],
                        caption=[
                            f"#{i} · {c} · {s:.2f}" if c else f"#{i} · {s:.2f}" for _, i, s, c in res.images
                        ],
                        width=res.image_width,  # the views render them this wide: shown as they are
                    )
