"""Shared fixtures: seeded tiny models with known outputs and tiny data sets written to tmp folders."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lavise_core.data.dataset import ImageRecord, ProbeDataset, write_dataset
from lavise_core.models.networks import LoadedModel
from lavise_core.models.text_encoder import TextEmbedder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the server freezes its warmed-up heap (views.serving.freeze_warm_heap); a test process opens many workspaces and
# would freeze each test's objects with them: tests/views/test_serving.py tests the freeze itself
os.environ.setdefault("LAVISE_GC_FREEZE", "0")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


class IdentityCNN(nn.Module):
    """features = ReLU(identity 1×1 conv): the layer map equals the input; classifier = identity (3 classes).

    With mean 0 / std 1 preprocessing, the pooled activation of filter k on a solid image is its
    colour channel k / 255, exactly: hand-checkable probe outputs.
    """

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(3, 3)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.classifier.weight.copy_(torch.eye(3))
            self.classifier.bias.zero_()
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        f = self.features(x)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated failure inside the forward pass")
        return self.classifier(self.pool(f).flatten(1))


def wrap(model: nn.Module, size: int = 16, classes: list[str] | None = None) -> LoadedModel:
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        name="identity",
        model=model,
        class_names=classes or ["red", "green", "blue"],
        input_size=size,
        resize=size,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        default_layer="features",
        classifier="classifier",
        weights_hash=digest,
    )


@pytest.fixture
def identity_model() -> LoadedModel:
    return wrap(IdentityCNN())


# solid colours of the tiny data set; image i is COLOURS[i]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50), (10, 20, 30), (128, 128, 0)]


@pytest.fixture
def colour_dataset(tmp_path: Path) -> ProbeDataset:
    """Six solid-colour 16×16 PNGs plus one corrupt file (``images/broken.png``)."""
    root = tmp_path / "colours"
    (root / "images").mkdir(parents=True)
    records = []
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (16, 16), c).save(root / f"images/{i}.png")
        label = int(np.argmax(c))
        records.append(ImageRecord(id=str(i), path=f"images/{i}.png", label=label, split="test"))
    (root / "images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records.append(ImageRecord(id="broken", path="images/broken.png", label=0))
    return write_dataset(
        root, name="Colours", source="test", classes=["red", "green", "blue"], records=records
    )


class HashEmbedder(TextEmbedder):
    """Deterministic fake embedder: unit vectors seeded by the text's hash; counts calls."""

    def __init__(self, d: int = 16):
        super().__init__(model_id="hash")
        self.d, self.calls, self.texts = d, 0, 0

    @property
    def dim(self) -> int:
        return self.d

    def embed(self, texts, batch_size=256, progress=False):
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), self.d), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.d)
            out[i] = v / np.linalg.norm(v)
        return out


def build_stage(bundle, dataset, stage: str, lm=None, **options) -> dict:
    """Build ``stage`` (and what it needs) through the stage registry -> its manifest record."""
    from lavise_core.pipeline.stages import build_stages
    from lavise_core.stages import REGISTRY

    build_stages(
        bundle, dataset, REGISTRY, [stage], options={stage: options} if options else None,
        model_loader=(lambda: lm) if lm is not None else None,
    )  # fmt: skip
    return bundle.manifest["stages"][stage]
