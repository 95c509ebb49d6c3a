"""Draw docs/synthbirds_examples.png: one SynthBirds example per species, part masks overlaid, one caption each.

Usage: python scripts/make_synthbirds_figure.py [--out docs/synthbirds_examples.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lavise_core.data.dataset import atomic_write_bytes
from lavise_core.data.synthbirds import REGIONS, SPECIES, render_synthbird

# one distinct colour per region (tab10-like), for the overlay and the legend
REGION_COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
]
TILE, COLS = 192, 4


def _font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for root in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts"):
        p = Path(root) / name
        if p.is_file():
            return ImageFont.truetype(str(p), size)
    return ImageFont.load_default()


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend region colours over ``image`` ``(H, W, 3)`` where ``mask`` ``(H, W)`` > 0; outline each region."""
    out = image.astype(np.float32).copy()
    pal = np.array([(0, 0, 0), *REGION_COLOURS], np.float32)
    m = mask > 0
    out[m] = (1 - alpha) * out[m] + alpha * pal[mask[m]]
    edge = np.zeros_like(m)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    out[edge & (m | np.roll(m, 1, 0) | np.roll(m, 1, 1))] = 255
    return out.astype(np.uint8)


def make_figure(seed: int = 0, image_size: int = 128) -> Image.Image:
    names = list(SPECIES)
    rows = (len(names) + COLS - 1) // COLS
    cell_w, cell_h = 2 * TILE + 12, TILE + 118
    legend_h = 40
    fig = Image.new("RGB", (COLS * cell_w + 12, rows * cell_h + legend_h + 12), "white")
    draw = ImageDraw.Draw(fig)
    f_title, f_text = _font(15, bold=True), _font(13)
    for k, name in enumerate(names):
        # the first image of species k in the set (ids k, k + 12, ...) whose bird is fully visible
        for i in range(k, k + 12 * 20, 12):
            image, mask, rec = render_synthbird(i, seed=seed, image_size=image_size)
            if not rec.meta["occluded_parts"] and rec.meta["blur"] == 0:
                break
        x0, y0 = 12 + (k % COLS) * cell_w, 12 + (k // COLS) * cell_h
        draw.text((x0, y0), name, fill=(20, 20, 20), font=f_title)
        big = Image.fromarray(image).resize((TILE, TILE), Image.Resampling.LANCZOS)
        ov = Image.fromarray(overlay(image, mask)).resize((TILE, TILE), Image.Resampling.NEAREST)
        fig.paste(big, (x0, y0 + 22))
        fig.paste(ov, (x0 + TILE + 4, y0 + 22))
        defining = ", ".join(f"{v} {s.split('.')[0]}" for s, v in SPECIES[name].items())
        draw.text((x0, y0 + 26 + TILE), f"species: {defining}", fill=(150, 40, 40), font=f_text)
        caption = "“" + rec.captions[0] + "”"
        for j, line in enumerate(textwrap.wrap(caption, width=50)[:4]):
            draw.text((x0, y0 + 44 + TILE + 16 * j), line, fill=(40, 40, 40), font=f_text)
    ly = rows * cell_h + 16
    x = 12
    draw.text((x, ly), "masks:", fill=(20, 20, 20), font=f_title)
    x += 70
    for reg, col in zip(REGIONS, REGION_COLOURS, strict=True):
        draw.rectangle([x, ly + 2, x + 16, ly + 18], fill=col)
        draw.text((x + 21, ly + 1), reg, fill=(20, 20, 20), font=f_text)
        x += 30 + int(draw.textlength(reg, font=f_text)) + 14
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/synthbirds_examples.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import io

    buf = io.BytesIO()
    make_figure(args.seed).save(buf, format="PNG", optimize=True)
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
