"""Feature visualisation by activation maximisation (Olah et al. 2017, Lucid; Nguyen et al. 2016 multifaceted).

For a filter ``k`` of a layer (or a class logit ``c``), find an image ``x*`` that maximises

    x* = argmax_x  phi_k(T(x)),  phi_k = spatial mean of A_k           (1)

averaged over random transformations ``T`` (jitter, scale, rotation: *transformation robustness*), with the
image parameterised in a decorrelated space (the *natural-image prior*):

    x = sigmoid(C · irfft2(s ⊙ z))                                     (2)

``z`` the optimised complex spectrum ``(3, S, S/2+1)``, ``s_f = 1 / max(|f|, 1/S)`` (1/f scaling: every
frequency learns at the rate natural images have power in it), ``C`` the square root of ImageNet's colour
correlation (Lucid's ``color_correlation_svd_sqrt``, columns normalised). Optimised with Adam.

*Diversity* (several facets of one filter): ``F`` images per unit, and the loss adds ``λ · mean_{i≠j}
cos(G_i, G_j)``, ``G_i`` the Gram matrix ``(C, C)`` of the layer on image ``i`` (Lucid's ``diversity``).

Everything runs on torch with one ``torch.Generator`` seeded from ``seed`` (initial spectrum and every
transformation draw), so a seed and a thread count give the same image. Several units are optimised as one
batch (each image only affects its own unit: the gradients do not mix), and the forward pass stops at the
recorded layer. :func:`build_featurevis_stage` precomputes every filter of a bundle's layer and checks each
visualisation against the filter's top probe image (ratio) and against the other filters (specificity).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lavise_core.models.networks import LoadedModel, spatial_layers
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "COLOR_CORRELATION",
    "STAGE",
    "FeatureVisError",
    "FusedAdam",
    "VisSettings",
    "Visualisation",
    "build_featurevis_stage",
    "build_stage",
    "check_layer",
    "featurevis_summary",
    "folded_copy",
    "fourier_image",
    "frequency_scale",
    "gram_similarity",
    "visualise",
]

STAGE = "featurevis"
# Lucid's colour correlation square root (ImageNet), rows = RGB
COLOR_CORRELATION = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float32)


class FeatureVisError(ValueError):
    """Bad input to a feature visualisation: unknown layer, unit out of range, a layer without a spatial map."""


@dataclass(frozen=True)
class VisSettings:
    """Optimisation settings. ``size`` ``None`` = the model's input size; ``jitter`` in pixels at ``size``
    (default ``size / 16``), ``scale`` the range of random zoom, ``rotate`` the largest rotation in degrees."""

    steps: int = 256
    size: int | None = None
    lr: float = 0.05
    seed: int = 0
    jitter: float | None = None
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    decay: float = 1.0
    init_sd: float = 0.01
    leak: float = 0.1
    leak_steps: int | None = None  # steps with the leaky ReLU gradient (None = the first half, at most 64)


@dataclass
class Visualisation:
    """``images (B, S, S, 3)`` uint8 RGB; ``units (B,)`` (one per image, repeated per facet); ``objective
    (B,)`` the objective on the untransformed image; ``activations (B, C)`` every filter's ``phi`` on it (filter
    objective) or the logits ``(B, K)`` (class objective); ``history (steps, B)`` the objective during the
    optimisation (on the transformed images)."""

    images: np.ndarray
    units: np.ndarray
    objective: np.ndarray
    activations: np.ndarray
    history: np.ndarray
    layer: str | None
    kind: str
    settings: VisSettings = field(default_factory=VisSettings)


# ------------------------------------------------------------------------------------------- validation
def _describe_layers(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return f"{shown}{more}"


def check_layer(lm: LoadedModel, layer: str | None) -> tuple[str, int]:
    """``(layer, C)`` for a layer with a spatial ``(C, h, w)`` map; :class:`FeatureVisError` listing the valid
    layers for an unknown name, or naming the output shape of a layer without a spatial map."""
    layer = layer or lm.default_layer
    valid = spatial_layers(lm)
    if layer in valid:
        return layer, valid[layer][0]
    names = {n for n, _ in lm.model.named_modules() if n}
    if layer not in names:
        raise FeatureVisError(
            f"the model {lm.name!r} has no layer {layer!r}. Layers with a spatial map: "
            f"{_describe_layers(list(valid))}."
        )
    shape = _output_shape(lm, layer)
    raise FeatureVisError(
        f"layer {layer!r} outputs {shape}, which has no spatial map to visualise (it needs (C, h, w) with "
        f"h, w > 1); for a class use the class objective, or choose one of: {_describe_layers(list(valid))}."
    )


def _output_shape(lm: LoadedModel, layer: str) -> tuple[int, ...] | str:
    seen: list = []
    h = lm.model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: seen.append(o))
    try:
        with torch.no_grad(), lm.lock:
            lm.model(torch.zeros(1, 3, lm.input_size, lm.input_size))
    finally:
        h.remove()
    o = seen[0] if seen else None
    return tuple(int(v) for v in o.shape[1:]) if isinstance(o, torch.Tensor) else type(o).__name__


def _check_units(units: Sequence[int], n: int, what: str, where: str) -> np.ndarray:
    u = np.asarray(units, np.int64).reshape(-1)
    if u.size == 0:
        raise FeatureVisError(f"no {what} to visualise")
    bad = [int(v) for v in u if not 0 <= v < n]
    if bad:
        raise FeatureVisError(
            f"{what} {bad[0]} is out of range: {where} has {n} {what}{'es' if what == 'class' else 's'} (0–{n - 1})"
        )
    return u


# ------------------------------------------------------------------------------------------- the prior
def frequency_scale(size: int, decay: float) -> torch.Tensor:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    return torch.from_numpy((1.0 / np.maximum(f, 1.0 / size) ** decay).astype(np.float32))


def fourier_image(spectrum: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``spectrum (B, 3, S, S/2+1, 2)`` (real, imaginary) and ``scale (S, S/2+1)`` -> ``(B, 3, S, S)``
    in (0, 1): 1/f-scaled inverse FFT (orthonormal), decorrelated colour, sigmoid."""
    return _FourierImage.apply(spectrum, scale)


