"""The train command line end to end: results table, run folders, ImageNet folders, errors."""

from __future__ import annotations

import csv
import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import HUES, make_image_folder, write_image

from tlcore import TlcoreError
from tlcore.datasets import load_image_folder
from tlcore.imagenet import STUDY_CLASSES, imagenet_splits, parse_classes, wnids
from tlcore.results import RESULT_COLUMNS
from tlcore.train import main

FAST = ["--weights", "random", "--epochs", "2", "--full-epochs", "1", "--image-size", "32",
        "--sizes", "32", "--quiet"]


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_runs_append_rows_and_leave_a_complete_run_folder(tiny_root, tmp_path, capsys, caplog):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["--data", str(tiny_root), "--out", str(out), "--cache-dir", str(cache), *FAST]
    caplog.set_level(logging.INFO, logger="tlcore.runs")
    assert main(["--variant", "general", "--use-cache", *args]) == 0
    first = _rows(out)
    assert len(first) == 1 and first[0]["variant"] == "general"
    assert "general   cache" in capsys.readouterr().out
    cached_log = (out / first[0]["run_id"] / "log.jsonl").read_text().splitlines()
    assert all(json.loads(line)["frozen_pass_seconds"] > 0 for line in cached_log)
    # Each cached epoch's line shows its time beside that of the frozen pass it saves.
    epoch_lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(epoch_lines) == 2
    assert all("frozen pass alone would take" in line for line in epoch_lines)

    assert main(["--variant", "linear", *args]) == 0
    rows = _rows(out)
    assert len(rows) == 2 and rows[0] == first[0]
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert rows[1]["variant"] == "linear" and rows[1]["source"] == "stream"
    assert rows[1]["weights"] == "random:seed0" and rows[1]["git_commit"]

    run_dir = tmp_path / "runs" / rows[1]["run_id"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["variant"] == "linear" and config["weights_resolved"] == "random:seed0"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_seconds"} <= set(
        log[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert np.array(metrics["confusion"]).sum() == 9  # every test image once
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["images_per_s"] > 0
    assert (run_dir / "weights.pt").stat().st_size > 0


def test_an_existing_results_table_keeps_its_header(tiny_root, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "results.csv").write_text("run_id,variant,test_accuracy\nold,general,0.5\n")
    assert main(["--data", str(tiny_root), "--out", str(out), "--cache-dir",
                 str(tmp_path / "c"), "--use-cache", *FAST]) == 0
    rows = _rows(out)
    assert rows[0] == {"run_id": "old", "variant": "general", "test_accuracy": "0.5"}
    assert rows[1]["variant"] == "linear" and float(rows[1]["test_accuracy"]) >= 0


def test_builtin_dataset_every_strategy_beats_chance(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["--variant", "all", "--use-cache", "--weights", "random", "--quiet",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    rows = {r["variant"]: r for r in _rows(out)}
    assert set(rows) == {"general", "linear", "gray", "scale", "full"}  # subset needs wnids
    for name, row in rows.items():
        assert float(row["test_accuracy"]) >= 0.3, name  # 3x chance for 10 classes
    assert rows["scale"]["train_sizes"] == "64 48 32"
    assert rows["full"]["source"] == "stream" and rows["general"]["source"] == "cache"
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows)


def test_subset_on_digits_is_refused_in_one_line(tmp_path, capsys):
    code = main(["--variant", "subset", "--weights", "random", "--quiet",
                 "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: strategy 'subset' needs class folders named by ImageNet wnid")
    assert "\n" not in err


def _imagenet_folder(root, indices, per_class, train_subdir=False):
    rng = np.random.default_rng(0)
    colours = list(HUES.values())
    for n, index in enumerate(indices):
        folder = root / ("train" if train_subdir else "") / wnids()[index]
        for i in range(per_class):
            write_image(folder / f"{wnids()[index]}_{i}.JPEG", colours[n % 3], rng)
    return root


def test_imagenet_folder_with_classes_draws_seeded_splits_without_copying(tmp_path):
    indices = [945, 513, 886]
    root = _imagenet_folder(tmp_path / "ilsvrc", indices, per_class=9, train_subdir=True)
    before = sorted(p for p in root.rglob("*") if p.is_file())
    splits = imagenet_splits(root, indices, per_class=(4, 2, 3), seed=0)
    again = imagenet_splits(root, indices, per_class=(4, 2, 3), seed=0)
    other = imagenet_splits(root, indices, per_class=(4, 2, 3), seed=1)

    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "val": 6, "test": 9}
    assert splits["train"].files == again["train"].files != other["train"].files
    assert splits["train"].classes == tuple(sorted(wnids()[i] for i in indices))
    used = [set(s.files) for s in splits.values()]
    assert not (used[0] & used[1] or used[0] & used[2] or used[1] & used[2])
    assert sorted(p for p in root.rglob("*") if p.is_file()) == before

    with pytest.raises(TlcoreError, match="has 9 images .* 10 needed"):
        imagenet_splits(root, indices, per_class=(5, 2, 3))
    with pytest.raises(TlcoreError, match="no folder"):
        imagenet_splits(root, [0, 1])


def test_parse_classes():
    assert parse_classes("study") == list(STUDY_CLASSES)
    assert parse_classes("945, n03110669") == [945, 513]
    with pytest.raises(TlcoreError, match="'bellpepper' is neither"):
        parse_classes("945,bellpepper")
    with pytest.raises(TlcoreError, match="at least two different"):
        parse_classes("945,945")


def test_subset_and_general_run_on_an_imagenet_folder(tmp_path):
    indices = [945, 513, 886]
    root = _imagenet_folder(tmp_path / "ilsvrc", indices, per_class=8)
    out = tmp_path / "runs"
    common = ["--data", str(root), "--classes", ",".join(map(str, indices)), "--per-class",
              "4", "2", "2", "--use-cache", "--cache-dir", str(tmp_path / "c"), "--out",
              str(out), *FAST]
    assert main(["--variant", "subset", *common]) == 0
    assert main(["--variant", "general", *common]) == 0
    rows = {r["variant"]: r for r in _rows(out)}
    assert rows["subset"]["epochs"] == "0" and rows["subset"]["train_sizes"] == ""
    assert rows["general"]["epochs"] == "2"
    assert "classes=945,513,886" in rows["general"]["data"]


def test_imagenette_layout_uses_val_as_test(tmp_path):
    root = make_image_folder(tmp_path / "nette", per_split={"train": 10, "val": 3})
    splits = load_image_folder(root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "val": 6, "test": 9}
    assert all(f.startswith("val/") for f in splits["test"].files)
    assert all(f.startswith("train/") for f in splits["val"].files)
    assert not set(splits["train"].files) & set(splits["val"].files)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-1"], "--epochs -1 is out of range"),
    (["--lr", "0"], "--lr 0.0 must be positive"),
    (["--image-size", "8"], "image size 8 is too small"),
    (["--weights", "nope.pt"], "weights 'nope.pt' are not imagenet"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--classes", "study"], "--classes needs --data"),
])
def test_bad_options_get_one_clear_line(tmp_path, capsys, argv, message):
    # Given last, the option under test overrides the defaults before it (--weights too).
    code = main(["--quiet", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
                 "--weights", "random", *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_ctrl_c_during_extraction_exits_in_one_line_and_leaves_no_partial_entry(tiny_root,
                                                                                  tmp_path):
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "tlcore.train", "--variant", "general", "--use-cache",
            "--data", str(tiny_root), "--cache-dir", str(cache), "--out", str(tmp_path / "runs"),
            "--weights", "random", "--image-size", "224", "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob("features/.*.tmp")):  # an entry is being written
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "extraction did not start within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()

    assert proc.returncode == 130
    assert stderr.strip().splitlines() == [
        "interrupted: what finished is already recorded; the feature cache keeps complete "
        "entries only"]
    assert list(cache.glob("features/*.tmp")) + list(cache.glob("features/.*.tmp")) == []
    assert list(cache.glob("features/*.h5")) == []  # the first entry was the one interrupted
