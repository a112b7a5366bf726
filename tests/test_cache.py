"""The HDF5 feature cache: equivalence with on-the-fly features, safety, keys, command line."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tlcore.cache import CacheKey, FeatureCache, read_entry, verify_entry, write_entry
from tlcore.cache.__main__ import main as cache_main
from tlcore.config import CacheConfig, DataConfig, RunConfig, TrainConfig
from tlcore.datasets import load_image_folder
from tlcore.engine import frozen_outputs
from tlcore.inputs import Preprocess, create_loader
from tlcore.models import split_vgg16
from tlcore.runs import cached_source, prepare, run_strategy
from tlcore.strategies import get_strategy


def config(root, tmp_path, *, cache=True, dtype="float32", epochs=2) -> RunConfig:
    return RunConfig(
        weights="random", out=str(tmp_path / "runs"),
        data=DataConfig(root=str(root), image_size=32, sizes=(48, 32)),
        train=TrainConfig(epochs=epochs, full_epochs=1),
        cache=CacheConfig(enabled=cache, directory=str(tmp_path / "cache"), dtype=dtype),
    )


def entries(tmp_path) -> list[Path]:
    return sorted((tmp_path / "cache" / "features").glob("*.h5"))


def test_cached_features_equal_features_computed_on_the_fly(tiny_root, tmp_path):
    session = prepare(config(tiny_root, tmp_path))
    split = session.splits["val"]
    preprocess = Preprocess(32)
    source = cached_source(session, split, preprocess, "features")
    logits = cached_source(session, split, preprocess, "logits")

    trunk, last = split_vgg16(session.vgg())
    outputs = list(frozen_outputs(trunk, last, create_loader(split, preprocess, 4)))
    features = torch.cat([f for f, _, _ in outputs])
    assert source.inputs.shape == (len(split), 4096)
    assert torch.allclose(source.inputs, features, atol=1e-6)
    assert torch.allclose(logits.inputs, torch.cat([g for _, g, _ in outputs]), atol=1e-5)
    assert source.labels.tolist() == list(split.labels)

    with h5py.File(entries(tmp_path)[0]) as f:
        assert f["paths"].asstr()[0].startswith(f"{f.attrs['key'] and ''}")
        assert set(f) == {"features", "logits", "labels", "paths"}
        assert f["features"].dtype == np.float32


def test_head_from_cache_matches_head_trained_by_streaming(digits_root, tmp_path):
    strategy = get_strategy("general")
    streamed = run_strategy(prepare(config(digits_root, tmp_path / "s", cache=False)), strategy)
    cached = run_strategy(prepare(config(digits_root, tmp_path / "c")), strategy)
    assert (streamed["source"], cached["source"]) == ("stream", "cache")
    n_test = 200
    assert abs(streamed["test_accuracy"] - cached["test_accuracy"]) * n_test <= 1
    assert cached["test_accuracy"] >= 0.3


def test_second_run_reuses_entries_without_building_vgg16(tiny_root, tmp_path):
    first = prepare(config(tiny_root, tmp_path))
    row = run_strategy(first, get_strategy("linear"))
    assert row["extract_seconds"] > 0 and len(entries(tmp_path)) == 3
    stamps = [p.stat().st_mtime_ns for p in entries(tmp_path)]

    second = prepare(config(tiny_root, tmp_path))
    row = run_strategy(second, get_strategy("general"))
    assert row["extract_seconds"] == 0.0
    assert second._vgg is None
    assert [p.stat().st_mtime_ns for p in entries(tmp_path)] == stamps


def test_touching_one_image_rebuilds_only_that_splits_entry(tiny_root, tmp_path):
    run_strategy(prepare(config(tiny_root, tmp_path)), get_strategy("general"))
    before = {p.name for p in entries(tmp_path)}
    image = tiny_root / "val" / "red" / "000.jpg"
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))

    row = run_strategy(prepare(config(tiny_root, tmp_path)), get_strategy("general"))
    after = {p.name for p in entries(tmp_path)}
    added = after - before
    assert len(added) == 1 and next(iter(added)).startswith("val-")
    assert row["extract_seconds"] > 0


def test_key_changes_with_everything_that_changes_features(tiny_root):
    split = load_image_folder(tiny_root)["train"]
    key = CacheKey("random:seed0", "train", str(tiny_root), split.fingerprint(),
                   Preprocess(32).to_dict(), "dali")
    variants = [
        replace(key, weights="imagenet:IMAGENET1K_V1"),
        replace(key, preprocess=Preprocess(64).to_dict()),
        replace(key, preprocess=Preprocess(32, gray=True).to_dict()),
        replace(key, preprocess=Preprocess(32, resize_mode="crop").to_dict()),
        replace(key, preprocess=Preprocess(32, mean=(0.5,) * 3).to_dict()),
        replace(key, fingerprint="0" * 64),
        replace(key, loader="torchvision"),
        replace(key, dtype="float16"),
        replace(key, version=key.version + 1),
    ]
    digests = {k.digest() for k in variants}
    assert key.digest() not in digests and len(digests) == len(variants)


def _fake_batches(n, fail_after=None):
    for start in range(0, n, 4):
        if fail_after is not None and start >= fail_after:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-extraction
        size = min(4, n - start)
        yield (torch.full((size, 4096), float(start)), torch.zeros(size, 1000),
               torch.arange(start, start + size))


def _key(tmp_path, split="train") -> CacheKey:
    return CacheKey("random:seed0", split, str(tmp_path), "f" * 64, Preprocess(32).to_dict(),
                    "dali")


def _extract(key, n=10, fail_after=None):
    def extract(path):
        return write_entry(path, key, _fake_batches(n, fail_after), num_images=n,
                           paths=[f"img{i}.jpg" for i in range(n)], classes=["a", "b"])
    return extract


def test_interrupted_extraction_leaves_nothing_that_looks_complete(tmp_path):
    cache, key = FeatureCache(tmp_path / "c"), _key(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_create(key, _extract(key, fail_after=4))
    assert not cache.path_for(key).exists()
    assert list((tmp_path / "c").glob("*.tmp")) == []

    path, created = cache.get_or_create(key, _extract(key))
    assert created and verify_entry(path, key) is None
    assert read_entry(path, ["features"]).features[8, 0].item() == 8.0


# Extracts the entry of test_cache._key(sys.argv[1]) into sys.argv[1]/c and is killed (the
# signal Ctrl-C cannot soften) after three batches, in the middle of writing it.
_KILLED_SCRIPT = """
import os, signal, sys
from pathlib import Path
from test_cache import _fake_batches, _key
from tlcore.cache import FeatureCache, write_entry

