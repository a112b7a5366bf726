"""asv: writing and reading one cache entry (HDF5), and its size on disk."""

from __future__ import annotations

import os

from bench.common import RANDOM_WEIGHTS, bench_size, random_features
from tlcore.cache import DTYPES, CacheKey, read_entry, write_entry
from tlcore.inputs import Preprocess


class CacheEntry:
    """A cache entry of random features as big as the benchmark size's training split."""

    params = list(DTYPES)
    param_names = ["dtype"]
    timeout = 300

    def setup(self, dtype):
        self.rows = bench_size().study_rows[0]
        features, logits, labels = random_features(self.rows)
        step = bench_size().batch_size
        self.batches = [(features[i:i + step], logits[i:i + step], labels[i:i + step])
                        for i in range(0, self.rows, step)]
        self.key = CacheKey(weights=RANDOM_WEIGHTS.identity, split="train", data_root="random",
                            fingerprint=f"random-{self.rows}", preprocess=Preprocess(32).to_dict(),
                            loader="none", dtype=dtype)
        self.paths = [f"{i:05d}" for i in range(self.rows)]
        self.written, self.read = f"write-{dtype}.h5", f"read-{dtype}.h5"
        self._write(self.read)

    def teardown(self, dtype):
        for path in (self.written, self.read):
            if os.path.exists(path):
                os.remove(path)

    def _write(self, path):
        return write_entry(path, self.key, iter(self.batches), num_images=self.rows,
                           paths=self.paths, classes=[str(c) for c in range(10)])

    def time_write(self, dtype):
        self._write(self.written)

    def time_read(self, dtype):
        read_entry(self.read)

    def track_bytes_per_image(self, dtype):
        return os.path.getsize(self.read) / self.rows

    track_bytes_per_image.unit = "bytes"
