"""asv: feature extraction (images -> frozen VGG16 -> cache entry), each dataset at its sizes."""

from __future__ import annotations

import os
import time

import torch

from bench.asv_inputs import write_photos
from bench.common import (
    DEVICE,
    RANDOM_WEIGHTS,
    bench_size,
    decode_all,
    extraction_split,
    random_vgg16,
)
from tlcore.cache import CacheKey
from tlcore.datasets import builtin_dataset
from tlcore.inputs import Preprocess, create_loader
from tlcore.models import split_vgg16
from tlcore.runs import extract_entry

CASES = {str(case): case for case in bench_size().extract_cases}


class Extraction:
    """Extraction of a dataset's first images, beside the bare forward pass."""

    params = list(CASES)
    param_names = ["case"]
    timeout = 900
    number = 1
    repeat = (1, 3, 60.0)

    def setup_cache(self):
        """Write the photo folder and the built-in dataset into asv's working directory."""
        digits_cache = os.path.abspath("digits-cache")
        builtin_dataset(digits_cache)
        return {"photos": write_photos(), "digits": digits_cache}

    def setup(self, roots, case):
        size = bench_size()
        case = CASES[case]
        self.split = extraction_split(case, roots["photos"], roots["digits"], size.extract_images)
        self.preprocess = Preprocess(case.image_size)
        self.batch_size = size.batch_size
        self.trunk, self.last = split_vgg16(random_vgg16())
        self.key = CacheKey(weights=RANDOM_WEIGHTS.identity, split="train",
                            data_root=str(self.split.root), fingerprint=self.split.fingerprint(),
                            preprocess=self.preprocess.to_dict(), loader="dali")
        self.path = f"extract-{case}.h5"
        images, labels = decode_all(create_loader(self.split, self.preprocess, self.batch_size))
        self.batches = list(zip(images.split(self.batch_size), labels.split(self.batch_size),
                                strict=True))

    def teardown(self, roots, case):
        if os.path.exists(self.path):
            os.remove(self.path)

    def _extract(self):
        return extract_entry(self.path, self.key, self.split, self.preprocess, self.trunk,
                             self.last, batch_size=self.batch_size, device=DEVICE, backend="dali")

    @torch.inference_mode()
    def _forward(self):
        for images, _ in self.batches:
            self.last(self.trunk(images))  # (N, 3, H, W) -> (N, 4096) -> (N, 1000)

    def time_extract(self, roots, case):
        self._extract()

    def time_forward(self, roots, case):
        self._forward()

    def peakmem_setup_only(self, roots, case):
        pass

    def peakmem_extract(self, roots, case):
        self._extract()

    def track_images_per_s(self, roots, case):
        return len(self.split) / self._extract()["seconds"]

    track_images_per_s.unit = "images/s"

    def track_speed_vs_forward(self, roots, case):
        start = time.perf_counter()
        self._forward()
        forward_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self._extract()
        return forward_seconds / (time.perf_counter() - start)

    track_speed_vs_forward.unit = "ratio"
