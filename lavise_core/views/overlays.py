"""Heatmap colour maps, overlays of activation maps on images, and mosaics (small composable callables).

A colour map is a callable ``(H, W) float in [0, 1] -> (H, W, 3) uint8``; a normaliser is a callable
``(h, w) -> (h, w) in [0, 1]``. :func:`overlay` upsamples a map to the image (bilinear), colours it and
alpha-blends it onto the image; :func:`outline` instead draws one contour around the region where the map
reaches a level, leaving every pixel inside and outside it as it was (a colour a label names stays checkable by
eye); :func:`mosaic` tiles thumbnails. No streamlit here (STYLE rule 1).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from lavise_core.data.images import crop_to_view

__all__ = [
    "COLORMAPS",
    "Colormap",
    "Normalizer",
    "colorize",
    "crop_to_view",
    "encode_jpeg",
    "lut_colormap",
    "minmax",
    "mosaic",
    "mute",
    "outline",
    "overlay",
    "region_edges",
    "relative_to",
    "upsample",
]

Colormap = Callable[[np.ndarray], np.ndarray]
Normalizer = Callable[[np.ndarray], np.ndarray]

# control points (position, RGB) sampled from the perceptually uniform maps of matplotlib
_INFERNO = [
    (0.0, (0, 0, 4)),
    (0.13, (31, 12, 72)),
    (0.25, (85, 15, 109)),
    (0.38, (136, 34, 106)),
    (0.5, (186, 54, 85)),
    (0.63, (227, 89, 51)),
    (0.75, (249, 140, 10)),
    (0.88, (249, 201, 50)),
    (1.0, (252, 255, 164)),
]
_VIRIDIS = [
    (0.0, (68, 1, 84)),
    (0.25, (59, 82, 139)),
    (0.5, (33, 145, 140)),
    (0.75, (94, 201, 98)),
    (1.0, (253, 231, 37)),
]
_JET = [
    (0.0, (0, 0, 128)),
    (0.11, (0, 0, 255)),
    (0.36, (0, 255, 255)),
    (0.62, (255, 255, 0)),
    (0.89, (255, 0, 0)),
    (1.0, (128, 0, 0)),
]


def lut_colormap(points: Sequence[tuple[float, tuple[int, int, int]]], n: int = 256) -> Colormap:
    """A colour map from control points ``[(position in [0, 1], (r, g, b)), ...]`` (linear in between)."""
    pos = np.array([p for p, _ in points], dtype=np.float64)
    rgb = np.array([c for _, c in points], dtype=np.float64)
    if pos[0] != 0.0 or pos[-1] != 1.0 or np.any(np.diff(pos) <= 0):
        raise ValueError("control points must start at 0, end at 1 and increase")
    x = np.linspace(0.0, 1.0, n)
    lut = np.stack([np.interp(x, pos, rgb[:, i]) for i in range(3)], axis=1).round().astype(np.uint8)

    def cmap(values: np.ndarray) -> np.ndarray:
        v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
        idx = np.clip((v * (n - 1)).round(), 0, n - 1).astype(np.intp)
        return lut[idx]

    return cmap


COLORMAPS: dict[str, Colormap] = {
    "inferno": lut_colormap(_INFERNO),
    "viridis": lut_colormap(_VIRIDIS),
    "jet": lut_colormap(_JET),
}


# --------------------------------------------------------------------------------------- normalisers
def minmax(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the map's own min and max (a constant map becomes 0)."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def relative_to(vmax: float, vmin: float = 0.0) -> Normalizer:
    """Normaliser against fixed bounds (e.g. a filter's top activation), so maps stay comparable."""
    span = max(float(vmax) - float(vmin), 1e-12)

    def norm(a: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(a, dtype=np.float32) - vmin) / span, 0.0, 1.0)

    return norm


