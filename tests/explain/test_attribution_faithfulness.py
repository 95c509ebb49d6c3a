"""One image's faithfulness: pixel order, curve summary, and deletion / insertion against a random order."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lavise_core import views
from lavise_core.explain.attribution.faithfulness import curve_auc, pixel_ranks, random_ranks


def test_pixel_ranks_largest_first_ties_at_random():
    m = torch.tensor([[[0.0, 3.0], [1.0, 3.0]]])
    r = pixel_ranks(m, torch.Generator().manual_seed(0))[0].tolist()
    assert sorted(r[i] for i in (1, 3)) == [0, 1] and r[2] == 2 and r[0] == 3
    # a flat map gives a permutation, not the raster order, and the seed fixes it
    a = pixel_ranks(torch.zeros(1, 4, 4), torch.Generator().manual_seed(1))
    b = pixel_ranks(torch.zeros(1, 4, 4), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and sorted(a[0].tolist()) == list(range(16)) and a[0].tolist() != list(range(16))
    assert sorted(random_ranks(2, 5, torch.Generator().manual_seed(0))[1].tolist()) == list(range(5))


def test_curve_auc_is_the_trapezoid_mean():
    np.testing.assert_allclose(curve_auc(np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])), [0.5, 0.25])
    with pytest.raises(ValueError, match="S >= 1"):
        curve_auc(np.ones((1, 1)))


class _Corner(nn.Module):
    """Class 0's logit = 8 × the mean of the top-left 4×4 corner (channel 0); class 1's = 0."""

    def forward(self, x):
        s = 8 * x[:, 0, :4, :4].mean((1, 2))
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_image_faithfulness_map_on_the_evidence_beats_random():
    lm = SimpleNamespace(model=_Corner().eval(), lock=threading.RLock(), class_names=["wren", "crow"])
    x = torch.zeros(1, 3, 16, 16)
    x[:, :, :4, :4] = 1.0  # the evidence: blurred for insertion, deleted (set to 0) for deletion
    good = torch.zeros(16, 16)
    good[:4, :4] = 1.0
    f = views.image_faithfulness(lm, x, 0, good, steps=16)
    p_full = float(torch.softmax(torch.tensor([8.0, 0.0]), 0)[0])
    assert f.target == "wren" and f.deletion.shape == f.insertion.shape == (17,)
    assert f.deletion[0] == pytest.approx(p_full) and f.insertion[-1] == pytest.approx(p_full)
    assert f.deletion[1] == pytest.approx(0.5)  # the 16 corner pixels go first: logits (0, 0)
    assert f.insertion[1] == pytest.approx(p_full)  # ... and are revealed first
    assert f.deletion_auc < f.random_deletion_auc and f.insertion_auc > f.random_insertion_auc
    assert "beats a random order on both" in views.image_faithfulness_text(f)
    bad = views.image_faithfulness(lm, x, 0, 1.0 - good, steps=16)  # the corner last
    assert bad.deletion_auc > f.deletion_auc
    assert bad.random_deletion_auc == pytest.approx(f.random_deletion_auc)  # same seed, same random order


def test_image_faithfulness_rejects_bad_shapes():
    lm = SimpleNamespace(model=_Corner().eval(), lock=threading.RLock(), class_names=["wren", "crow"])
    with pytest.raises(ValueError, match="one image"):
        views.image_faithfulness(lm, torch.ones(2, 3, 16, 16), 0, torch.zeros(16, 16))
    with pytest.raises(ValueError, match="the map has 4 values, the image 16×16 pixels"):
        views.image_faithfulness(lm, torch.ones(1, 3, 16, 16), 0, torch.zeros(2, 2))
