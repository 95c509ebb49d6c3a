"""SynthBirds: a deterministic, fine-grained synthetic probe data set with full ground truth.

Each image shows one cartoon bird drawn from nine named parts (:data:`REGIONS`), every part carrying
attributes from fixed vocabularies (colour, pattern, shape). Twelve fictional species are defined by
three part attributes each (:data:`SPECIES`). Every other attribute varies at random around the
species' typical plumage (:data:`TYPICAL`: each non-defining slot is re-drawn uniformly with
probability :data:`VARIATION`), and a draw that would also satisfy another species' definition is
rejected, so the species is a function of the attributes. Five species pairs differ in exactly one
part attribute, in their definitions and their typical plumage (``meta["one_part_pairs"]``).

Nuisances: seven textured backgrounds, position, scale, rotation, flips, wing pose, perches,
lighting, blur, sensor noise and partial occlusion. Ground truth per image: species, the attribute
phrases of the visible parts, a region label map (visible pixels only), part keypoints, the bird's
box, and five captions that mention a random subset of the attributes through a synonym table.

A switchable spurious correlation (``spurious=True``) puts :data:`SPURIOUS_SPECIES` over the
:data:`SPURIOUS_BACKGROUND` background in ``spurious_strength`` of its *train* images; every other
per-image draw (bird, pose, split, captions) comes from its own random stream and is unchanged.

Every image ``i`` is drawn from ``numpy`` generators seeded by ``SeedSequence([seed, i, stream])``,
so images do not depend on ``n`` or on the number of worker processes, and PNGs are written with
fixed settings: the same arguments give byte-identical files.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lavise_core.data.dataset import ImageRecord, ProbeDataset

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEFAULT_N",
    "NAME_ATTRIBUTES",
    "REGIONS",
    "SLOTS",
    "SPECIES",
    "SPURIOUS_BACKGROUND",
    "SPURIOUS_SPECIES",
    "SYNONYMS",
    "TYPICAL",
    "VARIATION",
    "VERSION",
    "generate_synthbirds",
    "one_part_pairs",
    "parse_caption",
    "render_synthbird",
]

VERSION = "synthbirds-1.0"
DEFAULT_N = 4800
SUPERSAMPLE = 2

#: Region names in label-map order (pixel value ``r`` means ``REGIONS[r - 1]``).
REGIONS: tuple[str, ...] = ("crown", "eye", "beak", "breast", "belly", "wing", "tail", "leg", "throat")

#: Colour vocabulary: name -> sRGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35),
    "orange": (240, 130, 25),
    "yellow": (245, 215, 40),
    "green": (45, 150, 55),
    "teal": (25, 150, 150),
    "blue": (40, 80, 205),
    "purple": (125, 50, 165),
    "pink": (245, 140, 185),
    "brown": (125, 78, 38),
    "black": (28, 28, 30),
    "white": (242, 242, 236),
    "grey": (135, 135, 135),
}
PATTERNS = ("solid", "striped", "spotted")
BEAK_SHAPES = ("short", "long", "hooked", "curved")
TAIL_SHAPES = ("forked", "rounded", "pointed", "square")
EYE_COLOURS = ("black", "brown", "red", "yellow", "white")
BEAK_COLOURS = ("black", "grey", "yellow", "orange", "pink")
LEG_COLOURS = ("black", "grey", "pink", "orange", "yellow", "brown")
ALL_COLOURS = tuple(COLOURS)

#: Attribute slots ``part.kind`` -> vocabulary; the phrase of a slot value is ``f"{value} {part}"``.
SLOTS: dict[str, tuple[str, ...]] = {
    "crown.colour": ALL_COLOURS,
    "eye.colour": EYE_COLOURS,
    "beak.shape": BEAK_SHAPES,
    "beak.colour": BEAK_COLOURS,
    "breast.colour": ALL_COLOURS,
    "breast.pattern": PATTERNS,
    "belly.colour": ALL_COLOURS,
    "wing.colour": ALL_COLOURS,
    "wing.pattern": PATTERNS,
    "tail.shape": TAIL_SHAPES,
    "tail.colour": ALL_COLOURS,
    "leg.colour": LEG_COLOURS,
    "throat.colour": ALL_COLOURS,
}

#: Species name -> defining slot values (three each). Label ``k`` is ``list(SPECIES)[k]``.
SPECIES: dict[str, dict[str, str]] = {
    "scarlet-capped warbler": {"crown.colour": "red", "wing.pattern": "striped", "tail.shape": "forked"},
    "azure-capped warbler": {"crown.colour": "blue", "wing.pattern": "striped", "tail.shape": "forked"},
    "white-bellied shrike": {"belly.colour": "white", "wing.colour": "black", "beak.shape": "hooked"},
    "yellow-bellied shrike": {"belly.colour": "yellow", "wing.colour": "black", "beak.shape": "hooked"},
    "rufous-tailed flycatcher": {"tail.colour": "orange", "breast.colour": "yellow", "crown.colour": "black"},
    "blue-tailed flycatcher": {"tail.colour": "blue", "breast.colour": "yellow", "crown.colour": "black"},
    "spotted-wing thrush": {"wing.pattern": "spotted", "breast.colour": "orange", "beak.shape": "short"},
    "plain-wing thrush": {"wing.pattern": "solid", "breast.colour": "orange", "beak.shape": "short"},
    "crimson-breasted robin": {"breast.colour": "red", "wing.colour": "brown", "tail.shape": "square"},
    "violet-breasted robin": {"breast.colour": "purple", "wing.colour": "brown", "tail.shape": "square"},
    "emerald sunbird": {"wing.colour": "green", "beak.shape": "curved", "belly.colour": "white"},
    "speckled pipit": {"breast.pattern": "spotted", "tail.shape": "pointed", "crown.colour": "grey"},
}

#: the attribute each species is named after, its first defining slot: "scarlet-capped warbler" -> "red crown"
NAME_ATTRIBUTES: dict[str, str] = {
    name: f"{value} {slot.split('.')[0]}"
    for name, slots in SPECIES.items()
    for slot, value in list(slots.items())[:1]
}


def _plumage(values: str) -> dict[str, str]:
    return dict(zip(SLOTS, values.split(), strict=True))


# Slot order: crown eye beak.shape beak.colour breast breast.pattern belly wing wing.pattern tail.shape
# tail.colour leg throat. Species of a one-part pair share their typical plumage.
_TYPICAL = {
    "warbler": _plumage("grey black short black yellow solid white grey striped forked grey pink yellow"),
    "shrike": _plumage("grey black hooked black white solid white black solid square black black white"),
    "flycatcher": _plumage(
        "black brown short black yellow solid yellow brown striped forked brown grey white"
    ),
    "thrush": _plumage("brown black short yellow orange solid white brown solid rounded brown pink white"),
    "robin": _plumage("grey black short black red solid white brown solid square brown black white"),
    "sunbird": _plumage("blue black curved black teal solid white green solid pointed green grey purple"),
    "pipit": _plumage("grey brown short pink white spotted white brown striped pointed brown pink white"),
}

#: Species name -> its typical plumage (every slot). Each non-defining slot keeps its typical value
#: with probability ``1 - VARIATION`` and is drawn uniformly from its vocabulary otherwise.
TYPICAL: dict[str, dict[str, str]] = {
    name: {**_TYPICAL[name.split()[-1]], **d} for name, d in SPECIES.items()
}
VARIATION = 0.3


#: The species of the spurious correlation and the background it is put on.
SPURIOUS_SPECIES = "azure-capped warbler"
SPURIOUS_BACKGROUND = "water"

BACKGROUNDS = ("sky", "water", "forest", "sand", "grass", "snow", "dusk")
OCCLUDERS = ("branch", "leaves", "rock")

#: Caption synonyms: canonical word -> surface forms (first = canonical). Parts: singular forms first.
SYNONYMS: dict[str, dict[str, list[str]]] = {
    "colour": {
        "red": ["red", "crimson", "scarlet"],
        "orange": ["orange", "tangerine"],
        "yellow": ["yellow", "golden"],
        "green": ["green", "emerald"],
        "teal": ["teal", "turquoise"],
        "blue": ["blue", "azure"],
        "purple": ["purple", "violet"],
        "pink": ["pink", "rosy"],
        "brown": ["brown", "chestnut"],
        "black": ["black", "ebony"],
        "white": ["white", "snowy"],
        "grey": ["grey", "gray"],
    },
    "pattern": {
        "solid": ["solid", "plain", "unmarked"],
        "striped": ["striped", "streaked"],
        "spotted": ["spotted", "speckled"],
    },
    "shape": {
        "short": ["short", "stubby"],
        "long": ["long", "slender"],
        "hooked": ["hooked"],
        "curved": ["curved", "decurved"],
        "forked": ["forked", "split"],
        "rounded": ["rounded", "round"],
        "pointed": ["pointed", "pointy"],
        "square": ["square", "squared"],
    },
    "part": {
        "crown": ["crown", "head", "cap"],
        "eye": ["eye", "eyes"],
        "beak": ["beak", "bill"],
        "breast": ["breast", "chest"],
        "belly": ["belly", "stomach", "abdomen"],
        "wing": ["wing", "wings"],
        "tail": ["tail"],
        "leg": ["leg", "legs", "feet"],
        "throat": ["throat", "neck"],
    },
}
_PLURAL_PARTS = {"eyes", "wings", "legs", "feet"}
_PART_FORMS = {  # surface forms usable in captions (plural where the bird has two)
    "crown": ["crown", "head", "cap"],
    "eye": ["eyes"],
    "beak": ["beak", "bill"],
    "breast": ["breast", "chest"],
    "belly": ["belly", "stomach", "abdomen"],
    "wing": ["wings", "wing"],
    "tail": ["tail"],
    "leg": ["legs", "feet"],
    "throat": ["throat", "neck"],
}
# How often captioners mention a part (salient parts more often), like CUB's text.
_MENTION_WEIGHT = {
    "crown": 3.0,
    "eye": 0.8,
    "beak": 2.0,
    "breast": 3.0,
    "belly": 2.0,
    "wing": 3.0,
    "tail": 2.0,
    "leg": 0.7,
    "throat": 1.2,
}
_TEMPLATES = (
    "this bird has {list}.",
    "a small bird with {list}.",
    "this is a {size} bird with {list}.",
    "the bird has {list} and its {pred}.",
    "{list}.",
    "a {size} bird that has {list}.",
    "this bird's {pred}, and it has {list}.",
    "this {size} bird has {list}.",
)
_SIZES = ("small", "tiny", "medium sized", "plump", "little")

# Occlusion: a part whose visible area falls below this fraction of its unoccluded area is hidden.
_VISIBLE_FRACTION = 0.35

# Streams of the per-image random generators (SeedSequence([seed, i, stream])).
_S_BIRD, _S_POSE, _S_SPLIT, _S_BGCHOICE, _S_BGTEXTURE, _S_CAPTION = range(6)


# ----------------------------------------------------------------------------- species logic
def one_part_pairs() -> list[tuple[str, str, str]]:
    """Species pairs whose definitions differ in exactly one slot: ``(species_a, species_b, slot)``."""
    names = list(SPECIES)
    out = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            da, db = SPECIES[names[a]], SPECIES[names[b]]
            if set(da) != set(db):
                continue
            diff = [s for s in da if da[s] != db[s]]
            if len(diff) == 1:
                out.append((names[a], names[b], diff[0]))
    return out


def _matches(attrs: dict[str, str], definition: dict[str, str]) -> bool:
    return all(attrs[s] == v for s, v in definition.items())


def _sample_attributes(rng: np.random.Generator, species: str) -> dict[str, str]:
    """Typical plumage with each non-defining slot re-drawn at random with probability :data:`VARIATION`;
    the species definition imposed; draws matching another species' definition rejected."""
    own, typical = SPECIES[species], TYPICAL[species]
    others = [d for name, d in SPECIES.items() if name != species]
    for _ in range(1000):
        attrs = {}
        for slot, vocab in SLOTS.items():
            varied = rng.random() < VARIATION
            pick = str(vocab[rng.integers(len(vocab))])
            attrs[slot] = pick if varied else typical[slot]
        attrs.update(own)
        if not any(_matches(attrs, d) for d in others):
            return attrs
    raise RuntimeError(f"could not draw attributes for {species!r}: species definitions overlap")


