"""Circuits: which filters of the lower recorded layers drive filter ``k`` of the explained layer, in words.

Filter ``k``'s activation on an image is its spatial **mean**, the bundle's pooled ``phi_k`` (the probe pass ranks
a filter's top images by it)::

    T_k(x) = 1/(h w) Σ_p A_k(x)_p                                                                 (1)

A filter ``j`` of a lower layer ``L`` with map ``a_j (H, W)`` contributes gradient × activation, summed over
positions and averaged over filter ``k``'s top probe images ``X_k``::

    c_j = 1/|X_k| Σ_{x ∈ X_k} Σ_q a_j(x)_q · ∂T_k(x)/∂a_j(x)_q                                     (2)

Where ``L`` feeds filter ``k``'s convolution directly (one ``Conv2d``, then at most a ``BatchNorm2d``, folded into a
scale ``s_k``, and a ``ReLU``), the exact linear contribution is also given::

    e_j = 1/|X_k| Σ_x 1/(h w) Σ_p g_p · s_k · Σ_d W[k, j, d] · a_j(x)_{p·stride + d·dilation - pad}     (3)

with ``g_p = 1`` where the ReLU passes (``A_k > 0``; always without a ReLU). With the gates fixed ``T_k`` is linear
in ``a``, so (2) = (3) on that path; what neither attributes is the bias ``s_k b_k + β_k - s_k μ_k`` (gated).

Each input's words come from the ``layers`` stage (:mod:`~lavise_core.explain.dissection.layers`): its best
concept by IoU, a label when the IoU reaches :data:`~lavise_core.explain.dissection.labels.IOU_MIN`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lavise_core.explain.dissection.labels import IOU_MIN, rank_labels
from lavise_core.models.networks import output_aliases, record_layers
from lavise_core.pipeline.bundle import StageMissing
from lavise_core.pipeline.probe import image_batches

__all__ = [
    "ConvPath",
    "FilterInput",
    "LayerContributions",
    "LayerLabels",
    "contributions",
    "exact_linear",
    "filter_inputs",
    "layer_labels",
    "lower_layers",
    "rank_inputs",
    "single_conv_path",
    "top_image_inputs",
]


# ------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class FilterInput:
    """One lower filter driving filter ``k``; iterates as ``(layer, filter, contribution, label)``.

    Attributes:
        layer: the recorded layer's module name; ``filter``: its index there.
        contribution: eq. 2 (gradient × activation, averaged over filter k's top images).
        label: its Network Dissection concept from the ``layers`` stage, or ``None`` (no label).
        evidence: that label's evidence in words ("IoU 0.12 with ..."), or why there is none.
        iou: the best concept's IoU (0 where the layer has no table).
        exact: eq. 3 where the layer feeds filter k's convolution directly, else ``None``.
    """

    layer: str
    filter: int
    contribution: float
    label: str | None
    evidence: str
    iou: float = 0.0
    exact: float | None = None

    def __iter__(self) -> Iterator:
        return iter((self.layer, self.filter, self.contribution, self.label))


@dataclass(frozen=True)
class LayerContributions:
    """Per image, every filter of ``layer``: ``gradient (B, C_L)`` eq. 2 before averaging, ``exact (B, C_L)`` eq. 3
    before averaging (``None`` off a single-convolution path)."""

    layer: str
    gradient: np.ndarray
    exact: np.ndarray | None


@dataclass(frozen=True)
class LayerLabels:
    """The ``layers`` stage's words for one layer: ``concepts (C,)`` best concept, ``iou (C,)`` its IoU, ``images``
    how many annotated images the IoU was measured on."""

    concepts: list[str]
    iou: np.ndarray
    images: int

    def label(self, j: int) -> tuple[str | None, str, float]:
        """``(label or None, evidence in words, IoU)`` of filter ``j``."""
        c, s = self.concepts[j], float(self.iou[j])
        where = f"on {self.images} annotated images" if self.images else "on the annotated images"
        if s >= IOU_MIN:
            return c, f"IoU {s:.3f} with “{c}” {where} (layers stage)", s
        return (
            None,
            f"no label: its best concept “{c}” has IoU {s:.3g}, under the {IOU_MIN:g} a label needs, {where}",
            s,
        )


@dataclass(frozen=True)
class ConvPath:
    """The modules from a lower layer's output to filter ``k``'s map: one ``conv``, then ``scale (C_out,)`` (a folded
    ``BatchNorm2d``, else ones) and whether a ``relu`` follows."""

    conv: nn.Conv2d
    scale: torch.Tensor
    relu: bool


# ------------------------------------------------------------------------------------------- structure
def _innermost(model: nn.Module, name: str) -> str:
    """The deepest module whose output is ``name``'s output (``features`` -> ``features.20``)."""
    aliases = output_aliases(model, name)
    return aliases[-1] if aliases else name


def lower_layers(model: nn.Module, recorded: Sequence[str], layer: str) -> list[str]:
    """The ``recorded`` layers that come before ``layer`` in the network (module order), ``layer``'s aliases
    excluded: the candidates for filter ``k``'s inputs, nearest last."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    top = order[_innermost(model, layer)]
    same = {layer, *output_aliases(model, layer)}
    return [n for n in recorded if n not in same and order.get(_innermost(model, n), top) < top]


def single_conv_path(model: nn.Module, lower: str, layer: str) -> ConvPath | None:
    """:class:`ConvPath` when ``lower``'s output feeds ``layer``'s through exactly one ``Conv2d`` (groups 1, zero
    padding), then at most an eval-mode ``BatchNorm2d`` and a ``ReLU``, all children of one ``nn.Sequential``;
    ``None`` otherwise (then only eq. 2 holds)."""
    lo, hi = _innermost(model, lower), _innermost(model, layer)
    p_lo, _, c_lo = lo.rpartition(".")
    p_hi, _, c_hi = hi.rpartition(".")
    parent = model.get_submodule(p_lo) if p_lo == p_hi else None
    if not isinstance(parent, nn.Sequential):
        return None
    names = [n for n, _ in parent.named_children()]
    if c_lo not in names or c_hi not in names or names.index(c_lo) >= names.index(c_hi):
        return None
    mids = [getattr(parent, n) for n in names[names.index(c_lo) + 1 : names.index(c_hi) + 1]]
    conv = mids.pop(0)
    if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"):
        return None
    scale = torch.ones(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
    if mids and isinstance(mids[0], nn.BatchNorm2d):
        bn = mids.pop(0)
        if bn.training or bn.running_var is None:
            return None
        scale = (bn.weight if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    relu = bool(mids) and type(mids[0]) is nn.ReLU
    if relu:
        mids.pop(0)
    return None if mids else ConvPath(conv, scale.detach(), relu)


def exact_linear(path: ConvPath, a: torch.Tensor, out: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 3 per image before averaging: ``a (B, C_in, H, W)`` the lower layer's maps, ``out (B, C_out, h, w)``
    the layer's maps (for the ReLU gates) -> ``(B, C_in)``, each input channel's share of ``T_k``."""
    conv = path.conv
    w = conv.weight[k].detach().unsqueeze(1)  # (C_in, 1, kh, kw): one depthwise kernel per input channel
    y = F.conv2d(a, w, None, conv.stride, conv.padding, conv.dilation, groups=a.shape[1])  # (B, C_in, h, w)
    gate = (out[:, k : k + 1] > 0).to(y.dtype) if path.relu else torch.ones_like(y[:, :1])
    return (y * path.scale[k] * gate).mean((2, 3))


# ------------------------------------------------------------------------------------------- the pass
def contributions(
    lm, x: torch.Tensor, layer: str, k: int, lower: Sequence[str]
) -> tuple[np.ndarray, list[LayerContributions]]:
    """One forward and one backward pass of ``x (B, 3, S, S)``: ``T_k (B,)`` (eq. 1) and, per ``lower`` layer, its
    :class:`LayerContributions` (eq. 2; eq. 3 where :func:`single_conv_path` finds one convolution)."""
    if not lower:
        raise ValueError(f"no recorded layer lies below {layer!r}: filter {k} has no inputs to list")
    model = lm.model
    device = next(model.parameters()).device
    x = x.to(device).detach().requires_grad_(True)  # the maps carry a graph even with frozen weights
    with lm.lock, torch.enable_grad(), record_layers(model, [*lower, layer]) as rec:
        model(x)
        out = rec.outputs[layer]
        if not 0 <= k < out.shape[1]:
            raise ValueError(f"filter {k} out of range: layer {layer!r} has {out.shape[1]} filters")
        target = out[:, k].mean((1, 2))
        acts = [rec.outputs[n] for n in lower]
        grads = torch.autograd.grad(target.sum(), acts, allow_unused=True)
        result = []
        for name, a, g in zip(lower, acts, grads, strict=True):
            gxa = torch.zeros(a.shape[:2]) if g is None else (a * g).sum((2, 3))
            path = single_conv_path(model, name, layer)
            ex = None if path is None else exact_linear(path, a.detach(), out.detach(), k)
            result.append(
                LayerContributions(
                    name,
                    gxa.detach().double().cpu().numpy(),
                    None if ex is None else ex.double().cpu().numpy(),
                )
            )
    return target.detach().double().cpu().numpy(), result


def rank_inputs(
    parts: Sequence[LayerContributions], labels: dict[str, LayerLabels], n: int = 5
) -> list[FilterInput]:
    """The ``n`` lower filters with the largest eq. 2 (averaged over the images), largest first, with their words."""
    rows = []
    for p in parts:
        mean = p.gradient.mean(0)
        exact = None if p.exact is None else p.exact.mean(0)
        for j in range(len(mean)):
            rows.append((float(mean[j]), p.layer, j, None if exact is None else float(exact[j])))
    rows.sort(key=lambda r: -r[0])
    out = []
    for c, name, j, e in rows[: max(int(n), 0)]:
        lab = labels.get(name)
        label, evidence, iou = (None, "no label: the layers stage did not dissect this layer", 0.0) if lab is None else lab.label(j)  # fmt: skip
        out.append(FilterInput(name, j, c, label, evidence, iou, e))
    return out


# ------------------------------------------------------------------------------------------- the bundle
def layer_labels(bundle, build_command: str = "lavise build") -> dict[str, LayerLabels]:
    """``{layer: LayerLabels}`` from the bundle's ``layers`` stage; raises :class:`StageMissing` in plain words
    (naming ``build_command``) when the stage is absent or was skipped."""
    info = bundle.manifest.get("stages", {}).get("layers")
    if info is None or not bundle.has("layers/names.json"):
        why = (info or {}).get("skipped")
        raise StageMissing(
            f"a filter's inputs are labelled by the `layers` stage, which was skipped for this bundle ({why})"
            if why
            else "a filter's inputs are labelled by the `layers` stage (Network Dissection of the lower layers), "
            f"which this bundle does not have yet: build it with `{build_command} --stages layers`"
        )
    names = bundle.read_json("layers/names")
    concepts = bundle.read_json("layers/concepts")
    images = int(info.get("images", 0))
    out = {}
    for i, name in enumerate(names):
        ids, sc, _ = rank_labels(np.asarray(bundle.array(f"layers/iou_{i}"), np.float32), concepts, n=1)
        out[name] = LayerLabels([concepts[int(t)] for t in ids[:, 0]], sc[:, 0], images)
    return out


def filter_inputs(
    lm, x: torch.Tensor, layer: str, k: int, labels: dict[str, LayerLabels], n: int = 5,
    layers: Sequence[str] | None = None, batch_size: int = 16,
) -> list[FilterInput]:  # fmt: skip
    """Filter ``k`` of ``layer``: the ``n`` filters of the lower recorded layers (``layers``, default every layer in
    ``labels`` below ``layer``) with the largest eq. 2 over the images ``x (B, 3, S, S)`` (its top images)."""
    lower = lower_layers(lm.model, list(layers if layers is not None else labels), layer)
    parts: list[list[LayerContributions]] = []
    for s in range(0, len(x), batch_size):
        parts.append(contributions(lm, x[s : s + batch_size], layer, k, lower)[1])
    merged = [
        LayerContributions(
            name,
            np.concatenate([p[i].gradient for p in parts]),
            None if parts[0][i].exact is None else np.concatenate([p[i].exact for p in parts]),
        )
        for i, name in enumerate(lower)
    ]
    return rank_inputs(merged, labels, n)


def top_image_inputs(
    bundle, model_loader: Callable, dataset_loader: Callable, k: int, n: int = 5,
    layers: Sequence[str] | None = None, build_command: str = "lavise build",
) -> list[FilterInput]:  # fmt: skip
    """:func:`filter_inputs` of the bundle's filter ``k`` over its top probe images (``probe/top_index[k]``);
    ``model_loader() -> LoadedModel`` and ``dataset_loader() -> ProbeDataset | None`` run only once the ``layers``
    stage is found."""
    labels = layer_labels(bundle, build_command)
    dataset = dataset_loader()
    if dataset is None:
        raise ValueError(
            f"filter {k}'s top images cannot be read: the probe data set {bundle.manifest['dataset']['root']} "
            "is missing or has changed since the bundle was built"
        )
    lm = model_loader()
    top = [int(i) for i in np.asarray(bundle.array("probe/top_index"))[k] if int(i) >= 0]
    xs = [x for _, x, _ in image_batches(dataset, lm, top, 64)]
    if not xs:
        raise ValueError(f"none of filter {k}'s top images could be read from {dataset.root}")
    return filter_inputs(lm, torch.cat(xs), bundle.layer, k, labels, n, layers)
