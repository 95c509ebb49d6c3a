"""``lavise train-demo`` and ``train-siam``: train the SynthBirds models with :mod:`lavise_core.models.demo_cnn`
and :mod:`lavise_core.models.siam`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lavise_core.models import demo_cnn, siam

__all__ = [
    "add_train_demo",
    "add_train_siam",
    "add_trajectory",
    "cmd_train_demo",
    "cmd_train_siam",
    "cmd_trajectory",
]


# ----------------------------------------------------------------------------- train-demo
def cmd_train_demo(args: argparse.Namespace) -> int:
    card = demo_cnn.train_demo(
        Path(args.data),
        Path(args.out),
        seed=args.seed,
        epochs=args.epochs,
        progress=not args.quiet,
        threads=args.threads,
        save_every=args.save_every,
    )
    if card.get("series"):
        print(f"checkpoint series ({len(card['series'])} cards): " + " ".join(card["series"]))
    print(
        f"test accuracy {card['test_accuracy']:.3f}, one-part pairs {card['one_part_pair_accuracy']:.3f}, "
        f"{card['train_seconds']:.0f} s; wrote {Path(args.out) / demo_cnn.WEIGHTS_FILE} and "
        f"{Path(args.out) / demo_cnn.CARD_FILE}"
    )
    return 0


def add_train_demo(sub: argparse._SubParsersAction) -> None:
    """Register ``lavise train-demo``."""
    epochs = demo_cnn.DEFAULT_EPOCHS
    p = sub.add_parser(
        "train-demo",
        help="train the SynthBirds demo CNN",
        description="Train the compact demo CNN on a SynthBirds data set and write its checkpoint and model card.",
    )
    p.add_argument(
        "--data", default="data/synthbirds", help="SynthBirds directory (default: data/synthbirds)"
    )
    p.add_argument("--out", default="models", help="output directory (default: models)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default: {epochs})")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1; the weights are bit-identical only for the same thread count)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="N",
        help="also save a checkpoint after every N-th epoch (synthbirds_cnn.epochEEE.json/.safetensors) for "
        "`lavise trajectory`; the final checkpoint is unchanged",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_demo)


# ----------------------------------------------------------------------------- train-siam
def cmd_train_siam(args: argparse.Namespace) -> int:
    card = siam.train_siam(
        args.data, args.out, args.backbone, args.head_epochs, args.finetune_epochs, seed=args.seed,
        threads=args.threads, keep=args.keep, progress=not args.quiet,
    )  # fmt: skip
    for name, r in card["variants"].items():
        print(
            f"{name:20s} accuracy {r['test_accuracy']:.1%}  attribute AUC {r['attribute_auc']:.3f}  "
            f"decomposition error {r['decomposition_max_error']:.1e}"
        )
    print(f"kept {card['variant']} -> {Path(args.out) / siam.CARD_FILE} ({card['train_seconds']} s)")
    return 0


def add_train_siam(sub: argparse._SubParsersAction) -> None:
    """Register ``lavise train-siam``."""
    p = sub.add_parser(
        "train-siam",
        help="train the SIAM attribute-map model on SynthBirds (four variants; keeps one)",
        description=siam.train_siam.__doc__,
    )
    p.add_argument("--data", default="data/synthbirds", type=Path)
    p.add_argument("--out", default="models", type=Path)
    p.add_argument("--backbone", default="models/synthbirds_cnn.json", type=Path, help="demo CNN card")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (results are deterministic per count)"
    )
    p.add_argument("--keep", default="finetuned-linear", choices=siam.VARIANTS)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_siam)


# ----------------------------------------------------------------------------- trajectory
def cmd_trajectory(args: argparse.Namespace) -> int:
    import json

    from lavise_core.data.dataset import ProbeDataset, atomic_write_text
    from lavise_core.explain.dissection.trajectory import dissect_series

    ds = ProbeDataset.open(Path(args.data))
    layers = [s for s in args.layers.split(",") if s] if args.layers else None
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    result = dissect_series(
        args.checkpoints,
        ds,
        layers=layers,
        max_images=args.max_images,
        batch_size=args.batch_size,
        report=say,
    )
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    for s in result["skipped"]:
        print(f"skipped {s['checkpoint']}: {s['error']}")
    for r in result["checkpoints"]:
        row = next(x for x in r["layers"] if x["layer"] == result["recorded_as"])
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(
            f"{r['checkpoint']}: accuracy {acc}, {result['explained_layer']} {row['interpretable']}/{row['units']} "
            f"units interpretable, {row['unique']} unique concepts"
        )
    if result["note"]:
        print(result["note"])
    else:
        moved = len({c["filter"] for c in result["changes"]})
        print(
            f"{moved} filters of {result['explained_layer']} changed their label ({len(result['changes'])} changes)"
        )
    print(f"wrote {args.out}")
    return 0


def add_trajectory(sub: argparse._SubParsersAction) -> None:
    """Register ``lavise trajectory``."""
    p = sub.add_parser(
        "trajectory",
        help="dissect a series of checkpoints of one training run (how the detectors appear)",
        description="Network Dissection of each checkpoint of one run (oldest first; e.g. from `lavise train-demo "
        "--save-every N`) against the same concept set and probe images: interpretable units and unique concepts "
        "per layer, test accuracy, each explained-layer filter's label, and which filters changed label when. A "
        "checkpoint that fails to load is reported and skipped; one of another architecture is refused.",
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT", help="model specs (cards .json), oldest first"
    )
    p.add_argument("--data", required=True, help="data set with part masks (e.g. data/synthbirds)")
    p.add_argument("--out", required=True, help="result JSON file")
    p.add_argument("--layers", default="", help="comma-separated layers (default: those of the layers stage)")
    p.add_argument(
        "--max-images", type=int, default=640, help="probe images (default: 640, as the layers stage)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32, as the layers stage)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_trajectory)
