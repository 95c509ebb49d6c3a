"""Property-based tests over every parser a user's files or text reach (hypothesis).

The property: each input either works or raises the project's own error type with a user message, never
another exception and never slower than the per-input deadline. A small budget runs here (about 25 s in
all); ``bench/fuzz/`` runs the coverage-guided campaign over the same entry points (``README``: numbers).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from lavise_core.data.dataset import DATASET_FILE, MANIFEST_FILE, DatasetError, ProbeDataset
from lavise_core.data.images import ImageLoadError, load_image
from lavise_core.data.importers import (
    _read_caption_file,
    clean_class_name,
    cub_attribute_phrase,
    import_coco,
    import_cub,
    safe_id,
)
from lavise_core.models.networks import LoadedModel, ModelLoadError, load_model
from tests.cub_fixture import CUB_FILES, write_tiny_cub

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "data" / "bundles" / "synthbirds-synthbirds-features-3a8d15e0be5c8184"

#: every property: a deadline per input (bounded time) and a small number of inputs for `make test`
#: (no shrinking phase: a failing input is reported as found, in bounded time)
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
QUICK = settings(max_examples=60, deadline=2000, phases=PHASES, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
SLOW = settings(max_examples=20, deadline=5000, phases=PHASES, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

# text that hurts: unicode of every category, control characters, surrogates are impossible in JSON
nasty_text = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.sampled_from(
        ["", " ", "\x00", "\u202e", "\ufeff", "a\x00b", "../../etc/passwd", "::", "?", "🐦" * 50]
    ),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\n", "🐦"]), st.integers(1, 100_000)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)


def _image_bytes(fmt: str, mode: str = "RGB", size: tuple[int, int] = (12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_image_bytes("PNG"), _image_bytes("JPEG"), _image_bytes("GIF", "P"), _image_bytes("BMP"),
         _image_bytes("TIFF", "CMYK"), _image_bytes("WEBP"), _image_bytes("PNG", "I;16")]  # fmt: skip


@st.composite
def mutated_image(draw) -> bytes:
    """A real image file of some format with a few bytes overwritten, cut short, or grown."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data) + draw(st.binary(max_size=64))


# ============================================================================ images
@pytest.mark.filterwarnings("ignore:Truncated File Read")  # PIL's TIFF reader warns, then raises
@QUICK
@given(st.one_of(mutated_image(), st.binary(max_size=512)))
def test_image_bytes_load_or_raise_image_load_error(data: bytes) -> None:
    try:
        img = load_image(data, max_pixels=4_000_000)
    except ImageLoadError as e:
        assert str(e)
    else:
        assert img.mode == "RGB" and img.width * img.height > 0


# ============================================================================ dataset.json + manifest
def _dataset_dir(desc: str | bytes, manifest: str | bytes) -> Path:
    root = Path(tempfile.mkdtemp(prefix="lavise-fuzz-"))
    for name, text in ((DATASET_FILE, desc), (MANIFEST_FILE, manifest)):
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return root


GOOD_DESC = {"name": "x", "source": "test", "classes": ["a", "b"], "regions": ["wing"], "meta": {}}
GOOD_RECORD = {"id": "0", "path": "images/0.png", "split": "test", "label": 0, "attributes": ["red wing"]}
record_keys = st.sampled_from([*GOOD_RECORD, "captions", "mask", "region_concepts", "keypoints", "bbox",
                               "meta", "other"])  # fmt: skip
records = st.one_of(
    st.dictionaries(record_keys, json_values, max_size=8),
    st.builds(lambda k, v: {**GOOD_RECORD, k: v}, record_keys, json_values),
    json_values,
)


