"""ConceptShapes: a built-in, general concept set of colours, textures and shapes, with every pixel labelled.

SynthBirds annotates bird parts only; a network trained on photographs has filters for colours, textures and
simple shapes (Network Dissection, Bau et al. 2017). This generator draws scenes of those concepts, offline and
seeded, in the same ground-truth format as SynthBirds (:mod:`lavise_core.data.dataset`), so every stage and
fidelity check runs on them unchanged.

**A scene** (``image_size``², default 224) is 1–3 *fields* that tile the whole canvas (one field, two split by a
line, or three Voronoi cells), each filled with a colour and one texture family, and 1–3 *shapes* on top at
several scales, drawn in a random order so that they occlude each other. Every shape in a scene has a distinct
kind and every field a distinct texture family, so each image pixel belongs to exactly one region:

- ``regions`` = the shape kinds (:data:`SHAPES`) then the texture families (:data:`TEXTURE_FAMILIES`); label
  map value ``r`` is ``regions[r - 1]``, and no pixel is 0;
- ``region_concepts`` of a field: its family ("zigzag"), the finer texture phrases ("thin stripes",
  "diagonal stripes"), its basic colour term ("blue") and, for a finer colour, that name too ("navy");
- ``region_concepts`` of a shape: its kind ("star"), its colour ("red", "maroon"), colour + kind ("red star")
  and, when the shape is filled with a texture, that texture's phrases ("striped").

A texture is drawn in its region's colour and a darker (or, for dark colours, lighter) shade of the same colour,
so the region's colour term is true of all its pixels. The class of an image is its *dominant shape*: the shape
kind with the most visible pixels (``classes`` = :data:`SHAPES`).

Every image ``i`` is drawn from ``numpy`` generators seeded by ``SeedSequence([seed, i, stream])``: images do
not depend on ``n`` or on the number of worker processes, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lavise_core.data.dataset import ImageRecord, ProbeDataset

__all__ = [
    "BASIC_COLOURS",
    "CONCEPT_KINDS",
    "DEFAULT_N",
    "FINE_COLOURS",
    "REGIONS",
    "SHAPES",
    "SOURCE",
    "TEXTURES",
    "TEXTURE_FAMILIES",
    "VERSION",
    "Fill",
    "Scene",
    "ShapePlacement",
    "concept_kinds",
    "generate_concept_shapes",
    "random_scene",
    "render_concept_image",
    "render_scene",
]

VERSION = "concept-shapes-1.0"
SOURCE = "concept_shapes"
DEFAULT_N = 3000

#: The 11 basic colour terms (Berlin & Kay) -> sRGB.
BASIC_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 27),
    "white": (240, 240, 236),
    "red": (210, 30, 30),
    "green": (40, 150, 50),
    "yellow": (245, 215, 35),
    "blue": (35, 75, 210),
    "brown": (120, 75, 35),
    "orange": (245, 130, 20),
    "pink": (245, 145, 190),
    "purple": (120, 45, 165),
    "grey": (128, 128, 128),
}
#: Finer colour names -> (sRGB, the basic term they fall under). A region so coloured carries both names.
FINE_COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "navy": ((20, 30, 110), "blue"),
    "maroon": ((120, 20, 35), "red"),
    "olive": ((110, 115, 30), "green"),
    "lime": ((150, 220, 40), "green"),
    "gold": ((215, 170, 30), "yellow"),
    "tan": ((205, 165, 115), "brown"),
    "lavender": ((180, 150, 225), "purple"),
}
_FINE_BY_BASIC: dict[str, list[str]] = {}
for _fine, (_rgb, _basic) in FINE_COLOURS.items():
    _FINE_BY_BASIC.setdefault(_basic, []).append(_fine)
_FINE_PROBABILITY = 0.3  # a region whose basic colour has finer names takes one of them this often

#: Shape kinds (also the classes: an image's class is its dominant shape).
SHAPES: tuple[str, ...] = (
    "circle",
    "triangle",
    "square",
    "star",
    "ring",
    "hexagon",
    "diamond",
    "cross",
    "heart",
    "crescent",
)

#: Texture families (region names of the fields; "plain" = no texture).
TEXTURE_FAMILIES: tuple[str, ...] = (
    "striped",
    "dotted",
    "checkered",
    "zigzag",
    "grid",
    "honeycomb",
    "wavy",
    "crosshatched",
    "marbled",
    "brick",
    "scaly",
    "plaid",
    "argyle",
    "concentric",
    "herringbone",
    "speckled",
    "blotchy",
    "woven",
    "chevron",
    "cracked",
    "swirly",
    "plain",
)

#: Textures: name -> (family, finer phrases). Stripes come at two widths and three angles, dots and checks at
#: two sizes; each other family is one texture.
TEXTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{
        f"{w} {o} stripes": ("striped", (f"{w} stripes", f"{o} stripes"))
        for w in ("thin", "wide")
        for o in ("horizontal", "vertical", "diagonal")
    },
    "small dots": ("dotted", ("small dots",)),
    "large dots": ("dotted", ("large dots",)),
    "small checks": ("checkered", ("small checks",)),
    "large checks": ("checkered", ("large checks",)),
    **{f: (f, ()) for f in TEXTURE_FAMILIES if f not in ("striped", "dotted", "checkered")},
}
_TEXTURES_BY_FAMILY: dict[str, list[str]] = {}
for _name, (_fam, _) in TEXTURES.items():
    _TEXTURES_BY_FAMILY.setdefault(_fam, []).append(_name)

#: Region names in label-map order (pixel value ``r`` means ``REGIONS[r - 1]``).
REGIONS: tuple[str, ...] = SHAPES + TEXTURE_FAMILIES

# Streams of the per-image random generators (SeedSequence([seed, i, stream])).
_S_SCENE, _S_SPLIT, _S_TEXTURE, _S_NOISE, _S_CAPTION = range(5)


# ----------------------------------------------------------------------------------------- concept kinds
def concept_kinds() -> dict[str, str]:
    """Every concept phrase this set can produce -> its kind: ``"colour"``, ``"texture"`` or ``"shape"``.

    Colour + shape phrases ("red circle") are of kind ``"shape"``.
    """
    out: dict[str, str] = {}
    for c in (*BASIC_COLOURS, *FINE_COLOURS):
        out[c] = "colour"
    for fam in TEXTURE_FAMILIES:
        out[fam] = "texture"
    for _, phrases in TEXTURES.values():
        for p in phrases:
            out[p] = "texture"
    for s in SHAPES:
        out[s] = "shape"
        for c in BASIC_COLOURS:
            out[f"{c} {s}"] = "shape"
    return out


CONCEPT_KINDS: dict[str, str] = concept_kinds()


# ----------------------------------------------------------------------------------------- scene spec
@dataclass(frozen=True)
class Fill:
    """How a region is painted: a colour name (basic or fine) and a texture name (``"plain"`` = none)."""

    colour: str
    texture: str = "plain"

    def __post_init__(self) -> None:
        if self.colour not in BASIC_COLOURS and self.colour not in FINE_COLOURS:
            known = sorted([*BASIC_COLOURS, *FINE_COLOURS])
            raise ValueError(f"unknown colour {self.colour!r}; known: {known}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; known: {sorted(TEXTURES)}")

    @property
    def basic(self) -> str:
        return self.colour if self.colour in BASIC_COLOURS else FINE_COLOURS[self.colour][1]

    @property
    def family(self) -> str:
        return TEXTURES[self.texture][0]

    def phrases(self) -> list[str]:
        """Colour and texture phrases of the fill ("blue", "navy", "striped", "thin stripes")."""
        out = [self.basic]
        if self.colour != self.basic:
            out.append(self.colour)
        if self.texture != "plain":
            out += [self.family, *TEXTURES[self.texture][1]]
        return out


@dataclass(frozen=True)
class ShapePlacement:
    """One shape: kind, centre ``(cx, cy)`` and size ``radius`` in pixels, rotation in degrees, fill."""

    kind: str
    cx: float
    cy: float
    radius: float
    fill: Fill
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SHAPES:
            raise ValueError(f"unknown shape {self.kind!r}; known: {list(SHAPES)}")
        if not self.radius > 0:
            raise ValueError(f"a shape's radius must be > 0 pixels, got {self.radius}")


@dataclass(frozen=True)
class Scene:
    """A scene: fields that tile the canvas, then shapes drawn on top in list order (later ones occlude).

    ``layout`` places the fields: ``("whole",)`` (one field), ``("split", x0, y0, angle_deg)`` (two: field 1
    where ``(p - (x0, y0)) · (cos a, sin a) > 0`` for pixel centres ``p``), or ``("voronoi", ((x, y), ...))``
    (one field per point, each pixel to the nearest point). Field textures must be of distinct families and
    shapes of distinct kinds, so each region name is one region.
    """

    fields: tuple[Fill, ...]
    shapes: tuple[ShapePlacement, ...] = ()
    layout: tuple = ("whole",)
    texture_scale: tuple[float, ...] = ()  # per field then per shape: multiplies the texture's period
    texture_angle: tuple[float, ...] = ()  # per field then per shape: degrees added to the texture's angle

    def __post_init__(self) -> None:
        fams = [f.family for f in self.fields]
        if not self.fields:
            raise ValueError("a scene needs at least one field")
        if len(set(fams)) != len(fams):
            raise ValueError(f"field texture families must be distinct in a scene, got {fams}")
        kinds = [s.kind for s in self.shapes]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"shape kinds must be distinct in a scene, got {kinds}")
        want = {"whole": 1, "split": 2}.get(self.layout[0]) if self.layout else None
        if self.layout and self.layout[0] == "voronoi":
            want = len(self.layout[1])
        if want is None:
            raise ValueError(
                f"unknown layout {self.layout!r}; use ('whole',), ('split', ...) or ('voronoi', ...)"
            )
        if want != len(self.fields):
            raise ValueError(
                f"layout {self.layout[0]!r} makes {want} field(s), but {len(self.fields)} were given"
            )


# ----------------------------------------------------------------------------------------- geometry
@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each ``(size, size)`` float32."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def _field_map(layout: tuple, size: int) -> np.ndarray:
    """``(size, size)`` int field index of each pixel."""
    x, y = _grid(size)
    if layout[0] == "whole":
        return np.zeros((size, size), np.int64)
    if layout[0] == "split":
        _, x0, y0, ang = layout
        a = math.radians(ang)
        return (((x - x0) * math.cos(a) + (y - y0) * math.sin(a)) > 0).astype(np.int64)
    pts = np.asarray(layout[1], np.float32)
    d = (x[None] - pts[:, 0, None, None]) ** 2 + (y[None] - pts[:, 1, None, None]) ** 2
    return d.argmin(0)


def _shape_mask(s: ShapePlacement, size: int) -> np.ndarray:
    """``(size, size)`` bool: pixel centres inside shape ``s`` (exact, vectorised)."""
    x, y = _grid(size)
    a = math.radians(s.rotation)
    dx, dy = x - s.cx, y - s.cy
    u = dx * math.cos(a) + dy * math.sin(a)  # shape frame: u right, v down
    v = -dx * math.sin(a) + dy * math.cos(a)
    r = s.radius
    k = s.kind
    if k == "circle":
        return u * u + v * v < r * r
    if k == "ring":
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 >= (0.55 * r) ** 2)
    if k in ("triangle", "square", "hexagon"):
        n = {"triangle": 3, "square": 4, "hexagon": 6}[k]
        start = math.pi / 2  # an edge at the bottom (y down): triangle apex up, square axis-aligned
        inside = np.ones(u.shape, bool)
        for j in range(n):
            t = start + j * 2 * math.pi / n
            inside &= u * math.cos(t) + v * math.sin(t) < r * math.cos(math.pi / n)
        return inside
    if k == "diamond":
        return np.abs(u) / (0.62 * r) + np.abs(v) / r < 1.0
    if k == "cross":
        w = 0.32 * r
        return ((np.abs(u) < w) & (np.abs(v) < r)) | ((np.abs(v) < w) & (np.abs(u) < r))
    if k == "star":  # five points, inner radius 0.45 r, one point up
        n, rho = 5, 0.45 * r
        sector = 2 * math.pi / n
        theta = np.arctan2(v, u) + math.pi / 2
        alpha = np.mod(theta, sector)
        beta = np.minimum(alpha, sector - alpha)
        d = np.sqrt(u * u + v * v)
        px, py = d * np.cos(beta), d * np.sin(beta)
        ox, oy = r, 0.0
        ix, iy = rho * math.cos(sector / 2), rho * math.sin(sector / 2)
        return (ix - ox) * (py - oy) - (iy - oy) * (px - ox) < 0
    if k == "heart":  # (X² + Y² - 1)³ - X² Y³ < 0, Y up
        xx, yy = u / (0.85 * r), -(v / (0.85 * r)) + 0.1
        q = xx * xx + yy * yy - 1
        return q * q * q - xx * xx * yy * yy * yy < 0
    if k == "crescent":
        bite = (u - 0.45 * r) ** 2 + (v + 0.1 * r) ** 2 < (0.8 * r) ** 2
        return (u * u + v * v < r * r) & ~bite
    raise ValueError(f"unknown shape {k!r}")


# ----------------------------------------------------------------------------------------- textures
def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1], ``(size, size)`` float32 (bicubic upsampling of a coarse grid)."""
    from PIL import Image

    g = rng.random((max(2, cells), max(2, cells))).astype(np.float32)
    im = Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(im), 0.0, 1.0)


