"""Thread limits for interactive work: numpy's BLAS held to one thread inside a query, restored after."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from lavise_core.models.threads import blas_threads, one_blas_thread


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in ThreadpoolController().info() if lib["user_api"] == "blas"]


def test_blas_threads_limits_inside_and_restores_after():
    before = _blas_threads()
    if not before:
        pytest.skip("numpy has no BLAS that threadpoolctl can control")
    with blas_threads(1):
        assert _blas_threads() == [1] * len(before)
    assert _blas_threads() == before


def test_a_decorated_function_runs_in_one_blas_thread_and_keeps_its_name_and_result():
    seen: list[list[int]] = []

    @one_blas_thread
    def scores(fe: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Cosine scores."""
        seen.append(_blas_threads())
        return fe @ q

    fe = np.eye(3, dtype=np.float32)
    out = scores(fe, np.array([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])
    assert scores.__name__ == "scores" and scores.__doc__ == "Cosine scores."
    assert all(n == 1 for n in seen[0])
