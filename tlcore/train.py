"""Command line: train and test transfer strategies, append their results.

    python -m tlcore.train --variant linear --use-cache
    python -m tlcore.train --variant all --data ROOT --weights imagenet
"""

from __future__ import annotations

import argparse
import sys

from tlcore import TlcoreError
from tlcore.cache import DTYPES
from tlcore.cli import report_error, report_interrupt, setup_logging
from tlcore.config import DEFAULTS, CacheConfig, DataConfig, RunConfig, TrainConfig
from tlcore.imagenet import parse_classes
from tlcore.inputs import LOADERS, RESIZE_MODES
from tlcore.strategies import STRATEGIES


def get_args_parser() -> argparse.ArgumentParser:
    strategies = "\n".join(f"  {s.name:8s} {s.description}" for s in STRATEGIES.values())
    parser = argparse.ArgumentParser(
        prog="python -m tlcore.train",
        description="Train and test transfer-learning strategies on VGG16.\n\nstrategies:\n"
                    f"{strategies}\n  all      every strategy that applies to the data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b, f = DEFAULTS["builtin"], DEFAULTS["folder"]
    parser.add_argument("--variant", default="linear", choices=[*STRATEGIES, "all"],
                        help="strategy to run, or all (default: linear)")
    parser.add_argument("--data", default=None, metavar="ROOT",
                        help="image folder with ROOT/{train,val,test}/<class>/<image>; "
                             "default: the built-in digits dataset, written under --cache-dir")
    parser.add_argument("--classes", default=None,
                        help="with --data pointing at an ImageNet-layout folder (wnid folders): "
                             "study (the original study's 10 labels) or a comma-separated list "
                             "of ImageNet indices or wnids; seeded splits are drawn as file "
                             "lists, nothing is copied")
    parser.add_argument("--per-class", type=int, nargs=3, default=DataConfig.per_class,
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="images per class drawn for --classes (default: "
                             f"{' '.join(map(str, DataConfig.per_class))})")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the --classes draw (default: 0)")
    parser.add_argument("--weights", default="auto",
                        help="imagenet, random, auto (imagenet if cached or downloadable, else "
                             "random with a warning) or a VGG16 state-dict path (default: auto)")
    parser.add_argument("--use-cache", action="store_true",
                        help="read head strategies' frozen features from the HDF5 cache, "
                             "extracting them when missing (full always streams images)")
    parser.add_argument("--cache-dir", default="cache",
                        help="feature cache and built-in dataset folder (default: cache)")
    parser.add_argument("--cache-dtype", default="float32", choices=DTYPES,
                        help="on-disk dtype of cached features (default: float32)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs for head strategies, per size for scale (default: "
                             f"{b['epochs']} built-in, {f['epochs']} with --data)")
    parser.add_argument("--full-epochs", type=int, default=None,
                        help=f"epochs for full (default: {b['full_epochs']} built-in, "
                             f"{f['full_epochs']} with --data)")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"training and test image size in pixels (default: "
                             f"{b['image_size']} built-in, {f['image_size']} with --data)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="training sizes of scale, in order (default: "
                             f"{' '.join(map(str, b['sizes']))} built-in, "
                             f"{' '.join(map(str, f['sizes']))} with --data)")
    parser.add_argument("--resize", default="stretch", choices=RESIZE_MODES,
                        help="stretch to a square, or resize the short side and centre-crop "
                             "(default: stretch)")
    parser.add_argument("--loader", default="dali", choices=LOADERS,
                        help="input pipeline (default: dali)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"SGD learning rate, momentum 0.9 (default: {b['lr']:g} built-in, "
                             f"{f['lr']:g} with --data)")
    parser.add_argument("--standardize", default=None, action=argparse.BooleanOptionalAction,
                        help="standardise the head's input with training-split statistics, "
                             "which SGD needs on random weights' tiny activations (default: on "
                             "built-in, off with --data, as in the original study)")
    parser.add_argument("--backbone-lr-scale", type=float, default=None,
                        help="full's backbone learning rate as a fraction of --lr (default: "
                             f"{b['backbone_lr_scale']:g} built-in, {f['backbone_lr_scale']:g} "
                             "with --data)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default="runs",
                        help="output folder for run folders and results.csv (default: runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or epoch logs")
    return parser


def build_config(args: argparse.Namespace) -> RunConfig:
    """Fill unset options with the defaults for the data and check the numbers."""
    defaults = DEFAULTS["builtin" if args.data is None else "folder"]

    def pick(value, name):
        return defaults[name] if value is None else value

    for name in ("epochs", "full_epochs", "batch_size", "image_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if "epochs" in name else 1):
            flag = "--" + name.replace("_", "-")
            raise TlcoreError(f"{flag} {value} is out of range; pass a positive number")
    if any(n < 1 for n in args.per_class):
        raise TlcoreError(f"--per-class {' '.join(map(str, args.per_class))} needs three "
                          "positive counts (train, val, test)")
    if args.lr is not None and args.lr <= 0:
        raise TlcoreError(f"--lr {args.lr} must be positive")
    classes = None if args.classes is None else tuple(parse_classes(args.classes))
    return RunConfig(
        variant=args.variant, weights=args.weights, device=args.device, out=args.out,
        data=DataConfig(root=args.data, resize_mode=args.resize, loader=args.loader,
                        image_size=pick(args.image_size, "image_size"),
                        sizes=tuple(pick(args.sizes, "sizes")),
                        classes=classes,
                        per_class=tuple(args.per_class), split_seed=args.split_seed),
        train=TrainConfig(epochs=pick(args.epochs, "epochs"),
                          full_epochs=pick(args.full_epochs, "full_epochs"),
                          batch_size=args.batch_size, lr=pick(args.lr, "lr"), seed=args.seed,
                          standardize=pick(args.standardize, "standardize"),
                          backbone_lr_scale=pick(args.backbone_lr_scale, "backbone_lr_scale")),
        cache=CacheConfig(enabled=args.use_cache, directory=args.cache_dir,
                          dtype=args.cache_dtype),
    )


def format_table(rows: list[dict]) -> str:
    """The end-of-run summary: one line per strategy."""
    header = (f"{'strategy':<9} {'source':<7} {'epochs':>6} {'test acc':>8} {'likelihood':>10} "
              f"{'macro F1':>8} {'train s':>8} {'extract s':>9} {'test img/s':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['variant']:<9} {r['source']:<7} {r['epochs']:>6} {r['test_accuracy']:>8.3f} "
            f"{r['test_mean_likelihood']:>10.3f} {r['test_macro_f1']:>8.3f} "
            f"{r['train_seconds']:>8.1f} {r['extract_seconds']:>9.1f} "
            f"{r['test_images_per_s']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging(args.quiet)

    from tlcore.runs import run_variants

    try:
        config = build_config(args)
        rows = run_variants(config, progress=not args.quiet)
    except TlcoreError as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        return report_interrupt()
    if rows:
        print()
        print(format_table(rows))
        print(f"\nweights: {rows[0]['weights']}; data: {rows[0]['data']}; "
              f"results appended to {config.out}/results.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