def batches():
    for i, batch in enumerate(_fake_batches(40)):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch

key = _key(Path(sys.argv[1]))
FeatureCache(Path(sys.argv[1]) / "c").get_or_create(key, lambda path: write_entry(
    path, key, batches(), num_images=40, paths=[str(i) for i in range(40)], classes=["a"]))
"""


def test_a_killed_extraction_is_cleaned_up_by_the_next(tmp_path, caplog):
    proc = subprocess.run([sys.executable, "-c", _KILLED_SCRIPT, str(tmp_path)],
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    left = list((tmp_path / "c").glob(".*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size > 0

    cache, key = FeatureCache(tmp_path / "c"), _key(tmp_path)
    path, created = cache.get_or_create(key, _extract(key))

    assert created and verify_entry(path, key) is None
    assert list((tmp_path / "c").glob(".*.tmp")) == []
    assert "left by an extraction that was killed" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "wrong key", "wrong shape"])
def test_unsound_entries_are_reported_and_rebuilt(tmp_path, caplog, damage):
    cache, key = FeatureCache(tmp_path / "c"), _key(tmp_path)
    path, _ = cache.get_or_create(key, _extract(key))
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "wrong key":
        other = _key(tmp_path, split="val")
        other_path, _ = cache.get_or_create(other, _extract(other))
        os.replace(other_path, path)
    else:
        with h5py.File(path, "a") as f:
            del f["features"]
            f.create_dataset("features", data=np.zeros((10, 17), np.float32))
    assert verify_entry(path, key) is not None

    path, created = cache.get_or_create(key, _extract(key))
    assert created and verify_entry(path, key) is None
    assert "unusable" in caplog.text and "rebuilding" in caplog.text


def _slow_worker(directory, root, results):
    key = _key(Path(root))
    calls = []

    def extract(path):
        calls.append(1)
        time.sleep(1.0)
        return _extract(key)(path)

    path, created = FeatureCache(directory).get_or_create(key, extract)
    results.put((created, len(calls), verify_entry(path, key)))


def test_two_processes_asking_for_one_entry_extract_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_slow_worker, args=(str(tmp_path / "c"), str(tmp_path),
                                                      results)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == [(False, 0, None), (True, 1, None)]


def test_float16_entries_halve_the_size(tiny_root, tmp_path):
    session = prepare(config(tiny_root, tmp_path / "a"))
    half = prepare(config(tiny_root, tmp_path / "b", dtype="float16"))
    full_src = cached_source(session, session.splits["test"], Preprocess(32), "features")
    half_src = cached_source(half, half.splits["test"], Preprocess(32), "features")
    assert half_src.inputs.dtype == torch.float32  # read back as float32
    assert torch.allclose(full_src.inputs, half_src.inputs, rtol=2e-3, atol=1e-4)
    size = {p.parent.parent.parent.name: p.stat().st_size
            for p in (entries(tmp_path / "a") + entries(tmp_path / "b"))}
    assert size["b"] < 0.6 * size["a"]


def test_cache_command_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tlcore.cache", "--cache-dir", str(tmp_path),
                           "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "0 entries" in proc.stdout


def test_cache_command_lists_verifies_and_removes(tiny_root, tmp_path, capsys):
    run_strategy(prepare(config(tiny_root, tmp_path)), get_strategy("general"))
    cache_dir = tmp_path / "cache"

    def cli(*args):
        code = cache_main(["--cache-dir", str(cache_dir), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli("list")
    assert code == 0 and "3 entries" in out and "random:seed0 32px colour" in out

    assert cli("verify")[0] == 0
    victim = entries(tmp_path)[1]  # the train entry
    victim.write_bytes(victim.read_bytes()[:1000])
    code, out, _ = cli("verify")
    assert code == 1 and f"BAD  {victim.name}" in out

    code, _, err = cli("remove")
    assert code == 2 and err.startswith("error: remove needs --all")
    assert "1 entries removed" in cli("remove", "--split", "test")[1]
    assert not any(p.name.startswith("test-") for p in entries(tmp_path))
    assert "2 entries removed" in cli("remove", "--all")[1]
    assert entries(tmp_path) == []


# Extracts a split of ``sys.argv[2]`` batches of 256 "images" and prints how far the process's
# peak resident memory rose meanwhile, in KiB. The network keeps the first 4096 values of each
# image as its features and the first 1000 as its logits, so that the run costs little time.
_MEMORY_SCRIPT = """
import resource, sys, torch
from pathlib import Path
from torch import nn
from tlcore.cache import CacheKey, write_entry
from tlcore.engine import frozen_outputs

