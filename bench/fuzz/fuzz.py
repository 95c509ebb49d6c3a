"""Coverage-guided fuzzing (atheris / libFuzzer) of every parser a user's files or text reach.

Usage (one target per process; libFuzzer's flags pass through)::

    python bench/fuzz/fuzz.py TARGET [CORPUS_DIR] -atheris_runs=1000000 -max_total_time=540

Targets (``python bench/fuzz/fuzz.py --list``): ``image`` (load_image on raw bytes), ``dataset``
(dataset.json + manifest.jsonl through ProbeDataset.open), ``text`` (CUB attribute phrases, class names,
ids, caption files, query words), ``cub`` (one CUB annotation file replaced by the input, import_cub),
``coco`` (a COCO instances/captions JSON through the reader and segmentation decoding), ``spec``
(load_model on a model spec), ``query`` (the query text path: length check, lexicon rewrite, words).

The property is the one of ``tests/test_hostile_inputs.py``: each input works or raises the project's own
error type (ImageLoadError, DatasetError, ModelLoadError, the query's ValueError); any other exception is a
crash, saved by libFuzzer as ``crash-<sha1>`` with the input. ``-timeout=`` bounds the time per input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

with atheris.instrument_imports(include=["lavise_core"]):
    from lavise_core.data import importers
    from lavise_core.data.dataset import DatasetError, ProbeDataset
    from lavise_core.data.images import ImageLoadError, load_image
    from lavise_core.explain.dissection import lexicon as lexicon
    from lavise_core.explain.dissection.search import query_words
    from lavise_core.models.networks import ModelLoadError, load_model

import torch  # noqa: E402

from tests.cub_fixture import CUB_FILES, CUB_GOOD, write_tiny_cub  # noqa: E402

torch.set_num_threads(1)
SCRATCH = Path(tempfile.mkdtemp(prefix="lavise-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
BUNDLE = ROOT / "data" / "bundles" / "synthbirds-synthbirds-features-3a8d15e0be5c8184"


# ----------------------------------------------------------------------------------------- targets
def fuzz_image(data: bytes) -> None:
    try:
        img = load_image(data, max_pixels=4_000_000)
    except ImageLoadError:
        return
    assert img.mode == "RGB"


def fuzz_dataset(data: bytes) -> None:
    desc, _, manifest = data.partition(b"\n\n")  # first block: dataset.json; the rest: manifest.jsonl
    (SCRATCH / "dataset.json").write_bytes(desc)
    (SCRATCH / "manifest.jsonl").write_bytes(manifest)
    try:
        ds = ProbeDataset.open(SCRATCH)
    except DatasetError:
        return
    ds.attribute_vocabulary()
    ds.attribute_matrix(ds.attribute_vocabulary())


def fuzz_text(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    assert isinstance(importers.cub_attribute_phrase(text), str)
    assert isinstance(importers.clean_class_name(text), str)
    sid = importers.safe_id(text)
    assert sid and "/" not in sid
    query_words(text)
    (SCRATCH / "cap.txt").write_bytes(data)
    importers._read_caption_file(SCRATCH / "cap.txt")


def _cub_src() -> Path:
    return write_tiny_cub(SCRATCH / "CUB_200_2011")


def fuzz_cub(data: bytes) -> None:
    if not data:
        return
    src = _cub_src()
    (src / CUB_FILES[data[0] % len(CUB_FILES)]).write_bytes(data[1:])
    shutil.rmtree(SCRATCH / "cub_out", ignore_errors=True)
    try:
        importers.import_cub(src, SCRATCH / "cub_out", progress=False)
    except DatasetError:
        return


def fuzz_coco(data: bytes) -> None:
    """The COCO reader without the image copying: JSON structure, then each instance's segmentation."""
    from collections import defaultdict

    path = SCRATCH / "coco.json"
    path.write_bytes(data[1:])
    captions = bool(data[:1]) and data[0] % 2 == 1
    try:
        obj = importers._load_json(path, "a COCO file")
        info, caps, anns, cats = {}, defaultdict(list), defaultdict(list), []
        try:
            importers._read_coco_lists(obj, path, captions, info, caps, anns, cats)
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            if isinstance(e, DatasetError):
                raise
            return  # import_coco turns these into a DatasetError naming the file
        classes = [str(c["name"]) for c in cats]
        cat_pos = {int(c["id"]): i for i, c in enumerate(cats)}
        for img_id, im in list(info.items())[:4]:
            if anns.get(img_id) and "height" in im and "width" in im:
                # import_coco skips an image with "bad annotation: ..." on these (the same except clause)
                with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, OverflowError):
                    importers._coco_instances(SCRATCH / "x.jpg", im, anns[img_id], cat_pos, classes,
                                              SCRATCH / "coco_out", f"{img_id}")  # fmt: skip
    except DatasetError:
        return


