"""The report: tables and PNG figures from the results table, experiments and run folders.

:func:`write_report` fills ``<out>/report/`` with ``summary.csv`` and ``summary.md``
(strategies x conditions, chance level, the original study's figures as a reference) and the
figures: accuracy per strategy, accuracy vs test image size, colour vs gray, contrast, learning
curves and one confusion matrix per strategy. Figures are drawn with matplotlib's object API on
the Agg canvas, so no display and no global pyplot state are involved.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tlcore.experiments import STUDY_REFERENCE, latest_sweep, read_experiments, summary_table

__all__ = [
    "STUDY_NOTE",
    "write_report",
    "markdown_table",
    "plot_accuracy",
    "plot_sizes",
    "plot_color_gray",
    "plot_contrast",
    "plot_learning_curves",
    "plot_confusion",
]

log = logging.getLogger(__name__)

STUDY_NOTE = ("Study columns: the original study's published test accuracy (theirs, not "
              "reproduced here): VGG16 with ImageNet weights on 10 ImageNet classes, every "
              "strategy in fact trained end to end (all layers), on colour and on grayscale "
              "test images. Reference only.")
_STUDY_LABEL = "original study (theirs, trained end to end)"
_DPI = 120
# Strategies often coincide (e.g. general and gray on gray images): vary the dash and marker too.
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ("-", "x"))


def _new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path)
    log.info("wrote %s", path)
    return path


def _percent(values) -> np.ndarray:
    return 100.0 * np.asarray(values, dtype=float)


def _chance_line(ax, chance: float) -> None:
    ax.axhline(chance, color="0.4", linestyle=":", linewidth=1, label=f"chance ({chance:.0f} %)")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.1f}"
    return str(value)


def markdown_table(summary) -> str:
    """The summary as a Markdown table, accuracy in %, with the study's figures and a note."""
    columns = [c for c in summary.columns if c not in ("run_id", "n_images")]
    header = ["strategy" if c == "strategy" else f"{c} (%)" if c != "chance" else "chance (%)"
              for c in columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for _, row in summary.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    # Strategies the study reports but these runs lack (e.g. subset without wnid classes).
    for name in sorted(set(STUDY_REFERENCE) - set(summary["strategy"])):
        cells = {"strategy": f"{name} (not run)", "study test": STUDY_REFERENCE[name]["test"],
                 "study gray": STUDY_REFERENCE[name]["gray"]}
        lines.append("| " + " | ".join(_fmt(cells.get(c, float("nan"))) for c in columns) + " |")
    n_images = ", ".join(sorted({str(n) for n in summary["n_images"]})) if len(summary) else "0"
    return "\n".join([
        "# Test accuracy by strategy and condition", "",
        f"Accuracy in % on the test split ({n_images} images, each once per condition). "
        "`test`: the run's own test pipeline; `N px`: test images resized to N pixels; "
        "`color` / `gray`: colour or grayscale test images; `contrast f`: contrast scaled by f "
        "around each image's mean luminance. Chance: always guessing the most common class.",
        "", *lines, "", STUDY_NOTE, "",
    ])


def plot_accuracy(summary, path: Path) -> Path:
    """Bars of each strategy's test accuracy, with chance and the study's figures."""
    figure = _new_figure()
    ax = figure.add_subplot()
    x = np.arange(len(summary))
    ax.bar(x, summary["test"], color="tab:blue", label="ours")
    for xi, value in zip(x, summary["test"], strict=True):
        ax.annotate(f"{value:.1f}", (xi, value), ha="center", va="bottom", fontsize=8)
    ax.scatter(x, summary["study test"], marker="D", color="tab:orange", zorder=3,
               label=_STUDY_LABEL)
    _chance_line(ax, summary["chance"].max())
    ax.set_xticks(x, summary["strategy"])
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per strategy")
    figure.legend(loc="outside lower center", ncols=3, fontsize=8)
    return _save(figure, path)


def _lines(ax, latest, condition: str, x_of) -> None:
    groups = latest.groupby("strategy", sort=False)
    for (strategy, group), (dash, marker) in zip(groups, _STYLES * 2, strict=False):
        rows = group[group["condition"] == condition]
        if rows.empty:
            continue
        xs = np.array([x_of(r) for _, r in rows.iterrows()])
        order = np.argsort(xs)
        ax.plot(xs[order], _percent(rows["accuracy"])[order], linestyle=dash, marker=marker,
                markerfacecolor="none", label=strategy)


def plot_sizes(latest, path: Path) -> Path:
    """Test accuracy against test image size, one line per strategy."""
    figure = _new_figure()
    ax = figure.add_subplot()
    _lines(ax, latest, "size", lambda r: float(r["image_size"]))
    sizes = sorted({int(s) for s in latest.loc[latest["condition"] == "size", "image_size"]})
    base = latest[latest["condition"] == "base"]
    for size in sorted({int(s) for s in base["image_size"]}):
        ax.axvline(size, color="0.7", linewidth=1, zorder=0)
    _chance_line(ax, 100.0 * latest["chance"].max())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("test image size (px); grey line: training/test size of the runs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs test image size")
    figure.legend(loc="outside right center", fontsize=8)
    return _save(figure, path)


def plot_color_gray(summary, path: Path) -> Path:
    """Paired bars of accuracy on colour and on grayscale test images, with the study's."""
    figure = _new_figure()
    ax = figure.add_subplot()
    x = np.arange(len(summary))
    width = 0.38
    ax.bar(x - width / 2, summary["color"], width, color="tab:blue", label="colour test images")
    ax.bar(x + width / 2, summary["gray"], width, color="0.55", label="grayscale test images")
    ax.scatter(x - width / 2, summary["study test"], marker="D", color="tab:orange", zorder=3,
               label=f"{_STUDY_LABEL}: colour")
    ax.scatter(x + width / 2, summary["study gray"], marker="D", color="black", zorder=3,
               label=f"{_STUDY_LABEL}: gray")
    _chance_line(ax, summary["chance"].max())
    ax.set_xticks(x, summary["strategy"])
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Colour vs grayscale test images")
    figure.legend(loc="outside lower center", ncols=2, fontsize=7)
    return _save(figure, path)


def plot_contrast(latest, path: Path) -> Path:
    """Test accuracy against the contrast factor (1 = unchanged), one line per strategy."""
    figure = _new_figure()
    ax = figure.add_subplot()
    with_base = latest.copy()
    with_base.loc[with_base["condition"] == "base", "condition"] = "contrast"
    _lines(ax, with_base, "contrast", lambda r: float(r["contrast"]))
    factors = sorted({float(c) for c in with_base.loc[with_base["condition"] == "contrast",
                                                      "contrast"]})
    _chance_line(ax, 100.0 * latest["chance"].max())
    ax.set_xscale("log")
    ax.set_xticks(factors, [f"{f:g}" for f in factors])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("contrast factor (1 = unchanged test images)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs contrast")
    figure.legend(loc="outside right center", fontsize=8)
    return _save(figure, path)


def read_log(run_dir: Path) -> list[dict]:
    """The per-epoch rows of a run's ``log.jsonl`` (none for untrained strategies)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curves(logs: dict[str, list[dict]], path: Path) -> Path:
    """Train and validation accuracy per epoch, one panel per trained strategy."""
    logs = {name: rows for name, rows in logs.items() if rows}
    cols = min(3, max(1, len(logs)))
    nrows = max(1, math.ceil(len(logs) / cols))
    figure = _new_figure(4.0 * cols, 3.0 * nrows)
    axes = figure.subplots(nrows, cols, squeeze=False)
    for ax, (name, rows) in zip(axes.flat, logs.items(), strict=False):
        epochs = [r["epoch"] for r in rows]
        marker = "o" if len(rows) <= 10 else None
        ax.plot(epochs, _percent([r["train_accuracy"] for r in rows]), marker=marker,
                label="train")
        ax.plot(epochs, _percent([r["val_accuracy"] for r in rows]), marker=marker, label="val")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Multi-size training: mark where each size's stage begins.
        for prev, row in zip(rows, rows[1:], strict=False):
            if row.get("image_size") != prev.get("image_size"):
                ax.axvline(row["epoch"] - 0.5, color="0.6", linestyle="--", linewidth=1)
                ax.annotate(f"{row['image_size']} px", (row["epoch"], 3), fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(logs):]:
        ax.set_visible(False)
    figure.suptitle("Learning curves")
    return _save(figure, path)


def plot_confusion(confusion, classes: list[str], title: str, path: Path) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), with counts in the cells."""
    matrix = np.asarray(confusion)
    size = max(3.5, 0.45 * len(classes) + 1.5)
    figure = _new_figure(size + 0.8, size)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > threshold else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
        ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, shrink=0.8, label="test images")
    return _save(figure, path)


