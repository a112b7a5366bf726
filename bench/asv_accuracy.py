"""asv: test accuracy, macro F1 and mean likelihood of every strategy on the built-in dataset."""

from __future__ import annotations

import os

from bench.common import SEED, bench_size, digits_config, wnid_digits
from tlcore.config import TrainConfig
from tlcore.runs import run_variants
from tlcore.strategies import STRATEGIES

METRICS = ("test_accuracy", "test_macro_f1", "test_mean_likelihood")


class Accuracy:
    """Every strategy run once, as ``python -m tlcore.train --variant all`` would.

    ``subset`` reads the ImageNet logits of the classes, so it runs on a copy of the digits
    filed under ImageNet wnids; the others on the digits themselves. The small and full sizes
    train for the train CLI's default epochs; tiny only for a few.
    """

    params = list(STRATEGIES)
    param_names = ["strategy"]
    timeout = 900

    def setup_cache(self):
        size = bench_size()
        train = TrainConfig(epochs=size.head_epochs, full_epochs=size.full_epochs, seed=SEED)
        workdir = os.path.abspath("accuracy")
        rows = run_variants(digits_config(workdir, "all", train))
        rows += run_variants(digits_config(workdir, "subset", train, root=wnid_digits(workdir)))
        return {row["variant"]: {k: row[k] for k in METRICS} for row in rows}

    def track_test_accuracy(self, results, name):
        return results[name]["test_accuracy"]

    def track_macro_f1(self, results, name):
        return results[name]["test_macro_f1"]

    def track_mean_likelihood(self, results, name):
        return results[name]["test_mean_likelihood"]

    track_test_accuracy.unit = "fraction"
    track_macro_f1.unit = "F1"
    track_mean_likelihood.unit = "probability"