def _voronoi_edges(px: np.ndarray, py: np.ndarray, x: np.ndarray, y: np.ndarray, width: float) -> np.ndarray:
    """Pixels within ``width`` of a Voronoi edge of the points ``(px, py)``: where the distances to the nearest
    and the second-nearest point differ by less than ``width``."""
    d1 = np.full(x.shape, np.inf, np.float32)
    d2 = np.full(x.shape, np.inf, np.float32)
    for a, b in zip(px.tolist(), py.tolist(), strict=True):
        d = np.sqrt((x - a) ** 2 + (y - b) ** 2)
        np.minimum(d2, np.maximum(d1, d), out=d2)
        np.minimum(d1, d, out=d1)
    return (d2 - d1) < width


def _hex_edges(u: np.ndarray, v: np.ndarray, a: float, width: float) -> np.ndarray:
    """Edges of a honeycomb of cells with circumradius ``a`` in the frame ``(u, v)``: the hexagonal lattice is
    two rectangular lattices (``sqrt(3) a`` by ``3 a``, the second shifted by half), so the nearest and
    second-nearest centres are among the 4 corners of each lattice's cell around the pixel."""
    w, h = math.sqrt(3) * a, 3 * a
    d1 = np.full(u.shape, np.inf, np.float32)
    d2 = np.full(u.shape, np.inf, np.float32)
    for ou, ov in ((0.0, 0.0), (w / 2, h / 2)):
        i0 = np.floor((u - ou) / w)
        j0 = np.floor((v - ov) / h)
        for di in (0.0, 1.0):
            for dj in (0.0, 1.0):
                d = np.sqrt((u - ou - (i0 + di) * w) ** 2 + (v - ov - (j0 + dj) * h) ** 2)
                np.minimum(d2, np.maximum(d1, d), out=d2)
                np.minimum(d1, d, out=d1)
    return (d2 - d1) < width


