"""Session-wide fixtures of the pytest-benchmark tests: built once, shared by every test."""

from __future__ import annotations

import pytest

from bench.common import (
    STUDY_ROWS,
    BenchSize,
    bench_size,
    digits_session,
    photo_folder,
    random_cache_entry,
    random_vgg16,
    warm_digits_cache,
    wnid_digits,
)


@pytest.fixture(scope="session")
def size() -> BenchSize:
    """The benchmark size chosen by ``TLCORE_BENCH_SIZE``."""
    return bench_size()


@pytest.fixture(scope="session")
def photos(tmp_path_factory, size):
    """A seeded folder of photo-sized JPEG files (one ``train`` split)."""
    return photo_folder(tmp_path_factory.mktemp("photos"), size.photos)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A cache directory where the built-in dataset is written on first use."""
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="session")
def vgg():
    """VGG16 with random weights (seed 0), in eval mode."""
    return random_vgg16()


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """A run session on the built-in digits, with every head strategy's cache entry extracted."""
    session = digits_session(tmp_path_factory.mktemp("digits"))
    warm_digits_cache(session)
    return session


@pytest.fixture(scope="session")
def wnid_digits_session(tmp_path_factory):
    """A run session on the digits with ImageNet wnid class folders, where ``subset`` applies."""
    workdir = tmp_path_factory.mktemp("wnid-digits")
    session = digits_session(workdir, root=wnid_digits(workdir))
    warm_digits_cache(session, ("subset",))
    return session


@pytest.fixture(scope="session")
def study_entries(tmp_path_factory):
    """Random train and val cache entries of the study's size (5,279 and 2,000 images)."""
    directory = tmp_path_factory.mktemp("study-cache")
    return tuple(random_cache_entry(directory, split, rows)
                 for split, rows in zip(("train", "val"), STUDY_ROWS, strict=True))
