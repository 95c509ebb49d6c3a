"""Part x pixel-colour evidence for concept search on held-out "colour part" queries.

Word composition over seen concepts fails for held-out "pink breast": units are conjunctive (a red-breast unit
answers neither to "red crown" nor to "orange breast").  This module scores a filter for a "colour part" query
without the held-out concept's own attribute labels:

* part evidence: the filter's evidence for the PART region (the part-name concept, e.g. "breast" on all breast
  pixels whatever their colour; part masks, never attribute labels);
* colour evidence from PIXELS: per filter ``k`` and part slot ``r``, the CIELAB colour of the image pixels where
  ``k``'s upsampled map exceeds its threshold inside slot ``r`` (summed over the fit images), plus a histogram of
  those pixels over a fixed colour palette.

Build pass (bounded memory: every array is summed over images, nothing is kept per image)::

    acc = None
    for maps, labels64, lab64 in batches:                 # (B,C,h,w), (B,S,S) uint8, (B,S,S,3) float
        acc = add_stats(acc, part_colour_stats(maps, labels64, lab64, threshold, n_slots, palette_lab))

Query::

    parsed = parse_colour_part("pink breast", regions)    # -> (rgb, slot) or None
    s = colour_part_scores(part_ev, acc, slot, rgb_to_lab(rgb), palette_lab, sigma=...)   # (C,)

Imports only numpy, torch and the colour tables of :mod:`lavise_core.explain.dissection.lexicon`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lavise_core.explain.dissection.firing import fired_pixels
from lavise_core.explain.dissection.lexicon import BASIC_COLOURS, COLOUR_TABLE, cie94, srgb_to_lab

__all__ = [
    "add_stats",
    "colour_mean",
    "colour_part_scores",
    "default_palette",
    "images_to_lab",
    "parse_colour_part",
    "part_colour_stats",
    "rank_colour_part",
    "rgb_to_lab",
]


def rgb_to_lab(rgb: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(..., 3)`` sRGB 0..255 -> ``(..., 3)`` float32 CIELAB (D65)."""
    a = np.asarray(rgb, np.float64)
    return srgb_to_lab(a.reshape(-1, 3)).reshape(a.shape).astype(np.float32)


def images_to_lab(images: Sequence, crop_boxes: Sequence[tuple[float, float, float, float]], size: int = 64):
    """PIL RGB images -> ``(B, size, size, 3)`` float32 CIELAB, cropped like the network input.

    ``crop_boxes[i]`` = ``LoadedModel.crop_box(W, H)``; the crop is resized with a box filter (pixel averaging)
    to the label-map evaluation size, the same geometry as ``dissection.crop_label_map``.
    """
    from PIL import Image

    out = np.zeros((len(images), size, size, 3), np.float32)
    for i, (im, box) in enumerate(zip(images, crop_boxes, strict=True)):
        x0, y0, x1, y1 = (round(v) for v in box)
        w, h = im.size
        c = im.convert("RGB").crop((max(0, x0), max(0, y0), min(w, x1), min(h, y1)))
        out[i] = rgb_to_lab(np.asarray(c.resize((size, size), Image.BOX), np.float32))
    return out


def default_palette(extra: Sequence[str] = ()) -> tuple[list[str], np.ndarray]:
    """Names and ``(P, 3)`` Lab of the histogram palette: Berlin & Kay's 11 basic colour terms plus ``extra``
    colour names found in the XKCD/CSS table (e.g. a vocabulary's "teal"); RGB from the table, never from a
    data generator."""
    names = list(dict.fromkeys([*BASIC_COLOURS, *[e for e in extra if e in COLOUR_TABLE]]))
    return names, rgb_to_lab(np.array([COLOUR_TABLE[n] for n in names], np.float64))


