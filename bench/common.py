"""Seeded data, models and caches shared by the asv suite and the pytest-benchmark tests.

Everything here is deterministic: the built-in digits dataset, a folder of photo-sized JPEG
files drawn from a seeded generator, VGG16 with random weights (seed 0), and random feature
arrays of the original study's size written as real cache entries. ``TLCORE_BENCH_SIZE``
selects how big: ``tiny`` (a smoke test for CI), ``small`` (the default, minutes on two CPU
cores) or ``full``.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tlcore.cache import CacheKey, FeatureCache, read_entry, write_entry
from tlcore.config import DEFAULTS, CacheConfig, DataConfig, RunConfig, TrainConfig
from tlcore.datasets import SPLITS, Split, builtin_dataset, load_image_folder
from tlcore.engine import LinearHeadSGD, TensorSource, fit, pooled_statistics
from tlcore.imagenet import STUDY_CLASSES, wnids
from tlcore.inputs import Preprocess
from tlcore.models import FEATURE_DIM, IMAGENET_CLASSES, WeightsSpec, build_head, build_vgg16
from tlcore.runs import Session, cached_source, prepare
from tlcore.strategies import STRATEGIES, Strategy

__all__ = [
    "SEED",
    "SIZE_VARIABLE",
    "BenchSize",
    "ExtractCase",
    "bench_size",
    "RANDOM_WEIGHTS",
    "DEVICE",
    "HEAD_STRATEGIES",
    "STUDY_ROWS",
    "random_vgg16",
    "photo_folder",
    "photo_split",
    "extraction_split",
    "digits_config",
    "digits_session",
    "wnid_digits",
    "warm_digits_cache",
    "head_stages",
    "fresh_head",
    "train_head",
    "random_features",
    "random_cache_entry",
    "load_features",
    "decode_all",
]

SIZE_VARIABLE = "TLCORE_BENCH_SIZE"
RANDOM_WEIGHTS = WeightsSpec("random", "random:seed0", seed=0)
DEVICE = torch.device("cpu")
SEED = 0

# Every strategy that trains a head on the frozen network's outputs (they can use the cache).
HEAD_STRATEGIES = tuple(s.name for s in STRATEGIES.values() if s.trained and s.cacheable)


@dataclass(frozen=True)
class ExtractCase:
    """Images a feature-extraction benchmark reads, and the size it extracts them at.

    Attributes:
        dataset: ``digits`` (the built-in dataset's 32x32 JPEG files) or ``photos`` (the
            500x375 photo folder).
        image_size: the network's input size in pixels.
    """

    dataset: str
    image_size: int

    def __str__(self) -> str:
        return f"{self.dataset}-{self.image_size}px"


# Each dataset at the sizes the tool extracts it at: the built-in digits at their default size,
# photographs at the study's sizes (its ``scale`` strategy goes down to 64 px).
DIGITS_32 = ExtractCase("digits", DEFAULTS["builtin"]["image_size"])
PHOTO_CASES = tuple(ExtractCase("photos", s) for s in DEFAULTS["folder"]["sizes"])


@dataclass(frozen=True)
class BenchSize:
    """How much work one benchmark does.

    Attributes:
        name: ``tiny``, ``small`` or ``full``.
        photos: JPEG files in the photo folder the loaders read.
        photo_size: the loaders' output size in pixels.
        extract_images: images per feature-extraction benchmark.
        extract_cases: the datasets and sizes extraction is timed at.
        batch_size: images per batch for loaders, extraction and training.
        study_rows: rows of the random train and val feature arrays.
        study_epochs: epochs of ``general`` on the random feature arrays.
        head_epochs: epochs of each head strategy on the built-in dataset (asv).
        check_targets: whether the speed targets are asserted; a smoke-test size runs too
            few batches for timings to mean anything, so it only checks results.
        full_epochs: epochs of ``full`` on the built-in dataset (asv).
    """

    name: str
    photos: int
    photo_size: int
    extract_images: int
    extract_cases: tuple[ExtractCase, ...]
    batch_size: int
    study_rows: tuple[int, int]
    study_epochs: int
    head_epochs: int
    full_epochs: int
    check_targets: bool = True


# The study's feature cache: 5,279 training and 2,000 validation images.
STUDY_ROWS = (5279, 2000)
SIZES = {
    "tiny": BenchSize("tiny", photos=16, photo_size=64, extract_images=16,
                      extract_cases=(DIGITS_32, PHOTO_CASES[0]),
                      batch_size=8, study_rows=(264, 100), study_epochs=2, head_epochs=2,
                      full_epochs=1, check_targets=False),
    "small": BenchSize("small", photos=256, photo_size=224, extract_images=256,
                       extract_cases=(DIGITS_32, PHOTO_CASES[0]), batch_size=32,
                       study_rows=(528, 200), study_epochs=20,
                       head_epochs=DEFAULTS["builtin"]["epochs"],
                       full_epochs=DEFAULTS["builtin"]["full_epochs"]),
    "full": BenchSize("full", photos=1000, photo_size=256, extract_images=256,
                      extract_cases=(DIGITS_32, *PHOTO_CASES), batch_size=32,
                      study_rows=STUDY_ROWS, study_epochs=200,
                      head_epochs=DEFAULTS["builtin"]["epochs"],
                      full_epochs=DEFAULTS["builtin"]["full_epochs"]),
}


def bench_size() -> BenchSize:
    """The size ``TLCORE_BENCH_SIZE`` selects (``small`` when it is unset)."""
    name = os.environ.get(SIZE_VARIABLE, "small") or "small"
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"{SIZE_VARIABLE}={name!r} is not a benchmark size; "
                         f"use one of: {', '.join(SIZES)}") from None


def random_vgg16() -> torch.nn.Module:
    """torchvision's VGG16 with seeded random weights, in eval mode on the CPU."""
    return build_vgg16(RANDOM_WEIGHTS).to(DEVICE).eval()


