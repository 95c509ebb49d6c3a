"""The compact demo CNN trained on SynthBirds: conv features -> global average pool -> one linear layer.

This is the architecture the explanation papers assume (Guo et al. eq. 5–8 read the classifier
weights ``W`` of a single linear layer on globally pooled features ``phi_k``): ``features`` is the
explained layer (a ``nn.Sequential`` ending in a ReLU, ``(N, C, H/16, W/16)``), ``pool`` the global
average pool and ``classifier`` the linear layer ``(K, C)``.

Preprocessing contract (written to the model card and used unchanged in training, plus augmentation
of the train split only): RGB, resized to ``input_size``² (bilinear), scaled to [0, 1], normalised
with the card's ``mean`` / ``std``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lavise_core.data.dataset import ProbeDataset, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CARD_FILE",
    "DEFAULT_EPOCHS",
    "WEIGHTS_FILE",
    "SynthBirdsCNN",  # noqa: F822 - defined on first access by the module __getattr__ (keeps torch off the CLI import path)
    "build_synthbirds_cnn",
    "evaluate_demo",
    "load_demo",
    "load_images",
    "train_demo",
]

WEIGHTS_FILE = "synthbirds_cnn.safetensors"
CARD_FILE = "synthbirds_cnn.json"
DEFAULT_EPOCHS = 12
DEFAULT_WIDTH = 128


def _module_class() -> type:
    """Define the ``nn.Module`` subclass on first use, so importing this module (the CLI) skips torch.

    ``from lavise_core.models.demo_cnn import SynthBirdsCNN`` works through the module ``__getattr__``.
    """
    from torch import nn

    class SynthBirdsCNN(nn.Module):
        """Seven 3×3 conv–BN–ReLU blocks (four with stride 2), global average pool, one linear layer.

        Args:
            num_classes: K, the number of species.
            width: C, channels of the explained layer (``features``); earlier blocks use 1/8, 1/4
                and 1/2 of it.

        ``features(x)``: ``(N, 3, S, S) -> (N, C, S/16, S/16)`` (8×8 at S = 128);
        ``forward(x)``: logits ``(N, K)``.
        """

        def __init__(self, num_classes: int = 12, width: int = DEFAULT_WIDTH) -> None:
            super().__init__()
            if num_classes < 2 or width < 16:
                raise ValueError(f"need num_classes >= 2 and width >= 16, got {num_classes}, {width}")
            c1, c2, c3 = max(8, width // 8), max(8, width // 4), max(8, width // 2)
            plan = [
                (3, c1, 2),
                (c1, c2, 2),
                (c2, c2, 1),
                (c2, c3, 2),
                (c3, c3, 1),
                (c3, width, 2),
                (width, width, 1),
            ]
            layers: list[nn.Module] = []
            for cin, cout, stride in plan:
                layers += [
                    nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(width, num_classes)
            self.num_classes, self.width = num_classes, width

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.pool(self.features(x)).flatten(1))

    SynthBirdsCNN.__qualname__ = "SynthBirdsCNN"
    SynthBirdsCNN.__module__ = __name__
    return SynthBirdsCNN


def __getattr__(name: str) -> Any:
    if name == "SynthBirdsCNN":
        cls = _module_class()
        globals()["SynthBirdsCNN"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_synthbirds_cnn(num_classes: int = 12, width: int = DEFAULT_WIDTH) -> nn.Module:
    """A freshly initialised :class:`SynthBirdsCNN` (the ``architecture: "synthbirds_cnn"`` builder)."""
    return __getattr__("SynthBirdsCNN")(num_classes=num_classes, width=width)


# ----------------------------------------------------------------------------- data
def load_images(ds: ProbeDataset, indices: np.ndarray, input_size: int, progress: bool = False) -> np.ndarray:
    """Images of ``ds`` as ``(N, 3, S, S)`` uint8, RGB, resized bilinearly to ``input_size`` (the card contract)."""
    from PIL import Image
    from tqdm import tqdm

    out = np.empty((len(indices), 3, input_size, input_size), np.uint8)
    for j, i in enumerate(tqdm(indices, desc="load", unit="img", disable=not progress)):
        with Image.open(ds.image_path(int(i))) as im:
            im = im.convert("RGB")
            if im.size != (input_size, input_size):
                im = im.resize((input_size, input_size), Image.Resampling.BILINEAR)
            out[j] = np.asarray(im).transpose(2, 0, 1)
    return out


def normalise_batch(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_u8.float() / 255.0 - mean) / std


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 8) -> torch.Tensor:
    """Train-only augmentation on uint8 ``(N, 3, S, S)``: random flip, random shift (reflect padding)."""
    import torch
    import torch.nn.functional as F

    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    return torch.stack([padded[k, :, oy : oy + s, ox : ox + s] for k, (oy, ox) in enumerate(off.tolist())])


# ----------------------------------------------------------------------------- evaluation
def _predict(
    model: nn.Module, x_u8: np.ndarray, mean: torch.Tensor, std: torch.Tensor, batch: int = 128
) -> np.ndarray:
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for k in range(0, len(x_u8), batch):
            xb = normalise_batch(torch.from_numpy(x_u8[k : k + batch]), mean, std)
            preds.append(model(xb).argmax(1).numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def evaluate_demo(pred: np.ndarray, labels: np.ndarray, classes: list[str], pairs: list[list[str]]) -> dict:
    """Overall, per-class and one-part-pair accuracies of predictions ``(N,)`` against labels ``(N,)``.

    ``one_part_pair_accuracy``: K-way accuracy on the images whose species belongs to a one-part pair;
    ``pair_accuracy[a|b]``: K-way accuracy on the images of the pair ``a``, ``b``.
    """
    correct = pred == labels
    per_class = {
        c: float(correct[labels == k].mean()) if (labels == k).any() else None for k, c in enumerate(classes)
    }
    in_pairs = sorted({classes.index(n) for p in pairs for n in p[:2]})
    sel = np.isin(labels, in_pairs)
    pair_acc = {}
    for p in pairs:
        ks = [classes.index(p[0]), classes.index(p[1])]
        m = np.isin(labels, ks)
        pair_acc[f"{p[0]}|{p[1]}"] = float(correct[m].mean()) if m.any() else None
    return {
        "test_accuracy": float(correct.mean()) if len(correct) else None,
        "one_part_pair_accuracy": float(correct[sel].mean()) if sel.any() else None,
        "per_class_accuracy": per_class,
        "pair_accuracy": pair_acc,
        "n_test": len(labels),
    }


# ----------------------------------------------------------------------------- training
def train_demo(
    data: Path,
    out_dir: Path = Path("models"),
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    progress: bool = True,
    threads: int | None = None,
    *,
    width: int = DEFAULT_WIDTH,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_train: int | None = None,
    write: bool = True,
    save_every: int | None = None,
) -> dict:
    """Train :class:`SynthBirdsCNN` on a SynthBirds set, deterministically, and save weights + card.

    Writes ``out_dir/synthbirds_cnn.safetensors`` and ``out_dir/synthbirds_cnn.json`` atomically
    (unless ``write=False``) and returns the model card. ``threads`` sets ``torch.set_num_threads``
    (default 1: the committed checkpoint was trained so, and CPU kernels sum in a thread-dependent
    order, so only the same data, seed, epochs *and* thread count give bit-identical weights).

    ``save_every=N`` also writes, after every N-th epoch before the last, the series
    ``out_dir/synthbirds_cnn.epochEEE.safetensors`` with a card ``synthbirds_cnn.epochEEE.json`` (no metrics;
    ``"epoch": E``), loadable as a model spec; saving reads the weights only, so the final files are the same
    bytes as without it. The card's ``"series"`` lists the files written.
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save
    from tqdm import tqdm

    t0 = time.perf_counter()
    data, out_dir = Path(data), Path(out_dir)
    ds = ProbeDataset.open(data)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if save_every is not None and save_every < 1:
        raise ValueError(f"--save-every must be >= 1 epoch, got {save_every}")
    series: list[str] = []
    tr, te = ds.indices("train"), ds.indices("test")
    if max_train is not None:
        tr = tr[:max_train]
    if len(tr) == 0:
        raise ValueError(f"{data} has no train images")
    input_size = int(ds.meta.get("generator", {}).get("image_size", 128))
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads or 1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x_tr = load_images(ds, tr, input_size, progress)
        x_te = load_images(ds, te, input_size, progress)
        y_tr = torch.from_numpy(ds.labels()[tr])
        flat = x_tr.reshape(len(x_tr), 3, -1).astype(np.float64) / 255.0
        mean = [round(float(v), 4) for v in flat.mean((0, 2))]
        std = [round(float(v), 4) for v in flat.std((0, 2))]
        del flat
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

        model = build_synthbirds_cnn(len(ds.classes), width)
        steps = epochs * ((len(tr) + batch_size - 1) // batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
        xt = torch.from_numpy(x_tr)
        bar = tqdm(total=steps, desc="train", unit="batch", disable=not progress)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(tr), generator=gen)
            total, seen = 0.0, 0
            for k in range(0, len(tr), batch_size):
                idx = order[k : k + batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    sched.step()
                    continue
                xb = augment_batch(xt[idx], gen)
                xb = ((xb / 255.0) - mean_t) / std_t
                loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / seen:.3f}")
            if write and save_every and (epoch + 1) % save_every == 0 and epoch + 1 < epochs:
                series.append(_save_epoch(model, out_dir, epoch + 1, ds, width, input_size, mean, std))
        bar.close()
        pred = _predict(model, x_te, mean_t, std_t)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    metrics = evaluate_demo(pred, ds.labels()[te], ds.classes, ds.meta.get("one_part_pairs", []))
    card = {
        "name": "synthbirds_cnn",
        "architecture": "synthbirds_cnn",
        "arch_kwargs": {"num_classes": len(ds.classes), "width": width},
        "classes": list(ds.classes),
        "input_size": input_size,
        "mean": mean,
        "std": std,
        "layer": "features",
        "classifier": "classifier",
        "weights": WEIGHTS_FILE,
        **metrics,
        "data": {"name": ds.name, "version": ds.meta.get("version"), **ds.meta.get("generator", {})},
        "data_hash": ds.content_hash(),
        "n_train": len(tr),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads or 1,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch_version": torch.__version__,
    }
    if series:
        card["series"] = [*series, CARD_FILE]
    if write:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(out_dir / WEIGHTS_FILE, save(state, metadata={"architecture": "synthbirds_cnn"}))
        atomic_write_text(out_dir / CARD_FILE, json.dumps(card, indent=2) + "\n")
    return card


