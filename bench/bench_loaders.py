"""Timing tests of the input pipelines: DALI beside the torchvision reference, on the same files."""

from __future__ import annotations

import time

import pytest
import torch

from bench.common import decode_all
from tlcore.inputs import LOADERS, Preprocess, create_loader

# JPEG decoders and resize filters differ slightly between DALI and PIL. Mean absolute
# differences beyond these (in normalised units; 0.02 is about 1.2 grey levels of 255) mean the
# two pipelines disagree about the image, not about interpolation.
MEAN_ABS_TOLERANCE = 0.02
PIXEL_TOLERANCE = 0.5  # no single value further apart than about 30 grey levels
ROUNDS = 3


def _pass(split, preprocess, batch_size, backend):
    return decode_all(create_loader(split, preprocess, batch_size, backend=backend))


@pytest.fixture(scope="module")
def reference(photos, size):
    """A loader's output and best time over a few passes, for (backend, gray), run on demand."""
    done = {}

    def run(backend, gray):
        if (backend, gray) not in done:
            preprocess = Preprocess(size.photo_size, gray=gray)
            seconds = []
            for _ in range(ROUNDS):
                start = time.perf_counter()
                images, labels = _pass(photos, preprocess, size.batch_size, backend)
                seconds.append(time.perf_counter() - start)
            done[backend, gray] = images, labels, min(seconds)
        return done[backend, gray]

    return run


@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
@pytest.mark.parametrize("backend", LOADERS)
def test_loader_pass(benchmark, photos, size, reference, backend, gray):
    preprocess = Preprocess(size.photo_size, gray=gray)
    other = next(b for b in LOADERS if b != backend)

    other_images, other_labels, other_seconds = reference(other, gray)

    images, labels = benchmark.pedantic(_pass, (photos, preprocess, size.batch_size, backend),
                                        rounds=ROUNDS)

    seconds = benchmark.stats.stats.min
    diff = (images - other_images).abs()
    benchmark.extra_info.update({
        "images": len(labels), "image_size": size.photo_size,
        "images_per_s": len(labels) / seconds,
        f"speed_vs_{other}": other_seconds / seconds,
        f"mean_abs_diff_vs_{other}": diff.mean().item(),
    })
    assert images.shape == (len(photos), 3, size.photo_size, size.photo_size)
    assert labels.tolist() == list(photos.labels) == other_labels.tolist()
    assert diff.mean().item() < MEAN_ABS_TOLERANCE
    assert diff.max().item() < PIXEL_TOLERANCE
    # Undo the normalisation: a gray image has the same value in its three channels.
    pixels = images * torch.tensor(preprocess.std).view(1, 3, 1, 1) + torch.tensor(
        preprocess.mean).view(1, 3, 1, 1)
    channels_equal = torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(
        pixels[:, 0], pixels[:, 2], atol=1e-5)
    assert channels_equal == gray
