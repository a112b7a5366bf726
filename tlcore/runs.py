"""One strategy from config to results row: data -> features -> head -> metrics -> results.

:func:`prepare` reads and checks the data, resolves weights and device once per invocation;
:func:`run_strategy` trains and tests one strategy in a fresh run folder and appends its row to
the results table. Head strategies read the frozen network's outputs from the feature cache when
it is enabled, and otherwise stream every image through the frozen network each epoch.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tlcore import TlcoreError
from tlcore.cache import CacheKey, FeatureCache, read_entry, write_entry
from tlcore.config import RunConfig
from tlcore.datasets import Split, builtin_dataset, load_image_folder
from tlcore.engine import (
    StreamSource,
    TensorSource,
    batches_in_flight,
    evaluate,
    fit,
    frozen_outputs,
    pooled_statistics,
)
from tlcore.imagenet import imagenet_indices, imagenet_splits
from tlcore.inputs import Preprocess, create_loader, dali_available
from tlcore.metrics import classification_metrics
from tlcore.models import (
    TransferModel,
    WeightsSpec,
    build_head,
    build_vgg16,
    resolve_weights,
    split_vgg16,
    trained_state,
)
from tlcore.results import append_jsonl, append_result, create_run_dir, environment, write_json
from tlcore.strategies import Strategy, resolve_variants

__all__ = ["Session", "resolve_device", "prepare", "extract_entry", "cached_source", "run_strategy",
           "run_variants"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """Turn ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TlcoreError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TlcoreError(f"device {name!r} asked for, but CUDA is not available here; "
                          "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise TlcoreError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Session:
    """What every strategy of one invocation shares: data, weights, device, cache, VGG16."""

    config: RunConfig
    splits: dict[str, Split]
    data_name: str
    weights: WeightsSpec
    device: torch.device
    loader: str
    cache: FeatureCache | None
    imagenet_indices: list[int] | None
    _vgg: nn.Module | None = field(default=None, repr=False)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.splits["train"].classes

    def vgg(self) -> nn.Module:
        """VGG16 with the run's weights, on the run's device; built on first use only."""
        if self._vgg is None:
            log.info("building VGG16 (%s)", self.weights.identity)
            self._vgg = build_vgg16(self.weights).to(self.device).eval()
        return self._vgg


def prepare(config: RunConfig) -> Session:
    """Check the data and resolve weights, device, loader and cache for a run."""
    cache_dir = Path(config.cache.directory)
    data = config.data
    if data.root is None:
        if data.classes is not None:
            raise TlcoreError("--classes needs --data pointing at an ImageNet-layout folder")
        splits, data_name = load_image_folder(builtin_dataset(cache_dir)), "builtin:digits"
    elif data.classes is not None:
        splits = imagenet_splits(data.root, list(data.classes), data.per_class, data.split_seed)
        data_name = (f"{Path(data.root).resolve()}:classes={','.join(map(str, data.classes))}"
                     f":per_class={'/'.join(map(str, data.per_class))}:seed={data.split_seed}")
    else:
        splits, data_name = load_image_folder(data.root), str(Path(data.root).resolve())

    loader = config.data.loader
    if loader == "dali" and not dali_available():
        log.warning("NVIDIA DALI is not installed; reading images with torchvision instead")
        loader = "torchvision"
    return Session(
        config=config,
        splits=splits,
        data_name=data_name,
        weights=resolve_weights(config.weights, seed=config.train.seed),
        device=resolve_device(config.device),
        loader=loader,
        cache=FeatureCache(cache_dir / "features") if config.cache.enabled else None,
        imagenet_indices=imagenet_indices(splits["train"].classes),
    )


def _with_progress(batches, total: int, desc: str, enabled: bool):
    """Pass on ``batches`` (tuples whose last item is the labels), counting images done."""
    with tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch[-1]))


def extract_entry(path: Path, key: CacheKey, split: Split, preprocess: Preprocess,
                  trunk: nn.Module, last: nn.Module, *, batch_size: int, device: torch.device,
                  backend: str, progress: bool = False) -> dict:
    """Write ``split``'s cache entry to ``path``: every image through the frozen network once.

    Args:
        path: the file to write (the feature cache renames it into place).
        key: the entry's key, stored in the file.
        split: the images.
        preprocess: the input pipeline settings the features are computed under.
        trunk, last: the frozen network, up to the features and its last layer.
        batch_size: images per batch.
        device: where the network runs.
        backend: the loader, ``dali`` or ``torchvision``.
        progress: show a progress bar with images/s.

    Returns:
        Timing of the extraction (see :func:`tlcore.cache.write_entry`).
    """
    loader = create_loader(split, preprocess, batch_size, device=device, backend=backend)
    desc = f"extract {split.name} {preprocess.image_size}px{' gray' if preprocess.gray else ''}"
    batches = frozen_outputs(trunk, last, loader, in_flight=batches_in_flight(device))
    batches = _with_progress(batches, len(split), desc, progress)
    info = write_entry(path, key, batches, num_images=len(split), paths=list(split.files),
                       classes=list(split.classes))
    log.info("%s: %d images in %.1f s (%.1f img/s)", desc, len(split), info["seconds"],
             info["images_per_s"])
    return info


