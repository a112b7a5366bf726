"""Robustness experiments over trained runs: test accuracy under changed test images.

Each run's trained head (or network, for ``full``) is rebuilt from its run folder and evaluated
on the test split, every image once per *condition*:

- ``base``: the run's own test pipeline (what ``results.csv`` reports);
- ``size``: the run's pipeline at another test image size;
- ``color``: colour (``color``) or grayscale (``gray``) test images at the run's size;
- ``contrast``: the run's pipeline with the contrast lowered by a factor.

Head strategies read the frozen network's outputs from the feature cache, so repeating a sweep
costs seconds once its entries exist; ``full`` streams the images through its saved network.
Rows are appended to ``experiments.csv`` in the output folder, never rewritten.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlcore import TlcoreError
from tlcore.config import RunConfig
from tlcore.engine import Evaluation, StreamSource, evaluate
from tlcore.inputs import Preprocess
from tlcore.metrics import classification_metrics
from tlcore.models import FEATURE_DIM, IMAGENET_CLASSES, TransferModel, build_head
from tlcore.results import append_rows, read_results
from tlcore.runs import Session, cached_source, prepare
from tlcore.strategies import Strategy, get_strategy

__all__ = [
    "CONDITION_KINDS",
    "DEFAULT_SIZES",
    "DEFAULT_CONTRASTS",
    "EXPERIMENT_COLUMNS",
    "Condition",
    "LoadedRun",
    "build_conditions",
    "default_sizes",
    "latest_runs",
    "load_run",
    "evaluate_run",
    "run_experiments",
    "read_experiments",
    "STUDY_REFERENCE",
    "latest_sweep",
    "summary_table",
]

log = logging.getLogger(__name__)

CONDITION_KINDS = ("base", "size", "color", "contrast")
# Test image sizes: the built-in digits are 32-pixel images on two CPU cores; real folders
# follow the original study.
DEFAULT_SIZES = {"builtin": (32, 48, 64, 96), "folder": (64, 128, 256, 512)}
DEFAULT_CONTRASTS = (0.5, 0.25, 0.1)
# The original study's published test accuracy (%), on colour and on grayscale test images:
# VGG16 with ImageNet weights, 10 ImageNet classes, every layer trained end to end.
STUDY_REFERENCE = {
    "subset": {"test": 88.03, "gray": 74.92},
    "gray": {"test": 95.63, "gray": 95.73},
    "linear": {"test": 97.19, "gray": 94.28},
    "general": {"test": 97.29, "gray": 95.21},
    "scale": {"test": 97.50, "gray": 93.65},
}
EXPERIMENT_COLUMNS = (
    "sweep", "finished", "run_id", "strategy", "condition", "value", "image_size", "gray",
    "contrast", "accuracy", "mean_likelihood", "loss", "n_images", "chance", "classes", "data",
    "weights", "source", "seconds",
)


@dataclass(frozen=True)
class Condition:
    """One change to a run's test images.

    Attributes:
        kind: ``base``, ``size``, ``color`` or ``contrast``.
        value: pixels for ``size``; ``color`` or ``gray`` for ``color``; the factor for
            ``contrast``; empty for ``base``.
    """

    kind: str
    value: int | float | str = ""

    def __post_init__(self):
        if self.kind not in CONDITION_KINDS:
            raise TlcoreError(f"unknown condition {self.kind!r}; choose one of: "
                              f"{', '.join(CONDITION_KINDS)}")
        if self.kind == "color" and self.value not in ("color", "gray"):
            raise TlcoreError(f"color condition {self.value!r} must be color or gray")

    def apply(self, base: Preprocess) -> Preprocess:
        """The test pipeline of this condition, starting from the run's own."""
        if self.kind == "size":
            return replace(base, image_size=int(self.value))
        if self.kind == "color":
            return replace(base, gray=self.value == "gray")
        if self.kind == "contrast":
            return replace(base, contrast=float(self.value))
        return base


