"""asv: the input pipelines, DALI beside the torchvision reference loader on the same files."""

from __future__ import annotations

import os
import time

import torch

from bench.common import bench_size, photo_folder, photo_split
from tlcore.inputs import LOADERS, Preprocess, create_loader, dali_available


def write_photos() -> str:
    """Write the photo folder into asv's working directory; return its path."""
    root = os.path.abspath("photos")
    photo_folder(root, bench_size().photos)
    return root


class _PhotoFolder:
    """Base of the benchmarks that read the photo folder: they share one ``setup_cache``."""

    def setup_cache(self):
        return write_photos()


def _read_all(loader) -> int:
    return sum(len(labels) for _, labels in loader)


class Loaders(_PhotoFolder):
    """One pass over a folder of photo-sized JPEG files: decode, resize, gray, normalise."""

    params = (list(LOADERS), [False, True])
    param_names = ("loader", "gray")
    timeout = 300

    def setup(self, root, backend, gray):
        if backend == "dali" and not dali_available():
            raise NotImplementedError("NVIDIA DALI is not installed")
        self.split = photo_split(root)
        self.preprocess = Preprocess(bench_size().photo_size, gray=gray)
        self.batch_size = bench_size().batch_size

    def _pass(self, backend) -> int:
        return _read_all(create_loader(self.split, self.preprocess, self.batch_size,
                                       backend=backend))

    def time_pass(self, root, backend, gray):
        self._pass(backend)

    def track_images_per_s(self, root, backend, gray):
        start = time.perf_counter()
        count = self._pass(backend)
        return count / (time.perf_counter() - start)

    track_images_per_s.unit = "images/s"


class LoadersGpu(_PhotoFolder):
    """The DALI pipeline with decoding on the GPU (nvJPEG), where there is one."""

    params = [False, True]
    param_names = ["gray"]
    timeout = 300

    def setup(self, root, gray):
        if not torch.cuda.is_available():
            raise NotImplementedError("no CUDA device")
        if not dali_available():
            raise NotImplementedError("NVIDIA DALI is not installed")
        self.split = photo_split(root)
        self.preprocess = Preprocess(bench_size().photo_size, gray=gray)
        self.batch_size = bench_size().batch_size

    def time_pass(self, root, gray):
        loader = create_loader(self.split, self.preprocess, self.batch_size, device="cuda",
                               backend="dali")
        _read_all(loader)
        torch.cuda.synchronize()
