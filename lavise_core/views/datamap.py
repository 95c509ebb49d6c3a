"""The Map page: the probe set's 2-D map (``datamap`` stage) coloured by class, prediction, correctness, a concept
or one filter's activation; one image's details when a point is opened."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lavise_core.api import build_hint
from lavise_core.views.workspace import StageMissing, Workspace

__all__ = [
    "COLOUR_BY",
    "MapImage",
    "MapView",
    "hover_script",
    "map_concepts",
    "map_image",
    "map_thumbnails",
    "map_view",
    "picked_image",
]

COLOUR_BY = ("class", "prediction", "correctness", "concept", "filter")


@dataclass
class MapView:
    """``x, y (M,)`` of the readable images ``index (M,)``; ``colour (M,)`` a category name per point
    (class / prediction / correctness / concept) or a number (filter ``phi_k``); ``continuous`` which;
    ``hover (M,)`` one line per point; ``title`` of the colouring; ``faithfulness`` a sentence."""

    x: np.ndarray
    y: np.ndarray
    index: np.ndarray
    colour: list
    continuous: bool
    hover: list[str]
    title: str
    faithfulness: str


def _require(ws: Workspace) -> np.ndarray:
    ws.require_probe()
    if not ws.bundle.has("map/xy"):
        raise StageMissing(
            "this bundle has no data map yet: build it with "
            f"`{build_hint(ws.bundle).replace('lavise build', 'lavise build --stages datamap', 1)}`"
        )
    return np.asarray(ws.array("map/xy"), np.float32)


def map_concepts(ws: Workspace) -> list[str]:
    """The annotated concepts (attribute phrases) of the probe images, sorted; empty without a data set."""
    ds = ws.dataset()
    if ds is None:
        return []
    return sorted({a for r in ds.records for a in r.attributes})


def map_view(
    ws: Workspace, colour_by: str = "class", concept: str | None = None, k: int | None = None
) -> MapView:
    """The map coloured by ``colour_by`` (one of :data:`COLOUR_BY`); ValueError for a bad choice."""
    xy = _require(ws)
    if colour_by not in COLOUR_BY:
        raise ValueError(f"?colour={colour_by} is not a colouring; choose one of: {', '.join(COLOUR_BY)}")
    idx = np.flatnonzero(np.isfinite(xy[:, 0]))
    ds = ws.dataset()
    n_classes = len(ws.classes)
    labels = ds.labels() if ds is not None else np.full(len(xy), -1)
    preds = np.asarray(ws.array("probe/logits"), np.float32).argmax(1)
    name = lambda j: ws.classes[int(j)] if 0 <= j < n_classes else "unknown"  # noqa: E731
    continuous, title = False, colour_by
    if colour_by == "class":
        colour = [name(labels[i]) for i in idx]
    elif colour_by == "prediction":
        colour = [name(preds[i]) for i in idx]
    elif colour_by == "correctness":
        colour = [
            "unknown" if labels[i] < 0 else "correct" if preds[i] == labels[i] else "wrong" for i in idx
        ]
    elif colour_by == "concept":
        if ds is None or not concept:
            raise ValueError(
                "colour by concept needs a concept (e.g. ?concept=red+crown) and the probe images"
            )
        if concept not in set(map_concepts(ws)):
            raise ValueError(f"no probe image is annotated with {concept!r}; see the list of concepts")
        colour = [concept if concept in ds.records[i].attributes else "other" for i in idx]
        title = f"annotated “{concept}”"
    else:
        if k is None or not 0 <= k < ws.channels:
            raise ValueError(f"colour by filter needs a filter number 0..{ws.channels - 1} (?filter=K)")
        colour = np.asarray(ws.array("probe/pooled")[idx, k], np.float32).tolist()
        continuous, title = True, f"filter {k}'s mean activation"
    hover = [
        f"#{i} · {ds.records[i].id if ds else i} · class {name(labels[i])} · predicted {name(preds[i])}"
        for i in idx
    ]
    info = ws.bundle.manifest.get("stages", {}).get("datamap", {})
    faith = ""
    if "knn_class_agreement_map" in info:
        faith = (
            f"Of each image's 10 nearest neighbours on the map, {info['knn_class_agreement_map']:.0%} share its class "
            f"({info['knn_class_agreement_full']:.0%} in the full {ws.channels}-D activation space; chance "
            f"{info['knn_class_agreement_chance']:.0%})."
        )
    return MapView(xy[idx, 0], xy[idx, 1], idx, colour, continuous, hover, title, faith)


@dataclass
class MapImage:
    """One opened point: the image, its class and prediction, and its most active filters ``[(k, phi_k)]``."""

    index: int
    image: object
    caption: str
    filters: list[tuple[int, float]]


def picked_image(event: object) -> int | None:
    """The probe image index of the first point selected in the map's ``st.plotly_chart`` event, or ``None``.

    Each point carries its image index as ``customdata``, whose shape depends on how the trace was made:
    a plotly-express trace (``custom_data=[index]``) comes back from Streamlit 1.67 as ``{"0": i}``, a
    ``go.Scattergl(customdata=index)`` as the bare number ``i``, older versions as ``[i]``."""
    try:
        points = event["selection"]["points"]  # type: ignore[index]
    except (KeyError, TypeError, AttributeError):
        return None
    if not points:
        return None
    cd = points[0].get("customdata")
    while isinstance(cd, dict | list | tuple):
        if not cd:
            return None
        cd = next(iter(cd.values())) if isinstance(cd, dict) else cd[0]
    try:
        return None if cd is None or isinstance(cd, bool) else int(cd)
    except (TypeError, ValueError):
        return None


def map_image(ws: Workspace, i: int, side: int = 256, n_filters: int = 6) -> MapImage:
    """Probe image ``i`` for the panel beside the map; ValueError when ``i`` is not an image of the probe set."""
    xy = _require(ws)
    if not 0 <= i < len(xy):
        raise ValueError(f"?image={i} is not an image of the probe set (0..{len(xy) - 1})")
    ds = ws.dataset()
    labels = ds.labels() if ds is not None else np.full(len(xy), -1)
    pred = int(np.asarray(ws.array("probe/logits")[i]).argmax())
    cls = ws.classes[int(labels[i])] if 0 <= labels[i] < len(ws.classes) else "unknown"
    phi = np.asarray(ws.array("probe/pooled")[i], np.float32)
    top = np.argsort(-phi, kind="stable")[:n_filters]
    cap = f"#{i} · class {cls} · predicted {ws.classes[pred]}"
    return MapImage(int(i), ws.record_image(int(i), side=side), cap, [(int(k), float(phi[k])) for k in top])


def map_thumbnails(ws: Workspace) -> tuple[str, int, int] | None:
    """``(base64 JPEG mosaic, tile px, columns)`` of the probe images for hover previews, or ``None``."""
    import base64

    if not ws.bundle.has("map/thumbs.jpg") or not ws.bundle.has("map/thumbs.json"):
        return None

    def make() -> tuple[str, int, int]:
        meta = ws.bundle.read_json("map/thumbs")
        data = (ws.bundle.root / "map" / "thumbs.jpg").read_bytes()
        return base64.b64encode(data).decode("ascii"), int(meta["tile"]), int(meta["cols"])

    return ws._once("map_thumbnails", make)[0]


def hover_script(thumbs: tuple[str, int, int], side: int = 120) -> str:
    """HTML for a zero-height component: hooks the page's Plotly map so hovering a dot shows its image (the
    component's iframe is same-origin; it adds one floating element to the page and listens to plotly_hover)."""
    b64, _tile, cols = thumbs
    return f"""<script>
const P = window.parent.document, COLS = {cols}, SIDE = {side};
const SRC = "data:image/jpeg;base64,{b64}";
function tip() {{
  let t = P.getElementById("lavise-map-tip");
  if (!t) {{
    t = P.createElement("div"); t.id = "lavise-map-tip";
    t.style.cssText = "position:fixed;z-index:100000;pointer-events:none;display:none;width:" + SIDE + "px;height:"
      + SIDE + "px;border:2px solid #333;border-radius:4px;background-repeat:no-repeat;"
      + "box-shadow:0 2px 8px rgba(0,0,0,.35)";
    P.body.appendChild(t);
  }}
  t.style.backgroundImage = "url(" + SRC + ")";
  t.style.backgroundSize = (COLS * SIDE) + "px auto";
  return t;
}}
function hook() {{
  P.querySelectorAll(".js-plotly-plot").forEach(gd => {{
    if (gd.__laviseHover || !gd.on) return;
    gd.__laviseHover = true;
    gd.on("plotly_hover", ev => {{
      const pt = ev.points[0], cd = pt.customdata, i = Array.isArray(cd) ? cd[0] : cd, t = tip();
      t.style.backgroundPosition = "-" + ((i % COLS) * SIDE) + "px -" + (Math.floor(i / COLS) * SIDE) + "px";
      const e = ev.event || {{clientX: 0, clientY: 0}};
      t.style.left = (e.clientX + 18) + "px"; t.style.top = (e.clientY + 18) + "px"; t.style.display = "block";
    }});
    gd.on("plotly_unhover", () => {{ tip().style.display = "none"; }});
  }});
}}
hook(); setInterval(hook, 700);
</script>"""