def _phrases(attrs: dict[str, str]) -> dict[str, list[str]]:
    """Region -> attribute phrases ("red crown"), regions in :data:`REGIONS` order."""
    out: dict[str, list[str]] = {r: [] for r in REGIONS}
    for slot, value in attrs.items():
        part = slot.split(".")[0]
        out[part].append(f"{value} {part}")
    return out


# ----------------------------------------------------------------------------- geometry helpers
def _ellipse(cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = math.radians(angle_deg)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack([cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)], 1)


def _local(
    points: list[tuple[float, float]] | np.ndarray, origin: tuple[float, float], angle_deg: float
) -> np.ndarray:
    """Place a polygon given in a local frame (x along ``angle_deg``) at ``origin``."""
    p = np.asarray(points, dtype=np.float64)
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return np.stack([origin[0] + p[:, 0] * c - p[:, 1] * s, origin[1] + p[:, 0] * s + p[:, 1] * c], 1)


_HEAD = (0.34, -0.27, 0.16)  # cx, cy, r (canonical units, y down, bird faces +x)
_EYE = (0.405, -0.275, 0.045)
_BEAK_BASE, _BEAK_ANGLE = (0.47, -0.245), 8.0
_TAIL_BASE, _TAIL_ANGLE = (-0.30, 0.10), 158.0
_SHOULDER, _WING_TIP = np.array([0.20, -0.14]), np.array([-0.44, 0.08])


