"""Importers: turn real image data sets into the probe data set format of :mod:`lavise_core.data.dataset`.

Three sources are supported (see ``docs/importing.md`` for the folder layouts and commands):

- :func:`import_image_folder`: a folder of images, one sub-folder per class (or a flat folder of
  unlabeled images);
- :func:`import_cub`: CUB-200-2011 (labels, split, attribute labels turned into phrases, part
  keypoints, boxes, optional Reed et al. ``text_c10`` captions and optional bird segmentations);
- :func:`import_coco`: MS-COCO captions and/or instances (category label maps rasterised from
  polygons, uncompressed RLE and compressed RLE).

Images are never re-encoded. With ``link="symlink"`` (the default) the importer makes one symbolic
link ``OUT/images`` to the absolute, resolved source image directory, and manifest paths read
``images/<path inside the source>``: the data set directory can live anywhere, but the source
must stay where it is. With ``link="copy"`` the selected image files are copied into
``OUT/images/`` and the data set is self-contained.

Files that cannot be used (unreadable images, missing files, bad masks) are skipped, logged, and
listed in ``ProbeDataset.meta["skipped"]`` as ``{"path": ..., "reason": ...}``; a malformed
annotation file is an error naming the file and the line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lavise_core.data.dataset import (
    DatasetError,
    ImageRecord,
    ProbeDataset,
    atomic_write_bytes,
    write_dataset,
)

__all__ = [
    "BRODEN_MAJORITY",
    "BRODEN_META_COLUMNS",
    "BRODEN_PRIORITY",
    "CUB_PARTS",
    "IMAGE_EXTENSIONS",
    "LINK_MODES",
    "Skipped",
    "broden_regions",
    "clean_class_name",
    "cub_attribute_phrase",
    "decode_coco_segmentation",
    "decode_rle",
    "encode_rle",
    "import_broden",
    "import_coco",
    "import_cub",
    "import_image_folder",
    "rasterize_polygons",
    "rle_from_string",
    "rle_to_string",
    "safe_id",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LINK_MODES = ("symlink", "copy")
IMAGES_DIR = "images"
MASKS_DIR = "masks"

#: The 15 part names of CUB-200-2011 (``parts/parts.txt``), in part-id order.
CUB_PARTS = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)


@dataclass(frozen=True)
class Skipped:
    """A source file an importer left out, and why."""

    path: str
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


# ====================================================================== small shared helpers


def safe_id(text: str) -> str:
    """A file-name safe id: path separators become ``__``, other unsafe characters ``_``.

    >>> safe_id("cat/img 1.jpg")
    'cat__img_1.jpg'
    """
    text = text.replace("\\", "/").strip("/")
    text = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in text.split("/"))
    text = text.lstrip(".")
    return text or "_"


def clean_class_name(name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"black footed albatross"`` (number prefix, ``_`` and case)."""
    name = re.sub(r"^\d+[._-]", "", name.strip())
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def _unique_ids(keys: Sequence[str]) -> list[str]:
    """``safe_id`` of each key; keys whose safe ids collide get a short hash of the key appended.

    The hash depends only on the key itself, so an id does not change with the order of the files.
    """
    base = [safe_id(k) for k in keys]
    counts: dict[str, int] = defaultdict(int)
    for b in base:
        counts[b] += 1
    return [
        b if counts[b] == 1 else f"{b}-{hashlib.sha1(k.encode('utf-8')).hexdigest()[:8]}"
        for b, k in zip(base, keys, strict=True)
    ]


def _check_out(src: Path, out: Path) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise DatasetError(
            f"the output directory {out} lies inside the source {src}: choose an --out outside it, "
            "or the next import would read the data set as images"
        )


def _reference_images(src_dir: Path, out: Path, rel_paths: Iterable[str], link: str) -> None:
    """Make ``out/images/<rel>`` point at ``src_dir/<rel>``: one directory symlink, or file copies."""
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {LINK_MODES}, not {link!r}")
    out.mkdir(parents=True, exist_ok=True)
    dest = out / IMAGES_DIR
    if link == "symlink":
        if dest.is_symlink():
            dest.unlink()
        elif dest.exists():
            raise DatasetError(
                f"{dest} already exists and is not a symbolic link (an earlier import with --link copy?): "
                "remove it or choose another --out"
            )
        try:
            os.symlink(src_dir.resolve(), dest, target_is_directory=True)
        except OSError as e:
            raise DatasetError(
                f"cannot create the symbolic link {dest} -> {src_dir.resolve()} ({e}); "
                "import with --link copy instead"
            ) from e
        return
    if dest.is_symlink():
        dest.unlink()
    for rel in rel_paths:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_dir / rel, target)


def _tqdm(it, *, progress: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, disable=not progress, unit="img")


