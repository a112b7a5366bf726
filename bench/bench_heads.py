"""Timing tests of training: every strategy on the built-in dataset, and the cache's speed-ups.

Every trained strategy must reach at least three times chance on the built-in digits with random
VGG16 weights (random features keep enough of the digits' layout for a linear head to read).
``subset`` trains nothing and reads the ImageNet logits of the classes, so it runs on the digits
filed under ImageNet wnids; its predictions must be those of the whole network run on the images.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import (
    DEVICE,
    SEED,
    bench_size,
    cached_trainer,
    fit_orders,
    fresh_head,
    head_copy,
    head_stages,
    load_features,
    train_head,
)
from tlcore.config import DEFAULTS
from tlcore.engine import StreamSource, train_one_epoch
from tlcore.inputs import Preprocess, create_loader
from tlcore.metrics import classification_metrics
from tlcore.models import TransferModel
from tlcore.runs import run_strategy
from tlcore.strategies import STRATEGIES

MIN_ACCURACY_VS_CHANCE = 3.0
MIN_CACHE_SPEEDUP = 500.0
STUDY_EPOCHS = 200
MAX_STUDY_SECONDS = 10.0
STUDY_ROUNDS = 3
PAIRED_EPOCH_ROUNDS = 7


@torch.inference_mode()
def _whole_network_metrics(session) -> dict:
    """Test metrics of the whole VGG16's logits of the classes, computed from the images."""
    data, split = session.config.data, session.splits["test"]
    loader = create_loader(split, Preprocess(data.image_size, resize_mode=data.resize_mode),
                           session.config.train.batch_size, backend=session.loader)
    index = torch.tensor(session.imagenet_indices)
    probs, labels = zip(*((session.vgg()(images)[:, index].softmax(1), labels)
                          for images, labels in loader), strict=True)
    return classification_metrics(torch.cat(probs).numpy(), torch.cat(labels).numpy(),
                                  len(session.classes))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_run(benchmark, request, name):
    strategy = STRATEGIES[name]
    session = request.getfixturevalue(
        "wnid_digits_session" if strategy.needs_imagenet_classes else "digits")

    row = benchmark.pedantic(run_strategy, (session, strategy), rounds=1, iterations=1)

    chance = 1.0 / len(session.classes)
    benchmark.extra_info.update({k: row[k] for k in (
        "source", "epochs", "test_accuracy", "test_macro_f1", "test_mean_likelihood",
        "train_seconds", "epoch_seconds")})
    assert row["variant"] == name
    assert row["source"] == ("stream" if strategy.trains_backbone else "cache")
    if not strategy.trained:
        # The cached logits, selected and scored, against the whole network on the images:
        # the same prediction for every test image but at most one (a near tie).
        expected = _whole_network_metrics(session)
        measured = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["test"]
        assert row["epochs"] == 0
        assert np.abs(np.subtract(measured["confusion"], expected["confusion"])).sum() <= 2
        assert row["test_mean_likelihood"] == pytest.approx(expected["mean_likelihood"],
                                                            rel=1e-4)
        return
    stages = len(session.config.data.sizes) if strategy.multi_size else 1
    assert row["epochs"] == (session.config.train.full_epochs if strategy.trains_backbone
                             else session.config.train.epochs * stages)
    assert row["test_accuracy"] >= MIN_ACCURACY_VS_CHANCE * chance
    assert row["test_mean_likelihood"] > chance
    assert row["test_macro_f1"] > chance