def _texture_ink(
    texture: str,
    size: int,
    rng: np.random.Generator,
    scale: float = 1.0,
    turn: float = 0.0,
    window: tuple[slice, slice] = (slice(None), slice(None)),
) -> np.ndarray:
    """Float32 in [0, 1] over ``window`` of a ``size``² canvas: 1 = the region's colour, 0 = its shade.

    ``scale`` multiplies the texture's period, ``turn`` (degrees) is added to its angle.
    """
    x, y = _grid(size)
    x, y = x[window], y[window]
    family = TEXTURES[texture][0]
    if family == "plain":
        return np.ones(x.shape, np.float32)
    s = size / 224.0 * scale  # periods below are for a 224-px image
    if family == "striped":
        width, orient = texture.split()[:2]
        period = (rng.uniform(6, 9) if width == "thin" else rng.uniform(16, 26)) * s
        base = {"horizontal": 90.0, "vertical": 0.0, "diagonal": float(rng.choice([45.0, 135.0]))}[orient]
        ang = math.radians(base + rng.uniform(-6, 6))  # stripes' own angle: not turned
    else:
        ang = math.radians(rng.uniform(0, 180) + turn)
    c, sn = math.cos(ang), math.sin(ang)
    u = x * c + y * sn
    v = -x * sn + y * c
    ph = float(rng.random())
    if family == "striped":
        return (((u / period + ph) % 1.0) < 0.5).astype(np.float32)
    if family == "dotted":
        p = (rng.uniform(9, 13) if texture == "small dots" else rng.uniform(22, 30)) * s
        row = np.floor(v / p + ph)
        fu = (u / p + 0.5 * (row % 2) + ph) % 1.0 - 0.5
        fv = (v / p + ph) % 1.0 - 0.5
        return (fu * fu + fv * fv >= 0.3**2).astype(np.float32)
    if family == "checkered":
        p = (rng.uniform(8, 12) if texture == "small checks" else rng.uniform(22, 32)) * s
        return ((np.floor(u / p + ph) + np.floor(v / p + ph)) % 2).astype(np.float32)
    if family == "zigzag":
        p, lam = rng.uniform(12, 18) * s, rng.uniform(14, 22) * s
        tri = 2 * np.abs((u / lam + ph) % 1.0 - 0.5)
        return ((((v + 0.8 * lam * tri) / p) % 1.0) >= 0.3).astype(np.float32)
    if family == "grid":
        p = rng.uniform(12, 22) * s
        return ~(((u / p + ph) % 1.0 < 0.18) | ((v / p + ph) % 1.0 < 0.18)) * np.float32(1)
    if family == "honeycomb":
        a = rng.uniform(9, 14) * s  # circumradius of a cell
        return (~_hex_edges(u + ph * 97.0, v + ph * 61.0, a, 0.22 * a)).astype(np.float32)
    if family == "wavy":
        p, lam = rng.uniform(10, 16) * s, rng.uniform(30, 50) * s
        return ((((v + 0.3 * lam * np.sin(2 * np.pi * u / lam)) / p + ph) % 1.0) < 0.5).astype(np.float32)
    if family == "crosshatched":
        p = rng.uniform(8, 13) * s
        a1, a2 = ((u + v) / p + ph) % 1.0, ((u - v) / p + ph) % 1.0
        return ~((a1 < 0.22) | (a2 < 0.22)) * np.float32(1)
    if family == "marbled":
        n = _noise(rng, size, int(rng.integers(4, 7)))[window]
        vein = np.abs(np.sin(u / (rng.uniform(18, 30) * s) + 9.0 * n))
        return (vein**0.35).astype(np.float32)
    if family == "brick":
        p = rng.uniform(11, 17) * s
        row = np.floor(v / p + ph)
        mortar = ((v / p + ph) % 1.0 < 0.16) | (((u / (2.2 * p) + 0.5 * (row % 2)) % 1.0) < 0.07)
        return (~mortar).astype(np.float32)
    if family == "scaly":
        p = rng.uniform(14, 22) * s
        row = np.floor(v / (0.5 * p) + ph)
        fu = (u / p + 0.5 * (row % 2)) % 1.0 - 0.5
        fv = (v / (0.5 * p) + ph) % 1.0
        d = np.sqrt(fu * fu + (fv * 0.5) ** 2)
        return (np.abs(d - 0.45) >= 0.06).astype(np.float32)
    if family == "plaid":
        p = rng.uniform(24, 36) * s
        bu = ((u / p + ph) % 1.0 < 0.3).astype(np.float32) + 0.5 * ((u / p + ph + 0.55) % 1.0 < 0.08)
        bv = ((v / p + ph) % 1.0 < 0.3).astype(np.float32) + 0.5 * ((v / p + ph + 0.55) % 1.0 < 0.08)
        return np.clip(1.0 - 0.45 * bu - 0.45 * bv, 0, 1).astype(np.float32)
    if family == "argyle":
        p = rng.uniform(14, 22) * s
        a1, a2 = u / p + v / (1.6 * p) + ph, u / p - v / (1.6 * p) + ph
        return ((np.floor(a1) + np.floor(a2)) % 2).astype(np.float32)
    if family == "concentric":
        p = rng.uniform(10, 18) * s
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        return ((np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / p + ph) % 1.0 < 0.5).astype(np.float32)
    if family == "herringbone":
        p, band = rng.uniform(7, 10) * s, rng.uniform(18, 26) * s
        sign = np.where(np.floor(u / band + ph) % 2 == 0, 1.0, -1.0).astype(np.float32)
        return ((((v + sign * u) / p) % 1.0) < 0.5).astype(np.float32)
    if family == "speckled":
        cell = max(1, round(rng.uniform(2, 4) * s))
        m = -(-size // cell)
        dots = rng.random((m, m)) < 0.22
        return (~dots.repeat(cell, 0).repeat(cell, 1)[:size, :size][window]).astype(np.float32)
    if family == "blotchy":
        n = _noise(rng, size, int(rng.integers(7, 12)))[window]
        return (n < 0.58).astype(np.float32)
    if family == "woven":
        p = rng.uniform(14, 22) * s
        par = (np.floor(u / p + ph) + np.floor(v / p + ph)) % 2
        across = np.where(par == 0, v, u)
        return (((across / (p / 3) + ph) % 1.0) < 0.55).astype(np.float32)
    if family == "chevron":
        p, lam = rng.uniform(16, 24) * s, rng.uniform(26, 40) * s
        tri = np.abs((u / lam + ph) % 1.0 - 0.5) * lam
        return ((((v + tri) / p) % 1.0) < 0.5).astype(np.float32)
    if family == "cracked":
        k = int(rng.integers(18, 30))
        px, py = rng.uniform(-0.1, 1.1, size=(2, k)).astype(np.float32) * size
        return (~_voronoi_edges(px, py, x, y, 2.2 * s)).astype(np.float32)
    if family == "swirly":
        p = rng.uniform(14, 22) * s
        cx, cy = rng.uniform(0.25, 0.75, size=2) * size
        theta = np.arctan2(y - cy, x - cx)
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return (((3 * theta / (2 * np.pi) + r / p + ph) % 1.0) < 0.5).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _rgb(colour: str) -> np.ndarray:
    rgb = BASIC_COLOURS[colour] if colour in BASIC_COLOURS else FINE_COLOURS[colour][0]
    return np.asarray(rgb, np.float32)


def _shade(rgb: np.ndarray) -> np.ndarray:
    """The second tone of a texture: darker for light colours, lighter for dark ones (same hue)."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.55 if lum >= 80 else rgb + (255.0 - rgb) * 0.4


# ----------------------------------------------------------------------------------------- rendering
@dataclass
class _Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, r = REGIONS[r - 1]; never 0
    region_concepts: dict[str, list[str]] = field(default_factory=dict)
    visible: dict[str, int] = field(default_factory=dict)  # region name -> visible pixels


def render_scene(
    scene: Scene, size: int, rng: np.random.Generator | None = None, jitter: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]]]:
    """Draw ``scene`` on a ``size``² canvas: ``(image (H, W, 3) uint8, label map (H, W) uint8, region_concepts)``.

    Label map value ``r`` is :data:`REGIONS` ``[r - 1]``; every pixel carries a region. ``region_concepts``
    lists each region with at least one visible pixel. ``rng`` draws texture phases and sizes (seeded 0 when
    ``None``); ``jitter`` adds per-region colour jitter, lighting and sensor noise.
    """
    r = _render(scene, size, rng if rng is not None else np.random.default_rng(0), jitter)
    return r.image, r.mask, r.region_concepts


def _render(scene: Scene, size: int, rng: np.random.Generator, jitter: bool) -> _Rendered:
    if size < 4:
        raise ValueError(f"image size must be >= 4 pixels, got {size}")
    fmap = _field_map(scene.layout, size)
    n_fields = len(scene.fields)
    n_regions = n_fields + len(scene.shapes)
    scales = list(scene.texture_scale) or [1.0] * n_regions
    turns = list(scene.texture_angle) or [0.0] * n_regions
    fills = [*scene.fields, *(s.fill for s in scene.shapes)]
    names = [*(f.family for f in scene.fields), *(s.kind for s in scene.shapes)]
    slot = fmap.astype(np.uint8)  # which of the scene's regions each pixel shows (fields, then shapes)
    for k, s in enumerate(scene.shapes):
        slot[_shape_mask(s, size)] = n_fields + k
    phrases: dict[str, list[str]] = {}
    for f in scene.fields:
        phrases[f.family] = _unique([f.family, *f.phrases()])
    for s in scene.shapes:
        phrases[s.kind] = _unique([s.kind, s.fill.basic, f"{s.fill.basic} {s.kind}", *s.fill.phrases()])
    ink = np.ones((size, size), np.float32)
    rgb = np.zeros((n_regions, 3), np.float32)
    for k, fill in enumerate(fills):
        rgb[k] = _rgb(fill.colour)
        if jitter:
            rgb[k] = np.clip(rgb[k] + rng.uniform(-12, 12, size=3).astype(np.float32), 0, 255)
        if fill.texture == "plain":
            continue
        where = slot == k
        rows, cols = np.flatnonzero(where.any(1)), np.flatnonzero(where.any(0))
        if len(rows) == 0:
            continue
        win = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        tex = _texture_ink(fill.texture, size, rng, scales[k], turns[k], win)
        np.copyto(ink[win], tex, where=where[win])
    shade = np.stack([_shade(c) for c in rgb])
    ink3 = ink[..., None]
    canvas = ink3 * rgb[slot] + (1.0 - ink3) * shade[slot]
    lut = np.array([REGIONS.index(n) + 1 for n in names], np.uint8)
    label = lut[slot]
    if jitter:
        canvas *= np.float32(rng.uniform(0.9, 1.1))
        canvas += rng.standard_normal(size=canvas.shape, dtype=np.float32) * np.float32(rng.uniform(0, 4))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    counts = np.bincount(label.ravel(), minlength=len(REGIONS) + 1)
    visible = {name: int(counts[j + 1]) for j, name in enumerate(REGIONS) if counts[j + 1] > 0}
    # regions in REGIONS order (shapes first), only those with visible pixels
    region_concepts = {name: phrases[name] for name in REGIONS if name in visible}
    return _Rendered(image, label, region_concepts, visible)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------------------------- random scenes
def _rng(seed: int, i: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i, stream])))


def _pick_colour(rng: np.random.Generator, basic: str) -> str:
    fine = _FINE_BY_BASIC.get(basic, [])
    if fine and rng.random() < _FINE_PROBABILITY:
        return str(fine[int(rng.integers(len(fine)))])
    return basic


def random_scene(rng: np.random.Generator, size: int, main_shape: str) -> Scene:
    """A random scene whose largest shape is ``main_shape``: 1–3 fields, 1–3 shapes of distinct kinds, distinct
    basic colours for all regions, several scales, random drawing order (occlusion)."""
    n_fields = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    n_shapes = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    basics = [str(c) for c in rng.permutation(list(BASIC_COLOURS))[: n_fields + n_shapes]]
    colours = [_pick_colour(rng, b) for b in basics]
    families = [str(f) for f in rng.permutation(list(TEXTURE_FAMILIES))[:n_fields]]
    fields = []
    for f, col in zip(families, colours[:n_fields], strict=True):
        options = _TEXTURES_BY_FAMILY[f]
        fields.append(Fill(col, str(options[int(rng.integers(len(options)))])))
    if n_fields == 1:
        layout: tuple = ("whole",)
    elif n_fields == 2:
        x0, y0 = rng.uniform(0.3, 0.7, size=2) * size
        layout = ("split", float(x0), float(y0), float(rng.uniform(0, 360)))
    else:
        pts = rng.uniform(0.1, 0.9, size=(3, 2)) * size
        layout = ("voronoi", tuple((float(a), float(b)) for a, b in pts))
    others = [s for s in SHAPES if s != main_shape]
    kinds = [main_shape, *[str(s) for s in rng.permutation(others)[: n_shapes - 1]]]
    shapes = []
    for j, (kind, col) in enumerate(zip(kinds, colours[n_fields:], strict=True)):
        if j == 0:
            radius, lo, hi = rng.uniform(0.24, 0.38) * size, 0.3, 0.7
        else:
            radius, lo, hi = rng.uniform(0.08, 0.19) * size, 0.08, 0.92
        cx, cy = rng.uniform(lo, hi, size=2) * size
        textured = rng.random() >= 0.65
        texture = str(rng.choice([t for t in TEXTURES if t != "plain"])) if textured else "plain"
        rot = 0.0 if kind in ("circle", "ring") else float(rng.uniform(-25, 25))
        shapes.append(ShapePlacement(kind, float(cx), float(cy), float(radius), Fill(col, texture), rot))
    order = rng.permutation(len(shapes))
    n_regions = n_fields + n_shapes
    return Scene(
        fields=tuple(fields),
        shapes=tuple(shapes[int(k)] for k in order),
        layout=layout,
        texture_scale=tuple(float(v) for v in rng.choice([0.6, 1.0, 1.6], size=n_regions)),
        texture_angle=tuple(float(v) for v in rng.uniform(0, 180, size=n_regions)),
    )


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _captions(rng: np.random.Generator, scene: Scene, visible: dict[str, int], n: int = 3) -> list[str]:
    shapes = [s for s in scene.shapes if s.kind in visible]
    shapes.sort(key=lambda s: -visible[s.kind])
    fields = [f for f in scene.fields if f.family in visible]
    out = []
    for _ in range(n):
        things = []
        for s in shapes:
            colour = s.fill.colour if rng.random() < 0.5 else s.fill.basic
            words = [colour]
            if s.fill.texture != "plain" and rng.random() < 0.7:
                words.append(s.fill.family)
            things.append(_article(" ".join([*words, s.kind])))
        grounds = []
        for f in fields:
            colour = f.colour if rng.random() < 0.5 else f.basic
            tex = "" if f.texture == "plain" else str(rng.choice([f.family, *TEXTURES[f.texture][1]]))
            grounds.append(" ".join(w for w in (colour, tex) if w))
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        ground = " and ".join(grounds)
        template = ("{t} on a {g} background.", "a picture of {t} over {g}.", "{t}; behind it {g}.")
        out.append(template[int(rng.integers(len(template)))].format(t=listed, g=ground))
    return out


def render_concept_image(
    i: int, *, seed: int = 0, image_size: int = 224, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, ImageRecord]:
    """Draw image ``i`` of a ConceptShapes set: ``(image (H, W, 3) uint8, label map (H, W) uint8, record)``.

    Class ``i % len(SHAPES)`` is drawn as the largest shape; the record's label is the dominant shape actually
    visible (the same, unless occlusion hid most of it). Paths: ``images/{id}.png``, ``masks/{id}.png``.
    """
    rs = _rng(seed, i, _S_SCENE)
    scene = random_scene(rs, image_size, SHAPES[i % len(SHAPES)])
    r = _render(scene, image_size, _rng(seed, i, _S_TEXTURE), jitter=True)
    split = "test" if _rng(seed, i, _S_SPLIT).random() < test_fraction else "train"
    shape_px = {s.kind: r.visible.get(s.kind, 0) for s in scene.shapes}
    dominant = max(SHAPES, key=lambda k: (shape_px.get(k, 0), k == SHAPES[i % len(SHAPES)]))
    keypoints: dict[str, list[float]] = {}
    bbox = None
    for s in scene.shapes:
        ys, xs = np.nonzero(r.mask == REGIONS.index(s.kind) + 1)
        if len(xs):
            keypoints[s.kind] = [round(float(xs.mean()) + 0.5, 2), round(float(ys.mean()) + 0.5, 2)]
            if s.kind == dominant:
                bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    rid = f"{i:06d}"
    meta = {
        "dominant_shape": dominant,
        "layout": scene.layout[0],
        "fields": [{"family": f.family, "texture": f.texture, "colour": f.colour} for f in scene.fields],
        "shapes": [
            {
                "kind": s.kind,
                "colour": s.fill.colour,
                "texture": s.fill.texture,
                "centre": [round(s.cx, 2), round(s.cy, 2)],
                "radius": round(s.radius, 2),
                "rotation": round(s.rotation, 2),
                "visible_pixels": shape_px[s.kind],
            }
            for s in scene.shapes
        ],
        "occluded_shapes": [s.kind for s in scene.shapes if shape_px[s.kind] < 0.35 * _area(s, image_size)],
    }
    record = ImageRecord(
        id=rid,
        path=f"images/{rid}.png",
        split=split,
        label=SHAPES.index(dominant),
        attributes=_unique([p for ps in r.region_concepts.values() for p in ps]),
        captions=_captions(_rng(seed, i, _S_CAPTION), scene, r.visible),
        mask=f"masks/{rid}.png",
        region_concepts=r.region_concepts,
        keypoints=keypoints,
        bbox=bbox,
        meta=meta,
    )
    return r.image, r.mask, record


def _area(s: ShapePlacement, size: int) -> int:
    """Pixels the shape would cover on an empty canvas of ``size`` (inside the image)."""
    return int(_shape_mask(s, size).sum())


# ----------------------------------------------------------------------------------------- the data set
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def _render_chunk(job: tuple[str, list[int], dict]) -> list[dict]:
    out, indices, kw = job
    root = Path(out)
    recs = []
    for i in indices:
        image, mask, rec = render_concept_image(i, **kw)
        (root / rec.path).write_bytes(_png(image))
        (root / rec.mask).write_bytes(_png(mask))
        recs.append(rec.to_json())
    return recs


def dataset_meta(*, seed: int, n: int, image_size: int, test_fraction: float) -> dict:
    """The ``dataset.json`` ``meta`` block: settings, vocabularies, concept kinds, version."""
    return {
        "version": VERSION,
        "generator": {"seed": seed, "n": n, "image_size": image_size, "test_fraction": test_fraction},
        "vocabularies": {
            "basic_colours": {k: list(v) for k, v in BASIC_COLOURS.items()},
            "fine_colours": {k: {"rgb": list(v[0]), "basic": v[1]} for k, v in FINE_COLOURS.items()},
            "textures": {k: {"family": v[0], "phrases": list(v[1])} for k, v in TEXTURES.items()},
            "texture_families": list(TEXTURE_FAMILIES),
            "shapes": list(SHAPES),
        },
        "concept_kinds": dict(CONCEPT_KINDS),
        "notes": (
            "every pixel belongs to one region: a shape (regions 1-10) or a textured field (the rest); a texture "
            "is drawn in its region's colour and a shade of it; the class is the shape with the most visible "
            "pixels"
        ),
    }


def generate_concept_shapes(
    out: str | Path,
    n: int = DEFAULT_N,
    seed: int = 0,
    image_size: int = 224,
    *,
    test_fraction: float = 0.2,
    workers: int = 1,
    progress: bool = True,
) -> ProbeDataset:
    """Generate a ConceptShapes concept set in ``out`` and return it opened.

    Images ``images/{id}.png`` (RGB, ``image_size``²), label maps ``masks/{id}.png`` (values index
    :data:`REGIONS` from 1; no pixel is 0), then ``manifest.jsonl`` and ``dataset.json``, written last and
    atomically. ``workers > 1`` renders in that many processes (same bytes as one).
    """
    from tqdm import tqdm

    from lavise_core.data.dataset import prepare_generated_dir, write_dataset

    out = Path(out)
    for name, value, lo in (("n", n, 1), ("image_size", image_size, 32), ("workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    prepare_generated_dir(out, SOURCE, "ConceptShapes", empty_only=True)
    kw = {"seed": seed, "image_size": image_size, "test_fraction": test_fraction}
    chunk = 25
    jobs = [(str(out), list(range(a, min(a + chunk, n))), kw) for a in range(0, n, chunk)]
    bar = tqdm(total=n, desc="concept shapes", unit="img", disable=not progress)
    rows: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for part in pool.imap(_render_chunk, jobs):
                rows += part
                bar.update(len(part))
    else:
        for job in jobs:
            part = _render_chunk(job)
            rows += part
            bar.update(len(part))
    bar.close()
    records = [ImageRecord.from_json(r) for r in rows]
    write_dataset(
        out,
        name="ConceptShapes",
        source=SOURCE,
        classes=list(SHAPES),
        records=records,
        regions=list(REGIONS),
        meta=dataset_meta(seed=seed, n=n, image_size=image_size, test_fraction=test_fraction),
    )
    return ProbeDataset.open(out)