def part_colour_stats(
    maps: np.ndarray | torch.Tensor,
    labels64: np.ndarray,
    images_lab64: np.ndarray,
    threshold: np.ndarray,
    n_slots: int,
    palette_lab: np.ndarray | None = None,
    k_l: float = 3.0,
    fired: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Colour of each filter's firing pixels per part slot, SUMMED over the batch (accumulate with add_stats).

    Args:
        maps: ``(B, C, h, w)`` layer maps; upsampled bilinearly to ``S x S`` (``align_corners=False``) and
            thresholded at ``threshold`` exactly as ``dissection.region_overlap`` / the G_k rule.
        labels64: ``(B, S, S)`` integer label maps (0 = outside the bird, r = part slot r).
        images_lab64: ``(B, S, S, 3)`` CIELAB of the same crop (:func:`images_to_lab`).
        threshold: ``(C,)`` per-filter thresholds (``probe/threshold``).
        n_slots: ``R + 1``.
        palette_lab: optional ``(P, 3)`` Lab palette; each pixel votes for its nearest entry (CIE94, ``k_l``).
        fired: ``firing.fired_pixels`` of ``maps`` at size ``S``, when the caller already has it.

    Returns:
        ``{"lab_sum": (C, R+1, 3) float64, "count": (C, R+1) float64, "hist": (C, R+1, P) float64 (only with a
        palette), "slot_lab_sum": (R+1, 3), "slot_area": (R+1,)}`` -- Σ over images and pixels of
        ``1[A_k > thr_k] 1[label = r] * Lab``; ``count`` equals ``Σ_b inter`` of ``region_overlap``.
        Work and memory grow with the firing pixels (about 0.5 % of ``B × C × S²``), not with every pixel.
    """
    b, c = maps.shape[:2]
    s = labels64.shape[-1]
    bi, ci, p = fired if fired is not None else fired_pixels(maps, threshold, s)
    bi, ci, p = bi.numpy(), ci.numpy(), p.numpy()
    lab = np.asarray(labels64, np.int64).reshape(b, s * s).clip(0, n_slots - 1)
    col = np.asarray(images_lab64, np.float32).reshape(b, s * s, 3)
    cell = ci * n_slots + lab[bi, p]  # (filter, slot) of every firing pixel
    out = {
        "count": np.bincount(cell, minlength=c * n_slots).reshape(c, n_slots).astype(np.float64),
        "lab_sum": np.stack(
            [np.bincount(cell, col[bi, p, j], minlength=c * n_slots).reshape(c, n_slots) for j in range(3)], 2
        ),
        "slot_area": np.bincount(lab.reshape(-1), minlength=n_slots).astype(np.float64),
        "slot_lab_sum": np.stack(
            [np.bincount(lab.reshape(-1), col[..., j].reshape(-1), minlength=n_slots) for j in range(3)], 1
        ),
    }
    if palette_lab is not None:
        n_pal = len(palette_lab)
        where = np.unique(
            bi * (s * s) + p
        )  # the pixels where some filter fires: only these need a colour name
        near = np.zeros(b * s * s, np.int64)
        near[where] = np.argmin(cie94(col.reshape(-1, 3)[where], palette_lab, k_l), 1)
        hist = np.bincount(cell * n_pal + near[bi * (s * s) + p], minlength=c * n_slots * n_pal)
        out["hist"] = hist.reshape(c, n_slots, n_pal).astype(np.float64)
    return out


def add_stats(acc: dict[str, np.ndarray] | None, new: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Running sum of :func:`part_colour_stats` outputs (``acc=None`` starts)."""
    if acc is None:
        return {k: v.copy() for k, v in new.items()}
    return {k: acc[k] + new[k] for k in acc}


def colour_mean(stats: dict[str, np.ndarray], min_count: float = 1.0) -> np.ndarray:
    """``(C, R+1, 3)`` mean Lab of each filter's firing pixels per slot; NaN where ``count < min_count``."""
    cnt = stats["count"][..., None]
    return np.where(cnt >= min_count, stats["lab_sum"] / np.maximum(cnt, 1e-9), np.nan).astype(np.float32)


def colour_part_scores(
    part_evidence: np.ndarray,
    stats: dict[str, np.ndarray],
    slot: int,
    query_lab: np.ndarray,
    sigma: float = 20.0,
    mode: str = "mean",
    palette_lab: np.ndarray | None = None,
    k_l: float = 3.0,
    min_count: float = 50.0,
    power: float = 1.0,
) -> np.ndarray:
    """Score ``(C,)`` of every filter for the query "<colour> <part>".

    Args:
        part_evidence: ``(C,)`` the filters' evidence for the part region (data-set-wide IoU, expected top-10 IoU
            or G-rate of the part-name concept), >= 0.
        stats: accumulated :func:`part_colour_stats` (``count``, ``lab_sum``, optionally ``hist``).
        slot: the part's label slot r (1..R).
        query_lab: ``(3,)`` Lab of the query colour (:func:`rgb_to_lab` of the XKCD/CSS RGB).
        mode: ``"mean"``: colour sim = exp(-ΔE94(mean Lab of k in r, query) / sigma);
            ``"hist"``: colour sim = fraction of k's firing pixels in r whose nearest palette colour is the query
            colour's nearest palette colour (needs ``hist`` and ``palette_lab``).
        min_count: filters with fewer firing pixels in the slot over the fit set get colour sim 0.
        power: score = part_evidence ** power * colour sim.
    """
    cnt = stats["count"][:, slot]
    q = np.asarray(query_lab, np.float64).reshape(1, 3)
    if mode == "mean":
        mu = stats["lab_sum"][:, slot] / np.maximum(cnt[:, None], 1e-9)
        sim = np.exp(-cie94(mu, q, k_l)[:, 0] / sigma)
    elif mode == "hist":
        j = int(np.argmin(cie94(np.asarray(palette_lab, np.float64), q, k_l)[:, 0]))
        sim = stats["hist"][:, slot, j] / np.maximum(cnt, 1e-9)
    else:
        raise ValueError(mode)
    sim = np.where(cnt >= min_count, sim, 0.0)
    return (np.maximum(np.asarray(part_evidence, np.float64), 0) ** power * sim).astype(np.float32)


def parse_colour_part(
    text: str, regions: Sequence[str], colour_table: dict[str, tuple[int, int, int]] | None = None
) -> tuple[np.ndarray, int, str, str] | None:
    """``"pink breast"`` -> ``(rgb (3,), slot r = regions.index(part) + 1, colour name, part)`` or None.

    The query (after ``lexicon.rewrite_query``) must contain exactly one part name of ``regions`` and a colour
    name of ``colour_table`` (default XKCD + CSS); multi-word colour names are matched longest first. Queries
    with any other content word (patterns, shapes: "striped breast") return None -> use the composed path.
    """
    table = COLOUR_TABLE if colour_table is None else colour_table
    w = str(text).lower().replace("-", " ").split()
    parts = [j for j, t in enumerate(w) if t in regions]
    if len(parts) != 1:
        return None
    rest = [t for j, t in enumerate(w) if j != parts[0]]
    name = " ".join(rest)
    if not rest or name not in table:
        return None
    return np.asarray(table[name], np.float64), list(regions).index(w[parts[0]]) + 1, name, w[parts[0]]


def rank_colour_part(
    text: str,
    regions: Sequence[str],
    part_evidence: dict[str, np.ndarray],
    stats: dict[str, np.ndarray],
    palette_lab: np.ndarray,
    n: int = 5,
    floor: float = 0.0,
    mode: str = "hist",
    power: float = 0.5,
    min_count: float = 20.0,
    sigma: float = 5.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Colour path for a (lexicon-rewritten) query -> ``(filters (m,), scores (m,), ranked (n,))`` or None.

    None when the text is not "<colour> <part>" (use the composed path). ``part_evidence[part]`` = ``(C,)``
    evidence of the part-name concept (e.g. ``qi.iou[qi.concepts.index(part)]``, the expected top-10 IoU);
    ``filters`` = the top-``n`` with score >= ``floor`` (empty -> abstain), ``ranked`` = the unfloored top-n.
    Defaults = the settings chosen on TRAIN (RESULTS.md: hist mode, power 0.5, min_count 20 px).
    """
    p = parse_colour_part(text, regions)
    if p is None:
        return None
    rgb, slot, _, part = p
    s = colour_part_scores(
        part_evidence[part], stats, slot, rgb_to_lab(rgb), sigma=sigma, mode=mode,
        palette_lab=palette_lab, min_count=min_count, power=power,
    )  # fmt: skip
    ranked = np.argsort(-s, kind="stable")[:n]
    keep = ranked[s[ranked] >= floor]
    return keep.astype(np.int64), s[keep], ranked.astype(np.int64)