def build_conditions(sizes: Sequence[int] = (), contrasts: Sequence[float] = DEFAULT_CONTRASTS,
                     colors: bool = True) -> list[Condition]:
    """The conditions of a sweep, base first.

    Args:
        sizes: test image sizes in pixels.
        contrasts: contrast factors (each above 0; 1.0 is the unchanged image).
        colors: include colour and grayscale test images.
    """
    conditions = [Condition("base")]
    conditions += [Condition("size", int(s)) for s in sizes]
    if colors:
        conditions += [Condition("color", "color"), Condition("color", "gray")]
    conditions += [Condition("contrast", float(c)) for c in contrasts]
    for condition in conditions:
        condition.apply(Preprocess(64))  # checks sizes and factors before any heavy work
    return conditions


def default_sizes(config: RunConfig) -> tuple[int, ...]:
    """The test image sizes swept for a run's data when none are given."""
    return DEFAULT_SIZES["builtin" if config.data.root is None else "folder"]


def latest_runs(out: str | os.PathLike, run_ids: Sequence[str] | None = None) -> list[Path]:
    """Run folders to experiment on: the latest run of each strategy, or the runs named.

    Args:
        out: the output folder holding ``results.csv`` and the run folders.
        run_ids: run folder names to take instead of the latest of each strategy.
    """
    out = Path(out)
    if not (out / "results.csv").is_file():
        raise TlcoreError(f"{out} has no results.csv; train first, e.g. "
                          f"python -m tlcore.train --variant all --use-cache --out {out}")
    results = read_results(out)
    if run_ids:
        unknown = sorted(set(run_ids) - set(results["run_id"]))
        if unknown:
            raise TlcoreError(f"run {unknown[0]!r} is not in {out}/results.csv; pass run ids "
                              f"from its run_id column (e.g. {results['run_id'].iloc[-1]})")
        chosen = [r for r in results["run_id"] if r in set(run_ids)]
    else:
        chosen = list(results.groupby("variant", sort=False)["run_id"].last())
    folders = []
    for run_id in dict.fromkeys(chosen):
        folder = out / run_id
        if not (folder / "config.json").is_file():
            raise TlcoreError(f"run folder {folder} or its config.json is missing; restore it, "
                              "or pick other runs")
        folders.append(folder)
    return folders


@dataclass
class LoadedRun:
    """A trained run rebuilt from its folder, ready to evaluate."""

    run_id: str
    strategy: Strategy
    config: RunConfig
    session: Session
    module: nn.Module  # the head, or the whole network for full

    def base_preprocess(self) -> Preprocess:
        """The run's own test pipeline."""
        data = self.config.data
        return Preprocess(data.image_size, gray=self.strategy.gray, resize_mode=data.resize_mode)


def _weights_option(saved: dict) -> str:
    """The ``--weights`` value that rebuilds the weights a run resolved (``auto`` pinned)."""
    if saved.get("weights") != "auto":
        return saved.get("weights", "auto")
    return str(saved.get("weights_resolved", "auto")).split(":", 1)[0]


def _session_for(config: RunConfig, sessions: dict, device: str | None,
                 cache_dir: str | None) -> tuple[RunConfig, Session]:
    """The run's session with the cache on; runs of one invocation share one session."""
    cache = replace(config.cache, enabled=True,
                    directory=config.cache.directory if cache_dir is None else str(cache_dir))
    config = replace(config, cache=cache, device=config.device if device is None else device)
    key = json.dumps({**config.to_dict(), "variant": ""}, sort_keys=True, default=str)
    if key not in sessions:
        sessions[key] = prepare(config)
    return config, sessions[key]


def _build_module(strategy: Strategy, session: Session, state: dict) -> nn.Module:
    """The trained part of a run, loaded from its saved weights."""
    classes = len(session.classes)
    if not strategy.trained:
        return build_head(strategy, classes, session.imagenet_indices).to(session.device)
    in_features = IMAGENET_CLASSES if strategy.head_input == "logits" else FEATURE_DIM
    head = nn.Linear(in_features, classes)
    head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    if not strategy.trains_backbone:
        return head.to(session.device).eval()
    model = TransferModel(copy.deepcopy(session.vgg()), strategy, head)
    model.trunk.load_state_dict({k.removeprefix("trunk."): v for k, v in state.items()
                                 if k.startswith("trunk.")})
    return model.to(session.device).eval()


