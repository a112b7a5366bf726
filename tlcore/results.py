"""Run folders and the append-only results table.

Each run gets a folder under the output folder with its resolved config (``config.json``), a
per-epoch log (``log.jsonl``), its test metrics (``metrics.json``) and the weights it trained.
``results.csv`` in the output folder gets one row per run; rows are only ever appended.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

__all__ = ["RESULT_COLUMNS", "create_run_dir", "append_jsonl", "write_json", "append_rows",
           "append_result", "read_results", "environment"]

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "run_id", "finished", "variant", "data", "classes", "weights", "image_size", "train_sizes",
    "resize_mode", "loader", "epochs", "batch_size", "lr", "seed", "source",
    "test_accuracy", "test_mean_likelihood", "test_macro_f1", "test_loss", "val_accuracy",
    "train_seconds", "epoch_seconds", "extract_seconds", "test_images_per_s",
    "device", "torch", "torchvision", "dali", "tlcore", "git_commit", "run_dir",
)


def create_run_dir(out: str | os.PathLike, variant: str) -> Path:
    """Create a fresh, uniquely named run folder under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run_dir = out / f"{stamp}-{variant}" if n == 0 else out / f"{stamp}-{variant}-{n}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {out}")


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line to ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def append_rows(path: Path, rows: list[dict], columns) -> Path:
    """Append ``rows`` to the CSV table at ``path``, writing ``columns`` as header if it is new.

    An existing file keeps its header: columns it lacks are left out of the rows, and no earlier
    row is ever rewritten. A lock keeps concurrent writers from interleaving.
    """
    with FileLock(str(path) + ".lock"):
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as f:
                header, new = next(csv.reader(f)), False
        else:
            header, new = list(columns), True
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return path


def append_result(out: str | os.PathLike, row: dict) -> Path:
    """Append one run's ``row`` to ``out/results.csv`` (the rest is in its run folder)."""
    return append_rows(Path(out) / "results.csv", [row], RESULT_COLUMNS)


def read_results(out: str | os.PathLike):
    """The results table of ``out`` as a pandas DataFrame."""
    import pandas as pd

    return pd.read_csv(Path(out) / "results.csv")


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment(device) -> dict:
    """Library versions, device and commit, recorded in every result row."""
    import torch
    import torchvision

    import tlcore

    try:
        from nvidia import dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = "absent"
    name = str(device)
    if getattr(device, "type", None) == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        name = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali_version,
        "tlcore": tlcore.__version__,
        "git_commit": _git_commit(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
