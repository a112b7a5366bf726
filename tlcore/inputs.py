"""Input pipelines: NVIDIA DALI, and a torchvision reference loader with the same transforms.

Both turn a :class:`~tlcore.datasets.Split` into batches of ``(images, labels)``: images are
NCHW float32 tensors, resized, optionally grayscale (luma replicated to three channels) and
normalised; labels are int64. Every image is yielded exactly once per pass, in the order given,
with a smaller last batch where the split does not divide evenly.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
from PIL import Image

from tlcore import TlcoreError
from tlcore.datasets import Split

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "LOADERS",
    "Preprocess",
    "dali_available",
    "create_loader",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("stretch", "crop")
LOADERS = ("dali", "torchvision")
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
MIN_IMAGE_SIZE = 32  # VGG16 halves the image five times


@dataclass(frozen=True)
class Preprocess:
    """Everything the input pipeline does to an image before VGG16 sees it.

    Attributes:
        image_size: output height and width in pixels.
        gray: convert to grayscale (luma), replicated to three channels.
        resize_mode: ``stretch`` resizes to a square ignoring aspect; ``crop`` resizes the
            shorter side and takes the centre square.
        mean: per-channel mean, on the 0-1 scale.
        std: per-channel standard deviation, on the 0-1 scale.
        contrast: scales each pixel's distance from the image's mean luminance (ITU-R 601
            luma of the resized image, computed as torchvision's ``adjust_contrast`` does):
            ``pixel' = mean + contrast * (pixel - mean)``, clipped to the 0-255 range. 1.0
            leaves the image unchanged; below 1 lowers the contrast.
    """

    image_size: int
    gray: bool = False
    resize_mode: str = "stretch"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    contrast: float = 1.0

    def __post_init__(self):
        if self.image_size < MIN_IMAGE_SIZE:
            raise TlcoreError(f"image size {self.image_size} is too small for VGG16; "
                              f"use {MIN_IMAGE_SIZE} pixels or more")
        if self.resize_mode not in RESIZE_MODES:
            raise TlcoreError(f"unknown resize mode {self.resize_mode!r}; "
                              f"choose one of: {', '.join(RESIZE_MODES)}")
        if not (math.isfinite(self.contrast) and self.contrast > 0):
            raise TlcoreError(f"contrast {self.contrast} is out of range; pass a factor above 0 "
                              "(1.0 leaves images unchanged, 0.5 halves the contrast)")

    def to_dict(self) -> dict:
        """The settings as a dict (the feature cache's key); contrast only when it is not 1."""
        values = asdict(self)
        if self.contrast == 1.0:
            # Unchanged images keep the cache entries written before contrast was a setting.
            del values["contrast"]
        return values


def dali_available() -> bool:
    """Whether NVIDIA DALI and its PyTorch plugin can be imported here."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def create_loader(split: Split, preprocess: Preprocess, batch_size: int, *,
                  device: torch.device | str = "cpu", backend: str = "dali",
                  order: Sequence[int] | None = None, num_threads: int | None = None):
    """Build a loader that yields ``(images, labels)`` batches of ``split``.

    Args:
        split: the images to read.
        preprocess: resize, grayscale and normalisation settings.
        batch_size: images per batch; the last batch may be smaller.
        device: where the batches land; with DALI on ``cuda``, decoding runs on the GPU.
        backend: ``dali`` or ``torchvision``.
        order: indices into ``split`` giving the order to read the images in (default: split
            order). Training passes a fresh permutation each epoch.
        num_threads: decoding threads (default: up to 4, bounded by the CPU count).
    """
    if backend not in LOADERS:
        raise TlcoreError(f"unknown loader {backend!r}; choose one of: {', '.join(LOADERS)}")
    order = list(range(len(split))) if order is None else [int(i) for i in order]
    files = [str(split.root / split.files[i]) for i in order]
    labels = [split.labels[i] for i in order]
    threads = num_threads or max(1, min(4, os.cpu_count() or 1))
    device = torch.device(device)
    if backend == "dali":
        return DaliLoader(files, labels, preprocess, batch_size, device, threads)
    return TorchvisionLoader(files, labels, preprocess, batch_size, device, threads)


class DaliLoader:
    """Batches from a DALI pipeline: file reader, decode, resize, gray, normalise."""

    def __init__(self, files: list[str], labels: list[int], preprocess: Preprocess,
                 batch_size: int, device: torch.device, num_threads: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.num_images = len(files)
        self.batch_size = batch_size
        on_gpu = device.type == "cuda"
        pipe = _dali_pipeline(
            files=files, labels=labels, preprocess=preprocess, on_gpu=on_gpu,
            batch_size=batch_size, num_threads=num_threads,
            device_id=(device.index or 0) if on_gpu else None,
        )
        pipe.build()
        # PARTIAL trims the reader's padding from the last batch: each image is seen once.
        self._iterator = DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="reader", auto_reset=True,
            last_batch_policy=LastBatchPolicy.PARTIAL,
        )

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._iterator:
            yield batch[0]["images"], batch[0]["labels"].view(-1).long()


def _dali_pipeline(*, files, labels, preprocess, on_gpu, batch_size, num_threads, device_id):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dali_math

    # On the GPU, the pipeline decodes the next batches while the network works. Without one,
    # it runs when asked, with every core; the overlap comes from the network running batches
    # in worker threads meanwhile (engine.batches_in_flight).
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  exec_async=on_gpu, exec_pipelined=on_gpu, prefetch_queue_depth=2 if on_gpu else 1)
    def pipeline():
        encoded, label = fn.readers.file(
            files=files, labels=labels, random_shuffle=False, pad_last_batch=True,
            name="reader",
        )
        color = types.GRAY if preprocess.gray else types.RGB
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu",
                                   output_type=color)
        size = preprocess.image_size
        if preprocess.resize_mode == "stretch":
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
            crop = {}
        else:
            images = fn.resize(images, resize_shorter=size, antialias=True)
            crop = {"crop": (size, size)}
        if preprocess.contrast != 1.0:
            # The mean luminance is that of the final square, so crop first.
            if crop:
                images, crop = fn.crop(images, **crop), {}
            images = fn.cast(images, dtype=types.FLOAT)
            if preprocess.gray:
                center = fn.reductions.mean(images)
            else:
                means = fn.reductions.mean(images, axes=[0, 1])  # (H, W, 3) -> (3,)
                center = LUMA[0] * means[0] + LUMA[1] * means[1] + LUMA[2] * means[2]
            images = dali_math.clamp(center + preprocess.contrast * (images - center),
                                     0.0, 255.0)
        if preprocess.gray:
            images = fn.cat(images, images, images, axis=2)
        images = fn.crop_mirror_normalize(
            images, **crop, dtype=types.FLOAT, output_layout="CHW",
            mean=[255.0 * m for m in preprocess.mean], std=[255.0 * s for s in preprocess.std],
        )
        if on_gpu:
            label = label.gpu()
        return images, label

    return pipeline()


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, files, labels, transform, gray):
        self.files, self.labels, self.transform, self.gray = files, labels, transform, gray

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            img = img.convert("L").convert("RGB") if self.gray else img.convert("RGB")
        return self.transform(img), self.labels[i]


class TorchvisionLoader:
    """Batches from torchvision transforms and a DataLoader: the reference for DALI."""

    def __init__(self, files: list[str], labels: list[int], preprocess: Preprocess,
                 batch_size: int, device: torch.device, num_workers: int):
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        size = preprocess.image_size
        if preprocess.resize_mode == "stretch":
            resize = [T.Resize((size, size), antialias=True)]
        else:
            resize = [T.Resize(size, antialias=True), T.CenterCrop(size)]
        contrast = []
        if preprocess.contrast != 1.0:
            contrast = [T.Lambda(partial(TF.adjust_contrast, contrast_factor=preprocess.contrast))]
        transform = T.Compose([*resize, T.ToTensor(), *contrast,
                               T.Normalize(preprocess.mean, preprocess.std)])
        self.device = device
        self.num_images = len(files)
        self._loader = torch.utils.data.DataLoader(
            _ImageList(files, labels, transform, preprocess.gray),
            batch_size=batch_size, shuffle=False, drop_last=False,
            num_workers=min(num_workers, 2), persistent_workers=False,
            pin_memory=device.type == "cuda",
        )

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True).long())