@QUICK
@given(
    desc=st.one_of(
        st.builds(json.dumps, json_values),
        st.builds(
            lambda k, v: json.dumps({**GOOD_DESC, k: v}), st.sampled_from(list(GOOD_DESC)), json_values
        ),
        st.binary(max_size=64),
        st.just(json.dumps(GOOD_DESC)),
    ),
    lines=st.lists(
        st.one_of(st.builds(json.dumps, records), st.text(max_size=40), st.just("[" * 5000)), max_size=5
    ),
    tail=st.binary(max_size=8),
)
def test_dataset_files_open_or_raise_dataset_error(desc, lines, tail) -> None:
    root = _dataset_dir(desc, "\n".join(lines).encode("utf-8", "surrogatepass") + tail)
    try:
        ds = ProbeDataset.open(root)
    except DatasetError as e:
        assert str(e)
    else:
        assert all(-1 <= r.label < len(ds.classes) for r in ds.records)
        ds.attribute_vocabulary(), ds.labels(), ds.content_hash()
    finally:
        shutil.rmtree(root)


# ============================================================================ captions and attributes
@QUICK
@given(nasty_text)
def test_caption_and_attribute_text_always_parses(text: str) -> None:
    assert isinstance(cub_attribute_phrase(text), str)
    assert isinstance(clean_class_name(text), str)
    sid = safe_id(text)
    assert sid and "/" not in sid and "\x00" not in sid
    with tempfile.NamedTemporaryFile("wb", suffix=".txt") as fh:
        fh.write(text.encode("utf-8", "surrogatepass") + b"\xff\xfe")
        fh.flush()
        lines = _read_caption_file(Path(fh.name))
    assert all(line == line.strip() and line for line in lines)


# ============================================================================ CUB
cub_line = st.lists(
    st.one_of(st.integers(-3, 5).map(str), st.floats(allow_nan=True).map(str), st.text(max_size=8)),
    max_size=6,
).map(" ".join)


@SLOW
@given(which=st.sampled_from(CUB_FILES), lines=st.lists(cub_line, max_size=5), raw=st.binary(max_size=16))
def test_cub_annotations_import_or_raise_dataset_error(which, lines, raw) -> None:
    top = Path(tempfile.mkdtemp(prefix="lavise-fuzz-cub-"))
    try:
        src = top / "CUB_200_2011"
        write_tiny_cub(src)
        (src / which).write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw)
        try:
            ds = import_cub(src, top / "out", progress=False)
        except DatasetError as e:
            assert str(e)
        else:
            assert len(ds) <= 2 and ProbeDataset.open(top / "out").records == ds.records
    finally:
        shutil.rmtree(top)


# ============================================================================ COCO
coco_image = st.fixed_dictionaries(
    {"id": st.one_of(st.integers(-2, 3), json_values), "file_name": st.sampled_from(["1.jpg", "x.jpg", 3])},
    optional={"height": st.integers(-1, 9) | json_values, "width": st.integers(-1, 9) | json_values},
)
coco_ann = st.fixed_dictionaries(
    {"image_id": st.integers(0, 3) | json_values, "category_id": st.integers(0, 3) | json_values},
    optional={
        "segmentation": st.one_of(
            st.lists(st.lists(st.floats(-5, 20) | st.integers(-5, 20), max_size=10), max_size=3),
            st.fixed_dictionaries(
                {
                    "counts": st.text("0123456789:;<=>?@ABCDEFGHIJ", max_size=10)
                    | st.lists(st.integers(-2, 60), max_size=6),
                    "size": json_values | st.just([6, 8]),
                }
            ),
            json_values,
        ),
        "area": st.floats() | json_values,
        "bbox": st.lists(st.floats() | st.integers(), max_size=5) | json_values,
        "iscrowd": st.integers(0, 1) | json_values,
        "caption": nasty_text | json_values,
        "id": json_values,
    },
)
coco_json = st.fixed_dictionaries(
    {"images": st.lists(coco_image, max_size=3) | json_values, "annotations": st.lists(coco_ann, max_size=4)},
    optional={
        "categories": st.lists(
            st.fixed_dictionaries({"id": st.integers(0, 3) | json_values, "name": nasty_text | json_values}),
            max_size=3,
        )
        | json_values
    },
)