def photo_folder(root: str | os.PathLike, count: int, num_classes: int = 10) -> Split:
    """Write ``count`` seeded 500x375 colour JPEG files under ``root/train``; return the split.

    Each image is a smooth random colour field with fine noise, so that decoding and resizing
    cost what they cost on photographs; each class has its own hue.
    """
    root = Path(root)
    rng = np.random.default_rng(SEED)
    for i in range(count):
        label = i % num_classes
        folder = root / "train" / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, size=(6, 8, 3))
        coarse[..., label % 3] = 255 * (label + 1) / (num_classes + 1)
        field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((500, 375),
                                                                          Image.BICUBIC))
        noise = rng.normal(0, 12, size=field.shape)
        pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return photo_split(root)


def photo_split(root: str | os.PathLike) -> Split:
    """The ``train`` split of a folder written by :func:`photo_folder`."""
    root = Path(root).resolve()
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / "train" / name).glob("*.jpg")):
            files.append(path.relative_to(root).as_posix())
            labels.append(label)
    return Split("train", root, classes, tuple(files), tuple(labels))


def extraction_split(case: ExtractCase, photos_root: str | os.PathLike,
                     digits_cache: str | os.PathLike, count: int) -> Split:
    """The first ``count`` training images of the case's dataset."""
    if case.dataset == "photos":
        split = photo_split(photos_root)
    else:
        split = load_image_folder(builtin_dataset(digits_cache))["train"]
    return Split(split.name, split.root, split.classes, split.files[:count], split.labels[:count])


def digits_config(workdir: str | os.PathLike, variant: str = "all",
                  train: TrainConfig | None = None, root: str | os.PathLike | None = None,
                  ) -> RunConfig:
    """The train CLI's defaults on the built-in dataset, with random weights and the cache on.

    ``root`` reads a copy of the digits there instead (see :func:`wnid_digits`), with the same
    settings.
    """
    workdir = Path(workdir)
    return RunConfig(
        variant=variant, weights="random", device="cpu", out=str(workdir / "runs"),
        data=DataConfig(root=None if root is None else str(root)),
        train=train or TrainConfig(seed=SEED),
        cache=CacheConfig(enabled=True, directory=str(workdir / "cache")),
    )


def digits_session(workdir: str | os.PathLike, root: str | os.PathLike | None = None) -> Session:
    """A run session on the built-in dataset under ``workdir`` (written there on first use)."""
    return prepare(digits_config(workdir, root=root))


def wnid_digits(workdir: str | os.PathLike) -> Path:
    """The built-in digits copied under ``workdir``, each class folder named by an ImageNet wnid.

    Digit ``d`` becomes the wnid of the study's ``d``-th class, so that ``subset`` (the
    frozen network's logits of the classes) applies. Its accuracy there says nothing about
    transfer; what it measures is the strategy's cost, and the run's arithmetic can be checked.
    """
    workdir = Path(workdir).resolve()
    root = workdir / "digits-wnids"
    if root.exists():
        return root
    source = builtin_dataset(workdir / "cache")
    staging = Path(tempfile.mkdtemp(prefix=".digits-wnids-", dir=workdir))
    for split in SPLITS:
        for digit, index in enumerate(STUDY_CLASSES):
            shutil.copytree(source / split / str(digit), staging / split / wnids()[index])
    staging.rename(root)
    return root


def _preprocess(session: Session, strategy: Strategy, size: int) -> Preprocess:
    return Preprocess(size, gray=strategy.gray, resize_mode=session.config.data.resize_mode)


