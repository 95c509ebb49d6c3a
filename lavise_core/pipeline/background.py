"""A build that runs behind the dashboard: its progress file, written by one process and read by another.

``lavise demo`` builds the probe stage, starts serving, and builds the other stages in a second process
(``lavise build --progress-file <bundle>/build-progress.json``). The Overview reads the file back with
:func:`read_build_status`; each page lights up when its stage lands, because the app reopens a bundle whose
``bundle.json`` changed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lavise_core.data.dataset import atomic_write_text
from lavise_core.pipeline.stages import BuildProgress

__all__ = ["PROGRESS_FILE", "BuildStatus", "ProgressWriter", "read_build_status"]

#: the progress file's name inside the bundle folder
PROGRESS_FILE = "build-progress.json"


@dataclass(frozen=True)
class BuildStatus:
    """Where a background build stands.

    ``state``: "running", "done", "failed", or "stopped" (the process is gone without finishing);
    ``stages``: the stages it was asked for, in build order; ``finished``: those done so far; ``stage`` and
    ``message``: what it is doing now; ``fraction`` of the whole build in [0, 1]; ``error``: why it failed.
    """

    state: str
    stage: str = ""
    message: str = ""
    fraction: float = 0.0
    stages: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    error: str = ""
    pid: int = 0
    updated: float = 0.0

    @property
    def running(self) -> bool:
        return self.state == "running"


class ProgressWriter:
    """A ``progress`` callback for :func:`lavise_core.build` that keeps ``path`` up to date (atomically).

    Writes when the stage changes and at most every ``interval`` seconds otherwise; :meth:`finish` records the
    end (``error``: why it failed).
    """

    def __init__(self, path: str | os.PathLike, stages: Sequence[str], interval: float = 0.5):
        self.path = Path(path)
        self.interval = interval
        self.status = BuildStatus("running", stages=list(stages), pid=os.getpid(), updated=time.time())
        self._last = 0.0
        self._write()

    def __call__(self, p: BuildProgress) -> None:
        s = self.status
        ended = p.message in (f"{p.stage}: done", f"{p.stage}: already built") or p.message.startswith(
            "not built: "
        )  # the three ways a stage ends (:func:`lavise_core.pipeline.stages.build_stages`)
        finished = [*s.finished, p.stage] if ended and p.stage not in s.finished else s.finished
        changed = p.stage != s.stage or ended
        self.status = BuildStatus(
            "running", p.stage, p.message, float(p.fraction), s.stages, finished, "", s.pid, time.time()
        )
        if changed or time.monotonic() - self._last >= self.interval:
            self._write()

    def finish(self, error: str | None = None) -> None:
        s = self.status
        self.status = BuildStatus(
            "failed" if error else "done", s.stage if error else "", error or "", s.fraction if error else 1.0,
            s.stages, s.finished if error else list(s.stages), error or "", s.pid, time.time(),
        )  # fmt: skip
        self._write()

    def _write(self) -> None:
        self._last = time.monotonic()
        atomic_write_text(self.path, json.dumps(asdict(self.status)))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read_build_status(bundle_root: str | os.PathLike) -> BuildStatus | None:
    """The background build of the bundle at ``bundle_root``, or None when none was started (or the file is
    unreadable). A "running" build whose process is gone reads as "stopped"."""
    try:
        raw = json.loads((Path(bundle_root) / PROGRESS_FILE).read_text())
        status = BuildStatus(**{k: raw[k] for k in BuildStatus.__dataclass_fields__ if k in raw})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if status.running and not _alive(status.pid):
        return BuildStatus(**{**asdict(status), "state": "stopped"})
    return status
