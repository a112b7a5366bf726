"""Reading and checking image folders, and the built-in dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_image_folder, write_image

from tlcore import TlcoreError
from tlcore.datasets import builtin_dataset, load_image_folder


def test_builtin_dataset_has_ten_classes_and_fixed_split_sizes(digits_root):
    splits = load_image_folder(digits_root)
    assert {name: len(s) for name, s in splits.items()} == {"train": 300, "val": 100, "test": 200}
    assert splits["train"].classes == tuple(str(d) for d in range(10))
    assert all(f.endswith(".jpg") for f in splits["test"].files)


def test_builtin_dataset_is_deterministic(digits_root, tmp_path):
    again = builtin_dataset(tmp_path)
    first = load_image_folder(digits_root)["val"]
    second = load_image_folder(again)["val"]
    assert first.files == second.files
    for rel in first.files[:20]:
        assert (digits_root / rel).read_bytes() == (again / rel).read_bytes()


def test_labels_follow_sorted_class_folders(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("zebra", "apple", "mango"))
    split = load_image_folder(root)["train"]
    assert split.classes == ("apple", "mango", "zebra")
    for rel, label in zip(split.files, split.labels, strict=True):
        assert rel.split("/")[1] == split.classes[label]


def test_common_formats_are_accepted(tmp_path):
    root = make_image_folder(tmp_path / "d")
    rng = np.random.default_rng(1)
    write_image(root / "train/red/upper.JPG", (200, 50, 40), rng, fmt="JPEG")
    write_image(root / "train/red/png.png", (200, 50, 40), rng)
    write_image(root / "train/red/gray.jpeg", (200, 50, 40), rng, mode="L")
    write_image(root / "train/red/cmyk.jpg", (200, 50, 40), rng, mode="CMYK")
    write_image(root / "train/red/alpha.png", (200, 50, 40), rng, mode="RGBA")
    (root / "train/red/notes.txt").write_text("not an image, not listed")
    files = load_image_folder(root)["train"].files
    for name in ("upper.JPG", "png.png", "gray.jpeg", "cmyk.jpg", "alpha.png"):
        assert f"train/red/{name}" in files
    assert "train/red/notes.txt" not in files


def _break(root, how):
    if how == "missing split":
        shutil.rmtree(root / "val")
    elif how == "class only in one split":
        shutil.copytree(root / "train/red", root / "train/violet")
    elif how == "empty class":
        for f in (root / "test/green").iterdir():
            f.unlink()
    elif how == "no images":
        for d in (root / "val").iterdir():
            shutil.rmtree(d)
            d.mkdir()
    elif how == "corrupt image":
        (root / "train/blue/000.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")


@pytest.mark.parametrize("how, expected", [
    ("missing split", "has no 'val' split"),
    ("class only in one split", "violet"),
    ("empty class", "test/green has no images"),
    ("no images", "has no images"),
    ("corrupt image", "000.jpg cannot be read"),
])
def test_bad_layouts_name_the_problem(tiny_root, how, expected):
    _break(tiny_root, how)
    with pytest.raises(TlcoreError, match=expected):
        load_image_folder(tiny_root)


def test_missing_root_is_reported(tmp_path):
    with pytest.raises(TlcoreError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder, whatever its mode")
def test_unreadable_root_is_reported(tiny_root):
    tiny_root.chmod(0)
    try:
        with pytest.raises(TlcoreError, match="not readable"):
            load_image_folder(tiny_root)
    finally:
        tiny_root.chmod(0o755)


def test_cli_reports_a_bad_folder_in_one_line_and_exits_nonzero(tiny_root, tmp_path):
    _break(tiny_root, "class only in one split")
    proc = subprocess.run(
        [sys.executable, "-m", "tlcore.train", "--data", str(tiny_root), "--weights", "random",
         "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("error: ")
    assert "violet" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