def cached_source(session: Session, split: Split, preprocess: Preprocess, head_input: str,
                  progress: bool = False, timings: dict | None = None) -> TensorSource:
    """The head's inputs for ``split`` from the feature cache, extracting them if missing.

    Args:
        session: supplies weights, loader, device, batch size and the cache.
        split: the images.
        preprocess: the input pipeline settings the features are computed under.
        head_input: ``features`` (N, 4096) or ``logits`` (N, 1000).
        progress: show a progress bar with images/s while extracting.
        timings: if given, ``extract_seconds`` is added to it when an extraction runs.
    """
    timings = {} if timings is None else timings
    key = CacheKey(
        weights=session.weights.identity, split=split.name, data_root=str(split.root),
        fingerprint=split.fingerprint(), preprocess=preprocess.to_dict(), loader=session.loader,
        dtype=session.config.cache.dtype,
    )

    def extract(tmp_path):
        info = extract_entry(tmp_path, key, split, preprocess, *split_vgg16(session.vgg()),
                             batch_size=session.config.train.batch_size, device=session.device,
                             backend=session.loader, progress=progress)
        timings["extract_seconds"] = timings.get("extract_seconds", 0.0) + info["seconds"]
        return info

    path, _ = session.cache.get_or_create(key, extract)
    entry = read_entry(path, arrays=[head_input])
    if entry.labels.tolist() != list(split.labels):
        raise RuntimeError(f"cache entry {path} disagrees with the split's labels")
    inputs = entry.features if head_input == "features" else entry.logits
    return TensorSource(inputs, entry.labels, session.device, entry.extract_seconds)


def _source(session: Session, strategy: Strategy, model: TransferModel | None, split: Split,
            image_size: int, progress: bool, timings: dict, *, frozen_only: bool = False):
    """Where a split's batches come from: the cache, or images streamed from disk.

    Head strategies get the frozen network's outputs; ``full`` gets images, unless
    ``frozen_only`` asks for the frozen outputs (to measure their statistics).
    """
    preprocess = Preprocess(image_size, gray=strategy.gray,
                            resize_mode=session.config.data.resize_mode)
    if model is None:
        return cached_source(session, split, preprocess, strategy.head_input, progress, timings)
    transform = model.frozen if frozen_only or not strategy.trains_backbone else None
    return StreamSource(split, preprocess, session.device, session.loader, transform)


def _head(session: Session, strategy: Strategy, model: TransferModel | None,
          sizes: tuple[int, ...], progress: bool, timings: dict) -> nn.Module:
    """A freshly seeded head for ``strategy``, standardised on the training split if asked."""
    cfg = session.config.train
    stats = None
    if cfg.standardize and strategy.trained:
        # Pooled over every training size, so that no stage sees inputs far off the scale.
        stats = pooled_statistics([_source(session, strategy, model, session.splits["train"],
                                           size, progress, timings, frozen_only=True)
                                   for size in sizes], cfg.batch_size)
    torch.manual_seed(cfg.seed)
    head = build_head(strategy, len(session.classes), session.imagenet_indices, stats)
    return head.to(session.device)


def _train(session: Session, strategy: Strategy, module: nn.Module, model, *,
           sizes: tuple[int, ...], run_dir: Path, progress: bool, timings: dict) -> list[dict]:
    """Train ``module`` in one stage per image size, logging each epoch to ``log.jsonl``."""
    cfg = session.config.train
    source_kind = "stream" if model is not None else "cache"
    epochs = cfg.full_epochs if strategy.trains_backbone else cfg.epochs
    if strategy.trains_backbone:
        params = model.param_groups(cfg.lr, cfg.lr * cfg.backbone_lr_scale)
    else:
        params = module.parameters()
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    history = []
    for stage, size in enumerate(sizes):
        train, val = (_source(session, strategy, model, session.splits[name], size, progress,
                              timings) for name in ("train", "val"))

        def on_epoch(row, size=size, train=train):
            row = {"epoch": len(history) + 1, "stage_epoch": row["epoch"], "image_size": size,
                   "source": source_kind, **{k: v for k, v in row.items() if k != "epoch"}}
            if source_kind == "cache":
                # Beside the cached epoch: the frozen pass over the same images that streaming
                # would repeat every epoch, as timed when the cache entry was extracted.
                row["frozen_pass_seconds"] = train.frozen_pass_seconds
            history.append(row)
            append_jsonl(run_dir / "log.jsonl", row)
            saved = row.get("frozen_pass_seconds")
            log.info("%s epoch %d (%dpx): train loss %.4f acc %.3f, val acc %.3f, %.3f s%s",
                     strategy.name, row["epoch"], size, row["train_loss"], row["train_accuracy"],
                     row["val_accuracy"], row["train_seconds"],
                     "" if saved is None else
                     f" (streamed, its frozen pass alone would take {saved:.2f} s)")

        fit(module, optimizer, train, val, epochs=epochs, batch_size=cfg.batch_size,
            seed=cfg.seed + stage, device=session.device, autocast=strategy.trains_backbone,
            progress=progress, on_epoch=on_epoch)
    return history


