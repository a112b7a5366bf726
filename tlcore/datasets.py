"""Reading and checking image folders, and writing the built-in offline dataset.

A dataset is a root folder laid out as ``ROOT/{train,val,test}/<class>/<image>``. Class indices
follow the sorted order of the class folder names, the same order torchvision's ``ImageFolder``
and DALI's file reader use. Everything is checked before any heavy work starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlcore import TlcoreError

__all__ = [
    "SPLITS",
    "IMAGE_EXTENSIONS",
    "Split",
    "check_root",
    "build_splits",
    "load_image_folder",
    "check_images",
    "builtin_dataset",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_DECODABLE_FORMATS = {"JPEG", "PNG", "MPO"}


@dataclass(frozen=True)
class Split:
    """The images of one split, as file paths relative to ``root`` with their labels.

    Attributes:
        name: ``train``, ``val`` or ``test``.
        root: the folder the paths are relative to.
        classes: class names in label order.
        files: image paths relative to ``root``.
        labels: one class index per file.
    """

    name: str
    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def paths(self) -> list[str]:
        """Absolute paths of the images, in split order."""
        return [str(self.root / f) for f in self.files]

    def fingerprint(self) -> str:
        """A digest of the split's files (paths, sizes, modification times) and labels."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.classes).encode())
        for rel, label in zip(self.files, self.labels, strict=True):
            st = os.stat(self.root / rel)
            digest.update(f"\n{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        return digest.hexdigest()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _scan_split(root: Path, name: str) -> dict[str, list[str]]:
    split_dir = root / name
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise TlcoreError(
            f"data folder {root} has no '{name}' split (found: {', '.join(found) or 'nothing'}); "
            f"lay it out as ROOT/{{train,val,test}}/<class>/<image>"
        )
    by_class = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        images = sorted(p.name for p in class_dir.iterdir() if _is_image(p))
        by_class[class_dir.name] = [f"{name}/{class_dir.name}/{img}" for img in images]
    if not by_class:
        raise TlcoreError(f"split folder {split_dir} has no class folders; put each class's "
                          f"images in {split_dir}/<class>/")
    return by_class


def check_root(root: str | os.PathLike) -> Path:
    """Resolve a data folder, or say in one line why it cannot be used."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise TlcoreError(f"data folder {root} does not exist or is not a folder; "
                          "pass --data ROOT with ROOT/{train,val,test}/<class>/<image>")
    if not os.access(root, os.R_OK | os.X_OK):
        raise TlcoreError(f"data folder {root} is not readable; check its permissions")
    return root


def build_splits(root: Path, files: dict[str, dict[str, list[str]]],
                 check: bool = True) -> dict[str, Split]:
    """Turn ``{split: {class: [relative paths]}}`` into checked :class:`Split` objects.

    Every split must have the same classes, and every class at least one image in every split.
    """
    names = list(files)
    reference, classes = names[0], tuple(sorted(files[names[0]]))
    for name, by_class in files.items():
        if set(by_class) != set(classes):
            missing = sorted(set(classes) - set(by_class))
            extra = sorted(set(by_class) - set(classes))
            detail = "; ".join(part for part in (
                f"missing from {name}: {', '.join(missing)}" if missing else "",
                f"only in {name}: {', '.join(extra)}" if extra else "",
            ) if part)
            raise TlcoreError(f"splits {reference} and {name} of {root} have different "
                              f"classes ({detail}); every split needs the same class folders")
        empty = [c for c in classes if not by_class[c]]
        if len(empty) == len(classes):
            raise TlcoreError(f"split {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                              "add images to its class folders")
        if empty:
            raise TlcoreError(f"class folder {root / name / empty[0]} has no images "
                              f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the class "
                              "from every split")

    result = {}
    for name, by_class in files.items():
        paths, labels = [], []
        for label, cls in enumerate(classes):
            paths += by_class[cls]
            labels += [label] * len(by_class[cls])
        result[name] = Split(name, root, classes, tuple(paths), tuple(labels))
    if check:
        for split in result.values():
            check_images(split)
    return result


def load_image_folder(root: str | os.PathLike, check: bool = True) -> dict[str, Split]:
    """Read and check an image folder.

    The folder holds ``train``, ``val`` and ``test``. A folder with only ``train`` and ``val``
    (the Imagenette layout) uses ``val`` as the test split and holds out every fifth image of
    each training class as the validation split.

    Args:
        root: the dataset folder, holding one folder per split.
        check: open every image's header so that unreadable files are found now, not mid-run.

    Returns:
        ``train``, ``val`` and ``test`` :class:`Split` objects with the same classes.

    Raises:
        TlcoreError: the layout is wrong; the message names the folder or file and the fix.
    """
    root = check_root(root)
    if not (root / "test").exists() and (root / "train").is_dir() and (root / "val").is_dir():
        train, test = _scan_split(root, "train"), _scan_split(root, "val")
        files = {
            "train": {c: [f for i, f in enumerate(fs) if i % 5 != 4] for c, fs in train.items()},
            "val": {c: fs[4::5] for c, fs in train.items()},
            "test": test,
        }
        log.info("%s has train and val only: val is the test split, and every fifth training "
                 "image per class is held out for validation", root)
        return build_splits(root, files, check)
    return build_splits(root, {name: _scan_split(root, name) for name in SPLITS}, check)


def check_images(split: Split) -> None:
    """Open the header of every image in ``split``; raise on the first one that is unreadable."""
    for rel in split.files:
        path = split.root / rel
        try:
            with Image.open(path) as img:
                fmt = img.format
        except (UnidentifiedImageError, OSError) as exc:
            raise TlcoreError(f"image {path} cannot be read ({exc.__class__.__name__}); "
                              "replace or remove it") from None
        if fmt not in _DECODABLE_FORMATS:
            raise TlcoreError(f"image {path} is {fmt}, not JPEG or PNG; convert or remove it")


# The built-in dataset: scikit-learn's handwritten digits, 10 classes, written as JPEG files.
BUILTIN_NAME = "digits-v1"
BUILTIN_PER_CLASS = {"train": 30, "val": 10, "test": 20}
BUILTIN_PIXELS = 32


def builtin_dataset(cache_dir: str | os.PathLike) -> Path:
    """Return the built-in dataset's root, writing it under ``cache_dir`` the first time.

    The images are scikit-learn's 8x8 handwritten digits, scaled to 32x32 and saved as JPEG
    files, 30/10/20 per class for train/val/test, always the same ones.
    """
    root = Path(cache_dir).expanduser().resolve() / "datasets" / BUILTIN_NAME
    if (root / "COMPLETE").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)

    from sklearn.datasets import load_digits

    digits = load_digits()
    staging = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_NAME}-", dir=root.parent))
    for label in range(10):
        index = np.flatnonzero(digits.target == label)
        start = 0
        for split, count in BUILTIN_PER_CLASS.items():
            folder = staging / split / str(label)
            folder.mkdir(parents=True)
            for i in index[start:start + count]:
                pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                img = Image.fromarray(pixels).resize(
                    (BUILTIN_PIXELS, BUILTIN_PIXELS), Image.BILINEAR)
                img.save(folder / f"{i:04d}.jpg", quality=95)
            start += count
    (staging / "COMPLETE").write_text("scikit-learn digits, 30/10/20 images per class\n")
    try:
        staging.rename(root)
    except OSError:
        # Another process wrote it first; keep theirs.
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote the built-in dataset to %s", root)
    return root
