"""Safe image loading: every way an image file can be bad gets a message a user can act on.

Handles EXIF orientation, grayscale / palette / CMYK / 16-bit / alpha modes (all to RGB; alpha is
composited on white), animated files (first frame), truncated files, non-images and decompression
bombs (refused above ``max_pixels`` before the pixels are decoded).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "crop_label_map",
    "crop_to_view",
    "load_image",
    "mask_weights",
    "require_min_side",
]

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000

#: what PIL raises on corrupt or truncated files besides its own errors (struct.error: a GIF frame header
#: cut short, found by bench/fuzz; ValueError / IndexError / EOFError / ZeroDivisionError: other plugins)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, EOFError, ZeroDivisionError, struct.error,
                 TypeError, KeyError)  # fmt: skip


class ImageLoadError(ValueError):
    """An image could not be used; ``str(err)`` is a message for the user."""


def load_image(
    source: str | os.PathLike | bytes | io.IOBase,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    name: str | None = None,
    upright: bool = True,
) -> Image.Image:
    """Open an image as an upright RGB ``PIL.Image``, fully decoded.

    Args:
        source: a path, raw bytes, or a binary file object.
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).
        min_side: refuse images whose shorter side is below this (too small to explain; see
            :func:`require_min_side`).
        name: how to call the image in messages (defaults to the path).
        upright: apply the EXIF orientation. Turn off for images whose annotations (masks, keypoints,
            boxes) are in stored pixel order, as in CUB and COCO.

    Raises:
        ImageLoadError: not an image, unreadable, truncated, empty, too large or too small.
    """
    if isinstance(source, bytes | bytearray):
        label = name or "the uploaded file"
        if len(source) == 0:
            raise ImageLoadError(f"{label} is empty (0 bytes).")
        fh: io.IOBase = io.BytesIO(source)
    elif isinstance(source, str | os.PathLike):
        label = name or str(source)
        p = Path(source)
        if not p.is_file():
            raise ImageLoadError(f"{label}: no such file.")
        if p.stat().st_size == 0:
            raise ImageLoadError(f"{label} is empty (0 bytes).")
        fh = open(p, "rb")  # noqa: SIM115 - closed below
    else:
        label = name or "the uploaded file"
        fh = source
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning is not needed: the size is checked against max_pixels below, from the
            # header, before any pixel is decoded (one limit, one message)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(fh)
            except UnidentifiedImageError as e:
                raise ImageLoadError(
                    f"{label} is not an image that can be read (supported: PNG, JPEG, GIF, BMP, TIFF, WebP)."
                ) from e
            except Image.DecompressionBombError as e:  # over twice PIL's limit: refused before any size check
                size = _declared_size(fh)
                raise ImageLoadError(_too_large(label, size, max_pixels)) from e
            except DECODE_ERRORS as e:
                raise ImageLoadError(f"{label} is truncated or corrupt ({type(e).__name__}: {e}).") from e
            w, h = im.size
            if w == 0 or h == 0:
                raise ImageLoadError(f"{label} has no pixels ({w}×{h}).")
            if w * h > max_pixels:
                raise ImageLoadError(_too_large(label, (w, h), max_pixels))
            require_min_side((w, h), min_side, label)
            try:
                if getattr(im, "is_animated", False):
                    im.seek(0)
                im.load()
                if upright:
                    im = ImageOps.exif_transpose(im) or im
                return _to_rgb(im)
            except (
                DECODE_ERRORS
            ) as e:  # PIL's decoders raise all of these on hostile bytes (fuzzing found them)
                raise ImageLoadError(f"{label} is truncated or corrupt ({type(e).__name__}: {e}).") from e
    finally:
        if isinstance(source, str | os.PathLike):
            fh.close()


def _too_large(label: str, size: tuple[int, int] | None, max_pixels: int) -> str:
    """The one message for an image over ``max_pixels`` (``size`` ``None`` when the header could not be read)."""
    what = "" if size is None else f": {size[0]}×{size[1]} = {size[0] * size[1] / 1e6:.0f} megapixels"
    return f"{label} is too large{what}; the limit is {max_pixels / 1e6:.0f} megapixels. Downscale it first."


def _declared_size(fh: io.IOBase) -> tuple[int, int] | None:
    """The width and height an image file's header declares, read without PIL's decompression-bomb check (which
    refuses to open images over twice its limit at all), or ``None``."""
    try:
        fh.seek(0)
        prefix = fh.read(16)
    except (OSError, ValueError):
        return None
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        ok = accept is None or accept(prefix)
        if not ok or isinstance(ok, str):  # a str: the plugin's reason it cannot open this file
            continue
        try:
            fh.seek(0)
            return tuple(factory(fh, "").size)  # type: ignore[return-value]
        except DECODE_ERRORS:
            continue
    return None


def require_min_side(size: tuple[int, int], min_side: int, label: str = "the image") -> None:
    """Raise :class:`ImageLoadError` when the shorter side of a ``(width, height)`` image is below ``min_side``:
    an image that small is blown up into a blur the network cannot tell from anything else, so an explanation
    of it would describe noise (``LoadedModel.min_side`` says how small is too small for a model)."""
    w, h = size
    if min(w, h) < min_side:
        raise ImageLoadError(
            f"{label} is too small to explain ({w}×{h} pixels): the smallest image this network can explain is "
            f"{min_side}×{min_side} pixels. Use a larger image."
        )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on white, 16-bit gray is rescaled."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(a.astype("uint8")).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def crop_to_view(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """The part of ``image`` the network sees (``LoadedModel.crop_box``), so maps align with pixels."""
    x0, y0, x1, y1 = box
    if (x0, y0) == (0, 0) and (x1, y1) == image.size:
        return image
    return image.crop((round(x0), round(y0), round(x1), round(y1)))


def mask_weights(
    indicator: np.ndarray,
    map_size: tuple[int, int],
    crop_box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Area-average a ``(H, W)`` 0/1 indicator (cropped to ``crop_box``) to ``map_size`` -> ``(h, w)`` in [0, 1]."""
    ind = np.asarray(indicator, dtype=np.float32)
    if crop_box is not None:
        x0, y0, x1, y1 = (round(v) for v in crop_box)
        H, W = ind.shape
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        ind = ind[y0:y1, x0:x1]
    import torch  # the data layer needs torch only here

    t = torch.from_numpy(np.ascontiguousarray(ind))[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, map_size)[0, 0].numpy()


def crop_label_map(label: np.ndarray, crop_box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The network-input crop of a label map ``(H, W)`` uint8, resized (nearest) to ``(size, size)``.

    ``crop_box`` = ``LoadedModel.crop_box(W, H)``; the evaluation of LaViSE labels uses the same crop.
    """
    x0, y0, x1, y1 = (round(v) for v in crop_box)
    lab = label[max(0, y0) : y1, max(0, x0) : x1]
    return np.asarray(Image.fromarray(lab).resize((size, size), Image.NEAREST))