def _sizes(session: Session, strategy: Strategy) -> tuple[int, ...]:
    data = session.config.data
    return data.sizes if strategy.multi_size else (data.image_size,)


def warm_digits_cache(session: Session, names: tuple[str, ...] = HEAD_STRATEGIES) -> None:
    """Extract every cache entry these strategies read, so that later reads only load."""
    for name in names:
        strategy = STRATEGIES[name]
        for size in {*_sizes(session, strategy), session.config.data.image_size}:
            for split in session.splits.values():
                cached_source(session, split, _preprocess(session, strategy, size), "features")


def head_stages(session: Session, strategy: Strategy,
                ) -> list[tuple[TensorSource, TensorSource]]:
    """The (train, val) sources of each training stage of a head strategy, from the cache."""
    return [tuple(cached_source(session, session.splits[name], _preprocess(session, strategy, size),
                                strategy.head_input) for name in ("train", "val"))
            for size in _sizes(session, strategy)]


def fresh_head(session: Session, strategy: Strategy,
               stages: list[tuple[TensorSource, TensorSource]]) -> torch.nn.Module:
    """A seeded head, standardised on the pooled training inputs when the config asks."""
    cfg = session.config.train
    stats = None
    if cfg.standardize:
        stats = pooled_statistics([train for train, _ in stages], cfg.batch_size)
    torch.manual_seed(cfg.seed)
    return build_head(strategy, len(session.classes), session.imagenet_indices, stats)


def train_head(head: torch.nn.Module, stages, *, epochs: int, lr: float,
               batch_size: int = 32, momentum: float = 0.9, on_epoch=None) -> list[dict]:
    """Train ``head`` with SGD for ``epochs`` per stage, as the train CLI does; return history."""
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    history = []
    for stage, (train, val) in enumerate(stages):
        history += fit(head, optimizer, train, val, epochs=epochs, batch_size=batch_size,
                       seed=SEED + stage, device=DEVICE, on_epoch=on_epoch)
    return history


def fit_orders(rows: int, epochs: int) -> list[torch.Tensor]:
    """The batch orders of the first ``epochs`` epochs of ``fit`` seeded with ``SEED``."""
    generator = torch.Generator().manual_seed(SEED)
    return [torch.randperm(rows, generator=generator) for _ in range(epochs)]


def head_copy(head: torch.nn.Module,
              cfg: TrainConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A copy of ``head`` and a new SGD optimizer for it: every copy starts from one state."""
    module = copy.deepcopy(head)
    return module, torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def cached_trainer(head: torch.nn.Module, cfg: TrainConfig,
                   train: TensorSource) -> LinearHeadSGD:
    """The closed-form trainer ``fit`` makes on cached ``train``, for a copy of ``head``."""
    return LinearHeadSGD.create(*head_copy(head, cfg), train)


def random_features(rows: int, num_classes: int = 10, seed: int = SEED):
    """Seeded ``(features, logits, labels)`` shaped like a cache entry of ``rows`` images."""
    generator = torch.Generator().manual_seed(seed)
    # Penultimate VGG16 activations are post-ReLU: non-negative, many exact zeros.
    features = torch.randn(rows, FEATURE_DIM, generator=generator).clamp_min(0)
    logits = torch.randn(rows, IMAGENET_CLASSES, generator=generator)
    labels = torch.randint(0, num_classes, (rows,), generator=generator)
    return features, logits, labels


def random_cache_entry(directory: str | os.PathLike, split: str, rows: int,
                       batch_size: int = 256, seed: int = SEED) -> Path:
    """Write random arrays of ``rows`` images as a sound cache entry; return its path."""
    features, logits, labels = random_features(rows, seed=seed)
    key = CacheKey(weights=RANDOM_WEIGHTS.identity, split=split, data_root="random",
                   fingerprint=f"random-{rows}-{seed}", preprocess=Preprocess(32).to_dict(),
                   loader="none")

    def extract(path):
        batches = ((features[i:i + batch_size], logits[i:i + batch_size],
                    labels[i:i + batch_size]) for i in range(0, rows, batch_size))
        return write_entry(path, key, batches, num_images=rows,
                           paths=[f"{split}/{i:05d}" for i in range(rows)],
                           classes=[str(c) for c in range(10)])

    path, _ = FeatureCache(directory).get_or_create(key, extract)
    return path


def load_features(path: Path) -> TensorSource:
    """A cache entry's features as a training source."""
    entry = read_entry(path, arrays=["features"])
    return TensorSource(entry.features, entry.labels, DEVICE)


def decode_all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every batch of a loader, concatenated: images (N, 3, H, W) and labels (N,)."""
    images, labels = zip(*((x.clone(), y.clone()) for x, y in loader), strict=True)
    return torch.cat(images), torch.cat(labels)