def _write_mask(out: Path, rec_id: str, label_map: np.ndarray) -> str:
    """Write a region label map PNG (uint8, or uint16 for more than 255 regions); return its relative path."""
    from PIL import Image

    rel = f"{MASKS_DIR}/{rec_id}.png"
    if label_map.dtype == np.uint8:
        im = Image.fromarray(label_map, mode="L")
    else:
        im = Image.fromarray(label_map.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(out / rel, buf.getvalue())
    return rel


def _log_skipped(skipped: list[Skipped], source: str) -> None:
    for s in skipped:
        log.warning("%s import: skipped %s: %s", source, s.path, s.reason)


# ====================================================================== image folder


def _readable(path: Path, label: str) -> tuple[tuple[int, int] | None, str]:
    """Decode an image with :func:`lavise_core.data.images.load_image` (what the probe pass will do).

    Returns ``((width, height), "")`` of the upright image, or ``(None, reason)``.
    """
    from lavise_core.data.images import ImageLoadError, load_image

    try:
        im = load_image(path, name=label)
    except ImageLoadError as e:
        return None, str(e)
    except Exception as e:  # anything else PIL raises for a broken file: report, do not abort the import
        return None, f"{label}: cannot decode ({type(e).__name__}: {e})"
    return im.size, ""


def _split_by_hash(ids: Sequence[str], groups: Sequence[int], test_fraction: float, seed: int) -> list[str]:
    """Per group, the ``round(n * test_fraction)`` ids with the smallest ``sha256(seed:id)`` go to test.

    Deterministic, stratified, and stable: adding a file moves at most one other file per group.
    """
    split = ["train"] * len(ids)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    for idx in members.values():
        ranked = sorted(idx, key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest())
        n_test = round(len(idx) * test_fraction)
        for i in ranked[:n_test]:
            split[i] = "test"
    return split


def import_image_folder(
    src: Path,
    out: Path,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    link: str = "symlink",
    progress: bool = True,
) -> ProbeDataset:
    """Import a folder of images: one sub-folder per class, or a flat folder of unlabeled images.

    - Classes are the sorted names of the first-level sub-folders that hold at least one image
      (searched recursively; hidden files and folders are ignored). Images directly in ``src``
      get label ``-1`` (unknown): a flat folder gives ``classes == []`` and every label ``-1``.
    - Images are files with extensions in :data:`IMAGE_EXTENSIONS` (case-insensitive). Each is
      decoded once; unreadable ones are skipped and listed in ``meta["skipped"]``.
    - Ids are the relative paths made file-name safe (``cat/img 1.jpg`` -> ``cat__img_1.jpg``).
    - Split: per class, ``round(n * test_fraction)`` images chosen by a seeded hash go to
      ``"test"``, the rest to ``"train"`` (deterministic, independent of file order).
    - Caption side-cars: ``photo.txt`` beside ``photo.jpg`` is read as one caption per line.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"{src} is not a directory: give a folder of images (one sub-folder per class)")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    _check_out(src, out)

    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(src).parts)

    files = sorted(
        (p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and visible(p) and p.is_file()),
        key=lambda p: p.relative_to(src).as_posix(),
    )
    if not files:
        raise DatasetError(
            f"no images in {src}: expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))} "
            "in class sub-folders (SRC/<class>/<image>) or directly in SRC"
        )
    rels = [p.relative_to(src).as_posix() for p in files]
    classes = sorted({r.split("/")[0] for r in rels if "/" in r})
    class_index = {c: i for i, c in enumerate(classes)}

    kept: list[tuple[str, int, tuple[int, int], list[str]]] = []
    skipped: list[Skipped] = []
    for path, rel in _tqdm(
        zip(files, rels, strict=True), progress=progress, desc="check images", total=len(files)
    ):
        size, reason = _readable(path, rel)
        if size is None:
            skipped.append(Skipped(rel, reason))
            continue
        label = class_index[rel.split("/")[0]] if "/" in rel else -1
        side = path.with_suffix(".txt")
        captions = _read_caption_file(side) if side.is_file() else []
        kept.append((rel, label, size, captions))
    _log_skipped(skipped, "folder")
    if not kept:
        raise DatasetError(
            f"none of the {len(files)} image files in {src} could be decoded (first: {skipped[0].reason})"
        )

    ids = _unique_ids([k[0] for k in kept])
    splits = _split_by_hash(ids, [k[1] for k in kept], test_fraction, seed)
    records = [
        ImageRecord(
            id=rid,
            path=f"{IMAGES_DIR}/{rel}",
            split=sp,
            label=label,
            captions=caps,
            meta={"width": size[0], "height": size[1]},
        )
        for rid, sp, (rel, label, size, caps) in zip(ids, splits, kept, strict=True)
    ]
    _reference_images(src, out, [k[0] for k in kept], link)
    return write_dataset(
        out,
        name=src.resolve().name,
        source="folder",
        classes=classes,
        records=records,
        meta={
            "source_dir": str(src.resolve()),
            "link": link,
            "test_fraction": test_fraction,
            "seed": seed,
            "unlabeled": sum(1 for k in kept if k[1] == -1),
            "skipped": [s.to_json() for s in skipped],
        },
    )


def _read_caption_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


# ====================================================================== CUB-200-2011

_CUB_PART_NOUN = {
    "bill": "bill",
    "wing": "wing",
    "upperparts": "upperparts",
    "underparts": "underparts",
    "breast": "breast",
    "back": "back",
    "tail": "tail",
    "upper_tail": "upper tail",
    "under_tail": "under tail",
    "head": "head",
    "throat": "throat",
    "eye": "eye",
    "forehead": "forehead",
    "nape": "nape",
    "belly": "belly",
    "primary": "body",
    "leg": "leg",
    "crown": "crown",
}

#: Which CUB parts (regions) an attribute group describes; whole-bird groups map to "bird".
_CUB_GROUP_REGIONS = {
    "bill": ("beak",),
    "wing": ("left wing", "right wing"),
    "upperparts": ("back", "nape"),
    "underparts": ("breast", "belly"),
    "breast": ("breast",),
    "back": ("back",),
    "tail": ("tail",),
    "upper_tail": ("tail",),
    "under_tail": ("tail",),
    "head": ("crown", "forehead"),
    "throat": ("throat",),
    "eye": ("left eye", "right eye"),
    "forehead": ("forehead",),
    "nape": ("nape",),
    "belly": ("belly",),
    "leg": ("left leg", "right leg"),
    "crown": ("crown",),
    "primary": ("bird",),
    "size": ("bird",),
    "shape": ("bird",),
}

_CUB_SPECIAL = {
    # bill shape
    "has_bill_shape::curved_(up_or_down)": "curved bill",
    "has_bill_shape::dagger": "dagger-shaped bill",
    "has_bill_shape::needle": "needle-shaped bill",
    "has_bill_shape::cone": "cone-shaped bill",
    # bill length
    "has_bill_length::about_the_same_as_head": "medium-length bill",
    "has_bill_length::longer_than_head": "long bill",
    "has_bill_length::shorter_than_head": "short bill",
    # head pattern
    "has_head_pattern::malar": "malar stripe",
    "has_head_pattern::unique_pattern": "uniquely patterned head",
    "has_head_pattern::eyebrow": "eyebrow stripe",
    "has_head_pattern::eyering": "eye ring",
    "has_head_pattern::eyeline": "eye line",
    # shape (whole bird)
    "has_shape::upright-perching_water-like": "upright-perching water bird",
    "has_shape::chicken-like-marsh": "chicken-like marsh bird",
    "has_shape::long-legged-like": "long-legged bird",
    "has_shape::tree-clinging-like": "tree-clinging bird",
    "has_shape::upland-ground-like": "upland ground bird",
    "has_shape::perching-like": "perching bird",
    # size
    "has_size::medium_(9_-_16_in)": "medium-sized bird",
}


def _cub_group(name: str) -> str:
    """``"has_upper_tail_color::red"`` -> ``"upper_tail"``; ``"has_size::small_(5_-_9_in)"`` -> ``"size"``."""
    group = name.split("::", 1)[0]
    group = group.removeprefix("has_")
    return re.sub(r"_(color|pattern|shape|length)$", "", group)


def cub_attribute_phrase(name: str) -> str:
    """Readable phrase for a CUB attribute name.

    ``has_wing_color::red`` -> ``red wing``; ``has_bill_shape::hooked`` -> ``hooked bill``;
    ``has_wing_pattern::striped`` -> ``striped wing``; ``has_tail_shape::forked_tail`` -> ``forked tail``;
    ``has_wing_shape::pointed-wings`` -> ``pointed wing``; ``has_size::small_(5_-_9_in)`` -> ``small bird``;
    ``has_shape::duck-like`` -> ``duck-like bird``; ``has_primary_color::red`` -> ``red body``.
    Unknown groups fall back to ``"<value> <part>"``.
    """
    name = name.strip()
    if name in _CUB_SPECIAL:
        return _CUB_SPECIAL[name]
    if "::" not in name:
        return re.sub(r"\s+", " ", name.replace("_", " ")).strip()
    group_raw, value = name.split("::", 1)
    group = _cub_group(name)
    value = re.sub(r"\(.*?\)", "", value)  # "small_(5_-_9_in)" -> "small_"
    value = re.sub(r"[\s_]+", " ", value).strip()
    if group in ("size", "shape"):
        return f"{value} bird"
    if group_raw.endswith("_shape") and group in ("tail", "wing"):
        value = re.sub(r"[ -](tail|wings?)$", "", value)  # "forked_tail", "pointed-wings"
    noun = _CUB_PART_NOUN.get(group, group.replace("_", " "))
    return f"{value} {noun}"


class _LineReader:
    """Whitespace-split lines of one annotation file with errors naming the file and line."""

    def __init__(self, path: Path, what: str):
        if not path.is_file():
            raise DatasetError(f"{path} is missing: it should contain {what}")
        self.path, self.what = path, what

    def rows(self, min_fields: int, max_split: int = -1) -> Iterable[tuple[int, list[str]]]:
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                fields = line.split(None, max_split) if max_split > 0 else line.split()
                if len(fields) < min_fields:
                    self.fail(lineno, f"expected at least {min_fields} fields, found {len(fields)}")
                yield lineno, [f.strip() for f in fields]

    def fail(self, lineno: int, why: str):
        raise DatasetError(f"{self.path}: line {lineno}: {why} (the file should contain {self.what})")

    def as_int(self, lineno: int, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            self.fail(lineno, f"{text!r} is not an integer")

    def as_float(self, lineno: int, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            self.fail(lineno, f"{text!r} is not a number")

    def id_map(self) -> dict[int, str]:
        """``<id> <text with spaces>`` lines -> ``{id: text}``."""
        out: dict[int, str] = {}
        for lineno, (i, text) in self.rows(2, max_split=1):
            out[self.as_int(lineno, i)] = text
        return out


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the OS cannot look up (over 255 bytes, a NUL byte): such an
    annotation names no file we could read (atheris found a 100-byte-character CUB image name)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _find_first(paths: Sequence[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def import_cub(
    src: Path,
    out: Path,
    *,
    captions: Path | None = None,
    segmentations: Path | None = None,
    min_certainty: int = 1,
    link: str = "symlink",
    progress: bool = True,
) -> ProbeDataset:
    """Import CUB-200-2011 from its extracted ``CUB_200_2011/`` directory.

    Required: ``images.txt``, ``classes.txt``, ``image_class_labels.txt``, ``train_test_split.txt``
    and ``images/``. Used when present: ``attributes/image_attribute_labels.txt`` with
    ``attributes.txt`` (in ``src``, ``src/attributes/`` or ``src``'s parent, where the official
    archive puts it), ``parts/parts.txt`` + ``parts/part_locs.txt``, ``bounding_boxes.txt``.

    - label = class id - 1; classes cleaned (``"001.Black_footed_Albatross"`` -> ``"black footed albatross"``);
      split = ``train`` where ``is_training_image`` is 1, else ``test``.
    - attributes: phrases (:func:`cub_attribute_phrase`) of attributes with ``is_present == 1``
      and ``certainty_id >= min_certainty`` (1 not visible, 2 guessing, 3 probably, 4 definitely);
      extra columns after the fourth are ignored.
    - keypoints: visible parts only, ``[x, y]`` in pixels as given; regions = the 15 part names
      (plus ``"bird"`` when ``segmentations`` is given). ``region_concepts``: for each visible
      part, the phrases of the attribute groups about it.
    - bbox: ``[x, y, x + width, y + height]``.
    - captions: ``<captions>/<class folder>/<image name>.txt`` (``captions`` may be ``text_c10``
      itself or its parent).
    - segmentations: ``<segmentations>/<class folder>/<image name>.png`` (grey, soft); pixels
      ``>= 128`` become the region ``"bird"`` of a label map written to ``masks/<id>.png``.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"{src} is not a directory: give the extracted CUB_200_2011 folder")
    _check_out(src / "images", out)
    images_dir = src / "images"

    images = _LineReader(src / "images.txt", "'<image_id> <class folder>/<file name>' per image").id_map()
    class_dirs = _LineReader(
        src / "classes.txt", "'<class_id> <class folder>' per class, e.g. '1 001.Black_footed_Albatross'"
    ).id_map()
    lab_reader = _LineReader(src / "image_class_labels.txt", "'<image_id> <class_id>' per image")
    labels = {lab_reader.as_int(n, f[0]): lab_reader.as_int(n, f[1]) for n, f in lab_reader.rows(2)}
    split_reader = _LineReader(src / "train_test_split.txt", "'<image_id> <is_training_image>' per image")
    is_train = {split_reader.as_int(n, f[0]): split_reader.as_int(n, f[1]) for n, f in split_reader.rows(2)}
    if not images_dir.is_dir():
        raise DatasetError(
            f"{images_dir} is missing: it should hold the CUB images as <class folder>/<file name>.jpg"
        )

    class_ids = sorted(class_dirs)
    class_pos = {cid: i for i, cid in enumerate(class_ids)}
    classes = [clean_class_name(class_dirs[c]) for c in class_ids]
    notes: list[str] = []

    # ---- attributes
    attr_names: dict[int, str] = {}
    present: dict[int, list[int]] = defaultdict(list)
    labels_path = src / "attributes" / "image_attribute_labels.txt"
    names_path = _find_first(
        [src / "attributes.txt", src / "attributes" / "attributes.txt", src.parent / "attributes.txt"]
    )
    if labels_path.is_file():
        if names_path is None:
            raise DatasetError(
                f"{labels_path} is there but attributes.txt is not (looked in {src}, {src / 'attributes'} and "
                f"{src.parent}): it should contain '<attribute_id> <name>' lines like '1 has_bill_shape::curved_(up_or_down)'"
            )
        attr_names = _LineReader(
            names_path, "'<attribute_id> <name>' lines like '1 has_bill_shape::curved_(up_or_down)'"
        ).id_map()
        r = _LineReader(labels_path, "'<image_id> <attribute_id> <is_present> <certainty_id> <time>' lines")
        for n, f in r.rows(4):
            img, att, is_present, certainty = (r.as_int(n, x) for x in f[:4])
            if is_present == 1 and certainty >= min_certainty:
                if att not in attr_names:
                    r.fail(n, f"attribute id {att} is not in {names_path}")
                present[img].append(att)
    else:
        notes.append(f"{labels_path} not found: no attribute labels")
    phrase_of = {a: cub_attribute_phrase(n) for a, n in attr_names.items()}
    group_of = {a: _cub_group(n) for a, n in attr_names.items()}

    # ---- parts and boxes
    part_names: dict[int, str] = {}
    part_locs: dict[int, dict[str, list[float]]] = defaultdict(dict)
    parts_path = src / "parts" / "parts.txt"
    if parts_path.is_file():
        part_names = {
            k: v.strip()
            for k, v in _LineReader(parts_path, "'<part_id> <part name>' lines like '1 back'")
            .id_map()
            .items()
        }
        r = _LineReader(src / "parts" / "part_locs.txt", "'<image_id> <part_id> <x> <y> <visible>' lines")
        for n, f in r.rows(5):
            img, part, visible = r.as_int(n, f[0]), r.as_int(n, f[1]), r.as_int(n, f[4])
            if part not in part_names:
                r.fail(n, f"part id {part} is not in {parts_path}")
            if visible == 1:
                part_locs[img][part_names[part]] = [r.as_float(n, f[2]), r.as_float(n, f[3])]
    else:
        notes.append(f"{parts_path} not found: no keypoints")
    regions = [part_names[k] for k in sorted(part_names)] if part_names else list(CUB_PARTS)
    if segmentations is not None:
        segmentations = Path(segmentations)
        if not segmentations.is_dir():
            raise DatasetError(
                f"{segmentations} is not a directory: it should hold <class folder>/<image name>.png masks"
            )
        regions.append("bird")

    boxes: dict[int, list[float]] = {}
    bb_path = src / "bounding_boxes.txt"
    if bb_path.is_file():
        r = _LineReader(bb_path, "'<image_id> <x> <y> <width> <height>' lines")
        for n, f in r.rows(5):
            x, y, w, h = (r.as_float(n, v) for v in f[1:5])
            boxes[r.as_int(n, f[0])] = [x, y, x + w, y + h]
    else:
        notes.append(f"{bb_path} not found: no boxes")

    cap_dir = None
    if captions is not None:
        cap_dir = Path(captions)
        if (cap_dir / "text_c10").is_dir():
            cap_dir = cap_dir / "text_c10"
        if not cap_dir.is_dir():
            raise DatasetError(
                f"{captions} is not a directory: it should be text_c10/ with <class folder>/<image name>.txt files"
            )

    # ---- records
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    no_captions = 0
    for img in _tqdm(sorted(images), progress=progress, desc="CUB images", total=len(images)):
        rel = images[img]
        if img not in labels:
            raise DatasetError(
                f"{src / 'image_class_labels.txt'}: no class for image {img} ({rel}) of images.txt"
            )
        if labels[img] not in class_pos:
            raise DatasetError(
                f"{src / 'image_class_labels.txt'}: image {img} has class {labels[img]}, not in classes.txt"
            )
        if img not in is_train:
            raise DatasetError(
                f"{src / 'train_test_split.txt'}: no split for image {img} ({rel}) of images.txt"
            )
        if not _is_file(images_dir / rel):
            skipped.append(Skipped(f"images/{rel}", "file not found"))
            continue
        stem = rel.rsplit(".", 1)[0]
        rid = f"{img:05d}_{safe_id(stem.split('/')[-1])}"
        phrases = list(dict.fromkeys(phrase_of[a] for a in present.get(img, [])))
        kps = part_locs.get(img, {})
        visible_regions = set(kps)
        mask_rel = None
        if segmentations is not None:
            mask_rel, why = _cub_mask(images_dir / rel, segmentations / f"{stem}.png", out, rid, regions)
            if mask_rel is None:
                skipped.append(Skipped(f"segmentations/{stem}.png", why + " (image kept without mask)"))
            else:
                visible_regions.add("bird")
        rc: dict[str, list[str]] = defaultdict(list)
        for a in present.get(img, []):
            for region in _CUB_GROUP_REGIONS.get(group_of[a], ()):
                if region in visible_regions and phrase_of[a] not in rc[region]:
                    rc[region].append(phrase_of[a])
        caps: list[str] = []
        if cap_dir is not None:
            cp = cap_dir / f"{stem}.txt"
            if _is_file(cp):
                caps = _read_caption_file(cp)
            else:
                no_captions += 1
        records.append(
            ImageRecord(
                id=rid,
                path=f"{IMAGES_DIR}/{rel}",
                split="train" if is_train[img] == 1 else "test",
                label=class_pos[labels[img]],
                attributes=phrases,
                captions=caps,
                mask=mask_rel,
                region_concepts={k: v for k, v in rc.items() if v},
                keypoints=kps,
                bbox=boxes.get(img),
                meta={"cub_image_id": img, "class_folder": rel.split("/")[0]},
            )
        )
    _log_skipped(skipped, "CUB")
    if cap_dir is not None and no_captions:
        notes.append(f"{no_captions} images have no caption file in {cap_dir}")
    for note in notes:
        log.info("CUB import: %s", note)
    _reference_images(images_dir, out, [r.path.removeprefix(f"{IMAGES_DIR}/") for r in records], link)
    return write_dataset(
        out,
        name="CUB-200-2011",
        source="cub",
        classes=classes,
        records=records,
        regions=regions,
        meta={
            "source_dir": str(src.resolve()),
            "link": link,
            "min_certainty": min_certainty,
            "attribute_names": {phrase_of[a]: attr_names[a] for a in sorted(attr_names)},
            "captions_dir": None if cap_dir is None else str(cap_dir.resolve()),
            "segmentations_dir": None if segmentations is None else str(segmentations.resolve()),
            "notes": notes,
            "skipped": [s.to_json() for s in skipped],
        },
    )


