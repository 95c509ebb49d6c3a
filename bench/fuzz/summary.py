"""Summarise the campaign logs: inputs run, seconds, final coverage and crashes per target (markdown)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

LOGS = Path(__file__).resolve().parent / "logs"
CRASHES = Path(__file__).resolve().parent / "crashes"
TARGETS = ("text", "dataset", "image", "coco", "spec", "query", "cub")


def summary(goal: int = 1_000_000) -> str:
    rows = [
        "| target | inputs run | seconds | coverage (edges / features) | crashes / hangs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in TARGETS:
        runs = secs = 0
        cov = ""
        for log in sorted(LOGS.glob(f"{t}-*.log")):
            text = log.read_text(errors="replace")
            done = re.findall(r"Done (\d+) (?:runs )?in (\d+) second", text)
            for n, s in done:
                runs, secs = runs + int(n), secs + int(s)
            if not done:  # stopped by a crash or hang: libFuzzer's final stats still count the inputs
                runs += sum(int(n) for n in re.findall(r"stat::number_of_executed_units: (\d+)", text))
            found = re.findall(r"cov: (\d+) ft: (\d+)", text)
            if found:
                cov = f"{found[-1][0]} / {found[-1][1]}"
        open_ = len(list(CRASHES.glob(f"{t}-crash-*"))) + len(list(CRASHES.glob(f"{t}-timeout-*")))
        fixed = len(list((CRASHES / "fixed").glob(f"{t}-*")))
        crashes = f"{open_ + fixed} found, {fixed} fixed" if open_ + fixed else "0"
        mark = "" if runs >= goal else " (short of 1 M)"
        rows.append(f"| `{t}` | {runs:,}{mark} | {secs} | {cov} | {crashes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(summary(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
