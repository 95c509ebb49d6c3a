"""The probe data set: one manifest format for every source.

A data set is a directory holding

- ``dataset.json``: name, source, class names, region (part / object) names, and free metadata;
- ``manifest.jsonl``: one JSON object per image (an :class:`ImageRecord`);
- the image files and optional region label maps, at paths relative to the directory.

Every importer (SynthBirds, an image folder, CUB-200-2011, COCO) writes this format, and nothing
downstream knows where the data came from.

Region masks are *label maps*: one single-channel PNG per image, pixel value ``r`` (1-based) means
region ``regions[r - 1]``, 0 means none. Overlapping regions keep the one drawn last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "BACKGROUND_TEMPLATE",
    "DATASET_FILE",
    "MANIFEST_FILE",
    "DatasetError",
    "ImageRecord",
    "ProbeDataset",
    "atomic_write_bytes",
    "atomic_write_text",
    "background_phrase",
    "dataset_backgrounds",
    "fit_indices",
    "prepare_generated_dir",
    "write_dataset",
]

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
SPLITS = ("train", "val", "test")
_UMASK = os.umask(0)
os.umask(_UMASK)


class DatasetError(ValueError):
    """A data set on disk is missing, malformed or inconsistent; the message says which file and why."""


@dataclass
class ImageRecord:
    """One image of a probe data set (one line of ``manifest.jsonl``).

    Attributes:
        id: unique, stable identifier (file-name safe).
        path: image path relative to the data set directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        label: class index into ``ProbeDataset.classes``, or ``-1`` when unknown.
        attributes: attribute phrases true of the image ("red crown"); ground truth where the
            source has it (SynthBirds, CUB attribute labels), else empty.
        captions: free-text descriptions (SynthBirds, CUB ``text_c10``, COCO captions).
        mask: path of the region label map (PNG, same size as the image), or ``None``.
        region_concepts: for each region name present, the concept phrases it carries
            (``{"wing": ["red wing", "striped wing"]}``; COCO: ``{"dog": ["dog"]}``).
        keypoints: region name -> ``[x, y]`` in image pixels, only for visible parts.
        bbox: object box ``[x0, y0, x1, y1]`` in image pixels, or ``None``.
        meta: anything else the source knows (SynthBirds: background, pose, ...).
    """

    id: str
    path: str
    split: str = "test"
    label: int = -1
    attributes: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    mask: str | None = None
    region_concepts: dict[str, list[str]] = field(default_factory=dict)
    keypoints: dict[str, list[float]] = field(default_factory=dict)
    bbox: list[float] | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict, where: str = "") -> ImageRecord:
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: a record must be a JSON object, not {type(obj).__name__}")
        known = set(cls.__dataclass_fields__)
        missing = {"id", "path"} - set(obj)
        if missing:
            raise DatasetError(f"{where}: record lacks required field(s) {sorted(missing)}")
        unknown = set(obj) - known
        if unknown:
            raise DatasetError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        for key, value in obj.items():
            ok, want = _FIELD_TYPES[key]
            if not ok(value):
                raise DatasetError(f"{where}: field {key!r} must be {want}, not {_short(value)}")
        rec = cls(**obj)
        if rec.split not in SPLITS:
            raise DatasetError(f"{where}: split {rec.split!r} is not one of {SPLITS}")
        return rec

    def to_json(self) -> dict:
        return asdict(self)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _short(v: object) -> str:
    text = json.dumps(v, ensure_ascii=True) if not isinstance(v, float) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


#: manifest field -> (check, what it must be, for the message)
_FIELD_TYPES = {
    "id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "path": (lambda v: isinstance(v, str) and v != "", "a non-empty string (relative image path)"),
    "split": (lambda v: isinstance(v, str), "a string"),
    "label": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer class index"),
    "attributes": (_is_str_list, "a list of strings"),
    "captions": (_is_str_list, "a list of strings"),
    "mask": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a relative path"),
    "region_concepts": (
        lambda v: isinstance(v, dict) and all(_is_str_list(x) for x in v.values()),
        "an object mapping region names to lists of strings",
    ),
    "keypoints": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(x, list) and len(x) == 2 and all(map(_is_number, x)) for x in v.values())
        ),
        "an object mapping region names to [x, y]",
    ),
    "bbox": (
        lambda v: v is None or (isinstance(v, list) and len(v) == 4 and all(map(_is_number, v))),
        "null or [x0, y0, x1, y1]",
    ),
    "meta": (lambda v: isinstance(v, dict), "an object"),
}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_generated_dir(out: Path, source: str, title: str, empty_only: bool = False) -> None:
    """Make ``out`` ready for a generated data set whose ``source`` is ``source`` (``title`` in messages).

    Refuses to overwrite a data set from another source (with ``empty_only``, also any other non-empty folder),
    removes the old set's description and manifest while its files are replaced, and creates ``images/`` and
    ``masks/``.
    """
    desc = out / DATASET_FILE
    if desc.is_file():
        try:
            found = json.loads(desc.read_text()).get("source")
        except (json.JSONDecodeError, AttributeError):
            found = None
        if found != source:
            raise DatasetError(
                f"{out} holds a data set from {found!r}; refusing to overwrite it with {title}"
            )
    elif empty_only and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(
            f"{out} exists and is not an empty directory or a {title} set; choose another --out"
        )
    for name in (DATASET_FILE, MANIFEST_FILE):  # invalidate the old set while files are replaced
        (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass
class ProbeDataset:
    """A data set opened from disk: its description and its image records.

    Attributes:
        root: the data set directory.
        name: human name ("SynthBirds", "CUB-200-2011").
        source: which importer made it ("synthbirds", "folder", "cub", "coco").
        classes: class names; ``ImageRecord.label`` indexes this list.
        regions: region names of the label maps (1-based in the PNGs).
        records: the images, in manifest order.
        meta: free metadata from ``dataset.json`` (generator settings, attribute vocabularies ...).
    """

    root: Path
    name: str
    source: str
    classes: list[str]
    regions: list[str]
    records: list[ImageRecord]
    meta: dict = field(default_factory=dict)
    #: inside :meth:`keep_decoded`: index -> its first decode, the bytes of room left, the nesting depth
    _decoded: dict | None = field(default=None, init=False, repr=False, compare=False)
    _decoded_room: int = field(default=0, init=False, repr=False, compare=False)
    _decoded_depth: int = field(default=0, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Pickled (for Ray workers, process pools) without the decoded images."""
        state = dict(self.__dict__)
        state.update(_decoded=None, _decoded_room=0, _decoded_depth=0)
        return state

    # ------------------------------------------------------------------ loading
    @classmethod
    def open(cls, root: str | os.PathLike) -> ProbeDataset:
        root = Path(root)
        desc_path, man_path = root / DATASET_FILE, root / MANIFEST_FILE
        if not root.is_dir():
            raise DatasetError(f"no data set directory at {root}")
        for p in (desc_path, man_path):
            if not p.is_file():
                raise DatasetError(
                    f"{p} is missing: {root} is not a probe data set. Import one with "
                    "`lavise import-folder`, `lavise import-cub`, `lavise import-coco` or `lavise synthbirds`."
                )
        try:
            desc = json.loads(desc_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{desc_path} is not valid JSON: {e}") from e
        except RecursionError:
            raise DatasetError(f"{desc_path} is nested too deeply to be a dataset description") from None
        if not isinstance(desc, dict):
            raise DatasetError(f"{desc_path} must hold a JSON object, not {type(desc).__name__}")
        for key in ("name", "classes"):
            if key not in desc:
                raise DatasetError(f"{desc_path} lacks the field {key!r}")
        checks = {
            "name": (isinstance(desc["name"], str), "a string"),
            "classes": (_is_str_list(desc["classes"]), "a list of class-name strings"),
            "regions": (_is_str_list(desc.get("regions", [])), "a list of region-name strings"),
            "source": (isinstance(desc.get("source", ""), str), "a string"),
            "meta": (isinstance(desc.get("meta", {}), dict), "an object"),
        }
        for key, (ok, want) in checks.items():
            if not ok:
                raise DatasetError(f"{desc_path}: field {key!r} must be {want}, not {_short(desc[key])}")
        records = list(_read_manifest(man_path))
        ds = cls(
            root=root,
            name=desc["name"],
            source=desc.get("source", "unknown"),
            classes=list(desc["classes"]),
            regions=list(desc.get("regions", [])),
            records=records,
            meta=desc.get("meta", {}),
        )
        ds.validate()
        return ds

    def validate(self) -> None:
        """Check ids are unique and labels index ``classes``; raise :class:`DatasetError` otherwise."""
        seen: set[str] = set()
        k = len(self.classes)
        for i, r in enumerate(self.records):
            if r.id in seen:
                raise DatasetError(f"{self.root / MANIFEST_FILE}: line {i + 1}: duplicate id {r.id!r}")
            seen.add(r.id)
            if not -1 <= r.label < k:
                raise DatasetError(
                    f"{self.root / MANIFEST_FILE}: line {i + 1}: label {r.label} outside 0..{k - 1}"
                )

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path:
        return self.root / self.records[i].path

    def load_image(self, i: int):
        """Image ``i`` as RGB ``PIL.Image``; EXIF rotation only when it has no annotations to misalign.

        Raises:
            lavise_core.data.images.ImageLoadError: unreadable image, with a user message.
        """
        from lavise_core.data.images import load_image

        memo = self._decoded
        if memo is not None and i in memo:
            return memo[i].copy()  # a copy: a caller may draw on what it gets
        r = self.records[i]
        annotated = r.mask is not None or bool(r.keypoints) or r.bbox is not None
        img = load_image(self.image_path(i), name=r.path, upright=not annotated)
        if memo is not None:
            size = img.width * img.height * len(img.getbands())
            if size <= self._decoded_room:
                memo[i] = img.copy()
                self._decoded_room -= size
        return img

    @contextlib.contextmanager
    def keep_decoded(self, max_bytes: int = 512 << 20) -> Iterator[ProbeDataset]:
        """Within the block, each image is decoded once: :meth:`load_image` returns a copy of its first decode.

        The stages of one build read the same images several times (the probe pass, dissection, LaViSE, the data
        map, fidelity, the layers stage), and decoding a PNG costs more than the copy. Up to ``max_bytes`` of
        pixels are kept (SynthBirds' 4,800 images of 128 × 128: 236 MB); images beyond that are decoded each time.
        The same pixels either way. Nested blocks share the first one's images; the last exit frees them.
        """
        if self._decoded_depth == 0:
            self._decoded, self._decoded_room = {}, int(max_bytes)
        self._decoded_depth += 1
        try:
            yield self
        finally:
            self._decoded_depth -= 1
            if self._decoded_depth == 0:
                self._decoded, self._decoded_room = None, 0

    def mask_path(self, i: int) -> Path | None:
        m = self.records[i].mask
        return None if m is None else self.root / m

    def load_mask(self, i: int) -> np.ndarray | None:
        """Region label map of image ``i`` as ``(H, W)`` uint8/uint16, or ``None``."""
        from PIL import Image

        p = self.mask_path(i)
        if p is None:
            return None
        with Image.open(p) as im:
            return np.asarray(im)

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 class indices (-1 = unknown)."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    def splits(self) -> np.ndarray:
        return np.array([r.split for r in self.records])

    def indices(self, split: str | None = None) -> np.ndarray:
        """Indices of the records of one split (all when ``split`` is ``None``)."""
        if split is None:
            return np.arange(len(self.records))
        return np.array([i for i, r in enumerate(self.records) if r.split == split], dtype=np.int64)

    def attribute_vocabulary(self) -> list[str]:
        """Sorted attribute phrases that occur in the ground-truth ``attributes`` fields."""
        return sorted({a for r in self.records for a in r.attributes})

    def attribute_matrix(self, vocabulary: list[str]) -> np.ndarray:
        """``(N, T)`` float32 0/1 matrix: ``p(x_i | t_j)`` of METHODS.md §1 from ground-truth attributes."""
        col = {t: j for j, t in enumerate(vocabulary)}
        m = np.zeros((len(self.records), len(vocabulary)), dtype=np.float32)
        for i, r in enumerate(self.records):
            for a in r.attributes:
                j = col.get(a)
                if j is not None:
                    m[i, j] = 1.0
        return m

    def content_hash(self) -> str:
        """SHA-256 of ``dataset.json`` + ``manifest.jsonl`` (image bytes are covered by the importer's ids)."""
        h = hashlib.sha256()
        for name in (DATASET_FILE, MANIFEST_FILE):
            h.update((self.root / name).read_bytes())
        return h.hexdigest()


def _read_manifest(path: Path) -> Iterator[ImageRecord]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}: line {lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DatasetError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e})") from e
            except RecursionError:
                raise DatasetError(f"{where}: nested too deeply to be an image record") from None
            yield ImageRecord.from_json(obj, where)


