"""Executors for the image loops: map a per-shard task over manifest rows, here or on a Ray cluster.

A stage that loops over images splits its manifest rows into *shards* (whole batches of ``batch_size``
rows, in manifest order), gives each shard to a :class:`ShardTask` and merges the partial results it
gets back. :func:`map_shards` runs the shards either in this process (``kind="local"``) or as Ray Data
batch inference (``kind="ray"``): the rows become a Ray dataset with one block per shard and
``map_batches`` runs the task in a pool of actors that each hold the model (one GPU per actor where the
cluster has GPUs, one CPU elsewhere). Ray retries the shard of an actor that dies; merges must not depend
on the order partials arrive in.

Usage (a stage)::

    for rows, partial in map_shards(task, rows, batch_size, ctx.executor):
        merge(partial)
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "ExecutorError",
    "ExecutorSettings",
    "ShardTask",
    "WorkerDataError",
    "map_shards",
    "shard_rows",
]

KINDS = ("local", "ray")


class ExecutorError(ValueError):
    """The executor could not run the loop: cluster unreachable, a worker that died for good, bad settings."""


class WorkerDataError(ExecutorError):
    """A worker cannot read the images (raised on the worker; the message names the host and the folder)."""


@dataclass(frozen=True)
class ExecutorSettings:
    """Where the image loops run.

    Attributes:
        kind: ``"local"`` (this process) or ``"ray"``.
        address: Ray cluster address (``"10.0.0.5:6379"``, ``"ray://head:10001"``, ``"auto"``); ``None``: use
            the Ray runtime this process already started, or start a local one with ``workers`` CPUs.
        workers: actors in the pool; 0: one per GPU of the cluster, else one per CPU.
        shard_batches: batches per shard; 0: about 8 shards per worker, at most 32 batches each.
        max_restarts: how often Ray restarts a dead actor (its shard is retried) before the pass fails.
        progress: Ray Data's progress bars.
    """

    kind: str = "local"
    address: str | None = None
    workers: int = 0
    shard_batches: int = 0
    max_restarts: int = 3
    progress: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ExecutorError(f"unknown executor {self.kind!r}; use one of {', '.join(KINDS)}")


class ShardTask(Protocol):
    """What an executor maps over shards. Must pickle (it travels to the Ray workers)."""

    def setup(self, device: str | None) -> None:
        """Once per worker, before its first shard: move the model to ``device`` (``None``: keep), warm up."""

    def __call__(self, rows: np.ndarray) -> Any:
        """The partial result of manifest rows ``rows (n,)`` (whole batches, ascending)."""


def shard_rows(rows: Sequence[int] | np.ndarray, batch_size: int, shard_batches: int) -> list[np.ndarray]:
    """Split ``rows`` into consecutive shards of ``shard_batches × batch_size`` rows (the last may be shorter)."""
    rows = np.asarray(rows, dtype=np.int64)
    size = max(1, shard_batches) * max(1, batch_size)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _auto_shard_batches(n_rows: int, batch_size: int, workers: int) -> int:
    n_batches = -(-n_rows // max(1, batch_size))
    return max(1, min(32, -(-n_batches // (8 * max(1, workers)))))


def map_shards(
    task: ShardTask,
    rows: Sequence[int] | np.ndarray,
    batch_size: int,
    settings: ExecutorSettings = ExecutorSettings(),
    device: str | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(shard rows, task(shard rows))`` for every shard of ``rows``.

    Local: in manifest order, ``task.setup(device)`` once in this process. Ray: in the order shards finish.
    Raises :class:`ExecutorError` with a message a user can act on.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if settings.kind == "local":
        shards = shard_rows(rows, batch_size, settings.shard_batches or 8)
        task.setup(device)
        for shard in shards:
            yield shard, task(shard)
        return
    yield from _map_shards_ray(task, rows, batch_size, settings, device)


# ------------------------------------------------------------------------------------------------ ray
class _RayShardActor:
    """A Ray Data actor: holds the task (and so the model); one call = one shard (one block)."""

    def __init__(self, task: ShardTask, device: str | None, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.task = task
        self.task.setup(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], dtype=np.int64)
        t0 = time.perf_counter()
        partial = self.task(rows)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "seconds": time.perf_counter() - t0}
        blob = pickle.dumps((rows, partial, info), protocol=pickle.HIGHEST_PROTOCOL)
        return {"first": rows[:1], "blob": np.array([blob], dtype=object)}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (instead of Ray's long retries) when nothing listens at ``host:port``."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(
            f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e}. Is the head node up (`ray status` on "
            "it), is the port open from here, and is it the GCS port (6379) or the client port (ray://…:10001)?"
        ) from None


def _connect(settings: ExecutorSettings) -> bool:
    """Connect to (or start) Ray; True when this call started the runtime (and should shut it down)."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "the Ray executor needs Ray: pip install 'lavise[ray]' (ray[data]==2.60.0)"
        ) from None
    if settings.address is not None:
        _check_reachable(settings.address)
    if ray.is_initialized():
        return False
    import logging

    if settings.address is not None:
        try:
            ray.init(address=settings.address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as e:
            raise ExecutorError(f"cannot connect to the Ray cluster at {settings.address}: {e}") from None
        return True
    ray.init(
        num_cpus=max(1, settings.workers or (os.cpu_count() or 1)),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    return True


def _explain(e: BaseException, settings: ExecutorSettings) -> ExecutorError:
    """A Ray failure as one sentence a user can act on."""
    text = str(e)
    found = re.search(r"WorkerDataError: (.+)", text)
    if found:
        return ExecutorError(found.group(1).strip() + " Nothing was written to the bundle.")
    died = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "WorkerCrashedError", "died")
    if any(d in text or d in type(e).__name__ for d in died):
        return ExecutorError(
            f"a Ray worker died and was not brought back after {settings.max_restarts} restart(s) "
            f"(out of memory? killed?): {text.splitlines()[0] if text else type(e).__name__}. "
            "Nothing was written to the bundle; run the build again (finished stages are kept)."
        )
    first = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
    return ExecutorError(f"the Ray pass failed: {first}")


def _map_shards_ray(
    task: ShardTask, rows: np.ndarray, batch_size: int, settings: ExecutorSettings, device: str | None
) -> Iterator[tuple[np.ndarray, Any]]:
    started = _connect(settings)
    import pandas as pd
    import ray

    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        workers = settings.workers or (gpus or cpus)
        if gpus:
            workers = min(workers, gpus)
        per = settings.shard_batches or _auto_shard_batches(len(rows), batch_size, workers)
        shards = shard_rows(rows, batch_size, per)
        workers = max(1, min(workers, len(shards)))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = settings.progress
        ctx.print_on_execution_start = False
        ds = ray.data.from_pandas([pd.DataFrame({"row": s}) for s in shards])  # one block per shard
        res = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        with warnings.catch_warnings():  # max_restarts has no named parameter yet in Ray 2.60
            warnings.simplefilter("ignore")
            out = ds.map_batches(
                _RayShardActor,
                fn_constructor_args=(task, ("cuda" if gpus else "cpu") if device is None else device, 1),
                batch_size=None,
                compute=ray.data.ActorPoolStrategy(size=workers),
                max_restarts=settings.max_restarts,
                max_task_retries=-1 if settings.max_restarts != 0 else 0,
                **res,
            )
        try:
            for batch in out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                for blob in batch["blob"]:
                    shard, partial, _info = pickle.loads(blob)
                    yield shard, partial
        except Exception as e:
            raise _explain(e, settings) from None
    finally:
        if started:
            ray.shutdown()
