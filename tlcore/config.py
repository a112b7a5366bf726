"""Run configuration: one dataclass per concern, built once by the CLI, saved beside results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

__all__ = ["DataConfig", "TrainConfig", "CacheConfig", "RunConfig", "DEFAULTS"]

# Defaults that depend on the data. Real image folders follow the original study's settings;
# the built-in digits are small images that must run in minutes on two CPU cores.
DEFAULTS = {
    "builtin": {"image_size": 32, "sizes": (64, 48, 32), "epochs": 30, "full_epochs": 2,
                "lr": 1e-3, "standardize": True, "backbone_lr_scale": 0.01},
    "folder": {"image_size": 256, "sizes": (64, 128, 256, 512), "epochs": 50, "full_epochs": 10,
               "lr": 1e-4, "standardize": False, "backbone_lr_scale": 1.0},
}


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are read.

    Attributes:
        root: the dataset folder; ``None`` means the built-in dataset.
        resize_mode: ``stretch`` or ``crop``.
        loader: ``dali`` or ``torchvision``.
        image_size: pixels for training (all but ``scale``) and for every test evaluation.
        sizes: the training sizes of ``scale``, in order.
        classes: ImageNet indices; when set, ``root`` is an ImageNet-layout folder and seeded
            splits of these classes are drawn from it.
        per_class: train, val and test images per class drawn for ``classes``.
        split_seed: seeds that draw.
    """

    root: str | None = None
    resize_mode: str = "stretch"
    loader: str = "dali"
    image_size: int = DEFAULTS["builtin"]["image_size"]
    sizes: tuple[int, ...] = DEFAULTS["builtin"]["sizes"]
    classes: tuple[int, ...] | None = None
    per_class: tuple[int, int, int] = (800, 200, 400)
    split_seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """How heads and networks are trained.

    Attributes:
        epochs: epochs for head strategies (per size, for ``scale``).
        full_epochs: epochs for ``full``, which streams every image through every layer.
        batch_size: images per step, and per batch in evaluation.
        lr: SGD learning rate.
        momentum: SGD momentum.
        seed: seeds the head's initialisation, batch order and random weights.
        standardize: put a fixed standardisation (training-split mean and std) before the new
            layer; it folds into the saved layer. A standardised head cannot absorb dropout
            noise, so ``full`` then trains with the classifier's dropout off.
        backbone_lr_scale: the backbone's learning rate for ``full``, as a fraction of ``lr``.
    """

    epochs: int = DEFAULTS["builtin"]["epochs"]
    full_epochs: int = DEFAULTS["builtin"]["full_epochs"]
    batch_size: int = 32
    lr: float = DEFAULTS["builtin"]["lr"]
    momentum: float = 0.9
    seed: int = 0
    standardize: bool = DEFAULTS["builtin"]["standardize"]
    backbone_lr_scale: float = DEFAULTS["builtin"]["backbone_lr_scale"]


@dataclass(frozen=True)
class CacheConfig:
    """The feature cache.

    Attributes:
        enabled: read head strategies' inputs from the cache, extracting them when missing.
        directory: where cache entries (and the built-in dataset) live.
        dtype: on-disk dtype of cached arrays, ``float32`` or ``float16``.
    """

    enabled: bool = False
    directory: str = "cache"
    dtype: str = "float32"


@dataclass(frozen=True)
class RunConfig:
    """Everything one invocation of ``python -m tlcore.train`` needs.

    Attributes:
        variant: a strategy name, or ``all``.
        weights: ``auto``, ``imagenet``, ``random`` or a state-dict path.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        out: the output folder holding run folders and ``results.csv``.
    """

    variant: str = "linear"
    weights: str = "auto"
    device: str = "auto"
    out: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Rebuild a config saved by :meth:`to_dict` (unknown keys are ignored)."""
        def build(kind, values):
            names = {f.name for f in fields(kind)}
            return kind(**{k: (tuple(v) if isinstance(v, list) else v)
                           for k, v in values.items() if k in names})

        top = {k: v for k, v in data.items() if k not in ("data", "train", "cache")}
        return build(cls, {**top, "data": build(DataConfig, data.get("data", {})),
                           "train": build(TrainConfig, data.get("train", {})),
                           "cache": build(CacheConfig, data.get("cache", {}))})
