"""How many torch threads a CPU-bound step may use: every core this process may use, or a set number."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

__all__ = ["blas_threads", "cpu_threads", "one_blas_thread", "torch_threads"]

P = ParamSpec("P")
R = TypeVar("R")


def cpu_threads(n: int) -> int:
    """``n`` torch threads, or with ``n = 0`` every core this process may use (its CPU affinity)."""
    if n > 0:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with :func:`cpu_threads` ``(n)`` torch threads, restoring the previous count after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # finds the BLAS libraries once (~0.2 ms); a limit then costs ~8 us


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with at most ``n`` threads in numpy's BLAS, restoring the previous count after.

    A query's mat-vecs are microseconds of work, but OpenBLAS wakes its worker threads for each: on a busy
    2-core machine a (1280, 384) mat-vec took 17.6 ms that way and 0.12 ms in one thread.
    """
    with _blas_controller().limit(limits=n, user_api="blas"):
        yield


def one_blas_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: ``fn`` runs under :func:`blas_threads` ``(1)`` (for interactive calls made of small products)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with blas_threads(1):
            return fn(*args, **kwargs)

    return wrapper