def _save_epoch(
    model: nn.Module, out_dir: Path, epoch: int, ds: ProbeDataset, width: int, input_size: int,
    mean: list[float], std: list[float],
) -> str:  # fmt: skip
    """Write the epoch-``epoch`` checkpoint and its card (atomically) -> the card's file name."""
    from safetensors.torch import save

    stem = f"{Path(WEIGHTS_FILE).stem}.epoch{epoch:03d}"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(
        out_dir / f"{stem}.safetensors", save(state, metadata={"architecture": "synthbirds_cnn"})
    )
    card = {
        "name": stem, "architecture": "synthbirds_cnn", "arch_kwargs": {"num_classes": len(ds.classes), "width": width},
        "classes": list(ds.classes), "input_size": input_size, "mean": mean, "std": std, "layer": "features",
        "classifier": "classifier", "weights": f"{stem}.safetensors", "epoch": epoch,
    }  # fmt: skip
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(card, indent=2) + "\n")
    return f"{stem}.json"


def load_demo(model_dir: Path = Path("models")) -> tuple[nn.Module, dict]:
    """The trained demo CNN (eval mode) and its card from ``model_dir``."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    card_path, weights_path = model_dir / CARD_FILE, model_dir / WEIGHTS_FILE
    for p in (card_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing: train the demo CNN with `lavise train-demo --out {model_dir}`"
            )
    card = json.loads(card_path.read_text())
    if card.get("architecture") != "synthbirds_cnn":
        raise ValueError(f"{card_path}: architecture {card.get('architecture')!r} is not 'synthbirds_cnn'")
    model = build_synthbirds_cnn(**card["arch_kwargs"])
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval(), card