def _cub_mask(image: Path, seg: Path, out: Path, rid: str, regions: list[str]) -> tuple[str | None, str]:
    from PIL import Image

    if not _is_file(seg):
        return None, "segmentation not found"
    try:
        with Image.open(seg) as im:
            m = np.asarray(im.convert("L"))
        with Image.open(image) as im:
            size = im.size
    except Exception as e:
        return None, f"cannot read: {type(e).__name__}: {e}"
    if (m.shape[1], m.shape[0]) != size:
        return (
            None,
            f"segmentation size {m.shape[1]}x{m.shape[0]} differs from image size {size[0]}x{size[1]}",
        )
    label_map = np.where(m >= 128, regions.index("bird") + 1, 0).astype(np.uint8)
    return _write_mask(out, rid, label_map), ""


# ====================================================================== COCO: RLE and polygons


def rle_from_string(s: str) -> list[int]:
    """Decode a COCO compressed RLE ``counts`` string into the list of run lengths.

    Format (pycocotools ``rleFrString``): each count is written as characters ``chr(48 + c)``,
    ``c`` a 6-bit chunk: 5 data bits, least significant first, and bit ``0x20`` = "more chunks
    follow". In the last chunk of a count, bit ``0x10`` is the sign (the value is sign-extended).
    From the fourth count on (index > 2) the stored value is the difference to the count two
    places before (the previous run of the same colour), so it may be negative.
    """
    counts: list[int] = []
    p = 0
    n = len(s)
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                raise ValueError(f"truncated compressed RLE string at character {p}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} at {p} is not a compressed RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_to_string(counts: Sequence[int]) -> str:
    """Inverse of :func:`rle_from_string` (pycocotools ``rleToString``)."""
    chars: list[str] = []
    for i, cnt in enumerate(counts):
        x = int(cnt) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def decode_rle(counts: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Uncompressed COCO RLE -> ``(H, W)`` bool mask.

    ``size = [H, W]``; runs alternate 0, 1, 0, ... starting with zeros, over the pixels in
    column-major (Fortran) order.
    """
    h, w = int(size[0]), int(size[1])
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise ValueError("RLE counts must be non-negative")
    total = int(counts.sum())
    if total != h * w:
        raise ValueError(f"RLE counts sum to {total}, but size {h}x{w} has {h * w} pixels")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T


def encode_rle(mask: np.ndarray) -> list[int]:
    """``(H, W)`` bool mask -> uncompressed COCO RLE counts (column-major, starting with zeros)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return [int(r) for r in runs]


def _fill_polygon(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scanline fill of one polygon ``(V, 2)``: a pixel is inside iff its centre ``(i + .5, j + .5)`` is.

    Crossings of each edge with the row centres toggle the parity from the first pixel whose
    centre lies right of the crossing; a cumulative sum along the row gives the even-odd rule.
    """
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    first = np.ceil(lo - 0.5).astype(np.int64)  # rows j with lo <= j + .5 < hi
    last = np.ceil(hi - 0.5).astype(np.int64)
    first, last = np.clip(first, 0, height), np.clip(last, 0, height)
    n = np.maximum(last - first, 0)
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    if n.sum():
        edge = np.repeat(np.arange(len(xy)), n)
        row = np.repeat(first, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        yc = row + 0.5
        xc = x0[edge] + (yc - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        start = np.clip(np.floor(xc - 0.5).astype(np.int64) + 1, 0, width)
        np.add.at(toggles, (row, start), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> ``(H, W)`` bool mask, the union of the polygons.

    Coordinates are continuous (pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)``); a pixel is in
    the mask iff its centre is inside the polygon (even-odd rule), so the pixel count matches
    COCO's ``area`` (the box ``[1, 1, 4, 3]`` gives 3 x 2 = 6 pixels). A polygon too thin to cover
    any pixel centre is drawn as its outline with PIL ``ImageDraw`` instead, so no instance vanishes.
    """
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:
            raise ValueError(f"a polygon needs an even number (>= 6) of coordinates, got {len(poly)}")
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise ValueError("polygon coordinates must be finite numbers")
        if (np.abs(xy) > 4 * max(height, width, 1)).any():  # PIL would trace the outline for minutes
            raise ValueError(f"polygon coordinates lie far outside the {width}x{height} image")
        c0, r0 = (max(0, int(np.floor(v))) for v in xy.min(axis=0))
        c1, r1 = min(width, int(np.ceil(xy[:, 0].max())) + 1), min(height, int(np.ceil(xy[:, 1].max())) + 1)
        filled = np.zeros((height, width), dtype=bool)
        if c1 > c0 and r1 > r0:  # fill only the box around the polygon (integer shifts are exact)
            filled[r0:r1, c0:c1] = _fill_polygon(xy - [c0, r0], r1 - r0, c1 - c0)
        if not filled.any():
            from PIL import Image, ImageDraw

            im = Image.new("L", (width, height), 0)
            ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in xy], outline=1)
            filled = np.asarray(im, dtype=bool)
        mask |= filled
    return mask


def decode_coco_segmentation(seg: object, height: int, width: int) -> np.ndarray:
    """Any COCO ``segmentation`` (polygon list, uncompressed RLE, compressed RLE) -> ``(H, W)`` bool mask."""
    if isinstance(seg, list):
        return rasterize_polygons(seg, height, width)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if [int(size[0]), int(size[1])] != [height, width]:
            raise ValueError(f"RLE size {list(size)} differs from the image size [{height}, {width}]")
        counts = seg["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if isinstance(counts, str):
            counts = rle_from_string(counts)
        return decode_rle(counts, size)
    raise ValueError(
        f"unknown segmentation format {type(seg).__name__}: expected a polygon list or an RLE dict"
    )


# ====================================================================== COCO


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path} is missing: it should be {what}")
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); it should be {what}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); it should be {what}"
        ) from e
    except RecursionError:
        raise DatasetError(f"{path} is nested too deeply; it should be {what}") from None
    if not isinstance(obj, dict) or "images" not in obj or "annotations" not in obj:
        raise DatasetError(f"{path} lacks 'images' or 'annotations': it should be {what}")
    return obj


