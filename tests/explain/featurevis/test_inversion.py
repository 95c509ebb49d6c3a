"""Inversion (Mahendran & Vedaldi): the feature error falls far below the grey baseline; seeded; bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lavise_core.explain.featurevis.inversion import invert, relative_error
from lavise_core.explain.featurevis.visualisation import FeatureVisError
from lavise_core.models.networks import load_model


@pytest.fixture(scope="module")
def demo():
    return load_model("synthbirds")


def test_inversion_reconstructs_the_layer_map(demo) -> None:
    from lavise_core.data.samples import sample_photo

    x0 = demo.preprocess(sample_photo("astronaut"))[:, :64, :64].contiguous()  # a 64 px crop: fast
    a = invert(demo, x0, "features.8", steps=40)
    b = invert(demo, x0, "features.8", steps=40)
    assert a.image.shape == (64, 64, 3) and np.array_equal(a.image, b.image)
    assert a.relative_error < 0.5 * a.baseline_error and a.history[-1] < a.history[0]
    assert a.layer == "features.8"


def test_relative_error_exact_and_bad_input(demo) -> None:
    t = torch.ones(2, 3, 2, 2)
    assert relative_error(t * 1.5, t).tolist() == [0.5, 0.5]
    with pytest.raises(FeatureVisError, match="no spatial map"):
        invert(demo, torch.zeros(3, 64, 64), "classifier", steps=1)
    with pytest.raises(FeatureVisError, match=r"preprocessed \(3, S, S\) tensor, got \(64, 64\)"):
        invert(demo, torch.zeros(64, 64), steps=1)


def test_inversion_leaves_the_model_free_and_unchanged(demo) -> None:
    """The optimisation runs on a private copy: the model's lock is free while it runs, its weights untouched."""
    before = {k: v.clone() for k, v in demo.model.state_dict().items()}
    free = []

    def report(step: int, total: int) -> None:  # the lock is re-entrant: ask from another thread
        def probe() -> None:
            got = demo.lock.acquire(blocking=False)
            free.append(got)
            if got:
                demo.lock.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()

    invert(demo, torch.zeros(3, 32, 32), "features.2", steps=3, report=report)
    assert free == [True, True, True]
    after = demo.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
