"""ImageNet-1k labels: the 1000 wnids in index order, and mapping class folders onto them."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

__all__ = ["STUDY_CLASSES", "wnids", "imagenet_indices"]

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