def test_cached_vs_streamed_epoch(benchmark, digits):
    """An epoch of ``general`` from the cache against the same epoch streamed from the images.

    Each round streams the first epoch of a fresh head, then trains the same head from the cache
    as ``fit`` does, back to back, so that both see the machine in the same state. The cached
    epoch timed is the trainer's second, after its first and a validation pass, as every epoch
    of ``fit`` but the first is (the first also pays the trainer's set-up, and here runs with
    the caches just flushed by the streamed epoch; its ratio is recorded beside). The figure is
    the median of the rounds' ratios (the same pairing as the extraction benchmark's).
    """
    strategy = STRATEGIES["general"]
    cfg = digits.config.train
    split = digits.splits["train"]
    ((train, val),) = head_stages(digits, strategy)
    head = fresh_head(digits, strategy, [(train, val)])
    first_order, second_order = fit_orders(len(split), 2)

    # The streamed epoch: every image decoded and passed through the frozen network.
    model = TransferModel(digits.vgg(), strategy, copy.deepcopy(head))
    data = digits.config.data
    preprocess = Preprocess(data.image_size, resize_mode=data.resize_mode)
    stream = StreamSource(split, preprocess, DEVICE, digits.loader, transform=model.frozen)
    stream_seconds, first_seconds, first_epochs = [], [], []

    def stream_epoch_then_cached_epoch():
        """Times a streamed first epoch, then the same epoch and a validation pass from the
        cache, with the closed-form trainer that ``fit`` uses on cached features."""
        start = time.perf_counter()
        streamed = train_one_epoch(*head_copy(head, cfg), stream, cfg.batch_size, first_order,
                                   device=DEVICE)
        stream_seconds.append(time.perf_counter() - start)
        trainer = cached_trainer(head, cfg, train)
        start = time.perf_counter()
        first_epochs.append((streamed, trainer.epoch(cfg.batch_size, first_order)))
        first_seconds.append(time.perf_counter() - start)
        trainer.evaluator(val)()
        return (trainer,), {}

    # One round untimed first: a process's first epochs of these shapes pay one-off costs.
    (warm_up,), _ = stream_epoch_then_cached_epoch()
    warm_up.epoch(cfg.batch_size, second_order)
    stream_seconds.clear()
    first_seconds.clear()
    benchmark.pedantic(lambda trainer: trainer.epoch(cfg.batch_size, second_order),
                       setup=stream_epoch_then_cached_epoch, rounds=PAIRED_EPOCH_ROUNDS,
                       iterations=1)

    cached_seconds = list(benchmark.stats.stats.data)  # in round order
    speedup = statistics.median(s / c for s, c in zip(stream_seconds, cached_seconds,
                                                        strict=True))
    first_speedup = statistics.median(s / c for s, c in zip(stream_seconds, first_seconds,
                                                              strict=True))
    benchmark.extra_info.update({
        "stream_seconds": stream_seconds, "cached_seconds": cached_seconds,
        "speedup": speedup, "first_cached_seconds": first_seconds,
        "first_epoch_speedup": first_speedup})
    # Same head, same batches, same features: the same training step, however they arrive.
    for (stream_loss, stream_accuracy), (cached_loss, cached_accuracy) in first_epochs:
        assert cached_loss == pytest.approx(stream_loss, rel=1e-4)
        assert cached_accuracy == pytest.approx(stream_accuracy, abs=1.5 / len(split))
    assert not bench_size().check_targets or speedup >= MIN_CACHE_SPEEDUP, (
        f"a cached epoch is {speedup:.0f}x faster than a streamed one; at least "
        f"{MIN_CACHE_SPEEDUP:.0f}x expected")


class _OverBudget(Exception):
    """Training ran past its time budget; stopped so that a slow run fails fast."""


def test_study_general_epochs(benchmark, study_entries):
    """200 epochs of ``general`` on a cache of the study's size, with the study's settings.

    Each round reads the cache entries and trains a fresh head. The best round is the figure:
    the machine's cores are shared, and other work on them only ever adds time. A round that
    runs past the budget stops there, so a slow one fails fast.
    """
    study = DEFAULTS["folder"]
    train_path, val_path = study_entries
    check = bench_size().check_targets
    epochs = STUDY_EPOCHS if check else bench_size().study_epochs
    rounds = []  # (seconds, per-epoch rows) of each round

    def read_and_train():
        start = time.perf_counter()
        done = []

        def on_epoch(row):
            done.append(row)
            if check and time.perf_counter() - start > MAX_STUDY_SECONDS:
                raise _OverBudget

        stages = [(load_features(train_path), load_features(val_path))]
        torch.manual_seed(SEED)
        head = torch.nn.Linear(stages[0][0].inputs.shape[1], 10)
        try:
            train_head(head, stages, epochs=epochs, lr=study["lr"], on_epoch=on_epoch)
        except _OverBudget:
            pass
        rounds.append((time.perf_counter() - start, done))

    benchmark.pedantic(read_and_train, rounds=STUDY_ROUNDS if check else 1, iterations=1)

    # Projected to all epochs, so that a round stopped early ranks by its pace.
    seconds, done = min(rounds, key=lambda r: r[0] * epochs / len(r[1]))
    projected = seconds * epochs / len(done)
    benchmark.extra_info.update({
        "rounds": [{"epochs_run": len(d), "seconds": s} for s, d in rounds],
        "epochs_run": len(done), "seconds": seconds, "projected_seconds": projected,
        "train_epoch_seconds": sum(r["train_seconds"] for r in done) / len(done),
        "val_epoch_seconds": sum(r["val_seconds"] for r in done) / len(done)})
    assert len(done) == epochs, (
        f"the best of {len(rounds)} rounds stopped after {len(done)} epochs, {seconds:.1f} s "
        f"(all of them: about {projected:.0f} s); {STUDY_EPOCHS} in at most "
        f"{MAX_STUDY_SECONDS:.0f} s expected")
    assert not check or seconds <= MAX_STUDY_SECONDS, (
        f"{epochs} epochs took {seconds:.1f} s in the best of {len(rounds)} rounds; at most "
        f"{MAX_STUDY_SECONDS:.0f} s expected")
    # Random labels: nothing to generalise, but the head must still fit its training rows.
    assert done[-1]["train_loss"] < done[0]["train_loss"]
