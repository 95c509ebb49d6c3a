"""Small real bundles for the dashboard tests and the UI benchmark (built once, then reused from disk).

A 96-image SynthBirds set (128 px, spurious background switched on) and a seeded, untrained
torchvision ResNet-18 with 12 outputs saved as a ``checkpoint:`` spec, so ``Bundle.load_model`` works
exactly as for real models. Two bundles share them:

- ``full``: probe + textual + LaViSE stages at ``layer4`` (4 × 4 maps, 512 filters);
- ``probe_only``: only the probe pass, at ``layer3`` (for the "stage missing" messages).

Bundles are keyed by hashes of their inputs, so a rebuilt identical input reuses the finished stages;
the folder (default ``data/cache/app-test``, override with ``LAVISE_APP_TEST_DIR``) is git-ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class AppBundles:
    bundles: Path  # the folder holding both bundles (LAVISE_BUNDLES for the app)
    full: Path
    probe_only: Path
    data: Path


def build_app_bundles(root: Path | None = None) -> AppBundles:
    """Build (or reuse) the two test bundles under ``root`` (one process at a time: parallel test workers wait
    for the first one's build and then reuse it)."""
    from filelock import FileLock

    root = Path(root or os.environ.get("LAVISE_APP_TEST_DIR") or ROOT / "data" / "cache" / "app-test")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".build.lock"):
        return _build_app_bundles(root)


def _build_app_bundles(root: Path) -> AppBundles:
    import torch

    torch.set_num_threads(1)
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.data.synthbirds import SPECIES, generate_synthbirds
    from lavise_core.explain.lavise.settings import LaviseSettings
    from lavise_core.models.networks import load_model
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe
    from lavise_core.pipeline.stages import BuildSettings, build_stages
    from lavise_core.stages import REGISTRY

    data = root / "synthbirds"
    if (data / "manifest.jsonl").is_file():
        ds = ProbeDataset.open(data)
    else:
        ds = generate_synthbirds(data, n=96, image_size=128, spurious=True, progress=False)
    weights = root / "tiny_resnet18.safetensors"
    names = root / "classes.txt"
    if not weights.is_file():
        import torchvision
        from safetensors.torch import save_file

        torch.manual_seed(0)
        save_file(torchvision.models.resnet18(num_classes=len(SPECIES)).state_dict(), str(weights))
        names.write_text("\n".join(SPECIES) + "\n")
    spec = f"checkpoint:{weights}?arch=torchvision:resnet18&classes={names}&input_size=128"
    lm = load_model(spec)
    bundles = root / "bundles"
    settings = ProbeSettings(progress=False, num_workers=0, top_k=8)
    full = open_or_create_bundle(bundles, lm, ds, "layer4")
    build_stages(
        full, ds, REGISTRY, ["probe", "textual", "lavise"], settings=BuildSettings(top_k=8),
        model_loader=lambda: lm, options={"lavise": {"settings": LaviseSettings(epochs=5)}},
    )  # fmt: skip
    # The untrained test network detects nothing, so the zero-shot query's abstention rule (tested on its own in
    # tests/explain/lavise/test_abstention.py) would turn every query down: the page tests need answers to render.
    (full.root / "lavise" / "abstention.json").unlink(missing_ok=True)
    probe_only = open_or_create_bundle(bundles, lm, ds, "layer3")
    run_probe(probe_only, lm, ds, settings)
    return AppBundles(bundles, full.root, probe_only.root, data)


@dataclass(frozen=True)
class BrowserBundles:
    bundles: Path  # LAVISE_BUNDLES for the server
    data: Path  # the probe set of the default bundle (for uploads)
    demo: bool  # True: the real demo bundle built by `make assets`


def demo_bundle(root: Path | None = None) -> Path | None:
    """The SynthBirds demo bundle under ``data/bundles`` with every stage, if `make assets` built it."""
    import json

    base = Path(root or ROOT / "data" / "bundles")
    for manifest in sorted(base.glob("*/bundle.json")):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        stages = m.get("stages", {})
        complete = all(s in stages for s in ("probe", "textual", "lavise"))
        if (
            complete
            and m.get("model", {}).get("spec") == "synthbirds"
            and Path(m["dataset"]["root"]).is_dir()
        ):
            return manifest.parent
    return None


def browser_bundles() -> BrowserBundles:
    """The bundles the browser tests serve: the demo bundle when it is built (as `make test` does), else
    the small test bundles (``LAVISE_BROWSER_BUNDLES=small`` forces those)."""
    import json

    demo = None if os.environ.get("LAVISE_BROWSER_BUNDLES") == "small" else demo_bundle()
    if demo is not None:
        data = Path(json.loads((demo / "bundle.json").read_text())["dataset"]["root"])
        return BrowserBundles(demo.parent, data, True)
    b = build_app_bundles()
    return BrowserBundles(b.bundles, b.data, False)


if __name__ == "__main__":
    print(build_app_bundles())