@SLOW
@given(instances=coco_json, captions=coco_json | json_values)
def test_coco_annotations_import_or_raise_dataset_error(instances, captions) -> None:
    top = Path(tempfile.mkdtemp(prefix="lavise-fuzz-coco-"))
    try:
        (top / "img").mkdir()
        Image.new("RGB", (8, 6), (10, 200, 30)).save(top / "img" / "1.jpg")
        (top / "i.json").write_text(json.dumps(instances))
        (top / "c.json").write_text(json.dumps(captions))
        try:
            ds = import_coco(top / "img", top / "out", instances_json=top / "i.json",
                             captions_json=top / "c.json", progress=False)  # fmt: skip
        except DatasetError as e:
            assert str(e)
        else:
            assert len(ds) == 1 and ProbeDataset.open(top / "out").records == ds.records
    finally:
        shutil.rmtree(top)


# ============================================================================ model specs
spec_heads = st.sampled_from(["", "synthbirds", "torchvision:", "timm:", "checkpoint:", "efficientnet_lite0",
                              "models/synthbirds_cnn.json", "checkpoint:/dev/null", "torchvision:resnet18"])  # fmt: skip
query_parts = st.lists(
    st.tuples(st.sampled_from(["arch", "classes", "layer", "input_size", "x"]), nasty_text).map("=".join),
    max_size=3,
).map("&".join)


@pytest.fixture(scope="module", autouse=False)
def _imports_done():
    import timm  # noqa: F401  (first import takes seconds: not the input's fault)
    import torchvision  # noqa: F401


@settings(max_examples=60, deadline=3000, phases=PHASES, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(head=spec_heads, body=nasty_text, query=query_parts, with_query=st.booleans())
def test_model_specs_load_or_raise_model_load_error(_imports_done, head, body, query, with_query) -> None:
    spec = head + (body if head.endswith(":") or not head else "") + (f"?{query}" if with_query else "")
    try:
        lm = load_model(spec)
    except ModelLoadError as e:
        assert str(e)
    else:
        assert isinstance(lm, LoadedModel) and lm.name == spec


# ============================================================================ query text
@pytest.fixture(scope="module")
def explainer():
    if not (BUNDLE / "bundle.json").is_file():
        pytest.skip("the default bundle is not built (make assets)")
    from lavise_core import open_bundle

    ex = open_bundle(BUNDLE)
    ex.query("red wing")  # warm the encoder once, outside the deadlines
    return ex


@settings(max_examples=25, deadline=5000, derandomize=True, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(text=nasty_text)
def test_query_text_answers_or_says_what_is_wrong(explainer, text) -> None:
    try:
        ans = explainer.query(text, n=5, n_images=4)
    except ValueError as e:  # our messages only: an empty or an over-long query
        assert type(e) is ValueError and str(e).startswith("the query is"), repr(e)
    else:
        assert len(ans.filters) <= 5 and isinstance(ans.message, str)


def test_coco_polygon_far_outside_the_image_is_a_bad_annotation_not_a_hang() -> None:
    # found by bench/fuzz (coco target): a vertex at x = 2.2e31 made PIL trace the outline for over 10 s
    from lavise_core.data.importers import rasterize_polygons

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="far outside the 7x6 image"):
        rasterize_polygons([[1, 1, 4, 1, 22222222222222222222222222222224, 3]], 6, 7)
    assert time.perf_counter() - t0 < 1.0


def test_cub_image_name_too_long_for_the_os_is_skipped_not_a_crash(tmp_path) -> None:
    # found by bench/fuzz (cub target): a 300-byte name in images.txt raised OSError ENAMETOOLONG
    src = tmp_path / "CUB_200_2011"
    write_tiny_cub(src)
    (src / "images.txt").write_text("1 001.A/a.jpg\n2 002.B/" + "é" * 150 + ".jpg\n")
    ds = import_cub(src, tmp_path / "out", progress=False)
    assert [r.path for r in ds.records] == ["images/001.A/a.jpg"]
