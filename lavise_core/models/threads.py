"""How many torch threads a CPU-bound step may use: every core this process may use, or a set number."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["cpu_threads", "torch_threads"]


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