def _beak_polygon(shape: str) -> np.ndarray:
    if shape == "short":
        pts = [(-0.04, -0.06), (0.05, -0.04), (0.15, 0.0), (0.05, 0.035), (-0.04, 0.055)]
    elif shape == "long":
        pts = [(-0.04, -0.042), (0.32, -0.004), (0.32, 0.004), (-0.04, 0.038)]
    elif shape == "hooked":
        pts = [(-0.04, -0.065), (0.08, -0.058), (0.15, -0.03), (0.185, 0.02), (0.165, 0.065), (0.14, 0.02),
               (0.09, 0.03), (-0.04, 0.05)]  # fmt: skip
    elif shape == "curved":
        t = np.linspace(0, 1, 14)
        x = -0.04 + 0.33 * t
        yc = 0.55 * (x + 0.04) ** 2 * 2.2
        w = 0.042 * (1 - t) + 0.004
        pts = np.concatenate([np.stack([x, yc - w], 1), np.stack([x, yc + w], 1)[::-1]])
    else:
        raise ValueError(f"unknown beak shape {shape!r}; known: {BEAK_SHAPES}")
    return _local(pts, _BEAK_BASE, _BEAK_ANGLE)


def _tail_polygon(shape: str) -> np.ndarray:
    if shape == "forked":
        pts = [(-0.05, -0.06), (0.36, -0.13), (0.22, 0.0), (0.36, 0.13), (-0.05, 0.06)]
    elif shape == "rounded":
        arc = [
            (0.2 + 0.1 * math.cos(a), 0.1 * math.sin(a)) for a in np.linspace(-math.pi / 2, math.pi / 2, 13)
        ]
        pts = [(-0.05, -0.055), *arc, (-0.05, 0.055)]
    elif shape == "pointed":
        pts = [(-0.05, -0.06), (0.16, -0.085), (0.40, 0.0), (0.16, 0.085), (-0.05, 0.06)]
    elif shape == "square":
        pts = [(-0.05, -0.055), (0.29, -0.105), (0.29, 0.105), (-0.05, 0.055)]
    else:
        raise ValueError(f"unknown tail shape {shape!r}; known: {TAIL_SHAPES}")
    return _local(pts, _TAIL_BASE, _TAIL_ANGLE)


def _wing_polygon(raised: bool) -> np.ndarray:
    axis = _WING_TIP - _SHOULDER
    length = float(np.hypot(*axis))
    ang = math.degrees(math.atan2(axis[1], axis[0])) + (55.0 if raised else 0.0)
    t = np.linspace(0, 1, 24)
    w = 0.135 * np.sin(np.pi * np.clip(t, 0, 1) ** 0.65) + 0.01
    x = t * length
    pts = np.concatenate([np.stack([x, -w], 1), np.stack([x, w * 0.8], 1)[::-1]])
    return _local(pts, tuple(_SHOULDER), ang)