def import_coco(
    images: Path,
    out: Path,
    *,
    captions_json: Path | None = None,
    instances_json: Path | None = None,
    split: str = "train",
    max_images: int | None = None,
    link: str = "symlink",
    progress: bool = True,
) -> ProbeDataset:
    """Import MS-COCO images with captions and/or instance annotations.

    - images: the union of the ``images`` lists of the given JSON files, in image-id order, first
      ``max_images`` of them; images whose file is missing are skipped.
    - classes = regions = category names in category-id order (80 for COCO 2017).
    - COCO is multi-label: ``label`` = the category of the largest instance (by ``area``;
      non-crowd instances first), ``bbox`` = its box ``[x0, y0, x1, y1]``; ``attributes`` and
      ``region_concepts`` = the category names present; ``meta["instances"]`` keeps every box.
      Images without instances get ``label = -1`` and no mask.
    - masks: one label map ``masks/<id>.png`` per image with instances, pixel value = category
      index + 1; instances are drawn largest first so smaller (often occluding) ones stay visible.
    - every record gets ``split`` (COCO's own train/val become separate imports).
    """
    images, out = Path(images), Path(out)
    if captions_json is None and instances_json is None:
        raise DatasetError("give --captions-json and/or --instances-json: COCO annotations are needed")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
    if not images.is_dir():
        raise DatasetError(f"{images} is not a directory: it should hold the COCO images (e.g. train2017/)")
    _check_out(images, out)

    info: dict[int, dict] = {}
    caps: dict[int, list[tuple[int, str]]] = defaultdict(list)
    anns: dict[int, list[dict]] = defaultdict(list)
    categories: list[dict] = []  # filled in place by _read_coco_lists
    for path, what in (
        (
            captions_json,
            "a COCO captions file (captions_*.json: images, annotations with image_id and caption)",
        ),
        (instances_json, "a COCO instances file (instances_*.json: images, annotations, categories)"),
    ):
        if path is None:
            continue
        obj = _load_json(Path(path), what)
        try:
            _read_coco_lists(obj, Path(path), path is captions_json, info, caps, anns, categories)
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(
                f"{path}: an entry has the wrong type ({type(e).__name__}: {e}); it should be {what}"
            ) from None

    classes = [str(c["name"]) for c in categories]
    cat_pos = {int(c["id"]): i for i, c in enumerate(categories)}
    ids = sorted(info)
    if max_images is not None:
        ids = ids[: max(0, int(max_images))]
    if categories and len(classes) > 65535:
        raise DatasetError(f"{instances_json}: {len(classes)} categories do not fit a 16-bit label map")

    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    for img_id in _tqdm(ids, progress=progress, desc="COCO images", total=len(ids)):
        im = info[img_id]
        fname = str(im["file_name"])
        if not _is_file(images / fname):
            skipped.append(Skipped(fname, "file not found"))
            continue
        rid = f"{img_id:012d}"
        inst: list[dict] = []
        mask_rel = None
        if anns.get(img_id):
            try:
                mask_rel, inst = _coco_instances(images / fname, im, anns[img_id], cat_pos, classes, out, rid)
            except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
                why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                skipped.append(Skipped(fname, f"bad annotation: {why}"))
                continue
        present = sorted({i["category"] for i in inst}, key=classes.index)
        main = inst[0] if inst else None
        records.append(
            ImageRecord(
                id=rid,
                path=f"{IMAGES_DIR}/{fname}",
                split=split,
                label=-1 if main is None else classes.index(main["category"]),
                attributes=present,
                captions=[c for _, c in sorted(caps.get(img_id, []))],
                mask=mask_rel,
                region_concepts={c: [c] for c in present},
                bbox=None if main is None else main["bbox"],
                meta={"coco_id": img_id, "instances": inst},
            )
        )
    _log_skipped(skipped, "COCO")
    if not records:
        raise DatasetError(f"no COCO image could be imported from {images} ({len(skipped)} skipped)")
    _reference_images(images, out, [r.path.removeprefix(f"{IMAGES_DIR}/") for r in records], link)
    return write_dataset(
        out,
        name="COCO",
        source="coco",
        classes=classes,
        records=records,
        regions=classes,
        meta={
            "images_dir": str(images.resolve()),
            "captions_json": None if captions_json is None else str(Path(captions_json).resolve()),
            "instances_json": None if instances_json is None else str(Path(instances_json).resolve()),
            "link": link,
            "split": split,
            "max_images": max_images,
            "multi_label": True,
            "skipped": [s.to_json() for s in skipped],
        },
    )