def write_dataset(
    root: str | os.PathLike,
    *,
    name: str,
    source: str,
    classes: list[str],
    records: Iterable[ImageRecord],
    regions: list[str] | None = None,
    meta: dict | None = None,
) -> ProbeDataset:
    """Write ``dataset.json`` and ``manifest.jsonl`` atomically (image files must already be in place)."""
    root = Path(root)
    records = list(records)
    ds = ProbeDataset(root, name, source, list(classes), list(regions or []), records, dict(meta or {}))
    ds.validate()
    lines = "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in records)
    atomic_write_text(root / MANIFEST_FILE, lines)
    desc = {"name": name, "source": source, "classes": ds.classes, "regions": ds.regions, "meta": ds.meta}
    atomic_write_text(root / DATASET_FILE, json.dumps(desc, indent=2, sort_keys=True) + "\n")
    return ds


# ---------------------------------------------------------------------------------------------- helpers
#: A background kind's concept phrase: ``"water"`` -> ``"water background"``.
BACKGROUND_TEMPLATE = "{} background"


def background_phrase(kind: str | None) -> str | None:
    """The concept phrase of a background kind (a record's ``meta["background"]``), or None without one."""
    if not kind or not str(kind).strip():
        return None
    return BACKGROUND_TEMPLATE.format(str(kind).strip().lower())


def dataset_backgrounds(dataset: ProbeDataset) -> list[str]:
    """Sorted background phrases of a data set (:func:`background_phrase` of every record's background kind)."""
    out = {background_phrase(r.meta.get("background")) for r in dataset.records}
    return sorted(p for p in out if p)


def fit_indices(dataset: ProbeDataset) -> np.ndarray:
    """Images a stage learns from: the train and val splits if any, else every image (the test split stays held out)."""
    splits = dataset.splits()
    idx = np.flatnonzero(splits != "test")
    return idx if idx.size else np.arange(len(dataset))