def run_strategy(session: Session, strategy: Strategy, *, progress: bool = False) -> dict:
    """Train and test one strategy; write its run folder and append its results row.

    Returns:
        The results row (see :data:`tlcore.results.RESULT_COLUMNS`).
    """
    cfg = session.config
    run_dir = create_run_dir(cfg.out, strategy.name)
    write_json(run_dir / "config.json", {
        **cfg.to_dict(), "variant": strategy.name, "weights_resolved": session.weights.identity,
        "data_resolved": session.data_name, "loader_resolved": session.loader,
        "device_resolved": str(session.device), "classes": list(session.classes),
    })
    log.info("run %s: %s", run_dir.name, strategy.description)

    # The whole network is needed only when images are streamed; cached heads never build it.
    cached = session.cache is not None and strategy.cacheable
    model = None
    if not cached:
        vgg = copy.deepcopy(session.vgg()) if strategy.trains_backbone else session.vgg()
        model = TransferModel(vgg, strategy, nn.Identity(),
                              backbone_dropout=not cfg.train.standardize).to(session.device)
    timings: dict = {}
    sizes = cfg.data.sizes if strategy.multi_size else (cfg.data.image_size,)
    head = _head(session, strategy, model, sizes, progress, timings)
    if model is not None:
        model.head = head
    module = model if strategy.trains_backbone else head

    history = []
    if strategy.trained:
        history = _train(session, strategy, module, model, sizes=sizes, run_dir=run_dir,
                         progress=progress, timings=timings)

    # Test: every image once, at the run's image size.
    def evaluate_split(name):
        source = _source(session, strategy, model, session.splits[name], cfg.data.image_size,
                         progress, timings)
        return evaluate(module, source, cfg.train.batch_size, device=session.device,
                        autocast=strategy.trains_backbone, progress=progress, desc=name)

    test_eval = evaluate_split("test")
    metrics = classification_metrics(test_eval.probs, test_eval.labels, len(session.classes))
    val_accuracy = history[-1]["val_accuracy"] if history else evaluate_split("val").accuracy

    if strategy.trained:
        state = model.trained_state() if model is not None else trained_state(head)
        torch.save(state, run_dir / "weights.pt")
    write_json(run_dir / "metrics.json", {
        "test": {**metrics, "loss": test_eval.loss, "images_per_s": test_eval.images_per_s},
        "classes": list(session.classes), "timings": timings,
    })

    row = {
        "run_id": run_dir.name, "variant": strategy.name, "data": session.data_name,
        "classes": len(session.classes), "weights": session.weights.identity,
        "image_size": cfg.data.image_size,
        "train_sizes": " ".join(map(str, sizes)) if strategy.trained else "",
        "resize_mode": cfg.data.resize_mode, "loader": session.loader,
        "epochs": len(history), "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
        "seed": cfg.train.seed, "source": "cache" if cached else "stream",
        "test_accuracy": metrics["accuracy"], "test_mean_likelihood": metrics["mean_likelihood"],
        "test_macro_f1": metrics["macro_f1"], "test_loss": test_eval.loss,
        "val_accuracy": val_accuracy,
        "train_seconds": sum(r["train_seconds"] + r["val_seconds"] for r in history),
        "epoch_seconds": (sum(r["train_seconds"] for r in history) / len(history)
                          if history else 0.0),
        "extract_seconds": timings.get("extract_seconds", 0.0),
        "test_images_per_s": test_eval.images_per_s,
        **environment(session.device), "run_dir": str(run_dir),
    }
    append_result(cfg.out, row)
    return row


def run_variants(config: RunConfig, *, progress: bool = False) -> list[dict]:
    """Run ``config.variant`` (one strategy, or every one that applies for ``all``)."""
    strategies = resolve_variants(config.variant)
    session = prepare(config)
    rows = []
    for strategy in strategies:
        if strategy.needs_imagenet_classes and session.imagenet_indices is None:
            message = (f"strategy {strategy.name!r} needs class folders named by ImageNet wnid "
                       f"(e.g. n07720875); {session.data_name} has {', '.join(session.classes[:3])}"
                       f"{', ...' if len(session.classes) > 3 else ''}")
            if len(strategies) == 1:
                raise TlcoreError(message)
            log.warning("skipping %s", message)
            continue
        rows.append(run_strategy(session, strategy, progress=progress))
    return rows

