"""``lavise report``: a bundle's self-contained HTML report and filter table CSV
(:mod:`lavise_core.views.export`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lavise_core.pipeline.bundle import Bundle
from lavise_core.views import export
from lavise_core.views.workspace import Workspace

__all__ = ["add_report", "cmd_report"]


def cmd_report(args: argparse.Namespace) -> int:
    ws = Workspace(Bundle.open(args.bundle))
    out = args.out or Path(f"{Path(args.bundle).name}-report.html")
    t0 = time.perf_counter()
    page = export.report_html(ws, max_filters=args.max_filters)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    if args.csv is not None:
        args.csv.write_bytes(export.filter_table_csv(ws))
        print(f"wrote {args.csv}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    """``lavise report BUNDLE [--out FILE.html] [--csv FILE.csv] [--max-filters N]``."""
    p = sub.add_parser(
        "report",
        help="write a bundle's report as one self-contained HTML file (and the filter table as CSV)",
        description=export.__doc__,
    )
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--out", type=Path, default=None, help="HTML file (default: <bundle>-report.html)")
    p.add_argument("--csv", type=Path, default=None, help="also write the filter table as CSV here")
    p.add_argument("--max-filters", type=int, default=None, help="only the N best-labelled filters")
    p.set_defaults(func=cmd_report)
