"""asv: head training from the cache, one ``full`` step, and the cache's speed-up over streaming."""

from __future__ import annotations

import copy
import os
import time

import torch

from bench.common import (
    DEVICE,
    HEAD_STRATEGIES,
    bench_size,
    cached_trainer,
    digits_session,
    fit_orders,
    fresh_head,
    head_copy,
    head_stages,
    load_features,
    random_cache_entry,
    train_head,
    warm_digits_cache,
)
from tlcore.config import DEFAULTS
from tlcore.engine import StreamSource, TensorSource, train_one_epoch
from tlcore.inputs import Preprocess
from tlcore.models import TransferModel
from tlcore.strategies import STRATEGIES


class _Digits:
    """Base of the benchmarks on the built-in dataset: they share one ``setup_cache``."""

    def setup_cache(self):
        workdir = os.path.abspath("digits")
        warm_digits_cache(digits_session(workdir))
        return workdir


class HeadTraining(_Digits):
    """Each head strategy trained from the cache on the built-in dataset, as the CLI trains it."""

    params = list(HEAD_STRATEGIES)
    param_names = ["strategy"]
    timeout = 600

    def setup(self, workdir, name):
        self.session = digits_session(workdir)
        strategy = STRATEGIES[name]
        self.stages = head_stages(self.session, strategy)
        self.head = fresh_head(self.session, strategy, self.stages)

    def _train(self):
        cfg = self.session.config.train
        return train_head(self.head, self.stages, epochs=bench_size().head_epochs, lr=cfg.lr,
                          batch_size=cfg.batch_size, momentum=cfg.momentum)

    def time_train(self, workdir, name):
        self._train()

    def peakmem_setup_only(self, workdir, name):
        pass

    def peakmem_train(self, workdir, name):
        self._train()


class StudyGeneral:
    """``general`` read from random cache entries and trained, at the study's size when full.

    Full: 5,279 train and 2,000 val rows, 200 epochs; small: a tenth of the rows, 20 epochs.
    """

    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)

    def setup_cache(self):
        rows = bench_size().study_rows
        return tuple(str(random_cache_entry(os.path.abspath("study"), split, count))
                     for split, count in zip(("train", "val"), rows, strict=True))

    def time_read_and_train(self, paths):
        stages = [tuple(load_features(path) for path in paths)]
        head = torch.nn.Linear(stages[0][0].inputs.shape[1], 10)
        train_head(head, stages, epochs=bench_size().study_epochs, lr=DEFAULTS["folder"]["lr"])


class FullStep(_Digits):
    """One SGD step of ``full``: a batch through every VGG16 layer, forward and backward."""

    timeout = 600
    number = 1
    repeat = (1, 5, 60.0)

    def setup(self, workdir):
        session = digits_session(workdir)
        strategy = STRATEGIES["full"]
        cfg = session.config.train
        head = fresh_head(session, strategy, head_stages(session, strategy))
        self.model = TransferModel(copy.deepcopy(session.vgg()), strategy, head,
                                   backbone_dropout=not cfg.standardize)
        self.optimizer = torch.optim.SGD(self.model.param_groups(cfg.lr,
                                                                 cfg.lr * cfg.backbone_lr_scale),
                                         lr=cfg.lr, momentum=cfg.momentum)
        preprocess = Preprocess(session.config.data.image_size)
        images, labels = next(iter(StreamSource(session.splits["train"], preprocess, DEVICE,
                                                session.loader).batches(cfg.batch_size)))
        self.batch = TensorSource(images.clone(), labels.clone(), DEVICE)
        self.order = torch.arange(len(self.batch))

    def time_step(self, workdir):
        train_one_epoch(self.model, self.optimizer, self.batch, len(self.batch), self.order,
                        device=DEVICE)


class CacheVsStream(_Digits):
    """An epoch of ``general`` from the cache against the same epoch streamed from the images.

    The streamed epoch is a fresh head's first. The cached one is timed as ``fit`` runs every
    epoch but the first: the closed-form trainer's second, after its first and a validation
    pass; the median of ``cached_rounds`` fresh trainers.
    """

    timeout = 600
    cached_rounds = 20

    def setup(self, workdir):
        session = digits_session(workdir)
        strategy = STRATEGIES["general"]
        self.cfg = session.config.train
        ((self.cached, self.val),) = head_stages(session, strategy)
        self.head = fresh_head(session, strategy, [(self.cached, self.val)])
        model = TransferModel(session.vgg(), strategy, copy.deepcopy(self.head))
        preprocess = Preprocess(session.config.data.image_size)
        self.stream = StreamSource(session.splits["train"], preprocess, DEVICE, session.loader,
                                   transform=model.frozen)
        self.orders = fit_orders(len(self.stream), 2)

    def _streamed_seconds(self) -> float:
        head, optimizer = head_copy(self.head, self.cfg)
        start = time.perf_counter()
        train_one_epoch(head, optimizer, self.stream, self.cfg.batch_size, self.orders[0],
                        device=DEVICE)
        return time.perf_counter() - start

    def _cached_seconds(self) -> float:
        trainer = cached_trainer(self.head, self.cfg, self.cached)
        trainer.epoch(self.cfg.batch_size, self.orders[0])
        trainer.evaluator(self.val)()
        start = time.perf_counter()
        trainer.epoch(self.cfg.batch_size, self.orders[1])
        return time.perf_counter() - start

    def track_speedup(self, workdir):
        stream = self._streamed_seconds()
        cached = sorted(self._cached_seconds() for _ in range(self.cached_rounds))
        return stream / cached[len(cached) // 2]

    track_speedup.unit = "ratio"