def load_run(folder: str | os.PathLike, *, sessions: dict | None = None,
             device: str | None = None, cache_dir: str | None = None) -> LoadedRun:
    """Rebuild a run's session and trained module from its folder.

    Args:
        folder: the run folder (``config.json`` and, for trained strategies, ``weights.pt``).
        sessions: sessions already prepared, reused by runs of the same invocation.
        device: evaluate on this device instead of the run's (``auto``, ``cpu``, ``cuda``).
        cache_dir: the feature cache folder, instead of the run's.
    """
    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text())
    strategy = get_strategy(saved.get("variant", ""))
    config = RunConfig.from_dict({**saved, "weights": _weights_option(saved)})
    config, session = _session_for(config, {} if sessions is None else sessions, device,
                                   cache_dir)

    expected = saved.get("weights_resolved")
    if expected and session.weights.identity != expected:
        raise TlcoreError(f"run {folder.name} used weights {expected} but {config.weights!r} "
                          f"now gives {session.weights.identity}; restore those weights")
    if "classes" in saved and list(saved["classes"]) != list(session.classes):
        raise TlcoreError(f"run {folder.name} was trained on classes {saved['classes'][:3]}... "
                          f"but its data now has {list(session.classes[:3])}...; restore the data")
    if strategy.needs_imagenet_classes and session.imagenet_indices is None:
        raise TlcoreError(f"run {folder.name} is {strategy.name}, which needs class folders "
                          "named by ImageNet wnid; leave it out of the runs")

    state = {}
    if strategy.trained:
        weights = folder / "weights.pt"
        if not weights.is_file():
            raise TlcoreError(f"{weights} is missing; the run did not finish, pick another run")
        state = torch.load(weights, map_location="cpu", weights_only=True)
    module = _build_module(strategy, session, state)
    return LoadedRun(folder.name, strategy, config, session, module)


def _evaluate_preprocess(run: LoadedRun, preprocess: Preprocess) -> tuple[Evaluation, str]:
    """One pass over the test split under ``preprocess``."""
    session, split = run.session, run.session.splits["test"]
    batch_size = run.config.train.batch_size
    if run.strategy.cacheable:
        source = cached_source(session, split, preprocess, run.strategy.head_input)
        kind = "cache"
    else:
        source = StreamSource(split, preprocess, session.device, session.loader)
        kind = "stream"
    evaluation = evaluate(run.module, source, batch_size, device=session.device,
                          autocast=run.strategy.trains_backbone)
    return evaluation, kind


def evaluate_run(run: LoadedRun, conditions: Sequence[Condition]) -> list[dict]:
    """Evaluate one run under each condition; one result row per condition.

    Conditions that come to the same test pipeline (e.g. ``color=gray`` for ``gray``) share
    one evaluation.
    """
    labels = np.asarray(run.session.splits["test"].labels)
    classes = len(run.session.classes)
    chance = float(np.bincount(labels, minlength=classes).max() / len(labels))
    base = run.base_preprocess()
    done: dict[Preprocess, tuple[Evaluation, str]] = {}
    rows = []
    for condition in conditions:
        preprocess = condition.apply(base)
        seconds = 0.0
        if preprocess not in done:
            start = time.perf_counter()
            done[preprocess] = _evaluate_preprocess(run, preprocess)
            seconds = time.perf_counter() - start
        evaluation, kind = done[preprocess]
        metrics = classification_metrics(evaluation.probs, evaluation.labels, classes)
        rows.append({
            "run_id": run.run_id, "strategy": run.strategy.name, "condition": condition.kind,
            "value": condition.value, "image_size": preprocess.image_size,
            "gray": preprocess.gray, "contrast": preprocess.contrast,
            "accuracy": metrics["accuracy"], "mean_likelihood": metrics["mean_likelihood"],
            "loss": evaluation.loss, "n_images": len(evaluation.labels), "chance": chance,
            "classes": classes, "data": run.session.data_name,
            "weights": run.session.weights.identity, "source": kind, "seconds": seconds,
        })
        log.info("%s %s=%s: accuracy %.3f, mean likelihood %.3f (%s, %.1f s)",
                 run.strategy.name, condition.kind, condition.value, metrics["accuracy"],
                 metrics["mean_likelihood"], kind, seconds)
    return rows