def _read_coco_lists(
    obj: dict,
    path: Path,
    is_captions: bool,
    info: dict[int, dict],
    caps: dict[int, list[tuple[int, str]]],
    anns: dict[int, list[dict]],
    categories: list[dict],
) -> None:
    """Collect images, captions or instances of one COCO JSON file; wrong shapes raise DatasetError."""
    for key in ("images", "annotations", *(() if is_captions else ("categories",))):
        if key not in obj:
            raise DatasetError(f"{path} lacks {key!r}")
        if not isinstance(obj[key], list) or not all(isinstance(x, dict) for x in obj[key]):
            raise DatasetError(f"{path}: {key!r} must be a list of objects")
    for k, im in enumerate(obj["images"]):
        if not {"id", "file_name"} <= set(im):
            raise DatasetError(f"{path}: images[{k}] lacks 'id' or 'file_name'")
        if not isinstance(im["id"], int | str) or not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DatasetError(f"{path}: images[{k}] needs an integer 'id' and a 'file_name' string")
        info.setdefault(int(im["id"]), im)
    if is_captions:
        for k, a in enumerate(obj["annotations"]):
            if "image_id" not in a or "caption" not in a:
                raise DatasetError(f"{path}: annotations[{k}] lacks 'image_id' or 'caption'")
            caps[int(a["image_id"])].append((int(a.get("id", k)), str(a["caption"]).strip()))
        return
    for k, c in enumerate(obj["categories"]):
        if not {"id", "name"} <= set(c):
            raise DatasetError(f"{path}: categories[{k}] lacks 'id' or 'name'")
    cats = sorted(obj["categories"], key=lambda c: int(c["id"]))
    if len({int(c["id"]) for c in cats}) != len(cats):
        raise DatasetError(f"{path}: two categories share an id")
    categories[:] = cats
    for k, a in enumerate(obj["annotations"]):
        if not {"image_id", "category_id"} <= set(a):
            raise DatasetError(f"{path}: annotations[{k}] lacks 'image_id' or 'category_id'")
        anns[int(a["image_id"])].append(dict(a, _index=k))


