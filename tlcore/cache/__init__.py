"""The HDF5 feature cache: the frozen network's outputs, computed once per split and kept on disk.

One file per cache entry holds, for one split, the penultimate VGG16 features (N, 4096), the frozen
ImageNet logits (N, 1000), the labels, the image paths relative to the data root and the class
names. The entry's key (weights, preprocessing, loader, a fingerprint of the split's files, format
version, dtype) is hashed into the file name and stored in the file's attributes, and checked on
every read. Files are written under a temporary name and renamed when complete, behind a lock, so
an interrupted or concurrent extraction never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch
from filelock import FileLock

from tlcore import TlcoreError
from tlcore.models import FEATURE_DIM, IMAGENET_CLASSES

__all__ = [
    "FORMAT_VERSION",
    "DTYPES",
    "CacheKey",
    "CacheEntry",
    "EntryInfo",
    "FeatureCache",
    "write_entry",
    "read_entry",
    "verify_entry",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
_CHUNK_ROWS = 256


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the cached arrays of one split.

    Attributes:
        weights: the weights' identity (``imagenet:IMAGENET1K_V1``, ``random:seed0``, ...).
        split: ``train``, ``val`` or ``test``.
        data_root: the dataset folder.
        fingerprint: digest of the split's files, sizes, modification times and labels.
        preprocess: the input pipeline's settings (size, gray, resize mode, mean, std).
        loader: the input pipeline that decoded the images (``dali`` or ``torchvision``).
        dtype: the on-disk dtype of the arrays.
        version: the cache format version.
    """

    weights: str
    split: str
    data_root: str
    fingerprint: str
    preprocess: dict
    loader: str
    dtype: str = "float32"
    model: str = "vgg16"
    version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise TlcoreError(f"unknown cache dtype {self.dtype!r}; choose one of: "
                              f"{', '.join(DTYPES)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def filename(self) -> str:
        size = self.preprocess["image_size"]
        gray = "-gray" if self.preprocess["gray"] else ""
        return f"{self.split}-{size}px{gray}-{self.digest()[:16]}.h5"


@dataclass
class CacheEntry:
    """The arrays of one cache entry, read into memory as float32 tensors.

    ``extract_seconds`` is how long the extraction took: one pass of the split through the
    frozen network, the least a streamed epoch costs.
    """

    features: torch.Tensor | None
    logits: torch.Tensor | None
    labels: torch.Tensor
    paths: list[str]
    classes: list[str]
    extract_seconds: float


@dataclass(frozen=True)
class EntryInfo:
    """What ``python -m tlcore.cache list`` shows of one entry."""

    path: Path
    key: dict
    images: int
    size_bytes: int
    created: str


def write_entry(path: Path, key: CacheKey, batches: Iterable[tuple], *, num_images: int,
                paths: list[str], classes: list[str]) -> dict:
    """Write one cache entry to ``path`` as the batches arrive.

    Args:
        path: the file to write (the caller renames it into place).
        key: stored in the file's attributes.
        batches: ``(features, logits, labels)`` tensors per batch, in split order.
        num_images: the split's size; the arrays are allocated once at this length.
        paths: image paths relative to the data root, in split order.
        classes: class names in label order.

    Returns:
        Timing of the extraction: ``seconds`` and ``images_per_s``.
    """
    dtype = np.dtype(key.dtype)
    rows = max(1, min(_CHUNK_ROWS, num_images))
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        features = f.create_dataset("features", (num_images, FEATURE_DIM), dtype=dtype,
                                    chunks=(rows, FEATURE_DIM))
        logits = f.create_dataset("logits", (num_images, IMAGENET_CLASSES), dtype=dtype,
                                  chunks=(rows, IMAGENET_CLASSES))
        labels = f.create_dataset("labels", (num_images,), dtype=np.int64)
        f.create_dataset("paths", data=np.array(paths, dtype=object),
                         dtype=h5py.string_dtype())

        # A writer thread overlaps the HDF5 writes with the next forward pass.
        def write(offset, feats, logs, labs):
            end = offset + len(labs)
            features[offset:end] = feats
            logits[offset:end] = logs
            labels[offset:end] = labs

        written = _write_in_background(batches, write, dtype)
        if written != num_images:
            raise RuntimeError(f"extraction produced {written} rows for {num_images} images")

        seconds = time.perf_counter() - start
        f.attrs.update({
            "key": key.to_json(),
            "digest": key.digest(),
            "classes": json.dumps(list(classes)),
            "num_images": num_images,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extract_seconds": seconds,
            "complete": True,
        })
    return {"seconds": seconds, "images_per_s": num_images / max(seconds, 1e-9)}


def _write_in_background(batches, write, dtype) -> int:
    pending: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def drain():
        while (item := pending.get()) is not None:
            if not failure:
                try:
                    write(*item)
                except BaseException as exc:  # re-raised in the producing thread
                    failure.append(exc)

    writer = threading.Thread(target=drain, name="tlcore-cache-writer", daemon=True)
    writer.start()
    offset = 0
    try:
        for feats, logs, labs in batches:
            if failure:
                break
            # GPU -> host copy happens here, in the producing thread.
            item = (offset, feats.float().cpu().numpy().astype(dtype, copy=False),
                    logs.float().cpu().numpy().astype(dtype, copy=False),
                    labs.cpu().numpy())
            pending.put(item)
            offset += len(labs)
    finally:
        pending.put(None)
        writer.join()
    if failure:
        raise failure[0]
    return offset


def verify_entry(path: Path, key: CacheKey | None = None) -> str | None:
    """Check one cache file; return what is wrong with it, or ``None`` if it is sound."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if not attrs.get("complete"):
                return "incomplete (no completion mark)"
            stored = json.loads(attrs["key"])
            if key is not None and attrs.get("digest") != key.digest():
                return "key mismatch (written for other weights, data or settings)"
            if CacheKey(**stored).digest() != attrs.get("digest"):
                return "key attributes do not match their digest"
            n = int(attrs["num_images"])
            expected = {"features": (n, FEATURE_DIM), "logits": (n, IMAGENET_CLASSES),
                        "labels": (n,), "paths": (n,)}
            for name, shape in expected.items():
                if name not in f:
                    return f"array {name!r} is missing"
                if f[name].shape != shape:
                    return f"array {name!r} has shape {f[name].shape}, expected {shape}"
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return f"unreadable ({exc.__class__.__name__}: {exc})"
    return None


def read_entry(path: Path, arrays: Iterable[str] = ("features", "logits")) -> CacheEntry:
    """Read the named arrays of one cache entry (labels, paths and classes always come along)."""
    arrays = set(arrays)
    with h5py.File(path, "r") as f:

        def load(name):
            return torch.from_numpy(f[name][...].astype(np.float32)) if name in arrays else None

        return CacheEntry(
            features=load("features"),
            logits=load("logits"),
            labels=torch.from_numpy(f["labels"][...]),
            paths=[p.decode() if isinstance(p, bytes) else p for p in f["paths"][...]],
            classes=json.loads(f.attrs["classes"]),
            extract_seconds=float(f.attrs["extract_seconds"]),
        )


class FeatureCache:
    """A folder of cache entries.

    Args:
        directory: where the ``.h5`` files live (created on first write).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser().resolve()

    def path_for(self, key: CacheKey) -> Path:
        return self.directory / key.filename()

    def lookup(self, key: CacheKey) -> Path | None:
        """The entry's path if it is there and sound, else ``None``."""
        path = self.path_for(key)
        return path if path.exists() and verify_entry(path, key) is None else None

    def get_or_create(self, key: CacheKey, extract: Callable[[Path], dict]) -> tuple[Path, bool]:
        """Return the path of a sound entry for ``key``, calling ``extract`` when there is none.

        ``extract(tmp_path)`` writes the entry to ``tmp_path``; it is renamed into place only
        when it returns. A second process asking for the same entry waits for the lock and then
        reuses what the first wrote. A file that fails its checks is reported and rebuilt, and
        what a killed extraction left is removed.

        Returns:
            The entry's path, and whether it was created by this call.
        """
        path = self.path_for(key)
        if self.lookup(key):
            return path, False
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if self.lookup(key):
                return path, False
            if path.exists():
                problem = verify_entry(path, key)
                log.warning("cache entry %s is unusable (%s); rebuilding it", path.name, problem)
                path.unlink()
            # Only the lock holder writes this entry: any temporary file beside it was left by
            # an extraction that was killed.
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                log.warning("removing %s, left by an extraction that was killed", stale.name)
                stale.unlink(missing_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                extract(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path, True

    def entries(self) -> list[EntryInfo]:
        """Every cache entry in the folder, oldest first."""
        infos = []
        for path in sorted(self.directory.glob("*.h5")):
            try:
                with h5py.File(path, "r") as f:
                    key = json.loads(f.attrs.get("key", "{}"))
                    images = int(f.attrs.get("num_images", 0))
                    created = str(f.attrs.get("created", "?"))
            except OSError:
                key, images, created = {}, 0, "unreadable"
            infos.append(EntryInfo(path, key, images, path.stat().st_size, created))
        return sorted(infos, key=lambda info: info.created)

    def remove(self, match: Callable[[EntryInfo], bool] = lambda info: True) -> list[Path]:
        """Delete the entries ``match`` accepts; return their paths."""
        removed = []
        for info in self.entries():
            if match(info):
                with FileLock(str(info.path) + ".lock"):
                    info.path.unlink(missing_ok=True)
                Path(str(info.path) + ".lock").unlink(missing_ok=True)
                removed.append(info.path)
        return removed
