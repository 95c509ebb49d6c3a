"""``lavise fetch-weights SPEC`` and the ``--download`` flag: fetch the pretrained weights of a
``torchvision:NAME`` / ``timm:NAME`` spec, on request only (:mod:`lavise_core.models.weights`)."""

from __future__ import annotations

import argparse

__all__ = ["add_download_arg", "add_fetch_weights", "cmd_fetch_weights", "download_if_asked"]


def add_download_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--download",
        action="store_true",
        help="download the model's pretrained weights first if they are not on this machine "
        "(torchvision:NAME and timm:NAME; verified by SHA-256; see `lavise fetch-weights`)",
    )


def download_if_asked(args: argparse.Namespace, spec: str) -> None:
    """With ``--download``: fetch the weights of ``spec`` when missing, and say so."""
    if not getattr(args, "download", False):
        return
    from lavise_core.models.weights import ensure_weights

    got = ensure_weights(spec, bar=not getattr(args, "quiet", False))
    if got is not None:
        print(got.summary())


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    """Download the pretrained weights of a torchvision:NAME or timm:NAME spec into the torch hub cache
    (where `lavise build --model SPEC` reads them), verified by the SHA-256 prefix in the file's name.
    Set LAVISE_WEIGHTS_URL to fetch the file from a mirror (http://, https:// or file://) instead."""
    from lavise_core.models.weights import fetch_weights

    got = fetch_weights(args.spec, force=args.force, bar=not args.quiet)
    print(got.summary())
    return 0


def add_fetch_weights(sub: argparse._SubParsersAction) -> None:
    """``lavise fetch-weights SPEC [--force] [--quiet]``."""
    p = sub.add_parser(
        "fetch-weights",
        help="download a torchvision:NAME or timm:NAME model's pretrained weights (needs a network)",
        description=cmd_fetch_weights.__doc__,
    )
    p.add_argument("spec", help="model spec, e.g. torchvision:resnet50 or timm:resnet18")
    p.add_argument("--force", action="store_true", help="download again even if a good copy is here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch_weights)