def _coco_instances(
    image_path: Path,
    im: dict,
    anns: list[dict],
    cat_pos: dict[int, int],
    classes: list[str],
    out: Path,
    rid: str,
) -> tuple[str | None, list[dict]]:
    """Rasterise one image's instances into a label map; return (mask path, instances largest first)."""
    if "height" in im and "width" in im:
        h, w = int(im["height"]), int(im["width"])
        if not (0 < h <= 65535 and 0 < w <= 65535):
            raise ValueError(f"image size {h}x{w} is not a plausible image size")
    else:
        from PIL import Image

        with Image.open(image_path) as pil:
            w, h = pil.size
    items = []
    for a in anns:
        if int(a["category_id"]) not in cat_pos:
            raise ValueError(
                f"annotation {a.get('id', a['_index'])} has unknown category_id {a['category_id']}"
            )
        m = decode_coco_segmentation(a["segmentation"], h, w) if a.get("segmentation") else None
        area = float(a["area"]) if "area" in a else float(m.sum()) if m is not None else 0.0
        if "bbox" in a:
            x, y, bw, bh = (float(v) for v in a["bbox"])
            box = [x, y, x + bw, y + bh]
        elif m is not None and m.any():
            ys, xs = np.nonzero(m)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        else:
            box = None
        crowd = int(a.get("iscrowd", 0))
        items.append((crowd, -area, a["_index"], a, m, box))
    items.sort(key=lambda t: (t[0], t[1], t[2]))  # non-crowd first, then largest first
    dtype = np.uint8 if len(classes) < 256 else np.uint16
    label_map = np.zeros((h, w), dtype=dtype)
    drawn = False
    for _, _, _, a, m, _ in sorted(items, key=lambda t: (t[1], t[2])):  # largest first, smallest last
        if m is not None:
            label_map[m] = cat_pos[int(a["category_id"])] + 1
            drawn = True
    inst = [
        {
            "category": classes[cat_pos[int(a["category_id"])]],
            "bbox": box,
            "area": -neg_area,
            "iscrowd": crowd,
        }
        for crowd, neg_area, _, a, _, box in items
    ]
    mask_rel = _write_mask(out, rid, label_map) if drawn else None
    return mask_rel, inst


