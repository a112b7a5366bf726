"""Experiments over trained runs: real runs on the built-in digits with random VGG16 weights."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_image_folder

from tlcore import TlcoreError
from tlcore.config import CacheConfig, DataConfig, RunConfig, TrainConfig
from tlcore.datasets import builtin_dataset, load_image_folder
from tlcore.experiments import (
    Condition,
    build_conditions,
    latest_runs,
    load_run,
    read_experiments,
    run_experiments,
)
from tlcore.imagenet import wnids
from tlcore.inputs import Preprocess, create_loader
from tlcore.results import read_results
from tlcore.runs import prepare, run_strategy
from tlcore.strategies import get_strategy

# gray is left to the report's tests: on the gray digits its features equal general's.
STRATEGIES = ("general", "linear", "scale", "full")
SIZES = (32, 40)
CONTRASTS = (1.0, 0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache):
    """An output folder with one short run of each strategy in ``STRATEGIES``."""
    out = tmp_path_factory.mktemp("runs")
    config = RunConfig(
        variant="all", weights="random", device="cpu", out=str(out),
        data=DataConfig(image_size=32, sizes=(32,)),
        train=TrainConfig(epochs=5, full_epochs=1),
        cache=CacheConfig(enabled=True, directory=str(shared_cache)),
    )
    session = prepare(config)
    for name in STRATEGIES:
        run_strategy(session, get_strategy(name))
    return out


@pytest.fixture(scope="module")
def sweep(trained):
    """The first sweep over every run."""
    return run_experiments(trained, sizes=SIZES, contrasts=CONTRASTS, device="cpu")


def rows(frame, strategy, condition, value=None):
    picked = frame[(frame["strategy"] == strategy) & (frame["condition"] == condition)]
    if value is not None:
        picked = picked[picked["value"].astype(str) == str(value)]
    assert len(picked) == 1, (strategy, condition, value)
    return picked.iloc[0]


def test_loaders_agree_on_reduced_contrast(shared_cache):
    split = load_image_folder(builtin_dataset(shared_cache))["test"]
    pixels = {}
    for contrast in (1.0, 0.5):
        preprocess = Preprocess(48, contrast=contrast)
        scale = torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255  # back to 0-255 levels
        for backend in ("dali", "torchvision"):
            loader = create_loader(split, preprocess, 50, backend=backend)
            pixels[backend, contrast] = torch.cat([x for x, _ in loader]) * scale

    # The two pipelines agree within interpolation tolerance (about one grey level).
    difference = (pixels["dali", 0.5] - pixels["torchvision", 0.5]).abs()
    assert difference.max() <= 1.5
    assert difference.mean() <= 0.5
    # ...and the contrast is really halved: each image's spread around its mean.
    for backend in ("dali", "torchvision"):
        full = pixels[backend, 1.0].flatten(1).std(1)
        half = pixels[backend, 0.5].flatten(1).std(1)
        assert torch.allclose(half / full, torch.full_like(full, 0.5), atol=0.03)


@pytest.mark.parametrize("contrast", [0.0, -0.5, math.nan, math.inf])
def test_contrast_must_be_positive_and_finite(contrast):
    with pytest.raises(TlcoreError, match="contrast"):
        Preprocess(32, contrast=contrast)


def test_unit_contrast_keeps_the_cache_key():
    assert "contrast" not in Preprocess(32).to_dict()
    assert Preprocess(32, contrast=1.0).to_dict() == Preprocess(32).to_dict()
    assert Preprocess(32, contrast=0.5).to_dict()["contrast"] == 0.5


def test_conditions_check_their_values():
    with pytest.raises(TlcoreError, match="contrast"):
        build_conditions((32,), (0.0,))
    with pytest.raises(TlcoreError, match="image size"):
        build_conditions((16,), ())
    with pytest.raises(TlcoreError, match="unknown condition"):
        Condition("blur", 2)
    kinds = [c.kind for c in build_conditions((32, 64), (0.5,))]
    assert kinds == ["base", "size", "size", "color", "color", "contrast"]


def test_sweep_covers_every_strategy_and_condition(sweep):
    assert sorted(sweep["strategy"].unique()) == sorted(STRATEGIES)
    per_run = len(build_conditions(SIZES, CONTRASTS))
    assert (sweep.groupby("strategy").size() == per_run).all()
    assert (sweep["n_images"] == 200).all()
    assert np.allclose(sweep["chance"], 0.1)
    assert set(sweep.loc[sweep["strategy"] == "full", "source"]) == {"stream"}
    assert set(sweep.loc[sweep["strategy"] != "full", "source"]) == {"cache"}
    sizes = sweep[sweep["condition"] == "size"]
    assert (sizes["image_size"].astype(int) == sizes["value"].astype(int)).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_base_condition_reproduces_the_run(trained, sweep, strategy):
    base = rows(sweep, strategy, "base")
    run_id = base["run_id"]
    metrics = json.loads((trained / run_id / "metrics.json").read_text())["test"]
    # The saved head (standardisation folded in) and, for full, the saved trunk give the
    # run's own test predictions back.
    assert base["accuracy"] == pytest.approx(metrics["accuracy"], abs=1 / 200 + 1e-9)
    assert base["mean_likelihood"] == pytest.approx(metrics["mean_likelihood"], abs=1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unit_contrast_reproduces_base_exactly(sweep, strategy):
    base, same = rows(sweep, strategy, "base"), rows(sweep, strategy, "contrast", 1.0)
    assert same["accuracy"] == base["accuracy"]
    assert same["mean_likelihood"] == base["mean_likelihood"]


@pytest.mark.parametrize("strategy", ["general", "full"])
def test_gray_images_change_nothing_on_gray_digits(sweep, strategy):
    # The digits are gray already: grayscale conversion gives the same pixels.
    base, gray = rows(sweep, strategy, "base"), rows(sweep, strategy, "color", "gray")
    assert gray["accuracy"] == base["accuracy"]
    assert gray["mean_likelihood"] == pytest.approx(base["mean_likelihood"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["general", "linear", "full"])
def test_reduced_contrast_and_other_sizes_change_predictions(sweep, strategy):
    base = rows(sweep, strategy, "base")
    for condition, value in (("contrast", 0.5), ("size", 40)):
        changed = rows(sweep, strategy, condition, value)
        assert changed["mean_likelihood"] != pytest.approx(base["mean_likelihood"], abs=1e-4)


def test_second_sweep_appends_and_reads_the_cache(trained, sweep, shared_cache):
    first = read_experiments(trained)
    entries = sorted(shared_cache.glob("features/*.h5"))
    heads = [run_id for run_id in sweep["run_id"].unique() if not run_id.endswith("full")]

    again = run_experiments(trained, run_ids=heads, sizes=SIZES, contrasts=CONTRASTS,
                            device="cpu")

    # Nothing was extracted: every condition's features were already in the cache.
    assert sorted(shared_cache.glob("features/*.h5")) == entries
    table = read_experiments(trained)
    assert len(table) == len(first) + len(again)
    pd.testing.assert_frame_equal(table.iloc[:len(first)].reset_index(drop=True), first)
    assert table["sweep"].nunique() >= 1
    merged = again.merge(sweep, on=["strategy", "condition", "value"], suffixes=("", "_first"))
    assert np.array_equal(merged["accuracy"], merged["accuracy_first"])


def test_latest_runs_takes_the_last_of_each_strategy(trained):
    results = read_results(trained)
    folders = latest_runs(trained)
    assert [f.name for f in folders] == list(results.groupby("variant", sort=False)["run_id"]
                                             .last())
    assert [f.name for f in latest_runs(trained, [folders[1].name])] == [folders[1].name]
    with pytest.raises(TlcoreError, match="not in"):
        latest_runs(trained, ["20000101-000000-nothing"])


def test_experiments_need_a_results_table(tmp_path):
    with pytest.raises(TlcoreError, match="no results.csv"):
        run_experiments(tmp_path)
    with pytest.raises(TlcoreError, match="run the experiments first"):
        read_experiments(tmp_path)


def test_full_is_rebuilt_with_its_trained_trunk(trained, shared_cache):
    folder = next(f for f in latest_runs(trained) if f.name.endswith("full"))
    saved = torch.load(folder / "weights.pt", weights_only=True)
    run = load_run(folder, device="cpu", cache_dir=str(shared_cache))

    trunk = run.module.trunk.state_dict()
    assert all(torch.equal(trunk[k.removeprefix("trunk.")], v) for k, v in saved.items()
               if k.startswith("trunk."))
    # One epoch moved the trunk away from the random weights it started from.
    fresh = run.session.vgg().features[0].weight
    assert not torch.equal(trunk["0.0.weight"], fresh)
    assert torch.equal(run.module.head.weight, saved["head.weight"])


def test_a_sweep_that_stops_keeps_the_runs_it_finished(trained, sweep, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(trained, out)
    general, linear = (next(f for f in latest_runs(out) if f.name.endswith(name))
                       for name in ("general", "linear"))
    (linear / "weights.pt").unlink()

    with pytest.raises(TlcoreError, match="weights.pt is missing"):
        run_experiments(out, run_ids=[general.name, linear.name], sizes=(32,),
                        contrasts=(1.0,), device="cpu")

    table = read_experiments(out)
    added = table.iloc[len(read_experiments(trained)):]
    assert set(added["run_id"]) == {general.name}
    assert len(added) == len(build_conditions((32,), (1.0,)))


def test_subset_is_swept_on_imagenet_wnid_classes(tmp_path, shared_cache):
    classes = tuple(wnids()[i] for i in (945, 513, 886))
    root = make_image_folder(tmp_path / "wnids", classes=classes)
    out = tmp_path / "runs"
    config = RunConfig(
        variant="subset", weights="random", device="cpu", out=str(out),
        data=DataConfig(root=str(root), image_size=32, sizes=(32,)),
        cache=CacheConfig(enabled=True, directory=str(shared_cache)),
    )
    row = run_strategy(prepare(config), get_strategy("subset"))

    frame = run_experiments(out, sizes=SIZES, contrasts=CONTRASTS, device="cpu")

    conditions = build_conditions(SIZES, CONTRASTS)
    assert len(frame) == len(conditions) and set(frame["strategy"]) == {"subset"}
    base = rows(frame, "subset", "base")
    assert base["run_id"] == row["run_id"]
    assert base["accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-9)
    assert base["mean_likelihood"] == pytest.approx(row["test_mean_likelihood"], rel=1e-5)
    assert rows(frame, "subset", "contrast", 1.0)["accuracy"] == base["accuracy"]
    # Other sizes and half the contrast feed the network other pixels: other likelihoods.
    assert rows(frame, "subset", "size", 40)["mean_likelihood"] != base["mean_likelihood"]
    assert rows(frame, "subset", "contrast", 0.5)["mean_likelihood"] != base["mean_likelihood"]
