"""The DALI pipeline and the torchvision reference loader agree, and see each image once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image

from tlcore import TlcoreError
from tlcore.datasets import load_image_folder
from tlcore.inputs import Preprocess, create_loader


def _collect(loader):
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
@pytest.mark.parametrize("resize_mode", ["stretch", "crop"])
def test_dali_matches_torchvision_reference(tiny_root, gray, resize_mode):
    split = load_image_folder(tiny_root)["train"]
    preprocess = Preprocess(48, gray=gray, resize_mode=resize_mode)
    dali_x, dali_y = _collect(create_loader(split, preprocess, 5, backend="dali"))
    ref_x, ref_y = _collect(create_loader(split, preprocess, 5, backend="torchvision"))

    assert dali_x.shape == ref_x.shape == (len(split), 3, 48, 48)
    assert dali_x.dtype == torch.float32
    assert dali_y.tolist() == ref_y.tolist() == list(split.labels)
    # Interpolation, crop rounding and luma weights differ slightly: one grey level is about
    # 0.017 in normalised units; allow ~2 levels on average and ~9 at the 99th percentile.
    assert (dali_x - ref_x).abs().mean() < 0.03
    assert (dali_x - ref_x).abs().quantile(0.99) < 0.15


def test_gray_images_have_three_equal_channels(tiny_root):
    split = load_image_folder(tiny_root)["val"]
    images, _ = _collect(create_loader(split, Preprocess(32, gray=True, mean=(0.5,) * 3,
                                                         std=(0.25,) * 3), 4))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_every_image_once_with_a_partial_last_batch(tiny_root, backend):
    split = load_image_folder(tiny_root)["train"]  # 18 images
    batches = list(create_loader(split, Preprocess(32), 4, backend=backend))
    assert [len(y) for _, y in batches] == [4, 4, 4, 4, 2]
    # A second pass over the same loader yields the same images again, once each.
    loader = create_loader(split, Preprocess(32), 4, backend=backend)
    first, second = _collect(loader), _collect(loader)
    assert torch.equal(first[1], second[1]) and torch.allclose(first[0], second[0])


def test_order_reorders_images_and_labels(tiny_root):
    split = load_image_folder(tiny_root)["test"]
    order = np.random.default_rng(0).permutation(len(split))
    base_x, base_y = _collect(create_loader(split, Preprocess(32), 4))
    perm_x, perm_y = _collect(create_loader(split, Preprocess(32), 4, order=order))
    assert perm_y.tolist() == [split.labels[i] for i in order]
    assert torch.allclose(perm_x, base_x[torch.as_tensor(order)])


def test_grayscale_cmyk_and_png_decode_like_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        write_image(tmp_path / split / "a" / "cmyk.jpg", (200, 50, 40), rng, mode="CMYK")
        write_image(tmp_path / split / "a" / "gray.JPG", (200, 50, 40), rng, mode="L",
                    fmt="JPEG")
        write_image(tmp_path / split / "a" / "rgba.png", (200, 50, 40), rng, mode="RGBA")
    split = load_image_folder(tmp_path)["train"]
    images, _ = _collect(create_loader(split, Preprocess(32), 8))
    ref, _ = _collect(create_loader(split, Preprocess(32), 8, backend="torchvision"))
    assert images.shape == (3, 3, 32, 32)
    assert (images - ref).abs().mean() < 0.1


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 16}, "too small"),
    ({"image_size": 64, "resize_mode": "squash"}, "unknown resize mode"),
])
def test_bad_preprocess_settings_are_rejected(kwargs, message):
    with pytest.raises(TlcoreError, match=message):
        Preprocess(**kwargs)


def test_unknown_loader_is_rejected(tiny_root):
    split = load_image_folder(tiny_root)["test"]
    with pytest.raises(TlcoreError, match="unknown loader 'pil'"):
        create_loader(split, Preprocess(32), 4, backend="pil")
