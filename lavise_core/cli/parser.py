"""The top-level ``lavise`` parser and the dispatch to the command modules' ``cmd_*`` functions."""

from __future__ import annotations

import argparse
import os
import sys

from lavise_core.cli.build import add_build_commands
from lavise_core.cli.data import add_import_commands, add_synthbirds
from lavise_core.cli.report import add_report
from lavise_core.cli.serve import add_demo, add_serve
from lavise_core.cli.train import add_train_demo, add_train_siam, add_trajectory
from lavise_core.cli.weights import add_fetch_weights

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavise",
        description="Explain what a CNN has learned, filter by filter, in words and pictures.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # the order `lavise --help` lists the commands in
    add_build_commands(sub)  # probe, build, evaluate, stages, models, layers, info
    add_fetch_weights(sub)
    add_synthbirds(sub)
    add_train_demo(sub)
    add_trajectory(sub)
    add_import_commands(sub)  # import-folder, import-cub, import-coco
    add_train_siam(sub)
    add_report(sub)
    add_serve(sub)
    add_demo(sub)
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
