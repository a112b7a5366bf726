"""The report command: one command trains, experiments and writes tables and figures."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from tlcore import report
from tlcore.experiments import STUDY_REFERENCE, read_experiments
from tlcore.plots import STUDY_NOTE
from tlcore.results import read_results

STRATEGIES = ("general", "linear", "gray", "scale", "full")
FIGURES = ("accuracy.png", "sizes.png", "color_gray.png", "contrast.png", "learning_curves.png",
           *(f"confusion_{name}.png" for name in STRATEGIES))
TABLES = ("summary.csv", "summary.md")


@pytest.fixture(scope="module")
def reported(tmp_path_factory, shared_cache):
    """One run of the documented command, shortened, on the built-in digits.

    ``full`` is not trained here (its reloading is checked with the experiments); it is still
    run, tested and evaluated under every condition.
    """
    out = tmp_path_factory.mktemp("report") / "runs"
    # The feature cache is shared with the experiments' tests of the same session.
    code = report.main(["--out", str(out), "--train-all", "--weights", "random", "--device", "cpu",
                        "--cache-dir", str(shared_cache), "--epochs", "3", "--full-epochs", "0",
                        "--train-sizes", "32", "--sizes", "32", "40", "--contrasts", "0.5",
                        "--quiet"])
    assert code == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FIGURES + TABLES)
def test_one_command_writes_every_table_and_figure(reported, name):
    path = reported / "report" / name
    assert path.is_file() and path.stat().st_size > 0
    if name.endswith(".png"):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert min(image.size) >= 300


def test_one_command_trains_and_evaluates_every_strategy(reported):
    assert sorted(read_results(reported)["variant"]) == sorted(STRATEGIES)
    experiments = read_experiments(reported)
    assert sorted(experiments["strategy"].unique()) == sorted(STRATEGIES)
    kinds = experiments.groupby("strategy")["condition"].apply(set)
    assert all(k == {"base", "size", "color", "contrast"} for k in kinds)


def test_markdown_has_a_row_per_strategy_and_the_study_column(reported):
    text = (reported / "report" / "summary.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert "study test (%)" in header and "study gray (%)" in header
    assert "chance (%)" in header
    names = [line.split("|")[1].strip() for line in body]
    assert names == [*STRATEGIES, "subset (not run)"]
    study = dict(zip(names, (line.split("|")[-3].strip() for line in body), strict=True))
    assert study["general"] == f"{STUDY_REFERENCE['general']['test']:.1f}"
    assert study["subset (not run)"] == f"{STUDY_REFERENCE['subset']['test']:.1f}"
    assert study["full"] == "–"  # the study has no separate end-to-end row
    assert STUDY_NOTE in text


def test_summary_csv_matches_the_experiments(reported):
    summary = pd.read_csv(reported / "report" / "summary.csv").set_index("strategy")
    experiments = read_experiments(reported)
    base = experiments[experiments["condition"] == "base"].set_index("strategy")
    for name in STRATEGIES:
        assert summary.loc[name, "test"] == pytest.approx(100 * base.loc[name, "accuracy"],
                                                          abs=0.01)
        assert summary.loc[name, "chance"] == pytest.approx(10.0)
        assert {"40 px", "gray", "contrast 0.5"} <= set(summary.columns)


def test_report_alone_rereads_the_tables(reported):
    before = len(read_experiments(reported))
    (reported / "report" / "accuracy.png").unlink()

    assert report.main(["--out", str(reported), "--quiet"]) == 0

    assert (reported / "report" / "accuracy.png").stat().st_size > 0
    assert len(read_experiments(reported)) == before  # no experiments without asking


def test_report_without_experiments_says_how_to_get_them(tmp_path, capsys):
    assert report.main(["--out", str(tmp_path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "experiments.csv" in error and "--run-experiments" in error


@pytest.mark.parametrize("argv, message", [(["--contrasts", "0"], "contrast"),
                                           (["--sizes", "8"], "image size")])
def test_bad_conditions_fail_before_any_work(tmp_path, capsys, argv, message):
    assert report.main(["--out", str(tmp_path), "--train-all", *argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()
