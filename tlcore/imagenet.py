"""ImageNet-1k labels and folders: the 1000 wnids in index order, mapping class folders onto
them, and seeded splits drawn from an ImageNet-layout folder without copying images."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from tlcore import TlcoreError
from tlcore.datasets import IMAGE_EXTENSIONS, SPLITS, Split, build_splits, check_root

__all__ = ["STUDY_CLASSES", "wnids", "imagenet_indices", "parse_classes", "imagenet_splits"]

# The original study's ten labels: bell pepper, cornet, vending machine, computer keyboard,
# sewing machine, ant, macaque, king penguin, albatross, lionfish.
STUDY_CLASSES = (945, 513, 886, 508, 786, 310, 373, 145, 146, 396)

_WNID = re.compile(r"^n\d{8}$")


@cache
def wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids, in the class-index order of torchvision's weights."""
    text = resources.files("tlcore").joinpath("imagenet_wnids.txt").read_text()
    return tuple(text.split())


def imagenet_indices(classes) -> list[int] | None:
    """Map class names to ImageNet indices, or return ``None`` when they do not all map.

    A class maps when its folder name is an ImageNet wnid (``n07720875``), optionally followed
    by ``-`` or ``_`` and a description (``n07720875_bell_pepper``). Plain numbers do not map:
    a folder called ``3`` is more often a digit than ImageNet class 3.
    """
    index_of = {w: i for i, w in enumerate(wnids())}
    indices = []
    for name in classes:
        head = re.split(r"[-_ ]", name, maxsplit=1)[0]
        if not (_WNID.match(head) and head in index_of):
            return None
        indices.append(index_of[head])
    return indices


def parse_classes(spec: str) -> list[int]:
    """Turn ``--classes`` into ImageNet indices.

    Args:
        spec: ``study`` (the original study's ten labels), or a comma-separated list of
            ImageNet indices (``945,513``) and/or wnids (``n07720875,n03110669``).
    """
    if spec == "study":
        return list(STUDY_CLASSES)
    index_of = {w: i for i, w in enumerate(wnids())}
    indices = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if item.isdigit() and int(item) < len(index_of):
            indices.append(int(item))
        elif item in index_of:
            indices.append(index_of[item])
        else:
            raise TlcoreError(f"--classes item {item!r} is neither an ImageNet index (0-999) nor "
                              "a wnid such as n07720875; pass study or a comma-separated list")
    if len(set(indices)) != len(indices) or len(indices) < 2:
        raise TlcoreError(f"--classes {spec!r} must name at least two different classes")
    return indices


def _class_folders(root: Path, wnid: str) -> list[Path]:
    """Where a class's images may be: ROOT/<wnid>, ROOT/train/<wnid>, ROOT/val/<wnid>."""
    return [d for d in (root / wnid, root / "train" / wnid, root / "val" / wnid) if d.is_dir()]


def imagenet_splits(root, classes: list[int], per_class=(800, 200, 400), seed: int = 0,
                    check: bool = True) -> dict[str, Split]:
    """Seeded train/val/test splits of some ImageNet classes, as file lists; nothing is copied.

    Args:
        root: an ImageNet-layout folder: one folder per wnid, at the top or under ``train/``
            (and ``val/``, whose images join the pool).
        classes: ImageNet indices of the classes to use.
        per_class: train, val and test images per class.
        seed: seeds the draw; the same seed and files always give the same splits.
    """
    root = check_root(root)
    names = wnids()
    needed = sum(per_class)
    rng = np.random.default_rng(seed)
    files: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for index in sorted(classes, key=lambda i: names[i]):
        wnid = names[index]
        folders = _class_folders(root, wnid)
        if not folders:
            raise TlcoreError(f"ImageNet class {index} ({wnid}) has no folder in {root}; "
                              f"expected {root / wnid} or {root / 'train' / wnid}")
        pool = sorted(str(p.relative_to(root)) for d in folders for p in d.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(pool) < needed:
            raise TlcoreError(f"ImageNet class {index} ({wnid}) has {len(pool)} images in {root}, "
                              f"{needed} needed for {'/'.join(map(str, per_class))} per class; "
                              "pass --per-class with smaller counts")
        drawn = [pool[i] for i in rng.permutation(len(pool))[:needed]]
        start = 0
        for split, count in zip(SPLITS, per_class, strict=True):
            files[split][wnid] = sorted(drawn[start:start + count])
            start += count
    return build_splits(root, files, check)