class Narrow(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width
    def forward(self, x):
        return x[:, :self.width].clone()

batches, rows = int(sys.argv[2]), 256
def loader():
    for b in range(batches):
        yield torch.full((rows, 4096), float(b)), torch.zeros(rows, dtype=torch.long)

key = CacheKey(weights="w", split="train", data_root="r", fingerprint="f", preprocess={},
               loader="dali")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_entry(Path(sys.argv[1]), key, frozen_outputs(Narrow(4096), Narrow(1000), loader(),
                                                   in_flight=2),
            num_images=batches * rows, paths=[str(i) for i in range(batches * rows)],
            classes=["a"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _peak_rise_mib(path: Path, batches: int) -> float:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), str(batches)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip()) / 1024


def test_extraction_memory_does_not_grow_with_the_split(tmp_path):
    short = _peak_rise_mib(tmp_path / "short.h5", 20)
    long = _peak_rise_mib(tmp_path / "long.h5", 120)

    # The 100 extra batches' features and logits: about 500 MiB, had they been kept.
    extra_mib = 100 * 256 * (4096 + 1000) * 4 / 2**20
    assert long - short < extra_mib / 5, (short, long)
    with h5py.File(tmp_path / "long.h5") as f:
        assert f["features"].shape == (120 * 256, 4096)
        assert f["features"][-1, 0] == 119.0 and f["logits"][256, 999] == 1.0