def _leg_lines() -> list[np.ndarray]:
    legs = []
    for hx in (0.02, 0.11):
        top, foot = (hx, 0.16), (hx - 0.02, 0.43)
        legs.append(np.array([top, foot]))
        for dx, dy in ((0.075, 0.012), (0.055, 0.035), (-0.045, 0.004)):
            legs.append(np.array([foot, (foot[0] + dx, foot[1] + dy)]))
    return legs


# ----------------------------------------------------------------------------- rendering
@dataclass
class _View:
    """Canonical bird units -> supersampled pixels: ``p = t + s * R(rot) @ diag(flip, 1) @ q``."""

    scale: float  # supersampled pixels per canonical unit
    rotation: float  # degrees
    flip: bool
    tx: float = 0.0
    ty: float = 0.0

    def matrix(self) -> np.ndarray:
        a = math.radians(self.rotation)
        r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return self.scale * r @ np.diag([-1.0 if self.flip else 1.0, 1.0])

    def forward(self, q: np.ndarray) -> np.ndarray:
        return q @ self.matrix().T + np.array([self.tx, self.ty])

    def inverse_grid(self, size: int, window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Canonical coordinates ``(u, v)`` of the pixel centres in ``window`` of a ``size``² canvas."""
        ys, xs = _pixel_grid(size)
        ys, xs = ys[window], xs[window]
        minv = np.linalg.inv(self.matrix()).astype(np.float32)
        px, py = xs - self.tx, ys - self.ty
        return minv[0, 0] * px + minv[0, 1] * py, minv[1, 0] * px + minv[1, 1] * py


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ys, xs


def _polygon_mask(points: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(im) > 0


def _lines_mask(lines: list[np.ndarray], width: float, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    w = max(1, round(width))
    for ln in lines:
        pts = [tuple(p) for p in ln.tolist()]
        d.line(pts, fill=255, width=w)
        for p in pts:  # round caps
            d.ellipse([p[0] - w / 2, p[1] - w / 2, p[0] + w / 2, p[1] + w / 2], fill=255)
    return np.asarray(im) > 0


def _noise(rng: np.random.Generator, size: int, cells: int, aspect: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Smooth value noise in [0, 1], ``(size, size)`` float32 (bicubic upsampling of a coarse grid)."""
    from PIL import Image

    gh, gw = max(2, cells * aspect[0]), max(2, cells * aspect[1])
    g = rng.random((gh, gw)).astype(np.float32)
    im = Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(im), 0.0, 1.0)


def _background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background ``(size, size, 3)`` float32 in [0, 255]."""
    y = (np.arange(size, dtype=np.float32) / size)[:, None, None]
    x = (np.arange(size, dtype=np.float32) / size)[None, :, None]

    def mix(c0, c1, t):
        return np.asarray(c0, np.float32) * (1 - t) + np.asarray(c1, np.float32) * t

    jit = rng.uniform(-18, 18, size=3).astype(np.float32)
    if kind == "sky":
        img = mix((70, 125, 215), (185, 215, 245), y)
        clouds = np.clip((_noise(rng, size, 4, (1, 2)) - 0.55) * 3.0, 0, 1)[..., None]
        img = mix(img, (250, 250, 252), clouds * 0.85)
    elif kind == "water":
        n = _noise(rng, size, 3)[..., None]
        waves = np.sin(y * rng.uniform(55, 90) + 5.0 * n + x * rng.uniform(-3, 3))
        img = mix((25, 85, 125), (60, 150, 170), y) * (1 + 0.12 * waves)
        img = mix(img, (230, 245, 250), np.clip(waves - 0.9, 0, 1) * 4.0 * (n > 0.5))
    elif kind == "forest":
        img = mix((25, 60, 30), (45, 95, 40), _noise(rng, size, 6)[..., None])
        for _ in range(int(rng.integers(2, 5))):
            cx, w = rng.uniform(0, 1), rng.uniform(0.03, 0.09)
            trunk = (np.abs(x - cx - 0.03 * np.sin(y * 9)) < w).astype(np.float32)
            img = mix(img, (70, 50, 35), trunk * 0.9)
        leaves = np.clip((_noise(rng, size, 12) - 0.6) * 4, 0, 1)[..., None]
        img = mix(img, (80, 140, 55), leaves * 0.7)
    elif kind == "sand":
        ripples = np.sin(
            (x * rng.uniform(20, 35) + y * rng.uniform(8, 20)) + 3 * _noise(rng, size, 3)[..., None]
        )
        img = mix((200, 175, 130), (230, 210, 165), _noise(rng, size, 5)[..., None]) * (1 + 0.05 * ripples)
        img = img + rng.normal(0, 7, size=(size, size, 1)).astype(np.float32)
    elif kind == "grass":
        blades = _noise(rng, size, 24, (1, 3))[..., None]
        img = mix((40, 110, 30), (120, 175, 60), blades) * (0.8 + 0.3 * y)
    elif kind == "snow":
        img = mix((215, 225, 238), (245, 247, 250), _noise(rng, size, 4)[..., None])
        img = img + rng.normal(0, 3, size=(size, size, 1)).astype(np.float32)
    elif kind == "dusk":
        img = mix((95, 60, 135), (250, 150, 90), y)
        img = mix(
            img, (255, 200, 140), np.clip((_noise(rng, size, 3, (1, 2)) - 0.6) * 2, 0, 1)[..., None] * 0.6
        )
    else:
        raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")
    return np.clip(img + jit, 0, 255)


def _contrast_colour(rgb: np.ndarray) -> np.ndarray:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.3 if lum > 105 else rgb * 0.35 + 255 * 0.6


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, axis_deg: float, phase: float) -> np.ndarray:
    """Where the pattern's second colour goes, evaluated on canonical coordinates ``(u, v)``."""
    if pattern == "solid":
        return np.zeros(u.shape, bool)
    a = math.radians(axis_deg)
    across = -u * math.sin(a) + v * math.cos(a)
    along = u * math.cos(a) + v * math.sin(a)
    if pattern == "striped":
        return ((across / 0.062 + phase) % 1.0) < 0.38
    if pattern == "spotted":
        sp, r = 0.085, 0.027
        row = np.floor(across / sp + phase)
        fu = (along / sp + 0.5 * (row % 2) + phase) % 1.0 - 0.5
        fv = (across / sp + phase) % 1.0 - 0.5
        return (fu * fu + fv * fv) * sp * sp < r * r
    raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")


