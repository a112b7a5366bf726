"""Command line: run the experiments over trained runs and write the report.

    python -m tlcore.report --out runs --train-all          # train, experiment, report
    python -m tlcore.report --out runs --run-experiments    # experiment on runs, report
    python -m tlcore.report --out runs                      # report from experiments.csv
"""

from __future__ import annotations

import argparse
import sys
import time

from tlcore import TlcoreError
from tlcore.cli import report_error, report_interrupt, setup_logging
from tlcore.experiments import DEFAULT_CONTRASTS, DEFAULT_SIZES


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tlcore.report",
        description="Evaluate the latest run of each strategy on the test split at other image "
                    "sizes, on grayscale images and at lower contrast, and write tables and "
                    "figures into OUT/report/.",
    )
    parser.add_argument("--out", default="runs",
                        help="output folder with results.csv and run folders (default: runs)")
    parser.add_argument("--train-all", action="store_true",
                        help="first train every strategy that applies, with the feature cache "
                             "and tlcore.train's defaults (on the built-in dataset unless "
                             "--data is given); implies --run-experiments")
    parser.add_argument("--data", default=None, metavar="ROOT",
                        help="with --train-all: the image folder to train on (default: the "
                             "built-in digits)")
    parser.add_argument("--weights", default="auto",
                        help="with --train-all: imagenet, random, auto or a VGG16 state-dict "
                             "path (default: auto)")
    parser.add_argument("--seed", type=int, default=0,
                        help="with --train-all: random seed (default: 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="with --train-all: epochs for head strategies (default: "
                             "tlcore.train's)")
    parser.add_argument("--full-epochs", type=int, default=None,
                        help="with --train-all: epochs for full (default: tlcore.train's)")
    parser.add_argument("--train-sizes", type=int, nargs="+", default=None,
                        help="with --train-all: training sizes of scale (default: "
                             "tlcore.train's)")
    parser.add_argument("--run-experiments", action="store_true",
                        help="evaluate the runs under every condition and append the rows to "
                             "OUT/experiments.csv before writing the report")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN_ID",
                        help="run folders to evaluate (default: the latest run of each "
                             "strategy in OUT/results.csv)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="test image sizes in pixels (default: "
                             f"{' '.join(map(str, DEFAULT_SIZES['builtin']))} on the built-in "
                             f"dataset, {' '.join(map(str, DEFAULT_SIZES['folder']))} on "
                             "image folders)")
    parser.add_argument("--contrasts", type=float, nargs="+", default=list(DEFAULT_CONTRASTS),
                        help="contrast factors, 1 = unchanged (default: "
                             f"{' '.join(map(str, DEFAULT_CONTRASTS))})")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache folder (default: each run's own; 'cache' when "
                             "training)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    return parser


def train_all(args: argparse.Namespace) -> None:
    """Train every strategy that applies, as ``python -m tlcore.train --variant all`` would."""
    from tlcore import train
    from tlcore.runs import run_variants

    argv = ["--variant", "all", "--use-cache", "--out", args.out, "--weights", args.weights,
            "--device", args.device, "--seed", str(args.seed),
            "--cache-dir", args.cache_dir or "cache"]
    for flag, value in (("--data", args.data), ("--epochs", args.epochs),
                        ("--full-epochs", args.full_epochs)):
        if value is not None:
            argv += [flag, str(value)]
    if args.train_sizes:
        argv += ["--sizes", *map(str, args.train_sizes)]
    config = train.build_config(train.get_args_parser().parse_args(argv))
    rows = run_variants(config, progress=not args.quiet)
    print(train.format_table(rows))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging(args.quiet)

    from tlcore.experiments import build_conditions, run_experiments
    from tlcore.plots import write_report

    start = time.perf_counter()
    try:
        build_conditions(args.sizes or (), args.contrasts)  # bad values fail before any work
        if args.train_all:
            train_all(args)
        if args.train_all or args.run_experiments:
            run_experiments(args.out, run_ids=args.runs, sizes=args.sizes,
                            contrasts=args.contrasts, device=args.device,
                            cache_dir=args.cache_dir)
        written = write_report(args.out)
    except TlcoreError as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        return report_interrupt()
    folder = written["summary.md"].parent
    print()
    print(written["summary.md"].read_text())
    print(f"{len(written)} files written to {folder} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
