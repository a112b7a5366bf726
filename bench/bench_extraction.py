"""Timing tests of feature extraction: images -> frozen VGG16 -> cache entry.

Extraction is compared with the bare forward pass of the same network over the same images
already decoded into tensors, batch for batch: the input pipeline and the cache writes should
cost little beside the network. Each dataset is timed at the sizes the tool extracts it at.

Each round times the forward pass and then an extraction, back to back, so that both see the
machine in the same state; the figure is the median over rounds of each round's ratio. The
shared machines these run on drift both ways (a round of the same work can run 10 % faster or
slower than the next), so the best round of each alone would pair a lucky forward pass with a
typical extraction, or the other way round.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from bench.common import DEVICE, RANDOM_WEIGHTS, bench_size, decode_all, extraction_split
from tlcore.cache import CacheKey, read_entry, verify_entry
from tlcore.inputs import Preprocess, create_loader
from tlcore.models import split_vgg16
from tlcore.runs import extract_entry

ROUNDS = 7
MIN_SPEED_VS_FORWARD = 0.9


@torch.inference_mode()
def _forward(trunk, last, batches) -> None:
    for images, _ in batches:
        last(trunk(images))  # (N, 3, H, W) -> (N, 4096) -> (N, 1000)


def _extract(split, preprocess, batch_size, trunk, last, key, path):
    return extract_entry(path, key, split, preprocess, trunk, last, batch_size=batch_size,
                         device=DEVICE, backend="dali")


@pytest.mark.parametrize("case", bench_size().extract_cases, ids=str)
def test_extraction(benchmark, tmp_path, photos, digits_cache, size, vgg, case):
    split = extraction_split(case, photos.root, digits_cache, size.extract_images)
    preprocess = Preprocess(case.image_size)
    trunk, last = split_vgg16(vgg)
    key = CacheKey(weights=RANDOM_WEIGHTS.identity, split=split.name, data_root=str(split.root),
                   fingerprint=split.fingerprint(), preprocess=preprocess.to_dict(), loader="dali")

    # The bare forward pass: the same images, decoded beforehand, in the same batches. It is
    # timed just before each extraction round, so that both see the machine in the same state.
    images, labels = decode_all(create_loader(split, preprocess, size.batch_size))
    batches = list(zip(images.split(size.batch_size), labels.split(size.batch_size), strict=True))
    with torch.inference_mode():
        expected = torch.cat([trunk(x) for x, _ in batches])
    forward_seconds = []
    paths = iter(tmp_path / f"entry-{i}.h5" for i in range(ROUNDS))

    def time_forward_then_set_up():
        start = time.perf_counter()
        _forward(trunk, last, batches)
        forward_seconds.append(time.perf_counter() - start)
        return (split, preprocess, size.batch_size, trunk, last, key, next(paths)), {}

    info = benchmark.pedantic(_extract, setup=time_forward_then_set_up, rounds=ROUNDS,
                              iterations=1)

    path = tmp_path / f"entry-{ROUNDS - 1}.h5"
    entry = read_entry(path)
    extract_seconds = list(benchmark.stats.stats.data)  # in round order
    speed = statistics.median(f / e for f, e in zip(forward_seconds, extract_seconds,
                                                      strict=True))
    benchmark.extra_info.update({
        "dataset": case.dataset, "images": len(split), "image_size": case.image_size,
        "images_per_s": len(split) / statistics.median(extract_seconds),
        "forward_images_per_s": len(split) / statistics.median(forward_seconds),
        "speed_vs_forward": speed,
        "speed_vs_forward_best_rounds": min(forward_seconds) / min(extract_seconds),
        "bytes_per_image": path.stat().st_size / len(split),
        "forward_seconds": forward_seconds, "extract_seconds": extract_seconds,
    })
    assert verify_entry(path, key) is None
    assert info["images_per_s"] > 0
    assert entry.labels.tolist() == list(split.labels)
    torch.testing.assert_close(entry.features, expected, rtol=1e-4, atol=1e-5)
    assert not size.check_targets or speed >= MIN_SPEED_VS_FORWARD, (
        f"extraction runs at {speed:.2f}x the bare forward pass; at least "
        f"{MIN_SPEED_VS_FORWARD}x expected")