@dataclass
class _Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0 = background, r = REGIONS[r - 1]
    meta: dict


def _canonical_extent(attrs: dict[str, str], raised: bool) -> np.ndarray:
    pts = [
        _ellipse(0, 0, 0.40, 0.24, -20),
        _ellipse(_HEAD[0], _HEAD[1], _HEAD[2], _HEAD[2]),
        _beak_polygon(attrs["beak.shape"]),
        _tail_polygon(attrs["tail.shape"]),
        _wing_polygon(raised),
        *_leg_lines(),
    ]
    return np.concatenate(pts)


def _render(
    attrs: dict[str, str],
    background: str,
    rng_pose: np.random.Generator,
    rng_bg: np.random.Generator,
    size: int,
) -> _Rendered:
    ss = SUPERSAMPLE
    big = size * ss
    raised = bool(rng_pose.random() < 0.2)
    view = _View(
        scale=float(rng_pose.uniform(0.44, 0.58)) * big,
        rotation=float(rng_pose.uniform(-15, 15)),
        flip=bool(rng_pose.random() < 0.5),
    )
    ext = view.forward(_canonical_extent(attrs, raised))
    lo, hi = ext.min(0), ext.max(0)
    margin = 0.03 * big
    for k, attr in ((0, "tx"), (1, "ty")):
        a, b = margin - lo[k], big - margin - hi[k]
        setattr(view, attr, float(rng_pose.uniform(a, b)) if b > a else float((a + b) / 2))
    # all bird drawing happens inside a window around the bird's extent (``canvas[win]`` is a view)
    ext = view.forward(_canonical_extent(attrs, raised))
    pad = int(0.05 * view.scale) + 4
    win = (
        slice(max(int(ext[:, 1].min()) - pad, 0), min(int(ext[:, 1].max()) + pad + 1, big)),
        slice(max(int(ext[:, 0].min()) - pad, 0), min(int(ext[:, 0].max()) + pad + 1, big)),
    )
    u, v = view.inverse_grid(big, win)
    shade = np.clip(1.1 - 0.45 * (v + 0.25), 0.78, 1.15)[..., None].astype(np.float32)

    canvas = _background(background, rng_bg, size).repeat(ss, 0).repeat(ss, 1)
    label = np.zeros((big, big), np.uint8)
    perch = bool(rng_pose.random() < 0.5)
    if perch:  # a twig under the feet, part of the background
        foot_y = 0.44 + 0.012
        twig = view.forward(np.array([[-0.55, foot_y + 0.02], [0.6, foot_y - 0.02]]))
        m = _lines_mask([twig], 0.045 * view.scale, big)
        canvas[m] = np.array((95, 70, 45), np.float32) * (0.8 + 0.4 * rng_pose.random())

    canvas_w, label_w = canvas[win], label[win]

    def paint(region: str, mask: np.ndarray, colour: str, pattern: str = "solid", axis: float = 0.0) -> None:
        idx = np.nonzero(mask)
        rgb = np.asarray(COLOURS[colour], np.float32)
        col = np.broadcast_to(rgb, (len(idx[0]), 3)).copy()
        if pattern != "solid":
            pm = _pattern_mask(pattern, u[idx], v[idx], axis, float(rng_pose.random()))
            col[pm] = _contrast_colour(rgb)
        canvas_w[idx] = col * shade[idx]
        label_w[idx] = REGIONS.index(region) + 1

    def poly(points: np.ndarray) -> np.ndarray:
        return _polygon_mask(view.forward(points), big)[win]

    r = REGIONS
    paint("tail", poly(_tail_polygon(attrs["tail.shape"])), attrs["tail.colour"])
    legs = _lines_mask([view.forward(ln) for ln in _leg_lines()], 0.03 * view.scale, big)[win]
    paint("leg", legs, attrs["leg.colour"])
    body = poly(_ellipse(0, 0, 0.40, 0.24, -20))
    # breast: the front-lower half of the body; belly: the rear half
    a = math.radians(-20)
    along = u * math.cos(a) + v * math.sin(a)
    front = along > -0.02
    paint("belly", body & ~front, attrs["belly.colour"])
    paint("breast", body & front, attrs["breast.colour"], attrs["breast.pattern"], axis=90.0)
    wing_axis = math.degrees(math.atan2(*(_WING_TIP - _SHOULDER)[::-1])) + (55.0 if raised else 0.0)
    paint("wing", poly(_wing_polygon(raised)), attrs["wing.colour"], attrs["wing.pattern"], axis=wing_axis)
    head = poly(_ellipse(_HEAD[0], _HEAD[1], _HEAD[2], _HEAD[2]))
    cap = v < _HEAD[1] - 0.035 + 0.25 * (u - _HEAD[0])
    paint("throat", head & ~cap, attrs["throat.colour"])
    paint("crown", head & cap, attrs["crown.colour"])
    paint("beak", poly(_beak_polygon(attrs["beak.shape"])), attrs["beak.colour"])
    eye = poly(_ellipse(*_EYE[:2], _EYE[2], _EYE[2], n=24))
    paint("eye", eye, attrs["eye.colour"])
    pupil = poly(_ellipse(_EYE[0] + 0.008, _EYE[1], _EYE[2] * 0.45, _EYE[2] * 0.45, n=16))
    canvas_w[pupil] = (10, 10, 12) if attrs["eye.colour"] != "black" else (70, 70, 75)
    glint = poly(_ellipse(_EYE[0] + 0.018, _EYE[1] - 0.014, _EYE[2] * 0.2, _EYE[2] * 0.2, n=8))
    canvas_w[glint] = (250, 250, 250)

    # outline: darken bird pixels whose 4-neighbourhood holds another label
    lab = label_w
    edge = np.zeros_like(lab, bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge &= lab > 0
    canvas_w[edge] *= 0.55

    before = np.bincount(label.ravel(), minlength=len(r) + 1)
    occluder = None
    if rng_pose.random() < 0.15:
        occluder = str(OCCLUDERS[rng_pose.integers(len(OCCLUDERS))])
        ys, xs = np.nonzero(label)
        j = int(rng_pose.integers(len(xs)))
        ax, ay = float(xs[j]), float(ys[j])
        s = view.scale
        if occluder == "branch":
            ang = rng_pose.uniform(0, math.pi)
            d = np.array([math.cos(ang), math.sin(ang)]) * 2 * big
            m = _lines_mask(
                [np.array([[ax - d[0], ay - d[1]], [ax + d[0], ay + d[1]]])],
                rng_pose.uniform(0.09, 0.15) * s,
                big,
            )
            col = np.array((90, 65, 40), np.float32)
        elif occluder == "leaves":
            m = np.zeros((big, big), bool)
            for _ in range(5):
                cx, cy = ax + rng_pose.normal(0, 0.1) * s, ay + rng_pose.normal(0, 0.1) * s
                rad = rng_pose.uniform(0.07, 0.12) * s
                m |= _polygon_mask(_ellipse(cx, cy, rad * 1.6, rad, rng_pose.uniform(0, 180)), big)
            col = np.array((50, 120, 45), np.float32)
        else:  # rock from the bottom edge
            rad = rng_pose.uniform(0.25, 0.4) * s
            cy = ay + rad * 0.75
            m = _polygon_mask(_ellipse(ax, cy, rad * 1.4, rad, 0, n=20), big)
            m[int(max(cy, 0)) :, max(int(ax - rad * 1.4), 0) : int(ax + rad * 1.4) + 1] = True
            col = np.array((120, 115, 110), np.float32)
        shade_o = 0.85 + 0.3 * _noise(rng_pose, big, 5)[..., None]
        canvas[m] = (col * shade_o)[m]
        label[m] = 0
    after = np.bincount(label.ravel(), minlength=len(r) + 1)

    # down-sample: box filter for the picture, the centre sample for the label map
    from PIL import Image, ImageFilter

    pic = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).reduce(ss)
    mask = np.ascontiguousarray(label[ss // 2 :: ss, ss // 2 :: ss])

    # lighting, blur, noise (at the final size)
    brightness = float(rng_pose.uniform(0.78, 1.2))
    contrast = float(rng_pose.uniform(0.8, 1.15))
    cast = rng_pose.uniform(-0.07, 0.07, size=3)
    blur = float(rng_pose.uniform(0.4, 1.0)) if rng_pose.random() < 0.25 else 0.0
    noise_sigma = float(rng_pose.uniform(0, 3.0))
    if blur > 0:
        pic = pic.filter(ImageFilter.GaussianBlur(blur))
    img = np.asarray(pic, np.float32)
    img = (img - 128) * contrast + 128
    img = img * brightness * (1 + cast.astype(np.float32))
    img = img + rng_pose.normal(0, noise_sigma, size=img.shape).astype(np.float32)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    occluded = [
        reg for k, reg in enumerate(r, start=1) if before[k] > 0 and after[k] < _VISIBLE_FRACTION * before[k]
    ]
    meta = {
        "background": background,
        "facing": "left" if view.flip else "right",
        "pose": "wings raised" if raised else "perched" if perch else "standing",
        "perch": perch,
        "scale": round(view.scale / big, 4),
        "rotation": round(view.rotation, 2),
        "flipped": view.flip,
        "occluder": occluder,
        "occluded_parts": occluded,
        "brightness": round(brightness, 3),
        "contrast": round(contrast, 3),
        "blur": round(blur, 3),
        "noise": round(noise_sigma, 3),
    }
    return _Rendered(img, mask, meta)


def _keypoints_and_box(
    mask: np.ndarray, visible: list[str]
) -> tuple[dict[str, list[float]], list[float] | None]:
    """Part centres (on the part's own pixels) and the bird's box, in pixel coordinates (centre = +0.5)."""
    kps: dict[str, list[float]] = {}
    for reg in visible:
        ys, xs = np.nonzero(mask == REGIONS.index(reg) + 1)
        if len(xs) == 0:
            continue
        kx, ky = round(float(xs.mean()) + 0.5, 2), round(float(ys.mean()) + 0.5, 2)
        if mask[int(ky), int(kx)] != REGIONS.index(reg) + 1:  # centroid off the part: nearest part pixel
            j = int(np.argmin((xs + 0.5 - kx) ** 2 + (ys + 0.5 - ky) ** 2))
            kx, ky = float(xs[j]) + 0.5, float(ys[j]) + 0.5
        kps[reg] = [kx, ky]
    ys, xs = np.nonzero(mask)
    box = (
        None if len(xs) == 0 else [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    )
    return kps, box


# ----------------------------------------------------------------------------- captions
def _article(phrase: str, plural: bool) -> str:
    if plural:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(rng: np.random.Generator, attrs: dict[str, str], visible: list[str]) -> str:
    parts = [p for p in visible if p in _MENTION_WEIGHT]
    w = np.array([_MENTION_WEIGHT[p] for p in parts])
    k = min(len(parts), int(rng.integers(2, 5)))
    chosen = [parts[j] for j in rng.choice(len(parts), size=k, replace=False, p=w / w.sum())]
    mentions = []
    for part in chosen:
        slots = [s for s in SLOTS if s.startswith(part + ".")]
        # mention one or (sometimes) all of the part's attributes
        if len(slots) > 1 and rng.random() < 0.6:
            slots = [slots[int(rng.integers(len(slots)))]]
        words = []
        for slot in sorted(slots, key=lambda s: ("shape", "pattern", "colour").index(s.split(".")[1])):
            value = attrs[slot]
            kind = slot.split(".")[1]
            table = SYNONYMS["colour" if kind == "colour" else kind]
            forms = table[value]
            words.append(forms[int(rng.integers(len(forms)))])
        forms = _PART_FORMS[part]
        noun = forms[int(rng.integers(len(forms)))]
        mentions.append((words, noun))
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    pred = ""
    if "{pred}" in template:
        if len(mentions) < 2:
            template = "this bird has {list}."
        else:
            words, noun = mentions.pop()
            verb = "are" if noun in _PLURAL_PARTS else "is"
            pred = f"{noun} {verb} " + " and ".join(words)
    items = [_article(" ".join([*w, n]), n in _PLURAL_PARTS) for w, n in mentions]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    size = _SIZES[int(rng.integers(len(_SIZES)))]
    return template.format(list=listed, pred=pred, size=size)


def parse_caption(caption: str) -> list[str]:
    """Canonical attribute phrases a caption states, read back through :data:`SYNONYMS`.

    Understands ``adj [adj] noun`` ("striped black wings" -> "striped wing", "black wing") and
    ``noun is/are adj [and adj]`` ("its tail is forked" -> "forked tail").
    """
    import re

    adj = {}
    for kind in ("colour", "pattern", "shape"):
        for canon, forms in SYNONYMS[kind].items():
            for f in forms:
                adj[f] = canon
    noun = {f: canon for canon, forms in SYNONYMS["part"].items() for f in forms}
    toks = re.findall(r"[a-z]+", caption.lower())
    out: list[str] = []
    for i, t in enumerate(toks):
        if t not in noun:
            continue
        j = i - 1
        while j >= 0 and toks[j] in adj:
            out.append(f"{adj[toks[j]]} {noun[t]}")
            j -= 1
        if i + 1 < len(toks) and toks[i + 1] in ("is", "are"):
            j = i + 2
            while j < len(toks) and toks[j] in adj:
                out.append(f"{adj[toks[j]]} {noun[t]}")
                if j + 2 < len(toks) and toks[j + 1] == "and" and toks[j + 2] in adj:
                    j += 2
                else:
                    break
    return out


# ----------------------------------------------------------------------------- one image
def _rng(seed: int, i: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i, stream])))


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def render_synthbird(
    i: int,
    *,
    seed: int = 0,
    image_size: int = 128,
    spurious: bool = False,
    spurious_strength: float = 0.9,
    test_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray, ImageRecord]:
    """Draw image ``i`` of a SynthBirds set: ``(image (H, W, 3) uint8, label map (H, W) uint8, record)``.

    The record's paths are ``images/{id}.png`` and ``masks/{id}.png``. Pure function of its arguments.
    """
    names = list(SPECIES)
    label = i % len(names)
    species = names[label]
    attrs = _sample_attributes(_rng(seed, i, _S_BIRD), species)
    split = "test" if _rng(seed, i, _S_SPLIT).random() < test_fraction else "train"
    rb = _rng(seed, i, _S_BGCHOICE)
    u, other = rb.random(), BACKGROUNDS[int(rb.integers(len(BACKGROUNDS)))]
    if spurious and split == "train" and species == SPURIOUS_SPECIES:
        if u < spurious_strength:
            background = SPURIOUS_BACKGROUND
        else:
            rest = [b for b in BACKGROUNDS if b != SPURIOUS_BACKGROUND]
            background = rest[int(rb.integers(len(rest)))]
    else:
        background = other
    rendered = _render(attrs, background, _rng(seed, i, _S_POSE), _rng(seed, i, _S_BGTEXTURE), image_size)
    hidden = set(rendered.meta["occluded_parts"])
    counts = np.bincount(rendered.mask.ravel(), minlength=len(REGIONS) + 1)
    present = {k for k in range(1, len(REGIONS) + 1) if counts[k] > 0}
    visible = [reg for k, reg in enumerate(REGIONS, start=1) if k in present and reg not in hidden]
    phrases = _phrases(attrs)
    region_concepts = {reg: phrases[reg] for reg in visible}
    attributes = [p for reg in visible for p in phrases[reg]]
    keypoints, bbox = _keypoints_and_box(rendered.mask, visible)
    rc = _rng(seed, i, _S_CAPTION)
    captions = [_caption(rc, attrs, visible) for _ in range(5)]
    rid = f"{i:06d}"
    meta = dict(rendered.meta)
    meta["species"] = species
    meta["hidden_attributes"] = [p for reg in REGIONS if reg not in visible for p in phrases[reg]]
    meta["slots"] = attrs
    record = ImageRecord(
        id=rid,
        path=f"images/{rid}.png",
        split=split,
        label=label,
        attributes=attributes,
        captions=captions,
        mask=f"masks/{rid}.png",
        region_concepts=region_concepts,
        keypoints=keypoints,
        bbox=bbox,
        meta=meta,
    )
    return rendered.image, rendered.mask, record