# ====================================================================== Broden (NetDissect)

#: Broden's per-image metadata columns of ``index.csv``; every other column is a category.
BRODEN_META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
#: Pixel categories, most specific first: a pixel's region is its label in the first category that has one.
BRODEN_PRIORITY = ("part", "object", "material", "color")
#: A label of another category becomes a phrase of a region when it covers at least this fraction of it.
BRODEN_MAJORITY = 0.5


@dataclass
class _BrodenLabel:
    number: int
    name: str
    category: str  # the category with the most images (label.csv lists counts per category)


def _broden_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    if not path.is_file():
        raise DatasetError(
            f"{path} is missing: a Broden directory holds index.csv, category.csv, label.csv, c_<category>.csv "
            "and images/ (see docs/concept_sets.md for the download commands)"
        )
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path} is not a readable CSV file ({e})") from e
    missing = [c for c in required if c not in fields]
    if missing:
        raise DatasetError(f"{path} lacks the column(s) {missing}; its header is {fields}")
    return fields, rows


def _broden_int(path: Path, line: int, column: str, text: str | None) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise DatasetError(f"{path}: line {line}: {column} must be an integer, not {text!r}") from None


def _broden_name(name: str, category: str) -> str:
    """``"red-c"`` -> ``"red"``, ``"street-s"`` -> ``"street"`` (Broden's category suffixes); spaces kept."""
    name = name.strip()
    if len(name) > 2 and name[-2] == "-" and category and name[-1] == category[0]:
        name = name[:-2]
    return name.replace("_", " ").strip().lower()


def _broden_labels(src: Path) -> dict[int, _BrodenLabel]:
    path = src / "label.csv"
    _, rows = _broden_csv(path, ("number", "name", "category"))
    out: dict[int, _BrodenLabel] = {}
    for line, row in enumerate(rows, start=2):
        number = _broden_int(path, line, "number", row["number"])
        counts: dict[str, int] = {}
        for part in filter(None, (row["category"] or "").split(";")):
            m = re.match(r"^([^(]*)\(([^)]*)\)$", part.strip())
            if not m:
                raise DatasetError(f"{path}: line {line}: category {part!r} is not of the form name(count)")
            counts[m.group(1)] = _broden_int(path, line, "category count", m.group(2))
        cat = max(counts, key=lambda c: counts[c]) if counts else ""
        out[number] = _BrodenLabel(number, _broden_name(row["name"], cat), cat)
    return out


def _broden_cell(value: str | None) -> list[int | str]:
    """An ``index.csv`` category cell: ``;``-separated segmentation PNG paths, or integers (whole-image labels)."""
    items: list[int | str] = []
    for s in (value or "").split(";"):
        s = s.strip()
        if s:
            items.append(int(s) if re.fullmatch(r"\d+", s) else s)
    return items


def _broden_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Label numbers of a Broden segmentation PNG: ``R + 256 * G`` as ``(sh, sw)`` int32; raises ``ValueError``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
    except FileNotFoundError:
        raise ValueError(f"segmentation {path.name} is missing") from None
    except Exception as e:  # PIL raises many types for a broken file: report it, do not abort the import
        raise ValueError(f"segmentation {path.name} cannot be read ({type(e).__name__}: {e})") from None
    if rgb.shape[:2] != shape:
        raise ValueError(
            f"segmentation {path.name} is {rgb.shape[1]}x{rgb.shape[0]}, index.csv says {shape[1]}x{shape[0]}"
        )
    return rgb[..., 0] + 256 * rgb[..., 1]


def broden_regions(
    channels: Sequence[tuple[str, np.ndarray]],
    whole: Sequence[int],
    labels: dict[int, _BrodenLabel] | dict,
    shape: tuple[int, int],
) -> tuple[np.ndarray, dict[int, list[int]]]:
    """One image's Broden labels as one region per pixel plus phrases.

    Args:
        channels: ``(category, (sh, sw) label numbers)`` per segmentation PNG, 0 = unlabelled.
        whole: label numbers of the whole image (scene, whole-image texture).
        labels: label number -> label (only its ``category`` is used).
        shape: ``(sh, sw)``.

    Returns:
        ``primary (sh, sw)`` int64: each pixel's label in the first category of :data:`BRODEN_PRIORITY` that has
        one (the first PNG of a category first); pixels with none take the first whole-image label, else 0.
        ``concepts``: region label -> the label numbers it carries: itself, every other pixel label that covers at
        least :data:`BRODEN_MAJORITY` of its pixels, and every whole-image label.
    """
    rank = {c: j for j, c in enumerate(BRODEN_PRIORITY)}
    ordered = sorted(range(len(channels)), key=lambda k: (rank.get(channels[k][0], len(rank)), k))
    primary = np.zeros(shape, np.int64)
    for k in ordered:
        seg = channels[k][1]
        np.copyto(primary, seg, where=(primary == 0) & (seg > 0))
    if whole:
        primary[primary == 0] = whole[0]
    regs, area = np.unique(primary[primary > 0], return_counts=True)
    concepts: dict[int, list[int]] = {int(r): [int(r)] for r in regs}
    flat = primary.ravel()
    for _, seg in channels:
        s = seg.ravel()
        both = (flat > 0) & (s > 0) & (s != flat)
        if not both.any():
            continue
        pairs, n = np.unique(np.stack([flat[both], s[both]]), axis=1, return_counts=True)
        for (r, m), c in zip(pairs.T.tolist(), n.tolist(), strict=True):
            if c >= BRODEN_MAJORITY * area[np.searchsorted(regs, r)] and m not in concepts[r]:
                concepts[r].append(m)
    for r in concepts:
        concepts[r] += [w for w in whole if w not in concepts[r]]
    return primary, concepts


