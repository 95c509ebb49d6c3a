"""The ``lavise`` command line: import data, train the demo CNN, build and evaluate bundles.

``lavise --help`` lists the commands; ``lavise COMMAND --help`` explains one.

Every command is argparse wiring plus a thin ``cmd_*`` function that calls the library (``data/``,
``models/``, ``pipeline/``, ``evaluate/``, ``views/``, none of which knows argparse): :mod:`.build` (probe,
build, evaluate, stages, models, layers, info), :mod:`.data` (synthbirds, import-folder, import-cub,
import-coco), :mod:`.train` (train-demo, train-siam), :mod:`.report` (report), :mod:`.weights`
(fetch-weights, the ``--download`` flag), :mod:`.serve` (serve: the dashboard for others, read-only by
default); :mod:`.parser` puts them under one ``lavise`` parser and dispatches.
"""

from lavise_core.cli.build import DEFAULT_BUNDLES
from lavise_core.cli.parser import build_parser, main

__all__ = ["DEFAULT_BUNDLES", "build_parser", "main"]
