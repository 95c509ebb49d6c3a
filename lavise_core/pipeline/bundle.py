"""The explanation bundle: one directory per (model weights, layer, probe data set, preprocessing).

Layout::

    <bundles>/<key>/bundle.json          manifest: key, versions, hashes, settings, stages, metrics
    <bundles>/<key>/probe/pooled.npy     arrays, one .npy per name (memory-mapped when read)
    <bundles>/<key>/textual/...          one folder per stage
    <bundles>/<key>/lavise/...

The key is a hash of all four inputs, so a bundle can never be silently reused for another model,
layer, data set or preprocessing; :meth:`Bundle.verify` re-checks it against what is loaded.
Every file is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lavise_core.data.dataset import ProbeDataset, atomic_write_bytes, atomic_write_text

__all__ = [
    "BUNDLE_FILE",
    "LOCK_FILE",
    "Bundle",
    "BundleBusy",
    "BundleError",
    "StageMissing",
    "bundle_key",
    "disk_error",
    "find_bundles",
]

BUNDLE_FILE = "bundle.json"
LOCK_FILE = ".build.lock"  # held (flock) by the one process building this bundle
OWNER_FILE = ".build.owner"  # who holds it: pid, host, command, start time (for the message of the next one)
FORMAT_VERSION = 1


class StageMissing(ValueError):
    """The bundle lacks a stage that is needed; the message says how to build it."""


class BundleError(ValueError):
    """A bundle is missing, incomplete, stale or belongs to other inputs."""


class BundleBusy(BundleError):
    """Another process is building this bundle and the caller chose not to wait (or waited long enough)."""


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def disk_error(e: OSError, root: Path, doing: str) -> BundleError | None:
    """A :class:`BundleError` with a user message for a full disk or a read-only folder, else ``None``."""
    if e.errno in _FULL:
        free = ""
        with contextlib.suppress(OSError):
            st = os.statvfs(root if root.exists() else root.parent)
            free = f" ({st.f_bavail * st.f_frsize / 1e6:.0f} MB free now)"
        return BundleError(
            f"the disk is full while {doing} in {root}{free}: {e.strerror}. Nothing half-written was kept "
            "(every file is written atomically) and finished stages stay; free some space and run the same "
            "build again to resume."
        )
    if e.errno in _DENIED:
        return BundleError(
            f"cannot write to {root} while {doing}: {e.strerror} (the folder is read-only for you). The "
            "dashboard can still show what is built; to build more, fix its permissions or build into a "
            "writable folder with --bundles."
        )
    return None


def bundle_key(weights_hash: str, layer: str, dataset_hash: str, preprocessing: dict) -> str:
    """16 hex digits of SHA-256 over the four inputs that determine every array in a bundle."""
    blob = json.dumps(
        {
            "weights": weights_hash,
            "layer": layer,
            "dataset": dataset_hash,
            "pre": preprocessing,
            "v": FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Bundle:
    """A bundle directory. Arrays are read as read-only memory maps; writes are atomic."""

    def __init__(self, root: Path, manifest: dict, writable: bool) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.writable = writable

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, root: str | os.PathLike, writable: bool = False) -> Bundle:
        root = Path(root)
        path = root / BUNDLE_FILE
        if not path.is_file():
            raise BundleError(
                f"{root} is not a bundle ({BUNDLE_FILE} missing). Build one with `lavise build`."
            )
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{path} is corrupt ({e}); delete the folder and rebuild it") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise BundleError(
                f"{root} was written by format {manifest.get('format')}, this version reads {FORMAT_VERSION}: rebuild it"
            )
        return cls(root, manifest, writable)

    @classmethod
    def create(cls, root: str | os.PathLike, manifest: dict) -> Bundle:
        """Open the bundle at ``root`` for writing, creating it (or keeping it if its key matches)."""
        root = Path(root)
        if (root / BUNDLE_FILE).is_file():
            b = cls.open(root, writable=True)
            if b.key != manifest["key"]:
                raise BundleError(
                    f"{root} holds bundle {b.key}, not {manifest['key']}: choose another folder"
                )
            return b
        full = {
            "format": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": _versions(),
            "stages": {},
            **manifest,
        }
        b = cls(root, full, writable=True)
        try:
            root.mkdir(parents=True, exist_ok=True)
            b._save_manifest()
        except OSError as e:
            raise disk_error(e, root, "creating the bundle") or e from None
        return b

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def _save_manifest(self) -> None:
        atomic_write_text(self.root / BUNDLE_FILE, json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")

    def _require_writable(self) -> None:
        if not self.writable:
            raise BundleError(f"bundle {self.root} was opened read-only")

    # ------------------------------------------------------------------ the build lock
    def reload(self) -> None:
        """Re-read ``bundle.json`` (another process may have finished stages since it was opened)."""
        self.manifest = json.loads((self.root / BUNDLE_FILE).read_text())

    def build_owner(self) -> str:
        """Who holds the build lock, in words (from ``.build.owner``; empty when unknown)."""
        try:
            o = json.loads((self.root / OWNER_FILE).read_text())
            return f"process {o['pid']} on {o['host']}, started {o['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    @contextlib.contextmanager
    def build_lock(
        self, timeout: float | None = None, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[Bundle]:
        """Hold this bundle's build lock (an OS file lock on ``.build.lock``) for the body.

        Two builds of one bundle never interleave: the second one calls ``on_wait(message)`` and waits
        (``timeout=None``), or gives up after ``timeout`` seconds (``0``: at once) with :class:`BundleBusy`.
        The lock is released by the OS if the holder dies (even by SIGKILL). On entry the manifest is
        re-read, so stages the other build finished are seen as finished.
        """
        from filelock import FileLock, Timeout

        self._require_writable()
        lock = FileLock(str(self.root / LOCK_FILE))
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                who = self.build_owner() or "another process"
                if timeout is not None and timeout <= 0:
                    raise BundleBusy(
                        f"bundle {self.root} is being built by {who}; wait for it to finish (or run the "
                        "same command without --no-wait to wait for it)"
                    ) from None
                if on_wait is not None:
                    on_wait(f"bundle {self.root.name} is being built by {who}; waiting for it to finish")
                try:
                    lock.acquire(timeout=-1 if timeout is None else timeout)
                except Timeout:
                    raise BundleBusy(
                        f"bundle {self.root} is still being built by {who} after {timeout:.0f} s; try later"
                    ) from None
        except OSError as e:
            raise disk_error(e, self.root, "taking the build lock") or e from None
        try:
            with contextlib.suppress(OSError):
                owner = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%H:%M:%S"),
                }
                atomic_write_text(self.root / OWNER_FILE, json.dumps(owner) + "\n")
            self.reload()
            yield self
        finally:
            with contextlib.suppress(OSError):
                (self.root / OWNER_FILE).unlink()
            lock.release()

    # ------------------------------------------------------------------ arrays and json
    def _path(self, name: str, suffix: str) -> Path:
        if ".." in Path(name).parts:
            raise BundleError(f"bad array name {name!r}")
        return self.root / f"{name}{suffix}"

    def has(self, name: str) -> bool:
        return self._path(name, ".npy").is_file() or self._path(name, "").is_file()

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        """The array ``name`` (e.g. ``"probe/pooled"``), memory-mapped read-only by default."""
        path = self._path(name, ".npy")
        if not path.is_file():
            raise BundleError(
                f"bundle {self.root.name} has no array {name!r}: the stage that makes it has not run"
            )
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)

    def write_array(self, name: str, arr: np.ndarray) -> None:
        self._require_writable()
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        atomic_write_bytes(self._path(name, ".npy"), buf.getvalue())

    def move_array(self, name: str, src: Path) -> None:
        """Move the finished ``.npy`` file ``src`` (on the bundle's file system) in as the array ``name``, in
        one rename: a large array written in place as a memmap is never copied."""
        self._require_writable()
        dst = self._path(name, ".npy")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(src, dst)

    def read_json(self, name: str) -> dict | list:
        path = self._path(name, ".json")
        if not path.is_file():
            raise BundleError(
                f"bundle {self.root.name} has no {name}.json: the stage that makes it has not run"
            )
        return json.loads(path.read_text())

    def write_json(self, name: str, obj: dict | list) -> None:
        self._require_writable()
        atomic_write_text(self._path(name, ".json"), json.dumps(obj, indent=1, sort_keys=True) + "\n")

    def file(self, name: str) -> Path:
        """Path for a non-array file of a stage (FAISS index, safetensors); write it atomically yourself."""
        path = self._path(name, "")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ stages
    def stage_done(self, stage: str) -> bool:
        return stage in self.manifest.get("stages", {})

    def mark_stage(self, stage: str, info: dict | None = None) -> None:
        """Record that ``stage`` finished, with its settings / timings / metrics."""
        self._require_writable()
        self.manifest.setdefault("stages", {})[stage] = {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(info or {}),
        }
        self._save_manifest()

    def borrow_stage(
        self, source: Bundle, stage: str, files: Sequence[str], parts: Sequence[str] = (), **info: Any
    ) -> None:
        """Take ``stage`` (its ``files``: folders or files under the bundle, and its ``parts`` marks) from the
        finished ``source`` bundle of the same model and layer, recorded with ``info`` (e.g. the concept set).

        Files are hard-linked where the file system allows (a stage rewrites its files atomically, so a later
        rebuild of ``source`` never changes them here), else copied through a temporary name; the stage is
        marked only once every file is in place, so an interrupted borrow is redone by the next build.
        """
        self._require_writable()
        for rel in files:
            src = source.root / rel
            paths = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for p in paths:
                dst = self.root / p.relative_to(source.root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.borrow")
                tmp.unlink(missing_ok=True)
                try:
                    os.link(p, tmp)
                except OSError:
                    shutil.copyfile(p, tmp)
                os.replace(tmp, dst)
        recorded = source.manifest.get("stages", {})
        for part in parts:
            if part in recorded:
                self.manifest.setdefault("stages", {})[part] = dict(recorded[part])
        self.mark_stage(stage, {**recorded.get(stage, {}), **info})

    def words_measured_on(self, stage: str) -> str:
        """The name of the data set ``stage``'s words were measured on: the concept set (or sets, joined by
        " + ") that lent or composed them, else this bundle's own probe set."""
        info = self.manifest.get("stages", {}).get(stage, {})
        return str(info.get("concept_set") or self.manifest.get("dataset", {}).get("name", ""))

    def clear_stage(self, stage: str) -> None:
        self._require_writable()
        self.manifest.get("stages", {}).pop(stage, None)
        self._save_manifest()

    # ------------------------------------------------------------------ inputs
    def dataset(self) -> ProbeDataset:
        """The probe data set this bundle was built from; refuses one whose content changed."""
        ds = ProbeDataset.open(self.manifest["dataset"]["root"])
        if ds.content_hash() != self.manifest["dataset"]["hash"]:
            raise BundleError(
                f"the data set at {ds.root} changed since bundle {self.key} was built; rebuild with `lavise build`"
            )
        return ds

    def load_model(self, device: str = "cpu"):  # -> LoadedModel (lazy torch import)
        from lavise_core.models.networks import load_model

        lm = load_model(self.manifest["model"]["spec"], device=device)
        self.verify_model(lm)
        return lm

    def verify_model(self, lm) -> None:
        """Raise :class:`BundleError` unless ``lm`` (weights + preprocessing) is what built this bundle."""
        if lm.weights_hash != self.manifest["model"]["weights_hash"]:
            raise BundleError(
                f"the weights of {lm.name} changed since bundle {self.key} was built (hash "
                f"{lm.weights_hash[:12]} vs {self.manifest['model']['weights_hash'][:12]}); rebuild it"
            )
        if lm.preprocessing_spec() != self.manifest["preprocessing"]:
            raise BundleError(f"the preprocessing of {lm.name} differs from bundle {self.key}'s; rebuild it")

    # ------------------------------------------------------------------ conveniences
    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def layer(self) -> str:
        return self.manifest["layer"]

    def summary(self) -> str:
        m = self.manifest
        return f"{m['model']['spec']} · {m['layer']} · {m['dataset']['name']} ({m['dataset']['n']} images)"


def find_bundles(root: str | os.PathLike) -> list[Bundle]:
    """All readable bundles directly under ``root``, newest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / BUNDLE_FILE).is_file():
                try:
                    out.append(Bundle.open(d))
                except BundleError:
                    continue
    return sorted(out, key=lambda b: b.manifest.get("created", ""), reverse=True)


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "timm", "faiss-cpu", "sentence-transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            v[pkg] = md.version(pkg)
    return v