def _render_to_files(job: tuple[Path, int, dict]) -> ImageRecord:
    out, i, kw = job
    image, mask, rec = render_synthbird(i, **kw)
    (out / rec.path).write_bytes(_png(image))
    (out / rec.mask).write_bytes(_png(mask))
    return rec


# ----------------------------------------------------------------------------- the data set
def dataset_meta(
    *, seed: int, n: int, image_size: int, spurious: bool, spurious_strength: float, test_fraction: float
) -> dict:
    """The ``dataset.json`` ``meta`` block: vocabularies, species, synonyms, settings, version."""
    return {
        "version": VERSION,
        "generator": {
            "seed": seed,
            "n": n,
            "image_size": image_size,
            "spurious": spurious,
            "spurious_strength": spurious_strength,
            "test_fraction": test_fraction,
            "supersample": SUPERSAMPLE,
            "visible_fraction": _VISIBLE_FRACTION,
        },
        "vocabularies": {
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "patterns": list(PATTERNS),
            "beak_shapes": list(BEAK_SHAPES),
            "tail_shapes": list(TAIL_SHAPES),
            "slots": {k: list(v) for k, v in SLOTS.items()},
            "backgrounds": list(BACKGROUNDS),
            "occluders": list(OCCLUDERS),
        },
        "attribute_phrases": sorted({f"{v} {s.split('.')[0]}" for s, vs in SLOTS.items() for v in vs}),
        "species": {name: dict(d) for name, d in SPECIES.items()},
        "species_typical": {name: dict(d) for name, d in TYPICAL.items()},
        "variation": VARIATION,
        "one_part_pairs": [list(p) for p in one_part_pairs()],
        "spurious": {
            "species": SPURIOUS_SPECIES,
            "background": SPURIOUS_BACKGROUND,
            "strength": spurious_strength if spurious else None,
            "split": "train",
            "enabled": spurious,
        },
        "synonyms": SYNONYMS,
        "caption_templates": list(_TEMPLATES),
        "notes": (
            "attributes/region_concepts/keypoints list visible parts only; a part is hidden when an "
            f"occluder leaves less than {_VISIBLE_FRACTION:.0%} of it (meta.occluded_parts, "
            "meta.hidden_attributes). Keypoints and boxes are in pixels, pixel centres at +0.5."
        ),
    }


