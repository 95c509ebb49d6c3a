"""The data map: seeded and deterministic, clusters stay together, bad input, the stage on a tiny bundle."""

from __future__ import annotations

import numpy as np
import pytest

from lavise_core.explain.datamap import embed_pooled, neighbour_agreement


def clusters(n: int = 150, c: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = rng.normal(0, 4, (3, c))
    return (centres[y] + rng.normal(0, 1, (n, c))).astype(np.float32), y


def test_map_is_deterministic_and_keeps_classes_together() -> None:
    x, y = clusters()
    a = embed_pooled(x, n_jobs=1, n_iter=250)
    b = embed_pooled(x, n_jobs=1, n_iter=250)
    assert a.shape == (150, 2) and a.dtype == np.float32 and np.array_equal(a, b)
    assert neighbour_agreement(a, y) > 0.95  # chance: 1/3
    assert neighbour_agreement(np.zeros((150, 2)) + np.arange(150)[:, None], y) < 0.5  # a line in index order


def test_neighbour_agreement_exact_and_errors() -> None:
    p = np.array([[0.0, 0], [0, 1], [10, 0], [10, 1]])
    assert neighbour_agreement(p, np.array([0, 0, 1, 1]), k=1) == 1.0
    assert neighbour_agreement(p, np.array([0, 1, 0, 1]), k=1) == 0.0
    with pytest.raises(ValueError, match="at least 4 rows"):
        embed_pooled(np.zeros((2, 5)))