def write_report(out: str | os.PathLike) -> dict[str, Path]:
    """Write the report's tables and figures into ``<out>/report/``.

    Args:
        out: the output folder with ``results.csv``, ``experiments.csv`` and the run folders.

    Returns:
        Every file written, by name.
    """
    out = Path(out)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    experiments = read_experiments(out)
    latest = latest_sweep(experiments)
    summary = summary_table(experiments)

    written = {}
    summary.round(2).to_csv(folder / "summary.csv", index=False)
    written["summary.csv"] = folder / "summary.csv"
    (folder / "summary.md").write_text(markdown_table(summary))
    written["summary.md"] = folder / "summary.md"

    for name, plot, data in (("accuracy.png", plot_accuracy, summary),
                             ("sizes.png", plot_sizes, latest),
                             ("color_gray.png", plot_color_gray, summary),
                             ("contrast.png", plot_contrast, latest)):
        written[name] = plot(data, folder / name)

    run_dirs = {row["strategy"]: out / row["run_id"] for _, row in summary.iterrows()}
    logs = {name: read_log(run_dir) for name, run_dir in run_dirs.items()}
    if any(logs.values()):
        written["learning_curves.png"] = plot_learning_curves(logs, folder / "learning_curves.png")
    for name, run_dir in run_dirs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        accuracy = 100.0 * metrics["test"]["accuracy"]
        title = f"{name}: confusion matrix, test accuracy {accuracy:.1f} %"
        file = f"confusion_{name}.png"
        written[file] = plot_confusion(metrics["test"]["confusion"], metrics["classes"], title,
                                       folder / file)
    missing = sorted(set(STUDY_REFERENCE) - set(summary["strategy"]))
    if missing:
        log.info("no runs of %s; the study's figures for them are left out", ", ".join(missing))
    return written
