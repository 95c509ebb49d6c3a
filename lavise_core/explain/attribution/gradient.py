"""Gradient-based attribution: saliency, SmoothGrad, integrated gradients, guided backprop, deconvnet.

All return ``(B, 3, H, W)`` in input space from :meth:`Attribution.attribute`; :meth:`pixel_map` reduces to
``(B, H, W)``: ``max_c |a_c|`` for the gradient maps (Simonyan et al. 2014, §3.1) and ``max(0, sum_c a_c)``
(evidence for the class) for integrated gradients.

- :class:`Saliency`: ``grad_x f_t(x)`` (Simonyan et al. 2014, eq. 1 linearisation).
- :class:`SmoothGrad`: ``1/n sum_i grad f_t(x + eps_i)``, ``eps_i ~ N(0, sigma^2)`` (Smilkov et al. 2017,
  eq. 3); ``sigma = noise_level * (max x - min x)`` per image unless given. The ``n`` noisy copies of each
  image go through the network as one batch (chunks of ``batch_size``).
- :class:`IntegratedGradients`: ``(x - x') * int_0^1 grad f_t(x' + a (x - x')) da`` (Sundararajan et al.
  2017, eq. 1) by Gauss–Legendre quadrature on [0, 1] (as Captum's default). Completeness (their
  Proposition 1): ``sum attribution = f_t(x) - f_t(x')``; :meth:`IntegratedGradients.completeness` returns
  the gap. The default baseline ``x'`` is 0 in normalised space, i.e. the data set's mean colour.
- :class:`GuidedBackprop` / :class:`Deconvnet` (Springenberg et al. 2015, fig. 1; Zeiler & Fergus 2014):
  the backward pass through every rectifier ``y = clamp(x, 0, u)`` (ReLU ``u = inf``, ReLU6 ``u = 6``) is
  replaced by ``relu(g) * [0 < x < u]`` (guided) or ``relu(g)`` (deconvnet).

How the rectifiers are modified: not with module hooks but with a :class:`torch.overrides.TorchFunctionMode`
active only during the call, which routes every rectifier *call* (``nn.ReLU``/``nn.ReLU6`` modules, which
call ``F.relu``/``F.hardtanh``, and functional ``F.relu``/``torch.relu``/``Tensor.relu_``/``F.relu6``) through
one ``autograd.Function``. Each call gets its own backward node, so a ReLU module reused at several places
and in-place ReLUs (the result is copied back into the input, keeping in-place semantics) are right by
construction, and functional ReLUs are not missed. Differences from the references: Captum and
pytorch-grad-cam modify only ``nn.ReLU`` modules, so on EfficientNet-Lite0 (33 ``nn.ReLU6``, no ``nn.ReLU``)
their guided backprop equals plain gradient; pass ``rectifiers=("relu",)`` to reproduce that convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lavise_core.explain.attribution.base import Attribution, AttributionError, Target
from lavise_core.models.networks import LoadedModel

__all__ = [
    "Deconvnet",
    "GradientAttribution",
    "GuidedBackprop",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "rectifier_rule",
]


class GradientAttribution(Attribution):
    """Gradient family: one abstract method, ``_attribute(x, target) -> (B, 3, H, W)``.

    ``reduce``: how :meth:`pixel_map` folds the colour channels (``"max_abs"`` or ``"positive_sum"``).
    """

    reduce: ClassVar[str] = "max_abs"

    def _gradient(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``grad_x f_t(x)`` ``(B, 3, H, W)`` and the scores ``f_t(x)`` ``(B,)``, in chunks of ``batch_size``."""
        grads, scores = [], []
        for s in range(0, x.shape[0], self.batch_size):
            xi = (
                x[s : s + self.batch_size]
                .detach()
                .clone(memory_format=torch.contiguous_format)
                .requires_grad_(True)
            )
            logits = self.model(xi)
            t = target[s : s + xi.shape[0]].to(logits.device)
            self._check_classes(logits, t)
            score = logits.gather(1, t[:, None]).squeeze(1)
            (g,) = torch.autograd.grad(score.sum(), xi)
            grads.append(g)
            scores.append(score.detach())
        return torch.cat(grads), torch.cat(scores)

    def signed_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        """The colour channels summed, ``(B, H, W)``: > 0 where the attribution raises the class score."""
        return self.attribute(x, target).sum(1)

    def pixel_map(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        a = self.attribute(x, target)
        if self.reduce == "positive_sum":
            return a.sum(1).clamp_min(0)
        return a.abs().amax(1)


class Saliency(GradientAttribution):
    """Vanilla gradient ``grad_x f_t(x)`` (Simonyan et al. 2014)."""

    name, label = "saliency", "Gradient saliency"

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._gradient(x, target)[0]


class SmoothGrad(GradientAttribution):
    """Mean gradient over ``n_samples`` noisy copies (Smilkov et al. 2017, eq. 3).

    Args:
        n_samples: noisy copies per image (25 in the benchmark).
        noise_level: ``sigma / (max x - min x)`` per image (the paper recommends 10–20 %).
        sigma: a fixed standard deviation instead (what Captum's ``NoiseTunnel(stdevs=...)`` takes).
        generator: the random source; None = torch's global generator. The noise tensor is drawn as one
            ``(B * n, 3, H, W)`` block, image-major (image 0's n copies first), like Captum's NoiseTunnel.
    """

    name, label = "smoothgrad", "SmoothGrad"

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        n_samples: int = 25,
        noise_level: float = 0.15,
        sigma: float | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(model, batch_size)
        if n_samples < 1 or noise_level < 0 or (sigma is not None and sigma < 0):
            raise AttributionError("SmoothGrad needs n_samples >= 1 and a non-negative noise level")
        self.n_samples, self.noise_level, self.sigma, self.generator = (
            n_samples,
            noise_level,
            sigma,
            generator,
        )

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.n_samples
        if self.sigma is not None:
            sigma = torch.full((b, 1, 1, 1), float(self.sigma), device=x.device)
        else:
            flat = x.reshape(b, -1)
            sigma = (self.noise_level * (flat.max(1).values - flat.min(1).values)).reshape(b, 1, 1, 1)
        shape = (b * n, *x.shape[1:])
        noise = torch.normal(0.0, 1.0, shape, generator=self.generator, device=x.device)
        noisy = x.repeat_interleave(n, 0) + noise * sigma.repeat_interleave(n, 0)
        g, _ = self._gradient(noisy, target.repeat_interleave(n))
        return g.reshape(b, n, *x.shape[1:]).mean(1)


class IntegratedGradients(GradientAttribution):
    """Path integral of gradients from a baseline (Sundararajan et al. 2017, eq. 1), Gauss–Legendre rule.

    Args:
        steps: quadrature points (the completeness gap shrinks as it grows).
        baseline: ``x'`` ``(3, H, W)`` / broadcastable, or a float; default 0 (the normalised mean colour).
    """

    name, label = "integrated_gradients", "Integrated gradients"
    reduce = "positive_sum"

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        steps: int = 32,
        baseline: torch.Tensor | float = 0.0,
        batch_size: int = 64,
    ) -> None:
        super().__init__(model, batch_size)
        if steps < 1:
            raise AttributionError(f"integrated gradients needs steps >= 1, got {steps}")
        self.steps, self.baseline = steps, baseline
        self.last_gap: torch.Tensor | None = None

    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Quadrature points ``a_i`` in (0, 1) and weights ``w_i`` (sum 1): Gauss–Legendre mapped to [0, 1]."""
        z, w = np.polynomial.legendre.leggauss(self.steps)
        return 0.5 * (z + 1), 0.5 * w

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        base = self.baseline
        if not isinstance(base, torch.Tensor):
            return torch.full_like(x, float(base))
        return base.to(x.device, x.dtype).expand_as(x)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = self._baseline(x)
        alphas, weights = self.nodes()
        a = torch.as_tensor(alphas, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1, 1)
        path = (base + a * (x - base)).reshape(-1, *x.shape[1:])  # (steps * B, 3, H, W), step-major
        g, _ = self._gradient(path, target.repeat(self.steps))
        w = torch.as_tensor(weights, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1, 1)
        return (x - base) * (g.reshape(self.steps, *x.shape) * w).sum(0)

    def completeness(self, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attribution (B, 3, H, W), gap (B,))``, gap = ``sum a - (f_t(x) - f_t(x'))`` (Prop. 1 holds if 0)."""
        attr = self.attribute(x, target)
        x, t = self._prepare(x, target)
        with torch.no_grad():
            fx, fb = self.model(x), self.model(self._baseline(x))
        delta = fx.gather(1, t[:, None]).squeeze(1) - fb.gather(1, t[:, None]).squeeze(1)
        self.last_gap = attr.reshape(attr.shape[0], -1).sum(1) - delta
        return attr, self.last_gap


