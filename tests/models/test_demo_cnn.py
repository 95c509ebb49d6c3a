"""The SynthBirds demo CNN: shapes, card/checkpoint round-trip, a tiny deterministic training run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lavise_core.cli.train import add_train_demo
from lavise_core.data.dataset import ProbeDataset
from lavise_core.data.synthbirds import generate_synthbirds, render_synthbird
from lavise_core.models import demo_cnn

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_shapes_and_layout() -> None:
    model = demo_cnn.build_synthbirds_cnn(num_classes=12, width=128).eval()
    assert isinstance(model, demo_cnn.SynthBirdsCNN)
    assert isinstance(model.features, torch.nn.Sequential) and isinstance(model.features[-1], torch.nn.ReLU)
    assert isinstance(model.pool, torch.nn.AdaptiveAvgPool2d) and model.classifier.weight.shape == (12, 128)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        fmap = model.features(x)
        assert fmap.shape == (2, 128, 8, 8)
        logits = model(x)
    assert logits.shape == (2, 12)
    torch.testing.assert_close(logits, model.classifier(fmap.mean((2, 3))))
    with pytest.raises(ValueError, match="num_classes"):
        demo_cnn.build_synthbirds_cnn(num_classes=1)


def test_evaluate_demo_exact() -> None:
    classes = ["a", "b", "c", "d"]
    labels = np.array([0, 0, 1, 1, 2, 3])
    pred = np.array([0, 1, 1, 1, 2, 2])
    m = demo_cnn.evaluate_demo(pred, labels, classes, [["a", "b", "crown.colour"]])
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    assert m["one_part_pair_accuracy"] == pytest.approx(3 / 4)
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 1.0, "d": 0.0}
    assert m["pair_accuracy"] == {"a|b": 0.75}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ProbeDataset:
    return generate_synthbirds(tmp_path_factory.mktemp("tiny") / "sb", n=36, image_size=48, progress=False)


def test_tiny_training_is_deterministic_and_round_trips(tiny: ProbeDataset, tmp_path: Path) -> None:
    kw = dict(seed=3, epochs=1, progress=False, threads=1, width=16, batch_size=8)
    card = demo_cnn.train_demo(tiny.root, tmp_path / "a", **kw)
    demo_cnn.train_demo(tiny.root, tmp_path / "b", **kw)
    wa = (tmp_path / "a" / demo_cnn.WEIGHTS_FILE).read_bytes()
    assert wa == (tmp_path / "b" / demo_cnn.WEIGHTS_FILE).read_bytes()
    for key in ("name", "architecture", "arch_kwargs", "classes", "input_size", "mean", "std", "layer",
                "classifier", "test_accuracy", "one_part_pair_accuracy", "per_class_accuracy", "data_hash",
                "seed", "epochs", "train_seconds", "torch_version"):  # fmt: skip
        assert key in card, key
    assert card["data_hash"] == tiny.content_hash() and card["input_size"] == 48
    assert card["arch_kwargs"] == {"num_classes": 12, "width": 16}
    model, card2 = demo_cnn.load_demo(tmp_path / "a")
    assert card2 == json.loads(json.dumps(card))
    assert not model.training
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        assert model(x).shape == (1, 12)
    other = demo_cnn.train_demo(tiny.root, tmp_path / "c", **(kw | {"seed": 4}))
    assert other["seed"] == 4
    assert (tmp_path / "c" / demo_cnn.WEIGHTS_FILE).read_bytes() != wa


def test_load_demo_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-demo"):
        demo_cnn.load_demo(tmp_path)


def test_cli_registers_train_demo() -> None:
    parser = argparse.ArgumentParser()
    add_train_demo(parser.add_subparsers())
    args = parser.parse_args(["train-demo", "--data", "d", "--out", "m", "--epochs", "2"])
    assert (args.data, args.out, args.epochs, args.seed) == ("d", "m", 2, 0)


@pytest.mark.skipif(not (MODELS / demo_cnn.CARD_FILE).is_file(), reason="no committed demo checkpoint")
def test_committed_checkpoint() -> None:
    model, card = demo_cnn.load_demo(MODELS)
    assert (MODELS / demo_cnn.WEIGHTS_FILE).stat().st_size < 5_000_000
    assert card["test_accuracy"] >= 0.95 and card["one_part_pair_accuracy"] >= 0.85
    mean = torch.tensor(card["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["std"]).view(1, 3, 1, 1)
    ids = [i for i in range(60) if render_synthbird(i, image_size=32)[2].split == "test"][:12]
    batch = np.stack([render_synthbird(i, image_size=card["input_size"])[0] for i in ids])
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    labels = np.array([i % len(card["classes"]) for i in ids])
    assert (pred == labels).mean() >= 0.75