def generate_synthbirds(
    out: Path,
    n: int = DEFAULT_N,
    seed: int = 0,
    image_size: int = 128,
    spurious: bool = False,
    progress: bool = True,
    *,
    spurious_strength: float = 0.9,
    test_fraction: float = 0.2,
    workers: int = 1,
) -> ProbeDataset:
    """Generate a SynthBirds probe data set in ``out`` and return it opened.

    Images ``images/{id}.png`` (RGB, ``image_size``²), label maps ``masks/{id}.png`` (values index
    :data:`REGIONS` from 1), then ``manifest.jsonl`` and ``dataset.json`` written last, atomically.
    Label ``i % 12`` (balanced); split train/test per image with probability ``test_fraction``.
    """
    from tqdm import tqdm

    from lavise_core.data.dataset import prepare_generated_dir, write_dataset

    out = Path(out)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if not 0.0 <= spurious_strength <= 1.0 or not 0.0 <= test_fraction <= 1.0:
        raise ValueError("spurious_strength and test_fraction must lie in [0, 1]")
    prepare_generated_dir(out, "synthbirds", "SynthBirds")
    kw = {
        "seed": seed,
        "image_size": image_size,
        "spurious": spurious,
        "spurious_strength": spurious_strength,
        "test_fraction": test_fraction,
    }
    jobs = ((out, i, kw) for i in range(n))
    bar = dict(total=n, desc="synthbirds", unit="img", disable=not progress)
    records: list[ImageRecord]
    if workers > 1:
        import multiprocessing as mp
        import sys

        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file is not None and not Path(main_file).is_file():
            raise ValueError(
                "workers > 1 needs a __main__ importable from a file (spawn); use workers=1 here"
            )

        with mp.get_context("spawn").Pool(workers) as pool:
            records = list(tqdm(pool.imap(_render_to_files, jobs, chunksize=16), **bar))
    else:
        records = list(tqdm(map(_render_to_files, jobs), **bar))
    meta = dataset_meta(
        seed=seed,
        n=n,
        image_size=image_size,
        spurious=spurious,
        spurious_strength=spurious_strength,
        test_fraction=test_fraction,
    )
    write_dataset(
        out,
        name="SynthBirds",
        source="synthbirds",
        classes=list(SPECIES),
        records=records,
        regions=list(REGIONS),
        meta=meta,
    )
    return ProbeDataset.open(out)