# ------------------------------------------------------------------------- modified rectifiers
class _Rectify(torch.autograd.Function):
    """``y = clamp(x, 0, upper)``; backward ``relu(g) * [0 < x < upper]`` (guided) or ``relu(g)`` (deconvnet)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, upper: float | None, guided: bool) -> torch.Tensor:
        y = x.clamp(min=0) if upper is None else x.clamp(0, upper)
        ctx.guided = guided
        if guided:
            ctx.save_for_backward((x > 0) if upper is None else (x > 0) & (x < upper))
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        g = g.clamp(min=0)
        if ctx.guided:
            (mask,) = ctx.saved_tensors
            g = g * mask
        return g, None, None


_RELU = {F.relu: False, torch.relu: False, torch.Tensor.relu: False}
_RELU_INPLACE = {F.relu_: True, torch.relu_: True, torch.Tensor.relu_: True}


def _argument(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def rectifier_rule(func: Any, args: tuple, kwargs: dict, kinds: Sequence[str]) -> tuple | None:
    """``(x, upper, inplace)`` when ``func(*args, **kwargs)`` is a rectifier of one of ``kinds``, else None."""
    if "relu" in kinds:
        if func in _RELU:
            return args[0], None, bool(_argument(args, kwargs, 1, "inplace", False))
        if func in _RELU_INPLACE:
            return args[0], None, True
    if "relu6" in kinds:
        if func is F.relu6:
            return args[0], 6.0, bool(_argument(args, kwargs, 1, "inplace", False))
        if func in (F.hardtanh, F.hardtanh_):
            lo = float(_argument(args, kwargs, 1, "min_val", -1.0))
            hi = float(_argument(args, kwargs, 2, "max_val", 1.0))
            inplace = func is F.hardtanh_ or bool(_argument(args, kwargs, 3, "inplace", False))
            if lo == 0.0:
                return args[0], hi, inplace
    return None


class _RectifierMode(TorchFunctionMode):
    """While active, every rectifier call goes through :class:`_Rectify` (see the module docstring)."""

    def __init__(self, guided: bool, kinds: Sequence[str]) -> None:
        super().__init__()
        self.guided, self.kinds, self.calls = guided, tuple(kinds), 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rule = rectifier_rule(func, args, kwargs, self.kinds)
        if rule is None:
            return func(*args, **kwargs)
        x, upper, inplace = rule
        self.calls += 1
        y = _Rectify.apply(x, upper, self.guided)
        if inplace:
            return x.copy_(y)
        return y


class _ModifiedRectifierGradient(GradientAttribution):
    guided: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        rectifiers: Sequence[str] = ("relu", "relu6"),
        batch_size: int = 64,
    ) -> None:
        super().__init__(model, batch_size)
        unknown = set(rectifiers) - {"relu", "relu6"}
        if unknown:
            raise AttributionError(f"unknown rectifier kinds {sorted(unknown)}; choose from 'relu', 'relu6'")
        self.rectifiers = tuple(rectifiers)
        self.last_calls = 0

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mode = _RectifierMode(self.guided, self.rectifiers)
        with mode:
            g, _ = self._gradient(x, target)
        self.last_calls = mode.calls
        if not math.isfinite(float(g.abs().sum())):
            raise AttributionError("the modified backward pass gave non-finite values")
        return g


class GuidedBackprop(_ModifiedRectifierGradient):
    """Gradient with rectifier backward ``relu(g) * [0 < x < u]`` (Springenberg et al. 2015)."""

    name, label = "guided_backprop", "Guided backprop"
    guided = True


class Deconvnet(_ModifiedRectifierGradient):
    """Gradient with rectifier backward ``relu(g)`` (Zeiler & Fergus 2014, as framed by Springenberg)."""

    name, label = "deconvnet", "Deconvnet"
    guided = False
