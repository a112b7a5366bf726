"""Command line: list, verify and remove feature-cache entries.

    python -m tlcore.cache list
    python -m tlcore.cache verify
    python -m tlcore.cache remove --split test --size 64
    python -m tlcore.cache remove --all
"""

from __future__ import annotations

import argparse
import sys

from tlcore.cache import EntryInfo, FeatureCache, verify_entry


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tlcore.cache",
                                     description="List, verify and remove feature-cache entries.")
    parser.add_argument("--cache-dir", default="cache",
                        help="the cache folder given to tlcore.train (default: cache)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per entry: key, split, images, size, created")
    commands.add_parser("verify", help="check every entry; exit 1 if any is unsound")
    remove = commands.add_parser("remove", help="delete entries matching every filter given")
    remove.add_argument("--all", action="store_true", help="remove every entry")
    remove.add_argument("--split", help="only entries of this split")
    remove.add_argument("--size", type=int, help="only entries at this image size")
    remove.add_argument("--weights", help="only entries of these weights (e.g. random:seed0)")
    remove.add_argument("--gray", action=argparse.BooleanOptionalAction, default=None,
                        help="only grayscale (--gray) or colour (--no-gray) entries")
    return parser


def describe(info: EntryInfo) -> str:
    key, pre = info.key, info.key.get("preprocess", {})
    mode = "gray" if pre.get("gray") else "colour"
    return (f"{info.path.name:<40} {key.get('split', '?'):<5} {info.images:>7} "
            f"{info.size_bytes / 2**20:>9.1f} {info.created:<25} {key.get('weights', '?')} "
            f"{pre.get('image_size', '?')}px {mode} {key.get('dtype', '?')} "
            f"{key.get('data_root', '?')}")


def matcher(args: argparse.Namespace):
    """A predicate for ``remove`` built from the filters given on the command line."""
    def match(info: EntryInfo) -> bool:
        key, pre = info.key, info.key.get("preprocess", {})
        return ((args.split is None or key.get("split") == args.split)
                and (args.size is None or pre.get("image_size") == args.size)
                and (args.weights is None or key.get("weights") == args.weights)
                and (args.gray is None or pre.get("gray") == args.gray))
    return match


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cache = FeatureCache(f"{args.cache_dir}/features")
    entries = cache.entries() if cache.directory.is_dir() else []

    if args.command == "list":
        print(f"{'entry':<40} {'split':<5} {'images':>7} {'size MiB':>9} {'created':<25} key")
        for info in entries:
            print(describe(info))
        print(f"{len(entries)} entries, {sum(i.size_bytes for i in entries) / 2**20:.1f} MiB "
              f"in {cache.directory}")
        return 0

    if args.command == "verify":
        bad = 0
        for info in entries:
            problem = verify_entry(info.path)
            bad += problem is not None
            status = f"BAD  {info.path.name}: {problem}" if problem else f"ok   {info.path.name}"
            print(status)
        print(f"{len(entries) - bad} sound, {bad} unsound")
        return 1 if bad else 0

    filters = (args.split, args.size, args.weights, args.gray)
    if not args.all and all(f is None for f in filters):
        print("error: remove needs --all or at least one filter (--split, --size, --weights, "
              "--gray)", file=sys.stderr)
        return 2
    removed = cache.remove(matcher(args)) if entries else []
    for path in removed:
        print(f"removed {path.name}")
    print(f"{len(removed)} entries removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
