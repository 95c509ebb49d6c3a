"""Seeded images unlike any probe set, to check the out-of-distribution test (:mod:`lavise_core.explain.ood`):
crops of scikit-image's photos, noise, flat colours, rendered text and synthetic screenshots, plus
near-distribution variants of a probe image (blur, rotation, inversion, greyscale, JPEG)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["OOD_KINDS", "PHOTO_SAMPLES", "near_distribution_variant", "synthetic_ood_images"]

# =========================================================================== synthetic OOD images
#: photos among scikit-image's sample data (no download needed for these)
PHOTO_SAMPLES = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "moon", "page", "text", "coins",
    "hubble_deep_field", "immunohistochemistry", "retina", "grass", "gravel", "brick", "clock",
    "microaneurysms", "skin",
)  # fmt: skip
OOD_KINDS = ("photo", "noise", "flat", "text", "screenshot")

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "invoice",
    "total",
    "amount",
    "date",
    "name",
    "settings",
    "file",
    "edit",
    "view",
    "help",
    "login",
    "password",
    "submit",
    "cancel",
    "search",
    "results",
    "page",
    "home",
    "about",
    "contact",
    "report",
    "summary",
    "table",
    "chart",
    "data",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTO_SAMPLES:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            arr = fn()
        except Exception:
            continue
        if isinstance(arr, tuple):
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        if arr.ndim not in (2, 3):
            continue
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)).astype(np.uint8)
        out.append(arr)
    return out


def _photo(rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    img = Image.fromarray(photos[int(rng.integers(len(photos)))]).convert("RGB")
    w, h = img.size
    if rng.random() < 0.7:  # a random crop of 30-100 % of the shorter side, aspect 0.6-1.6
        side = rng.uniform(0.3, 1.0) * min(w, h)
        aspect = rng.uniform(0.6, 1.6)
        cw, ch = min(w, side * np.sqrt(aspect)), min(h, side / np.sqrt(aspect))
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        img = img.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch)))
    out = int(rng.integers(96, 640))
    s = out / max(img.size)
    return img.resize((max(8, round(img.size[0] * s)), max(8, round(img.size[1] * s))), Image.BILINEAR)


def _noise(rng: np.random.Generator, size: int) -> Image.Image:
    kind = rng.choice(["uniform", "gaussian", "salt_pepper"])
    if kind == "uniform":
        arr = rng.integers(0, 256, (size, size, 3))
        if rng.random() < 0.3:
            arr = np.repeat(arr[..., :1], 3, 2)
    elif kind == "gaussian":
        mu, sd = rng.uniform(40, 215, 3), rng.uniform(10, 80)
        arr = rng.normal(mu, sd, (size, size, 3))
        if rng.random() < 0.3:  # low-frequency gaussian noise (blurred, upsampled)
            cells = int(rng.integers(4, 32))
            small = rng.normal(mu, sd, (cells, cells, 3)).clip(0, 255).astype(np.uint8)
            return Image.fromarray(small).resize((size, size), Image.BICUBIC)
    else:
        base = rng.uniform(0, 255, 3) if rng.random() < 0.5 else np.full(3, 128.0)
        arr = np.broadcast_to(base, (size, size, 3)).copy()
        d = rng.uniform(0.05, 0.5)
        u = rng.random((size, size))
        arr[u < d / 2] = 0
        arr[(u >= d / 2) & (u < d)] = 255
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _flat(rng: np.random.Generator, size: int) -> Image.Image:
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return Image.new("RGB", (size, int(size * rng.uniform(0.6, 1.5))), colour)


def _text(rng: np.random.Generator, size: int) -> Image.Image:
    dark = rng.random() < 0.5  # white on black, else black on white
    bg, fg = ((0, 0, 0), (255, 255, 255)) if dark else ((255, 255, 255), (0, 0, 0))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    fs = int(rng.integers(10, 48))
    font = _font(fs)
    y = int(rng.integers(2, 20))
    while y < size - fs // 2:
        line = " ".join(rng.choice(_WORDS, int(rng.integers(1, 9))))
        d.text((int(rng.integers(2, 24)), y), line, fill=fg, font=font)
        y += int(fs * rng.uniform(1.2, 1.8))
    return img


def _screenshot(rng: np.random.Generator, size: int) -> Image.Image:
    w, h = size, int(size * rng.uniform(0.55, 1.0))
    dark = rng.random() < 0.3
    bg = tuple(int(c) for c in (rng.integers(20, 50, 3) if dark else rng.integers(235, 256, 3)))
    fg = (230, 230, 230) if dark else (30, 30, 30)
    accent = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    font = _font(int(rng.integers(9, 16)))
    bar = int(rng.integers(18, 40))
    d.rectangle((0, 0, w, bar), fill=accent if rng.random() < 0.5 else tuple(max(0, c - 25) for c in bg))
    d.text((8, bar // 4), " ".join(rng.choice(_WORDS, 3)), fill=fg, font=font)
    left = 0
    if rng.random() < 0.6:  # a sidebar with menu entries
        left = int(w * rng.uniform(0.15, 0.3))
        d.rectangle((0, bar, left, h), fill=tuple(max(0, c - 15) for c in bg))
        for j in range(int(rng.integers(3, 10))):
            d.text((8, bar + 10 + 22 * j), str(rng.choice(_WORDS)), fill=fg, font=font)
    y = bar + 12
    while y < h - 20:
        r = rng.random()
        x0 = left + 12
        if r < 0.45:  # text lines
            d.text((x0, y), " ".join(rng.choice(_WORDS, int(rng.integers(2, 10)))), fill=fg, font=font)
            y += 18
        elif r < 0.65:  # buttons
            for _ in range(int(rng.integers(1, 4))):
                bw = int(rng.integers(50, 110))
                col = accent if rng.random() < 0.6 else tuple(int(c) for c in rng.integers(0, 256, 3))
                d.rounded_rectangle((x0, y, x0 + bw, y + 24), radius=6, fill=col)
                d.text((x0 + 8, y + 5), str(rng.choice(_WORDS)), fill=(255, 255, 255), font=font)
                x0 += bw + 10
            y += 34
        elif r < 0.8:  # an input box
            d.rectangle((x0, y, min(w - 12, x0 + int(rng.integers(120, 300))), y + 24), outline=fg, fill=bg)
            d.text((x0 + 6, y + 5), str(rng.choice(_WORDS)), fill=(128, 128, 128), font=font)
            y += 34
        else:  # an image placeholder / card
            ch = int(rng.integers(30, 90))
            col = tuple(int(c) for c in rng.integers(0, 256, 3))
            d.rectangle((x0, y, min(w - 12, x0 + int(rng.integers(80, 260))), y + ch), fill=col)
            y += ch + 10
    return img


def synthetic_ood_images(kind: str, n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` seeded RGB images of one OOD ``kind`` (see :data:`OOD_KINDS`).

    ``"photo"``: crops / resizes of scikit-image's sample photos (needs scikit-image); ``"noise"``:
    uniform, gaussian (pixel or low-frequency) and salt-and-pepper noise; ``"flat"``: single colours;
    ``"text"``: PIL-rendered text, black on white or white on black; ``"screenshot"``: synthetic UIs
    (title bar, sidebar, text lines, buttons, input boxes, image cards). Sizes vary (96-640 px).
    """
    if kind not in OOD_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(OOD_KINDS)}")
    rng = np.random.default_rng([seed, OOD_KINDS.index(kind)])
    photos = _photos() if kind == "photo" else []
    if kind == "photo" and not photos:
        raise ValueError("scikit-image's sample photos are not available")
    make = {"noise": _noise, "flat": _flat, "text": _text, "screenshot": _screenshot}
    out = []
    for _ in range(n):
        if kind == "photo":
            out.append(_photo(rng, photos))
        else:
            out.append(make[kind](rng, int(rng.integers(96, 512))))
    return out


def near_distribution_variant(
    img: Image.Image, kind: str, rng: np.random.Generator | None = None
) -> Image.Image:
    """A hard near-distribution case of an in-distribution image: ``"blur"`` (Gaussian, radius ~ 6 % of
    the side), ``"rot90"``, ``"invert"`` (colours), ``"grayscale"`` or ``"jpeg"`` (quality 5)."""
    img = img.convert("RGB")
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=0.06 * max(img.size)))
    if kind == "rot90":
        return img.transpose(Image.Transpose.ROTATE_90)
    if kind == "invert":
        from PIL import ImageOps

        return ImageOps.invert(img)
    if kind == "grayscale":
        return img.convert("L").convert("RGB")
    if kind == "jpeg":
        import io

        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=5)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    raise ValueError(f"unknown variant {kind!r}")
