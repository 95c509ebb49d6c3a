"""The Explain page's inversion section: the image reconstructed from one layer's map (Mahendran & Vedaldi)."""

from __future__ import annotations

import streamlit as st

from lavise_core import views


def inversion_section(ws: views.Workspace, a: views.ImageAnalysis, uid: str) -> None:
    """A layer choice and a button; shows the reconstruction beside the image with its relative feature error."""
    with st.expander("What does a layer keep of this image? (inversion)"):
        layers = views.inversion_layers(ws)
        default = layers.index(ws.bundle.layer) if ws.bundle.layer in layers else len(layers) - 1
        layer = st.selectbox("Layer", layers, index=default, key=f"inv_layer_{uid}")
        key = f"inv_{uid}_{layer}"
        if st.button("Reconstruct from this layer", key=f"inv_btn_{uid}") and key not in st.session_state:
            bar = st.progress(0.0, text="optimising…")
            st.session_state[key] = views.invert_image(
                ws, a.image, layer, report=lambda i, n: bar.progress(i / n, text=f"step {i} / {n}")
            )
            bar.empty()
        inv = st.session_state.get(key)
        if inv is not None:
            c1, c2 = st.columns(2)
            c1.image(a.image, caption="the image (what the network sees)", width=256)
            c2.image(inv.image, caption=f"reconstructed from `{inv.layer}`", width=256)
            st.caption(
                f"Relative feature error ‖Φ(x*) − Φ(x)‖ / ‖Φ(x)‖ = {inv.relative_error:.3f} (a grey image: "
                f"{inv.baseline_error:.3f}). Mahendran & Vedaldi 2015, with a Fourier / decorrelated-colour prior "
                "and total variation; what the reconstruction loses, the layer has discarded."
            )
