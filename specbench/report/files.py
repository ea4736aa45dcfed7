"""The report as files (summary.md, summary.csv, categories.md/.csv when runs have categories, plots/*.png),
and logged to a run (a sweep's parent)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from specbench.report.categories import category_table
from specbench.report.figures import comparison_figures
from specbench.report.load import load_figures, probe_table
from specbench.report.query import crossover_table, summary_table
from specbench.summary import markdown_table

ARTIFACT_DIR = "report"


def table_markdown(table: pd.DataFrame) -> str:
    """A summary table as markdown."""
    return markdown_table(list(table.columns), table.itertuples(index=False))


def write_report(runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write summary.md, summary.csv, categories.md/.csv and plots/*.png under `out_dir`; return the paths written."""
    table = summary_table(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, csv = out_dir / "summary.md", out_dir / "summary.csv"
    text = table_markdown(table) + "\n"
    crossovers = crossover_table(runs)
    if not crossovers.empty:
        text += "\n### Where speculation stops paying (batch size)\n\n" + table_markdown(crossovers) + "\n"
    probes = probe_table(runs)
    if not probes.empty:
        text += "\n### Under load (one row per request rate)\n\n" + table_markdown(probes) + "\n"
    markdown.write_text(text)
    table.to_csv(csv, index=False)
    paths = [markdown, csv]
    by_category = category_table(runs)
    if not by_category.empty:  # runs of a prompt set with categories
        markdown, csv = out_dir / "categories.md", out_dir / "categories.csv"
        markdown.write_text(table_markdown(by_category) + "\n")
        by_category.to_csv(csv, index=False)
        paths += [markdown, csv]
    for artifact, figure in (comparison_figures(runs) | load_figures(runs)).items():
        path = out_dir / artifact
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        paths.append(path)
    return paths


def log_report(runs: pd.DataFrame, run_id: str) -> None:
    """Log the files of `write_report` to the MLflow run `run_id` (e.g. the sweep's parent), under report/."""
    with tempfile.TemporaryDirectory() as folder:
        write_report(runs, Path(folder))
        MlflowClient().log_artifacts(run_id, folder, ARTIFACT_DIR)