class _FourierImage(torch.autograd.Function):
    """Eq. 2 as one autograd node; its backward is the chain rule written out, the same values as autograd's
    own through the four operations (a fifth less time: one node instead of four, one saved tensor).

    Backward: ``g_y = g · x (1 - x)`` (sigmoid), ``g_img = C^T g_y`` (colour), ``g_z = s' ⊙ rfft2(g_img)``
    with ``s'`` the 1/f scale doubled on the columns whose conjugate twin the one-sided spectrum leaves out
    (1 … S - (S/2+1), the adjoint of ``irfft2``, as in torch's ``fft_c2r`` backward)."""

    @staticmethod
    def forward(ctx, spectrum: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        s, b = scale.shape[0], spectrum.shape[0]
        img = torch.fft.irfft2(torch.view_as_complex(spectrum) * scale, s=(s, s), norm="ortho")
        mixed = _COLOUR_MIX.to(img.dtype) @ img.reshape(b, 3, s * s)  # colour: a (3, 3) matrix on every pixel
        x = torch.sigmoid(mixed).reshape(b, 3, s, s)
        ctx.save_for_backward(x, scale)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        b, s = x.shape[0], x.shape[-1]
        g_y = torch.ops.aten.sigmoid_backward(grad, x)
        g_img = (_COLOUR_MIX.to(x.dtype).t() @ g_y.reshape(b, 3, s * s)).reshape(b, 3, s, s)
        twin = scale.clone()
        twin[:, 1 : 1 + s - scale.shape[1]] *= 2
        return torch.view_as_real(torch.fft.rfft2(g_img, norm="ortho") * twin), None


_COLOUR_MIX = torch.from_numpy(
    COLOR_CORRELATION / np.linalg.norm(COLOR_CORRELATION, axis=0).max() / 4.0
)  # the /4 of Lucid's fft_image folded in


def _random_affine(x: torch.Tensor, gen: torch.Generator, st: VisSettings, jitter: float) -> torch.Tensor:
    """One random jitter + zoom + rotation of the whole batch (reflection padding), drawn from ``gen``.

    The sampling grid is written out (``affine_grid`` with ``align_corners=False``: pixel centres at
    ``(2j + 1) / S - 1``) as two broadcast sums, a fifth of the cost of ``affine_grid``'s matrix product.
    ``grid_sample`` runs one image per thread, so a batch smaller than the thread count is sampled in
    ``k`` bands of output rows, each a batch entry reading the same (expanded) input: the same values, and
    the backward pass (a scatter, the costliest part) on ``k`` threads."""
    r = torch.rand(4, generator=gen).tolist()
    b, _, s, _ = x.shape
    zoom = st.scale[0] + (st.scale[1] - st.scale[0]) * r[0]
    ang = math.radians(st.rotate * (2 * r[1] - 1))
    tx, ty = (2 * r[2] - 1) * jitter * 2 / s, (2 * r[3] - 1) * jitter * 2 / s
    cos, sin = math.cos(ang) / zoom, math.sin(ang) / zoom
    centre = torch.arange(s, dtype=x.dtype).mul_(2 / s).add_(1 / s - 1)  # (S,) pixel centres in [-1, 1]
    u, v = centre.view(1, s), centre.view(s, 1)
    grid = torch.stack([cos * u - sin * v + tx, sin * u + cos * v + ty], dim=-1)  # (S, S, 2): x, y
    k = _bands(b, s)
    out = nn.functional.grid_sample(
        x.repeat_interleave(k, 0) if k > 1 else x,
        grid.reshape(1, k, s // k, s, 2).expand(b, k, s // k, s, 2).reshape(b * k, s // k, s, 2),
        mode="bilinear",
        padding_mode="reflection",
        align_corners=False,
    )  # (B·k, 3, S/k, S): band j of image i is entry i·k + j
    return out.reshape(b, k, 3, s // k, s).transpose(1, 2).reshape(b, 3, s, s) if k > 1 else out


def _bands(batch: int, size: int) -> int:
    """Row bands per image for :func:`_random_affine`: enough to give every thread a band, dividing ``size``."""
    k = max(1, torch.get_num_threads() // batch)
    while size % k:
        k -= 1
    return k


def gram_similarity(maps: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the Gram matrices of ``maps (G·F, C, h, w)`` within each of the
    ``groups`` consecutive groups of ``F`` images (Lucid's diversity term); 0 when ``F == 1``."""
    b, c = maps.shape[:2]
    f = b // groups
    if f < 2:
        return maps.new_zeros(())
    flat = maps.reshape(b, c, -1)
    gram = torch.bmm(flat, flat.transpose(1, 2)).reshape(groups, f, -1)
    gram = nn.functional.normalize(gram, dim=2)
    sim = torch.bmm(gram, gram.transpose(1, 2))  # (G, F, F)
    off = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)
    return (off / (f * (f - 1))).mean()


class _Stop(Exception):
    pass


def folded_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` in which every ``Conv2d`` directly followed by a ``BatchNorm2d`` in
    a ``Sequential`` is one convolution (the batch norm folded into its weights and replaced by ``Identity``,
    so module names are kept). Same outputs up to rounding; a quarter fewer operations per optimisation step
    on the demo CNN. Other layouts (timm's fused BatchNormAct) are copied unchanged. The weights are stored
    channels-last, the layout oneDNN's CPU convolutions run fastest in (a quarter less time per
    forward + backward pass of the demo CNN at batch 1; the same on EfficientNet-Lite0)."""
    copy = deepcopy(model).eval()
    for seq in [m for m in copy.modules() if isinstance(m, nn.Sequential)]:
        kids = list(seq._modules.items())
        for (n_conv, conv), (n_bn, bn) in itertools.pairwise(kids):
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                seq._modules[n_conv] = fuse_conv_bn_eval(conv, bn)
                seq._modules[n_bn] = nn.Identity()
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy.to(memory_format=torch.channels_last)


_PER_CHANNEL = (nn.Identity, nn.ReLU, nn.ReLU6, nn.BatchNorm2d)


class _only_channels:
    """While active, the last ``Conv2d`` of the ``Sequential`` layer ``layer`` of ``net`` computes only
    ``channels`` (every module after it acts channel by channel, so filter ``channels[j]`` of the layer is
    channel ``j`` of the sliced output): the optimisation skips the other filters' last convolution.
    ``active`` is False (nothing changes) for any other layout."""

    def __init__(self, net: nn.Module, layer: str | None, channels: np.ndarray) -> None:
        self.swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        seq = net.get_submodule(layer) if layer else None
        if not isinstance(seq, nn.Sequential):
            return
        tail = list(seq._modules.items())
        while tail and isinstance(tail[-1][1], _PER_CHANNEL):
            tail.pop()
        if not tail or type(tail[-1][1]) is not nn.Conv2d or tail[-1][1].groups != 1:
            return
        keep = torch.from_numpy(np.asarray(channels, np.int64))
        start = len(tail) - 1
        for name, mod in list(seq._modules.items())[start:]:
            small = _slice_module(mod, keep)
            if small is not mod:
                self.swaps.append((seq, name, mod, small))

    @property
    def active(self) -> bool:
        return bool(self.swaps)

    def __enter__(self) -> _only_channels:
        for seq, name, _full, small in self.swaps:
            seq._modules[name] = small
        return self

    def __exit__(self, *exc: object) -> None:
        for seq, name, full, _small in self.swaps:
            seq._modules[name] = full


def _slice_module(mod: nn.Module, keep: torch.Tensor) -> nn.Module:
    """``mod`` restricted to output channels ``keep`` (a Conv2d or a BatchNorm2d); other modules unchanged."""
    if type(mod) is nn.Conv2d:
        conv = nn.Conv2d(
            mod.in_channels,
            len(keep),
            mod.kernel_size,
            mod.stride,
            mod.padding,
            mod.dilation,
            bias=mod.bias is not None,
            padding_mode=mod.padding_mode,
        ).requires_grad_(False)
        conv.weight.copy_(mod.weight[keep])
        if mod.bias is not None:
            conv.bias.copy_(mod.bias[keep])
        last = mod.weight.is_contiguous(memory_format=torch.channels_last)
        return conv.to(memory_format=torch.channels_last) if last else conv
    if isinstance(mod, nn.BatchNorm2d):
        bn = nn.BatchNorm2d(len(keep), mod.eps).eval().requires_grad_(False)
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(mod, name, None) is not None:
                getattr(bn, name).copy_(getattr(mod, name)[keep])
        return bn
    return mod


class _LeakyBackward(torch.autograd.Function):
    """``clamp(x, 0, top)`` forward; backward lets ``leak`` of the gradient through where the clamp is flat,
    so a unit that is off everywhere at the start still gets a direction (Lucid's redirected ReLU, simplified)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, top: float, leak: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.top, ctx.leak = top, leak
        return torch.relu(x) if math.isinf(top) else x.clamp(0, top)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if math.isinf(ctx.top):  # one fused kernel: grad where x > 0, leak · grad elsewhere
            return torch.ops.aten.leaky_relu_backward(grad, x, ctx.leak, False), None, None
        return torch.where((x > 0) & (x < ctx.top), grad, grad * ctx.leak), None, None


class _leaky_relus:
    """While active, every ``nn.ReLU`` / ``nn.ReLU6`` of ``model`` runs :class:`_LeakyBackward` (not in place)."""

    def __init__(self, model: nn.Module, leak: float) -> None:
        self.mods = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
        self.leak = leak

    def __enter__(self) -> _leaky_relus:
        for m in self.mods:
            top = 6.0 if isinstance(m, nn.ReLU6) else float("inf")
            m.forward = lambda x, top=top: _LeakyBackward.apply(x, top, self.leak)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.mods:
            m.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------- optimisation
class FusedAdam:
    """Adam (Kingma & Ba 2015; betas 0.9, 0.999, eps 1e-8) on one tensor: the fused CPU kernel behind
    ``torch.optim.Adam(fused=True)`` called directly, without the optimiser's per-step bookkeeping (one
    kernel, 0.04 ms per step at 128 px against 0.17 ms for five in-place tensor operations; the same update
    as ``torch.optim.Adam`` to float rounding)."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.param, self.lr, self.betas = param, lr, betas
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.t = torch.zeros((), dtype=torch.float32)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        torch._fused_adam_(
            [self.param],
            [self.param.grad],
            [self.m],
            [self.v],
            [],
            [self.t],
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=0.0,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )


def visualise(
    lm: LoadedModel,
    units: int | Sequence[int],
    layer: str | None = None,
    *,
    kind: str = "filter",
    facets: int = 1,
    diversity: float = 0.0,
    settings: VisSettings = VisSettings(),
    report: Callable[[int, int], None] | None = None,
) -> Visualisation:
    """Images that maximise eq. 1 for each of ``units`` (filters of ``layer``, or class logits if ``kind ==
    "class"``), ``facets`` images per unit with diversity weight ``diversity`` (0 = independent images).

    All units are optimised in one batch of ``len(units) · facets`` images; ``report(step, steps)`` after
    each step. Raises :class:`FeatureVisError` for an unknown layer (listing the valid ones), a layer without a
    spatial map, or a unit out of range.
    """
    if kind not in ("filter", "class"):
        raise FeatureVisError(f"unknown objective {kind!r}: use 'filter' or 'class'")
    if facets < 1 or settings.steps < 1:
        raise FeatureVisError("facets and steps must be at least 1")
    if kind == "filter":
        layer, n = check_layer(lm, layer)
        u = _check_units(
            [units] if isinstance(units, int | np.integer) else units, n, "filter", f"layer {layer!r}"
        )
    else:
        n = lm.num_classes
        u = _check_units([units] if isinstance(units, int | np.integer) else units, n, "class", "the model")
        layer = check_layer(lm, layer)[0] if (diversity > 0 and facets > 1) else None
    u = np.repeat(u, facets)
    b = len(u)
    size = settings.size or lm.input_size
    jitter = settings.jitter if settings.jitter is not None else size / 16
    gen = torch.Generator().manual_seed(settings.seed)
    scale = frequency_scale(size, settings.decay)
    spectrum = (torch.randn(b, 3, size, size // 2 + 1, 2, generator=gen) * settings.init_sd).requires_grad_()
    opt = FusedAdam(spectrum, settings.lr)
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    idx = torch.from_numpy(u)
    rows = torch.arange(b)
    store: dict[str, torch.Tensor] = {}
    stop_early = kind == "filter"

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        store["maps"] = out
        if stop_early:
            raise _Stop

    def forward(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        store.clear()
        logits = None
        with contextlib.suppress(_Stop):
            logits = net(x)
        return store.get("maps"), logits

    history = np.zeros((settings.steps, b), np.float32)
    leak_steps = min(settings.steps // 2, 64) if settings.leak_steps is None else settings.leak_steps
    with lm.lock:  # a private copy: other users of the model are not held up for the whole optimisation
        net = folded_copy(lm.model)
    leaky = _leaky_relus(net, settings.leak)
    if layer:  # the copy is private: its hook needs no removal
        net.get_submodule(layer).register_forward_hook(hook)
    # a filter objective without the diversity term needs only the visualised filters of the layer's last conv
    kept, position = np.unique(u, return_inverse=True)
    only = _only_channels(net, layer if kind == "filter" and not diversity > 0 else None, kept)
    idx = torch.from_numpy(position.reshape(-1)) if only.active else idx
    with only:
        for step in range(settings.steps):
            spectrum.grad = None
            img = _random_affine(fourier_image(spectrum, scale), gen, settings, jitter)
            if step < leak_steps:
                with leaky:
                    maps, logits = forward((img - mean) / std)
            else:
                maps, logits = forward((img - mean) / std)
            obj = maps[rows, idx].mean((1, 2)) if kind == "filter" else logits[rows, idx]
            loss = -obj.sum()
            if diversity > 0 and facets > 1:
                # weighted by the objective's own size, so one weight suits any layer's scale
                size_obj = obj.detach().abs().mean().clamp_min(1e-3)
                loss = loss + diversity * size_obj * b * gram_similarity(maps, b // facets)
            loss.backward()
            opt.step()
            history[step] = obj.detach().numpy()
            if report is not None:
                report(step + 1, settings.steps)
    with torch.no_grad():
        img = fourier_image(spectrum, scale)
        stop_early = False
        maps, logits = forward((img - mean) / std)
    acts = maps.mean((2, 3)) if kind == "filter" else logits
    acts = acts.float().numpy()
    images = (img.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Visualisation(
        images=images,
        units=u,
        objective=acts[np.arange(b), u].astype(np.float32),
        activations=acts.astype(np.float32),
        history=history,
        layer=layer,
        kind=kind,
        settings=settings,
    )


# ------------------------------------------------------------------------------------------- the stage
def build_featurevis_stage(
    bundle,
    lm: LoadedModel,
    *,
    steps: int = 128,
    batch: int = 32,
    seed: int = 0,
    max_filters: int = 256,
    threads: int = 2,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    """One visualisation per filter of the bundle's layer, ``batch`` filters at a time, ``steps`` Adam steps
    each (128 here: the demo CNN's 128 filters fit the 3-minute budget; the dashboard's on-demand images use
    256). A layer with more than ``max_filters`` filters is skipped (visualised on demand, filter by filter).

    Writes ``featurevis/images (C, S, S, 3)`` uint8, ``featurevis/activations (C, C)`` float32 (row k: every
    filter's ``phi`` on filter k's visualisation) and ``featurevis/ratio (C,)`` = ``phi_k(x*_k) /
    phi_k(top probe image)``. Returns the ratio's distribution and the specificity: the share of filters whose
    visualisation drives them more than it drives the other filters on average, each filter's ``phi``
    scaled by its top probe value so that filters are comparable.
    """
    layer = bundle.layer
    c = int(bundle.manifest.get("channels") or check_layer(lm, layer)[1])
    if c > max_filters:
        return {
            "skipped": f"{c} filters (more than {max_filters}): visualise them one by one on the Filters page, "
            f"or build with options {{'featurevis': {{'max_filters': {c}}}}}"
        }
    top = np.asarray(bundle.array("probe/top_value"), np.float32)[:, 0]
    settings = VisSettings(steps=steps, seed=seed)
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images, acts = _all_filters(lm, layer, c, batch, settings, report)
    finally:
        torch.set_num_threads(old_threads)
    images_a = np.concatenate(images)
    acts_a = np.concatenate(acts).astype(np.float32)
    summary = featurevis_summary(acts_a, top)
    bundle.write_array("featurevis/images", images_a)
    bundle.write_array("featurevis/activations", acts_a)
    bundle.write_array("featurevis/ratio", summary.pop("_ratio"))
    bundle.write_json("featurevis/params", {"steps": steps, "seed": seed, "size": int(images_a.shape[1])})
    return {"seconds": round(time.perf_counter() - t0, 2), "filters": c, **summary}


def _all_filters(
    lm: LoadedModel, layer: str, c: int, batch: int, settings: VisSettings, report: Callable | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, acts = [], []
    for lo in range(0, c, batch):
        hi = min(c, lo + batch)

        def tick(step: int, total: int, lo: int = lo, hi: int = hi) -> None:
            if report is not None:
                done = lo * total + (hi - lo) * step
                report(
                    done, c * total, f"feature visualisation: filters {lo}–{hi - 1}, step {step} / {total}"
                )

        v = visualise(lm, list(range(lo, hi)), layer, settings=settings, report=tick)
        images.append(v.images)
        acts.append(v.activations)
    return images, acts


def featurevis_summary(acts: np.ndarray, top: np.ndarray) -> dict:
    """Checks of the visualisations ``acts (C, C)`` (row k = all filters on filter k's image) against the top
    probe values ``top (C,)``: ratio quantiles, share with ratio > 1, specificity (normalised and raw)."""
    c = acts.shape[0]
    diag = np.diag(acts)
    ratio = diag / np.maximum(top, 1e-6)
    norm = acts / np.maximum(top, 1e-6)[None, :]
    off = ~np.eye(c, dtype=bool)
    others = np.where(off, norm, 0).sum(1) / max(c - 1, 1)
    # the column view: filter k on its own image vs on the other filters' images
    col = np.where(off, acts, 0).sum(0) / max(c - 1, 1)
    q = np.quantile(ratio, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {
        "ratio_min": round(float(q[0]), 3),
        "ratio_p10": round(float(q[1]), 3),
        "ratio_median": round(float(q[2]), 3),
        "ratio_p90": round(float(q[3]), 3),
        "ratio_max": round(float(q[4]), 3),
        "beats_top_image": int((ratio > 1).sum()),
        "specific": int((np.diag(norm) > others).sum()),
        "specificity_median": round(float(np.median(np.diag(norm) / np.maximum(others, 1e-6))), 2),
        "beats_other_images": int((diag > col).sum()),
        "_ratio": ratio.astype(np.float32),
    }


def build_stage(ctx: StageContext) -> dict:
    """The ``featurevis`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_featurevis_stage` with the build's settings and
    ``options['featurevis']``."""
    return build_featurevis_stage(ctx.bundle, ctx.model, report=ctx.report, **ctx.options_for("featurevis"))