def fuzz_spec(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    heads = ["", "synthbirds", "torchvision:", "timm:", "checkpoint:", "models/synthbirds_cnn.json",
             "checkpoint:/dev/null", "efficientnet_lite0"]  # fmt: skip
    spec = heads[fdp.ConsumeIntInRange(0, len(heads) - 1)] + fdp.ConsumeUnicodeNoSurrogates(200)
    if spec.split("?")[0] in ("synthbirds", "efficientnet_lite0", "models/synthbirds_cnn.json"):
        return  # real models that load (seconds each): covered by tests/test_hostile_inputs.py
    try:
        load_model(spec)
    except ModelLoadError:
        return


_QUERY = {}


def fuzz_query(data: bytes) -> None:
    from lavise_core.api import QUERY_MAX_CHARS

    if "lex" not in _QUERY:
        from lavise_core import open_bundle

        _QUERY["lex"] = open_bundle(BUNDLE)._search()[1]
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data)).strip()
    if not text or len(text) > QUERY_MAX_CHARS:
        return  # Explainer.query refuses these with its message (tested)
    rewritten, info = lexicon.rewrite_query(text, _QUERY["lex"])
    assert isinstance(rewritten, str) and isinstance(info, dict)
    query_words(rewritten)


TARGETS = {
    "image": fuzz_image,
    "dataset": fuzz_dataset,
    "text": fuzz_text,
    "cub": fuzz_cub,
    "coco": fuzz_coco,
    "spec": fuzz_spec,
    "query": fuzz_query,
}


def seeds(target: str, out: Path) -> None:
    """A few valid inputs per target to start the corpus from."""
    import io

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    items: list[bytes] = []
    if target == "image":
        for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "CMYK"),
                          ("WEBP", "RGB"), ("PNG", "I;16"), ("PNG", "LA")):  # fmt: skip
            buf = io.BytesIO()
            Image.new(mode, (7, 5), 100).save(buf, format=fmt)
            items.append(buf.getvalue())
    elif target == "dataset":
        desc = {"name": "x", "source": "t", "classes": ["a", "b"], "regions": ["wing"], "meta": {}}
        rec = {"id": "0", "path": "i/0.png", "split": "test", "label": 1, "attributes": ["red wing"],
               "keypoints": {"wing": [1, 2]}, "bbox": [0, 0, 3, 4], "mask": "m/0.png"}  # fmt: skip
        items.append(json.dumps(desc).encode() + b"\n\n" + json.dumps(rec).encode() + b"\n")
    elif target in ("text", "query"):
        items += [b"has_wing_color::red", b"001.Black_footed_Albatross", b"ruby bosom", b"red-winged bird"]
    elif target == "cub":
        items += [bytes([i]) + CUB_GOOD[name].encode() for i, name in enumerate(CUB_FILES)]
    elif target == "coco":
        inst = {"images": [{"id": 1, "file_name": "1.jpg", "height": 6, "width": 8}],
                "categories": [{"id": 1, "name": "dog"}],
                "annotations": [{"image_id": 1, "category_id": 1, "segmentation": [[1, 1, 4, 1, 4, 3]],
                                 "bbox": [1, 1, 3, 2], "area": 6},
                                {"image_id": 1, "category_id": 1,
                                 "segmentation": {"counts": "53205", "size": [6, 8]}}]}  # fmt: skip
        items += [b"\x00" + json.dumps(inst).encode()]
        items += [b"\x01" + json.dumps({"images": inst["images"], "annotations": [
            {"image_id": 1, "caption": "a dog"}]}).encode()]  # fmt: skip
    elif target == "spec":
        items += [b"\x01resnet18?input_size=224", b"\x04/tmp/w.safetensors?arch=torchvision:resnet18"]
    for i, b in enumerate(items):
        (out / f"seed-{i}").write_bytes(b)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(f"usage: fuzz.py TARGET [CORPUS] [-libfuzzer_flags]; targets: {', '.join(TARGETS)}")
        sys.exit(0 if "--list" in sys.argv else 2)
    target = sys.argv[1]
    corpus = [a for a in sys.argv[2:] if not a.startswith("-") and not Path(a).is_file()]  # files: replay
    for c in corpus:
        if not any(Path(c).glob("*")):
            seeds(target, Path(c))
    fn = TARGETS[target]
    if target == "query":
        fn(
            b"red wing"
        )  # opens the bundle and builds its lexicon once (seconds), before the per-input timeout
    try:
        atheris.Setup([sys.argv[0], *sys.argv[2:]], fn)
        atheris.Fuzz()
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
