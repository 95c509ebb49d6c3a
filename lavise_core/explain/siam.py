"""SIAM explanations (METHODS.md §4): what (attributes present), where (their maps), how much (contributions).

For a model loaded from a ``synthbirds_siam`` card (:mod:`lavise_core.models.siam`) the class score is exactly
``s_c = Σ_a contribution_a + b_c``; the explanation lists the contributions sorted (a waterfall from the bias to
the score), each attribute's spatial contribution map, and a sentence from the largest positive ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lavise_core.models.networks import LoadedModel
from lavise_core.models.siam import SiamError

__all__ = [
    "SiamExplanation",
    "class_attribute_weights",
    "explain_siam",
    "is_siam",
    "siam_net",
    "siam_sentence",
]


def is_siam(lm: LoadedModel) -> bool:
    return lm.card.get("architecture") == "synthbirds_siam"


def siam_net(lm: LoadedModel):
    """The SIAM network of ``lm``; :class:`SiamError` for any other model."""
    if not is_siam(lm) or not hasattr(lm.model, "contributions"):
        raise SiamError(
            f"the model {lm.name!r} is not a SIAM model (its card's architecture is "
            f"{lm.card.get('architecture')!r}); train one with `lavise train-siam`"
        )
    return lm.model


@dataclass
class SiamExplanation:
    """One image explained for class ``target``: score = bias + Σ contributions (exact)."""

    predicted: str
    target: str
    probs: np.ndarray  # (K,)
    score: float
    bias: float
    contributions: list[tuple[str, float]]  # all attributes, |contribution| descending
    present: list[tuple[str, float]]  # attributes whose pooled map is > 0, strongest first (tanh(mean))
    where: dict[str, np.ndarray]  # attribute -> (h, w) spatial contribution map (sums to its contribution)
    sentence: str


def siam_sentence(target: str, contributions: list[tuple[str, float]], top: int = 5) -> tuple[str, list[str]]:
    """ "This is a <target>: it has a, b and c." from the ``top`` largest positive contributions."""
    pos = [a for a, v in sorted(contributions, key=lambda t: -t[1]) if v > 0][:top]
    if not pos:
        return f"This is a {target}, though no attribute speaks for it.", []
    listed = pos[0] if len(pos) == 1 else ", ".join(pos[:-1]) + f" and {pos[-1]}"
    return f"This is a {target}: it has {listed}.", pos


@torch.no_grad()
def explain_siam(
    lm: LoadedModel, x: torch.Tensor, target: int | None = None, n_maps: int = 6
) -> SiamExplanation:
    """Explain ``x (1, 3, H, W)``; ``n_maps`` spatial maps for the largest contributions."""
    net = siam_net(lm)
    attrs = list(lm.card["attributes"])
    with lm.lock:
        maps = net.attributes(net.features(x.to(next(net.parameters()).device)))
        logits = net.classifier(net.evidence(maps))
    probs = torch.softmax(logits[0], 0).cpu().numpy()
    pred = int(probs.argmax())
    c = pred if target is None else int(target)
    contrib = net.contributions(maps, c)[0].double().cpu().numpy()
    order = np.argsort(-np.abs(contrib), kind="stable")
    contributions = [(attrs[a], float(contrib[a])) for a in order]
    pooled = maps[0].mean((1, 2)).tanh().cpu().numpy()
    present = [(attrs[a], float(pooled[a])) for a in np.argsort(-pooled, kind="stable") if pooled[a] > 0]
    where_all = net.where(maps, c)[0].cpu().numpy()
    where = {attrs[a]: where_all[a] for a in order[:n_maps]}
    sentence, _ = siam_sentence(lm.class_names[c], contributions)
    return SiamExplanation(
        lm.class_names[pred], lm.class_names[c], probs, float(logits[0, c]), float(net.classifier.bias[c]),
        contributions, present, where, sentence,
    )  # fmt: skip


def class_attribute_weights(lm: LoadedModel) -> np.ndarray:
    """``(K, A)``: each class's weight on each attribute's evidence (summed over spatial templates)."""
    net = siam_net(lm)
    w = net.classifier.weight.detach().double().cpu().numpy()
    t = max(net.n_templates, 1)
    if t > 1:  # a template's weight counts with its mass: Σ_t W[c, (a, t)] Σ_g τ_{a,t,g}
        mass = net.template_weights().detach().double().sum((2, 3)).cpu().numpy()  # (A, T)
        return (w.reshape(len(w), -1, t) * mass[None]).sum(2)
    return w
