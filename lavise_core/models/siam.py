"""SIAM: semantically interpretable activation maps (Marcos, Lobry & Tuia, ICCV-W 2019; METHODS.md §4).

The demo CNN's feature extractor, a 1×1 conv to one map per attribute (ReLU), and class scores that are a
linear function of the maps:

- ``linear``: ``z_a = mean_{u,v} M_a`` (global average), ``s_c = Σ_a W[c, a] z_a + b_c``;
- ``templates``: each map average-pooled to a ``G × G`` grid and weighted by ``T`` non-negative spatial
  templates, ``z_{a,t} = Σ_g τ_{a,t,g} M_a[g]``, ``s_c = Σ_{a,t} W[c, (a, t)] z_{a,t} + b_c``.

Either way the score is exactly the sum of per-attribute contributions plus the bias (what / where / how
much). Training: BCE on ``tanh(mean M_a)`` against each image's attribute labels + cross-entropy on the
species + an L1 penalty on the templates; Adam. ``frozen`` keeps the demo CNN's backbone; ``finetuned``
then trains everything at a tenth of the rate.

``lavise train-siam`` trains all four variants (frozen / fine-tuned × linear / templates), writes the
chosen one to ``models/synthbirds_siam.{safetensors,json}`` and every variant's test numbers to its card.
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
    "VARIANTS",
    "WEIGHTS_FILE",
    "SiamError",
    "build_siam",
    "check_attributes",
    "train_siam",
]

CARD_FILE = "synthbirds_siam.json"
WEIGHTS_FILE = "synthbirds_siam.safetensors"
VARIANTS = ("frozen-linear", "frozen-templates", "finetuned-linear", "finetuned-templates")


class SiamError(ValueError):
    """A SIAM checkpoint that does not fit the data set (attribute list), or a bad training setting."""


def check_attributes(card_attributes: list[str], ds: ProbeDataset) -> None:
    """Raise :class:`SiamError` unless the checkpoint's attribute list is the data set's attribute vocabulary."""
    have = ds.attribute_vocabulary()
    if list(card_attributes) != have:
        missing = sorted(set(card_attributes) - set(have))[:5]
        extra = sorted(set(have) - set(card_attributes))[:5]
        raise SiamError(
            f"the SIAM checkpoint's {len(card_attributes)} attributes are not the data set's {len(have)} "
            f"({ds.name}): missing from the data {missing or '—'}, not in the checkpoint {extra or '—'}. "
            "Retrain it on this data set with `lavise train-siam --data <folder>`."
        )


def _module_class() -> type:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lavise_core.models.demo_cnn import build_synthbirds_cnn

    class SIAMNet(nn.Module):
        """Backbone ``features`` -> ``attributes`` (1×1 conv + ReLU, ``(N, A, h, w)``) -> evidence -> ``classifier``.

        ``forward(x)``: logits ``(N, K)``; :meth:`explain`: maps, evidence and contributions.
        """

        def __init__(
            self, num_classes: int, num_attributes: int, width: int = 128, templates: int = 0, grid: int = 4
        ) -> None:
            super().__init__()
            self.features = build_synthbirds_cnn(num_classes, width).features
            self.attributes = nn.Sequential(nn.Conv2d(width, num_attributes, 1), nn.ReLU())
            self.n_templates, self.grid = templates, grid
            if templates:
                self.templates = nn.Parameter(
                    torch.full((num_attributes, templates, grid, grid), 1.0 / grid**2)
                )
            self.classifier = nn.Linear(num_attributes * max(templates, 1), num_classes)

        def template_weights(self) -> torch.Tensor:
            """``(A, T, G, G)`` non-negative templates."""
            return self.templates.clamp_min(0)

        def evidence(self, maps: torch.Tensor) -> torch.Tensor:
            """``(N, A, h, w)`` -> ``(N, A·T)`` (``(N, A)`` for the linear variant)."""
            if not self.n_templates:
                return maps.mean((2, 3))
            g = F.adaptive_avg_pool2d(maps, self.grid)  # (N, A, G, G)
            z = (g[:, :, None] * self.template_weights()[None]).sum((3, 4))  # (N, A, T)
            return z.flatten(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.evidence(self.attributes(self.features(x))))

        def contributions(self, maps: torch.Tensor, c: int) -> torch.Tensor:
            """``(N, A)``: attribute ``a``'s share of class ``c``'s score, ``Σ_t W[c, (a, t)] z_{a, t}``."""
            z = self.evidence(maps)
            t = max(self.n_templates, 1)
            return (z * self.classifier.weight[c]).view(len(z), -1, t).sum(2)

        def where(self, maps: torch.Tensor, c: int) -> torch.Tensor:
            """``(N, A, h, w)`` spatial contribution maps of class ``c`` (they sum to :meth:`contributions`)."""
            _n, a, h, w = maps.shape
            if not self.n_templates:
                return maps * self.classifier.weight[c].view(1, a, 1, 1) / (h * w)
            wt = self.classifier.weight[c].view(a, self.n_templates, 1, 1)
            tau = (self.template_weights() * wt).sum(1)  # (A, G, G): signed weight of each grid cell
            cell = F.interpolate(tau[None], size=(h, w), mode="nearest")[0]  # cells are (h/G)×(w/G) blocks
            return maps * cell[None] / ((h // self.grid) * (w // self.grid))

    SIAMNet.__qualname__ = "SIAMNet"
    SIAMNet.__module__ = __name__
    return SIAMNet


def __getattr__(name: str) -> Any:
    if name == "SIAMNet":
        cls = _module_class()
        globals()["SIAMNet"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_siam(
    num_classes: int, num_attributes: int, width: int = 128, templates: int = 0, grid: int = 4
) -> nn.Module:
    """A freshly initialised SIAM network (the ``architecture: "synthbirds_siam"`` builder)."""
    return __getattr__("SIAMNet")(num_classes, num_attributes, width, templates, grid)


# ----------------------------------------------------------------------------- training
def _attribute_loss(maps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    p = maps.mean((2, 3)).tanh().clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(p, y)


def _run_epochs(
    net: nn.Module,
    params: list,
    xs: torch.Tensor,
    labels: torch.Tensor,
    attrs: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    gen: torch.Generator,
    cached: bool,
    mean: torch.Tensor,
    std: torch.Tensor,
    l1: float = 1e-4,
) -> None:
    """Adam on attribute BCE + species CE (+ template L1); lr divided by 10 for the last third of the epochs.

    ``cached``: ``xs`` are the frozen backbone's features; else uint8 images (augmented like the demo CNN).
    """
    import torch
    import torch.nn.functional as F

    from lavise_core.models.demo_cnn import augment_batch, normalise_batch

    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, (2 * epochs) // 3)], 0.1)
    n = len(xs)
    for _ in range(epochs):
        net.train()
        if cached:
            net.features.eval()
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            b = order[s : s + batch]
            f = xs[b] if cached else net.features(normalise_batch(augment_batch(xs[b], gen), mean, std))
            maps = net.attributes(f)
            loss = _attribute_loss(maps, attrs[b]) + F.cross_entropy(
                net.classifier(net.evidence(maps)), labels[b]
            )
            if net.n_templates:
                loss = loss + l1 * net.template_weights().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()


def evaluate_siam(net: nn.Module, feats: torch.Tensor, labels: np.ndarray, attrs: np.ndarray) -> dict:
    """Test numbers from backbone features ``(N, C, h, w)``: accuracy, attribute AUC, decomposition error."""
    import torch
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        maps = net.attributes(feats)
        logits = net.classifier(net.evidence(maps))
        pred = logits.argmax(1)
        contrib = net.contributions(maps, 0)  # checked for the predicted class below, per image
        err = 0.0
        for c in range(logits.shape[1]):
            sel = pred == c
            if sel.any():
                total = net.contributions(maps[sel], c).double().sum(1) + float(net.classifier.bias[c])
                err = max(err, float((total - logits[sel, c].double()).abs().max()))
        pooled = maps.mean((2, 3)).numpy()
    cols = [a for a in range(attrs.shape[1]) if 0 < attrs[:, a].sum() < len(attrs)]
    auc = float(np.mean([roc_auc_score(attrs[:, a], pooled[:, a]) for a in cols]))
    del contrib
    return {
        "test_accuracy": float((pred.numpy() == labels).mean()),
        "attribute_auc": auc,
        "decomposition_max_error": err,
    }


def train_siam(
    data: str | Path = "data/synthbirds",
    out_dir: str | Path = "models",
    backbone_card: str | Path = "models/synthbirds_cnn.json",
    head_epochs: int = 30,
    finetune_epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int = 2,
    keep: str = "finetuned-linear",
    progress: bool = True,
) -> dict:
    """Train the four SIAM variants, write ``keep``'s weights and a card with every variant's numbers."""
    import copy

    import torch
    from safetensors.torch import load_file, save_file

    from lavise_core.models.demo_cnn import load_images, normalise_batch

    if keep not in VARIANTS:
        raise SiamError(f"keep must be one of {VARIANTS}, got {keep!r}")
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ds = ProbeDataset.open(data)
    bcard = json.loads(Path(backbone_card).read_text())
    size, width = int(bcard["input_size"]), int(bcard["arch_kwargs"]["width"])
    mean = torch.tensor(bcard["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(bcard["std"]).view(1, 3, 1, 1)
    vocab = ds.attribute_vocabulary()
    A, K = len(vocab), len(ds.classes)
    tr, te = ds.indices("train"), ds.indices("test")
    amat = ds.attribute_matrix(vocab)
    labels = ds.labels()
    x_tr = torch.from_numpy(load_images(ds, tr, size, progress))
    x_te = torch.from_numpy(load_images(ds, te, size, progress))
    y_tr, a_tr = torch.from_numpy(labels[tr]), torch.from_numpy(amat[tr])
    state = load_file(str(Path(backbone_card).with_suffix(".safetensors")))
    backbone = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}

    def feats_of(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [net.features(normalise_batch(x[s : s + 256], mean, std)) for s in range(0, len(x), 256)]
            )

    results: dict[str, dict] = {}
    nets: dict[str, nn.Module] = {}
    for templates in (0, 2):
        kind = "templates" if templates else "linear"
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = build_siam(K, A, width, templates)
        net.features.load_state_dict(backbone)
        net.eval()
        f_tr = feats_of(net, x_tr)
        head = [p for n, p in net.named_parameters() if not n.startswith("features.")]
        _run_epochs(net, head, f_tr, y_tr, a_tr, head_epochs, lr, batch_size, gen, True, mean, std)
        results[f"frozen-{kind}"] = evaluate_siam(net, feats_of(net, x_te), labels[te], amat[te])
        nets[f"frozen-{kind}"] = copy.deepcopy(net)
        _run_epochs(
            net,
            list(net.parameters()),
            x_tr,
            y_tr,
            a_tr,
            finetune_epochs,
            lr / 10,
            batch_size,
            gen,
            False,
            mean,
            std,
        )
        results[f"finetuned-{kind}"] = evaluate_siam(net, feats_of(net, x_te), labels[te], amat[te])
        nets[f"finetuned-{kind}"] = net
        if progress:
            print({k: v for k, v in results.items() if kind in k})
    net = nets[keep]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    atomic_write_bytes(weights, tmp.read_bytes())
    tmp.unlink()
    card = {
        "name": "synthbirds_siam",
        "architecture": "synthbirds_siam",
        "arch_kwargs": {"num_attributes": A, "width": width, "templates": net.n_templates, "grid": net.grid},
        "classes": list(ds.classes),
        "attributes": vocab,
        "input_size": size,
        "mean": bcard["mean"],
        "std": bcard["std"],
        "layer": "attributes",
        "classifier": "classifier",
        "weights": WEIGHTS_FILE,
        "variant": keep,
        **results[keep],
        "variants": results,
        "backbone": {"card": Path(backbone_card).name, "test_accuracy": bcard.get("test_accuracy")},
        "data": bcard.get("data"),
        "data_hash": ds.content_hash(),
        "n_train": int(tr.size),
        "n_test": int(te.size),
        "seed": seed,
        "head_epochs": head_epochs,
        "finetune_epochs": finetune_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch_version": torch.__version__,
    }
    atomic_write_text(out / CARD_FILE, json.dumps(card, indent=2) + "\n")
    return card