# --------------------------------------------------------------------------------------- maps on images
def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``heat (h, w)`` to ``size = (W, H)`` (PIL order), float32."""
    h = np.asarray(heat, dtype=np.float32)
    if h.ndim != 2:
        raise ValueError(f"a heatmap must be (h, w), got shape {h.shape}")
    if h.shape[::-1] == tuple(size):
        return h
    return np.asarray(Image.fromarray(h, mode="F").resize(tuple(size), Image.BILINEAR), dtype=np.float32)


def colorize(heat: np.ndarray, cmap: str | Colormap = "inferno") -> np.ndarray:
    """``(H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 with a named colour map or a callable."""
    fn = COLORMAPS[cmap] if isinstance(cmap, str) else cmap
    return fn(np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0))


def overlay(
    image: Image.Image,
    heat: np.ndarray,
    *,
    cmap: str | Colormap = "inferno",
    alpha: float = 0.5,
    normalize: Normalizer | None = minmax,
    mask_below: float | None = None,
) -> Image.Image:
    """Alpha-blend the colour-mapped ``heat (h, w)`` onto ``image`` (upsampled to the image size).

    Args:
        alpha: opacity of the heatmap where it is 1; the blend weight is ``alpha · heat`` when
            ``mask_below`` is given (weak activations leave the image visible), else a constant ``alpha``.
        normalize: applied to the *small* map before upsampling (``None``: already in [0, 1]).
        mask_below: heat values below this fraction are not coloured at all.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    img = image.convert("RGB")
    h = normalize(heat) if normalize is not None else np.asarray(heat, dtype=np.float32)
    big = np.clip(upsample(h, img.size), 0.0, 1.0)
    col = colorize(big, cmap).astype(np.float32)
    base = np.asarray(img, dtype=np.float32)
    if mask_below is None:
        a = np.full(big.shape, alpha, dtype=np.float32)
    else:
        a = alpha * np.where(big >= mask_below, 0.35 + 0.65 * big, 0.0)
    out = base * (1 - a[..., None]) + col * a[..., None]
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def region_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inner and outer edge of a boolean region ``mask (H, W)``: ``inner`` = region pixels with a
    4-neighbour outside it (the image border counts as outside, so a region touching it is closed there),
    ``outer`` = pixels outside it with a 4-neighbour in it."""
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"a region mask must be (H, W), got shape {m.shape}")
    pad = np.pad(m, 1, constant_values=False)
    nbrs = [pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]
    all_in = nbrs[0] & nbrs[1] & nbrs[2] & nbrs[3]
    any_in = nbrs[0] | nbrs[1] | nbrs[2] | nbrs[3]
    return m & ~all_in, ~m & any_in


def outline(
    image: Image.Image,
    heat: np.ndarray,
    level: float,
    *,
    normalize: Normalizer | None = None,
    color: tuple[int, int, int] = (255, 255, 255),
    halo: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """``image`` with one contour around the region where ``heat (h, w)``, bilinearly upsampled to the image,
    is ``>= level``: a line in ``color`` just inside the region and a ``halo`` line just outside it (readable
    on light and dark birds). No other pixel changes, so the colours a label names stay as they are.

    Args:
        level: in the units of ``heat`` (e.g. the filter's Network-Dissection threshold on raw activations),
            or of ``normalize(heat)`` when a normaliser is given. Nothing reaches it: the image unchanged.
    """
    img = image.convert("RGB")
    h = normalize(heat) if normalize is not None else np.asarray(heat, dtype=np.float32)
    big = upsample(h, img.size)
    inner, outer = region_edges(big >= level)
    out = np.array(img, dtype=np.uint8)
    out[outer] = halo
    out[inner] = color
    return Image.fromarray(out)


def mute(image: Image.Image, amount: float = 0.6) -> Image.Image:
    """``image`` faded towards a light grey, for a picture shown as weak evidence: each pixel becomes
    ``(1 - amount) · rgb + amount · (grey + 255) / 2`` with ``grey`` its luma (ITU-R 601), so colours pale and
    the picture reads as secondary; ``amount = 0`` leaves it as it is."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must lie in [0, 1], got {amount}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    pale = (grey[..., None] + 255.0) / 2.0
    out = (1.0 - amount) * rgb + amount * pale
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def mosaic(
    images: Sequence[Image.Image],
    cols: int = 2,
    tile: int = 96,
    pad: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile ``images`` (each resized to ``tile × tile``) in a grid of ``cols`` columns with ``pad`` pixels."""
    if cols < 1 or tile < 1:
        raise ValueError("cols and tile must be >= 1")
    n = max(len(images), 1)
    rows = -(-n // cols)
    w = cols * tile + (cols + 1) * pad
    h = rows * tile + (rows + 1) * pad
    out = Image.new("RGB", (w, h), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(
            im.convert("RGB").resize((tile, tile), Image.BILINEAR),
            (pad + c * (tile + pad), pad + r * (tile + pad)),
        )
    return out


def encode_jpeg(image: Image.Image, quality: int = 88) -> bytes:
    """JPEG bytes of ``image`` (RGB): encode a picture once, cache the bytes, show them many times."""
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must lie in 1..95, got {quality}")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()