def run_experiments(out: str | os.PathLike, *, run_ids: Sequence[str] | None = None,
                    sizes: Sequence[int] | None = None,
                    contrasts: Sequence[float] = DEFAULT_CONTRASTS, device: str | None = None,
                    cache_dir: str | None = None):
    """Evaluate the runs of an output folder under every condition; append to experiments.csv.

    Args:
        out: the output folder holding ``results.csv`` and the run folders.
        run_ids: the runs to evaluate (default: the latest run of each strategy).
        sizes: test image sizes (default: :data:`DEFAULT_SIZES` for the runs' data).
        contrasts: contrast factors.
        device: evaluate on this device instead of each run's (``auto``, ``cpu``, ``cuda``).
        cache_dir: the feature cache folder, instead of each run's.

    Returns:
        This sweep's rows as a pandas DataFrame (columns :data:`EXPERIMENT_COLUMNS`).
    """
    import pandas as pd

    out = Path(out)
    folders = latest_runs(out, run_ids)
    sweep = datetime.now().strftime("%Y%m%d-%H%M%S")
    sessions: dict = {}
    rows = []
    for folder in folders:
        run = load_run(folder, sessions=sessions, device=device, cache_dir=cache_dir)
        run_sizes = default_sizes(run.config) if sizes is None else sizes
        conditions = build_conditions(run_sizes, contrasts)
        log.info("experiments on %s (%d conditions)", folder.name, len(conditions))
        run_rows = []
        for row in evaluate_run(run, conditions):
            finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            run_rows.append({"sweep": sweep, "finished": finished, **row})
        # Each run's rows are recorded as soon as they are complete: an interrupted sweep
        # keeps the runs it finished.
        append_rows(out / "experiments.csv", run_rows, EXPERIMENT_COLUMNS)
        rows += run_rows
        # Full's copy of VGG16 is the largest thing held; drop it before the next run.
        del run
    return pd.DataFrame(rows, columns=list(EXPERIMENT_COLUMNS))


def read_experiments(out: str | os.PathLike):
    """The experiments table of ``out`` as a pandas DataFrame."""
    import pandas as pd

    path = Path(out) / "experiments.csv"
    if not path.is_file():
        raise TlcoreError(f"{path} does not exist; run the experiments first "
                          f"(python -m tlcore.report --out {Path(out)} --run-experiments)")
    return pd.read_csv(path)


def latest_sweep(experiments):
    """Each strategy's rows from the latest sweep that evaluated it (one run per strategy)."""
    experiments = experiments.copy()
    experiments["order"] = range(len(experiments))
    last = experiments.groupby("strategy", sort=False)["sweep"].transform("max")
    latest = experiments[experiments["sweep"] == last]
    # Within a sweep a strategy has one run; keep its last evaluation of each condition.
    latest = latest.drop_duplicates(["strategy", "condition", "value"], keep="last")
    return latest.sort_values("order").drop(columns="order").reset_index(drop=True)


def _column(condition: str, value) -> str:
    if condition == "base":
        return "test"
    if condition == "size":
        return f"{int(float(value))} px"
    if condition == "color":
        return str(value)
    return f"contrast {float(value):g}"


def summary_table(experiments):
    """Strategies x conditions: test accuracy in %, with chance level and the study's figures.

    Args:
        experiments: rows of ``experiments.csv`` (see :func:`read_experiments`).

    Returns:
        One row per strategy: ``strategy``, ``run_id``, one column per condition, ``chance``,
        ``n_images``, and ``study test`` / ``study gray`` (the original study's figures, empty
        where it has none).
    """
    import pandas as pd

    latest = latest_sweep(experiments)
    rows = []
    for strategy, group in latest.groupby("strategy", sort=False):
        row = {"strategy": strategy, "run_id": group["run_id"].iloc[-1]}
        for _, r in group.iterrows():
            row[_column(r["condition"], r["value"])] = 100.0 * r["accuracy"]
        row["chance"] = 100.0 * group["chance"].iloc[0]
        row["n_images"] = int(group["n_images"].iloc[0])
        study = STUDY_REFERENCE.get(strategy, {})
        row["study test"] = study.get("test", float("nan"))
        row["study gray"] = study.get("gray", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)