def import_broden(
    src: Path,
    out: Path,
    *,
    categories: Sequence[str] | None = None,
    max_images: int | None = None,
    link: str = "symlink",
    progress: bool = True,
) -> ProbeDataset:
    """Import a Broden data set (Bau et al. 2017, NetDissect's ``broden1_224`` / ``broden1_227`` layout).

    Reads ``index.csv`` (``image, split, ih, iw, sh, sw`` and one column per category; a cell is a
    ``;``-separated list of segmentation PNGs under ``images/`` or of integer whole-image labels),
    ``category.csv`` (the categories), ``label.csv`` (``number, name, category`` with per-category counts such as
    ``color(41);object(3)``) and checks that ``c_<category>.csv`` exists for each category. A segmentation PNG
    holds label ``R + 256 * G`` per pixel; a pixel may carry several labels (one per category, and several PNGs
    per category).

    The probe data set format holds one region per pixel, so (:func:`broden_regions`): a pixel's region is its
    part, else object, else material, else colour label; the other labels become phrases of a region where they
    cover at least half of it; whole-image labels (scenes, whole-image textures) are phrases of every region and
    the region of otherwise unlabelled pixels. ``regions`` are the used labels' names (``red-c`` -> ``red``), in
    label-number order; label maps are upsampled (nearest) to the image size. The class of an image is its first
    scene label (``classes`` = the scene names that occur), else ``-1``. Images whose PNG is unreadable, of the
    wrong size, or holds a label number that ``label.csv`` lacks are skipped and listed in ``meta["skipped"]``.
    """
    from PIL import Image

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"{src} is not a directory: give the extracted Broden folder (holds index.csv)")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    _check_out(src, out)
    index_path = src / "index.csv"
    fields, rows = _broden_csv(index_path, BRODEN_META_COLUMNS)
    _, cat_rows = _broden_csv(src / "category.csv", ("name",))
    known_cats = [r["name"].strip() for r in cat_rows]
    labels = _broden_labels(src)
    cats = [c for c in fields if c not in BRODEN_META_COLUMNS]
    unknown = [c for c in cats if c not in known_cats]
    if unknown:
        raise DatasetError(
            f"{index_path}: column(s) {unknown} are not categories of category.csv ({known_cats})"
        )
    if categories is not None:
        bad = [c for c in categories if c not in cats]
        if bad:
            raise DatasetError(f"unknown Broden categor(ies) {bad}; this index has {cats}")
        cats = [c for c in cats if c in categories]
    for c in cats:
        if not (src / f"c_{c}.csv").is_file():
            raise DatasetError(
                f"{src / f'c_{c}.csv'} is missing: every category of index.csv needs its c_ file"
            )
    if max_images is not None:
        rows = rows[:max_images]

    images = src / IMAGES_DIR
    kept: list[tuple[str, str, np.ndarray, dict[int, list[int]], list[int], dict]] = []
    skipped: list[Skipped] = []
    for line, row in _tqdm(enumerate(rows, start=2), progress=progress, desc="broden", total=len(rows)):
        rel = (row["image"] or "").strip()
        where = f"{index_path.name} line {line} ({rel})"
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            skipped.append(Skipped(where, "the image path must be relative and stay inside images/"))
            continue
        split = (row["split"] or "").strip()
        if split not in ("train", "val", "test"):
            skipped.append(Skipped(where, f"split {split!r} is not train, val or test"))
            continue
        shape = (
            _broden_int(index_path, line, "sh", row["sh"]),
            _broden_int(index_path, line, "sw", row["sw"]),
        )
        size, reason = _readable(images / rel, rel)
        if size is None:
            skipped.append(Skipped(where, reason))
            continue
        channels: list[tuple[str, np.ndarray]] = []
        whole: list[int] = []
        cells = {c: _broden_cell(row.get(c)) for c in cats}
        try:
            for cat, items in cells.items():
                for item in items:
                    if isinstance(item, int):
                        whole.append(item)
                        continue
                    if item.startswith("/") or ".." in item.split("/"):
                        raise ValueError(f"segmentation path {item!r} must stay inside images/")
                    channels.append((cat, _broden_png(images / item, shape)))
            used = {int(v) for _, seg in channels for v in np.unique(seg) if v} | set(whole)
            missing = sorted(used - set(labels))
            if missing:
                raise ValueError(f"label number(s) {missing[:5]} are not in label.csv")
        except ValueError as e:
            skipped.append(Skipped(where, str(e)))
            continue
        if not channels and not whole:  # NetDissect's index_has_any_data: nothing in the chosen categories
            skipped.append(Skipped(where, f"no labels in the categories {cats}"))
            continue
        primary, concepts = broden_regions(channels, whole, labels, shape)
        if (shape[1], shape[0]) != size:
            primary = np.asarray(
                Image.fromarray(primary.astype(np.int32)).resize(size, Image.Resampling.NEAREST)
            ).astype(np.int64)
            concepts = {r: v for r, v in concepts.items() if (primary == r).any()}
        meta = {
            "width": size[0],
            "height": size[1],
            "broden": {c: [str(x) for x in v] for c, v in cells.items() if v},
        }
        kept.append((rel, split, primary, concepts, whole, meta))
    _log_skipped(skipped, "broden")
    if not kept:
        first = f" (first: {skipped[0].path}: {skipped[0].reason})" if skipped else ""
        raise DatasetError(f"no usable images in {index_path}{first}")

    used = sorted({r for k in kept for r in k[3]})
    region_names: list[str] = []
    slot: dict[int, int] = {}
    for number in used:  # labels sharing a name share a region
        name = labels[number].name
        if name not in region_names:
            region_names.append(name)
        slot[number] = region_names.index(name) + 1
    lut = np.zeros(max(used) + 1, np.uint16 if len(region_names) > 255 else np.uint8)
    for number, r in slot.items():
        lut[number] = r
    scene_numbers = sorted({w for k in kept for w in k[4] if labels[w].category == "scene"})
    classes = list(dict.fromkeys(labels[n].name for n in scene_numbers))
    ids = _unique_ids([k[0] for k in kept])
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for rid, (rel, split, primary, concepts, whole, meta) in zip(ids, kept, strict=True):
        mask = _write_mask(out, rid, lut[primary])
        region_concepts: dict[str, list[str]] = {}
        for number, carried in concepts.items():
            phrases = region_concepts.setdefault(labels[number].name, [])
            phrases += [labels[m].name for m in carried if labels[m].name not in phrases]
        scenes = [labels[w].name for w in whole if labels[w].category == "scene"]
        attributes = list(dict.fromkeys(p for ps in region_concepts.values() for p in ps))
        records.append(
            ImageRecord(
                id=rid,
                path=f"{IMAGES_DIR}/{rel}",
                split=split,
                label=classes.index(scenes[0]) if scenes else -1,
                attributes=attributes,
                mask=mask,
                region_concepts=region_concepts,
                meta={**meta, "scenes": scenes},
            )
        )
    _reference_images(images, out, [k[0] for k in kept], link)
    kinds = {}
    for number in sorted({m for k in kept for cs in k[3].values() for m in cs}):
        kinds.setdefault(labels[number].name, labels[number].category)
    return write_dataset(
        out,
        name="Broden",
        source="broden",
        classes=classes,
        records=records,
        regions=region_names,
        meta={
            "source_dir": str(src.resolve()),
            "link": link,
            "categories": cats,
            "priority": list(BRODEN_PRIORITY),
            "majority": BRODEN_MAJORITY,
            "concept_kinds": kinds,
            "skipped": [s.to_json() for s in skipped],
            "notes": [
                "one region per pixel: part, else object, else material, else colour; other labels are phrases of "
                f"a region they cover at least {BRODEN_MAJORITY:.0%} of; scenes and whole-image textures are "
                "phrases of every region (meta.broden keeps each image's original cells)"
            ],
        },
    )
