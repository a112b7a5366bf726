"""Shared fixtures: real image folders on disk, the built-in dataset, random VGG16 weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcore.datasets import builtin_dataset

# Classes that differ in hue: random VGG16 features separate them (they keep colour).
HUES = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 50, 40)}


def write_image(path: Path, rgb, rng: np.random.Generator, size=(40, 52), mode="RGB",
                fmt=None) -> Path:
    """Write a noisy image around colour ``rgb``."""
    base = np.array(rgb, dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_image_folder(root: Path, classes=tuple(HUES), per_split=None, seed=0) -> Path:
    """Write ROOT/{train,val,test}/<class>/<image>.jpg with hue-coded classes."""
    per_split = per_split or {"train": 6, "val": 3, "test": 3}
    rng = np.random.default_rng(seed)
    colours = list(HUES.values())
    for split, count in per_split.items():
        for c, name in enumerate(classes):
            for i in range(count):
                write_image(root / split / name / f"{i:03d}.jpg", colours[c % len(colours)], rng)
    return root


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The built-in dataset, written once per test session."""
    return builtin_dataset(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder (built-in dataset and feature cache) for the tests that train runs."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    """A small hue-coded image folder: 3 classes, 6/3/3 images per class."""
    return make_image_folder(tmp_path / "tiny")
