"""``lavise synthbirds``, ``concepts``, ``import-folder``, ``import-cub``, ``import-coco`` and ``import-broden``:
write probe data sets and concept sets with :mod:`lavise_core.data.synthbirds`,
:mod:`lavise_core.data.concept_shapes` and :mod:`lavise_core.data.importers`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lavise_core.data.concept_shapes import DEFAULT_N as CONCEPTS_N
from lavise_core.data.concept_shapes import REGIONS as CONCEPT_REGIONS
from lavise_core.data.concept_shapes import generate_concept_shapes
from lavise_core.data.dataset import DatasetError, ProbeDataset
from lavise_core.data.importers import LINK_MODES, import_broden, import_coco, import_cub, import_image_folder
from lavise_core.data.synthbirds import (
    DEFAULT_N,
    SPURIOUS_BACKGROUND,
    SPURIOUS_SPECIES,
    generate_synthbirds,
)

__all__ = [
    "add_concepts",
    "add_import_commands",
    "add_synthbirds",
    "cmd_concepts",
    "cmd_import_broden",
    "cmd_import_coco",
    "cmd_import_cub",
    "cmd_import_folder",
    "cmd_synthbirds",
]


# ----------------------------------------------------------------------------- synthbirds
def cmd_synthbirds(args: argparse.Namespace) -> int:
    ds = generate_synthbirds(
        Path(args.out),
        n=args.n,
        seed=args.seed,
        image_size=args.image_size,
        spurious=args.spurious,
        progress=not args.quiet,
        spurious_strength=args.spurious_strength,
        test_fraction=args.test_fraction,
        workers=args.workers,
    )
    n_train = int((ds.splits() == "train").sum())
    print(f"wrote {len(ds)} images ({n_train} train, {len(ds) - n_train} test) to {ds.root}")
    return 0


def add_synthbirds(sub: argparse._SubParsersAction) -> None:
    """Register ``lavise synthbirds``."""
    p = sub.add_parser(
        "synthbirds",
        help="generate the SynthBirds probe data set",
        description="Generate SynthBirds: synthetic birds with part masks, keypoints, attributes and captions.",
    )
    p.add_argument("--out", default="data/synthbirds", help="output directory (default: data/synthbirds)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of images (default: {DEFAULT_N})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument(
        "--spurious",
        action="store_true",
        help=f"put most train {SPURIOUS_SPECIES!r} over {SPURIOUS_BACKGROUND!r}",
    )
    p.add_argument(
        "--spurious-strength", type=float, default=0.9, help="probability of that background (default: 0.9)"
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of test images (default: 0.2)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synthbirds)
    add_concepts(sub)  # the other built-in set, listed next to SynthBirds


# ----------------------------------------------------------------------------- concepts
def cmd_concepts(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    ds = generate_concept_shapes(
        Path(args.out),
        n=args.n,
        seed=args.seed,
        image_size=args.image_size,
        test_fraction=args.test_fraction,
        workers=args.workers,
        progress=not args.quiet,
    )
    n_train = int((ds.splits() == "train").sum())
    seconds = time.perf_counter() - t0
    print(
        f"wrote {len(ds)} images ({n_train} train, {len(ds) - n_train} test) to {ds.root} in {seconds:.1f} s: "
        f"{len(CONCEPT_REGIONS)} region kinds, {len(ds.classes)} classes (the dominant shape)"
    )
    return 0


def add_concepts(sub: argparse._SubParsersAction) -> None:
    """Register ``lavise concepts``."""
    p = sub.add_parser(
        "concepts",
        help="generate the general concept set (colours, textures, shapes)",
        description=(
            "Generate ConceptShapes: scenes of coloured, textured fields and shapes with every pixel labelled "
            "(colour terms, 20+ textures, 10 shapes), in the SynthBirds ground-truth format."
        ),
    )
    p.add_argument("--out", default="data/concepts", help="output directory (default: data/concepts)")
    p.add_argument("--n", type=int, default=CONCEPTS_N, help=f"number of images (default: {CONCEPTS_N})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of test images (default: 0.2)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_concepts)


# ----------------------------------------------------------------------------- importers
def _report(ds: ProbeDataset, out: Path) -> int:
    splits = {s: int((ds.splits() == s).sum()) for s in ("train", "val", "test")}
    print(
        f"wrote {out}: {len(ds)} images, {len(ds.classes)} classes, "
        + ", ".join(f"{k} {v}" for k, v in splits.items() if v)
    )
    skipped = ds.meta.get("skipped", [])
    if skipped:
        print(f"skipped {len(skipped)} file(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
    for note in ds.meta.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0


def _run(fn, args: argparse.Namespace) -> int:
    try:
        ds = fn()
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _report(ds, Path(args.out))


def cmd_import_folder(args: argparse.Namespace) -> int:
    return _run(
        lambda: import_image_folder(
            Path(args.src),
            Path(args.out),
            test_fraction=args.test_fraction,
            seed=args.seed,
            link=args.link,
            progress=not args.quiet,
        ),
        args,
    )


def cmd_import_cub(args: argparse.Namespace) -> int:
    return _run(
        lambda: import_cub(
            Path(args.src),
            Path(args.out),
            captions=None if args.captions is None else Path(args.captions),
            segmentations=None if args.segmentations is None else Path(args.segmentations),
            min_certainty=args.min_certainty,
            link=args.link,
            progress=not args.quiet,
        ),
        args,
    )


def cmd_import_coco(args: argparse.Namespace) -> int:
    return _run(
        lambda: import_coco(
            Path(args.images),
            Path(args.out),
            captions_json=None if args.captions_json is None else Path(args.captions_json),
            instances_json=None if args.instances_json is None else Path(args.instances_json),
            split=args.split,
            max_images=args.max_images,
            link=args.link,
            progress=not args.quiet,
        ),
        args,
    )


def cmd_import_broden(args: argparse.Namespace) -> int:
    cats = None if args.categories is None else [c.strip() for c in args.categories.split(",") if c.strip()]
    return _run(
        lambda: import_broden(
            Path(args.src),
            Path(args.out),
            categories=cats,
            max_images=args.max_images,
            link=args.link,
            progress=not args.quiet,
        ),
        args,
    )


def add_import_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``import-folder``, ``import-cub``, ``import-coco`` and ``import-broden``."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="directory of the probe data set to write")
        p.add_argument(
            "--link",
            choices=LINK_MODES,
            default="symlink",
            help="symlink: OUT/images links to the source images (default); copy: copy them into OUT/images",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "import-folder",
        help="import a folder of images (one sub-folder per class)",
        description="Import SRC/<class>/<image> (or a flat SRC/<image>, unlabeled) as a probe data set.",
    )
    p.add_argument("src", help="image folder")
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="fraction of each class put in the test split"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    common(p)
    p.set_defaults(func=cmd_import_folder)

    p = sub.add_parser(
        "import-cub",
        help="import CUB-200-2011 (labels, attributes, parts, boxes, captions)",
        description="Import the extracted CUB_200_2011/ folder as a probe data set.",
    )
    p.add_argument("src", help="the CUB_200_2011 folder (holds images.txt and images/)")
    p.add_argument("--captions", default=None, help="Reed et al. text_c10 folder (or its parent)")
    p.add_argument("--segmentations", default=None, help="CUB segmentations folder (<class>/<image>.png)")
    p.add_argument(
        "--min-certainty",
        type=int,
        default=1,
        choices=(1, 2, 3, 4),
        help="keep present attributes with certainty >= this (1 not visible .. 4 definitely)",
    )
    common(p)
    p.set_defaults(func=cmd_import_cub)

    p = sub.add_parser(
        "import-coco",
        help="import MS-COCO captions and/or instances",
        description="Import COCO images with captions_*.json and/or instances_*.json as a probe data set.",
    )
    p.add_argument("--images", required=True, help="COCO image folder, e.g. val2017/")
    p.add_argument("--captions-json", default=None, help="captions_*.json")
    p.add_argument("--instances-json", default=None, help="instances_*.json")
    p.add_argument(
        "--split", choices=("train", "val", "test"), default="train", help="split given to every image"
    )
    p.add_argument(
        "--max-images", type=int, default=None, help="import only the first N images (by image id)"
    )
    common(p)
    p.set_defaults(func=cmd_import_coco)

    p = sub.add_parser(
        "import-broden",
        help="import Broden (NetDissect's colour/object/part/material/scene/texture set)",
        description=(
            "Import an extracted Broden folder (index.csv, category.csv, label.csv, c_*.csv, images/) as a concept "
            "set: one region per pixel (part, else object, else material, else colour), scenes as image labels."
        ),
    )
    p.add_argument("src", help="the Broden folder, e.g. broden1_224/ (holds index.csv)")
    p.add_argument(
        "--categories",
        default=None,
        help="comma-separated categories to import (default: all; e.g. color,texture,object)",
    )
    p.add_argument("--max-images", type=int, default=None, help="import only the first N rows of index.csv")
    common(p)
    p.set_defaults(func=cmd_import_broden)
